//! Stage batching end to end (`shardseal up --max-batch MODEL=N`): requests that wait at a
//! stage run as one batch inside the function, each request still sealed, opened and
//! resealed under its own keys, and each answer is that request's own (plain tract's
//! output for its input). A model not named keeps running requests one by one, and a
//! model whose graph cannot batch says so in its function's log and serves unbatched.

use std::path::Path;
use std::sync::Arc;

use shardseal_function::StageEngine;
use shardseal_testkit::cluster::{Cluster, log_field as field};
use shardseal_testkit::metrics::{Metrics, logged_addr, scrape};
use shardseal_testkit::models::{self, Mlp};
use shardseal_testkit::sealed::{inputs_for, max_abs_diff};

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

/// Requests sent at once in a wave.
const WAVE: u64 = 24;

/// The log of each function that serves `model` (each function serves one stage of one
/// model, which its `cold start` line names).
fn function_logs_of(cluster: &Cluster, model: &str) -> Vec<String> {
    cluster
        .each_function_log()
        .into_iter()
        .filter(|log| log.contains(&format!("cold start model={model} ")))
        .collect()
}

/// The logs of `model`'s functions, concatenated.
fn logs_of(cluster: &Cluster, model: &str) -> String {
    function_logs_of(cluster, model).concat()
}

/// The log of the function that serves `stage` of `model`.
fn log_of_stage(cluster: &Cluster, model: &str, stage: u32) -> String {
    function_logs_of(cluster, model)
        .into_iter()
        .find(|log| log.contains(&format!("cold start model={model} stage={stage} ")))
        .unwrap_or_else(|| panic!("no function log for {model} stage {stage}"))
}

/// The batch sizes of the `processed` lines of `model`'s functions (one line per request
/// and stage).
fn batches(cluster: &Cluster, model: &str) -> Vec<usize> {
    batch_sizes(&logs_of(cluster, model))
}

/// The batch sizes of the `processed` lines of `log`.
fn batch_sizes(log: &str) -> Vec<usize> {
    log.lines()
        .filter(|l| l.contains(" processed"))
        .map(|l| field(l, "batch").parse().expect("a batch size"))
        .collect()
}

/// Sends `WAVE` requests for `model` at once; each answer must be plain tract's output for
/// that request's own input.
async fn wave(client: &Arc<shardseal_sdk::Client>, engine: &Arc<StageEngine>, model: &str, n: u64) {
    let tasks: Vec<_> = (0..WAVE)
        .map(|i| {
            let (client, engine, model) = (client.clone(), engine.clone(), model.to_owned());
            tokio::spawn(async move {
                let inputs = inputs_for(&client, &model, n * WAVE + i).await;
                let expected = engine.run(&inputs).unwrap();
                let got = client.infer(&model, inputs).await.expect("served");
                let diff = max_abs_diff(&expected, &got.outputs);
                assert!(diff <= 1e-4, "{model}: request {i} of wave {n}: {diff}");
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_waiting_at_a_stage_run_as_one_batch_and_each_gets_its_own_answer() {
    let cluster = Cluster::start_with_env(
        shardseal(),
        &[
            "--max-batch",
            "batched=8",
            "--max-batch",
            "mixing=8",
            // One function per stage: the requests queue at it rather than start others.
            "--min-replicas",
            "1",
            "--max-replicas",
            "1",
        ],
        // With metrics on, the coordinator gives each function an endpoint of its own.
        vec![("SHARDSEAL_COORDINATOR_METRICS_LISTEN", "127.0.0.1:0".into())],
    )
    .await;
    let mlp = models::mlp(&Mlp {
        batch: 1,
        input: 256,
        hidden: vec![1024, 1024, 1024],
        output: 32,
        seed: 3,
    });
    let mixing = models::batch_rows_mixed();
    cluster.provision_and_register("batched", &mlp, 2).await;
    cluster.provision_and_register("unbatched", &mlp, 2).await;
    cluster.provision_and_register("mixing", &mixing, 1).await;
    let client = Arc::new(cluster.client().await);
    let mlp_engine = Arc::new(StageEngine::load(&mlp).unwrap());

    // Batches form only from requests that happen to wait together: send waves until
    // one did (the first almost always suffices), each answer checked.
    let mut waves = 0;
    while batches(&cluster, "batched").iter().all(|&b| b == 1) {
        assert!(waves < 8, "no batch formed in {waves} waves of {WAVE}");
        wave(&client, &mlp_engine, "batched", waves).await;
        waves += 1;
    }
    let seen = batches(&cluster, "batched");
    assert_eq!(
        seen.len() as u64,
        2 * waves * WAVE,
        "one line per request and stage"
    );
    assert!(seen.iter().all(|&b| (1..=8).contains(&b)), "{seen:?}");
    println!(
        "batched: {waves} wave(s) of {WAVE}, largest batch {:?}, mean {:.2}",
        seen.iter().max(),
        seen.len() as f64 / seen.iter().map(|&b| 1.0 / b as f64).sum::<f64>()
    );

    // Each stage's function counts its runs and their requests.
    for stage in 0..2 {
        let log = log_of_stage(&cluster, "batched", stage);
        let sizes: Vec<f64> = batch_sizes(&log).into_iter().map(|b| b as f64).collect();
        let runs: f64 = sizes.iter().map(|b| 1.0 / b).sum();
        let metrics = Metrics::parse(&scrape(&logged_addr(&log)));
        let series = |suffix: &str| {
            metrics.get(&format!(
                "shardseal_function_batch_requests_{suffix}{{model=\"batched\",stage=\"{stage}\"}}"
            ))
        };
        assert_eq!(
            series("sum"),
            sizes.len() as f64,
            "requests at stage {stage}"
        );
        assert_eq!(series("count"), runs.round(), "runs at stage {stage}");
    }

    // The same model deployed without --max-batch runs one request at a time.
    wave(&client, &mlp_engine, "unbatched", 0).await;
    let unbatched = batches(&cluster, "unbatched");
    assert_eq!(unbatched.len() as u64, 2 * WAVE);
    assert!(unbatched.iter().all(|&b| b == 1), "{unbatched:?}");

    // A graph that mixes a batch's rows: refused batching at load, served one by one.
    let mixing_engine = Arc::new(StageEngine::load(&mixing).unwrap());
    wave(&client, &mixing_engine, "mixing", 0).await;
    assert!(batches(&cluster, "mixing").iter().all(|&b| b == 1));
    let logs = logs_of(&cluster, "mixing");
    assert!(
        logs.lines()
            .any(|l| l.contains("differs from the same request run alone")
                && l.contains("the stage runs requests one by one")),
        "the mixing model's function says why it does not batch:\n{logs}"
    );
    // The batched model's functions batch: no such line.
    assert!(!logs_of(&cluster, "batched").contains("one by one"));
    cluster.stop().await;
}
