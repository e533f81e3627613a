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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use shardseal_attestation::{ModelId, StageIndex};
use shardseal_proto::tls::{Pki, Role};
use shardseal_proto::v1::stage_function_client::StageFunctionClient;
use shardseal_proto::v1::{ProcessRequest, RequestHeader, Sealed, StageTiming};
use tokio::sync::{Mutex, RwLock, Semaphore};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

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
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            initial_replicas: 1,
            max_attempts: 3,
            default_deadline: Duration::from_secs(30),
            max_in_flight: 256,
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
    /// Serialises cold starts of this stage, so a burst starts one replica, not fifty.
    starting: Mutex<()>,
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
}

impl Router {
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
        })
    }

    /// Lets the router deploy, on first request, models it was not told to deploy: their
    /// stages then start from zero replicas, on demand.
    pub fn with_catalog(mut self, catalog: Arc<dyn Catalog>) -> Self {
        self.catalog = Some(catalog);
        self
    }

    /// Deploys `stages` stages of `model` and starts the initial replicas.
    pub async fn deploy(&self, model: ModelId, stages: u32) -> Result<(), Status> {
        let deployment = Self::new_deployment(&model, stages);
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
            .or_insert_with(|| Self::new_deployment(model, stages));
        tracing::info!(%model, stages, "deployed on first request; stages scale from zero");
        Ok(deployment.clone())
    }

    fn new_deployment(model: &ModelId, stages: u32) -> Arc<Deployment> {
        Arc::new(Deployment {
            stages: (0..stages)
                .map(|i| StagePool {
                    stage: StageRef {
                        model: model.clone(),
                        stage: StageIndex(i),
                    },
                    replicas: RwLock::new(Vec::new()),
                    starting: Mutex::new(()),
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

    /// Routes one request through every stage.
    pub async fn route(
        &self,
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
        for pool in &deployment.stages {
            let (sealed, timing, retried) = self.hop(pool, &header, activations, deadline).await?;
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
        &self,
        pool: &StagePool,
        header: &RequestHeader,
        activations: Sealed,
        deadline: Instant,
    ) -> Result<(Sealed, Option<StageTiming>, usize), Status> {
        let mut last_error = Status::unavailable(format!("no replica of {}", pool.stage));
        for attempt in 0..self.config.max_attempts {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Status::deadline_exceeded(format!(
                    "deadline passed at {}",
                    pool.stage
                )));
            }
            let replica = match self.pick(pool).await {
                Ok(replica) => replica,
                Err(status) => {
                    last_error = status;
                    continue;
                }
            };
            let mut request = tonic::Request::new(ProcessRequest {
                header: Some(header.clone()),
                stage: pool.stage.stage.0,
                activations: Some(activations.clone()),
            });
            request.set_timeout(remaining);
            replica.in_flight.fetch_add(1, Ordering::Relaxed);
            let result = replica.client.clone().process(request).await;
            replica.in_flight.fetch_sub(1, Ordering::Relaxed);
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
                    self.retire(pool, &replica).await;
                    last_error = Status::unavailable(format!("{} is unavailable", pool.stage));
                }
                Err(status) => return Err(status),
            }
        }
        Err(last_error)
    }

    /// The least busy replica of the stage, starting one if there is none.
    async fn pick(&self, pool: &StagePool) -> Result<Arc<LiveReplica>, Status> {
        if let Some(replica) = least_busy(&pool.replicas.read().await) {
            return Ok(replica);
        }
        let _one_at_a_time = pool.starting.lock().await;
        if let Some(replica) = least_busy(&pool.replicas.read().await) {
            return Ok(replica);
        }
        self.start_replica(pool).await
    }

    async fn start_replica(&self, pool: &StagePool) -> Result<Arc<LiveReplica>, Status> {
        let replica = self
            .platform
            .start_replica(&pool.stage)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "function cold start failed");
                Status::unavailable(format!("could not start a function for {}", pool.stage))
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

    async fn retire(&self, pool: &StagePool, replica: &Arc<LiveReplica>) {
        pool.replicas
            .write()
            .await
            .retain(|r| r.replica.id != replica.replica.id);
        self.platform.stop_replica(&replica.replica).await;
    }

    /// Stops every function.
    pub async fn shutdown(&self) {
        self.platform.shutdown().await;
    }
}

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
