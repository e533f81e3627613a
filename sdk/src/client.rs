//! The data owner's client.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shardseal_attestation::{Measurement, ModelId};
use shardseal_keys::{
    PipelineManifest, RecipientPrivateKey, RequestId, Sealed, TAG_LEN, VerifyingKey,
    open_activation, seal_activation_in_place, verify_pipeline,
};
use shardseal_proto::tensor::{HostTensor, decode_bundle_shared, encode_bundle_with_spare};
use shardseal_proto::tls::{Role, client_config_from_ca};
use shardseal_proto::v1::coordinator_client::CoordinatorClient;
use shardseal_proto::v1::{GetPipelineRequest, InferRequest, RequestHeader, StageTiming};
use tokio::sync::RwLock;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::Error;

/// What a data owner trusts, decided before connecting: the broker's identity key, the
/// function measurements it accepts, and the CA of the deployment's TLS certificates.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Trust {
    /// The key broker's Ed25519 identity key: only manifests it signed are believed.
    pub broker_key: VerifyingKey,
    /// Function executables the client accepts; every stage of a pipeline must release
    /// keys only to measurements in this set.
    pub measurements: BTreeSet<Measurement>,
    /// The PEM of the CA that issued the coordinator's TLS certificate.
    pub ca_pem: String,
}

impl Trust {
    /// Reads a trust file (JSON, as `shardseal up` writes it).
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let text =
            std::fs::read(path).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        serde_json::from_slice(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }
}

/// The result of one inference.
#[derive(Debug)]
pub struct Inference {
    /// The model's outputs, in the manifest's order.
    pub outputs: Vec<HostTensor>,
    /// Per-stage timings reported by the functions (durations only).
    pub timings: Vec<StageTiming>,
}

/// A connection to a ShardSeal coordinator.
///
/// ```no_run
/// use shardseal_sdk::{Client, HostTensor, Trust};
/// # async fn demo() -> Result<(), shardseal_sdk::Error> {
/// let trust = Trust::from_file("state/trust.json".as_ref())?;
/// let client = Client::connect("https://127.0.0.1:7443", trust).await?;
/// let input = HostTensor::from_f32("input", vec![1, 4], &[0.1, 0.2, 0.3, 0.4])?;
/// let result = client.infer("mlp", vec![input]).await?;
/// println!("{:?}", result.outputs[0].to_f32());
/// # Ok(()) }
/// ```
pub struct Client {
    coordinator: CoordinatorClient<Channel>,
    trust: Trust,
    pipelines: RwLock<HashMap<ModelId, PipelineManifest>>,
    deadline: Duration,
}

impl Client {
    /// Connects over TLS to the coordinator at `url` (`https://host:port`).
    pub async fn connect(url: &str, trust: Trust) -> Result<Self, Error> {
        let tls = client_config_from_ca(trust.ca_pem.as_bytes(), Role::Coordinator);
        let channel = Endpoint::from_shared(url.to_owned())
            .and_then(|e| e.tls_config(tls))
            .map_err(|e| Error::Config(format!("coordinator URL {url:?}: {e}")))?
            .connect()
            .await
            .map_err(|e| Error::Unavailable(format!("cannot reach the coordinator: {e}")))?;
        Ok(Self {
            coordinator: CoordinatorClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            trust,
            pipelines: RwLock::new(HashMap::new()),
            deadline: Duration::from_secs(60),
        })
    }

    /// Sets the deadline of each inference (default 60 s).
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Fetches and verifies the pipeline manifest of `model`: signed by the pinned broker
    /// key, and releasing keys only to measurements this client trusts.
    pub async fn pipeline(&self, model: &str) -> Result<PipelineManifest, Error> {
        let model = ModelId::new(model).map_err(|e| Error::BadInput(e.to_string()))?;
        if let Some(p) = self.pipelines.read().await.get(&model) {
            return Ok(p.clone());
        }
        let blob = self
            .coordinator
            .clone()
            .get_pipeline(GetPipelineRequest {
                model_id: model.to_string(),
            })
            .await
            .map_err(from_status)?
            .into_inner();
        let manifest = verify_pipeline(&blob, &self.trust.broker_key)
            .map_err(|e| Error::Untrusted(format!("pipeline manifest: {e}")))?;
        if manifest.model_id != model {
            return Err(Error::Untrusted("the manifest names another model".into()));
        }
        for (stage, allowed) in manifest.allowed_measurements.iter().enumerate() {
            if let Some(m) = allowed
                .iter()
                .find(|m| !self.trust.measurements.contains(m))
            {
                return Err(Error::Untrusted(format!(
                    "stage {stage} releases keys to measurement {m}, which this client does not trust"
                )));
            }
        }
        self.pipelines.write().await.insert(model, manifest.clone());
        Ok(manifest)
    }

    /// Runs `model` on `inputs` through the sealed pipeline. Inputs are checked against
    /// the verified manifest before anything is sealed; only this client can open the
    /// outputs.
    pub async fn infer(&self, model: &str, inputs: Vec<HostTensor>) -> Result<Inference, Error> {
        self.infer_within(model, inputs, self.deadline).await
    }

    /// As [`Client::infer`], with this call's own deadline instead of the client's (a proxy
    /// passes on the deadline its caller gave).
    pub async fn infer_within(
        &self,
        model: &str,
        inputs: Vec<HostTensor>,
        deadline: Duration,
    ) -> Result<Inference, Error> {
        let pipeline = self.pipeline(model).await?;
        check_inputs(&pipeline, &inputs)?;

        let request_id = RequestId::random().map_err(|e| Error::Internal(e.to_string()))?;
        let response_key =
            RecipientPrivateKey::generate().map_err(|e| Error::Internal(e.to_string()))?;
        let to_stage0 = pipeline.input_context(request_id);
        let mut bundle = encode_bundle_with_spare(&inputs, TAG_LEN);
        drop(inputs);
        let sealed = seal_activation_in_place(
            &pipeline.stage0_public_key,
            &to_stage0,
            std::mem::take(&mut *bundle),
        )
        .map_err(|e| Error::Internal(e.to_string()))?;

        let mut request = tonic::Request::new(InferRequest {
            header: Some(RequestHeader {
                model_id: pipeline.model_id.to_string(),
                version: pipeline.version.0,
                request_id: request_id.as_bytes().to_vec(),
                response_key: response_key.public_key().as_bytes().to_vec(),
            }),
            input: Some(sealed.into()),
        });
        request.set_timeout(deadline);
        let reply = self
            .coordinator
            .clone()
            .infer(request)
            .await
            .map_err(from_status)?
            .into_inner();

        let output = reply
            .output
            .ok_or_else(|| Error::Internal("the reply has no output".into()))?;
        let output = Sealed::try_from(output).map_err(|e| Error::Untrusted(e.to_string()))?;
        let to_client = pipeline.output_context(request_id);
        let plaintext = open_activation(&response_key, &to_client, &output)
            .map_err(|_| Error::Untrusted("the output does not open for this request".into()))?;
        let outputs = decode_bundle_shared(plaintext.into_shared())
            .map_err(|e| Error::Untrusted(format!("output: {e}")))?;
        Ok(Inference {
            outputs,
            timings: reply.timings,
        })
    }
}

/// The largest message the client sends or accepts (256 MiB).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

fn check_inputs(pipeline: &PipelineManifest, inputs: &[HostTensor]) -> Result<(), Error> {
    for spec in &pipeline.inputs {
        let tensor = inputs
            .iter()
            .find(|t| t.name() == spec.name)
            .ok_or_else(|| Error::BadInput(format!("missing input {:?}", spec.name)))?;
        let shape: Vec<u64> = tensor.shape().iter().map(|&d| d as u64).collect();
        if tensor.dtype() != spec.dtype || shape != spec.shape {
            return Err(Error::BadInput(format!(
                "input {:?} must be {} {:?}, got {} {:?}",
                spec.name,
                spec.dtype,
                spec.shape,
                tensor.dtype(),
                shape
            )));
        }
        if let Some(index) = tensor.first_non_finite() {
            return Err(Error::BadInput(format!(
                "input {:?} holds NaN or infinity at element {index}: ShardSeal serves finite \
                 inputs only",
                spec.name
            )));
        }
    }
    if let Some(extra) = inputs
        .iter()
        .find(|t| pipeline.inputs.iter().all(|s| s.name != t.name()))
    {
        return Err(Error::BadInput(format!(
            "the model has no input {:?}",
            extra.name()
        )));
    }
    Ok(())
}

fn from_status(status: Status) -> Error {
    let message = status.message().to_owned();
    // A status carrying a source error was made on this side, from a transport failure (a
    // connection reset by a coordinator that died, say), not sent by a server: whether the
    // request was processed is unknown, and trying again is the remedy.
    if matches!(
        status.code(),
        Code::Unknown | Code::Internal | Code::Cancelled
    ) && std::error::Error::source(&status).is_some()
    {
        return Error::Unavailable(format!(
            "the connection to the coordinator failed: {message}"
        ));
    }
    match status.code() {
        Code::NotFound => Error::ModelUnknown(message),
        Code::DeadlineExceeded => Error::Deadline(message),
        Code::Unavailable => Error::Unavailable(message),
        Code::ResourceExhausted => Error::Overloaded(message),
        Code::PermissionDenied | Code::Unauthenticated => Error::AttestationRefused(message),
        Code::InvalidArgument | Code::FailedPrecondition => Error::BadInput(message),
        _ => Error::Internal(format!("{:?}: {message}", status.code())),
    }
}
