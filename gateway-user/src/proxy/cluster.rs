//! A running upstream cluster: its endpoints (re-resolved for `host:port` entries), how a
//! request picks one, the connection limits and pending queue, passive health, and the retry
//! budget.

use std::{
    future::poll_fn,
    net::SocketAddr,
    sync::{
        Arc, Weak,
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
    endpoint_health::HealthCell,
    error::ProxyError,
    io::StallGuard,
    pool::{IdlePool, UpstreamConn},
    telemetry::{ClusterMeter, EndpointMeter, HedgeResult},
};
use crate::{
    config::{ClusterSpec, EndpointAddr, LbPolicy},
    decide::health::{Evidence, Transition},
    signals::SignalSource,
};

pub(crate) struct Endpoint {
    pub addr: SocketAddr,
    pub weight: u32,
    pub pool: IdlePool,
    /// Requests in flight to this endpoint, for least-request balancing.
    pub in_flight: AtomicU64,
    pub health: HealthCell,
    /// A probe is running; at most one per endpoint.
    probe_running: AtomicBool,
    pub meter: EndpointMeter,
}

impl Endpoint {
    fn new(
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
            pool: IdlePool::new(
                shards,
                spec.limits.max_idle_per_endpoint,
                spec.timeouts.idle,
            ),
            in_flight: AtomicU64::new(0),
            health: HealthCell::new(),
            probe_running: AtomicBool::new(false),
        }
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
    hedges: AtomicUsize,
    signals: Arc<dyn SignalSource>,
    client: http1::Builder,
    /// Worker threads, i.e. idle-pool shards per endpoint.
    shards: usize,
    pub meter: ClusterMeter,
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
        meter: ClusterMeter,
    ) -> Arc<Cluster> {
        let addrs = resolve(&spec).await;
        let endpoints = addrs
            .into_iter()
            .map(|(a, w)| Arc::new(Endpoint::new(a, w, &spec, shards, &meter)))
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
            hedges: AtomicUsize::new(0),
            signals,
            client,
            spec,
            shards,
            meter,
        });
        tokio::spawn(sweep_idle(Arc::downgrade(&cluster)));
        tokio::spawn(probe_loop(Arc::downgrade(&cluster)));
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

    /// Picks a routable endpoint not `tried` by this request: a healthy one if any is left,
    /// else a suspect one (deprioritised, not excluded).
    pub fn pick(&self, tried: impl Fn(SocketAddr) -> bool) -> Result<Arc<Endpoint>, NoPick> {
        let set = self.set.load();
        let eps = &set.endpoints;
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        for allow_suspect in [false, true] {
            let eligible = |i: usize| {
                let h = &eps[i].health;
                !tried(eps[i].addr) && h.routable() && (allow_suspect || !h.suspect())
            };
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
            if let Some(i) = found {
                return Ok(eps[i].clone());
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

    /// The endpoints, for status and metrics.
    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.set.load().endpoints.clone()
    }

    /// Whether one more endpoint may be ejected within `max_ejected_percent`.
    fn may_eject(&self) -> bool {
        let set = self.set.load();
        let unroutable = set
            .endpoints
            .iter()
            .filter(|e| !e.health.routable())
            .count();
        crate::decide::health::may_eject(
            set.endpoints.len(),
            unroutable,
            self.spec.health.max_ejected_percent,
        )
    }

    /// Feeds one piece of evidence about `ep` to its health, and logs what it changed.
    pub fn report(&self, ep: &Endpoint, ev: Evidence, detail: &dyn Fn() -> String) {
        let may = self.may_eject();
        let t = ep.health.observe(ev, &self.spec, may, detail);
        self.log_transition(ep, t, detail);
    }

    fn log_transition(&self, ep: &Endpoint, t: Transition, detail: &dyn Fn() -> String) {
        if t != Transition::None {
            ep.meter.transition(t, ep.health.state());
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
                warn!(cluster = %self.name, upstream = %ep.addr, reason = reason.name(), max_ejected_percent = self.spec.health.max_ejected_percent, "endpoint failing but the ejection budget is spent; keeping it as suspect (fail-open)");
            }
            Transition::Probing => {
                debug!(cluster = %self.name, upstream = %ep.addr, "ejection over; probing")
            }
            Transition::Recovered => {
                info!(cluster = %self.name, upstream = %ep.addr, evidence = %detail(), "endpoint healthy again")
            }
        }
    }

    /// A connection to `ep`: an idle one, a new one if a slot is free, or one that frees up
    /// while the request waits in the pending queue (bounded by `max_pending_requests`).
    /// The connection may be to another endpoint when a hedged connect won.
    pub async fn checkout(
        &self,
        ep: &Arc<Endpoint>,
        tried: &(dyn Fn(SocketAddr) -> bool + Sync),
    ) -> Result<(Arc<Endpoint>, UpstreamConn), ProxyError> {
        loop {
            if let Some(c) = ep.pool.take(Instant::now()) {
                return Ok((ep.clone(), c));
            }
            if let Ok(slot) = self.slots.clone().try_acquire_owned() {
                return self.connect(ep, slot, tried).await;
            }
            // All slots busy: use another worker's idle connection to this endpoint, or close
            // an idle connection to another endpoint to make room.
            if let Some(c) = ep.pool.steal() {
                return Ok((ep.clone(), c));
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
                    return self.connect(ep, slot, tried).await;
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

    /// A new connection to `ep` within its connect deadline (adaptive, capped by
    /// `connect_timeout_ms`). With no SYN-ACK by the deadline the endpoint is reported (no
    /// SYN-ACK, no RST, no ICMP) and, when hedging is on and its budget allows, a connect to
    /// another healthy endpoint races the first: the first to establish wins, the other is
    /// closed. Without a hedge the attempt ends at the deadline and the retry path moves on.
    async fn connect(
        &self,
        ep: &Arc<Endpoint>,
        slot: tokio::sync::OwnedSemaphorePermit,
        tried: &(dyn Fn(SocketAddr) -> bool + Sync),
    ) -> Result<(Arc<Endpoint>, UpstreamConn), ProxyError> {
        let deadline = ep.health.deadline(&self.spec).value;
        ep.meter.deadline(deadline);
        let start = Instant::now();
        let (cookie, fut) = connect::start(ep.addr)?;
        // Boxed rather than pinned on the stack, so that `drop(fut)` below really closes the
        // socket (a stack pin only drops a reference) and the kernel's record exists.
        let mut fut = Box::pin(fut);
        if let Ok(r) = tokio::time::timeout(deadline, &mut fut).await {
            let c = self.finish_connect(ep, cookie, start, r)?;
            return Ok((ep.clone(), self.handshake(ep, c, slot).await?));
        }
        let timed_out = |cookie: u64, timeout: Duration| ProxyError::ConnectTimeout {
            endpoint: ep.addr,
            timeout,
            cookie,
            evidence: self.signals.connect_evidence(cookie),
        };
        self.report(ep, Evidence::SynUnanswered, &|| {
            format!(
                "no SYN-ACK, no RST, no ICMP within the {} ms connect deadline",
                deadline.as_millis()
            )
        });
        let hedge = if self.spec.retry.hedge && deadline < self.spec.timeouts.connect {
            self.pick(|a| a == ep.addr || tried(a))
                .ok()
                .filter(|e| !e.health.suspect())
                .and_then(|e2| {
                    let budget = self
                        .try_hedge()
                        .zip(self.slots.clone().try_acquire_owned().ok());
                    if budget.is_none() {
                        self.meter.hedge(HedgeResult::BudgetExhausted);
                    }
                    let (hedge, slot2) = budget?;
                    Some((e2, hedge, slot2))
                })
        } else {
            None
        };
        let Some((ep2, _hedge, slot2)) = hedge else {
            // Close the socket first, so that the kernel's record (aborted, SYNs sent) exists.
            drop(fut);
            let e = timed_out(cookie, deadline);
            if let ProxyError::ConnectTimeout { evidence, .. } = &e {
                ep.meter.connect_abandoned(evidence.as_ref(), true);
            }
            return Err(e);
        };
        debug!(cluster = %self.name, upstream = %ep.addr, hedge = %ep2.addr, deadline_ms = deadline.as_millis() as u64, "no SYN-ACK by the deadline; racing another endpoint");
        let deadline2 = ep2.health.deadline(&self.spec).value;
        let start2 = Instant::now();
        let (cookie2, fut2) = connect::start(ep2.addr)?;
        let mut fut2 = std::pin::pin!(fut2);
        let cap = start + self.spec.timeouts.connect;
        let cap2 = start2 + deadline2;
        let (mut a_done, mut b_done) = (false, false);
        let mut last_err = None;
        loop {
            tokio::select! {
                r = &mut fut, if !a_done => {
                    a_done = true;
                    match self.finish_connect(ep, cookie, start, r) {
                        Ok(c) => {
                            if !b_done {
                                ep2.meter.connect_abandoned(None, false);
                            }
                            self.meter.hedge(HedgeResult::Lost);
                            return Ok((ep.clone(), self.handshake(ep, c, slot).await?));
                        }
                        Err(e) => last_err = Some(e),
                    }
                }
                r = &mut fut2, if !b_done => {
                    b_done = true;
                    match self.finish_connect(&ep2, cookie2, start2, r) {
                        Ok(c) => {
                            if !a_done {
                                ep.meter.connect_abandoned(None, true);
                            }
                            self.meter.hedge(HedgeResult::Won);
                            return Ok((ep2.clone(), self.handshake(&ep2, c, slot2).await?));
                        }
                        Err(e) => last_err = Some(e),
                    }
                }
                _ = tokio::time::sleep_until(cap), if !a_done => {
                    a_done = true;
                    ep.meter.connect_abandoned(None, true);
                }
                _ = tokio::time::sleep_until(cap2), if !b_done => {
                    b_done = true;
                    ep2.meter.connect_abandoned(None, true);
                    self.report(&ep2, Evidence::SynUnanswered, &|| {
                        format!("no SYN-ACK, no RST, no ICMP within the {} ms connect deadline (hedged connect)", deadline2.as_millis())
                    });
                }
            }
            if a_done && b_done {
                self.meter.hedge(HedgeResult::Lost);
                return Err(
                    last_err.unwrap_or_else(|| timed_out(cookie, self.spec.timeouts.connect))
                );
            }
        }
    }

    /// Classifies a finished connect and feeds health and the SYN-RTT window.
    fn finish_connect(
        &self,
        ep: &Endpoint,
        cookie: u64,
        start: Instant,
        r: std::io::Result<tokio::net::TcpStream>,
    ) -> Result<connect::Connected, ProxyError> {
        let elapsed = start.elapsed();
        match r {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                let ev = self.signals.connect_evidence(cookie);
                let (rtt, retx) = match &ev {
                    Some(e) => (e.syn_rtt.unwrap_or(elapsed), e.syn_retransmits),
                    None => (elapsed, 0),
                };
                ep.health.observe_rtt(rtt, retx);
                ep.meter.connected(ev.as_ref());
                self.report(
                    ep,
                    Evidence::ConnectOk {
                        syn_retransmits: retx,
                    },
                    &|| match &ev {
                        Some(e) => e.to_string(),
                        None => format!("connected in {} us", elapsed.as_micros()),
                    },
                );
                Ok(connect::Connected {
                    stream,
                    cookie,
                    elapsed,
                })
            }
            Err(source) => {
                let e = connect::failed(ep.addr, source, cookie, elapsed, &*self.signals);
                ep.meter.connect_failed(&e);
                if let Some(ev) = evidence_of(&e) {
                    self.report(ep, ev, &|| e.to_string());
                }
                Err(e)
            }
        }
    }

    async fn handshake(
        &self,
        ep: &Arc<Endpoint>,
        c: connect::Connected,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<UpstreamConn, ProxyError> {
        let t = &self.spec.timeouts;
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
        let (signals, rtos) = (self.signals.clone(), ep.meter.rtos.clone());
        tokio::spawn(async move {
            // The socket is closed once `conn` is done: the kernel's record of the
            // connection is final (see `telemetry`).
            let ended = conn.await;
            if let Err(e) = ended {
                debug!(upstream = %addr, cookie, error = %e, "upstream connection ended");
            }
            if let Some(ev) = signals.established_evidence(cookie)
                && ev.rtos > 0
            {
                rtos.inc_by(u64::from(ev.rtos));
            }
        });
        Ok(UpstreamConn::new(sender, c.cookie, c.elapsed, slot))
    }

    /// A hedged connect, if the budget allows: hedges in flight stay within
    /// `hedge_budget_percent` of requests in flight (at least one while it is above 0).
    fn try_hedge(&self) -> Option<Decrement<'_>> {
        let pct = self.spec.retry.hedge_budget_percent as usize;
        if pct == 0 {
            return None;
        }
        let allowed = (self.active.load(Ordering::Relaxed) * pct / 100).max(1);
        if self.hedges.fetch_add(1, Ordering::AcqRel) < allowed {
            Some(Decrement(&self.hedges))
        } else {
            self.hedges.fetch_sub(1, Ordering::AcqRel);
            None
        }
    }

    /// One active probe of `ep`: a TCP connect within the hard cap (its handshake measured by
    /// the kernel), then optionally `GET probe_path`, expecting `probe_expect_status`.
    async fn probe(self: Arc<Self>, ep: Arc<Endpoint>) {
        let r = connect::connect(ep.addr, self.spec.timeouts.connect, &*self.signals).await;
        let (ev, detail) = match r {
            Ok(c) => {
                let kernel = self.signals.connect_evidence(c.cookie);
                let (rtt, retx) = match &kernel {
                    Some(e) => (e.syn_rtt.unwrap_or(c.elapsed), e.syn_retransmits),
                    None => (c.elapsed, 0),
                };
                ep.health.observe_rtt(rtt, retx);
                let connected = match &kernel {
                    Some(e) => format!("probe: {e}"),
                    None => format!("probe: connected in {} us", c.elapsed.as_micros()),
                };
                match &self.spec.health.probe_path {
                    None => (
                        Evidence::ConnectOk {
                            syn_retransmits: retx,
                        },
                        connected,
                    ),
                    Some(path) => {
                        match http_probe(c.stream, ep.addr, path, self.spec.timeouts.response).await
                        {
                            Ok(status)
                                if status == self.spec.health.probe_expect_status && retx == 0 =>
                            {
                                (
                                    Evidence::ResponseOk,
                                    format!("{connected}; GET {path}: {status}"),
                                )
                            }
                            Ok(status) if status == self.spec.health.probe_expect_status => (
                                Evidence::ConnectOk {
                                    syn_retransmits: retx,
                                },
                                format!("{connected}; GET {path}: {status}"),
                            ),
                            Ok(status) => (
                                Evidence::Refused,
                                format!(
                                    "{connected}; GET {path}: {status}, expected {}",
                                    self.spec.health.probe_expect_status
                                ),
                            ),
                            Err(e) => (
                                Evidence::ResponseTimeout,
                                format!("{connected}; GET {path}: {e}"),
                            ),
                        }
                    }
                }
            }
            Err(e) => (
                evidence_of(&e).unwrap_or(Evidence::SynUnanswered),
                format!("probe: {e}"),
            ),
        };
        let may = self.may_eject();
        let t = ep.health.probe(ev, &self.spec, may, &|| detail.clone());
        self.log_transition(&ep, t, &|| detail.clone());
        ep.probe_running.store(false, Ordering::Release);
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

/// The health evidence a connect error carries.
fn evidence_of(e: &ProxyError) -> Option<Evidence> {
    match e {
        ProxyError::ConnectRefused { .. } => Some(Evidence::Refused),
        ProxyError::ConnectUnreachable { .. } => Some(Evidence::Unreachable),
        ProxyError::ConnectTimeout { .. } => Some(Evidence::SynUnanswered),
        _ => None,
    }
}

/// `GET path` on a fresh connection; the response's status code.
async fn http_probe(
    mut stream: tokio::net::TcpStream,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: gateway-probe\r\nConnection: close\r\n\r\n"
    );
    let io = async {
        stream.write_all(req.as_bytes()).await?;
        let mut buf = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            let r = stream.read(&mut buf[n..]).await?;
            if r == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed before a status line",
                ));
            }
            n += r;
        }
        std::str::from_utf8(&buf[9..12])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "not an HTTP/1.x status line",
                )
            })
    };
    match tokio::time::timeout(timeout, io).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no response within {} ms", timeout.as_millis()),
        )),
    }
}

/// Every 100 ms: advance each endpoint's health clock, and probe the endpoints that are
/// suspect or probing (at most one probe at a time per endpoint).
async fn probe_loop(cluster: Weak<Cluster>) {
    const TICK: Duration = Duration::from_millis(100);
    loop {
        tokio::time::sleep(TICK).await;
        let Some(c) = cluster.upgrade() else { return };
        for ep in c.set.load().endpoints.iter() {
            let (t, due) = ep.health.tick(&c.spec);
            c.log_transition(ep, t, &|| "ejection ran out".to_owned());
            if due && !ep.probe_running.swap(true, Ordering::AcqRel) {
                tokio::spawn(c.clone().probe(ep.clone()));
            }
        }
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
                    .unwrap_or_else(|| Arc::new(Endpoint::new(a, w, &c.spec, c.shards, &c.meter)))
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
