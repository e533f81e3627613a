//! `shardseal keys register | rotate | revoke`: the model owner's calls to a key broker.

use std::path::PathBuf;

use anyhow::Context as _;
use shardseal_attestation::{Measurement, ModelId};
use shardseal_keys::OwnerKeyStore;
use shardseal_keys::VerifyingKey;
use shardseal_keys::broker::OwnerReleasePolicy;
use shardseal_keys::broker::owner::OwnerClient;
use shardseal_proto::tls::Pki;

/// The owner's calls to a key broker.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum BrokerOwnerCommand {
    /// Register a provisioned model with a key broker: its signed manifest, its shard keys
    /// (sealed to the broker, never sent in the clear) and its release policy.
    #[command(
        after_help = "The policy file lists, per stage, the function executables (SHA-256) that may\nreceive that stage's keys:\n  {\"stages\": [{\"stage\": 0, \"measurements\": [\"<64 hex>\"]}, {\"stage\": 1, \"measurements\": [\"<64 hex>\"]}]}\n\nExample:\n  shardseal keys register --broker https://127.0.0.1:7000 --pki state/pki --store owner-keys \\\n    --manifest provisioned/resnet/manifest.signed.json --policy policy.json"
    )]
    Register(RegisterArgs),
    /// Register a higher version of a model you registered, and make it current.
    #[command(
        after_help = "Example:\n  shardseal keys rotate --broker https://127.0.0.1:7000 --pki state/pki --store owner-keys \\\n    --manifest provisioned/resnet-v2/manifest.signed.json --policy policy.json"
    )]
    Rotate(RegisterArgs),
    /// Revoke a function measurement for every version of a model, or the whole model.
    #[command(
        after_help = "Example:\n  shardseal keys revoke --broker https://127.0.0.1:7000 --pki state/pki --store owner-keys \\\n    --model resnet --measurement <64 hex>"
    )]
    Revoke(RevokeArgs),
}

/// How to reach the broker, and as whom.
#[derive(Debug, clap::Args)]
pub(crate) struct BrokerConnection {
    /// The key broker's address, e.g. https://127.0.0.1:7000.
    #[arg(long, value_name = "URL", env = "SHARDSEAL_BROKER")]
    broker: String,
    /// The PKI folder whose CA the broker's certificate must chain to.
    #[arg(long, value_name = "DIR", env = "SHARDSEAL_PKI")]
    pki: PathBuf,
    /// The owner's key store (from `shardseal keys init`): signs the calls, holds the
    /// shard keys.
    #[arg(long, value_name = "OWNER_KEYSTORE", alias = "keystore")]
    store: PathBuf,
    /// The broker identity key to expect: 64 hex digits or its broker.pub file. Without
    /// it, the broker is trusted on its TLS certificate alone.
    #[arg(long, value_name = "PUBHEX_OR_FILE")]
    broker_key: Option<String>,
}

/// Arguments of `keys register` and `keys rotate`.
#[derive(Debug, clap::Args)]
pub(crate) struct RegisterArgs {
    #[command(flatten)]
    connection: BrokerConnection,
    /// The signed model manifest written by `shardseal keys provision`.
    #[arg(long, value_name = "FILE")]
    manifest: PathBuf,
    /// The release policy (JSON): allowed function measurements per stage.
    #[arg(long, value_name = "FILE")]
    policy: PathBuf,
}

/// Arguments of `keys revoke`.
#[derive(Debug, clap::Args)]
pub(crate) struct RevokeArgs {
    #[command(flatten)]
    connection: BrokerConnection,
    /// The model.
    #[arg(long, value_name = "MODEL")]
    model: String,
    /// The function measurement to revoke (64 hex digits); without it the whole model is
    /// revoked and none of its keys is released again.
    #[arg(long, value_name = "HEX")]
    measurement: Option<String>,
}

impl BrokerConnection {
    async fn open(&self) -> anyhow::Result<(OwnerClient, OwnerKeyStore)> {
        let store = OwnerKeyStore::open(&self.store)
            .with_context(|| format!("opening the key store {}", self.store.display()))?;
        let pki = Pki::open(&self.pki)
            .with_context(|| format!("opening the PKI {}", self.pki.display()))?;
        let mut client = OwnerClient::connect(&self.broker, &pki)
            .await
            .with_context(|| format!("connecting to the key broker at {}", self.broker))?;
        if let Some(pinned) = &self.broker_key {
            let expected: VerifyingKey = match pinned.parse() {
                Ok(key) => key,
                Err(_) => std::fs::read_to_string(pinned)
                    .with_context(|| format!("reading the broker key {pinned}"))?
                    .trim()
                    .parse()
                    .with_context(|| format!("{pinned} does not hold a broker key"))?,
            };
            client = client.require_identity(&expected)?;
        }
        Ok((client, store))
    }
}

fn read_inputs(args: &RegisterArgs) -> anyhow::Result<(Vec<u8>, OwnerReleasePolicy)> {
    let manifest = std::fs::read(&args.manifest)
        .with_context(|| format!("reading {}", args.manifest.display()))?;
    let policy = std::fs::read(&args.policy)
        .with_context(|| format!("reading {}", args.policy.display()))?;
    let policy = OwnerReleasePolicy::from_json(&policy)
        .with_context(|| format!("reading the release policy {}", args.policy.display()))?;
    Ok((manifest, policy))
}

pub(crate) fn run(command: BrokerOwnerCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        match command {
            BrokerOwnerCommand::Register(args) => {
                let (manifest, policy) = read_inputs(&args)?;
                let (mut client, store) = args.connection.open().await?;
                let done = client
                    .register(&store, &manifest, &policy)
                    .await
                    .context("registering the model")?;
                println!(
                    "registered {} {} with the key broker",
                    done.model, done.version
                );
            }
            BrokerOwnerCommand::Rotate(args) => {
                let (manifest, policy) = read_inputs(&args)?;
                let (mut client, store) = args.connection.open().await?;
                let done = client
                    .rotate(&store, &manifest, &policy)
                    .await
                    .context("rotating the model")?;
                println!("{} now serves {}", done.model, done.version);
            }
            BrokerOwnerCommand::Revoke(args) => {
                let model = ModelId::new(&args.model)?;
                let measurement = args
                    .measurement
                    .as_deref()
                    .map(Measurement::from_hex)
                    .transpose()?;
                let (mut client, store) = args.connection.open().await?;
                client
                    .revoke(&store, &model, measurement)
                    .await
                    .context("revoking")?;
                match measurement {
                    Some(m) => println!("revoked measurement {m} for every version of {model}"),
                    None => println!("revoked model {model}: none of its keys is released again"),
                }
            }
        }
        Ok(())
    })
}
