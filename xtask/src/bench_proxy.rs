//! `cargo xtask bench proxy`: the gateway against nginx and HAProxy, in one run, on loopback.
//!
//! Three upstreams (one nginx process, one worker, three `return 200` servers) sit behind each
//! proxy, configured alike: keep-alive pools to the upstreams, round robin, no access log,
//! `X-Forwarded-For` added. Each proxy gets the machine's cores (gateway: tokio's default
//! worker count; nginx: `worker_processes auto`; HAProxy: `nbthread` = cores). `wrk` drives
//! each one in turn; repetitions are interleaved, in a rotating order, so that drift in the
//! machine's state is spread over all three. The table shows medians of req/s and of p50/p99
//! latency, the ratios gateway/nginx and gateway/HAProxy, and the gateway's peak RSS. It also
//! shows each proxy's CPU time per request, which is steadier than req/s on a shared machine.
//!
//! This is a benchmark, not a test: it asserts nothing, it reports. Options:
//! `--reps N` (5), `--duration S` (10), `--warmup S` (3), `--connections C` (64),
//! `--wrk-threads T` (1), `--gateway-bin PATH` (default: build `--release`),
//! `--policy P` (the gateway's `lb_policy`, default `round_robin` like the peers),
//! `--also-policy P` (a second gateway with that `lb_policy`, measured in the same rotation:
//! `--policy round_robin --also-policy peak_ewma` compares the two on a healthy pool).

use crate::Proc;
use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

struct Options {
    reps: usize,
    duration: u64,
    warmup: u64,
    connections: usize,
    wrk_threads: usize,
    gateway_bin: Option<PathBuf>,
    policy: String,
    also_policy: Option<String>,
}

fn parse(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options {
        reps: 5,
        duration: 10,
        warmup: 3,
        connections: 64,
        wrk_threads: 1,
        gateway_bin: None,
        policy: "round_robin".to_owned(),
        also_policy: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--reps" => o.reps = val()?.parse().context("--reps")?,
            "--duration" => o.duration = val()?.parse().context("--duration")?,
            "--warmup" => o.warmup = val()?.parse().context("--warmup")?,
            "--connections" => o.connections = val()?.parse().context("--connections")?,
            "--wrk-threads" => o.wrk_threads = val()?.parse().context("--wrk-threads")?,
            "--gateway-bin" => o.gateway_bin = Some(PathBuf::from(val()?)),
            "--policy" => o.policy = val()?.to_owned(),
            "--also-policy" => o.also_policy = Some(val()?.to_owned()),
            other => bail!(
                "unknown option {other}; options: --reps N --duration S --warmup S --connections C --wrk-threads T --gateway-bin PATH --policy P --also-policy P"
            ),
        }
    }
    if o.reps == 0 || o.duration == 0 {
        bail!("--reps and --duration must be at least 1");
    }
    Ok(o)
}

/// Starts `cmd` as a [`Proc`] (stopped with SIGTERM, then SIGKILL after 3 s, when dropped).
fn spawn_proc(name: &'static str, cmd: &mut Command) -> anyhow::Result<Proc> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {name}: {cmd:?}"))?;
    Ok(Proc::new(name, child, Duration::from_secs(3)))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until `GET /` on `port` answers 200.
fn wait_ready(name: &str, port: u16, proc: &mut Proc) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        proc.check_alive()?;
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.write_all(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200") {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{name} on port {port} did not answer 200 within 15 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn require(tool: &str, package: &str) -> anyhow::Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(tool).is_file();
    if !found {
        bail!("`{tool}` not found; install it with: apt-get install -y {package}");
    }
    Ok(())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn gateway_binary(o: &Options) -> anyhow::Result<PathBuf> {
    crate::release_gateway(o.gateway_bin.as_deref())
}

fn upstreams_conf(dir: &Path, ports: &[u16]) -> String {
    let mut servers = String::new();
    for p in ports {
        let _ = writeln!(
            servers,
            "  server {{ listen 127.0.0.1:{p} backlog=4096; keepalive_requests 1000000; location / {{ return 200 \"hello from {p}\\n\"; }} }}"
        );
    }
    format!(
        "worker_processes 1;\ndaemon off;\npid {d}/upstreams.pid;\nerror_log {d}/upstreams.err warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n{servers}}}\n",
        d = dir.display()
    )
}

fn nginx_conf(dir: &Path, port: u16, ups: &[u16]) -> String {
    let servers: String = ups
        .iter()
        .map(|p| format!("    server 127.0.0.1:{p};\n"))
        .collect();
    format!(
        "worker_processes auto;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  upstream backend {{\n{servers}    keepalive 128;\n  }}\n  server {{\n    listen 127.0.0.1:{port} backlog=4096;\n    keepalive_requests 1000000;\n    location / {{\n      proxy_pass http://backend;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n      proxy_connect_timeout 5s;\n    }}\n  }}\n}}\n",
        d = dir.display()
    )
}

fn haproxy_conf(port: u16, ups: &[u16]) -> String {
    let servers: String = ups
        .iter()
        .enumerate()
        .map(|(i, p)| format!("  server u{i} 127.0.0.1:{p}\n"))
        .collect();
    format!(
        "global\n  nbthread {n}\n  maxconn 8000\ndefaults\n  mode http\n  option http-keep-alive\n  http-reuse always\n  option forwardfor\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\nfrontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\nbackend be\n  balance roundrobin\n{servers}",
        n = cores()
    )
}

fn gateway_conf(port: u16, ups: &[u16], policy: &str) -> String {
    let eps: Vec<String> = ups.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    format!(
        "[router]\nlisten = [\"127.0.0.1:{port}\"]\ndrain_delay_ms = 0\n\n[router.upstream]\nlb_policy = \"{policy}\"\nendpoints = [{}]\n\n[admin]\nenabled = false\n\n[access_log]\noutput = \"off\"\n",
        eps.join(", ")
    )
}

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    /// The proxy's CPU time (user + system, all threads and worker processes) per request:
    /// steadier than req/s when other work shares the machine.
    cpu_us_per_req: f64,
}

/// A process and its children (nginx's workers).
fn family(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // Fields after the command name: state, ppid, ...
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(pid) {
                pids.push(child);
            }
        }
    }
    pids
}

/// User + system CPU time of every thread of `pids`, in clock ticks.
fn cpu_ticks(pids: &[u32]) -> u64 {
    let mut total = 0;
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            if let Some((_, rest)) = stat.rsplit_once(')') {
                let f: Vec<&str> = rest.split_whitespace().collect();
                // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
                let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                total += get(11) + get(12);
            }
        }
    }
    total
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { sysconf(2) }; // _SC_CLK_TCK
    if t > 0 { t as f64 } else { 100.0 }
}

unsafe extern "C" {
    fn sysconf(name: i32) -> i64;
}

fn parse_latency(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        "m" => v * 60_000.0,
        _ => return None,
    })
}

fn wrk(o: &Options, port: u16, secs: u64, pids: &[u32]) -> anyhow::Result<Sample> {
    let cpu0 = cpu_ticks(pids);
    let out = Command::new("wrk")
        .args([
            "-t",
            &o.wrk_threads.to_string(),
            "-c",
            &o.connections.to_string(),
            "-d",
            &format!("{secs}s"),
            "--latency",
            &format!("http://127.0.0.1:{port}/"),
        ])
        .output()
        .context("running wrk")?;
    let cpu = cpu_ticks(pids).saturating_sub(cpu0) as f64 / ticks_per_second();
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut s = Sample::default();
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            s.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("50%") {
            s.p50_ms = parse_latency(v).unwrap_or(f64::NAN);
        } else if let Some(v) = t.strip_prefix("99%") {
            s.p99_ms = parse_latency(v).unwrap_or(f64::NAN);
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            s.errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            s.errors += v
                .split(',')
                .filter_map(|kv| kv.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    if s.rps == 0.0 {
        bail!("could not read wrk's output:\n{text}");
    }
    s.cpu_us_per_req = cpu * 1e6 / (s.rps * secs as f64);
    Ok(s)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let o = parse(args)?;
    require("wrk", "wrk")?;
    require("nginx", "nginx-light")?;
    require("haproxy", "haproxy")?;
    let gateway = gateway_binary(&o)?;
    if !gateway.is_file() {
        bail!("no gateway binary at {}", gateway.display());
    }

    let dir = std::env::temp_dir().join(format!("gateway-bench-proxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ups: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_, _>>()?;
    let (p_gw, p_nginx, p_haproxy) = (free_port()?, free_port()?, free_port()?);

    let write = |name: &str, text: String| -> anyhow::Result<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, text)?;
        Ok(p)
    };
    let up_conf = write("upstreams.conf", upstreams_conf(&dir, &ups))?;
    let nginx_conf = write("nginx.conf", nginx_conf(&dir, p_nginx, &ups))?;
    let haproxy_conf = write("haproxy.cfg", haproxy_conf(p_haproxy, &ups))?;
    let gw_conf = write("gateway.toml", gateway_conf(p_gw, &ups, &o.policy))?;

    let nginx = crate::tool_path("nginx");
    let mut upstreams = spawn_proc(
        "upstreams (nginx)",
        Command::new(&nginx)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&up_conf)
            .args(["-e", "stderr"]),
    )?;
    for p in &ups {
        wait_ready("upstream", *p, &mut upstreams)?;
    }
    let err_log = std::fs::File::create(dir.join("gateway.err"))?;
    let mut gw = spawn_proc(
        "gateway",
        Command::new(&gateway)
            .args(["run", "--config"])
            .arg(&gw_conf)
            .env("RUST_LOG", "warn")
            .stderr(err_log),
    )?;
    let mut ngx = spawn_proc(
        "nginx",
        Command::new(&nginx)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&nginx_conf)
            .args(["-e", "stderr"]),
    )?;
    let mut hap = spawn_proc(
        "haproxy",
        Command::new(crate::tool_path("haproxy"))
            .args(["-db", "-f"])
            .arg(&haproxy_conf),
    )?;
    // A second gateway with another lb_policy, measured in the same rotation.
    let mut also = match &o.also_policy {
        Some(policy) => {
            let port = free_port()?;
            let conf = write("gateway-also.toml", gateway_conf(port, &ups, policy))?;
            let err_log = std::fs::File::create(dir.join("gateway-also.err"))?;
            let mut p = spawn_proc(
                "gateway (also)",
                Command::new(&gateway)
                    .args(["run", "--config"])
                    .arg(&conf)
                    .env("RUST_LOG", "warn")
                    .stderr(err_log),
            )?;
            wait_ready("gateway (also)", port, &mut p)?;
            Some((format!("gw-{policy}"), port, p))
        }
        None => None,
    };
    wait_ready("gateway", p_gw, &mut gw)?;
    wait_ready("nginx", p_nginx, &mut ngx)?;
    wait_ready("haproxy", p_haproxy, &mut hap)?;

    let mut targets: Vec<(String, u16)> = vec![
        ("gateway".to_owned(), p_gw),
        ("nginx".to_owned(), p_nginx),
        ("haproxy".to_owned(), p_haproxy),
    ];
    let mut pids = vec![vec![gw.pid()], family(ngx.pid()), vec![hap.pid()]];
    if let Some((name, port, p)) = &also {
        targets.push((name.clone(), *port));
        pids.push(vec![p.pid()]);
    }
    println!("gateway lb_policy: {}", o.policy);
    println!(
        "bench proxy: {} cores, wrk -t{} -c{} -d{}s, {} interleaved repetitions (+{}s warm-up each)",
        cores(),
        o.wrk_threads,
        o.connections,
        o.duration,
        o.reps,
        o.warmup
    );
    println!(
        "upstreams: 127.0.0.1:{{{}}} (nginx, 1 worker, return 200)",
        ups.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
    );
    for (i, (name, port)) in targets.iter().enumerate() {
        if o.warmup > 0 {
            wrk(&o, *port, o.warmup, &pids[i]).with_context(|| format!("warming up {name}"))?;
        }
    }
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); targets.len()];
    for rep in 0..o.reps {
        for k in 0..targets.len() {
            let i = (rep + k) % targets.len();
            let (name, port) = (targets[i].0.as_str(), targets[i].1);
            for p in [&mut gw, &mut ngx, &mut hap] {
                p.check_alive()?;
            }
            if let Some((_, _, p)) = &mut also {
                p.check_alive()?;
            }
            let s =
                wrk(&o, port, o.duration, &pids[i]).with_context(|| format!("measuring {name}"))?;
            println!(
                "  rep {} {name:>8}: {:>10.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms  cpu {:>6.1} us/req{}",
                rep + 1,
                s.rps,
                s.p50_ms,
                s.p99_ms,
                s.cpu_us_per_req,
                if s.errors > 0 {
                    format!("  ({} errors)", s.errors)
                } else {
                    String::new()
                }
            );
            samples[i].push(s);
        }
    }
    let rss = peak_rss_kib(gw.pid());

    let med = |i: usize, f: fn(&Sample) -> f64| median(samples[i].iter().map(f).collect());
    println!();
    println!(
        "{:<16} {:>12} {:>10} {:>10} {:>12} {:>8}",
        "proxy", "req/s", "p50 ms", "p99 ms", "CPU us/req", "errors"
    );
    for (i, (name, _)) in targets.iter().enumerate() {
        let errors: u64 = samples[i].iter().map(|s| s.errors).sum();
        println!(
            "{:<16} {:>12.0} {:>10.3} {:>10.3} {:>12.1} {:>8}",
            name,
            med(i, |s| s.rps),
            med(i, |s| s.p50_ms),
            med(i, |s| s.p99_ms),
            med(i, |s| s.cpu_us_per_req),
            errors
        );
    }
    println!();
    for (j, other) in [(1, "nginx"), (2, "haproxy")] {
        println!(
            "gateway/{other:<8} req/s {:.3}  p50 {:.3}  p99 {:.3}  CPU/req {:.3}",
            med(0, |s| s.rps) / med(j, |s| s.rps),
            med(0, |s| s.p50_ms) / med(j, |s| s.p50_ms),
            med(0, |s| s.p99_ms) / med(j, |s| s.p99_ms),
            med(0, |s| s.cpu_us_per_req) / med(j, |s| s.cpu_us_per_req),
        );
    }
    if let Some((name, _, _)) = &also {
        println!(
            "{name}/gateway({}) req/s {:.3}  p50 {:.3}  p99 {:.3}  CPU/req {:.3}",
            o.policy,
            med(3, |s| s.rps) / med(0, |s| s.rps),
            med(3, |s| s.p50_ms) / med(0, |s| s.p50_ms),
            med(3, |s| s.p99_ms) / med(0, |s| s.p99_ms),
            med(3, |s| s.cpu_us_per_req) / med(0, |s| s.cpu_us_per_req),
        );
    }
    match rss {
        Some(kib) => println!(
            "gateway peak RSS under load: {:.1} MiB",
            kib as f64 / 1024.0
        ),
        None => println!("gateway peak RSS: unavailable"),
    }
    drop((gw, ngx, hap, also, upstreams));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_latencies_parse_to_ms() {
        assert_eq!(parse_latency("  512.00us"), Some(0.512));
        assert_eq!(parse_latency("1.25ms"), Some(1.25));
        assert_eq!(parse_latency("2.00s"), Some(2000.0));
        assert_eq!(parse_latency("x"), None);
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
