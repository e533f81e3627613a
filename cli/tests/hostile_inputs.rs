//! Hostile and bad input against a whole deployment (real processes, real sockets): every
//! bad tensor, oversized message, stalled client and stale key gets a clear error or gRPC
//! status, and the deployment keeps serving correct results afterwards.
//!
//! - through the SDK, bad tensors are refused with a typed error before anything is sealed
//!   or sent (no stage processes them);
//! - sealed by hand and sent on a raw coordinator connection, the same tensors (and lies the
//!   SDK cannot even build: huge declared shapes, short data, unknown dtypes, duplicate
//!   names, bytes that are no tensor bundle) reach the function, which refuses them with
//!   `INVALID_ARGUMENT`;
//! - NaN and infinity in a model input are refused (by the SDK before sealing, by the first
//!   stage from any other client) with a message naming the input and element: tract's
//!   plans of a whole model and of its stages do not propagate them alike, so a sealed
//!   answer would not be the model's; extreme finite values are served exactly;
//! - messages over the size limit are refused with `OUT_OF_RANGE`/`RESOURCE_EXHAUSTED`;
//! - clients that connect and stall do not stop others from being served;
//! - after a rotation, activations sealed to the old stage key are refused, and requests
//!   for the old version are refused as such.

use shardseal_proto::tls::Role;
use std::path::Path;
use std::process::Stdio;
use tonic::transport::Endpoint;

use prost::Message;
use shardseal_function::StageEngine;
use shardseal_keys::broker::OwnerReleasePolicy;
use shardseal_keys::{PipelineManifest, RecipientPublicKey, RequestId, seal_activation};
use shardseal_proto::tensor::{DType, HostTensor, TensorError, encode_bundle};
use shardseal_proto::v1::{InferRequest, TensorBundle};
use shardseal_sdk::Error as SdkError;
use shardseal_testkit::cluster::Cluster;
use shardseal_testkit::models;
use shardseal_testkit::sealed::{inputs_for, max_abs_diff, request_header};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tonic::Code;

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

/// A request whose input is `plaintext` sealed, correctly, to stage 0 of `pipeline`.
fn sealed_request(
    pipeline: &PipelineManifest,
    stage0: &RecipientPublicKey,
    plaintext: &[u8],
) -> InferRequest {
    let request_id = RequestId::random().unwrap();
    let sealed = seal_activation(stage0, &pipeline.input_context(request_id), plaintext).unwrap();
    InferRequest {
        header: Some(request_header(
            pipeline,
            pipeline.model_id.as_str(),
            request_id,
        )),
        input: Some(sealed.into()),
    }
}

fn raw_tensor(
    name: &str,
    dtype: &str,
    shape: &[u64],
    data: Vec<u8>,
) -> shardseal_proto::v1::Tensor {
    shardseal_proto::v1::Tensor {
        name: name.into(),
        dtype: dtype.into(),
        shape: shape.to_vec(),
        data: data.into(),
    }
}

fn bundle(tensors: Vec<shardseal_proto::v1::Tensor>) -> Vec<u8> {
    TensorBundle { tensors }.encode_to_vec()
}

/// Requests processed so far by every function of the deployment, from their logs.
fn requests_processed(cluster: &Cluster) -> usize {
    let Ok(entries) = std::fs::read_dir(cluster.state().join("logs")) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("function-"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .map(|log| {
            log.lines()
                .filter(|l| l.contains("processed open_ms="))
                .count()
        })
        .sum()
}

/// The MLP's input is `x`: f32 [2, 32].
const X_SHAPE: [usize; 2] = [2, 32];

fn f32_bytes(n: usize, value: f32) -> Vec<u8> {
    std::iter::repeat_n(value.to_le_bytes(), n)
        .flatten()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sdk_refuses_bad_tensors_before_sealing_anything() {
    let cluster = Cluster::start(shardseal()).await;
    let model = models::mlp(&Default::default());
    cluster.provision_and_register("mlp", &model, 2).await;
    let client = cluster.client().await;
    // Warm the pipeline up so that its functions exist and log what they process.
    let good = inputs_for(&client, "mlp", 1).await;
    client
        .infer("mlp", good.clone())
        .await
        .expect("genuine request");
    let processed = requests_processed(&cluster);
    assert_eq!(processed, 2, "one request through two stages");

    let n = X_SHAPE[0] * X_SHAPE[1];
    let cases: Vec<(&str, Vec<HostTensor>, &str)> = vec![
        (
            "wrong dtype",
            vec![HostTensor::new("x", DType::I32, X_SHAPE.to_vec(), vec![0; n * 4]).unwrap()],
            "must be f32 [2, 32], got i32 [2, 32]",
        ),
        (
            "wrong shape",
            vec![HostTensor::new("x", DType::F32, vec![2, 31], f32_bytes(62, 1.0)).unwrap()],
            "must be f32 [2, 32], got f32 [2, 31]",
        ),
        (
            "wrong rank",
            vec![HostTensor::new("x", DType::F32, vec![n], f32_bytes(n, 1.0)).unwrap()],
            "must be f32 [2, 32], got f32 [64]",
        ),
        (
            "empty tensor",
            vec![HostTensor::new("x", DType::F32, vec![0, 32], Vec::new()).unwrap()],
            "must be f32 [2, 32], got f32 [0, 32]",
        ),
        (
            "rank 0",
            vec![HostTensor::new("x", DType::F32, vec![], f32_bytes(1, 1.0)).unwrap()],
            "must be f32 [2, 32], got f32 []",
        ),
        ("no input", vec![], "missing input \"x\""),
        (
            "an extra input",
            vec![
                good[0].clone(),
                HostTensor::new("extra", DType::U8, vec![1], vec![1]).unwrap(),
            ],
            "the model has no input \"extra\"",
        ),
        (
            "a misnamed input",
            vec![good[0].clone().with_name("X")],
            "missing input \"x\"",
        ),
    ];
    for (what, inputs, message) in cases {
        match client.infer("mlp", inputs).await {
            Err(SdkError::BadInput(m)) => assert!(m.contains(message), "{what}: {m}"),
            other => panic!("{what}: expected BadInput, got {other:?}"),
        }
    }
    // Tensors whose declared size is a lie cannot even be built.
    assert!(matches!(
        HostTensor::new("x", DType::F32, vec![1 << 40, 1 << 40], Vec::new()),
        Err(TensorError::ShapeTooLarge { .. })
    ));
    assert!(matches!(
        HostTensor::new("x", DType::F32, vec![usize::MAX, 2], Vec::new()),
        Err(TensorError::ShapeTooLarge { .. })
    ));
    assert!(matches!(
        HostTensor::new("x", DType::F32, X_SHAPE.to_vec(), vec![0; 5]),
        Err(TensorError::DataLength {
            expected: 256,
            actual: 5,
            ..
        })
    ));
    assert_eq!(
        requests_processed(&cluster),
        processed,
        "a refused request reached a stage"
    );
    // And the pipeline still serves, correctly.
    let expected = StageEngine::load(&model).unwrap().run(&good).unwrap();
    let got = client
        .infer("mlp", good)
        .await
        .expect("served after refusals");
    assert!(max_abs_diff(&expected, &got.outputs) <= 1e-5);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_tensors_sealed_by_hand_are_refused_by_the_function_which_keeps_serving() {
    let cluster = Cluster::start(shardseal()).await;
    let model = models::mlp(&Default::default());
    cluster.provision_and_register("mlp", &model, 2).await;
    let client = cluster.client().await;
    let pipeline = client.pipeline("mlp").await.unwrap();
    let stage0 = pipeline.stage0_public_key;
    let mut raw = cluster.raw_coordinator().await;
    let n = X_SHAPE[0] * X_SHAPE[1];
    let x = |dtype: &str, shape: &[u64], data: Vec<u8>| {
        bundle(vec![raw_tensor("x", dtype, shape, data)])
    };

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("wrong dtype", x("i32", &[2, 32], vec![0; n * 4])),
        ("wrong shape", x("f32", &[2, 31], f32_bytes(62, 1.0))),
        ("wrong rank", x("f32", &[64], f32_bytes(64, 1.0))),
        ("rank 5", x("f32", &[1, 2, 1, 32, 1], f32_bytes(64, 1.0))),
        ("empty tensor", x("f32", &[0, 32], Vec::new())),
        ("empty bundle", bundle(Vec::new())),
        (
            "misnamed input",
            bundle(vec![raw_tensor("X", "f32", &[2, 32], f32_bytes(n, 1.0))]),
        ),
        (
            "huge declared shape",
            x("f32", &[u64::MAX, u64::MAX], Vec::new()),
        ),
        ("declared 16 TiB", x("f32", &[1 << 21, 1 << 21], Vec::new())),
        (
            "declared just over 4 GiB",
            x("u8", &[(4 << 30) + 1], Vec::new()),
        ),
        ("short data", x("f32", &[2, 32], f32_bytes(n - 1, 1.0))),
        ("long data", x("f32", &[2, 32], f32_bytes(n + 1, 1.0))),
        ("unknown dtype", x("bf16", &[2, 32], vec![0; n * 2])),
        (
            "duplicate names",
            bundle(vec![
                raw_tensor("x", "f32", &[2, 32], f32_bytes(n, 1.0)),
                raw_tensor("x", "f32", &[2, 32], f32_bytes(n, 2.0)),
            ]),
        ),
        ("not a tensor bundle", vec![0xff; 100]),
    ];
    for (what, plaintext) in &cases {
        let status = raw
            .infer(sealed_request(&pipeline, &stage0, plaintext))
            .await
            .expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            !status.message().contains("panic"),
            "{what}: {}",
            status.message()
        );
    }

    // Malformed request fields are refused too.
    let mut no_header = sealed_request(&pipeline, &stage0, &x("f32", &[2, 32], f32_bytes(n, 1.0)));
    no_header.header = None;
    let status = raw.infer(no_header).await.expect_err("no header");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let mut no_input = sealed_request(&pipeline, &stage0, &[]);
    no_input.input = None;
    let status = raw.infer(no_input).await.expect_err("no input");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let mut short_id = sealed_request(&pipeline, &stage0, &x("f32", &[2, 32], f32_bytes(n, 1.0)));
    if let Some(h) = short_id.header.as_mut() {
        h.request_id.truncate(3);
    }
    let status = raw.infer(short_id).await.expect_err("3-byte request id");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let mut short_enc = sealed_request(&pipeline, &stage0, &x("f32", &[2, 32], f32_bytes(n, 1.0)));
    if let Some(input) = short_enc.input.as_mut() {
        input.enc.truncate(31);
    }
    let status = raw.infer(short_enc).await.expect_err("31-byte enc");
    assert!(
        matches!(
            status.code(),
            Code::InvalidArgument | Code::PermissionDenied
        ),
        "{status:?}"
    );
    let mut bad_response_key =
        sealed_request(&pipeline, &stage0, &x("f32", &[2, 32], f32_bytes(n, 1.0)));
    if let Some(h) = bad_response_key.header.as_mut() {
        h.response_key = vec![1, 2, 3];
    }
    let status = raw
        .infer(bad_response_key)
        .await
        .expect_err("3-byte response key");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // Still serving, correctly, through the SDK.
    let inputs = inputs_for(&client, "mlp", 3).await;
    let expected = StageEngine::load(&model).unwrap().run(&inputs).unwrap();
    let got = client
        .infer("mlp", inputs)
        .await
        .expect("served after refusals");
    assert!(max_abs_diff(&expected, &got.outputs) <= 1e-5);
    cluster.stop().await;
}

/// Outputs of the sealed pipeline and of plain tract on the whole model that differ (NaN
/// equal to NaN), as `(index, tract, sealed)`.
fn differences(expected: &HostTensor, got: &HostTensor) -> Vec<(usize, f64, f64)> {
    let (e, g) = (expected.to_f64_lossy(), got.to_f64_lossy());
    assert_eq!(e.len(), g.len());
    e.iter()
        .zip(&g)
        .enumerate()
        .filter(|(_, (a, b))| !((a.is_nan() && b.is_nan()) || a == b || (*a - *b).abs() <= 1e-5))
        .map(|(i, (a, b))| (i, *a, *b))
        .collect()
}

/// The MLP's input with `special` once, at row 1, element 5 (flat index 37).
fn input_with_special(special: f32) -> HostTensor {
    let n = X_SHAPE[0] * X_SHAPE[1];
    let mut values: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
    values[X_SHAPE[1] + 5] = special;
    HostTensor::from_f32("x", X_SHAPE.to_vec(), &values).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nan_and_infinity_are_refused_and_extreme_finite_values_are_served_exactly() {
    let cluster = Cluster::start(shardseal()).await;
    let model = models::mlp(&Default::default());
    cluster.provision_and_register("mlp", &model, 2).await;
    let client = cluster.client().await;
    let reference = StageEngine::load(&model).unwrap();
    let pipeline = client.pipeline("mlp").await.unwrap();
    let mut raw = cluster.raw_coordinator().await;
    for special in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let inputs = vec![input_with_special(special)];
        // The SDK refuses before sealing anything...
        match client.infer("mlp", inputs.clone()).await {
            Err(SdkError::BadInput(message)) => {
                assert!(
                    message.contains("\"x\"") && message.contains("element 37"),
                    "{message}"
                );
            }
            other => panic!("{special}: {other:?}"),
        }
        // ...and the first stage refuses the same tensor sealed by any other client.
        let request = sealed_request(
            &pipeline,
            &pipeline.stage0_public_key,
            &encode_bundle(&inputs),
        );
        let status = raw.infer(request).await.expect_err("a non-finite input");
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{special}: {status:?}"
        );
        assert!(
            status.message().contains("NaN or infinity at element 37"),
            "{status:?}"
        );
    }
    // Extreme finite values are data: served, and equal to plain tract.
    for special in [f32::MAX, f32::MIN, f32::MIN_POSITIVE] {
        let inputs = vec![input_with_special(special)];
        let expected = reference.run(&inputs).unwrap();
        let got = client
            .infer("mlp", inputs)
            .await
            .unwrap_or_else(|e| panic!("{special}: {e}"));
        assert_eq!(
            differences(&expected[0], &got.outputs[0]),
            Vec::new(),
            "{special}"
        );
    }
    // And ordinary inputs are still served exactly.
    let inputs = inputs_for(&client, "mlp", 8).await;
    let expected = reference.run(&inputs).unwrap();
    let got = client
        .infer("mlp", inputs)
        .await
        .expect("served after refusals");
    assert!(max_abs_diff(&expected, &got.outputs) <= 1e-5);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_messages_are_refused_and_the_services_keep_serving() {
    let cluster = Cluster::start(shardseal()).await;
    let model = models::mlp(&Default::default());
    cluster.provision_and_register("mlp", &model, 2).await;
    let client = cluster.client().await;
    let pipeline = client.pipeline("mlp").await.unwrap();
    let mut raw = cluster.raw_coordinator().await;

    // One byte over the coordinator's 256 MiB limit: refused from the length prefix,
    // before the body is buffered.
    let mut request = sealed_request(&pipeline, &pipeline.stage0_public_key, b"x");
    if let Some(input) = request.input.as_mut() {
        input.ciphertext = vec![0u8; 256 << 20].into();
    }
    let status = raw.infer(request).await.expect_err("a 256 MiB request");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );

    // The broker's limit is 8 MiB (its messages are small); a 9 MiB model id is refused.
    let pki = cluster.pki();
    let broker_tls = pki.client_config(Role::Broker, None).unwrap();
    let channel = Endpoint::from_shared(cluster.broker_url.clone())
        .unwrap()
        .tls_config(broker_tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut broker = shardseal_proto::v1::key_broker_client::KeyBrokerClient::new(channel)
        .max_encoding_message_size(usize::MAX);
    let status = broker
        .get_pipeline_manifest(shardseal_proto::v1::PipelineManifestRequest {
            model_id: "m".repeat(9 << 20),
        })
        .await
        .expect_err("a 9 MiB broker request");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    // Both keep serving.
    let manifest = broker
        .get_pipeline_manifest(shardseal_proto::v1::PipelineManifestRequest {
            model_id: "mlp".into(),
        })
        .await;
    assert!(manifest.is_ok(), "{manifest:?}");
    let inputs = inputs_for(&client, "mlp", 5).await;
    client
        .infer("mlp", inputs)
        .await
        .expect("served after oversized messages");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_that_connect_and_stall_do_not_stop_others() {
    let cluster = Cluster::start(shardseal()).await;
    let model = models::mlp(&Default::default());
    cluster.provision_and_register("mlp", &model, 2).await;
    let client = cluster.client().await;
    let reference = StageEngine::load(&model).unwrap();
    let coordinator = cluster
        .coordinator_url
        .trim_start_matches("https://")
        .to_owned();
    let broker = cluster.broker_url.trim_start_matches("https://").to_owned();

    let mut stalled = Vec::new();
    for addr in [&coordinator, &broker] {
        for i in 0..40 {
            let mut socket = TcpStream::connect(addr.as_str()).await.unwrap();
            match i % 4 {
                // Connects and sends nothing.
                0 => {}
                // Half a TLS record header.
                1 => socket.write_all(&[0x16, 0x03]).await.unwrap(),
                // A ClientHello record that promises more bytes than it sends.
                2 => socket
                    .write_all(&[
                        0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x3f, 0xfc, 0x03, 0x03,
                    ])
                    .await
                    .unwrap(),
                // Plaintext HTTP/2 preface, cut short.
                _ => socket.write_all(b"PRI * HTTP/2.0\r\n\r\nSM").await.unwrap(),
            }
            stalled.push(socket);
        }
    }
    // Genuine clients are served, correctly, while 80 connections stall.
    for seed in 0..3 {
        let inputs = inputs_for(&client, "mlp", 40 + seed).await;
        let expected = reference.run(&inputs).unwrap();
        let got = client
            .infer("mlp", inputs)
            .await
            .expect("served while others stall");
        assert!(max_abs_diff(&expected, &got.outputs) <= 1e-5);
    }
    let fresh = cluster.client().await;
    let inputs = inputs_for(&fresh, "mlp", 50).await;
    fresh
        .infer("mlp", inputs)
        .await
        .expect("a new client connects while others stall");
    drop(stalled);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn activations_sealed_to_the_stage_key_of_before_a_rotation_are_refused() {
    let cluster = Cluster::start(shardseal()).await;
    let model = models::mlp(&Default::default());
    cluster.provision_and_register("mlp", &model, 2).await;
    let stale_client = cluster.client().await;
    let v1 = stale_client.pipeline("mlp").await.unwrap();

    // The owner provisions version 2 (fresh shard keys) and rotates the broker to it.
    let store = cluster.state().join("store");
    let model_path = cluster.state().join("mlp-v2.onnx");
    std::fs::write(&model_path, &model).unwrap();
    let status = tokio::process::Command::new(shardseal())
        .args(["keys", "provision", "--model"])
        .arg(&model_path)
        .args([
            "--model-id",
            "mlp",
            "--version",
            "2",
            "--stages",
            "2",
            "--keystore",
        ])
        .arg(cluster.state().join("owner"))
        .arg("--store")
        .arg(&store)
        .stdout(Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(status.success(), "provisioning v2");
    let manifest = std::fs::read(
        store
            .join("models")
            .join("mlp")
            .join("v2")
            .join("manifest.json"),
    )
    .unwrap();
    let measurement = *cluster.trust.measurements.iter().next().unwrap();
    let policy = OwnerReleasePolicy::same_for_all_stages(2, &[measurement]);
    shardseal_keys::broker::owner::rotate(
        &cluster.broker_url,
        &cluster.pki(),
        &cluster.owner,
        &manifest,
        &policy,
    )
    .await
    .expect("rotate to v2");

    let client = cluster.client().await;
    let v2 = client.pipeline("mlp").await.unwrap();
    assert_eq!(v2.version.0, 2);
    assert_ne!(
        v1.stage0_public_key, v2.stage0_public_key,
        "a rotation gives stage 0 a new keypair"
    );
    let n = X_SHAPE[0] * X_SHAPE[1];
    let plaintext = bundle(vec![raw_tensor("x", "f32", &[2, 32], f32_bytes(n, 0.5))]);
    let mut raw = cluster.raw_coordinator().await;
    // Sealed to the old key, under the new deployment or the old one: neither opens.
    // Under the new deployment the old key does not open.
    let status = raw
        .infer(sealed_request(&v2, &v1.stage0_public_key, &plaintext))
        .await
        .expect_err("sealed to the old key");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // Under the old deployment the function refuses before trying: it serves v2 only.
    let status = raw
        .infer(sealed_request(&v1, &v1.stage0_public_key, &plaintext))
        .await
        .expect_err("a v1 request after the rotation");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("mlp@v2"), "{status:?}");
    // A client that cached the old manifest is refused the same way, with a typed error
    // (it does not refresh its manifest by itself).
    let inputs = inputs_for(&client, "mlp", 9).await;
    match stale_client.infer("mlp", inputs.clone()).await {
        Err(SdkError::BadInput(m)) => assert!(m.contains("mlp@v2"), "{m}"),
        other => panic!("a stale client was served: {other:?}"),
    }
    // The new version serves, correctly.
    let expected = StageEngine::load(&model).unwrap().run(&inputs).unwrap();
    let got = client.infer("mlp", inputs).await.expect("v2 serves");
    assert!(max_abs_diff(&expected, &got.outputs) <= 1e-5);
    cluster.stop().await;
}
