//! `cargo xtask bench observer`: what the observer costs a process that makes connections.
//!
//! A client process in a fresh cgroup v2 makes loopback connect+close cycles; rounds alternate
//! between "observer off", "observer on" (`gateway observe --cgroup … --json > /dev/null`
//! attached to that cgroup) and "on, --no-destination-table" (the same without the kernel's
//! per-destination table, as `gateway run` attaches it), so drift in the machine hits every
//! mode alike. For each round it
//! reports the client's CPU per connection (getrusage inside the client: this is where the
//! eBPF programs run) and, for "on" rounds, the observer process's own CPU per connection
//! (draining the ring buffer and printing JSON). Medians over rounds, and the ratio. With
//! `--against OTHER_GATEWAY_BINARY` a third kind of round runs that binary's observer, so two
//! observers are compared in one run against the same unobserved rounds (the client's CPU per
//! connect moves by tens of per cent between runs on a small VM; within a run it does not).
//!
//! Then it starts the observer with room for 100,000 destinations, makes connects to 100,000
//! distinct loopback destinations, and reports the observer's RSS and the kernel memory of its
//! maps (bpftool's `bytes_memlock`).
//!
//! Then, in one more round per observer, the kernel's per-program run-time statistics are on
//! (`BPF_ENABLE_STATS`, held by a file descriptor: no sysctl changes, and off again after that
//! round), so it also says how long each eBPF program ran per connection and per invocation.
//! They are off in the measured rounds: they read the clock around every program run. The
//! rest of the client's extra CPU is outside the programs: the hook dispatch (and, for builds
//! before the table of records, socket-storage allocation and free).
//!
//! Last, three rounds per mode, interleaved, run under `perf record`, and the median share of
//! the client's samples spent in the observer's kernel functions is the figure held against
//! the goal (`bench_observer_share`): unlike the on/off ratio of CPU times, it does not depend
//! on two rounds costing the same.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{bench::median, bench_observer_share};

const DEFAULT_CYCLES: usize = 20_000;
const ROUNDS_PER_MODE: usize = 10;
const DESTINATIONS: u32 = 100_000;
/// How long an observer runs before a round that measures it starts.
const SETTLE: Duration = Duration::from_millis(500);

pub(crate) struct Cgroup(pub(crate) PathBuf);

impl Cgroup {
    pub(crate) fn create() -> anyhow::Result<Cgroup> {
        let mounts = std::fs::read_to_string("/proc/self/mounts")?;
        let root = mounts
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
            })
            .min_by_key(|p| p.as_os_str().len())
            .context("cgroup v2 is not mounted")?;
        let path = root.join(format!("gateway-bench-{}", std::process::id()));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Cgroup(path))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A loopback server outside the bench's cgroup, on a thread: it accepts and closes at once.
pub(crate) fn accept_and_close_server() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    Ok(addr)
}

/// Runs `cycles` connect+close cycles to `addr` in a child inside `cgroup`; returns the child's
/// CPU time in ns.
fn client_round(cgroup: &Path, addr: SocketAddr, cycles: usize) -> anyhow::Result<u64> {
    let procs = cgroup.join("cgroup.procs");
    let mut cmd = Command::new(crate::THIS_BINARY);
    cmd.args(["bench-client", &addr.to_string(), &cycles.to_string()]);
    // SAFETY: the hook only opens and writes a file (async-signal-safe syscalls via std::fs is
    // not guaranteed, but nothing else runs in the forked child).
    unsafe {
        cmd.pre_exec(move || std::fs::write(&procs, b"0"));
    }
    let out = crate::output(&mut cmd, "the bench client")?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("bench client output")
}

/// The hidden `bench-client ADDR CYCLES` body: connect, wait for the server's close, close.
pub fn client(addr: &str, cycles: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let cycles: usize = cycles.parse()?;
    let before = cpu_ns_self();
    let mut buf = [0u8; 1];
    for _ in 0..cycles {
        let mut s = TcpStream::connect(addr)?;
        // The server closes first, so TIME_WAIT stays on its side and ports never run out.
        let _ = s.read(&mut buf);
    }
    println!("{}", cpu_ns_self() - before);
    Ok(())
}

fn cpu_ns_self() -> u64 {
    let mut ru: libc_rusage = unsafe { std::mem::zeroed() };
    // SAFETY: ru is a valid out-parameter.
    unsafe { getrusage(0, &mut ru) };
    let tv = |t: [i64; 2]| t[0] as u64 * 1_000_000_000 + t[1] as u64 * 1000;
    tv(ru.utime) + tv(ru.stime)
}

#[repr(C)]
struct libc_rusage {
    utime: [i64; 2],
    stime: [i64; 2],
    rest: [i64; 14],
}

unsafe extern "C" {
    fn getrusage(who: i32, usage: *mut libc_rusage) -> i32;
}

/// CPU time of another process in ns: the sum of its threads' run time from
/// /proc/PID/task/TID/schedstat (nanoseconds; /proc/PID/stat counts 10 ms ticks, too coarse
/// for a drain that costs well under a millisecond per round).
fn proc_cpu_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
}

fn proc_status_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

/// A running `gateway observe`, stopped by [`Observer::stop`] or, whatever else ends the bench
/// (an error returned with `?`, a panic), when dropped: it is never left attached.
pub(crate) struct Observer {
    child: Child,
    /// Reads the observer's stdout while it runs: a pipe nobody reads fills at 64 KiB and
    /// blocks the observer's writes, so its ring buffer would overflow because of the bench.
    /// Taken by `stop`.
    stdout: Option<std::thread::JoinHandle<std::io::Result<Vec<u8>>>>,
    /// The `lost_total` of the observer's last "dropped connect records" warning. Taken by
    /// `stop`.
    lost: Option<std::thread::JoinHandle<u64>>,
}

impl Drop for Observer {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}

impl Observer {
    fn start(bin: &Path, cgroup: &Path, extra: &[&str]) -> anyhow::Result<Observer> {
        let mut child = Command::new(bin)
            .arg("observe")
            .arg("--cgroup")
            .arg(cgroup)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut err = BufReader::new(child.stderr.take().context("stderr")?);
        let mut line = String::new();
        loop {
            line.clear();
            if err.read_line(&mut line)? == 0 {
                bail!("gateway observe exited before attaching");
            }
            if line.contains("observer attached") {
                break;
            }
        }
        let lost = std::thread::spawn(move || {
            err.lines()
                .map_while(Result::ok)
                .filter_map(|l| lost_total(&l))
                .max()
                .unwrap_or(0)
        });
        let mut out = child.stdout.take().context("stdout")?;
        let stdout = std::thread::spawn(move || {
            let mut buf = Vec::new();
            out.read_to_end(&mut buf).map(|_| buf)
        });
        Ok(Observer {
            child,
            stdout: Some(stdout),
            lost: Some(lost),
        })
    }

    /// `start` with `--json`, then [`SETTLE`]: how every measured round begins.
    pub(crate) fn start_settled(
        bin: &Path,
        cgroup: &Path,
        args: &[&str],
    ) -> anyhow::Result<Observer> {
        let obs = Observer::start(bin, cgroup, args)?;
        std::thread::sleep(SETTLE);
        Ok(obs)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, and waits for its exit; nothing once it has exited (std keeps the status, so
    /// no signal can reach a pid reused since).
    fn terminate(&mut self) -> std::io::Result<()> {
        if self.child.try_wait()?.is_none() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { kill(self.child.id() as i32, 15) };
            self.child.wait()?;
        }
        Ok(())
    }

    /// Stops the observer: what it printed, and how many records it said the kernel dropped.
    pub(crate) fn stop(mut self) -> anyhow::Result<(Vec<u8>, u64)> {
        self.terminate()?;
        let out = self
            .stdout
            .take()
            .context("stdout reader")?
            .join()
            .map_err(|_| anyhow::anyhow!("stdout reader panicked"))??;
        let lost = self
            .lost
            .take()
            .context("stderr reader")?
            .join()
            .map_err(|_| anyhow::anyhow!("stderr reader panicked"))?;
        Ok((out, lost))
    }
}

/// `lost_total=N` (or `"lost_total":N`) in one of the observer's log lines.
fn lost_total(line: &str) -> Option<u64> {
    let rest = &line[line.find("lost_total")? + "lost_total".len()..];
    let digits: String = rest
        .trim_start_matches(|c: char| !c.is_ascii_digit())
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

/// `[CYCLES_PER_MODE] [--gateway-bin PATH] [--against PATH]`.
struct Options {
    cycles: usize,
    gateway_bin: Option<PathBuf>,
    /// A second gateway binary whose observer runs in rounds of its own, interleaved with the
    /// others: an A/B of two observers in one run, with the same unobserved rounds.
    against: Option<PathBuf>,
}

fn options(args: &[String]) -> anyhow::Result<Options> {
    let usage =
        "usage: cargo xtask bench observer [CYCLES_PER_MODE] [--gateway-bin PATH] [--against PATH]";
    let mut o = Options {
        cycles: DEFAULT_CYCLES,
        gateway_bin: None,
        against: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut path = || it.next().map(PathBuf::from).context(usage);
        match a.as_str() {
            "--gateway-bin" => o.gateway_bin = Some(path()?),
            "--against" => o.against = Some(path()?),
            n => o.cycles = n.parse().context(usage)?,
        }
    }
    Ok(o)
}

/// One kind of round: the client alone, or with one binary's observer attached.
struct Mode {
    name: String,
    observer: Option<PathBuf>,
    /// `gateway observe`'s arguments besides `--cgroup`.
    args: &'static [&'static str],
    client_us: Vec<f64>,
    observer_us: Vec<f64>,
    records: usize,
    lost: u64,
    /// Per program: (name, invocations, run time in ns) over the round with statistics on.
    programs: Vec<(String, u64, u64)>,
    /// How many connections that round made.
    program_cycles: usize,
    /// The observer's kernel functions' share of the client's CPU samples, in rounds of their
    /// own under `perf` (for "off", the same functions with nothing attached: the control).
    shares: Vec<bench_observer_share::Share>,
}

impl Mode {
    fn new(name: String, observer: Option<PathBuf>) -> Mode {
        Mode {
            name,
            observer,
            args: &["--json"],
            client_us: Vec::new(),
            observer_us: Vec::new(),
            records: 0,
            lost: 0,
            programs: Vec::new(),
            program_cycles: 0,
            shares: Vec::new(),
        }
    }
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let o = options(args)?;
    let per_round = o.cycles / ROUNDS_PER_MODE;
    let bin = crate::release_gateway(o.gateway_bin.as_deref())?;
    let cgroup = Cgroup::create()?;

    let addr = accept_and_close_server()?;
    // Warm-up, not measured.
    client_round(&cgroup.0, addr, per_round.min(1000))?;

    let mut modes = vec![
        Mode::new("off".into(), None),
        Mode::new("on".into(), Some(bin.clone())),
        // As the proxy runs it, and `observe --json`/`--quiet` may: no per-destination table.
        Mode {
            args: &["--json", "--no-destination-table"],
            ..Mode::new("on, --no-destination-table".into(), Some(bin.clone()))
        },
    ];
    if let Some(other) = &o.against {
        modes.push(Mode::new(
            format!("on ({})", other.display()),
            Some(other.clone()),
        ));
    }
    let mut rss_kb = 0;
    for round in 0..ROUNDS_PER_MODE * modes.len() {
        // Each pass over the modes starts at a different one, so drift hits them alike.
        let n = modes.len();
        let mode = &mut modes[(round + round / n) % n];
        let Some(observer) = mode.observer.clone() else {
            let client_ns = client_round(&cgroup.0, addr, per_round)?;
            mode.client_us
                .push(client_ns as f64 / per_round as f64 / 1000.0);
            continue;
        };
        let obs = Observer::start_settled(&observer, &cgroup.0, mode.args)?;
        let before = proc_cpu_ns(obs.pid());
        let client_ns = client_round(&cgroup.0, addr, per_round)?;
        // Let the 25 ms drain timer pick up the last records.
        std::thread::sleep(Duration::from_millis(400));
        let obs_ns = proc_cpu_ns(obs.pid()) - before;
        rss_kb = rss_kb.max(proc_status_kb(obs.pid(), "VmHWM:"));
        let (out, dropped) = obs.stop()?;
        mode.records += out.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count();
        mode.lost += dropped;
        mode.client_us
            .push(client_ns as f64 / per_round as f64 / 1000.0);
        mode.observer_us
            .push(obs_ns as f64 / per_round as f64 / 1000.0);
    }
    // Then, with the kernel's run-time statistics on, one round per observer for where the
    // time goes. Not during the rounds above: the statistics read the clock twice around every
    // program run, which would be counted as the observer's cost.
    let stats = enable_run_time_stats()?;
    for mode in modes.iter_mut().skip(1) {
        let observer = mode.observer.clone().context("an 'on' mode")?;
        let obs = Observer::start(&observer, &cgroup.0, mode.args)?;
        client_round(&cgroup.0, addr, per_round * 2)?;
        mode.programs = program_run_times(obs.pid())?;
        mode.program_cycles = per_round * 2;
        obs.stop()?;
    }
    drop(stats);
    // And rounds under perf, with the statistics off again (they would be sampled as the
    // observer's work), interleaved like the measured rounds.
    for _ in 0..bench_observer_share::ROUNDS {
        for mode in modes.iter_mut() {
            let obs = match &mode.observer {
                Some(bin) => Some(Observer::start_settled(bin, &cgroup.0, mode.args)?),
                None => {
                    std::thread::sleep(SETTLE);
                    None
                }
            };
            mode.shares.push(bench_observer_share::sampled_round(
                &cgroup.0,
                addr,
                (per_round * 2).max(bench_observer_share::MIN_CONNECTS),
                &std::env::temp_dir(),
            )?);
            if let Some(obs) = obs {
                obs.stop()?;
            }
        }
    }
    println!(
        "\nobserver cost on loopback connect+close ({per_round} cycles x {ROUNDS_PER_MODE} rounds per mode, interleaved)"
    );
    let m_off = median(modes[0].client_us.clone());
    println!("  client CPU per connection, observer off : {m_off:.2} µs (median)");
    for mode in &modes[1..] {
        report_mode(mode, &modes[0], per_round);
    }
    println!(
        "  observer peak RSS during 'on' rounds     : {} MiB",
        rss_kb / 1024
    );

    // Memory at 100,000 destinations.
    let obs = Observer::start(
        &bin,
        &cgroup.0,
        &[
            "--max-destinations",
            &DESTINATIONS.to_string(),
            "--top",
            "1",
        ],
    )?;
    let started = Instant::now();
    let procs = cgroup.0.join("cgroup.procs");
    let mut cmd = Command::new(crate::THIS_BINARY);
    cmd.args(["bench-spray", &DESTINATIONS.to_string()]);
    // SAFETY: see client_round.
    unsafe {
        cmd.pre_exec(move || std::fs::write(&procs, b"0"));
    }
    let status = cmd.status().context("starting bench-spray")?;
    if !status.success() {
        bail!("bench-spray failed");
    }
    // Two table refreshes so the observer has walked the full map.
    std::thread::sleep(Duration::from_millis(2500));
    let rss = proc_status_kb(obs.pid(), "VmRSS:");
    let memlock = map_memlock(obs.pid())?;
    let table = String::from_utf8_lossy(&obs.stop()?.0).into_owned();
    let tracked = table
        .lines()
        .rev()
        .find_map(|l| {
            l.strip_prefix("… ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
        })
        .map(|more| more + 1)
        .unwrap_or(0);
    println!(
        "\nat {DESTINATIONS} destinations (connects sprayed in {:.1} s)",
        started.elapsed().as_secs_f64()
    );
    println!("  destinations in the kernel table        : {tracked}");
    println!(
        "  observer RSS                             : {} MiB",
        rss / 1024
    );
    for (name, bytes) in &memlock {
        println!(
            "  BPF map {name:<16}                 : {:.2} MiB",
            *bytes as f64 / 1048576.0
        );
    }
    println!(
        "  BPF maps total                           : {:.1} MiB",
        memlock.iter().map(|(_, b)| *b).sum::<u64>() as f64 / 1048576.0
    );
    Ok(())
}

/// What one observer cost the client, from its rounds.
fn report_mode(mode: &Mode, off_mode: &Mode, per_round: usize) {
    let off = &off_mode.client_us[..];
    let (m_off, m_on, m_obs) = (
        median(off.to_vec()),
        median(mode.client_us.clone()),
        median(mode.observer_us.clone()),
    );
    // Round i of each mode ran in the same pass, next to each other: their ratio cancels what
    // drifts between passes.
    let paired = median(
        mode.client_us
            .iter()
            .zip(off)
            .map(|(on, off)| on / off)
            .collect(),
    );
    println!("  {}:", mode.name);
    println!("    client CPU per connection, observer on  : {m_on:.2} µs (median)");
    println!(
        "    ratio on/off                             : {:.3}  (overhead {:+.1}%, goal <= +3%)",
        m_on / m_off,
        (m_on / m_off - 1.0) * 100.0
    );
    println!(
        "    per-pass ratio on/off, median            : {paired:.3}  (overhead {:+.1}%)",
        (paired - 1.0) * 100.0
    );
    if let (Some(on), Some(off)) = (
        bench_observer_share::median_round(&mode.shares),
        bench_observer_share::median_round(&off_mode.shares),
    ) {
        let all: Vec<String> = mode
            .shares
            .iter()
            .map(|s| format!("{:.1}%", s.total()))
            .collect();
        println!(
            "    sampled: the observer's kernel work      : {:.1}% of the client's CPU (goal <= 3%; perf, median of {} rounds: {}; {} samples over {} connects in the median one)",
            on.total() - off.total(),
            mode.shares.len(),
            all.join(", "),
            on.samples,
            on.connects
        );
        println!(
            "      {}; the same functions with the observer off: {:.2} %",
            on.breakdown(),
            off.total()
        );
    }
    println!(
        "    observer process CPU per connection      : {m_obs:.2} µs (median; ring-buffer drain + JSON, from schedstat)"
    );
    println!(
        "    with it, total                           : {:+.1}% over the unobserved client",
        ((m_on + m_obs) / m_off - 1.0) * 100.0
    );
    println!(
        "    JSON records printed                     : {} (expected {}; the observer said it lost {})",
        mode.records,
        per_round * ROUNDS_PER_MODE,
        mode.lost
    );
    let connections = mode.program_cycles as f64;
    println!(
        "    eBPF program run time (kernel run-time statistics, a round of {} connects of its own):",
        mode.program_cycles
    );
    let mut total = 0.0;
    for (name, cnt, ns) in &mode.programs {
        if *cnt == 0 {
            continue;
        }
        let per_conn = *ns as f64 / connections / 1000.0;
        total += per_conn;
        println!(
            "      {name:<22} {:>6.2} runs and {per_conn:.2} µs per connection, {:.0} ns per run",
            *cnt as f64 / connections,
            *ns as f64 / *cnt as f64
        );
    }
    println!(
        "      all programs           {total:.2} µs per connection of the {:.2} µs the client paid extra",
        m_on - m_off
    );
}

/// The hidden `bench-spray N` body: one connect to each of N distinct loopback destinations
/// (127.1.0.0 upwards, port 9: nothing listens, so each is refused at once).
pub fn spray(n: &str) -> anyhow::Result<()> {
    let n: u32 = n.parse()?;
    let base = u32::from(Ipv4Addr::new(127, 1, 0, 0));
    for i in 0..n {
        let _ = TcpStream::connect((Ipv4Addr::from(base + i), 9));
    }
    Ok(())
}

/// Turns on the kernel's per-program run-time statistics (`run_time_ns`, `run_cnt`) for as
/// long as the returned descriptor stays open: `bpf(BPF_ENABLE_STATS, {type =
/// BPF_STATS_RUN_TIME})`, include/uapi/linux/bpf.h.
fn enable_run_time_stats() -> anyhow::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    const BPF_ENABLE_STATS: libc::c_long = 32;
    // union bpf_attr: enable_stats.type (BPF_STATS_RUN_TIME = 0) first, the rest zero.
    let attr = [0u8; 16];
    // SAFETY: bpf(2) reads `attr.len()` bytes of `attr`; the result is a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if fd < 0 {
        bail!("BPF_ENABLE_STATS: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// The `/proc/PID/fdinfo` text of each descriptor of process `pid` that is a BPF object of
/// `kind` (`anon_inode:bpf-prog`, `anon_inode:bpf-map`), and a reader of its fields.
fn bpf_fdinfos(pid: u32, kind: &str) -> anyhow::Result<Vec<FdInfo>> {
    let mut v = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if target.to_string_lossy() != kind {
            continue;
        }
        v.push(FdInfo(std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            entry.file_name().to_string_lossy()
        ))?));
    }
    Ok(v)
}

struct FdInfo(String);

impl FdInfo {
    fn field(&self, key: &str) -> String {
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    }
}

/// bpftool's name for the program or map `id` (`what`: "prog" or "map").
fn bpf_name(what: &str, id: &str) -> anyhow::Result<String> {
    let out = Command::new("bpftool")
        .args(["-j", what, "show", "id", id])
        .output()?;
    Ok(serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|m| m["name"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("id {id}")))
}

/// Name, invocations and run time (ns) of each eBPF program the process `pid` holds, from
/// `/proc/PID/fdinfo` (`run_cnt`, `run_time_ns`: counted while run-time statistics are on).
fn program_run_times(pid: u32) -> anyhow::Result<Vec<(String, u64, u64)>> {
    bpf_fdinfos(pid, "anon_inode:bpf-prog")?
        .into_iter()
        .map(|info| {
            Ok((
                bpf_name("prog", &info.field("prog_id:"))?,
                info.field("run_cnt:").parse().unwrap_or(0),
                info.field("run_time_ns:").parse().unwrap_or(0),
            ))
        })
        .collect()
}

/// Kernel memory (`memlock`) of every BPF map the observer `pid` holds, from
/// `/proc/PID/fdinfo` (bpftool here lacks pid support), named through `bpftool map show id`.
fn map_memlock(pid: u32) -> anyhow::Result<Vec<(String, u64)>> {
    let mut v = bpf_fdinfos(pid, "anon_inode:bpf-map")?
        .into_iter()
        .map(|info| {
            Ok((
                bpf_name("map", &info.field("map_id:"))?,
                info.field("memlock:").parse().unwrap_or(0),
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    v.sort();
    Ok(v)
}
