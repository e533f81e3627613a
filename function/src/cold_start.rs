//! Cold start: from a bare process to a stage that can serve.
//!
//! ```text
//! harden ─▶ ephemeral key ─▶ nonce (broker) ─▶ quote (agent) ─▶ attest (broker)
//!        ─▶ open key release ─▶ stream shard from the store, decrypting each chunk
//!        ─▶ check the shard digest ─▶ tract load + optimise ─▶ wipe plaintext ─▶ ready
//!   └─▶ meanwhile: read the sealed shard of the newest version the store lists
//! ```
//!
//! Reading ciphertext needs no key, so a function starts reading its shard while it
//! attests ([`Prefetch`]), guessing the version from the store's listing; the read is used
//! only if the broker then releases that very version and the signed manifest names that
//! very file, and is otherwise dropped and done again. Receiving and decrypting the shard
//! overlap (the store stream and the gathering of each
//! chunk into its own buffer on this task, decryption in place and the shard digest on a
//! blocking thread). Parsing cannot join them: tract parses a complete protobuf only, so
//! loading starts once the last chunk is authenticated and the digest matches the signed
//! manifest; it then frees the plaintext chunk by chunk as the decoder passes them.
//!
//! Once ready, the function logs one `cold start` line with each phase's duration
//! ([`ColdStartTimings`]).
//!
//! The typestate is the function signature: [`cold_start`] is the only way to get an
//! [`AttestedStage`], and it holds keys only because the broker released them.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;
use prost::bytes::Bytes;
use shardseal_attestation::{
    AttestationError, ModelId, ModelVersion, Nonce, ReportData, StageIndex, request_quote,
};
use shardseal_keys::{
    ChunkOpener, FunctionToken, KeyReleaseContext, ModelManifest, PlaintextChunk,
    RecipientPrivateKey, RecipientPublicKey, Sealed, SealedChunk, ShardBinding, ShardGatherer,
    ShardKey, SignedManifest, VerifyingKey, from_blob, open_key_release,
};
use shardseal_proto::tls::{Pki, Role};
use shardseal_proto::v1::key_broker_client::KeyBrokerClient;
use shardseal_proto::v1::{
    AttestRequest, AttestResponse, BrokerInfoRequest, ColdStart, KeyRelease, NonceRequest,
    SignedBlob,
};
use shardseal_store::{Error as StoreError, ShardStore, StoreConfig, StoreKey};
use tonic::transport::{ClientTlsConfig, Endpoint};

use crate::lease::{Lease, lease_end};
use crate::memory::{LoadMemory, ServeMemory};
use crate::{Error, StageEngine, harden_process};

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
    /// The most requests the stage may run as one batch (1: one by one).
    pub max_batch: usize,
    /// How to spend memory while the shard loads, as set up by the process (`Auto` is
    /// decided here, by the shard's size in the signed manifest).
    pub load_memory: LoadMemory,
    /// How to spend memory on inferences once loaded.
    pub serve_memory: ServeMemory,
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
    /// When the lease on the keys ends (see `crate::lease`).
    pub(crate) lease: Lease,
    pub(crate) cold_start: ColdStart,
    pub(crate) timings: ColdStartTimings,
}

impl AttestedStage {
    /// Whether the broker's lease on this stage's keys has run out.
    pub(crate) fn lease_expired(&self) -> bool {
        self.lease.expired()
    }

    /// The broker's latest token.
    pub(crate) fn token(&self) -> SignedBlob {
        self.token
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
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
    let since_spawn_at_entry = process_age();
    harden_process()?;

    let pki = Pki::open(&config.pki_dir).map_err(|e| Error::Config(e.to_string()))?;
    let tls = pki
        .client_config(Role::Broker, None)
        .map_err(|e| Error::Config(e.to_string()))?;
    // Opening validates the configuration; an S3 store is contacted only by the reads.
    let store = config
        .store
        .open()
        .map_err(|e| Error::Store(e.to_string()))?;
    let prefetch = Prefetch::start(store.clone(), config.model.clone(), config.stage);
    let attested = attest_retrying(config, &tls, started + UNREACHABLE_RETRY_LIMIT).await?;
    let connected_at = attested.connected_at;
    let attested_at = Instant::now();
    let Released {
        release,
        shard_key,
        stage_key,
        next_stage_key,
        token,
        lease_ends,
    } = open_release(config, attested)?;

    let signed = SignedManifest::from_bytes(&release.signed_manifest).map_err(Error::Keys)?;
    let manifest: ModelManifest = signed.verify(&signed.signer()).map_err(Error::Keys)?;
    let entry = manifest
        .stages
        .iter()
        .find(|s| s.index == config.stage)
        .ok_or_else(|| Error::Broker("the manifest has no entry for this stage".into()))?;
    // Decided before the shard is read: its chunks are the first large blocks.
    let load_memory = crate::memory::decide(config.load_memory, entry.plaintext_size);
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
    let prefetched = prefetch.take(&shard_key_path).await;
    let shard_prefetched = prefetched.is_some();
    let fetched = match prefetched {
        Some((ciphertext, requested_at)) => {
            fetch_and_open(ciphertext, requested_at, &shard_key, binding).await?
        }
        None => {
            let requested_at = Instant::now();
            // The store's messages name the key and the backend, never a credential.
            let ciphertext = store
                .get_stream(&shard_key_path)
                .await
                .map_err(|e| Error::Store(e.to_string()))?;
            fetch_and_open(ciphertext, requested_at, &shard_key, binding).await?
        }
    };
    let shard_bytes = fetched.plaintext_len;

    // Every chunk is authenticated (AES-GCM under the released key); the digest pins them
    // to the shard the owner signed in the manifest. Checked before anything is parsed.
    if fetched.digest != entry.shard_digest {
        return Err(Error::Store(
            "the shard's digest differs from the signed manifest".into(),
        ));
    }
    let max_batch = config.max_batch;
    let serve_memory = config.serve_memory;
    let loading = tokio::task::spawn_blocking(move || {
        let loaded = StageEngine::load_shard(fetched.chunks, max_batch);
        // Give the memory of the plaintext, the proto and the unoptimised model back to the
        // system now, while nothing else allocates.
        let serving = crate::memory::release_free_memory(serve_memory);
        loaded.map(|loaded| (loaded, serving))
    });
    let ((engine, load), serve_memory) = loading
        .await
        .map_err(|e| Error::ModelLoad(format!("loader task: {e}")))??;
    let loaded_at = Instant::now();
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    // Without /proc, count from entry into this function.
    let total = process_age().unwrap_or(loaded_at - started);
    let timings = ColdStartTimings {
        startup_ms: since_spawn_at_entry.map_or(0.0, ms),
        connect_ms: ms(connected_at - started),
        attest_ms: ms(attested_at - connected_at),
        fetch_ms: ms(fetched.fetch),
        shard_prefetched,
        decrypt_ms: ms(fetched.decrypt),
        fetch_decrypt_ms: ms(fetched.fetched_at - attested_at),
        load_ms: ms(load.load),
        optimize_ms: ms(load.optimize),
        total_ms: ms(total),
        shard_bytes,
        peak_rss_bytes: crate::memory::peak_rss_bytes().unwrap_or(0),
        load_memory,
        serve_memory,
    };

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
        lease: Lease::until(lease_ends),
        cold_start: ColdStart {
            attest_ms: timings.attest_ms,
            fetch_decrypt_ms: timings.fetch_decrypt_ms,
            load_ms: timings.load_ms + timings.optimize_ms,
            total_ms: timings.total_ms,
            shard_bytes,
        },
        timings,
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
    /// When the successful attempt had the broker connected and its identity checked.
    connected_at: Instant,
    broker_key: VerifyingKey,
}

/// The keys a broker released, and the token that leases them.
pub(crate) struct Released {
    pub(crate) release: KeyRelease,
    pub(crate) shard_key: ShardKey,
    pub(crate) stage_key: RecipientPrivateKey,
    pub(crate) next_stage_key: Option<RecipientPublicKey>,
    pub(crate) token: SignedBlob,
    /// When the lease the token grants ends.
    pub(crate) lease_ends: Instant,
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
        connected_at,
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
    // The token leases the keys that came with it, not another version's.
    if leased.version.0 != release.version {
        return Err(Error::Broker(
            "the function token names another version than the keys released".into(),
        ));
    }
    Ok(Released {
        release,
        shard_key,
        stage_key,
        next_stage_key,
        token,
        lease_ends: lease_end(connected_at, &leased)?,
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

    // The broker's identity and a nonce, asked for at once: a nonce is public, and it is
    // used only once the identity checked out.
    let mut nonces = broker.clone();
    let (info, nonce_reply) = tokio::join!(
        broker.get_broker_info(BrokerInfoRequest {}),
        nonces.get_nonce(NonceRequest {}),
    );
    let info = info.map_err(broker_error)?.into_inner();
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
    let connected_at = Instant::now();

    let ephemeral = RecipientPrivateKey::generate().map_err(|e| Final(Error::Keys(e)))?;
    let ephemeral_public = ephemeral.public_key();
    let nonce_reply = nonce_reply.map_err(broker_error)?.into_inner();
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
        connected_at,
        broker_key,
    })
}

/// Where a cold start's time went, in milliseconds, and what it loaded. Logged once, when
/// the stage is ready, as the `cold start` line (`shardseal bench` reads these fields by
/// name from the function logs).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ColdStartTimings {
    /// From process start (spawn) to entering the cold start: exec, dynamic loading,
    /// argument parsing, the async runtime. Exact under the local platform, within about
    /// 10 ms elsewhere ([`process_age`]).
    pub startup_ms: f64,
    /// Hardening, TLS to the broker, its identity and a nonce (asked for together), and any
    /// waiting for an unreachable broker or quoting agent, retried with backoff.
    pub connect_ms: f64,
    /// Quote and key release: quote from the agent, attestation at the broker, opening the
    /// release.
    pub attest_ms: f64,
    /// Reading the sealed shard from the store and gathering it into chunk buffers, wall
    /// clock from request to last byte. Overlaps `decrypt_ms`, and `connect_ms` and
    /// `attest_ms` when the shard was read while attesting (`shard_prefetched`).
    pub fetch_ms: f64,
    /// Whether the shard was read while the function attested (the store's newest version
    /// was the released one).
    pub shard_prefetched: bool,
    /// Time spent authenticating and decrypting chunks in place, shard digest included
    /// (summed; it runs on its own thread while the next chunks are read, so it overlaps
    /// `fetch_ms`).
    pub decrypt_ms: f64,
    /// Fetch and decrypt together, wall clock.
    pub fetch_decrypt_ms: f64,
    /// Protobuf decoding and tract's parse into a model.
    pub load_ms: f64,
    /// tract's optimisation and planning into a runnable model.
    pub optimize_ms: f64,
    /// From process start to ready ([`process_age`]).
    pub total_ms: f64,
    /// Plaintext shard size.
    pub shard_bytes: u64,
    /// The process's peak resident memory (VmHWM) once ready; 0 if unknown.
    pub peak_rss_bytes: u64,
    /// How the shard was loaded (never `Auto`: as decided).
    pub load_memory: LoadMemory,
    /// How the stage serves (`Heap` if `Mapped` was asked for and could not be set up).
    pub serve_memory: ServeMemory,
}

/// The environment variable in which whoever spawned this process says when: nanoseconds
/// of `CLOCK_BOOTTIME`, read just before the spawn. The local platform sets it
/// (`shardseal_coordinator::platform::local::SPAWNED_AT_ENV`); elsewhere it is absent.
pub const SPAWNED_AT_ENV: &str = "SHARDSEAL_SPAWNED_AT_BOOTTIME_NS";

/// How far an age read from `/proc` may be off: its two readings are each in 10 ms steps.
const PROC_AGE_SLACK: Duration = Duration::from_millis(25);

/// How long this process has existed, counted from its spawn, so including `exec` and
/// dynamic loading, which a timestamp taken in `main` would miss.
///
/// To the nanosecond where the spawner said when it spawned the process
/// ([`SPAWNED_AT_ENV`]) and `/proc` agrees to within its granularity: the time is only a
/// figure for the logs, but a spawner's word is not taken against the kernel's. Otherwise
/// from `/proc` alone: now (`CLOCK_BOOTTIME`, from `/proc/uptime`) minus the process's start
/// (field 22 of `/proc/self/stat`, in clock ticks since boot), within about 10 ms either
/// way.
pub fn process_age() -> Option<Duration> {
    let spawned = std::env::var(SPAWNED_AT_ENV)
        .ok()
        .and_then(|said| age_since(&said, boottime_ns()?));
    believed_age(spawned, age_from_proc())
}

/// The spawner's age where `/proc` agrees with it (or says nothing), else `/proc`'s.
fn believed_age(spawned: Option<Duration>, proc: Option<Duration>) -> Option<Duration> {
    match (spawned, proc) {
        (Some(spawned), Some(proc)) if spawned.abs_diff(proc) <= PROC_AGE_SLACK => Some(spawned),
        (Some(spawned), None) => Some(spawned),
        (_, proc) => proc,
    }
}

/// The time from `spawned_ns` (as [`SPAWNED_AT_ENV`] gives it) to `now_ns`, if the one is
/// a number of nanoseconds no later than the other.
fn age_since(spawned_ns: &str, now_ns: u128) -> Option<Duration> {
    let spawned: u128 = spawned_ns.trim().parse().ok()?;
    let nanos = u64::try_from(now_ns.checked_sub(spawned)?).ok()?;
    Some(Duration::from_nanos(nanos))
}

/// `CLOCK_BOOTTIME` now, in nanoseconds.
fn boottime_ns() -> Option<u128> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
    Some(Duration::from(now).as_nanos())
}

/// This process's age from `/proc` (see [`process_age`]).
fn age_from_proc() -> Option<Duration> {
    // USER_HZ: the unit of /proc times, fixed at 100 by the Linux ABI on every architecture
    // ShardSeal builds for.
    const CLOCK_TICKS_PER_SECOND: f64 = 100.0;
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let now: f64 = uptime.split_ascii_whitespace().next()?.parse().ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing ')'.
    let started: f64 = stat[stat.rfind(')')? + 1..]
        .split_ascii_whitespace()
        .nth(19)?
        .parse()
        .ok()?;
    let age = now - started / CLOCK_TICKS_PER_SECOND;
    (age >= 0.0).then(|| Duration::from_secs_f64(age))
}

/// A shard read from the store and opened, with what it took.
struct FetchedShard {
    chunks: Vec<PlaintextChunk>,
    plaintext_len: u64,
    /// The shard digest the opener computed, for the caller to check against the manifest.
    digest: [u8; 32],
    /// Wall clock from the request to the store to the last ciphertext byte gathered.
    fetch: std::time::Duration,
    /// Time spent in decryption.
    decrypt: std::time::Duration,
    fetched_at: Instant,
}

/// How many pieces of a prefetched shard may wait for the broker's keys: what a function
/// holds however long it takes to attest (8 MiB in the local store's 256 KiB pieces, about
/// what it reads during a 3 ms attestation).
const PREFETCH_PIECES: usize = 32;

/// How long a prefetch may wait for the broker's keys and still be used.
const PREFETCH_HELD_AT_MOST: Duration = Duration::from_secs(10);

/// The sealed shard of the newest version the store holds for this function's stage, read
/// while the function attests (reading ciphertext needs no key). The store's listing is
/// only a guess at the version: the prefetch is used only if the broker then releases keys
/// for that very version and the signed manifest names that very file, and it is opened
/// and checked exactly as a shard read afterwards would be (every chunk authenticated under
/// the released key and bound to model, version and stage; the digest against the
/// manifest). Otherwise, or if the keys took longer than [`PREFETCH_HELD_AT_MOST`] to come,
/// it is dropped and the shard read anew.
struct Prefetch {
    /// The key being read and when its reading was asked for, or `None` if there is no
    /// guess (nothing listed, or the store failed: the read after attesting reports it).
    guess: tokio::sync::oneshot::Receiver<Option<(StoreKey, Instant)>>,
    pieces: tokio::sync::mpsc::Receiver<Result<Bytes, StoreError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Prefetch {
    fn start(store: Arc<dyn ShardStore>, model: ModelId, stage: StageIndex) -> Self {
        let (guessed, guess) = tokio::sync::oneshot::channel();
        let (forward, pieces) = tokio::sync::mpsc::channel(PREFETCH_PIECES);
        let task = tokio::spawn(async move {
            let Some((key, requested_at, mut ciphertext)) =
                open_newest(&*store, &model, stage).await
            else {
                let _ = guessed.send(None);
                return;
            };
            if guessed.send(Some((key, requested_at))).is_err() {
                return;
            }
            while let Some(piece) = ciphertext.next().await {
                let failed = piece.is_err();
                // Stops when the reader is gone (a wrong guess, or the cold start failed).
                if forward.send(piece).await.is_err() || failed {
                    return;
                }
            }
        });
        Self {
            guess,
            pieces,
            task,
        }
    }

    /// The prefetched ciphertext and when it was asked for, if it is `key`'s and was asked
    /// for less than [`PREFETCH_HELD_AT_MOST`] ago; otherwise stops the prefetch.
    async fn take(
        self,
        key: &StoreKey,
    ) -> Option<(impl Stream<Item = Result<Bytes, StoreError>>, Instant)> {
        self.take_within(key, PREFETCH_HELD_AT_MOST).await
    }

    /// [`Prefetch::take`], with the longest a prefetch may have been held as an argument.
    async fn take_within(
        self,
        key: &StoreKey,
        held_at_most: Duration,
    ) -> Option<(impl Stream<Item = Result<Bytes, StoreError>>, Instant)> {
        let Prefetch {
            guess,
            pieces,
            task,
        } = self;
        match guess.await {
            // A read held open through a long wait for the broker (retries) may have been
            // cut by the store meanwhile: read anew rather than fail on it.
            Ok(Some((guessed, requested_at)))
                if guessed == *key && requested_at.elapsed() < held_at_most =>
            {
                let ciphertext = futures::stream::unfold(pieces, |mut pieces| async move {
                    pieces.recv().await.map(|piece| (piece, pieces))
                });
                Some((ciphertext, requested_at))
            }
            Ok(Some((guessed, requested_at))) => {
                task.abort();
                if guessed == *key {
                    tracing::info!(
                        key = key.as_str(),
                        held_ms = requested_at.elapsed().as_millis() as u64,
                        "the shard read while attesting waited too long for the keys; reading it anew"
                    );
                } else {
                    tracing::info!(
                        guessed = guessed.as_str(),
                        released = key.as_str(),
                        "the shard read while attesting is not the released one; reading it anew"
                    );
                }
                None
            }
            _ => {
                task.abort();
                None
            }
        }
    }
}

/// Opens the newest version's shard of `stage` in `store`, if the store lists one.
async fn open_newest(
    store: &dyn ShardStore,
    model: &ModelId,
    stage: StageIndex,
) -> Option<(StoreKey, Instant, shardseal_store::ObjectStream)> {
    let keys = store.list(&StoreKey::model_prefix(model)).await.ok()?;
    let version = StoreKey::newest_shard_version(&keys, model, stage)?;
    let key = StoreKey::shard(model, version, stage);
    let requested_at = Instant::now();
    let ciphertext = store.get_stream(&key).await.ok()?;
    Some((key, requested_at, ciphertext))
}

/// How many gathered chunks (1 MiB each by default) may wait for the decrypting thread:
/// enough to keep both busy, little enough to bound what waits (8 MiB).
const PIPELINE_DEPTH: usize = 8;

/// Streams the sealed shard from the store, gathering each chunk into its own buffer as it
/// arrives (the copy out of the store's buffers and the first touch of the memory the
/// plaintext will occupy), while a blocking thread authenticates and decrypts each gathered
/// chunk in place and computes the shard digest: receiving and decrypting overlap.
async fn fetch_and_open(
    ciphertext: impl Stream<Item = Result<Bytes, StoreError>>,
    fetch_started: Instant,
    key: &ShardKey,
    binding: ShardBinding,
) -> Result<FetchedShard, Error> {
    let mut ciphertext = std::pin::pin!(ciphertext);
    let mut gatherer = ShardGatherer::new(binding.clone());
    let mut opener = ChunkOpener::new(key, binding);
    let (to_open, mut arriving) = tokio::sync::mpsc::channel::<SealedChunk>(PIPELINE_DEPTH);
    let decrypting = tokio::task::spawn_blocking(move || {
        let mut chunks = Vec::new();
        let mut busy = std::time::Duration::ZERO;
        while let Some(sealed) = arriving.blocking_recv() {
            let started = Instant::now();
            chunks.push(opener.open(sealed).map_err(Error::Keys)?);
            busy += started.elapsed();
        }
        let stats = opener.finish().map_err(Error::Keys)?;
        Ok::<_, Error>((chunks, stats, busy))
    });
    let mut refused = None;
    let mut gathered = Vec::new();
    'receiving: loop {
        let piece = match ciphertext.try_next().await {
            Ok(Some(piece)) => piece,
            Ok(None) => break,
            Err(e) => {
                refused = Some(Error::Store(e.to_string()));
                break;
            }
        };
        let step = gatherer.update(&piece, &mut gathered);
        // The ciphertext never held plaintext: give it back without the wipe.
        crate::WipeOnFree::free_unwiped(piece);
        // Chunks gathered before a refused byte still go to the opener: a forged frame
        // shows here as trailing bytes, there as the forgery it is.
        for sealed in gathered.drain(..) {
            if to_open.send(sealed).await.is_err() {
                // The decrypting thread stopped on an error, reported below.
                break 'receiving;
            }
        }
        if let Err(e) = step {
            refused = Some(Error::Keys(e));
            break;
        }
    }
    drop(to_open);
    let fetch = fetch_started.elapsed();
    let opened = decrypting
        .await
        .map_err(|e| Error::Store(format!("decrypting task: {e}")))?;
    // The opener's error names a forgery precisely (a forged frame may show here only as
    // trailing bytes); when receiving stopped first, the opener's "truncated" is only the
    // consequence, and why receiving stopped is the error.
    let (chunks, stats, decrypt) = match (opened, refused) {
        (Err(Error::Keys(shardseal_keys::Error::ShardTruncated)), Some(refused)) => {
            return Err(refused);
        }
        (Err(error), _) | (Ok(_), Some(error)) => return Err(error),
        (Ok(opened), None) => opened,
    };
    Ok(FetchedShard {
        chunks,
        plaintext_len: stats.plaintext_len,
        digest: stats.digest,
        fetch,
        decrypt,
        fetched_at: Instant::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardseal_attestation::{Measurement, ModelVersion};
    use shardseal_keys::{KeyReleaseContext, Signed, SigningKey, seal_key_release, to_blob};

    /// What a broker answers an attestation of model `m` stage 0: the key release, the
    /// token, the key that signs the token, and the context the release is sealed under.
    struct Answer {
        release: KeyRelease,
        token: FunctionToken,
        signer: SigningKey,
        sealed_for: KeyReleaseContext,
    }

    /// A change to a broker's answer.
    type Tamper = fn(&mut Answer);

    /// The function's side of an attestation, and the broker's answer to it once `tamper`
    /// has had its way with it.
    fn attested(tamper: impl FnOnce(&mut Answer)) -> (ColdStartConfig, Attested) {
        let signer = SigningKey::from_seed(&[3; 32]).unwrap();
        let broker_key = signer.verifying_key();
        let ephemeral = RecipientPrivateKey::generate().unwrap();
        let nonce = Nonce::from_bytes([9; 32]);
        let stage_key = RecipientPrivateKey::generate().unwrap();
        let mut answer = Answer {
            release: KeyRelease {
                model_id: "m".into(),
                version: 2,
                stage: 0,
                stage_count: 1,
                deployment: "m@v2".into(),
                shard_key: vec![5; 32],
                stage_private_key: stage_key.expose_secret().expose_secret().to_vec(),
                ..Default::default()
            },
            token: FunctionToken {
                model_id: ModelId::new("m").unwrap(),
                version: ModelVersion(2),
                stage: StageIndex(0),
                measurement: Measurement([1; 32]),
                ephemeral_key: ephemeral.public_key().to_hex(),
                issued_at_ms: 1_000,
                expires_at_ms: 61_000,
            },
            signer,
            sealed_for: KeyReleaseContext {
                broker_id: broker_key.to_hex(),
                nonce,
                model: ModelId::new("m").unwrap(),
                stage: StageIndex(0),
            },
        };
        tamper(&mut answer);
        let Answer {
            mut release,
            token,
            signer,
            sealed_for,
        } = answer;
        let token = to_blob(&Signed::sign(&token, &signer).unwrap());
        release.token = Some(token.clone());
        let sealed = seal_key_release(
            &ephemeral.public_key(),
            &sealed_for,
            &release.encode_to_vec(),
        )
        .unwrap();
        let config = ColdStartConfig {
            broker_url: "https://127.0.0.1:1".into(),
            pki_dir: PathBuf::new(),
            agent_socket: PathBuf::new(),
            store: StoreConfig::from_url("/nonexistent").unwrap(),
            broker_key: None,
            model: ModelId::new("m").unwrap(),
            stage: StageIndex(0),
            max_batch: 1,
            load_memory: LoadMemory::Auto,
            serve_memory: ServeMemory::Heap,
        };
        let attested = Attested {
            reply: AttestResponse {
                release: Some(sealed.into()),
                token: Some(token),
            },
            ephemeral,
            nonce,
            broker_id: broker_key.to_hex(),
            connected_at: Instant::now(),
            broker_key,
        };
        (config, attested)
    }

    /// Why the function refuses the answer `tamper` makes.
    fn refusal(tamper: impl FnOnce(&mut Answer)) -> String {
        let (config, attested) = attested(tamper);
        match open_release(&config, attested) {
            Ok(_) => panic!("a tampered key release was taken"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_key_release_opens_and_leases_its_keys_for_the_token_lifetime() {
        let (config, attested) = attested(|_| {});
        let connected_at = attested.connected_at;
        let released = open_release(&config, attested).unwrap();
        assert_eq!(released.release.version, 2);
        assert_eq!(released.lease_ends, connected_at + Duration::from_secs(60));
        assert!(released.next_stage_key.is_none());
    }

    /// A broker's answer that does not add up is refused, each with its reason: keys
    /// sealed for another attestation (a replay) or for another stage, a token signed by
    /// another key, naming another stage, another version than the keys, or expiring
    /// before it was issued.
    #[test]
    fn a_key_release_that_does_not_add_up_is_refused() {
        let cases: [(&str, Tamper); 7] = [
            ("does not open with this key and context", |a| {
                a.sealed_for.nonce = Nonce::from_bytes([8; 32])
            }),
            ("does not open with this key and context", |a| {
                a.sealed_for.stage = StageIndex(1)
            }),
            ("the key release names another model or stage", |a| {
                a.release.stage = 1
            }),
            ("not signed by the broker", |a| {
                a.signer = SigningKey::from_seed(&[4; 32]).unwrap()
            }),
            ("the function token names another model or stage", |a| {
                a.token.stage = StageIndex(1)
            }),
            ("another version than the keys released", |a| {
                a.token.version = ModelVersion(1)
            }),
            ("expires before it was issued", |a| {
                a.token.expires_at_ms = 0
            }),
        ];
        for (reason, tamper) in cases {
            let refused = refusal(tamper);
            assert!(
                refused.contains(reason),
                "{refused:?} does not say {reason:?}"
            );
        }
    }

    /// A local store holding `bytes` as stage 0's shard of version 1 of model `m`.
    async fn store_with_shard(bytes: &[u8]) -> (tempfile::TempDir, Arc<dyn ShardStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store = StoreConfig::from_url(dir.path().to_str().unwrap())
            .unwrap()
            .open()
            .unwrap();
        let key = StoreKey::shard(&ModelId::new("m").unwrap(), ModelVersion(1), StageIndex(0));
        store
            .put(&key, Bytes::copy_from_slice(bytes))
            .await
            .unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn a_prefetch_serves_only_the_released_shard_and_only_while_fresh() {
        let shard: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (_dir, store) = store_with_shard(&shard).await;
        let model = ModelId::new("m").unwrap();
        let released = StoreKey::shard(&model, ModelVersion(1), StageIndex(0));
        let start = || Prefetch::start(store.clone(), model.clone(), StageIndex(0));

        // The released shard, in time: exactly its bytes.
        let (ciphertext, _) = start()
            .take_within(&released, Duration::from_secs(10))
            .await
            .expect("the prefetch is used");
        let read: Vec<Bytes> = ciphertext.try_collect().await.unwrap();
        assert_eq!(read.concat(), shard);

        // Held too long, or another version released: read anew.
        assert!(
            start()
                .take_within(&released, Duration::ZERO)
                .await
                .is_none()
        );
        let other = StoreKey::shard(&model, ModelVersion(2), StageIndex(0));
        assert!(
            start()
                .take_within(&other, Duration::from_secs(10))
                .await
                .is_none()
        );
        // Nothing stored for the stage: no guess.
        let nothing = Prefetch::start(store.clone(), model.clone(), StageIndex(1));
        let stage1 = StoreKey::shard(&model, ModelVersion(1), StageIndex(1));
        assert!(
            nothing
                .take_within(&stage1, Duration::from_secs(10))
                .await
                .is_none()
        );
    }

    #[test]
    fn a_spawn_time_gives_the_age_to_the_nanosecond() {
        let now: u128 = 5_000_000_123_456_789;
        assert_eq!(
            age_since(&(now - 3_250_000).to_string(), now),
            Some(Duration::from_micros(3_250))
        );
        assert_eq!(age_since(&now.to_string(), now), Some(Duration::ZERO));
        // Later than now, negative, or not a number: no age.
        for said in [(now + 1).to_string(), "-5".into(), "".into(), "3 ms".into()] {
            assert_eq!(age_since(&said, now), None, "{said:?}");
        }
    }

    #[test]
    fn a_spawn_time_is_believed_only_where_proc_agrees() {
        let ms = Duration::from_millis;
        let exact = Duration::from_micros(8_437);
        // /proc in 10 ms steps: 0 or 10 ms for a process 8.4 ms old.
        assert_eq!(believed_age(Some(exact), Some(ms(0))), Some(exact));
        assert_eq!(believed_age(Some(exact), Some(ms(10))), Some(exact));
        assert_eq!(believed_age(Some(exact), None), Some(exact));
        // A spawner's time a second off the kernel's is not taken.
        assert_eq!(believed_age(Some(ms(1_008)), Some(ms(10))), Some(ms(10)));
        assert_eq!(believed_age(None, Some(ms(10))), Some(ms(10)));
        assert_eq!(believed_age(None, None), None);
    }

    #[test]
    fn the_local_platform_names_the_same_variable() {
        assert_eq!(
            SPAWNED_AT_ENV,
            shardseal_coordinator::platform::local::SPAWNED_AT_ENV
        );
    }
}
