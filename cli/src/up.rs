//! `shardseal up`: the embedded default, every service of ShardSeal on this machine.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use shardseal_keys::{OwnerKeyStore, VerifyingKey};

use crate::shutdown_signal;
use crate::stack::{Layout, Stack};

/// Start the quoting agent, key broker and coordinator as separate processes under one
/// supervisor, which restarts any that dies on the address it had; Ctrl-C stops them all.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  shardseal up --state state --deploy resnet=2\n\nThen, as a data owner:\n  shardseal infer --state state --model resnet --input x.npy --output y.npy"
)]
pub(crate) struct UpArgs {
    /// The state folder (created if missing; see the layout in the docs).
    #[arg(long, default_value = "shardseal-state")]
    state: PathBuf,
    /// Where the coordinator listens for clients.
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: String,
    /// A registered model to serve and its stage count, as MODEL=STAGES (repeatable).
    #[arg(long = "deploy", value_name = "MODEL=STAGES")]
    deployments: Vec<String>,
    /// Owner public keys (hex) the broker accepts registrations from (repeatable). The
    /// key store in STATE/owner, if any, is always accepted.
    #[arg(long = "owner-key", value_name = "HEX")]
    owner_keys: Vec<String>,
    /// How long a function's token (the lease on its keys) lasts, in milliseconds; passed
    /// to the broker's --token-lifetime-ms (default 15 min).
    #[arg(long, value_name = "MS")]
    token_lifetime_ms: Option<u64>,
    /// Replicas started per stage.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Requests the coordinator holds at once (routing, or waiting for a stage to scale
    /// from zero); more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// Replica scaling, function memory and stage batching.
    #[command(flatten)]
    scaling: crate::coordinator::ScalingArgs,
    /// Run functions as PROGRAM [ARGS]... instead of this executable's `function`
    /// subcommand, for example the standalone `target/release/shardseal-function`. Its
    /// file's SHA-256 is the measurement written to trust.json. Give it last: it takes
    /// every argument after it.
    #[arg(long, num_args = 1.., value_name = "PROGRAM [ARGS]")]
    function_command: Vec<String>,
    /// The shard store functions read from (default STATE/store): a folder, or
    /// `s3://BUCKET?endpoint=URL&region=R` with the credentials in AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY, which functions inherit.
    #[arg(long, value_name = "DIR|s3://BUCKET?...")]
    store: Option<String>,
}

pub(crate) fn run(args: UpArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(up(args))
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    // Bad settings are refused before anything starts.
    args.scaling.policy()?;
    args.scaling.memory_limit()?;
    let layout = Layout::new(&args.state);
    let mut owners = args
        .owner_keys
        .iter()
        .map(|k| {
            k.parse::<VerifyingKey>()
                .with_context(|| format!("--owner-key {k}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if layout.owner().exists() {
        owners.push(OwnerKeyStore::open(&layout.owner())?.verifying_key());
    }
    let mut deployments = Vec::new();
    for d in &args.deployments {
        let (model, stages) = d
            .split_once('=')
            .with_context(|| format!("--deploy {d:?}: expected MODEL=STAGES"))?;
        deployments.push((
            model.to_owned(),
            stages.parse().with_context(|| format!("--deploy {d:?}"))?,
        ));
    }
    std::fs::create_dir_all(&args.state)?;
    let function_program = args.function_command.first().map(Path::new);
    let mut stack = Stack::start(
        &args.state,
        &owners,
        args.token_lifetime_ms,
        function_program,
    )
    .await?;
    let started = async {
        if !args.function_command.is_empty() {
            stack.use_function_command(args.function_command.clone())?;
        }
        stack.add_coordinator_args(args.scaling.to_args());
        stack.add_coordinator_args(["--max-in-flight".to_owned(), args.max_in_flight.to_string()]);
        if let Some(store) = &args.store {
            stack.use_store(store.clone());
        }
        let url = stack
            .start_coordinator(&args.listen, &deployments, args.replicas)
            .await?;
        stack.write_trust()?;
        shardseal_keys::atomic_write(&args.state.join("coordinator.url"), url.as_bytes(), 0o644)?;
        shardseal_keys::atomic_write(
            &args.state.join("broker.url"),
            stack.broker_url.as_bytes(),
            0o644,
        )?;
        Ok::<_, anyhow::Error>(url)
    }
    .await;
    let url = match started {
        Ok(url) => url,
        Err(e) => {
            stack.stop().await;
            return Err(e);
        }
    };
    println!("ShardSeal is up.");
    println!("  coordinator  {url}");
    println!("  key broker   {}", stack.broker_url);
    println!("  trust file   {}", layout.trust_file().display());
    println!("  logs         {}", layout.logs().display());
    println!("Ctrl-C stops everything.");
    // For scripts and tests that start `shardseal up` and wait for it.
    println!("SHARDSEAL_READY {url}");

    // A service that dies is restarted on the same address (see `supervisor`); only a
    // supervisor that cannot restart anything at all gives up.
    let watch = async {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if let Err(e) = stack.supervisor.restart_exited().await {
                return e;
            }
        }
    };
    let outcome = tokio::select! {
        _ = shutdown_signal() => Ok(()),
        e = watch => Err(e),
    };
    println!("stopping");
    stack.stop().await;
    outcome
}
