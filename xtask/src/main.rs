//! `cargo xtask`: the workflows behind `./dev` — the full test run, the demo, and the
//! benchmarks. `./dev` installs the toolchains first; this assumes they are there.

mod background;
mod bench;
mod bench_faults;
mod bench_instructions;
mod bench_observer;
mod bench_observer_lines;
mod bench_observer_share;
mod bench_peers;
mod bench_profile;
mod bench_proxy;
mod bench_proxy_h2;
mod bench_proxy_ws;
mod bench_tls;
mod capacity;
mod fuzz;
mod package;
mod pgo;
mod suite;

use std::process::{Command, ExitCode};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Format check, build (with the real eBPF object), unit tests, the Debian package, then
    /// the privileged end-to-end tests one at a time.
    Test {
        /// Only run tests whose names contain this.
        filter: Option<String>,
    },
    /// Build the Debian package (cargo-deb) into target/debian/.
    Package,
    /// Build the release binary and run `gateway demo`.
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks: `observer` (connect+close cost with and without the observer),
    /// `observer-lines` (where inside the observer's eBPF programs that cost goes), `proxy`
    /// (the gateway against nginx and HAProxy), `tls` (the three terminating HTTPS: keep-alive
    /// and new-connection handshakes), `faults` (the three under upstream faults) or `profile`
    /// (a flame graph of the gateway under the `proxy` load: perf and inferno).
    Bench {
        which: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fuzz one target of `fuzz/` (or `all`) with cargo-fuzz for `--time` (e.g. 30s, 30m, 1h),
    /// and report executions per second and the time it ran without a crash.
    Fuzz {
        target: String,
        #[arg(long, default_value = "30s", value_parser = fuzz::parse_duration)]
        time: std::time::Duration,
    },
    /// The kernel side's capacity through `gateway observe`: N distinct destinations
    /// (default 1,000,000) into its LRU table; RSS, evictions, losses and their consistency.
    Capacity {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The gateway's own overload: memory per idle keep-alive and per slow-loris client
    /// connection at `--connections` each (default 10,000), and whether it comes back within
    /// 10 minutes after they close (`proxy_overload`'s memory test on the release binary, run long).
    Overload {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
    },
    /// The soak (`soak_privileged` on the release binary, run long): `--minutes` at `--rate` req/s (1,000) with an
    /// upstream flapping every 2 minutes and SIGHUP every 30 s; prints its samples and figures.
    Soak {
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
        #[arg(long, default_value_t = 1000)]
        rate: u32,
    },
    /// Internal: the benchmark's client process.
    #[command(hide = true)]
    BenchClient { addr: String, cycles: String },
    /// Internal: connects to N distinct loopback destinations.
    #[command(hide = true)]
    BenchSpray { n: String },
}

pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // Never let a developer's AYA_BUILD_SKIP leak into a run that claims to test the kernel side.
    cmd.env_remove("AYA_BUILD_SKIP");
    cmd
}

/// A child process stopped with SIGTERM when dropped, then SIGKILL once `grace` has passed.
pub struct Proc {
    pub name: String,
    pub child: std::process::Child,
    grace: std::time::Duration,
}

impl Proc {
    pub fn new(
        name: impl Into<String>,
        child: std::process::Child,
        grace: std::time::Duration,
    ) -> Proc {
        Proc {
            name: name.into(),
            child,
            grace,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early with {status}", self.name);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + self.grace;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The workspace's root directory.
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_owned()
}

/// `explicit`, or the release `gateway` binary, built now (with the real eBPF object and
/// profile-guided optimization: [`pgo`]).
pub fn release_gateway(explicit: Option<&std::path::Path>) -> anyhow::Result<std::path::PathBuf> {
    match explicit {
        Some(p) => Ok(p.to_owned()),
        None => Ok(pgo::build()?.gateway),
    }
}

/// The bare hyper proxy `bench proxy --floor` measures beside the gateway
/// (floor/src/main.rs), built and trained with the gateway ([`pgo`]).
pub fn release_floor() -> anyhow::Result<std::path::PathBuf> {
    Ok(pgo::build()?.floor)
}

/// This xtask binary, to run one of its hidden commands in a child (`bench-client`,
/// `bench-spray`): `/proc/self/exe`, not `current_exe()`. Under `./dev test` cargo may relink
/// xtask while it runs, which leaves `current_exe()` naming a deleted file ("… (deleted)":
/// ENOENT, seen in the suite), while /proc/self/exe still execs the image the child was forked
/// from.
pub const THIS_BINARY: &str = "/proc/self/exe";

/// A Debian tool by its full path when it lives in /usr/sbin (not on a non-root PATH).
pub fn tool_path(tool: &str) -> String {
    if std::path::Path::new("/usr/sbin").join(tool).is_file() {
        format!("/usr/sbin/{tool}")
    } else {
        tool.to_owned()
    }
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("\x1b[1m==> {cmd:?}\x1b[0m");
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Runs `cmd` for its output; an error says `what` failed, with its stderr, if it did not
/// succeed.
pub fn output(cmd: &mut Command, what: &str) -> anyhow::Result<std::process::Output> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

fn demo(args: Vec<String>) -> anyhow::Result<()> {
    // The demo needs the fault lab compiled in (the `demo` feature, off in production builds).
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "gateway-user",
        "--features",
        "demo",
        "--bin",
        "gateway",
    ]))?;
    run(Command::new("target/release/gateway")
        .arg("demo")
        .args(args))
}

/// `proxy_overload`'s memory test at `connections` of each kind, on the release binary,
/// waiting up to the 10 minutes for the memory to come back.
fn overload(connections: usize) -> anyhow::Result<()> {
    let bin = release_gateway(None)?;
    run(cargo()
        .env("GATEWAY_BIN", bin)
        .env("OVERLOAD_CONNECTIONS", connections.to_string())
        .env("OVERLOAD_BACK_S", "600")
        .args([
            "test",
            "-p",
            "gateway-user",
            "--test",
            "proxy_overload",
            "memory",
        ])
        .args(["--", "--nocapture"]))
}

/// `soak_privileged` for `minutes` at `rate` req/s, on the release binary.
fn soak(minutes: f64, rate: u32) -> anyhow::Result<()> {
    let bin = release_gateway(None)?;
    run(cargo()
        .env("GATEWAY_BIN", bin)
        .env("SOAK_MINUTES", minutes.to_string())
        .env("SOAK_RATE", rate.to_string())
        .args(["test", "-p", "gateway-user", "--test", "soak_privileged"])
        .args(["--", "--nocapture"]))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Test { filter } => suite::test(filter),
        Cmd::Package => package::build().map(|_| ()),
        Cmd::Demo { args } => demo(args),
        Cmd::Bench { which, args } => match which.as_str() {
            "observer" => bench_observer::run(&args),
            "observer-lines" => bench_observer_lines::run(&args),
            "proxy" => bench_proxy::run(&args),
            "tls" => bench_tls::run(&args),
            "faults" => bench_faults::run(&args),
            "profile" => bench_profile::run(&args),
            "instructions" => bench_instructions::run(&args),
            other => Err(anyhow::anyhow!(
                "unknown benchmark {other}; choose observer, observer-lines, proxy, tls, faults, profile or instructions"
            )),
        },
        Cmd::Fuzz { target, time } => fuzz::run(&target, time),
        Cmd::Capacity { args } => capacity::run(&args),
        Cmd::Overload { connections } => overload(connections),
        Cmd::Soak { minutes, rate } => soak(minutes, rate),
        Cmd::BenchClient { addr, cycles } => bench_observer::client(&addr, &cycles),
        Cmd::BenchSpray { n } => bench_observer::spray(&n),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
