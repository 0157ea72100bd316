//! `gateway demo --observer`: builds a lab of upstreams in network namespaces — healthy,
//! refusing, blackholed, slow to accept, unreachable — runs two client programs against them
//! inside an observed cgroup, shows the live table, and ends with what the kernel saw of each
//! upstream next to the fault that was injected. Exits non-zero if any explanation misses its
//! fault.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Args;

use gateway_lab::{ClientSysctl, Fault, HttpBehaviour, Lab, LabSpec, NetnsCommandExt};

use super::DemoArgs;
use crate::{
    observe::{ObserveArgs, init_tracing, observe},
    observer::{
        explain::{Story, explain},
        records::ConnectRecord,
    },
};

const PORT: u16 = 8080;
/// The client namespace's `tcp_syn_retries` during the demo (with linear timeouts off), so a
/// kernel connect timeout takes 3 s: SYN at 0, one retransmit at +1 s, ETIMEDOUT at +3 s.
const DEMO_SYN_RETRIES: u8 = 1;

/// The hidden `demo-client` command: one of the demo's client programs.
#[derive(Args, Debug, Clone)]
pub struct DemoClientArgs {
    /// Process name (comm) to run under, as the observer will show it.
    #[arg(long)]
    pub name: String,
    /// Give up on a connect after this many ms (a userspace timeout); default: wait for the
    /// kernel.
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    #[arg(long)]
    pub duration: f64,
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    pub targets: Vec<SocketAddr>,
}

struct Planted {
    label: &'static str,
    expect: Story,
}

pub(super) fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    init_tracing()?;
    let lab = Lab::new(LabSpec::new(5)).context("building the demo lab (needs root)")?;
    let mut guards = Vec::new();
    let mut servers = Vec::new();
    let mut planted = BTreeMap::new();
    let mut targets = Vec::new();
    for (i, (p, fault)) in plan().into_iter().enumerate() {
        let up = lab.upstream(i)?;
        servers.push(up.serve_http(PORT, HttpBehaviour::immediate())?);
        if let Some(f) = fault {
            guards.push(up.apply(f)?);
        }
        let addr = up.addr_v4(PORT);
        println!("  {}  {addr:<16} {}", up.name(), p.label);
        planted.insert(addr, (up.name().to_owned(), p));
        targets.push(addr);
    }
    let _retries = lab.set_client_sysctl(ClientSysctl::SynRetries(DEMO_SYN_RETRIES))?;
    let _linear = lab.set_client_sysctl(ClientSysctl::SynLinearTimeouts(0))?;
    let cgroup = lab
        .client_cgroup()
        .context("the lab has no client cgroup")?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (tap, mut records) = tokio::sync::mpsc::unbounded_channel::<ConnectRecord>();
    let observe_args = observe_args(&args, cgroup.path());
    let exe = std::env::current_exe().context("locating the gateway binary")?;
    let spawn_client =
        |name: &str, timeout_ms: Option<u64>| -> anyhow::Result<std::process::Child> {
            let mut cmd = Command::new(&exe);
            cmd.arg("demo-client")
                .args(["--name", name, "--duration", &args.duration.to_string()]);
            if let Some(t) = timeout_ms {
                cmd.args(["--timeout-ms", &t.to_string()]);
            }
            cmd.args(targets.iter().map(ToString::to_string));
            cmd.in_netns(lab.client()).in_cgroup(cgroup);
            cmd.spawn().context("starting a demo client")
        };
    println!(
        "\nTwo clients run in the lab's cgroup for {:.0} s: `api-client` gives up after 300 ms (like a \
         proxy's connect timeout), `batch-job` waits for the kernel (tcp_syn_retries={DEMO_SYN_RETRIES}, linear timeouts off).\n",
        args.duration
    );
    let started = Instant::now();
    let code = rt.block_on(async {
        let observer = tokio::spawn(observe(observe_args, Some(tap)));
        // Give the observer a moment to attach before the clients start.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut api = spawn_client("api-client", Some(300))?;
        let mut batch = spawn_client("batch-job", None)?;
        let code = observer.await.context("observer task")??;
        let _ = api.wait();
        let _ = batch.wait();
        anyhow::Ok(code)
    })?;
    let mut all = Vec::new();
    while let Ok(r) = records.try_recv() {
        all.push(r);
    }
    println!(
        "\nWhat the kernel saw of each upstream ({} connects in {:.0} s):\n",
        all.len(),
        started.elapsed().as_secs_f64()
    );
    let missed = judge(&planted, &all);
    drop(guards);
    drop(servers);
    if missed > 0 {
        println!("{missed} upstream(s) were not explained as injected");
        return Ok(ExitCode::FAILURE);
    }
    Ok(code)
}

/// The five upstreams: what each suffers, and what the kernel's record must then say.
fn plan() -> [(Planted, Option<Fault>); 5] {
    [
        (
            Planted {
                label: "healthy",
                expect: Story::Healthy,
            },
            None,
        ),
        (
            Planted {
                label: "refuses connections (RST)",
                expect: Story::Refused,
            },
            Some(Fault::Refuse { port: PORT }),
        ),
        (
            Planted {
                label: "drops SYNs (firewall blackhole)",
                expect: Story::Filtered,
            },
            Some(Fault::SynBlackhole { port: PORT }),
        ),
        (
            Planted {
                label: "slow to accept (SYN-ACK +200 ms)",
                expect: Story::Healthy,
            },
            Some(Fault::SynAckDelay {
                port: PORT,
                delay: Duration::from_millis(200),
            }),
        ),
        (
            Planted {
                label: "unreachable (ICMP host unreachable)",
                expect: Story::Unreachable,
            },
            Some(Fault::HostUnreachable { port: PORT }),
        ),
    ]
}

/// `observe` as the demo runs it: the lab's cgroup, the table (or JSON), for as long as the
/// clients run.
fn observe_args(args: &DemoArgs, cgroup: &std::path::Path) -> ObserveArgs {
    ObserveArgs {
        cgroup: Some(cgroup.to_path_buf()),
        json: args.json,
        quiet: false,
        metrics: None,
        // Clients run `duration`, and a blocking connect to the blackhole may take ~3 s more.
        duration: Some(args.duration + 4.0),
        top: 10,
        max_destinations: gateway_common::names::DEFAULT_MAX_DESTINATIONS,
        no_destination_table: false,
        max_connections: gateway_common::names::DEFAULT_MAX_CONNECTIONS,
        metrics_max_destinations: 100,
        metrics_by: None,
        metrics_max_services: 100,
        ring_buffer_kib: gateway_common::names::EVENTS_RING_BYTES / 1024,
        join_window_ms: 250,
    }
}

/// Prints the kernel's explanation of each upstream next to its planted fault; returns how
/// many missed it.
fn judge(planted: &BTreeMap<SocketAddr, (String, Planted)>, all: &[ConnectRecord]) -> usize {
    let mut missed = 0;
    for (addr, (name, p)) in planted {
        let mine: Vec<&ConnectRecord> = all.iter().filter(|r| r.dst == *addr).collect();
        let e = explain(&mine);
        let ok = e.verdict == p.expect;
        missed += usize::from(!ok);
        println!(
            "  {} {name} {addr} — injected: {}\n      {}: {}\n",
            if ok { "✓" } else { "✗" },
            p.label,
            e.verdict,
            e.sentence
        );
    }
    missed
}

/// Body of the hidden `demo-client` command: connects to every target every interval, each in
/// its own thread, for `duration`, under the process name `name`.
pub fn demo_client(args: DemoClientArgs) -> anyhow::Result<ExitCode> {
    let name = std::ffi::CString::new(args.name.clone())?;
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of up to 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    let end = Instant::now() + Duration::from_secs_f64(args.duration);
    let mut threads = Vec::new();
    while Instant::now() < end {
        for &addr in &args.targets {
            let timeout = args.timeout_ms.map(Duration::from_millis);
            threads.push(std::thread::spawn(move || {
                let Ok(sock) = socket2::Socket::new(
                    socket2::Domain::for_address(addr),
                    socket2::Type::STREAM,
                    None,
                ) else {
                    return;
                };
                let _ = match timeout {
                    Some(t) => sock.connect_timeout(&addr.into(), t),
                    None => sock.connect(&addr.into()),
                };
            }));
        }
        std::thread::sleep(Duration::from_millis(args.interval_ms));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(ExitCode::SUCCESS)
}
