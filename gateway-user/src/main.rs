//! `gateway`: parses the command line and dispatches. Everything else lives in the library.

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory as _, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "A reverse proxy and TCP connect observer driven by what the kernel sees"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The lifecycle of `gateway run`, for `--help` and the man page.
const RUN_SIGNALS: &str = "\
Signals:
  SIGTERM, SIGINT  /healthz and /readyz answer 503 at once; new connections are still
                   accepted for [router] drain_delay_ms (default 5000) while load balancers
                   deregister the host, then listening stops and in-flight requests have
                   shutdown_grace_ms (default 30000). A second signal cuts the delay short.
  SIGHUP           reload the config (a bad one is refused, the running one kept) and reopen
                   the access log
  SIGUSR1          reopen the access log (after logrotate moved it)
  SIGUSR2          binary upgrade: start the executable at this path with the listening
                   sockets handed over; once it serves, this process drains and exits

Under systemd (Type=notify) it reports READY=1, RELOADING=1, STOPPING=1 and STATUS=, and pings
the watchdog when WatchdogSec= is set. It moves into a cgroup of its own, a child of its
current cgroup (the unit needs Delegate=yes), before it opens upstream sockets.

Capabilities without root: CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN for the kernel observer,
CAP_NET_BIND_SERVICE for ports below 1024.";

#[derive(Subcommand)]
enum Command {
    /// Run the reverse proxy.
    #[command(after_long_help = RUN_SIGNALS)]
    Run {
        /// Path to the TOML config.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config and, if it is good, make the running gateway PID reload it (SIGHUP).
    /// For systemd's ExecReload=; a bad config fails here and the running one is kept.
    Reload {
        /// Path to the TOML config the gateway runs with.
        #[arg(long, short)]
        config: PathBuf,
        /// The gateway's process id (systemd: $MAINPID).
        #[arg(long)]
        pid: u32,
    },
    /// Validate a config file and exit non-zero with file, line and key on error.
    CheckConfig {
        /// Path to the TOML config.
        file: PathBuf,
    },
    /// Host-wide observer: every outgoing TCP connect, its outcome and the SO_ERROR the
    /// application read.
    Observe(gateway::observe::ObserveArgs),
    /// Probe targets and print a root-cause verdict with the kernel evidence behind it.
    Diagnose(gateway::diagnose::DiagnoseArgs),
    /// Build a lab of faulty upstreams in network namespaces and show what the kernel sees.
    #[cfg(feature = "demo")]
    Demo(gateway::demo::DemoArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (gateway.1 and one per command) into DIR.
    #[command(hide = true)]
    Man {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Print the metric catalogue (METRICS.md) generated from the code.
    #[command(hide = true)]
    MetricsDoc,
    /// One of the demo's client programs (started by `gateway demo`).
    #[cfg(feature = "demo")]
    #[command(hide = true)]
    DemoClient(gateway::demo::DemoClientArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => gateway::service::cli_run(&config),
        Command::Reload { config, pid } => gateway::service::cli_reload(&config, pid),
        Command::CheckConfig { file } => gateway::config::cli_check(&file),
        Command::Observe(args) => gateway::observe::run(args),
        Command::Diagnose(args) => gateway::diagnose::run(args),
        #[cfg(feature = "demo")]
        Command::Demo(args) => gateway::demo::demo(args),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "gateway",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { out } => clap_mangen::generate_to(Cli::command(), &out)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| anyhow::anyhow!("writing man pages to {}: {e}", out.display())),
        Command::MetricsDoc => {
            print!("{}", gateway::metrics::catalogue_markdown());
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "demo")]
        Command::DemoClient(args) => gateway::demo::demo_client(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", gateway::logging::error_text(&err));
            ExitCode::FAILURE
        }
    }
}
