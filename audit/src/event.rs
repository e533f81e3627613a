//! What the broker and the coordinator record: typed events made of ids, sizes, durations and
//! reasons. No field can hold a key, a weight or a tensor: there is no byte-blob field, keys
//! appear only as fingerprints, and free text is bounded and meant for people.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use shardseal_attestation::{Measurement, ModelId, ModelVersion, StageIndex};

use crate::error::Error;

/// One thing that happened, as recorded in the audit log (serialised with a `kind` tag, e.g.
/// `{"kind":"key_released","model":"resnet",...}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum AuditEvent {
    /// A model owner registered a model version with the broker.
    ModelRegistered {
        /// The model.
        model: ModelId,
        /// The registered version.
        version: ModelVersion,
        /// How many pipeline stages it has.
        stages: u32,
        /// The owner's public key, as a fingerprint.
        owner: KeyFingerprint,
    },
    /// A model was rotated to a new version with fresh shard keys.
    ModelRotated {
        /// The model.
        model: ModelId,
        /// The version retired.
        from: ModelVersion,
        /// The version now served.
        to: ModelVersion,
    },
    /// A model was revoked: no key of it is released any more.
    ModelRevoked {
        /// The model.
        model: ModelId,
    },
    /// A function measurement was removed from a model's release policy.
    MeasurementRevoked {
        /// The model.
        model: ModelId,
        /// The stage, or every stage when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stage: Option<StageIndex>,
        /// The measurement no longer trusted.
        measurement: Measurement,
    },
    /// A function's attestation was verified and met the release policy.
    AttestAccepted {
        /// The model the function serves.
        model: ModelId,
        /// The stage it serves.
        stage: StageIndex,
        /// Its measurement, as quoted by the TEE.
        measurement: Measurement,
        /// The TEE that quoted it.
        tee: TeeName,
    },
    /// An attestation was refused; whatever was known of the caller is recorded.
    AttestDenied {
        /// The model asked for, if the request got that far.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<ModelId>,
        /// The stage asked for, if known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stage: Option<StageIndex>,
        /// The quoted measurement, if the evidence could be read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        measurement: Option<Measurement>,
        /// Why it was refused.
        reason: Reason,
    },
    /// Keys of a stage were released to an attested function (which keys is implied; their
    /// bytes are never recorded).
    KeyReleased {
        /// The model.
        model: ModelId,
        /// The model version whose keys were released.
        version: ModelVersion,
        /// The stage.
        stage: StageIndex,
        /// The measurement of the function that received them.
        measurement: Measurement,
    },
    /// The coordinator served a signed pipeline manifest to a client.
    ManifestServed {
        /// The model.
        model: ModelId,
        /// The manifest's model version.
        version: ModelVersion,
    },
    /// One inference request: its metadata only, never its data.
    Request {
        /// The request id.
        request_id: RequestId,
        /// The model.
        model: ModelId,
        /// The model version that served it.
        version: ModelVersion,
        /// How many stages it went through.
        stages: u32,
        /// Size of the sealed input, in bytes.
        input_bytes: u64,
        /// Size of the sealed output, in bytes (0 if none was produced).
        output_bytes: u64,
        /// Time spent in each stage, in microseconds, in stage order.
        stage_us: Vec<u64>,
        /// End-to-end time, in microseconds.
        total_us: u64,
        /// How it ended.
        outcome: Outcome,
        /// The stage that failed, when one did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        failed_stage: Option<StageIndex>,
    },
}

/// The kinds of [`AuditEvent`], named as in the log's `kind` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventKind {
    /// [`AuditEvent::ModelRegistered`]
    ModelRegistered,
    /// [`AuditEvent::ModelRotated`]
    ModelRotated,
    /// [`AuditEvent::ModelRevoked`]
    ModelRevoked,
    /// [`AuditEvent::MeasurementRevoked`]
    MeasurementRevoked,
    /// [`AuditEvent::AttestAccepted`]
    AttestAccepted,
    /// [`AuditEvent::AttestDenied`]
    AttestDenied,
    /// [`AuditEvent::KeyReleased`]
    KeyReleased,
    /// [`AuditEvent::ManifestServed`]
    ManifestServed,
    /// [`AuditEvent::Request`]
    Request,
}

impl EventKind {
    /// Every kind, in declaration order.
    pub const ALL: [EventKind; 9] = [
        Self::ModelRegistered,
        Self::ModelRotated,
        Self::ModelRevoked,
        Self::MeasurementRevoked,
        Self::AttestAccepted,
        Self::AttestDenied,
        Self::KeyReleased,
        Self::ManifestServed,
        Self::Request,
    ];

    /// The name used in the log's `kind` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ModelRegistered => "model_registered",
            Self::ModelRotated => "model_rotated",
            Self::ModelRevoked => "model_revoked",
            Self::MeasurementRevoked => "measurement_revoked",
            Self::AttestAccepted => "attest_accepted",
            Self::AttestDenied => "attest_denied",
            Self::KeyReleased => "key_released",
            Self::ManifestServed => "manifest_served",
            Self::Request => "request",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventKind {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self, Error> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
            .ok_or_else(|| Error::invalid("event kind", format!("unknown kind {text:?}")))
    }
}

impl AuditEvent {
    /// The event's kind.
    pub fn kind(&self) -> EventKind {
        match self {
            Self::ModelRegistered { .. } => EventKind::ModelRegistered,
            Self::ModelRotated { .. } => EventKind::ModelRotated,
            Self::ModelRevoked { .. } => EventKind::ModelRevoked,
            Self::MeasurementRevoked { .. } => EventKind::MeasurementRevoked,
            Self::AttestAccepted { .. } => EventKind::AttestAccepted,
            Self::AttestDenied { .. } => EventKind::AttestDenied,
            Self::KeyReleased { .. } => EventKind::KeyReleased,
            Self::ManifestServed { .. } => EventKind::ManifestServed,
            Self::Request { .. } => EventKind::Request,
        }
    }

    /// The model the event is about, if any.
    pub fn model(&self) -> Option<&ModelId> {
        match self {
            Self::ModelRegistered { model, .. }
            | Self::ModelRotated { model, .. }
            | Self::ModelRevoked { model }
            | Self::MeasurementRevoked { model, .. }
            | Self::AttestAccepted { model, .. }
            | Self::KeyReleased { model, .. }
            | Self::ManifestServed { model, .. }
            | Self::Request { model, .. } => Some(model),
            Self::AttestDenied { model, .. } => model.as_ref(),
        }
    }

    /// A one-line summary for people: everything but the kind, the model and the time.
    pub fn details(&self) -> String {
        fn short(m: &Measurement) -> String {
            m.to_hex()[..16].to_owned()
        }
        match self {
            Self::ModelRegistered {
                version,
                stages,
                owner,
                ..
            } => format!("{version}, {stages} stages, owner {owner}"),
            Self::ModelRotated { from, to, .. } => format!("{from} -> {to}"),
            Self::ModelRevoked { .. } => "all versions".to_owned(),
            Self::MeasurementRevoked {
                stage, measurement, ..
            } => match stage {
                Some(stage) => format!("{stage}, measurement {}", short(measurement)),
                None => format!("every stage, measurement {}", short(measurement)),
            },
            Self::AttestAccepted {
                stage,
                measurement,
                tee,
                ..
            } => format!("{stage}, measurement {}, tee {tee}", short(measurement)),
            Self::AttestDenied {
                stage,
                measurement,
                reason,
                ..
            } => {
                let mut text = String::new();
                if let Some(stage) = stage {
                    text.push_str(&format!("{stage}, "));
                }
                if let Some(measurement) = measurement {
                    text.push_str(&format!("measurement {}, ", short(measurement)));
                }
                text.push_str(&format!("reason: {reason}"));
                text
            }
            Self::KeyReleased {
                version,
                stage,
                measurement,
                ..
            } => format!("{version}, {stage}, measurement {}", short(measurement)),
            Self::ManifestServed { version, .. } => format!("{version}"),
            Self::Request {
                request_id,
                version,
                stages,
                input_bytes,
                output_bytes,
                stage_us,
                total_us,
                outcome,
                failed_stage,
                ..
            } => {
                let per_stage: Vec<String> = stage_us.iter().map(|us| millis(*us)).collect();
                let mut text = format!(
                    "{outcome}, id {request_id}, {version}, {stages} stages, in {input_bytes} B, \
                     out {output_bytes} B, {} ms ({} per stage)",
                    millis(*total_us),
                    per_stage.join(" + ")
                );
                if let Some(stage) = failed_stage {
                    text.push_str(&format!(", failed at {stage}"));
                }
                text
            }
        }
    }
}

fn millis(micros: u64) -> String {
    format!("{}.{:03}", micros / 1000, micros % 1000)
}

/// The SHA-256 of a public key: how the log names a key without holding one.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyFingerprint(#[serde(with = "crate::checkpoint::hex_array")] pub [u8; 32]);

impl KeyFingerprint {
    /// The fingerprint of a public key's encoded bytes (for Ed25519, the 32-byte key).
    pub fn of_public_key(public_key: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, public_key);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Self(out)
    }
}

impl fmt::Display for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(&self.0[..8]))
    }
}

impl fmt::Debug for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyFingerprint({})", hex::encode(self.0))
    }
}

/// A TEE's short name (`software`, `sev-snp`, `tdx`, ...): 1 to 32 characters of `a-z 0-9 - _`.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TeeName(String);

impl TeeName {
    /// Checks and wraps a TEE name.
    pub fn new(name: impl Into<String>) -> Result<Self, Error> {
        let name = name.into();
        let ok = !name.is_empty()
            && name.len() <= 32
            && name
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_'));
        if ok {
            Ok(Self(name))
        } else {
            Err(Error::invalid(
                "TEE name",
                "use 1 to 32 characters of a-z 0-9 - _",
            ))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TeeName {
    type Error = Error;
    fn try_from(name: String) -> Result<Self, Error> {
        Self::new(name)
    }
}

impl From<TeeName> for String {
    fn from(name: TeeName) -> String {
        name.0
    }
}

impl fmt::Display for TeeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The longest [`Reason`], in characters.
pub const MAX_REASON_CHARS: usize = 256;

/// Why something was refused, for a person to read. Control characters become spaces and the
/// text is cut to [`MAX_REASON_CHARS`]; it must never carry secret material (pass an error's
/// message, not the bytes it was about).
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub struct Reason(String);

impl Reason {
    /// Cleans and bounds a reason.
    pub fn new(text: impl AsRef<str>) -> Self {
        Self(
            text.as_ref()
                .chars()
                .take(MAX_REASON_CHARS)
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect(),
        )
    }

    /// The reason as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for Reason {
    fn from(text: String) -> Self {
        Self::new(text)
    }
}

impl From<Reason> for String {
    fn from(reason: Reason) -> String {
        reason.0
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The longest [`RequestId`], in hex digits (32 bytes).
pub const MAX_REQUEST_ID_HEX: usize = 64;

/// A request id as lower-case hex (1 to 64 digits).
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RequestId(String);

impl RequestId {
    /// The id of a request whose id is `bytes` (at most 32).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        Self::from_hex(hex::encode(bytes))
    }

    /// Checks and wraps a hex request id.
    pub fn from_hex(text: impl Into<String>) -> Result<Self, Error> {
        let text = text.into();
        let ok = !text.is_empty()
            && text.len() <= MAX_REQUEST_ID_HEX
            && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if ok {
            Ok(Self(text))
        } else {
            Err(Error::invalid(
                "request id",
                "use 1 to 64 lower-case hex digits",
            ))
        }
    }

    /// The id as hex.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RequestId {
    type Error = Error;
    fn try_from(text: String) -> Result<Self, Error> {
        Self::from_hex(text)
    }
}

impl From<RequestId> for String {
    fn from(id: RequestId) -> String {
        id.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a request ended.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// The output was produced and sent.
    Ok,
    /// The request was malformed or named an unknown model.
    InvalidRequest,
    /// Refused by policy (for example a revoked model).
    Denied,
    /// A stage failed.
    StageFailed,
    /// A deadline passed.
    Timeout,
    /// Shed under load.
    Overloaded,
    /// The client went away.
    Cancelled,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ok => "ok",
            Self::InvalidRequest => "invalid_request",
            Self::Denied => "denied",
            Self::StageFailed => "stage_failed",
            Self::Timeout => "timeout",
            Self::Overloaded => "overloaded",
            Self::Cancelled => "cancelled",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialise_tagged_by_kind() {
        let event = AuditEvent::KeyReleased {
            model: ModelId::new("resnet").unwrap(),
            version: ModelVersion(2),
            stage: StageIndex(1),
            measurement: Measurement([0xab; 32]),
        };
        let json = serde_json::to_string(&event).unwrap();
        assert_eq!(
            json,
            format!(
                r#"{{"kind":"key_released","model":"resnet","version":2,"stage":1,"measurement":"{}"}}"#,
                "ab".repeat(32)
            )
        );
        assert_eq!(serde_json::from_str::<AuditEvent>(&json).unwrap(), event);
        assert_eq!(event.kind().as_str(), "key_released");
    }

    #[test]
    fn every_kind_name_parses_back() {
        for kind in EventKind::ALL {
            assert_eq!(kind.as_str().parse::<EventKind>().unwrap(), kind);
        }
        assert!("checkpoint".parse::<EventKind>().is_err());
    }

    #[test]
    fn reasons_are_bounded_single_lines() {
        let reason = Reason::new(format!("bad\nquote{}", "x".repeat(1000)));
        assert!(reason.as_str().starts_with("bad quote"));
        assert_eq!(reason.as_str().chars().count(), MAX_REASON_CHARS);
    }

    #[test]
    fn request_ids_and_tee_names_are_checked_on_read() {
        assert_eq!(RequestId::from_bytes(&[1, 0xff]).unwrap().as_str(), "01ff");
        assert!(RequestId::from_hex("01FF").is_err());
        assert!(RequestId::from_bytes(&[0; 33]).is_err());
        assert!(serde_json::from_str::<RequestId>("\"zz\"").is_err());
        assert!(TeeName::new("sev-snp").is_ok());
        assert!(serde_json::from_str::<TeeName>("\"Bad Name\"").is_err());
    }
}
