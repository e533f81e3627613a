//! The broker's state folder: identity, master key, registered models, all written
//! atomically before any RPC acknowledges them.
//!
//! ```text
//! <state>/                       0700
//!   identity.key                 0600  Ed25519 seed: signs pipeline manifests, tokens and
//!                                      audit checkpoints
//!   sealing.key                  0600  X25519 private key: owners seal shard keys to it
//!   master.key                   0600  AES-256 key: seals every model secret below at rest
//!   broker.pub                   0644  the identity public key (hex), for others to pin
//!   index.json                   0600  per model: owner, current version, versions, revocations
//!   models/<model>/              0700
//!     v<version>.json            0600  signed manifest, release policy, stage public keys,
//!                                      sealed shard keys, sealed stage private keys
//!   audit/                             the audit log (shardseal-audit)
//! ```
//!
//! Model secrets are sealed with AES-256-GCM under the master key (`nonce ‖ ciphertext ‖
//! tag`), with an AAD naming what they are and whose: `"shard-keys"` or `"stage-keys"`,
//! the model id and the version. A sealed blob moved to another model's file does not open.
//!
//! A registration writes its version file, then the index; only the index makes it
//! registered. A crash between the two leaves a version file the index does not name (an
//! orphan): it is ignored on load and overwritten if the same version is registered again.
//! Every file is written whole ([`atomic_write`]: temporary file, fsync, rename, fsync of
//! the folder), so `kill -9` at any instant leaves the state of before or after a write,
//! never a mix.

use std::fs::{self, DirBuilder};
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::aead::{Aad, NONCE_LEN, Nonce};
use serde::{Deserialize, Serialize};
use shardseal_attestation::{Measurement, ModelId, ModelVersion, StageIndex};
use zeroize::Zeroize;

use crate::broker::error::BrokerError;
use crate::broker::policy::OwnerReleasePolicy;
use crate::error::Error;
use crate::keystore::{atomic_create, atomic_write};
use crate::manifest::{ModelManifest, SignedManifest};
use crate::seal::{ContextEncoder, RecipientPrivateKey, RecipientPublicKey};
use crate::secret::{MasterKey, SecretBytes, ShardKeys, fill_random};
use crate::shard::aes_256_gcm_key;
use crate::signing::{SigningKey, VerifyingKey};

const IDENTITY_KEY_FILE: &str = "identity.key";
const SEALING_KEY_FILE: &str = "sealing.key";
const MASTER_KEY_FILE: &str = "master.key";
/// The file holding the broker's identity public key (hex), for others to pin.
pub const BROKER_PUB_FILE: &str = "broker.pub";
const INDEX_FILE: &str = "index.json";
const MODELS_DIR: &str = "models";
const AUDIT_DIR: &str = "audit";

const INDEX_FORMAT: &str = "shardseal-broker-index/v1";
const VERSION_FORMAT: &str = "shardseal-broker-model-version/v1";
const AT_REST_DOMAIN: &str = "shardseal/v1/broker/at-rest";
const SHARD_KEYS_AT_REST: &str = "shard-keys";
const STAGE_KEYS_AT_REST: &str = "stage-keys";
const TAG_LEN: usize = 16;
const PRIVATE_FILE_MODE: u32 = 0o600;
const PRIVATE_DIR_MODE: u32 = 0o700;

/// The broker's long-lived keys.
pub(crate) struct Identity {
    /// Signs pipeline manifests, function tokens and audit checkpoints.
    pub(crate) signing: SigningKey,
    /// Owners seal shard keys to its public half.
    pub(crate) sealing: RecipientPrivateKey,
}

/// One registered model version, with its secrets open in memory.
pub(crate) struct VersionRecord {
    pub(crate) owner: VerifyingKey,
    pub(crate) registered_at_ms: u64,
    /// The owner-signed manifest file, byte for byte as registered.
    pub(crate) signed_manifest: Vec<u8>,
    pub(crate) manifest: ModelManifest,
    pub(crate) policy: OwnerReleasePolicy,
    pub(crate) shard_keys: ShardKeys,
    /// One per stage, in stage order.
    pub(crate) stage_keys: Vec<RecipientPrivateKey>,
}

impl VersionRecord {
    pub(crate) fn model(&self) -> &ModelId {
        &self.manifest.model_id
    }

    pub(crate) fn version(&self) -> ModelVersion {
        self.manifest.version
    }

    pub(crate) fn stage_count(&self) -> u32 {
        // A verified manifest has at most MAX_STAGES stages.
        u32::try_from(self.manifest.stages.len()).unwrap_or(u32::MAX)
    }

    pub(crate) fn stage_public_key(&self, stage: StageIndex) -> Option<RecipientPublicKey> {
        self.stage_keys
            .get(stage.0 as usize)
            .map(RecipientPrivateKey::public_key)
    }
}

/// What the index says about one model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IndexEntry {
    pub(crate) model_id: ModelId,
    pub(crate) owner_key: VerifyingKey,
    pub(crate) current: ModelVersion,
    pub(crate) versions: Vec<ModelVersion>,
    pub(crate) revoked: bool,
    pub(crate) revoked_measurements: Vec<Measurement>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IndexFile {
    format: String,
    models: Vec<IndexEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionFile {
    format: String,
    model_id: ModelId,
    version: ModelVersion,
    owner_key: VerifyingKey,
    registered_at_ms: u64,
    /// The owner-signed manifest file (base64).
    signed_manifest: String,
    release_policy: OwnerReleasePolicy,
    stage_public_keys: Vec<RecipientPublicKey>,
    /// `nonce ‖ AES-256-GCM(ShardKeys encoding) ‖ tag` under the master key (base64).
    sealed_shard_keys: String,
    /// `nonce ‖ AES-256-GCM(stage private keys, 32 bytes each) ‖ tag` (base64).
    sealed_stage_keys: String,
}

/// The state folder, opened.
pub(crate) struct StateDir {
    dir: PathBuf,
    master: MasterKey,
}

impl std::fmt::Debug for StateDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateDir")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn state_error(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BrokerError {
    let path = path.to_owned();
    move |source| BrokerError::State(Error::File { op, path, source })
}

fn corrupt(path: &Path, reason: impl Into<String>) -> BrokerError {
    BrokerError::StateCorrupt {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

impl StateDir {
    /// Opens the state folder, creating it (0700) and the broker's keys on first start.
    pub(crate) fn open(dir: &Path) -> Result<(Self, Identity), BrokerError> {
        create_private_dir_all(dir)?;
        // Created by someone else (e.g. a supervisor) with looser bits: the folder holds
        // keys, so only this user may enter it.
        fs::set_permissions(dir, fs::Permissions::from_mode(PRIVATE_DIR_MODE))
            .map_err(state_error("set permissions of", dir))?;
        create_private_dir_all(&dir.join(MODELS_DIR))?;

        let master_path = dir.join(MASTER_KEY_FILE);
        if !master_path.exists() && dir.join(INDEX_FILE).exists() {
            return Err(corrupt(
                &master_path,
                "missing while models are registered: their keys cannot be opened",
            ));
        }
        let master = load_or_create_key(&master_path, || {
            MasterKey::generate().map(|k| SecretBytes::from_slice(k.expose_secret()))
        })?;
        let master = MasterKey::from_slice(master.expose_secret())
            .map_err(|_| corrupt(&master_path, "not a 32-byte key"))?;

        let identity_path = dir.join(IDENTITY_KEY_FILE);
        let seed = load_or_create_key(&identity_path, || {
            SigningKey::generate().map(|k| SecretBytes::from_slice(k.expose_seed()))
        })?;
        let signing = SigningKey::from_seed(seed.expose_secret())
            .map_err(|_| corrupt(&identity_path, "not a 32-byte Ed25519 seed"))?;

        let sealing_path = dir.join(SEALING_KEY_FILE);
        let sealing = load_or_create_key(&sealing_path, || {
            RecipientPrivateKey::generate().map(|k| k.expose_secret())
        })?;
        let sealing = RecipientPrivateKey::from_bytes(sealing.expose_secret())
            .map_err(|_| corrupt(&sealing_path, "not a 32-byte X25519 key"))?;

        let public = format!("{}\n", signing.verifying_key().to_hex());
        atomic_write(&dir.join(BROKER_PUB_FILE), public.as_bytes(), 0o644)
            .map_err(BrokerError::State)?;
        Ok((
            Self {
                dir: dir.to_owned(),
                master,
            },
            Identity { signing, sealing },
        ))
    }

    /// The audit log folder.
    pub(crate) fn audit_dir(&self) -> PathBuf {
        self.dir.join(AUDIT_DIR)
    }

    fn version_path(&self, model: &ModelId, version: ModelVersion) -> PathBuf {
        self.dir
            .join(MODELS_DIR)
            .join(model.as_str())
            .join(format!("v{}.json", version.0))
    }

    /// Every model in the index, with its current version open.
    pub(crate) fn load(&self) -> Result<Vec<(IndexEntry, VersionRecord)>, BrokerError> {
        let index_path = self.dir.join(INDEX_FILE);
        let bytes = match fs::read(&index_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(state_error("read", &index_path)(e)),
        };
        let index: IndexFile =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(&index_path, e.to_string()))?;
        if index.format != INDEX_FORMAT {
            return Err(corrupt(&index_path, "unknown format"));
        }
        let mut loaded = Vec::with_capacity(index.models.len());
        for entry in index.models {
            if !entry.versions.contains(&entry.current) {
                return Err(corrupt(
                    &index_path,
                    format!("{}: current version unlisted", entry.model_id),
                ));
            }
            let record = self.read_version(&entry.model_id, entry.current, &entry.owner_key)?;
            loaded.push((entry, record));
        }
        Ok(loaded)
    }

    fn read_version(
        &self,
        model: &ModelId,
        version: ModelVersion,
        owner: &VerifyingKey,
    ) -> Result<VersionRecord, BrokerError> {
        let path = self.version_path(model, version);
        let bytes = fs::read(&path).map_err(state_error("read", &path))?;
        let file: VersionFile =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(&path, e.to_string()))?;
        if file.format != VERSION_FORMAT {
            return Err(corrupt(&path, "unknown format"));
        }
        if &file.model_id != model || file.version != version || &file.owner_key != owner {
            return Err(corrupt(
                &path,
                "names another model, version or owner than the index",
            ));
        }
        let signed_manifest = BASE64
            .decode(&file.signed_manifest)
            .map_err(|_| corrupt(&path, "signed manifest is not base64"))?;
        let manifest = SignedManifest::from_bytes(&signed_manifest)
            .and_then(|signed| signed.verify(owner))
            .map_err(|e| corrupt(&path, format!("signed manifest: {e}")))?;
        if &manifest.model_id != model || manifest.version != version {
            return Err(corrupt(&path, "the manifest names another model version"));
        }
        let stage_count = manifest.stages.len();
        file.release_policy
            .check(u32::try_from(stage_count).unwrap_or(u32::MAX))
            .map_err(|e| corrupt(&path, e.to_string()))?;

        let open = |what: &str, text: &str| {
            let sealed = BASE64
                .decode(text)
                .map_err(|_| corrupt(&path, format!("sealed {what} are not base64")))?;
            open_at_rest(&self.master, what, model, version, &sealed).ok_or_else(|| {
                corrupt(
                    &path,
                    format!("sealed {what} do not open under the master key"),
                )
            })
        };
        let shard_keys = ShardKeys::from_secret_bytes(
            open(SHARD_KEYS_AT_REST, &file.sealed_shard_keys)?.expose_secret(),
        )
        .map_err(|e| corrupt(&path, e.to_string()))?;
        if !shard_keys.stages().map(|s| s.0 as usize).eq(0..stage_count) {
            return Err(corrupt(&path, "not one shard key per stage"));
        }
        let stage_secrets = open(STAGE_KEYS_AT_REST, &file.sealed_stage_keys)?;
        if stage_secrets.len() != stage_count * 32 {
            return Err(corrupt(&path, "not one stage key per stage"));
        }
        let stage_keys = stage_secrets
            .expose_secret()
            .chunks_exact(32)
            .map(RecipientPrivateKey::from_bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| corrupt(&path, e.to_string()))?;
        let publics: Vec<_> = stage_keys
            .iter()
            .map(RecipientPrivateKey::public_key)
            .collect();
        if publics != file.stage_public_keys {
            return Err(corrupt(
                &path,
                "stage public keys do not match the private keys",
            ));
        }
        Ok(VersionRecord {
            owner: *owner,
            registered_at_ms: file.registered_at_ms,
            signed_manifest,
            manifest,
            policy: file.release_policy,
            shard_keys,
            stage_keys,
        })
    }

    /// Writes one model version's file (replacing an orphan left by a crash, if any).
    pub(crate) fn write_version(&self, record: &VersionRecord) -> Result<(), BrokerError> {
        let model = record.model();
        let version = record.version();
        let model_dir = self.dir.join(MODELS_DIR).join(model.as_str());
        if !model_dir.exists() {
            create_private_dir_all(&model_dir)?;
            sync_dir(&self.dir.join(MODELS_DIR))?;
        }
        let mut stage_secrets = SecretBytes::with_capacity(record.stage_keys.len() * 32);
        for key in &record.stage_keys {
            stage_secrets.extend_from_slice(key.expose_secret().expose_secret());
        }
        let file = VersionFile {
            format: VERSION_FORMAT.to_owned(),
            model_id: model.clone(),
            version,
            owner_key: record.owner,
            registered_at_ms: record.registered_at_ms,
            signed_manifest: BASE64.encode(&record.signed_manifest),
            release_policy: record.policy.clone(),
            stage_public_keys: record
                .stage_keys
                .iter()
                .map(RecipientPrivateKey::public_key)
                .collect(),
            sealed_shard_keys: BASE64.encode(seal_at_rest(
                &self.master,
                SHARD_KEYS_AT_REST,
                model,
                version,
                record.shard_keys.expose_secret().expose_secret(),
            )?),
            sealed_stage_keys: BASE64.encode(seal_at_rest(
                &self.master,
                STAGE_KEYS_AT_REST,
                model,
                version,
                stage_secrets.expose_secret(),
            )?),
        };
        let bytes = serde_json::to_vec_pretty(&file)
            .map_err(|e| corrupt(&self.version_path(model, version), e.to_string()))?;
        atomic_write(
            &self.version_path(model, version),
            &bytes,
            PRIVATE_FILE_MODE,
        )
        .map_err(BrokerError::State)
    }

    /// Replaces the index.
    pub(crate) fn write_index(&self, models: Vec<IndexEntry>) -> Result<(), BrokerError> {
        let path = self.dir.join(INDEX_FILE);
        let bytes = serde_json::to_vec_pretty(&IndexFile {
            format: INDEX_FORMAT.to_owned(),
            models,
        })
        .map_err(|e| corrupt(&path, e.to_string()))?;
        atomic_write(&path, &bytes, PRIVATE_FILE_MODE).map_err(BrokerError::State)
    }
}

fn at_rest_aad(what: &str, model: &ModelId, version: ModelVersion) -> Vec<u8> {
    ContextEncoder::new(AT_REST_DOMAIN)
        .text(what)
        .text(model.as_str())
        .u32(version.0)
        .finish()
}

fn seal_at_rest(
    master: &MasterKey,
    what: &str,
    model: &ModelId,
    version: ModelVersion,
    plaintext: &[u8],
) -> Result<Vec<u8>, BrokerError> {
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce).map_err(BrokerError::Crypto)?;
    let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = aes_256_gcm_key(master.expose_secret())
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(at_rest_aad(what, model, version)),
            &mut out[NONCE_LEN..],
        )
        // ring refuses only inputs of tens of GiB; these are a few KiB.
        .map_err(|_| {
            out.zeroize();
            BrokerError::Crypto(Error::SealFailed)
        })?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

fn open_at_rest(
    master: &MasterKey,
    what: &str,
    model: &ModelId,
    version: ModelVersion,
    sealed: &[u8],
) -> Option<SecretBytes> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return None;
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
    let mut plaintext = SecretBytes::from_slice(body);
    let len = aes_256_gcm_key(master.expose_secret())
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(at_rest_aad(what, model, version)),
            plaintext.expose_secret_mut(),
        )
        .ok()?
        .len();
    plaintext.truncate(len);
    Some(plaintext)
}

fn create_private_dir_all(path: &Path) -> Result<(), BrokerError> {
    DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(path)
        .map_err(state_error("create", path))
}

fn sync_dir(dir: &Path) -> Result<(), BrokerError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(state_error("sync", dir))
}

/// Reads a key file after checking that no other user can access it.
fn read_key_file(path: &Path) -> Result<SecretBytes, BrokerError> {
    let mode = fs::metadata(path)
        .map_err(state_error("read", path))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(BrokerError::State(Error::InsecurePermissions {
            path: path.to_owned(),
            mode: mode & 0o7777,
        }));
    }
    fs::read(path)
        .map(SecretBytes::new)
        .map_err(state_error("read", path))
}

/// Loads the key at `path`, or creates it with `generate` if there is none. Two brokers
/// racing on a fresh folder both end up with the file's key.
fn load_or_create_key(
    path: &Path,
    generate: impl FnOnce() -> Result<SecretBytes, Error>,
) -> Result<SecretBytes, BrokerError> {
    if path.exists() {
        return read_key_file(path);
    }
    let key = generate().map_err(BrokerError::Crypto)?;
    match atomic_create(path, key.expose_secret(), PRIVATE_FILE_MODE) {
        Ok(()) => Ok(key),
        Err(Error::File { source, .. }) if source.kind() == ErrorKind::AlreadyExists => {
            read_key_file(path)
        }
        Err(e) => Err(BrokerError::State(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_created_once_private_and_loaded_after() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("broker");
        let (_, first) = StateDir::open(&dir).unwrap();
        for name in [
            IDENTITY_KEY_FILE,
            SEALING_KEY_FILE,
            MASTER_KEY_FILE,
            INDEX_FILE,
        ] {
            if name == INDEX_FILE {
                assert!(!dir.join(name).exists());
                continue;
            }
            let mode = fs::metadata(dir.join(name)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{name}");
        }
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let (_, again) = StateDir::open(&dir).unwrap();
        assert_eq!(first.signing, again.signing);
        assert_eq!(first.sealing, again.sealing);
        assert_eq!(
            fs::read_to_string(dir.join(BROKER_PUB_FILE)).unwrap(),
            format!("{}\n", first.signing.verifying_key().to_hex())
        );
    }

    #[test]
    fn a_readable_key_file_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        StateDir::open(tmp.path()).unwrap();
        let path = tmp.path().join(SEALING_KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            StateDir::open(tmp.path()),
            Err(BrokerError::State(Error::InsecurePermissions {
                mode: 0o644,
                ..
            }))
        ));
    }

    #[test]
    fn sealed_secrets_open_only_for_their_own_name() {
        let master = MasterKey::generate().unwrap();
        let model = ModelId::new("m").unwrap();
        let sealed = seal_at_rest(
            &master,
            SHARD_KEYS_AT_REST,
            &model,
            ModelVersion(1),
            b"secret",
        )
        .unwrap();
        let opened = open_at_rest(
            &master,
            SHARD_KEYS_AT_REST,
            &model,
            ModelVersion(1),
            &sealed,
        );
        assert_eq!(opened.unwrap().expose_secret(), b"secret");
        for (what, id, version) in [
            (STAGE_KEYS_AT_REST, "m", 1),
            (SHARD_KEYS_AT_REST, "n", 1),
            (SHARD_KEYS_AT_REST, "m", 2),
        ] {
            let other = ModelId::new(id).unwrap();
            assert!(open_at_rest(&master, what, &other, ModelVersion(version), &sealed).is_none());
        }
        let other_master = MasterKey::generate().unwrap();
        assert!(
            open_at_rest(
                &other_master,
                SHARD_KEYS_AT_REST,
                &model,
                ModelVersion(1),
                &sealed
            )
            .is_none()
        );
        assert!(
            open_at_rest(
                &master,
                SHARD_KEYS_AT_REST,
                &model,
                ModelVersion(1),
                &sealed[..20]
            )
            .is_none()
        );
    }

    #[test]
    fn a_full_disk_or_read_only_state_folder_fails_the_write_cleanly() {
        use crate::keystore::failing_writes;
        use crate::signing::SigningKey;
        let tmp = tempfile::tempdir().unwrap();
        let (state, _) = StateDir::open(tmp.path()).unwrap();
        state.write_index(Vec::new()).unwrap();
        let before = fs::read(tmp.path().join(INDEX_FILE)).unwrap();
        let entry = IndexEntry {
            model_id: ModelId::new("m").unwrap(),
            owner_key: SigningKey::generate().unwrap().verifying_key(),
            current: ModelVersion(1),
            versions: vec![ModelVersion(1)],
            revoked: false,
            revoked_measurements: Vec::new(),
        };
        for (kind, problem) in [
            (ErrorKind::StorageFull, "its disk is full"),
            (
                ErrorKind::ReadOnlyFilesystem,
                "its file system is read-only",
            ),
        ] {
            failing_writes::set(Some(kind));
            let error = state.write_index(vec![entry.clone()]).unwrap_err();
            failing_writes::set(None);
            assert!(
                matches!(&error, BrokerError::State(Error::File { source, .. }) if source.kind() == kind),
                "{error:?}"
            );
            // What the owner reads: the problem, no path, no secret.
            let status = error.to_status();
            assert_eq!(status.code(), tonic::Code::Unavailable);
            assert_eq!(
                status.message(),
                format!(
                    "the broker cannot write its state folder: {problem}; nothing was acknowledged"
                )
            );
            // Nothing half-written: the index is the one of before, no temporary file is
            // left, and the folder still loads.
            assert_eq!(fs::read(tmp.path().join(INDEX_FILE)).unwrap(), before);
            let leftovers: Vec<_> = fs::read_dir(tmp.path())
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
                .collect();
            assert!(leftovers.is_empty(), "{leftovers:?}");
            assert!(state.load().unwrap().is_empty());
        }
        // Once the disk has room again, the same write goes through.
        state.write_index(vec![entry]).unwrap();
        assert_ne!(fs::read(tmp.path().join(INDEX_FILE)).unwrap(), before);
    }

    #[test]
    fn a_missing_master_key_with_registered_models_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (state, _) = StateDir::open(tmp.path()).unwrap();
        state.write_index(Vec::new()).unwrap();
        fs::remove_file(tmp.path().join(MASTER_KEY_FILE)).unwrap();
        assert!(matches!(
            StateDir::open(tmp.path()),
            Err(BrokerError::StateCorrupt { reason, .. }) if reason.starts_with("missing while")
        ));
    }
}
