//! `shardseal`: the one user-facing command of ShardSeal.

use clap::{Parser, Subcommand};

mod audit;
mod bench;
mod broker;
mod config;
mod coordinator;
mod coordinator_platform;
mod demo;
mod infer;
mod keys;
mod keys_register;
mod metrics;
mod plan;
mod provision;
mod proxy;
mod quoting_agent;
mod stack;
mod supervisor;
mod up;
mod usage;

/// Confidential inference on serverless functions.
#[derive(Debug, Parser)]
#[command(name = "shardseal", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a model through the sealed pipeline end to end and check it against plain tract.
    Demo(demo::DemoArgs),
    /// Start every service on this machine (quoting agent, key broker, coordinator).
    Up(up::UpArgs),
    /// Run one sealed inference from .npy or JSON tensor files.
    Infer(infer::InferArgs),
    /// The model owner's keys: create a key store, provision (plan, encrypt, sign).
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Route sealed requests; run stage functions as local processes.
    Coordinator(Box<coordinator::CoordinatorArgs>),
    /// Run the key broker (holds shard and stage keys; releases them to attested functions).
    Broker(broker::BrokerArgs),
    /// Run one stage function (started by the coordinator's platform, not by hand).
    #[command(hide = true)]
    Function(shardseal_function::FunctionArgs),
    /// Run the software TEE's quoting agent (measures callers, signs quotes).
    QuotingAgent(quoting_agent::QuotingAgentArgs),
    /// Verify or read a tamper-evident audit log.
    Audit(audit::AuditArgs),
    /// Show how a model would be cut into pipeline stages.
    Plan(plan::PlanArgs),
    /// Report pay-per-use GB-seconds and cost per model, stage and request.
    Usage(usage::UsageArgs),
    /// Serve the Open Inference Protocol (KServe v2 gRPC) locally, sealing every request.
    Proxy(proxy::ProxyArgs),
    /// Print a commented configuration file for a service role, or check one.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Measure the sealed pipeline against plain tract, side by side in one run.
    Bench(bench::BenchArgs),
    /// Load an ONNX model in plain tract and report the phases (`shardseal bench` runs it
    /// for a fresh-process comparison).
    #[command(hide = true)]
    PlainLoad(bench::PlainLoadArgs),
}

// `shardseal function` runs stage functions from this executable, so it wipes freed memory
// like the standalone `shardseal-function` does (see `WipeOnFree` for the measured cost).
#[global_allocator]
static ALLOCATOR: shardseal_function::WipeOnFree = shardseal_function::WipeOnFree;

/// Exit codes: 0 success, 1 any failure (one line on stderr, the cause chain after a
/// colon), 2 bad usage (from clap, a --config file or a SHARDSEAL_* variable); see
/// `config::EXIT_CODES`.
fn main() -> std::process::ExitCode {
    // Settings come from flags, SHARDSEAL_* variables and --config files (`config`).
    let (cli, global) = match config::parse() {
        Ok(parsed) => parsed,
        Err(code) => return code,
    };
    shardseal_function::init_logging_as(global.log_format);
    if std::env::var_os(supervisor::PARENT_WATCH_ENV).is_some() {
        exit_with_parent();
    }
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Up(args) => up::run(args),
        Command::Infer(args) => infer::run(args),
        Command::Keys(command) => keys::run(command),
        Command::Coordinator(args) => coordinator::run_command(*args),
        Command::Broker(args) => broker::run(args),
        Command::Function(args) => Ok(shardseal_function::main_with(args)?),
        Command::QuotingAgent(args) => quoting_agent::run(args),
        Command::Audit(args) => audit::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Usage(args) => usage::run(args),
        Command::Proxy(args) => proxy::run(args),
        Command::Config(command) => config::run(command),
        Command::Bench(args) => bench::run(args),
        Command::PlainLoad(args) => bench::plain_load_command(args),
    }
}

/// Resolves on Ctrl-C or SIGTERM: how every long-running command stops cleanly.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Asks the kernel to send SIGTERM when the parent exits (`PR_SET_PDEATHSIG`), and exits
/// at once if the parent is already gone.
fn exit_with_parent() {
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM);
    if nix::unistd::getppid() == nix::unistd::Pid::from_raw(1) {
        std::process::exit(1);
    }
}
