//! The serverless platform seam: where stage functions come from.
//!
//! The router asks a [`Platform`] for replicas of a stage and tells it when one died; it
//! never cares whether a replica is a child process on this machine ([`local`]) or a
//! Knative revision on a cluster ([`static_endpoints`], endpoints it is given). A replica is
//! only an address the coordinator can dial with its TLS client identity: the coordinator
//! never learns what the function holds.

use std::fmt;

pub mod local;
pub mod memory;
pub mod static_endpoints;

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
    /// The URL the router dials: `https://host:port` (gRPC over TLS; the coordinator's
    /// client certificate required), or `http://host:port` (h2c) for a function whose
    /// transport a proxy terminates (see [`static_endpoints`]).
    pub endpoint: String,
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
    /// The platform has no endpoint configured for the stage.
    #[error("no endpoint is configured for {stage}")]
    NoEndpoint {
        /// The stage.
        stage: StageRef,
    },
    /// No configured endpoint of the stage answered `Ready` for it in time.
    #[error("no endpoint of {stage} is ready: {reason}")]
    Unhealthy {
        /// The stage.
        stage: StageRef,
        /// Each endpoint's failure (connection error, not ready, or serving another stage).
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
