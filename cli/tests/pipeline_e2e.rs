//! The sealed pipeline end to end, with real processes over real sockets: `shardseal up`
//! (quoting agent, key broker, coordinator, function processes), the owner's provisioning
//! command and the client SDK.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use shardseal_function::StageEngine;
use shardseal_keys::{ActivationContext, RecipientPrivateKey, RequestId, seal_activation};
use shardseal_proto::tensor::{HostTensor, encode_bundle};
use shardseal_proto::v1::{InferRequest, RequestHeader};
use shardseal_testkit::cluster::Cluster;
use shardseal_testkit::models;
use shardseal_testkit::sealed::{inputs_for, max_abs_diff, tampered};

/// The `shardseal` executable cargo built for these tests.
fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sealed_outputs_equal_plain_tract_for_three_models_and_one_to_four_stages() {
    let cluster = Cluster::start(shardseal()).await;
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        ("cnn-1", models::residual_cnn(&Default::default()), 1),
        ("cnn-3", models::residual_cnn(&Default::default()), 3),
        ("mlp-2", models::mlp(&Default::default()), 2),
        ("mlp-4", models::mlp(&Default::default()), 4),
        ("cross-2", models::multi_cross(), 2),
        ("twoio-2", models::two_io(), 2),
    ];
    for (id, model, stages) in &cases {
        cluster.provision_and_register(id, model, *stages).await;
    }
    let client = cluster.client().await;
    for (id, model, stages) in &cases {
        let reference = StageEngine::load(model).expect("plain tract");
        for seed in 1..=2 {
            let inputs = inputs_for(&client, id, seed).await;
            let expected = reference.run(&inputs).expect("plain run");
            let got = client.infer(id, inputs).await.expect("sealed inference");
            let diff = max_abs_diff(&expected, &got.outputs);
            println!("{id}: {stages} stage(s), seed {seed}: max abs diff {diff:e}");
            assert!(diff <= 1e-5, "{id}: diff {diff}");
            assert_eq!(got.timings.len(), *stages as usize, "one timing per stage");
        }
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_clients_get_correct_distinct_outputs() {
    let cluster = Cluster::start(shardseal()).await;
    let model = models::mlp(&Default::default());
    cluster.provision_and_register("mlp", &model, 2).await;
    let reference = Arc::new(StageEngine::load(&model).expect("plain tract"));
    let client = Arc::new(cluster.client().await);
    let mut tasks = Vec::new();
    for seed in 0..16u64 {
        let client = client.clone();
        let reference = reference.clone();
        tasks.push(tokio::spawn(async move {
            let inputs = inputs_for(&client, "mlp", 100 + seed).await;
            let expected = reference.run(&inputs).expect("plain run");
            let got = client.infer("mlp", inputs).await.expect("sealed inference");
            assert!(max_abs_diff(&expected, &got.outputs) <= 1e-5);
            got.outputs[0].data().to_vec()
        }));
    }
    let mut distinct = HashSet::new();
    for t in tasks {
        distinct.insert(t.await.expect("task"));
    }
    assert_eq!(distinct.len(), 16, "every client got its own output");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tampered_and_replayed_activations_are_refused_and_the_function_keeps_serving() {
    let cluster = Cluster::start(shardseal()).await;
    let model = models::mlp(&Default::default());
    cluster.provision_and_register("mlp", &model, 2).await;
    let client = cluster.client().await;
    let pipeline = client.pipeline("mlp").await.expect("pipeline");
    let inputs = inputs_for(&client, "mlp", 7).await;

    // A raw coordinator connection, as an attacker on the client side would have.
    let mut raw = cluster.raw_coordinator().await;
    let response_key = RecipientPrivateKey::generate().unwrap();
    let request_id = RequestId::random().unwrap();
    let context = pipeline.input_context(request_id);
    let sealed = seal_activation(
        &pipeline.stage0_public_key,
        &context,
        &encode_bundle(&inputs),
    )
    .unwrap();
    let header = |id: RequestId| RequestHeader {
        model_id: "mlp".into(),
        version: pipeline.version.0,
        request_id: id.as_bytes().to_vec(),
        response_key: response_key.public_key().as_bytes().to_vec(),
    };

    // Genuine: accepted.
    let ok = raw
        .infer(InferRequest {
            header: Some(header(request_id)),
            input: Some(sealed.clone().into()),
        })
        .await;
    assert!(ok.is_ok(), "genuine request refused: {ok:?}");

    // Tampered: one bit of the ciphertext flipped.
    let tampered = tampered(&sealed, sealed.ciphertext.len() - 1);
    let status = raw
        .infer(InferRequest {
            header: Some(header(request_id)),
            input: Some(tampered.into()),
        })
        .await
        .expect_err("tampered activation accepted");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // Replayed into another request: same ciphertext, another request id.
    let status = raw
        .infer(InferRequest {
            header: Some(header(RequestId::random().unwrap())),
            input: Some(sealed.clone().into()),
        })
        .await
        .expect_err("replayed activation accepted");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // Spliced into another hop: addressed to stage 1 instead of stage 0.
    let to_stage1 = ActivationContext {
        hop: 1,
        ..context.clone()
    };
    let spliced = seal_activation(
        &pipeline.stage0_public_key,
        &to_stage1,
        &encode_bundle(&inputs),
    )
    .unwrap();
    let status = raw
        .infer(InferRequest {
            header: Some(header(request_id)),
            input: Some(spliced.into()),
        })
        .await
        .expect_err("activation for another hop accepted");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // The function kept serving.
    let again = client.infer("mlp", inputs).await;
    assert!(again.is_ok(), "the pipeline stopped serving: {again:?}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_outside_the_functions_sees_plaintext() {
    // Weights and inputs full of a recognisable pattern.
    use shardseal_testkit::canary::{INPUT, WEIGHT, holds};
    let cluster = Cluster::start(shardseal()).await;
    let model =
        shardseal_testkit::canary::fill_f32_initializers(&models::mlp(&Default::default()), WEIGHT);
    cluster.provision_and_register("canary", &model, 2).await;
    let client = cluster.client().await;
    let pipeline = client.pipeline("canary").await.unwrap();
    let spec = &pipeline.inputs[0];
    let shape: Vec<usize> = spec.shape.iter().map(|&d| d as usize).collect();
    let n: usize = shape.iter().product();
    let input = HostTensor::from_f32(spec.name.clone(), shape, &vec![INPUT; n]).unwrap();
    for _ in 0..3 {
        client
            .infer("canary", vec![input.clone()])
            .await
            .expect("sealed inference");
    }

    // The coordinator's memory.
    let memory = shardseal_testkit::canary::read_process_memory(cluster.coordinator_pid())
        .expect("read coordinator memory");
    assert!(
        memory.len() > 1 << 20,
        "read {} bytes of coordinator memory",
        memory.len()
    );
    for (what, value) in [("weights", WEIGHT), ("input", INPUT)] {
        assert!(
            !holds(&memory, value),
            "the coordinator's memory holds plaintext {what}"
        );
    }
    // Every file written: shard store, broker state, logs, PKI, trust file.
    let mut scanned = 0;
    for path in cluster.files() {
        if path.extension().is_some_and(|e| e == "onnx") {
            continue; // the owner's own plaintext model, written by this test
        }
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        scanned += 1;
        for (what, value) in [("weights", WEIGHT), ("input", INPUT)] {
            assert!(
                !holds(&bytes, value),
                "{} holds plaintext {what}",
                path.display()
            );
        }
    }
    assert!(scanned > 10, "scanned only {scanned} files");
    cluster.stop().await;
}
