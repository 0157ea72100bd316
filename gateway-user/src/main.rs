//! `gateway`: parses the command line and dispatches. Everything else lives in the library.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

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

#[derive(Subcommand)]
enum Command {
    /// Run the reverse proxy.
    Run {
        /// Path to the TOML config.
        #[arg(long, short)]
        config: PathBuf,
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
    Demo(gateway::demo::DemoArgs),
    /// Print the metric catalogue (METRICS.md) generated from the code.
    #[command(hide = true)]
    MetricsDoc,
    /// One of the demo's client programs (started by `gateway demo`).
    #[command(hide = true)]
    DemoClient(gateway::demo::DemoClientArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => gateway::service::cli_run(&config),
        Command::CheckConfig { file } => gateway::config::cli_check(&file),
        Command::Observe(args) => gateway::observe::run(args),
        Command::Diagnose(args) => gateway::diagnose::run(args),
        Command::Demo(args) => gateway::demo::demo(args),
        Command::MetricsDoc => {
            print!("{}", gateway::metrics::catalogue_markdown());
            Ok(ExitCode::SUCCESS)
        }
        Command::DemoClient(args) => gateway::demo::demo_client(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
