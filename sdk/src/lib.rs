//! The ShardSeal client SDK: verifies the broker-signed pipeline manifest, seals
//! inputs to the first stage and opens outputs sealed to the client.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod tensor_file;

pub use shardseal_proto::tensor::{DType, HostTensor};

/// What can go wrong for a data owner.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor file (`.npy` or JSON) could not be read.
    #[error("bad tensor file: {0}")]
    BadTensorFile(String),
}
