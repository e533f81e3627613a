//! Cold start: from a bare process to a stage that can serve.
//!
//! ```text
//! harden ─▶ ephemeral key ─▶ nonce (broker) ─▶ quote (agent) ─▶ attest (broker)
//!        ─▶ open key release ─▶ stream shard from the store, decrypting each chunk
//!        ─▶ check digest ─▶ tract load + optimise ─▶ wipe plaintext ─▶ ready
//! ```
//!
//! The typestate is the function signature: [`cold_start`] is the only way to get an
//! [`AttestedStage`], and it holds keys only because the broker released them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use futures::TryStreamExt;
use prost::Message;
use shardseal_attestation::{ModelId, ModelVersion, Nonce, ReportData, StageIndex, request_quote};
use shardseal_keys::{
    KeyReleaseContext, ModelManifest, RecipientPrivateKey, RecipientPublicKey, Sealed,
    ShardBinding, ShardKey, ShardOpener, SignedManifest, open_key_release,
};
use shardseal_proto::tls::{Pki, Role};
use shardseal_proto::v1::key_broker_client::KeyBrokerClient;
use shardseal_proto::v1::{
    AttestRequest, BrokerInfoRequest, ColdStart, KeyRelease, NonceRequest, SignedBlob,
};
use shardseal_store::{ShardStore, StoreConfig, StoreKey};
use tonic::transport::Endpoint;
use zeroize::Zeroizing;

use crate::{Error, StageEngine, harden_process};

/// The most a manifest's plaintext size may make a function reserve up front (8 GiB);
/// the size is signed by the owner, but a bound costs nothing.
const MAX_PREALLOCATION: usize = 8 << 30;

/// Where a function finds the broker, the agent and its shard.
#[derive(Debug, Clone)]
pub struct ColdStartConfig {
    /// The broker's gRPC address, e.g. `https://127.0.0.1:7000`.
    pub broker_url: String,
    /// The PKI folder (CA and the function's TLS identity).
    pub pki_dir: PathBuf,
    /// The quoting agent's Unix socket.
    pub agent_socket: PathBuf,
    /// The shard store: a local folder or an S3 bucket. Its credentials (if any) are in
    /// the config, redacted when printed.
    pub store: StoreConfig,
    /// The broker identity key the function expects (hex), pinned by the operator.
    pub broker_key: Option<String>,
    /// The model to serve.
    pub model: ModelId,
    /// The stage to serve.
    pub stage: StageIndex,
}

/// A stage whose keys were released to this process after it attested.
pub struct AttestedStage {
    pub(crate) model: ModelId,
    pub(crate) version: ModelVersion,
    pub(crate) stage: StageIndex,
    pub(crate) stage_count: u32,
    pub(crate) deployment: String,
    pub(crate) stage_key: RecipientPrivateKey,
    pub(crate) next_stage_key: Option<RecipientPublicKey>,
    pub(crate) engine: StageEngine,
    /// Tensors this stage forwards untouched (live across it, not produced by it).
    pub(crate) outputs: Vec<String>,
    pub(crate) token: SignedBlob,
    pub(crate) cold_start: ColdStart,
}

impl std::fmt::Debug for AttestedStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttestedStage")
            .field("deployment", &self.deployment)
            .field("stage", &self.stage)
            .field("stage_count", &self.stage_count)
            .finish_non_exhaustive()
    }
}

/// Attests, receives the stage's keys, and loads the decrypted shard.
pub async fn cold_start(config: &ColdStartConfig) -> Result<AttestedStage, Error> {
    let started = Instant::now();
    harden_process()?;

    let pki = Pki::open(&config.pki_dir).map_err(|e| Error::Config(e.to_string()))?;
    let tls = pki
        .client_config(Role::Broker, None)
        .map_err(|e| Error::Config(e.to_string()))?;
    let channel = Endpoint::from_shared(config.broker_url.clone())
        .and_then(|e| e.tls_config(tls))
        .map_err(|e| Error::Config(format!("broker URL: {e}")))?
        .connect()
        .await
        .map_err(|e| Error::Broker(format!("connect: {e}")))?;
    let mut broker = KeyBrokerClient::new(channel);

    let info = broker
        .get_broker_info(BrokerInfoRequest {})
        .await
        .map_err(|s| Error::Broker(s.message().to_owned()))?
        .into_inner();
    let broker_id = hex::encode(&info.identity_key);
    if let Some(pinned) = &config.broker_key
        && !pinned.eq_ignore_ascii_case(&broker_id)
    {
        return Err(Error::Broker(
            "the broker's identity key is not the pinned one".into(),
        ));
    }

    let ephemeral = RecipientPrivateKey::generate().map_err(Error::Keys)?;
    let ephemeral_public = ephemeral.public_key();
    let nonce_reply = broker
        .get_nonce(NonceRequest {})
        .await
        .map_err(|s| Error::Broker(s.message().to_owned()))?
        .into_inner();
    let nonce_bytes: [u8; 32] = nonce_reply
        .nonce
        .as_slice()
        .try_into()
        .map_err(|_| Error::Broker("nonce is not 32 bytes".into()))?;
    let nonce = Nonce::from_bytes(nonce_bytes);
    let report_data = ReportData::bind(ephemeral_public.as_bytes(), &nonce);
    let evidence = request_quote(&config.agent_socket, &report_data)
        .await
        .map_err(|e| Error::Attestation(e.to_string()))?;
    let reply = broker
        .attest(AttestRequest {
            evidence: evidence.to_bytes(),
            nonce: nonce_bytes.to_vec(),
            ephemeral_key: ephemeral_public.as_bytes().to_vec(),
            model_id: config.model.to_string(),
            stage: config.stage.0,
        })
        .await
        .map_err(|s| Error::AttestationRefused(format!("{:?}: {}", s.code(), s.message())))?
        .into_inner();
    let attested_at = Instant::now();

    let sealed = reply
        .release
        .ok_or_else(|| Error::Broker("no key release in the reply".into()))?;
    let sealed = Sealed::try_from(sealed).map_err(Error::Keys)?;
    let context = KeyReleaseContext {
        broker_id,
        nonce,
        model: config.model.clone(),
        stage: config.stage,
    };
    let plaintext = open_key_release(&ephemeral, &context, &sealed).map_err(Error::Keys)?;
    let mut release = KeyRelease::decode(plaintext.expose_secret())
        .map_err(|_| Error::Broker("malformed key release".into()))?;
    let shard_key = ShardKey::from_slice(&release.shard_key).map_err(Error::Keys)?;
    let stage_key =
        RecipientPrivateKey::from_bytes(&release.stage_private_key).map_err(Error::Keys)?;
    zeroize::Zeroize::zeroize(&mut release.shard_key);
    zeroize::Zeroize::zeroize(&mut release.stage_private_key);
    if release.model_id != config.model.as_str() || release.stage != config.stage.0 {
        return Err(Error::Broker(
            "the key release names another model or stage".into(),
        ));
    }
    let next_stage_key = if release.next_stage_public_key.is_empty() {
        None
    } else {
        Some(RecipientPublicKey::from_slice(&release.next_stage_public_key).map_err(Error::Keys)?)
    };

    let signed = SignedManifest::from_bytes(&release.signed_manifest).map_err(Error::Keys)?;
    let manifest: ModelManifest = signed.verify(&signed.signer()).map_err(Error::Keys)?;
    let entry = manifest
        .stages
        .iter()
        .find(|s| s.index == config.stage)
        .ok_or_else(|| Error::Broker("the manifest has no entry for this stage".into()))?;
    let version = ModelVersion(release.version);
    let binding = ShardBinding::new(config.model.clone(), version, config.stage);
    // Store layout: models/MODEL/vVERSION/<shard_file>, as `shardseal keys provision`
    // writes it. The file name comes from the signed manifest; StoreKey refuses one that
    // would climb out of the version's folder.
    let shard_key_path = StoreKey::new(format!(
        "{}/{}",
        StoreKey::version_prefix(&config.model, version),
        entry.shard_file
    ))
    .map_err(|e| Error::Store(e.to_string()))?;
    // Opening validates the configuration; an S3 store is contacted only by the download.
    let store = config
        .store
        .open()
        .map_err(|e| Error::Store(e.to_string()))?;
    let capacity = usize::try_from(entry.plaintext_size)
        .unwrap_or(0)
        .min(MAX_PREALLOCATION);
    let onnx = fetch_and_open(
        store,
        &shard_key_path,
        &shard_key,
        binding,
        &entry.shard_digest,
        capacity,
    )
    .await?;
    let fetched_at = Instant::now();
    let shard_bytes = onnx.len() as u64;

    let engine = tokio::task::spawn_blocking(move || StageEngine::load(&onnx))
        .await
        .map_err(|e| Error::ModelLoad(format!("loader task: {e}")))??;
    let loaded_at = Instant::now();
    let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;

    Ok(AttestedStage {
        model: config.model.clone(),
        version,
        stage: config.stage,
        stage_count: release.stage_count,
        deployment: release.deployment.clone(),
        stage_key,
        next_stage_key,
        engine,
        outputs: entry.outputs.iter().map(|t| t.name.clone()).collect(),
        token: reply.token.unwrap_or_default(),
        cold_start: ColdStart {
            attest_ms: ms(started, attested_at),
            fetch_decrypt_ms: ms(attested_at, fetched_at),
            load_ms: ms(fetched_at, loaded_at),
            total_ms: ms(started, loaded_at),
            shard_bytes,
        },
    })
}

/// Streams the sealed shard from the store, decrypting each chunk as it arrives, and
/// checks the ciphertext digest from the owner-signed manifest.
async fn fetch_and_open(
    store: Arc<dyn ShardStore>,
    key_path: &StoreKey,
    key: &ShardKey,
    binding: ShardBinding,
    expected_digest: &[u8; 32],
    capacity: usize,
) -> Result<Zeroizing<Vec<u8>>, Error> {
    // The store's messages name the key and the backend, never a credential.
    let mut ciphertext = store
        .get_stream(key_path)
        .await
        .map_err(|e| Error::Store(e.to_string()))?;
    let mut opener = ShardOpener::new(key, binding);
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    // Sized up front: a growing Vec would leave copies of plaintext in freed blocks.
    let mut plaintext = Zeroizing::new(Vec::with_capacity(capacity));
    while let Some(chunk) = ciphertext
        .try_next()
        .await
        .map_err(|e| Error::Store(e.to_string()))?
    {
        digest.update(&chunk);
        for opened in opener.update(&chunk).map_err(Error::Keys)? {
            plaintext.extend_from_slice(opened.expose_secret());
        }
    }
    opener.finish().map_err(Error::Keys)?;
    if digest.finish().as_ref() != expected_digest {
        return Err(Error::Store(
            "the shard's digest differs from the signed manifest".into(),
        ));
    }
    Ok(plaintext)
}
