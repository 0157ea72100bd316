//! `gateway diagnose TARGET…`: probes each target and prints a root-cause verdict with the
//! kernel evidence behind it and next steps, as text or (`--json`) one object per target.
//!
//! The run: resolve every target, timed ([`target`]); move this process into a cgroup of its
//! own and attach the kernel observer there ([`kernel`], [`cgroup`]); make `--count` connects to
//! every address, overlapping, each with a deadline and its `SO_COOKIE` read first
//! ([`probe`]); when a configured deadline cut connects short, make a few more with the
//! kernel's own budget to see how long the handshake really takes; join each attempt with the
//! kernel's record of it; classify ([`classify`], pure) and print ([`report`]). The cgroup is
//! left and removed on the way out, also on an error or SIGINT/SIGTERM. Without root or eBPF the
//! same probes run on userspace timing and `TCP_INFO`, and the output says so.
//!
//! Exit code: 0 when every target is `healthy`, 1 otherwise or on error.

pub mod admin;
pub mod budget;
pub mod cgroup;
pub mod classify;
pub mod kernel;
pub mod measure;
pub mod probe;
pub mod report;
pub mod target;
pub mod tcpinfo;

use std::{
    io::Write as _,
    net::SocketAddr,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use clap::Args;
use gateway_common::{Outcome, errno};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Semaphore,
    task::JoinSet,
};

use self::{
    kernel::{KernelSession, KernelUnavailable},
    measure::{
        AddressMeasurements, Attempt, AttemptOutcome, DeadlineSource, Resolution, ResolutionMethod,
        Source, TargetMeasurements,
    },
    probe::{ConnectResult, HttpPlan, Observed, Schedule},
    report::{Phase, Progress, TargetReport},
    target::{Host, Target},
};
use crate::observer::{records::errno_name, stream::DRAIN_INTERVAL};

/// Connects per address.
pub const DEFAULT_COUNT: u32 = 5;
pub const MAX_COUNT: u32 = 1000;
/// Between the starts of consecutive connects to one address.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(100);
/// With `--http`: how long to wait for the first response byte.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connects made with a longer deadline when a configured deadline cut connects short.
pub const PATIENT_COUNT: u32 = 3;
/// The patient connects' deadline: the default (kernel-derived) one, but at most this. A
/// handshake slower than this has needed several SYN retransmits: not a deadline question.
pub const PATIENT_DEADLINE_MAX: Duration = Duration::from_secs(5);
/// Attempts in flight at once (each holds a socket).
const MAX_IN_FLIGHT: usize = 256;

#[derive(Args, Debug, Clone)]
pub struct DiagnoseArgs {
    /// What to probe: `host:port`, `[ipv6]:port`, or the name of a cluster of a running gateway
    /// (with --admin).
    #[arg(required = true, value_name = "TARGET", value_parser = target::parse_target)]
    pub targets: Vec<Target>,
    /// Connects to each address of each target.
    #[arg(long, default_value_t = DEFAULT_COUNT,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_COUNT)))]
    pub count: u32,
    /// Also send `GET PATH` on every established connection, and time whether and when the
    /// request was ACKed and the first response byte.
    #[arg(long, value_name = "PATH", value_parser = parse_http_path)]
    pub http: Option<String>,
    /// Print one JSON object per target per line on stdout.
    #[arg(long)]
    pub json: bool,
    /// Connect deadline of each attempt, in ms. Default: the kernel's own SYN budget
    /// (tcp_syn_retries, tcp_syn_linear_timeouts) plus 300 ms, at most 10 s.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub connect_timeout_ms: Option<u64>,
    /// With --http: how long to wait for the first response byte, in ms.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_RESPONSE_TIMEOUT.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub response_timeout_ms: u64,
    /// Between the starts of consecutive connects to one address, in ms.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_INTERVAL.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub interval_ms: u64,
    /// Admin address of a running gateway (e.g. 127.0.0.1:9901): cluster-name targets are
    /// looked up there.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    /// Do not load the eBPF observer: userspace timing and TCP_INFO only.
    #[arg(long)]
    pub no_kernel: bool,
}

fn parse_http_path(s: &str) -> Result<String, String> {
    if !s.starts_with('/') {
        return Err(format!("`{s}` must start with `/` (e.g. /healthz)"));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("`{s}` contains whitespace or control characters"));
    }
    Ok(s.to_owned())
}

pub fn run(args: DiagnoseArgs) -> anyhow::Result<ExitCode> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    if args.admin.is_none()
        && let Some(Target::Cluster(name)) = args
            .targets
            .iter()
            .find(|t| matches!(t, Target::Cluster(_)))
    {
        bail!(
            "target `{name}` has no port: write host:port, or pass --admin ADDR of a running \
             gateway to probe the endpoints of its cluster `{name}`"
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let result = rt.block_on(async {
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        // On a signal the diagnosis future is dropped, and with it the observer and the cgroup.
        tokio::select! {
            r = diagnose(&args) => r,
            _ = sigint.recv() => Err(anyhow!("interrupted (SIGINT); probes stopped, cgroup removed")),
            _ = sigterm.recv() => Err(anyhow!("terminated (SIGTERM); probes stopped, cgroup removed")),
        }
    });
    // A resolver thread stuck in getaddrinfo must not hold the exit.
    rt.shutdown_timeout(Duration::from_millis(100));
    result
}

/// One target, resolved: what to connect to.
struct Resolved {
    label: String,
    resolution: Resolution,
    addrs: Vec<SocketAddr>,
    /// `Host` header for `--http`.
    host_header: String,
    /// For a cluster target: the gateway's view of it.
    gateway: Option<admin::GatewayView>,
    started: Instant,
    resolved: Instant,
}

/// One address to probe, with its schedule.
struct Job {
    target: usize,
    addr: SocketAddr,
    schedule: Schedule,
}

async fn diagnose(args: &DiagnoseArgs) -> anyhow::Result<ExitCode> {
    let mut progress = Progress::new();
    let resolved = resolve_all(args).await?;

    let (mut kernel, missing) = if args.no_kernel {
        (None, Some(KernelUnavailable::Disabled.to_string()))
    } else {
        match KernelSession::start() {
            Ok(k) => {
                tracing::debug!(cgroup = %k.cgroup().display(), "kernel observer attached");
                (Some(k), None)
            }
            Err(e) => {
                if !args.json {
                    eprintln!(
                        "diagnose: kernel signals off, using userspace timing and TCP_INFO: {e}"
                    );
                }
                (None, Some(e.to_string()))
            }
        }
    };

    // Read where the probes run: the sysctls are per network namespace.
    let syn_budget = budget::read();
    let kernel_deadline = budget::default_deadline(&syn_budget);
    let patient_deadline = kernel_deadline.min(PATIENT_DEADLINE_MAX);
    let (deadline, deadline_source) = match args.connect_timeout_ms {
        Some(ms) => (Duration::from_millis(ms), DeadlineSource::Configured),
        None => (kernel_deadline, DeadlineSource::Kernel),
    };
    let interval = Duration::from_millis(args.interval_ms);

    let mut jobs = Vec::new();
    for (t, r) in resolved.iter().enumerate() {
        let http = args.http.as_deref().map(|path| {
            Arc::new(HttpPlan::get(
                &r.host_header,
                path,
                Duration::from_millis(args.response_timeout_ms),
            ))
        });
        for &addr in &r.addrs {
            jobs.push(Job {
                target: t,
                addr,
                schedule: Schedule {
                    count: args.count,
                    interval,
                    deadline,
                    http: http.clone(),
                },
            });
        }
    }
    progress.phase(
        Phase::Connects,
        jobs.iter().map(|j| j.schedule.count as usize).sum(),
    );
    let (observed, finished) = run_jobs(&jobs, &mut kernel, &mut progress).await?;

    // A configured deadline that cut connects short: how long does the handshake really take?
    let mut patient_jobs = Vec::new();
    let mut patient_of = vec![None; jobs.len()];
    if deadline_source == DeadlineSource::Configured && deadline < patient_deadline {
        for (j, job) in jobs.iter().enumerate() {
            if observed[j]
                .iter()
                .any(|o| o.result == ConnectResult::DeadlineHit)
            {
                patient_of[j] = Some(patient_jobs.len());
                patient_jobs.push(Job {
                    target: job.target,
                    addr: job.addr,
                    schedule: Schedule {
                        count: PATIENT_COUNT.min(args.count),
                        interval,
                        deadline: patient_deadline,
                        http: None,
                    },
                });
            }
        }
    }
    let (patient, patient_finished) = if patient_jobs.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        progress.phase(
            Phase::PatientConnects,
            patient_jobs.iter().map(|j| j.schedule.count as usize).sum(),
        );
        run_jobs(&patient_jobs, &mut kernel, &mut progress).await?
    };
    if let Some(k) = kernel.as_mut() {
        let cookies: Vec<u64> = observed
            .iter()
            .chain(&patient)
            .flatten()
            .map(|o| o.cookie)
            .collect();
        k.settle(&cookies).await;
    }
    progress.clear();

    let local_port_range = budget::local_port_range();
    let events_lost = kernel.as_ref().map(KernelSession::events_lost);
    let mut reports = Vec::new();
    for (t, r) in resolved.into_iter().enumerate() {
        let mut addresses = Vec::new();
        let mut done = r.resolved;
        for (j, job) in jobs.iter().enumerate().filter(|(_, j)| j.target == t) {
            done = done.max(finished[j]);
            let attempts = observed[j]
                .iter()
                .map(|o| to_attempt(o, kernel.as_ref()))
                .collect();
            let mut a = AddressMeasurements::new(job.addr, attempts);
            if let Some(p) = patient_of[j] {
                done = done.max(patient_finished[p]);
                a.patient_attempts = patient[p]
                    .iter()
                    .map(|o| to_attempt(o, kernel.as_ref()))
                    .collect();
                a.patient_deadline_ms = Some(patient_deadline.as_millis() as u64);
            }
            addresses.push(a);
        }
        let m = TargetMeasurements {
            kernel_signals: kernel.is_some(),
            kernel_signals_missing: missing.clone(),
            resolution: r.resolution,
            count: args.count,
            connect_deadline_ms: deadline.as_millis() as u64,
            connect_deadline_source: deadline_source,
            syn_budget,
            local_port_range,
            http_path: args.http.clone(),
            response_timeout_ms: args.http.is_some().then_some(args.response_timeout_ms),
            addresses,
            events_lost,
            gateway: r.gateway,
        };
        let ranked = classify::classify(&m);
        let mut report = TargetReport::new(r.label, ranked, m, done - r.started);
        // The running gateway's own evidence, after the probes' (it is about the same
        // endpoints, seen by the gateway's traffic).
        if let Some(g) = &report.measurements.gateway {
            let lines = g.evidence();
            report.evidence.extend(lines);
        }
        reports.push(report);
    }
    // Detach and leave the cgroup before printing: nothing below opens a socket.
    drop(kernel);

    let mut out = std::io::stdout().lock();
    for (i, r) in reports.iter().enumerate() {
        if args.json {
            writeln!(out, "{}", r.to_json_line())?;
        } else {
            if i > 0 {
                writeln!(out)?;
            }
            write!(out, "{}", r.to_text())?;
        }
    }
    out.flush()?;
    Ok(if reports.iter().all(TargetReport::healthy) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Resolves every target at once: names through getaddrinfo, clusters through `--admin`.
async fn resolve_all(args: &DiagnoseArgs) -> anyhow::Result<Vec<Resolved>> {
    let mut set = JoinSet::new();
    for (i, t) in args.targets.iter().cloned().enumerate() {
        let admin = args.admin;
        set.spawn(async move {
            let started = Instant::now();
            let label = t.to_string();
            let r = match t {
                Target::Endpoint { host, port } => {
                    let resolution = target::resolve(&host).await;
                    let addrs = target::socket_addrs(&resolution.addresses, port);
                    let host_header = match &host {
                        Host::Ip(_) => format!("{host}:{port}"),
                        Host::Name(n) => format!("{n}:{port}"),
                    };
                    Resolved {
                        label,
                        resolution,
                        addrs,
                        host_header,
                        gateway: None,
                        started,
                        resolved: Instant::now(),
                    }
                }
                Target::Cluster(name) => {
                    let admin = admin.expect("checked in run()");
                    let view = admin::cluster_view(admin, &name).await?;
                    let addrs = view.addresses();
                    Resolved {
                        gateway: Some(view),
                        host_header: addrs[0].to_string(),
                        resolution: Resolution {
                            host: name,
                            method: ResolutionMethod::Admin,
                            elapsed_us: started.elapsed().as_micros() as u64,
                            addresses: addrs.iter().map(SocketAddr::ip).collect(),
                            error: None,
                        },
                        label,
                        addrs,
                        started,
                        resolved: Instant::now(),
                    }
                }
            };
            Ok::<_, admin::AdminError>((i, r))
        });
    }
    let mut out: Vec<Option<Resolved>> = args.targets.iter().map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        let (i, r) = joined.context("a resolver task failed")??;
        out[i] = Some(r);
    }
    Ok(out.into_iter().flatten().collect())
}

/// Runs every job's attempts, draining the kernel's records meanwhile. Returns attempt `i`
/// of job `j` at `[j][i]`, and when each job's last attempt ended.
async fn run_jobs(
    jobs: &[Job],
    kernel: &mut Option<KernelSession>,
    progress: &mut Progress,
) -> anyhow::Result<(Vec<Vec<Observed>>, Vec<Instant>)> {
    let mut finished = vec![Instant::now(); jobs.len()];
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut set = JoinSet::new();
    for (j, job) in jobs.iter().enumerate() {
        for i in 0..job.schedule.count {
            let (addr, schedule, permits) = (job.addr, job.schedule.clone(), permits.clone());
            set.spawn(async move {
                tokio::time::sleep(schedule.interval * i).await;
                let _permit = permits.acquire_owned().await;
                let o = probe::attempt(addr, schedule.deadline, schedule.http.as_deref()).await;
                (j, i as usize, o)
            });
        }
    }
    let mut out: Vec<Vec<Option<Observed>>> = jobs
        .iter()
        .map(|j| vec![None; j.schedule.count as usize])
        .collect();
    let mut drain = tokio::time::interval(DRAIN_INTERVAL);
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            next = set.join_next() => match next {
                None => break,
                Some(joined) => {
                    let (j, i, o) = joined.context("a probe task failed")?;
                    out[j][i] = Some(o);
                    finished[j] = Instant::now();
                    progress.step();
                }
            },
            _ = drain.tick() => {
                if let Some(k) = kernel.as_mut() {
                    k.pump();
                }
                progress.tick();
            }
        }
    }
    let out = out
        .into_iter()
        .map(|v| v.into_iter().flatten().collect())
        .collect();
    Ok((out, finished))
}

/// What `connect()`'s errno says, when the kernel's record is missing.
fn outcome_of_errno(e: i32) -> AttemptOutcome {
    match e as u32 {
        errno::ECONNREFUSED | errno::ECONNRESET => AttemptOutcome::Refused,
        errno::ETIMEDOUT => AttemptOutcome::Timeout,
        errno::EADDRNOTAVAIL => AttemptOutcome::AddrUnavailable,
        errno::EHOSTUNREACH
        | errno::ENETUNREACH
        | errno::EHOSTDOWN
        | errno::ENONET
        | errno::EPROTO
        | errno::ENETDOWN => AttemptOutcome::Unreachable,
        errno::EPERM | errno::EACCES => AttemptOutcome::Denied,
        _ => AttemptOutcome::Error,
    }
}

/// Joins what the prober saw with the kernel's record of the same socket (by cookie).
fn to_attempt(o: &Observed, kernel: Option<&KernelSession>) -> Attempt {
    let (user_outcome, user_errno) = match &o.result {
        ConnectResult::Established => (AttemptOutcome::Established, None),
        ConnectResult::DeadlineHit => (AttemptOutcome::Deadline, None),
        ConnectResult::Failed(e) => (outcome_of_errno(*e), Some(errno_name(*e as u32))),
        ConnectResult::Local(msg) => (AttemptOutcome::Error, Some(msg.clone())),
    };
    let elapsed_us = o.elapsed.as_micros() as u64;
    let mut http = o.http.clone();
    let record = kernel
        .filter(|_| o.cookie != 0)
        .and_then(|k| k.record(o.cookie));
    let Some(rec) = record else {
        return Attempt {
            cookie: o.cookie,
            outcome: user_outcome,
            source: Source::Userspace,
            errno: user_errno,
            elapsed_us,
            syn_retransmits: o.syn_retransmits,
            syn_rtt_us: (user_outcome == AttemptOutcome::Established).then_some(elapsed_us),
            http,
        };
    };
    let outcome = match rec.outcome {
        Outcome::Established => AttemptOutcome::Established,
        Outcome::Refused => AttemptOutcome::Refused,
        Outcome::Timeout => AttemptOutcome::Timeout,
        Outcome::Unreachable => AttemptOutcome::Unreachable,
        Outcome::AddrUnavailable => AttemptOutcome::AddrUnavailable,
        // The prober closed the socket: its deadline, or a local failure it knows better.
        Outcome::Aborted => user_outcome,
    };
    if let (Some(h), Some(cs)) = (http.as_mut(), kernel.and_then(|k| k.conn_stats(o.cookie))) {
        h.data_retransmits = Some(cs.data_retransmits);
        h.rtos = Some(cs.rtos);
        h.source = Source::Kernel;
    }
    Attempt {
        cookie: o.cookie,
        outcome,
        source: Source::Kernel,
        errno: rec.errno.map(errno_name).or(user_errno),
        elapsed_us,
        syn_retransmits: Some(u32::from(rec.syn_retransmits)),
        syn_rtt_us: rec.syn_rtt.map(|d| d.as_micros() as u64),
        http,
    }
}
