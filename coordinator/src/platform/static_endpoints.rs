//! The static platform: replicas that something else runs, given by their endpoints.
//!
//! On a cluster, stage functions are Knative Services (or any other workload) that the
//! cluster starts, scales out and scales to zero by itself; the coordinator only needs their
//! addresses. This platform never starts or stops a function: "starting a replica" of a stage
//! means picking one of the stage's configured endpoints and checking, with the function's
//! `Ready` RPC, that it answers, has attested and serves that model and stage. A replica that
//! fails a hop is dropped by the router and the next request checks an endpoint again, so a
//! Knative revision that scaled to zero is woken by that first `Ready` call (its activator
//! holds the call until a pod is up).
//!
//! ```text
//!   router ──start_replica(mlp/0)──▶ StaticPlatform ──Ready──▶ https://mlp-0.shardseal.svc…
//!          ◀──Replica{endpoint}─────┘   (checks ready, model, stage)
//! ```
//!
//! Endpoints come from flags (`MODEL/STAGE=URL`, see [`EndpointSpec`]) or a file
//! ([`StaticEndpoints::from_file`]), TOML or JSON:
//!
//! ```toml
//! [[endpoint]]
//! model = "mlp"
//! stage = 0
//! url = "https://mlp-0.shardseal.svc.cluster.local"
//! ```
//!
//! `https://` endpoints are dialled with the coordinator's mTLS client identity and must
//! present the function identity of the deployment's PKI (`function.shardseal.internal`,
//! whatever the URL's host); `http://` endpoints are plain h2c, for a function behind a proxy
//! that terminates the transport (see `deploy/README.md`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;
use shardseal_attestation::{ModelId, StageIndex};
use shardseal_proto::tls::{Pki, Role, TlsError};
use shardseal_proto::v1::ReadyRequest;
use shardseal_proto::v1::stage_function_client::StageFunctionClient;
use tonic::transport::{ClientTlsConfig, Endpoint};

use super::{Platform, PlatformError, Replica, StageRef};

/// Why a static endpoint configuration is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointConfigError {
    /// A `--endpoint` flag is not `MODEL/STAGE=URL`.
    #[error("endpoint {0:?}: expected MODEL/STAGE=URL, e.g. mlp/0=https://mlp-0.example:443")]
    Syntax(String),
    /// A model id is not valid.
    #[error("endpoint {endpoint:?}: invalid model id: {reason}")]
    Model {
        /// The endpoint as given.
        endpoint: String,
        /// Why the id is refused.
        reason: String,
    },
    /// A URL is not an `http(s)://host[:port]` address.
    #[error("endpoint {endpoint:?}: {reason}")]
    Url {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with its URL.
        reason: String,
    },
    /// The endpoints file could not be read or parsed.
    #[error("endpoints file {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// The I/O or parse error.
        reason: String,
    },
    /// A model has endpoints for some stages but not for every stage below the highest one.
    #[error("model {model} has endpoints for stage {highest} but none for stage {missing}")]
    MissingStage {
        /// The model.
        model: ModelId,
        /// A stage with no endpoint.
        missing: u32,
        /// The highest stage that has one.
        highest: u32,
    },
    /// No endpoint at all was configured.
    #[error("the static platform needs at least one endpoint")]
    Empty,
}

/// One stage endpoint: where a replica (or a Knative Service of replicas) of a stage listens.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// The model.
    pub model: ModelId,
    /// The stage index.
    pub stage: u32,
    /// `https://host[:port]` (mTLS) or `http://host[:port]` (h2c).
    pub url: String,
}

impl EndpointSpec {
    /// Parses the flag form `MODEL/STAGE=URL`.
    pub fn parse_flag(text: &str) -> Result<Self, EndpointConfigError> {
        let syntax = || EndpointConfigError::Syntax(text.to_owned());
        let (target, url) = text.split_once('=').ok_or_else(syntax)?;
        let (model, stage) = target.rsplit_once('/').ok_or_else(syntax)?;
        let stage = stage.parse::<u32>().map_err(|_| syntax())?;
        let model = ModelId::new(model).map_err(|e| EndpointConfigError::Model {
            endpoint: text.to_owned(),
            reason: e.to_string(),
        })?;
        let spec = Self {
            model,
            stage,
            url: url.to_owned(),
        };
        spec.validate()?;
        Ok(spec)
    }

    fn validate(&self) -> Result<(), EndpointConfigError> {
        let bad = |reason: &str| EndpointConfigError::Url {
            endpoint: format!("{}/{}={}", self.model, self.stage, self.url),
            reason: reason.to_owned(),
        };
        let rest = self
            .url
            .strip_prefix("https://")
            .or_else(|| self.url.strip_prefix("http://"))
            .ok_or_else(|| bad("the URL must start with https:// or http://"))?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() {
            return Err(bad("the URL has no host"));
        }
        if authority.contains(['/', '?', '#', '@']) {
            return Err(bad(
                "the URL is a scheme, host and port only (no path, query or credentials)",
            ));
        }
        Endpoint::from_shared(self.url.clone()).map_err(|e| bad(&e.to_string()))?;
        Ok(())
    }
}

/// The endpoints file: a list of [`EndpointSpec`] under `endpoint`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointsFile {
    #[serde(default)]
    endpoint: Vec<EndpointSpec>,
}

/// Every stage endpoint the static platform routes to, by stage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StaticEndpoints {
    by_stage: HashMap<StageRef, Vec<String>>,
}

impl StaticEndpoints {
    /// Collects endpoints and checks them: at least one, and for each model an endpoint for
    /// every stage from 0 to its highest (several endpoints for one stage are replicas).
    pub fn new(specs: impl IntoIterator<Item = EndpointSpec>) -> Result<Self, EndpointConfigError> {
        let mut by_stage: HashMap<StageRef, Vec<String>> = HashMap::new();
        for spec in specs {
            spec.validate()?;
            let urls = by_stage
                .entry(StageRef {
                    model: spec.model,
                    stage: StageIndex(spec.stage),
                })
                .or_default();
            if !urls.contains(&spec.url) {
                urls.push(spec.url);
            }
        }
        if by_stage.is_empty() {
            return Err(EndpointConfigError::Empty);
        }
        let endpoints = Self { by_stage };
        for model in endpoints.models() {
            let highest = endpoints.stage_count(&model).saturating_sub(1);
            if let Some(missing) = (0..highest).find(|&i| {
                !endpoints.by_stage.contains_key(&StageRef {
                    model: model.clone(),
                    stage: StageIndex(i),
                })
            }) {
                return Err(EndpointConfigError::MissingStage {
                    model,
                    missing,
                    highest,
                });
            }
        }
        Ok(endpoints)
    }

    /// Reads a TOML file, or a JSON one if its name ends in `.json`.
    pub fn from_file(path: &Path) -> Result<Vec<EndpointSpec>, EndpointConfigError> {
        let file_error = |reason: String| EndpointConfigError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        let parsed: EndpointsFile = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| file_error(e.to_string()))?
        } else {
            toml::from_str(&text).map_err(|e| file_error(e.to_string()))?
        };
        Ok(parsed.endpoint)
    }

    /// The models that have endpoints, sorted.
    pub fn models(&self) -> Vec<ModelId> {
        let mut models: Vec<ModelId> = self.by_stage.keys().map(|s| s.model.clone()).collect();
        models.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        models.dedup();
        models
    }

    /// How many stages `model` has: one more than its highest stage with an endpoint.
    pub fn stage_count(&self, model: &ModelId) -> u32 {
        self.by_stage
            .keys()
            .filter(|s| &s.model == model)
            .map(|s| s.stage.0.saturating_add(1))
            .max()
            .unwrap_or(0)
    }

    /// The endpoints of one stage.
    pub fn urls(&self, stage: &StageRef) -> &[String] {
        self.by_stage.get(stage).map_or(&[], Vec::as_slice)
    }
}

/// How the static platform checks endpoints.
#[derive(Debug, Clone)]
pub struct StaticPlatformConfig {
    /// How long an endpoint may take to answer `Ready`, including a scale-from-zero cold
    /// start (attestation, shard download, model load) behind it.
    pub ready_timeout: Duration,
    /// The pause between `Ready` attempts while an endpoint is not up yet.
    pub retry_interval: Duration,
}

impl Default for StaticPlatformConfig {
    fn default() -> Self {
        Self {
            ready_timeout: Duration::from_secs(120),
            retry_interval: Duration::from_millis(500),
        }
    }
}

/// Replicas at fixed endpoints, never started or stopped here.
pub struct StaticPlatform {
    endpoints: StaticEndpoints,
    tls: ClientTlsConfig,
    config: StaticPlatformConfig,
    next_id: AtomicU64,
    /// Per stage, the endpoint to try first next time, so replicas of a stage with several
    /// endpoints spread over them.
    cursor: Mutex<HashMap<StageRef, usize>>,
}

impl StaticPlatform {
    /// A platform over `endpoints`, checking them with the coordinator's client identity
    /// from `pki`.
    pub fn new(
        endpoints: StaticEndpoints,
        pki: &Pki,
        config: StaticPlatformConfig,
    ) -> Result<Self, TlsError> {
        let tls = pki.client_config(Role::Function, Some(Role::Coordinator))?;
        Ok(Self {
            endpoints,
            tls,
            config,
            next_id: AtomicU64::new(1),
            cursor: Mutex::new(HashMap::new()),
        })
    }

    /// The configured endpoints.
    pub fn endpoints(&self) -> &StaticEndpoints {
        &self.endpoints
    }

    /// One `Ready` call: Ok if the function there is ready and serves `stage`.
    async fn check(&self, stage: &StageRef, url: &str) -> Result<(), String> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .and_then(|e| e.tls_config(self.tls.clone()))
            .map_err(|e| format!("{url}: {e}"))?
            .connect_timeout(self.config.ready_timeout);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("{url}: connect: {}", error_chain(&e)))?;
        let mut request = tonic::Request::new(ReadyRequest {});
        request.set_timeout(self.config.ready_timeout);
        let ready = StageFunctionClient::new(channel)
            .ready(request)
            .await
            .map_err(|s| format!("{url}: Ready: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        if !ready.ready {
            return Err(format!("{url}: not ready"));
        }
        if ready.model_id != stage.model.as_str() || ready.stage != stage.stage.0 {
            return Err(format!(
                "{url} serves {}/stage {}, not {stage}: check the endpoint configuration",
                ready.model_id, ready.stage
            ));
        }
        Ok(())
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        message.push_str(": ");
        message.push_str(&next.to_string());
        cause = next.source();
    }
    message
}

#[tonic::async_trait]
impl Platform for StaticPlatform {
    async fn start_replica(&self, stage: &StageRef) -> Result<Replica, PlatformError> {
        let urls = self.endpoints.urls(stage);
        if urls.is_empty() {
            return Err(PlatformError::NoEndpoint {
                stage: stage.clone(),
            });
        }
        let first = self
            .cursor
            .lock()
            .map(|mut c| {
                let slot = c.entry(stage.clone()).or_insert(0);
                let first = *slot % urls.len();
                *slot = slot.wrapping_add(1);
                first
            })
            .unwrap_or(0);
        let deadline = Instant::now() + self.config.ready_timeout;
        loop {
            let mut reasons = Vec::new();
            for url in urls.iter().cycle().skip(first).take(urls.len()) {
                match self.check(stage, url).await {
                    Ok(()) => {
                        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(%stage, endpoint = %url, replica = id, "static endpoint ready");
                        return Ok(Replica {
                            id,
                            stage: stage.clone(),
                            endpoint: url.clone(),
                        });
                    }
                    Err(reason) => reasons.push(reason),
                }
            }
            if Instant::now() + self.config.retry_interval >= deadline {
                return Err(PlatformError::Unhealthy {
                    stage: stage.clone(),
                    reason: reasons.join("; "),
                });
            }
            tracing::debug!(%stage, reasons = %reasons.join("; "), "no endpoint ready yet");
            tokio::time::sleep(self.config.retry_interval).await;
        }
    }

    async fn stop_replica(&self, replica: &Replica) {
        // The cluster owns the function: the router only stops routing to it.
        tracing::info!(stage = %replica.stage, endpoint = %replica.endpoint,
            "dropping a static endpoint from the pool; its platform restarts or scales it");
    }

    async fn shutdown(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(model: &str, stage: u32, url: &str) -> EndpointSpec {
        EndpointSpec {
            model: ModelId::new(model).unwrap(),
            stage,
            url: url.into(),
        }
    }

    #[test]
    fn flags_parse_model_stage_and_url() {
        assert_eq!(
            EndpointSpec::parse_flag("mlp/1=https://mlp-1.shardseal.svc:443").unwrap(),
            spec("mlp", 1, "https://mlp-1.shardseal.svc:443")
        );
        assert_eq!(
            EndpointSpec::parse_flag("m/0=http://10.0.0.7:8080").unwrap(),
            spec("m", 0, "http://10.0.0.7:8080")
        );
        for bad in [
            "mlp=https://x",
            "mlp/one=https://x",
            "mlp/0",
            "/0=https://x",
        ] {
            assert!(EndpointSpec::parse_flag(bad).is_err(), "{bad} accepted");
        }
        for bad_url in [
            "mlp/0=ftp://x",
            "mlp/0=https://",
            "mlp/0=https://x/path",
            "mlp/0=https://user:pw@x",
            "mlp/0=x:443",
        ] {
            assert!(
                matches!(
                    EndpointSpec::parse_flag(bad_url),
                    Err(EndpointConfigError::Url { .. })
                ),
                "{bad_url} accepted"
            );
        }
    }

    #[test]
    fn every_stage_below_the_highest_needs_an_endpoint() {
        let endpoints = StaticEndpoints::new([
            spec("mlp", 0, "https://a:1"),
            spec("mlp", 1, "https://b:1"),
            spec("mlp", 1, "https://c:1"),
            spec("mlp", 1, "https://c:1"),
            spec("cnn", 0, "https://d:1"),
        ])
        .unwrap();
        assert_eq!(endpoints.stage_count(&ModelId::new("mlp").unwrap()), 2);
        assert_eq!(endpoints.stage_count(&ModelId::new("cnn").unwrap()), 1);
        assert_eq!(
            endpoints.models(),
            vec![ModelId::new("cnn").unwrap(), ModelId::new("mlp").unwrap()]
        );
        let stage1 = StageRef {
            model: ModelId::new("mlp").unwrap(),
            stage: StageIndex(1),
        };
        assert_eq!(endpoints.urls(&stage1), ["https://b:1", "https://c:1"]);

        match StaticEndpoints::new([spec("mlp", 0, "https://a:1"), spec("mlp", 2, "https://b:1")]) {
            Err(EndpointConfigError::MissingStage {
                missing, highest, ..
            }) => assert_eq!((missing, highest), (1, 2)),
            other => panic!("expected MissingStage, got {other:?}"),
        }
        assert!(matches!(
            StaticEndpoints::new([]),
            Err(EndpointConfigError::Empty)
        ));
    }

    #[test]
    fn files_are_toml_or_json() {
        let dir = tempfile::tempdir().unwrap();
        let toml_path = dir.path().join("endpoints.toml");
        std::fs::write(
            &toml_path,
            "[[endpoint]]\nmodel = \"mlp\"\nstage = 0\nurl = \"https://mlp-0:443\"\n",
        )
        .unwrap();
        assert_eq!(
            StaticEndpoints::from_file(&toml_path).unwrap(),
            vec![spec("mlp", 0, "https://mlp-0:443")]
        );
        let json_path = dir.path().join("endpoints.json");
        std::fs::write(
            &json_path,
            r#"{"endpoint":[{"model":"mlp","stage":1,"url":"http://mlp-1:80"}]}"#,
        )
        .unwrap();
        assert_eq!(
            StaticEndpoints::from_file(&json_path).unwrap(),
            vec![spec("mlp", 1, "http://mlp-1:80")]
        );
        std::fs::write(&json_path, r#"{"endpoint":[{"model":"mlp","stage":1}]}"#).unwrap();
        assert!(matches!(
            StaticEndpoints::from_file(&json_path),
            Err(EndpointConfigError::File { .. })
        ));
    }
}
