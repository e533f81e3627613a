//! What the broker signs for others to check: the pipeline manifest a data owner verifies
//! before sealing anything, and the short-lived token of an attested function.
//!
//! Both travel as a [`SignedBlob`](shardseal_proto::v1::SignedBlob) (body, signature,
//! signer) and are [`Signed`] payloads: the signature is checked over the exact body bytes
//! before the body is parsed.

use serde::{Deserialize, Serialize};
use shardseal_attestation::{Measurement, ModelId, ModelVersion, StageIndex};
use shardseal_proto::v1::SignedBlob;

use crate::error::Error;
use crate::manifest::TensorSpec;
use crate::seal::{ActivationContext, Direction, RecipientPublicKey, RequestId};
use crate::signing::{SIGNATURE_LEN, Signature, Signed, SignedPayload, VerifyingKey};

/// The broker's description of a servable model: what a client checks before it seals
/// its inputs to stage 0.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineManifest {
    /// The model.
    pub model_id: ModelId,
    /// The version served.
    pub version: ModelVersion,
    /// The deployment bound into every activation's AAD (`<model>@v<version>`).
    pub deployment: String,
    /// How many stages the model is cut into.
    pub stage_count: u32,
    /// The model's inputs, which the client must provide exactly.
    pub inputs: Vec<TensorSpec>,
    /// The model's outputs, which the client will receive.
    pub outputs: Vec<TensorSpec>,
    /// The public key inputs are sealed to.
    pub stage0_public_key: RecipientPublicKey,
    /// Per stage, the function measurements the broker releases keys to.
    pub allowed_measurements: Vec<Vec<Measurement>>,
    /// The model owner's signing key.
    pub owner_key: VerifyingKey,
    /// When the broker issued this manifest (Unix milliseconds).
    pub issued_at_ms: u64,
}

impl PipelineManifest {
    /// The deployment name of a model version.
    pub fn deployment_name(model: &ModelId, version: ModelVersion) -> String {
        format!("{model}@v{}", version.0)
    }

    /// What a client seals its inputs to stage 0 under, for request `request_id`.
    pub fn input_context(&self, request_id: RequestId) -> ActivationContext {
        ActivationContext {
            deployment: self.deployment.clone(),
            request_id,
            hop: 0,
            direction: Direction::TowardNextStage,
        }
    }

    /// What the last stage seals the outputs of request `request_id` under, to the client.
    pub fn output_context(&self, request_id: RequestId) -> ActivationContext {
        ActivationContext {
            deployment: self.deployment.clone(),
            request_id,
            hop: self.stage_count,
            direction: Direction::TowardClient,
        }
    }
}

impl SignedPayload for PipelineManifest {
    const DOMAIN: &'static str = "shardseal/v1/pipeline-manifest";

    fn validate(&self) -> Result<(), Error> {
        let invalid = |detail: &str| Error::Malformed {
            what: Self::DOMAIN,
            detail: detail.to_owned(),
        };
        if self.stage_count == 0 || self.allowed_measurements.len() != self.stage_count as usize {
            return Err(invalid(
                "one list of allowed measurements per stage is required",
            ));
        }
        if self.deployment != Self::deployment_name(&self.model_id, self.version) {
            return Err(invalid("the deployment does not name this model version"));
        }
        if self.inputs.is_empty() || self.outputs.is_empty() {
            return Err(invalid("a pipeline has inputs and outputs"));
        }
        Ok(())
    }
}

/// Proof that a function attested: which code, serving which stage, until when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionToken {
    /// The model.
    pub model_id: ModelId,
    /// The version whose keys were released.
    pub version: ModelVersion,
    /// The stage.
    pub stage: StageIndex,
    /// The function's measured executable.
    pub measurement: Measurement,
    /// The ephemeral key the keys were sealed to (hex).
    pub ephemeral_key: String,
    /// When the broker signed it (Unix milliseconds, the broker's clock).
    pub issued_at_ms: u64,
    /// Expiry (Unix milliseconds, the broker's clock).
    pub expires_at_ms: u64,
}

impl FunctionToken {
    /// How long the broker leases the keys for: from issue to expiry, both on the
    /// broker's clock. `None` if the token expires before it was issued.
    ///
    /// A function counts this from a moment of its own that precedes the issue (when it
    /// connected to the broker to attest), on its monotonic clock, so its lease never
    /// outlasts the broker's whatever its wall clock says: a clock set behind or ahead of
    /// the broker's neither stretches nor voids the lease.
    pub fn lifetime(&self) -> Option<std::time::Duration> {
        self.expires_at_ms
            .checked_sub(self.issued_at_ms)
            .map(std::time::Duration::from_millis)
    }
}

impl SignedPayload for FunctionToken {
    const DOMAIN: &'static str = "shardseal/v1/function-token";
}

/// Converts a signed payload to its wire form.
pub fn to_blob<T: SignedPayload>(signed: &Signed<T>) -> SignedBlob {
    SignedBlob {
        body: signed.body().to_vec(),
        signature: signed.signature().as_bytes().to_vec(),
        signer: signed.signer().as_bytes().to_vec(),
    }
}

/// Reads a signed payload from its wire form (the signature is not checked yet: call
/// [`Signed::verify`] with the key you pin).
pub fn from_blob<T: SignedPayload>(blob: &SignedBlob) -> Result<Signed<T>, Error> {
    let signer: [u8; 32] = blob
        .signer
        .as_slice()
        .try_into()
        .map_err(|_| Error::InvalidLength {
            what: "signer",
            expected: 32,
            actual: blob.signer.len(),
        })?;
    let signature: [u8; SIGNATURE_LEN] =
        blob.signature
            .as_slice()
            .try_into()
            .map_err(|_| Error::InvalidLength {
                what: "signature",
                expected: SIGNATURE_LEN,
                actual: blob.signature.len(),
            })?;
    Ok(Signed::from_parts(
        blob.body.clone(),
        VerifyingKey::from_bytes(signer),
        Signature::from_bytes(signature),
    ))
}

/// Verifies a broker-signed pipeline manifest against the broker key the client pins.
pub fn verify_pipeline(
    blob: &SignedBlob,
    broker_key: &VerifyingKey,
) -> Result<PipelineManifest, Error> {
    from_blob::<PipelineManifest>(blob)?.verify(broker_key)
}
