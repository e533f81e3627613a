//! `shardseal bench`: what confidentiality costs, measured side by side in one run.
//!
//! One process tree: this process runs plain tract on the whole model (the unprotected
//! baseline, same engine, same single-threaded kernels) and is also the data owner's
//! client of the sealed pipeline, which runs through the same machinery as `shardseal
//! up` (quoting agent, key broker, coordinator, one function process per stage, TLS on
//! every hop, keys released only after attestation). Latency samples alternate plain and
//! sealed requests, so machine noise lands on both.
//!
//! `--stages 1,2,4,8,16` provisions the model once per stage count and deploys every
//! variant on one coordinator: the table shows what each cut costs. `--routing` measures
//! the coordinator alone on a tiny model: requests per second and CPU per routed request.
//!
//! Every stage runs exactly one replica for the whole run (no autoscaling, no scale to
//! zero): the figures are the pipeline's, not the autoscaler's, and no cold start falls
//! inside a measured phase. A variant's replicas start with its first, untimed request,
//! one stage after another as the request reaches them, one variant after another, right
//! after provisioning (the shards still in the page cache): no cold start competes with
//! another for the cores.

mod observe;
mod plain_tract;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use serde::Serialize;
use shardseal_attestation::{ModelId, ModelVersion, StageIndex};
use shardseal_coordinator::{Plan, PlanOptions};
use shardseal_function::StageEngine;
use shardseal_keys::{
    ChunkOpener, DEFAULT_CHUNK_SIZE, OwnerKeyStore, PlaintextChunk, SealedChunk, ShardBinding,
    ShardGatherer, ShardKey, ShardStats, seal_shard,
};
use shardseal_proto::tensor::HostTensor;
use shardseal_sdk::Client;

use crate::demo::{compare, random_inputs, read_model, register};
use crate::provision::{ProvisionRequest, provision};
use crate::stack::{Layout, Stack};

use observe::{
    ReplicaReady, cpu_seconds, file_rss_bytes, function_cold_start, own_cpu_seconds,
    peak_rss_bytes, processed_batches,
};
use plain_tract::{BatchProbe, LoadPhases, batch_probe, fresh_process_load_ms, load_phases};
pub(crate) use plain_tract::{PlainLoadArgs, plain_load_command};

const MIB: f64 = (1u64 << 20) as f64;

/// Throughput phases run in this many rounds (fewer when there are fewer requests).
const THROUGHPUT_ROUNDS: usize = 3;

/// Measure the sealed pipeline against plain tract on the same machine, in one run.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  shardseal bench --model resnet50.onnx --stages 2 --concurrency 4 --requests 40\n  \
shardseal bench --model resnet50.onnx --stages 1,2,4,8,16 --json\n  \
shardseal bench --routing --requests 3000 --concurrency 32"
)]
pub(crate) struct BenchArgs {
    /// An ONNX model with fixed input shapes (default: the demo's residual CNN; with
    /// --routing, a tiny MLP).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Stage counts to compare, comma-separated (e.g. 1,2,4). A count the planner cannot
    /// cut the model into is reported and skipped.
    #[arg(long, value_delimiter = ',', default_value = "2")]
    stages: Vec<usize>,
    /// Sealed requests in flight at once in the throughput phase.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Requests per phase (latency: this many of each, alternating; throughput: this many
    /// per configuration).
    #[arg(long, default_value_t = 20)]
    requests: usize,
    /// Untimed requests of each kind first (page faults, lazy TLS, tract scratch space).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Parallel plain-tract workers to try for its best throughput, comma-separated
    /// (default: 1, the core count and --concurrency).
    #[arg(long, value_delimiter = ',')]
    plain_parallelism: Vec<usize>,
    /// Also time plain tract on the whole model at this batch size against batch 1, to see
    /// whether batching requests that wait at a stage would pay (0: skip).
    #[arg(long, default_value_t = 4)]
    batch_probe: usize,
    /// Also deploy each stage count with stage batching (`--max-batch MODEL=N`) and
    /// measure it beside the unbatched pipeline (1: unbatched only).
    #[arg(
        long,
        default_value_t = 1,
        value_parser = clap::value_parser!(u16).range(1..=i64::from(shardseal_function::MAX_BATCH))
    )]
    max_batch: u16,
    /// Measure the coordinator alone: routed requests per second and CPU per request.
    #[arg(long)]
    routing: bool,
    /// Print one JSON object per stage count (JSON Lines) instead of tables, each as soon
    /// as its stage count is measured. Progress goes to stderr either way.
    #[arg(long)]
    json: bool,
    /// Keep the state folder (logs included) here instead of a temporary one.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Run the functions as PROGRAM [ARGS]... instead of this executable's `function`
    /// subcommand, as `shardseal up --function-command` does: for example the standalone
    /// `target/release/shardseal-function` that cluster images run. Give it last: it takes
    /// every argument after it.
    #[arg(long, num_args = 1.., value_name = "PROGRAM [ARGS]")]
    function_command: Vec<String>,
}

/// One stage count's figures. Durations in milliseconds, sizes in MiB (2^20 bytes).
#[derive(Debug, Serialize)]
struct RunReport {
    model: String,
    stages: usize,
    /// The program (and its leading arguments) the functions ran as, from
    /// `--function-command`; empty when they ran as this executable's `function` subcommand.
    function_command: Vec<String>,
    /// The most requests a stage ran as one batch (1: batching off).
    max_batch: u16,
    /// Requests per run, on average, in the sealed throughput runs' functions (1 when
    /// unbatched).
    mean_batch: Option<f64>,
    requests: usize,
    concurrency: usize,
    plain_ms_p50: f64,
    plain_ms_p99: f64,
    sealed_ms_p50: f64,
    sealed_ms_p99: f64,
    /// Sealed latency under load: the requests of the throughput runs, at --concurrency.
    sealed_loaded_ms_p50: f64,
    sealed_loaded_ms_p99: f64,
    /// sealed p50 / plain p50.
    overhead_ratio: f64,
    /// Plain tract's best throughput over the parallelisms tried.
    plain_rps: f64,
    plain_best_parallelism: usize,
    plain_rps_by_parallelism: Vec<(usize, f64)>,
    sealed_rps: f64,
    throughput_ratio: f64,
    /// The slowest stage, from spawn to ready (as the coordinator saw it).
    cold_start_ms: f64,
    /// The largest ratio, over stages, of spawn-to-ready to this process's plain tract
    /// load (parse and optimise) of the same shard.
    cold_start_ratio: f64,
    /// The largest ratio, over stages, of spawn-to-ready to a plain load of the same shard
    /// in a fresh process, spawn to loaded.
    cold_start_fresh_ratio: f64,
    /// Tract load and optimisation of the whole model, in this process.
    plain_load_ms: f64,
    /// `plain_load_ms` in its two phases.
    plain_load_phases: LoadPhases,
    stage_cold_start: Vec<StageColdStart>,
    /// Shard decryption, in memory, on the largest shard, GB/s of plaintext: a function's
    /// decrypting half (authentication, AES-256-GCM in place and the shard digest) over
    /// chunks already received into their buffers. `decrypt_parts_gbps.open_in_place`.
    decrypt_gbps: f64,
    /// `decrypt_gbps`, and receiving and decrypting together in memory.
    decrypt_parts_gbps: DecryptSpeed,
    /// What the functions' decrypting threads did: all shards' bytes over the time they
    /// spent decrypting (`decrypt_ms` of their `cold start` lines).
    function_decrypt_gbps: f64,
    /// What the functions saw, file read included: all shards' bytes over their
    /// fetch-and-decrypt time.
    function_fetch_decrypt_gbps: f64,
    stage_peak_rss_mb: Vec<f64>,
    /// The file-backed part of each stage's resident set at the run's end (`RssFile`): the
    /// executable's and the libraries' pages the function has mapped, which every process
    /// running the same files shares. It counts in `stage_peak_rss_mb`.
    stage_rss_file_mb: Vec<f64>,
    stage_shard_mb: Vec<f64>,
    /// Activation bytes crossing the cuts between functions, per request (plaintext
    /// tensor bytes; sealing adds a fixed few dozen bytes per hop).
    cut_bytes_per_request: u64,
    stage_ms_p50: Vec<StageMs>,
    /// CPU (user + system) per request in the throughput runs, by process.
    cpu_ms_per_request: CpuPerRequest,
    /// How many cores each side kept busy in the throughput runs.
    cores_busy: CoresBusy,
    max_abs_diff: f64,
    param_bytes: u64,
    /// Plain tract at batch 1 against a larger batch, on the whole model (none when
    /// skipped with `--batch-probe 0`).
    batch_probe: Option<BatchProbe>,
}

/// One stage's cold start: what the coordinator saw, what the function logged, and a plain
/// tract load of the same shard in this process. A phase the function does not log is
/// `null` (printed "n/a").
#[derive(Debug, Serialize)]
struct StageColdStart {
    stage: u32,
    /// Spawn to `SHARDSEAL_READY`, as the coordinator timed it.
    spawn_to_ready_ms: f64,
    /// Process start: exec, dynamic loading, the runtime. The function's `startup_ms`
    /// when it logs one; otherwise `spawn_to_ready_ms - total_ms` (which then also holds
    /// binding the listener and the ready line).
    process_start_ms: Option<f64>,
    /// TLS to the broker, its identity and a nonce, when the function logs it apart from
    /// `attest_ms`.
    connect_ms: Option<f64>,
    /// Quote from the agent, attestation and key release by the broker.
    attest_ms: Option<f64>,
    /// Reading the sealed shard.
    fetch_ms: Option<f64>,
    /// Opening the shard (AES-256-GCM).
    decrypt_ms: Option<f64>,
    /// Fetch and decrypt together (older functions log only this).
    fetch_decrypt_ms: Option<f64>,
    /// Tract parsing the shard (with its optimisation when `optimize_ms` is null).
    load_ms: Option<f64>,
    /// Tract optimising and planning the shard.
    optimize_ms: Option<f64>,
    /// The function's own cold-start total.
    total_ms: Option<f64>,
    /// Tract parsing the same shard's plaintext, in this process.
    plain_parse_ms: f64,
    /// Tract optimising it, in this process.
    plain_optimize_ms: f64,
    /// `plain_parse_ms + plain_optimize_ms`: the plain load the cold start is compared to.
    plain_load_ms: f64,
    /// `spawn_to_ready_ms / plain_load_ms`.
    ratio: f64,
    /// A plain load of the same shard in a fresh process (`shardseal plain-load`), spawn
    /// to loaded, file read included: it first-touches every page, as a function must.
    plain_fresh_process_ms: f64,
    /// `spawn_to_ready_ms / plain_fresh_process_ms`.
    fresh_ratio: f64,
    /// How the function spent memory while it loaded (`--load-memory`, which functions
    /// take from `SHARDSEAL_LOAD_MEMORY`): `fast` or `lean` (as `auto` decided it).
    load_memory: Option<String>,
    /// How the function spends memory on inferences (`--serve-memory`, which functions take
    /// from `SHARDSEAL_SERVE_MEMORY`): `heap` or `mapped`.
    serve_memory: Option<String>,
    /// The function's peak resident memory (MiB) when it became ready, as it logged it:
    /// the load's peak, where `stage_peak_rss_mb` is the whole run's (serving included).
    ready_peak_rss_mb: Option<f64>,
}

/// CPU time per request in the throughput runs: where the sealed pipeline's cycles go
/// beside plain tract's.
#[derive(Debug, Serialize)]
struct CpuPerRequest {
    /// Plain tract, over all the parallelisms tried.
    plain: f64,
    /// The sealed pipeline, every process below together.
    sealed: f64,
    /// The client (this process, sealing inputs and opening outputs).
    client: f64,
    coordinator: f64,
    /// Each stage's function.
    stages: Vec<f64>,
}

/// CPU seconds over wall-clock seconds in the throughput runs: how much of the machine each
/// side kept busy. With [`CpuPerRequest`] it splits a throughput ratio into CPU spent per
/// request and cores left idle.
#[derive(Debug, Serialize)]
struct CoresBusy {
    /// Plain tract (this process) at each parallelism tried.
    plain_by_parallelism: Vec<(usize, f64)>,
    /// The sealed pipeline: client, coordinator and functions together.
    sealed: f64,
}

/// The processes of a deployment the benchmark watches.
struct Processes<'a> {
    /// One replica per stage, in stage order.
    replicas: &'a [&'a ReplicaReady],
    coordinator_pid: u32,
    logs: PathBuf,
}

impl Processes<'_> {
    /// The log of a function replica.
    fn function_log(&self, replica: &ReplicaReady) -> PathBuf {
        self.logs.join(format!("function-{}.log", replica.replica))
    }

    /// CPU seconds used so far by the client (this process), the coordinator and each
    /// stage's function.
    fn cpu(&self) -> CpuSample {
        let cpu = |pid: u32| cpu_seconds(pid).unwrap_or(f64::NAN);
        CpuSample {
            client: own_cpu_seconds().unwrap_or(f64::NAN),
            coordinator: cpu(self.coordinator_pid),
            stages: self.replicas.iter().map(|r| cpu(r.pid)).collect(),
        }
    }
}

/// CPU seconds per process, or their sums over intervals.
#[derive(Debug, Clone, Default)]
struct CpuSample {
    client: f64,
    coordinator: f64,
    stages: Vec<f64>,
}

impl CpuSample {
    /// Adds the CPU used between `before` and `after`.
    fn add_since(&mut self, before: &CpuSample, after: &CpuSample) {
        self.client += after.client - before.client;
        self.coordinator += after.coordinator - before.coordinator;
        self.stages.resize(after.stages.len(), 0.0);
        for ((sum, b), a) in self
            .stages
            .iter_mut()
            .zip(&before.stages)
            .zip(&after.stages)
        {
            *sum += a - b;
        }
    }

    /// Every process together.
    fn total(&self) -> f64 {
        self.client + self.coordinator + self.stages.iter().sum::<f64>()
    }

    fn per_request_ms(&self, plain: f64, requests: usize) -> CpuPerRequest {
        let ms = |seconds: f64| seconds * 1e3 / requests as f64;
        let stages: Vec<f64> = self.stages.iter().map(|&s| ms(s)).collect();
        CpuPerRequest {
            plain,
            sealed: ms(self.total()),
            client: ms(self.client),
            coordinator: ms(self.coordinator),
            stages,
        }
    }
}

#[derive(Debug, Serialize)]
struct StageMs {
    stage: u32,
    open_ms: f64,
    run_ms: f64,
    seal_ms: f64,
}

/// The coordinator alone.
#[derive(Debug, Serialize)]
struct RoutingReport {
    model: String,
    stages: usize,
    requests: usize,
    concurrency: usize,
    /// Requests per second end to end (client, coordinator and functions share the cores).
    routing_rps: f64,
    /// Coordinator CPU (user + system) per routed request.
    coordinator_cpu_us_per_request: f64,
    /// Requests one core could route: 1 / coordinator CPU per request (none when the
    /// run was too short to register a 10 ms CPU tick).
    coordinator_rps_per_core: Option<f64>,
    function_cpu_us_per_request: f64,
    client_cpu_us_per_request: f64,
    sealed_ms_p50: f64,
    sealed_ms_p99: f64,
}

/// A provisioned variant of the model, before deployment.
struct Variant {
    id: ModelId,
    /// `--max-batch` of its deployment (1: unbatched).
    max_batch: u16,
    stages: usize,
    plan: Plan,
    shard_load: Vec<LoadPhases>,
    /// Each shard's plain load in a fresh process, spawn to loaded (ms).
    shard_fresh_load_ms: Vec<f64>,
    shard_bytes: Vec<u64>,
    decrypt: DecryptSpeed,
}

pub(crate) fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.requests == 0 || args.concurrency == 0 || args.stages.contains(&0) {
        bail!("--requests, --concurrency and every --stages count must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench(&args))
}

async fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    if let Some(program) = args.function_command.first() {
        // Refused now rather than once the model is loaded and provisioned.
        std::fs::metadata(program).with_context(|| format!("the function program {program}"))?;
    }
    let (model_bytes, base_id) = match (&args.model, args.routing) {
        (None, true) => (
            shardseal_testkit::models::mlp(&Default::default()),
            ModelId::new("tiny-mlp")?,
        ),
        (path, _) => read_model(path.as_deref())?,
    };

    let temp;
    let state = match &args.state {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("shardseal-bench-")
                .tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let layout = Layout::new(&state);
    std::fs::create_dir_all(&state)?;

    progress("loading the whole model in plain tract");
    let plain_load = load_phases(&model_bytes).context("loading the model in tract")?;
    let plain = Arc::new(StageEngine::load(&model_bytes).context("loading the model in tract")?);
    let batch = if args.batch_probe > 1 && !args.routing {
        progress(&format!(
            "timing plain tract at batch 1 and batch {}",
            args.batch_probe
        ));
        let probe = batch_probe(&model_bytes, args.batch_probe, args.requests.max(5));
        if let Some(e) = &probe.error {
            progress(&format!("batch probe skipped: {e}"));
        }
        Some(probe)
    } else {
        None
    };

    let owner = OwnerKeyStore::init(&layout.owner()).context("creating the owner's key store")?;
    let mut variants = Vec::new();
    for &n in &args.stages {
        progress(&format!("provisioning {base_id} in {n} stage(s)"));
        let variant = match provision_variant(&layout, &owner, &model_bytes, &base_id, n) {
            Ok(v) => v,
            Err(e) if args.stages.len() > 1 => {
                eprintln!("skipping {n} stage(s): {e:#}");
                continue;
            }
            Err(e) => return Err(e),
        };
        if args.max_batch > 1 && !args.routing {
            progress(&format!(
                "provisioning {base_id} in {n} stage(s) again, for stage batching"
            ));
            let twin = variant.batched_twin(&layout, &owner, &model_bytes, args.max_batch)?;
            variants.extend([variant, twin]);
        } else {
            variants.push(variant);
        }
    }

    if variants.is_empty() {
        bail!("the planner could cut {base_id} into none of the stage counts asked for");
    }

    progress("starting the quoting agent, the key broker and the coordinator");
    let function_program = args.function_command.first().map(Path::new);
    let mut stack = Stack::start(&state, &[owner.verifying_key()], None, function_program).await?;
    // No replica until a variant's first request, then one per stage for the whole run:
    // see the module doc.
    stack.add_coordinator_args(
        [
            "--min-replicas",
            "0",
            "--max-replicas",
            "1",
            "--scale-to-zero-after",
            "never",
        ]
        .map(String::from),
    );
    for v in variants.iter().filter(|v| v.max_batch > 1) {
        stack.add_coordinator_args([
            "--max-batch".to_owned(),
            format!("{}={}", v.id, v.max_batch),
        ]);
    }
    let result = async {
        if !args.function_command.is_empty() {
            stack.use_function_command(args.function_command.clone())?;
        }
        let mut deployments = Vec::new();
        for v in &variants {
            let out = variant_dir(&layout, &v.id);
            let stages = register(&stack, &owner, &out, v.stages).await?;
            deployments.push((v.id.to_string(), stages));
        }
        let url = stack
            .start_coordinator("127.0.0.1:0", &deployments, 0)
            .await?;
        let trust = stack.write_trust()?;
        let client = Arc::new(Client::connect(&url, trust).await?);
        let coordinator_pid: u32 = std::fs::read_to_string(layout.logs().join("coordinator.pid"))
            .context("reading the coordinator's pid")?
            .trim()
            .parse()
            .context("the coordinator's pid file")?;

        // Every variant's functions, one variant after another, before any measurement:
        // the shards are still in the page cache from provisioning.
        for v in &variants {
            progress(&format!("starting {} ({} stage(s))", v.id, v.stages));
            start_functions(&client, v.id.as_str()).await?;
        }
        let mut reports = Vec::new();
        for v in &variants {
            progress(&format!("measuring {} ({} stage(s))", v.id, v.stages));
            let ready = observe::replicas_ready(&layout.logs().join("coordinator.log"))?;
            let replicas = latest_replica_per_stage(&ready, v.id.as_str());
            let processes = Processes {
                replicas: &replicas,
                coordinator_pid,
                logs: layout.logs(),
            };
            // Each variant's figures go out as soon as they exist: a sweep that fails at a
            // later stage count keeps the ones before it.
            if args.routing {
                let report = measure_routing(args, &client, v, &processes).await?;
                if args.json {
                    println!("{}", serde_json::to_string(&report)?);
                } else {
                    print_routing(&report);
                }
            } else {
                let mut report = measure(args, &client, &plain, plain_load, v, &processes).await?;
                report.batch_probe = batch.clone();
                if args.json {
                    println!("{}", serde_json::to_string(&report)?);
                } else {
                    print_run(&report);
                }
                reports.push(report);
            }
        }
        if !args.json && reports.len() > 1 {
            print_sweep(&base_id, &reports);
        }
        if !args.json
            && let Some(probe) = &batch
        {
            print_batch_probe(probe);
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    stack.stop().await;
    result
}

/// Starts `model`'s functions with one untimed request: each stage cold-starts when the
/// request reaches it, one after another, while every other variant's functions sit idle,
/// so no cold start shares the cores with another.
async fn start_functions(client: &Client, model: &str) -> anyhow::Result<()> {
    let pipeline = client.pipeline(model).await?;
    let inputs = random_inputs(&pipeline.inputs, 0)?;
    client
        .infer(model, inputs)
        .await
        .with_context(|| format!("the first request to {model}, which starts its functions"))?;
    Ok(())
}

/// Where `keys provision` puts a model's first version: the store's
/// `models/MODEL/vVERSION/` layout, which functions read.
fn variant_dir(layout: &Layout, id: &ModelId) -> PathBuf {
    layout.store().join("models").join(id.as_str()).join("v1")
}

/// The newest replica of each stage of `model` (the one serving, should an older one have
/// died and been replaced), in stage order.
fn latest_replica_per_stage<'a>(ready: &'a [ReplicaReady], model: &str) -> Vec<&'a ReplicaReady> {
    let mut latest: std::collections::BTreeMap<u32, &ReplicaReady> = Default::default();
    for r in ready.iter().filter(|r| r.model == model) {
        let slot = latest.entry(r.stage).or_insert(r);
        if r.replica > slot.replica {
            *slot = r;
        }
    }
    latest.into_values().collect()
}

/// Plans and provisions `stages` stages of the model; measures what the owner can measure
/// alone (plain load of each shard, shard decryption speed).
fn provision_variant(
    layout: &Layout,
    owner: &OwnerKeyStore,
    model_bytes: &[u8],
    base_id: &ModelId,
    stages: usize,
) -> anyhow::Result<Variant> {
    let id = ModelId::new(format!("{base_id}-s{stages}"))?;
    let plan = provision_as(layout, owner, model_bytes, &id, stages)?;
    let mut shard_load = Vec::new();
    let mut shard_fresh_load_ms = Vec::new();
    let mut shard_bytes = Vec::new();
    let mut largest = Vec::new();
    for i in 0..plan.stages().len() {
        let shard = plan
            .stage_model(StageIndex(u32::try_from(i)?))
            .context("the plan lost a stage")?;
        shard_load
            .push(load_phases(&shard).with_context(|| format!("loading shard {i} in tract"))?);
        let scratch = variant_dir(layout, &id).join(format!("plain-stage-{i}.onnx"));
        shard_fresh_load_ms.push(
            fresh_process_load_ms(&shard, &scratch)
                .with_context(|| format!("loading shard {i} in a fresh process"))?,
        );
        shard_bytes.push(shard.len() as u64);
        if shard.len() > largest.len() {
            largest = shard;
        }
    }
    let decrypt = measure_decrypt(&largest, &id)?;
    Ok(Variant {
        id,
        max_batch: 1,
        stages: plan.stages().len(),
        plan,
        shard_load,
        shard_fresh_load_ms,
        shard_bytes,
        decrypt,
    })
}

/// Provisions the model as `id` in `stages` stages (plan, seal, store) and returns the plan.
fn provision_as(
    layout: &Layout,
    owner: &OwnerKeyStore,
    model_bytes: &[u8],
    id: &ModelId,
    stages: usize,
) -> anyhow::Result<Plan> {
    Ok(provision(ProvisionRequest {
        model_bytes,
        model_id: id.clone(),
        version: ModelVersion(1),
        options: PlanOptions::fixed(stages),
        out_dir: &variant_dir(layout, id),
        key_store: owner,
        show_progress: false,
    })?
    .plan)
}

impl Variant {
    /// The same stages provisioned again under their own model id (`ID-bN`), to be
    /// deployed with `--max-batch ID-bN=N`. The planner is deterministic, so the shards are
    /// the same plaintext: the owner-side measurements (plain loads, decryption) are this
    /// variant's, not taken again.
    fn batched_twin(
        &self,
        layout: &Layout,
        owner: &OwnerKeyStore,
        model_bytes: &[u8],
        max_batch: u16,
    ) -> anyhow::Result<Variant> {
        let id = ModelId::new(format!("{}-b{max_batch}", self.id))?;
        let plan = provision_as(layout, owner, model_bytes, &id, self.stages)?;
        Ok(Variant {
            id,
            max_batch,
            stages: plan.stages().len(),
            plan,
            shard_load: self.shard_load.clone(),
            shard_fresh_load_ms: self.shard_fresh_load_ms.clone(),
            shard_bytes: self.shard_bytes.clone(),
            decrypt: self.decrypt,
        })
    }
}

/// How fast a shard opens in memory, GB/s of plaintext, best of three each.
#[derive(Debug, Clone, Copy, Serialize)]
struct DecryptSpeed {
    /// A function's decrypting half alone: a `ChunkOpener` authenticating and decrypting,
    /// in place, chunks a `ShardGatherer` already copied into their buffers (the receive),
    /// shard digest included.
    open_in_place: f64,
    /// Both halves as a function runs them: the gatherer taking the sealed shard in 256 KiB
    /// pieces (copying each chunk into fresh memory) on this thread, the opener on another.
    gather_and_open: f64,
}

/// Seals `plaintext` as a shard under a throwaway key, then opens it the way a function
/// does: the decrypting half alone, and both halves together.
fn measure_decrypt(plaintext: &[u8], id: &ModelId) -> anyhow::Result<DecryptSpeed> {
    const PIECE: usize = 256 << 10;
    let key = ShardKey::generate()?;
    let binding = ShardBinding::new(id.clone(), ModelVersion(1), StageIndex(0));
    let mut sealed = Vec::with_capacity(plaintext.len() + plaintext.len() / 64 + 4096);
    let info = seal_shard(&key, &binding, DEFAULT_CHUNK_SIZE, plaintext, &mut sealed)?;
    let gbps = |seconds: f64| plaintext.len() as f64 / seconds / 1e9;
    let check = |stats: ShardStats, opened: &[PlaintextChunk]| -> anyhow::Result<()> {
        let len: usize = opened.iter().map(|c| c.expose_secret().len()).sum();
        if stats.digest != info.digest || len != plaintext.len() {
            bail!("the shard opened to {len} bytes or another digest");
        }
        Ok(())
    };
    let gather = || -> anyhow::Result<Vec<SealedChunk>> {
        let mut gatherer = ShardGatherer::new(binding.clone());
        let mut gathered = Vec::new();
        for piece in sealed.chunks(PIECE) {
            gatherer.update(piece, &mut gathered)?;
        }
        gatherer.finish()?;
        Ok(gathered)
    };
    let mut open_in_place = f64::INFINITY;
    let mut gather_and_open = f64::INFINITY;
    for _ in 0..3 {
        // The opener alone: gathered before the clock starts.
        let gathered = gather()?;
        let t = Instant::now();
        let mut opener = ChunkOpener::new(&key, binding.clone());
        let opened = gathered
            .into_iter()
            .map(|c| opener.open(c))
            .collect::<Result<Vec<_>, _>>()?;
        let stats = opener.finish()?;
        open_in_place = open_in_place.min(t.elapsed().as_secs_f64());
        check(stats, &opened)?;
        drop(opened);

        // Both halves, overlapped on two threads as in a function.
        let t = Instant::now();
        let (stats, opened) = std::thread::scope(|scope| -> anyhow::Result<_> {
            let (send, receive) = std::sync::mpsc::sync_channel::<SealedChunk>(8);
            let opening = scope.spawn(|| -> anyhow::Result<_> {
                let mut opener = ChunkOpener::new(&key, binding.clone());
                let opened = receive
                    .into_iter()
                    .map(|c| opener.open(c))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((opener.finish()?, opened))
            });
            let mut gatherer = ShardGatherer::new(binding.clone());
            let mut gathered = Vec::new();
            for piece in sealed.chunks(PIECE) {
                gatherer.update(piece, &mut gathered)?;
                for chunk in gathered.drain(..) {
                    if send.send(chunk).is_err() {
                        break;
                    }
                }
            }
            drop(send);
            opening
                .join()
                .map_err(|_| anyhow::anyhow!("the opening thread panicked"))?
        })?;
        gather_and_open = gather_and_open.min(t.elapsed().as_secs_f64());
        check(stats, &opened)?;
    }
    Ok(DecryptSpeed {
        open_in_place: gbps(open_in_place),
        gather_and_open: gbps(gather_and_open),
    })
}

async fn measure(
    args: &BenchArgs,
    client: &Arc<Client>,
    plain: &Arc<StageEngine>,
    plain_load: LoadPhases,
    v: &Variant,
    processes: &Processes<'_>,
) -> anyhow::Result<RunReport> {
    let replicas = processes.replicas;
    let model = v.id.as_str();
    let pipeline = client.pipeline(model).await?;
    let inputs: Vec<Vec<HostTensor>> = (0..4)
        .map(|seed| random_inputs(&pipeline.inputs, seed + 1))
        .collect::<anyhow::Result<_>>()?;

    // Latency, one request at a time, plain and sealed alternating.
    progress(&format!(
        "  latency: {} requests of each, one at a time, plain and sealed alternating",
        args.requests
    ));
    let mut plain_ms = Vec::new();
    let mut sealed_ms = Vec::new();
    let mut stage_timings: Vec<Vec<[f64; 3]>> = vec![Vec::new(); v.stages];
    let mut max_diff = 0.0f64;
    for r in 0..args.warmup + args.requests {
        let input = inputs[r % inputs.len()].clone();
        // On a thread of its own, as a function runs it: the runtime's threads carry the
        // client's requests, which an inference on one of them would hold up.
        let (expected, plain_elapsed, input) = {
            let plain = Arc::clone(plain);
            tokio::task::spawn_blocking(move || {
                let t = Instant::now();
                let expected = plain.run(&input);
                (expected, ms_since(t), input)
            })
            .await?
        };
        let expected = expected?;
        let t = Instant::now();
        let got = client.infer(model, input).await?;
        let sealed_elapsed = ms_since(t);
        max_diff = max_diff.max(compare(&expected, &got.outputs)?);
        if r < args.warmup {
            continue;
        }
        plain_ms.push(plain_elapsed);
        sealed_ms.push(sealed_elapsed);
        for timing in &got.timings {
            if let Some(s) = stage_timings.get_mut(timing.stage as usize) {
                s.push([timing.open_ms, timing.run_ms, timing.seal_ms]);
            }
        }
    }

    // Throughput: plain tract at each parallelism and the sealed pipeline at --concurrency.
    let mut parallelisms = if args.plain_parallelism.is_empty() {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        vec![1, cores, args.concurrency]
    } else {
        args.plain_parallelism.clone()
    };
    parallelisms.sort_unstable();
    parallelisms.dedup();
    parallelisms.retain(|&p| p > 0);
    // One untimed pass of every configuration first, as the latency phase has its warm-up
    // requests: the latency phase ran one inference at a time, so a function's further
    // inference slots and plain tract's further threads would otherwise touch their memory
    // for the first time in the first timed round (on this machine's VM, memory touched
    // for the first time costs several times what reused memory does).
    for &p in &parallelisms {
        plain_throughput(plain.clone(), &inputs, args.warmup.max(p), p).await?;
    }
    let warmup = args.warmup.max(args.concurrency);
    sealed_throughput(client, model, &inputs, warmup, args.concurrency).await?;
    // In rounds, every configuration once per round, so a burst of load from elsewhere on
    // the machine lands on all of them rather than on one.
    let processed_before: Vec<usize> = replicas
        .iter()
        .map(|r| processed_batches(&processes.function_log(r)).len())
        .collect();
    let rounds = THROUGHPUT_ROUNDS.min(args.requests);
    let mut plain_seconds = vec![0.0; parallelisms.len()];
    let mut sealed_seconds = 0.0;
    let mut plain_cpu = vec![0.0; parallelisms.len()];
    let mut sealed_cpu = CpuSample::default();
    let mut loaded_ms = Vec::new();
    let mut done = 0;
    for round in 0..rounds {
        progress(&format!(
            "  throughput: round {} of {rounds} (plain tract at {parallelisms:?} in parallel, sealed at {} in flight)",
            round + 1,
            args.concurrency
        ));
        // Split the requests as evenly as the rounds allow.
        let n = (args.requests * (round + 1)) / rounds - done;
        done += n;
        for (k, &p) in parallelisms.iter().enumerate() {
            let before = own_cpu_seconds().unwrap_or(f64::NAN);
            plain_seconds[k] += n as f64 / plain_throughput(plain.clone(), &inputs, n, p).await?;
            plain_cpu[k] += own_cpu_seconds().unwrap_or(f64::NAN) - before;
        }
        let before = processes.cpu();
        let (rps, latencies) =
            sealed_throughput(client, model, &inputs, n, args.concurrency).await?;
        loaded_ms.extend(latencies);
        sealed_cpu.add_since(&before, &processes.cpu());
        sealed_seconds += n as f64 / rps;
    }
    let cpu_ms_per_request = sealed_cpu.per_request_ms(
        plain_cpu.iter().sum::<f64>() * 1e3 / (args.requests * parallelisms.len()) as f64,
        args.requests,
    );
    let cores_busy = CoresBusy {
        plain_by_parallelism: parallelisms
            .iter()
            .zip(plain_cpu.iter().zip(&plain_seconds))
            .map(|(&p, (cpu, seconds))| (p, cpu / seconds))
            .collect(),
        sealed: sealed_cpu.total() / sealed_seconds,
    };
    let plain_rps_by_parallelism: Vec<(usize, f64)> = parallelisms
        .iter()
        .zip(&plain_seconds)
        .map(|(&p, &seconds)| (p, args.requests as f64 / seconds))
        .collect();
    let (plain_best_parallelism, plain_rps) = plain_rps_by_parallelism
        .iter()
        .copied()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((1, f64::NAN));
    let sealed_rps = args.requests as f64 / sealed_seconds;

    // Memory and cold starts, per stage.
    if replicas.len() != v.stages {
        bail!(
            "the coordinator log names {} stage(s) of {model} ready, not {}",
            replicas.len(),
            v.stages
        );
    }
    let mut stage_peak_rss_mb = vec![f64::NAN; v.stages];
    let mut stage_rss_file_mb = vec![f64::NAN; v.stages];
    let mut stage_cold_start = Vec::new();
    let mut fetch_bytes = 0u64;
    let mut fetch_ms = 0.0;
    let mut decrypt_bytes = 0u64;
    let mut decrypt_ms = 0.0;
    for r in replicas {
        let i = r.stage as usize;
        if let (Some(slot), Some(rss)) = (stage_peak_rss_mb.get_mut(i), peak_rss_bytes(r.pid)) {
            *slot = rss as f64 / MIB;
        }
        if let (Some(slot), Some(rss)) = (stage_rss_file_mb.get_mut(i), file_rss_bytes(r.pid)) {
            *slot = rss as f64 / MIB;
        }
        let logged = function_cold_start(&processes.function_log(r)).unwrap_or_default();
        if let Some(ms) = logged.fetch_decrypt_ms {
            fetch_bytes += v.shard_bytes.get(i).copied().unwrap_or(0);
            fetch_ms += ms;
        }
        if let Some(ms) = logged.decrypt_ms {
            decrypt_bytes += v.shard_bytes.get(i).copied().unwrap_or(0);
            decrypt_ms += ms;
        }
        let plain = v
            .shard_load
            .get(i)
            .context("a stage without a plain load")?;
        let fresh = *v
            .shard_fresh_load_ms
            .get(i)
            .context("a stage without a fresh-process plain load")?;
        stage_cold_start.push(StageColdStart {
            stage: r.stage,
            spawn_to_ready_ms: r.spawn_to_ready_ms,
            process_start_ms: logged
                .startup_ms
                .or(logged.total_ms.map(|t| r.spawn_to_ready_ms - t)),
            connect_ms: logged.connect_ms,
            attest_ms: logged.attest_ms,
            fetch_ms: logged.fetch_ms,
            decrypt_ms: logged.decrypt_ms,
            fetch_decrypt_ms: logged.fetch_decrypt_ms,
            load_ms: logged.load_ms,
            optimize_ms: logged.optimize_ms,
            total_ms: logged.total_ms,
            plain_parse_ms: plain.parse_ms,
            plain_optimize_ms: plain.optimize_ms,
            plain_load_ms: plain.total_ms(),
            ratio: r.spawn_to_ready_ms / plain.total_ms(),
            plain_fresh_process_ms: fresh,
            fresh_ratio: r.spawn_to_ready_ms / fresh,
            load_memory: logged.load_memory,
            serve_memory: logged.serve_memory,
            ready_peak_rss_mb: logged.ready_peak_rss_bytes.map(|b| b as f64 / MIB),
        });
    }
    let cold_start_ms = stage_cold_start
        .iter()
        .map(|s| s.spawn_to_ready_ms)
        .fold(0.0, f64::max);
    let cold_start_ratio = stage_cold_start.iter().map(|s| s.ratio).fold(0.0, f64::max);
    let cold_start_fresh_ratio = stage_cold_start
        .iter()
        .map(|s| s.fresh_ratio)
        .fold(0.0, f64::max);

    let stages = v.plan.stages();
    let cut_bytes_per_request = stages
        .iter()
        .take(stages.len().saturating_sub(1))
        .map(|s| s.output_bytes())
        .sum();
    let (plain_p50, plain_p99) = (
        percentile(&mut plain_ms, 0.5),
        percentile(&mut plain_ms, 0.99),
    );
    let (sealed_p50, sealed_p99) = (
        percentile(&mut sealed_ms, 0.5),
        percentile(&mut sealed_ms, 0.99),
    );
    // Of the throughput runs only: the latency runs send one request at a time.
    let batches: Vec<f64> = replicas
        .iter()
        .zip(&processed_before)
        .flat_map(|(r, &before)| {
            processed_batches(&processes.function_log(r))
                .into_iter()
                .skip(before)
        })
        .collect();
    let mean_batch = observe::mean_batch(&batches);
    Ok(RunReport {
        model: v.id.to_string(),
        stages: v.stages,
        function_command: args.function_command.clone(),
        max_batch: v.max_batch,
        mean_batch,
        sealed_loaded_ms_p50: percentile(&mut loaded_ms, 0.5),
        sealed_loaded_ms_p99: percentile(&mut loaded_ms, 0.99),
        requests: args.requests,
        concurrency: args.concurrency,
        plain_ms_p50: plain_p50,
        plain_ms_p99: plain_p99,
        sealed_ms_p50: sealed_p50,
        sealed_ms_p99: sealed_p99,
        overhead_ratio: sealed_p50 / plain_p50,
        plain_rps,
        plain_best_parallelism,
        plain_rps_by_parallelism,
        sealed_rps,
        throughput_ratio: sealed_rps / plain_rps,
        cold_start_ms,
        cold_start_ratio,
        cold_start_fresh_ratio,
        plain_load_ms: plain_load.total_ms(),
        plain_load_phases: plain_load,
        stage_cold_start,
        decrypt_gbps: v.decrypt.open_in_place,
        decrypt_parts_gbps: v.decrypt,
        function_decrypt_gbps: gbps(decrypt_bytes, decrypt_ms),
        function_fetch_decrypt_gbps: gbps(fetch_bytes, fetch_ms),
        stage_peak_rss_mb,
        stage_rss_file_mb,
        stage_shard_mb: v.shard_bytes.iter().map(|&b| b as f64 / MIB).collect(),
        cut_bytes_per_request,
        cpu_ms_per_request,
        cores_busy,
        stage_ms_p50: stage_timings
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                let col =
                    |k: usize| percentile(&mut t.iter().map(|x| x[k]).collect::<Vec<_>>(), 0.5);
                StageMs {
                    stage: i as u32,
                    open_ms: col(0),
                    run_ms: col(1),
                    seal_ms: col(2),
                }
            })
            .collect(),
        max_abs_diff: max_diff,
        param_bytes: stages.iter().map(|s| s.param_bytes).sum(),
        batch_probe: None,
    })
}

async fn measure_routing(
    args: &BenchArgs,
    client: &Arc<Client>,
    v: &Variant,
    processes: &Processes<'_>,
) -> anyhow::Result<RoutingReport> {
    let model = v.id.as_str();
    let pipeline = client.pipeline(model).await?;
    let inputs: Vec<Vec<HostTensor>> = (0..4)
        .map(|seed| random_inputs(&pipeline.inputs, seed + 1))
        .collect::<anyhow::Result<_>>()?;
    let warmup = args.warmup.max(args.concurrency);
    sealed_throughput(client, model, &inputs, warmup, args.concurrency).await?;

    let before = processes.cpu();
    let (rps, mut latencies) =
        sealed_throughput(client, model, &inputs, args.requests, args.concurrency).await?;
    let mut used = CpuSample::default();
    used.add_since(&before, &processes.cpu());
    let per_request = |seconds: f64| seconds * 1e6 / args.requests as f64;
    let coordinator_us = per_request(used.coordinator);
    Ok(RoutingReport {
        model: model.to_owned(),
        stages: v.stages,
        requests: args.requests,
        concurrency: args.concurrency,
        routing_rps: rps,
        coordinator_cpu_us_per_request: coordinator_us,
        coordinator_rps_per_core: (coordinator_us > 0.0).then(|| 1e6 / coordinator_us),
        function_cpu_us_per_request: per_request(used.stages.iter().sum()),
        client_cpu_us_per_request: per_request(used.client),
        sealed_ms_p50: percentile(&mut latencies, 0.5),
        sealed_ms_p99: percentile(&mut latencies, 0.99),
    })
}

/// Requests per second of plain tract with `parallelism` threads sharing `requests` runs.
async fn plain_throughput(
    engine: Arc<StageEngine>,
    inputs: &[Vec<HostTensor>],
    requests: usize,
    parallelism: usize,
) -> anyhow::Result<f64> {
    let inputs = inputs.to_vec();
    tokio::task::spawn_blocking(move || {
        let next = AtomicUsize::new(0);
        let t = Instant::now();
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..parallelism)
                .map(|_| {
                    scope.spawn(|| -> anyhow::Result<()> {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= requests {
                                return Ok(());
                            }
                            engine.run(&inputs[i % inputs.len()])?;
                        }
                    })
                })
                .collect();
            for worker in workers {
                worker
                    .join()
                    .map_err(|_| anyhow::anyhow!("a plain tract worker panicked"))??;
            }
            Ok::<_, anyhow::Error>(())
        })?;
        Ok(requests as f64 / t.elapsed().as_secs_f64())
    })
    .await?
}

/// Requests per second of the sealed pipeline with `concurrency` requests in flight, and
/// each request's latency in milliseconds.
async fn sealed_throughput(
    client: &Arc<Client>,
    model: &str,
    inputs: &[Vec<HostTensor>],
    requests: usize,
    concurrency: usize,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let next = Arc::new(AtomicUsize::new(0));
    let inputs = Arc::new(inputs.to_vec());
    let t = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, next, inputs, model) = (
                client.clone(),
                next.clone(),
                inputs.clone(),
                model.to_owned(),
            );
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= requests {
                        return Ok::<_, anyhow::Error>(latencies);
                    }
                    let started = Instant::now();
                    client
                        .infer(&model, inputs[i % inputs.len()].clone())
                        .await?;
                    latencies.push(ms_since(started));
                }
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(requests);
    for task in tasks {
        latencies.extend(task.await??);
    }
    Ok((requests as f64 / t.elapsed().as_secs_f64(), latencies))
}

fn print_run(r: &RunReport) {
    println!(
        "\n{}: {} stage(s), {:.1} MB of weights, {} requests, {} B crossing cuts per request",
        r.model,
        r.stages,
        r.param_bytes as f64 / 1e6,
        r.requests,
        r.cut_bytes_per_request
    );
    println!(
        "latency   plain p50 {:.2} ms p99 {:.2} ms | sealed p50 {:.2} ms p99 {:.2} ms | ratio {:.3}",
        r.plain_ms_p50, r.plain_ms_p99, r.sealed_ms_p50, r.sealed_ms_p99, r.overhead_ratio
    );
    let tried: Vec<String> = r
        .plain_rps_by_parallelism
        .iter()
        .map(|(p, rps)| format!("{p}: {rps:.2}"))
        .collect();
    println!(
        "throughput plain {:.2} rps (best of parallelism {}) | sealed {:.2} rps at concurrency {} | ratio {:.3}",
        r.plain_rps,
        tried.join(", "),
        r.sealed_rps,
        r.concurrency,
        r.throughput_ratio
    );
    println!(
        "under load sealed p50 {:.2} ms p99 {:.2} ms | max batch {} (mean batch {})",
        r.sealed_loaded_ms_p50,
        r.sealed_loaded_ms_p99,
        r.max_batch,
        opt(r.mean_batch, 2)
    );
    let c = &r.cpu_ms_per_request;
    let stages: Vec<String> = c.stages.iter().map(|ms| format!("{ms:.2}")).collect();
    println!(
        "cpu per request plain {:.2} ms | sealed {:.2} ms: client {:.2}, coordinator {:.2}, stages [{}]",
        c.plain,
        c.sealed,
        c.client,
        c.coordinator,
        stages.join(", ")
    );
    let busy: Vec<String> = r
        .cores_busy
        .plain_by_parallelism
        .iter()
        .map(|(p, busy)| format!("{p}: {busy:.2}"))
        .collect();
    println!(
        "cores busy plain (by parallelism) {} | sealed {:.2}",
        busy.join(", "),
        r.cores_busy.sealed
    );
    println!(
        "cold start slowest {:.1} ms (max ratio to a plain load of the same shard {:.3} in this \
         process, {:.3} in a fresh one); whole-model plain load {:.1} ms (parse {:.1}, optimise {:.1})",
        r.cold_start_ms,
        r.cold_start_ratio,
        r.cold_start_fresh_ratio,
        r.plain_load_ms,
        r.plain_load_phases.parse_ms,
        r.plain_load_phases.optimize_ms
    );
    let finite = |v: f64| Some(v).filter(|v| v.is_finite());
    println!(
        "decrypt {:.2} GB/s in memory, in place (receiving and decrypting on two threads {:.2}); in the functions {} GB/s decrypting, {} GB/s with the store read",
        r.decrypt_gbps,
        r.decrypt_parts_gbps.gather_and_open,
        opt(finite(r.function_decrypt_gbps), 2),
        opt(finite(r.function_fetch_decrypt_gbps), 2)
    );
    println!(
        "{:>5} | {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} {:>6} | {:>8} {:>6} | {:>8} {:>8} {:>8} | {:>7} {:>7} {:>7}",
        "stage",
        "ready",
        "process",
        "attest",
        "fetch",
        "decrypt",
        "load",
        "optimise",
        "plain pa",
        "plain op",
        "plain",
        "ratio",
        "fresh",
        "ratio",
        "shard MB",
        "peak RSS",
        "of it file",
        "open",
        "run",
        "seal"
    );
    for (i, c) in r.stage_cold_start.iter().enumerate() {
        let t = r.stage_ms_p50.get(i);
        // Older functions log fetch and decrypt as one figure: show it under "fetch".
        let fetch = c
            .fetch_ms
            .or(c.fetch_decrypt_ms.filter(|_| c.decrypt_ms.is_none()));
        println!(
            "{:>5} | {:>8.1} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} | {:>8.1} {:>8.1} {:>8.1} {:>6.2} | {:>8.1} {:>6.2} | {:>8.1} {:>8.1} {:>8.1} | {:>7.2} {:>7.2} {:>7.2}",
            c.stage,
            c.spawn_to_ready_ms,
            opt(c.process_start_ms, 1),
            opt(c.attest_ms, 1),
            opt(fetch, 1),
            opt(c.decrypt_ms, 1),
            opt(c.load_ms, 1),
            opt(c.optimize_ms, 1),
            c.plain_parse_ms,
            c.plain_optimize_ms,
            c.plain_load_ms,
            c.ratio,
            c.plain_fresh_process_ms,
            c.fresh_ratio,
            r.stage_shard_mb.get(i).copied().unwrap_or(f64::NAN),
            r.stage_peak_rss_mb.get(i).copied().unwrap_or(f64::NAN),
            r.stage_rss_file_mb.get(i).copied().unwrap_or(f64::NAN),
            t.map_or(f64::NAN, |t| t.open_ms),
            t.map_or(f64::NAN, |t| t.run_ms),
            t.map_or(f64::NAN, |t| t.seal_ms),
        );
    }
    println!(
        "(cold start in ms: ready = spawn to ready as the coordinator saw it; process = ready \
         minus the function's own total; n/a = not logged by this function build; \
         a function without separate fetch and decrypt shows both under fetch; of it file = \
         the peak RSS's file-backed part, the executable's pages every function shares)"
    );
    // Stages may differ (`auto` decides each load by the shard's size): each mode once.
    let modes = |mode: fn(&StageColdStart) -> Option<&str>| {
        let mut modes: Vec<&str> = r.stage_cold_start.iter().filter_map(mode).collect();
        modes.sort_unstable();
        modes.dedup();
        modes.join(", ")
    };
    let load_memory = modes(|c| c.load_memory.as_deref());
    if !load_memory.is_empty() {
        println!("functions loaded with --load-memory {load_memory}");
    }
    let serve_memory = modes(|c| c.serve_memory.as_deref());
    if !serve_memory.is_empty() {
        println!("functions serve with --serve-memory {serve_memory}");
    }
    if !r.function_command.is_empty() {
        println!("functions ran as {}", r.function_command.join(" "));
    }
    println!("max abs diff against plain tract: {:.3e}", r.max_abs_diff);
}

/// One line per stage count: what each cut costs.
fn print_sweep(model: &ModelId, reports: &[RunReport]) {
    println!("\nstage sweep of {model} (cut B/req: activation bytes crossing cuts per request)");
    println!(
        "{:>6} {:>5} {:>12} {:>10} {:>10} {:>10} {:>9} {:>10} {:>10} {:>7} {:>11}",
        "stages",
        "batch",
        "cut B/req",
        "plain p50",
        "sealed p50",
        "sealed p99",
        "overhead",
        "plain rps",
        "sealed rps",
        "thr.",
        "cold start"
    );
    for r in reports {
        println!(
            "{:>6} {:>5} {:>12} {:>10.2} {:>10.2} {:>10.2} {:>9.3} {:>10.2} {:>10.2} {:>7.3} {:>11.1}",
            r.stages,
            r.max_batch,
            r.cut_bytes_per_request,
            r.plain_ms_p50,
            r.sealed_ms_p50,
            r.sealed_ms_p99,
            r.overhead_ratio,
            r.plain_rps,
            r.sealed_rps,
            r.throughput_ratio,
            r.cold_start_ms
        );
    }
}

fn print_batch_probe(p: &BatchProbe) {
    match (
        p.batch1_ms,
        p.batched_ms,
        p.throughput_gain,
        p.latency_factor,
    ) {
        (Some(one), Some(many), Some(gain), Some(factor)) => println!(
            "\nbatching (plain tract, whole model, one thread): batch 1 {one:.2} ms, batch {} \
             {many:.2} ms = {:.2} ms per request; throughput x{gain:.2} per core, a batched \
             request waits x{factor:.2} as long as one alone (before the batch fills)",
            p.batch,
            many / p.batch as f64,
        ),
        _ => println!(
            "\nbatching probe at batch {}: n/a ({})",
            p.batch,
            p.error.as_deref().unwrap_or("not run")
        ),
    }
}

/// A figure, or "n/a" when it was not measured.
/// GB/s of `bytes` in `ms` milliseconds; NaN (null in the JSON) when nothing was timed.
fn gbps(bytes: u64, ms: f64) -> f64 {
    if ms > 0.0 {
        bytes as f64 / (ms / 1e3) / 1e9
    } else {
        f64::NAN
    }
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.decimals$}"))
}

fn print_routing(r: &RoutingReport) {
    println!(
        "\n{}: {} stage(s), {} requests at concurrency {}",
        r.model, r.stages, r.requests, r.concurrency
    );
    println!(
        "end to end {:.0} rps (p50 {:.2} ms, p99 {:.2} ms)",
        r.routing_rps, r.sealed_ms_p50, r.sealed_ms_p99
    );
    println!(
        "CPU per request: coordinator {:.1} us ({:.0} routed requests per core-second), functions {:.1} us, client {:.1} us",
        r.coordinator_cpu_us_per_request,
        r.coordinator_rps_per_core.unwrap_or(f64::NAN),
        r.function_cpu_us_per_request,
        r.client_cpu_us_per_request
    );
}

/// Says what the bench is doing, on stderr (stdout carries only the results, tables or
/// JSON Lines): a sweep of a large model runs for many minutes.
fn progress(msg: &str) {
    eprintln!("{msg}");
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// The nearest-rank percentile (`q` in 0..=1); NaN for no samples.
fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = (q * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.5), 50.0);
        assert_eq!(percentile(&mut v, 0.99), 99.0);
        assert_eq!(percentile(&mut v, 1.0), 100.0);
        assert_eq!(percentile(&mut [7.0], 0.99), 7.0);
        assert!(percentile(&mut [], 0.5).is_nan());
    }
}
