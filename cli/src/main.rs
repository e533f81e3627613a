//! `shardseal`: the one user-facing command of ShardSeal.

use clap::{Parser, Subcommand};

/// Confidential inference on serverless functions.
#[derive(Debug, Parser)]
#[command(name = "shardseal", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {}
}
