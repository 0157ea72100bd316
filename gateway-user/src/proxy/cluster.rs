//! A running upstream cluster: its endpoints (re-resolved for `host:port` entries), how a
//! request picks one, the connection limits and pending queue, passive health, and the retry
//! budget.

use std::{
    future::poll_fn,
    net::SocketAddr,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::{sync::Semaphore, time::Instant};
use tracing::{debug, info, warn};

use super::{
    balancer, connect,
    error::ProxyError,
    health::{self, Outlier, Verdict},
    io::StallGuard,
    pool::{IdlePool, UpstreamConn},
};
use crate::{
    config::{ClusterSpec, EndpointAddr, LbPolicy},
    signals::SignalSource,
};

pub(crate) struct Endpoint {
    pub addr: SocketAddr,
    pub weight: u32,
    pub pool: IdlePool,
    /// Requests in flight to this endpoint, for least-request balancing.
    pub in_flight: AtomicU64,
    outlier: Mutex<Outlier>,
    /// Fast paths: whether `outlier` may say "ejected", or has failures to reset.
    maybe_ejected: AtomicBool,
    failing: AtomicBool,
}

impl Endpoint {
    fn new(addr: SocketAddr, weight: u32, spec: &ClusterSpec, shards: usize) -> Self {
        Endpoint {
            addr,
            weight,
            pool: IdlePool::new(
                shards,
                spec.limits.max_idle_per_endpoint,
                spec.timeouts.idle,
            ),
            in_flight: AtomicU64::new(0),
            outlier: Mutex::new(Outlier::default()),
            maybe_ejected: AtomicBool::new(false),
            failing: AtomicBool::new(false),
        }
    }

    fn outlier(&self) -> std::sync::MutexGuard<'_, Outlier> {
        self.outlier.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        if !self.maybe_ejected.load(Ordering::Relaxed) {
            return false;
        }
        let ejected = self.outlier().is_ejected(now);
        if !ejected {
            self.maybe_ejected.store(false, Ordering::Relaxed);
        }
        ejected
    }
}

pub(crate) struct EndpointSet {
    pub endpoints: Vec<Arc<Endpoint>>,
    schedule: Vec<u32>,
}

impl EndpointSet {
    fn new(endpoints: Vec<Arc<Endpoint>>) -> Self {
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight).collect();
        EndpointSet {
            schedule: balancer::schedule(&weights),
            endpoints,
        }
    }
}

pub(crate) struct Cluster {
    pub name: Arc<str>,
    pub spec: ClusterSpec,
    set: ArcSwap<EndpointSet>,
    tick: AtomicUsize,
    slots: Arc<Semaphore>,
    pending: AtomicUsize,
    active: AtomicUsize,
    retries: AtomicUsize,
    signals: Arc<dyn SignalSource>,
    client: http1::Builder,
    /// Worker threads, i.e. idle-pool shards per endpoint.
    shards: usize,
}

/// Why no endpoint could be picked.
pub(crate) enum NoPick {
    /// Every endpoint is ejected, or there are none (DNS returned nothing).
    NoneHealthy { total: usize, ejected: usize },
    /// Every eligible endpoint was already tried by this request.
    AllTried,
}

impl Cluster {
    /// Resolves the endpoints and starts the cluster's background tasks (idle sweep, DNS
    /// refresh), which end when the cluster is dropped.
    pub async fn start(
        spec: ClusterSpec,
        signals: Arc<dyn SignalSource>,
        shards: usize,
    ) -> Arc<Cluster> {
        let addrs = resolve(&spec).await;
        let endpoints = addrs
            .into_iter()
            .map(|(a, w)| Arc::new(Endpoint::new(a, w, &spec, shards)))
            .collect();
        let mut client = http1::Builder::new();
        client.max_buf_size(256 * 1024);
        let cluster = Arc::new(Cluster {
            name: Arc::from(spec.name.as_str()),
            slots: Arc::new(Semaphore::new(spec.limits.max_connections)),
            set: ArcSwap::from_pointee(EndpointSet::new(endpoints)),
            tick: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            retries: AtomicUsize::new(0),
            signals,
            client,
            spec,
            shards,
        });
        tokio::spawn(sweep_idle(Arc::downgrade(&cluster)));
        if cluster
            .spec
            .endpoints
            .iter()
            .any(|e| matches!(e.address, EndpointAddr::Host { .. }))
        {
            tokio::spawn(refresh_dns(Arc::downgrade(&cluster)));
        }
        cluster
    }

    /// Picks an endpoint that is not ejected and not `tried` by this request.
    pub fn pick(&self, tried: impl Fn(SocketAddr) -> bool) -> Result<Arc<Endpoint>, NoPick> {
        let set = self.set.load();
        let eps = &set.endpoints;
        let eligible = |i: usize| {
            if tried(eps[i].addr) {
                return false;
            }
            !eps[i].maybe_ejected.load(Ordering::Relaxed) || !eps[i].is_ejected(Instant::now())
        };
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        let found = match self.spec.lb_policy {
            LbPolicy::RoundRobin => balancer::round_robin(&set.schedule, tick, eligible),
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
        };
        match found {
            Some(i) => Ok(eps[i].clone()),
            None => {
                let now = Instant::now();
                let ejected = eps.iter().filter(|e| e.is_ejected(now)).count();
                if !eps.iter().any(|e| tried(e.addr)) {
                    Err(NoPick::NoneHealthy {
                        total: eps.len(),
                        ejected,
                    })
                } else {
                    Err(NoPick::AllTried)
                }
            }
        }
    }

    /// A connection to `ep`: an idle one, a new one if a slot is free, or one that frees up
    /// while the request waits in the pending queue (bounded by `max_pending_requests`).
    pub async fn checkout(&self, ep: &Arc<Endpoint>) -> Result<UpstreamConn, ProxyError> {
        loop {
            if let Some(c) = ep.pool.take(Instant::now()) {
                return Ok(c);
            }
            if let Ok(slot) = self.slots.clone().try_acquire_owned() {
                return self.connect(ep, slot).await;
            }
            // All slots busy: use another worker's idle connection to this endpoint, or close
            // an idle connection to another endpoint to make room.
            if let Some(c) = ep.pool.steal() {
                return Ok(c);
            }
            if self.evict_idle_except(ep) {
                continue;
            }
            let limit = self.spec.limits.max_pending_requests;
            if self.pending.fetch_add(1, Ordering::AcqRel) >= limit {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                return Err(ProxyError::Overloaded {
                    cluster: self.spec.name.clone(),
                    limit,
                });
            }
            let _pending = Decrement(&self.pending);
            ep.pool.waiters.fetch_add(1, Ordering::AcqRel);
            let _waiting = Decrement(&ep.pool.waiters);
            tokio::select! {
                _ = ep.pool.returned.notified() => continue,
                slot = self.slots.clone().acquire_owned() => {
                    let slot = slot.expect("the cluster never closes its semaphore");
                    return self.connect(ep, slot).await;
                }
            }
        }
    }

    fn evict_idle_except(&self, keep: &Arc<Endpoint>) -> bool {
        let set = self.set.load();
        set.endpoints
            .iter()
            .filter(|e| !Arc::ptr_eq(e, keep))
            .any(|e| e.pool.evict_oldest())
    }

    async fn connect(
        &self,
        ep: &Arc<Endpoint>,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<UpstreamConn, ProxyError> {
        let t = &self.spec.timeouts;
        let c = connect::connect(ep.addr, t.connect, &*self.signals).await;
        self.on_connect(ep, c.as_ref().err());
        let c = c?;
        let io = TokioIo::new(StallGuard::new(c.stream, t.write));
        let (sender, conn) =
            self.client
                .handshake(io)
                .await
                .map_err(|e| ProxyError::ConnectFailed {
                    endpoint: ep.addr,
                    source: std::io::Error::other(e),
                    cookie: Some(c.cookie),
                })?;
        let (addr, cookie) = (ep.addr, c.cookie);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(upstream = %addr, cookie, error = %e, "upstream connection ended");
            }
        });
        Ok(UpstreamConn::new(sender, c.cookie, c.elapsed, slot))
    }

    /// Feeds a connect outcome to the endpoint's outlier state.
    fn on_connect(&self, ep: &Endpoint, err: Option<&ProxyError>) {
        let Some(err) = err else {
            if ep.failing.swap(false, Ordering::Relaxed) {
                ep.outlier().on_success();
            }
            return;
        };
        ep.failing.store(true, Ordering::Relaxed);
        let now = Instant::now();
        let set = self.set.load();
        let ejected = set.endpoints.iter().filter(|e| e.is_ejected(now)).count();
        let budget =
            health::ejection_budget(set.endpoints.len(), self.spec.health.max_ejected_percent);
        let verdict = ep
            .outlier()
            .on_failure(now, &self.spec.health, ejected < budget);
        match verdict {
            Verdict::Ejected(d) => {
                ep.maybe_ejected.store(true, Ordering::Relaxed);
                warn!(cluster = %self.name, upstream = %ep.addr, ejection_ms = d.as_millis() as u64, reason = %err.kind(), "endpoint ejected");
            }
            Verdict::OverBudget => {
                debug!(cluster = %self.name, upstream = %ep.addr, "endpoint failing, ejection budget spent");
            }
            Verdict::Healthy => {}
        }
    }

    /// Puts a connection whose response was read to the end back in the idle list, once hyper
    /// has seen the end too.
    pub fn release(ep: Arc<Endpoint>, mut conn: UpstreamConn, idle_timeout: Duration) {
        if conn.sender.is_ready() {
            ep.pool.put(conn);
            return;
        }
        if conn.sender.is_closed() {
            return;
        }
        tokio::spawn(async move {
            let ready = poll_fn(|cx| conn.sender.poll_ready(cx));
            if let Ok(Ok(())) = tokio::time::timeout(idle_timeout, ready).await {
                ep.pool.put(conn);
            }
        });
    }

    /// Counts a request in flight for the retry budget; the guard uncounts it.
    pub fn start_request(self: &Arc<Self>) -> ActiveRequest {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveRequest(self.clone())
    }

    /// A retry, if the budget allows one: retries in flight stay within `budget_percent` of
    /// requests in flight, or `min_retry_concurrency`, whichever is larger.
    pub fn try_retry(self: &Arc<Self>) -> Option<ActiveRetry> {
        let r = &self.spec.retry;
        let active = self.active.load(Ordering::Relaxed);
        let allowed =
            (active * r.budget_percent as usize / 100).max(r.min_retry_concurrency as usize);
        if self.retries.fetch_add(1, Ordering::AcqRel) < allowed {
            Some(ActiveRetry(self.clone()))
        } else {
            self.retries.fetch_sub(1, Ordering::AcqRel);
            None
        }
    }
}

struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(crate) struct ActiveRequest(Arc<Cluster>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(crate) struct ActiveRetry(Arc<Cluster>);

impl Drop for ActiveRetry {
    fn drop(&mut self) {
        self.0.retries.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Every endpoint address of the spec, `host:port` entries resolved now.
async fn resolve(spec: &ClusterSpec) -> Vec<(SocketAddr, u32)> {
    let mut out = Vec::new();
    for e in &spec.endpoints {
        match &e.address {
            EndpointAddr::Ip(a) => out.push((*a, e.weight)),
            EndpointAddr::Host { host, port } => {
                match tokio::net::lookup_host((host.as_str(), *port)).await {
                    Ok(addrs) => out.extend(addrs.map(|a| (a, e.weight))),
                    Err(err) => {
                        warn!(cluster = %spec.name, endpoint = %e.address, error = %err, "cannot resolve endpoint; retrying every dns_refresh_ms")
                    }
                }
            }
        }
    }
    out.sort();
    out.dedup_by_key(|(a, _)| *a);
    out
}

async fn refresh_dns(cluster: Weak<Cluster>) {
    let every = match cluster.upgrade() {
        Some(c) => c.spec.dns_refresh,
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(c) = cluster.upgrade() else { return };
        let addrs = resolve(&c.spec).await;
        let current = c.set.load();
        let same = addrs.len() == current.endpoints.len()
            && addrs
                .iter()
                .zip(&current.endpoints)
                .all(|((a, w), e)| *a == e.addr && *w == e.weight);
        if same {
            continue;
        }
        // Keep the endpoints (and their pools and health) that are still there.
        let endpoints = addrs
            .into_iter()
            .map(|(a, w)| {
                current
                    .endpoints
                    .iter()
                    .find(|e| e.addr == a && e.weight == w)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Endpoint::new(a, w, &c.spec, c.shards)))
            })
            .collect::<Vec<_>>();
        info!(cluster = %c.name, endpoints = endpoints.len(), "endpoints re-resolved");
        c.set.store(Arc::new(EndpointSet::new(endpoints)));
    }
}

async fn sweep_idle(cluster: Weak<Cluster>) {
    let every = match cluster.upgrade() {
        Some(c) => (c.spec.timeouts.idle / 2).max(Duration::from_secs(1)),
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(c) = cluster.upgrade() else { return };
        for e in &c.set.load().endpoints {
            e.pool.sweep();
        }
    }
}
