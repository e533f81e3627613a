//! The ShardSeal serverless function: attests to the key broker, opens its own model
//! shard, and runs it with tract on activations sealed to its stage.
//!
//! ```text
//!   coordinator ──ProcessRequest(sealed to stage i)──▶ function (stage i)
//!                                                        │ open with the stage key
//!                                                        │ run the shard (tract)
//!                                                        │ seal to stage i+1 (or client)
//!   coordinator ◀──ProcessResponse(sealed onward)─────────┘
//! ```
//!
//! A function decrypts exactly two things: its own shard, with the shard key the broker
//! released to it after attestation, and activations sealed to its stage. It never writes
//! plaintext to disk, logs names, sizes and timings only, makes itself non-dumpable
//! before it asks for a key, and (as a binary) wipes every freed heap block.
#![deny(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod cold_start;
pub mod danger;
mod engine;
mod entry;
mod hardening;
mod lease;
mod mapped_blocks;
mod memory;
mod onnx_decode;
mod sched;
mod service;
mod wipe_alloc;

pub use cold_start::{
    AttestedStage, ColdStartConfig, ColdStartTimings, SPAWNED_AT_ENV, cold_start, process_age,
};
pub use engine::{InputSpec, LoadTimings, StageEngine};
pub use entry::{
    FunctionArgs, LOAD_MEMORY_ENV, MAX_BATCH, READY_MARKER, SERVE_MEMORY_ENV, main_with,
};
pub use hardening::{harden_process, is_dumpable};
pub use memory::{
    LEAN_FROM_BYTES, LoadMemory, SERVING_KEPT_BYTES, ServeMemory, keep_freed_memory_for_reuse,
    peak_rss_bytes,
};
pub use service::{MAX_MESSAGE_BYTES, StageService, run};
pub use wipe_alloc::WipeOnFree;

/// What the fuzz targets in `fuzz/` call, built only with `--cfg fuzzing` (as
/// `.ci/fuzz.sh` builds): not part of the crate's API.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::onnx_decode::assert_decodes_as_prost;
}

/// The environment variable that selects the log format (`text` or `json`) of every
/// ShardSeal process; children inherit it.
pub const LOG_FORMAT_ENV: &str = "SHARDSEAL_LOG_FORMAT";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with the current span's fields (`request_id`, `model`,
    /// `stage`) in `span` and `spans`.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?} (use text or json)")),
        }
    }
}

/// Logs to stderr in the format named by `SHARDSEAL_LOG_FORMAT` (default text), filtered
/// by `RUST_LOG` (default `info`). Never a key or a tensor value: every span in this crate
/// names its fields.
pub fn init_logging() {
    let format = std::env::var(LOG_FORMAT_ENV)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_default();
    init_logging_as(format);
}

/// Logs to stderr in `format`, filtered by `RUST_LOG` (default `info`).
pub fn init_logging_as(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
        // Functions and services log to files: colour codes only on a terminal.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

/// Everything that can go wrong inside a function. Messages name tensors and shapes,
/// never values; what a peer sees is mapped separately at the gRPC edge.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bad arguments or local setup (PKI, listener).
    #[error("configuration: {0}")]
    Config(String),
    /// Process hardening failed; the function refuses to ask for keys.
    #[error("hardening: {0}")]
    Hardening(String),
    /// The broker could not be reached or answered unexpectedly.
    #[error("key broker: {0}")]
    Broker(String),
    /// The quoting agent could not produce evidence.
    #[error("attestation: {0}")]
    Attestation(String),
    /// The broker refused to release keys (the reason it gave).
    #[error("attestation refused: {0}")]
    AttestationRefused(String),
    /// The shard store could not provide the shard, or it was not the signed one.
    #[error("shard store: {0}")]
    Store(String),
    /// An envelope or key failed (tampered shard, malformed key, ...).
    #[error(transparent)]
    Keys(shardseal_keys::Error),
    /// Activations did not open: tampered, replayed into another request or hop, or
    /// sealed to another stage.
    #[error("activations refused: they do not open for this request, hop and stage")]
    ActivationRefused,
    /// The decrypted activations are not a valid tensor bundle.
    #[error("activations: {0}")]
    Tensor(shardseal_proto::tensor::TensorError),
    /// The decrypted shard is not a loadable ONNX model.
    #[error("model load failed: {0}")]
    ModelLoad(String),
    /// A tensor the shard declares was not among the activations.
    #[error("missing input tensor {0:?}")]
    MissingInput(String),
    /// A tensor arrived with another type or shape than the shard declares.
    #[error("input {name:?}: expected {expected}, got {actual}")]
    InputMismatch {
        /// The tensor.
        name: String,
        /// Declared type and shape.
        expected: String,
        /// Received type and shape.
        actual: String,
    },
    /// A model input holds NaN or infinity, which ShardSeal refuses (see
    /// [`HostTensor::first_non_finite`](shardseal_proto::tensor::HostTensor::first_non_finite)).
    #[error(
        "input {name:?} holds NaN or infinity at element {index}: only finite inputs are served"
    )]
    NonFiniteInput {
        /// The tensor.
        name: String,
        /// The first such element, in row-major order.
        index: usize,
    },
    /// tract failed while running the shard.
    #[error("inference failed: {0}")]
    Inference(String),
    /// The broker's lease on the stage's keys ran out before it could be renewed (the
    /// broker was unreachable): the function stops serving.
    #[error("the key lease expired before the key broker renewed it")]
    LeaseExpired,
}
