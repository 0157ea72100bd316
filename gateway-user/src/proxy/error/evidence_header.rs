//! The kernel evidence behind a [`ProxyError`] in `key=value` form, for `x-gateway-evidence`.

use std::time::Duration;

use super::ProxyError;
use crate::signals::{ConnectEvidence, EstablishedEvidence};

impl ProxyError {
    /// The kernel evidence behind the error in `key=value` form, for the `x-gateway-evidence`
    /// header: `syns=2 synack=0 rst=0 icmp=0 errno=- waited_ms=250 deadline_ms=250` for a
    /// connect, `request_acked=no bytes_acked=0 unacked=120 rtos=3 retransmits=3` for an
    /// established connection. `None` without kernel evidence.
    pub fn evidence_header(&self) -> Option<String> {
        use gateway_common::Outcome;
        let connect = |e: &ConnectEvidence, deadline: Option<Duration>| {
            format!(
                "syns={} synack={} rst={} icmp={} errno={} waited_ms={}{}",
                e.syn_retransmits + 1,
                u8::from(e.outcome == Outcome::Established),
                u8::from(e.outcome == Outcome::Refused),
                u8::from(e.outcome == Outcome::Unreachable),
                e.errno.and_then(gateway_common::errno::name).unwrap_or("-"),
                e.elapsed.as_millis(),
                deadline
                    .map(|d| format!(" deadline_ms={}", d.as_millis()))
                    .unwrap_or_default()
            )
        };
        let conn = |e: &EstablishedEvidence| {
            let acked = match (e.bytes_acked, e.unacked_bytes) {
                (0, _) => "no",
                (_, 0) => "yes",
                _ => "partial",
            };
            format!(
                "request_acked={acked} bytes_acked={} unacked={} rtos={} retransmits={}",
                e.bytes_acked, e.unacked_bytes, e.rtos, e.data_retransmits
            )
        };
        match self {
            ProxyError::ConnectTimeout {
                evidence: Some(e),
                timeout,
                ..
            } => Some(connect(e, Some(*timeout))),
            ProxyError::ConnectRefused {
                evidence: Some(e), ..
            }
            | ProxyError::ConnectUnreachable {
                evidence: Some(e), ..
            } => Some(connect(e, None)),
            ProxyError::ResponseTimeout {
                evidence: Some(e), ..
            }
            | ProxyError::UpstreamHostDied { evidence: e, .. } => Some(conn(e)),
            ProxyError::ResponseTimeout {
                evidence: None,
                slow_backend: true,
                ..
            } => Some("request_acked=yes rtos=0 retransmits=0 cause=slow_backend".to_owned()),
            ProxyError::TlsHandshakeTimeout {
                evidence: Some(e),
                tcp,
                ..
            }
            | ProxyError::TlsError {
                evidence: Some(e),
                tcp,
                ..
            } => Some(format!(
                "tcp=established connect_us={} server_bytes={} client_bytes_acked={} unacked={} rtos={} retransmits={}",
                tcp.kernel_rtt.unwrap_or(tcp.connect).as_micros(),
                tcp.server_bytes
                    .map_or_else(|| "-".to_owned(), |n| n.to_string()),
                e.bytes_acked,
                e.unacked_bytes,
                e.rtos,
                e.data_retransmits
            )),
            _ => None,
        }
    }
}
