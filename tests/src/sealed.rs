//! Checks shared by the end-to-end tests: inputs a verified pipeline accepts, and how far
//! sealed outputs are from plain tract's.

use shardseal_proto::tensor::HostTensor;

use crate::models;

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
