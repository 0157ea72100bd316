//! `gateway demo`: the proxy's main job, live. It builds the fault lab (four upstreams in
//! network namespaces, each serving HTTP), runs `gateway run` (this binary) in front of them in
//! the lab's client namespace with the kernel observer, sends it steady load, then breaks the
//! upstreams one by one: blackhole, refuse, slow accept, slow backend, each for a few seconds
//! and then repaired. While it runs it prints what the gateway saw and decided, read from its
//! `/status` (health changes with their kernel evidence, connect deadlines, hedges) and from its
//! JSON access log (requests that a failed attempt or a hedge kept from failing), and what the
//! clients got. It ends with a summary (requests, failures hidden or explained, time to eject,
//! time back) and exits non-zero if the gateway's decisions miss a fault (see
//! [`super::judge`]) or a client saw a failure the gateway did not explain.
//!
//! The status page is in the client namespace; the demo relays a port on the host's loopback
//! to it and prints its URL.

use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    io::{BufRead as _, BufReader, Seek as _, SeekFrom},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

mod drive;
mod report;

use self::{drive::drive, report::summary};

use anyhow::{Context as _, bail};
use gateway_lab::{
    Fault, FaultGuard, HttpBehaviour, HttpServer, Lab, LabSpec, Netns, NetnsCommandExt,
};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

use super::{
    DemoArgs,
    judge::{DemoFault, Observed, Tally, Verdict, judge},
};
use crate::{
    decide::health::{Reason, State},
    proxy::admin::status::{HealthEventKind, Status},
};

const UPSTREAM_PORT: u16 = 8080;
/// The gateway's listener and admin API, on the client namespace's own loopback.
const LISTEN: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 18080);
const ADMIN: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 19901);
/// The port on the host's loopback that the demo relays to the status page, when free.
const PAGE_PORT: u16 = 9901;
const CONNECT_TIMEOUT_MS: u64 = 2000;
/// Short enough that the slow backend's requests end within the demo's phase.
const RESPONSE_TIMEOUT_MS: u64 = 1000;
const SLOW_BACKEND: Duration = Duration::from_secs(3);
const SYN_ACK_DELAY: Duration = Duration::from_millis(200);
/// A request not answered within this is a client-visible failure that nobody explained.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the gateway has to start and answer `/readyz`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How often the demo reads `/status`.
const POLL: Duration = Duration::from_millis(200);
/// Requests kept from failing printed per phase (the rest are counted).
const KEPT_SHOWN: usize = 3;

/// One client request's fate.
struct Outcome {
    latency: Duration,
    status: Option<u16>,
    /// `x-gateway-error`, empty when absent.
    error: String,
    /// The first line of the body: the gateway's sentence with the kernel evidence.
    body: String,
}

/// One fault's slot in the schedule.
struct Phase {
    fault: DemoFault,
    upstream: usize,
    /// Seconds since the start of the load.
    start: f64,
    stop: f64,
    applied_unix_ms: Option<u64>,
    cleared_unix_ms: Option<u64>,
    guard: Option<FaultGuard>,
    seen: Observed,
    kept_shown: usize,
}

pub(super) fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    crate::observe::init_tracing()?;
    if args.fault_for <= 0.5 || args.recover_for < 0.0 || args.rate == 0 {
        bail!("need --fault-for > 0.5 s, --recover-for >= 0 s and --rate > 0");
    }
    let exe = std::env::current_exe().context("locating the gateway binary")?;
    let lab = Lab::new(LabSpec {
        upstreams: DemoFault::ALL.len(),
        client_cgroup: false,
    })
    .context("building the demo lab (needs root: network namespaces, iptables)")?;
    let servers: Vec<HttpServer> = lab
        .upstreams()
        .iter()
        .map(|u| u.serve_http(UPSTREAM_PORT, HttpBehaviour::immediate()))
        .collect::<Result<_, _>>()
        .context("starting the lab's HTTP servers")?;
    let names: BTreeMap<SocketAddr, String> = lab
        .upstreams()
        .iter()
        .map(|u| (u.addr_v4(UPSTREAM_PORT), u.name().to_owned()))
        .collect();
    let dir = std::env::temp_dir().join(format!("gateway-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let access_log = dir.join("access.log");
    let config = dir.join("gateway.toml");
    std::fs::write(&config, config_text(&names, &access_log))
        .with_context(|| format!("writing {}", config.display()))?;
    let gateway_log = dir.join("gateway.log");
    let mut gateway = start_gateway(&exe, &config, &gateway_log, lab.client())?;
    let outcome = run(
        &args,
        &lab,
        &servers,
        &names,
        &access_log,
        &mut gateway,
        &gateway_log,
    );
    // SIGTERM: the gateway detaches its observer and removes its cgroup itself.
    // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
    unsafe { libc::kill(gateway.id() as i32, libc::SIGTERM) };
    let _ = gateway.wait();
    drop(servers);
    drop(lab);
    match outcome {
        Ok(code) => {
            if code == ExitCode::SUCCESS {
                let _ = std::fs::remove_dir_all(&dir);
            } else {
                println!(
                    "the gateway's config, log and access log are kept in {}",
                    dir.display()
                );
            }
            Ok(code)
        }
        Err(e) => {
            println!(
                "the gateway's config, log and access log are kept in {}",
                dir.display()
            );
            Err(e)
        }
    }
}

fn config_text(names: &BTreeMap<SocketAddr, String>, access_log: &Path) -> String {
    let endpoints: Vec<String> = names.keys().map(|a| format!("\"{a}\"")).collect();
    format!(
        "# gateway demo: four lab upstreams, a new upstream connection per request (so every\n\
         # fault meets new connects), a 1 s response timeout (the slow backend answers in 3 s),\n\
         # probes that GET / (so a slow backend stays ejected until it answers in time).\n\
         [router]\nlisten = [\"{LISTEN}\"]\ndrain_delay_ms = 0\n\n\
         [router.upstream]\nendpoints = [{}]\n\n\
         [router.upstream.timeouts]\nconnect_timeout_ms = {CONNECT_TIMEOUT_MS}\n\
         response_timeout_ms = {RESPONSE_TIMEOUT_MS}\nrequest_timeout_ms = 10000\n\n\
         [router.upstream.limits]\nmax_idle_per_endpoint = 0\n\n\
         [router.upstream.retry]\nmax_retries = 2\n\n\
         [router.upstream.health]\nprobe_path = \"/\"\n\n\
         [admin]\nlisten = \"{ADMIN}\"\n\n\
         [access_log]\nformat = \"json\"\noutput = \"{}\"\n\n\
         [observer]\ncgroup = \"gateway-demo-{{pid}}\"\n",
        endpoints.join(", "),
        access_log.display()
    )
}

fn start_gateway(exe: &Path, config: &Path, log: &Path, netns: &Netns) -> anyhow::Result<Child> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(exe);
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .in_netns(netns);
    cmd.spawn().context("starting gateway run in the lab")
}

fn run(
    args: &DemoArgs,
    lab: &Lab,
    servers: &[HttpServer],
    names: &BTreeMap<SocketAddr, String>,
    access_log: &Path,
    gateway: &mut Child,
    gateway_log: &Path,
) -> anyhow::Result<ExitCode> {
    println!(
        "The fault lab: four upstreams in network namespaces, each serving HTTP on :{UPSTREAM_PORT}"
    );
    for (addr, name) in names {
        println!("  {name}  {addr}");
    }
    wait_ready(lab.client(), gateway, gateway_log)?;
    let log = std::fs::read_to_string(gateway_log).unwrap_or_default();
    let kernel = log.contains("kernel observer attached");
    println!(
        "\n`gateway run` serves on {LISTEN} in the lab's client namespace, {}.",
        if kernel {
            "with the kernel observer attached (every upstream connect joined to the kernel's record of it)"
        } else {
            "WITHOUT kernel signals (userspace timing only; see its log)"
        }
    );
    let page = relay_status_page(lab.client().clone());
    match &page {
        Ok(addr) => println!(
            "Status page (plots, timeline, evidence): http://{addr}/  — open it while the demo runs"
        ),
        Err(e) => println!("(the status page could not be relayed to the host: {e:#})"),
    }
    let step = args.fault_for + args.recover_for;
    let warmup = 3.0;
    let mut phases = schedule(args, warmup);
    let total = warmup + step * phases.len() as f64;
    println!(
        "\nLoad: {} GET/s for {total:.0} s. After {warmup:.0} s of warm-up one upstream at a time breaks for {:.0} s, then is repaired.\n",
        args.rate, args.fault_for
    );
    let rate = args.rate;
    let by_index: Vec<SocketAddr> = lab
        .upstreams()
        .iter()
        .map(|u| u.addr_v4(UPSTREAM_PORT))
        .collect();
    let tally = lab
        .client()
        .block_on(drive(
            rate,
            total,
            lab,
            servers,
            names,
            &by_index,
            access_log,
            &mut phases,
        ))
        .context("the demo's client namespace")??;
    for p in &mut phases {
        p.guard.take();
    }
    Ok(summary(&tally, &phases, names, &by_index, kernel))
}

/// One fault per upstream, in turn, from `warmup` on: each lasts `fault_for` seconds, and
/// `recover_for` seconds pass before the next.
fn schedule(args: &DemoArgs, warmup: f64) -> Vec<Phase> {
    let step = args.fault_for + args.recover_for;
    DemoFault::ALL
        .iter()
        .enumerate()
        .map(|(i, &fault)| {
            let start = warmup + i as f64 * step;
            Phase {
                fault,
                upstream: i,
                start,
                stop: start + args.fault_for,
                applied_unix_ms: None,
                cleared_unix_ms: None,
                guard: None,
                seen: Observed::default(),
                kept_shown: 0,
            }
        })
        .collect()
}

fn wait_ready(netns: &Netns, gateway: &mut Child, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = gateway.try_wait()? {
            bail!(
                "gateway run exited ({status}) before it was ready; its output:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        let ready = netns
            .block_on(async {
                let client: Client<_, Empty<Bytes>> =
                    Client::builder(TokioExecutor::new()).build_http();
                let uri = format!("http://{ADMIN}/readyz")
                    .parse::<hyper::Uri>()
                    .ok()?;
                let resp = tokio::time::timeout(Duration::from_secs(1), client.get(uri))
                    .await
                    .ok()?
                    .ok()?;
                Some(resp.status().is_success())
            })
            .ok()
            .flatten()
            .unwrap_or(false);
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "gateway run was not ready within {READY_TIMEOUT:?}; its output:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Relays a port on the host's loopback (9901 when free) to the admin listener in the lab's
/// client namespace, for the browser; returns the host address.
fn relay_status_page(netns: Netns) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, PAGE_PORT))
        .or_else(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .context("binding a loopback port for the status page")?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("demo-page-relay".to_owned())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let netns = netns.clone();
                std::thread::spawn(move || {
                    // The socket is created inside the namespace and keeps it.
                    let Ok(Ok(upstream)) = netns.run(|| TcpStream::connect(ADMIN)) else {
                        return;
                    };
                    let (Ok(mut c2), Ok(mut u2)) = (conn.try_clone(), upstream.try_clone()) else {
                        return;
                    };
                    let t = std::thread::spawn(move || {
                        let _ = std::io::copy(&mut c2, &mut u2);
                        let _ = u2.shutdown(std::net::Shutdown::Write);
                    });
                    let (mut conn, mut upstream) = (conn, upstream);
                    let _ = std::io::copy(&mut upstream, &mut conn);
                    let _ = conn.shutdown(std::net::Shutdown::Write);
                    let _ = t.join();
                });
            }
        })?;
    Ok(addr)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
