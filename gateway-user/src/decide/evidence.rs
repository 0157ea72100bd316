//! What an attempt's failure means, once: how a failed `connect()` is classified, the one
//! "host died" rule for an established connection, why a response timer fired, and the health
//! [`Evidence`] each of them is worth. The connect path, the metrics and the health state
//! machine all read the same answers from here.
//!
//! | what happened | classified as | health evidence |
//! |---|---|---|
//! | `connect()` failed with ECONNREFUSED (an RST answered the SYN) | [`ConnectFailure::Refused`] | [`Evidence::Refused`] |
//! | ENETUNREACH, EHOSTUNREACH, EHOSTDOWN, ENONET (an ICMP error, or no route) | [`ConnectFailure::Unreachable`] | [`Evidence::Unreachable`] |
//! | ETIMEDOUT (the kernel's own SYN retries ran out), or the gateway's connect deadline | [`ConnectFailure::Unanswered`] | [`Evidence::SynUnanswered`] |
//! | EADDRNOTAVAIL (no ephemeral port: a local problem) | [`ConnectFailure::AddrUnavailable`] | none |
//! | another errno the kernel's record shows an ICMP error ended after the SYN (EACCES: IPv6 administratively prohibited; ENOPROTOOPT), in `proxy::upstream::connect::failed` | [`ConnectFailure::Unreachable`] | [`Evidence::Unreachable`] |
//! | anything else (EPERM from a local filter, …) | [`ConnectFailure::Other`] | none |
//! | RTOs fired while request bytes stay unACKed ([`host_died`]; a request gives its connection up while it stays so, [`gives_up_on_stall`]) | [`ResponseCause::HostDied`] | [`Evidence::HostDied`] |
//! | the response timer fired, the kernel saw no such stall | [`ResponseCause::SlowBackend`] (kernel) or [`ResponseCause::Unknown`] | [`Evidence::ResponseTimeout`] |
//! | a TLS handshake failed or timed out, and RTOs fired with the ClientHello unACKed | [`TlsFailure`] | [`Evidence::HostDied`] (the network, not TLS) |
//! | a TLS handshake failed or timed out on a TCP connection the kernel saw healthy | [`TlsFailure`] | [`Evidence::TlsFailed`], never a network failure |

use std::time::Duration;

use gateway_common::Outcome;

use super::health::{Evidence, Reason};
use crate::signals::EstablishedEvidence;

/// How a `connect()` failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectFailure {
    Refused,
    Unreachable,
    /// No SYN-ACK, RST or ICMP in time: the kernel's own timeout or the gateway's deadline.
    Unanswered,
    AddrUnavailable,
    Other,
}

impl ConnectFailure {
    /// The failure an errno from `connect()` (or `SO_ERROR`) stands for.
    pub fn from_errno(errno: i32) -> ConnectFailure {
        match errno {
            libc::ECONNREFUSED => ConnectFailure::Refused,
            libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EHOSTDOWN | libc::ENONET => {
                ConnectFailure::Unreachable
            }
            libc::ETIMEDOUT => ConnectFailure::Unanswered,
            libc::EADDRNOTAVAIL => ConnectFailure::AddrUnavailable,
            _ => ConnectFailure::Other,
        }
    }

    /// What it says about the endpoint's health; `None` when it says nothing about the
    /// endpoint (a local error).
    pub fn health_evidence(self) -> Option<Evidence> {
        match self {
            ConnectFailure::Refused => Some(Evidence::Refused),
            ConnectFailure::Unreachable => Some(Evidence::Unreachable),
            ConnectFailure::Unanswered => Some(Evidence::SynUnanswered),
            ConnectFailure::AddrUnavailable | ConnectFailure::Other => None,
        }
    }

    /// The connect outcome label it is counted under when the kernel has no record of it
    /// (the kernel's own record wins when there is one); `None` for failures the kernel would
    /// not report as a connect outcome.
    pub fn outcome(self) -> Option<Outcome> {
        match self {
            ConnectFailure::Refused => Some(Outcome::Refused),
            ConnectFailure::Unreachable => Some(Outcome::Unreachable),
            ConnectFailure::Unanswered => Some(Outcome::Timeout),
            ConnectFailure::AddrUnavailable => Some(Outcome::AddrUnavailable),
            ConnectFailure::Other => None,
        }
    }
}

/// How a TLS handshake with an upstream failed. Names are the `reason` label of
/// `gateway_tls_handshake_errors_total{side="upstream"}` and words in the 502's sentence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFailure {
    /// No ServerHello (or no end of the handshake) within `tls_handshake_timeout_ms`.
    Timeout,
    /// The certificate chains to no trusted CA (`ca_file`, or the system's roots).
    UnknownCa,
    /// The certificate is not valid for the name the gateway asked for (`server_name`).
    NameMismatch,
    /// Expired, or not yet valid.
    Expired,
    /// Any other certificate problem (bad encoding, unsupported, revoked, …).
    BadCertificate,
    /// The upstream ended the handshake with an alert.
    PeerAlert,
    /// No common version, cipher or ALPN protocol; a malformed or unexpected message.
    Protocol,
    /// The upstream closed the connection during the handshake.
    PeerClosed,
    /// The socket failed under the handshake (a reset, …).
    Io,
}

impl TlsFailure {
    pub const ALL: [TlsFailure; 9] = [
        TlsFailure::Timeout,
        TlsFailure::UnknownCa,
        TlsFailure::NameMismatch,
        TlsFailure::Expired,
        TlsFailure::BadCertificate,
        TlsFailure::PeerAlert,
        TlsFailure::Protocol,
        TlsFailure::PeerClosed,
        TlsFailure::Io,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            TlsFailure::Timeout => "timeout",
            TlsFailure::UnknownCa => "unknown_ca",
            TlsFailure::NameMismatch => "name_mismatch",
            TlsFailure::Expired => "expired",
            TlsFailure::BadCertificate => "bad_certificate",
            TlsFailure::PeerAlert => "alert",
            TlsFailure::Protocol => "protocol",
            TlsFailure::PeerClosed => "closed",
            TlsFailure::Io => "io",
        }
    }

    /// What a failed handshake says about the endpoint's health, given the kernel's final
    /// record of the TCP connection under it: a path or host that died under the handshake
    /// (RTOs with the ClientHello unACKed, [`host_died`]) is a network failure; anything
    /// else happened on a healthy TCP connection and is only ever a TLS failure.
    pub fn health_evidence(self, tcp: Option<&EstablishedEvidence>) -> Evidence {
        match tcp {
            Some(e) if host_died(e) => Evidence::HostDied,
            _ => Evidence::TlsFailed,
        }
    }
}

/// The host or the path died under an established connection: the kernel's retransmission
/// timer fired and request bytes are still unACKed. A slow backend ACKs the request and then
/// sends nothing, which never fires an RTO.
pub fn host_died(e: &EstablishedEvidence) -> bool {
    e.rtos > 0 && e.unacked_bytes > 0
}

/// How long a connection may have been stalled before a request gives it up even with nowhere
/// else to go ([`gives_up_on_stall`]): a stall TCP seldom comes back from. The client gets
/// `upstream_host_died` with the kernel's record then, rather than the response timeout's
/// `504` long after.
pub const STALL_ALONE: Duration = Duration::from_secs(3);

/// An established connection's stall, as `TCP_INFO` shows it now (the kernel observer's
/// record is written at RTOs, retransmits and state changes only, and counts the connection's
/// whole life).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stall {
    /// RTOs since the peer last ACKed new data (`tcpi_retransmits`, which every ACK of new
    /// data clears): above 0, stalled now.
    pub unrecovered_rtos: u8,
    /// The retransmission timeout now (`tcpi_rto`), doubled at each of those RTOs: about how
    /// long nothing new was ACKed (its base once, then each doubling waited out). Not the
    /// time since the last ACK (`tcpi_last_ack_recv`), which came back to a few hundred ms
    /// after each RTO of a blackholed connection in the lab.
    pub rto: Duration,
}

impl Stall {
    pub fn now(self) -> bool {
        self.unrecovered_rtos > 0
    }
}

/// Whether a request waiting for its response gives its connection up at a look: the host or
/// the path died under it ([`host_died`], from the kernel observer's record) and it is still
/// stalled ([`Stall::now`]). At once when the request can go elsewhere (`elsewhere`: another
/// endpoint, and a retry the policy and the retry budget allow; asked last), else once the
/// stall lasted [`STALL_ALONE`] (by the backed-off RTO: four RTOs at the 200 ms minimum).
///
/// The record's counts are the connection's whole life: on a path with some loss, one RTO
/// that TCP recovered from (on this request, or on an earlier one of a keep-alive connection)
/// said "died" at every later look while bytes were in flight, which a long upload always
/// has. With nowhere else to go, giving up at once cannot help the request: it only turns a
/// stall TCP may still recover from into an error (57 of 200 requests on a path losing 30 %
/// of its packets, 5 of 200 straight to the upstream). Time, not a count of RTOs, bounds the
/// wait: a host's lowered `rto_min` makes RTOs come ten times as fast.
pub fn gives_up_on_stall(
    e: &EstablishedEvidence,
    stall: Stall,
    elsewhere: impl FnOnce() -> bool,
) -> bool {
    host_died(e) && stall.now() && (stall.rto >= STALL_ALONE || elsewhere())
}

/// Why a response timer fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseCause {
    /// See [`host_died`].
    HostDied,
    /// With kernel signals and no stall on the connection: the upstream's kernel has the
    /// request and the application did not answer.
    SlowBackend,
    /// No kernel signals: nothing to tell the two apart.
    Unknown,
}

impl ResponseCause {
    /// `kernel`: kernel signals are flowing. `evidence`: the kernel's record of the connection,
    /// which exists only once a retransmit or an RTO happened (or the connection closed), so
    /// `None` with kernel signals means there was no stall; `stall`: the connection now (a
    /// stall it recovered from is no death: the request reached a slow backend after all).
    pub fn of(kernel: bool, evidence: Option<&EstablishedEvidence>, stall: Stall) -> ResponseCause {
        match evidence {
            Some(e) if host_died(e) && stall.now() => ResponseCause::HostDied,
            _ if kernel => ResponseCause::SlowBackend,
            _ => ResponseCause::Unknown,
        }
    }

    pub fn health_evidence(self) -> Evidence {
        match self {
            ResponseCause::HostDied => Evidence::HostDied,
            ResponseCause::SlowBackend | ResponseCause::Unknown => Evidence::ResponseTimeout,
        }
    }
}

/// Why a failed probe of a probing endpoint ejects it again: what the probe met, as an
/// ordinary request's would say (`/status`, the log and `gateway_endpoint_ejections_total`
/// keep saying `refused` through the back-off, not `probe_failed`); `probe_failed` for what
/// names no cause of its own (a connect that needed SYN retransmits, a response timeout).
pub fn probe_reason(ev: Evidence) -> Reason {
    match ev {
        Evidence::SynUnanswered => Reason::SynUnanswered,
        Evidence::Refused => Reason::Refused,
        Evidence::Unreachable => Reason::Unreachable,
        Evidence::HostDied => Reason::HostDied,
        Evidence::UnexpectedStatus => Reason::UnexpectedStatus,
        Evidence::TlsFailed => Reason::TlsFailure,
        Evidence::ErrorStatus => Reason::ErrorStatus,
        Evidence::ConnectOk { .. } | Evidence::ResponseTimeout | Evidence::ResponseOk => {
            Reason::ProbeFailed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(rtos: u32, unacked: u64) -> EstablishedEvidence {
        EstablishedEvidence {
            data_retransmits: rtos,
            rtos,
            srtt: None,
            bytes_acked: 0,
            unacked_bytes: unacked,
        }
    }

    #[test]
    fn a_stall_gives_the_connection_up_while_it_lasts_at_once_only_with_somewhere_to_go() {
        let died = conn(1, 100);
        let never = || -> bool { panic!("the pick is asked only when it decides") };
        let stall = |unrecovered_rtos: u8, ms: u64| Stall {
            unrecovered_rtos,
            rto: Duration::from_millis(ms),
        };
        // A loss TCP recovered from (nothing unrecovered now) is no death, and bytes all
        // ACKed are none either.
        assert!(!gives_up_on_stall(&died, stall(0, 5000), never));
        assert!(!gives_up_on_stall(&conn(3, 0), stall(2, 5000), never));
        assert!(!gives_up_on_stall(&conn(0, 100), stall(1, 5000), never));
        // A stall: at once when the request can go elsewhere.
        assert!(gives_up_on_stall(&died, stall(1, 200), || true));
        // With nowhere else to go, only once it lasted.
        assert!(!gives_up_on_stall(&died, stall(3, 1600), || false));
        assert!(gives_up_on_stall(&died, stall(4, 3200), never));
    }

    #[test]
    fn errnos_map_to_one_classification_and_one_health_evidence() {
        for (errno, f, ev) in [
            (
                libc::ECONNREFUSED,
                ConnectFailure::Refused,
                Some(Evidence::Refused),
            ),
            (
                libc::EHOSTUNREACH,
                ConnectFailure::Unreachable,
                Some(Evidence::Unreachable),
            ),
            (
                libc::ENETUNREACH,
                ConnectFailure::Unreachable,
                Some(Evidence::Unreachable),
            ),
            (
                libc::ETIMEDOUT,
                ConnectFailure::Unanswered,
                Some(Evidence::SynUnanswered),
            ),
            (libc::EADDRNOTAVAIL, ConnectFailure::AddrUnavailable, None),
            (libc::EPERM, ConnectFailure::Other, None),
        ] {
            assert_eq!(ConnectFailure::from_errno(errno), f, "errno {errno}");
            assert_eq!(f.health_evidence(), ev, "{f:?}");
        }
        assert_eq!(ConnectFailure::Other.outcome(), None);
        assert_eq!(
            ConnectFailure::AddrUnavailable.outcome(),
            Some(Outcome::AddrUnavailable)
        );
    }

    #[test]
    fn a_tls_failure_on_a_healthy_tcp_connection_is_never_a_network_failure() {
        for f in TlsFailure::ALL {
            assert_eq!(f.health_evidence(None), Evidence::TlsFailed, "{f:?}");
            assert_eq!(f.health_evidence(Some(&conn(0, 0))), Evidence::TlsFailed);
            assert_eq!(
                f.health_evidence(Some(&conn(3, 0))),
                Evidence::TlsFailed,
                "RTOs, but the ClientHello was ACKed"
            );
            assert_eq!(f.health_evidence(Some(&conn(3, 517))), Evidence::HostDied);
        }
    }

    #[test]
    fn the_host_died_only_when_rtos_fired_with_bytes_in_flight() {
        assert!(host_died(&conn(2, 78)));
        assert!(!host_died(&conn(0, 78)), "unACKed but no RTO yet");
        assert!(!host_died(&conn(3, 0)), "RTOs, but everything was ACKed");
    }

    #[test]
    fn a_response_timeout_is_a_slow_backend_only_with_kernel_signals() {
        let stalled = Stall {
            unrecovered_rtos: 3,
            rto: Duration::from_millis(1600),
        };
        assert_eq!(
            ResponseCause::of(true, Some(&conn(3, 78)), stalled),
            ResponseCause::HostDied
        );
        assert_eq!(
            ResponseCause::of(true, None, Stall::default()),
            ResponseCause::SlowBackend
        );
        assert_eq!(
            ResponseCause::of(true, Some(&conn(0, 0)), stalled),
            ResponseCause::SlowBackend
        );
        assert_eq!(
            ResponseCause::of(false, None, Stall::default()),
            ResponseCause::Unknown
        );
        // An RTO the connection recovered from: the request reached a slow backend.
        assert_eq!(
            ResponseCause::of(true, Some(&conn(3, 78)), Stall::default()),
            ResponseCause::SlowBackend
        );
        assert_eq!(
            ResponseCause::HostDied.health_evidence(),
            Evidence::HostDied
        );
        assert_eq!(
            ResponseCause::SlowBackend.health_evidence(),
            Evidence::ResponseTimeout
        );
    }
}
