//! `cargo xtask bench profile`: where the gateway's CPU goes under the `bench proxy` load, as a
//! flame graph. The same three upstreams and gateway config as `bench proxy` (observer `auto`:
//! attached when run as root, as users run it); wrk keep-alive load for `--duration` seconds
//! while `perf record` samples the gateway's threads (cpu-clock: this also works in VMs without
//! hardware counters) with DWARF call graphs; then `perf script | inferno-collapse-perf |
//! inferno-flamegraph` writes the SVG, and the top functions by self time are printed.
//!
//! Needs `perf` (Debian: linux-perf) and inferno (`cargo install inferno`).

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{
    bench::{self, Load, Options},
    bench_peers::Peers,
};

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let o = Options::parse(args)?;
    bench::require("wrk", "wrk")?;
    bench::require("nginx", "nginx-light")?;
    bench::require("haproxy", "haproxy")?;
    bench::require("perf", "linux-perf")?;
    for tool in ["inferno-collapse-perf", "inferno-flamegraph"] {
        if !bench::have(tool) {
            bail!("{tool} is missing: cargo install inferno");
        }
    }
    let gateway = o.gateway_binary()?;
    let out_dir = crate::workspace_root().join("target/profile");
    std::fs::create_dir_all(&out_dir)?;
    let dir = std::env::temp_dir().join(format!("gateway-bench-profile-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut peers = Peers::start(&dir, &gateway, None)?;
    let target = peers
        .targets()
        .into_iter()
        .next()
        .context("the gateway target")?;
    let url = target.url.clone();
    let load = Load {
        name: "keep-alive",
        threads: o.wrk_threads,
        connections: o.connections,
        headers: Vec::new(),
    };
    // Warm-up, so that pools are full and the profile shows the steady state.
    bench::wrk(&load, &url, o.warmup, &target.pids)?;
    let data = out_dir.join("perf.data");
    let perf = Command::new("perf")
        .args([
            "record",
            "-e",
            "cpu-clock",
            "-F",
            "499",
            "--call-graph",
            "dwarf,16384",
        ])
        .arg("-o")
        .arg(&data)
        .arg("-p")
        .arg(peers.gateway.pid().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("perf record")?;
    let sample = bench::wrk(&load, &url, o.duration, &target.pids);
    // SAFETY: kill(2) on our own child; perf writes its file on SIGINT.
    unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
    let perf_out = perf.wait_with_output()?;
    peers.check_alive()?;
    drop(peers);
    let _ = std::fs::remove_dir_all(&dir);
    let sample = sample?;
    if !data.is_file() {
        bail!(
            "perf record wrote nothing: {}",
            String::from_utf8_lossy(&perf_out.stderr)
        );
    }
    let svg = flame_graph(&data, &out_dir)?;
    println!(
        "bench profile: {} cores, wrk -t{} -c{} -d{}s keep-alive: {:.0} req/s while sampled",
        bench::cores(),
        o.wrk_threads,
        o.connections,
        o.duration,
        sample.rps
    );
    println!("flame graph: {}", svg.display());
    println!("top functions by self time (perf report --no-children):");
    let report = Command::new("perf")
        .args([
            "report",
            "--no-children",
            "--sort",
            "symbol",
            "--stdio",
            "-g",
            "none",
            "-i",
        ])
        .arg(&data)
        .stderr(Stdio::null())
        .output()?;
    for line in String::from_utf8_lossy(&report.stdout)
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .take(25)
    {
        println!(
            "  {}",
            line.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }
    Ok(())
}

/// `perf script | inferno-collapse-perf | inferno-flamegraph > gateway.svg`.
fn flame_graph(data: &std::path::Path, out_dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    let script = Command::new("perf")
        .arg("script")
        .arg("-i")
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("perf script")?;
    let collapse = Command::new("inferno-collapse-perf")
        .stdin(script.stdout.context("perf script's stdout")?)
        .stdout(Stdio::piped())
        .spawn()
        .context("inferno-collapse-perf")?;
    let svg = out_dir.join("gateway.svg");
    let graph = Command::new("inferno-flamegraph")
        .args(["--title", "gateway under bench proxy load (cpu-clock)"])
        .stdin(collapse.stdout.context("collapse's stdout")?)
        .stdout(std::fs::File::create(&svg)?)
        .status()
        .context("inferno-flamegraph")?;
    if !graph.success() {
        bail!("inferno-flamegraph failed with {graph}");
    }
    Ok(svg)
}
