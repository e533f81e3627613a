//! `shardseal proxy`: the Open Inference Protocol (KServe v2 gRPC) on the data owner's
//! machine, in front of the sealed pipeline.
//!
//! ```text
//!  tritonclient / kserve ──plaintext gRPC, loopback──▶ shardseal proxy (data owner's machine)
//!                                                        │ verify the broker-signed pipeline
//!                                                        │ seal inputs to stage 0
//!                                                        ▼
//!                              coordinator ──▶ stage functions (ciphertext outside them)
//!                                                        │
//!                               outputs opened here ◀────┘
//! ```
//!
//! Standard clients need no change: the proxy speaks the upstream `grpc_predict_v2.proto`
//! ([`shardseal_proto::oip`]). Everything a client sends crosses the proxy in plaintext,
//! which is why it listens on loopback unless `--allow-remote` says otherwise.

mod tensors;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use shardseal_keys::{PipelineManifest, TensorSpec};
use shardseal_proto::oip::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use shardseal_proto::oip::{
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, ServerLiveRequest, ServerLiveResponse,
    ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
    model_metadata_response::TensorMetadata,
};
use shardseal_sdk::{Client, MAX_MESSAGE_BYTES, Trust};
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response, Status};

use tensors::{
    OutputForm, check_requested_outputs, datatype_name, infer_response, inputs_from_request,
    status_from_sdk,
};

/// Serve the Open Inference Protocol (KServe v2 gRPC) to local clients, sealing every
/// request through the pipeline.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  shardseal proxy --coordinator https://10.0.0.5:7443 --trust trust.json\n  # then, in Python: tritonclient.grpc.InferenceServerClient(\"127.0.0.1:8001\")\n\nThe proxy prints `SHARDSEAL_READY <address>` on stdout once it serves."
)]
pub(crate) struct ProxyArgs {
    /// Where standard clients connect (plaintext gRPC; port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8001")]
    listen: String,
    /// The coordinator's address.
    #[arg(long)]
    coordinator: String,
    /// The trust file (broker key, trusted measurements, CA), as `shardseal up` writes it.
    #[arg(long)]
    trust: PathBuf,
    /// Listen on a non-loopback address: tensors then cross that network in plaintext.
    #[arg(long)]
    allow_remote: bool,
    /// Prometheus metrics of the inferences the proxy relays (counts by model and status,
    /// latency).
    #[command(flatten)]
    metrics: crate::metrics::MetricsArgs,
}

pub(crate) fn run(args: ProxyArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(serve(args))
}

async fn serve(args: ProxyArgs) -> anyhow::Result<()> {
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host(&args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?
        .collect();
    check_listen_addresses(&args.listen, &addresses, args.allow_remote)?;
    let metrics_listener = args.metrics.bind().await?;
    let trust = Trust::from_file(&args.trust)?;
    let client = Client::connect(&args.coordinator, trust).await?;
    let listener = tokio::net::TcpListener::bind(addresses.as_slice())
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let address = listener.local_addr()?;
    crate::metrics::serve(metrics_listener, || async {
        shardseal_proto::metrics::global().render()
    })?;
    println!("SHARDSEAL_READY {address}");
    tracing::info!(%address, coordinator = %args.coordinator, "serving the Open Inference Protocol");
    tonic::transport::Server::builder()
        .add_service(
            GrpcInferenceServiceServer::new(OipProxy { client })
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            crate::shutdown_signal(),
        )
        .await
        .context("serving the Open Inference Protocol")
}

/// Refuses a listening address off this machine unless the user allowed it: the proxy
/// receives inputs and returns outputs in plaintext.
fn check_listen_addresses(
    listen: &str,
    addresses: &[SocketAddr],
    allow_remote: bool,
) -> anyhow::Result<()> {
    if addresses.is_empty() {
        bail!("--listen {listen}: the name resolves to no address");
    }
    if let Some(remote) = addresses.iter().find(|a| !a.ip().is_loopback())
        && !allow_remote
    {
        bail!(
            "--listen {listen}: {} is not a loopback address; the proxy serves plaintext \
             tensors, so it stays on this machine unless --allow-remote is given",
            remote.ip()
        );
    }
    Ok(())
}

/// The Open Inference Protocol service: a plaintext front for one [`Client`].
struct OipProxy {
    client: Client,
}

impl OipProxy {
    /// The verified pipeline of `model`; `version`, when given, must be the one served.
    async fn verified_pipeline(
        &self,
        model: &str,
        version: &str,
    ) -> Result<PipelineManifest, Status> {
        let pipeline = self
            .client
            .pipeline(model)
            .await
            .map_err(|e| status_from_sdk(model, e))?;
        let served = pipeline.version.0.to_string();
        if !version.is_empty() && version != served {
            return Err(Status::not_found(format!(
                "model {model:?} has no version {version:?} here (serving version {served})"
            )));
        }
        Ok(pipeline)
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for OipProxy {
    async fn server_live(
        &self,
        _request: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    /// Ready once the coordinator was reached at start; each model's readiness (a
    /// verified pipeline) is `ModelReady`'s question.
    async fn server_ready(
        &self,
        _request: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: true }))
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().name))]
    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let request = request.into_inner();
        let ready = match self
            .verified_pipeline(&request.name, &request.version)
            .await
        {
            Ok(_) => true,
            // An unknown model is simply not ready; an untrusted pipeline or an
            // unreachable coordinator is an error the client should see.
            Err(status) if status.code() == Code::NotFound => false,
            Err(status) => return Err(status),
        };
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _request: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "shardseal".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: Vec::new(),
        }))
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().name))]
    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let pipeline = self
            .verified_pipeline(&request.name, &request.version)
            .await?;
        Ok(Response::new(ModelMetadataResponse {
            name: pipeline.model_id.to_string(),
            versions: vec![pipeline.version.0.to_string()],
            // The protocol's platform name for ONNX models.
            platform: "onnx_onnxv1".into(),
            inputs: tensor_metadata(&pipeline.inputs),
            outputs: tensor_metadata(&pipeline.outputs),
        }))
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().model_name))]
    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let started = std::time::Instant::now();
        let mut verified = None;
        let result = self.infer(request, &mut verified).await;
        let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
        record_inference(verified.as_deref(), code, started.elapsed());
        result
    }
}

impl OipProxy {
    /// `ModelInfer`, naming in `verified` the model once its pipeline is verified.
    async fn infer(
        &self,
        request: Request<ModelInferRequest>,
        verified: &mut Option<String>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let deadline = caller_deadline(request.metadata());
        let mut request = request.into_inner();
        let pipeline = self
            .verified_pipeline(&request.model_name, &request.model_version)
            .await?;
        *verified = Some(pipeline.model_id.to_string());
        check_requested_outputs(&request.outputs, &pipeline.outputs)?;
        let form = OutputForm::asked_by(&request);
        let inputs = inputs_from_request(&mut request, &pipeline.inputs)?;
        let inference = match deadline {
            Some(deadline) => {
                self.client
                    .infer_within(&request.model_name, inputs, deadline)
                    .await
            }
            None => self.client.infer(&request.model_name, inputs).await,
        }
        .map_err(|e| status_from_sdk(&request.model_name, e))?;
        let response = infer_response(
            &request,
            pipeline.version.0.to_string(),
            inference.outputs,
            form,
        )?;
        Ok(Response::new(response))
    }
}

/// `ModelInfer` calls answered, by model and gRPC code.
const REQUESTS_TOTAL: &str = "shardseal_proxy_requests_total";
/// `ModelInfer` latency, by model.
const REQUEST_DURATION: &str = "shardseal_proxy_request_duration_seconds";

/// Counts one `ModelInfer` and its latency, under its model if the proxy verified that
/// model's pipeline, else `_unknown` (a client cannot grow the label set with names).
fn record_inference(model: Option<&str>, code: Code, took: std::time::Duration) {
    let model = model.unwrap_or(shardseal_coordinator::metrics::UNKNOWN_MODEL);
    let registry = shardseal_proto::metrics::global();
    registry
        .counter(
            REQUESTS_TOTAL,
            "ModelInfer calls the proxy answered, by model and gRPC status code.",
            &[
                ("model", model),
                ("code", shardseal_proto::metrics::code_name(code)),
            ],
        )
        .inc();
    registry
        .histogram(
            REQUEST_DURATION,
            "ModelInfer latency at the proxy (sealing, the pipeline, opening), in seconds.",
            shardseal_proto::metrics::LATENCY_BUCKETS,
            &[("model", model)],
        )
        .observe_duration(took);
}

/// The deadline the caller set (its `grpc-timeout` header: up to 8 digits and a unit of
/// H, M, S, m, u or n), which the sealed request inherits; `None` if absent or malformed.
fn caller_deadline(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn tensor_metadata(specs: &[TensorSpec]) -> Vec<TensorMetadata> {
    specs
        .iter()
        .map(|s| TensorMetadata {
            name: s.name.clone(),
            datatype: datatype_name(s.dtype).into(),
            shape: s
                .shape
                .iter()
                .map(|&d| i64::try_from(d).unwrap_or(i64::MAX))
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addresses(text: &[&str]) -> Vec<SocketAddr> {
        text.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn the_callers_grpc_timeout_becomes_the_sealed_requests_deadline() {
        use std::time::Duration;
        let deadline = |value: &str| {
            let mut metadata = tonic::metadata::MetadataMap::new();
            metadata.insert("grpc-timeout", value.parse().unwrap());
            caller_deadline(&metadata)
        };
        assert_eq!(deadline("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(deadline("2S"), Some(Duration::from_secs(2)));
        assert_eq!(deadline("3M"), Some(Duration::from_secs(180)));
        assert_eq!(deadline("250000u"), Some(Duration::from_millis(250)));
        for malformed in ["", "S", "123456789S", "10x", "-1S", "1.5S"] {
            assert_eq!(deadline(malformed), None, "{malformed:?}");
        }
        assert_eq!(caller_deadline(&tonic::metadata::MetadataMap::new()), None);
    }

    #[test]
    fn loopback_addresses_are_accepted() {
        check_listen_addresses("x", &addresses(&["127.0.0.1:0", "[::1]:8001"]), false).unwrap();
    }

    #[test]
    fn other_addresses_need_allow_remote() {
        for remote in ["0.0.0.0:8001", "10.0.0.5:8001", "[::]:8001"] {
            let err = check_listen_addresses(remote, &addresses(&[remote]), false)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("is not a loopback address") && err.contains("--allow-remote"),
                "{err}"
            );
            check_listen_addresses(remote, &addresses(&[remote]), true).unwrap();
        }
        // A name resolving to loopback and a remote address is refused too.
        let mixed = addresses(&["127.0.0.1:8001", "192.168.1.2:8001"]);
        assert!(check_listen_addresses("host:8001", &mixed, false).is_err());
        assert!(check_listen_addresses("nothing:1", &[], true).is_err());
    }
}
