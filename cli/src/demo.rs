//! `shardseal demo`: the whole product on one machine, checked against plain tract.
//!
//! Provision (plan, encrypt, sign) → start the quoting agent and the key broker → register
//! the model with a release policy naming this executable's measurement → start the
//! coordinator, whose functions cold-start (attest, receive keys, decrypt their shard) →
//! send R requests through the sealed pipeline with the client SDK → compare each output
//! with plain tract running the whole model in this process → stop everything.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use serde::Serialize;
use shardseal_attestation::{ModelId, ModelVersion};
use shardseal_function::StageEngine;
use shardseal_keys::broker::OwnerReleasePolicy;
use shardseal_keys::{OwnerKeyStore, TensorSpec};
use shardseal_proto::tensor::{DType, HostTensor};
use shardseal_sdk::Client;

use crate::plan::PlanSpec;
use crate::provision::{MANIFEST_FILE, ProvisionRequest, provision};
use crate::stack::{Layout, Stack};

/// Outputs may differ from plain tract by at most this much (absolute): both run the
/// same kernels on the same weights, so only the cut's reassociation of float sums can
/// differ.
const TOLERANCE: f64 = 1e-4;

/// Run a model through the sealed pipeline and check it against plain tract.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  shardseal demo\n  shardseal demo --model resnet.onnx --stages auto --memory-limit 256MiB --requests 20 --json"
)]
pub(crate) struct DemoArgs {
    /// An ONNX model with fixed input shapes (default: a built-in CNN with residual
    /// connections, generated deterministically).
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    plan: PlanSpec,
    /// Requests to send.
    #[arg(long, default_value_t = 8)]
    requests: usize,
    /// Print one JSON object instead of a report.
    #[arg(long)]
    json: bool,
    /// Keep the state folder here instead of a temporary one.
    #[arg(long)]
    state: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct DemoReport {
    model: String,
    stages: usize,
    requests: usize,
    max_abs_diff: f64,
    sealed_ms_p50: f64,
    plain_ms_p50: f64,
    overhead_ratio: f64,
    stage_ms_p50: Vec<StageReport>,
    param_bytes: u64,
}

#[derive(Debug, Serialize)]
struct StageReport {
    stage: u32,
    open_ms: f64,
    run_ms: f64,
    seal_ms: f64,
}

pub(crate) fn run(args: DemoArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(demo(&args))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    // NaN fails too: a difference that is not a number is not within tolerance.
    if report.max_abs_diff.is_nan() || report.max_abs_diff > TOLERANCE {
        bail!(
            "sealed outputs differ from plain tract by {:.3e} (tolerance {TOLERANCE:e})",
            report.max_abs_diff
        );
    }
    Ok(())
}

async fn demo(args: &DemoArgs) -> anyhow::Result<DemoReport> {
    let say = |msg: &str| {
        if !args.json {
            eprintln!("{msg}");
        }
    };
    let (model_bytes, model_id) = read_model(args.model.as_deref())?;

    let temp;
    let state = match &args.state {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("shardseal-demo-")
                .tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let layout = Layout::new(&state);
    std::fs::create_dir_all(&state)?;

    say("1/5 provisioning: plan, encrypt each shard, sign the manifest");
    let owner = OwnerKeyStore::init(&layout.owner()).context("creating the owner's key store")?;
    let version = ModelVersion(1);
    // The store's layout (shardseal_store::StoreKey): models/MODEL/vVERSION/.
    let out = layout
        .store()
        .join("models")
        .join(model_id.as_str())
        .join(format!("v{}", version.0));
    let provisioned = provision(ProvisionRequest {
        model_bytes: &model_bytes,
        model_id: model_id.clone(),
        version,
        options: args.plan.options()?,
        out_dir: &out,
        key_store: &owner,
        show_progress: !args.json,
    })?;
    let stage_count = provisioned.manifest.stages.len();
    let param_bytes = provisioned
        .plan
        .stages()
        .iter()
        .map(|s| s.param_bytes)
        .sum();

    say("2/5 starting the quoting agent and the key broker");
    let mut stack = Stack::start(&state, &[owner.verifying_key()], None, None).await?;
    let result = async {
        say("3/5 registering the model and its release policy with the broker");
        let stages = register(&stack, &owner, &out, stage_count).await?;

        say("4/5 starting the coordinator; functions attest and load their shards");
        let url = stack
            .start_coordinator("127.0.0.1:0", &[(model_id.to_string(), stages)], 1)
            .await?;
        let trust = stack.write_trust()?;

        say("5/5 sending requests through the sealed pipeline");
        let client = Client::connect(&url, trust).await?;
        let pipeline = client.pipeline(model_id.as_str()).await?;
        let reference =
            StageEngine::load(&model_bytes).context("loading the whole model in tract")?;
        let mut sealed_ms = Vec::new();
        let mut plain_ms = Vec::new();
        let mut stage_timings: Vec<Vec<[f64; 3]>> = vec![Vec::new(); stage_count];
        let mut max_diff = 0.0f64;
        for r in 0..args.requests {
            let inputs = random_inputs(&pipeline.inputs, r as u64 + 1)?;
            let t = Instant::now();
            let expected = reference.run(&inputs)?;
            plain_ms.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let got = client.infer(model_id.as_str(), inputs).await?;
            sealed_ms.push(t.elapsed().as_secs_f64() * 1e3);
            for timing in &got.timings {
                if let Some(v) = stage_timings.get_mut(timing.stage as usize) {
                    v.push([timing.open_ms, timing.run_ms, timing.seal_ms]);
                }
            }
            max_diff = max_diff.max(compare(&expected, &got.outputs)?);
        }
        Ok::<_, anyhow::Error>((sealed_ms, plain_ms, stage_timings, max_diff))
    }
    .await;
    stack.stop().await;
    let (mut sealed_ms, mut plain_ms, stage_timings, max_diff) = result?;

    let sealed_p50 = median(&mut sealed_ms);
    let plain_p50 = median(&mut plain_ms);
    Ok(DemoReport {
        model: model_id.to_string(),
        stages: stage_count,
        requests: args.requests,
        max_abs_diff: max_diff,
        sealed_ms_p50: sealed_p50,
        plain_ms_p50: plain_p50,
        overhead_ratio: if plain_p50 > 0.0 {
            sealed_p50 / plain_p50
        } else {
            f64::NAN
        },
        stage_ms_p50: stage_timings
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                let col = |k: usize| median(&mut t.iter().map(|x| x[k]).collect::<Vec<_>>());
                StageReport {
                    stage: i as u32,
                    open_ms: col(0),
                    run_ms: col(1),
                    seal_ms: col(2),
                }
            })
            .collect(),
        param_bytes,
    })
}

/// The bytes of `path`, and a model id made from its file name; the built-in residual CNN
/// when no path is given.
pub(crate) fn read_model(path: Option<&std::path::Path>) -> anyhow::Result<(Vec<u8>, ModelId)> {
    Ok(match path {
        Some(path) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
            let id: String = stem
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '-'
                    }
                })
                .collect();
            (bytes, ModelId::new(id)?)
        }
        None => (
            shardseal_testkit::models::residual_cnn(&Default::default()),
            ModelId::new("demo-cnn")?,
        ),
    })
}

/// Registers the model provisioned in `out` with the stack's broker, releasing every
/// stage's keys to this executable's measurement. Returns the stage count.
pub(crate) async fn register(
    stack: &Stack,
    owner: &OwnerKeyStore,
    out: &std::path::Path,
    stage_count: usize,
) -> anyhow::Result<u32> {
    let stages = u32::try_from(stage_count)?;
    let policy = OwnerReleasePolicy::same_for_all_stages(stages, &[stack.function_measurement()]);
    let manifest_bytes = std::fs::read(out.join(MANIFEST_FILE))?;
    shardseal_keys::broker::owner::register(
        &stack.broker_url,
        &stack.pki,
        owner,
        &manifest_bytes,
        &policy,
    )
    .await
    .context("registering the model with the broker")?;
    Ok(stages)
}

fn print_report(r: &DemoReport) {
    println!(
        "model {} ({:.1} MB of weights) in {} stage(s), {} request(s)",
        r.model,
        r.param_bytes as f64 / 1e6,
        r.stages,
        r.requests
    );
    println!(
        "{:>6} {:>10} {:>10} {:>10}",
        "stage", "open ms", "run ms", "seal ms"
    );
    for s in &r.stage_ms_p50 {
        println!(
            "{:>6} {:>10.3} {:>10.3} {:>10.3}",
            s.stage, s.open_ms, s.run_ms, s.seal_ms
        );
    }
    println!(
        "sealed p50 {:.2} ms, plain tract p50 {:.2} ms (ratio {:.2})",
        r.sealed_ms_p50, r.plain_ms_p50, r.overhead_ratio
    );
    println!(
        "max abs diff against plain tract: {:.3e} (tolerance {TOLERANCE:e})",
        r.max_abs_diff
    );
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The largest absolute difference between two sets of named outputs.
pub(crate) fn compare(expected: &[HostTensor], actual: &[HostTensor]) -> anyhow::Result<f64> {
    let mut max = 0.0f64;
    for e in expected {
        let a = actual
            .iter()
            .find(|a| a.name() == e.name())
            .with_context(|| format!("the sealed pipeline returned no {:?}", e.name()))?;
        if a.shape() != e.shape() || a.dtype() != e.dtype() {
            bail!(
                "output {:?}: shape or type differs from plain tract",
                e.name()
            );
        }
        for (x, y) in e.to_f64_lossy().iter().zip(a.to_f64_lossy()) {
            let d = (x - y).abs();
            max = if d.is_nan() {
                f64::INFINITY
            } else {
                max.max(d)
            };
        }
    }
    Ok(max)
}

/// Deterministic inputs for a manifest's input specs.
pub(crate) fn random_inputs(specs: &[TensorSpec], seed: u64) -> anyhow::Result<Vec<HostTensor>> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    specs
        .iter()
        .map(|spec| {
            let shape: Vec<usize> = spec.shape.iter().map(|&d| d as usize).collect();
            let count: usize = shape.iter().product();
            let mut data = Vec::with_capacity(count * spec.dtype.size());
            for _ in 0..count {
                let unit = (next() >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
                match spec.dtype {
                    DType::F32 => {
                        data.extend_from_slice(&((unit * 2.0 - 1.0) as f32).to_le_bytes())
                    }
                    DType::F64 => data.extend_from_slice(&(unit * 2.0 - 1.0).to_le_bytes()),
                    DType::I64 => data.extend_from_slice(&((unit * 10.0) as i64).to_le_bytes()),
                    DType::I32 => data.extend_from_slice(&((unit * 10.0) as i32).to_le_bytes()),
                    DType::U8 => data.push((unit * 256.0) as u8),
                }
            }
            Ok(HostTensor::new(spec.name.clone(), spec.dtype, shape, data)?)
        })
        .collect()
}
