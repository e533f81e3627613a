//! The serverless platform seam: where stage functions come from.
//!
//! The router asks a [`Platform`] for replicas of a stage and tells it when one died; it
//! never cares whether a replica is a child process on this machine ([`local`]) or a
//! Knative revision on a cluster. A replica is only an address the coordinator can dial
//! with its TLS client identity: the coordinator never learns what the function holds.

use std::fmt;
use std::net::SocketAddr;

pub mod local;
pub mod memory;

use shardseal_attestation::{ModelId, StageIndex};

/// What a replica serves: one stage of one model.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StageRef {
    /// The model.
    pub model: ModelId,
    /// The stage.
    pub stage: StageIndex,
}

impl fmt::Display for StageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.model, self.stage)
    }
}

/// A running function replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// Unique for the platform's lifetime.
    pub id: u64,
    /// What it serves.
    pub stage: StageRef,
    /// Where it listens (gRPC over TLS; the coordinator's client certificate required).
    pub addr: SocketAddr,
}

/// Why the platform could not provide a replica.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlatformError {
    /// The function process could not be started.
    #[error("could not start a function for {stage}: {reason}")]
    Spawn {
        /// The stage.
        stage: StageRef,
        /// What went wrong (no secrets: process errors and exit codes only).
        reason: String,
    },
    /// The function started but did not become ready in time.
    #[error("function for {stage} did not become ready within {seconds} s")]
    StartTimeout {
        /// The stage.
        stage: StageRef,
        /// The limit.
        seconds: u64,
    },
    /// The function exited during its cold start (e.g. its attestation was refused).
    #[error("function for {stage} exited during cold start: {reason}")]
    ColdStartFailed {
        /// The stage.
        stage: StageRef,
        /// Its exit status and last log line.
        reason: String,
    },
}

/// A source of stage function replicas.
#[tonic::async_trait]
pub trait Platform: Send + Sync + 'static {
    /// Starts one more replica of `stage` and returns it once it is ready to serve.
    async fn start_replica(&self, stage: &StageRef) -> Result<Replica, PlatformError>;

    /// Stops a replica (scale-in, or after it failed).
    async fn stop_replica(&self, replica: &Replica);

    /// Stops every replica (shutdown).
    async fn shutdown(&self);
}
