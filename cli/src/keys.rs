//! `shardseal keys`: the model owner's key store and provisioning.

use std::path::PathBuf;

use anyhow::Context;
use shardseal_attestation::{ModelId, ModelVersion};
use shardseal_keys::OwnerKeyStore;

use crate::plan::PlanSpec;
use crate::provision::{ProvisionRequest, provision};

/// Manage the model owner's keys and provision models.
#[derive(Debug, clap::Subcommand)]
#[command(
    after_help = "Example:\n  shardseal keys init --dir owner-keys\n  shardseal keys provision --model resnet.onnx --stages auto --keystore owner-keys --store state/store"
)]
pub(crate) enum KeysCommand {
    /// Create the owner's key store: an Ed25519 signing key and a master key that seals
    /// shard keys at rest (files 0600).
    #[command(after_help = "Example:\n  shardseal keys init --dir owner-keys")]
    Init {
        /// The key store folder to create (must not exist).
        #[arg(long)]
        dir: PathBuf,
        /// Print one JSON object (`dir`, `owner_public_key`) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Plan a model, encrypt each stage's shard and write a manifest signed by the owner.
    #[command(
        after_help = "Example:\n  shardseal keys provision --model resnet.onnx --stages auto --memory-limit 256MiB \\\n    --keystore owner-keys --out provisioned/resnet"
    )]
    Provision(ProvisionArgs),
    #[command(flatten)]
    Broker(crate::keys_register::BrokerOwnerCommand),
}

/// Arguments of `shardseal keys provision`.
#[derive(Debug, clap::Args)]
pub(crate) struct ProvisionArgs {
    /// The plaintext ONNX model (it never leaves this machine unencrypted).
    #[arg(long)]
    model: PathBuf,
    /// The model id to publish it under (default: the file name without extension).
    #[arg(long)]
    model_id: Option<String>,
    /// The version (each provisioning of a model gets a new one, with fresh keys).
    #[arg(long, default_value_t = 1)]
    version: u32,
    #[command(flatten)]
    plan: PlanSpec,
    /// The owner's key store (from `shardseal keys init`).
    #[arg(long)]
    keystore: PathBuf,
    /// Where to write the encrypted shards and the signed manifest (must not exist).
    #[arg(long, required_unless_present = "store", conflicts_with = "store")]
    out: Option<PathBuf>,
    /// Upload the encrypted shards and the signed manifest to this shard store instead: a
    /// folder or `s3://BUCKET?endpoint=URL&region=R` (credentials from AWS_ACCESS_KEY_ID
    /// and AWS_SECRET_ACCESS_KEY). Objects go to models/MODEL/vVERSION/.
    #[arg(long, value_name = "DIR|s3://BUCKET?...")]
    store: Option<String>,
    /// Print one JSON object (model, version, destination, manifest, stages with their
    /// shard files, sizes and digests) instead of text; the progress bar stays on stderr.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Init { dir, json } => {
            let store = OwnerKeyStore::init(&dir)
                .with_context(|| format!("creating the key store {}", dir.display()))?;
            if json {
                let report = serde_json::json!({
                    "dir": dir.display().to_string(),
                    "owner_public_key": store.verifying_key().to_hex(),
                });
                println!("{report}");
                return Ok(());
            }
            println!("created key store {}", dir.display());
            println!(
                "owner signing key (public): {}",
                store.verifying_key().to_hex()
            );
            Ok(())
        }
        KeysCommand::Provision(args) => run_provision(args),
        KeysCommand::Broker(command) => crate::keys_register::run(command),
    }
}

fn run_provision(args: ProvisionArgs) -> anyhow::Result<()> {
    let model_id = match args.model_id {
        Some(id) => ModelId::new(id)?,
        None => {
            let stem = args
                .model
                .file_stem()
                .and_then(|s| s.to_str())
                .context("cannot derive a model id from the file name; pass --model-id")?;
            ModelId::new(stem).context("the file name is not a valid model id; pass --model-id")?
        }
    };
    let version = ModelVersion(args.version);
    // With --store, provision into a private temporary folder (ciphertext only), then upload.
    let upload_to = match &args.store {
        Some(url) => Some(crate::provision::StoreTarget::open(
            url, &model_id, version,
        )?),
        None => None,
    };
    let out = match (&upload_to, &args.out) {
        (Some(target), _) => target.staging_dir(),
        (None, Some(out)) => out.clone(),
        (None, None) => anyhow::bail!("give --out DIR or --store URL"),
    };
    let bytes =
        std::fs::read(&args.model).with_context(|| format!("reading {}", args.model.display()))?;
    let store = OwnerKeyStore::open(&args.keystore)
        .with_context(|| format!("opening the key store {}", args.keystore.display()))?;
    let provisioned = provision(ProvisionRequest {
        model_bytes: &bytes,
        model_id: model_id.clone(),
        version,
        options: args.plan.options()?,
        out_dir: &out,
        key_store: &store,
        show_progress: true,
    })
    .with_context(|| format!("provisioning {}", args.model.display()))?;
    let m = &provisioned.manifest;
    let destination = match &upload_to {
        Some(target) => target.upload(&out, m)?,
        None => out.display().to_string(),
    };
    if args.json {
        let stages: Vec<_> = m
            .stages
            .iter()
            .map(|s| {
                serde_json::json!({
                    "stage": s.index.0,
                    "shard_file": s.shard_file,
                    "ciphertext_bytes": s.shard_size,
                    "plaintext_bytes": s.plaintext_size,
                    "shard_digest": hex::encode(s.shard_digest),
                })
            })
            .collect();
        let report = serde_json::json!({
            "model_id": m.model_id.as_str(),
            "version": m.version.0,
            "destination": destination,
            "manifest": upload_to
                .is_none()
                .then(|| provisioned.manifest_path.display().to_string()),
            "encrypt_seconds": provisioned.encrypt_seconds,
            "stages": stages,
        });
        println!("{report}");
        return Ok(());
    }
    println!(
        "provisioned {}@v{} in {} stage(s) to {destination}",
        m.model_id,
        m.version.0,
        m.stages.len(),
    );
    for s in &m.stages {
        println!(
            "  stage {}: {} ({} bytes ciphertext, shard digest {})",
            s.index.0,
            s.shard_file,
            s.shard_size,
            hex::encode(s.shard_digest)
        );
    }
    let plaintext: u64 = m.stages.iter().map(|s| s.plaintext_size).sum();
    println!(
        "encrypted {:.1} MB in {:.2} s ({:.0} MB/s)",
        plaintext as f64 / 1e6,
        provisioned.encrypt_seconds,
        plaintext as f64 / 1e6 / provisioned.encrypt_seconds.max(1e-9)
    );
    if upload_to.is_none() {
        println!("signed manifest: {}", provisioned.manifest_path.display());
    }
    println!(
        "shard keys sealed in {}; register them with a broker: shardseal keys register",
        args.keystore.display()
    );
    Ok(())
}
