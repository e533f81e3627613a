//! `shardseal coordinator`: the router and the local serverless platform.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use shardseal_attestation::ModelId;
use shardseal_coordinator::platform::local::{LocalPlatform, LocalPlatformConfig};
use shardseal_coordinator::router::{Router, RouterConfig};
use shardseal_coordinator::service::{BrokerCatalog, CoordinatorService, run};
use shardseal_keys::VerifyingKey;
use shardseal_proto::tls::{Pki, Role};
use shardseal_proto::v1::key_broker_client::KeyBrokerClient;
use tonic::transport::Endpoint;

use crate::shutdown_signal;

/// Route sealed requests and run stage functions as local processes.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  shardseal coordinator --broker https://127.0.0.1:7000 --pki state/pki \\\n    --store state/store --agent-socket state/agent/agent.sock --deploy demo-cnn=2"
)]
pub(crate) struct CoordinatorArgs {
    /// Where to listen for clients.
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: String,
    /// The key broker's address.
    #[arg(long)]
    broker: String,
    /// The broker identity key functions must find (hex).
    #[arg(long)]
    broker_key: Option<String>,
    /// The PKI folder (made by `shardseal up`).
    #[arg(long)]
    pki: PathBuf,
    /// The shard store folder functions read from.
    #[arg(long)]
    store: PathBuf,
    /// The quoting agent's socket, passed to functions.
    #[arg(long)]
    agent_socket: PathBuf,
    /// A model to serve and its stage count, as MODEL=STAGES (repeatable).
    #[arg(long = "deploy", value_name = "MODEL=STAGES")]
    deployments: Vec<String>,
    /// Replicas started per stage at deployment.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Requests in flight before new ones are refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// Folder for function logs.
    #[arg(long, default_value = "logs")]
    log_dir: PathBuf,
    /// The function program and its leading arguments (default: this executable's
    /// `function` subcommand).
    #[arg(long, num_args = 1.., value_name = "PROGRAM [ARGS]")]
    function_command: Vec<String>,
}

pub(crate) fn run_command(args: CoordinatorArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(serve(args))
}

async fn serve(args: CoordinatorArgs) -> anyhow::Result<()> {
    let mut deployments = Vec::new();
    for d in &args.deployments {
        let (model, stages) = d
            .split_once('=')
            .with_context(|| format!("--deploy {d:?}: expected MODEL=STAGES"))?;
        let stages: u32 = stages
            .parse()
            .with_context(|| format!("--deploy {d:?}: STAGES must be a number"))?;
        if stages == 0 {
            bail!("--deploy {d:?}: a model has at least one stage");
        }
        deployments.push((ModelId::new(model)?, stages));
    }
    let pki = Pki::open(&args.pki).context("PKI")?;
    let command = if args.function_command.is_empty() {
        let exe = std::env::current_exe().context("locating this executable")?;
        vec![exe.display().to_string(), "function".to_owned()]
    } else {
        args.function_command.clone()
    };
    let mut common_args = vec![
        "--broker".to_owned(),
        args.broker.clone(),
        "--pki".to_owned(),
        args.pki.display().to_string(),
        "--store".to_owned(),
        args.store.display().to_string(),
        "--agent-socket".to_owned(),
        args.agent_socket.display().to_string(),
    ];
    if let Some(key) = &args.broker_key {
        common_args.extend(["--broker-key".to_owned(), key.clone()]);
    }
    let platform = Arc::new(LocalPlatform::new(LocalPlatformConfig {
        command,
        common_args,
        log_dir: args.log_dir.clone(),
        start_timeout: Duration::from_secs(120),
    }));
    let broker_tls = pki.client_config(Role::Broker, None)?;
    let broker = KeyBrokerClient::new(
        Endpoint::from_shared(args.broker.clone())?
            .tls_config(broker_tls)?
            .connect_lazy(),
    );
    let broker_key = args
        .broker_key
        .as_deref()
        .map(str::parse::<VerifyingKey>)
        .transpose()
        .context("--broker-key")?;
    let router = Arc::new(
        Router::new(
            platform,
            &pki,
            RouterConfig {
                initial_replicas: args.replicas,
                max_in_flight: args.max_in_flight,
                ..RouterConfig::default()
            },
        )
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .with_catalog(Arc::new(BrokerCatalog::new(broker.clone(), broker_key))),
    );
    for (model, stages) in deployments {
        router
            .deploy(model.clone(), stages)
            .await
            .map_err(|s| anyhow::anyhow!("deploying {model}: {}", s.message()))?;
        tracing::info!(%model, stages, "deployed");
    }

    let service = CoordinatorService::new(router.clone(), broker);
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    println!("SHARDSEAL_READY {}", listener.local_addr()?);
    let served = run(listener, &pki, service, shutdown_signal()).await;
    router.shutdown().await;
    served.map_err(|s| anyhow::anyhow!("{}", s.message()))
}
