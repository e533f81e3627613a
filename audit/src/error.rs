//! The crate's one error type, and the typed answer verification gives when a log was tampered
//! with.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Everything that can go wrong while writing, reading or verifying an audit log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing `path` failed.
    #[error("cannot read or write {}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },

    /// The log does not verify: `at` is the first bad entry and `kind` says what is wrong.
    #[error("{at}: {kind}")]
    Tampered {
        /// The first entry at which the log stops being consistent.
        at: EntryLocation,
        /// What is wrong there.
        kind: TamperKind,
    },

    /// The checkpoint file given to verification is not a genuine checkpoint of this log's
    /// writer (malformed, signature invalid, or signed by another key).
    #[error("checkpoint {}: {kind}", path.display())]
    CheckpointRejected {
        /// The checkpoint file.
        path: PathBuf,
        /// Why it was rejected.
        kind: TamperKind,
    },

    /// A path named as a log holds no audit log file.
    #[error("{}: no audit log here (expected a log file or a directory of audit-NNNNNN.log files)", path.display())]
    NoLogFiles {
        /// The path that was given.
        path: PathBuf,
    },

    /// The log directory was started by another writer key; a writer appends only to its own
    /// chain (start a new directory to change the key).
    #[error("the log was started by writer key {log_writer}, not by this writer's key {signer}")]
    SignerMismatch {
        /// The writer key named by the log's genesis entry (hex).
        log_writer: String,
        /// The key the writer was opened with (hex).
        signer: String,
    },

    /// Another writer (in this or another process) has the log directory open: two writers
    /// would fork the chain.
    #[error("{}: the audit log is already open for writing elsewhere", dir.display())]
    LogInUse {
        /// The log directory.
        dir: PathBuf,
    },

    /// An earlier write or fsync failed, so the file's tail is in an unknown state; the writer
    /// refuses further appends until it is reopened (which recovers the file).
    #[error("the audit writer failed earlier and must be reopened before it appends again")]
    WriterBroken,

    /// A public key, signature or hash given as text is not what it should be.
    #[error("invalid {what}: {reason}")]
    InvalidField {
        /// What was being parsed (for example "public key").
        what: &'static str,
        /// Why it was refused.
        reason: String,
    },

    /// A 32-byte Ed25519 seed was refused by the signature library.
    #[error("invalid Ed25519 signing seed")]
    InvalidSeed,

    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Random,

    /// An event could not be serialised (this is a bug in the event type, not in the input).
    #[error("cannot encode an audit entry")]
    Encode(#[source] serde_json::Error),
}

impl Error {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidField {
            what,
            reason: reason.into(),
        }
    }
}

/// Where an entry is: its file, its line in that file (from 1) and its position in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryLocation {
    /// The log file holding the entry.
    pub file: PathBuf,
    /// The line in that file, counted from 1.
    pub line: u64,
    /// The entry's position in the chain: the `seq` that a genuine entry at this place carries.
    pub seq: u64,
}

impl fmt::Display for EntryLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} line {} (entry #{})",
            self.file.display(),
            self.line,
            self.seq
        )
    }
}

/// What is wrong with the first bad entry of a log, or with a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TamperKind {
    /// The line is not a well-formed audit record (the text says why).
    Malformed(String),
    /// The entry's bytes do not hash to its `hash`: the entry was edited.
    HashMismatch,
    /// The entry carries the wrong sequence number for its place: entries before it were
    /// deleted, or it was moved, duplicated or inserted.
    OutOfSequence {
        /// The sequence number a genuine entry carries here.
        expected: u64,
        /// The sequence number found.
        found: u64,
    },
    /// The entry's `prev` is not the hash of the entry before it: an entry was replaced or
    /// spliced in.
    BrokenLink,
    /// The chain does not begin with its genesis entry (#0): the first file is missing, or the
    /// start of the log was cut or rewritten.
    MissingGenesis,
    /// A checkpoint's signature does not verify: its count or head was altered, or it was
    /// forged.
    BadSignature,
    /// A checkpoint or genesis names a key other than the log's writer key (or other than the
    /// key pinned with `--key`).
    UnknownSigner {
        /// The key found (hex).
        found: String,
    },
    /// A correctly signed checkpoint does not match the chain: the entries it covers were
    /// rewritten.
    CheckpointMismatch,
    /// The log has fewer entries than a checkpoint kept elsewhere covers: its tail was cut.
    Truncated {
        /// The number of entries the checkpoint covers.
        checkpoint_count: u64,
        /// The number of entries in the log.
        log_count: u64,
    },
}

impl fmt::Display for TamperKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(why) => write!(f, "malformed entry: {why}"),
            Self::HashMismatch => f.write_str("hash mismatch: the entry was edited"),
            Self::OutOfSequence { expected, found } => write!(
                f,
                "out of sequence: expected entry #{expected}, found #{found} \
                 (entries were deleted, moved or inserted)"
            ),
            Self::BrokenLink => f.write_str(
                "broken link: prev is not the hash of the entry before (an entry was replaced \
                 or inserted)",
            ),
            Self::MissingGenesis => f.write_str(
                "the chain does not start with its genesis entry #0 (the first file is missing \
                 or the start of the log was cut)",
            ),
            Self::BadSignature => {
                f.write_str("checkpoint signature does not verify (altered or forged checkpoint)")
            }
            Self::UnknownSigner { found } => {
                write!(
                    f,
                    "key {found} is not the trusted writer key (the key the verifier pinned, \
                     or else the one the log's genesis entry names)"
                )
            }
            Self::CheckpointMismatch => f.write_str(
                "a signed checkpoint does not match the chain: the entries it covers were rewritten",
            ),
            Self::Truncated {
                checkpoint_count,
                log_count,
            } => write!(
                f,
                "truncated: the checkpoint covers {checkpoint_count} entries but the log has \
                 only {log_count}"
            ),
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
