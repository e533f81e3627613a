//! The one error type of the crate. Every variant is safe to show a remote peer: none
//! carries a key, and the reasons are precise enough for the broker to map each to a
//! gRPC status (refusals to `PERMISSION_DENIED`, bad input to `INVALID_ARGUMENT`, capacity
//! to `RESOURCE_EXHAUSTED`, the rest to `UNAVAILABLE` or `INTERNAL`).

use std::path::PathBuf;

use crate::evidence::TeeKind;
use crate::ids::{Measurement, ModelId, StageIndex};

/// Why evidence, a nonce, a key file or the quoting agent was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestationError {
    /// The bytes are not a well-formed encoding (evidence, quote, agent frame); the text says
    /// which part.
    #[error("malformed {0}")]
    Malformed(&'static str),

    /// The quote's signature does not verify under the platform key the evidence names.
    #[error("the quote's signature does not verify")]
    BadSignature,

    /// The evidence is signed by a platform key that is not one of the pinned roots.
    #[error("the evidence is signed by a platform that is not trusted")]
    UntrustedPlatform,

    /// This verifier does not handle evidence of this TEE kind.
    #[error("this verifier does not accept {tee} evidence")]
    UnsupportedTee {
        /// The kind the evidence claims.
        tee: TeeKind,
    },

    /// The verifier for this hardware TEE is not part of this build.
    #[error("the {tee} verifier is not built into this binary")]
    BackendNotBuilt {
        /// The hardware kind the evidence claims.
        tee: TeeKind,
    },

    /// The measured code is not on the release policy's list for this model and stage.
    #[error("measurement {measurement} is not allowed for model {model} {stage}")]
    MeasurementNotAllowed {
        /// What the TEE measured.
        measurement: Measurement,
        /// The model the caller asked keys for.
        model: ModelId,
        /// The stage the caller asked keys for.
        stage: StageIndex,
    },

    /// The measured code has been revoked (it overrides any allow list).
    #[error("measurement {measurement} has been revoked")]
    MeasurementRevoked {
        /// The revoked measurement.
        measurement: Measurement,
    },

    /// The quote's report data does not bind the expected ephemeral key and nonce.
    #[error("the quote's report data does not bind the expected key and nonce")]
    ReportDataMismatch,

    /// The nonce was never issued here (or was forgotten long after it expired).
    #[error("unknown nonce")]
    NonceUnknown,

    /// The nonce was already used once.
    #[error("nonce already used")]
    NonceReused,

    /// The nonce outlived its lifetime before it was used.
    #[error("nonce expired")]
    NonceExpired,

    /// Too many nonces are outstanding; the caller should retry later.
    #[error("too many outstanding nonces (limit {limit})")]
    TooManyOutstandingNonces {
        /// The registry's cap.
        limit: usize,
    },

    /// The system's random number generator failed.
    #[error("the system random number generator failed")]
    Randomness,

    /// A key file already exists where a new key was to be created.
    #[error("{} already exists; refusing to overwrite a platform key", path.display())]
    KeyFileExists {
        /// The existing file.
        path: PathBuf,
    },

    /// A key file is readable or writable by users other than its owner.
    #[error("{} has mode {mode:o}; a platform key file must be 0600", path.display())]
    KeyFilePermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },

    /// A key or public key file does not hold a key in the expected format.
    #[error("{} does not hold a key (expected 64 hex digits)", path.display())]
    KeyFileMalformed {
        /// The file.
        path: PathBuf,
    },

    /// An I/O operation failed; `context` says which.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The quoting agent could not tell which process is calling (no peer credentials).
    #[error("the caller's process id is not available from the socket")]
    CallerUnidentified,

    /// The quoting agent could not measure the calling process.
    #[error("cannot measure process {pid}: {source}")]
    CallerNotMeasurable {
        /// The caller's process id.
        pid: i32,
        /// Why reading its executable failed.
        #[source]
        source: std::io::Error,
    },

    /// The calling process exited, was replaced by another process with the same pid, or
    /// executed another program while it was being measured.
    #[error("process {pid} changed while it was being measured")]
    CallerChanged {
        /// The caller's process id.
        pid: i32,
    },

    /// The calling process is being traced (ptrace): its tracer could make it ask for a
    /// quote over anything, so it is not measured.
    #[error("process {pid} is being traced")]
    CallerTraced {
        /// The caller's process id.
        pid: i32,
    },

    /// The quoting agent refused the request; the text is the agent's reason.
    #[error("the quoting agent refused: {reason}")]
    AgentRefused {
        /// The agent's one-line reason.
        reason: String,
    },

    /// The peer (agent or client) did not answer in time.
    #[error("timed out waiting for the {0}")]
    Timeout(&'static str),
}

impl AttestationError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}
