//! One endpoint's health as the proxy keeps it: the pure state machine
//! (`decide::health`) and SYN-RTT window (`decide::deadline`) behind a mutex, two atomics so
//! that picking an endpoint takes no lock, a short log of recent evidence for `/status`, the
//! health changes for the page's timeline, and the endpoint's last five minutes for its plot
//! (`history`, lock-free where it is fed).

use std::{
    collections::VecDeque,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::history::History;
use crate::{
    config::ClusterSpec,
    decide::{
        deadline::{Deadline, DeadlinePolicy, RttWindow},
        health::{EndpointHealth, Evidence, Reason, State, Transition},
        probe,
    },
};

/// Recent events kept per endpoint for the status page.
const RECENT_EVENTS: usize = 20;
/// Health changes (transitions, no plain failures) kept per endpoint for the timeline: enough
/// for the five minutes it shows unless the endpoint flaps more than every ~10 s.
pub const CHANGES_KEPT: usize = 64;

/// One line of an endpoint's recent history (`recent` in `/status`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HealthEvent {
    pub at_unix_ms: u64,
    pub event: HealthEventKind,
    pub reason: Option<Reason>,
    /// The evidence, in words (kernel evidence when there is some).
    pub detail: String,
}

/// What a [`HealthEvent`] records: a failure that changed nothing, or a transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthEventKind {
    Failure,
    Suspect,
    Ejected,
    EjectionRefused,
    Probing,
    Recovered,
}

impl HealthEventKind {
    pub const fn name(self) -> &'static str {
        match self {
            HealthEventKind::Failure => "failure",
            HealthEventKind::Suspect => "suspect",
            HealthEventKind::Ejected => "ejected",
            HealthEventKind::EjectionRefused => "ejection_refused",
            HealthEventKind::Probing => "probing",
            HealthEventKind::Recovered => "recovered",
        }
    }
}

struct Inner {
    health: EndpointHealth,
    rtt: RttWindow,
    recent: VecDeque<HealthEvent>,
    /// Transitions only, oldest first, at most [`CHANGES_KEPT`].
    changes: VecDeque<HealthEvent>,
    last_probe: Option<Instant>,
}

pub(crate) struct HealthCell {
    inner: Mutex<Inner>,
    routable: AtomicBool,
    suspect: AtomicBool,
    /// When the endpoint last became routable again after it was not (ms after `epoch`, plus
    /// one; 0: never since it was created), for slow start. Lock-free.
    back_at_ms: AtomicU64,
    epoch: Instant,
    /// The last five minutes, for the plots.
    pub history: History,
}

/// A copy of the state for `/status` and metrics.
#[derive(Clone, Debug)]
pub(crate) struct HealthView {
    pub state: State,
    pub reason: Option<Reason>,
    pub since: Instant,
    pub ejected_until: Option<Instant>,
    pub deadline: Deadline,
    pub rtt_p50: Option<Duration>,
    pub rtt_p99: Option<Duration>,
    pub rtt_samples: usize,
    pub recent: Vec<HealthEvent>,
    pub changes: Vec<HealthEvent>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The deadline from `rtt` under the cluster's policy; the configured timeout when adaptive
/// deadlines are off.
fn deadline_of(rtt: &mut RttWindow, spec: &ClusterSpec, now: Instant) -> Deadline {
    match deadline_policy(spec) {
        Some(p) => rtt.deadline(&p, now),
        None => Deadline {
            value: spec.timeouts.connect,
            source: crate::decide::deadline::DeadlineSource::Configured,
        },
    }
}

pub(crate) fn deadline_policy(spec: &ClusterSpec) -> Option<DeadlinePolicy> {
    let floor = spec.timeouts.connect_deadline_floor?;
    let mut p = DeadlinePolicy::with_cap(spec.timeouts.connect);
    p.floor = floor.min(spec.timeouts.connect);
    Some(p)
}

impl HealthCell {
    pub fn new() -> HealthCell {
        HealthCell {
            inner: Mutex::new(Inner {
                health: EndpointHealth::new(Instant::now()),
                rtt: RttWindow::default(),
                recent: VecDeque::new(),
                changes: VecDeque::new(),
                last_probe: None,
            }),
            routable: AtomicBool::new(true),
            suspect: AtomicBool::new(false),
            back_at_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            history: History::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests may be sent here (healthy or suspect). Lock-free.
    pub fn routable(&self) -> bool {
        self.routable.load(Ordering::Relaxed)
    }

    /// Became routable again now, or is a new address from a DNS refresh or a reload
    /// (`cluster::successor`): slow start's ramp begins. Tests call it to start a ramp without an ejection.
    pub(crate) fn came_back(&self) {
        let back = self.epoch.elapsed().as_millis() as u64 + 1;
        self.back_at_ms.store(back, Ordering::Relaxed);
    }

    /// The percent of its weight the endpoint takes under slow start over `window`
    /// (`decide::slow_start`): 100 unless it became routable again, or was added by a DNS
    /// refresh, less than `window` ago.
    /// Lock-free.
    pub fn slow_start_percent(&self, window: Duration) -> u32 {
        let back = self.back_at_ms.load(Ordering::Relaxed);
        if window.is_zero() || back == 0 {
            return 100;
        }
        let since = self
            .epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(back - 1));
        crate::decide::slow_start::percent(since, window)
    }

    /// Suspect: usable, but only when no healthy endpoint is left. Lock-free.
    pub fn suspect(&self) -> bool {
        self.suspect.load(Ordering::Relaxed)
    }

    /// The current state (takes the lock: not for the request path).
    pub fn state(&self) -> State {
        self.lock().health.state()
    }

    /// The connect deadline for a new connection now.
    pub fn deadline(&self, spec: &ClusterSpec) -> Deadline {
        deadline_of(&mut self.lock().rtt, spec, Instant::now())
    }

    /// A handshake's SYN-RTT (kernel-measured when available).
    pub fn observe_rtt(&self, rtt: Duration, syn_retransmits: u32) {
        self.history.syn_rtt(rtt);
        self.lock()
            .rtt
            .observe(Instant::now(), rtt, syn_retransmits);
    }

    fn publish(&self, inner: &Inner) {
        // Every caller holds the lock: no other publish runs between the load and the stores.
        // When it comes back, the time first, so that no pick sees it routable without it.
        let routable = inner.health.routable();
        if routable && !self.routable.load(Ordering::Relaxed) {
            self.came_back();
        }
        self.routable.store(routable, Ordering::Relaxed);
        self.suspect
            .store(inner.health.state() == State::Suspect, Ordering::Relaxed);
    }

    fn log(inner: &mut Inner, t: Transition, detail: &dyn Fn() -> String) {
        let (event, reason) = match t {
            Transition::None => return,
            Transition::Suspected(r) => (HealthEventKind::Suspect, Some(r)),
            Transition::Ejected { reason, .. } => (HealthEventKind::Ejected, Some(reason)),
            Transition::EjectionRefused(r) => (HealthEventKind::EjectionRefused, Some(r)),
            Transition::Probing => (HealthEventKind::Probing, inner.health.reason()),
            Transition::Recovered => (HealthEventKind::Recovered, None),
        };
        Self::remember(inner, event, reason, detail);
        if inner.changes.len() == CHANGES_KEPT {
            inner.changes.pop_front();
        }
        if let Some(e) = inner.recent.back() {
            inner.changes.push_back(e.clone());
        }
    }

    fn remember(
        inner: &mut Inner,
        event: HealthEventKind,
        reason: Option<Reason>,
        detail: &dyn Fn() -> String,
    ) {
        if inner.recent.len() == RECENT_EVENTS {
            inner.recent.pop_front();
        }
        inner.recent.push_back(HealthEvent {
            at_unix_ms: unix_ms(),
            event,
            reason,
            detail: detail(),
        });
    }

    /// Feeds request-path evidence seen at `now`. `may_eject` answers the cluster's ejection
    /// budget.
    pub fn observe(
        &self,
        ev: Evidence,
        now: Instant,
        spec: &ClusterSpec,
        may_eject: bool,
        detail: &dyn Fn() -> String,
    ) -> Transition {
        let mut inner = self.lock();
        let t = inner
            .health
            .observe(ev, now, &spec.health.machine, may_eject);
        if t == Transition::None && ev.is_failure() {
            Self::remember(&mut inner, HealthEventKind::Failure, None, detail);
        }
        Self::log(&mut inner, t, detail);
        self.publish(&inner);
        t
    }

    /// A probe's result.
    pub fn probe(
        &self,
        ev: Evidence,
        spec: &ClusterSpec,
        may_eject: bool,
        detail: &dyn Fn() -> String,
    ) -> Transition {
        let mut inner = self.lock();
        let t = inner
            .health
            .probe(ev, Instant::now(), &spec.health.machine, may_eject);
        Self::log(&mut inner, t, detail);
        self.publish(&inner);
        t
    }

    /// See [`EndpointHealth::end_ejection`]: the next tick turns it into probing.
    pub fn end_ejection(&self) {
        self.lock().health.end_ejection(Instant::now());
    }

    /// See [`EndpointHealth::fail_open`].
    pub fn fail_open(&self, detail: &dyn Fn() -> String) -> Transition {
        let mut inner = self.lock();
        let t = inner.health.fail_open(Instant::now());
        Self::log(&mut inner, t, detail);
        self.publish(&inner);
        t
    }

    /// Time passing; returns whether a probe is due now (`decide::probe::due`).
    pub fn tick(&self, spec: &ClusterSpec) -> (Transition, bool) {
        let mut inner = self.lock();
        let now = Instant::now();
        let t = inner.health.tick(now);
        Self::log(&mut inner, t, &|| "ejection ran out; probing".to_owned());
        self.publish(&inner);
        let needs_samples =
            deadline_policy(spec).is_some_and(|p| inner.rtt.recent(&p, now) < p.min_samples);
        let due = probe::due(
            inner.health.state(),
            needs_samples,
            inner.last_probe,
            now,
            spec.health.machine.probe_interval,
        );
        if due {
            inner.last_probe = Some(now);
        }
        (t, due)
    }

    pub fn view(&self, spec: &ClusterSpec) -> HealthView {
        let mut inner = self.lock();
        let now = Instant::now();
        let deadline = deadline_of(&mut inner.rtt, spec, now);
        let (p50, p99) = inner.rtt.quantiles();
        HealthView {
            state: inner.health.state(),
            reason: inner.health.reason(),
            since: inner.health.since(),
            ejected_until: inner.health.ejected_until(),
            deadline,
            rtt_p50: p50,
            rtt_p99: p99,
            rtt_samples: inner.rtt.len(),
            recent: inner.recent.iter().cloned().collect(),
            changes: inner.changes.iter().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::decide::health::Reason;

    fn spec(extra: &str) -> ClusterSpec {
        let text = format!(
            "[router]\nlistener_port = 8080\n[router.upstream]\nendpoints = [\"127.0.0.1:9\"]\n{extra}"
        );
        let loaded = crate::config::load_str(&text, std::path::Path::new("test.toml"))
            .expect("a valid config");
        loaded.settings.clusters["default"].clone()
    }

    /// What the probe loop sees on each tick: the ejection runs out on the tick after it
    /// expires, and probes follow every `probe_interval`, then `rise` successes recover.
    #[tokio::test(start_paused = true)]
    async fn an_ejected_endpoint_is_probed_when_its_ejection_runs_out_then_every_interval() {
        let spec = spec("[router.upstream.health]\nejection_ms = 1000\nprobe_interval_ms = 500\n");
        let cell = HealthCell::new();
        let t = cell.observe(Evidence::Refused, Instant::now(), &spec, true, &|| {
            "RST".to_owned()
        });
        assert!(
            matches!(
                t,
                Transition::Ejected {
                    reason: Reason::Refused,
                    ..
                }
            ),
            "{t:?}"
        );
        assert!(!cell.routable());
        let tick = Duration::from_millis(100);
        let mut probes = Vec::new();
        let start = Instant::now();
        for _ in 0..30 {
            tokio::time::advance(tick).await;
            let (_, due) = cell.tick(&spec);
            if due {
                probes.push(start.elapsed().as_millis());
                if probes.len() == 2 {
                    // Two successes in a row (`rise`) bring it back.
                    cell.probe(Evidence::ResponseOk, &spec, true, &String::new);
                    let t = cell.probe(Evidence::ResponseOk, &spec, true, &String::new);
                    assert_eq!(t, Transition::Recovered);
                }
            }
        }
        // Probing from 1 s, every 500 ms; healthy (and adaptive deadlines on, without
        // samples) it gets a measuring probe at each tick after the last one.
        assert_eq!(probes[..2], [1000, 1500], "{probes:?}");
        assert_eq!(probes[2..4], [1600, 1700], "{probes:?}");
        assert!(cell.routable());
    }

    #[tokio::test(start_paused = true)]
    async fn a_healthy_endpoint_with_enough_samples_is_not_probed() {
        let spec = spec("");
        let cell = HealthCell::new();
        for _ in 0..8 {
            cell.observe_rtt(Duration::from_micros(80), 0);
        }
        for _ in 0..30 {
            tokio::time::advance(Duration::from_millis(100)).await;
            assert!(!cell.tick(&spec).1, "no probe needed");
        }
        // Once the samples age out of the 60 s window, measuring probes resume.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(cell.tick(&spec).1);
    }
}
