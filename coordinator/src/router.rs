//! The router: carries one request's sealed activations from stage to stage.
//!
//! Every hop is a gRPC call to a replica of the stage, with the time left before the
//! request's deadline. A hop that fails because its replica died or became unreachable
//! is retried on another replica (started on demand); a hop the function refused (a
//! tampered or misaddressed activation) is not, since another replica would refuse it
//! too. The router sees only ciphertext and the request header: it cannot open what it
//! relays, and nothing here could, since it holds no key.
//!
//! Many requests are in flight at once, each on its own task, so stage 0 works on
//! request n+1 while stage 1 works on request n: the pipeline fills by itself.
//!
//! Replicas follow load per stage ([`crate::autoscale`]): a stage with none starts one on
//! its first request, and the requests that arrive meanwhile wait for it (up to their
//! deadline) instead of being refused; [`Router::spawn_autoscaler`] scales each stage out
//! under load, in when the load falls, and to zero when idle. Every invocation can be
//! recorded for billing ([`crate::billing`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shardseal_attestation::{ModelId, StageIndex};
use shardseal_proto::tls::{Pki, Role};
use shardseal_proto::v1::stage_function_client::StageFunctionClient;
use shardseal_proto::v1::{ProcessRequest, RequestHeader, Sealed, StageTiming};
use tokio::sync::{Notify, RwLock, Semaphore};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use crate::autoscale::{ScalingPolicy, StageScaler};
use crate::billing::{Invocation, UsageLog};
use crate::platform::{Platform, Replica, StageRef};

/// Limits that keep the router's memory and latency bounded.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Replicas started per stage when a model is deployed.
    pub initial_replicas: usize,
    /// Attempts per hop before the request fails (each on a different replica).
    pub max_attempts: usize,
    /// Deadline of a request that brings none.
    pub default_deadline: Duration,
    /// Requests in flight at once; more are refused with `RESOURCE_EXHAUSTED`.
    pub max_in_flight: usize,
    /// How replicas follow load (used by [`Router::spawn_autoscaler`]).
    pub scaling: ScalingPolicy,
    /// The memory size of every function, in MiB, as billed (and enforced by the
    /// platform).
    pub function_memory_mb: u64,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            initial_replicas: 1,
            max_attempts: 3,
            default_deadline: Duration::from_secs(30),
            max_in_flight: 256,
            scaling: ScalingPolicy::default(),
            function_memory_mb: 1024,
        }
    }
}

struct LiveReplica {
    replica: Replica,
    client: StageFunctionClient<Channel>,
    in_flight: AtomicUsize,
}

struct StagePool {
    stage: StageRef,
    replicas: RwLock<Vec<Arc<LiveReplica>>>,
    /// Cold starts under way. A request that finds no replica starts one only if none is
    /// starting, so a burst on a cold stage starts one replica, not fifty.
    starting: AtomicUsize,
    /// Requests waiting for a replica (load the scaler counts).
    waiting: AtomicUsize,
    /// Signalled whenever a cold start ends, well or not.
    started: Notify,
    scaler: std::sync::Mutex<StageScaler>,
    /// When the last cold start failed, and what waiting requests are told.
    last_start_failure: std::sync::Mutex<Option<(Instant, Status)>>,
}

impl StagePool {
    fn last_start_failure(&self) -> Option<(Instant, Status)> {
        self.last_start_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn scaler(&self) -> std::sync::MutexGuard<'_, StageScaler> {
        self.scaler.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counts a cold start of `pool` from creation to drop, and wakes the requests waiting
/// for it however it ends.
struct StartingGuard<'a>(&'a StagePool);

impl Drop for StartingGuard<'_> {
    fn drop(&mut self) {
        self.0.starting.fetch_sub(1, Ordering::AcqRel);
        self.0.started.notify_waiters();
    }
}

/// Counts a request waiting for a replica of `pool`.
struct WaitingGuard<'a>(&'a StagePool);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Deployment {
    stages: Vec<StagePool>,
}

/// What one routed request produced.
#[derive(Debug)]
pub struct Routed {
    /// The last stage's output, sealed to the client.
    pub output: Sealed,
    /// Per-stage timings reported by the functions (no values, only durations).
    pub timings: Vec<StageTiming>,
    /// How many hops had to be retried on another replica.
    pub retries: usize,
}

/// Where the router learns how many stages a model has when a request names a model it
/// was not told to deploy (the broker, in practice).
#[tonic::async_trait]
pub trait Catalog: Send + Sync + 'static {
    /// The stage count of the current version of `model`.
    async fn stage_count(&self, model: &ModelId) -> Result<u32, Status>;
}

/// Routes sealed requests through the stages of deployed models.
pub struct Router {
    platform: Arc<dyn Platform>,
    catalog: Option<Arc<dyn Catalog>>,
    tls: ClientTlsConfig,
    config: RouterConfig,
    deployments: RwLock<HashMap<ModelId, Arc<Deployment>>>,
    admission: Semaphore,
    usage: Option<Arc<UsageLog>>,
    stopping: AtomicBool,
    stopped: Notify,
}

impl Router {
    /// How many requests the router holds at once (`RouterConfig::max_in_flight`).
    pub fn max_in_flight(&self) -> usize {
        self.config.max_in_flight
    }

    /// A router that starts functions on `platform` and dials them with the
    /// coordinator's client identity from `pki`.
    pub fn new(
        platform: Arc<dyn Platform>,
        pki: &Pki,
        config: RouterConfig,
    ) -> Result<Self, Status> {
        let tls = pki
            .client_config(Role::Function, Some(Role::Coordinator))
            .map_err(|e| Status::internal(format!("coordinator TLS identity: {e}")))?;
        Ok(Self {
            platform,
            catalog: None,
            tls,
            admission: Semaphore::new(config.max_in_flight),
            config,
            deployments: RwLock::new(HashMap::new()),
            usage: None,
            stopping: AtomicBool::new(false),
            stopped: Notify::new(),
        })
    }

    /// Records every invocation (stage, replica, memory size, duration) in `usage`.
    pub fn with_usage_log(mut self, usage: Arc<UsageLog>) -> Self {
        self.usage = Some(usage);
        self
    }

    /// Lets the router deploy, on first request, models it was not told to deploy: their
    /// stages then start from zero replicas, on demand.
    pub fn with_catalog(mut self, catalog: Arc<dyn Catalog>) -> Self {
        self.catalog = Some(catalog);
        self
    }

    /// Deploys `stages` stages of `model` and starts the initial replicas.
    pub async fn deploy(&self, model: ModelId, stages: u32) -> Result<(), Status> {
        let deployment = Self::new_deployment(&model, stages, self.config.initial_replicas > 0);
        for pool in &deployment.stages {
            for _ in 0..self.config.initial_replicas {
                self.start_replica(pool).await?;
            }
        }
        self.deployments.write().await.insert(model, deployment);
        Ok(())
    }

    /// The deployment of `model`, created with no replica if the catalog knows it.
    async fn deployment(&self, model: &ModelId) -> Result<Arc<Deployment>, Status> {
        if let Some(d) = self.deployments.read().await.get(model) {
            return Ok(d.clone());
        }
        let catalog = self
            .catalog
            .as_ref()
            .ok_or_else(|| Status::not_found(format!("model {model} is not deployed")))?;
        let stages = catalog.stage_count(model).await?;
        let mut deployments = self.deployments.write().await;
        let deployment = deployments
            .entry(model.clone())
            .or_insert_with(|| Self::new_deployment(model, stages, false));
        tracing::info!(%model, stages, "deployed on first request; stages scale from zero");
        Ok(deployment.clone())
    }

    /// A deployment of `stages` stages of `model` with no replica yet. `warm`: replicas
    /// are about to be started, and kept for the idle time even if no request comes;
    /// otherwise each stage stays at its minimum until its first request.
    fn new_deployment(model: &ModelId, stages: u32, warm: bool) -> Arc<Deployment> {
        let now = Instant::now();
        Arc::new(Deployment {
            stages: (0..stages)
                .map(|i| StagePool {
                    stage: StageRef {
                        model: model.clone(),
                        stage: StageIndex(i),
                    },
                    replicas: RwLock::new(Vec::new()),
                    starting: AtomicUsize::new(0),
                    waiting: AtomicUsize::new(0),
                    started: Notify::new(),
                    scaler: std::sync::Mutex::new(if warm {
                        StageScaler::new(now)
                    } else {
                        StageScaler::idle()
                    }),
                    last_start_failure: std::sync::Mutex::new(None),
                })
                .collect(),
        })
    }

    /// The models deployed.
    pub async fn models(&self) -> Vec<ModelId> {
        self.deployments.read().await.keys().cloned().collect()
    }

    /// The replicas currently serving each stage of `model`.
    pub async fn replicas(&self, model: &ModelId) -> Vec<Vec<Replica>> {
        let Some(deployment) = self.deployments.read().await.get(model).cloned() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for pool in &deployment.stages {
            out.push(
                pool.replicas
                    .read()
                    .await
                    .iter()
                    .map(|r| r.replica.clone())
                    .collect(),
            );
        }
        out
    }

    /// How many replicas serve each stage of `model` right now (empty if not deployed).
    pub async fn replica_counts(&self, model: &ModelId) -> Vec<usize> {
        self.replicas(model).await.iter().map(Vec::len).collect()
    }

    /// How many requests wait for a replica of each stage of `model` right now (empty if
    /// not deployed): the queue depth operators watch during cold starts.
    pub async fn queue_depths(&self, model: &ModelId) -> Vec<usize> {
        let Some(deployment) = self.deployments.read().await.get(model).cloned() else {
            return Vec::new();
        };
        deployment
            .stages
            .iter()
            .map(|pool| pool.waiting.load(Ordering::Acquire))
            .collect()
    }

    /// Routes one request through every stage.
    pub async fn route(
        self: &Arc<Self>,
        header: RequestHeader,
        input: Sealed,
        deadline: Option<Duration>,
    ) -> Result<Routed, Status> {
        let _admitted = self
            .admission
            .try_acquire()
            .map_err(|_| Status::resource_exhausted("too many requests in flight; retry later"))?;
        let deadline = Instant::now() + deadline.unwrap_or(self.config.default_deadline);
        let model = ModelId::new(header.model_id.clone())
            .map_err(|_| Status::invalid_argument("invalid model id"))?;
        let deployment = self.deployment(&model).await?;

        let mut activations = input;
        let mut timings = Vec::with_capacity(deployment.stages.len());
        let mut retries = 0;
        for index in 0..deployment.stages.len() {
            let (sealed, timing, retried) = self
                .hop(&deployment, index, &header, activations, deadline)
                .await?;
            activations = sealed;
            timings.extend(timing);
            retries += retried;
        }
        Ok(Routed {
            output: activations,
            timings,
            retries,
        })
    }

    async fn hop(
        self: &Arc<Self>,
        deployment: &Arc<Deployment>,
        index: usize,
        header: &RequestHeader,
        activations: Sealed,
        deadline: Instant,
    ) -> Result<(Sealed, Option<StageTiming>, usize), Status> {
        let pool = &deployment.stages[index];
        let mut last_error = Status::unavailable(format!("no replica of {}", pool.stage));
        for attempt in 0..self.config.max_attempts {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Status::deadline_exceeded(format!(
                    "deadline passed at {}",
                    pool.stage
                )));
            }
            let replica = match tokio::time::timeout(remaining, self.pick(deployment, index)).await
            {
                Ok(Ok(replica)) => replica,
                Ok(Err(status)) => {
                    last_error = status;
                    continue;
                }
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!(
                        "deadline passed waiting for a replica of {}",
                        pool.stage
                    )));
                }
            };
            let mut request = tonic::Request::new(ProcessRequest {
                header: Some(header.clone()),
                stage: pool.stage.stage.0,
                activations: Some(activations.clone()),
            });
            let remaining = deadline.saturating_duration_since(Instant::now());
            request.set_timeout(remaining);
            shardseal_proto::request_id::attach(&mut request);
            replica.in_flight.fetch_add(1, Ordering::Relaxed);
            let called = Instant::now();
            let result = replica.client.clone().process(request).await;
            replica.in_flight.fetch_sub(1, Ordering::Relaxed);
            pool.scaler().touch(Instant::now());
            if !matches!(&result, Err(status) if replica_failed(status)) {
                self.bill(header, &replica, called.elapsed(), result.is_ok());
            }
            match result {
                Ok(response) => {
                    let response = response.into_inner();
                    let sealed = response.activations.ok_or_else(|| {
                        Status::internal(format!("{} returned no activations", pool.stage))
                    })?;
                    return Ok((sealed, response.timing, attempt));
                }
                Err(status) if replica_failed(&status) => {
                    tracing::warn!(stage = %pool.stage, replica = replica.replica.id, code = ?status.code(),
                        "replica failed; retrying the hop on another replica");
                    self.retire(pool, &replica, Duration::ZERO).await;
                    last_error = Status::unavailable(format!("{} is unavailable", pool.stage));
                }
                Err(status) => return Err(status),
            }
        }
        Err(last_error)
    }

    /// Records one invocation for billing. A replica that died mid-call is not billed:
    /// serverless platforms do not bill the infrastructure's failures.
    fn bill(&self, header: &RequestHeader, replica: &LiveReplica, took: Duration, ok: bool) {
        let Some(usage) = &self.usage else { return };
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let invocation = Invocation {
            at_ms,
            request_id: hex::encode(&header.request_id),
            model: replica.replica.stage.model.to_string(),
            stage: replica.replica.stage.stage.0,
            replica: replica.replica.id,
            memory_mb: self.config.function_memory_mb,
            duration_ms: took.as_secs_f64() * 1e3,
            ok,
        };
        if let Err(e) = usage.record(&invocation) {
            tracing::error!(error = %e, "usage record not written");
        }
    }

    /// The least busy replica of the stage. With none, the request waits for one (scale
    /// from zero): a cold start is begun unless one is under way, on its own task, so a
    /// request that gives up waiting does not cancel a start others wait for. A start that
    /// fails while the request waits fails this pick (the hop may try again).
    async fn pick(
        self: &Arc<Self>,
        deployment: &Arc<Deployment>,
        index: usize,
    ) -> Result<Arc<LiveReplica>, Status> {
        let pool = &deployment.stages[index];
        pool.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = WaitingGuard(pool);
        let began = Instant::now();
        loop {
            let started = pool.started.notified();
            tokio::pin!(started);
            started.as_mut().enable();
            if let Some(replica) = least_busy(&pool.replicas.read().await) {
                return Ok(replica);
            }
            if let Some((at, status)) = pool.last_start_failure()
                && at > began
            {
                return Err(status);
            }
            if pool
                .starting
                .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                let (router, deployment) = (self.clone(), deployment.clone());
                tokio::spawn(async move {
                    let pool = &deployment.stages[index];
                    let guard = StartingGuard(pool);
                    let _ = router.start_counted(pool, guard).await;
                });
            }
            started.await;
        }
    }

    /// Starts one more replica of `pool` and adds it to the pool.
    async fn start_replica(&self, pool: &StagePool) -> Result<Arc<LiveReplica>, Status> {
        pool.starting.fetch_add(1, Ordering::AcqRel);
        let guard = StartingGuard(pool);
        self.start_counted(pool, guard).await
    }

    async fn start_counted(
        &self,
        pool: &StagePool,
        _starting: StartingGuard<'_>,
    ) -> Result<Arc<LiveReplica>, Status> {
        let replica = self
            .platform
            .start_replica(&pool.stage)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "function cold start failed");
                let status =
                    Status::unavailable(format!("could not start a function for {}", pool.stage));
                *pool
                    .last_start_failure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), status.clone()));
                status
            })?;
        let endpoint = Endpoint::from_shared(replica.endpoint.clone())
            .and_then(|e| e.tls_config(self.tls.clone()))
            .map_err(|e| Status::internal(format!("function endpoint: {e}")))?;
        let channel = endpoint.connect_lazy();
        let live = Arc::new(LiveReplica {
            replica,
            client: StageFunctionClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            in_flight: AtomicUsize::new(0),
        });
        pool.replicas.write().await.push(live.clone());
        Ok(live)
    }

    /// Takes `replica` out of `pool` at once, then stops it once its calls in flight are
    /// done (or `drain` has passed: zero for a replica that already failed).
    async fn retire(&self, pool: &StagePool, replica: &Arc<LiveReplica>, drain: Duration) {
        pool.replicas
            .write()
            .await
            .retain(|r| r.replica.id != replica.replica.id);
        let until = Instant::now() + drain;
        while replica.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.platform.stop_replica(&replica.replica).await;
    }

    /// Stops the autoscaler and every function.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stopped.notify_waiters();
        self.platform.shutdown().await;
    }

    /// Runs the autoscaler until [`Router::shutdown`]: every `scaling.tick` it samples
    /// each stage's load and starts, drains or stops replicas to follow it.
    pub fn spawn_autoscaler(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let router = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(router.config.scaling.tick);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let stopped = router.stopped.notified();
                if router.stopping.load(Ordering::Acquire) {
                    return;
                }
                tokio::select! {
                    _ = stopped => return,
                    _ = tick.tick() => router.scale_once().await,
                }
            }
        })
    }

    /// One autoscaling step over every stage of every deployment.
    async fn scale_once(self: &Arc<Self>) {
        let deployments: Vec<Arc<Deployment>> =
            self.deployments.read().await.values().cloned().collect();
        let now = Instant::now();
        for deployment in deployments {
            for index in 0..deployment.stages.len() {
                let pool = &deployment.stages[index];
                let replicas = pool.replicas.read().await.clone();
                let load = replicas
                    .iter()
                    .map(|r| r.in_flight.load(Ordering::Relaxed))
                    .sum::<usize>()
                    + pool.waiting.load(Ordering::Acquire);
                let desired = pool.scaler().desired(&self.config.scaling, now, load);
                let starting = pool.starting.load(Ordering::Acquire);
                let have = replicas.len() + starting;
                if desired > have {
                    tracing::info!(stage = %pool.stage, load, from = have, to = desired, "scaling out");
                    for _ in have..desired {
                        let (router, deployment) = (self.clone(), deployment.clone());
                        tokio::spawn(async move {
                            let pool = &deployment.stages[index];
                            if let Err(status) = router.start_replica(pool).await {
                                tracing::warn!(stage = %pool.stage, error = %status.message(), "scale-out start failed");
                            }
                        });
                    }
                } else if desired < replicas.len() {
                    // Only idle replicas go; a busy one is reconsidered at the next tick.
                    let idle: Vec<_> = replicas
                        .iter()
                        .filter(|r| r.in_flight.load(Ordering::Relaxed) == 0)
                        .take(replicas.len() - desired)
                        .cloned()
                        .collect();
                    if !idle.is_empty() {
                        tracing::info!(stage = %pool.stage, load, from = replicas.len(),
                            to = replicas.len() - idle.len(), "scaling in");
                    }
                    for replica in idle {
                        pool.replicas
                            .write()
                            .await
                            .retain(|r| r.replica.id != replica.replica.id);
                        let (router, deployment) = (self.clone(), deployment.clone());
                        tokio::spawn(async move {
                            let pool = &deployment.stages[index];
                            router.retire(pool, &replica, DRAIN_TIMEOUT).await;
                        });
                    }
                }
            }
        }
    }
}

/// How long a replica being scaled in may finish the calls it already has.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest sealed activation relayed (256 MiB).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

fn least_busy(replicas: &[Arc<LiveReplica>]) -> Option<Arc<LiveReplica>> {
    replicas
        .iter()
        .min_by_key(|r| r.in_flight.load(Ordering::Relaxed))
        .cloned()
}

/// Whether a failed hop means the replica is gone (retry elsewhere) rather than a
/// refusal of this request (which every replica would repeat).
fn replica_failed(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted
    )
}
