//! `cargo xtask capacity [--destinations N] [--max-destinations M]`: the kernel side's
//! capacity through `gateway observe` (release build), in a cgroup of its own.
//!
//! The observer runs as an operator runs it (live table, redrawn every second, plus
//! `--metrics`); one client process connects once to each of N distinct loopback destinations
//! (127.1.0.0 upwards, port 9: refused at once). Then it reports:
//!
//! - the observer's RSS now and at its peak, with the table walking the kernel's map;
//! - how many destinations the kernel's LRU holds and evicted, and whether held + evicted
//!   equals N (every destination inserted once);
//! - records received plus records lost against N (every connect is one or the other);
//! - the kernel's anomaly counters (insert failures, records of connects in flight overwritten, unexpected
//!   transitions).
//!
//! `--gateway PATH` measures another build (e.g. an older one, for a before/after figure; one
//! without the table metrics fails the consistency check after printing its RSS).
//! It fails when a count is inconsistent or the RSS after the run is over `--max-rss-mib`
//! (default 40). Defaults: N = 1,000,000 into the default 16,384-entry table. For the memory figure at
//! 100,000 destinations: `--destinations 100000 --max-destinations 100000`. `./dev test` runs
//! a short version (`tests/tests/observe_capacity.rs`).

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::Proc;

/// The goal for the observer at 100,000 destinations; `--max-rss-mib` changes it.
const DEFAULT_MAX_RSS_MIB: f64 = 40.0;

struct Cgroup(PathBuf);

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn cgroup() -> anyhow::Result<Cgroup> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    let root = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .min_by_key(|p| p.as_os_str().len())
        .context("cgroup v2 is not mounted")?;
    let path = root.join(format!("gateway-capacity-{}", std::process::id()));
    std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
    Ok(Cgroup(path))
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn metrics(addr: SocketAddr) -> HashMap<String, f64> {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return HashMap::new();
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .filter(|l| l.starts_with("gateway_"))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

fn family_sum(m: &HashMap<String, f64>, family: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(family) && k[family.len()..].starts_with('{'))
        .map(|(_, v)| v)
        .sum()
}

fn get(m: &HashMap<String, f64>, k: &str) -> f64 {
    m.get(k).copied().unwrap_or(0.0)
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut destinations: u32 = 1_000_000;
    let mut table: u32 = gateway_common::names::DEFAULT_MAX_DESTINATIONS;
    let mut gateway: Option<PathBuf> = None;
    let mut max_rss_mib: f64 = DEFAULT_MAX_RSS_MIB;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--gateway" {
            gateway = Some(it.next().context("--gateway needs a path")?.into());
            continue;
        }
        let mut value = || -> anyhow::Result<u32> {
            it.next()
                .with_context(|| format!("{a} needs a value"))?
                .parse()
                .with_context(|| format!("{a}: a number"))
        };
        match a.as_str() {
            "--destinations" => destinations = value()?,
            "--max-destinations" => table = value()?,
            "--max-rss-mib" => max_rss_mib = f64::from(value()?),
            other => bail!(
                "unknown argument {other}; usage: cargo xtask capacity [--destinations N] [--max-destinations M] [--max-rss-mib MIB] [--gateway PATH]"
            ),
        }
    }
    let bin = crate::release_gateway(gateway.as_deref())?;
    let cg = cgroup()?;
    let metrics_addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let child = Command::new(&bin)
        .arg("observe")
        .arg("--cgroup")
        .arg(&cg.0)
        .args(["--max-destinations", &table.to_string(), "--top", "25"])
        .args(["--metrics", &metrics_addr.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting gateway observe")?;
    let mut obs = Proc::new("gateway observe", child, Duration::from_secs(5));
    let end = Instant::now() + Duration::from_secs(20);
    while metrics(metrics_addr).is_empty() {
        obs.check_alive()?;
        if Instant::now() > end {
            bail!("gateway observe did not start serving metrics");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let rss_start = status_kib(obs.pid(), "VmRSS:");

    let started = Instant::now();
    let procs = cg.0.join("cgroup.procs");
    let mut cmd = Command::new(crate::THIS_BINARY);
    cmd.args(["bench-spray", &destinations.to_string()]);
    // SAFETY: the hook only writes one file before exec.
    unsafe {
        cmd.pre_exec(move || std::fs::write(&procs, b"0"));
    }
    let status = cmd.status()?;
    if !status.success() {
        bail!("the connect spray failed");
    }
    let spray_s = started.elapsed().as_secs_f64();
    // Wait for the drain and two table refreshes (each walks the whole kernel table).
    let n = f64::from(destinations);
    let end = Instant::now() + Duration::from_secs(60);
    let m = loop {
        obs.check_alive()?;
        let m = metrics(metrics_addr);
        let done = family_sum(&m, "gateway_connect_attempts_total")
            + get(&m, "gateway_observer_events_lost_total")
            >= n;
        if done || Instant::now() > end {
            break m;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    std::thread::sleep(Duration::from_millis(2500));
    let m2 = metrics(metrics_addr);
    let m = if m2.is_empty() { m } else { m2 };
    let rss = status_kib(obs.pid(), "VmRSS:");
    let hwm = status_kib(obs.pid(), "VmHWM:");
    drop(obs);

    let records = family_sum(&m, "gateway_connect_attempts_total");
    let lost = get(&m, "gateway_observer_events_lost_total");
    let tracked = get(&m, "gateway_observer_destinations_tracked");
    let evicted = get(&m, "gateway_observer_destinations_evicted_total");
    println!(
        "\n{destinations} distinct destinations through gateway observe (table of {table}; connects made in {spray_s:.1} s, {:.0}/s)",
        n / spray_s
    );
    println!(
        "  observer RSS at start                    : {:.1} MiB",
        rss_start as f64 / 1024.0
    );
    println!(
        "  observer RSS after (table redrawn)       : {:.1} MiB",
        rss as f64 / 1024.0
    );
    println!(
        "  observer peak RSS                        : {:.1} MiB",
        hwm as f64 / 1024.0
    );
    println!("  destinations held by the kernel's LRU    : {tracked}");
    println!("  destinations evicted                     : {evicted}");
    println!(
        "  held + evicted = inserted                : {} ({})",
        tracked + evicted,
        if tracked + evicted == n {
            "= N, consistent"
        } else {
            "≠ N"
        }
    );
    println!("  records received                         : {records}");
    println!("  records lost (ring buffer full)          : {lost}");
    println!(
        "  received + lost                          : {} ({})",
        records + lost,
        if records + lost == n {
            "= N, consistent"
        } else {
            "≠ N"
        }
    );
    for (_, kind) in gateway_common::anomaly::KINDS {
        println!(
            "  kernel anomalies {kind:<23} : {}",
            get(
                &m,
                &format!("gateway_observer_kernel_anomalies_total{{kind=\"{kind}\"}}")
            )
        );
    }
    if tracked + evicted != n || records + lost != n || tracked > f64::from(table) {
        bail!("inconsistent counts (see above)");
    }
    let rss_mib = rss as f64 / 1024.0;
    if rss_mib > max_rss_mib {
        bail!("the observer's RSS ({rss_mib:.1} MiB) is over the {max_rss_mib} MiB goal");
    }
    Ok(())
}
