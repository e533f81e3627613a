//! Attestation for ShardSeal: evidence, the verifier seam, release policy, and the
//! software TEE backend.
#![forbid(unsafe_code)]

mod ids;

pub use ids::{
    InvalidId, InvalidMeasurement, MAX_MODEL_ID_LEN, Measurement, ModelId, ModelVersion, StageIndex,
};
