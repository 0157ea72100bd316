//! Active probes: when one is due, and what its result is worth as health evidence.
//!
//! When:
//! - a suspect endpoint: at once, then every `probe_interval`;
//! - a probing endpoint (its ejection ran out): every `probe_interval`;
//! - a healthy endpoint with too few recent handshakes for an adaptive connect deadline: one
//!   measuring probe every [`WARM_PROBE_INTERVAL`] (keep-alive pooling hides handshakes, so
//!   without these the SYN-RTT window would never fill on a busy, healthy endpoint);
//! - an ejected endpoint: never (it waits out its ejection).
//!
//! What a probe's result means:
//!
//! | result | evidence |
//! |---|---|
//! | connect refused / unreachable / unanswered | [`Evidence::Refused`] / [`Evidence::Unreachable`] / [`Evidence::SynUnanswered`] |
//! | connect failed for a local reason (no ephemeral port, …) | none: it says nothing about the endpoint |
//! | connected, no HTTP check configured | [`Evidence::ConnectOk`] with the SYN retransmits the kernel saw |
//! | `GET probe_path` answered the expected status, clean handshake | [`Evidence::ResponseOk`] |
//! | … expected status, but the SYN needed retransmits | [`Evidence::ConnectOk`] (a slow handshake) |
//! | … another status | [`Evidence::UnexpectedStatus`] (its own reason, never "refused") |
//! | … no valid response in time | [`Evidence::ResponseTimeout`] |
//! | connected, but the cluster's TLS handshake failed or timed out | [`super::evidence::TlsFailure::health_evidence`]: [`Evidence::TlsFailed`] unless the host died under it |

use std::time::Duration;

use tokio::time::Instant;

use super::{
    evidence::ConnectFailure,
    health::{Evidence, State},
};

/// How often a healthy endpoint with too few recent handshakes gets a measuring probe: every
/// tick of the probe loop, one at a time, so that an endpoint has its adaptive connect
/// deadline about a second after the gateway starts (or the endpoint is added), not eight.
/// Until then its connects wait the whole configured `connect_timeout_ms` (`bench faults
/// --faults blackhole --fault-at 3`: 40 requests took 5 s with one probe a second). Only the
/// start is faster: once the endpoint has its samples, it is probed again only as they age out
/// of the window, one probe for each, as before.
pub const WARM_PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// Whether a probe of an endpoint in `state` is due at `now`. `last`: when the previous probe
/// started; `needs_samples`: adaptive deadlines are on and the endpoint has fewer recent
/// handshakes than they need.
pub fn due(
    state: State,
    needs_samples: bool,
    last: Option<Instant>,
    now: Instant,
    probe_interval: Duration,
) -> bool {
    let since_last =
        |every: Duration| last.is_none_or(|l| now.saturating_duration_since(l) >= every);
    match state {
        State::Suspect | State::Probing => since_last(probe_interval),
        State::Healthy | State::Slow => needs_samples && since_last(WARM_PROBE_INTERVAL),
        State::Ejected => false,
    }
}

/// How a probe went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeResult {
    ConnectFailed(ConnectFailure),
    /// Connected; no HTTP check is configured.
    Connected {
        syn_retransmits: u32,
    },
    /// Connected, and `GET probe_path` answered `status`.
    Answered {
        syn_retransmits: u32,
        status: u16,
        expected: u16,
    },
    /// Connected, but the `GET` got no valid response in time.
    NoAnswer {
        syn_retransmits: u32,
    },
    /// Connected, but the TLS handshake failed: what that is worth, already judged by
    /// [`super::evidence::TlsFailure::health_evidence`].
    TlsFailed(Evidence),
}

/// The health evidence a probe result is worth; `None` when it says nothing about the
/// endpoint.
pub fn evidence(r: ProbeResult) -> Option<Evidence> {
    match r {
        ProbeResult::ConnectFailed(f) => f.health_evidence(),
        ProbeResult::Connected { syn_retransmits } => Some(Evidence::ConnectOk { syn_retransmits }),
        ProbeResult::Answered {
            status, expected, ..
        } if status != expected => Some(Evidence::UnexpectedStatus),
        ProbeResult::Answered {
            syn_retransmits: 0, ..
        } => Some(Evidence::ResponseOk),
        ProbeResult::Answered {
            syn_retransmits, ..
        } => Some(Evidence::ConnectOk { syn_retransmits }),
        ProbeResult::NoAnswer { .. } => Some(Evidence::ResponseTimeout),
        ProbeResult::TlsFailed(ev) => Some(ev),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_millis(500);

    #[tokio::test(start_paused = true)]
    async fn suspect_and_probing_endpoints_are_probed_every_interval() {
        for state in [State::Suspect, State::Probing] {
            let t0 = Instant::now();
            assert!(due(state, false, None, t0, INTERVAL), "{state:?}: at once");
            tokio::time::advance(Duration::from_millis(499)).await;
            assert!(!due(state, false, Some(t0), Instant::now(), INTERVAL));
            tokio::time::advance(Duration::from_millis(1)).await;
            assert!(due(state, false, Some(t0), Instant::now(), INTERVAL));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn healthy_endpoints_get_a_measuring_probe_per_tick_only_while_they_need_samples() {
        let t0 = Instant::now();
        assert!(due(State::Healthy, true, None, t0, INTERVAL));
        assert!(!due(State::Healthy, false, None, t0, INTERVAL));
        tokio::time::advance(Duration::from_millis(99)).await;
        assert!(!due(
            State::Healthy,
            true,
            Some(t0),
            Instant::now(),
            INTERVAL
        ));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(due(
            State::Healthy,
            true,
            Some(t0),
            Instant::now(),
            INTERVAL
        ));
    }

    #[test]
    fn ejected_endpoints_wait_out_their_ejection() {
        assert!(!due(State::Ejected, true, None, Instant::now(), INTERVAL));
    }

    #[test]
    fn a_wrong_status_is_its_own_evidence_not_a_refusal() {
        let r = ProbeResult::Answered {
            syn_retransmits: 0,
            status: 503,
            expected: 200,
        };
        assert_eq!(evidence(r), Some(Evidence::UnexpectedStatus));
    }

    #[test]
    fn probe_results_map_to_evidence() {
        let answered = |syn_retransmits, status| ProbeResult::Answered {
            syn_retransmits,
            status,
            expected: 200,
        };
        assert_eq!(evidence(answered(0, 200)), Some(Evidence::ResponseOk));
        assert_eq!(
            evidence(answered(1, 200)),
            Some(Evidence::ConnectOk { syn_retransmits: 1 })
        );
        assert_eq!(
            evidence(ProbeResult::NoAnswer { syn_retransmits: 0 }),
            Some(Evidence::ResponseTimeout)
        );
        assert_eq!(
            evidence(ProbeResult::Connected { syn_retransmits: 2 }),
            Some(Evidence::ConnectOk { syn_retransmits: 2 })
        );
        assert_eq!(
            evidence(ProbeResult::ConnectFailed(ConnectFailure::Refused)),
            Some(Evidence::Refused)
        );
        assert_eq!(
            evidence(ProbeResult::ConnectFailed(ConnectFailure::Unanswered)),
            Some(Evidence::SynUnanswered)
        );
        assert_eq!(
            evidence(ProbeResult::ConnectFailed(ConnectFailure::AddrUnavailable)),
            None,
            "a local failure says nothing about the endpoint"
        );
    }
}
