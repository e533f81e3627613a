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
    /// Log lines as `text` or `json` (one object per line, with the request id).
    #[arg(long, env = shardseal_function::LOG_FORMAT_ENV, default_value = "text")]
    log_format: shardseal_function::LogFormat,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    shardseal_function::init_logging_as(cli.log_format);
    match main_with(cli.args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "function stopped");
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
