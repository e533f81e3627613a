//! The coordinator's static platform: stage functions started by hand, outside any
//! coordinator (as Knative would run them), and a coordinator given only their endpoints.
//! It health-checks them with their Ready RPC, routes sealed requests through them, and
//! never starts or stops them.

use std::path::Path;

use shardseal_function::StageEngine;
use shardseal_sdk::Client;
use shardseal_testkit::cluster::Cluster;
use shardseal_testkit::models;
use shardseal_testkit::sealed::{inputs_for, max_abs_diff};

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_static_coordinator_routes_through_functions_started_by_hand() {
    // `shardseal up` provides the quoting agent, the broker and the PKI; its own
    // coordinator is not used below.
    let cluster = Cluster::start(shardseal()).await;
    let model = models::residual_cnn(&Default::default());
    cluster.provision_and_register("cnn", &model, 2).await;
    let mut stage0 = cluster.start_function("cnn", 0).await;
    let mut stage1 = cluster.start_function("cnn", 1).await;
    // Stage 1 a second time, as a Knative pod runs it: plaintext h2c on loopback, for the
    // pod's proxy. The coordinator dials it without TLS (http://).
    let mut stage1_h2c = cluster
        .start_function_with("cnn", 1, &["--danger-h2c-loopback"])
        .await;

    let endpoints = [
        format!("cnn/0={}", stage0.url()),
        format!("cnn/1={}", stage1.url()),
    ];
    let coordinator = cluster.start_static_coordinator(&endpoints, &[]).await;
    let client = Client::connect(
        &format!("https://{}", coordinator.addr),
        cluster.trust.clone(),
    )
    .await
    .expect("connect to the static coordinator");
    let reference = StageEngine::load(&model).expect("plain tract");
    for seed in 1..=3 {
        let inputs = inputs_for(&client, "cnn", seed).await;
        let expected = reference.run(&inputs).expect("plain run");
        let got = client.infer("cnn", inputs).await.expect("sealed inference");
        let diff = max_abs_diff(&expected, &got.outputs);
        println!("static platform: 2 stages, seed {seed}: max abs diff {diff:e}");
        assert!(diff <= 1e-5, "diff {diff}");
        assert_eq!(got.timings.len(), 2, "one timing per stage");
    }

    // The same pipeline with stage 1 behind an h2c endpoint.
    drop(client);
    drop(coordinator);
    let endpoints = [
        format!("cnn/0={}", stage0.url()),
        format!("cnn/1=http://{}", stage1_h2c.addr),
    ];
    let coordinator = cluster.start_static_coordinator(&endpoints, &[]).await;
    let client = Client::connect(
        &format!("https://{}", coordinator.addr),
        cluster.trust.clone(),
    )
    .await
    .expect("connect to the static coordinator");
    let inputs = inputs_for(&client, "cnn", 4).await;
    let expected = reference.run(&inputs).expect("plain run");
    let got = client
        .infer("cnn", inputs)
        .await
        .expect("sealed inference via h2c");
    let diff = max_abs_diff(&expected, &got.outputs);
    println!("static platform, stage 1 over h2c: max abs diff {diff:e}");
    assert!(diff <= 1e-5, "diff {diff}");

    // Stopping the coordinator leaves the functions running: the platform that started
    // them (here the test, on a cluster Knative) owns them.
    drop(client);
    drop(coordinator);
    assert!(stage0.is_running() && stage1.is_running() && stage1_h2c.is_running());

    // Endpoints given the wrong way round: the Ready check sees each function serve the
    // other stage, so the coordinator routes nothing to them.
    let swapped = [
        format!("cnn/0={}", stage1.url()),
        format!("cnn/1={}", stage0.url()),
    ];
    let coordinator = cluster
        .start_static_coordinator(&swapped, &["--ready-timeout", "1"])
        .await;
    let client = Client::connect(
        &format!("https://{}", coordinator.addr),
        cluster.trust.clone(),
    )
    .await
    .expect("connect to the static coordinator");
    let inputs = inputs_for(&client, "cnn", 9).await;
    let refused = client
        .infer("cnn", inputs)
        .await
        .expect_err("routed to a function of another stage");
    println!("swapped endpoints: {refused}");
    assert!(
        matches!(refused, shardseal_sdk::Error::Unavailable(_)),
        "expected Unavailable, got {refused:?}"
    );
    assert!(stage0.is_running() && stage1.is_running());
    cluster.stop().await;
}

#[test]
fn plaintext_h2c_is_refused_off_loopback_before_any_key_is_asked_for() {
    // The broker address is unreachable: the refusal must come before the cold start.
    let output = std::process::Command::new(shardseal())
        .args([
            "function",
            "--broker",
            "https://127.0.0.1:1",
            "--pki",
            "/nonexistent",
        ])
        .args(["--agent-socket", "/nonexistent", "--store", "/nonexistent"])
        .args(["--model", "m", "--stage", "0", "--listen", "0.0.0.0:0"])
        .arg("--danger-h2c-loopback")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--danger-h2c-loopback serves on a loopback address only"),
        "{stderr}"
    );
}

/// The flags that shape functions the coordinator starts mean nothing to functions it does
/// not start: a static coordinator refuses them, naming where the setting belongs.
#[test]
fn a_static_coordinator_refuses_settings_of_functions_it_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    shardseal_proto::tls::Pki::create(&pki).unwrap();
    for (flag, value, belongs) in [
        ("--memory-limit", "256MiB", "Knative Service's resources"),
        ("--max-batch", "mlp=4", "Knative Service's args"),
    ] {
        let out = std::process::Command::new(shardseal())
            .args([
                "coordinator",
                "--platform",
                "static",
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--endpoint", "mlp/0=http://127.0.0.1:9"])
            .args(["--broker", "https://127.0.0.1:9", "--pki"])
            .arg(&pki)
            .args([flag, value])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag}: {stderr}");
        assert!(
            stderr.contains(&format!("{flag} applies to --platform local"))
                && stderr.contains(belongs),
            "{flag}: {stderr}"
        );
    }
}
