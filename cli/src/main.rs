//! `shardseal`: the one user-facing command of ShardSeal.

use clap::{Parser, Subcommand};

mod audit;
mod quoting_agent;

/// Confidential inference on serverless functions.
#[derive(Debug, Parser)]
#[command(name = "shardseal", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the software TEE's quoting agent (measures callers, signs quotes).
    QuotingAgent(quoting_agent::QuotingAgentArgs),
    /// Verify or read a tamper-evident audit log.
    Audit(audit::AuditArgs),
}

/// Exit codes: 0 success, 1 any failure (one line on stderr, the cause chain after a
/// colon), 2 bad usage (from clap).
fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::QuotingAgent(args) => quoting_agent::run(args),
        Command::Audit(args) => audit::run(args),
    }
}
