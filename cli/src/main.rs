//! `shardseal`: the one user-facing command of ShardSeal.

use clap::{Parser, Subcommand};

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::QuotingAgent(args) => quoting_agent::run(args),
    }
}
