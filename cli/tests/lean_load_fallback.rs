//! A function asked to load lean and to serve with blocks mapped (the default) whose
//! address-space limit leaves no room for the range it maps blocks in (`ulimit -v`) says
//! so, loads fast, serves from the heap, and logs the modes it loaded and serves in.
//! The limit is this test process's, inherited by the deployment it starts, so this binary
//! holds this one test.

use std::path::Path;

use nix::sys::resource::{Resource, setrlimit};
use shardseal_function::{LOAD_MEMORY_ENV, StageEngine};
use shardseal_testkit::cluster::Cluster;
use shardseal_testkit::models;
use shardseal_testkit::sealed::{inputs_for, max_abs_diff};

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_room_for_mapped_blocks_a_function_loads_fast_and_serves_from_the_heap() {
    // Room for every process of a deployment, not for a 64 GiB reservation.
    let limit = 16 << 30;
    setrlimit(Resource::RLIMIT_AS, limit, limit).unwrap();
    let cluster =
        Cluster::start_with_env::<&str>(shardseal(), &[], vec![(LOAD_MEMORY_ENV, "lean".into())])
            .await;
    let model = models::mlp(&Default::default());
    cluster.provision_and_register("mlp", &model, 1).await;

    let client = cluster.client().await;
    let inputs = inputs_for(&client, "mlp", 5).await;
    let sealed = client.infer("mlp", inputs.clone()).await.unwrap();
    let plain = StageEngine::load(&model).unwrap().run(&inputs).unwrap();
    assert!(max_abs_diff(&plain, &sealed.outputs) <= 1e-5);

    let logs = cluster.function_logs();
    assert!(
        logs.contains("cannot reserve address space for a lean load; loading fast"),
        "{logs}"
    );
    assert!(
        logs.contains(
            "cannot reserve address space to serve with blocks mapped; serving from the heap"
        ),
        "{logs}"
    );
    let cold_start = logs
        .lines()
        .find(|l| l.contains(" cold start"))
        .unwrap_or_else(|| panic!("no cold start in:\n{logs}"));
    assert!(cold_start.contains("load_memory=fast"), "{cold_start}");
    assert!(cold_start.contains("serve_memory=heap"), "{cold_start}");
    assert!(cold_start.contains("mapped_blocks=0"), "{cold_start}");
    cluster.stop().await;
}
