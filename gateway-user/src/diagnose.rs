//! `gateway diagnose TARGET…`: probes each target and prints a root-cause verdict with the
//! kernel evidence behind it and next steps, as text or (`--json`) one object per target.
//!
//! The run, each step in its own module: resolve every target, timed (`resolve`, [`target`],
//! [`admin`] for cluster names); move this process into a cgroup of its own and attach the
//! kernel observer there ([`kernel`], [`cgroup`]); make `--count` connects to every address,
//! overlapping, each with a deadline and its `SO_COOKIE` read first (`jobs`, [`probe`]); when a
//! configured deadline cut connects short, make a few more with the kernel's own budget
//! ([`budget`]) to see how long the handshake really takes; join each attempt with the kernel's
//! record of it (`join`); classify ([`classify`], pure) and print ([`report`]). The cgroup is
//! left and removed on the way out, also on an error or SIGINT/SIGTERM. Without root or eBPF the
//! same probes run on userspace timing and `TCP_INFO` ([`tcpinfo`]), and the output says so.
//!
//! Exit code: 0 when every target is `healthy`, 1 otherwise or on error.

pub mod admin;
pub mod budget;
pub mod cgroup;
pub mod classify;
pub mod histogram;
mod jobs;
mod join;
pub mod kernel;
pub mod measure;
pub mod probe;
pub mod report;
mod resolve;
pub mod target;
pub mod tcpinfo;

use std::{
    io::Write as _,
    net::SocketAddr,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use clap::Args;
use tokio::signal::unix::{SignalKind, signal};

use self::{
    jobs::{plan, plan_other_port, plan_patient, run_jobs},
    join::to_attempt,
    kernel::{KernelSession, KernelUnavailable},
    measure::{AddressMeasurements, DeadlineSource, OtherPort, SynBudget, TargetMeasurements},
    report::{Phase, Progress, TargetReport},
    resolve::resolve_all,
    target::Target,
};

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
    crate::logging::init(crate::logging::LogFormat::Text, None, "warn")?;
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
    // Before any thread exists (see `ensure_cgroup2`): under `ip netns exec` cgroup v2 is
    // hidden. A failure here surfaces again, as the reason kernel signals are off.
    if !args.no_kernel
        && let Err(e) = crate::observer::preflight::ensure_cgroup2()
    {
        tracing::warn!("{e}");
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

async fn diagnose(args: &DiagnoseArgs) -> anyhow::Result<ExitCode> {
    let mut progress = Progress::new();
    let resolved = resolve_all(args).await?;
    let (mut kernel, missing) = start_kernel(args);
    let deadlines = Deadlines::read(args);
    let probes = run_probes(args, &resolved, &deadlines, &mut kernel, &mut progress).await?;
    progress.clear();
    let reports = reports(
        args,
        resolved,
        &deadlines,
        &probes,
        kernel.as_ref(),
        missing,
    );
    // Detach and leave the cgroup before printing: nothing below opens a socket.
    drop(kernel);
    print(args, &reports)?;
    Ok(if reports.iter().all(TargetReport::healthy) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The kernel observer in a cgroup of this process's own, or why there is none.
fn start_kernel(args: &DiagnoseArgs) -> (Option<KernelSession>, Option<String>) {
    if args.no_kernel {
        return (None, Some(KernelUnavailable::Disabled.to_string()));
    }
    match KernelSession::start() {
        Ok(k) => {
            tracing::debug!(cgroup = %k.cgroup().display(), "kernel observer attached");
            (Some(k), None)
        }
        Err(e) => {
            if !args.json {
                eprintln!("diagnose: kernel signals off, using userspace timing and TCP_INFO: {e}");
            }
            (None, Some(e.to_string()))
        }
    }
}

/// The probes' connect deadline and where it came from, and the longer one that measures a
/// handshake a configured deadline cut short.
struct Deadlines {
    /// Read where the probes run: the sysctls are per network namespace.
    syn_budget: SynBudget,
    deadline: Duration,
    source: DeadlineSource,
    patient: Duration,
}

impl Deadlines {
    fn read(args: &DiagnoseArgs) -> Deadlines {
        let syn_budget = budget::read();
        let kernel_deadline = budget::default_deadline(&syn_budget);
        let (deadline, source) = match args.connect_timeout_ms {
            Some(ms) => (Duration::from_millis(ms), DeadlineSource::Configured),
            None => (kernel_deadline, DeadlineSource::Kernel),
        };
        Deadlines {
            syn_budget,
            deadline,
            source,
            patient: kernel_deadline.min(PATIENT_DEADLINE_MAX),
        }
    }
}

/// What the probes saw, per job: its attempts and when it finished; the same for the patient
/// jobs and the other-port ones, and which of those (if any) followed each job.
struct Probes {
    jobs: Vec<jobs::Job>,
    observed: Vec<Vec<probe::Observed>>,
    finished: Vec<Instant>,
    patient: FollowUp,
    other_port: FollowUp,
}

/// Jobs run after the first ones, for some of them: what each saw, when it finished, and which
/// follow-up job (if any) each first job had.
struct FollowUp {
    jobs: Vec<jobs::Job>,
    observed: Vec<Vec<probe::Observed>>,
    finished: Vec<Instant>,
    of: Vec<Option<usize>>,
    /// The jobs from here on were lent (see [`FollowUp::lend`]), not run.
    lent_from: usize,
}

impl FollowUp {
    async fn run(
        (jobs, of): jobs::FollowUps,
        phase: Phase,
        kernel: &mut Option<KernelSession>,
        progress: &mut Progress,
    ) -> anyhow::Result<FollowUp> {
        let (observed, finished) = if jobs.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            progress.phase(phase, jobs.iter().map(jobs::Job::count).sum());
            run_jobs(&jobs, kernel, progress).await?
        };
        Ok(FollowUp {
            lent_from: jobs.len(),
            jobs,
            observed,
            finished,
            of,
        })
    }

    /// Makes the first job `job` (its attempts `observed`, all done at `finished`) job `j`'s
    /// follow-up, without running anything.
    fn lend(&mut self, j: usize, job: &jobs::Job, observed: &[probe::Observed], finished: Instant) {
        self.of[j] = Some(self.jobs.len());
        self.jobs.push(job.clone());
        self.observed.push(observed.to_vec());
        self.finished.push(finished);
    }

    /// Job `j`'s follow-up: its attempts and when it finished.
    fn of(&self, j: usize) -> Option<(&jobs::Job, &[probe::Observed], Instant)> {
        self.of[j].map(|q| (&self.jobs[q], &self.observed[q][..], self.finished[q]))
    }

    /// Whether job `j`'s follow-up is another job of the run, lent.
    fn lent(&self, j: usize) -> bool {
        self.of[j].is_some_and(|q| q >= self.lent_from)
    }
}

/// Every connect; then, when a configured deadline cut some short, the patient ones; then,
/// where nothing answered at all, connects to another port of the same host; and the kernel's
/// last records of them all.
async fn run_probes(
    args: &DiagnoseArgs,
    resolved: &[resolve::Resolved],
    d: &Deadlines,
    kernel: &mut Option<KernelSession>,
    progress: &mut Progress,
) -> anyhow::Result<Probes> {
    let jobs = plan(args, resolved, d.deadline);
    progress.phase(Phase::Connects, jobs.iter().map(jobs::Job::count).sum());
    let (observed, finished) = run_jobs(&jobs, kernel, progress).await?;

    // A configured deadline that cut connects short: how long does the handshake really take?
    let patient = if d.source == DeadlineSource::Configured && d.deadline < d.patient {
        plan_patient(args, &jobs, &observed, d.patient)
    } else {
        (Vec::new(), vec![None; jobs.len()])
    };
    let patient = FollowUp::run(patient, Phase::PatientConnects, kernel, progress).await?;
    // Nothing answered at all: does the host itself answer?
    let (other_port, answered) =
        plan_other_port(&jobs, &observed, (&patient.observed, &patient.of));
    let mut other_port = FollowUp::run(other_port, Phase::OtherPort, kernel, progress).await?;
    if let Some(k) = kernel.as_mut() {
        let cookies: Vec<u64> = observed
            .iter()
            .chain(&patient.observed)
            .chain(&other_port.observed)
            .flatten()
            .map(|o| o.cookie)
            .collect();
        k.settle(&cookies).await;
    }
    for (j, k) in answered {
        other_port.lend(j, &jobs[k], &observed[k], finished[k]);
    }
    Ok(Probes {
        jobs,
        observed,
        finished,
        patient,
        other_port,
    })
}

/// One classified report per target, from its addresses' attempts joined with the kernel's
/// records.
fn reports(
    args: &DiagnoseArgs,
    resolved: Vec<resolve::Resolved>,
    d: &Deadlines,
    p: &Probes,
    kernel: Option<&KernelSession>,
    missing: Option<String>,
) -> Vec<TargetReport> {
    let local_port_range = budget::local_port_range();
    let events_lost = kernel.map(KernelSession::events_lost);
    let mut reports = Vec::new();
    for (t, r) in resolved.into_iter().enumerate() {
        let mut addresses = Vec::new();
        let mut done = r.resolved;
        for (j, job) in p.jobs.iter().enumerate().filter(|(_, j)| j.target == t) {
            done = done.max(p.finished[j]);
            let attempts = p.observed[j]
                .iter()
                .map(|o| to_attempt(o, kernel))
                .collect();
            let mut a = AddressMeasurements::new(job.addr, attempts);
            if let Some((_, observed, at)) = p.patient.of(j) {
                done = done.max(at);
                a.patient_attempts = observed.iter().map(|o| to_attempt(o, kernel)).collect();
                a.patient_deadline_ms = Some(d.patient.as_millis() as u64);
            }
            if let Some((other, observed, at)) = p.other_port.of(j) {
                done = done.max(at);
                a.other_port = Some(OtherPort {
                    port: other.addr.port(),
                    from_target: p.other_port.lent(j).then_some(other.addr),
                    deadline_ms: other.schedule.deadline.as_millis() as u64,
                    attempts: observed.iter().map(|o| to_attempt(o, kernel)).collect(),
                });
            }
            addresses.push(a);
        }
        let m = TargetMeasurements {
            kernel_signals: kernel.is_some(),
            kernel_signals_missing: missing.clone(),
            resolution: r.resolution,
            count: args.count,
            connect_deadline_ms: d.deadline.as_millis() as u64,
            connect_deadline_source: d.source,
            syn_budget: d.syn_budget,
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
    reports
}

/// The reports on stdout: one JSON line each, or the text ones a blank line apart.
fn print(args: &DiagnoseArgs, reports: &[TargetReport]) -> std::io::Result<()> {
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
    out.flush()
}
