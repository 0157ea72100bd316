//! `gateway run` as a host's service manager and load balancer expect it: the process
//! lifecycle around the proxy.
//!
//! | signal | what happens |
//! |---|---|
//! | SIGTERM, SIGINT | `/healthz` and `/readyz` turn 503 at once; for `drain_delay_ms` new connections are still accepted and served (HTTP/1 responses say `Connection: close`, HTTP/2 gets GOAWAY) while load balancers deregister the host; then listening stops and in-flight requests get `shutdown_grace_ms` to finish. A second SIGTERM/SIGINT cuts the delay short. |
//! | SIGHUP | reloads the config (a bad one is refused and the running one kept) and reopens the access log |
//! | SIGUSR1 | reopens the access log (logrotate, nginx's convention) |
//! | SIGUSR2 | binary upgrade: starts the binary at this executable's path with the listening sockets ([`handover`]); once it serves, this process drains and exits |
//!
//! Under systemd (`Type=notify`) it reports `READY=1`, `RELOADING=1`, `STOPPING=1` and
//! `STATUS=`, and pings the watchdog when `WatchdogSec=` is set ([`notify`]). Before any upstream
//! socket exists it moves into its observer cgroup, a child of its own
//! (`observer::cgroup`).

pub mod handover;
pub mod nofile;
pub mod notify;
mod reload;

pub use self::reload::cli_reload;

use std::{path::Path, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{error, info, warn};

use self::{
    handover::{Inherited, Relaunch, Successor},
    notify::Notifier,
};
use crate::{
    config::{self, ObserverMode, Settings},
    observer::cgroup::SelfCgroup,
    proxy::{self, GatewayHandle, Workers},
    signals::{SignalSource, UserspaceOnly},
};

/// After a handover, how long the old process still serves (HTTP/1 responses with
/// `Connection: close`) before it stops accepting: long enough that a keep-alive client in
/// the middle of a stream of requests gets a `Connection: close` rather than a closed idle
/// connection racing its next request.
pub const HANDOVER_LINGER: Duration = Duration::from_millis(1_000);

/// `gateway run --config FILE`.
pub fn cli_run(path: &Path) -> anyhow::Result<ExitCode> {
    // The config first: it says how to log (a refused config is printed by main).
    let loaded = config::load(path)?;
    let log = &loaded.settings.log;
    // Dropped last, on every way out: the lines still queued are written before main prints
    // an error, or the process exits.
    let mut log_writer = crate::logging::init_queued(
        log.format,
        log.level.as_deref(),
        config::model::DEFAULT_LOG_LEVEL,
    )?;
    if log_writer.is_some() {
        crate::logging::panic::install();
    }
    if let Some(level) = crate::logging::current() {
        info!(level = %level.directives, from = level.source.name(), "logging");
    }
    for w in &loaded.warnings {
        warn!("config: {w}");
    }
    nofile::raise_at_start(&loaded.settings, workers(&loaded.settings));
    // While this process has one thread: both change process-wide state.
    let inherited = Inherited::from_env().context("taking over the listening sockets")?;
    if loaded.settings.observer.mode != ObserverMode::Off
        && let Err(e) = crate::observer::preflight::ensure_cgroup2()
    {
        if loaded.settings.observer.mode == ObserverMode::Kernel {
            return Err(e).context("[observer] mode = \"kernel\"");
        }
        warn!("{e}");
    }
    // The log's writer thread, now that the process may have more than one.
    if let Some(w) = &mut log_writer {
        w.start_writer()
            .context("starting the log's writer thread")?;
    }
    let relaunch = Relaunch::current()
        .inspect_err(
            |e| warn!(error = %e, "cannot tell this executable's path; SIGUSR2 upgrades are off"),
        )
        .ok();
    // The main thread's runtime handles signals, reloads, the admin listener and background
    // tasks; client traffic runs on the worker threads.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let result = rt.block_on(run(path, loaded.settings, inherited, relaunch));
    // Dropped as is, the runtime would wait for its blocking threads, among them a DNS lookup
    // still waiting on a server that does not answer (glibc's resolver: up to `timeout ×
    // attempts` per server), past the drain and past systemd's stop timeout.
    rt.shutdown_timeout(EXIT_BLOCKING_GRACE);
    result?;
    Ok(ExitCode::SUCCESS)
}

/// `[router] workers`, else one per CPU.
fn workers(settings: &Settings) -> usize {
    settings.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    })
}

/// How long the exit waits for the main runtime's blocking threads (DNS lookups).
const EXIT_BLOCKING_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Moves the gateway into its observer cgroup and attaches the kernel observer there, per
/// `[observer] mode`. In `auto` mode a failure is not fatal: the gateway runs on userspace
/// timing and says why, in this log line, `/healthz`, `/status` and
/// `gateway_observer_kernel_signals`.
fn attach_observer(
    cfg: &config::Observer,
) -> anyhow::Result<(Arc<dyn SignalSource>, Option<SelfCgroup>)> {
    use crate::{
        observer::{KernelObserver, ObserverOptions},
        signals::kernel::KernelSignals,
    };
    if cfg.mode == ObserverMode::Off {
        let s = UserspaceOnly::new("observer = \"off\" in the config");
        warn!(signals = %s.mode(), "kernel observer off: connect and response decisions use userspace timing only");
        return Ok((Arc::new(s), None));
    }
    let attached = (|| -> anyhow::Result<_> {
        let cgroup = SelfCgroup::enter(&cfg.cgroup)?;
        let observer = KernelObserver::attach(&ObserverOptions {
            cgroup: Some(cgroup.path().to_path_buf()),
            max_connections: cfg.max_connections,
            // The proxy reads records and connections' signals, never per-destination totals.
            destination_table: false,
            ..ObserverOptions::default()
        })?;
        let hook = observer.connect_exit_hook();
        Ok((KernelSignals::start(observer), cgroup, hook))
    })();
    match attached {
        Ok((signals, cgroup, hook)) => {
            info!(cgroup = %cgroup.path().display(), connect_exit = hook, "kernel observer attached: health, connect deadlines, hedging and retries use kernel evidence");
            Ok((signals, Some(cgroup)))
        }
        Err(e) if cfg.mode == ObserverMode::Kernel => {
            Err(e.context("[observer] mode = \"kernel\" and the kernel observer could not attach"))
        }
        Err(e) => {
            let s = UserspaceOnly::new(crate::logging::error_text(&e));
            warn!(signals = %s.mode(), "kernel observer unavailable: connect and response decisions use userspace timing only");
            Ok((Arc::new(s), None))
        }
    }
}

/// The signals `gateway run` handles. Installed before anything else: the default action of
/// SIGHUP, SIGUSR1 and SIGUSR2 is to kill the process.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
    usr1: Signal,
    usr2: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }
}

/// A reloaded `[log]`: its level applies at once (unless `RUST_LOG` set it, or the admin API
/// changed it since: a reload brings the config's back); its format needs a restart.
fn apply_log_settings(running: &crate::logging::LogFormat, log: &config::Log) {
    if let Some(now) = crate::logging::apply_config(log.level.as_deref()) {
        info!(level = %now.directives, from = now.source.name(), "logging");
    }
    if log.format != *running {
        warn!(
            setting = "log.format",
            "changed on reload; takes effect after a restart"
        );
    }
}

/// Why the serving loop ended.
enum Exit {
    Signal(&'static str),
    /// A worker died (`proxy::shared::Fatal`).
    Failed(String),
    HandedOver {
        pid: u32,
    },
}

/// The one-line state shown by `systemctl status`.
fn serving_status(handle: &GatewayHandle, signals: &dyn SignalSource, what: &str) -> String {
    let listen: Vec<String> = handle
        .listen_addrs()
        .iter()
        .map(ToString::to_string)
        .collect();
    format!(
        "{what}: listening on {}; kernel signals: {}",
        listen.join(" "),
        signals.mode()
    )
}

async fn run(
    path: &Path,
    settings: Settings,
    mut inherited: Inherited,
    relaunch: Option<Relaunch>,
) -> anyhow::Result<()> {
    let mut sig = Signals::install()?;
    let notifier = Notifier::from_env();
    // Before any upstream socket exists: a socket's cgroup is fixed when it is created.
    let (signals, _cgroup) = attach_observer(&settings.observer)?;
    let stop = Stop {
        grace: settings.shutdown_grace,
        drain_delay: settings.drain_delay,
    };
    let log_format = settings.log.format;
    let workers = workers(&settings);
    let successor_of_another = handover::is_successor();
    #[cfg(debug_assertions)]
    crate::proxy::failpoint::delay_start().await;
    let handle = proxy::start_inheriting(
        settings,
        signals.clone(),
        Workers::Threads(workers),
        &mut inherited,
    )
    .await?;
    notifier.ready(
        &serving_status(&handle, &*signals, "serving"),
        successor_of_another,
    );
    inherited
        .announce_ready()
        .context("telling the previous process this one serves")?;
    if let Some(every) = notifier.watchdog_interval() {
        tokio::spawn(notify::watchdog(notifier.clone(), every));
    }

    let mut service = Service {
        path,
        handle,
        signals,
        notifier,
        log_format,
        stop,
        relaunch,
        successor: None,
    };
    let exit = loop {
        tokio::select! {
            _ = sig.term.recv() => break Exit::Signal("SIGTERM"),
            _ = sig.int.recv() => break Exit::Signal("SIGINT"),
            _ = sig.hup.recv() => service.reload().await,
            _ = sig.usr1.recv() => {
                info!("SIGUSR1: reopening the access log");
                service.handle.reopen_logs();
            }
            _ = sig.usr2.recv() => service.upgrade(),
            reason = service.handle.failed() => break Exit::Failed(reason),
            outcome = async { service.successor.as_mut().expect("guarded").wait_ready().await }, if service.successor.is_some() => {
                if let Some(exit) = service.upgraded(outcome) {
                    break exit;
                }
            }
        }
    };
    let failed = match &exit {
        Exit::Failed(reason) => Some(reason.clone()),
        _ => None,
    };
    service.stop(exit, &mut sig).await;
    match failed {
        // Non-zero, for the service manager to restart it (`Restart=on-failure`).
        Some(reason) => Err(anyhow::anyhow!("{reason}; drained and exited")),
        None => Ok(()),
    }
}

/// How the process stops; a reload can change both.
#[derive(Clone, Copy)]
struct Stop {
    grace: Duration,
    drain_delay: Duration,
}

/// The running service, as the signals act on it.
struct Service<'a> {
    path: &'a Path,
    handle: GatewayHandle,
    signals: Arc<dyn SignalSource>,
    notifier: Notifier,
    log_format: crate::logging::LogFormat,
    stop: Stop,
    relaunch: Option<Relaunch>,
    /// The new binary a SIGUSR2 started, until it serves or fails.
    successor: Option<Successor>,
}

impl Service<'_> {
    /// SIGHUP: the config file again (a bad one is refused and the running one kept), and
    /// the access log reopened.
    async fn reload(&mut self) {
        self.notifier.reloading();
        if let Some(s) = &mut self.successor {
            s.reload_when_serving();
        }
        match config::load(self.path) {
            Ok(loaded) => {
                for w in &loaded.warnings {
                    warn!("config: {w}");
                }
                nofile::warn_shortfall(&loaded.settings, workers(&loaded.settings));
                self.stop = Stop {
                    grace: loaded.settings.shutdown_grace,
                    drain_delay: loaded.settings.drain_delay,
                };
                apply_log_settings(&self.log_format, &loaded.settings.log);
                let report = self.handle.reload(loaded.settings).await;
                for what in report.needs_restart {
                    warn!(
                        setting = what,
                        "changed on reload; takes effect after a restart"
                    );
                }
                info!(config = %self.path.display(), "config reloaded");
            }
            Err(e) => error!("reload refused, keeping the running config: {e}"),
        }
        self.handle.reopen_logs();
        self.notifier.ready(
            &serving_status(&self.handle, &*self.signals, "serving (reloaded)"),
            false,
        );
    }

    /// SIGUSR2: starts the new binary with the listening sockets, unless one is already
    /// starting.
    fn upgrade(&mut self) {
        match (&self.successor, &self.relaunch) {
            (Some(s), _) => warn!(
                pid = s.pid(),
                "SIGUSR2 ignored: an upgrade is already under way"
            ),
            (None, None) => error!("SIGUSR2 ignored: this executable's path is unknown"),
            (None, Some(relaunch)) => {
                match handover::spawn(relaunch, &self.handle.offered_sockets()) {
                    Ok(s) => {
                        info!(pid = s.pid(), exe = %relaunch.exe.display(), "SIGUSR2: started the new binary with the listening sockets; waiting until it serves");
                        self.notifier
                            .status(&format!("upgrading: started pid {}", s.pid().unwrap_or(0)));
                        self.successor = Some(s);
                    }
                    Err(e) => error!("SIGUSR2: upgrade failed, still serving: {e}"),
                }
            }
        }
    }

    /// The new binary serves (this process hands over) or failed (this one serves on).
    fn upgraded(&mut self, outcome: handover::Outcome) -> Option<Exit> {
        match outcome {
            handover::Outcome::Ready { pid } => Some(Exit::HandedOver { pid }),
            handover::Outcome::Failed(why) => {
                error!("upgrade failed, still serving: {why}");
                self.notifier.status(&serving_status(
                    &self.handle,
                    &*self.signals,
                    "serving (upgrade failed)",
                ));
                self.successor = None;
                None
            }
        }
    }

    /// Drains and stops: after a signal, the drain delay (health 503, still accepting; a
    /// second signal cuts it short); after a handover, the linger; then in-flight requests
    /// get the grace period.
    async fn stop(mut self, exit: Exit, sig: &mut Signals) {
        let Stop { grace, drain_delay } = self.stop;
        // Stopped while a new binary was starting: it must not take over a service that is
        // being stopped.
        if let (Some(s), false) = (
            self.successor.take(),
            matches!(exit, Exit::HandedOver { .. }),
        ) {
            s.stop_unless_serving().await;
        }
        let (handle, notifier) = (&self.handle, &self.notifier);
        match exit {
            Exit::Signal(_) | Exit::Failed(_) => {
                let why = match &exit {
                    Exit::Signal(why) => why,
                    _ => "a worker died",
                };
                notifier.stopping(
                    &format!(
                        "draining ({why}): /healthz 503, accepting for {} ms more",
                        drain_delay.as_millis()
                    ),
                    drain_delay + grace + Duration::from_secs(5),
                );
                handle.mark_draining();
                info!(
                    signal = why,
                    drain_delay_ms = drain_delay.as_millis() as u64,
                    grace_ms = grace.as_millis() as u64,
                    "draining"
                );
                if !drain_delay.is_zero() {
                    handle.close_keepalive();
                    let cut = tokio::select! {
                        _ = tokio::time::sleep(drain_delay) => None,
                        _ = sig.term.recv() => Some("SIGTERM"),
                        _ = sig.int.recv() => Some("SIGINT"),
                    };
                    match cut {
                        Some(s) => info!(signal = s, "drain delay cut short"),
                        None => info!(
                            drain_delay_ms = drain_delay.as_millis() as u64,
                            "drain delay over"
                        ),
                    }
                }
                notifier.status(&format!(
                    "draining: stopped listening; in-flight requests have up to {} ms",
                    grace.as_millis()
                ));
                info!("stopped listening");
            }
            Exit::HandedOver { pid } => {
                handle.hand_over_admin();
                // The new process is the unit's main process now (it said MAINPID=): this one
                // must not send STOPPING=1, which would stop the unit.
                info!(
                    pid,
                    linger_ms = HANDOVER_LINGER.as_millis() as u64,
                    grace_ms = grace.as_millis() as u64,
                    "handed over to the new process; draining"
                );
                handle.close_keepalive();
                tokio::time::sleep(HANDOVER_LINGER).await;
            }
        }
        let report = self.handle.shutdown(grace).await;
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
    }
}
