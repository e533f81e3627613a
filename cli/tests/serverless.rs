//! The local platform behaves like a serverless platform: stages scale from zero on the
//! first request (holding requests meanwhile), out under load, back to zero when idle; a
//! function killed mid-request is replaced and no request is lost; every invocation is
//! billed, and the bill adds up. Replica counts are read from the operating system (the
//! coordinator's child processes), not from the coordinator's own account.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use shardseal_function::StageEngine;
use shardseal_testkit::cluster::Cluster;
use shardseal_testkit::models;
use shardseal_testkit::sealed::{inputs_for, max_abs_diff};

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

/// One sealed request for `model`, checked against plain tract.
async fn checked_request(client: &shardseal_sdk::Client, engine: &StageEngine, seed: u64) {
    let inputs = inputs_for(client, "cnn", seed).await;
    let expected = engine.run(&inputs).unwrap();
    let got = client.infer("cnn", inputs).await.expect("sealed inference");
    let diff = max_abs_diff(&expected, &got.outputs);
    assert!(diff <= 1e-5, "seed {seed}: diff {diff}");
}

/// Polls `counts` until `done` holds or `limit` passes; returns the last counts.
async fn wait_for(
    cluster: &Cluster,
    limit: Duration,
    done: impl Fn(&[usize]) -> bool,
) -> Vec<usize> {
    let until = Instant::now() + limit;
    loop {
        let counts = cluster.replica_counts("cnn", 2);
        if done(&counts) || Instant::now() > until {
            return counts;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stages_scale_from_zero_out_under_load_back_to_zero_and_the_bill_adds_up() {
    let cluster = Cluster::start_with(
        shardseal(),
        &[
            "--max-replicas",
            "3",
            "--target-in-flight",
            "1",
            "--scale-window",
            "2s",
            "--scale-to-zero-after",
            "4s",
        ],
    )
    .await;
    let model = models::residual_cnn(&Default::default());
    cluster.provision_and_register("cnn", &model, 2).await;
    assert_eq!(
        cluster.replica_counts("cnn", 2),
        vec![0, 0],
        "nothing runs before the first request"
    );
    let client = Arc::new(cluster.client().await);
    let engine = Arc::new(StageEngine::load(&model).unwrap());

    // Scale from zero: a burst on a cold model is held while the stages start, not refused.
    let burst: Vec<_> = (0..4)
        .map(|seed| {
            let (client, engine) = (client.clone(), engine.clone());
            tokio::spawn(async move { checked_request(&client, &engine, seed).await })
        })
        .collect();
    for request in burst {
        request.await.unwrap();
    }
    let warm = cluster.replica_counts("cnn", 2);
    assert!(warm.iter().all(|&c| c >= 1), "scaled from zero: {warm:?}");

    // Scale out: eight clients for six seconds; sample the replica counts meanwhile.
    let served = Arc::new(AtomicUsize::new(4));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8u64)
        .map(|c| {
            let (client, engine, served, stop) =
                (client.clone(), engine.clone(), served.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seed = 100 + c * 1000;
                while !stop.load(Ordering::Relaxed) {
                    checked_request(&client, &engine, seed).await;
                    served.fetch_add(1, Ordering::Relaxed);
                    seed += 1;
                }
            })
        })
        .collect();
    let mut peak = vec![0usize; 2];
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        for (p, c) in peak.iter_mut().zip(cluster.replica_counts("cnn", 2)) {
            *p = (*p).max(c);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("every request under load succeeded");
    }
    println!("peak replicas per stage under load: {peak:?}");
    assert!(
        peak.iter().all(|&c| (2..=3).contains(&c)),
        "each stage scaled out, within --max-replicas 3: {peak:?}"
    );

    // Scale to zero once idle.
    let idle = wait_for(&cluster, Duration::from_secs(40), |c| c == [0, 0]).await;
    assert_eq!(idle, vec![0, 0], "idle stages scale to zero");

    // Cold again, and still serving.
    checked_request(&client, &engine, 7).await;
    served.fetch_add(1, Ordering::Relaxed);
    let served = served.load(Ordering::Relaxed) as u64;

    // The bill: one invocation per stage per request, and the report adds up the log.
    let log = cluster.state().join("coordinator").join("usage.jsonl");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.len() as u64,
        served * 2,
        "two invocations per request"
    );
    let by_hand: f64 = lines
        .iter()
        .map(|l| {
            let billed_ms = l["duration_ms"].as_f64().unwrap().ceil().max(1.0);
            l["memory_mb"].as_f64().unwrap() / 1024.0 * billed_ms / 1000.0
        })
        .sum();
    let out = std::process::Command::new(shardseal())
        .args(["usage", "--state"])
        .arg(cluster.state())
        .args(["--json", "--by-request"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["total"]["invocations"], served * 2);
    assert_eq!(report["requests"], served);
    let total = report["total"]["gb_seconds"].as_f64().unwrap();
    assert!((total - by_hand).abs() < 1e-9, "{total} vs {by_hand}");
    for group in ["models", "stages", "by_request"] {
        let sum: f64 = report[group]
            .as_object()
            .unwrap()
            .values()
            .map(|u| u["gb_seconds"].as_f64().unwrap())
            .sum();
        assert!((sum - total).abs() < 1e-9, "{group}: {sum} vs {total}");
    }
    assert_eq!(report["stages"]["cnn/0"]["invocations"], served);
    assert!(report["always_on_cost"].as_f64().unwrap() > 0.0);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_function_killed_mid_stream_is_replaced_and_no_request_is_lost() {
    let cluster = Cluster::start(shardseal()).await;
    let model = models::residual_cnn(&Default::default());
    cluster.provision_and_register("cnn", &model, 2).await;
    let client = Arc::new(cluster.client().await);
    let engine = Arc::new(StageEngine::load(&model).unwrap());
    checked_request(&client, &engine, 1).await;
    let victim = cluster
        .function_processes()
        .into_iter()
        .find(|f| f.model == "cnn" && f.stage == 1)
        .expect("a stage 1 function");

    let done = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..4u64)
        .map(|c| {
            let (client, engine, done) = (client.clone(), engine.clone(), done.clone());
            tokio::spawn(async move {
                for i in 0..12 {
                    checked_request(&client, &engine, c * 100 + i).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    while done.load(Ordering::Relaxed) < 8 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    for c in clients {
        c.await
            .expect("every request completed correctly despite the kill");
    }
    assert_eq!(done.load(Ordering::Relaxed), 48);
    let stage1: Vec<u32> = cluster
        .function_processes()
        .into_iter()
        .filter(|f| f.model == "cnn" && f.stage == 1)
        .map(|f| f.pid)
        .collect();
    assert!(!stage1.is_empty(), "the dead replica was replaced");
    assert!(!stage1.contains(&victim.pid), "the victim is gone");
    cluster.stop().await;
}
