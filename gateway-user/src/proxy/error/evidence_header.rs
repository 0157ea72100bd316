//! The kernel evidence behind a [`ProxyError`] in `key=value` form, for `x-gateway-evidence`.

use std::time::Duration;

use super::ProxyError;
use crate::decide::retry::Delivery;
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
                // A refusal by ICMP port unreachable is no RST.
                u8::from(e.outcome == Outcome::Refused && !e.refused_by_icmp),
                u8::from(e.outcome == Outcome::Unreachable || e.refused_by_icmp),
                e.errno.and_then(gateway_common::errno::name).unwrap_or("-"),
                e.elapsed.as_millis(),
                deadline
                    .map(|d| format!(" deadline_ms={}", d.as_millis()))
                    .unwrap_or_default()
            )
        };
        // `request_acked` is this request's (`unknown` on a keep-alive connection whose count
        // before the request was not taken); the counts after it are the connection's.
        let conn = |e: &EstablishedEvidence, delivery: &Delivery| {
            let acked = match (delivery, e.unacked_bytes) {
                (Delivery::NotReceived, _) => "no",
                (Delivery::Unknown, _) => "unknown",
                (Delivery::Received, 0) => "yes",
                (Delivery::Received, _) => "partial",
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
                evidence: Some(e),
                delivery,
                ..
            }
            | ProxyError::UpstreamHostDied {
                evidence: e,
                delivery,
                ..
            } => Some(conn(e, delivery)),
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
