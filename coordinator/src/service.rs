//! The coordinator's gRPC front door for data owners.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardseal_attestation::{ModelId, ModelVersion};
use shardseal_audit::{AuditEvent, AuditWriter, Outcome, RequestId};
use shardseal_keys::{PipelineManifest, VerifyingKey, from_blob};
use shardseal_proto::request_id;
use shardseal_proto::tls::{Pki, Role};
use shardseal_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use shardseal_proto::v1::key_broker_client::KeyBrokerClient;
use shardseal_proto::v1::{
    GetPipelineRequest, InferRequest, InferResponse, PipelineManifestRequest, RequestHeader,
    Sealed, SignedBlob,
};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};

use crate::router::{Catalog, MAX_MESSAGE_BYTES, Routed, Router};

/// The broker as the catalog of servable models: a model's stage count comes from its
/// broker-signed pipeline manifest (public data; the coordinator checks the signature
/// against the broker key it was given, so a spoofed broker cannot make it deploy).
pub struct BrokerCatalog {
    broker: KeyBrokerClient<Channel>,
    broker_key: Option<VerifyingKey>,
}

impl BrokerCatalog {
    /// A catalog over `broker`, trusting manifests signed by `broker_key` (when given).
    pub fn new(broker: KeyBrokerClient<Channel>, broker_key: Option<VerifyingKey>) -> Self {
        Self { broker, broker_key }
    }
}

#[tonic::async_trait]
impl Catalog for BrokerCatalog {
    async fn stage_count(&self, model: &ModelId) -> Result<u32, Status> {
        let blob = self
            .broker
            .clone()
            .get_pipeline_manifest(PipelineManifestRequest {
                model_id: model.to_string(),
            })
            .await?
            .into_inner();
        let signed = from_blob::<PipelineManifest>(&blob)
            .map_err(|_| Status::unavailable("the broker sent a malformed manifest"))?;
        let key = self.broker_key.unwrap_or_else(|| signed.signer());
        let manifest = signed
            .verify(&key)
            .map_err(|_| Status::unavailable("the broker's manifest does not verify"))?;
        Ok(manifest.stage_count)
    }
}

/// The `Coordinator` service: relays the broker's pipeline manifests and routes sealed
/// requests.
pub struct CoordinatorService {
    router: Arc<Router>,
    broker: KeyBrokerClient<Channel>,
    audit: Option<Arc<AuditWriter>>,
}

impl CoordinatorService {
    /// A service over `router` that fetches pipeline manifests from `broker`.
    pub fn new(router: Arc<Router>, broker: KeyBrokerClient<Channel>) -> Self {
        Self {
            router,
            broker,
            audit: None,
        }
    }

    /// Records every request in `audit`: id, model, stages, sealed sizes, durations and
    /// outcome, never a tensor value. An entry is written before the client gets its
    /// answer, so a request a client saw answered is never missing from the log.
    pub fn with_audit(mut self, audit: Arc<AuditWriter>) -> Self {
        self.audit = Some(audit);
        self
    }

    /// Appends the entry for one request. A failed write is logged, not sent to the
    /// client: the request's own outcome stands.
    async fn record(&self, event: AuditEvent) {
        let Some(audit) = self.audit.clone() else {
            return;
        };
        let written = tokio::task::spawn_blocking(move || audit.append(&event)).await;
        match written {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "audit entry not written"),
            Err(e) => tracing::error!(error = %e, "audit writer task failed"),
        }
    }
}

/// The audit entry of one routed request, or `None` when the request named no valid model
/// or request id (there is nothing to file it under; the router refused it).
fn request_event(
    header: &RequestHeader,
    input_bytes: u64,
    result: &Result<Routed, Status>,
    total: Duration,
) -> Option<AuditEvent> {
    let model = ModelId::new(header.model_id.clone()).ok()?;
    let request_id = RequestId::from_bytes(&header.request_id).ok()?;
    let micros = |ms: f64| (ms * 1e3).round() as u64;
    let (stages, output_bytes, stage_us, outcome) = match result {
        Ok(routed) => (
            routed.timings.len() as u32,
            sealed_len(&routed.output),
            routed
                .timings
                .iter()
                .map(|t| micros(t.open_ms + t.run_ms + t.seal_ms))
                .collect(),
            Outcome::Ok,
        ),
        Err(status) => (0, 0, Vec::new(), outcome_of(status)),
    };
    Some(AuditEvent::Request {
        request_id,
        model,
        version: ModelVersion(header.version),
        stages,
        input_bytes,
        output_bytes,
        stage_us,
        total_us: u64::try_from(total.as_micros()).unwrap_or(u64::MAX),
        outcome,
        failed_stage: None,
    })
}

fn sealed_len(sealed: &Sealed) -> u64 {
    (sealed.enc.len() + sealed.ciphertext.len()) as u64
}

/// How a refused or failed request is filed.
fn outcome_of(status: &Status) -> Outcome {
    use tonic::Code;
    match status.code() {
        Code::InvalidArgument | Code::NotFound | Code::OutOfRange => Outcome::InvalidRequest,
        Code::PermissionDenied | Code::Unauthenticated | Code::FailedPrecondition => {
            Outcome::Denied
        }
        Code::DeadlineExceeded => Outcome::Timeout,
        Code::ResourceExhausted => Outcome::Overloaded,
        Code::Cancelled => Outcome::Cancelled,
        _ => Outcome::StageFailed,
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    #[tracing::instrument(skip_all, fields(model = %request.get_ref().model_id))]
    async fn get_pipeline(
        &self,
        request: Request<GetPipelineRequest>,
    ) -> Result<Response<SignedBlob>, Status> {
        // Relayed unchanged: the client checks the broker's signature, so a coordinator
        // that altered it would only make the client refuse.
        let model_id = request.into_inner().model_id;
        self.broker
            .clone()
            .get_pipeline_manifest(PipelineManifestRequest { model_id })
            .await
    }

    #[tracing::instrument(skip_all, fields(model, request_id))]
    async fn infer(
        &self,
        request: Request<InferRequest>,
    ) -> Result<Response<InferResponse>, Status> {
        let deadline = grpc_timeout(request.metadata());
        let supplied_id = request_id::from_metadata(request.metadata());
        let InferRequest { header, input } = request.into_inner();
        let header = header.ok_or_else(|| Status::invalid_argument("missing request header"))?;
        let input = input.ok_or_else(|| Status::invalid_argument("missing sealed input"))?;
        // The id that ties this request's log lines together in every process: the
        // client's, if it sent one, else the request's own (the audit log's) id.
        let sealed_id = hex::encode(&header.request_id);
        let correlation_id = supplied_id.unwrap_or_else(|| sealed_id.clone());
        tracing::Span::current()
            .record("model", header.model_id.as_str())
            .record("request_id", correlation_id.as_str());
        if correlation_id != sealed_id {
            tracing::info!(audit_id = %sealed_id, "request id supplied by the client");
        }
        let started = Instant::now();
        let input_bytes = sealed_len(&input);
        let model = header.model_id.clone();
        let audit_header = self.audit.is_some().then(|| header.clone());
        let result =
            request_id::scope(correlation_id, self.router.route(header, input, deadline)).await;
        let took = started.elapsed();
        let (code, timings) = match &result {
            Ok(routed) => (tonic::Code::Ok, routed.timings.as_slice()),
            Err(status) => (status.code(), &[][..]),
        };
        crate::metrics::record_request(&self.router, &model, code, timings, took).await;
        tracing::info!(
            code = crate::metrics::code_name(code),
            total_ms = took.as_secs_f64() * 1e3,
            "request answered"
        );
        if let Some(header) = audit_header
            && let Some(event) = request_event(&header, input_bytes, &result, started.elapsed())
        {
            self.record(event).await;
        }
        let routed = result?;
        Ok(Response::new(InferResponse {
            output: Some(routed.output),
            timings: routed.timings,
        }))
    }
}

/// The message a client gets when the coordinator sheds its request.
const AT_CAPACITY: &str = "the coordinator is at capacity (--max-in-flight); retry later";

/// Serves the coordinator on `listener` over TLS until `shutdown` resolves.
///
/// A request is admitted before its body is decoded: at most `max_in_flight` calls (over
/// all connections) are decoded or served at once, and one more is refused at once with
/// RESOURCE_EXHAUSTED, its body never buffered past HTTP/2 flow control. The memory that
/// requests hold is so bounded by `max_in_flight` x [`MAX_MESSAGE_BYTES`] (times the few
/// copies a request makes on its way), whatever the number of clients. The router's own
/// admission counts the same requests, after decoding; this limit is what bounds memory.
pub async fn run(
    listener: TcpListener,
    pki: &Pki,
    service: CoordinatorService,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Status> {
    let tls = pki
        .server_config(Role::Coordinator)
        .map_err(|e| Status::internal(e.to_string()))?;
    let shed = crate::metrics::shed_counter();
    let admission = tower::ServiceBuilder::new()
        // tonic would name the shed "too many active requests for the connection"; the
        // limit is the coordinator's, over every connection.
        .map_err(move |error: tower::BoxError| -> tower::BoxError {
            if error.is::<tower::load_shed::error::Overloaded>() {
                shed.inc();
                Box::new(Status::resource_exhausted(AT_CAPACITY))
            } else {
                error
            }
        })
        .load_shed()
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            service.router.max_in_flight(),
        ))
        .into_inner();
    Server::builder()
        .tls_config(tls)
        .map_err(|e| Status::internal(e.to_string()))?
        .layer(admission)
        .add_service(
            CoordinatorServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            // Nagle's algorithm off on every accepted connection: a served incoming stream
            // ignores `Server::tcp_nodelay`, and with Nagle on each small HTTP/2 frame after
            // a response waits for the peer's delayed ACK (about 40 ms per hop).
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
        .map_err(|e| Status::internal(e.to_string()))
}

/// The client's deadline, from the standard `grpc-timeout` header.
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_grpc_timeouts() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout(&m), None);
        m.insert("grpc-timeout", "1500m".parse().unwrap());
        assert_eq!(grpc_timeout(&m), Some(Duration::from_millis(1500)));
        m.insert("grpc-timeout", "2S".parse().unwrap());
        assert_eq!(grpc_timeout(&m), Some(Duration::from_secs(2)));
        m.insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(grpc_timeout(&m), None);
    }
}
