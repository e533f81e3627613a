//! The model owner's key store: a directory only its owner can read.
//!
//! ```text
//! <dir>/                         0700
//!   signing.key                  0600  Ed25519 seed (32 bytes): signs manifests and requests
//!   master.key                   0600  AES-256 key (32 bytes): seals the shard keys below
//!   shard-keys/                  0700
//!     <model id>/                0700
//!       v<version>.keys          0600  nonce [12] ‖ AES-256-GCM(ShardKeys) ‖ tag [16]
//! ```
//!
//! Each shard-key file is sealed under the master key with an AAD naming the model and
//! version, so a file copied to another model's or version's name does not open. Files are
//! written atomically ([`atomic_write`], [`atomic_create`]): a crash leaves the old file or
//! the new one, never half of one. Nothing is ever overwritten: `init` refuses an existing
//! store and `put_shard_keys` an existing version, since lost keys make shards unreadable.
//! `open` refuses a store that other users can read.
//!
//! The master key sits next to what it protects, so it guards against a shard-key file
//! leaking alone (a backup, a copy to the broker host), not against someone who reads the
//! whole directory: that is what the directory's permissions are for.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::aead::{Aad, NONCE_LEN, Nonce};
use shardseal_attestation::{ModelId, ModelVersion};

use crate::error::Error;
use crate::seal::ContextEncoder;
use crate::secret::{MasterKey, SecretBytes, ShardKeys, fill_random};
use crate::shard::aes_256_gcm_key;
use crate::signing::{SigningKey, VerifyingKey};

/// Permission bits of every file in a key store.
pub const KEY_FILE_MODE: u32 = 0o600;
/// Permission bits of every directory in a key store.
pub const KEY_DIR_MODE: u32 = 0o700;

const SIGNING_KEY_FILE: &str = "signing.key";
const MASTER_KEY_FILE: &str = "master.key";
const SHARD_KEYS_DIR: &str = "shard-keys";
const SHARD_KEYS_DOMAIN: &str = "shardseal/v1/keystore/shard-keys";
const TAG_LEN: usize = 16;

/// The model owner's keys: a signing key and the shard keys of every provisioned version.
#[derive(Debug)]
pub struct OwnerKeyStore {
    dir: PathBuf,
    signing: SigningKey,
    master: MasterKey,
}

impl OwnerKeyStore {
    /// Creates a key store in `dir` (created 0700 if missing; an existing directory must be
    /// empty) with a fresh signing key and master key. Never overwrites anything.
    pub fn init(dir: &Path) -> Result<Self, Error> {
        match fs::read_dir(dir) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(Error::KeyStoreExists(dir.to_owned()));
                }
                fs::set_permissions(dir, fs::Permissions::from_mode(KEY_DIR_MODE))
                    .map_err(Error::file("set permissions of", dir))?;
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                    fs::create_dir_all(parent).map_err(Error::file("create", parent))?;
                }
                create_private_dir(dir)?;
            }
            Err(e) => return Err(Error::file("read", dir)(e)),
        }
        let signing = SigningKey::generate()?;
        let master = MasterKey::generate()?;
        for (name, bytes) in [
            (SIGNING_KEY_FILE, signing.expose_seed()),
            (MASTER_KEY_FILE, master.expose_secret()),
        ] {
            atomic_create(&dir.join(name), bytes, KEY_FILE_MODE).map_err(|e| match e {
                Error::File { source, .. } if source.kind() == ErrorKind::AlreadyExists => {
                    Error::KeyStoreExists(dir.to_owned())
                }
                other => other,
            })?;
        }
        create_private_dir(&dir.join(SHARD_KEYS_DIR))?;
        Ok(Self {
            dir: dir.to_owned(),
            signing,
            master,
        })
    }

    /// Opens the key store in `dir`. Refuses one whose directory or key files other users
    /// can access.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let signing_path = dir.join(SIGNING_KEY_FILE);
        let master_path = dir.join(MASTER_KEY_FILE);
        if !signing_path.exists() || !master_path.exists() {
            return Err(Error::NotAKeyStore(dir.to_owned()));
        }
        check_private(dir)?;
        let seed = read_private(&signing_path)?;
        let signing = SigningKey::from_seed(seed.expose_secret())
            .map_err(|_| Error::KeyStoreCorrupt { path: signing_path })?;
        let master = read_private(&master_path)?;
        let master = MasterKey::from_slice(master.expose_secret())
            .map_err(|_| Error::KeyStoreCorrupt { path: master_path })?;
        Ok(Self {
            dir: dir.to_owned(),
            signing,
            master,
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The owner's signing key.
    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    /// The owner's public key, as the broker pins it.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    fn shard_keys_path(&self, model: &ModelId, version: ModelVersion) -> PathBuf {
        self.dir
            .join(SHARD_KEYS_DIR)
            .join(model.as_str())
            .join(format!("v{}.keys", version.0))
    }

    /// Stores the shard keys of a model version, sealed under the master key. Refuses if
    /// that version already has keys.
    pub fn put_shard_keys(
        &self,
        model: &ModelId,
        version: ModelVersion,
        keys: &ShardKeys,
    ) -> Result<(), Error> {
        let path = self.shard_keys_path(model, version);
        let exists = || Error::ShardKeysExist {
            model: model.clone(),
            version,
        };
        if path.exists() {
            return Err(exists());
        }
        let model_dir = self.dir.join(SHARD_KEYS_DIR).join(model.as_str());
        match create_private_dir(&model_dir) {
            Err(Error::File { source, .. }) if source.kind() == ErrorKind::AlreadyExists => {}
            other => other?,
        }

        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce)?;
        let plaintext = keys.expose_secret();
        let mut file = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        file.extend_from_slice(&nonce);
        let start = file.len();
        file.extend_from_slice(plaintext.expose_secret());
        let tag = aes_256_gcm_key(self.master.expose_secret())
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(shard_keys_aad(model, version)),
                &mut file[start..],
            )
            // ring refuses only inputs of tens of GiB.
            .map_err(|_| Error::ShardTooLarge)?;
        file.extend_from_slice(tag.as_ref());
        atomic_create(&path, &file, KEY_FILE_MODE).map_err(|e| match e {
            Error::File { source, .. } if source.kind() == ErrorKind::AlreadyExists => exists(),
            other => other,
        })
    }

    /// The shard keys of a model version.
    pub fn shard_keys(&self, model: &ModelId, version: ModelVersion) -> Result<ShardKeys, Error> {
        let path = self.shard_keys_path(model, version);
        if !path.exists() {
            return Err(Error::ShardKeysMissing {
                model: model.clone(),
                version,
            });
        }
        let mut sealed = read_private(&path)?;
        let corrupt = || Error::KeyStoreCorrupt { path: path.clone() };
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(corrupt());
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed.expose_secret()[..NONCE_LEN]);
        let len = aes_256_gcm_key(self.master.expose_secret())
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(shard_keys_aad(model, version)),
                &mut sealed.expose_secret_mut()[NONCE_LEN..],
            )
            .map_err(|_| corrupt())?
            .len();
        ShardKeys::from_secret_bytes(&sealed.expose_secret()[NONCE_LEN..NONCE_LEN + len])
            .map_err(|_| corrupt())
    }
}

fn shard_keys_aad(model: &ModelId, version: ModelVersion) -> Vec<u8> {
    ContextEncoder::new(SHARD_KEYS_DOMAIN)
        .text(model.as_str())
        .u32(version.0)
        .finish()
}

fn create_private_dir(path: &Path) -> Result<(), Error> {
    DirBuilder::new()
        .mode(KEY_DIR_MODE)
        .create(path)
        .map_err(Error::file("create", path))?;
    // The umask may have cleared bits; set exactly 0700.
    fs::set_permissions(path, fs::Permissions::from_mode(KEY_DIR_MODE))
        .map_err(Error::file("set permissions of", path))
}

fn check_private(path: &Path) -> Result<(), Error> {
    let mode = fs::metadata(path)
        .map_err(Error::file("read", path))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(Error::InsecurePermissions {
            path: path.to_owned(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// Reads a key file into a secret buffer after checking no other user can access it.
fn read_private(path: &Path) -> Result<SecretBytes, Error> {
    check_private(path)?;
    fs::read(path)
        .map(SecretBytes::new)
        .map_err(Error::file("read", path))
}

fn temp_path_beside(path: &Path) -> Result<(PathBuf, PathBuf), Error> {
    let name = path.file_name().ok_or_else(|| {
        Error::file("write", path)(std::io::Error::new(
            ErrorKind::InvalidInput,
            "not a file path",
        ))
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut suffix = [0u8; 8];
    fill_random(&mut suffix)?;
    let temp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        hex::encode(suffix)
    ));
    Ok((dir, temp))
}

/// Writes `bytes` to a new temporary file beside `path` with permission bits `mode`, and
/// syncs it. The caller then moves it into place.
fn write_temp(temp: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(temp)?;
        // The umask may have cleared bits of `mode`; set exactly what was asked.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        #[cfg(test)]
        if let Some(kind) = failing_writes::injected() {
            // What a full disk does: part of the data lands, then the write fails.
            file.write_all(&bytes[..bytes.len() / 2])?;
            return Err(kind.into());
        }
        file.write_all(bytes)?;
        file.sync_all()
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(temp);
        Error::file("write", temp)(e)
    })
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::file("sync", dir))
}

/// Replaces `path` with `bytes` atomically: writes a temporary file in the same directory
/// with permission bits `mode`, fsyncs it, renames it over `path` and fsyncs the directory.
/// Readers see the old contents or the new, never a mix; a crash leaves at worst a
/// `.<name>.tmp-*` file behind.
pub fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let (dir, temp) = temp_path_beside(path)?;
    write_temp(&temp, bytes, mode)?;
    if let Err(e) = fs::rename(&temp, path) {
        let _ = fs::remove_file(&temp);
        return Err(Error::file("rename into", path)(e));
    }
    sync_dir(&dir)
}

/// Like [`atomic_write`], but fails with an [`ErrorKind::AlreadyExists`] file error instead
/// of replacing an existing `path` (the temporary file is hard-linked into place, which the
/// file system refuses atomically if the name is taken).
pub fn atomic_create(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let (dir, temp) = temp_path_beside(path)?;
    write_temp(&temp, bytes, mode)?;
    let linked = fs::hard_link(&temp, path);
    let _ = fs::remove_file(&temp);
    linked.map_err(Error::file("create", path))?;
    sync_dir(&dir)
}

/// A test seam: makes [`atomic_write`] and [`atomic_create`] on this thread fail as a full
/// disk or a read-only file system would, halfway through writing the temporary file.
#[cfg(test)]
pub(crate) mod failing_writes {
    use std::cell::Cell;
    use std::io::ErrorKind;

    thread_local! {
        static FAIL_WITH: Cell<Option<ErrorKind>> = const { Cell::new(None) };
    }

    /// From now on (until `None`), writes on this thread fail with `kind`.
    pub(crate) fn set(kind: Option<ErrorKind>) {
        FAIL_WITH.with(|f| f.set(kind));
    }

    pub(super) fn injected() -> Option<ErrorKind> {
        FAIL_WITH.with(Cell::get)
    }
}

#[cfg(test)]
mod tests;
