//! `shardseal infer`: one sealed inference from tensor files, as a data owner.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use shardseal_sdk::tensor_file::{read_json, read_npy, write_json, write_npy};
use shardseal_sdk::{Client, HostTensor, Trust};

use crate::stack::Layout;

/// Run one inference through the sealed pipeline.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  shardseal infer --state shardseal-state --model resnet --input x.npy --output y.npy\n  shardseal infer --coordinator https://10.0.0.5:7443 --trust trust.json --model m \\\n    --input ids=ids.npy --input mask=mask.npy --output out.json\n\nFiles: .npy (one tensor; name it with NAME=FILE unless the model has one input) or\n.json ({\"tensors\":[{\"name\",\"dtype\",\"shape\",\"data\"}]})."
)]
pub(crate) struct InferArgs {
    /// The state folder of `shardseal up` (gives the coordinator address and trust file).
    #[arg(long, conflicts_with_all = ["coordinator", "trust"])]
    state: Option<PathBuf>,
    /// The coordinator's address.
    #[arg(long, requires = "trust")]
    coordinator: Option<String>,
    /// The trust file (broker key, trusted measurements, CA).
    #[arg(long)]
    trust: Option<PathBuf>,
    /// The model id.
    #[arg(long)]
    model: String,
    /// An input file, FILE or NAME=FILE (repeatable).
    #[arg(long = "input", required = true)]
    inputs: Vec<String>,
    /// Where to write the outputs (.npy for a single output, or .json).
    #[arg(long)]
    output: PathBuf,
}

pub(crate) fn run(args: InferArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(infer(args))
}

async fn infer(args: InferArgs) -> anyhow::Result<()> {
    let (url, trust_path) = match (&args.state, &args.coordinator, &args.trust) {
        (Some(state), _, _) => {
            let layout = Layout::new(state);
            (coordinator_url(state)?, layout.trust_file())
        }
        (None, Some(url), Some(trust)) => (url.clone(), trust.clone()),
        _ => bail!("give --state, or --coordinator with --trust"),
    };
    let trust = Trust::from_file(&trust_path)?;
    let client = Client::connect(&url, trust).await?;
    let pipeline = client.pipeline(&args.model).await?;
    let mut inputs: Vec<HostTensor> = Vec::new();
    for spec in &args.inputs {
        let (name, path) = match spec.split_once('=') {
            Some((name, path)) => (Some(name.to_owned()), PathBuf::from(path)),
            None => (None, PathBuf::from(spec)),
        };
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        if is_json(&path) {
            inputs.extend(read_json(&bytes)?);
        } else {
            let name = match name {
                Some(n) => n,
                None if pipeline.inputs.len() == 1 => pipeline.inputs[0].name.clone(),
                None => bail!(
                    "the model has several inputs; name the file as NAME={}",
                    path.display()
                ),
            };
            inputs.push(read_npy(&name, &bytes)?);
        }
    }
    let result = client.infer(&args.model, inputs).await?;
    let bytes = if is_json(&args.output) {
        write_json(&result.outputs).into_bytes()
    } else {
        match result.outputs.as_slice() {
            [single] => write_npy(single),
            _ => bail!("the model has several outputs; write them to a .json file"),
        }
    };
    std::fs::write(&args.output, bytes)
        .with_context(|| format!("writing {}", args.output.display()))?;
    eprintln!(
        "wrote {} output tensor(s) to {}",
        result.outputs.len(),
        args.output.display()
    );
    Ok(())
}

fn is_json(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

/// The coordinator address `shardseal up` recorded in its state folder.
fn coordinator_url(state: &Path) -> anyhow::Result<String> {
    let path = state.join("coordinator.url");
    let url = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (is `shardseal up` running?)", path.display()))?;
    Ok(url.trim().to_owned())
}
