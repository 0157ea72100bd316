//! Per-endpoint connect deadlines from the kernel-measured SYN-RTT distribution.
//!
//! `deadline = clamp(quantile(SYN-RTT over the window) × factor + margin, floor, cap)`, where
//! `cap` is the configured `connect_timeout_ms` (always the hard limit). With fewer than
//! `min_samples` recent handshakes the deadline is the configured timeout: no data, no guess.
//!
//! Only handshakes that needed no SYN retransmit are samples: a retransmitted SYN measures the
//! kernel's 1 s retransmission timer, not the path, and would teach the policy to wait for
//! exactly the failures it exists to cut short.

use std::{collections::VecDeque, time::Duration};

use tokio::time::Instant;

/// Defaults, documented in the config reference.
pub const DEFAULT_FLOOR: Duration = Duration::from_millis(50);
pub const DEFAULT_QUANTILE: f64 = 0.99;
pub const DEFAULT_FACTOR: f64 = 3.0;
pub const DEFAULT_MARGIN: Duration = Duration::from_millis(10);
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);
pub const DEFAULT_MIN_SAMPLES: usize = 8;
/// Samples kept per endpoint at most (the oldest go first).
pub const MAX_SAMPLES: usize = 512;

#[derive(Clone, Debug, PartialEq)]
pub struct DeadlinePolicy {
    pub floor: Duration,
    pub cap: Duration,
    pub quantile: f64,
    pub factor: f64,
    pub margin: Duration,
    pub window: Duration,
    pub min_samples: usize,
}

impl DeadlinePolicy {
    /// The defaults, capped by the configured connect timeout.
    pub fn with_cap(cap: Duration) -> DeadlinePolicy {
        DeadlinePolicy {
            floor: DEFAULT_FLOOR.min(cap),
            cap,
            quantile: DEFAULT_QUANTILE,
            factor: DEFAULT_FACTOR,
            margin: DEFAULT_MARGIN,
            window: DEFAULT_WINDOW,
            min_samples: DEFAULT_MIN_SAMPLES,
        }
    }
}

/// Where a deadline came from, for the admin status and the error text.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DeadlineSource {
    /// Not enough recent handshakes: the configured connect timeout.
    Configured,
    /// From `samples` handshakes whose `quantile` was `rtt`.
    Measured { rtt: Duration, samples: usize },
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Deadline {
    pub value: Duration,
    pub source: DeadlineSource,
}

/// Whether a connect that passed its `deadline` may be hedged (when hedging is `enabled`):
/// only below the hard `cap`. A deadline equal to the cap means the connect used all the time
/// it had, and nothing is left to race in.
pub fn may_hedge(enabled: bool, deadline: Duration, cap: Duration) -> bool {
    enabled && deadline < cap
}

/// Whether a connect that passed its `deadline` with no SYN-ACK is given up there, for a
/// hedge or a retry to go elsewhere, rather than left to run on to the hard `cap`: always at
/// the cap; before it when other requests wait on this connect (`awaited`: an HTTP/2
/// connection being made, which every request to the endpoint on the worker awaits; running
/// on would hold them all, where each may have somewhere else to go), or when the request can
/// go elsewhere (`elsewhere`: another endpoint, and a retry the policy and the retry budget
/// allow; asked last).
/// With nowhere else to go, a connect cut at the measured deadline could only fail, where the
/// kernel's SYN retransmit may still establish it (a lost SYN or SYN-ACK, a full accept
/// queue). The deadline's evidence is reported either way.
pub fn gives_up_at_deadline(
    deadline: Duration,
    cap: Duration,
    awaited: bool,
    elsewhere: impl FnOnce() -> bool,
) -> bool {
    deadline >= cap || awaited || elsewhere()
}

/// The recent SYN-RTTs of one endpoint.
#[derive(Clone, Debug, Default)]
pub struct RttWindow {
    samples: VecDeque<(Instant, Duration)>,
}

impl RttWindow {
    /// Adds one handshake. `syn_retransmits > 0` handshakes are not samples (see module doc).
    pub fn observe(&mut self, now: Instant, rtt: Duration, syn_retransmits: u32) {
        if syn_retransmits > 0 {
            return;
        }
        if self.samples.len() == MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back((now, rtt));
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Median and p99 of the samples held, for display.
    pub fn quantiles(&self) -> (Option<Duration>, Option<Duration>) {
        if self.samples.is_empty() {
            return (None, None);
        }
        let mut v: Vec<Duration> = self.samples.iter().map(|&(_, d)| d).collect();
        v.sort_unstable();
        let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        (Some(at(0.5)), Some(at(0.99)))
    }

    /// Samples within the policy's window at `now` (dropping older ones).
    pub fn recent(&mut self, policy: &DeadlinePolicy, now: Instant) -> usize {
        while let Some(&(t, _)) = self.samples.front() {
            if now.saturating_duration_since(t) > policy.window {
                self.samples.pop_front();
            } else {
                break;
            }
        }
        self.samples.len()
    }

    /// The deadline for a connect starting at `now`.
    pub fn deadline(&mut self, policy: &DeadlinePolicy, now: Instant) -> Deadline {
        while let Some(&(t, _)) = self.samples.front() {
            if now.saturating_duration_since(t) > policy.window {
                self.samples.pop_front();
            } else {
                break;
            }
        }
        if self.samples.len() < policy.min_samples.max(1) {
            return Deadline {
                value: policy.cap,
                source: DeadlineSource::Configured,
            };
        }
        let mut v: Vec<Duration> = self.samples.iter().map(|&(_, d)| d).collect();
        v.sort_unstable();
        let rank = ((policy.quantile * v.len() as f64).ceil() as usize).clamp(1, v.len());
        let rtt = v[rank - 1];
        let raw = rtt.mul_f64(policy.factor) + policy.margin;
        Deadline {
            value: raw.clamp(policy.floor, policy.cap),
            source: DeadlineSource::Measured {
                rtt,
                samples: v.len(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn no_data_means_the_configured_timeout() {
        let p = DeadlinePolicy::with_cap(ms(5000));
        let mut w = RttWindow::default();
        let now = Instant::now();
        for _ in 0..(DEFAULT_MIN_SAMPLES - 1) {
            w.observe(now, ms(1), 0);
        }
        assert_eq!(
            w.deadline(&p, now),
            Deadline {
                value: ms(5000),
                source: DeadlineSource::Configured
            }
        );
    }

    #[test]
    fn a_fast_lan_gets_the_floor_and_a_slow_path_gets_its_p99_times_factor() {
        let p = DeadlinePolicy::with_cap(ms(5000));
        let now = Instant::now();
        let mut lan = RttWindow::default();
        for _ in 0..100 {
            lan.observe(now, Duration::from_micros(80), 0);
        }
        assert_eq!(lan.deadline(&p, now).value, DEFAULT_FLOOR);
        let mut wan = RttWindow::default();
        for i in 0..100 {
            wan.observe(now, ms(100 + i), 0);
        }
        // p99 of 100..=199 ms is 198 ms; × 3 + 10 ms.
        let d = wan.deadline(&p, now);
        assert_eq!(d.value, ms(198 * 3 + 10));
        assert_eq!(
            d.source,
            DeadlineSource::Measured {
                rtt: ms(198),
                samples: 100
            }
        );
    }

    #[test]
    fn the_configured_timeout_is_the_hard_cap() {
        let p = DeadlinePolicy::with_cap(ms(250));
        let now = Instant::now();
        let mut w = RttWindow::default();
        for _ in 0..20 {
            w.observe(now, ms(200), 0);
        }
        assert_eq!(w.deadline(&p, now).value, ms(250));
    }

    #[test]
    fn retransmitted_handshakes_are_not_samples_and_old_samples_expire() {
        let p = DeadlinePolicy::with_cap(ms(5000));
        let t0 = Instant::now();
        let mut w = RttWindow::default();
        for _ in 0..20 {
            w.observe(t0, ms(1000), 1);
        }
        assert!(w.is_empty(), "a 1 s retransmission timer is not a path RTT");
        for _ in 0..20 {
            w.observe(t0, ms(2), 0);
        }
        assert!(matches!(
            w.deadline(&p, t0).source,
            DeadlineSource::Measured { .. }
        ));
        let later = t0 + DEFAULT_WINDOW + ms(1);
        assert_eq!(w.deadline(&p, later).source, DeadlineSource::Configured);
        assert!(w.is_empty());
    }

    #[test]
    fn only_an_adaptive_deadline_leaves_room_to_hedge() {
        assert!(may_hedge(true, ms(50), ms(5000)));
        assert!(!may_hedge(true, ms(5000), ms(5000)));
        assert!(!may_hedge(false, ms(50), ms(5000)));
    }

    #[test]
    fn a_connect_past_its_deadline_runs_on_to_the_cap_unless_it_can_go_elsewhere() {
        let never = || -> bool { panic!("the pick is asked only when it decides") };
        assert!(
            gives_up_at_deadline(ms(5000), ms(5000), false, never),
            "the cap"
        );
        assert!(
            gives_up_at_deadline(ms(50), ms(5000), true, never),
            "awaited"
        );
        assert!(gives_up_at_deadline(ms(50), ms(5000), false, || true));
        assert!(!gives_up_at_deadline(ms(50), ms(5000), false, || false));
    }

    #[test]
    fn the_window_is_bounded() {
        let now = Instant::now();
        let mut w = RttWindow::default();
        for _ in 0..(MAX_SAMPLES * 3) {
            w.observe(now, ms(1), 0);
        }
        assert_eq!(w.len(), MAX_SAMPLES);
    }
}
