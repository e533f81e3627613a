//! Checks shared by the end-to-end tests: inputs a verified pipeline accepts, request
//! headers for requests sealed by hand, how far sealed outputs are from plain tract's, and
//! a request that must fail as unavailable.

use shardseal_keys::{PipelineManifest, RecipientPrivateKey, RequestId, Sealed};
use shardseal_proto::tensor::HostTensor;
use shardseal_proto::v1::RequestHeader;

use crate::models;

/// Sends `inputs` for `model` and expects the request to fail within two minutes (not
/// hang) as `UNAVAILABLE` naming `stage`, with `hidden` nowhere in the message: the client
/// learns which stage is unavailable, not why.
pub async fn expect_unavailable(
    client: &shardseal_sdk::Client,
    model: &str,
    inputs: Vec<HostTensor>,
    stage: u32,
    hidden: &str,
) {
    let outcome = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        client.infer(model, inputs),
    )
    .await
    .expect("the request fails within its time, it does not hang");
    match outcome {
        Err(shardseal_sdk::Error::Unavailable(message)) => {
            assert!(message.contains(&format!("stage {stage}")), "{message}");
            assert!(
                !message.contains(hidden),
                "no detail reaches the client: {message}"
            );
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

/// Deterministic f32 inputs for every input the client's verified manifest declares.
pub async fn inputs_for(client: &shardseal_sdk::Client, model: &str, seed: u64) -> Vec<HostTensor> {
    let pipeline = client.pipeline(model).await.expect("verified pipeline");
    let mut rng = models::Xorshift::new(seed);
    pipeline
        .inputs
        .iter()
        .map(|spec| {
            let shape: Vec<usize> = spec.shape.iter().map(|&d| d as usize).collect();
            let values: Vec<f32> = (0..shape.iter().product::<usize>())
                .map(|_| rng.next_f32())
                .collect();
            HostTensor::from_f32(spec.name.clone(), shape, &values).expect("input tensor")
        })
        .collect()
}

/// The header of a request for `model` (which need not be the pipeline's: a test may name
/// another), at `pipeline`'s version, as a client sealing by hand would send it: with a
/// fresh response key whose private half nobody keeps, so its output is never read.
pub fn request_header(
    pipeline: &PipelineManifest,
    model: &str,
    request_id: RequestId,
) -> RequestHeader {
    RequestHeader {
        model_id: model.into(),
        version: pipeline.version.0,
        request_id: request_id.as_bytes().to_vec(),
        response_key: RecipientPrivateKey::generate()
            .expect("response key")
            .public_key()
            .as_bytes()
            .to_vec(),
    }
}

/// The largest absolute difference between two output sets, matched by name (panics
/// on a missing output or a shape mismatch).
pub fn max_abs_diff(expected: &[HostTensor], actual: &[HostTensor]) -> f64 {
    max_diff(expected, actual, |x, y| (x - y).abs())
}

/// The largest difference between two output sets relative to the expected value's
/// magnitude (at least 1), matched by name like [`max_abs_diff`]: for models whose
/// outputs are far from 1 (the canary-weight models' are around 1e17).
pub fn max_relative_diff(expected: &[HostTensor], actual: &[HostTensor]) -> f64 {
    max_diff(expected, actual, |x, y| (x - y).abs() / x.abs().max(1.0))
}

fn max_diff(
    expected: &[HostTensor],
    actual: &[HostTensor],
    difference: impl Fn(f64, f64) -> f64,
) -> f64 {
    assert_eq!(expected.len(), actual.len(), "output count");
    let mut max = 0.0f64;
    for e in expected {
        let a = actual
            .iter()
            .find(|a| a.name() == e.name())
            .unwrap_or_else(|| panic!("missing output {}", e.name()));
        assert_eq!(a.shape(), e.shape(), "shape of {}", e.name());
        for (x, y) in e.to_f64_lossy().iter().zip(a.to_f64_lossy()) {
            max = max.max(difference(*x, y));
        }
    }
    max
}

/// `sealed` with bit 0 of its ciphertext's byte `at` flipped: a tampered envelope.
pub fn tampered(sealed: &Sealed, at: usize) -> Sealed {
    let mut ciphertext = sealed.ciphertext.to_vec();
    ciphertext[at] ^= 1;
    Sealed {
        enc: sealed.enc,
        ciphertext: ciphertext.into(),
    }
}
