//! The standalone `shardseal-function` binary serves a model end to end, and its own hash,
//! not the `shardseal` command's, is the measurement the owner allows and the client pins.

use std::path::{Path, PathBuf};

use shardseal_function::StageEngine;
use shardseal_testkit::cluster::Cluster;
use shardseal_testkit::models;
use shardseal_testkit::sealed::{inputs_for, max_abs_diff};

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

/// `shardseal-function`, built beside `shardseal` by `cargo test --workspace` (the
/// function package's own tests make cargo build it).
fn standalone_function() -> PathBuf {
    let path = shardseal().with_file_name("shardseal-function");
    assert!(
        path.exists(),
        "{} not found: run `cargo test --workspace` or `cargo build -p shardseal-function`",
        path.display()
    );
    path
}

fn sha256(path: &Path) -> String {
    shardseal_attestation::measure_executable(path)
        .unwrap()
        .to_hex()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_standalone_function_binary_serves_under_its_own_measurement() {
    let function = standalone_function();
    let cluster = Cluster::start_with(
        shardseal(),
        &[
            "--function-command".to_owned(),
            function.display().to_string(),
        ],
    )
    .await;
    let trusted: Vec<String> = cluster
        .trust
        .measurements
        .iter()
        .map(|m| m.to_hex())
        .collect();
    assert_eq!(trusted, vec![sha256(&function)]);
    assert_ne!(trusted[0], sha256(shardseal()));

    let model = models::mlp(&Default::default());
    cluster.provision_and_register("mlp", &model, 2).await;
    let client = cluster.client().await;
    let engine = StageEngine::load(&model).unwrap();
    let inputs = inputs_for(&client, "mlp", 5).await;
    let expected = engine.run(&inputs).unwrap();
    let got = client.infer("mlp", inputs).await.expect("sealed inference");
    assert!(max_abs_diff(&expected, &got.outputs) <= 1e-5);
    // The functions that served are the standalone binary.
    let running = cluster.function_processes();
    assert_eq!(running.len(), 2, "{running:?}");
    for f in running {
        let exe = std::fs::read_link(format!("/proc/{}/exe", f.pid)).unwrap();
        assert_eq!(exe, function, "stage {}", f.stage);
    }
    cluster.stop().await;
}
