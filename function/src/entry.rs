//! The function process's entry point, shared by the small `shardseal-function` binary and
//! the `shardseal function` subcommand.

use std::path::PathBuf;

use shardseal_attestation::{ModelId, StageIndex};
use shardseal_proto::tls::Pki;
use shardseal_store::StoreConfig;

use crate::Error;
use crate::cold_start::{ColdStartConfig, cold_start};
use crate::memory::{LoadMemory, ServeMemory};
use crate::service::{StageService, run};

/// The line printed on stdout once the stage is ready, followed by its address: the local
/// platform's only signal that the cold start is over.
pub const READY_MARKER: &str = "SHARDSEAL_READY";

/// Command-line arguments of a function.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example (as the local platform starts it):\n  shardseal function --broker https://127.0.0.1:7000 --pki state/pki \\\n    --agent-socket state/agent/agent.sock --store state/store --model resnet --stage 0 \\\n    --metrics-listen 127.0.0.1:0"
)]
pub struct FunctionArgs {
    /// The key broker's address (https://HOST:PORT).
    #[arg(long)]
    pub broker: String,
    /// The broker identity key to expect (hex); refuse any other broker.
    #[arg(long)]
    pub broker_key: Option<String>,
    /// The PKI folder made by `shardseal up` (CA and TLS identities).
    #[arg(long)]
    pub pki: PathBuf,
    /// The quoting agent's Unix socket.
    #[arg(long)]
    pub agent_socket: PathBuf,
    /// The shard store: a folder, or `s3://BUCKET?endpoint=URL&region=R` with the
    /// credentials in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (never on the command
    /// line, never logged).
    #[arg(long, value_name = "DIR|s3://BUCKET?...")]
    pub store: String,
    /// The model to serve.
    #[arg(long)]
    pub model: String,
    /// The stage to serve.
    #[arg(long)]
    pub stage: u32,
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// DANGER: serve plaintext h2c instead of mTLS, on a loopback --listen address only, for
    /// a proxy in the same pod that terminates transport security (Knative's queue-proxy).
    /// See `shardseal_function::danger`.
    #[arg(long)]
    pub danger_h2c_loopback: bool,
    /// Serve Prometheus metrics (GET /metrics, plain HTTP) on this IP:PORT; port 0 picks a
    /// free port, logged as `metrics endpoint`. Off unless given; loopback only unless
    /// --metrics-allow-remote.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Allow --metrics-listen on a non-loopback address.
    #[arg(long, requires = "metrics_listen")]
    pub metrics_allow_remote: bool,
    /// Run up to this many requests waiting at this stage as one batch (1: off). A batch
    /// forms only from requests already waiting for the stage, never by holding one back.
    /// The stage batches only if each of its inputs has a leading axis of 1 and its graph
    /// keeps a batch's rows apart, both checked at load; otherwise it logs why and runs
    /// requests one by one.
    #[arg(
        long,
        default_value_t = 1,
        value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_BATCH))
    )]
    pub max_batch: u16,
    /// How to spend memory while the shard loads: `fast` keeps freed memory in one heap
    /// for reuse (the shortest cold start; the peak is near twice the shard), `lean` hands
    /// large blocks back soon after they are freed (a peak near the shard, a longer cold
    /// start), `auto` loads lean a shard of 32 MiB or more and fast a smaller one. Serving
    /// is the same in all.
    #[arg(long, env = LOAD_MEMORY_ENV, value_enum, default_value_t = LoadMemory::Auto)]
    pub load_memory: LoadMemory,
    /// How to spend memory on inferences: `mapped` maps each block of 256 KiB or more on
    /// its own, keeps the first 80 MiB of them freed for the next block of their size and
    /// hands the rest back (a peak near the live tensors plus at most 80 MiB); `heap` takes
    /// them from one heap that keeps what they free (with two inferences at once it grows
    /// well beyond what they hold, by an amount that varies from run to run).
    #[arg(long, env = SERVE_MEMORY_ENV, value_enum, default_value_t = ServeMemory::Mapped)]
    pub serve_memory: ServeMemory,
}

/// The environment variable `--load-memory` reads; functions started by `shardseal up`
/// inherit it.
pub const LOAD_MEMORY_ENV: &str = "SHARDSEAL_LOAD_MEMORY";

/// The environment variable `--serve-memory` reads; functions started by `shardseal up`
/// inherit it.
pub const SERVE_MEMORY_ENV: &str = "SHARDSEAL_SERVE_MEMORY";

/// The largest `--max-batch` a function takes (and the coordinator passes on).
pub const MAX_BATCH: u16 = 256;

/// Runs a function until SIGTERM or Ctrl-C.
pub fn main_with(args: FunctionArgs) -> Result<(), Error> {
    // Before any thread exists: malloc creates its arenas as threads first allocate (see
    // `memory`).
    let load_memory = crate::memory::prepare_malloc(args.load_memory);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Config(format!("runtime: {e}")))?;
    runtime.block_on(serve(args, load_memory))
}

/// Serves as `args` say, loading the shard as `load_memory` (the mode in effect, or `Auto`
/// still to be decided) says.
async fn serve(args: FunctionArgs, load_memory: LoadMemory) -> Result<(), Error> {
    // Checked before the cold start, so a function that would refuse to serve never asks
    // for keys.
    if args.danger_h2c_loopback
        && !args
            .listen
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|addr| addr.ip().is_loopback())
    {
        return Err(Error::Config(format!(
            "--danger-h2c-loopback serves on a loopback address only; --listen {} is not one",
            args.listen
        )));
    }
    // Bound before the cold start too: a bad metrics address fails before any key is asked.
    let metrics = match &args.metrics_listen {
        Some(addr) => Some(
            shardseal_proto::metrics::bind(addr, args.metrics_allow_remote)
                .await
                .map_err(|e| Error::Config(e.to_string()))?,
        ),
        None => None,
    };
    if let Some(listener) = metrics {
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Config(format!("metrics listen: {e}")))?;
        tracing::info!(%addr, "metrics endpoint");
        tokio::spawn(shardseal_proto::metrics::serve(
            listener,
            || async { shardseal_proto::metrics::global().render() },
            std::future::pending(),
        ));
    }
    let model = ModelId::new(args.model).map_err(|e| Error::Config(e.to_string()))?;
    // The store's configuration errors name the setting, never the URL's text or a key.
    let store = StoreConfig::from_url(&args.store).map_err(|e| Error::Config(e.to_string()))?;
    let config = ColdStartConfig {
        broker_url: args.broker,
        pki_dir: args.pki.clone(),
        agent_socket: args.agent_socket,
        store,
        broker_key: args.broker_key,
        model,
        stage: StageIndex(args.stage),
        max_batch: usize::from(args.max_batch),
        load_memory,
        serve_memory: args.serve_memory,
    };
    let stage = cold_start(&config).await?;
    let lease_config = config.clone();
    let t = &stage.timings;
    // One line per cold start, with these field names: `shardseal bench` reads them from
    // the function logs.
    tracing::info!(
        model = %stage.model, stage = stage.stage.0,
        startup_ms = t.startup_ms, connect_ms = t.connect_ms, attest_ms = t.attest_ms,
        fetch_ms = t.fetch_ms, shard_prefetched = t.shard_prefetched, decrypt_ms = t.decrypt_ms,
        fetch_decrypt_ms = t.fetch_decrypt_ms,
        load_ms = t.load_ms, optimize_ms = t.optimize_ms, total_ms = t.total_ms,
        shard_bytes = t.shard_bytes, peak_rss_bytes = t.peak_rss_bytes,
        load_memory = %t.load_memory, serve_memory = %t.serve_memory,
        mapped_blocks = crate::WipeOnFree::mapped_block_count(),
        reused_blocks = crate::WipeOnFree::reused_block_count(),
        "cold start"
    );
    let pki = Pki::open(&args.pki).map_err(|e| Error::Config(e.to_string()))?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| Error::Config(format!("listen {}: {e}", args.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Config(format!("listen: {e}")))?;
    let service = StageService::new(stage);
    let mut lease = tokio::spawn(crate::lease::keep_renewed(
        lease_config,
        service.shared_stage(),
    ));
    let lease_lost = std::sync::Mutex::new(None);
    // Serving stops on a signal, or when the key lease can no longer be renewed.
    let shutdown = async {
        tokio::select! {
            () = shutdown_signal() => {}
            ended = &mut lease => {
                let error = ended.unwrap_or_else(|e| Error::Config(format!("lease task: {e}")));
                *lease_lost.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error);
            }
        }
    };
    println!("{READY_MARKER} {addr}");
    if args.danger_h2c_loopback {
        crate::danger::serve_h2c_on_loopback(listener, service, shutdown).await?;
    } else {
        run(listener, &pki, service, shutdown).await?;
    }
    match lease_lost
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}
