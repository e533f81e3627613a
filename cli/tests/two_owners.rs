//! Two models of two owners served by one deployment at once: each owner's keys reach only
//! the functions of its own model, a request for one model never reaches the other's
//! functions, and activations sealed for one cannot be opened by the other.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use shardseal_attestation::ModelId;
use shardseal_function::StageEngine;
use shardseal_keys::broker::BrokerError;
use shardseal_keys::broker::owner::OwnerClient;
use shardseal_keys::{OwnerKeyStore, RequestId, seal_activation};
use shardseal_proto::tensor::encode_bundle;
use shardseal_proto::v1::InferRequest;
use shardseal_testkit::cluster::Cluster;
use shardseal_testkit::models;
use shardseal_testkit::sealed::{inputs_for, max_abs_diff, request_header};

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

const REQUESTS_PER_MODEL: u64 = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_owners_models_are_served_at_once_and_kept_apart() {
    let second = tempfile::tempdir().unwrap();
    let beta_owner_dir = second.path().join("owner");
    let beta_owner = OwnerKeyStore::init(&beta_owner_dir).unwrap();
    let cluster = Cluster::start_with(
        shardseal(),
        &[
            "--owner-key".to_owned(),
            beta_owner.verifying_key().to_hex(),
            // One function per stage, so every key release is accounted for below.
            "--max-replicas".to_owned(),
            "1".to_owned(),
        ],
    )
    .await;
    let alpha = models::mlp(&Default::default());
    let beta = models::residual_cnn(&Default::default());
    cluster.provision_and_register("alpha", &alpha, 2).await;
    cluster
        .provision_and_register_as(&beta_owner, &beta_owner_dir, "beta", &beta, 2)
        .await;

    // Both at once, interleaved.
    let client = Arc::new(cluster.client().await);
    let engines = Arc::new([
        StageEngine::load(&alpha).unwrap(),
        StageEngine::load(&beta).unwrap(),
    ]);
    let mut tasks = Vec::new();
    for seed in 0..2 * REQUESTS_PER_MODEL {
        let (client, engines) = (client.clone(), engines.clone());
        tasks.push(tokio::spawn(async move {
            let (model, engine) = match seed % 2 {
                0 => ("alpha", &engines[0]),
                _ => ("beta", &engines[1]),
            };
            let inputs = inputs_for(&client, model, seed).await;
            let expected = engine.run(&inputs).unwrap();
            let got = client.infer(model, inputs).await.unwrap();
            let diff = max_abs_diff(&expected, &got.outputs);
            assert!(diff <= 1e-5, "{model} seed {seed}: diff {diff}");
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }

    // Each model's stages ran in functions of that model only, and each processed exactly
    // that model's requests.
    let served = requests_served_by_model_and_stage(&cluster.state().join("logs"));
    let expected: BTreeMap<(String, u32), u64> = [
        (("alpha".to_owned(), 0), REQUESTS_PER_MODEL),
        (("alpha".to_owned(), 1), REQUESTS_PER_MODEL),
        (("beta".to_owned(), 0), REQUESTS_PER_MODEL),
        (("beta".to_owned(), 1), REQUESTS_PER_MODEL),
    ]
    .into();
    assert_eq!(served, expected, "requests processed per (model, stage)");

    // The broker released each model's keys to that model's functions only: one release
    // per stage, each to the one function that cold-started for it.
    let released = cluster.audit_show(
        &cluster.state().join("broker").join("audit"),
        "key_released",
    );
    let cold_starts = cold_starts_by_model(&cluster.state().join("logs"));
    for model in ["alpha", "beta"] {
        let entries: Vec<serde_json::Value> = released
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|e| e["event"]["model"] == model)
            .collect();
        let mut stages: Vec<u64> = entries
            .iter()
            .map(|e| e["event"]["stage"].as_u64().unwrap())
            .collect();
        stages.sort_unstable();
        stages.dedup();
        assert_eq!(stages, vec![0, 1], "{model}\n{released}");
        assert_eq!(
            entries.len(),
            2,
            "{model}: one release per stage\n{released}"
        );
        assert_eq!(
            entries.len(),
            cold_starts.get(model).copied().unwrap_or(0),
            "{model}: one release per function started for it\n{released}"
        );
    }

    // A request for alpha that carries activations sealed for beta's first stage is
    // refused by alpha's function: it cannot open them.
    let beta_pipeline = client.pipeline("beta").await.unwrap();
    let alpha_pipeline = client.pipeline("alpha").await.unwrap();
    let request_id = RequestId::random().unwrap();
    let inputs = inputs_for(&client, "alpha", 99).await;
    let misaddressed = seal_activation(
        &beta_pipeline.stage0_public_key,
        &alpha_pipeline.input_context(request_id),
        &encode_bundle(&inputs),
    )
    .unwrap();
    let status = cluster
        .raw_coordinator()
        .await
        .infer(InferRequest {
            header: Some(request_header(&alpha_pipeline, "alpha", request_id)),
            input: Some(misaddressed.into()),
        })
        .await
        .expect_err("activations sealed for beta opened in alpha's function");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // One owner cannot act on the other's model.
    let mut alpha_owner = OwnerClient::connect(&cluster.broker_url, &cluster.pki())
        .await
        .unwrap();
    let err = alpha_owner
        .revoke(&cluster.owner, &ModelId::new("beta").unwrap(), None)
        .await
        .expect_err("alpha's owner revoked beta");
    assert!(
        matches!(
            err,
            BrokerError::Refused {
                code: tonic::Code::PermissionDenied,
                ..
            }
        ),
        "{err:?}"
    );
    // And beta still serves.
    let inputs = inputs_for(&client, "beta", 7).await;
    client.infer("beta", inputs).await.unwrap();
    cluster.stop().await;
}

/// `(model, stage) -> requests processed`, read from the function logs: each log names the
/// model and stage in its cold start line, then one `processed` line per request.
fn requests_served_by_model_and_stage(logs: &Path) -> BTreeMap<(String, u32), u64> {
    let mut served = BTreeMap::new();
    for entry in std::fs::read_dir(logs).unwrap().flatten() {
        if !entry.file_name().to_string_lossy().starts_with("function-") {
            continue;
        }
        let log = std::fs::read_to_string(entry.path()).unwrap();
        let Some(cold) = log.lines().find(|l| is_cold_start_line(l)) else {
            continue;
        };
        let field = |name: &str| {
            cold.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("no {name} in {cold:?}"))
                .to_owned()
        };
        let key = (field("model"), field("stage").parse::<u32>().unwrap());
        let processed = log
            .lines()
            .filter(|l| l.contains("processed open_ms="))
            .count() as u64;
        *served.entry(key).or_insert(0) += processed;
    }
    served
}

/// A function's one `cold start` line, logged once it is ready.
fn is_cold_start_line(line: &str) -> bool {
    line.contains(" cold start ") && line.contains("total_ms=")
}

/// How many functions completed a cold start for each model, from their logs.
fn cold_starts_by_model(logs: &Path) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(logs).unwrap().flatten() {
        if !entry.file_name().to_string_lossy().starts_with("function-") {
            continue;
        }
        let log = std::fs::read_to_string(entry.path()).unwrap();
        if let Some(model) = log
            .lines()
            .find(|l| is_cold_start_line(l))
            .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("model=")))
        {
            *out.entry(model.to_owned()).or_insert(0) += 1;
        }
    }
    out
}
