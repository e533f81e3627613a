//! The ShardSeal client SDK: verifies the broker-signed pipeline manifest, seals
//! inputs to the first stage and opens outputs sealed to the client.
//!
//! ```text
//!  Client::connect(url, Trust { broker key, measurements, CA })
//!    │ GetPipeline ──▶ coordinator ──▶ broker      (manifest signed by the broker)
//!    │ verify signature + every stage's measurements ⊆ trusted
//!    │ check inputs against the manifest (names, dtypes, shapes)
//!    │ seal inputs to stage 0, fresh response key per request
//!    │ Infer ──▶ coordinator ──▶ stage 0 ──▶ … ──▶ stage k-1 (seals to the response key)
//!    └ open outputs: only this client can
//! ```
//!
//! The coordinator, the network and the host see ciphertext only. See [`Client`] for a
//! complete example.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod client;
pub mod tensor_file;

pub use client::{Client, Inference, MAX_MESSAGE_BYTES, Trust};
pub use shardseal_proto::tensor::{DType, HostTensor, TensorError};

/// What can go wrong for a data owner.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor file (`.npy` or JSON) could not be read.
    #[error("bad tensor file: {0}")]
    BadTensorFile(String),
    /// A trust file, URL or other setting is wrong.
    #[error("configuration: {0}")]
    Config(String),
    /// The inputs do not match the model's manifest (name, dtype or shape), or a stage
    /// refused them.
    #[error("bad input: {0}")]
    BadInput(String),
    /// The model is not served.
    #[error("model unknown: {0}")]
    ModelUnknown(String),
    /// Something the client must verify did not verify: the manifest's signature or
    /// measurements, or the sealed output. Nothing was sent, or nothing was believed.
    #[error("untrusted: {0}")]
    Untrusted(String),
    /// A function's attestation was refused, or a stage refused the sealed activations.
    #[error("refused: {0}")]
    AttestationRefused(String),
    /// The deadline passed.
    #[error("deadline exceeded: {0}")]
    Deadline(String),
    /// The coordinator or a stage is unavailable; retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The coordinator is shedding load; retry later.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// An unexpected failure.
    #[error("internal: {0}")]
    Internal(String),
}

impl From<TensorError> for Error {
    fn from(e: TensorError) -> Self {
        Error::BadInput(e.to_string())
    }
}
