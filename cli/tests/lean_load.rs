//! `SHARDSEAL_LOAD_MEMORY=lean` (a function's `--load-memory lean`), inherited from
//! `shardseal up` by every function it starts: the stages map their large blocks while they
//! load, serve the same outputs as plain tract, and keep serving once mapping has stopped.

use std::path::Path;

use shardseal_function::{LOAD_MEMORY_ENV, StageEngine};
use shardseal_testkit::cluster::{Cluster, log_field as field};
use shardseal_testkit::models::{self, Mlp};
use shardseal_testkit::sealed::{inputs_for, max_abs_diff};

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lean_stages_map_their_large_blocks_and_serve_as_plain_tract() {
    let cluster =
        Cluster::start_with_env::<&str>(shardseal(), &[], vec![(LOAD_MEMORY_ENV, "lean".into())])
            .await;
    // Weights of 1 MiB: each a large block.
    let model = models::mlp(&Mlp {
        input: 256,
        hidden: vec![512, 512, 512],
        ..Default::default()
    });
    cluster.provision_and_register("mlp", &model, 2).await;

    let client = cluster.client().await;
    let plain = StageEngine::load(&model).unwrap();
    for seed in [3, 4] {
        let inputs = inputs_for(&client, "mlp", seed).await;
        let sealed = client.infer("mlp", inputs.clone()).await.unwrap();
        let expected = plain.run(&inputs).unwrap();
        assert!(max_abs_diff(&expected, &sealed.outputs) <= 1e-5);
    }

    let cold_starts = cluster.cold_start_lines();
    assert_eq!(cold_starts.len(), 2, "{cold_starts:?}");
    for line in &cold_starts {
        assert_eq!(field(line, "load_memory"), "lean", "{line}");
        let mapped: usize = field(line, "mapped_blocks").parse().unwrap();
        assert!(mapped >= 1, "{line}");
    }
    cluster.stop().await;
}
