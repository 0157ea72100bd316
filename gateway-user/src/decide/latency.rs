//! Latency-aware balancing (`lb_policy = "peak_ewma"`), as plain code that takes the time as a
//! parameter: the per-endpoint latency estimate, the cost a pick compares, power of two
//! choices, which endpoints are `slow`, and when an endpoint gets its trickle request.
//!
//! **The estimate** is a peak-EWMA of response time, as in Finagle and tower's `PeakEwma`
//! (linkerd2-proxy): a sample above the current estimate replaces it at once (the peak), a
//! lower one pulls it down with weight `1 - e^(-Δt/τ)`, Δt being the time since the last
//! update, τ = `decay` (10 s by default, theirs). Between updates the estimate decays towards
//! zero with the same τ (tower does this on every load query), so that an endpoint nobody
//! picks is eventually tried again:
//!
//! ```text
//! estimate(t) = S · e^(−(t − t_S)/τ)
//! sample r at t:  S ← r                                   if r > estimate(t)
//!                 S ← estimate(t) + r · (1 − e^(−(t − t_S)/τ))   otherwise;   t_S ← t
//! ```
//!
//! **What feeds it**, and how much each weighs (the proxy only reports; see `Feed`):
//!
//! | evidence | weight | why |
//! |---|---|---|
//! | response-head latency of an attempt (request sent → head) | a sample | what a client waits for |
//! | a response timeout | a lower bound: the timeout | the request took at least that long; no sample would come |
//! | a new connection's SYN-RTT (kernel, first SYN → SYN-ACK) | a lower bound, never lowers | a request on a new connection pays the handshake; above the estimate (a SYN retransmit: ≥ 1 s) it is news, below it says nothing about the backend's think time |
//! | request bytes still unACKed while waiting for the head (`TCP_INFO`, longer than 3 srtt) | a lower bound: the wait so far | the delay is on the path (retransmissions), and the next requests on it pay it too |
//! | retransmits and RTOs on an established connection | through the two rows above | a retransmit that recovered is already in that request's head latency; counting it again would double it. RTOs with the request unACKed eject the endpoint (`decide::health`), which is not a latency question |
//!
//! A lower bound replaces the estimate only when above it, like a peak, and records what set
//! it ([`Source`]), which is how `/status` says whether an endpoint is slow because of its
//! responses or its network.
//!
//! **Cost** = `max(estimate, mean age of the requests awaiting their head) × (in flight + 1) /
//! weight`. The pending age (not in tower) is a lower bound that needs no completed request: a
//! backend that stops answering is avoided within milliseconds, not after its first slow
//! response arrives.
//!
//! **Pick**: power of two choices: two *distinct* random eligible endpoints, the cheaper wins,
//! unless the two costs are within [`TIE_RELATIVE`] of each other or [`TIE_ABSOLUTE`] apart:
//! then the first drawn (a random one) does. Sub-millisecond differences between endpoints are
//! the host's scheduling noise, and steering on them would send two thirds of a lightly loaded
//! cluster to whichever endpoint's last hiccup was smallest; under load the `in flight + 1`
//! factor makes real differences larger than that.
//!
//! **Slow** ([`evaluate`]): an endpoint whose effective latency is above
//! `max(slow_factor × reference, reference + slow_margin)`, the reference being the lower
//! median of the routable endpoints' latencies; it stays slow until its latency is below half
//! that, or the reference if higher ([`exit_threshold`]: hysteresis against host stalls). At most `max_slow` endpoints are slow at once
//! (the cluster's ejection budget: a cluster-wide slowdown has nowhere better to go), the
//! slowest first. A slow endpoint is taken out of the choices and gets only a trickle. A
//! slow endpoint is never ejected for it: slowness is not a network failure (`decide::health`
//! ejects only after `response_timeouts_to_eject` response timeouts in a row, as
//! `slow_backend`).
//!
//! **Trickle** ([`trickle_due`]): an endpoint that was not picked for `trickle_interval` and
//! has nothing in flight takes the next request, whatever its cost: a slow one, and one that
//! power of two choices keeps losing (expensive, yet under the slow threshold, e.g. when the
//! whole cluster is slow). So it gets one request at a time, at most one per interval, however
//! slow it is, and no endpoint goes unmeasured for longer. Such a *fresh* sample, after a gap
//! with no traffic, replaces the estimate instead of being averaged into it: the estimate it
//! would be averaged with is stale by construction, and the peak rule raises it again at once
//! if the next answer is slow. That is how a recovery is noticed within an interval and a slow
//! answer or two, not after the decay has worn a 3 s peak down.
//!
//! Caveat: a route whose requests legitimately take long (long polls, reports) makes the
//! endpoints that serve them look slow; give such routes a cluster with another policy.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Finagle's and linkerd2-proxy's default.
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);
pub const DEFAULT_SLOW_FACTOR: u32 = 3;
pub const DEFAULT_SLOW_MARGIN: Duration = Duration::from_millis(100);
pub const DEFAULT_TRICKLE_INTERVAL: Duration = Duration::from_secs(1);
/// Two costs this close (relative to the larger) are a tie.
pub const TIE_RELATIVE: f64 = 0.1;
/// Two costs this close (in seconds) are a tie.
pub const TIE_ABSOLUTE: f64 = 0.001;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatencyPolicy {
    /// τ of the EWMA and of the decay towards zero.
    pub decay: Duration,
    /// Slow: more than this multiple of the reference latency...
    pub slow_factor: u32,
    /// ... and more than the reference plus this.
    pub slow_margin: Duration,
    /// A slow endpoint gets a request at most this often (and one at a time).
    pub trickle_interval: Duration,
}

impl Default for LatencyPolicy {
    fn default() -> Self {
        LatencyPolicy {
            decay: DEFAULT_DECAY,
            slow_factor: DEFAULT_SLOW_FACTOR,
            slow_margin: DEFAULT_SLOW_MARGIN,
            trickle_interval: DEFAULT_TRICKLE_INTERVAL,
        }
    }
}

/// What set the estimate's current peak. Also `latency.source` in `/status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Response-head latencies (and response timeouts): the backend.
    #[default]
    Responses,
    /// A new connection's SYN-RTT (kernel): the handshake, e.g. a SYN retransmit.
    Handshakes,
    /// Request bytes left unACKed while waiting: the path.
    Stalls,
}

impl Source {
    pub const fn name(self) -> &'static str {
        match self {
            Source::Responses => "responses",
            Source::Handshakes => "handshakes",
            Source::Stalls => "stalls",
        }
    }
}

/// One endpoint's peak-EWMA estimate.
#[derive(Clone, Debug)]
pub struct PeakEwma {
    /// `S`, in seconds; `None` until the first sample or bound.
    value: Option<f64>,
    /// `t_S`.
    at: Instant,
    samples: u64,
    source: Source,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl PeakEwma {
    pub fn new(now: Instant) -> PeakEwma {
        PeakEwma {
            value: None,
            at: now,
            samples: 0,
            source: Source::Responses,
        }
    }

    /// `e^(−(now − t_S)/τ)`.
    fn weight(&self, now: Instant, decay: Duration) -> f64 {
        let dt = secs(now.saturating_duration_since(self.at));
        (-dt / secs(decay).max(1e-9)).exp()
    }

    /// The estimate at `now`, decayed towards zero since the last update; `None` before any.
    pub fn estimate(&self, now: Instant, decay: Duration) -> Option<Duration> {
        let v = self.value? * self.weight(now, decay);
        Some(Duration::from_secs_f64(v))
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }

    pub fn source(&self) -> Source {
        self.source
    }

    /// A response-head latency. `fresh`: the request was a trickle, after a gap with no
    /// traffic; its sample replaces the estimate.
    pub fn sample(&mut self, rtt: Duration, now: Instant, decay: Duration, fresh: bool) {
        self.samples += 1;
        let r = secs(rtt);
        let w = self.weight(now, decay);
        let next = match self.value {
            Some(s) if !fresh && r <= s * w => s * w + r * (1.0 - w),
            // The first sample, a peak, or a trickle's.
            _ => {
                self.source = Source::Responses;
                r
            }
        };
        self.value = Some(next);
        self.at = now;
    }

    /// Evidence that a request takes at least `bound`: it replaces the estimate only when
    /// above it (as a peak would), and never lowers it. Returns whether it did.
    pub fn lower_bound(
        &mut self,
        bound: Duration,
        source: Source,
        now: Instant,
        decay: Duration,
    ) -> bool {
        let b = secs(bound);
        let current = self.value.map(|s| s * self.weight(now, decay));
        if current.is_some_and(|c| c >= b) {
            return false;
        }
        self.value = Some(b);
        self.at = now;
        self.source = source;
        true
    }
}

/// What a pick compares: `max(estimate, pending age) × (in_flight + 1) / weight`, in seconds.
pub fn cost(estimate: Duration, pending_age: Duration, in_flight: u64, weight: u32) -> f64 {
    secs(estimate.max(pending_age)) * (in_flight + 1) as f64 / f64::from(weight.max(1))
}

/// Power of two choices: two distinct eligible indices below `n`, drawn with `draw(bound)`
/// (uniform in `0..bound`), and the one with the lower cost; the first drawn on a tie (see
/// [`TIE_RELATIVE`], [`TIE_ABSOLUTE`]). Falls back to a scan when random draws keep missing
/// eligible ones, so a single eligible index is always found.
pub fn p2c(
    n: usize,
    mut draw: impl FnMut(usize) -> usize,
    cost: impl Fn(usize) -> f64,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    if n == 0 {
        return None;
    }
    let pick = |not: Option<usize>, draw: &mut dyn FnMut(usize) -> usize| {
        let ok = |i: usize| eligible(i) && Some(i) != not;
        if let Some(i) = (0..4).map(|_| draw(n) % n).find(|&i| ok(i)) {
            return Some(i);
        }
        let from = draw(n) % n;
        (0..n).map(|k| (from + k) % n).find(|&i| ok(i))
    };
    let a = pick(None, &mut draw)?;
    let Some(b) = pick(Some(a), &mut draw) else {
        return Some(a);
    };
    let (ca, cb) = (cost(a), cost(b));
    let tie = (ca - cb).abs() <= (TIE_RELATIVE * ca.max(cb)).max(TIE_ABSOLUTE);
    Some(if !tie && cb < ca { b } else { a })
}

/// The result of [`evaluate`].
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    /// The lower median of the known latencies; `None` with fewer than two known.
    pub reference: Option<Duration>,
    /// Above this an endpoint is slow.
    pub threshold: Option<Duration>,
    /// Per endpoint, in input order.
    pub slow: Vec<bool>,
}

/// The slow threshold for a reference latency.
pub fn threshold(reference: Duration, p: &LatencyPolicy) -> Duration {
    (reference * p.slow_factor).max(reference + p.slow_margin)
}

/// Below this an endpoint that is slow is no longer: half the threshold, and never below the
/// reference. The gap is hysteresis: a host stall delays every endpoint's answers alike, raising
/// the reference and the threshold with it to just above a slow endpoint's decaying estimate,
/// and without the gap that endpoint would be back among the choices for as long as the stall's
/// peaks last (measured: 3× an 863 ms stall > a 3 s backend's estimate decayed to 2.4 s, and 17
/// requests went to it in a second). A recovered endpoint's fresh trickle sample is far below.
pub fn exit_threshold(reference: Duration, p: &LatencyPolicy) -> Duration {
    (threshold(reference, p) / 2).max(reference)
}

/// Which endpoints are slow. `latencies[i]`: endpoint i's effective latency (estimate and
/// pending age, the larger), `None` when unknown or when it is not routable (it then neither
/// counts for the reference nor can be slow); `was_slow[i]`: whether it is slow now, which
/// keeps it so down to [`exit_threshold`]. At most `max_slow` are marked, the slowest first.
pub fn evaluate(
    latencies: &[Option<Duration>],
    was_slow: &[bool],
    p: &LatencyPolicy,
    max_slow: usize,
) -> Evaluation {
    let mut known: Vec<Duration> = latencies.iter().flatten().copied().collect();
    let mut slow = vec![false; latencies.len()];
    if known.len() < 2 {
        return Evaluation {
            reference: None,
            threshold: None,
            slow,
        };
    }
    known.sort();
    let reference = known[(known.len() - 1) / 2];
    let t = threshold(reference, p);
    let exit = exit_threshold(reference, p);
    let mut over: Vec<(Duration, usize)> = latencies
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let above = if was_slow.get(i).copied().unwrap_or(false) {
                exit
            } else {
                t
            };
            l.filter(|l| *l > above).map(|l| (l, i))
        })
        .collect();
    over.sort_by(|a, b| b.cmp(a));
    for (_, i) in over.into_iter().take(max_slow) {
        slow[i] = true;
    }
    Evaluation {
        reference: Some(reference),
        threshold: Some(t),
        slow,
    }
}

/// Whether an endpoint takes the next request whatever its cost: nothing in flight there, and
/// not picked for `interval` (`last_pick`: when it last was, `None` for never).
pub fn trickle_due(
    in_flight: u64,
    last_pick: Option<Instant>,
    now: Instant,
    interval: Duration,
) -> bool {
    in_flight == 0 && last_pick.is_none_or(|t| now.saturating_duration_since(t) >= interval)
}

#[cfg(test)]
mod tests;
