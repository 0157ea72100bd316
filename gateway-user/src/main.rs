//! `gateway`: parses the command line and dispatches. Everything else lives in the library.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "gateway", version, about = "A reverse proxy and TCP connect observer driven by what the kernel sees")]
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => gateway::proxy::cli_run(&config),
        Command::CheckConfig { file } => gateway::config::cli_check(&file),
        Command::Observe(args) => gateway::observe::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

