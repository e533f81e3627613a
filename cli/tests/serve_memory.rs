//! `--serve-memory`: by default (`mapped`) every function `shardseal up` starts maps its
//! large blocks on its own while serving; `SHARDSEAL_SERVE_MEMORY=heap`, inherited by every
//! function, takes them from the heap instead. Either way stages whose activations are
//! large blocks give the same outputs as plain tract, request after request.

use std::path::Path;

use shardseal_function::{SERVE_MEMORY_ENV, StageEngine};
use shardseal_testkit::cluster::{Cluster, log_field as field};
use shardseal_testkit::models::{self, Mlp};
use shardseal_testkit::sealed::{inputs_for, max_abs_diff};

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

/// Serves six requests through two stages of a model whose input and activations are
/// 512 KiB each (rows of 128), checks each against plain tract, and returns the functions'
/// `serve_memory` as they logged it.
async fn serve_large_activations(cluster: &Cluster) -> Vec<String> {
    let model = models::mlp(&Mlp {
        batch: 128,
        input: 1024,
        hidden: vec![1024, 1024],
        ..Default::default()
    });
    cluster.provision_and_register("mlp", &model, 2).await;
    let client = cluster.client().await;
    let plain = StageEngine::load(&model).unwrap();
    // More requests than a round of kept blocks: blocks are kept, handed back and mapped
    // again at the same addresses between them.
    for seed in 0..6 {
        let inputs = inputs_for(&client, "mlp", seed).await;
        let sealed = client.infer("mlp", inputs.clone()).await.unwrap();
        let expected = plain.run(&inputs).unwrap();
        assert!(
            max_abs_diff(&expected, &sealed.outputs) <= 1e-5,
            "seed {seed}"
        );
    }
    let cold_starts = cluster.cold_start_lines();
    assert_eq!(cold_starts.len(), 2, "{cold_starts:?}");
    cold_starts
        .iter()
        .map(|line| field(line, "serve_memory").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stages_serve_with_blocks_mapped_by_default() {
    // Started as a deployment is by default: no SHARDSEAL_SERVE_MEMORY in this process.
    assert!(std::env::var_os(SERVE_MEMORY_ENV).is_none());
    let cluster = Cluster::start(shardseal()).await;
    assert_eq!(
        serve_large_activations(&cluster).await,
        ["mapped", "mapped"]
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stages_serve_from_the_heap_when_told() {
    let cluster =
        Cluster::start_with_env::<&str>(shardseal(), &[], vec![(SERVE_MEMORY_ENV, "heap".into())])
            .await;
    assert_eq!(serve_large_activations(&cluster).await, ["heap", "heap"]);
    cluster.stop().await;
}
