//! The model manifest: what a provisioned model version is made of, signed by its owner.
//!
//! It lists the model's boundary tensors and, per stage, the tensors the stage takes and
//! gives, its encrypted shard (file name, shard digest, sizes). The broker and
//! the functions trust a shard only if its digest is the one in a manifest that verifies
//! under the owner's key. [`SignedManifest::verify`] checks the signature over the exact
//! body bytes before it parses them, then [`ModelManifest::validate`] checks:
//!
//! - stages are non-empty and indexed 0, 1, ... in order (at most [`MAX_STAGES`]);
//! - tensor specs are sane (names, at most 16 dimensions, a byte size that fits) and
//!   unique within each list;
//! - the pipeline is connected: every stage input is a model input or an output of an
//!   earlier stage, with the same dtype and shape, and every model output is produced;
//! - shard file names are plain, unique file names;
//! - sizes agree: `shard_size` is exactly the sealed size of `plaintext_size` bytes at
//!   `chunk_size` ([`sealed_shard_len`]), and `param_bytes <= plaintext_size`.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use shardseal_attestation::{ModelId, ModelVersion, StageIndex};
use shardseal_proto::tensor::DType;

use crate::error::Error;
use crate::shard::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, ShardBinding, sealed_shard_len};
use crate::signing::{Signed, SignedPayload};

/// The most stages a manifest may have.
pub const MAX_STAGES: usize = 64;
/// The longest tensor name accepted.
pub const MAX_TENSOR_NAME_LEN: usize = 256;
/// The most dimensions a tensor may have.
pub const MAX_TENSOR_RANK: usize = 16;
/// The longest shard file name accepted.
pub const MAX_SHARD_FILE_LEN: usize = 255;

/// A model manifest signed by the model owner's key.
pub type SignedManifest = Signed<ModelManifest>;

/// The declared name, element type and fixed shape of a tensor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    /// The tensor's name in the ONNX graph.
    pub name: String,
    /// Element type.
    #[serde(with = "dtype_name")]
    pub dtype: DType,
    /// Fixed shape.
    pub shape: Vec<u64>,
}

impl TensorSpec {
    /// Describes a tensor.
    pub fn new(name: impl Into<String>, dtype: DType, shape: Vec<u64>) -> Self {
        Self {
            name: name.into(),
            dtype,
            shape,
        }
    }

    /// Bytes of one tensor of this spec, or `None` if that overflows.
    pub fn byte_len(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(self.dtype.size() as u64, |acc, &d| acc.checked_mul(d))
    }

    fn validate(&self) -> Result<(), Error> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= MAX_TENSOR_NAME_LEN
            && !self.name.chars().any(char::is_control);
        if !name_ok {
            return Err(invalid(format!(
                "tensor name {:?} must be 1 to {MAX_TENSOR_NAME_LEN} bytes without control characters",
                truncated(&self.name)
            )));
        }
        if self.shape.len() > MAX_TENSOR_RANK {
            return Err(invalid(format!(
                "tensor {:?} has more than {MAX_TENSOR_RANK} dimensions",
                self.name
            )));
        }
        if self.byte_len().is_none() {
            return Err(invalid(format!("tensor {:?} is too large", self.name)));
        }
        Ok(())
    }
}

impl From<&TensorSpec> for shardseal_proto::v1::TensorSpec {
    fn from(spec: &TensorSpec) -> Self {
        Self {
            name: spec.name.clone(),
            dtype: spec.dtype.name().to_owned(),
            shape: spec.shape.clone(),
        }
    }
}

impl TryFrom<&shardseal_proto::v1::TensorSpec> for TensorSpec {
    type Error = Error;
    fn try_from(spec: &shardseal_proto::v1::TensorSpec) -> Result<Self, Error> {
        let dtype = DType::parse(&spec.dtype).map_err(|e| Error::Malformed {
            what: "tensor spec",
            detail: e.to_string(),
        })?;
        let spec = TensorSpec::new(spec.name.clone(), dtype, spec.shape.clone());
        spec.validate()?;
        Ok(spec)
    }
}

mod dtype_name {
    use super::*;

    pub fn serialize<S: Serializer>(dtype: &DType, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(dtype.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DType, D::Error> {
        let name = String::deserialize(d)?;
        DType::parse(&name).map_err(serde::de::Error::custom)
    }
}

/// One pipeline stage: its boundary tensors and its encrypted shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageEntry {
    /// The stage's position, from 0.
    pub index: StageIndex,
    /// Tensors the stage takes (model inputs or earlier stages' outputs).
    pub inputs: Vec<TensorSpec>,
    /// Tensors the stage gives.
    pub outputs: Vec<TensorSpec>,
    /// The shard's file name in the shard store (a plain name, no directories).
    pub shard_file: String,
    /// The shard digest (hex in the file): SHA-256 over the sealed shard's header and every
    /// chunk's frame and GCM tag, which pins the whole shard for anyone without its key
    /// (see `ShardStats::digest`).
    #[serde(with = "shardseal_attestation::hex32")]
    pub shard_digest: [u8; 32],
    /// Ciphertext bytes.
    pub shard_size: u64,
    /// Plaintext bytes (the stage's ONNX model).
    pub plaintext_size: u64,
    /// Bytes of parameters (weights) in the stage, for memory planning.
    pub param_bytes: u64,
}

/// A provisioned model version: boundary tensors and stages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelManifest {
    /// The model.
    pub model_id: ModelId,
    /// This version.
    pub version: ModelVersion,
    /// Plaintext bytes per shard chunk, for every shard.
    pub chunk_size: u32,
    /// The model's inputs.
    pub inputs: Vec<TensorSpec>,
    /// The model's outputs.
    pub outputs: Vec<TensorSpec>,
    /// The stages, in pipeline order.
    pub stages: Vec<StageEntry>,
}

impl ModelManifest {
    /// Signs the manifest with the owner's key (after [`validate`](Self::validate)).
    pub fn sign(&self, key: &crate::signing::SigningKey) -> Result<SignedManifest, Error> {
        Signed::sign(self, key)
    }

    /// The binding a stage's shard is sealed to.
    pub fn shard_binding(&self, stage: StageIndex) -> ShardBinding {
        ShardBinding::new(self.model_id.clone(), self.version, stage)
    }

    /// The entry of one stage.
    pub fn stage(&self, stage: StageIndex) -> Option<&StageEntry> {
        self.stages
            .get(stage.0 as usize)
            .filter(|s| s.index == stage)
    }

    /// Checks the rules listed in the module doc.
    pub fn validate(&self) -> Result<(), Error> {
        let chunk_size = self.chunk_size as usize;
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(Error::ChunkSizeOutOfRange(u64::from(self.chunk_size)));
        }
        if self.stages.is_empty() || self.stages.len() > MAX_STAGES {
            return Err(invalid(format!("a model has 1 to {MAX_STAGES} stages")));
        }
        check_tensor_list("model inputs", &self.inputs)?;
        check_tensor_list("model outputs", &self.outputs)?;

        let mut available: HashMap<&str, &TensorSpec> =
            self.inputs.iter().map(|t| (t.name.as_str(), t)).collect();
        let mut shard_files = HashSet::new();
        for (position, stage) in self.stages.iter().enumerate() {
            if stage.index.0 as usize != position {
                return Err(invalid(format!(
                    "stage at position {position} has index {}",
                    stage.index.0
                )));
            }
            let which = stage.index;
            check_tensor_list("stage inputs", &stage.inputs)?;
            check_tensor_list("stage outputs", &stage.outputs)?;
            for input in &stage.inputs {
                if available.get(input.name.as_str()) != Some(&input) {
                    return Err(invalid(format!(
                        "{which} input {:?} is neither a model input nor an earlier stage's output of that type and shape",
                        input.name
                    )));
                }
            }
            for output in &stage.outputs {
                available.insert(output.name.as_str(), output);
            }
            check_shard_file(&stage.shard_file)?;
            if !shard_files.insert(stage.shard_file.as_str()) {
                return Err(invalid(format!(
                    "shard file {:?} is used by two stages",
                    stage.shard_file
                )));
            }
            if stage.plaintext_size == 0 {
                return Err(invalid(format!("{which} has an empty shard")));
            }
            if stage.param_bytes > stage.plaintext_size {
                return Err(invalid(format!(
                    "{which} claims more parameter bytes than its shard holds"
                )));
            }
            let expected =
                sealed_shard_len(&self.shard_binding(which), chunk_size, stage.plaintext_size);
            if expected != Some(stage.shard_size) {
                return Err(invalid(format!(
                    "{which}: shard_size {} does not match plaintext_size {} at chunk size {}",
                    stage.shard_size, stage.plaintext_size, self.chunk_size
                )));
            }
        }
        for output in &self.outputs {
            if available.get(output.name.as_str()) != Some(&output) {
                return Err(invalid(format!(
                    "model output {:?} is not produced by any stage with that type and shape",
                    output.name
                )));
            }
        }
        Ok(())
    }
}

impl SignedPayload for ModelManifest {
    const DOMAIN: &'static str = "shardseal/v1/model-manifest";

    fn validate(&self) -> Result<(), Error> {
        ModelManifest::validate(self)
    }
}

fn invalid(reason: String) -> Error {
    Error::InvalidManifest(reason)
}

fn truncated(text: &str) -> String {
    text.chars().take(64).collect()
}

fn check_tensor_list(what: &str, list: &[TensorSpec]) -> Result<(), Error> {
    if list.is_empty() {
        return Err(invalid(format!("{what} are empty")));
    }
    let mut names = HashSet::new();
    for spec in list {
        spec.validate()?;
        if !names.insert(spec.name.as_str()) {
            return Err(invalid(format!("{what}: {:?} appears twice", spec.name)));
        }
    }
    Ok(())
}

fn check_shard_file(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SHARD_FILE_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "shard file {:?} must be a plain file name of [A-Za-z0-9._-], not starting with '.'",
            truncated(name)
        )))
    }
}

#[cfg(test)]
mod tests;
