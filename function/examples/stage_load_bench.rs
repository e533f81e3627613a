//! Prints how long a stage's shard takes to load, the ShardSeal way and the plain tract
//! way, for each stage of a model cut by the planner. The plain figure is the yardstick for
//! a function's cold start (spawn to ready, the `total_ms` of its `cold start` log line).
//!
//! ```text
//! cargo run --release -p shardseal-function --example stage_load_bench -- MODEL.onnx [STAGES] [OUT_DIR]
//! # one plain load in a fresh process, printing its peak RSS:
//! cargo run --release -p shardseal-function --example stage_load_bench -- --plain-rss STAGE.onnx
//! ```
//!
//! "plain" is `tract_onnx::onnx().model_for_path(..).into_optimized().into_runnable()` on
//! the unencrypted stage written to OUT_DIR (memory-mapped, as tract reads a file);
//! "engine" is `StageEngine::load_shard` on the same bytes as decrypted chunks. Best of
//! three runs each, one process, milliseconds.

use std::path::PathBuf;
use std::time::Instant;

use shardseal_attestation::{ModelId, ModelVersion, StageIndex};
use shardseal_coordinator::planner::{PlanOptions, plan};
use shardseal_function::StageEngine;
use shardseal_keys::{DEFAULT_CHUNK_SIZE, ShardBinding, ShardKey, ShardOpener, ShardSealer};
use tract_onnx::prelude::*;

fn plain_load(path: &std::path::Path) -> TractResult<()> {
    let plan = tract_onnx::onnx()
        .model_for_path(path)?
        .into_optimized()?
        .into_runnable()?;
    std::hint::black_box(plan);
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--plain-rss") {
        let path = PathBuf::from(args.get(1).ok_or("--plain-rss STAGE.onnx")?);
        let started = Instant::now();
        plain_load(&path)?;
        println!(
            "plain load {:.1} ms, peak RSS {:.1} MB",
            started.elapsed().as_secs_f64() * 1e3,
            shardseal_function::peak_rss_bytes().unwrap_or(0) as f64 / 1e6
        );
        return Ok(());
    }
    let model = PathBuf::from(args.first().ok_or("usage: MODEL.onnx [STAGES] [OUT_DIR]")?);
    let stages: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(2);
    let out_dir = PathBuf::from(args.get(2).map_or("stage-models", String::as_str));
    std::fs::create_dir_all(&out_dir)?;
    let bytes = std::fs::read(&model)?;
    let plan = plan(&bytes, &PlanOptions::fixed(stages))?;
    println!(
        "{:<6} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "stage", "MB", "plain ms", "engine ms", "(load ms", "optimize ms)"
    );
    for (index, stage) in plan.stage_models().into_iter().enumerate() {
        let path = out_dir.join(format!("stage-{index}.onnx"));
        std::fs::write(&path, &stage)?;
        let mut plain = f64::MAX;
        for _ in 0..3 {
            let started = Instant::now();
            plain_load(&path)?;
            plain = plain.min(started.elapsed().as_secs_f64() * 1e3);
        }
        let key = ShardKey::generate()?;
        let binding = ShardBinding::new(
            ModelId::new("bench")?,
            ModelVersion(1),
            StageIndex(index as u32),
        );
        let mut sealed = Vec::new();
        let mut sealer = ShardSealer::new(&key, &binding, DEFAULT_CHUNK_SIZE)?;
        sealer.update(&stage, &mut sealed)?;
        sealer.finish(&mut sealed)?;
        let (mut engine, mut load, mut optimize) = (f64::MAX, f64::MAX, f64::MAX);
        for _ in 0..3 {
            let mut opener = ShardOpener::new(&key, binding.clone());
            let chunks = opener.update(&sealed)?;
            opener.finish()?;
            let started = Instant::now();
            let (_, timings) = StageEngine::load_shard(chunks, 1)?;
            engine = engine.min(started.elapsed().as_secs_f64() * 1e3);
            load = load.min(timings.load.as_secs_f64() * 1e3);
            optimize = optimize.min(timings.optimize.as_secs_f64() * 1e3);
        }
        println!(
            "{:<6} {:>10.1} {:>10.1} {:>10.1} {:>12.1} {:>12.1}",
            index,
            stage.len() as f64 / 1e6,
            plain,
            engine,
            load,
            optimize
        );
    }
    Ok(())
}
