//! Signed checkpoints: the writer's signature over "the chain has `count` entries and its last
//! entry hashes to `head`", and the signer seam that makes them.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::Path;

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::error::{Error, Result, TamperKind};

/// Domain separation for checkpoint signatures: a checkpoint signature can never be mistaken
/// for a signature the same identity key makes for another purpose.
const CHECKPOINT_DOMAIN: &[u8] = b"shardseal-audit/checkpoint/v1\0";

/// The format tag of a checkpoint file.
const CHECKPOINT_FILE_FORMAT: &str = "shardseal-audit-checkpoint/v1";

/// Signs checkpoints with the writer's identity key (Ed25519).
///
/// This is the seam to the key store: the broker or coordinator implements it over its identity
/// key; [`Ed25519Signer`] is the ring-backed implementation over a seed.
pub trait CheckpointSigner: Send {
    /// Signs `message` (a checkpoint message, already domain-separated) with Ed25519.
    fn sign(&self, message: &[u8]) -> [u8; 64];
    /// The Ed25519 public key that verifies this signer's signatures.
    fn public_key(&self) -> [u8; 32];
}

/// A 32-byte Ed25519 private seed: redacted in `Debug`, wiped on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct SigningSeed([u8; 32]);

impl SigningSeed {
    /// Wraps seed bytes (the caller should wipe its own copy).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A fresh seed from the operating system's random number generator.
    pub fn generate() -> Result<Self> {
        use ring::rand::SecureRandom;
        let mut seed = Self([0; 32]);
        ring::rand::SystemRandom::new()
            .fill(&mut seed.0)
            .map_err(|_| Error::Random)?;
        Ok(seed)
    }
}

impl fmt::Debug for SigningSeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSeed(<redacted>)")
    }
}

/// The ring-backed [`CheckpointSigner`].
///
/// ring keeps the expanded private key inside its own `Ed25519KeyPair`, which it does not wipe
/// on drop; the seed this signer is made from is wiped by [`SigningSeed`].
pub struct Ed25519Signer {
    pair: Ed25519KeyPair,
}

impl Ed25519Signer {
    /// A signer for the key pair derived from `seed`.
    pub fn from_seed(seed: &SigningSeed) -> Result<Self> {
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed.0).map_err(|_| Error::InvalidSeed)?;
        Ok(Self { pair })
    }
}

impl fmt::Debug for Ed25519Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ed25519Signer(public {})", PublicKey(self.public_key()))
    }
}

impl CheckpointSigner for Ed25519Signer {
    fn sign(&self, message: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        out.copy_from_slice(self.pair.sign(message).as_ref());
        out
    }

    fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }
}

/// An Ed25519 public key: the audit log writer's identity.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PublicKey(#[serde(with = "hex_array")] pub [u8; 32]);

impl PublicKey {
    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Result<Self> {
        hex_array::decode(text.trim())
            .map(Self)
            .map_err(|why| Error::invalid("public key", why))
    }

    /// Whether `signature` is this key's Ed25519 signature of `message`.
    pub fn verifies(&self, message: &[u8], signature: &Signature) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(message, &signature.0)
            .is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// An Ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature(#[serde(with = "hex_array")] pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({})", hex::encode(self.0))
    }
}

/// The SHA-256 hash of a log entry (see the crate doc for exactly what is hashed).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EntryHash(#[serde(with = "hex_array")] pub [u8; 32]);

impl EntryHash {
    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Result<Self> {
        hex_array::decode(text.trim())
            .map(Self)
            .map_err(|why| Error::invalid("entry hash", why))
    }
}

impl fmt::Display for EntryHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for EntryHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EntryHash({self})")
    }
}

/// A signed statement by the log's writer: "the chain has `count` entries (seq `0..count`) and
/// entry `count - 1` hashes to `head`".
///
/// Checkpoints are written into the log as entries of their own, and can be exported to a file
/// an operator keeps elsewhere ([`crate::AuditWriter::checkpoint_to`]); verification against
/// such a file detects a cut tail, which the log alone cannot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// How many entries the checkpoint covers.
    pub count: u64,
    /// The hash of the last covered entry (`seq == count - 1`).
    pub head: EntryHash,
    /// The writer key that signed it.
    pub signer: PublicKey,
    /// Ed25519 over [`Checkpoint::message`].
    pub signature: Signature,
}

/// The on-disk shape of a checkpoint file: the checkpoint plus a format tag.
#[derive(Serialize, Deserialize)]
struct CheckpointFile {
    format: String,
    #[serde(flatten)]
    checkpoint: Checkpoint,
}

impl Checkpoint {
    /// The exact bytes signed: `"shardseal-audit/checkpoint/v1\0" || count (u64 big-endian) ||
    /// head (32 bytes)`.
    pub fn message(count: u64, head: &EntryHash) -> Vec<u8> {
        let mut message = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 8 + 32);
        message.extend_from_slice(CHECKPOINT_DOMAIN);
        message.extend_from_slice(&count.to_be_bytes());
        message.extend_from_slice(&head.0);
        message
    }

    /// Signs "`count` entries ending in `head`" with `signer`.
    pub fn sign(count: u64, head: EntryHash, signer: &dyn CheckpointSigner) -> Self {
        let signature = Signature(signer.sign(&Self::message(count, &head)));
        Self {
            count,
            head,
            signer: PublicKey(signer.public_key()),
            signature,
        }
    }

    /// Whether the signature verifies under the key the checkpoint names. (Whether that key is
    /// the right one is for the caller: see [`crate::verify`].)
    pub fn signature_is_valid(&self) -> bool {
        self.signer
            .verifies(&Self::message(self.count, &self.head), &self.signature)
    }

    /// Reads a checkpoint file. The signature is not checked here.
    pub fn read_from(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let rejected = |why: String| Error::CheckpointRejected {
            path: path.to_path_buf(),
            kind: TamperKind::Malformed(why),
        };
        let file: CheckpointFile =
            serde_json::from_str(&text).map_err(|e| rejected(e.to_string()))?;
        if file.format != CHECKPOINT_FILE_FORMAT {
            return Err(rejected(format!(
                "format {:?}, expected {CHECKPOINT_FILE_FORMAT:?}",
                file.format
            )));
        }
        if file.checkpoint.count == 0 {
            return Err(rejected(
                "a checkpoint covers at least the genesis entry".into(),
            ));
        }
        Ok(file.checkpoint)
    }

    /// Writes the checkpoint to `path` durably and atomically: a temporary file beside it is
    /// written and fsynced, then renamed over `path`, then the directory is fsynced.
    pub fn write_to(&self, path: &Path) -> Result<()> {
        let file = CheckpointFile {
            format: CHECKPOINT_FILE_FORMAT.to_owned(),
            checkpoint: self.clone(),
        };
        let mut text = serde_json::to_string_pretty(&file).map_err(Error::Encode)?;
        text.push('\n');
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(".tmp");
        let temporary = Path::new(&temporary);
        let mut out = fs::File::create(temporary).map_err(|e| Error::io(temporary, e))?;
        out.write_all(text.as_bytes())
            .and_then(|()| out.sync_all())
            .map_err(|e| Error::io(temporary, e))?;
        fs::rename(temporary, path).map_err(|e| Error::io(path, e))?;
        crate::writer::sync_parent_dir(path)
    }
}

/// Fixed-size byte arrays as lower-case hex strings in serde.
pub(crate) mod hex_array {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer, const N: usize>(
        bytes: &[u8; N],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&hex::encode(bytes))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        deserializer: D,
    ) -> Result<[u8; N], D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        decode(&text).map_err(serde::de::Error::custom)
    }

    /// Exactly `2 * N` lower-case hex digits: upper case is refused so that every value has one
    /// spelling (a hash or key written two ways would let an edit go unnoticed).
    pub(crate) fn decode<const N: usize>(text: &str) -> Result<[u8; N], String> {
        if text.len() != 2 * N || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(format!("expected {} lower-case hex digits", 2 * N));
        }
        let mut out = [0u8; N];
        hex::decode_to_slice(text, &mut out).map_err(|e| e.to_string())?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(byte: u8) -> Ed25519Signer {
        Ed25519Signer::from_seed(&SigningSeed::from_bytes([byte; 32])).unwrap()
    }

    #[test]
    fn checkpoint_signature_binds_count_and_head() {
        let good = Checkpoint::sign(7, EntryHash([1; 32]), &signer(3));
        assert!(good.signature_is_valid());
        let mut altered = good.clone();
        altered.count = 6;
        assert!(!altered.signature_is_valid());
        let mut altered = good.clone();
        altered.head = EntryHash([2; 32]);
        assert!(!altered.signature_is_valid());
        let mut altered = good;
        altered.signer = PublicKey(signer(4).public_key());
        assert!(!altered.signature_is_valid());
    }

    #[test]
    fn checkpoint_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("head.json");
        let checkpoint = Checkpoint::sign(42, EntryHash([9; 32]), &signer(1));
        checkpoint.write_to(&path).unwrap();
        assert_eq!(Checkpoint::read_from(&path).unwrap(), checkpoint);
    }

    #[test]
    fn seed_debug_is_redacted() {
        assert_eq!(
            format!("{:?}", SigningSeed::from_bytes([0x41; 32])),
            "SigningSeed(<redacted>)"
        );
    }

    #[test]
    fn hex_refuses_upper_case_and_wrong_length() {
        assert!(PublicKey::from_hex(&"ab".repeat(32)).is_ok());
        assert!(PublicKey::from_hex(&"AB".repeat(32)).is_err());
        assert!(PublicKey::from_hex(&"ab".repeat(31)).is_err());
    }
}
