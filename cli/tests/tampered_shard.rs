//! A shard changed in the store never loads: whoever controls the store (the platform, a
//! bucket's other users) can make a stage's cold start fail, but not make it serve other
//! weights. Each change below is caught by the function before tract sees a byte, named in
//! the function's log, and reported to the client as the stage being unavailable; once the
//! genuine shard is back, the same deployment serves correct outputs again.

use std::path::Path;

use shardseal_attestation::{ModelId, ModelVersion, StageIndex};
use shardseal_function::StageEngine;
use shardseal_keys::broker::OwnerReleasePolicy;
use shardseal_keys::{DEFAULT_CHUNK_SIZE, ShardBinding, SignedManifest, open_shard, seal_shard};
use shardseal_sdk::Client;
use shardseal_store::StoreKey;
use shardseal_testkit::cluster::Cluster;
use shardseal_testkit::models;
use shardseal_testkit::sealed::{expect_unavailable, inputs_for, max_abs_diff};

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

/// Sends one request and expects stage 1 to be reported unavailable, with nothing about
/// the shard in the message, and `reason` in a function's log.
async fn refused(cluster: &Cluster, client: &Client, reason: &str) {
    let inputs = inputs_for(client, "mlp", 7).await;
    expect_unavailable(client, "mlp", inputs, 1, "chunk").await;
    let logs = cluster.function_logs();
    assert!(logs.contains(reason), "the log names {reason:?}:\n{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_changed_in_the_store_never_loads_and_the_genuine_one_serves_again() {
    let cluster = Cluster::start(shardseal()).await;
    // Wide enough that the second stage's shard spans several 1 MiB chunks.
    let model = models::mlp(&models::Mlp {
        input: 256,
        hidden: vec![1024, 1024, 1024],
        ..Default::default()
    });
    let manifest_bytes = cluster
        .provision(&cluster.state().join("owner"), "mlp", &model, 2)
        .await;
    let policy = OwnerReleasePolicy::same_for_all_stages(
        2,
        &cluster
            .trust
            .measurements
            .iter()
            .copied()
            .collect::<Vec<_>>(),
    );
    cluster
        .register(&cluster.owner, &manifest_bytes, &policy)
        .await;
    let manifest = SignedManifest::from_bytes(&manifest_bytes)
        .unwrap()
        .verify(&cluster.owner.verifying_key())
        .unwrap();

    let model_id = ModelId::new("mlp").unwrap();
    let prefix = StoreKey::version_prefix(&model_id, ModelVersion(1));
    let key_of = |stage: usize| {
        StoreKey::new(format!("{prefix}/{}", manifest.stages[stage].shard_file)).unwrap()
    };
    let store = cluster.store();
    let genuine = store.get(&key_of(1)).await.unwrap();
    assert!(genuine.len() > 4 * DEFAULT_CHUNK_SIZE, "several chunks");
    let client = cluster.client().await;

    // 1. One bit of a chunk in the middle of the shard flipped.
    let mut flipped = genuine.to_vec();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x10;
    store.put(&key_of(1), flipped.into()).await.unwrap();
    refused(&cluster, &client, "failed authentication").await;

    // 2. Stage 0's shard where stage 1's belongs (a valid shard, under another key).
    let stage0 = store.get(&key_of(0)).await.unwrap();
    store.put(&key_of(1), stage0).await.unwrap();
    refused(&cluster, &client, "the shard is bound to").await;

    // 3. The same weights sealed again under the same key and binding, as an earlier
    //    upload or a second provisioning run would have left them: every chunk
    //    authenticates, but the shard is not the one the owner signed.
    let shard_key = cluster
        .owner
        .shard_keys(&model_id, ModelVersion(1))
        .unwrap()
        .get(StageIndex(1))
        .map(|k| shardseal_keys::ShardKey::from_bytes(*k.expose_secret()))
        .unwrap();
    let binding = ShardBinding::new(model_id.clone(), ModelVersion(1), StageIndex(1));
    let plaintext = open_shard(&shard_key, binding.clone(), &genuine[..], 0).unwrap();
    let mut resealed = Vec::new();
    let info = seal_shard(
        &shard_key,
        &binding,
        DEFAULT_CHUNK_SIZE,
        plaintext.expose_secret(),
        &mut resealed,
    )
    .unwrap();
    assert_eq!(resealed.len(), genuine.len());
    assert_ne!(info.digest, manifest.stages[1].shard_digest);
    store.put(&key_of(1), resealed.into()).await.unwrap();
    refused(&cluster, &client, "digest differs from the signed manifest").await;

    // The genuine shard back: the same deployment serves, and serves the right weights.
    store.put(&key_of(1), genuine).await.unwrap();
    let engine = StageEngine::load(&model).unwrap();
    let inputs = inputs_for(&client, "mlp", 11).await;
    let sealed = client.infer("mlp", inputs.clone()).await.unwrap();
    let plain = engine.run(&inputs).unwrap();
    assert!(max_abs_diff(&plain, &sealed.outputs) <= 1e-5);
    cluster.stop().await;
}
