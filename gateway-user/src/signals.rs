//! The seam through which the proxy receives kernel signals: the [`SignalSource`] trait and the
//! evidence types it answers with.
//!
//! The proxy never talks to eBPF maps itself. It holds an `Arc<dyn SignalSource>` and, for each
//! upstream attempt, asks what the kernel saw for the socket with that `SO_COOKIE` (the proxy
//! reads the cookie from its own socket before `connect()`, see `proxy::connect`).
//! [`kernel::KernelSignals`] answers from the observer stream (`crate::observer::stream`);
//! when eBPF cannot load, [`UserspaceOnly`] answers `None` and says why in
//! [`SignalSource::mode`]. Everything the proxy decides must therefore work with no evidence
//! at all: evidence sharpens error messages and steers deadlines, hedging, retries and
//! ejection (`crate::decide`) when it is there.

pub mod kernel;

use std::{fmt, time::Duration};

use crate::diagnose::tcpinfo::TcpInfo;

pub use gateway_common::Outcome as ConnectOutcome;

/// Where the proxy's kernel signals come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignalMode {
    /// eBPF programs are attached and per-connect records are flowing.
    Kernel,
    /// No kernel signals: decisions use userspace timing alone. `reason` says why, in words an
    /// operator can act on (e.g. "not running as root").
    UserspaceOnly { reason: String },
}

impl fmt::Display for SignalMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignalMode::Kernel => f.write_str("kernel"),
            SignalMode::UserspaceOnly { reason } => write!(f, "userspace-only ({reason})"),
        }
    }
}

/// What the kernel recorded about one `connect()`, keyed by the socket's `SO_COOKIE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectEvidence {
    /// How the connect ended (SYN-ACK, RST, the kernel's own SYN timeout, ICMP error, closed by
    /// the application while in SYN_SENT, no ephemeral port).
    pub outcome: ConnectOutcome,
    /// SYNs retransmitted after the first one.
    pub syn_retransmits: u32,
    /// Time from the first SYN to the SYN-ACK, when there was one.
    pub syn_rtt: Option<Duration>,
    /// The errno the kernel ended the connect with, if any (`ECONNREFUSED`, `EHOSTUNREACH`, ...).
    pub errno: Option<u32>,
    /// Time from `connect()` to the outcome (or to the moment the record was read).
    pub elapsed: Duration,
    /// What the application (the proxy itself) read with `getsockopt(SO_ERROR)` afterwards:
    /// 0 = no error; `None` when it has not read it (a socket closed in SYN_SENT) or the
    /// kernel's follow-up record has not been seen.
    pub so_error: Option<u32>,
    /// Refused by an ICMP port unreachable, not an RST: a firewall's `REJECT` (iptables'
    /// default reply, kube-proxy's for a Service with no ready endpoints), not a host with no
    /// listener on the port.
    pub refused_by_icmp: bool,
}

impl fmt::Display for ConnectEvidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let syns = self.syn_retransmits + 1;
        write!(f, "kernel: {}, {syns} SYN sent", self.outcome.name())?;
        match self.outcome {
            ConnectOutcome::Established => {
                if let Some(rtt) = self.syn_rtt {
                    write!(f, ", SYN-ACK after {} us", rtt.as_micros())?;
                }
            }
            ConnectOutcome::Refused if self.refused_by_icmp => {
                f.write_str(", ICMP port unreachable received, no RST (a firewall's REJECT)")?;
            }
            ConnectOutcome::Refused => f.write_str(", RST received")?,
            ConnectOutcome::Aborted if self.errno.is_none() => {
                f.write_str(", no SYN-ACK, no RST (dropped on the path or host down)")?;
            }
            _ => {}
        }
        if let Some(errno) = self.errno {
            match gateway_common::errno::name(errno) {
                Some(name) => write!(f, ", {name}")?,
                None => write!(f, ", errno {errno}")?,
            }
        }
        Ok(())
    }
}

/// What the kernel knows about an established upstream connection, keyed by `SO_COOKIE`.
///
/// It separates "the request never reached the upstream's kernel" (bytes unacked,
/// retransmitting) from "the upstream received it and is slow" (all bytes acked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EstablishedEvidence {
    /// Data segments retransmitted on this connection.
    pub data_retransmits: u32,
    /// Retransmission timeouts that fired.
    pub rtos: u32,
    /// Smoothed RTT, as the kernel's `tcp_sock.srtt_us` reports it.
    pub srtt: Option<Duration>,
    /// Bytes the peer has acknowledged.
    pub bytes_acked: u64,
    /// Bytes sent and not yet acknowledged.
    pub unacked_bytes: u64,
}

impl EstablishedEvidence {
    /// What `TCP_INFO`, read on the socket just before it was closed, says: for a connection
    /// the kernel observer kept no record of, which means it closed cleanly (see
    /// `gateway_common::ConnStats`). `TCP_INFO` counts the connect's SYN retransmits among
    /// retransmits and RTOs, and its SYN among the bytes ACKed; the observer does not, so they
    /// are taken out. None when this kernel's `TCP_INFO` lacks the byte counts.
    pub fn from_tcp_info(i: &TcpInfo, syn_retransmits: u32) -> Option<EstablishedEvidence> {
        Some(EstablishedEvidence {
            data_retransmits: i.total_retrans.saturating_sub(syn_retransmits),
            rtos: i
                .total_rto
                .map_or(0, |r| u32::from(r).saturating_sub(syn_retransmits)),
            srtt: (i.rtt_us > 0).then(|| Duration::from_micros(u64::from(i.rtt_us))),
            bytes_acked: i.bytes_acked?.saturating_sub(1),
            unacked_bytes: i.unacked_bytes()?,
        })
    }
}

impl fmt::Display for EstablishedEvidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "kernel: {} bytes acked, {} unacked, {} retransmits, {} RTOs",
            self.bytes_acked, self.unacked_bytes, self.data_retransmits, self.rtos
        )?;
        if let Some(srtt) = self.srtt {
            write!(f, ", srtt {} us", srtt.as_micros())?;
        }
        Ok(())
    }
}

/// Kernel signals as the proxy consumes them.
///
/// Implementations must be cheap to call on the request path: a map lookup, no I/O, no waiting.
pub trait SignalSource: Send + Sync + 'static {
    /// Whether kernel signals are flowing, and if not, why.
    fn mode(&self) -> SignalMode;
    /// `mode() == SignalMode::Kernel`, without building the mode (asked per request).
    fn kernel(&self) -> bool {
        self.mode() == SignalMode::Kernel
    }
    /// The kernel's record of the connect made on the socket with this cookie, if it has one.
    fn connect_evidence(&self, cookie: u64) -> Option<ConnectEvidence>;
    /// The kernel's view of the established connection with this cookie, if it has one.
    fn established_evidence(&self, cookie: u64) -> Option<EstablishedEvidence>;
    /// Connect records the kernel could not queue so far (ring buffer full); `None` without a
    /// kernel observer. Not for the request path: it may take a lock and read a map.
    fn events_lost(&self) -> Option<u64> {
        None
    }
    /// The cgroup v2 the kernel observer is attached to, if any.
    fn cgroup(&self) -> Option<std::path::PathBuf> {
        None
    }
    /// The kernel side's anomaly counts (map insert failures, records of connects in flight
    /// overwritten, unexpected state transitions) by kind (`gateway_common::anomaly::KINDS`); `None` without
    /// a kernel observer. Not for the request path.
    fn kernel_anomalies(&self) -> Option<Vec<(&'static str, u64)>> {
        None
    }
    /// Anomaly log lines the kernel side did not write (its once-per-second limit per kind and
    /// CPU); `None` without a kernel observer. Not for the request path.
    fn anomaly_logs_suppressed(&self) -> Option<u64> {
        None
    }
}

/// No kernel signals. Used when eBPF cannot load, and in tests.
#[derive(Clone, Debug)]
pub struct UserspaceOnly {
    reason: String,
}

impl UserspaceOnly {
    /// `reason` is shown to the operator, e.g. "eBPF not loaded: not running as root".
    pub fn new(reason: impl Into<String>) -> Self {
        UserspaceOnly {
            reason: reason.into(),
        }
    }
}

impl Default for UserspaceOnly {
    fn default() -> Self {
        UserspaceOnly::new("kernel observer not attached")
    }
}

impl SignalSource for UserspaceOnly {
    fn mode(&self) -> SignalMode {
        SignalMode::UserspaceOnly {
            reason: self.reason.clone(),
        }
    }

    fn connect_evidence(&self, _cookie: u64) -> Option<ConnectEvidence> {
        None
    }

    fn established_evidence(&self, _cookie: u64) -> Option<EstablishedEvidence> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userspace_only_reports_its_reason_and_no_evidence() {
        let s = UserspaceOnly::new("not root");
        assert_eq!(
            s.mode(),
            SignalMode::UserspaceOnly {
                reason: "not root".into()
            }
        );
        assert_eq!(s.mode().to_string(), "userspace-only (not root)");
        assert!(s.connect_evidence(42).is_none());
        assert!(s.established_evidence(42).is_none());
    }

    #[test]
    fn connect_evidence_reads_like_a_diagnosis() {
        let e = ConnectEvidence {
            outcome: ConnectOutcome::Aborted,
            syn_retransmits: 0,
            syn_rtt: None,
            errno: None,
            elapsed: Duration::from_millis(250),
            so_error: None,
            refused_by_icmp: false,
        };
        assert_eq!(
            e.to_string(),
            "kernel: aborted, 1 SYN sent, no SYN-ACK, no RST (dropped on the path or host down)"
        );
        let e = ConnectEvidence {
            outcome: ConnectOutcome::Refused,
            errno: Some(gateway_common::errno::ECONNREFUSED),
            ..e
        };
        assert_eq!(
            e.to_string(),
            "kernel: refused, 1 SYN sent, RST received, ECONNREFUSED"
        );
        let e = ConnectEvidence {
            refused_by_icmp: true,
            ..e
        };
        assert_eq!(
            e.to_string(),
            "kernel: refused, 1 SYN sent, ICMP port unreachable received, no RST (a firewall's REJECT), ECONNREFUSED"
        );
    }
}
