//! `shardseal coordinator`: the router and the serverless platform (local processes, or
//! static endpoints such as Knative Services).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use shardseal_attestation::ModelId;
use shardseal_audit::{
    AuditWriter, CheckpointSigner, Ed25519Signer, FsyncPolicy, PublicKey, SigningSeed,
    WriterOptions,
};
use shardseal_coordinator::autoscale::ScalingPolicy;
use shardseal_coordinator::billing::UsageLog;
use shardseal_coordinator::platform::Platform;
use shardseal_coordinator::platform::local::{LocalPlatform, LocalPlatformConfig};
use shardseal_coordinator::platform::memory::MemoryLimit;
use shardseal_coordinator::router::{Router, RouterConfig};
use shardseal_coordinator::service::{BrokerCatalog, CoordinatorService, run};
use shardseal_function::MAX_BATCH;
use shardseal_keys::VerifyingKey;
use shardseal_proto::tls::{Pki, Role};
use shardseal_proto::v1::key_broker_client::KeyBrokerClient;
use tonic::transport::Endpoint;
use zeroize::Zeroizing;

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
    /// The shard store functions read from, passed to them: a folder or an s3:// URL
    /// (required with --platform local).
    #[arg(long, value_name = "DIR|s3://BUCKET?...")]
    store: Option<String>,
    /// The quoting agent's socket, passed to functions (required with --platform local).
    #[arg(long)]
    agent_socket: Option<PathBuf>,
    #[command(flatten)]
    platform: crate::coordinator_platform::PlatformArgs,
    /// A model to serve and its stage count, as MODEL=STAGES (repeatable).
    #[arg(long = "deploy", value_name = "MODEL=STAGES")]
    deployments: Vec<String>,
    /// Replicas started per stage at deployment.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Requests in flight before new ones are refused with RESOURCE_EXHAUSTED. Requests
    /// waiting for a stage to scale from zero count too, so that wait is bounded.
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// Folder for function logs.
    #[arg(long, default_value = "logs")]
    log_dir: PathBuf,
    /// The function program and its leading arguments (default: this executable's
    /// `function` subcommand).
    #[arg(long, num_args = 1.., value_name = "PROGRAM [ARGS]")]
    function_command: Vec<String>,
    /// Replica scaling, function memory and stage batching.
    #[command(flatten)]
    scaling: ScalingArgs,
    /// Append one usage record per function invocation (stage, replica, memory size,
    /// duration) to this file, for `shardseal usage`.
    #[arg(long)]
    usage_log: Option<PathBuf>,
    /// Folder of the coordinator's audit log: one entry per request (id, model, stages,
    /// sealed sizes, durations, outcome). Read it with `shardseal audit`.
    #[arg(long, requires = "audit_key")]
    audit_dir: Option<PathBuf>,
    /// The audit log's Ed25519 signing seed (created, mode 0600, if missing; its public key
    /// is written beside it as FILE.pub, for `shardseal audit verify --key`).
    #[arg(long, requires = "audit_dir")]
    audit_key: Option<PathBuf>,
    /// Prometheus metrics; with --platform local each function also serves its own on a
    /// free loopback port (logged in its log as `metrics endpoint`).
    #[command(flatten)]
    metrics: crate::metrics::MetricsArgs,
}

pub(crate) fn run_command(args: CoordinatorArgs) -> anyhow::Result<()> {
    // The coordinator holds no key and no plaintext: it relays sealed activations, so
    // wiping what it frees would hide nothing, and its buffers are reused request after
    // request instead of faulted in afresh (see each function's documentation).
    shardseal_function::WipeOnFree::stop_in_this_process();
    shardseal_function::keep_freed_memory_for_reuse();
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
    let metrics_listener = args.metrics.bind().await?;
    let pki = Pki::open(&args.pki).context("PKI")?;
    let scaling = args.scaling.policy()?;
    let memory_limit = args.scaling.memory_limit()?;
    if let Some(limit) = &memory_limit {
        tracing::info!(bytes = limit.bytes(), enforcement = ?limit.enforcement(), "function memory limit");
    }
    let function_memory_mb = memory_limit
        .as_ref()
        .map_or(DEFAULT_BILLED_MEMORY_MB, |l| l.bytes().div_ceil(1 << 20));
    let platform: Arc<dyn Platform> = if args.platform.is_static() {
        if memory_limit.is_some() {
            bail!(
                "--memory-limit applies to --platform local; a static platform's functions have their limits set where they run (the Knative Service's resources)"
            );
        }
        if !args.scaling.max_batch.is_empty() {
            bail!(
                "--max-batch applies to --platform local; give a static platform's functions --max-batch N where they run (the Knative Service's args)"
            );
        }
        args.platform.static_platform(&pki, &deployments)?
    } else {
        args.platform.check_local()?;
        Arc::new(shardseal_coordinator::metrics::MeteredPlatform::new(
            local_platform(&args, memory_limit)?,
        ))
    };
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
    let router = Router::new(
        platform,
        &pki,
        RouterConfig {
            initial_replicas: args.replicas,
            max_in_flight: args.max_in_flight,
            scaling,
            function_memory_mb,
            ..RouterConfig::default()
        },
    )
    .map_err(|s| anyhow::anyhow!("{}", s.message()))?
    .with_catalog(Arc::new(BrokerCatalog::new(broker.clone(), broker_key)));
    let router = Arc::new(match &args.usage_log {
        Some(path) => router.with_usage_log(Arc::new(UsageLog::open(path)?)),
        None => router,
    });
    // Served from here on, so cold starts at deployment are already visible.
    let metrics_router = router.clone();
    crate::metrics::serve(metrics_listener, move || {
        let router = metrics_router.clone();
        async move {
            shardseal_coordinator::metrics::refresh_gauges(&router).await;
            shardseal_proto::metrics::global().render()
        }
    })?;
    for (model, stages) in deployments {
        router
            .deploy(model.clone(), stages)
            .await
            .map_err(|s| anyhow::anyhow!("deploying {model}: {}", s.message()))?;
        tracing::info!(%model, stages, "deployed");
    }

    let autoscaler = router.spawn_autoscaler();
    let mut service = CoordinatorService::new(router.clone(), broker);
    let audit = match (&args.audit_dir, &args.audit_key) {
        (Some(dir), Some(key)) => {
            let signer = load_or_create_signer(key)?;
            let writer = AuditWriter::open(dir, signer, request_log_options())
                .with_context(|| format!("opening the audit log in {}", dir.display()))?;
            let writer = Arc::new(writer);
            service = service.with_audit(writer.clone());
            Some(writer)
        }
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    println!("SHARDSEAL_READY {}", listener.local_addr()?);
    let served = run(listener, &pki, service, shutdown_signal()).await;
    router.shutdown().await;
    let _ = autoscaler.await;
    if let Some(audit) = audit {
        // The service (and its clone of the writer) is gone once `run` returns.
        match Arc::try_unwrap(audit) {
            Ok(writer) => {
                writer.close().context("closing the audit log")?;
            }
            Err(writer) => {
                writer.checkpoint().context("checkpointing the audit log")?;
            }
        }
    }
    served.map_err(|s| anyhow::anyhow!("{}", s.message()))
}

/// The memory size billed for functions that run without a memory limit, in MiB.
const DEFAULT_BILLED_MEMORY_MB: u64 = 1024;

/// How replicas follow load, how much memory each function may use, and which models'
/// functions batch. Shared by `shardseal coordinator` and `shardseal up` (which passes them
/// on).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ScalingArgs {
    /// Replicas each stage keeps when idle (0: scale to zero).
    #[arg(long, default_value_t = 0)]
    min_replicas: usize,
    /// Replicas a stage never exceeds.
    #[arg(long, default_value_t = 4)]
    max_replicas: usize,
    /// Requests in flight per replica the autoscaler aims for.
    #[arg(long, default_value_t = 1.0)]
    target_in_flight: f64,
    /// Window over which load is averaged before scaling in (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    scale_window: Duration,
    /// Idle time after which a stage scales to zero replicas, or `never`.
    #[arg(long, default_value = "60s", value_parser = parse_optional_duration)]
    scale_to_zero_after: OptionalDuration,
    /// Memory each function may use (e.g. 256MiB, 1GiB), enforced by the kernel: a cgroup
    /// v2 `memory.max` where the coordinator may create cgroups, else `RLIMIT_DATA`. It is
    /// also the memory size usage is billed at (1 GiB when unset).
    #[arg(long, value_name = "SIZE")]
    memory_limit: Option<String>,
    /// Let MODEL's functions run up to N requests waiting at a stage as one batch
    /// (repeatable; 1, the default, is off). Batching never holds a request back; see
    /// `shardseal function --max-batch` for when a stage batches.
    #[arg(long = "max-batch", value_name = "MODEL=N", value_parser = parse_max_batch)]
    max_batch: Vec<(ModelId, u16)>,
}

/// A duration, or none (`never`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct OptionalDuration(Option<Duration>);

impl ScalingArgs {
    pub(crate) fn policy(&self) -> anyhow::Result<ScalingPolicy> {
        let policy = ScalingPolicy {
            min_replicas: self.min_replicas,
            max_replicas: self.max_replicas,
            target_in_flight: self.target_in_flight,
            stable_window: self.scale_window,
            scale_to_zero_after: self.scale_to_zero_after.0,
            ..ScalingPolicy::default()
        };
        policy
            .validate()
            .map_err(|e| anyhow::anyhow!("scaling: {e}"))?;
        Ok(policy)
    }

    pub(crate) fn memory_limit(&self) -> anyhow::Result<Option<MemoryLimit>> {
        self.memory_limit
            .as_deref()
            .map(|text| {
                crate::plan::parse_size(text)
                    .map(MemoryLimit::new)
                    .map_err(|e| anyhow::anyhow!("--memory-limit: {e}"))
            })
            .transpose()
    }

    /// The same settings as `shardseal coordinator` arguments.
    pub(crate) fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--min-replicas".to_owned(),
            self.min_replicas.to_string(),
            "--max-replicas".to_owned(),
            self.max_replicas.to_string(),
            "--target-in-flight".to_owned(),
            self.target_in_flight.to_string(),
            "--scale-window".to_owned(),
            format!("{}ms", self.scale_window.as_millis()),
            "--scale-to-zero-after".to_owned(),
            match self.scale_to_zero_after.0 {
                Some(d) => format!("{}ms", d.as_millis()),
                None => "never".to_owned(),
            },
        ];
        if let Some(limit) = &self.memory_limit {
            args.extend(["--memory-limit".to_owned(), limit.clone()]);
        }
        for (model, n) in &self.max_batch {
            args.extend(["--max-batch".to_owned(), format!("{model}={n}")]);
        }
        args
    }

    /// The batch size each model's functions may use (models not named: 1).
    pub(crate) fn max_batch(&self) -> HashMap<ModelId, u16> {
        self.max_batch.iter().cloned().collect()
    }
}

/// Parses `MODEL=N` for `--max-batch`.
fn parse_max_batch(text: &str) -> Result<(ModelId, u16), String> {
    let (model, n) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected MODEL=N"))?;
    let model = ModelId::new(model).map_err(|e| e.to_string())?;
    match n.parse::<u16>() {
        Ok(n) if (1..=MAX_BATCH).contains(&n) => Ok((model, n)),
        _ => Err(format!(
            "{text:?}: N must be a whole number from 1 to {MAX_BATCH}"
        )),
    }
}

/// Parses `250ms`, `10s`, `2m` or `1h`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a duration such as 500ms, 10s or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        other => Err(format!(
            "{text:?}: unknown unit {other:?} (use ms, s, m or h)"
        )),
    }
}

fn parse_optional_duration(text: &str) -> Result<OptionalDuration, String> {
    match text.trim() {
        "never" | "off" => Ok(OptionalDuration(None)),
        t => parse_duration(t).map(|d| OptionalDuration(Some(d))),
    }
}

/// The local platform: functions as child processes of this coordinator.
fn local_platform(
    args: &CoordinatorArgs,
    memory_limit: Option<MemoryLimit>,
) -> anyhow::Result<Arc<dyn Platform>> {
    let (Some(store), Some(agent_socket)) = (&args.store, &args.agent_socket) else {
        bail!("--platform local needs --store and --agent-socket, which it passes to functions");
    };
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
        store.clone(),
        "--agent-socket".to_owned(),
        agent_socket.display().to_string(),
    ];
    if let Some(key) = &args.broker_key {
        common_args.extend(["--broker-key".to_owned(), key.clone()]);
    }
    if args.metrics.metrics_listen.is_some() {
        // One free loopback port per function: replicas come and go, so operators read
        // the coordinator's aggregate; a function's own endpoint is in its log.
        common_args.extend(["--metrics-listen".to_owned(), "127.0.0.1:0".to_owned()]);
    }
    Ok(Arc::new(LocalPlatform::new(LocalPlatformConfig {
        command,
        common_args,
        log_dir: args.log_dir.clone(),
        start_timeout: Duration::from_secs(120),
        memory_limit,
        max_batch: args.scaling.max_batch(),
    })))
}

/// Per-request entries are many and each is metadata only: they are written (so a crash of
/// the coordinator loses none) but fsynced with each signed checkpoint, every 1000 entries
/// and at shutdown. A power loss can lose the entries since the last checkpoint.
fn request_log_options() -> WriterOptions {
    WriterOptions::default().with_fsync(FsyncPolicy::OnCheckpoint)
}

/// The audit signing seed at `path`, created on first use; its public key goes to
/// `path.pub` (hex).
fn load_or_create_signer(path: &Path) -> anyhow::Result<Ed25519Signer> {
    let seed_bytes: Zeroizing<[u8; 32]> = match std::fs::read(path) {
        Ok(bytes) => {
            let bytes = Zeroizing::new(bytes);
            let mut seed = Zeroizing::new([0u8; 32]);
            if bytes.len() != seed.len() {
                bail!("{}: not a 32-byte audit signing seed", path.display());
            }
            seed.copy_from_slice(&bytes);
            seed
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = Zeroizing::new([0u8; 32]);
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), seed.as_mut())
                .map_err(|_| anyhow::anyhow!("the system random number generator failed"))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            shardseal_keys::atomic_write(path, seed.as_ref(), 0o600)
                .with_context(|| format!("writing {}", path.display()))?;
            seed
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let seed = SigningSeed::from_bytes(*seed_bytes);
    let signer = Ed25519Signer::from_seed(&seed)?;
    let public = PublicKey(signer.public_key()).to_string();
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    shardseal_keys::atomic_write(
        Path::new(&pub_path),
        format!("{public}\n").as_bytes(),
        0o644,
    )
    .context("writing the audit public key")?;
    Ok(signer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_batch_takes_a_model_and_a_size_from_1_to_256() {
        assert_eq!(
            parse_max_batch("mlp-s2=8").unwrap(),
            (ModelId::new("mlp-s2").unwrap(), 8)
        );
        assert_eq!(parse_max_batch("m=256").unwrap().1, 256);
        for bad in ["m=0", "m=257", "m=-1", "m=two", "m", "=4", "a b=4"] {
            assert!(parse_max_batch(bad).is_err(), "{bad}");
        }
    }
}
