//! `shardseal plan`: show how a model would be cut into pipeline stages.

use std::path::PathBuf;

use anyhow::{Context, bail};
use shardseal_coordinator::{Plan, PlanOptions, TensorInfo, plan_file};

/// Arguments of `shardseal plan`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  shardseal plan resnet.onnx --stages 2\n  shardseal plan resnet.onnx --stages auto --memory-limit 256MiB --json"
)]
pub(crate) struct PlanArgs {
    /// The ONNX model to cut.
    model: PathBuf,
    #[command(flatten)]
    spec: PlanSpec,
    /// Print the plan as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// How to cut a model: shared by `plan`, `keys provision` and `demo`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct PlanSpec {
    /// Number of stages, or `auto` for the fewest that each fit --memory-limit.
    #[arg(long, value_parser = parse_stages, default_value = "2")]
    stages: Stages,
    /// The memory of each function, the figure given to `shardseal up --memory-limit`:
    /// bytes, or a size such as 256MiB, 1GiB, 500MB. Each stage's weights plus live
    /// activations are kept within a quarter of it, less 32 MiB for the runtime: loading
    /// holds the decrypted shard, tract's parsed model and its optimized copy at once.
    #[arg(long, value_parser = parse_size)]
    memory_limit: Option<u64>,
    /// Static shape for a graph input with dynamic dimensions, as name=d0,d1,...
    /// (repeat for several inputs).
    #[arg(long = "input-shape", value_parser = parse_input_shape)]
    input_shapes: Vec<(String, Vec<usize>)>,
}

#[derive(Debug, Clone, Copy)]
enum Stages {
    Count(usize),
    Auto,
}

impl PlanSpec {
    /// The planner options these arguments ask for.
    pub(crate) fn options(&self) -> anyhow::Result<PlanOptions> {
        let budget = self.memory_limit.map(stage_budget).transpose()?;
        let mut options = match (self.stages, budget) {
            (Stages::Count(n), limit) => {
                let options = PlanOptions::fixed(n);
                match limit {
                    Some(bytes) => options.with_memory_limit(bytes),
                    None => options,
                }
            }
            (Stages::Auto, Some(bytes)) => PlanOptions::auto(bytes),
            (Stages::Auto, None) => bail!("--stages auto needs --memory-limit"),
        };
        for (name, shape) in &self.input_shapes {
            options = options.with_input_shape(name.clone(), shape.clone());
        }
        Ok(options)
    }
}

/// What the planner may put in one stage of a function with `function_memory` bytes.
fn stage_budget(function_memory: u64) -> anyhow::Result<u64> {
    const RUNTIME: u64 = 32 << 20;
    const LOAD_FACTOR: u64 = 4;
    anyhow::ensure!(
        function_memory > RUNTIME + (4 << 20),
        "--memory-limit {function_memory} bytes leaves nothing for a stage (the runtime needs 32 MiB)"
    );
    Ok((function_memory - RUNTIME) / LOAD_FACTOR)
}

pub(crate) fn run(args: PlanArgs) -> anyhow::Result<()> {
    let options = args.spec.options()?;
    let plan = plan_file(&args.model, &options)
        .with_context(|| format!("cannot plan {}", args.model.display()))?;
    if args.json {
        println!("{}", plan.to_json());
    } else {
        print_table(&args.model, &plan);
    }
    Ok(())
}

fn print_table(model: &std::path::Path, plan: &Plan) {
    let stages = plan.stages();
    let nodes: usize = stages.iter().map(|s| s.node_count).sum();
    let params: u64 = stages.iter().map(|s| s.param_bytes).sum();
    let flops: u64 = stages.iter().map(|s| s.cost).sum();
    println!(
        "{}: {nodes} nodes, {} of weights, {:.3} GFLOP estimated, {} stage(s)",
        model.display(),
        human_bytes(params),
        flops as f64 / 1e9,
        stages.len()
    );
    println!(
        "{:>5}  {:<14} {:>10} {:>7} {:>10}  crossing out (last stage: model outputs)",
        "stage", "nodes", "params", "cost", "memory"
    );
    for stage in stages {
        let range = format!(
            "{}..{} ({})",
            stage.node_range.start, stage.node_range.end, stage.node_count
        );
        let crossing: Vec<String> = stage.outputs.iter().map(describe_tensor).collect();
        println!(
            "{:>5}  {:<14} {:>10} {:>6.1}% {:>10}  {}",
            stage.index.0,
            range,
            human_bytes(stage.param_bytes),
            stage.cost_share * 100.0,
            human_bytes(stage.memory_bytes()),
            crossing.join(", ")
        );
    }
}

fn describe_tensor(tensor: &TensorInfo) -> String {
    let dims: Vec<String> = tensor.shape.iter().map(u64::to_string).collect();
    format!(
        "{} {}[{}] {}",
        tensor.name,
        tensor.dtype,
        dims.join(","),
        human_bytes(tensor.bytes)
    )
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn parse_stages(text: &str) -> Result<Stages, String> {
    if text.eq_ignore_ascii_case("auto") {
        return Ok(Stages::Auto);
    }
    match text.parse::<usize>() {
        Ok(0) => Err("a plan needs at least one stage".into()),
        Ok(n) => Ok(Stages::Count(n)),
        Err(_) => Err(format!(
            "expected a number of stages or `auto`, not {text:?}"
        )),
    }
}

/// Parses `1048576`, `512KiB`, `256MiB`, `1.5GiB`, `500MB` (binary units with `i`, decimal
/// without; case-insensitive).
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use B, KiB, MiB, GiB, KB, MB, GB)"
            ));
        }
    };
    let invalid = || format!("expected a size such as 1073741824, 256MiB or 1GiB, not {text:?}");
    if let Ok(whole) = number.parse::<u64>() {
        return whole.checked_mul(multiplier).ok_or_else(invalid);
    }
    let value: f64 = number.parse().map_err(|_| invalid())?;
    let bytes = value * multiplier as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
        return Err(invalid());
    }
    Ok(bytes.round() as u64)
}

/// Parses `name=d0,d1,...`.
fn parse_input_shape(text: &str) -> Result<(String, Vec<usize>), String> {
    let invalid = || format!("expected name=d0,d1,... (e.g. input=1,3,224,224), not {text:?}");
    let (name, dims) = text.rsplit_once('=').ok_or_else(invalid)?;
    if name.is_empty() {
        return Err(invalid());
    }
    let dims = dims
        .split(',')
        .map(|d| d.trim().parse::<usize>().map_err(|_| invalid()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((name.to_owned(), dims))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_accept_plain_bytes_and_binary_and_decimal_units() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1.5 gib"), Ok(3 << 29));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn input_shapes_and_stage_counts_parse() {
        assert_eq!(
            parse_input_shape("x=1,3,224,224"),
            Ok(("x".into(), vec![1, 3, 224, 224]))
        );
        assert!(parse_input_shape("x=1,,3").is_err());
        assert!(parse_input_shape("=1").is_err());
        assert!(matches!(parse_stages("auto"), Ok(Stages::Auto)));
        assert!(matches!(parse_stages("3"), Ok(Stages::Count(3))));
        assert!(parse_stages("0").is_err());
        assert!(parse_stages("three").is_err());
    }
}
