//! `gateway observe`: the host-wide connect observer command, and its view of the observer
//! stream (`crate::observer::stream`): every connect, joined with the application's SO_ERROR
//! read and released once, shown as a live table ([`table`]), as JSON lines, and as Prometheus
//! metrics ([`metrics`]).

pub mod attribution;
pub mod metrics;
mod output;
pub mod table;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Args;
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};

use crate::observer::{
    KernelObserver, ObserverOptions,
    records::ConnectRecord,
    stream::{
        DEFAULT_JOIN_WINDOW, DEFAULT_MAX_REMEMBERED, DRAIN_INTERVAL, Drained, ObserverStream,
        StreamOptions,
    },
};

/// How often the table is redrawn.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(1);

#[derive(Args, Debug, Clone)]
pub struct ObserveArgs {
    /// cgroup v2 to observe: a path, absolute or relative to the v2 mount. Default: the v2
    /// root, i.e. every process on the host.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Print one JSON object per connect outcome per line on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Print nothing on stdout (no table, no JSON): an exporter for `--metrics`, e.g. under
    /// systemd (gateway-observe.service), which gets READY=1 once the observer is attached.
    #[arg(long, conflicts_with = "json")]
    pub quiet: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9100).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Stop after this many seconds (default: until SIGINT/SIGTERM).
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<f64>,
    /// Rows shown in the table.
    #[arg(long, default_value_t = 25)]
    pub top: usize,
    /// Capacity of the kernel's per-destination table (LRU).
    #[arg(long, default_value_t = gateway_common::names::DEFAULT_MAX_DESTINATIONS)]
    pub max_destinations: u32,
    /// Keep no per-destination table in the kernel (with --json or --quiet, which do not show
    /// it): no lookup and count at every connect, and none of its memory (--max-destinations
    /// entries). The records, and every metric counted from them, are the same;
    /// gateway_observer_destinations_tracked and _evicted_total are not served.
    #[arg(long)]
    pub no_destination_table: bool,
    /// Slots of the kernel's table of connect records, rounded up to a power of two (128 bytes
    /// each, preallocated). Too few for the connects in flight, and one loses its record
    /// (counted as `slot_reused`). Also the capacity of the table of established connections'
    /// signals (LRU).
    #[arg(long, default_value_t = gateway_common::names::DEFAULT_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..=i64::from(gateway_common::names::MAX_CONNECTIONS_LIMIT)))]
    pub max_connections: u32,
    /// Distinct `dst` label values in metrics before the rest are counted as "other".
    #[arg(long, default_value_t = 1000)]
    pub metrics_max_destinations: usize,
    /// Size of the kernel's ring buffer of connect records, in KiB (a power of two, at least
    /// 4). Records that do not fit between two drains are counted as lost and reported.
    #[arg(long, value_name = "KIB", default_value_t = gateway_common::names::EVENTS_RING_BYTES / 1024, value_parser = parse_ring_kib)]
    pub ring_buffer_kib: u32,
    /// Also count connects by the service that made them, in
    /// `gateway_connect_attempts_by_service_total{service, outcome}`: the `service` label is
    /// the cgroup path, the systemd unit, the container id or the pod UID (`none` where the
    /// cgroup's path has none).
    #[arg(long, value_enum, value_name = "ATTRIBUTE")]
    pub metrics_by: Option<attribution::ServiceLabel>,
    /// Distinct `service` label values before the rest are counted as "other".
    #[arg(long, default_value_t = 100)]
    pub metrics_max_services: usize,
    /// How long a connect record waits for the application's SO_ERROR read, in ms.
    #[arg(long, default_value_t = DEFAULT_JOIN_WINDOW.as_millis() as u64)]
    pub join_window_ms: u64,
}

fn parse_ring_kib(s: &str) -> Result<u32, String> {
    let kib: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if kib < 4 || !kib.is_power_of_two() || kib > (1 << 20) {
        return Err(format!(
            "{kib} KiB: the ring buffer must be a power of two between 4 KiB and 1 GiB"
        ));
    }
    Ok(kib)
}

/// How often the kernel's table is counted (for the tracked and evicted destinations) when
/// no table is drawn.
pub const COUNT_INTERVAL: Duration = Duration::from_secs(5);

pub fn run(args: ObserveArgs) -> anyhow::Result<ExitCode> {
    init_tracing()?;
    if args.no_destination_table && !args.json && !args.quiet {
        anyhow::bail!(
            "--no-destination-table needs --json or --quiet: the live table is drawn from the kernel's per-destination table"
        );
    }
    // Before any thread exists (see `ensure_cgroup2`): under `ip netns exec` cgroup v2 is hidden.
    crate::observer::preflight::ensure_cgroup2().context("starting the kernel observer")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(observe(args, None))
}

/// Sends every finished record to `tap` as well (used by the demo).
pub type Tap = tokio::sync::mpsc::UnboundedSender<ConnectRecord>;

/// The log on stderr, at `RUST_LOG` (an invalid one is an error) or `info`.
pub fn init_tracing() -> Result<(), crate::logging::LogError> {
    crate::logging::init(crate::logging::LogFormat::Text, None, "info")
}

pub async fn observe(args: ObserveArgs, tap: Option<Tap>) -> anyhow::Result<ExitCode> {
    // Handlers first: a SIGTERM right after "observer attached" must detach cleanly, not kill.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut stream = attach(&args)?;
    let (mut metrics, registry) = exported_metrics(&args);
    let server = serve_metrics(args.metrics, registry)?;

    let notifier = crate::service::notify::Notifier::from_env();
    notifier.ready(&ready_status(&stream, args.metrics), false);
    let mut watchdog = tokio::time::interval(
        notifier
            .watchdog_interval()
            .unwrap_or(Duration::from_secs(3600)),
    );
    let mut output = output::Output::new(&args, tap);
    let mut drained = Drained::default();
    let mut drain = tokio::time::interval(DRAIN_INTERVAL);
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut refresh = tokio::time::interval(if args.json {
        COUNT_INTERVAL
    } else {
        DEFAULT_REFRESH
    });
    let deadline = args
        .duration
        .map(|s| tokio::time::Instant::now() + Duration::from_secs_f64(s));
    let mut lost = LostRecords::new(&args);

    let mut finishing = false;
    loop {
        tokio::select! {
            _ = drain.tick() => {}
            _ = watchdog.tick(), if notifier.enabled() => {
                notifier.watchdog();
                continue;
            }
            _ = refresh.tick() => {
                output.refresh(&mut stream, &mut drained, &mut metrics);
                continue;
            }
            _ = sigint.recv() => finishing = true,
            _ = sigterm.recv() => finishing = true,
            _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => finishing = true,
        }

        if finishing {
            stream.finish(&mut drained);
        } else {
            stream.drain(&mut drained);
        }
        for read in &drained.so_error_reads {
            metrics.so_error(read);
        }
        lost.account(&stream, &mut metrics);
        metrics.set_kernel_counters(&stream.counters(), None);
        metrics.set_late_so_errors(stream.late_so_errors());
        if output.release(&drained, &stream, &mut metrics).is_err() {
            // stdout closed (e.g. `| head`): nothing left to do.
            finishing = true;
        }
        drained.clear();
        if finishing {
            break;
        }
    }
    notifier.stopping("detaching the observer", Duration::from_secs(5));
    if let Some(server) = server {
        server.abort();
    }
    metrics.set_attached(false);
    drop(stream);
    tracing::info!("observer detached");
    Ok(ExitCode::SUCCESS)
}

/// The status line systemd shows once the observer is attached.
fn ready_status(stream: &ObserverStream, metrics: Option<SocketAddr>) -> String {
    format!(
        "observing cgroup {}{}",
        stream.cgroup().display(),
        metrics
            .map(|a| format!("; metrics on http://{a}/metrics"))
            .unwrap_or_default()
    )
}

/// Attaches the kernel side to the cgroup `args` names and opens its stream.
fn attach(args: &ObserveArgs) -> anyhow::Result<ObserverStream> {
    let opts = ObserverOptions {
        cgroup: args.cgroup.clone(),
        max_destinations: args.max_destinations,
        max_connections: args.max_connections,
        events_ring_bytes: Some(args.ring_buffer_kib * 1024),
        destination_table: !args.no_destination_table,
        ..ObserverOptions::default()
    };
    let observer = KernelObserver::attach(&opts).context("starting the kernel observer")?;
    tracing::info!(cgroup = %observer.cgroup().display(), connect_exit = observer.connect_exit_hook(), "observer attached");
    // Nothing is looked up by cookie here: a connect is forgotten once it is released.
    Ok(ObserverStream::new(
        observer,
        &StreamOptions {
            join_window: Duration::from_millis(args.join_window_ms),
            remember_for: Duration::ZERO,
            max_remembered: DEFAULT_MAX_REMEMBERED,
        },
    ))
}

/// The observer's metric families, registered (with the by-service family if asked for).
fn exported_metrics(args: &ObserveArgs) -> (metrics::ObserverMetrics, Arc<Registry>) {
    let mut registry = Registry::default();
    let mut metrics = metrics::ObserverMetrics::new(
        &mut registry,
        args.metrics_max_destinations,
        metrics::syn_rtt_buckets(),
    );
    if !args.no_destination_table {
        metrics.register_destination_table(&mut registry);
    }
    if let Some(by) = args.metrics_by {
        metrics.count_by_service(&mut registry, by, args.metrics_max_services);
    }
    metrics.set_attached(true);
    (metrics, Arc::new(registry))
}

/// Serves `/metrics` on `addr`, if one was given.
fn serve_metrics(
    addr: Option<SocketAddr>,
    registry: Arc<Registry>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<std::io::Result<()>>>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    // Bind before announcing, so a bad address is an error at start, not a log line.
    let listener_check = std::net::TcpListener::bind(addr)
        .with_context(|| format!("binding the metrics listener on {addr}"))?;
    drop(listener_check);
    Ok(Some(tokio::spawn(metrics::serve(addr, registry))))
}

/// Records the kernel dropped because the ring buffer was full: exported, and logged each
/// time the count grows.
struct LostRecords {
    reported: u64,
    ring_buffer_kib: u32,
    /// Where their counts went: the kernel's per-destination table, if it keeps one.
    counted_in: &'static str,
}

impl LostRecords {
    fn new(args: &ObserveArgs) -> LostRecords {
        LostRecords {
            reported: 0,
            ring_buffer_kib: args.ring_buffer_kib,
            counted_in: if args.no_destination_table {
                "lost (--no-destination-table)"
            } else {
                "kept in the kernel's per-destination table"
            },
        }
    }

    fn account(&mut self, stream: &ObserverStream, metrics: &mut metrics::ObserverMetrics) {
        let lost = stream.events_lost();
        metrics.set_events_lost(lost);
        if lost > self.reported {
            tracing::warn!(
                lost = lost - self.reported,
                lost_total = lost,
                ring_buffer_kib = self.ring_buffer_kib,
                counts = self.counted_in,
                "the kernel dropped connect records: the ring buffer was full between two drains (raise --ring-buffer-kib)"
            );
            self.reported = lost;
        }
    }
}
