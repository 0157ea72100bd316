//! `gateway run`: the HTTP reverse proxy.
//!
//! [`start`] builds the whole proxy from validated [`Settings`] and a [`SignalSource`], binds
//! its listeners and returns a [`GatewayHandle`] to reload or drain it; tests drive it the same
//! way `cli_run` does. Requests take the current [`Runtime`] (routes and clusters) from an
//! `ArcSwap` once, at arrival, so a reload never disturbs a request in flight and never makes
//! a new one wait.
//!
//! Submodules: `server` (client connections, drain), `forward` (one request: routing,
//! attempts, retries, error responses), `cluster` / `pool` / `balancer` / `health` (upstream
//! endpoints), `connect` (cookie-tagged connects), `body` (streaming), `headers`,
//! `access_log`, `telemetry` (metrics fed from the request path), `admin` (`/metrics`,
//! `/status`, `/healthz`, `/readyz` and the status page).

mod access_log;
mod admin;
mod balancer;
mod body;
mod cluster;
mod connect;
mod endpoint_health;
pub mod error;
mod forward;
mod headers;
mod io;
mod pool;
mod router;
mod server;
mod telemetry;

use std::{
    net::SocketAddr,
    path::Path,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use hyper_util::{rt::TokioExecutor, server::conn::auto};
use thiserror::Error;
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};
use tracing::{error, info, warn};

use self::{
    access_log::AccessLogger,
    cluster::Cluster,
    router::Router,
    server::{Phase, http_builder},
    telemetry::{RouteMeter, Telemetry},
};
pub use self::{
    body::ResponseBody,
    forward::{X_GATEWAY_ATTEMPTS, X_GATEWAY_ENDPOINT, X_GATEWAY_ERROR},
};
use crate::{
    config::{self, Settings},
    signals::{SignalSource, UserspaceOnly},
};

/// Listen backlog for client and admin sockets.
const LISTEN_BACKLOG: i32 = 1024;

/// What every request and connection shares.
pub(crate) struct Shared {
    pub runtime: ArcSwap<Runtime>,
    pub signals: Arc<dyn SignalSource>,
    pub log: AccessLogger,
    pub draining: AtomicBool,
    /// Worker count, i.e. idle-pool shards per endpoint.
    pub workers: usize,
    pub telemetry: Telemetry,
}

/// The routes and clusters of one config generation.
pub(crate) struct Runtime {
    pub settings: Settings,
    pub router: Router,
    pub clusters: Vec<Arc<Cluster>>,
    /// By the route's position in the config ([`router::CompiledRoute::index`]).
    pub route_meters: Vec<Arc<RouteMeter>>,
    pub http: Arc<auto::Builder<TokioExecutor>>,
}

impl Runtime {
    /// Builds a generation, keeping the running clusters (their pools and health) whose
    /// settings did not change.
    async fn build(
        settings: Settings,
        previous: Option<&Runtime>,
        signals: &Arc<dyn SignalSource>,
        workers: usize,
        telemetry: &Telemetry,
    ) -> Runtime {
        let mut clusters = Vec::with_capacity(settings.clusters.len());
        for spec in settings.clusters.values() {
            let kept = previous.and_then(|p| p.clusters.iter().find(|c| c.spec == *spec));
            clusters.push(match kept {
                Some(c) => c.clone(),
                None => {
                    Cluster::start(
                        spec.clone(),
                        signals.clone(),
                        workers,
                        telemetry.cluster(&spec.name),
                    )
                    .await
                }
            });
        }
        let router = Router::new(&settings.routes, |name| {
            clusters.iter().position(|c| &*c.name == name)
        });
        let route_meters = settings
            .routes
            .iter()
            .map(|r| Arc::new(telemetry.route(&r.name, &r.cluster)))
            .collect();
        Runtime {
            http: Arc::new(http_builder(&settings.downstream)),
            route_meters,
            router,
            clusters,
            settings,
        }
    }
}

/// Where client connections are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workers {
    /// As tasks on the caller's tokio runtime (tests, embedding).
    Current,
    /// This many worker threads, each with its own single-threaded runtime and its own
    /// `SO_REUSEPORT` socket per listen address.
    Threads(usize),
}

#[derive(Debug, Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the access log {path}: {source}")]
    AccessLog {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start worker thread {index}: {source}")]
    Worker {
        index: usize,
        #[source]
        source: std::io::Error,
    },
}

/// A running gateway.
pub struct GatewayHandle {
    listen: Vec<SocketAddr>,
    admin: Option<SocketAddr>,
    shared: Arc<Shared>,
    phase: watch::Sender<Phase>,
    /// Closed when every worker is done.
    workers_done: mpsc::Receiver<()>,
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

fn bind(addr: SocketAddr, reuse_port: bool) -> Result<std::net::TcpListener, StartError> {
    let make = || -> std::io::Result<std::net::TcpListener> {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        s.set_reuse_address(true)?;
        if reuse_port {
            s.set_reuse_port(true)?;
        }
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(LISTEN_BACKLOG)?;
        Ok(s.into())
    };
    make().map_err(|source| StartError::Bind { addr, source })
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
    let n = match workers {
        Workers::Current => 1,
        Workers::Threads(n) => n.max(1),
    };
    let mut per_worker: Vec<Vec<std::net::TcpListener>> = (0..n).map(|_| Vec::new()).collect();
    let mut listen = Vec::new();
    for addr in &settings.listen {
        let first = bind(*addr, n > 1)?;
        let actual = first.local_addr().map_err(|source| StartError::Bind {
            addr: *addr,
            source,
        })?;
        per_worker[0].push(first);
        for w in per_worker.iter_mut().skip(1) {
            w.push(bind(actual, true)?);
        }
        listen.push(actual);
    }
    let admin_listener = match settings.admin {
        Some(a) => Some(bind(a, false).and_then(|l| {
            TcpListener::from_std(l).map_err(|source| StartError::Bind { addr: a, source })
        })?),
        None => None,
    };
    let log =
        AccessLogger::start(&settings.access_log).map_err(|source| StartError::AccessLog {
            path: format!("{:?}", settings.access_log.output),
            source,
        })?;
    let telemetry = Telemetry::new(&*signals);
    let runtime = Runtime::build(settings, None, &signals, n, &telemetry).await;
    let shared = Arc::new(Shared {
        runtime: ArcSwap::from_pointee(runtime),
        signals,
        log,
        draining: AtomicBool::new(false),
        workers: n,
        telemetry,
    });
    tokio::spawn(refresh_metrics(Arc::downgrade(&shared)));
    let (phase, phase_rx) = watch::channel(Phase::Run);
    let (done, workers_done) = mpsc::channel(1);
    for (i, listeners) in per_worker.into_iter().enumerate() {
        let (shared, phase_rx, done) = (shared.clone(), phase_rx.clone(), done.clone());
        match workers {
            Workers::Current => {
                tokio::spawn(server::worker(listeners, shared, phase_rx, done));
            }
            Workers::Threads(_) => {
                std::thread::Builder::new()
                    .name(format!("gateway-w{i}"))
                    .spawn(move || {
                        server::set_worker_index(i);
                        match tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                        {
                            Ok(rt) => {
                                rt.block_on(server::worker(listeners, shared, phase_rx, done))
                            }
                            Err(e) => {
                                error!(worker = i, error = %e, "cannot start a worker runtime")
                            }
                        }
                    })
                    .map_err(|source| StartError::Worker { index: i, source })?;
            }
        }
    }
    for addr in &listen {
        info!(listener = %addr, workers = n, "proxy listening");
    }
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
        admin,
        shared,
        phase,
        workers_done,
    })
}

impl GatewayHandle {
    /// The bound client addresses (a configured port 0 shows the port chosen).
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.listen
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// Swaps in new settings. Requests in flight finish on the generation they started on;
    /// new requests take the new one at once.
    pub async fn reload(&self, settings: Settings) -> ReloadReport {
        let current = self.shared.runtime.load_full();
        let mut report = ReloadReport::default();
        if settings.listen != current.settings.listen {
            report
                .needs_restart
                .push("router.listen / router.listener_port");
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
        self.shared.log.set_format(settings.access_log.format);
        let next = Runtime::build(
            settings,
            Some(&current),
            &self.shared.signals,
            self.shared.workers,
            &self.shared.telemetry,
        )
        .await;
        self.shared.runtime.store(Arc::new(next));
        report
    }

    /// Stops accepting, lets connections finish their in-flight requests for up to `grace`,
    /// then closes whatever is left.
    pub async fn shutdown(mut self, grace: Duration) -> ShutdownReport {
        let start = tokio::time::Instant::now();
        self.shared.draining.store(true, Ordering::Relaxed);
        let _ = self.phase.send(Phase::Drain);
        let forced = tokio::time::timeout(grace, self.workers_done.recv())
            .await
            .is_err();
        if forced {
            let _ = self.phase.send(Phase::Force);
            let _ = tokio::time::timeout(Duration::from_secs(1), self.workers_done.recv()).await;
        }
        let _ = self.phase.send(Phase::Force);
        ShutdownReport {
            forced,
            elapsed: start.elapsed(),
        }
    }
}

/// How often the metrics that are read rather than counted are refreshed (lost kernel events,
/// connect deadlines, health states).
const METRICS_REFRESH: Duration = Duration::from_secs(1);

async fn refresh_metrics(shared: std::sync::Weak<Shared>) {
    let mut every = tokio::time::interval(METRICS_REFRESH);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(s) = shared.upgrade() else { return };
        let rt = s.runtime.load();
        s.telemetry.refresh(&*s.signals, &rt.clusters);
    }
}

/// `gateway run --config FILE`.
pub fn cli_run(path: &Path) -> anyhow::Result<ExitCode> {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: log files and pipes get plain `key=value` text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
    let loaded = config::load(path)?;
    for w in &loaded.warnings {
        warn!("config: {w}");
    }
    // The main thread's runtime handles signals, reloads, the admin listener and background
    // tasks; client traffic runs on the worker threads.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(run(path, loaded.settings))?;
    Ok(ExitCode::SUCCESS)
}

/// Moves the gateway into its own cgroup and attaches the kernel observer there, per
/// `[observer] mode`. In `auto` mode a failure is not fatal: the gateway runs on userspace
/// timing and says why, in this log line, `/healthz`, `/status` and
/// `gateway_observer_kernel_signals`.
fn attach_observer(
    cfg: &config::Observer,
) -> anyhow::Result<(
    Arc<dyn SignalSource>,
    Option<crate::observer::cgroup::SelfCgroup>,
)> {
    use crate::{
        config::ObserverMode,
        observer::{KernelObserver, ObserverOptions, cgroup::SelfCgroup, signals::KernelSignals},
    };
    if cfg.mode == ObserverMode::Off {
        let s = UserspaceOnly::new("observer = \"off\" in the config");
        warn!(signals = %s.mode(), "kernel observer off: connect and response decisions use userspace timing only");
        return Ok((Arc::new(s), None));
    }
    let attached = (|| -> anyhow::Result<_> {
        let cgroup = SelfCgroup::enter(&cfg.cgroup)?;
        for dead in crate::observer::stale::remove_dead_siblings(cgroup.path()) {
            info!(cgroup = %dead.display(), "removed the cgroup of a gateway that died without cleaning up");
        }
        let observer = KernelObserver::attach(&ObserverOptions {
            cgroup: Some(cgroup.path().to_path_buf()),
            ..ObserverOptions::default()
        })?;
        Ok((KernelSignals::start(observer), cgroup))
    })();
    match attached {
        Ok((signals, cgroup)) => {
            info!(cgroup = %cgroup.path().display(), "kernel observer attached: health, connect deadlines, hedging and retries use kernel evidence");
            Ok((signals, Some(cgroup)))
        }
        Err(e) if cfg.mode == ObserverMode::Kernel => {
            Err(e.context("[observer] mode = \"kernel\" and the kernel observer could not attach"))
        }
        Err(e) => {
            let s = UserspaceOnly::new(format!("{e:#}"));
            warn!(signals = %s.mode(), "kernel observer unavailable: connect and response decisions use userspace timing only");
            Ok((Arc::new(s), None))
        }
    }
}

async fn run(path: &Path, settings: Settings) -> anyhow::Result<()> {
    // Handlers first: SIGHUP's default action would kill a gateway that just said it listens.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    // Before any upstream socket exists: a socket's cgroup is fixed when it is created.
    let (signals, _cgroup) = attach_observer(&settings.observer)?;
    let mut grace = settings.shutdown_grace;
    let workers = settings.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let handle = start_with(settings, signals, Workers::Threads(workers)).await?;
    let why = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => match config::load(path) {
                Ok(loaded) => {
                    for w in &loaded.warnings {
                        warn!("config: {w}");
                    }
                    grace = loaded.settings.shutdown_grace;
                    let report = handle.reload(loaded.settings).await;
                    for what in report.needs_restart {
                        warn!(setting = what, "changed on reload; takes effect after a restart");
                    }
                    info!(config = %path.display(), "config reloaded");
                }
                Err(e) => error!("reload refused, keeping the running config: {e}"),
            },
        }
    };
    info!(
        signal = why,
        grace_ms = grace.as_millis() as u64,
        "draining"
    );
    let report = handle.shutdown(grace).await;
    if report.forced {
        warn!(
            elapsed_ms = report.elapsed.as_millis() as u64,
            "grace period over; closed the remaining connections"
        );
    } else {
        info!(
            elapsed_ms = report.elapsed.as_millis() as u64,
            "drained; exiting"
        );
    }
    Ok(())
}
