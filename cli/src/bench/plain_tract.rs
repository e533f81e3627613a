//! Plain tract outside the product, for comparison: how long loading a model takes, phase by
//! phase, and whether running several requests as one batch would pay.
//!
//! Both call tract the way `shardseal_function::StageEngine::load` does (the ONNX protobuf
//! parsed, the inference model built, then optimised and planned), but time the two halves
//! apart, so a function's `load_ms` and `optimize_ms` have a plain counterpart.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use serde::Serialize;
use tract_onnx::pb;
use tract_onnx::prelude::*;

/// A plain tract load of one ONNX model, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub(super) struct LoadPhases {
    /// Protobuf decoding and building tract's inference model.
    pub parse_ms: f64,
    /// Type analysis, optimisation and planning (`into_optimized`, `into_runnable`).
    pub optimize_ms: f64,
}

impl LoadPhases {
    /// Parse plus optimise: what a function spends in tract before it is ready.
    pub(super) fn total_ms(&self) -> f64 {
        self.parse_ms + self.optimize_ms
    }
}

/// Loads `onnx` in tract as a function would, timing each phase.
pub(super) fn load_phases(onnx: &[u8]) -> anyhow::Result<LoadPhases> {
    let t = Instant::now();
    let framework = tract_onnx::onnx();
    let proto = framework
        .proto_model_for_read(&mut &onnx[..])
        .context("parsing the ONNX model")?;
    let model = framework
        .model_for_proto_model(&proto)
        .context("building tract's model")?;
    let parse_ms = ms_since(t);
    let t = Instant::now();
    let plan = model
        .into_optimized()
        .and_then(|m| m.into_runnable())
        .context("optimising the model in tract")?;
    let optimize_ms = ms_since(t);
    drop(plan);
    Ok(LoadPhases {
        parse_ms,
        optimize_ms,
    })
}

/// Arguments of `shardseal plain-load`, the bench's fresh-process plain load.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example (run by `shardseal bench`, not by hand):\n  \
    shardseal plain-load /tmp/stage-0.onnx")]
pub(crate) struct PlainLoadArgs {
    /// The plaintext ONNX model to load.
    pub model: std::path::PathBuf,
}

/// `shardseal plain-load`: reads an ONNX file and loads it in plain tract, then prints one
/// JSON line with the phases. `shardseal bench` times it from spawn to that line: a plain
/// load in a process as fresh as a function's, with every page first-touched as there.
pub(crate) fn plain_load_command(args: PlainLoadArgs) -> anyhow::Result<()> {
    let t = Instant::now();
    let onnx =
        std::fs::read(&args.model).with_context(|| format!("reading {}", args.model.display()))?;
    let read_ms = ms_since(t);
    let phases = load_phases(&onnx)?;
    println!(
        "{}",
        serde_json::json!({
            "read_ms": read_ms,
            "parse_ms": phases.parse_ms,
            "optimize_ms": phases.optimize_ms,
        })
    );
    Ok(())
}

/// Spawns `shardseal plain-load` on `onnx` (written to `scratch`, removed after) and
/// returns the milliseconds from spawn to its report: the plain counterpart of a
/// function's spawn to ready.
pub(super) fn fresh_process_load_ms(onnx: &[u8], scratch: &std::path::Path) -> anyhow::Result<f64> {
    use std::io::{BufRead, Write};
    use std::os::unix::fs::OpenOptionsExt;
    {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(scratch)
            .with_context(|| format!("writing {}", scratch.display()))?;
        file.write_all(onnx)?;
    }
    let result = (|| {
        let started = Instant::now();
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .arg("plain-load")
            .arg(scratch)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting `shardseal plain-load`")?;
        let mut line = String::new();
        if let Some(stdout) = child.stdout.take() {
            std::io::BufReader::new(stdout).read_line(&mut line)?;
        }
        let loaded_ms = ms_since(started);
        let status = child.wait()?;
        if !status.success() || line.trim().is_empty() {
            bail!("`shardseal plain-load` failed ({status})");
        }
        Ok(loaded_ms)
    })();
    let _ = std::fs::remove_file(scratch);
    result
}

/// Plain tract on the whole model at batch 1 and at batch `batch`, one run at a time on one
/// thread: what batching the requests that wait at a stage could gain.
#[derive(Debug, Clone, Serialize)]
pub(super) struct BatchProbe {
    /// The batch size tried.
    pub batch: usize,
    /// Median time of one batch-1 run.
    pub batch1_ms: Option<f64>,
    /// Median time of one run at `batch`.
    pub batched_ms: Option<f64>,
    /// Requests per second gained per core: `batch * batch1_ms / batched_ms`.
    pub throughput_gain: Option<f64>,
    /// How much longer a request waits when it rides in a full batch rather than alone:
    /// `batched_ms / batch1_ms` (before any wait for the batch to fill).
    pub latency_factor: Option<f64>,
    /// Why the probe could not run (a graph that fixes its batch size, for example).
    pub error: Option<String>,
}

/// Runs the batch probe; a model tract cannot rebatch gives a probe holding the reason.
pub(super) fn batch_probe(onnx: &[u8], batch: usize, runs: usize) -> BatchProbe {
    let result = (|| -> anyhow::Result<(f64, f64)> {
        let single = Rebatched::load(onnx, 1).context("at batch 1")?;
        let batched = Rebatched::load(onnx, batch).with_context(|| format!("at batch {batch}"))?;
        single.run()?;
        batched.run()?;
        // Alternated, so load from elsewhere on the machine lands on both.
        let (mut single_ms, mut batched_ms) = (Vec::new(), Vec::new());
        for _ in 0..runs.max(1) {
            single_ms.push(single.run()?);
            batched_ms.push(batched.run()?);
        }
        Ok((median(&mut single_ms), median(&mut batched_ms)))
    })();
    match result {
        Ok((single, batched)) => BatchProbe {
            batch,
            batch1_ms: Some(single),
            batched_ms: Some(batched),
            throughput_gain: Some(batch as f64 * single / batched),
            latency_factor: Some(batched / single),
            error: None,
        },
        Err(e) => BatchProbe {
            batch,
            batch1_ms: None,
            batched_ms: None,
            throughput_gain: None,
            latency_factor: None,
            error: Some(format!("{e:#}")),
        },
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The whole model planned by tract at one batch size, with seeded inputs of that size.
struct Rebatched {
    plan: Arc<TypedRunnableModel>,
    inputs: TVec<TValue>,
}

impl Rebatched {
    fn load(onnx: &[u8], batch: usize) -> anyhow::Result<Self> {
        let framework = tract_onnx::onnx();
        let mut proto = framework
            .proto_model_for_read(&mut &onnx[..])
            .context("parsing the ONNX model")?;
        let shapes = rebatch(&mut proto, batch)?;
        let mut model = framework.model_for_proto_model(&proto)?;
        for (ix, shape) in shapes.iter().enumerate() {
            model.set_input_fact(ix, f32::fact(shape).into())?;
        }
        let plan = model.into_optimized()?.into_runnable()?;
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let inputs = shapes
            .iter()
            .map(|shape| {
                let count: usize = shape.iter().product();
                let values: Vec<f32> = (0..count)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
                    })
                    .collect();
                Ok(
                    tract_ndarray::Array::from_shape_vec(shape.as_slice(), values)?
                        .into_tensor()
                        .into_tvalue(),
                )
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { plan, inputs })
    }

    /// One run, in milliseconds.
    fn run(&self) -> anyhow::Result<f64> {
        let t = Instant::now();
        self.plan.run(self.inputs.clone())?;
        Ok(ms_since(t))
    }
}

/// Sets the first dimension of every graph input to `batch`, and lets the reshapes that pin
/// a batch of 1 (`[1, -1]` before a classifier) copy the batch instead (`0` in ONNX).
/// Returns the inputs' new shapes.
fn rebatch(proto: &mut pb::ModelProto, batch: usize) -> anyhow::Result<Vec<Vec<usize>>> {
    let graph = proto.graph.as_mut().context("the model has no graph")?;
    let initializers: HashSet<String> = graph.initializer.iter().map(|t| t.name.clone()).collect();
    let mut shapes = Vec::new();
    for input in graph
        .input
        .iter_mut()
        .filter(|i| !initializers.contains(&i.name))
    {
        let Some(pb::type_proto::Value::TensorType(tensor)) =
            input.r#type.as_mut().and_then(|t| t.value.as_mut())
        else {
            bail!("input {:?} is not a tensor", input.name);
        };
        if tensor.elem_type != pb::tensor_proto::DataType::Float as i32 {
            bail!(
                "input {:?} is not f32 (the probe feeds f32 only)",
                input.name
            );
        }
        let dims = &mut tensor
            .shape
            .as_mut()
            .with_context(|| format!("input {:?} has no shape", input.name))?
            .dim;
        let Some(first) = dims.first_mut() else {
            bail!("input {:?} is a scalar: no batch dimension", input.name);
        };
        first.value = Some(pb::tensor_shape_proto::dimension::Value::DimValue(
            i64::try_from(batch)?,
        ));
        let shape = dims
            .iter()
            .map(|d| match d.value {
                Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) => {
                    usize::try_from(v).ok()
                }
                _ => None,
            })
            .collect::<Option<Vec<usize>>>()
            .with_context(|| format!("input {:?} has a dynamic dimension", input.name))?;
        shapes.push(shape);
    }
    let reshape_targets: HashSet<String> = graph
        .node
        .iter()
        .filter(|n| n.op_type == "Reshape")
        .filter_map(|n| n.input.get(1).cloned())
        .collect();
    for t in graph
        .initializer
        .iter_mut()
        .filter(|t| reshape_targets.contains(&t.name))
    {
        if let Some(first) = t.int64_data.first_mut() {
            if *first == 1 {
                *first = 0;
            }
        } else if t.raw_data.get(..8) == Some(&1i64.to_le_bytes()[..]) {
            t.raw_data[..8].copy_from_slice(&0i64.to_le_bytes());
        }
    }
    Ok(shapes)
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mlp_rebatches_and_loads_in_two_phases() {
        let onnx = shardseal_testkit::models::mlp(&Default::default());
        let phases = load_phases(&onnx).unwrap();
        assert!(phases.parse_ms > 0.0 && phases.optimize_ms > 0.0);
        let probe = batch_probe(&onnx, 4, 3);
        assert_eq!(probe.error, None);
        assert_eq!(probe.batch, 4);
        assert!(probe.throughput_gain.unwrap() > 0.0);
        assert!(probe.batched_ms.unwrap() > 0.0);
    }

    #[test]
    fn a_model_that_is_not_onnx_gives_a_probe_with_the_reason() {
        let probe = batch_probe(b"not a model", 4, 1);
        assert!(probe.error.is_some());
        assert_eq!(probe.throughput_gain, None);
    }
}
