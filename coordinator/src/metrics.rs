//! The coordinator's Prometheus metrics: requests and their latency, requests shed at
//! admission, per-stage latency, requests waiting for a replica, replicas, cold starts. Recorded into
//! [`shardseal_proto::metrics::global`]; every name is documented in `docs/operator.md`.
//!
//! Labels are model ids (only models the router has deployed, so a client cannot grow
//! the label set with made-up names), stage indexes, gRPC code names and outcomes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shardseal_attestation::ModelId;
pub use shardseal_proto::metrics::code_name;
use shardseal_proto::metrics::{LATENCY_BUCKETS, global};
use shardseal_proto::v1::StageTiming;
use tonic::Code;

use crate::platform::{Platform, PlatformError, Replica, StageRef};
use crate::router::Router;

/// Requests answered, by model and gRPC code.
pub const REQUESTS_TOTAL: &str = "shardseal_coordinator_requests_total";
/// Requests refused at admission, before their body was decoded (`--max-in-flight`
/// reached): no model to label them with, and not in [`REQUESTS_TOTAL`].
pub const SHED_TOTAL: &str = "shardseal_coordinator_shed_total";
/// Whole-request latency, by model.
pub const REQUEST_DURATION: &str = "shardseal_coordinator_request_duration_seconds";
/// Per-stage latency (open, run and seal, as the function reports it), by model and stage.
pub const STAGE_DURATION: &str = "shardseal_coordinator_stage_duration_seconds";
/// Requests waiting for a replica, by model and stage.
pub const QUEUE_DEPTH: &str = "shardseal_coordinator_queue_depth";
/// Ready replicas, by model and stage.
pub const REPLICAS: &str = "shardseal_coordinator_replicas";
/// Cold starts, by model, stage and outcome (`ok`, `failed`).
pub const COLD_STARTS_TOTAL: &str = "shardseal_coordinator_cold_starts_total";
/// Cold-start latency (process start to ready), by model and stage.
pub const COLD_START_DURATION: &str = "shardseal_coordinator_cold_start_duration_seconds";

/// The label used for a request whose model is not deployed (a refused or unknown name).
pub const UNKNOWN_MODEL: &str = "_unknown";

/// [`SHED_TOTAL`], created at zero so a scrape shows it before the first shed.
pub fn shed_counter() -> Arc<shardseal_proto::metrics::Counter> {
    global().counter(
        SHED_TOTAL,
        "Requests refused at admission, before decoding, because the coordinator was at \
         --max-in-flight.",
        &[],
    )
}

/// Records one answered request: its code, its total latency and, when it succeeded, each
/// stage's reported latency.
pub async fn record_request(
    router: &Router,
    model: &str,
    code: Code,
    timings: &[StageTiming],
    took: Duration,
) {
    let deployed = match ModelId::new(model) {
        Ok(id) => router.models().await.contains(&id),
        Err(_) => false,
    };
    let model = if deployed { model } else { UNKNOWN_MODEL };
    let registry = global();
    registry
        .counter(
            REQUESTS_TOTAL,
            "Requests answered by the coordinator, by model and gRPC status code.",
            &[("model", model), ("code", code_name(code))],
        )
        .inc();
    registry
        .histogram(
            REQUEST_DURATION,
            "Whole-request latency at the coordinator, in seconds.",
            LATENCY_BUCKETS,
            &[("model", model)],
        )
        .observe_duration(took);
    for timing in timings {
        let stage = timing.stage.to_string();
        registry
            .histogram(
                STAGE_DURATION,
                "Per-stage latency reported by the function (open, run, seal), in seconds.",
                LATENCY_BUCKETS,
                &[("model", model), ("stage", &stage)],
            )
            .observe((timing.open_ms + timing.run_ms + timing.seal_ms) / 1e3);
    }
}

/// Sets the replica and queue-depth gauges of every deployed stage (called at scrape time).
pub async fn refresh_gauges(router: &Router) {
    let registry = global();
    for model in router.models().await {
        let replicas = router.replica_counts(&model).await;
        let waiting = router.queue_depths(&model).await;
        for (stage, count) in replicas.iter().enumerate() {
            let stage_label = stage.to_string();
            let labels = [("model", model.as_str()), ("stage", stage_label.as_str())];
            registry
                .gauge(REPLICAS, "Ready replicas per stage.", &labels)
                .set(i64::try_from(*count).unwrap_or(i64::MAX));
            registry
                .gauge(
                    QUEUE_DEPTH,
                    "Requests held waiting for a replica of the stage (scale from zero, cold starts).",
                    &labels,
                )
                .set(i64::try_from(waiting.get(stage).copied().unwrap_or(0)).unwrap_or(i64::MAX));
        }
    }
}

/// A platform that counts and times its cold starts.
pub struct MeteredPlatform {
    inner: Arc<dyn Platform>,
}

impl MeteredPlatform {
    /// Meters the cold starts of `inner`.
    pub fn new(inner: Arc<dyn Platform>) -> Self {
        Self { inner }
    }
}

#[tonic::async_trait]
impl Platform for MeteredPlatform {
    async fn start_replica(&self, stage: &StageRef) -> Result<Replica, PlatformError> {
        let began = Instant::now();
        let result = self.inner.start_replica(stage).await;
        let (model, index) = (stage.model.as_str(), stage.stage.0.to_string());
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        let registry = global();
        registry
            .counter(
                COLD_STARTS_TOTAL,
                "Function cold starts (start to ready), by outcome.",
                &[("model", model), ("stage", &index), ("outcome", outcome)],
            )
            .inc();
        if result.is_ok() {
            registry
                .histogram(
                    COLD_START_DURATION,
                    "Cold-start latency of a function (start to ready: attest, fetch, decrypt, load), in seconds.",
                    LATENCY_BUCKETS,
                    &[("model", model), ("stage", &index)],
                )
                .observe_duration(began.elapsed());
        }
        result
    }

    async fn stop_replica(&self, replica: &Replica) {
        self.inner.stop_replica(replica).await;
    }

    async fn shutdown(&self) {
        self.inner.shutdown().await;
    }
}
