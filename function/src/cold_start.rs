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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::TryStreamExt;
use prost::Message;
use shardseal_attestation::{
    AttestationError, ModelId, ModelVersion, Nonce, ReportData, StageIndex, request_quote,
};
use shardseal_keys::{
    FunctionToken, KeyReleaseContext, ModelManifest, RecipientPrivateKey, RecipientPublicKey,
    Sealed, ShardBinding, ShardKey, ShardOpener, SignedManifest, VerifyingKey, from_blob,
    open_key_release,
};
use shardseal_proto::tls::{Pki, Role};
use shardseal_proto::v1::key_broker_client::KeyBrokerClient;
use shardseal_proto::v1::{
    AttestRequest, AttestResponse, BrokerInfoRequest, ColdStart, KeyRelease, NonceRequest,
    SignedBlob,
};
use shardseal_store::{ShardStore, StoreConfig, StoreKey};
use tonic::transport::{ClientTlsConfig, Endpoint};
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
    /// The broker's latest token for this process: a lease on the keys above, renewed by
    /// attesting again (see `crate::lease`).
    pub(crate) token: Mutex<SignedBlob>,
    /// When the lease ends (Unix milliseconds, from the token the broker signed).
    pub(crate) lease_expires_at_ms: AtomicU64,
    pub(crate) cold_start: ColdStart,
}

impl AttestedStage {
    /// Whether the broker's lease on this stage's keys has run out.
    pub(crate) fn lease_expired(&self) -> bool {
        unix_millis_now() >= self.lease_expires_at_ms.load(Ordering::Acquire)
    }

    /// The broker's latest token.
    pub(crate) fn token(&self) -> SignedBlob {
        self.token
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The local clock in Unix milliseconds (token expiries are in the broker's; both are
/// expected to be kept by NTP, as TLS certificate checks already assume).
pub(crate) fn unix_millis_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
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
    let attested = attest_retrying(config, &tls, started + UNREACHABLE_RETRY_LIMIT).await?;
    let attested_at = Instant::now();
    let Released {
        release,
        shard_key,
        stage_key,
        next_stage_key,
        token,
        lease_expires_at_ms,
    } = open_release(config, attested)?;

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
        token: Mutex::new(token),
        lease_expires_at_ms: AtomicU64::new(lease_expires_at_ms),
        cold_start: ColdStart {
            attest_ms: ms(started, attested_at),
            fetch_decrypt_ms: ms(attested_at, fetched_at),
            load_ms: ms(fetched_at, loaded_at),
            total_ms: ms(started, loaded_at),
            shard_bytes,
        },
    })
}

/// How long a cold start keeps trying a key broker or quoting agent it cannot reach (one
/// being restarted, say): under the local platform's 120 s start timeout.
const UNREACHABLE_RETRY_LIMIT: Duration = Duration::from_secs(90);
/// The first and the longest pause between two tries.
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(200);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(5);

/// What a successful attestation leaves: the broker's reply and what opens it.
pub(crate) struct Attested {
    reply: AttestResponse,
    ephemeral: RecipientPrivateKey,
    nonce: Nonce,
    broker_id: String,
    broker_key: VerifyingKey,
}

/// The keys a broker released, and the token that leases them.
pub(crate) struct Released {
    pub(crate) release: KeyRelease,
    pub(crate) shard_key: ShardKey,
    pub(crate) stage_key: RecipientPrivateKey,
    pub(crate) next_stage_key: Option<RecipientPublicKey>,
    pub(crate) token: SignedBlob,
    pub(crate) lease_expires_at_ms: u64,
}

/// Opens the key release of an attestation and checks the token that comes with it:
/// signed by the broker that answered, for this model and stage.
pub(crate) fn open_release(
    config: &ColdStartConfig,
    attested: Attested,
) -> Result<Released, Error> {
    let Attested {
        reply,
        ephemeral,
        nonce,
        broker_id,
        broker_key,
    } = attested;
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
    let token = reply
        .token
        .ok_or_else(|| Error::Broker("no function token in the reply".into()))?;
    let leased: FunctionToken = from_blob::<FunctionToken>(&token)
        .and_then(|signed| signed.verify(&broker_key))
        .map_err(|_| Error::Broker("the function token is not signed by the broker".into()))?;
    if leased.model_id != config.model || leased.stage != config.stage {
        return Err(Error::Broker(
            "the function token names another model or stage".into(),
        ));
    }
    Ok(Released {
        release,
        shard_key,
        stage_key,
        next_stage_key,
        token,
        lease_expires_at_ms: leased.expires_at_ms,
    })
}

/// Why one attestation attempt failed: worth another try (nothing answered, or the
/// broker said to retry), or final (a refusal, a wrong broker, a bad setting).
enum AttemptFailed {
    Unreachable(Error),
    Final(Error),
}

/// Attests, trying again with exponential backoff (logged) while the broker or the
/// quoting agent is unreachable, until `give_up_at` ([`UNREACHABLE_RETRY_LIMIT`] for a
/// cold start, the lease's end for a renewal). Keys come only from a successful
/// attestation: a function that never reaches the broker never serves.
pub(crate) async fn attest_retrying(
    config: &ColdStartConfig,
    tls: &ClientTlsConfig,
    give_up_at: Instant,
) -> Result<Attested, Error> {
    let mut pause = FIRST_RETRY_PAUSE;
    let mut attempt = 1u32;
    loop {
        match attest_once(config, tls.clone()).await {
            Ok(attested) => {
                if attempt > 1 {
                    tracing::info!(
                        attempt,
                        "attested after the key broker or quoting agent came back"
                    );
                }
                return Ok(attested);
            }
            Err(AttemptFailed::Unreachable(error)) if Instant::now() < give_up_at => {
                // The last pause ends at `give_up_at`: one more try right then.
                let this_pause = pause.min(give_up_at.saturating_duration_since(Instant::now()));
                tracing::warn!(
                    attempt,
                    retry_in_ms = this_pause.as_millis() as u64,
                    error = %error,
                    "key broker or quoting agent unreachable; retrying"
                );
                tokio::time::sleep(this_pause).await;
                pause = (pause * 2).min(MAX_RETRY_PAUSE);
                attempt += 1;
            }
            Err(AttemptFailed::Unreachable(error) | AttemptFailed::Final(error)) => {
                return Err(error);
            }
        }
    }
}

/// Codes a broker (or the transport to it) answers when trying again later may work.
fn retry_later(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Cancelled
            | Code::Aborted
    )
}

/// One attestation: connect, check the broker's identity, nonce, quote, attest.
async fn attest_once(
    config: &ColdStartConfig,
    tls: ClientTlsConfig,
) -> Result<Attested, AttemptFailed> {
    use AttemptFailed::{Final, Unreachable};
    let broker_error = |s: tonic::Status| {
        let error = Error::Broker(s.message().to_owned());
        if retry_later(&s) {
            Unreachable(error)
        } else {
            Final(error)
        }
    };
    let channel = Endpoint::from_shared(config.broker_url.clone())
        .and_then(|e| e.tls_config(tls))
        .map_err(|e| Final(Error::Config(format!("broker URL: {e}"))))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .map_err(|e| Unreachable(Error::Broker(format!("connect: {e}"))))?;
    let mut broker = KeyBrokerClient::new(channel);

    let info = broker
        .get_broker_info(BrokerInfoRequest {})
        .await
        .map_err(broker_error)?
        .into_inner();
    let broker_id = hex::encode(&info.identity_key);
    let broker_key = VerifyingKey::from_slice(&info.identity_key).map_err(|_| {
        Final(Error::Broker(
            "the broker's identity key is malformed".into(),
        ))
    })?;
    if let Some(pinned) = &config.broker_key
        && !pinned.eq_ignore_ascii_case(&broker_id)
    {
        return Err(Final(Error::Broker(
            "the broker's identity key is not the pinned one".into(),
        )));
    }

    let ephemeral = RecipientPrivateKey::generate().map_err(|e| Final(Error::Keys(e)))?;
    let ephemeral_public = ephemeral.public_key();
    let nonce_reply = broker
        .get_nonce(NonceRequest {})
        .await
        .map_err(broker_error)?
        .into_inner();
    let nonce_bytes: [u8; 32] = nonce_reply
        .nonce
        .as_slice()
        .try_into()
        .map_err(|_| Final(Error::Broker("nonce is not 32 bytes".into())))?;
    let nonce = Nonce::from_bytes(nonce_bytes);
    let report_data = ReportData::bind(ephemeral_public.as_bytes(), &nonce);
    let evidence = request_quote(&config.agent_socket, &report_data)
        .await
        .map_err(|e| {
            let unreachable = matches!(
                e,
                AttestationError::Io { .. } | AttestationError::Timeout(_)
            );
            let error = Error::Attestation(e.to_string());
            if unreachable {
                Unreachable(error)
            } else {
                Final(error)
            }
        })?;
    let reply = broker
        .attest(AttestRequest {
            evidence: evidence.to_bytes(),
            nonce: nonce_bytes.to_vec(),
            ephemeral_key: ephemeral_public.as_bytes().to_vec(),
            model_id: config.model.to_string(),
            stage: config.stage.0,
        })
        .await
        .map_err(|s| {
            if retry_later(&s) {
                Unreachable(Error::Broker(s.message().to_owned()))
            } else {
                Final(Error::AttestationRefused(format!(
                    "{:?}: {}",
                    s.code(),
                    s.message()
                )))
            }
        })?
        .into_inner();
    Ok(Attested {
        reply,
        ephemeral,
        nonce,
        broker_id,
        broker_key,
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
