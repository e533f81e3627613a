//! A function reads its sealed shard while it attests, guessing the version from what the
//! store lists. The guess is only a hint: a store that shows a newer-looking version the
//! broker never released (planted, or uploaded ahead of a rollout) costs one wasted read,
//! and the function reads the released shard anew and serves the owner's weights.

use std::path::Path;

use shardseal_attestation::{ModelId, ModelVersion, StageIndex};
use shardseal_function::StageEngine;
use shardseal_keys::broker::OwnerReleasePolicy;
use shardseal_store::StoreKey;
use shardseal_testkit::cluster::Cluster;
use shardseal_testkit::models;
use shardseal_testkit::sealed::{inputs_for, max_abs_diff};

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

/// The `cold start` line of the function that served `stage`.
fn cold_start_line(cluster: &Cluster, stage: u32) -> String {
    let logs = cluster.function_logs();
    logs.lines()
        .find(|l| l.contains(" cold start") && l.contains(&format!(" stage={stage} ")))
        .unwrap_or_else(|| panic!("no cold start of stage {stage} in:\n{logs}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_shard_is_read_while_attesting_and_a_planted_newer_version_is_read_anew() {
    let cluster = Cluster::start(shardseal()).await;
    let model = models::mlp(&Default::default());
    let manifest = cluster
        .provision(&cluster.state().join("owner"), "mlp", &model, 2)
        .await;
    let measurements: Vec<_> = cluster.trust.measurements.iter().copied().collect();
    let policy = OwnerReleasePolicy::same_for_all_stages(2, &measurements);
    cluster.register(&cluster.owner, &manifest, &policy).await;

    // Stage 1's newest-looking shard in the store is junk under a version nobody released.
    let model_id = ModelId::new("mlp").unwrap();
    let planted = StoreKey::shard(&model_id, ModelVersion(9), StageIndex(1));
    cluster
        .store()
        .put(&planted, vec![0x5a; 300_000].into())
        .await
        .unwrap();

    let client = cluster.client().await;
    let inputs = inputs_for(&client, "mlp", 3).await;
    let sealed = client.infer("mlp", inputs.clone()).await.unwrap();
    let plain = StageEngine::load(&model).unwrap().run(&inputs).unwrap();
    assert!(max_abs_diff(&plain, &sealed.outputs) <= 1e-5);

    // Stage 0's released version is the newest in the store: read while attesting.
    let stage0 = cold_start_line(&cluster, 0);
    assert!(stage0.contains("shard_prefetched=true"), "{stage0}");
    // Stage 1 guessed v9, was released v1, and read v1 after attesting.
    let stage1 = cold_start_line(&cluster, 1);
    assert!(stage1.contains("shard_prefetched=false"), "{stage1}");
    let logs = cluster.function_logs();
    assert!(
        logs.contains("not the released one")
            && logs.contains(planted.as_str())
            && logs.contains(StoreKey::shard(&model_id, ModelVersion(1), StageIndex(1)).as_str()),
        "the log names both shards:\n{logs}"
    );
    cluster.stop().await;
}
