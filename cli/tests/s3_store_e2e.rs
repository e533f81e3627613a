//! The shard store on S3 end to end: `shardseal keys provision --store s3://…` uploads the
//! encrypted shards and the signed manifest to a real S3-compatible server (s3s-fs, see
//! `shardseal_testkit::s3`), and functions stream and decrypt their shards from that bucket
//! during their cold start. Skipped, with the reason printed, when no S3 server is
//! available, unless `SHARDSEAL_S3_TEST_REQUIRED` is set (then it fails).

use std::path::Path;

use shardseal_attestation::{ModelId, ModelVersion, StageIndex};
use shardseal_function::StageEngine;
use shardseal_store::StoreKey;
use shardseal_testkit::cluster::Cluster;
use shardseal_testkit::models;
use shardseal_testkit::s3::{S3Server, unique_name};
use shardseal_testkit::sealed::{inputs_for, max_abs_diff};

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shards_provisioned_to_s3_are_served_from_s3_with_outputs_equal_to_plain_tract() {
    let Some(server) = S3Server::start("s3_store_e2e") else {
        return;
    };
    let cluster = Cluster::start_with_s3(shardseal(), &server).await;
    // Unique, so that a shared external server keeps runs apart.
    let id = unique_name("mlp");
    let model = models::mlp(&Default::default());
    cluster.provision_and_register(&id, &model, 2).await;

    // Everything provisioning wrote is in the bucket, under the store's layout, and no
    // shard is in the deployment's local folder.
    let model_id = ModelId::new(id.as_str()).unwrap();
    let version = ModelVersion(1);
    let store = cluster.store();
    let stored = store
        .list(&StoreKey::version_prefix(&model_id, version))
        .await
        .unwrap();
    assert_eq!(
        stored,
        vec![
            StoreKey::manifest(&model_id, version),
            StoreKey::shard(&model_id, version, StageIndex(0)),
            StoreKey::shard(&model_id, version, StageIndex(1)),
        ]
    );
    assert!(
        !cluster
            .state()
            .join("store")
            .join("models")
            .join(&id)
            .exists(),
        "provisioning wrote to the local store"
    );

    // The functions' only copy of their shards is the bucket's.
    let client = cluster.client().await;
    let reference = StageEngine::load(&model).expect("plain tract");
    for seed in 1..=2 {
        let inputs = inputs_for(&client, &id, seed).await;
        let expected = reference.run(&inputs).expect("plain run");
        let got = client.infer(&id, inputs).await.expect("sealed inference");
        let diff = max_abs_diff(&expected, &got.outputs);
        println!("s3 store: 2 stages, seed {seed}: max abs diff {diff:e}");
        assert!(diff <= 1e-5, "diff {diff}");
        assert_eq!(got.timings.len(), 2, "one timing per stage");
    }

    // Provisioning never overwrites: the same version again is refused, in a bucket too.
    let again = std::process::Command::new(shardseal())
        .args(["keys", "provision", "--model"])
        .arg(cluster.state().join(format!("{id}.onnx")))
        .args(["--model-id", &id, "--stages", "2", "--keystore"])
        .arg(cluster.state().join("owner"))
        .args(["--store", &server.store_url()])
        .envs(server.credentials_env())
        .output()
        .unwrap();
    assert!(
        !again.status.success(),
        "a second provisioning of v1 was accepted"
    );
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("already holds"), "{stderr}");

    // No log of any service or function names the S3 secret.
    let mut logs = 0;
    for path in cluster.files() {
        if path.extension().is_some_and(|e| e == "log") {
            logs += 1;
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                !text.contains(&server.secret_access_key),
                "{} holds the S3 secret",
                path.display()
            );
        }
    }
    assert!(logs >= 3, "found only {logs} logs");

    cluster.stop().await;
    for key in stored {
        store.delete(&key).await.unwrap();
    }
}
