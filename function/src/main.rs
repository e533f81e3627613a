//! `shardseal-function`: one pipeline stage, as its own small executable (its SHA-256 is
//! the measurement the key broker's release policy names).

use clap::Parser;
use shardseal_function::{FunctionArgs, WipeOnFree, main_with};

#[global_allocator]
static ALLOCATOR: WipeOnFree = WipeOnFree;

/// A ShardSeal stage function.
#[derive(Debug, Parser)]
#[command(name = "shardseal-function", version, about)]
struct Cli {
    #[command(flatten)]
    args: FunctionArgs,
}

fn main() -> std::process::ExitCode {
    shardseal_function::init_logging();
    match main_with(Cli::parse().args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "function stopped");
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
