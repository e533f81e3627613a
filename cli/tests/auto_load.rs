//! `--load-memory auto`, a function's default: a stage whose shard is 32 MiB or more loads
//! lean (maps its large blocks), a smaller one loads fast, each logs the mode it loaded in,
//! and both serve the same outputs as plain tract.

use std::path::Path;

use shardseal_function::{LEAN_FROM_BYTES, LOAD_MEMORY_ENV, StageEngine};
use shardseal_testkit::cluster::{Cluster, log_field as field};
use shardseal_testkit::models;
use shardseal_testkit::sealed::{inputs_for, max_abs_diff};

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_loads_a_large_shard_lean_and_a_small_one_fast() {
    // Started as a deployment is by default: no --load-memory, whatever this process has.
    assert!(std::env::var_os(LOAD_MEMORY_ENV).is_none());
    let cluster = Cluster::start(shardseal()).await;
    // One stage each: 36 MiB of weights in 4 MiB layers, and an MLP of under 1 MiB.
    let big = models::big_weights(LEAN_FROM_BYTES + (4 << 20));
    let small = models::mlp(&Default::default());
    cluster.provision_and_register("big", &big, 1).await;
    cluster.provision_and_register("small", &small, 1).await;

    let client = cluster.client().await;
    for (name, model) in [("big", &big), ("small", &small)] {
        let inputs = inputs_for(&client, name, 9).await;
        let sealed = client.infer(name, inputs.clone()).await.unwrap();
        let expected = StageEngine::load(model).unwrap().run(&inputs).unwrap();
        assert!(max_abs_diff(&expected, &sealed.outputs) <= 1e-5, "{name}");
    }

    let lines = cluster.cold_start_lines();
    let cold_start = |model: &str| {
        lines
            .iter()
            .find(|l| field(l, "model") == model)
            .unwrap_or_else(|| panic!("no cold start of {model} in {lines:?}"))
    };
    let big_line = cold_start("big");
    assert_eq!(field(big_line, "load_memory"), "lean", "{big_line}");
    assert!(field(big_line, "shard_bytes").parse::<u64>().unwrap() >= LEAN_FROM_BYTES);
    assert!(field(big_line, "mapped_blocks").parse::<usize>().unwrap() >= 1);
    let small_line = cold_start("small");
    assert_eq!(field(small_line, "load_memory"), "fast", "{small_line}");
    assert_eq!(field(small_line, "mapped_blocks"), "0", "{small_line}");
    cluster.stop().await;
}
