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
    let mut phases: Vec<Phase> = DemoFault::ALL
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
        .collect();
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

/// The load, the fault schedule and the live report, in the client namespace.
#[expect(
    clippy::too_many_arguments,
    reason = "the demo's pieces, borrowed from `run`"
)]
async fn drive(
    rate: u32,
    total: f64,
    lab: &Lab,
    servers: &[HttpServer],
    names: &BTreeMap<SocketAddr, String>,
    by_index: &[SocketAddr],
    access_log: &Path,
    phases: &mut [Phase],
) -> anyhow::Result<Tally> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Outcome>();
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .build_http();
    let started = Instant::now();
    // The load runs on a thread of its own (in the same namespace), so that a slow fault
    // injection (iptables waits for the host-wide xtables lock, which other labs may hold)
    // never holds the requests back.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        lab.client()
            .spawn_thread("demo-load", move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
                        .pool_idle_timeout(Duration::from_secs(5))
                        .build_http();
                    let mut inflight = tokio::task::JoinSet::new();
                    let mut tick =
                        tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                    while started.elapsed().as_secs_f64() < total && !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        let (client, tx) = (client.clone(), tx.clone());
                        inflight.spawn(async move {
                            let t = Instant::now();
                            let uri: hyper::Uri =
                                format!("http://{LISTEN}/demo").parse().expect("a URI");
                            let out =
                                match tokio::time::timeout(CLIENT_TIMEOUT, client.get(uri)).await {
                                    Ok(Ok(resp)) => {
                                        let status = resp.status().as_u16();
                                        let error = resp
                                            .headers()
                                            .get("x-gateway-error")
                                            .and_then(|v| v.to_str().ok())
                                            .unwrap_or("")
                                            .to_owned();
                                        let body = resp
                                            .into_body()
                                            .collect()
                                            .await
                                            .map(|b| {
                                                String::from_utf8_lossy(&b.to_bytes()).into_owned()
                                            })
                                            .unwrap_or_default();
                                        Outcome {
                                            latency: t.elapsed(),
                                            status: Some(status),
                                            error,
                                            body: body.lines().next().unwrap_or("").to_owned(),
                                        }
                                    }
                                    Ok(Err(e)) => Outcome {
                                        latency: t.elapsed(),
                                        status: None,
                                        error: String::new(),
                                        body: format!("client error: {e}"),
                                    },
                                    Err(_) => Outcome {
                                        latency: t.elapsed(),
                                        status: None,
                                        error: String::new(),
                                        body: format!("no answer within {CLIENT_TIMEOUT:?}"),
                                    },
                                };
                            let _ = tx.send(out);
                        });
                    }
                    // Every request sent gets its outcome (each ends within the client timeout).
                    while inflight.join_next().await.is_some() {}
                });
                std::io::Result::Ok(())
            })
            .context("starting the load in the client namespace")?
    };
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tally = Tally::default();
    let mut seen_changes: HashSet<(SocketAddr, u64, &'static str)> = HashSet::new();
    let mut deadlines_shown = false;
    let mut log = AccessLogTail::new(access_log);
    let mut second = Vec::<Outcome>::new();
    let mut next_line = 1.0;
    let mut failures_shown = 0usize;
    let mut interrupted = false;
    let mut poll = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            _ = poll.tick() => {}
            _ = sigint.recv() => interrupted = true,
            _ = sigterm.recv() => interrupted = true,
        }
        if interrupted {
            println!("\ninterrupted: cleaning up the lab");
            break;
        }
        let t = started.elapsed().as_secs_f64();
        // The fault schedule.
        for p in phases.iter_mut() {
            if p.applied_unix_ms.is_none() && t >= p.start {
                let up = &lab.upstreams()[p.upstream];
                match p.fault {
                    DemoFault::SlowBackend => {
                        servers[p.upstream].set_behaviour(HttpBehaviour::slow(SLOW_BACKEND))
                    }
                    f => p.guard = Some(up.apply(net_fault(f)).context("injecting a fault")?),
                }
                // Time to eject counts from when the fault is in place.
                p.applied_unix_ms = Some(unix_ms());
                let t = started.elapsed().as_secs_f64();
                println!(
                    "\n{t:6.2} s  ✂  {} {}: {}\n           {}",
                    up.name(),
                    up.addr_v4(UPSTREAM_PORT),
                    p.fault,
                    p.fault.expectation()
                );
            }
            if p.applied_unix_ms.is_some() && p.cleared_unix_ms.is_none() && t >= p.stop {
                let up = &lab.upstreams()[p.upstream];
                p.cleared_unix_ms = Some(unix_ms());
                match p.fault {
                    DemoFault::SlowBackend => {
                        servers[p.upstream].set_behaviour(HttpBehaviour::immediate())
                    }
                    _ => {
                        if let Some(g) = p.guard.take() {
                            g.clear().context("removing a fault")?;
                        }
                    }
                }
                println!("{t:6.2} s  ✔  {} repaired", up.name());
            }
        }
        // What the clients got.
        while let Ok(o) = rx.try_recv() {
            tally.sent += 1;
            match (o.status, o.error.is_empty()) {
                (Some(200), _) => tally.ok += 1,
                (Some(_), false) => {
                    tally.explained += 1;
                    if failures_shown < 6 {
                        failures_shown += 1;
                        println!(
                            "{t:6.2} s  ✗  client got {} {}: {}",
                            o.status.unwrap_or(0),
                            o.error,
                            clip(&o.body, 200)
                        );
                    }
                }
                _ => {
                    tally.unexplained += 1;
                    println!(
                        "{t:6.2} s  ✗  UNEXPLAINED failure ({}): {}",
                        o.status.map_or("no status".to_owned(), |s| s.to_string()),
                        clip(&o.body, 200)
                    );
                }
            }
            second.push(o);
        }
        // Requests that a failed attempt or a hedge kept from failing.
        for line in log.new_lines() {
            if line["status"] != 200 {
                continue;
            }
            let errors: Vec<&str> = line["attempt_errors"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            let hedged = line["hedged"] == true;
            let failed: Vec<(usize, &str)> = errors
                .iter()
                .copied()
                .enumerate()
                .filter(|(_, e)| *e != "-")
                .collect();
            if failed.is_empty() && !hedged {
                continue;
            }
            tally.kept += 1;
            let endpoints: Vec<String> = line["endpoints"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str())
                        .map(|s| {
                            s.parse::<SocketAddr>()
                                .ok()
                                .and_then(|a| names.get(&a).cloned())
                                .unwrap_or_else(|| s.to_owned())
                        })
                        .collect()
                })
                .unwrap_or_default();
            if let Some(p) = phases
                .iter_mut()
                .rev()
                .find(|p| p.applied_unix_ms.is_some())
                && p.kept_shown < KEPT_SHOWN
            {
                p.kept_shown += 1;
                let mut s = String::new();
                for (i, e) in &failed {
                    let _ = write!(s, "{} {e}, ", endpoints.get(*i).map_or("?", String::as_str));
                }
                let _ = write!(
                    s,
                    "{} → 200 from {}",
                    if hedged { "hedged" } else { "retried" },
                    endpoints.last().map_or("?", String::as_str)
                );
                println!("{t:6.2} s  ↻  request kept from failing: {s}");
            }
        }
        // What the gateway decided.
        if let Some(status) = fetch_status(&client).await {
            let Some(cluster) = status.clusters.first() else {
                continue;
            };
            if !deadlines_shown
                && cluster.endpoints.iter().all(|e| {
                    e.connect_deadline_source
                        == crate::proxy::admin::status::ConnectDeadlineSource::Measured
                })
            {
                deadlines_shown = true;
                let list: Vec<String> = cluster
                    .endpoints
                    .iter()
                    .map(|e| {
                        format!(
                            "{} {:.0} ms (SYN-RTT p99 {})",
                            names.get(&e.address).map_or("?", String::as_str),
                            e.connect_deadline_ms,
                            e.syn_rtt
                                .p99_us
                                .map_or("-".to_owned(), |u| format!("{:.2} ms", u as f64 / 1e3))
                        )
                    })
                    .collect();
                println!(
                    "{t:6.2} s  ⏱  connect deadlines measured from the kernel's SYN-RTT (instead of the {CONNECT_TIMEOUT_MS} ms timeout): {}",
                    list.join(", ")
                );
            }
            for ep in &cluster.endpoints {
                let name = names.get(&ep.address).map_or("?", String::as_str);
                let index = by_index.iter().position(|a| *a == ep.address);
                for c in &ep.history.changes {
                    if !seen_changes.insert((ep.address, c.at_unix_ms, c.event.name())) {
                        continue;
                    }
                    let phase = index.and_then(|i| phases.iter_mut().find(|p| p.upstream == i));
                    let mark = match c.event {
                        HealthEventKind::Ejected => "⛔",
                        HealthEventKind::Recovered => "✅",
                        HealthEventKind::Suspect => "⚠ ",
                        _ => "· ",
                    };
                    if let Some(p) = phase {
                        if let Some(applied) = p.applied_unix_ms {
                            record(p, applied, c.event, c.reason, c.at_unix_ms);
                        } else if c.event == HealthEventKind::Ejected {
                            // An ejection of an endpoint nobody broke yet.
                            if let Some(r) = c.reason {
                                p.seen.wrong_reasons.push(r);
                            }
                        }
                    }
                    if c.event == HealthEventKind::Probing {
                        continue;
                    }
                    println!(
                        "{t:6.2} s  {mark} {name} {}{}{}: {}",
                        c.event.name(),
                        c.reason.map_or(String::new(), |r| format!(" {}", r.name())),
                        if c.event == HealthEventKind::Ejected {
                            ep.ejected_until_unix_ms
                                .map(|u| {
                                    format!(
                                        " for {:.1} s",
                                        u.saturating_sub(c.at_unix_ms) as f64 / 1e3
                                    )
                                })
                                .unwrap_or_default()
                        } else {
                            String::new()
                        },
                        clip(&c.detail, 240)
                    );
                }
                if let Some(i) = index
                    && let Some(p) = phases.iter_mut().find(|p| p.upstream == i)
                    && let Some(applied) = p.applied_unix_ms
                {
                    let from = applied / 1000;
                    let s = &ep.history.series;
                    p.seen.hedges = s
                        .hedges
                        .iter()
                        .enumerate()
                        .filter(|(k, _)| s.first_unix_s + *k as u64 >= from)
                        .map(|(_, h)| u64::from(*h))
                        .sum();
                }
            }
            if t >= next_line {
                next_line += 1.0;
                println!("{}", second_line(t, &second, cluster, names));
                second.clear();
            }
        }
        if t >= total + 0.5 {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    // The requests still in flight: wait for them (at most the client timeout), until the
    // load thread and its requests have all hung up.
    let drain_until = Instant::now() + CLIENT_TIMEOUT + Duration::from_secs(1);
    while !interrupted && Instant::now() < drain_until {
        match tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
            Ok(Some(o)) => {
                tally.sent += 1;
                match (o.status, o.error.is_empty()) {
                    (Some(200), _) => tally.ok += 1,
                    (Some(_), false) => tally.explained += 1,
                    _ => tally.unexplained += 1,
                }
            }
            _ => break,
        }
    }
    // Its last requests ended (or timed out) above.
    let _ = load.join();
    if interrupted {
        bail!("interrupted");
    }
    Ok(tally)
}

/// Folds one health change of a broken endpoint into its phase's observations.
fn record(
    p: &mut Phase,
    applied_unix_ms: u64,
    event: HealthEventKind,
    reason: Option<Reason>,
    at_unix_ms: u64,
) {
    match event {
        HealthEventKind::Ejected => {
            if let Some(r) = reason {
                p.seen.ejected(
                    p.fault,
                    r,
                    at_unix_ms.saturating_sub(applied_unix_ms) as f64 / 1e3,
                );
            }
        }
        HealthEventKind::Recovered => {
            if let Some(cleared) = p.cleared_unix_ms
                && at_unix_ms >= cleared
            {
                p.seen.recovered_after = Some((at_unix_ms - cleared) as f64 / 1e3);
            }
        }
        _ => {}
    }
}

fn net_fault(f: DemoFault) -> Fault {
    let port = UPSTREAM_PORT;
    match f {
        DemoFault::Blackhole => Fault::Blackhole { port },
        DemoFault::Refuse => Fault::Refuse { port },
        DemoFault::SlowAccept => Fault::SynAckDelay {
            port,
            delay: SYN_ACK_DELAY,
        },
        // Not a network fault: the server's behaviour changes.
        DemoFault::SlowBackend => Fault::Refuse { port },
    }
}

async fn fetch_status(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
) -> Option<Status> {
    let uri: hyper::Uri = format!("http://{ADMIN}/status").parse().ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(1), client.get(uri))
        .await
        .ok()?
        .ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&body).ok()
}

/// The once-a-second line: the clients' last second and each endpoint's state and deadline.
fn second_line(
    t: f64,
    last: &[Outcome],
    cluster: &crate::proxy::admin::status::ClusterStatus,
    names: &BTreeMap<SocketAddr, String>,
) -> String {
    let ok = last.iter().filter(|o| o.status == Some(200)).count();
    let mut lat: Vec<Duration> = last.iter().map(|o| o.latency).collect();
    lat.sort();
    let p99 = lat
        .get((lat.len() * 99 / 100).min(lat.len().saturating_sub(1)))
        .map_or("-".to_owned(), |d| {
            format!("{:.1} ms", d.as_secs_f64() * 1e3)
        });
    let mut s = format!(
        "{t:6.2} s  │ {:>3} req  {:>3} ok  {:>2} failed  p99 {p99:>8} │",
        last.len(),
        ok,
        last.len() - ok
    );
    for e in &cluster.endpoints {
        let name = names
            .get(&e.address)
            .map_or("?", String::as_str)
            .trim_start_matches("upstream-");
        let state = match e.state {
            State::Healthy => "ok",
            State::Slow => "SLOW",
            State::Suspect => "suspect",
            State::Ejected => "EJECTED",
            State::Probing => "probing",
        };
        let _ = write!(s, " u{name} {state} {:.0}ms", e.connect_deadline_ms);
    }
    s
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut c: String = s.chars().take(n).collect();
        c.push('…');
        c
    }
}

/// The JSON access log, read from where the last read stopped.
struct AccessLogTail {
    path: PathBuf,
    offset: u64,
}

impl AccessLogTail {
    fn new(path: &Path) -> AccessLogTail {
        AccessLogTail {
            path: path.to_path_buf(),
            offset: 0,
        }
    }

    fn new_lines(&mut self) -> Vec<serde_json::Value> {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut reader = BufReader::new(f);
        let mut line = String::new();
        while let Ok(n) = reader.read_line(&mut line) {
            // A partial last line is read again next time.
            if n == 0 || !line.ends_with('\n') {
                break;
            }
            self.offset += n as u64;
            if let Ok(v) = serde_json::from_str(&line) {
                out.push(v);
            }
            line.clear();
        }
        out
    }
}

fn summary(
    tally: &Tally,
    phases: &[Phase],
    names: &BTreeMap<SocketAddr, String>,
    by_index: &[SocketAddr],
    kernel: bool,
) -> ExitCode {
    println!("\nSummary");
    println!(
        "  requests: {} sent, {} answered 200 ({} of them kept from failing by a retry or a hedge)",
        tally.sent, tally.ok, tally.kept
    );
    println!(
        "  failures the clients saw: {} — {} explained by the gateway (x-gateway-error with the kernel's evidence), {} unexplained",
        tally.failed(),
        tally.explained,
        tally.unexplained
    );
    println!(
        "\n  {:<14} {:<11} {:<25} {:<11} gateway's decision",
        "fault", "upstream", "time to eject", "back after"
    );
    let mut missed = 0;
    for p in phases {
        let name = names.get(&by_index[p.upstream]).map_or("?", String::as_str);
        let verdict = judge(p.fault, &p.seen);
        let eject = p.seen.first_ejection.map_or("-".to_owned(), |(s, r)| {
            format!("{:.2} s ({})", s, r.name())
        });
        let back = p
            .seen
            .recovered_after
            .map_or("-".to_owned(), |s| format!("{s:.2} s"));
        missed += usize::from(!verdict.explained());
        let (mark, words) = match &verdict {
            Verdict::Explained(w) => ("✓", w.clone()),
            Verdict::Missed(w) => ("✗", format!("MISSED: {w}")),
        };
        println!(
            "  {mark} {:<12} {:<11} {:<25} {:<11} {words}",
            p.fault.short(),
            name,
            eject,
            back
        );
    }
    if !kernel {
        println!("\n  (no kernel signals: the gateway decided on userspace timing alone)");
    }
    if missed > 0 || tally.unexplained > 0 {
        println!(
            "\n{missed} fault(s) missed, {} unexplained failure(s)",
            tally.unexplained
        );
        return ExitCode::FAILURE;
    }
    println!("\nEvery fault was explained by the gateway's decisions.");
    ExitCode::SUCCESS
}
