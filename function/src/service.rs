//! The `StageFunction` gRPC service: open, run, seal.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardseal_keys::{
    ActivationContext, Direction, RecipientPublicKey, RequestId, Sealed, TAG_LEN, open_activation,
    seal_activation_in_place,
};
use shardseal_proto::tensor::{HostTensor, decode_bundle_shared, encode_bundle_with_spare};
use shardseal_proto::tls::{Pki, Role};
use shardseal_proto::v1::stage_function_server::{StageFunction, StageFunctionServer};
use shardseal_proto::v1::{
    ProcessRequest, ProcessResponse, ReadyRequest, ReadyResponse, RequestHeader, StageTiming,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::cold_start::AttestedStage;
use crate::{Error, WipeOnFree};

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
    runs: Runs,
}

/// How requests reach the engine.
#[derive(Debug, Clone)]
enum Runs {
    /// Each on its own, holding one of [`inference_slots`] permits.
    OneByOne(Arc<tokio::sync::Semaphore>),
    /// One run at a time, of whatever waits for the stage (see [`Batcher`]).
    Batched(BatchedRuns),
}

/// How a batching stage's requests reach its one run at a time.
#[derive(Debug, Clone)]
struct BatchedRuns {
    /// The stage's single permit to run: held by the [`Batcher`] for each batch, or by a
    /// request that found the stage idle and runs alone, on its own thread.
    engine: Arc<tokio::sync::Semaphore>,
    /// Requests for the [`Batcher`] to run with whichever others wait.
    queue: mpsc::UnboundedSender<BatchJob>,
}

impl BatchedRuns {
    /// Runs that feed `queue`, with the stage's permit free.
    fn new(queue: mpsc::UnboundedSender<BatchJob>) -> Self {
        Self {
            engine: Arc::new(tokio::sync::Semaphore::new(1)),
            queue,
        }
    }
}

/// One request's opened inputs, and where its outputs go.
struct BatchJob {
    inputs: Vec<HostTensor>,
    done: oneshot::Sender<Result<Ran, Error>>,
}

/// A request's outputs from a run, the run's time, and how many requests shared it.
struct Ran {
    outputs: Vec<HostTensor>,
    inputs: Vec<HostTensor>,
    run_ms: f64,
    batch: usize,
}

impl StageService {
    /// A service for a stage that finished its cold start. It needs a Tokio runtime when
    /// the stage batches (its batcher runs as a task).
    pub fn new(stage: AttestedStage) -> Self {
        let stage = Arc::new(stage);
        let runs = if stage.engine.max_batch() > 1 {
            let (queue, waiting) = mpsc::unbounded_channel();
            let runs = BatchedRuns::new(queue);
            tokio::spawn(Batcher::run(stage.clone(), runs.engine.clone(), waiting));
            Runs::Batched(runs)
        } else {
            Runs::OneByOne(Arc::new(tokio::sync::Semaphore::new(inference_slots())))
        };
        Self { stage, runs }
    }

    /// The stage this service serves, shared with the task that renews its key lease.
    pub(crate) fn shared_stage(&self) -> Arc<AttestedStage> {
        self.stage.clone()
    }

    /// Opens one request's activations into the tensors the stage takes, checked. Errors
    /// name what failed, never a value.
    fn open(
        stage: &AttestedStage,
        header: &RequestHeader,
        sealed: &Sealed,
    ) -> Result<Vec<HostTensor>, Error> {
        let request_id = RequestId::from_slice(&header.request_id).map_err(Error::Keys)?;
        let inbound = ActivationContext {
            deployment: stage.deployment.clone(),
            request_id,
            hop: stage.stage.0,
            direction: Direction::TowardNextStage,
        };
        let plaintext = open_activation(&stage.stage_key, &inbound, sealed)
            .map_err(|_| Error::ActivationRefused)?;
        // Each tensor's values are copied once, out of the plaintext, which wipes itself
        // when the decoder lets go of it.
        let inputs = decode_bundle_shared(plaintext.into_shared()).map_err(Error::Tensor)?;
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
        Ok(inputs)
    }

    /// Seals what leaves this stage for the next hop (the next stage, or the client):
    /// the stage's outputs and the tensors it forwards as they came (skip connections,
    /// model inputs needed later, outputs made earlier), in the manifest's order.
    fn seal(
        stage: &AttestedStage,
        header: &RequestHeader,
        inputs: Vec<HostTensor>,
        mut outputs: Vec<HostTensor>,
    ) -> Result<Sealed, Error> {
        for name in &stage.outputs {
            if outputs.iter().all(|o| o.name() != name) {
                let forwarded = inputs
                    .iter()
                    .find(|t| t.name() == name)
                    .ok_or_else(|| Error::MissingInput(name.clone()))?;
                outputs.push(forwarded.clone());
            }
        }
        // Tensors wipe their values themselves (here and below).
        WipeOnFree::free_unwiped(inputs);
        // Only what the next hop needs leaves, in the manifest's order.
        outputs.retain(|o| stage.outputs.iter().any(|n| n == o.name()));
        outputs.sort_by_key(|o| stage.outputs.iter().position(|n| n == o.name()));

        let request_id = RequestId::from_slice(&header.request_id).map_err(Error::Keys)?;
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
        // Encoded once, then encrypted where it lies: the bundle's buffer leaves as the
        // ciphertext.
        let mut bundle = encode_bundle_with_spare(&outputs, TAG_LEN);
        WipeOnFree::free_unwiped(outputs);
        seal_activation_in_place(&recipient, &outbound, std::mem::take(&mut *bundle))
            .map_err(Error::Keys)
    }

    /// Opens, runs and reseals one request's activations on this thread.
    fn process_sealed(
        stage: &AttestedStage,
        header: &RequestHeader,
        sealed: Sealed,
    ) -> Result<(Sealed, StageTiming, usize), Error> {
        let t0 = Instant::now();
        let inputs = Self::open(stage, header, &sealed)?;
        drop(sealed);
        let (sealed, timing) = Self::run_and_seal(stage, header, inputs, t0, None)?;
        Ok((sealed, timing, 1))
    }

    /// Runs one opened request (opening began at `t0`) and seals its outputs, letting go
    /// of `run_permit`, if any, as soon as the run ends.
    fn run_and_seal(
        stage: &AttestedStage,
        header: &RequestHeader,
        inputs: Vec<HostTensor>,
        t0: Instant,
        run_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<(Sealed, StageTiming), Error> {
        let t1 = Instant::now();
        let outputs = stage.engine.run(&inputs);
        drop(run_permit);
        let t2 = Instant::now();
        let sealed = Self::seal(stage, header, inputs, outputs?)?;
        let t3 = Instant::now();
        Ok((sealed, timing(stage, [t0, t1, t2, t3])))
    }

    /// As [`StageService::process_sealed`], for a batching stage. A request that finds the
    /// stage idle (nothing running, nothing waiting to) runs at once, alone, on the thread
    /// that opened it, as it would unbatched. Otherwise its run is the [`Batcher`]'s, with
    /// whichever other requests wait for the stage at the time; it is opened and sealed on
    /// blocking threads of its own.
    async fn process_batched(
        stage: Arc<AttestedStage>,
        runs: &BatchedRuns,
        header: RequestHeader,
        sealed: Sealed,
    ) -> Result<(Sealed, StageTiming, usize), Error> {
        let opening = stage.clone();
        let opened_header = header.clone();
        let engine = runs.engine.clone();
        let opened = blocking(move || {
            let t0 = Instant::now();
            let inputs = Self::open(&opening, &opened_header, &sealed)?;
            drop(sealed);
            // What would fail the run fails this request alone, before it joins a batch.
            opening.engine.check_inputs(&inputs)?;
            // A permit released while the batcher waits goes to the batcher, so a request
            // never runs ahead of a batch that is already waiting.
            let Ok(permit) = engine.try_acquire_owned() else {
                return Ok(Opened::ToBatch(inputs, ms_since(t0)));
            };
            observe_batch(&opening, 1);
            let (sealed, timing) =
                Self::run_and_seal(&opening, &opened_header, inputs, t0, Some(permit))?;
            Ok(Opened::RanAlone(sealed, timing))
        })
        .await?;
        let (inputs, open_ms) = match opened {
            Opened::RanAlone(sealed, timing) => return Ok((sealed, timing, 1)),
            Opened::ToBatch(inputs, open_ms) => (inputs, open_ms),
        };
        let (done, ran) = oneshot::channel();
        runs.queue
            .send(BatchJob { inputs, done })
            .map_err(|_| Error::Inference("the stage's batcher stopped".into()))?;
        let ran = ran
            .await
            .map_err(|_| Error::Inference("the stage's batcher stopped".into()))??;
        let (run_ms, batch) = (ran.run_ms, ran.batch);
        let stage_index = stage.stage.0;
        let (sealed, seal_ms) = blocking(move || {
            let t = Instant::now();
            let sealed = Self::seal(&stage, &header, ran.inputs, ran.outputs)?;
            Ok((sealed, ms_since(t)))
        })
        .await?;
        let timing = StageTiming {
            stage: stage_index,
            open_ms,
            run_ms,
            seal_ms,
        };
        Ok((sealed, timing, batch))
    }
}

/// A batching stage's request once opened: run at once, alone, and sealed; or to be run
/// by the [`Batcher`] (its inputs, and how long opening took).
enum Opened {
    RanAlone(Sealed, StageTiming),
    ToBatch(Vec<HostTensor>, f64),
}

/// Counts one run of `requests` in `shardseal_function_batch_requests`.
fn observe_batch(stage: &AttestedStage, requests: usize) {
    shardseal_proto::metrics::global()
        .histogram(
            "shardseal_function_batch_requests",
            "Requests per run of a batching stage (one observation per run).",
            BATCH_BUCKETS,
            &[
                ("model", stage.model.as_str()),
                ("stage", &stage.stage.0.to_string()),
            ],
        )
        .observe(requests as f64);
}

/// The timing of one request's open, run and seal, from their four instants.
fn timing(stage: &AttestedStage, [t0, t1, t2, t3]: [Instant; 4]) -> StageTiming {
    let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
    StageTiming {
        stage: stage.stage.0,
        open_ms: ms(t0, t1),
        run_ms: ms(t1, t2),
        seal_ms: ms(t2, t3),
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Runs `work` on a blocking thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| Error::Inference("the stage's worker failed".into()))?
}

/// Bucket bounds of `shardseal_function_batch_requests`: requests per run.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Gathers the requests waiting for a batching stage into runs of up to
/// [`StageEngine::max_batch`](crate::StageEngine::max_batch) requests, one run at a time.
///
/// A run starts as soon as the previous one ends and takes every request waiting at that
/// moment (up to the maximum), and requests that arrive during a run share the next.
/// Nothing waits for a batch to fill, and a request that finds the stage idle does not
/// come here at all: it runs at once, alone, on the thread that opened it (see
/// [`StageService::process_batched`]), holding the same permit a batch does.
///
/// One run at a time, not one per core: the requests that queue behind it make the next
/// batch larger, and larger batches are what pays. On an MLP with 50 MB of weights at 16
/// requests in flight (`shardseal bench --max-batch 8`), one run at a time served 1316
/// requests per second with 3.8 requests per run; two at a time, 1207 with 2.6 (unbatched:
/// 780 and 824).
struct Batcher;

impl Batcher {
    async fn run(
        stage: Arc<AttestedStage>,
        engine: Arc<tokio::sync::Semaphore>,
        mut waiting: mpsc::UnboundedReceiver<BatchJob>,
    ) {
        let max = stage.engine.max_batch();
        while let Some(first) = waiting.recv().await {
            // Never closed: held by a request running alone, the permit comes back when its
            // run ends, and the requests that arrived meanwhile join this batch.
            let Ok(permit) = engine.clone().acquire_owned().await else {
                return;
            };
            let mut jobs = vec![first];
            while jobs.len() < max {
                match waiting.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            // A caller that went away while waiting needs no run.
            jobs.retain(|job| !job.done.is_closed());
            if jobs.is_empty() {
                continue;
            }
            let stage = stage.clone();
            // A run that panicked answers nobody: its callers see the batcher's channel
            // closed, and the next run goes on.
            let _ = tokio::task::spawn_blocking(move || {
                Self::run_jobs(&stage, jobs);
                drop(permit);
            })
            .await;
        }
    }

    /// Runs `jobs` as one batch and answers each.
    fn run_jobs(stage: &AttestedStage, jobs: Vec<BatchJob>) {
        let batch = jobs.len();
        observe_batch(stage, batch);
        let (inputs, answers): (Vec<_>, Vec<_>) =
            jobs.into_iter().map(|job| (job.inputs, job.done)).unzip();
        let t = Instant::now();
        let result = stage.engine.run_batch(&inputs);
        let run_ms = ms_since(t);
        match result {
            Ok(outputs) => {
                for ((outputs, inputs), done) in outputs.into_iter().zip(inputs).zip(answers) {
                    let _ = done.send(Ok(Ran {
                        outputs,
                        inputs,
                        run_ms,
                        batch,
                    }));
                }
            }
            Err(e) => {
                for done in answers {
                    let _ = done.send(Err(Error::Inference(e.to_string())));
                }
            }
        }
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
        let result = match &self.runs {
            Runs::Batched(runs) => Self::process_batched(stage, runs, header, sealed).await,
            Runs::OneByOne(slots) => {
                // Never closed, so acquiring fails only if the semaphore were; held until
                // the inference ends, even if the caller goes away meanwhile.
                let slot = Arc::clone(slots)
                    .acquire_owned()
                    .await
                    .map_err(|_| Status::internal("the stage's worker failed"))?;
                blocking(move || {
                    let processed = Self::process_sealed(&stage, &header, sealed);
                    drop(slot);
                    processed
                })
                .await
            }
        };
        match result {
            Ok((sealed, timing, batch)) => {
                tracing::info!(
                    open_ms = timing.open_ms,
                    run_ms = timing.run_ms,
                    seal_ms = timing.seal_ms,
                    batch,
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use shardseal_attestation::{ModelId, ModelVersion, StageIndex};
    use shardseal_keys::{RecipientPrivateKey, seal_activation};
    use shardseal_proto::tensor::encode_bundle;
    use shardseal_proto::v1::{ColdStart, SignedBlob};
    use shardseal_testkit::models::{self, Mlp};

    use super::*;
    use crate::StageEngine;

    /// The one stage of a small MLP, loaded to batch up to 4 requests.
    fn batching_stage() -> Arc<AttestedStage> {
        let onnx = models::mlp(&Mlp {
            batch: 1,
            input: 8,
            hidden: vec![16],
            output: 4,
            seed: 7,
        });
        let engine = StageEngine::load_batched(&onnx, 4).unwrap();
        assert_eq!(engine.max_batch(), 4, "the test model batches");
        let outputs = engine.outputs().to_vec();
        Arc::new(AttestedStage {
            model: ModelId::new("mlp").unwrap(),
            version: ModelVersion(1),
            stage: StageIndex(0),
            stage_count: 1,
            deployment: "test".into(),
            stage_key: RecipientPrivateKey::generate().unwrap(),
            next_stage_key: None,
            engine,
            outputs,
            token: Mutex::new(SignedBlob::default()),
            lease: crate::lease::Lease::forever(),
            cold_start: ColdStart::default(),
            timings: Default::default(),
        })
    }

    /// A request with these input values, sealed to the stage, and the key its answer is
    /// sealed to.
    fn request(
        stage: &AttestedStage,
        values: &[f32],
    ) -> (RequestHeader, Sealed, RecipientPrivateKey) {
        let request_id = RequestId::random().unwrap();
        let response_key = RecipientPrivateKey::generate().unwrap();
        let context = ActivationContext {
            deployment: stage.deployment.clone(),
            request_id,
            hop: 0,
            direction: Direction::TowardNextStage,
        };
        let sealed = seal_activation(
            &stage.stage_key.public_key(),
            &context,
            &encode_bundle(&inputs(stage, values)),
        )
        .unwrap();
        let header = RequestHeader {
            model_id: "mlp".into(),
            version: 1,
            request_id: request_id.as_bytes().to_vec(),
            response_key: response_key.public_key().as_bytes().to_vec(),
        };
        (header, sealed, response_key)
    }

    /// Opens a stage's answer as the client would.
    fn answer(
        stage: &AttestedStage,
        header: &RequestHeader,
        key: &RecipientPrivateKey,
        sealed: &Sealed,
    ) -> Vec<HostTensor> {
        let context = ActivationContext {
            deployment: stage.deployment.clone(),
            request_id: RequestId::from_slice(&header.request_id).unwrap(),
            hop: 1,
            direction: Direction::TowardClient,
        };
        let plaintext = open_activation(key, &context, sealed).unwrap();
        decode_bundle_shared(plaintext.into_shared()).unwrap()
    }

    #[tokio::test]
    async fn a_request_at_an_idle_batching_stage_runs_without_the_batcher() {
        let stage = batching_stage();
        // No batcher: its queue's far end is gone, so a request sent there would fail.
        let (queue, _) = mpsc::unbounded_channel();
        let runs = BatchedRuns::new(queue);
        let values: Vec<f32> = (0..8).map(|i| i as f32 / 8.0 - 0.5).collect();
        let (header, sealed, key) = request(&stage, &values);
        let (answer_sealed, _, batch) =
            StageService::process_batched(stage.clone(), &runs, header.clone(), sealed)
                .await
                .expect("served alone");
        assert_eq!(batch, 1);
        let expected = stage.engine.run(&inputs(&stage, &values)).unwrap();
        assert_eq!(answer(&stage, &header, &key, &answer_sealed), expected);
        assert_eq!(
            runs.engine.available_permits(),
            1,
            "the run gave its permit back"
        );
    }

    #[tokio::test]
    async fn a_request_waits_for_a_run_in_progress_and_joins_the_next_batch() {
        let stage = batching_stage();
        let (queue, mut waiting) = mpsc::unbounded_channel();
        let runs = BatchedRuns::new(queue);
        // A run in progress holds the stage's permit.
        let running = runs.engine.clone().try_acquire_owned().unwrap();
        let values: Vec<f32> = (0..8).map(|i| 0.25 - i as f32 / 16.0).collect();
        let (header, sealed, key) = request(&stage, &values);
        let mut served = tokio::spawn({
            let (stage, runs, header) = (stage.clone(), runs.clone(), header.clone());
            async move { StageService::process_batched(stage, &runs, header, sealed).await }
        });
        // The request does not run beside it: it goes to the batcher's queue, opened.
        let job = tokio::select! {
            job = waiting.recv() => job.expect("queued for the next batch"),
            _ = &mut served => panic!("served beside a run in progress"),
        };
        assert!(!served.is_finished());
        assert_eq!(job.inputs, inputs(&stage, &values));
        // As the batcher does once the permit is back: run it with whatever waits.
        drop(running);
        let permit = runs.engine.clone().try_acquire_owned().unwrap();
        Batcher::run_jobs(&stage, vec![job]);
        drop(permit);
        let (answer_sealed, _, _) = served.await.unwrap().expect("served by the batch");
        let expected = stage.engine.run(&inputs(&stage, &values)).unwrap();
        assert_eq!(answer(&stage, &header, &key, &answer_sealed), expected);
    }

    /// The stage's one input, holding `values`.
    fn inputs(stage: &AttestedStage, values: &[f32]) -> Vec<HostTensor> {
        let spec = &stage.engine.inputs()[0];
        vec![HostTensor::from_f32(spec.name.clone(), spec.shape.clone(), values).unwrap()]
    }
}
