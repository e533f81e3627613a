//! The software TEE's platform signing key and its files.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

use crate::error::AttestationError;
use crate::evidence::{Evidence, Quote};

/// A software-TEE platform's Ed25519 public key: the root a verifier pins.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PlatformPublicKey([u8; 32]);

impl PlatformPublicKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Reads a `.pub` file (64 hex digits, surrounding whitespace ignored).
    pub fn read_file(path: &Path) -> Result<Self, AttestationError> {
        let text = fs::read_to_string(path).map_err(|e| {
            AttestationError::io(format!("reading public key {}", path.display()), e)
        })?;
        text.parse()
            .map_err(|_| AttestationError::KeyFileMalformed {
                path: path.to_owned(),
            })
    }
}

impl fmt::Display for PlatformPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PlatformPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PlatformPublicKey({})", hex::encode(self.0))
    }
}

/// Text that is not 64 hex digits where a platform public key was expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a platform public key is 64 hex digits (an Ed25519 public key)")]
pub struct InvalidPlatformPublicKey;

impl FromStr for PlatformPublicKey {
    type Err = InvalidPlatformPublicKey;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out).map_err(|_| InvalidPlatformPublicKey)?;
        Ok(Self(out))
    }
}

impl Serialize for PlatformPublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PlatformPublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Whether [`PlatformKey::load_or_create_file`] found a key or made one.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum KeyOrigin {
    /// An existing key file was loaded.
    Loaded,
    /// No key file existed; a new key was generated and written.
    Created,
}

/// The software TEE's platform signing key (an Ed25519 seed). It plays the part of the
/// key fused into a CPU: whoever holds it can sign any quote, so it lives only in the
/// quoting agent and in a 0600 file. `Debug` prints only the public half; the seed is wiped
/// when the key is dropped.
pub struct PlatformKey {
    seed: Zeroizing<[u8; 32]>,
    public: PlatformPublicKey,
}

/// The largest key file read, so a wrong path cannot make the agent read a huge file.
const MAX_KEY_FILE_LEN: u64 = 1024;

impl PlatformKey {
    /// Generates a new key from the system's random number generator.
    pub fn generate() -> Result<Self, AttestationError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(seed.as_mut())
            .map_err(|_| AttestationError::Randomness)?;
        Self::from_seed(seed)
    }

    fn from_seed(seed: Zeroizing<[u8; 32]>) -> Result<Self, AttestationError> {
        let public = {
            let pair = Self::key_pair(&seed)?;
            let mut bytes = [0u8; 32];
            bytes.copy_from_slice(pair.public_key().as_ref());
            PlatformPublicKey(bytes)
        };
        Ok(Self { seed, public })
    }

    // Expanded from the zeroized seed for each signature rather than kept: ring does not
    // wipe an `Ed25519KeyPair` on drop, so the only long-lived copy is the seed.
    fn key_pair(seed: &[u8; 32]) -> Result<Ed25519KeyPair, AttestationError> {
        Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|_| AttestationError::Malformed("platform key seed"))
    }

    /// The public key verifiers pin.
    pub fn public_key(&self) -> PlatformPublicKey {
        self.public
    }

    /// Signs a quote (over a domain-separated encoding) and packs it as evidence naming this
    /// platform.
    pub fn sign_quote(&self, quote: &Quote) -> Result<Evidence, AttestationError> {
        let quote_bytes = quote.to_bytes();
        let signature = Self::key_pair(&self.seed)?.sign(&Quote::signed_message(&quote_bytes));
        Ok(Evidence::new(
            quote.tee,
            quote_bytes.to_vec(),
            signature.as_ref().to_vec(),
            self.public.0.to_vec(),
        ))
    }

    /// Generates a key and writes it to `path` (mode 0600, created atomically: a temporary
    /// file is written and synced, then linked into place, so a crash never leaves a half
    /// key and an existing file is never replaced). The public key goes next to it, in
    /// [`public_key_path`]`(path)`.
    pub fn create_file(path: &Path) -> Result<Self, AttestationError> {
        let key = Self::generate()?;
        let text = Zeroizing::new(format!("{}\n", hex::encode(key.seed.as_ref())));
        write_new_file(path, text.as_bytes(), 0o600)?;
        key.write_public_key_file(path)?;
        Ok(key)
    }

    /// Loads a key file written by [`Self::create_file`]. The file must be private to its
    /// owner (no group or other permission bits), as ssh insists for its keys. The `.pub`
    /// file beside it is rewritten if it is missing or names another key.
    pub fn load_file(path: &Path) -> Result<Self, AttestationError> {
        let context = || format!("reading platform key {}", path.display());
        let mut file = fs::File::open(path).map_err(|e| AttestationError::io(context(), e))?;
        let metadata = file
            .metadata()
            .map_err(|e| AttestationError::io(context(), e))?;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(AttestationError::KeyFilePermissions {
                path: path.to_owned(),
                mode,
            });
        }
        if !metadata.is_file() || metadata.len() > MAX_KEY_FILE_LEN {
            return Err(AttestationError::KeyFileMalformed {
                path: path.to_owned(),
            });
        }
        let mut text = Zeroizing::new(Vec::new());
        file.read_to_end(&mut text)
            .map_err(|e| AttestationError::io(context(), e))?;
        let mut seed = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(text.trim_ascii(), seed.as_mut()).map_err(|_| {
            AttestationError::KeyFileMalformed {
                path: path.to_owned(),
            }
        })?;
        let key = Self::from_seed(seed)?;
        match PlatformPublicKey::read_file(&public_key_path(path)) {
            Ok(public) if public == key.public => {}
            _ => key.write_public_key_file(path)?,
        }
        Ok(key)
    }

    /// Loads the key at `path`, or creates it there if no file exists, and says which.
    pub fn load_or_create_file(path: &Path) -> Result<(Self, KeyOrigin), AttestationError> {
        match fs::symlink_metadata(path) {
            Ok(_) => Ok((Self::load_file(path)?, KeyOrigin::Loaded)),
            Err(e) if e.kind() == ErrorKind::NotFound => match Self::create_file(path) {
                Ok(key) => Ok((key, KeyOrigin::Created)),
                // Another process created it between our look and our create: use theirs.
                Err(AttestationError::KeyFileExists { .. }) => {
                    Ok((Self::load_file(path)?, KeyOrigin::Loaded))
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(AttestationError::io(
                format!("reading platform key {}", path.display()),
                e,
            )),
        }
    }

    fn write_public_key_file(&self, key_path: &Path) -> Result<(), AttestationError> {
        let pub_path = public_key_path(key_path);
        let text = format!("{}\n", self.public);
        let tmp = temp_path_beside(&pub_path)?;
        write_synced(&tmp, text.as_bytes(), 0o644)?;
        let renamed = fs::rename(&tmp, &pub_path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            AttestationError::io(format!("writing {}", pub_path.display()), e)
        });
        renamed?;
        sync_parent_dir(&pub_path)
    }
}

impl fmt::Debug for PlatformKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlatformKey")
            .field("public", &self.public)
            .field("seed", &"<redacted>")
            .finish()
    }
}

/// Where the public key of the key file at `key_path` is written: the same name with
/// `.pub` appended (`platform.key` → `platform.key.pub`).
pub fn public_key_path(key_path: &Path) -> PathBuf {
    let mut name = key_path.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

fn temp_path_beside(path: &Path) -> Result<PathBuf, AttestationError> {
    let mut suffix = [0u8; 8];
    SystemRandom::new()
        .fill(&mut suffix)
        .map_err(|_| AttestationError::Randomness)?;
    let name = path.file_name().ok_or(AttestationError::Malformed(
        "key file path has no file name",
    ))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", hex::encode(suffix)));
    Ok(path.with_file_name(tmp_name))
}

fn write_synced(path: &Path, contents: &[u8], mode: u32) -> Result<(), AttestationError> {
    let context = || format!("writing {}", path.display());
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| AttestationError::io(context(), e))?;
    let written = file
        .set_permissions(fs::Permissions::from_mode(mode))
        .and_then(|()| file.write_all(contents))
        .and_then(|()| file.sync_all());
    if let Err(e) = written {
        let _ = fs::remove_file(path);
        return Err(AttestationError::io(context(), e));
    }
    Ok(())
}

/// Writes `contents` to a new file at `path`, never replacing an existing one: `link(2)`
/// fails if the name exists, where `rename(2)` would silently overwrite.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), AttestationError> {
    if fs::symlink_metadata(path).is_ok() {
        return Err(AttestationError::KeyFileExists {
            path: path.to_owned(),
        });
    }
    let tmp = temp_path_beside(path)?;
    write_synced(&tmp, contents, mode)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => sync_parent_dir(path),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(AttestationError::KeyFileExists {
            path: path.to_owned(),
        }),
        Err(e) => Err(AttestationError::io(
            format!("writing {}", path.display()),
            e,
        )),
    }
}

fn sync_parent_dir(path: &Path) -> Result<(), AttestationError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| AttestationError::io(format!("syncing {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use ring::signature::{ED25519, UnparsedPublicKey};

    use super::*;
    use crate::evidence::{ReportData, TeeKind};
    use crate::ids::Measurement;

    #[test]
    fn debug_prints_no_key_bytes() {
        let key = PlatformKey::generate().unwrap();
        let debug = format!("{key:?}");
        assert!(debug.contains("<redacted>"));
        assert!(!debug.contains(&hex::encode(key.seed.as_ref())));
        assert!(debug.contains(&key.public_key().to_string()));
    }

    #[test]
    fn signs_the_domain_separated_quote() {
        let key = PlatformKey::generate().unwrap();
        let quote = Quote {
            tee: TeeKind::SoftwareTee,
            measurement: Measurement([5; 32]),
            report_data: ReportData([6; 64]),
        };
        let evidence = key.sign_quote(&quote).unwrap();
        assert_eq!(evidence.quote_bytes(), quote.to_bytes().as_slice());
        assert_eq!(evidence.signer(), key.public_key().as_bytes().as_slice());
        let public_key = key.public_key();
        let public = UnparsedPublicKey::new(&ED25519, public_key.as_bytes());
        public
            .verify(
                &Quote::signed_message(&quote.to_bytes()),
                evidence.signature(),
            )
            .unwrap();
        // The bare quote (without the domain) is not what was signed.
        assert!(
            public
                .verify(&quote.to_bytes(), evidence.signature())
                .is_err()
        );
    }

    #[test]
    fn key_files_are_private_reloadable_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("platform.key");
        let created = PlatformKey::create_file(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let pub_path = dir.path().join("platform.key.pub");
        assert_eq!(
            PlatformPublicKey::read_file(&pub_path).unwrap(),
            created.public_key()
        );

        let loaded = PlatformKey::load_file(&path).unwrap();
        assert_eq!(loaded.public_key(), created.public_key());
        assert!(matches!(
            PlatformKey::create_file(&path),
            Err(AttestationError::KeyFileExists { .. })
        ));
        assert_eq!(
            PlatformKey::load_file(&path).unwrap().public_key(),
            created.public_key()
        );
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn load_or_create_says_which() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let (first, origin) = PlatformKey::load_or_create_file(&path).unwrap();
        assert_eq!(origin, KeyOrigin::Created);
        let (second, origin) = PlatformKey::load_or_create_file(&path).unwrap();
        assert_eq!(origin, KeyOrigin::Loaded);
        assert_eq!(first.public_key(), second.public_key());
    }

    #[test]
    fn a_readable_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        PlatformKey::create_file(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            PlatformKey::load_file(&path),
            Err(AttestationError::KeyFilePermissions { mode: 0o640, .. })
        ));
    }

    #[test]
    fn a_garbled_key_file_is_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write_new_file(&path, b"not a key\n", 0o600).unwrap();
        assert!(matches!(
            PlatformKey::load_file(&path),
            Err(AttestationError::KeyFileMalformed { .. })
        ));
    }

    #[test]
    fn a_stale_public_key_file_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let key = PlatformKey::create_file(&path).unwrap();
        let pub_path = public_key_path(&path);
        fs::write(&pub_path, format!("{}\n", "00".repeat(32))).unwrap();
        PlatformKey::load_file(&path).unwrap();
        assert_eq!(
            PlatformPublicKey::read_file(&pub_path).unwrap(),
            key.public_key()
        );
    }

    #[test]
    fn public_keys_parse_and_print_as_hex() {
        let key: PlatformPublicKey = "ab".repeat(32).parse().unwrap();
        assert_eq!(key.to_string(), "ab".repeat(32));
        assert_eq!(key.as_bytes(), &[0xab; 32]);
        assert!("abc".parse::<PlatformPublicKey>().is_err());
        assert_eq!(
            serde_json::to_string(&key).unwrap(),
            format!("\"{}\"", "ab".repeat(32))
        );
    }
}
