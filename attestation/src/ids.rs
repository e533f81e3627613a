//! Identifiers that must never be mixed up: a model id is not a stage index, a
//! measurement is not a digest of a shard.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest model id accepted anywhere: ids travel in AADs, file names and logs.
pub const MAX_MODEL_ID_LEN: usize = 128;

/// A model's id, chosen by its owner: 1 to 128 characters of `[A-Za-z0-9._-]`, not
/// starting with a dot, so it is safe as a file name and inside an AAD.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ModelId(String);

impl ModelId {
    /// Checks and wraps an id.
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidId> {
        let id = id.into();
        let ok = !id.is_empty()
            && id.len() <= MAX_MODEL_ID_LEN
            && !id.starts_with('.')
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(id))
        } else {
            Err(InvalidId(id.chars().take(MAX_MODEL_ID_LEN).collect()))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ModelId {
    type Error = InvalidId;
    fn try_from(s: String) -> Result<Self, InvalidId> {
        Self::new(s)
    }
}

impl From<ModelId> for String {
    fn from(id: ModelId) -> String {
        id.0
    }
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelId({:?})", self.0)
    }
}

/// A model id that breaks the naming rule (the offending text, cut to the maximum length).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid model id {0:?}: use 1 to 128 characters of A-Z a-z 0-9 . _ -, not starting with '.'"
)]
pub struct InvalidId(pub String);

/// A model version: each provisioning or rotation gets a new one, with fresh shard keys.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ModelVersion(pub u32);

impl fmt::Display for ModelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// A pipeline stage, counted from 0 (the stage that takes the model's inputs).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StageIndex(pub u32);

impl fmt::Display for StageIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stage {}", self.0)
    }
}

/// The SHA-256 of a function's executable, as measured by the TEE (never as claimed by
/// the function itself).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Measurement(#[serde(with = "hex32")] pub [u8; 32]);

impl Measurement {
    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, InvalidMeasurement> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out).map_err(|_| InvalidMeasurement)?;
        Ok(Self(out))
    }

    /// The measurement as 64 lower-case hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Measurement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Measurement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Measurement({})", self.to_hex())
    }
}

/// Text that is not 64 hex digits where a measurement was expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a measurement is 64 hex digits (a SHA-256)")]
pub struct InvalidMeasurement;

/// Serde for 32-byte values (digests, measurements) as 64 hex digits:
/// `#[serde(with = "shardseal_attestation::hex32")]`.
pub mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the bytes as 64 lowercase hex digits.
    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    /// Reads exactly 64 hex digits.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&text, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_are_safe_file_names() {
        assert!(ModelId::new("resnet-50_v1.onnx").is_ok());
        for bad in ["", ".hidden", "a/b", "../x", "a b", "é", &"x".repeat(129)] {
            assert!(ModelId::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn measurement_round_trips_through_hex_and_json() {
        let m = Measurement([0xab; 32]);
        assert_eq!(Measurement::from_hex(&m.to_hex()), Ok(m));
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, format!("\"{}\"", "ab".repeat(32)));
        assert_eq!(serde_json::from_str::<Measurement>(&json).unwrap(), m);
        assert_eq!(Measurement::from_hex("abc"), Err(InvalidMeasurement));
    }
}
