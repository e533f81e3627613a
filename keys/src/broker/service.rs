//! The `KeyBroker` gRPC service.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use prost::Message;
use shardseal_attestation::{
    AttestationError, Clock, Evidence, Measurement, ModelId, Nonce, NonceRegistry, ReleasePolicy,
    ReportData, StageIndex, SystemClock, TeeKind, VerifiedQuote,
};
use shardseal_audit::{
    AuditEvent, AuditWriter, CheckpointSigner, KeyFingerprint, Reason, TeeName, WriterOptions,
};
use shardseal_proto::tls::{Pki, Role};
use shardseal_proto::v1::key_broker_server::{KeyBroker as KeyBrokerRpc, KeyBrokerServer};
use shardseal_proto::v1::{
    AttestRequest, AttestResponse, BrokerInfo, BrokerInfoRequest, KeyRelease, NonceRequest,
    NonceResponse, PipelineManifestRequest, RegisterModelRequest, RegisterModelResponse,
    RevokeRequest, RevokeResponse, SignedBlob,
};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Semaphore};
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use zeroize::Zeroize;

use crate::broker::auth::{OwnerAuthenticator, OwnerMethod, unix_millis_now};
use crate::broker::config::BrokerConfig;
use crate::broker::error::{BrokerError, error_chain};
use crate::broker::owner::open_shard_keys;
use crate::broker::policy::OwnerReleasePolicy;
use crate::broker::store::{IndexEntry, StateDir, VersionRecord};
use crate::manifest::SignedManifest;
use crate::pipeline::{FunctionToken, PipelineManifest, to_blob};
use crate::seal::{
    KeyReleaseContext, RecipientPrivateKey, RecipientPublicKey, Sealed, seal_key_release,
};
use crate::secret::SecretBytes;
use crate::signing::{Signed, SigningKey, VerifyingKey};

/// The largest message the broker accepts: a signed manifest (at most 4 MiB) and change.
const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// A key broker: the only ShardSeal service that holds shard keys and stage private keys.
///
/// Cheap to clone (an `Arc` inside): tests and supervisors keep a handle while
/// [`KeyBroker::run`] serves.
#[derive(Clone)]
pub struct KeyBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KeyBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyBroker")
            .field("identity", &self.inner.identity.verifying_key())
            .field("state_dir", &self.inner.config.state_dir)
            .finish_non_exhaustive()
    }
}

/// What the broker knows about one model: its index entry, its current version, and the
/// release policy built from both and the broker's platform roots.
struct ModelEntry {
    index: IndexEntry,
    current: Arc<VersionRecord>,
    policy: ReleasePolicy,
}

impl ModelEntry {
    fn new(index: IndexEntry, current: Arc<VersionRecord>, config: &BrokerConfig) -> Self {
        let policy = current.policy.to_release_policy(
            &index.model_id,
            &config.trusted_roots,
            &index.revoked_measurements,
        );
        Self {
            index,
            current,
            policy,
        }
    }

    /// The measurements a client may expect at each stage: allowed and not revoked.
    fn allowed_measurements(&self) -> Vec<Vec<Measurement>> {
        (0..self.current.stage_count())
            .map(|stage| {
                self.current
                    .policy
                    .allowed(StageIndex(stage))
                    .iter()
                    .filter(|m| !self.index.revoked_measurements.contains(m))
                    .copied()
                    .collect()
            })
            .collect()
    }
}

struct Inner {
    config: BrokerConfig,
    pki: Pki,
    identity: SigningKey,
    /// The identity public key in lower-case hex: the broker id in every key release's AAD.
    broker_id: String,
    sealing: RecipientPrivateKey,
    state: StateDir,
    models: RwLock<HashMap<ModelId, Arc<ModelEntry>>>,
    /// Serialises owner calls from check to persistence, so the index is written from one
    /// consistent view.
    writes: Mutex<()>,
    /// Set when a state write failed: see [`Inner::persist`].
    state_unsettled: AtomicBool,
    nonces: NonceRegistry<Arc<dyn Clock>>,
    owners: OwnerAuthenticator,
    audit: Arc<AuditWriter>,
    attest_slots: Semaphore,
}

/// Signs the audit log's checkpoints with the broker's identity key, so verifiers pin
/// one key (`broker.pub`) for both manifests and the log.
struct IdentitySigner(SigningKey);

impl CheckpointSigner for IdentitySigner {
    fn sign(&self, message: &[u8]) -> [u8; 64] {
        *self.0.sign(message).as_bytes()
    }

    fn public_key(&self) -> [u8; 32] {
        *self.0.verifying_key().as_bytes()
    }
}

impl KeyBroker {
    /// Validates `config`, opens (or creates) the state folder and the audit log, and loads
    /// every registered model.
    pub fn open(config: BrokerConfig) -> Result<Self, BrokerError> {
        Self::open_with_clock(config, Arc::new(SystemClock))
    }

    /// Like [`KeyBroker::open`], with the monotonic clock nonces expire by (a
    /// [`ManualClock`](shardseal_attestation::ManualClock) in tests).
    pub fn open_with_clock(
        config: BrokerConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, BrokerError> {
        config.validate()?;
        let pki = Pki::open(&config.pki_dir)?;
        let (state, identity) = StateDir::open(&config.state_dir)?;
        let audit_signer =
            SigningKey::from_seed(identity.signing.expose_seed()).map_err(BrokerError::Crypto)?;
        let audit = AuditWriter::open(
            state.audit_dir(),
            IdentitySigner(audit_signer),
            WriterOptions::default(),
        )?;
        let mut models = HashMap::new();
        for (index, record) in state.load()? {
            let entry = ModelEntry::new(index, Arc::new(record), &config);
            models.insert(entry.index.model_id.clone(), Arc::new(entry));
        }
        tracing::info!(
            identity = %identity.signing.verifying_key(),
            models = models.len(),
            "key broker state loaded"
        );
        Ok(Self {
            inner: Arc::new(Inner {
                nonces: NonceRegistry::with_clock(
                    clock,
                    config.nonce_lifetime(),
                    config.max_outstanding_nonces,
                ),
                owners: OwnerAuthenticator::new(&config.owner_keys, config.owner_auth_window()),
                attest_slots: Semaphore::new(config.max_concurrent_attestations),
                broker_id: identity.signing.verifying_key().to_hex(),
                identity: identity.signing,
                sealing: identity.sealing,
                pki,
                state,
                models: RwLock::new(models),
                writes: Mutex::new(()),
                state_unsettled: AtomicBool::new(false),
                audit: Arc::new(audit),
                config,
            }),
        })
    }

    /// The Ed25519 key that signs pipeline manifests, tokens and audit checkpoints.
    pub fn identity_key(&self) -> VerifyingKey {
        self.inner.identity.verifying_key()
    }

    /// The X25519 key owners seal shard keys to.
    pub fn sealing_key(&self) -> RecipientPublicKey {
        self.inner.sealing.public_key()
    }

    /// The audit log folder.
    pub fn audit_dir(&self) -> PathBuf {
        self.inner.state.audit_dir()
    }

    /// How many models are registered.
    pub fn model_count(&self) -> usize {
        self.inner.read_models().len()
    }

    /// Serves the `KeyBroker` service over TLS (the PKI's broker identity) on `listener`
    /// until `shutdown` completes, then lets calls in flight finish and checkpoints the
    /// audit log.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), BrokerError> {
        let tls = self.inner.pki.server_config(Role::Broker)?;
        let service = KeyBrokerServer::new(Service(self.inner.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Server::builder()
            .tls_config(tls)?
            .timeout(self.inner.config.request_timeout())
            .add_service(service)
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                shutdown,
            )
            .await?;
        let audit = self.inner.audit.clone();
        tokio::task::spawn_blocking(move || audit.checkpoint())
            .await
            .map_err(|e| BrokerError::TaskFailed(e.to_string()))??;
        Ok(())
    }
}

/// The tonic face of the broker: each method calls the matching `Inner` method and maps
/// its error with [`BrokerError::to_status`].
struct Service(Arc<Inner>);

#[tonic::async_trait]
impl KeyBrokerRpc for Service {
    async fn get_broker_info(
        &self,
        _request: Request<BrokerInfoRequest>,
    ) -> Result<Response<BrokerInfo>, Status> {
        Ok(Response::new(BrokerInfo {
            identity_key: self.0.identity.verifying_key().as_bytes().to_vec(),
            sealing_key: self.0.sealing.public_key().as_bytes().to_vec(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn register_model(
        &self,
        request: Request<RegisterModelRequest>,
    ) -> Result<Response<RegisterModelResponse>, Status> {
        let inner = Arc::clone(&self.0);
        let request = request.into_inner();
        run_to_completion(async move { inner.register(OwnerMethod::RegisterModel, request).await })
            .await
            .map(Response::new)
            .map_err(|e| e.to_status())
    }

    #[tracing::instrument(skip_all)]
    async fn rotate_model(
        &self,
        request: Request<RegisterModelRequest>,
    ) -> Result<Response<RegisterModelResponse>, Status> {
        let inner = Arc::clone(&self.0);
        let request = request.into_inner();
        run_to_completion(async move { inner.register(OwnerMethod::RotateModel, request).await })
            .await
            .map(Response::new)
            .map_err(|e| e.to_status())
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().model_id))]
    async fn revoke(
        &self,
        request: Request<RevokeRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        let inner = Arc::clone(&self.0);
        let request = request.into_inner();
        run_to_completion(async move { inner.revoke(request).await })
            .await
            .map(Response::new)
            .map_err(|e| e.to_status())
    }

    async fn get_nonce(
        &self,
        _request: Request<NonceRequest>,
    ) -> Result<Response<NonceResponse>, Status> {
        let nonce = self
            .0
            .nonces
            .issue()
            .map_err(|e| BrokerError::from(e).to_status())?;
        Ok(Response::new(NonceResponse {
            nonce: nonce.as_bytes().to_vec(),
            expires_at_ms: unix_millis_now().saturating_add(self.0.config.nonce_lifetime_ms),
        }))
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().model_id, stage = request.get_ref().stage))]
    async fn attest(
        &self,
        request: Request<AttestRequest>,
    ) -> Result<Response<AttestResponse>, Status> {
        self.0
            .attest(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| e.to_status())
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().model_id))]
    async fn get_pipeline_manifest(
        &self,
        request: Request<PipelineManifestRequest>,
    ) -> Result<Response<SignedBlob>, Status> {
        self.0
            .pipeline_manifest(&request.into_inner().model_id)
            .await
            .map(Response::new)
            .map_err(|e| e.to_status())
    }
}

/// Runs an owner operation as its own task: if the caller disconnects or its deadline
/// passes, the operation still finishes (persist, then memory, then audit) instead of
/// stopping between the files and memory.
async fn run_to_completion<T: Send + 'static>(
    operation: impl Future<Output = Result<T, BrokerError>> + Send + 'static,
) -> Result<T, BrokerError> {
    tokio::spawn(tracing::Instrument::in_current_span(operation))
        .await
        .map_err(|e| BrokerError::TaskFailed(e.to_string()))?
}

fn parse_model_id(text: &str) -> Result<ModelId, BrokerError> {
    ModelId::new(text).map_err(|e| BrokerError::InvalidRequest(e.to_string()))
}

fn tee_name(tee: TeeKind) -> &'static str {
    match tee {
        TeeKind::SoftwareTee => "software",
        TeeKind::SevSnp => "sev-snp",
        TeeKind::Tdx => "tdx",
        TeeKind::SgxDcap => "sgx-dcap",
        _ => "unknown",
    }
}

impl Inner {
    fn read_models(&self) -> std::sync::RwLockReadGuard<'_, HashMap<ModelId, Arc<ModelEntry>>> {
        // Each writer swaps whole entries in: a panic cannot leave the map half-updated.
        self.models.read().unwrap_or_else(|e| e.into_inner())
    }

    fn model(&self, model: &ModelId) -> Result<Arc<ModelEntry>, BrokerError> {
        self.read_models()
            .get(model)
            .cloned()
            .ok_or_else(|| BrokerError::UnknownModel(model.clone()))
    }

    /// Appends to the audit log off the async workers (each append is fsynced).
    async fn record(&self, event: AuditEvent) -> Result<(), BrokerError> {
        self.record_all(vec![event]).await
    }

    /// Records `events` together: in order, with one fsync for all.
    async fn record_all(&self, events: Vec<AuditEvent>) -> Result<(), BrokerError> {
        let audit = self.audit.clone();
        tokio::task::spawn_blocking(move || audit.append_all(&events))
            .await
            .map_err(|e| BrokerError::TaskFailed(e.to_string()))??;
        Ok(())
    }

    /// Runs a state write off the async workers. After a failed write the files may hold
    /// more than memory does (an index renamed into place whose folder sync failed), so
    /// the broker reloads them (each was written whole, so they hold the state of before
    /// or after the write); if even that fails, every later owner write is refused until
    /// a restart reloads the files.
    async fn persist(
        self: &Arc<Self>,
        write: impl FnOnce(&StateDir) -> Result<(), BrokerError> + Send + 'static,
    ) -> Result<(), BrokerError> {
        if self.state_unsettled.load(Ordering::SeqCst) {
            return Err(BrokerError::StateUnsettled);
        }
        let inner = Arc::clone(self);
        let written = tokio::task::spawn_blocking(move || write(&inner.state))
            .await
            .map_err(|e| BrokerError::TaskFailed(e.to_string()))
            .and_then(|written| written);
        if let Err(error) = &written {
            tracing::error!(error = %error_chain(error), "a state write failed; reloading the state folder");
            let inner = Arc::clone(self);
            let reloaded = tokio::task::spawn_blocking(move || inner.state.load()).await;
            match reloaded {
                Ok(Ok(loaded)) => {
                    let models = loaded
                        .into_iter()
                        .map(|(index, record)| {
                            let entry = ModelEntry::new(index, Arc::new(record), &self.config);
                            (entry.index.model_id.clone(), Arc::new(entry))
                        })
                        .collect();
                    *self.models.write().unwrap_or_else(|e| e.into_inner()) = models;
                }
                _ => self.state_unsettled.store(true, Ordering::SeqCst),
            }
        }
        written
    }

    /// The index as it will be after `changed` replaces (or joins) its model's entry.
    fn index_with(&self, changed: &IndexEntry) -> Vec<IndexEntry> {
        let models = self.read_models();
        let mut index: Vec<IndexEntry> = models
            .values()
            .filter(|entry| entry.index.model_id != changed.model_id)
            .map(|entry| entry.index.clone())
            .collect();
        index.push(changed.clone());
        index.sort_by(|a, b| a.model_id.cmp(&b.model_id));
        index
    }

    /// Checks everything in a registration that needs no lock: the manifest and its
    /// signer, the shard keys, the policy. Generates the stage keypairs.
    fn prepare(
        &self,
        owner: VerifyingKey,
        request: &RegisterModelRequest,
        now_ms: u64,
    ) -> Result<VersionRecord, BrokerError> {
        let signed = SignedManifest::from_bytes(&request.signed_manifest)
            .map_err(BrokerError::InvalidManifest)?;
        if signed.signer() != owner {
            return Err(BrokerError::ManifestSignerMismatch {
                signer: signed.signer(),
                caller: owner,
            });
        }
        let manifest = signed
            .verify(&owner)
            .map_err(BrokerError::InvalidManifest)?;
        let model = manifest.model_id.clone();
        let version = manifest.version;
        let stage_count = manifest.stages.len();

        let sealed = request
            .shard_keys
            .clone()
            .ok_or_else(|| BrokerError::InvalidRequest("no sealed shard keys".into()))?;
        let sealed = Sealed::try_from(sealed)
            .map_err(|e| BrokerError::InvalidRequest(format!("sealed shard keys: {e}")))?;
        let shard_keys = open_shard_keys(&self.sealing, &model, version, &sealed)?;
        if !shard_keys.stages().map(|s| s.0 as usize).eq(0..stage_count) {
            let stages: Vec<u32> = shard_keys.stages().map(|s| s.0).collect();
            return Err(BrokerError::ShardKeysMismatch(format!(
                "keys for stages {stages:?}, but the manifest has {stage_count} stage(s)"
            )));
        }

        let policy = OwnerReleasePolicy::from_json(&request.release_policy)?;
        policy.check(u32::try_from(stage_count).unwrap_or(u32::MAX))?;

        let stage_keys = (0..stage_count)
            .map(|_| RecipientPrivateKey::generate())
            .collect::<Result<Vec<_>, _>>()
            .map_err(BrokerError::Crypto)?;
        Ok(VersionRecord {
            owner,
            registered_at_ms: now_ms,
            signed_manifest: request.signed_manifest.clone(),
            manifest,
            policy,
            shard_keys,
            stage_keys,
        })
    }

    /// RegisterModel and RotateModel: authenticate, verify, persist (version file, then
    /// index), and only then acknowledge.
    async fn register(
        self: &Arc<Self>,
        method: OwnerMethod,
        request: RegisterModelRequest,
    ) -> Result<RegisterModelResponse, BrokerError> {
        let now_ms = unix_millis_now();
        let owner = self.owners.authenticate(method, &request, now_ms)?;
        let record = self.prepare(owner, &request, now_ms)?;
        drop(request);
        let model = record.model().clone();
        let version = record.version();
        let stages = record.stage_count();

        let _writing = self.writes.lock().await;
        let existing = self.read_models().get(&model).cloned();
        let (index, event) = match (method, existing) {
            (OwnerMethod::RotateModel, None) => return Err(BrokerError::UnknownModel(model)),
            (OwnerMethod::RotateModel, Some(entry)) => {
                if entry.index.owner_key != owner {
                    return Err(BrokerError::NotModelOwner(model));
                }
                if entry.index.revoked {
                    return Err(BrokerError::ModelRevoked(model));
                }
                if version <= entry.index.current {
                    return Err(BrokerError::VersionNotNewer {
                        model,
                        current: entry.index.current,
                        offered: version,
                    });
                }
                let mut index = entry.index.clone();
                index.current = version;
                index.versions.push(version);
                let event = AuditEvent::ModelRotated {
                    model: model.clone(),
                    from: entry.index.current,
                    to: version,
                };
                (index, event)
            }
            (_, Some(entry)) => {
                return Err(if entry.index.versions.contains(&version) {
                    BrokerError::VersionExists { model, version }
                } else {
                    BrokerError::ModelExists(model)
                });
            }
            (_, None) => {
                let index = IndexEntry {
                    model_id: model.clone(),
                    owner_key: owner,
                    current: version,
                    versions: vec![version],
                    revoked: false,
                    revoked_measurements: Vec::new(),
                };
                let event = AuditEvent::ModelRegistered {
                    model: model.clone(),
                    version,
                    stages,
                    owner: KeyFingerprint::of_public_key(owner.as_bytes()),
                };
                (index, event)
            }
        };

        let record = Arc::new(record);
        let full_index = self.index_with(&index);
        let to_write = Arc::clone(&record);
        self.persist(move |state| {
            state.write_version(&to_write)?;
            state.write_index(full_index)
        })
        .await?;
        let entry = ModelEntry::new(index, record, &self.config);
        self.models
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(model.clone(), Arc::new(entry));
        tracing::info!(model = %model, version = version.0, stages, "model version registered");
        self.record(event).await?;
        Ok(RegisterModelResponse {
            model_id: model.to_string(),
            version: version.0,
        })
    }

    async fn revoke(
        self: &Arc<Self>,
        request: RevokeRequest,
    ) -> Result<RevokeResponse, BrokerError> {
        let owner = self
            .owners
            .authenticate(OwnerMethod::Revoke, &request, unix_millis_now())?;
        let model = parse_model_id(&request.model_id)?;
        let measurement = if request.measurement.is_empty() {
            None
        } else {
            Some(
                Measurement::from_hex(&request.measurement)
                    .map_err(|e| BrokerError::InvalidRequest(e.to_string()))?,
            )
        };

        let _writing = self.writes.lock().await;
        let entry = self.model(&model)?;
        if entry.index.owner_key != owner {
            return Err(BrokerError::NotModelOwner(model));
        }
        let mut index = entry.index.clone();
        let event = match measurement {
            None => {
                index.revoked = true;
                AuditEvent::ModelRevoked {
                    model: model.clone(),
                }
            }
            Some(measurement) => {
                if !index.revoked_measurements.contains(&measurement) {
                    index.revoked_measurements.push(measurement);
                }
                AuditEvent::MeasurementRevoked {
                    model: model.clone(),
                    stage: None,
                    measurement,
                }
            }
        };
        let full_index = self.index_with(&index);
        self.persist(move |state| state.write_index(full_index))
            .await?;
        let updated = ModelEntry::new(index, Arc::clone(&entry.current), &self.config);
        self.models
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(model.clone(), Arc::new(updated));
        tracing::info!(model = %model, measurement = ?measurement, "revoked");
        self.record(event).await?;
        Ok(RevokeResponse {})
    }

    /// Everything an attestation checks except the nonce's freshness: the request's shape,
    /// the model and stage, and the evidence against the model's release policy.
    fn appraise(
        &self,
        request: &AttestRequest,
        model: &ModelId,
        nonce: &Nonce,
        ephemeral: &RecipientPublicKey,
    ) -> Result<(Arc<ModelEntry>, VerifiedQuote), BrokerError> {
        let stage = StageIndex(request.stage);
        let evidence = Evidence::from_bytes(&request.evidence)?;
        let entry = self.model(model)?;
        if entry.index.revoked {
            return Err(BrokerError::ModelRevoked(model.clone()));
        }
        if stage.0 >= entry.current.stage_count() {
            return Err(BrokerError::UnknownStage {
                model: model.clone(),
                stage,
                stage_count: entry.current.stage_count(),
            });
        }
        let expected = ReportData::bind(ephemeral.as_bytes(), nonce);
        let quote = entry.policy.appraise(&evidence, &expected, model, stage)?;
        Ok((entry, quote))
    }

    async fn attest(&self, request: AttestRequest) -> Result<AttestResponse, BrokerError> {
        let _slot = self
            .attest_slots
            .try_acquire()
            .map_err(|_| BrokerError::Busy)?;
        let model = ModelId::new(&request.model_id).ok();
        let stage = StageIndex(request.stage);
        let outcome = self.attest_checked(&request, model.as_ref()).await;
        shardseal_proto::metrics::global()
            .counter(
                "shardseal_broker_attestations_total",
                "Attestations the broker appraised, by outcome (accepted, denied).",
                &[(
                    "outcome",
                    if outcome.is_ok() {
                        "accepted"
                    } else {
                        "denied"
                    },
                )],
            )
            .inc();
        if let Err(error) = &outcome {
            let measurement = match error {
                BrokerError::Attestation(
                    AttestationError::MeasurementNotAllowed { measurement, .. }
                    | AttestationError::MeasurementRevoked { measurement },
                ) => Some(*measurement),
                _ => None,
            };
            let denied = AuditEvent::AttestDenied {
                model,
                stage: Some(stage),
                measurement,
                reason: Reason::new(error.to_string()),
            };
            if let Err(audit_error) = self.record(denied).await {
                tracing::error!(error = %error_chain(&audit_error), "cannot record a denied attestation");
            }
        }
        outcome
    }

    async fn attest_checked(
        &self,
        request: &AttestRequest,
        model: Option<&ModelId>,
    ) -> Result<AttestResponse, BrokerError> {
        let nonce: [u8; 32] = request
            .nonce
            .as_slice()
            .try_into()
            .map_err(|_| BrokerError::InvalidRequest("the nonce is not 32 bytes".into()))?;
        let nonce = Nonce::from_bytes(nonce);
        let verdict = model
            .cloned()
            .ok_or_else(|| {
                BrokerError::InvalidRequest(format!("invalid model id {:?}", request.model_id))
            })
            .and_then(|model| {
                let ephemeral =
                    RecipientPublicKey::from_slice(&request.ephemeral_key).map_err(|_| {
                        BrokerError::InvalidRequest("the ephemeral key is not 32 bytes".into())
                    })?;
                let (entry, quote) = self.appraise(request, &model, &nonce, &ephemeral)?;
                Ok((model, ephemeral, entry, quote))
            });
        // A nonce answers one attempt, whatever its outcome: evidence cannot be retried
        // against it.
        let fresh = self.nonces.consume(&nonce);
        let (model, ephemeral, entry, quote) = verdict?;
        fresh?;
        let stage = StageIndex(request.stage);
        let record = &entry.current;
        let measurement = quote.measurement();

        let issued_at_ms = unix_millis_now();
        let token = FunctionToken {
            model_id: model.clone(),
            version: record.version(),
            stage,
            measurement,
            ephemeral_key: ephemeral.to_hex(),
            issued_at_ms,
            expires_at_ms: issued_at_ms.saturating_add(self.config.token_lifetime_ms),
        };
        let token = to_blob(&Signed::sign(&token, &self.identity).map_err(BrokerError::Crypto)?);
        let sealed = self.seal_release(record, stage, &nonce, &ephemeral, &token)?;

        // Both on record before the keys leave, written together.
        self.record_all(vec![
            AuditEvent::AttestAccepted {
                model: model.clone(),
                stage,
                measurement,
                tee: TeeName::new(tee_name(quote.tee()))?,
            },
            AuditEvent::KeyReleased {
                model: model.clone(),
                version: record.version(),
                stage,
                measurement,
            },
        ])
        .await?;
        tracing::info!(model = %model, stage = stage.0, %measurement, "keys released");
        shardseal_proto::metrics::global()
            .counter(
                "shardseal_broker_key_releases_total",
                "Key releases to attested functions, by model and stage.",
                &[("model", model.as_str()), ("stage", &stage.0.to_string())],
            )
            .inc();
        Ok(AttestResponse {
            release: Some(sealed.into()),
            token: Some(token),
        })
    }

    /// The `KeyRelease` of `stage`, sealed to the function's ephemeral key under the
    /// context the function rebuilds (broker id, nonce, model, stage).
    fn seal_release(
        &self,
        record: &VersionRecord,
        stage: StageIndex,
        nonce: &Nonce,
        ephemeral: &RecipientPublicKey,
        token: &SignedBlob,
    ) -> Result<Sealed, BrokerError> {
        let model = record.model();
        let missing = || BrokerError::StateCorrupt {
            path: PathBuf::from(model.as_str()),
            reason: format!("no key for {stage}"),
        };
        let shard_key = record.shard_keys.get(stage).ok_or_else(missing)?;
        let stage_key = record
            .stage_keys
            .get(stage.0 as usize)
            .ok_or_else(missing)?;
        let next = record.stage_public_key(StageIndex(stage.0 + 1));
        let mut release = KeyRelease {
            model_id: model.to_string(),
            version: record.version().0,
            stage: stage.0,
            stage_count: record.stage_count(),
            deployment: PipelineManifest::deployment_name(model, record.version()),
            shard_key: shard_key.expose_secret().to_vec(),
            stage_private_key: stage_key.expose_secret().expose_secret().to_vec(),
            next_stage_public_key: next.map(|k| k.as_bytes().to_vec()).unwrap_or_default(),
            signed_manifest: record.signed_manifest.clone(),
            token: Some(token.clone()),
        };
        // encode_to_vec sizes its buffer exactly, so no partial copy is left behind.
        let plaintext = SecretBytes::new(release.encode_to_vec());
        release.shard_key.zeroize();
        release.stage_private_key.zeroize();
        let context = KeyReleaseContext {
            broker_id: self.broker_id.clone(),
            nonce: *nonce,
            model: model.clone(),
            stage,
        };
        seal_key_release(ephemeral, &context, plaintext.expose_secret())
            .map_err(BrokerError::Crypto)
    }

    async fn pipeline_manifest(&self, model_id: &str) -> Result<SignedBlob, BrokerError> {
        let model = parse_model_id(model_id)?;
        let entry = self.model(&model)?;
        if entry.index.revoked {
            return Err(BrokerError::ModelRevoked(model));
        }
        let record = &entry.current;
        let stage0_public_key =
            record
                .stage_public_key(StageIndex(0))
                .ok_or_else(|| BrokerError::StateCorrupt {
                    path: PathBuf::from(model.as_str()),
                    reason: "no stage 0 key".into(),
                })?;
        let pipeline = PipelineManifest {
            model_id: model.clone(),
            version: record.version(),
            deployment: PipelineManifest::deployment_name(&model, record.version()),
            stage_count: record.stage_count(),
            inputs: record.manifest.inputs.clone(),
            outputs: record.manifest.outputs.clone(),
            stage0_public_key,
            allowed_measurements: entry.allowed_measurements(),
            owner_key: record.owner,
            issued_at_ms: unix_millis_now(),
        };
        let blob = to_blob(&Signed::sign(&pipeline, &self.identity).map_err(BrokerError::Crypto)?);
        self.record(AuditEvent::ManifestServed {
            model,
            version: record.version(),
        })
        .await?;
        Ok(blob)
    }
}
