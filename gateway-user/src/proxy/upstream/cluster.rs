//! A running upstream cluster: what its parts share (the spec, the endpoints, the connection
//! slots, the budgets, the kernel signals, the metrics), how evidence reaches an endpoint's
//! health, what a reload's successor takes over (`successor`), and the background tasks that
//! end when the cluster is dropped (idle sweep, probes, DNS refresh, the latency evaluator)
//! or, but for the sweep, retired by a reload. Each part lives in its own module: `endpoint`
//! (the set and picking), `checkout` (pool, slots, pending queue), `latency` (peak-EWMA, slow
//! endpoints), `connect` and `hedge` (new connections), `probe`, `resolve`.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::{sync::Semaphore, time::Instant};
use tracing::{debug, info, warn};

use super::{
    endpoint::{Endpoint, Endpoints, NoPick},
    latency, probe, resolve,
};
use crate::{
    config::ClusterSpec,
    decide::{
        budget::Budgets,
        health::{Evidence, Transition},
    },
    proxy::telemetry::ClusterMeter,
    signals::SignalSource,
};

pub(crate) struct Cluster {
    pub name: Arc<str>,
    pub spec: ClusterSpec,
    /// The endpoints (see [`Cluster::endpoints`] for a copy of the list).
    pub set: Endpoints,
    /// `max_connections`: every open connection holds one, idle or busy. Shared with the
    /// cluster a reload replaced when its connections fit ([`connections_fit`]; `pending`
    /// always), so that the connections its requests still hold count: each reload that
    /// changed anything in a cluster allowed `max_connections` more.
    pub(super) slots: Arc<Semaphore>,
    /// Requests waiting for a connection (`max_pending_requests`).
    pub(super) pending: Arc<AtomicUsize>,
    pub(super) client: http1::Builder,
    /// HTTP/2 connections (`h2c`, `h2`, `auto` clusters).
    pub(super) h2: http2::Builder<TokioExecutor>,
    pub budgets: Arc<Budgets>,
    pub signals: Arc<dyn SignalSource>,
    /// Worker threads, i.e. idle-pool shards per endpoint.
    shards: usize,
    pub meter: ClusterMeter,
    /// Whether each host-name entry resolves, for `/status`.
    pub names: resolve::Names,
    /// Held from the ejection budget's check to the ejection it allows (`report_at`), and
    /// while a DNS refresh replaces the endpoint set (`resolve`).
    pub(super) ejecting: std::sync::Mutex<()>,
    /// Each host-name entry's lookup still running, if any (`resolve`).
    pub(super) lookups: resolve::Lookups,
    /// A reload replaced or removed the cluster ([`Cluster::retire`]).
    retired: AtomicBool,
}

/// A cluster a reload replaced is dropped once no request holds it: its endpoints' pooled
/// connections are closed then, not left to whatever still holds an endpoint (a tunnel's
/// lease), with nothing sweeping them.
impl Drop for Cluster {
    fn drop(&mut self) {
        for e in self.set.load().endpoints.iter() {
            e.close();
        }
    }
}

impl Cluster {
    /// Resolves the endpoints and starts the cluster's background tasks, which end when the
    /// cluster is dropped or retired (the idle sweep only when dropped). `previous`: the
    /// cluster of the same name this one replaces (a reload), whose names' state
    /// (`resolve::Names::at_start`) and endpoints' health ([`successor`]) carry on.
    pub async fn start(
        spec: ClusterSpec,
        signals: Arc<dyn SignalSource>,
        (shards, meter): (usize, ClusterMeter),
        previous: Option<&Cluster>,
    ) -> Arc<Cluster> {
        let lookups = resolve::Lookups::new(&spec);
        let mut resolved = resolve::resolve(&spec, &lookups).await;
        meter.dns_names_unresolved(resolved.failures());
        let names = resolve::Names::at_start(&spec, &mut resolved, previous);
        // What the replaced cluster learnt about each host carries on, and so do its
        // connections and their slots when they fit the new settings.
        let current = previous.map(|p| p.set.list()).unwrap_or_default();
        let fit = previous.filter(|p| connections_fit(&p.spec, &spec));
        let endpoints = resolved
            .addrs
            .into_iter()
            .map(|(a, w)| {
                let ep = Endpoint::new(a, w, &spec, shards, &meter);
                successor(ep, &current, fit.is_some())
            })
            .collect();
        let mut client = http1::Builder::new();
        client.max_buf_size(crate::proxy::error::UPSTREAM_READ_BUFFER);
        let h2 = h2_builder(&spec);
        let max = spec.limits.max_connections;
        let slots = fit.map_or_else(|| Arc::new(Semaphore::new(max)), |p| p.slots.clone());
        let cluster = Arc::new(Cluster {
            name: Arc::from(spec.name.as_str()),
            slots,
            set: Endpoints::new(endpoints),
            pending: previous.map_or_else(Arc::default, |p| p.pending.clone()),
            client,
            h2,
            budgets: Arc::default(),
            signals,
            spec,
            shards,
            meter,
            names,
            ejecting: std::sync::Mutex::new(()),
            lookups,
            retired: AtomicBool::new(false),
        });
        if let Some(p) = previous {
            cluster.settle_carried(&p.spec);
        }
        tokio::spawn(sweep_idle(Arc::downgrade(&cluster)));
        tokio::spawn(probe::run(Arc::downgrade(&cluster)));
        tokio::spawn(latency::run(Arc::downgrade(&cluster)));
        if resolve::has_host_names(&cluster.spec) {
            tokio::spawn(resolve::refresh(Arc::downgrade(&cluster)));
        }
        cluster
    }

    /// An endpoint of this cluster for `addr`, not yet in its set (see [`successor`]).
    pub(super) fn new_endpoint(&self, addr: SocketAddr, weight: u32) -> Endpoint {
        Endpoint::new(addr, weight, &self.spec, self.shards, &self.meter)
    }

    /// A reload replaced or removed the cluster: its probes, latency evaluation and DNS
    /// refresh stop, while the requests that hold it finish. Its successor shares its
    /// endpoints' health ([`successor`]), which the old probes, with the old `probe_path`,
    /// would otherwise go on judging for as long as a request (a WebSocket) held the cluster.
    /// Its connections stay for its requests: taken over by its successor, or closed when it
    /// is dropped (its idle ones swept meanwhile).
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    /// The endpoints, for status and metrics.
    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.set.list()
    }

    /// Picks a routable endpoint not `tried` by this request; under `consistent_hash`, by the
    /// request's hashed `hash_on` key (round robin without one). `first`: the request's first
    /// pick (the one whose `hash_balance_factor` spill is counted).
    pub fn pick(
        &self,
        tried: impl Fn(SocketAddr) -> bool,
        (key, first): (Option<u64>, bool),
    ) -> Result<Arc<Endpoint>, NoPick> {
        self.set.pick(&self.spec, tried, (key, first))
    }

    /// Whether a pick would find an endpoint not `tried`, without making one (see
    /// [`Endpoints::any_untried`]).
    pub fn has_untried(&self, tried: impl Fn(SocketAddr) -> bool) -> bool {
        self.set.any_untried(tried)
    }

    /// The connections the cluster holds now (busy, idle, being made), and the requests
    /// waiting for one to free up.
    pub fn connection_use(&self) -> (usize, usize) {
        let max = self.spec.limits.max_connections;
        let held = max.saturating_sub(self.slots.available_permits());
        (held, self.pending.load(Ordering::Relaxed))
    }

    /// Kernel signals are flowing.
    pub fn kernel(&self) -> bool {
        self.signals.kernel()
    }

    /// Feeds one piece of evidence about `ep`, seen now, to its health, and logs what it
    /// changed.
    pub fn report(&self, ep: &Endpoint, ev: Evidence, detail: &dyn Fn() -> String) {
        self.report_at(ep, ev, Instant::now(), detail);
    }

    /// [`Cluster::report`] of evidence seen at `now` (a time the caller has just read).
    pub fn report_at(
        &self,
        ep: &Endpoint,
        ev: Evidence,
        now: Instant,
        detail: &dyn Fn() -> String,
    ) {
        // The budget walks the endpoint set: asked only when the evidence could eject. The
        // check and the ejection it allows are one step for the whole cluster: two workers
        // that each saw the other endpoint still routable ejected both of a pair (a blip to
        // the whole pool), past `max_ejected_percent`, and left no endpoint to fail open to.
        let t = if ev.is_failure() {
            let _one_at_a_time = self.ejecting.lock().unwrap_or_else(|p| p.into_inner());
            let may = self.may_eject();
            ep.health.observe(ev, now, &self.spec, may, detail)
        } else {
            ep.health.observe(ev, now, &self.spec, false, detail)
        };
        self.log_transition(ep, t, detail);
    }

    /// Whether one more endpoint may be ejected (the caller holds `ejecting`). Never by a
    /// retired cluster: its requests still report to the health its successor shares, but
    /// against the old set and under another lock than the successor's, and two such checks
    /// could both pass and eject past `max_ejected_percent`.
    fn may_eject(&self) -> bool {
        !self.retired()
            && self
                .set
                .may_eject(self.spec.health.machine.max_ejected_percent)
    }

    /// A reload replaced or removed the cluster ([`Cluster::retire`]).
    pub(super) fn retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// What the endpoints must not keep of the health they carried on from the cluster this one
    /// replaced, `was` its spec: an ejection judged under settings the reload changed (the
    /// health checks, TLS or the protocol: a wrong `probe_path` fixed) ends, for the next probe
    /// to decide under the new ones; and ejections past the new set's budget (a reload that
    /// took out the healthy endpoints) fail open, as one more ejection would have. The metrics
    /// show the state carried, not a new endpoint's `healthy`.
    fn settle_carried(&self, was: &ClusterSpec) {
        let eps = self.endpoints();
        let s = &self.spec;
        if s.health != was.health || s.tls != was.tls || s.protocol != was.protocol {
            for e in &eps {
                e.health.end_ejection();
            }
        }
        let percent = s.health.machine.max_ejected_percent;
        let mut out = eps.iter().filter(|e| !e.health.routable()).count();
        for e in eps.iter().filter(|e| !e.health.routable()) {
            if crate::decide::health::may_eject(eps.len(), out - 1, percent) {
                break;
            }
            let t = e
                .health
                .fail_open(&|| "a reload left fewer endpoints".to_owned());
            self.log_transition(e, t, &|| "a reload left fewer endpoints".to_owned());
            out -= 1;
        }
        for e in &eps {
            e.meter.state(e.state(s));
        }
    }

    /// An active probe's evidence.
    pub(super) fn report_probe(&self, ep: &Endpoint, ev: Evidence, detail: &str) {
        let t = {
            let _one_at_a_time = self.ejecting.lock().unwrap_or_else(|p| p.into_inner());
            let may = self.may_eject();
            ep.health.probe(ev, &self.spec, may, &|| detail.to_owned())
        };
        self.log_transition(ep, t, &|| detail.to_owned());
    }

    pub(super) fn log_transition(&self, ep: &Endpoint, t: Transition, detail: &dyn Fn() -> String) {
        if t != Transition::None {
            ep.meter.transition(t, ep.state(&self.spec));
        }
        match t {
            Transition::None => {}
            Transition::Ejected { reason, duration } => {
                warn!(cluster = %self.name, upstream = %ep.addr, reason = reason.name(), ejection_ms = duration.as_millis() as u64, evidence = %detail(), "endpoint ejected");
            }
            Transition::Suspected(reason) => {
                info!(cluster = %self.name, upstream = %ep.addr, reason = reason.name(), evidence = %detail(), "endpoint suspect; probing");
            }
            Transition::EjectionRefused(reason) => {
                warn!(cluster = %self.name, upstream = %ep.addr, reason = reason.name(), max_ejected_percent = self.spec.health.machine.max_ejected_percent, "endpoint failing but the ejection budget is spent; keeping it as suspect (fail-open)");
            }
            Transition::Probing => {
                debug!(cluster = %self.name, upstream = %ep.addr, "ejection over; probing")
            }
            Transition::Recovered => {
                info!(cluster = %self.name, upstream = %ep.addr, evidence = %detail(), "endpoint healthy again")
            }
        }
    }
}

/// How often an HTTP/2 upstream connection is PINGed (also while idle): a connection whose
/// peer stops answering is closed after [`H2_PING_TIMEOUT`], instead of waiting for a request
/// to find out.
pub const H2_PING_INTERVAL: Duration = Duration::from_secs(10);
pub const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// HTTP/2 flow control: hyper's adaptive window, which starts at the protocol's 64 KiB and
/// grows both windows by its estimate of the path's bandwidth-delay product (PINGs). It
/// overrides `initial_stream_window_size` and `initial_connection_window_size`: the 1 MiB and
/// 4 MiB set here until stop 33 never applied (a review found it; measured with an upstream
/// that sends past the window). hyper's builder offers no larger start for the estimate:
/// setting either initial size after `adaptive_window` turns the adaptive window off. Fixed
/// large windows instead would need a measurement.
fn h2_builder(spec: &ClusterSpec) -> http2::Builder<TokioExecutor> {
    let mut b = http2::Builder::new(TokioExecutor::new());
    let streams = spec.limits.max_concurrent_streams;
    b.timer(TokioTimer::new())
        .initial_max_send_streams(streams)
        .adaptive_window(true)
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT)
        .keep_alive_while_idle(true)
        .max_header_list_size(crate::proxy::error::RESPONSE_HEAD_MAX_BYTES as u32);
    b
}

/// `ep` as it joins a cluster's new endpoint list, which replaces `current` (a DNS refresh, or
/// the cluster a reload replaced). An address in `current` carries on its health and latency:
/// an ejected endpoint stays ejected, a suspect one suspect, a slow one slow, its history and
/// round-trip times kept. Before, a reload that changed anything in a cluster (an endpoint
/// added, a timeout) made a dead or slow endpoint healthy again, and requests went to it until
/// it was found out again. An address the cluster did not have ramps up under slow start
/// (`health.slow_start_ms`), unless `current` is empty (the cluster's first endpoints, or
/// names that did not resolve until now): then none would be ramped against another.
/// `connections`: the connections fit the new settings ([`connections_fit`]), and
/// the new endpoint takes them over, idle and busy, with the connection slots they hold.
pub(super) fn successor(
    mut ep: Endpoint,
    current: &[Arc<Endpoint>],
    connections: bool,
) -> Arc<Endpoint> {
    match current.iter().find(|e| e.addr == ep.addr) {
        Some(was) => {
            ep.health = was.health.clone();
            ep.latency = was.latency.clone();
            ep.in_flight = was.in_flight.clone();
            if connections {
                ep.take_connections(was);
            }
        }
        // Before the endpoint is published: no pick sees it without its ramp.
        None if !current.is_empty() => ep.health.came_back(),
        None => {}
    }
    Arc::new(ep)
}

/// Whether a cluster under `new` may take over the connections of one under `was`: made the
/// same way (protocol, TLS), pooled and counted the same way (idle limits and timeout, streams
/// per connection, `max_connections`). Then a reload opens no connection again, and a request
/// waiting for one on the replaced cluster is served by those its successor frees.
/// A TLS connection was also verified by a name, which without `server_name` comes from the
/// endpoint entries; and its write timeout is its own (`StallGuard`).
fn connections_fit(was: &ClusterSpec, new: &ClusterSpec) -> bool {
    let (a, b) = (&was.limits, &new.limits);
    let named_alike =
        new.tls.as_ref().is_none_or(|t| t.server_name.is_some()) || was.endpoints == new.endpoints;
    was.protocol == new.protocol
        && was.tls == new.tls
        && named_alike
        && was.timeouts.idle == new.timeouts.idle
        && was.timeouts.write == new.timeouts.write
        && a.max_connections == b.max_connections
        && a.max_idle_per_endpoint == b.max_idle_per_endpoint
        && a.max_concurrent_streams == b.max_concurrent_streams
}

/// The cluster, for a background task's next round: none once it was dropped or retired.
pub(super) fn live(cluster: &Weak<Cluster>) -> Option<Arc<Cluster>> {
    cluster.upgrade().filter(|c| !c.retired())
}

/// Closes expired and dead idle connections, every half idle timeout (at least 1 s).
async fn sweep_idle(cluster: Weak<Cluster>) {
    let every = match cluster.upgrade() {
        Some(c) => (c.spec.timeouts.idle / 2).max(Duration::from_secs(1)),
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(c) = cluster.upgrade() else { return };
        for e in c.set.load().endpoints.iter() {
            e.pool.sweep();
            e.mux.sweep();
        }
    }
}

#[cfg(test)]
mod tests;
