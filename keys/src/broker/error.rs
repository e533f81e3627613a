//! The broker's error type and the one place it becomes a gRPC status.

use std::path::PathBuf;

use shardseal_attestation::{AttestationError, ModelId, ModelVersion, StageIndex};
use tonic::{Code, Status};

use crate::signing::VerifyingKey;

/// Why a broker operation, or an owner's call to a broker, failed.
///
/// The `Display` text of every variant that [`BrokerError::code`] does not map to
/// `INTERNAL` is what a remote peer reads: it names ids, stages, versions and public keys,
/// never a secret. `INTERNAL` errors reach the peer as a fixed "internal error"; their
/// cause chain goes to the log only.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    // --- configuration and state (the broker's own side) ---
    /// The broker configuration is unusable; the text says which setting.
    #[error("invalid broker configuration: {0}")]
    Config(String),

    /// A file of the broker's state folder could not be read, written or created.
    #[error("broker state: {0}")]
    State(#[source] crate::Error),

    /// A state file exists but does not hold what it should (wrong format, wrong model,
    /// keys that do not open under the master key or do not match their public halves).
    #[error("broker state file {path} is corrupt: {reason}")]
    StateCorrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The audit log refused an entry; the broker releases nothing it cannot record.
    #[error("audit log: {0}")]
    Audit(#[from] shardseal_audit::Error),

    /// The PKI folder could not be read.
    #[error("TLS: {0}")]
    Tls(#[from] shardseal_proto::tls::TlsError),

    /// The gRPC transport failed (binding, serving, or connecting to a broker).
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),

    /// A cryptographic operation failed (randomness, sealing, signing a document).
    #[error("{0}")]
    Crypto(#[source] crate::Error),

    /// A state write failed earlier; owner calls are refused until the broker restarts
    /// and reloads its files.
    #[error("a state write failed earlier; restart the broker")]
    StateUnsettled,

    /// A background task (file writes, audit appends) panicked or was cancelled.
    #[error("a background task failed: {0}")]
    TaskFailed(String),

    // --- owner authentication ---
    /// An owner API call without an `OwnerAuth`.
    #[error("the call carries no owner authentication")]
    OwnerAuthMissing,

    /// The `OwnerAuth` is structurally invalid (key or signature length, nonce length).
    #[error("malformed owner authentication: {0}")]
    OwnerAuthMalformed(&'static str),

    /// The call is signed by a key this broker does not list as a model owner.
    #[error("owner key {0} is not authorized on this broker")]
    UnknownOwner(VerifyingKey),

    /// The owner signature does not verify over this method and request.
    #[error("the owner signature does not verify for this request")]
    OwnerSignatureInvalid,

    /// The call was signed too long ago, or too far in the future.
    #[error(
        "the owner authentication was issued {skew_ms} ms away from the broker's clock (at most {window_ms} ms allowed)"
    )]
    OwnerAuthStale {
        /// How far `issued_at_ms` is from the broker's clock (positive: in the past).
        skew_ms: i64,
        /// The accepted distance.
        window_ms: u64,
    },

    /// The exact same authenticated call was already received (its request nonce is spent).
    #[error("this owner authentication was already used (replay)")]
    OwnerAuthReplayed,

    /// Too many recent owner calls are remembered to check another for replay.
    #[error("too many owner calls in the replay window; retry later")]
    OwnerReplayCacheFull,

    /// The model belongs to another owner.
    #[error("model {0} belongs to another owner")]
    NotModelOwner(ModelId),

    // --- registration ---
    /// The request is malformed (bad model id, measurement, key length, missing field).
    #[error("invalid request: {0}")]
    InvalidRequest(String),

    /// The signed model manifest does not parse, its signature does not verify, or it
    /// breaks a manifest rule.
    #[error("the signed model manifest is invalid: {0}")]
    InvalidManifest(#[source] crate::Error),

    /// The model manifest is signed by another key than the one that authenticated the
    /// call.
    #[error("the model manifest is signed by {signer}, not by the calling owner {caller}")]
    ManifestSignerMismatch {
        /// The manifest's signer.
        signer: VerifyingKey,
        /// The key that signed the call.
        caller: VerifyingKey,
    },

    /// The sealed shard keys do not open with the broker's sealing key for this model
    /// version (sealed to another broker, for another model or version, or altered).
    #[error("the shard keys do not open for {model} {version}")]
    ShardKeysDoNotOpen {
        /// The model.
        model: ModelId,
        /// The version.
        version: ModelVersion,
    },

    /// The shard keys opened but are not exactly one key for each stage of the manifest.
    #[error("the shard keys do not match the manifest: {0}")]
    ShardKeysMismatch(String),

    /// The release policy does not parse or breaks a rule.
    #[error("invalid release policy: {0}")]
    InvalidPolicy(String),

    /// This model version is already registered.
    #[error("{model} {version} is already registered")]
    VersionExists {
        /// The model.
        model: ModelId,
        /// The version.
        version: ModelVersion,
    },

    /// RegisterModel for a model that already exists (any version).
    #[error("model {0} is already registered; use RotateModel to add a version")]
    ModelExists(ModelId),

    /// RotateModel to a version that is not higher than the current one.
    #[error("{model} is at {current}; a rotation must offer a higher version than {offered}")]
    VersionNotNewer {
        /// The model.
        model: ModelId,
        /// Its current version.
        current: ModelVersion,
        /// The version offered.
        offered: ModelVersion,
    },

    // --- lookups and release ---
    /// No model of this id is registered.
    #[error("unknown model {0}")]
    UnknownModel(ModelId),

    /// The model has no such stage.
    #[error("model {model} has {stage_count} stage(s); there is no {stage}")]
    UnknownStage {
        /// The model.
        model: ModelId,
        /// The stage asked for.
        stage: StageIndex,
        /// How many stages the current version has.
        stage_count: u32,
    },

    /// The model was revoked by its owner: none of its keys is released any more.
    #[error("model {0} has been revoked")]
    ModelRevoked(ModelId),

    /// The evidence, its nonce or the policy refused the attestation.
    #[error("{0}")]
    Attestation(#[from] AttestationError),

    /// Too many attestations are in progress; the function should retry shortly.
    #[error("too many attestations in progress; retry later")]
    Busy,

    // --- the owner's client side ---
    /// The broker answered a call with an error status.
    #[error("the broker refused: {code:?}: {message}")]
    Refused {
        /// The gRPC status code.
        code: Code,
        /// The broker's message.
        message: String,
    },

    /// The broker's identity key is not the one the caller pinned.
    #[error("the broker's identity key is {found}, not the pinned {expected}")]
    BrokerIdentityMismatch {
        /// The pinned key.
        expected: VerifyingKey,
        /// The key the broker presented.
        found: VerifyingKey,
    },

    /// The broker's reply is malformed.
    #[error("malformed broker reply: {0}")]
    BadReply(&'static str),
}

impl BrokerError {
    /// The gRPC status code a remote peer receives for this error: the one mapping from
    /// broker failures to codes.
    ///
    /// | code | errors |
    /// | --- | --- |
    /// | `UNAUTHENTICATED` | no, malformed, unknown, badly signed, stale or replayed owner auth |
    /// | `PERMISSION_DENIED` | another owner's model, a manifest signed by someone else, measurement not allowed (for this model and stage) or revoked, a stage the model does not have, untrusted platform, bad quote signature, quote not bound to this key and nonce, revoked model, unverifiable TEE kind |
    /// | `INVALID_ARGUMENT` | malformed request, evidence, manifest, shard keys or policy |
    /// | `NOT_FOUND` | unknown model |
    /// | `ALREADY_EXISTS` | model or model version already registered |
    /// | `FAILED_PRECONDITION` | unknown, reused or expired nonce; rotation to a version not higher |
    /// | `RESOURCE_EXHAUSTED` | too many outstanding nonces, attestations or owner calls |
    /// | `UNAVAILABLE` | the state folder or audit log cannot be written (disk full, read-only, no permission, a file in the way), or a write failed earlier and the broker awaits a restart |
    /// | `INTERNAL` | other state, audit, TLS, transport or crypto failures on the broker |
    pub fn code(&self) -> Code {
        if self.storage_problem().is_some() {
            return Code::Unavailable;
        }
        match self {
            Self::OwnerAuthMissing
            | Self::OwnerAuthMalformed(_)
            | Self::UnknownOwner(_)
            | Self::OwnerSignatureInvalid
            | Self::OwnerAuthStale { .. }
            | Self::OwnerAuthReplayed => Code::Unauthenticated,
            Self::NotModelOwner(_)
            | Self::ManifestSignerMismatch { .. }
            | Self::ModelRevoked(_)
            | Self::UnknownStage { .. } => Code::PermissionDenied,
            Self::InvalidRequest(_)
            | Self::InvalidManifest(_)
            | Self::ShardKeysDoNotOpen { .. }
            | Self::ShardKeysMismatch(_)
            | Self::InvalidPolicy(_) => Code::InvalidArgument,
            Self::UnknownModel(_) => Code::NotFound,
            Self::VersionExists { .. } | Self::ModelExists(_) => Code::AlreadyExists,
            Self::VersionNotNewer { .. } => Code::FailedPrecondition,
            Self::OwnerReplayCacheFull | Self::Busy => Code::ResourceExhausted,
            Self::Attestation(e) => attestation_code(e),
            Self::Refused { code, .. } => *code,
            Self::Config(_)
            | Self::State(_)
            | Self::StateCorrupt { .. }
            | Self::Audit(_)
            | Self::Tls(_)
            | Self::Transport(_)
            | Self::Crypto(_)
            | Self::TaskFailed(_)
            | Self::StateUnsettled
            | Self::BrokerIdentityMismatch { .. }
            | Self::BadReply(_) => Code::Internal,
        }
    }

    /// What stops the broker from writing its state folder or audit log, in words an
    /// operator can act on (no path, no secret), if that is what failed.
    fn storage_problem(&self) -> Option<String> {
        let (what, source) = match self {
            Self::StateUnsettled => {
                return Some(
                    "the broker's state folder could not be written earlier; the broker must be restarted".into(),
                );
            }
            Self::State(crate::Error::File { op, source, .. }) if *op != "read" => {
                ("state folder", source)
            }
            Self::Audit(shardseal_audit::Error::Io { source, .. }) => ("audit log", source),
            Self::Audit(shardseal_audit::Error::WriterBroken) => {
                return Some(
                    "the broker's audit log could not be written earlier; the broker must be restarted".into(),
                );
            }
            _ => return None,
        };
        use std::io::ErrorKind;
        let problem = match source.kind() {
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded => "its disk is full",
            ErrorKind::ReadOnlyFilesystem => "its file system is read-only",
            ErrorKind::PermissionDenied => "permission denied",
            ErrorKind::AlreadyExists | ErrorKind::NotADirectory | ErrorKind::IsADirectory => {
                "a file is in the way"
            }
            ErrorKind::NotFound => "a folder is missing",
            ErrorKind::FileTooLarge => "a file size limit was reached",
            _ => return None,
        };
        Some(format!(
            "the broker cannot write its {what}: {problem}; nothing was acknowledged"
        ))
    }

    /// The status sent to the peer: the code, and a short safe message (a fixed one for
    /// internal failures, whose cause chain is logged here instead).
    pub(crate) fn to_status(&self) -> Status {
        if let Some(problem) = self.storage_problem() {
            tracing::error!(error = %error_chain(self), "broker storage failure");
            return Status::unavailable(problem);
        }
        let code = self.code();
        if code == Code::Internal {
            tracing::error!(error = %error_chain(self), "broker failure");
            Status::internal("internal error")
        } else {
            tracing::info!(code = ?code, reason = %self, "request refused");
            Status::new(code, self.to_string())
        }
    }
}

fn attestation_code(error: &AttestationError) -> Code {
    match error {
        AttestationError::Malformed(_) => Code::InvalidArgument,
        AttestationError::BadSignature
        | AttestationError::UntrustedPlatform
        | AttestationError::UnsupportedTee { .. }
        | AttestationError::BackendNotBuilt { .. }
        | AttestationError::MeasurementNotAllowed { .. }
        | AttestationError::MeasurementRevoked { .. }
        | AttestationError::ReportDataMismatch => Code::PermissionDenied,
        AttestationError::NonceUnknown
        | AttestationError::NonceReused
        | AttestationError::NonceExpired => Code::FailedPrecondition,
        AttestationError::TooManyOutstandingNonces { .. } => Code::ResourceExhausted,
        _ => Code::Internal,
    }
}

/// The error and its sources, for the log.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl From<Status> for BrokerError {
    fn from(status: Status) -> Self {
        Self::Refused {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use shardseal_attestation::Measurement;

    use super::*;

    #[test]
    fn refusals_get_precise_codes_and_internal_failures_say_nothing() {
        let model = ModelId::new("m").unwrap();
        let cases: Vec<(BrokerError, Code)> = vec![
            (BrokerError::OwnerAuthReplayed, Code::Unauthenticated),
            (
                BrokerError::NotModelOwner(model.clone()),
                Code::PermissionDenied,
            ),
            (BrokerError::UnknownModel(model.clone()), Code::NotFound),
            (
                BrokerError::VersionExists {
                    model: model.clone(),
                    version: ModelVersion(1),
                },
                Code::AlreadyExists,
            ),
            (
                AttestationError::MeasurementRevoked {
                    measurement: Measurement([1; 32]),
                }
                .into(),
                Code::PermissionDenied,
            ),
            (
                AttestationError::NonceExpired.into(),
                Code::FailedPrecondition,
            ),
            (
                AttestationError::Malformed("evidence: too long").into(),
                Code::InvalidArgument,
            ),
            (
                AttestationError::TooManyOutstandingNonces { limit: 1 }.into(),
                Code::ResourceExhausted,
            ),
        ];
        for (error, code) in cases {
            let status = error.to_status();
            assert_eq!(status.code(), code, "{error}");
            assert_eq!(status.message(), error.to_string());
        }
        let internal = BrokerError::StateCorrupt {
            path: PathBuf::from("/secret/path/index.json"),
            reason: "bad".into(),
        };
        let status = internal.to_status();
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }
}
