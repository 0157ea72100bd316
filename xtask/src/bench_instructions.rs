//! `cargo xtask bench instructions`: user-space instructions per proxied request, counted by
//! valgrind's callgrind, for the gateway, the bare hyper proxy beside it
//! (floor/src/main.rs), and nginx and HAProxy with `bench proxy`'s configs.
//!
//! Rates and CPU time on a shared two-core machine move by several per cent from run to run;
//! an instruction count moves by a few per mille, so a change of 1 % in the request path shows.
//! Each proxy runs alone under callgrind with one worker (`[router] workers = 1`; the floor
//! with one thread; nginx `worker_processes 1` with `master_process off`, so that the one
//! process valgrind follows is the one serving; HAProxy `nbthread 1`) in front of the three
//! `return 200` nginx upstreams of `bench proxy`; `wrk -c C` drives it for a warm-up with
//! instrumentation off (as long as the measurement, at most 3 s), then for `--duration`
//! seconds with it on. The report: instructions per request of each, the gateway's against
//! each other, and the gateway's functions with the most instructions of their own. Kernel
//! time is not counted: `bench proxy` measures that.
//!
//! `--h2`: the HTTP/2-upstream path of `bench proxy`'s h2 row instead (h2load -c4 -m8 with
//! prior knowledge, one h2c nginx upstream; the gateway with `protocol = "h2c"`, nginx with
//! `grpc_pass`, HAProxy with `proto h2`; there is no hyper floor for it).
//!
//! `--tls`: HTTPS keep-alive instead, as in `bench tls` (the same ECDSA P-256 certificate for
//! the three; the hyper floor speaks no TLS and is left out). Crypto libraries choose their
//! code by the CPU features they find, and valgrind's CPU reports fewer than the real one, so
//! the TLS part of each count is that of a plainer code path than the one run natively.
//!
//! Options: `--duration S` (10), `--connections C` (8), `--top N` (25), `--gateway-bin PATH`,
//! `--no-peers` (the gateway and the floor only), `--h2`, `--tls`, `--keep` (keep the
//! callgrind dumps and say where). Needs valgrind, which `./dev` setup installs.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    Proc,
    bench::{self, Load, Scheme},
};

/// The command line's options.
struct Opts {
    duration: u64,
    connections: usize,
    top: usize,
    gateway_bin: Option<PathBuf>,
    peers: bool,
    h2: bool,
    tls: bool,
    /// Keep the working directory (the callgrind dumps, for `callgrind_annotate`).
    keep: bool,
}

impl Opts {
    fn parse(args: &[String]) -> anyhow::Result<Opts> {
        let mut o = Opts {
            duration: 10,
            connections: 8,
            top: 25,
            gateway_bin: None,
            peers: true,
            h2: false,
            tls: false,
            keep: false,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || it.next().with_context(|| format!("{a} needs a value"));
            match a.as_str() {
                "--duration" => o.duration = value()?.parse()?,
                "--connections" => o.connections = value()?.parse()?,
                "--top" => o.top = value()?.parse()?,
                "--gateway-bin" => o.gateway_bin = Some(value()?.into()),
                "--no-peers" => o.peers = false,
                "--h2" => o.h2 = true,
                "--tls" => o.tls = true,
                "--keep" => o.keep = true,
                other => bail!("unknown option {other}"),
            }
        }
        Ok(o)
    }
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let o = Opts::parse(args)?;
    bench::require("valgrind", "valgrind")?;
    bench::require("wrk", "wrk")?;
    bench::require("nginx", "nginx-light")?;
    let gateway = crate::release_gateway(o.gateway_bin.as_deref())?;
    let dir = std::env::temp_dir().join(format!("gateway-bench-instr-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    if o.h2 {
        run_h2(&o, &gateway, &dir)?;
    } else {
        run_h1(&o, &gateway, &dir)?;
    }
    if o.keep {
        println!("callgrind dumps kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// HTTP/1 keep-alive (plain, or HTTPS with `--tls`), with the hyper floor when plain.
fn run_h1(o: &Opts, gateway: &Path, dir: &Path) -> anyhow::Result<()> {
    let tls = if o.tls {
        bench::require("openssl", "openssl")?;
        Some(crate::bench_tls::certificate(dir)?)
    } else {
        None
    };
    let (scheme, floor) = match tls {
        Some(_) => (Scheme::Https, None),
        None => (Scheme::Http, Some(crate::release_floor()?)),
    };
    let (upstreams, ups) = start_upstreams(dir)?;
    let load = Load {
        name: "keep-alive",
        threads: 1,
        connections: o.connections,
        headers: Vec::new(),
    };
    let drive = Drive::Wrk(&load, scheme);
    let gw_port = bench::free_port()?;
    let gw_conf = crate::bench_peers::gateway_conf(gw_port, &ups, tls.as_ref());
    let gw = measure_gateway(dir, gateway, &gw_conf, gw_port, drive, o.duration)?;
    let mut others = Vec::new();
    if let Some(floor) = floor {
        let floor_port = bench::free_port()?;
        let floor_args: Vec<String> = std::iter::once(floor_port)
            .chain(ups.iter().copied())
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        others.push(measure(
            dir,
            "hyper-floor",
            &floor,
            &floor_args,
            floor_port,
            drive,
            o.duration,
        )?);
    }
    if o.peers {
        let ports = [bench::free_port()?, bench::free_port()?];
        let confs = (
            crate::bench_peers::nginx_conf(dir, ports[0], &ups, tls.as_ref()),
            crate::bench_peers::haproxy_conf(ports[1], &ups, tls.as_ref()),
        );
        others.extend(measure_peers(dir, confs, ports, drive, o.duration)?);
    }
    drop(upstreams);
    println!(
        "bench instructions: callgrind, one worker, wrk -t1 -c{} -d{}s keep-alive{}, upstreams 127.0.0.1:{{{}}}",
        o.connections,
        o.duration,
        if tls.is_some() {
            " over TLS (ECDSA P-256)"
        } else {
            ""
        },
        ups.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
    );
    report(&gw, &others, o.top);
    Ok(())
}

/// `--h2`: the gateway, nginx and HAProxy in front of one h2c nginx upstream, as in `bench
/// proxy`'s HTTP/2 row, under h2load.
fn run_h2(o: &Opts, gateway: &Path, dir: &Path) -> anyhow::Result<()> {
    use crate::bench_proxy_h2 as h2;
    bench::require("h2load", "nghttp2-client")?;
    let up = bench::free_port()?;
    let up_conf = dir.join("h2-upstream.conf");
    std::fs::write(&up_conf, h2::upstream_conf(dir, up))?;
    let mut upstream = bench::spawn_proc(
        "h2c upstream (nginx)",
        &mut crate::bench_peers::nginx_command(dir, &up_conf),
    )?;
    crate::bench_peers::wait_listening("h2c upstream", up, &mut upstream)?;
    let (clients, streams) = (4, 8);
    let drive = Drive::H2load(clients, streams);
    let port = bench::free_port()?;
    let gw = measure_gateway(
        dir,
        gateway,
        &h2::gateway_conf(port, up),
        port,
        drive,
        o.duration,
    )?;
    let peers = if o.peers {
        let ports = [bench::free_port()?, bench::free_port()?];
        let confs = (
            h2::nginx_conf(dir, ports[0], up),
            h2::haproxy_conf(ports[1], up, bench::cores()),
        );
        measure_peers(dir, confs, ports, drive, o.duration)?
    } else {
        Vec::new()
    };
    drop(upstream);
    println!(
        "bench instructions --h2: callgrind, one worker, h2load -c{clients} -m{streams} -D{}s with prior knowledge, one h2c upstream 127.0.0.1:{up}",
        o.duration
    );
    report(&gw, &peers, o.top);
    Ok(())
}

/// The gateway with `conf` (a `bench proxy` config, cut to one worker) under callgrind.
fn measure_gateway(
    dir: &Path,
    gateway: &Path,
    conf: &str,
    port: u16,
    drive: Drive,
    duration: u64,
) -> anyhow::Result<Measured> {
    let one = conf.replacen("[router]\n", "[router]\nworkers = 1\n", 1);
    if one == conf {
        bail!("bench instructions: the gateway's config has no [router] table");
    }
    let path = dir.join("gateway.toml");
    std::fs::write(&path, one)?;
    let args = [
        "run".to_owned(),
        "--config".to_owned(),
        path.display().to_string(),
    ];
    measure(dir, "gateway", gateway, &args, port, drive, duration)
}

/// nginx and HAProxy with `bench proxy`'s configs (listening on `ports`), cut to one worker
/// process or thread.
fn measure_peers(
    dir: &Path,
    (nginx_conf, haproxy_conf): (String, String),
    ports: [u16; 2],
    drive: Drive,
    duration: u64,
) -> anyhow::Result<Vec<Measured>> {
    bench::require("haproxy", "haproxy")?;
    let conf = dir.join("nginx.conf");
    let one = nginx_conf.replacen(
        "worker_processes auto;",
        "worker_processes 1;\nmaster_process off;",
        1,
    );
    if one == nginx_conf {
        bail!("bench instructions: nginx's config no longer says `worker_processes auto`");
    }
    std::fs::write(&conf, one)?;
    let args = vec![
        "-p".to_owned(),
        dir.display().to_string(),
        "-c".to_owned(),
        conf.display().to_string(),
        "-e".to_owned(),
        "stderr".to_owned(),
    ];
    let nginx = crate::tool_path("nginx");
    let ngx = measure(
        dir,
        "nginx",
        Path::new(&nginx),
        &args,
        ports[0],
        drive,
        duration,
    )?;

    let cfg = dir.join("haproxy.cfg");
    let nbthread = format!("nbthread {}", bench::cores());
    if !haproxy_conf.contains(&nbthread) {
        bail!("bench instructions: HAProxy's config no longer says `{nbthread}`");
    }
    std::fs::write(&cfg, haproxy_conf.replacen(&nbthread, "nbthread 1", 1))?;
    let args = vec!["-db".to_owned(), "-f".to_owned(), cfg.display().to_string()];
    let haproxy = crate::tool_path("haproxy");
    let hap = measure(
        dir,
        "haproxy",
        Path::new(&haproxy),
        &args,
        ports[1],
        drive,
        duration,
    )?;
    Ok(vec![ngx, hap])
}

/// The three `return 200` nginx upstreams of `bench proxy`, and their ports.
fn start_upstreams(dir: &Path) -> anyhow::Result<(Proc, Vec<u16>)> {
    let ups: Vec<u16> = (0..3)
        .map(|_| bench::free_port())
        .collect::<Result<_, _>>()?;
    let conf = dir.join("upstreams.conf");
    std::fs::write(&conf, crate::bench_peers::upstreams_conf(dir, &ups))?;
    let mut proc = bench::spawn_proc(
        "upstreams (nginx)",
        &mut crate::bench_peers::nginx_command(dir, &conf),
    )?;
    for p in &ups {
        bench::wait_ready("upstream", Scheme::Http, *p, &mut proc)?;
    }
    Ok((proc, ups))
}

/// The table, the gateway against each of the `others`, the floor against the peers, and the
/// gateway's `top` functions by their own instructions.
fn report(gw: &Measured, others: &[Measured], top: usize) {
    println!("{:<12} {:>10} {:>16}", "proxy", "requests", "instr/request");
    for m in std::iter::once(gw).chain(others) {
        println!(
            "{:<12} {:>10} {:>16.0}",
            m.name,
            m.requests,
            m.per_request()
        );
    }
    let floor = others.iter().find(|m| m.name == "hyper-floor");
    for m in others {
        println!(
            "gateway / {}: {:.2}x ({:+.0} instructions per request)",
            m.name,
            gw.per_request() / m.per_request(),
            gw.per_request() - m.per_request()
        );
    }
    if let Some(fl) = floor {
        for m in others.iter().filter(|m| m.name != fl.name) {
            println!(
                "hyper-floor / {}: {:.2}x",
                m.name,
                fl.per_request() / m.per_request()
            );
        }
    }
    println!("gateway, functions by their own instructions per request:");
    let mut fns: Vec<(&String, &u64)> = gw.own.iter().collect();
    fns.sort_by(|a, b| b.1.cmp(a.1));
    for (name, ir) in fns.into_iter().take(top) {
        println!(
            "  {:>8.0}  {}",
            *ir as f64 / gw.requests as f64,
            short_name(name)
        );
    }
}

/// One proxy's count.
struct Measured {
    name: &'static str,
    requests: u64,
    total: u64,
    /// Instructions of each function's own (its callees' not included).
    own: HashMap<String, u64>,
}

impl Measured {
    fn per_request(&self) -> f64 {
        self.total as f64 / self.requests.max(1) as f64
    }
}

/// The load a proxy is measured under.
#[derive(Clone, Copy)]
enum Drive<'a> {
    /// wrk, HTTP/1.1 keep-alive, over plain TCP or TLS.
    Wrk(&'a Load, Scheme),
    /// h2load with prior knowledge: clients, streams each.
    H2load(usize, usize),
}

impl Drive<'_> {
    /// Runs the load for `secs` against `port`: the requests answered, and how many failed.
    fn run(self, port: u16, secs: u64) -> anyhow::Result<(u64, u64)> {
        match self {
            Drive::Wrk(load, scheme) => {
                let s = bench::wrk(load, &bench::url(scheme, port), secs, &[])?;
                Ok((s.requests, s.errors))
            }
            Drive::H2load(clients, streams) => {
                let s = crate::bench_proxy_h2::h2load(port, secs, clients, streams, &[])?;
                Ok((s.ok, s.failed))
            }
        }
    }
}

/// Runs `bin args` under callgrind, instrumentation off until the warm-up is over, then
/// counts what `duration` seconds of load cost it.
fn measure(
    dir: &Path,
    name: &'static str,
    bin: &Path,
    args: &[String],
    port: u16,
    drive: Drive,
    duration: u64,
) -> anyhow::Result<Measured> {
    let out = dir.join(format!("{name}.callgrind"));
    let mut proc = bench::spawn_proc(
        name,
        Command::new("valgrind")
            .args(["--tool=callgrind", "--instr-atstart=no", "--quiet"])
            .arg(format!("--callgrind-out-file={}", out.display()))
            .arg(bin)
            .args(args)
            .env("RUST_LOG", "warn")
            .stderr(std::fs::File::create(dir.join(format!("{name}.err")))?),
    )?;
    match drive {
        Drive::Wrk(_, scheme) => wait_answering(name, scheme, port, &mut proc)?,
        // h2c-only listeners answer no HTTP/1 probe.
        Drive::H2load(..) => crate::bench_peers::wait_listening(name, port, &mut proc)?,
    }
    warm_up(drive, port, duration.min(3))?;
    control(&proc, "--instr=on")?;
    let (requests, errors) = drive.run(port, duration)?;
    control(&proc, "--dump")?;
    proc.check_alive()?;
    drop(proc);
    if errors > 0 {
        bail!("{name}: {errors} errors under callgrind");
    }
    if requests == 0 {
        bail!("{name}: the load completed no request under callgrind");
    }
    let dump = dir.join(format!("{name}.callgrind.1"));
    let text = std::fs::read_to_string(&dump)
        .with_context(|| format!("reading callgrind's dump {}", dump.display()))?;
    let (total, own) = parse(&text)?;
    Ok(Measured {
        name,
        requests,
        total,
        own,
    })
}

/// Warm-up: as long as the measurement, at most 3 s (`./dev test`'s short run is 1 s), and
/// until the load has completed a request: under callgrind, eight TLS handshakes can take
/// longer than a second (a run of `./dev test` on a fresh machine saw none completed in 1 s).
fn warm_up(drive: Drive, port: u16, secs: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // wrk fails a run that completed no request ("could not read wrk's output").
        match drive.run(port, secs) {
            Ok((n, _)) if n > 0 => return Ok(()),
            Ok(_) | Err(_) if Instant::now() < deadline => continue,
            Ok(_) => bail!("the warm-up completed no request within 60 s under callgrind"),
            Err(e) => return Err(e.context("the warm-up completed no request within 60 s")),
        }
    }
}

/// Waits until `port` answers 200: under callgrind a start takes seconds.
fn wait_answering(name: &str, scheme: Scheme, port: u16, proc: &mut Proc) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        proc.check_alive()?;
        if bench::wait_ready(name, scheme, port, proc).is_ok() {
            return Ok(());
        }
    }
    bail!("{name} did not answer under callgrind within 120 s")
}

/// `callgrind_control OPTION PID`.
fn control(proc: &Proc, option: &str) -> anyhow::Result<()> {
    let st = Command::new("callgrind_control")
        .arg(option)
        .arg(proc.pid().to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .context("callgrind_control")?;
    if !st.success() {
        bail!("callgrind_control {option} failed: {st}");
    }
    Ok(())
}

/// The dump's total (its `summary:` or `totals:` line) and each function's own cost. In the
/// format, `fn=(id) name` opens a function (later `fn=(id)` alone names it again), a line of
/// numbers is a cost of the current function, except the one after `calls=`, which is the
/// inclusive cost of that call and belongs to the callee.
fn parse(text: &str) -> anyhow::Result<(u64, HashMap<String, u64>)> {
    let mut names: HashMap<String, String> = HashMap::new();
    let mut own: HashMap<String, u64> = HashMap::new();
    let mut total = None;
    let mut current = String::new();
    let mut after_call = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("fn=") {
            current = compressed_name(rest, &mut names);
        } else if let Some(rest) = line.strip_prefix("cfn=") {
            compressed_name(rest, &mut names);
        } else if line.starts_with("calls=") {
            after_call = true;
        } else if let Some(rest) = line
            .strip_prefix("summary:")
            .or_else(|| line.strip_prefix("totals:"))
        {
            total = rest.split_whitespace().next().and_then(|n| n.parse().ok());
        } else if line.starts_with(|c: char| c.is_ascii_digit() || "+-*".contains(c)) {
            if std::mem::take(&mut after_call) {
                continue;
            }
            if let Some(ir) = line
                .split_whitespace()
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok())
            {
                *own.entry(current.clone()).or_default() += ir;
            }
        }
    }
    let total = total.context("no summary line in callgrind's dump")?;
    Ok((total, own))
}

/// `(id) name` defines an id, `(id)` reuses it.
fn compressed_name(s: &str, names: &mut HashMap<String, String>) -> String {
    let s = s.trim();
    match s.strip_prefix('(').and_then(|r| r.split_once(')')) {
        Some((id, "")) => names.get(id).cloned().unwrap_or_else(|| s.to_owned()),
        Some((id, name)) => {
            let name = name.trim().to_owned();
            names.insert(id.to_owned(), name.clone());
            name
        }
        None => s.to_owned(),
    }
}

/// A symbol without its generic arguments, cut to a line.
fn short_name(name: &str) -> String {
    let mut out = String::new();
    let mut depth = 0u32;
    for c in name.chars() {
        match c {
            '<' => depth += 1,
            '>' => depth = depth.saturating_sub(1),
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out.chars().take(110).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_costs_leave_out_calls_and_names_are_decompressed() {
        let dump = "events: Ir\nfn=(1) main\n1 10\ncfn=(2) work\ncalls=1 0\n1 100\n2 5\nfn=(2)\n3 100\nsummary: 115\n";
        let (total, own) = parse(dump).unwrap();
        assert_eq!(total, 115);
        assert_eq!(own["main"], 15);
        assert_eq!(own["work"], 100);
    }

    #[test]
    fn generic_arguments_are_left_out_of_names() {
        assert_eq!(
            short_name("<hyper::Conn<T, B>>::poll_read::<X>"),
            "::poll_read::"
        );
    }
}
