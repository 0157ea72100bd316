//! `cargo xtask fuzz TARGET|all [--time 30s|30m|1h]`: runs cargo-fuzz (libFuzzer) targets of
//! `fuzz/` and reports, per target, the executions, executions per second and the time it ran
//! without a crash. `./dev test` runs every target for [`SHORT_RUN`].
//!
//! The committed corpus `fuzz/corpus/TARGET` seeds each run and stays untouched: libFuzzer
//! writes what it finds to a working copy in `target/fuzz-corpus/TARGET` (the first corpus
//! directory is the one it writes to). A crash or a hang leaves its input in
//! `fuzz/artifacts/TARGET/` and fails the command; minimise it with
//! `cargo fuzz tmin TARGET ARTIFACT` and keep it as a regression test.
//!
//! Build: the pinned nightly of `gateway-ebpf/rust-toolchain.toml` (cargo-fuzz needs a
//! nightly for its coverage instrumentation), release with debug assertions (`-O -a`, so
//! integer overflow panics), and no sanitizer (`-s none`): the code under test is safe Rust
//! except for one length-checked `read_unaligned` (`observer::records::pod_from_bytes`), and
//! AddressSanitizer would halve the rate of the two targets that drive the proxy over
//! loopback. `AYA_BUILD_SKIP=1`: no target loads the eBPF object.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Every fuzz target, in the order `all` runs them.
pub const TARGETS: [&str; 6] = [
    "config",
    "kernel_records",
    "admin_status",
    "client_head",
    "upstream_response",
    "proxy_header",
];

/// What `./dev test` gives each target.
pub const SHORT_RUN: Duration = Duration::from_secs(30);

/// libFuzzer's per-input limit: an input that takes longer is reported as a hang. The proxy
/// targets' own limit (`gateway_fuzz::ANSWER_LIMIT`, 5 s) fires first with a clearer message.
const INPUT_TIMEOUT_S: u64 = 10;

pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .with_context(|| format!("{s}: expected a number and s, m or h, e.g. 30s or 30m"))?;
    Ok(Duration::from_secs(match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => bail!("{s}: expected a number and s, m or h, e.g. 30s or 30m"),
    }))
}

fn nightly(root: &Path) -> anyhow::Result<String> {
    let path = root.join("gateway-ebpf/rust-toolchain.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("channel"))
        .and_then(|rest| rest.split('"').nth(1))
        .map(str::to_owned)
        .with_context(|| format!("no channel in {}", path.display()))
}

fn cargo_fuzz(root: &Path) -> anyhow::Result<Command> {
    let mut cmd = Command::new("cargo");
    cmd.arg(format!("+{}", nightly(root)?))
        .arg("fuzz")
        .current_dir(root.join("fuzz"))
        .env("AYA_BUILD_SKIP", "1")
        // The fuzz crate has its own lock file and target directory.
        .env_remove("CARGO_TARGET_DIR");
    Ok(cmd)
}

const BUILD_FLAGS: [&str; 4] = ["-O", "-a", "-s", "none"];

/// The command that builds every target once (`./dev test` runs it in the background).
pub fn build_command(root: &Path) -> anyhow::Result<Command> {
    let mut cmd = cargo_fuzz(root)?;
    cmd.arg("build").args(BUILD_FLAGS);
    Ok(cmd)
}

/// One run's figures.
#[derive(Debug)]
pub struct Report {
    pub target: String,
    pub executions: u64,
    pub exec_per_sec: u64,
    pub elapsed: Duration,
    pub corpus_entries: usize,
}

/// Runs `target` for `time`; an error when it crashed, hung or could not run.
pub fn run_target(root: &Path, target: &str, time: Duration) -> anyhow::Result<Report> {
    if !TARGETS.contains(&target) {
        bail!(
            "unknown fuzz target {target}; choose one of {}",
            TARGETS.join(", ")
        );
    }
    let seeds = root.join("fuzz/corpus").join(target);
    let work = root.join("target/fuzz-corpus").join(target);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let artifacts = root.join("fuzz/artifacts").join(target);
    std::fs::create_dir_all(&artifacts)?;
    let mut cmd = cargo_fuzz(root)?;
    cmd.arg("run")
        .args(BUILD_FLAGS)
        .arg(target)
        .arg(&work)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={}", time.as_secs().max(1)))
        .arg(format!("-timeout={INPUT_TIMEOUT_S}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .stderr(Stdio::piped());
    eprintln!(
        "\x1b[1m==> fuzzing {target} for {} s\x1b[0m",
        time.as_secs()
    );
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .context("spawning cargo fuzz (run ./dev setup)")?;
    let mut executions = None;
    let mut exec_per_sec = None;
    let mut tail: Vec<String> = Vec::new();
    for line in BufReader::new(child.stderr.take().context("stderr")?).lines() {
        let line = line?;
        // libFuzzer's status lines every few seconds would flood the test log; keep the
        // start, the end and anything that is not a status line.
        let status_line = line.starts_with('#') && line.contains("exec/s");
        if !status_line {
            eprintln!("  {line}");
        }
        if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
            executions = v.trim().parse().ok();
        }
        if let Some(v) = line.strip_prefix("stat::average_exec_per_sec:") {
            exec_per_sec = v.trim().parse().ok();
        }
        tail.push(line);
        if tail.len() > 40 {
            tail.remove(0);
        }
    }
    let status = child.wait()?;
    let elapsed = started.elapsed();
    if !status.success() {
        bail!(
            "fuzz target {target} failed after {:.0} s ({status}); the input is in {}/\n{}",
            elapsed.as_secs_f64(),
            artifacts.display(),
            tail.join("\n")
        );
    }
    let (Some(executions), Some(exec_per_sec)) = (executions, exec_per_sec) else {
        bail!(
            "fuzz target {target}: libFuzzer printed no final stats\n{}",
            tail.join("\n")
        );
    };
    let corpus_entries = std::fs::read_dir(&work).map(|d| d.count()).unwrap_or(0);
    Ok(Report {
        target: target.to_owned(),
        executions,
        exec_per_sec,
        elapsed,
        corpus_entries,
    })
}

pub fn print(reports: &[Report]) {
    println!("\nfuzzing: executions, rate and time run without a crash");
    for r in reports {
        println!(
            "  {:<18} {:>10} executions  {:>7} exec/s  {:>6.0} s without a crash  ({} corpus entries)",
            r.target,
            r.executions,
            r.exec_per_sec,
            r.elapsed.as_secs_f64(),
            r.corpus_entries
        );
    }
}

/// `cargo xtask fuzz TARGET|all [--time T]`.
pub fn run(target: &str, time: Duration) -> anyhow::Result<()> {
    let root = crate::workspace_root();
    crate::run(&mut build_command(&root)?)?;
    let targets: Vec<&str> = if target == "all" {
        TARGETS.to_vec()
    } else {
        vec![target]
    };
    let mut reports = Vec::new();
    for t in targets {
        reports.push(run_target(&root, t, time)?);
    }
    print(&reports);
    Ok(())
}
