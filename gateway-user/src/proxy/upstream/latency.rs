//! One endpoint's latency as the proxy keeps it ([`LatencyCell`]: the pure peak-EWMA of
//! `decide::latency` behind a mutex, published in atomics so that a pick reads it without a
//! lock), the requests awaiting their response head (count and summed send times: their mean
//! age, lock-free), and the cluster's evaluator task, which every [`EVALUATE_EVERY`] marks
//! the slow outliers (`decide::latency::evaluate`) and logs and meters what changed.
//!
//! The request path only reports: [`LatencyCell::sample`] when a head arrives,
//! [`LatencyCell::lower_bound`] for a response timeout, a new connection's SYN-RTT or a
//! stalled request, and [`LatencyCell::awaiting`] around the wait for a head.

use std::{
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;
use tracing::{info, warn};

use super::{Cluster, endpoint::Endpoint};
use crate::{
    config::LbPolicy,
    decide::latency::{self, LatencyPolicy, PeakEwma, Source},
};

/// How often a cluster's slow endpoints are re-evaluated.
pub(crate) const EVALUATE_EVERY: Duration = Duration::from_millis(100);

/// `u64::MAX` in an atomic duration: unknown.
const UNKNOWN: u64 = u64::MAX;

pub(crate) struct LatencyCell {
    /// The clock origin of the atomics below (nanoseconds or microseconds since).
    origin: Instant,
    ewma: Mutex<PeakEwma>,
    /// The estimate's `S` and `t_S`, published after each update.
    value_ns: AtomicU64,
    value_at: AtomicU64,
    /// Requests awaiting their response head, and the sum of their send times (µs since
    /// `origin`: 10,000 requests waiting after a year of uptime still fit).
    awaiting: AtomicU64,
    awaiting_sum: AtomicU64,
    /// Marked slow by the evaluator (under `peak_ewma` only).
    slow: AtomicBool,
    /// When a request was last sent here (`peak_ewma` only); `UNKNOWN` for never.
    last_pick: AtomicU64,
    /// A trickle request was sent: the next sample is fresh (`decide::latency`).
    trickle_pending: AtomicBool,
}

/// What `/status` shows of an endpoint's latency.
#[derive(Clone, Debug)]
pub(crate) struct LatencyView {
    pub estimate: Option<Duration>,
    pub samples: u64,
    pub source: Source,
    pub awaiting: u64,
}

/// Counts a request awaiting its head while it lives.
pub(crate) struct Awaiting<'a> {
    cell: &'a LatencyCell,
    sent_us: u64,
}

impl Drop for Awaiting<'_> {
    fn drop(&mut self) {
        self.cell.awaiting.fetch_sub(1, Ordering::Relaxed);
        self.cell
            .awaiting_sum
            .fetch_sub(self.sent_us, Ordering::Relaxed);
    }
}

impl LatencyCell {
    pub fn new() -> LatencyCell {
        let origin = Instant::now();
        LatencyCell {
            origin,
            ewma: Mutex::new(PeakEwma::new(origin)),
            value_ns: AtomicU64::new(UNKNOWN),
            value_at: AtomicU64::new(0),
            awaiting: AtomicU64::new(0),
            awaiting_sum: AtomicU64::new(0),
            slow: AtomicBool::new(false),
            last_pick: AtomicU64::new(UNKNOWN),
            trickle_pending: AtomicBool::new(false),
        }
    }

    fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.origin).as_nanos() as u64
    }

    fn at(&self, ns: u64) -> Instant {
        self.origin + Duration::from_nanos(ns)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PeakEwma> {
        self.ewma.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, e: &PeakEwma, now: Instant, decay: Duration) {
        if let Some(v) = e.estimate(now, decay) {
            self.value_ns.store(v.as_nanos() as u64, Ordering::Relaxed);
            self.value_at.store(self.ns(now), Ordering::Relaxed);
        }
    }

    /// A response head arrived at `now`, `rtt` after the request was sent. The first sample
    /// after a trickle request is fresh: it replaces the estimate.
    pub fn sample(&self, rtt: Duration, now: Instant, p: &LatencyPolicy) {
        let fresh = self.trickle_pending.swap(false, Ordering::Relaxed);
        let mut e = self.lock();
        e.sample(rtt, now, p.decay, fresh);
        self.publish(&e, now, p.decay);
    }

    /// Evidence that a request here takes at least `bound` (see `decide::latency`).
    pub fn lower_bound(&self, bound: Duration, source: Source, p: &LatencyPolicy) {
        let now = Instant::now();
        let mut e = self.lock();
        if e.lower_bound(bound, source, now, p.decay) {
            self.publish(&e, now, p.decay);
        }
    }

    /// Counts a request awaiting its head from `sent` until the guard drops.
    pub fn awaiting(&self, sent: Instant) -> Awaiting<'_> {
        let sent_us = self.ns(sent) / 1000;
        self.awaiting.fetch_add(1, Ordering::Relaxed);
        self.awaiting_sum.fetch_add(sent_us, Ordering::Relaxed);
        Awaiting {
            cell: self,
            sent_us,
        }
    }

    /// The estimate at `now`, decayed towards zero, without a lock; `None` before any.
    pub fn estimate(&self, now: Instant, decay: Duration) -> Option<Duration> {
        let v = self.value_ns.load(Ordering::Relaxed);
        if v == UNKNOWN {
            return None;
        }
        let since = now.saturating_duration_since(self.at(self.value_at.load(Ordering::Relaxed)));
        let w = (-since.as_secs_f64() / decay.as_secs_f64().max(1e-9)).exp();
        Some(Duration::from_secs_f64(v as f64 * 1e-9 * w))
    }

    /// The mean age of the requests awaiting their head (zero when none).
    pub fn pending_age(&self, now: Instant) -> Duration {
        let n = self.awaiting.load(Ordering::Relaxed);
        if n == 0 {
            return Duration::ZERO;
        }
        let mean_us = self.awaiting_sum.load(Ordering::Relaxed) / n;
        Duration::from_micros((self.ns(now) / 1000).saturating_sub(mean_us))
    }

    /// The larger of the estimate and the pending age; `None` when neither is known.
    pub fn effective(&self, now: Instant, decay: Duration) -> Option<Duration> {
        let age = self.pending_age(now);
        match self.estimate(now, decay) {
            Some(e) => Some(e.max(age)),
            None if age > Duration::ZERO => Some(age),
            None => None,
        }
    }

    pub fn slow(&self) -> bool {
        self.slow.load(Ordering::Relaxed)
    }

    /// A request was just sent here.
    pub fn picked(&self, now: Instant) {
        self.last_pick.store(self.ns(now), Ordering::Relaxed);
    }

    fn last_pick(&self) -> (u64, Option<Instant>) {
        let last = self.last_pick.load(Ordering::Relaxed);
        (last, (last != UNKNOWN).then(|| self.at(last)))
    }

    /// Whether this endpoint's trickle request is due (`decide::latency::trickle_due`).
    pub fn trickle_due(&self, now: Instant, in_flight: u64, interval: Duration) -> bool {
        latency::trickle_due(in_flight, self.last_pick().1, now, interval)
    }

    /// Claims this endpoint's trickle request if one is due now (at most one caller wins).
    pub fn claim_trickle(&self, in_flight: u64, interval: Duration) -> bool {
        let now = Instant::now();
        let (last, last_at) = self.last_pick();
        let won = latency::trickle_due(in_flight, last_at, now, interval)
            && self
                .last_pick
                .compare_exchange(last, self.ns(now), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        if won {
            self.trickle_pending.store(true, Ordering::Relaxed);
        }
        won
    }

    pub fn view(&self, p: &LatencyPolicy) -> LatencyView {
        let now = Instant::now();
        let e = self.lock();
        LatencyView {
            estimate: e.estimate(now, p.decay),
            samples: e.samples(),
            source: e.source(),
            awaiting: self.awaiting.load(Ordering::Relaxed),
        }
    }
}

/// The cluster's side: the latest evaluation, read by picks.
#[derive(Default)]
pub(crate) struct ClusterLatency {
    /// Some endpoint's trickle request is due: picks look for it.
    pub any_due: AtomicBool,
    /// The reference latency (lower median), the cost of an endpoint without an estimate.
    reference_ns: AtomicU64,
    threshold_ns: AtomicU64,
}

impl ClusterLatency {
    /// The cost of an endpoint without an estimate: the cluster's reference (as good as a
    /// typical peer), or 1 ms before anything is known.
    pub fn reference(&self) -> Duration {
        match self.reference_ns.load(Ordering::Relaxed) {
            0 => Duration::from_millis(1),
            ns => Duration::from_nanos(ns),
        }
    }

    /// The current slow threshold, when there is a reference.
    pub fn threshold(&self) -> Option<Duration> {
        match self.threshold_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }
}

/// Re-evaluates the cluster's slow endpoints every [`EVALUATE_EVERY`] until the cluster is
/// dropped or retired; only `peak_ewma` acts on slowness, other policies just keep the estimates.
pub(super) async fn run(cluster: Weak<Cluster>) {
    let mut every = tokio::time::interval(EVALUATE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(c) = super::cluster::live(&cluster) else {
            return;
        };
        if c.spec.lb_policy == LbPolicy::PeakEwma {
            evaluate(&c);
        }
    }
}

fn evaluate(c: &Cluster) {
    let p = &c.spec.latency;
    let now = Instant::now();
    let set = c.set.load();
    let eps: &[Arc<Endpoint>] = &set.endpoints;
    let lat: Vec<Option<Duration>> = eps
        .iter()
        .map(|e| {
            e.health
                .routable()
                .then(|| e.latency.effective(now, p.decay))
                .flatten()
        })
        .collect();
    // Slow endpoints count against the ejection budget: at most that share of the cluster is
    // taken out of the choices, however many are slow.
    let unroutable = eps.iter().filter(|e| !e.health.routable()).count();
    let max_ejected = c.spec.health.machine.max_ejected_percent;
    let max_slow = (0..eps.len())
        .take_while(|k| crate::decide::health::may_eject(eps.len(), unroutable + k, max_ejected))
        .count();
    let was_slow: Vec<bool> = eps.iter().map(|e| e.latency.slow()).collect();
    let ev = latency::evaluate(&lat, &was_slow, p, max_slow);
    let cl = &c.set.latency;
    cl.reference_ns.store(
        ev.reference.map_or(0, |r| r.as_nanos() as u64),
        Ordering::Relaxed,
    );
    cl.threshold_ns.store(
        ev.threshold.map_or(0, |t| t.as_nanos() as u64),
        Ordering::Relaxed,
    );
    let mut any_due = false;
    for (i, ep) in eps.iter().enumerate() {
        let slow = ev.slow[i];
        if ep.latency.slow.swap(slow, Ordering::Relaxed) != slow {
            report(c, ep, slow, lat[i], ev.reference);
        }
        any_due |= ep.health.routable()
            && ep.latency.trickle_due(
                now,
                ep.in_flight.load(Ordering::Relaxed),
                p.trickle_interval,
            );
    }
    cl.any_due.store(any_due, Ordering::Relaxed);
}

fn report(
    c: &Cluster,
    ep: &Endpoint,
    slow: bool,
    latency: Option<Duration>,
    reference: Option<Duration>,
) {
    let ms = |d: Option<Duration>| d.map_or(0.0, |d| (d.as_secs_f64() * 1e4).round() / 10.0);
    let source = ep.latency.view(&c.spec.latency).source;
    ep.meter.slow(slow, ep.state(&c.spec));
    if slow {
        warn!(cluster = %c.name, upstream = %ep.addr, latency_ms = ms(latency), cluster_ms = ms(reference), source = source.name(), trickle_ms = c.spec.latency.trickle_interval.as_millis() as u64, "endpoint slow; sending it a trickle only");
    } else {
        info!(cluster = %c.name, upstream = %ep.addr, latency_ms = ms(latency), cluster_ms = ms(reference), "endpoint no longer slow");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[tokio::test(start_paused = true)]
    async fn samples_publish_an_estimate_that_decays_without_a_lock() {
        let p = LatencyPolicy::default();
        let cell = LatencyCell::new();
        assert_eq!(cell.estimate(Instant::now(), p.decay), None);
        cell.sample(ms(3000), Instant::now(), &p);
        assert_eq!(cell.estimate(Instant::now(), p.decay), Some(ms(3000)));
        tokio::time::advance(p.decay).await;
        let e = cell.estimate(Instant::now(), p.decay).unwrap();
        assert!(
            (e.as_secs_f64() - 3.0 * (-1f64).exp()).abs() < 1e-6,
            "{e:?}"
        );
        assert_eq!(cell.view(&p).samples, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_awaiting_their_head_give_a_pending_age() {
        let p = LatencyPolicy::default();
        let cell = LatencyCell::new();
        let first = cell.awaiting(Instant::now());
        tokio::time::advance(ms(400)).await;
        let second = cell.awaiting(Instant::now());
        assert_eq!(cell.pending_age(Instant::now()), ms(200), "the mean age");
        assert_eq!(cell.effective(Instant::now(), p.decay), Some(ms(200)));
        drop(first);
        drop(second);
        assert_eq!(cell.pending_age(Instant::now()), Duration::ZERO);
        assert_eq!(cell.view(&p).awaiting, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_is_claimed_once_per_interval_without_picks() {
        let cell = LatencyCell::new();
        let every = ms(1000);
        assert!(cell.claim_trickle(0, every), "never picked");
        assert!(!cell.claim_trickle(0, every), "claimed already");
        tokio::time::advance(every).await;
        assert!(!cell.claim_trickle(1, every), "one in flight");
        assert!(cell.trickle_due(Instant::now(), 0, every));
        cell.picked(Instant::now());
        assert!(!cell.claim_trickle(0, every), "picked just now");
        tokio::time::advance(every).await;
        assert!(cell.claim_trickle(0, every));
    }

    #[tokio::test(start_paused = true)]
    async fn the_sample_after_a_trickle_replaces_the_estimate() {
        let p = LatencyPolicy::default();
        let cell = LatencyCell::new();
        cell.sample(ms(3000), Instant::now(), &p);
        tokio::time::advance(ms(3000)).await;
        assert!(cell.claim_trickle(0, p.trickle_interval));
        cell.sample(ms(1), Instant::now(), &p);
        assert_eq!(cell.estimate(Instant::now(), p.decay), Some(ms(1)));
        // Only that one: the next is averaged in (a peak still replaces).
        cell.sample(ms(2), Instant::now(), &p);
        assert_eq!(cell.estimate(Instant::now(), p.decay), Some(ms(2)));
        tokio::time::advance(ms(10)).await;
        cell.sample(ms(1), Instant::now(), &p);
        assert!(cell.estimate(Instant::now(), p.decay).unwrap() > ms(1));
    }
}
