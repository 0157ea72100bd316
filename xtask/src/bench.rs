//! What the wrk-driven benchmarks (`bench proxy`, `bench tls`) share: their options, the tools
//! they need, the processes they start, the CPU time those processes spend, one wrk run read
//! into a [`Sample`], interleaved repetitions of several load shapes over several targets
//! ([`interleaved`]), and the table of medians and ratios ([`report`]).
//!
//! Repetitions are interleaved in a rotating order so that drift in the machine's state (other
//! work on a shared machine, thermal limits) is spread over every target, and the table shows
//! medians. CPU time per request (user + system, every thread and worker process of the
//! target) is shown beside req/s: it is steadier than req/s when other work shares the cores.

use crate::Proc;
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// The options every wrk-driven benchmark takes.
pub struct Options {
    pub reps: usize,
    pub duration: u64,
    pub warmup: u64,
    pub connections: usize,
    pub wrk_threads: usize,
    pub gateway_bin: Option<PathBuf>,
    pub floor_bin: Option<PathBuf>,
}

impl Options {
    /// `--reps N` (5), `--duration S` (10), `--warmup S` (3), `--connections C` (64),
    /// `--wrk-threads T` (1), `--gateway-bin PATH` and `--floor-bin PATH` (default: the
    /// release build, built now).
    pub fn parse(args: &[String]) -> anyhow::Result<Options> {
        let mut o = Options {
            reps: 5,
            duration: 10,
            warmup: 3,
            connections: 64,
            wrk_threads: 1,
            gateway_bin: None,
            floor_bin: None,
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
                "--floor-bin" => o.floor_bin = Some(PathBuf::from(val()?)),
                other => bail!(
                    "unknown option {other}; options: --reps N --duration S --warmup S --connections C --wrk-threads T --gateway-bin PATH --floor-bin PATH"
                ),
            }
        }
        if o.reps == 0 || o.duration == 0 || o.connections == 0 || o.wrk_threads == 0 {
            bail!("--reps, --duration, --connections and --wrk-threads must be at least 1");
        }
        Ok(o)
    }

    /// The gateway binary: `--gateway-bin`, or the release build, built now.
    pub fn gateway_binary(&self) -> anyhow::Result<PathBuf> {
        let p = crate::release_gateway(self.gateway_bin.as_deref())?;
        if !p.is_file() {
            bail!("no gateway binary at {}", p.display());
        }
        Ok(p)
    }

    /// The bare hyper proxy: `--floor-bin`, or the release build, built now.
    pub fn floor_binary(&self) -> anyhow::Result<PathBuf> {
        match &self.floor_bin {
            Some(p) => Ok(p.clone()),
            None => crate::release_floor(),
        }
    }
}

/// Whether `tool` is on PATH or in /usr/sbin (Debian's nginx and HAProxy live there).
pub fn have(tool: &str) -> bool {
    Path::new("/usr/sbin").join(tool).is_file()
        || std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false)
}

/// An error naming the Debian package to install when `tool` is missing.
pub fn require(tool: &str, package: &str) -> anyhow::Result<()> {
    if !have(tool) {
        bail!("`{tool}` not found; install it with: apt-get install -y {package}");
    }
    Ok(())
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The 1-minute load average, to print beside figures taken on a shared machine.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Starts `cmd` as a [`Proc`] (stopped with SIGTERM, then SIGKILL after 3 s, when dropped).
pub fn spawn_proc(name: &'static str, cmd: &mut Command) -> anyhow::Result<Proc> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {name}: {cmd:?}"))?;
    Ok(Proc::new(name, child, Duration::from_secs(3)))
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `n` distinct free loopback ports: all held at once while they are chosen. Chosen one at a
/// time, the kernel may hand out the same port twice (a bench run gave the gateway the port
/// its upstream nginx then listened on: "cannot listen on 127.0.0.1:37089: another socket
/// already listens there (pid 5931, nginx)").
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let held = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(held
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()?)
}

/// How a target is spoken to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

/// The URL of `/` on a loopback port.
pub fn url(scheme: Scheme, port: u16) -> String {
    match scheme {
        Scheme::Http => format!("http://127.0.0.1:{port}/"),
        Scheme::Https => format!("https://127.0.0.1:{port}/"),
    }
}

/// Waits until `GET /` on `port` answers 200 (over TLS with curl, certificate unchecked, for
/// [`Scheme::Https`]).
pub fn wait_ready(name: &str, scheme: Scheme, port: u16, proc: &mut Proc) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        proc.check_alive()?;
        if answers_200(scheme, port) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{name} on port {port} did not answer 200 within 15 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn answers_200(scheme: Scheme, port: u16) -> bool {
    match scheme {
        Scheme::Http => {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.write_all(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200")
        }
        Scheme::Https => Command::new("curl")
            .args([
                "-sk",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "2",
            ])
            .arg(url(scheme, port))
            .output()
            .is_ok_and(|o| o.stdout == b"200"),
    }
}

/// A process and its children (nginx's workers).
pub fn family(pid: u32) -> Vec<u32> {
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
pub fn cpu_ticks(pids: &[u32]) -> u64 {
    let (user, system) = cpu_split(pids);
    user + system
}

/// User and system CPU time of every thread of `pids`, in clock ticks, apart: the system
/// part (the sockets, and on loopback the peer's receive path too) is much the same for every
/// proxy here, so the user part is where a proxy's own code shows.
pub fn cpu_split(pids: &[u32]) -> (u64, u64) {
    let (mut user, mut system) = (0, 0);
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
                user += get(11);
                system += get(12);
            }
        }
    }
    (user, system)
}

pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { sysconf(2) }; // _SC_CLK_TCK
    if t > 0 { t as f64 } else { 100.0 }
}

unsafe extern "C" {
    fn sysconf(name: i32) -> i64;
}

pub fn peak_rss_kib(pid: u32) -> Option<u64> {
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

/// One proxy under test: its name, its URL, and the processes whose CPU time it spends.
pub struct Target {
    pub name: &'static str,
    pub url: String,
    pub pids: Vec<u32>,
}

/// A load shape: wrk's threads and connections, and headers added to every request.
pub struct Load {
    /// A title for the table, e.g. "keep-alive".
    pub name: &'static str,
    pub threads: usize,
    pub connections: usize,
    /// E.g. `Connection: close`: one request per connection, so a new connection (and a full
    /// TLS handshake) for every request.
    pub headers: Vec<&'static str>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub rps: f64,
    /// Requests completed ("N requests in …").
    pub requests: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    /// The target's CPU time (user + system, all threads and worker processes) per request.
    pub cpu_us_per_req: f64,
    /// The user-space part of `cpu_us_per_req`.
    pub user_us_per_req: f64,
    /// The whole machine's busy CPU time per request (every process and interrupt: the
    /// proxy, wrk, the upstreams), from `/proc/stat`.
    pub machine_us_per_req: f64,
    /// The share of the machine's CPU time left idle during the run.
    pub idle_share: f64,
}

impl Sample {
    /// What the rest of the machine (wrk, the upstreams, the kernel's work charged to them)
    /// spends per request besides this proxy.
    pub fn rest_us_per_req(&self) -> f64 {
        self.machine_us_per_req - self.cpu_us_per_req
    }
}

/// The machine's busy and idle CPU time so far, in clock ticks (`/proc/stat`, all CPUs).
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    // user nice system idle iowait irq softirq steal (guest time is within user)
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|f| f.parse().ok())
        .collect();
    if v.len() < 8 {
        return (0, 0);
    }
    let idle = v[3] + v[4];
    (v.iter().sum::<u64>() - idle, idle)
}

pub fn parse_latency(s: &str) -> Option<f64> {
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

/// wrk's report read into a [`Sample`] (without CPU time).
fn parse_wrk(text: &str) -> Sample {
    let mut s = Sample::default();
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            s.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some((n, _)) = t.split_once(" requests in ") {
            s.requests = n.trim().parse().unwrap_or(0);
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
    s
}

/// Runs wrk with `load` against `url` for `secs`, and measures the CPU time `pids` spent.
pub fn wrk(load: &Load, url: &str, secs: u64, pids: &[u32]) -> anyhow::Result<Sample> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t", &load.threads.to_string()])
        .args(["-c", &load.connections.to_string()])
        .args(["-d", &format!("{secs}s")])
        .arg("--latency");
    for h in &load.headers {
        cmd.args(["-H", h]);
    }
    let (user0, system0) = cpu_split(pids);
    let (busy0, idle0) = machine_ticks();
    let out = cmd.arg(url).output().context("running wrk")?;
    let (busy1, idle1) = machine_ticks();
    let (user1, system1) = cpu_split(pids);
    let busy = busy1.saturating_sub(busy0) as f64;
    let idle = idle1.saturating_sub(idle0) as f64;
    let user = user1.saturating_sub(user0) as f64 / ticks_per_second();
    let cpu = user + system1.saturating_sub(system0) as f64 / ticks_per_second();
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut s = parse_wrk(&text);
    if s.rps == 0.0 {
        bail!("could not read wrk's output:\n{text}");
    }
    s.cpu_us_per_req = cpu * 1e6 / (s.rps * secs as f64);
    s.user_us_per_req = user * 1e6 / (s.rps * secs as f64);
    s.machine_us_per_req = busy / ticks_per_second() * 1e6 / (s.rps * secs as f64);
    s.idle_share = if busy + idle > 0.0 {
        idle / (busy + idle)
    } else {
        f64::NAN
    };
    Ok(s)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Samples by load, then by target, then by repetition.
pub type Samples = Vec<Vec<Vec<Sample>>>;

/// Warms every target up under every load, then runs `o.reps` repetitions; in each, every
/// load in turn drives every target, the targets' order rotating from one repetition to the
/// next. `alive` is called before each measurement (a target that died ends the run).
pub fn interleaved(
    o: &Options,
    targets: &[Target],
    loads: &[Load],
    alive: &mut dyn FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Samples> {
    if o.warmup > 0 {
        for load in loads {
            for t in targets {
                warm_up(
                    &format!("{} ({})", t.name, load.name),
                    wrk(load, &t.url, o.warmup, &t.pids),
                );
            }
        }
    }
    let mut samples: Samples = vec![vec![Vec::new(); targets.len()]; loads.len()];
    for rep in 0..o.reps {
        for (l, load) in loads.iter().enumerate() {
            for k in 0..targets.len() {
                let i = (rep + k) % targets.len();
                let t = &targets[i];
                alive()?;
                let s = wrk(load, &t.url, o.duration, &t.pids)
                    .with_context(|| format!("measuring {} ({})", t.name, load.name))?;
                println!(
                    "  rep {} {:<12} {:>8}: {:>10.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms  cpu {:>7.1} us/req (user {:>5.1}){}",
                    rep + 1,
                    load.name,
                    t.name,
                    s.rps,
                    s.p50_ms,
                    s.p99_ms,
                    s.cpu_us_per_req,
                    s.user_us_per_req,
                    if s.errors > 0 {
                        format!("  ({} errors)", s.errors)
                    } else {
                        String::new()
                    }
                );
                samples[l][i].push(s);
            }
        }
    }
    Ok(samples)
}

/// A warm-up run is not a measurement: one that failed (on a loaded machine, a peer under
/// `SCHED_IDLE` can complete no request in a 1 s warm-up: the suite's PGO training, which runs
/// beside the tests) is said and passed over. The measurements after it fail on their own if
/// the target is really down.
fn warm_up<S>(what: &str, run: anyhow::Result<S>) {
    if let Err(e) = run {
        let first = format!("{e:#}");
        let first = first.lines().next().unwrap_or_default();
        println!("  warm-up of {what} failed, measuring anyway: {first}");
    }
}

/// The rotation of the rows that are not wrk's (HTTP/2, WebSocket): a warm-up run of each
/// target, then `reps` repetitions in which every target is measured once, in an order that
/// rotates from one repetition to the next. `alive` is called before each measurement,
/// `measure(target, seconds)` runs one, `show` renders it for the per-run line.
pub fn rotate<S>(
    names: &[&str],
    (reps, secs, warmup): (usize, u64, u64),
    alive: &mut dyn FnMut() -> anyhow::Result<()>,
    measure: &mut dyn FnMut(usize, u64) -> anyhow::Result<S>,
    show: &dyn Fn(&S) -> String,
) -> anyhow::Result<Vec<Vec<S>>> {
    if warmup > 0 {
        for (i, name) in names.iter().enumerate() {
            warm_up(name, measure(i, warmup));
        }
    }
    let mut samples: Vec<Vec<S>> = names.iter().map(|_| Vec::new()).collect();
    for rep in 0..reps {
        for k in 0..names.len() {
            let i = (rep + k) % names.len();
            alive()?;
            let s = measure(i, secs).with_context(|| format!("measuring {}", names[i]))?;
            println!("  rep {} {:>8}: {}", rep + 1, names[i], show(&s));
            samples[i].push(s);
        }
    }
    Ok(samples)
}

/// The table of medians for one load, then the ratios of the first target (the gateway) to
/// each of the others. `rate` names the req/s column (e.g. "handshakes/s").
pub fn report(title: &str, rate: &str, targets: &[Target], samples: &[Vec<Sample>]) {
    let med = |i: usize, f: fn(&Sample) -> f64| median(samples[i].iter().map(f).collect());
    println!("\n{title}");
    println!(
        "{:<10} {:>14} {:>10} {:>10} {:>12} {:>11} {:>15} {:>7} {:>8}",
        "proxy",
        rate,
        "p50 ms",
        "p99 ms",
        "CPU us/req",
        "user us/req",
        "machine us/req",
        "idle %",
        "errors"
    );
    for (i, t) in targets.iter().enumerate() {
        let errors: u64 = samples[i].iter().map(|s| s.errors).sum();
        println!(
            "{:<10} {:>14.0} {:>10.3} {:>10.3} {:>12.1} {:>11.1} {:>15.1} {:>7.1} {:>8}",
            t.name,
            med(i, |s| s.rps),
            med(i, |s| s.p50_ms),
            med(i, |s| s.p99_ms),
            med(i, |s| s.cpu_us_per_req),
            med(i, |s| s.user_us_per_req),
            med(i, |s| s.machine_us_per_req),
            med(i, |s| s.idle_share * 100.0),
            errors
        );
    }
    for (j, other) in targets.iter().enumerate().skip(1) {
        println!(
            "{}/{:<8} {rate} {:.3}  p50 {:.3}  p99 {:.3}  CPU/req {:.3}  user/req {:.3}",
            targets[0].name,
            other.name,
            med(0, |s| s.rps) / med(j, |s| s.rps),
            med(0, |s| s.p50_ms) / med(j, |s| s.p50_ms),
            med(0, |s| s.p99_ms) / med(j, |s| s.p99_ms),
            med(0, |s| s.cpu_us_per_req) / med(j, |s| s.cpu_us_per_req),
            med(0, |s| s.user_us_per_req) / med(j, |s| s.user_us_per_req),
        );
    }
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
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn wrk_report_with_errors_parses() {
        let text = "Running 1s test @ https://127.0.0.1:1/\n  Latency Distribution\n     50%  1.50ms\n     99%   12.00ms\n\
                    \x20 1000 requests in 1.00s, 100.00KB read\n  Socket errors: connect 0, read 3, write 0, timeout 2\n\
                    \x20 Non-2xx or 3xx responses: 4\nRequests/sec:   1000.50\n";
        let s = parse_wrk(text);
        assert_eq!(s.rps, 1000.5);
        assert_eq!(s.requests, 1000);
        assert_eq!((s.p50_ms, s.p99_ms), (1.5, 12.0));
        assert_eq!(s.errors, 9);
    }
}
