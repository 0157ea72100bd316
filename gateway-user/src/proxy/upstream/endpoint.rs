//! A cluster's endpoints and how a request picks one.
//!
//! The set is swapped whole (`ArcSwap`) when DNS re-resolution changes it, so picking takes no
//! lock: it reads the set, the balancer's schedule and each endpoint's health and latency
//! atomics. A pick prefers healthy endpoints, falls back to suspect ones (deprioritised, not
//! excluded), and never returns an endpoint this request already tried. Under `peak_ewma` a
//! slow endpoint is left out of the choices except for its trickle request
//! (`decide::latency`), and used only when nothing else is left.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
};

use arc_swap::ArcSwap;

use super::{
    balancer,
    health::HealthCell,
    latency::{ClusterLatency, LatencyCell},
    multiplex::Multiplexed,
    pool::IdlePool,
};
use crate::{
    config::{ClusterSpec, LbPolicy},
    decide::{health::State, latency},
    proxy::telemetry::{ClusterMeter, EndpointMeter},
};

pub(crate) struct Endpoint {
    pub addr: SocketAddr,
    pub weight: u32,
    /// Its idle HTTP/1 connections, and (`mux`) its HTTP/2 ones: taken over by the endpoint
    /// that replaces it when the connections fit the new settings (`cluster::successor`).
    pub pool: Arc<IdlePool>,
    /// Its HTTP/2 connections (none for an `http1` cluster).
    pub mux: Arc<Multiplexed>,
    /// The endpoints that hold `pool` and `mux` (this one and those that took them over,
    /// `cluster::successor`): the last to close closes the connections.
    pub owners: Arc<AtomicUsize>,
    /// This endpoint let go of its connections ([`Endpoint::close`]), once.
    let_go: AtomicBool,
    /// Requests in flight to this address, for least-request balancing and `/status`; shared
    /// with the endpoint it replaced (as `health`), so that a reload's successor counts the
    /// requests still running on the cluster it replaced.
    pub in_flight: Arc<AtomicU64>,
    /// What was learnt about the host: shared with the endpoint of the same address that this
    /// one replaced (a DNS refresh that changed its weight, a reload that changed its cluster;
    /// `cluster::successor`), so that neither undoes an ejection or a slow mark.
    pub health: Arc<HealthCell>,
    /// Response latency (peak-EWMA) and the requests awaiting their head (shared as `health`).
    pub latency: Arc<LatencyCell>,
    /// A probe is running; at most one per endpoint.
    pub probe_running: AtomicBool,
    pub meter: EndpointMeter,
}

impl Endpoint {
    pub fn new(
        addr: SocketAddr,
        weight: u32,
        spec: &ClusterSpec,
        shards: usize,
        meter: &ClusterMeter,
    ) -> Self {
        Endpoint {
            meter: meter.endpoint(addr, spec.timeouts.connect),
            addr,
            weight,
            pool: Arc::new(IdlePool::new(
                shards,
                spec.limits.max_idle_per_endpoint,
                spec.timeouts.idle,
            )),
            owners: Arc::new(AtomicUsize::new(1)),
            let_go: AtomicBool::new(false),
            mux: Arc::new(Multiplexed::new(
                addr,
                shards,
                spec.limits.max_concurrent_streams,
                spec.timeouts.idle,
            )),
            in_flight: Arc::new(AtomicU64::new(0)),
            health: Arc::new(HealthCell::new()),
            latency: Arc::new(LatencyCell::new()),
            probe_running: AtomicBool::new(false),
        }
    }
}

impl Endpoint {
    /// The endpoint left its cluster (a DNS refresh dropped its address, or a reload replaced
    /// the cluster): its idle connections close now, those in use when their request ends.
    /// Connections another endpoint took over stay open for it: only the last of their
    /// owners to close closes them.
    pub fn close(&self) {
        if self.let_go.swap(true, Ordering::AcqRel) {
            return;
        }
        if self.owners.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.pool.close();
            self.mux.close();
        }
    }

    /// Takes over `was`'s connections, unless they were closed already (then it keeps its
    /// own, new ones).
    pub(super) fn take_connections(&mut self, was: &Endpoint) {
        let adopted = was
            .owners
            .try_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n > 0).then_some(n + 1)
            });
        if adopted.is_ok() {
            self.pool = was.pool.clone();
            self.mux = was.mux.clone();
            self.owners = was.owners.clone();
        }
    }

    /// The state shown in `/status` and the metrics: the health state, or `slow` for a
    /// healthy endpoint that `peak_ewma` found slow (takes the health lock: not for the
    /// request path).
    pub fn state(&self, spec: &ClusterSpec) -> State {
        match self.health.state() {
            State::Healthy if spec.lb_policy == LbPolicy::PeakEwma && self.latency.slow() => {
                State::Slow
            }
            s => s,
        }
    }
}

/// Counts a request in flight to an endpoint while it lives.
pub(crate) struct InFlight(Arc<Endpoint>);

impl InFlight {
    pub fn new(ep: &Arc<Endpoint>) -> Self {
        ep.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(ep.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One generation of the endpoint list, with its round-robin schedule.
pub(crate) struct EndpointSet {
    pub endpoints: Vec<Arc<Endpoint>>,
    schedule: Vec<u32>,
    /// Every endpoint's weight, summed (the routable ones' is at most this).
    weight: u64,
}

impl EndpointSet {
    pub fn new(endpoints: Vec<Arc<Endpoint>>) -> Self {
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight).collect();
        EndpointSet {
            schedule: balancer::schedule(&weights),
            weight: weights.iter().map(|w| u64::from(*w)).sum(),
            endpoints,
        }
    }
}

/// Why no endpoint could be picked.
pub(crate) enum NoPick {
    /// Every endpoint is ejected, or there are none (DNS returned nothing).
    NoneHealthy { total: usize, ejected: usize },
    /// Every eligible endpoint was already tried by this request.
    AllTried,
}

pub(crate) struct Endpoints {
    set: ArcSwap<EndpointSet>,
    tick: AtomicUsize,
    /// The latest slow evaluation (`latency::run`).
    pub latency: ClusterLatency,
}

impl Endpoints {
    pub fn new(endpoints: Vec<Arc<Endpoint>>) -> Self {
        Endpoints {
            set: ArcSwap::from_pointee(EndpointSet::new(endpoints)),
            tick: AtomicUsize::new(0),
            latency: ClusterLatency::default(),
        }
    }

    /// The current list.
    pub fn list(&self) -> Vec<Arc<Endpoint>> {
        self.set.load().endpoints.clone()
    }

    /// The current generation, without copying the list.
    pub fn load(&self) -> arc_swap::Guard<Arc<EndpointSet>> {
        self.set.load()
    }

    pub fn replace(&self, endpoints: Vec<Arc<Endpoint>>) {
        self.set.store(Arc::new(EndpointSet::new(endpoints)));
    }

    /// A routable endpoint not `tried` by this request: a healthy one if any is left, else a
    /// suspect one, else (`peak_ewma`) a slow one; an endpoint whose trickle is due first; one
    /// back from an ejection keeps only its slow start's share of the turns it wins.
    /// `key`: the request's hashed key, for `consistent_hash` (round robin without one).
    /// `count_spill`: this is the request's first pick, whose bounded-load spill is counted.
    pub fn pick(
        &self,
        spec: &ClusterSpec,
        tried: impl Fn(SocketAddr) -> bool,
        (key, count_spill): (Option<u64>, bool),
    ) -> Result<Arc<Endpoint>, NoPick> {
        let set = self.set.load();
        let eps = &set.endpoints;
        let latency_aware = spec.lb_policy == LbPolicy::PeakEwma;
        if latency_aware && let Some(ep) = self.trickle(eps, spec, &tried) {
            return Ok(ep);
        }
        let picked = |ep: &Arc<Endpoint>| {
            if latency_aware {
                ep.latency.picked(tokio::time::Instant::now());
            }
            ep.clone()
        };
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        let passes_over = slow_start_passes_over(spec, key.is_some());
        for pass in 0..3 {
            let eligible = |i: usize| {
                let (h, slow) = (&eps[i].health, latency_aware && eps[i].latency.slow());
                !tried(eps[i].addr)
                    && h.routable()
                    && match pass {
                        0 => !h.suspect() && !slow,
                        1 => !slow,
                        _ => true,
                    }
            };
            let mut found = self.select(&set, spec, (key, count_spill), tick, eligible);
            // Slow start: a warming endpoint keeps the turn it won with its percent's chance;
            // otherwise the turn goes to another endpoint this pass allows (by weight, at
            // random: round robin's next in line would take every turn given up), and stays
            // with it when there is none.
            if let Some(i) = found
                && passes_over(&eps[i])
            {
                let others = |j: usize| j != i && eligible(j);
                let again = match spec.lb_policy {
                    LbPolicy::LeastRequest | LbPolicy::PeakEwma => {
                        self.select(&set, spec, (key, false), tick, others)
                    }
                    LbPolicy::RoundRobin | LbPolicy::ConsistentHash => {
                        // One with room first (see `Shares`).
                        let shares = Shares::of(&set, spec);
                        let mut rng = rand::rng();
                        let mut draw = || rand::Rng::random_range(&mut rng, 0..usize::MAX);
                        let with_room = |j: usize| others(j) && !shares.full(j);
                        balancer::weighted_random(&set.schedule, &mut draw, with_room)
                            .or_else(|| balancer::weighted_random(&set.schedule, draw, others))
                    }
                };
                found = again.or(found);
            }
            if let Some(i) = found {
                return Ok(picked(&eps[i]));
            }
        }
        let ejected = eps.iter().filter(|e| !e.health.routable()).count();
        if !eps.iter().any(|e| tried(e.addr)) {
            Err(NoPick::NoneHealthy {
                total: eps.len(),
                ejected,
            })
        } else {
            Err(NoPick::AllTried)
        }
    }

    /// Whether [`Endpoints::pick`] would find an endpoint (a routable one not `tried`), without
    /// picking one: a pick turns round robin and claims a slow endpoint's trickle.
    pub fn any_untried(&self, tried: impl Fn(SocketAddr) -> bool) -> bool {
        let set = self.set.load();
        set.endpoints
            .iter()
            .any(|e| !tried(e.addr) && e.health.routable())
    }

    /// The cluster's policy's choice among the `eligible` endpoints of `set`; `tick` turns the
    /// round robin.
    fn select(
        &self,
        set: &EndpointSet,
        spec: &ClusterSpec,
        (key, count_spill): (Option<u64>, bool),
        tick: usize,
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let eps = &set.endpoints;
        match spec.lb_policy {
            LbPolicy::RoundRobin => round_robin_with_room(set, spec, tick, eligible),
            LbPolicy::LeastRequest => {
                let mut rng = rand::rng();
                balancer::least_request(
                    &set.schedule,
                    || rand::Rng::random_range(&mut rng, 0..usize::MAX),
                    |i| eps[i].in_flight.load(Ordering::Relaxed),
                    |i| eps[i].weight,
                    eligible,
                )
            }
            LbPolicy::PeakEwma => self.peak_ewma(eps, spec, eligible),
            LbPolicy::ConsistentHash => match key {
                Some(k) => hash_pick(eps, (k, count_spill), spec.hash_balance_factor, eligible),
                None => round_robin_with_room(set, spec, tick, eligible),
            },
        }
    }

    /// Power of two choices over `decide::latency::cost`.
    fn peak_ewma(
        &self,
        eps: &[Arc<Endpoint>],
        spec: &ClusterSpec,
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let now = tokio::time::Instant::now();
        let decay = spec.latency.decay;
        let reference = self.latency.reference();
        let mut rng = rand::rng();
        latency::p2c(
            eps.len(),
            |bound| rand::Rng::random_range(&mut rng, 0..bound),
            |i| {
                let e = &eps[i];
                latency::cost(
                    e.latency.estimate(now, decay).unwrap_or(reference),
                    e.latency.pending_age(now),
                    e.in_flight.load(Ordering::Relaxed),
                    e.weight,
                )
            },
            eligible,
        )
    }

    /// An endpoint whose trickle request is due (not picked for `trickle_interval`, nothing
    /// in flight: a slow one, or one that power of two choices keeps losing), claimed for this
    /// request.
    fn trickle(
        &self,
        eps: &[Arc<Endpoint>],
        spec: &ClusterSpec,
        tried: &impl Fn(SocketAddr) -> bool,
    ) -> Option<Arc<Endpoint>> {
        if !self.latency.any_due.load(Ordering::Relaxed) {
            return None;
        }
        eps.iter()
            .find(|e| {
                e.health.routable()
                    && !e.health.suspect()
                    && !tried(e.addr)
                    && e.latency.claim_trickle(
                        e.in_flight.load(Ordering::Relaxed),
                        spec.latency.trickle_interval,
                    )
            })
            .cloned()
    }

    /// Whether one more endpoint may be ejected within `max_ejected_percent`.
    pub fn may_eject(&self, max_ejected_percent: u32) -> bool {
        let set = self.set.load();
        let unroutable = set
            .endpoints
            .iter()
            .filter(|e| !e.health.routable())
            .count();
        crate::decide::health::may_eject(set.endpoints.len(), unroutable, max_ejected_percent)
    }

    /// Closes one idle connection to an endpoint other than `keep`, to free its slot.
    pub fn evict_idle_except(&self, keep: &Arc<Endpoint>) -> bool {
        self.set
            .load()
            .endpoints
            .iter()
            .filter(|e| !Arc::ptr_eq(e, keep))
            .any(|e| e.pool.evict_oldest() || e.mux.evict_idle())
    }
}

/// Slow start (`health.slow_start_ms`): whether a pick passes over the endpoint it chose. One
/// back from an ejection less than the window ago is passed over once per pick at random, so
/// that it keeps about its `decide::slow_start` percent of the turns it would win. Not under
/// `consistent_hash` with a key: its keys stay where they belong.
fn slow_start_passes_over(spec: &ClusterSpec, keyed: bool) -> impl Fn(&Endpoint) -> bool {
    let window = spec.health.slow_start;
    let off = window.is_zero() || (keyed && spec.lb_policy == LbPolicy::ConsistentHash);
    move |ep: &Endpoint| {
        if off {
            return false;
        }
        let percent = ep.health.slow_start_percent(window);
        percent < 100 && rand::Rng::random_range(&mut rand::rng(), 0..100) >= percent
    }
}

/// `consistent_hash`'s pick for the key hash `key`: the key's endpoint, or with
/// `hash_balance_factor` the first in the key's order within its bound. A spill is counted on
/// the key's own endpoint when `count_spill` (a request's first pick: a retry or a hedge,
/// which rule out endpoints, would count one on another endpoint, and count a request twice).
fn hash_pick(
    eps: &[Arc<Endpoint>],
    (key, count_spill): (u64, bool),
    factor: Option<u32>,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    let id = |i: usize| balancer::address_id(eps[i].addr);
    let weight = |i: usize| eps[i].weight;
    let Some(factor) = factor else {
        return balancer::rendezvous(eps.len(), key, id, weight, eligible);
    };
    let load = |i: usize| eps[i].in_flight.load(Ordering::Relaxed);
    let (i, spilled) =
        balancer::rendezvous_bounded(eps.len(), key, (id, weight), eligible, load, factor)?;
    if let Some(owner) = spilled
        && count_spill
    {
        eps[owner].meter.hash_spilled();
    }
    Some(i)
}

mod shares;

use self::shares::{Shares, round_robin_with_room};

#[cfg(test)]
mod tests;
