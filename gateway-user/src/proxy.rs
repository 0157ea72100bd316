//! `gateway run`: the HTTP reverse proxy.
//!
//! [`start`] builds the whole proxy from validated [`Settings`] and a [`SignalSource`], binds
//! its listeners and returns a [`GatewayHandle`] to reload or drain it; tests drive it the same
//! way `service::run` does.
//!
//! The request path only moves bytes and feeds `decide/`, which takes every decision:
//!
//! | module | owns |
//! |---|---|
//! | `server` | client listeners and connections, the drain; idle plain HTTP/1 connections parked outside hyper in each worker's lot (`server::park`, `server::lot`) |
//! | `admission` | `max_client_connections`, `max_accepts_per_second`, out of file descriptors: who is served, what the others get |
//! | `handshake` | the HTTPS listener's TLS handshake (SNI, ALPN, timeout, plain HTTP answered 400) |
//! | `request` | one request in order: route → the route's gates (`allow_clients`, `https_redirect`, `rate_limit`: `request::gate`) → pick → attempt (connect or reuse, send, await the head) → retry or not → respond |
//! | `tunnel` | an upgraded connection (WebSocket) after its `101`: bytes both ways, idle and total limits, the drain |
//! | `upstream` | clusters: endpoints and picking, health as kept per endpoint, checkout, the idle pool and shared HTTP/2 connections, connects and hedges, probes, DNS |
//! | `exchange` | a request's context (log record, budget guard, route meter, connection lease) |
//! | `request_body`, `response_body` | the two streamed bodies and their limits and timers |
//! | `shared` | what all requests share, and one config generation (routes, clusters) |
//! | `access_log`, `telemetry` | the log line and the metrics the request path feeds |
//! | `error`, `headers`, `io`, `router`, `request_id` | typed errors, header rewriting, write-stall guard, route matching and per-route policy, request IDs |
//! | `forwarded`, `rate_limit` | whose `X-Forwarded-*` headers are believed (`trusted_proxies`) and which client a request is from; a route's rate-limit buckets |
//! | `admin` | `/metrics`, `/status`, `/healthz`, `/readyz` and the status page |
//!
//! Files import downwards only: `error`, `headers`, `forwarded`, `rate_limit`, `io`, `router`,
//! `request_id`, `request_body`, `access_log`, `telemetry` → `upstream` → `shared` →
//! `exchange` → `response_body`, `tunnel` → `request` → `handshake` → `server`, `admin`.

mod access_log;
pub mod admin;
mod admission;
mod classify;
pub mod error;
mod exchange;
#[cfg(debug_assertions)]
pub(crate) mod failpoint;
mod forwarded;
mod handshake;
mod headers;
mod io;
mod listeners;
mod log_every;
mod memory;
mod proxy_protocol;
mod rate_limit;
mod request;
mod request_body;
mod request_id;
mod resets;
mod response_body;
mod router;
mod server;
mod shared;
mod spread;
mod start_error;
mod telemetry;
mod tunnel;
mod upstream;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};
use tracing::{error, info};

use self::{
    access_log::AccessLogger,
    listeners::Listeners,
    server::Phase,
    shared::{Fatal, Runtime, Shared},
    telemetry::Telemetry,
};
pub use self::{
    request::{X_GATEWAY_ATTEMPTS, X_GATEWAY_ENDPOINT, X_GATEWAY_ERROR},
    response_body::ResponseBody,
    start_error::StartError,
};
use crate::{
    config::Settings,
    service::handover::{Inherited, Offered, Role},
    signals::SignalSource,
};

/// Where client connections are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workers {
    /// As tasks on the caller's tokio runtime (tests, embedding).
    Current,
    /// This many worker threads, each with its own single-threaded runtime and its own
    /// `SO_REUSEPORT` socket per listen address.
    Threads(usize),
}

/// A running gateway.
pub struct GatewayHandle {
    listen: Vec<SocketAddr>,
    https: Vec<SocketAddr>,
    admin: Option<SocketAddr>,
    shared: Arc<Shared>,
    phase: watch::Sender<Phase>,
    /// Closed when every worker is done.
    workers_done: mpsc::Receiver<()>,
    /// A descriptor of every listening socket, for a binary upgrade; closed when draining
    /// starts, so that the sockets close as soon as the workers stop accepting.
    sockets: Vec<(Role, SocketAddr, std::net::TcpListener)>,
    /// One reload at a time: two built from the same generation could each retire a cluster
    /// the other kept, leaving it serving with its probes stopped.
    reloading: tokio::sync::Mutex<()>,
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Connections still open when the grace period ran out, closed by force.
    pub forced: bool,
    pub elapsed: Duration,
}

/// Settings a reload cannot change; they need a restart.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadReport {
    pub needs_restart: Vec<&'static str>,
}

/// Starts the gateway on the caller's runtime ([`Workers::Current`]).
pub async fn start(
    settings: Settings,
    signals: Arc<dyn SignalSource>,
) -> Result<GatewayHandle, StartError> {
    start_with(settings, signals, Workers::Current).await
}

/// Binds the listeners and starts serving. Must be called inside a tokio runtime, which also
/// runs the admin listener and the clusters' background tasks.
pub async fn start_with(
    settings: Settings,
    signals: Arc<dyn SignalSource>,
    workers: Workers,
) -> Result<GatewayHandle, StartError> {
    start_inheriting(settings, signals, workers, &mut Inherited::default()).await
}

/// As [`start_with`], serving on the listening sockets a previous process handed over
/// (binary upgrade, `service::handover`) where they match a configured address, and binding
/// the rest.
pub async fn start_inheriting(
    settings: Settings,
    signals: Arc<dyn SignalSource>,
    workers: Workers,
    inherited: &mut Inherited,
) -> Result<GatewayHandle, StartError> {
    let n = match workers {
        Workers::Current => 1,
        Workers::Threads(n) => n.max(1),
    };
    let Listeners {
        per_worker,
        listen,
        https,
        admin: admin_listener,
        sockets,
    } = listeners::open(&settings, n, inherited)?;
    let telemetry = Telemetry::new(&*signals, telemetry::longest_timeout(&settings));
    let log = AccessLogger::start(&settings.access_log, &telemetry.metrics)
        .map_err(|source| StartError::access_log(&settings.access_log.output, source))?;
    let body_budget = request_body::Budget::new(&settings.downstream, &telemetry.metrics);
    let runtime = Runtime::build(settings, None, &signals, n, &telemetry).await;
    let admission = admission::Admission::new(&telemetry.metrics);
    let gates = listen
        .iter()
        .chain(&https)
        .map(|a| Arc::new(admission::ListenerGate::new(*a, &admission)))
        .collect();
    let shared = Arc::new(Shared {
        admission,
        gates,
        runtime: ArcSwap::from_pointee(runtime),
        signals,
        log,
        draining: AtomicBool::new(false),
        forced: AtomicBool::new(false),
        keepalive_off: AtomicBool::new(false),
        workers: n,
        telemetry,
        body_budget,
        fatal: Fatal::default(),
        admin_handed_over: watch::channel(false).0,
    });
    tokio::spawn(refresh_metrics(Arc::downgrade(&shared)));
    tokio::spawn(roll_history(Arc::downgrade(&shared)));
    let (phase, phase_rx) = watch::channel(Phase::Run);
    let (done, workers_done) = mpsc::channel(1);
    let (spread, inboxes) = server::Spread::new(n, &shared.telemetry.metrics);
    for (i, (listeners, inbox)) in per_worker.into_iter().zip(inboxes).enumerate() {
        let worker = server::worker(
            listeners,
            shared.clone(),
            phase_rx.clone(),
            done.clone(),
            (i, spread.clone(), inbox),
        );
        spawn_worker(i, workers, worker, shared.clone())?;
    }
    announce(&listen, &https, n);
    let mut admin = None;
    if let Some(l) = admin_listener {
        admin = l.local_addr().ok();
        if let Some(a) = admin {
            info!(admin = %a, "admin listening");
        }
        tokio::spawn(admin::serve(l, shared.clone(), phase_rx.clone()));
    }
    Ok(GatewayHandle {
        listen,
        https,
        admin,
        shared,
        phase,
        workers_done,
        sockets,
        reloading: tokio::sync::Mutex::new(()),
    })
}

/// Logs the client listeners, once their workers run.
fn announce(listen: &[SocketAddr], https: &[SocketAddr], workers: usize) {
    for addr in listen {
        info!(listener = %addr, workers, "proxy listening");
    }
    for addr in https {
        info!(https_listener = %addr, workers, "proxy listening (HTTPS)");
    }
}

/// Runs worker `i` as a task on the caller's runtime, or on a thread of its own with its own
/// single-threaded runtime.
fn spawn_worker(
    i: usize,
    workers: Workers,
    worker: impl std::future::Future<Output = ()> + Send + 'static,
    shared: Arc<Shared>,
) -> Result<(), StartError> {
    match workers {
        Workers::Current => {
            tokio::spawn(worker);
        }
        Workers::Threads(_) => {
            std::thread::Builder::new()
                .name(format!("gateway-w{i}"))
                .spawn(move || {
                    upstream::set_worker_index(i);
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => {
                            let run = std::panic::AssertUnwindSafe(|| rt.block_on(worker));
                            if std::panic::catch_unwind(run).is_err() {
                                error!(worker = i, "a worker died of a panic: draining, to exit");
                                shared.fatal.set(format!("worker {i} died of a panic"));
                            }
                        }
                        Err(e) => error!(worker = i, error = %e, "cannot start a worker runtime"),
                    }
                })
                .map_err(|source| StartError::Worker { index: i, source })?;
        }
    }
    Ok(())
}

impl GatewayHandle {
    /// The bound client addresses (a configured port 0 shows the port chosen).
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.listen
    }

    /// The bound HTTPS addresses.
    pub fn https_addrs(&self) -> &[SocketAddr] {
        &self.https
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// Once a worker died ([`shared::Fatal`]): why.
    pub async fn failed(&self) -> String {
        self.shared.fatal.wait().await
    }

    /// Swaps in new settings. Requests in flight finish on the generation they started on;
    /// new requests take the new one at once.
    pub async fn reload(&self, settings: Settings) -> ReloadReport {
        let _one_at_a_time = self.reloading.lock().await;
        let current = self.shared.runtime.load_full();
        let mut report = ReloadReport::default();
        if settings.listen != current.settings.listen {
            report
                .needs_restart
                .push("router.listen / router.listener_port");
        }
        let https = |s: &Settings| s.https.as_ref().map(|h| h.listen.clone());
        if https(&settings) != https(&current.settings) {
            report
                .needs_restart
                .push("router.https_listen / router.https_port / router.https_enabled");
        }
        if settings.workers != current.settings.workers {
            report.needs_restart.push("router.workers");
        }
        if settings.admin != current.settings.admin {
            report.needs_restart.push("admin.listen");
        }
        if settings.access_log.output != current.settings.access_log.output {
            report.needs_restart.push("access_log.output");
        }
        // Attached (or not) at start, before the workers' sockets existed.
        if settings.observer != current.settings.observer {
            report
                .needs_restart
                .push("observer.mode / observer.cgroup / observer.max_connections");
        }
        if telemetry::longest_timeout(&settings) > self.shared.telemetry.buckets_top() {
            report.needs_restart.push(
                "a timeout beyond the histograms' highest bucket (their buckets reach the longest timeout configured at start)",
            );
        }
        self.shared.log.set_format(settings.access_log.format);
        self.shared.body_budget.limit.store(
            settings.downstream.request_buffering_memory_bytes,
            Ordering::Relaxed,
        );
        let next = Runtime::build(
            settings,
            Some(&current),
            &self.shared.signals,
            self.shared.workers,
            &self.shared.telemetry,
        )
        .await;
        let next = Arc::new(next);
        self.shared.runtime.store(next.clone());
        for old in &current.clusters {
            if !next.clusters.iter().any(|c| Arc::ptr_eq(c, old)) {
                old.retire();
            }
        }
        report
    }

    /// `/healthz` and `/readyz` answer 503 from now on, so that load balancers stop sending.
    pub fn mark_draining(&self) {
        self.shared.draining.store(true, Ordering::Relaxed);
    }

    /// Keeps accepting, but ends keep-alive: HTTP/1 responses carry `Connection: close` and
    /// HTTP/2 connections get GOAWAY, so clients reconnect (elsewhere, once deregistered).
    pub fn close_keepalive(&self) {
        self.shared.keepalive_off.store(true, Ordering::Relaxed);
        let _ = self.phase.send(Phase::Deregister);
    }

    /// A binary upgrade's new process serves: this one's admin listener stops accepting, so
    /// that every health check on the shared socket reaches the new process. Draining, this
    /// one would answer half of them `503` for as long as its drain took, and a load balancer
    /// could take the host out during an upgrade meant to drop nothing.
    pub fn hand_over_admin(&self) {
        self.shared.admin_handed_over.send_replace(true);
    }

    /// Reopens the access log file (after logrotate moved it away); SIGUSR1 and SIGHUP.
    pub fn reopen_logs(&self) {
        self.shared.log.reopen();
    }

    /// Every listening socket, to hand over to a new process (`service::handover`).
    pub fn offered_sockets(&self) -> Vec<Offered<'_>> {
        self.sockets
            .iter()
            .map(|(role, configured, socket)| Offered {
                role: *role,
                configured: *configured,
                socket,
            })
            .collect()
    }

    /// Stops accepting, lets connections finish their in-flight requests for up to `grace`,
    /// then closes whatever is left.
    pub async fn shutdown(mut self, grace: Duration) -> ShutdownReport {
        let start = tokio::time::Instant::now();
        self.shared.draining.store(true, Ordering::Relaxed);
        self.shared.keepalive_off.store(true, Ordering::Relaxed);
        let _ = self.phase.send(Phase::Drain);
        // With the workers' descriptors, the sockets close: new connections are refused at
        // once instead of waiting in a queue nobody accepts from (unless handed over).
        self.sockets.clear();
        let forced = tokio::time::timeout(grace, self.workers_done.recv())
            .await
            .is_err();
        if forced {
            // Before the workers hear of it, so that every response it cuts is counted as
            // such. Not after a clean drain: a client that went away as it ended is not the
            // gateway's doing.
            self.shared.forced.store(true, Ordering::Relaxed);
            let _ = self.phase.send(Phase::Force);
            let _ = tokio::time::timeout(Duration::from_secs(1), self.workers_done.recv()).await;
        }
        let _ = self.phase.send(Phase::Force);
        // The lines of the requests that ended during the drain, before the process ends.
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || shared.log.flush(ACCESS_LOG_EXIT_FLUSH)).await;
        ShutdownReport {
            forced,
            elapsed: start.elapsed(),
        }
    }
}

/// At exit, how long the access log's queued lines may take to be written.
const ACCESS_LOG_EXIT_FLUSH: Duration = Duration::from_secs(1);

/// How often the metrics that are read rather than counted are refreshed (lost kernel events,
/// connect deadlines, health states, latency estimates).
const METRICS_REFRESH: Duration = memory::RELEASE_CHECK;

async fn refresh_metrics(shared: std::sync::Weak<Shared>) {
    let mut every = tokio::time::interval(METRICS_REFRESH);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(s) = shared.upgrade() else { return };
        memory::release_after_burst(&s.admission);
        s.telemetry.observer_mode(&*s.signals);
        if let Some(lost) = s.signals.events_lost() {
            s.telemetry.events_lost(lost);
        }
        if let Some(anomalies) = s.signals.kernel_anomalies() {
            s.telemetry.kernel_anomalies(anomalies);
        }
        if let Some(n) = s.signals.anomaly_logs_suppressed() {
            s.telemetry.anomaly_logs_suppressed(n);
        }
        // Each endpoint's deadline and state, which also puts back a state that a replaced
        // endpoint's last words zeroed.
        for c in s.runtime.load().clusters.iter() {
            let (held, pending) = c.connection_use();
            let max = c.spec.limits.max_connections;
            c.meter.connections.set(held, max, pending);
            for ep in c.endpoints() {
                ep.meter.deadline(ep.health.deadline(&c.spec).value);
                ep.meter.state(ep.state(&c.spec));
                let now = tokio::time::Instant::now();
                ep.meter
                    .latency(ep.latency.estimate(now, c.spec.latency.decay));
                ep.meter.h2_requests_per_connection(ep.mux.learned_limit());
            }
        }
    }
}

/// Closes each endpoint's history second (`upstream::history`) just after every wall-clock
/// second, so that a slot holds that second's requests.
async fn roll_history(shared: std::sync::Weak<Shared>) {
    /// After the second turned, so that a slot is not closed a little early.
    const AFTER: Duration = Duration::from_millis(10);
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let into = Duration::from_nanos(u64::from(now.subsec_nanos()));
        tokio::time::sleep(Duration::from_secs(1) - into + AFTER).await;
        let Some(s) = shared.upgrade() else { return };
        let second = now.as_secs();
        for c in s.runtime.load().clusters.iter() {
            for ep in c.endpoints() {
                ep.health.history.roll(second);
            }
        }
    }
}
