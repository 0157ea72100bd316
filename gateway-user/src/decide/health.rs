//! Per-endpoint health from kernel evidence: healthy → suspect → ejected → probing → healthy.
//!
//! | evidence | effect |
//! |---|---|
//! | RST (refused), ICMP unreachable | ejected at once |
//! | request bytes unACKed while RTOs fire on an established connection (host or path died) | ejected at once |
//! | a SYN unanswered by the connect deadline (no SYN-ACK, no RST, no ICMP) | suspect, and probed at once; a second in a row ejects |
//! | `slow_handshakes_to_suspect` connects in a row that needed SYN retransmits | suspect (overloaded or lossy): deprioritised, not ejected |
//! | `response_timeouts_to_eject` response timeouts in a row, request ACKed | ejected as `slow_backend` (0 disables); never counted as a network failure |
//! | `tls_failures_to_eject` TLS handshakes in a row that failed or timed out on a healthy TCP connection | ejected as `tls_failure` (0 disables); never counted as a network failure, and a TCP handshake does not clear it (only a response does) |
//! | `error_statuses_to_eject` responses in a row with status 502, 503 or 504 | ejected as `error_status` (0 disables): the upstream answers, but says it cannot serve; never counted as a network failure. Back from it, the endpoint is on probation: its first such response ejects it again, until it answers anything else |
//! | a health probe's `GET probe_path` answered with another status than expected | ejected at once, as `unexpected_status` |
//! | a clean handshake (on a TLS cluster: TCP, then TLS) or a response | clears the strikes; a suspect endpoint is healthy again |
//!
//! An ejection lasts `base_ejection × 2^(n-1)` for the n-th ejection in a row, capped at
//! `max_ejection`. When it ends the endpoint is *probing*: active probes (a kernel-measured TCP
//! connect, optionally an HTTP GET) run every `probe_interval`; `rise` successes in a row make it
//! healthy, one failure ejects it again with the next back-off. The ejection count resets once
//! the endpoint has stayed healthy for `max_ejection`.
//!
//! Fail-open: an ejection that would leave less than `100 - max_ejected_percent` % of the
//! cluster routable is refused; the endpoint is marked suspect instead (deprioritised, still
//! used when nothing better is left), so a cluster-wide problem never empties the cluster.

use std::time::Duration;

use tokio::time::Instant;

pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(1);
pub const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(30);
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(500);
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_MAX_EJECTED_PERCENT: u32 = 50;
pub const DEFAULT_SYN_UNANSWERED_TO_EJECT: u32 = 2;
pub const DEFAULT_SLOW_HANDSHAKES_TO_SUSPECT: u32 = 3;
pub const DEFAULT_RESPONSE_TIMEOUTS_TO_EJECT: u32 = 5;
pub const DEFAULT_TLS_FAILURES_TO_EJECT: u32 = 3;
pub const DEFAULT_ERROR_STATUSES_TO_EJECT: u32 = 5;

/// The statuses [`Evidence::ErrorStatus`] is made of: an upstream that cannot serve (a bad
/// gateway of its own, unavailable, a timeout behind it), as Envoy's
/// `consecutive_gateway_failure` counts them. Not a 500, which is as often the answer to one
/// request as the state of the instance.
pub fn is_error_status(status: u16) -> bool {
    matches!(status, 502..=504)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthPolicy {
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub probe_interval: Duration,
    pub rise: u32,
    pub max_ejected_percent: u32,
    pub syn_unanswered_to_eject: u32,
    pub slow_handshakes_to_suspect: u32,
    pub response_timeouts_to_eject: u32,
    pub tls_failures_to_eject: u32,
    pub error_statuses_to_eject: u32,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            base_ejection: DEFAULT_BASE_EJECTION,
            max_ejection: DEFAULT_MAX_EJECTION,
            probe_interval: DEFAULT_PROBE_INTERVAL,
            rise: DEFAULT_RISE,
            max_ejected_percent: DEFAULT_MAX_EJECTED_PERCENT,
            syn_unanswered_to_eject: DEFAULT_SYN_UNANSWERED_TO_EJECT,
            slow_handshakes_to_suspect: DEFAULT_SLOW_HANDSHAKES_TO_SUSPECT,
            response_timeouts_to_eject: DEFAULT_RESPONSE_TIMEOUTS_TO_EJECT,
            tls_failures_to_eject: DEFAULT_TLS_FAILURES_TO_EJECT,
            error_statuses_to_eject: DEFAULT_ERROR_STATUSES_TO_EJECT,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Healthy,
    /// Healthy as far as this machine knows, but a latency outlier that `lb_policy =
    /// "peak_ewma"` sends only a trickle to (`decide::latency`). Never set by this machine: the
    /// proxy shows it in place of `Healthy` (`/status`, metrics).
    Slow,
    Suspect,
    Ejected,
    Probing,
}

impl State {
    pub const ALL: [State; 5] = [
        State::Healthy,
        State::Slow,
        State::Suspect,
        State::Ejected,
        State::Probing,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            State::Healthy => "healthy",
            State::Slow => "slow",
            State::Suspect => "suspect",
            State::Ejected => "ejected",
            State::Probing => "probing",
        }
    }
}

/// Why an endpoint is not healthy. Names are metric label values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    SynUnanswered,
    Refused,
    Unreachable,
    HostDied,
    Overloaded,
    SlowBackend,
    /// Slow (`State::Slow`) because request bytes stayed unACKed while waiting for responses:
    /// the path delays or loses packets.
    SlowNetwork,
    /// A probe failed while the endpoint was probing.
    ProbeFailed,
    /// The probe's `GET probe_path` answered with another status than `probe_expect_status`.
    UnexpectedStatus,
    /// TLS handshakes failed or timed out on TCP connections the kernel saw healthy.
    TlsFailure,
    /// Responses in a row with status 502, 503 or 504 ([`is_error_status`]).
    ErrorStatus,
}

impl Reason {
    pub const fn name(self) -> &'static str {
        match self {
            Reason::SynUnanswered => "syn_unanswered",
            Reason::Refused => "refused",
            Reason::Unreachable => "unreachable",
            Reason::HostDied => "host_died",
            Reason::Overloaded => "overloaded",
            Reason::SlowBackend => "slow_backend",
            Reason::SlowNetwork => "slow_network",
            Reason::ProbeFailed => "probe_failed",
            Reason::UnexpectedStatus => "unexpected_status",
            Reason::TlsFailure => "tls_failure",
            Reason::ErrorStatus => "error_status",
        }
    }
}

/// What happened to one attempt (or probe) on the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evidence {
    /// A connect established after `syn_retransmits` SYN retransmits.
    ConnectOk {
        syn_retransmits: u32,
    },
    /// No SYN-ACK, no RST and no ICMP by the connect deadline (or the kernel's own timeout).
    SynUnanswered,
    Refused,
    Unreachable,
    /// An established connection stalled with request bytes unACKed while RTOs fired.
    HostDied,
    /// The response timer fired although the upstream's kernel ACKed the request.
    ResponseTimeout,
    /// A response arrived.
    ResponseOk,
    /// A health probe's HTTP check got the wrong status: the endpoint answers, but says it is
    /// not fit to serve.
    UnexpectedStatus,
    /// A TLS handshake failed or timed out on a TCP connection the kernel saw healthy.
    TlsFailed,
    /// A response arrived with status 502, 503 or 504 ([`is_error_status`]).
    ErrorStatus,
}

impl Evidence {
    /// Evidence of a failure. Only a failure can eject an endpoint ([`EndpointHealth::observe`]),
    /// so only then need the cluster's ejection budget be asked; and only failures are kept in
    /// the endpoint's recent events.
    pub fn is_failure(self) -> bool {
        !matches!(self, Evidence::ConnectOk { .. } | Evidence::ResponseOk)
    }
}

/// What [`EndpointHealth`] did with the evidence; the I/O shell acts on it (metrics, logs,
/// probes).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Transition {
    None,
    /// Newly suspect; the shell should probe it now.
    Suspected(Reason),
    Ejected {
        reason: Reason,
        duration: Duration,
    },
    /// It would have been ejected, but the cluster's ejection budget is spent (fail-open).
    EjectionRefused(Reason),
    /// The ejection ended: probe it every `probe_interval`.
    Probing,
    Recovered,
}

#[derive(Clone, Debug)]
pub struct EndpointHealth {
    state: State,
    reason: Option<Reason>,
    since: Instant,
    syn_unanswered: u32,
    slow_handshakes: u32,
    response_timeouts: u32,
    tls_failures: u32,
    error_statuses: u32,
    /// Back from an `error_status` ejection by probes that do not ask the application (a TCP
    /// connect): one more error status ejects it again.
    probation: bool,
    ejections: u32,
    ejected_until: Option<Instant>,
    probe_successes: u32,
}

impl EndpointHealth {
    pub fn new(now: Instant) -> EndpointHealth {
        EndpointHealth {
            state: State::Healthy,
            reason: None,
            since: now,
            syn_unanswered: 0,
            slow_handshakes: 0,
            response_timeouts: 0,
            tls_failures: 0,
            error_statuses: 0,
            probation: false,
            ejections: 0,
            ejected_until: None,
            probe_successes: 0,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn reason(&self) -> Option<Reason> {
        self.reason
    }

    pub fn since(&self) -> Instant {
        self.since
    }

    pub fn ejected_until(&self) -> Option<Instant> {
        self.ejected_until
    }

    /// Requests may go here (ejected and probing endpoints only get probes).
    pub fn routable(&self) -> bool {
        matches!(self.state, State::Healthy | State::Suspect)
    }

    fn set(&mut self, state: State, reason: Option<Reason>, now: Instant) {
        self.state = state;
        self.reason = reason;
        self.since = now;
    }

    fn eject(
        &mut self,
        reason: Reason,
        now: Instant,
        p: &HealthPolicy,
        may_eject: bool,
    ) -> Transition {
        if !may_eject {
            let was = self.state;
            self.set(State::Suspect, Some(reason), now);
            return if was == State::Suspect {
                Transition::None
            } else {
                Transition::EjectionRefused(reason)
            };
        }
        self.ejections += 1;
        let factor = 1u32 << (self.ejections - 1).min(16);
        let duration = p.base_ejection.saturating_mul(factor).min(p.max_ejection);
        self.ejected_until = Some(now + duration);
        self.probe_successes = 0;
        self.syn_unanswered = 0;
        self.slow_handshakes = 0;
        self.response_timeouts = 0;
        self.tls_failures = 0;
        self.error_statuses = 0;
        self.set(State::Ejected, Some(reason), now);
        Transition::Ejected { reason, duration }
    }

    fn suspect(&mut self, reason: Reason, now: Instant) -> Transition {
        if self.state == State::Healthy {
            self.set(State::Suspect, Some(reason), now);
            Transition::Suspected(reason)
        } else {
            Transition::None
        }
    }

    /// Feeds one attempt's evidence. `may_eject` is the cluster's answer to "would ejecting
    /// one more endpoint stay within `max_ejected_percent`?".
    pub fn observe(
        &mut self,
        ev: Evidence,
        now: Instant,
        p: &HealthPolicy,
        may_eject: bool,
    ) -> Transition {
        if matches!(self.state, State::Ejected | State::Probing) {
            // Requests in flight when it was ejected still report back; only probes decide now.
            return Transition::None;
        }
        match ev {
            Evidence::Refused => self.eject(Reason::Refused, now, p, may_eject),
            Evidence::Unreachable => self.eject(Reason::Unreachable, now, p, may_eject),
            Evidence::HostDied => self.eject(Reason::HostDied, now, p, may_eject),
            Evidence::UnexpectedStatus => self.eject(Reason::UnexpectedStatus, now, p, may_eject),
            Evidence::SynUnanswered => {
                self.syn_unanswered += 1;
                if self.syn_unanswered >= p.syn_unanswered_to_eject {
                    self.eject(Reason::SynUnanswered, now, p, may_eject)
                } else {
                    self.suspect(Reason::SynUnanswered, now)
                }
            }
            Evidence::ConnectOk { syn_retransmits } => {
                self.syn_unanswered = 0;
                if syn_retransmits > 0 {
                    self.slow_handshakes += 1;
                    if self.slow_handshakes >= p.slow_handshakes_to_suspect {
                        return self.suspect(Reason::Overloaded, now);
                    }
                    return Transition::None;
                }
                self.slow_handshakes = 0;
                self.clean(now, p)
            }
            Evidence::ResponseTimeout => {
                self.response_timeouts += 1;
                if p.response_timeouts_to_eject > 0
                    && self.response_timeouts >= p.response_timeouts_to_eject
                {
                    self.eject(Reason::SlowBackend, now, p, may_eject)
                } else {
                    Transition::None
                }
            }
            Evidence::TlsFailed => {
                self.tls_failures += 1;
                if p.tls_failures_to_eject > 0 && self.tls_failures >= p.tls_failures_to_eject {
                    self.eject(Reason::TlsFailure, now, p, may_eject)
                } else {
                    Transition::None
                }
            }
            Evidence::ErrorStatus => {
                // It answered: no timeout or TLS failure in a row any more.
                self.response_timeouts = 0;
                self.tls_failures = 0;
                self.error_statuses += 1;
                if p.error_statuses_to_eject > 0
                    && (self.probation || self.error_statuses >= p.error_statuses_to_eject)
                {
                    self.eject(Reason::ErrorStatus, now, p, may_eject)
                } else {
                    Transition::None
                }
            }
            Evidence::ResponseOk => {
                self.response_timeouts = 0;
                self.tls_failures = 0;
                self.error_statuses = 0;
                self.probation = false;
                Transition::None
            }
        }
    }

    fn clean(&mut self, now: Instant, p: &HealthPolicy) -> Transition {
        if self.state == State::Healthy
            && self.ejections > 0
            && now.saturating_duration_since(self.since) >= p.max_ejection
        {
            self.ejections = 0;
        }
        if self.state == State::Suspect {
            self.set(State::Healthy, None, now);
            return Transition::Recovered;
        }
        Transition::None
    }

    /// A reload changed what judged the endpoint (its health checks, TLS or protocol): an
    /// ejection ends now, and the next probe, under the new settings, decides.
    pub fn end_ejection(&mut self, now: Instant) {
        if self.state == State::Ejected {
            self.ejected_until = Some(now);
        }
    }

    /// Routable again as suspect (fail-open), as an ejection past the budget would have been
    /// kept: a reload left fewer endpoints than the ejections it carried allow.
    pub fn fail_open(&mut self, now: Instant) -> Transition {
        if self.routable() {
            return Transition::None;
        }
        let reason = self.reason.unwrap_or(Reason::ProbeFailed);
        self.ejected_until = None;
        self.probe_successes = 0;
        self.set(State::Suspect, Some(reason), now);
        Transition::EjectionRefused(reason)
    }

    /// Time passing: an ejection that has run out turns into probing.
    pub fn tick(&mut self, now: Instant) -> Transition {
        if self.state == State::Ejected && self.ejected_until.is_some_and(|t| now >= t) {
            self.ejected_until = None;
            self.probe_successes = 0;
            let reason = self.reason;
            self.set(State::Probing, reason, now);
            return Transition::Probing;
        }
        Transition::None
    }

    /// An active probe's result. Probes of suspect endpoints count as ordinary evidence.
    pub fn probe(
        &mut self,
        ev: Evidence,
        now: Instant,
        p: &HealthPolicy,
        may_eject: bool,
    ) -> Transition {
        match self.state {
            State::Probing => {
                if matches!(
                    ev,
                    Evidence::ConnectOk { syn_retransmits: 0 } | Evidence::ResponseOk
                ) {
                    self.probe_successes += 1;
                    if self.probe_successes >= p.rise {
                        // A connect says nothing of the application that answered 503s.
                        self.probation = self.reason == Some(Reason::ErrorStatus);
                        self.set(State::Healthy, None, now);
                        return Transition::Recovered;
                    }
                    Transition::None
                } else {
                    // Back-off grows even if the budget is spent: a probing endpoint is not
                    // routable either way.
                    self.eject(super::evidence::probe_reason(ev), now, p, true)
                }
            }
            // A probe's expected answer came over a clean handshake: it is the connect's
            // evidence too, on which a suspect endpoint recovers, as on a probe without
            // `probe_path`. (Taken as a response alone, it left a suspect endpoint suspect for
            // good: a fail-open one took no request again while healthy ones were left.)
            State::Healthy | State::Slow | State::Suspect if ev == Evidence::ResponseOk => {
                let clean = Evidence::ConnectOk { syn_retransmits: 0 };
                let t = self.observe(clean, now, p, may_eject);
                self.observe(ev, now, p, may_eject);
                t
            }
            State::Healthy | State::Slow | State::Suspect => self.observe(ev, now, p, may_eject),
            State::Ejected => Transition::None,
        }
    }
}

/// Whether a cluster of `total` endpoints, `unroutable` of them already ejected or probing,
/// may eject one more and keep at least `100 - max_ejected_percent` % routable. Below 100 % the
/// last routable endpoint is never ejected; 100 % is the operator saying "eject them all"
/// (requests then get 503 `no_healthy_upstream`).
pub fn may_eject(total: usize, unroutable: usize, max_ejected_percent: u32) -> bool {
    let after = unroutable + 1;
    after <= total
        && after * 100 <= total * max_ejected_percent as usize
        && (after < total || max_ejected_percent >= 100)
}

#[cfg(test)]
mod tests;
