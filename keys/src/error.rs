//! The one error type of the crate.
//!
//! Every variant is safe to show a remote peer: none carries key bytes or plaintext, only
//! ids, indices, lengths and fixed reasons. Attack-side failures are precise (a truncated
//! shard is not reported as a bit flip) so that callers and tests can tell them apart; the
//! broker maps integrity failures to `PERMISSION_DENIED` or `DATA_LOSS`, malformed input to
//! `INVALID_ARGUMENT`, and I/O to `INTERNAL`.

use std::path::PathBuf;

use shardseal_attestation::{ModelId, ModelVersion};

use crate::shard::ShardBinding;
use crate::signing::VerifyingKey;

/// Why a key, envelope, shard, manifest or key store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The operating system's random generator failed; nothing was sealed or generated.
    #[error("the system random generator failed")]
    Randomness,

    /// A key, signature or id has the wrong number of bytes.
    #[error("{what} must be {expected} bytes, got {actual}")]
    InvalidLength {
        /// What was being decoded.
        what: &'static str,
        /// The required length.
        expected: usize,
        /// The length given.
        actual: usize,
    },

    /// Text that should encode a key, signature or id does not (bad hex or base64).
    #[error("{0} is not correctly encoded")]
    InvalidEncoding(&'static str),

    // --- shards ---
    /// A shard chunk size outside [`MIN_CHUNK_SIZE`](crate::MIN_CHUNK_SIZE) to
    /// [`MAX_CHUNK_SIZE`](crate::MAX_CHUNK_SIZE), asked for by a caller or read from a header.
    #[error("chunk size {0} is out of range")]
    ChunkSizeOutOfRange(u64),

    /// The bytes do not start like a ShardSeal shard, or a header field is invalid.
    #[error("bad shard header: {0}")]
    ShardBadHeader(&'static str),

    /// The shard is of a format version this build does not read.
    #[error("unsupported shard format version {0}")]
    ShardUnsupportedVersion(u16),

    /// The shard's header binds it to another model, version or stage than the one expected.
    #[error("the shard is bound to {found}, expected {expected}")]
    ShardBindingMismatch {
        /// The binding the opener was told to expect.
        expected: ShardBinding,
        /// The binding written in the shard's header.
        found: ShardBinding,
    },

    /// The shard stream ended before its last chunk (or inside its header or a chunk).
    #[error("the shard is truncated: its last chunk never arrived")]
    ShardTruncated,

    /// A chunk carries another shard's nonce prefix: it was spliced in from another shard.
    #[error("chunk {chunk} belongs to another shard")]
    ShardChunkFromOtherShard {
        /// The position at which the foreign chunk arrived.
        chunk: u32,
    },

    /// A chunk arrived at the wrong position: reordered, duplicated or replayed.
    #[error("chunk {found} arrived where chunk {expected} was expected")]
    ShardChunkOutOfOrder {
        /// The position the stream is at.
        expected: u32,
        /// The position the chunk claims.
        found: u32,
    },

    /// A chunk's frame is inconsistent (bad flag byte, or a length the chunk size forbids).
    #[error("chunk {chunk} is malformed: {reason}")]
    ShardChunkMalformed {
        /// The chunk's position.
        chunk: u32,
        /// Which check failed.
        reason: &'static str,
    },

    /// A chunk failed authentication: its bytes, its header or its position were changed,
    /// or it was sealed under another key or binding.
    #[error("chunk {chunk} failed authentication")]
    ShardChunkAuthFailed {
        /// The chunk's position.
        chunk: u32,
    },

    /// Bytes follow the chunk marked last.
    #[error("data follows the shard's last chunk")]
    ShardTrailingData,

    /// The shard would need more than 2^32 chunks.
    #[error("the shard is too large for its chunk size")]
    ShardTooLarge,

    /// The opener already failed; a shard stream cannot be resumed after an error.
    #[error("the shard stream already failed")]
    ShardStreamFailed,

    // --- sealed envelopes ---
    /// A sealed envelope is structurally invalid (wrong `enc` length, too short).
    #[error("malformed sealed envelope: {0}")]
    SealedMalformed(&'static str),

    /// Sealing failed: the recipient public key is not a usable X25519 key.
    #[error("cannot seal to this recipient key")]
    SealFailed,

    /// The envelope does not open: wrong private key, a different context (deployment,
    /// request, hop, direction, broker nonce...), or tampered bytes. These are
    /// indistinguishable by design.
    #[error("the sealed envelope does not open with this key and context")]
    OpenFailed,

    // --- signatures and signed documents ---
    /// A signature does not verify over the signed bytes.
    #[error("the signature does not verify")]
    BadSignature,

    /// The document is signed by a key other than the one trusted for it.
    #[error("signed by {found}, expected {expected}")]
    WrongSigner {
        /// The trusted key.
        expected: VerifyingKey,
        /// The key the document names.
        found: VerifyingKey,
    },

    /// Bytes that should hold a signed document, manifest or key list do not parse.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// The parser's reason (never contains secret bytes).
        detail: String,
    },

    /// A manifest parsed but breaks a rule (stage order, sizes, names).
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),

    // --- key store ---
    /// `init` found an existing key store (or a non-empty directory); it never overwrites.
    #[error("{0} already holds files; refusing to overwrite a key store")]
    KeyStoreExists(PathBuf),

    /// The directory is not a key store (a key file is missing).
    #[error("{0} is not a key store")]
    NotAKeyStore(PathBuf),

    /// A key store file or directory is readable or writable by other users.
    #[error("{path} has mode {mode:o}; a key store must not be accessible to other users")]
    InsecurePermissions {
        /// The offending file or directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },

    /// A key store file fails authentication or has the wrong size.
    #[error("{path} is corrupt or was tampered with")]
    KeyStoreCorrupt {
        /// The file.
        path: PathBuf,
    },

    /// Shard keys of this model version are already stored; keys are never replaced,
    /// because shards sealed under the old keys would become unreadable.
    #[error("shard keys of {model} {version} already exist")]
    ShardKeysExist {
        /// The model.
        model: ModelId,
        /// The version.
        version: ModelVersion,
    },

    /// No shard keys are stored for this model version.
    #[error("no shard keys for {model} {version}")]
    ShardKeysMissing {
        /// The model.
        model: ModelId,
        /// The version.
        version: ModelVersion,
    },

    /// A file system operation on a key store or shard file failed.
    #[error("{op} {path}: {source}")]
    File {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },

    /// Reading or writing a shard stream failed.
    #[error("shard stream I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    pub(crate) fn file(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::File { op, path, source }
    }
}
