//! `cargo xtask test` (`./dev test`): format check, builds, unit tests, the end-to-end tests
//! one at a time (the `deploy_*` ones once the package exists), the `gateway demo` test, short
//! fuzz runs and short benchmark runs. The release package and the fuzz build are made in the
//! background meanwhile ([`crate::background`]).

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{
    THIS_BINARY, background, bench_faults, bench_instructions, bench_observer,
    bench_observer_lines, bench_proxy, bench_tls, cargo, fuzz, package, run, workspace_root,
};

/// `./dev test`: the whole suite, or the tests whose names contain `filter`.
pub fn test(filter: Option<String>) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!(
            "the test suite includes privileged tests (network namespaces, cgroups, eBPF); run it as root via ./dev test"
        );
    }
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args(["build", "--all-targets"]))?;
    // `gateway demo` is compiled only with the `demo` feature: keep it compiling.
    run(cargo().args([
        "check",
        "-p",
        "gateway-user",
        "--features",
        "demo",
        "--bins",
    ]))?;
    let filter: Vec<String> = filter.into_iter().collect();
    let root = workspace_root();
    let scratch_before = scratch_dirs();
    // The release package and the fuzz build took a third of the suite's time on two cores,
    // and the end-to-end tests leave part of the CPUs idle: they overlap, the builds at idle
    // priority ([`background`]).
    let package = background::spawn("package", {
        let mut c = Command::new(THIS_BINARY);
        c.arg("package");
        c
    })?;
    let fuzzing = filter.is_empty() || filter.iter().any(|f| f == "fuzz");
    let fuzz_build = if fuzzing {
        Some(background::spawn("fuzz", fuzz::build_command(&root)?)?)
    } else {
        None
    };
    let mut totals = Totals::default();
    // Unit tests: pure code, in parallel.
    let unit = run_tests(
        "unit tests",
        cargo()
            .args(["test", "--no-fail-fast", "--lib", "--bins"])
            .arg("--")
            .args(&filter),
        &mut totals,
    );
    // End-to-end tests: network namespaces, cgroups and eBPF attachments, one at a time;
    // first those that do not install the package.
    let (deploy, others) = end_to_end_targets()?;
    let end_to_end = run_tests(
        "end-to-end tests",
        &mut one_at_a_time(&others, &[], &filter),
        &mut totals,
    );
    // `gateway demo` end to end: its test needs the binary built with the fault lab (the
    // `demo` feature), so it runs after the tests of the production build.
    let demo = run_tests(
        "the demo's test",
        &mut one_at_a_time(
            &["demo_privileged".to_owned()],
            &["-p", "gateway-user", "--features", "demo"],
            &filter,
        ),
        &mut totals,
    );
    // The Debian package (the release build, profile-guided): the deploy_* tests install it
    // and run its units.
    let deb =
        package::deb_path(&package.wait()?).context("the package build printed no .deb path")?;
    let deployed = run_tests(
        "deploy tests",
        one_at_a_time(&deploy, &[], &filter).env("GATEWAY_DEB", &deb),
        &mut totals,
    );
    // Fuzzing: every target for a short run, only in the whole suite (or `./dev test fuzz`):
    // a filtered run is for iterating on something else.
    let mut fuzz_failed = 0;
    if let Some(build) = fuzz_build {
        build.wait()?;
        let mut reports = Vec::new();
        for target in fuzz::TARGETS {
            match fuzz::run_target(&root, target, fuzz::SHORT_RUN) {
                Ok(r) => {
                    totals.passed += 1;
                    reports.push(r);
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    totals.failed += 1;
                    fuzz_failed += 1;
                }
            }
        }
        fuzz::print(&reports);
    }
    // The benchmarks, each for a short run (the real ones are `cargo xtask bench …`), only in
    // the whole suite (or `./dev test bench`): a benchmark that no longer runs (a tool gone, a
    // peer that does not start, a report that cannot be read) fails here, not in the hands of
    // whoever reruns it for figures. The figures of a short run mean nothing and are not read.
    let mut bench_failed = 0;
    if filter.is_empty() || filter.iter().any(|f| f == "bench") {
        for (name, args) in SHORT_BENCHMARKS {
            eprintln!(
                "\x1b[1m==> cargo xtask bench {name} {}\x1b[0m",
                args.join(" ")
            );
            let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
            let result = match *name {
                "observer" => bench_observer::run(&args),
                "observer-lines" => bench_observer_lines::run(&args),
                "proxy" => bench_proxy::run(&args),
                "tls" => bench_tls::run(&args),
                "instructions" => bench_instructions::run(&args),
                _ => bench_faults::run(&args),
            };
            match result {
                Ok(()) => {
                    println!("bench {name} (short run) ... ok");
                    totals.passed += 1;
                }
                Err(e) => {
                    eprintln!("error: bench {name} (short run): {e:#}");
                    totals.failed += 1;
                    bench_failed += 1;
                }
            }
        }
    }
    // The totals also when something failed: how many, beside which (named above).
    println!(
        "\nall test binaries: {} passed, {} failed, {} ignored",
        totals.passed, totals.failed, totals.ignored
    );
    println!("{} passed, {} failed", totals.passed, totals.failed);
    for line in totals.recap() {
        println!("{line}");
    }
    unit.and(end_to_end).and(demo).and(deployed)?;
    // Passing tests leave no scratch directory (the test kit's `temp_dir` sweeps its own
    // when the binary exits, and keeps them only after a panic).
    let left: Vec<String> = scratch_dirs()
        .into_iter()
        .filter(|d| !scratch_before.contains(d) && !owner_alive(d))
        .collect();
    if !left.is_empty() {
        bail!(
            "every test passed, yet {} scratch directories were left in {}: {}",
            left.len(),
            std::env::temp_dir().display(),
            left.join(" ")
        );
    }
    if fuzz_failed > 0 {
        bail!("{fuzz_failed} fuzz target(s) failed");
    }
    if bench_failed > 0 {
        bail!("{bench_failed} benchmark(s) failed to run");
    }
    Ok(())
}

/// The short runs of the benchmarks in `./dev test`: every row and peer, seconds each.
/// `bench profile` is left out: it needs perf and inferno, which `./dev bench` installs.
pub const SHORT_BENCHMARKS: &[(&str, &[&str])] = &[
    ("observer", &["4000"]),
    ("observer-lines", &["5000", "--top", "3"]),
    (
        "proxy",
        &["--reps", "1", "--duration", "2", "--warmup", "1", "--floor"],
    ),
    ("tls", &["--reps", "1", "--duration", "2", "--warmup", "1"]),
    ("instructions", &["--duration", "1", "--top", "5"]),
    ("instructions", &["--duration", "1", "--top", "5", "--h2"]),
    // 3 s: under callgrind a TLS handshake takes a good part of a second.
    ("instructions", &["--duration", "3", "--top", "5", "--tls"]),
    (
        "faults",
        &["--faults", "refused", "--duration", "6", "--fault-at", "2"],
    ),
    (
        "faults",
        &[
            "--faults",
            "unavailable",
            "--duration",
            "6",
            "--fault-at",
            "2",
        ],
    ),
    (
        "faults",
        &[
            "--faults",
            "reset",
            "--method",
            "post",
            "--duration",
            "6",
            "--fault-at",
            "2",
        ],
    ),
];

#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
    /// What each failed test printed (libtest's `---- NAME stdout ----` sections), for the
    /// recap at the end of the run.
    failures: Vec<(String, Vec<String>)>,
}

/// Lines of each failed test's output in the recap: its panic message and report, not a whole
/// log.
const RECAP_LINES: usize = 40;

impl Totals {
    /// Reads one line of `cargo test` output: counts `test result:` lines and keeps the
    /// sections of failed tests.
    fn read(&mut self, line: &str, in_failure: &mut bool) {
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .strip_suffix(word)
                            .and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())
                    })
                    .unwrap_or(0)
            };
            self.passed += count("passed");
            self.failed += count("failed");
            self.ignored += count("ignored");
        }
        if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|l| l.strip_suffix(" stdout ----"))
        {
            self.failures.push((name.to_owned(), Vec::new()));
            *in_failure = true;
        } else if line == "failures:" || line.starts_with("test result: ") {
            *in_failure = false;
        } else if *in_failure && let Some((_, lines)) = self.failures.last_mut() {
            lines.push(line.to_owned());
        }
    }

    /// Each failed test again with what it printed, without its backtrace, so that the end of
    /// a long log says why, and not only how many.
    fn recap(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.failures.is_empty() {
            return out;
        }
        out.push("\nfailed tests, and what each printed (backtraces left out):".to_owned());
        for (name, lines) in &self.failures {
            out.push(format!("\n--- {name}"));
            let mut in_backtrace = false;
            let kept: Vec<&String> = lines
                .iter()
                .filter(|l| {
                    if l.starts_with("stack backtrace:") {
                        in_backtrace = true;
                    } else if l.starts_with("note: ")
                        && (l.contains("backtrace") || l.contains("omitted"))
                    {
                        // libtest's hint about RUST_BACKTRACE, which ends a backtrace.
                        in_backtrace = false;
                        return false;
                    }
                    !in_backtrace && !l.trim().is_empty()
                })
                .collect();
            let skipped = kept.len().saturating_sub(RECAP_LINES);
            if skipped > 0 {
                out.push(format!("[{skipped} earlier lines left out]"));
            }
            out.extend(kept[skipped..].iter().map(|l| (*l).clone()));
        }
        out
    }
}

/// `cargo test` of the integration-test `targets` (with cargo's `options`, e.g. features), one
/// test at a time, with `filter`.
fn one_at_a_time(targets: &[String], options: &[&str], filter: &[String]) -> Command {
    let mut cmd = cargo();
    cmd.args(["test", "--no-fail-fast"])
        .args(options)
        .args(targets.iter().flat_map(|t| ["--test", t]))
        .arg("--")
        .arg("--test-threads=1")
        .args(filter);
    cmd
}

/// The workspace's integration-test targets that `cargo test --test '*'` would run (those
/// without required features), split: the `deploy_*` ones (the package's own tests, most of
/// which install it) and the others.
fn end_to_end_targets() -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let out = crate::output(
        cargo().args(["metadata", "--no-deps", "--format-version", "1"]),
        "cargo metadata",
    )?;
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let members: Vec<&str> = meta["workspace_default_members"]
        .as_array()
        .context("cargo metadata lists no default members")?
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    let mut targets: Vec<String> = meta["packages"]
        .as_array()
        .context("cargo metadata lists no packages")?
        .iter()
        .filter(|p| p["id"].as_str().is_some_and(|id| members.contains(&id)))
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"))
        })
        .filter(|t| {
            t["required-features"]
                .as_array()
                .is_none_or(|f| f.is_empty())
        })
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect();
    targets.sort();
    if targets.is_empty() {
        bail!("cargo metadata lists no integration tests");
    }
    Ok(targets.into_iter().partition(|t| t.starts_with("deploy_")))
}

/// Runs a `cargo test` command (`what` names it in the error), echoing its output, and adds up
/// its `test result:` lines and failures.
fn run_tests(what: &str, cmd: &mut Command, totals: &mut Totals) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader};
    eprintln!("\x1b[1m==> {cmd:?}\x1b[0m");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let mut in_failure = false;
    for line in BufReader::new(child.stdout.take().context("stdout")?).lines() {
        let line = line?;
        println!("{line}");
        totals.read(&line, &mut in_failure);
    }
    let status = child.wait()?;
    if !status.success() {
        // The command is echoed above; the error stays short, as it is a log's last line.
        bail!("cargo test ({what}) failed with {status}");
    }
    Ok(())
}

/// The test kit's scratch directories (`gateway-test-LABEL-PID-N`) in the temp dir.
fn scratch_dirs() -> Vec<String> {
    std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("gateway-test-"))
        .collect()
}

/// Whether the process a scratch directory is named after still runs (tests of someone else
/// on the same machine, not this suite's).
fn owner_alive(name: &str) -> bool {
    let mut parts = name.rsplit('-');
    let (_n, pid) = (parts.next(), parts.next());
    pid.and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

#[cfg(test)]
mod tests {
    use super::Totals;

    #[test]
    fn a_scratch_directory_is_owned_by_the_pid_in_its_name() {
        let me = std::process::id();
        assert!(super::owner_alive(&format!(
            "gateway-test-h2c-goaway-{me}-3"
        )));
        assert!(!super::owner_alive("gateway-test-rr-4294967295-0"));
        assert!(!super::owner_alive("gateway-test-odd"));
    }

    #[test]
    fn failures_are_kept_without_their_backtraces_and_results_are_counted() {
        let out = "\
test a ... ok
test b ... FAILED

failures:

---- b stdout ----
report line

thread 'b' panicked at tests/b.rs:1:1:
assertion failed: drift < 0.05
stack backtrace:
   0: frame
note: Some details are omitted
after the backtrace

failures:
    b

test result: FAILED. 1 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out
";
        let (mut totals, mut in_failure) = (Totals::default(), false);
        for line in out.lines() {
            totals.read(line, &mut in_failure);
        }
        assert_eq!((totals.passed, totals.failed, totals.ignored), (1, 1, 2));
        assert_eq!(totals.failures.len(), 1);
        let (name, lines) = &totals.failures[0];
        assert_eq!(name, "b");
        assert!(lines.iter().any(|l| l == "assertion failed: drift < 0.05"));
        assert!(!lines.iter().any(|l| l == "failures:" || l == "    b"));
        let recap = totals.recap();
        assert!(recap.iter().any(|l| l == "assertion failed: drift < 0.05"));
        assert!(recap.iter().any(|l| l == "after the backtrace"));
        assert!(
            !recap
                .iter()
                .any(|l| l.contains("frame") || l.starts_with("note:"))
        );
    }
}
