//! The `gatehouse` command: subcommands that wire the crates together.
//! `main.rs` only calls [`main`]; the dev stack is a library function so
//! tests start exactly what `gatehouse dev` starts.

mod access;
mod approvals;
pub mod config;
pub mod dev;
mod export;
mod policy;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "gatehouse",
    version,
    about = "Identity-aware access gateway for PostgreSQL"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Threads that run sessions, the projector and the API. Default: one
    /// per CPU core for `worker` and `control-plane`; one for `dev`, which
    /// shares its machine with the PostgreSQL and NATS it uses (threads of
    /// its own there only take turns with them, at the cost of a context
    /// switch each).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<std::num::NonZeroUsize>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a data-plane worker (the Postgres front end).
    Worker {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run the control plane (event projector and audit API).
    ControlPlane {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run a worker and the control plane in one process, with a
    /// development OIDC issuer and self-signed TLS, for trying Gatehouse out.
    Dev(dev::DevArgs),
    /// Print a token signed by the development issuer of `gatehouse dev`.
    Token(dev::TokenArgs),
    /// Copy the embedded event log of `gatehouse dev` into a NATS
    /// JetStream stream, so that a single node growing into a fleet keeps
    /// its history.
    ExportLog(export::ExportArgs),
    /// Validate, test and publish Cedar policy bundles.
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
    /// List, inspect, grant and deny commands and requests for access
    /// waiting for an approval.
    Approvals {
        #[command(subcommand)]
        command: approvals::ApprovalsCommand,
    },
    /// Ask for access to a target for a while, list and end your requests.
    Access {
        #[command(subcommand)]
        command: access::AccessCommand,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every session holds two sockets. The soft limit on open files is
    // often 1024, which a few hundred connections exhaust, locking out
    // everyone else; the hard limit is what the host grants the process.
    // The worker's own connection limits then bound what it takes.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("warning: cannot raise the limit on open files: {e}");
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    let threads = cli
        .threads
        .map(std::num::NonZeroUsize::get)
        .or(match cli.command {
            Command::Dev(_) => Some(1),
            _ => None,
        });
    if let Some(n) = threads {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = runtime.block_on(async {
        match cli.command {
            Command::Worker { config } => run::worker(&config).await,
            Command::ControlPlane { config } => run::control_plane(&config).await,
            Command::Dev(args) => dev::run(args).await,
            Command::Token(args) => dev::token(args),
            Command::ExportLog(args) => export::run(args).await,
            Command::Policy { command } => policy::run(command).await,
            Command::Approvals { command } => approvals::run(command).await,
            Command::Access { command } => access::run(command).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
