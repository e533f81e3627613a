//! The `StageFunction` gRPC service: open, run, seal.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardseal_keys::{
    ActivationContext, Direction, RecipientPublicKey, RequestId, Sealed, open_activation,
    seal_activation,
};
use shardseal_proto::tensor::{decode_bundle, encode_bundle};
use shardseal_proto::tls::{Pki, Role};
use shardseal_proto::v1::stage_function_server::{StageFunction, StageFunctionServer};
use shardseal_proto::v1::{
    ProcessRequest, ProcessResponse, ReadyRequest, ReadyResponse, RequestHeader, StageTiming,
};
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::Error;
use crate::cold_start::AttestedStage;

/// The largest sealed activation a function accepts (256 MiB).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// How many inferences a function runs at once: one per core it may use. More would not
/// finish sooner (tract runs each on one thread, and the cores are busy), but each would
/// hold its own activations; requests beyond wait, still sealed, for a slot.
pub(crate) fn inference_slots() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Serves one attested stage.
#[derive(Debug, Clone)]
pub struct StageService {
    stage: Arc<AttestedStage>,
    /// One permit per inference that may run at once ([`inference_slots`]).
    inference: Arc<tokio::sync::Semaphore>,
}

impl StageService {
    /// A service for a stage that finished its cold start.
    pub fn new(stage: AttestedStage) -> Self {
        Self {
            stage: Arc::new(stage),
            inference: Arc::new(tokio::sync::Semaphore::new(inference_slots())),
        }
    }

    /// The stage this service serves, shared with the task that renews its key lease.
    pub(crate) fn shared_stage(&self) -> Arc<AttestedStage> {
        self.stage.clone()
    }

    /// Opens, runs and reseals one request's activations. Errors name what failed,
    /// never a value.
    fn process_sealed(
        stage: &AttestedStage,
        header: &RequestHeader,
        sealed: Sealed,
    ) -> Result<(Sealed, StageTiming), Error> {
        let request_id = RequestId::from_slice(&header.request_id).map_err(Error::Keys)?;
        let inbound = ActivationContext {
            deployment: stage.deployment.clone(),
            request_id,
            hop: stage.stage.0,
            direction: Direction::TowardNextStage,
        };
        let t0 = Instant::now();
        let plaintext = open_activation(&stage.stage_key, &inbound, &sealed)
            .map_err(|_| Error::ActivationRefused)?;
        let inputs = decode_bundle(plaintext.expose_secret()).map_err(Error::Tensor)?;
        drop(plaintext);
        if stage.stage.0 == 0 {
            // The model's inputs, as the client sent them: the SDK refuses non-finite values
            // before sealing, and so does the first stage for any other client.
            if let Some((name, index)) = inputs
                .iter()
                .find_map(|t| t.first_non_finite().map(|i| (t.name().to_owned(), i)))
            {
                return Err(Error::NonFiniteInput { name, index });
            }
        }
        let t1 = Instant::now();

        let mut outputs = stage.engine.run(&inputs)?;
        // Tensors live across this stage that it does not produce are forwarded as they
        // came (skip connections, model inputs needed later, outputs made earlier).
        for name in &stage.outputs {
            if outputs.iter().all(|o| o.name() != name) {
                let forwarded = inputs
                    .iter()
                    .find(|t| t.name() == name)
                    .ok_or_else(|| Error::MissingInput(name.clone()))?;
                outputs.push(forwarded.clone());
            }
        }
        // Only what the next hop needs leaves, in the manifest's order.
        outputs.retain(|o| stage.outputs.iter().any(|n| n == o.name()));
        outputs.sort_by_key(|o| stage.outputs.iter().position(|n| n == o.name()));
        drop(inputs);
        let t2 = Instant::now();

        let last = stage.stage.0 + 1 == stage.stage_count;
        let (recipient, direction) = if last {
            let client =
                RecipientPublicKey::from_slice(&header.response_key).map_err(Error::Keys)?;
            (client, Direction::TowardClient)
        } else {
            let next = stage
                .next_stage_key
                .ok_or_else(|| Error::Config("no next-stage key for a middle stage".into()))?;
            (next, Direction::TowardNextStage)
        };
        let outbound = ActivationContext {
            deployment: stage.deployment.clone(),
            request_id,
            hop: stage.stage.0 + 1,
            direction,
        };
        let bundle = encode_bundle(&outputs);
        drop(outputs);
        let sealed = seal_activation(&recipient, &outbound, &bundle).map_err(Error::Keys)?;
        let t3 = Instant::now();
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        Ok((
            sealed,
            StageTiming {
                stage: stage.stage.0,
                open_ms: ms(t0, t1),
                run_ms: ms(t1, t2),
                seal_ms: ms(t2, t3),
            },
        ))
    }
}

#[tonic::async_trait]
impl StageFunction for StageService {
    #[tracing::instrument(skip_all, fields(stage = self.stage.stage.0, request_id))]
    async fn process(
        &self,
        request: Request<ProcessRequest>,
    ) -> Result<Response<ProcessResponse>, Status> {
        let supplied_id = shardseal_proto::request_id::from_metadata(request.metadata());
        let ProcessRequest {
            header,
            stage,
            activations,
        } = request.into_inner();
        let header = header.ok_or_else(|| Status::invalid_argument("missing request header"))?;
        // The coordinator's request id, so this line joins the request's other lines.
        let request_id = supplied_id.unwrap_or_else(|| hex::encode(&header.request_id));
        tracing::Span::current().record("request_id", request_id.as_str());
        let began = Instant::now();
        let result = self.process_checked(header, stage, activations).await;
        self.record(&result, began.elapsed());
        result
    }

    async fn ready(&self, _: Request<ReadyRequest>) -> Result<Response<ReadyResponse>, Status> {
        let s = &self.stage;
        Ok(Response::new(ReadyResponse {
            ready: true,
            model_id: s.model.to_string(),
            version: s.version.0,
            stage: s.stage.0,
            token: Some(s.token()),
            cold_start: Some(s.cold_start),
        }))
    }
}

impl StageService {
    /// Counts one request by code and records its latency.
    fn record(&self, result: &Result<Response<ProcessResponse>, Status>, took: Duration) {
        let code = match result {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        };
        let (model, stage) = (self.stage.model.as_str(), self.stage.stage.0.to_string());
        let registry = shardseal_proto::metrics::global();
        registry
            .counter(
                "shardseal_function_requests_total",
                "Requests a function answered, by gRPC status code.",
                &[
                    ("model", model),
                    ("stage", &stage),
                    ("code", shardseal_proto::metrics::code_name(code)),
                ],
            )
            .inc();
        registry
            .histogram(
                "shardseal_function_request_duration_seconds",
                "Latency of a request inside the function (checks, open, run, seal), in seconds.",
                shardseal_proto::metrics::LATENCY_BUCKETS,
                &[("model", model), ("stage", &stage)],
            )
            .observe_duration(took);
    }

    async fn process_checked(
        &self,
        header: RequestHeader,
        stage: u32,
        activations: Option<shardseal_proto::v1::Sealed>,
    ) -> Result<Response<ProcessResponse>, Status> {
        let this = &self.stage;
        // The process exits when its lease ends; this covers the moment in between.
        if this.lease_expired() {
            return Err(Status::unavailable("key lease expired; renewing"));
        }
        if header.model_id != this.model.as_str() || header.version != this.version.0 {
            return Err(Status::failed_precondition(format!(
                "this function serves {}@{}",
                this.model, this.version
            )));
        }
        if stage != this.stage.0 {
            return Err(Status::failed_precondition(format!(
                "this function serves stage {}, not {stage}",
                this.stage.0
            )));
        }
        let sealed = activations
            .ok_or_else(|| Status::invalid_argument("missing activations"))
            .and_then(|s| {
                Sealed::try_from(s).map_err(|_| Status::invalid_argument("malformed activations"))
            })?;
        let stage = self.stage.clone();
        // Never closed, so acquiring fails only if the semaphore were; held until the
        // inference ends, even if the caller goes away meanwhile.
        let slot = Arc::clone(&self.inference)
            .acquire_owned()
            .await
            .map_err(|_| Status::internal("the stage's worker failed"))?;
        let result = tokio::task::spawn_blocking(move || {
            let processed = Self::process_sealed(&stage, &header, sealed);
            drop(slot);
            processed
        })
        .await
        .map_err(|_| Status::internal("the stage's worker failed"))?;
        match result {
            Ok((sealed, timing)) => {
                tracing::info!(
                    open_ms = timing.open_ms,
                    run_ms = timing.run_ms,
                    seal_ms = timing.seal_ms,
                    "processed"
                );
                Ok(Response::new(ProcessResponse {
                    activations: Some(sealed.into()),
                    timing: Some(timing),
                }))
            }
            Err(e) => Err(to_status(&e)),
        }
    }
}

/// The one place a function error becomes what a peer sees: a code and a short, safe
/// message. The cause goes to the log.
fn to_status(error: &Error) -> Status {
    tracing::warn!(error = %error, "request refused");
    match error {
        Error::ActivationRefused => {
            Status::permission_denied("the activations do not open for this request, hop and stage")
        }
        Error::Tensor(_)
        | Error::MissingInput(_)
        | Error::InputMismatch { .. }
        | Error::NonFiniteInput { .. } => Status::invalid_argument(error.to_string()),
        Error::Keys(_) => Status::invalid_argument("malformed request keys or envelope"),
        _ => Status::internal("the stage failed to run this request"),
    }
}

/// Serves `service` over TLS (the coordinator's client certificate required) until
/// `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    pki: &Pki,
    service: StageService,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let tls = pki
        .server_config(Role::Function)
        .map_err(|e| Error::Config(e.to_string()))?;
    let server = Server::builder()
        .tls_config(tls)
        .map_err(|e| Error::Config(e.to_string()))?;
    serve_stage(server, listener, service, shutdown).await
}

/// Serves the stage on `listener` with `server` (TLS, or plaintext h2c behind a proxy)
/// until `shutdown` resolves: the one place the message limits and socket options are set.
pub(crate) async fn serve_stage(
    mut server: Server,
    listener: TcpListener,
    service: StageService,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    server
        .add_service(
            StageFunctionServer::new(service)
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
        .map_err(|e| Error::Config(format!("server: {e}")))
}
