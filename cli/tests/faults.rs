//! Faults: every process kind of `shardseal up` killed with SIGKILL while clients send a
//! stream of requests, the key broker down while functions serve and cold-start, and a
//! broker whose state folder cannot be written.
//!
//! What each test shows:
//! - `kill_9_of_each_service_mid_stream_recovers_by_itself`: the supervisor restarts the
//!   key broker, the quoting agent and the coordinator on the addresses they had (the
//!   client, functions and the coordinator keep their URLs); every request either
//!   completes with the correct output or fails with `Error::Unavailable`, and requests
//!   succeed again after each kill; no registration and no audit entry is lost (both
//!   logs verify, every request a client saw answered is in the coordinator's log); a
//!   torn last audit line (a write cut short, written here by hand while the coordinator
//!   is held down) is dropped on reopen; no file in the state folder holds a plaintext
//!   weight or input canary afterwards.
//! - `with_the_broker_down_warm_functions_serve_and_a_cold_start_waits_for_it`: the broker
//!   is killed and held down; a warm model keeps serving; a stage that must start from
//!   zero waits, retrying the broker with backoff (its log says so) and never serving
//!   without keys; once the broker is back, that cold start completes and serves.
//! - `a_broker_that_cannot_write_its_state_refuses_registrations_clearly`: a file in the
//!   way of a new model's folder (a real write failure of the broker's state folder,
//!   chosen because the tests may run as root, for whom permission bits do not stop a
//!   write) makes a registration fail with `UNAVAILABLE` naming the problem; the keys
//!   registered before are still released, the audit log verifies, and once the file is
//!   gone the same registration goes through without a restart. A full disk and a
//!   read-only file system are injected at the file-system seam in the keys crate's unit
//!   tests (`a_full_disk_or_read_only_state_folder_fails_the_write_cleanly`).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardseal_function::StageEngine;
use shardseal_keys::broker::OwnerReleasePolicy;
use shardseal_proto::tensor::HostTensor;
use shardseal_sdk::{Client, Error};
use shardseal_testkit::canary::{INPUT, WEIGHT, holds};
use shardseal_testkit::cluster::Cluster;
use shardseal_testkit::models;
use shardseal_testkit::sealed::{inputs_for, max_relative_diff};

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

/// Requests with their expected outputs (plain tract on the whole model).
struct Workload {
    model: &'static str,
    cases: Vec<(Vec<HostTensor>, Vec<HostTensor>)>,
}

/// What the clients of a stream saw.
#[derive(Default)]
struct Outcomes {
    ok: AtomicUsize,
    unavailable: AtomicUsize,
    /// Anything else: a wrong output or another error. Must stay empty.
    wrong: Mutex<Vec<String>>,
}

/// Clients sending `workload` in a loop until `stop`.
fn stream(
    clients: usize,
    client: &Arc<Client>,
    workload: &Arc<Workload>,
    outcomes: &Arc<Outcomes>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|c| {
            let (client, workload, outcomes, stop) = (
                client.clone(),
                workload.clone(),
                outcomes.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut i = c;
                while !stop.load(Ordering::Relaxed) {
                    let (inputs, expected) = &workload.cases[i % workload.cases.len()];
                    i += clients;
                    match client.infer(workload.model, inputs.clone()).await {
                        Ok(got) => {
                            let diff = max_relative_diff(expected, &got.outputs);
                            if diff <= 1e-5 {
                                outcomes.ok.fetch_add(1, Ordering::Relaxed);
                            } else {
                                outcomes.wrong.lock().unwrap().push(format!(
                                    "{}: wrong output (diff {diff})",
                                    workload.model
                                ));
                            }
                        }
                        Err(Error::Unavailable(_)) => {
                            outcomes.unavailable.fetch_add(1, Ordering::Relaxed);
                            // A client backs off before trying again.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(other) => outcomes
                            .wrong
                            .lock()
                            .unwrap()
                            .push(format!("{}: {other}", workload.model)),
                    }
                }
            })
        })
        .collect()
}

/// Waits until the stream has served `more` requests beyond what it had served.
async fn served_more(outcomes: &Outcomes, more: usize, what: &str) {
    let target = outcomes.ok.load(Ordering::Relaxed) + more;
    let until = std::time::Instant::now() + Duration::from_secs(240);
    while outcomes.ok.load(Ordering::Relaxed) < target {
        assert!(
            std::time::Instant::now() < until,
            "no {more} requests served {what} (served {}, unavailable {}, wrong {:?})",
            outcomes.ok.load(Ordering::Relaxed),
            outcomes.unavailable.load(Ordering::Relaxed),
            outcomes.wrong.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every file in the state folder (but the owner's own plaintext models) is free of the
/// canaries; returns how many were scanned.
fn assert_no_canary_in_files(cluster: &Cluster) -> usize {
    let mut scanned = 0;
    for path in cluster.files() {
        if path.extension().is_some_and(|e| e == "onnx") {
            continue;
        }
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        scanned += 1;
        for (what, value) in [("weights", WEIGHT), ("input", INPUT)] {
            assert!(
                !holds(&bytes, value),
                "{} holds plaintext {what}",
                path.display()
            );
        }
    }
    scanned
}

async fn canary_workload(client: &Client, model: &[u8]) -> Workload {
    let pipeline = client.pipeline("canary").await.unwrap();
    let spec = &pipeline.inputs[0];
    let shape: Vec<usize> = spec.shape.iter().map(|&d| d as usize).collect();
    let n: usize = shape.iter().product();
    let input = vec![HostTensor::from_f32(spec.name.clone(), shape, &vec![INPUT; n]).unwrap()];
    let expected = StageEngine::load(model).unwrap().run(&input).unwrap();
    Workload {
        model: "canary",
        cases: vec![(input, expected)],
    }
}

async fn mlp_workload(client: &Client, model: &[u8], name: &'static str) -> Workload {
    let engine = StageEngine::load(model).unwrap();
    let mut cases = Vec::new();
    for seed in 0..8 {
        let inputs = inputs_for(client, name, seed).await;
        let expected = engine.run(&inputs).unwrap();
        cases.push((inputs, expected));
    }
    Workload { model: name, cases }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_each_service_mid_stream_recovers_by_itself() {
    let cluster = Cluster::start_with(shardseal(), &["--scale-to-zero-after", "never"]).await;
    let mlp = models::mlp(&Default::default());
    let canary = shardseal_testkit::canary::fill_f32_initializers(&mlp, WEIGHT);
    cluster.provision_and_register("mlp", &mlp, 2).await;
    cluster.provision_and_register("canary", &canary, 2).await;
    let client = Arc::new(
        cluster
            .client()
            .await
            .with_deadline(Duration::from_secs(120)),
    );
    let mlp_work = Arc::new(mlp_workload(&client, &mlp, "mlp").await);
    let canary_work = Arc::new(canary_workload(&client, &canary).await);
    let outcomes = Arc::new(Outcomes::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = stream(3, &client, &mlp_work, &outcomes, &stop);
    clients.extend(stream(1, &client, &canary_work, &outcomes, &stop));
    served_more(&outcomes, 8, "before any kill").await;

    // The key broker: warm functions do not need it; the restarted one keeps the URL
    // that functions, the coordinator and owners hold, and its registrations.
    let old = cluster.kill_service("broker");
    let broker = cluster
        .wait_for_restart("broker", old, Duration::from_secs(60))
        .await;
    served_more(&outcomes, 8, "after the broker was killed").await;
    let mlp2 = models::mlp(&models::Mlp {
        seed: 99,
        ..Default::default()
    });
    cluster.provision_and_register("mlp2", &mlp2, 2).await;
    // A new model: the coordinator asks the restarted broker for its stage count, and
    // its functions attest to it.
    let fresh = cluster.client().await;
    let mlp2_work = mlp_workload(&fresh, &mlp2, "mlp2").await;
    let (inputs, expected) = &mlp2_work.cases[0];
    let got = fresh
        .infer("mlp2", inputs.clone())
        .await
        .expect("a cold start against the restarted broker");
    assert!(max_relative_diff(expected, &got.outputs) <= 1e-5);

    // The quoting agent: functions need it only to cold-start, so kill a function too.
    let old = cluster.kill_service("quoting-agent");
    cluster
        .wait_for_restart("quoting-agent", old, Duration::from_secs(60))
        .await;
    let victim = cluster
        .function_processes()
        .into_iter()
        .find(|f| f.model == "mlp" && f.stage == 0)
        .expect("a stage 0 function of mlp");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    served_more(
        &outcomes,
        8,
        "after the quoting agent and a function were killed",
    )
    .await;
    let stage0: Vec<u32> = cluster
        .function_processes()
        .into_iter()
        .filter(|f| f.model == "mlp" && f.stage == 0)
        .map(|f| f.pid)
        .collect();
    assert!(
        !stage0.is_empty() && !stage0.contains(&victim.pid),
        "a new stage 0 function attested through the restarted agent: {stage0:?}"
    );

    // The coordinator, held down while a write it was making is left torn in its audit
    // log, as a crash mid-write would leave it.
    cluster.hold("coordinator");
    let unavailable_before = outcomes.unavailable.load(Ordering::Relaxed);
    let old = cluster.kill_service("coordinator");
    while Path::new(&format!("/proc/{old}/stat")).exists()
        && !std::fs::read_to_string(format!("/proc/{old}/stat"))
            .unwrap_or_default()
            .contains(") Z")
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let audit = cluster.state().join("coordinator").join("audit");
    let newest = shardseal_audit::log_files(&audit).unwrap().pop().unwrap();
    let torn = br#"{"seq":999999,"time":1,"prev":"00"#;
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&newest)
            .unwrap();
        file.write_all(torn).unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.release("coordinator");
    let coordinator = cluster
        .wait_for_restart("coordinator", old, Duration::from_secs(60))
        .await;
    served_more(&outcomes, 8, "after the coordinator was killed").await;
    let unavailable = outcomes.unavailable.load(Ordering::Relaxed) - unavailable_before;
    assert!(
        unavailable > 0,
        "requests sent while the coordinator was down failed as unavailable"
    );
    let log =
        std::fs::read_to_string(cluster.state().join("logs").join("coordinator.log")).unwrap();
    assert!(
        log.contains("dropped an incomplete last entry"),
        "the restarted coordinator cut the torn line"
    );

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let wrong = outcomes.wrong.lock().unwrap().clone();
    let ok = outcomes.ok.load(Ordering::Relaxed);
    println!(
        "faults: {ok} requests served, {} unavailable (retried), {} wrong; broker pid {broker}, coordinator pid {coordinator}",
        outcomes.unavailable.load(Ordering::Relaxed),
        wrong.len()
    );
    assert!(
        wrong.is_empty(),
        "every request completed correctly or was unavailable: {wrong:?}"
    );

    // Nothing lost: both logs verify, every request a client saw answered was recorded,
    // every registration is still there.
    let state = cluster.state().to_owned();
    let broker_report = cluster.audit_verify(
        &state.join("broker").join("audit"),
        &state.join("broker").join("broker.pub"),
    );
    let coordinator_report =
        cluster.audit_verify(&audit, &state.join("coordinator").join("audit.key.pub"));
    println!("broker audit: {broker_report}coordinator audit: {coordinator_report}");
    let recorded_ok = cluster
        .audit_show(&audit, "request")
        .lines()
        .filter(|l| l.contains(r#""outcome":"ok""#))
        .count();
    assert!(
        recorded_ok > ok,
        "{recorded_ok} ok requests in the audit log, {ok} served to the stream and 1 to mlp2"
    );
    let registered = cluster.audit_show(&state.join("broker").join("audit"), "model_registered");
    for model in ["mlp", "canary", "mlp2"] {
        assert!(
            registered.contains(&format!(r#""model":"{model}""#)),
            "{model} registered: {registered}"
        );
    }
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("broker").join("index.json")).unwrap())
            .unwrap();
    let mut models: Vec<&str> = index["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["model_id"].as_str().unwrap())
        .collect();
    models.sort();
    assert_eq!(models, ["canary", "mlp", "mlp2"]);
    let fresh = cluster.client().await;
    for model in ["mlp", "canary", "mlp2"] {
        fresh
            .pipeline(model)
            .await
            .expect("still served after the crashes");
    }
    let scanned = assert_no_canary_in_files(&cluster);
    assert!(scanned > 10, "scanned only {scanned} files");
    cluster.stop().await;
}

/// The log of the function process serving `model`/`stage` (the newest one).
fn function_log(cluster: &Cluster, model: &str, stage: u32) -> Option<String> {
    let f = cluster
        .function_processes()
        .into_iter()
        .find(|f| f.model == model && f.stage == stage)?;
    // The coordinator opened it as the function's stderr: fd 2 names the file.
    let path = std::fs::read_link(format!("/proc/{}/fd/2", f.pid)).ok()?;
    std::fs::read_to_string(path).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_broker_down_warm_functions_serve_and_a_cold_start_waits_for_it() {
    // Idle stages scale to zero after 4 s: `warm` is kept busy by a stream of requests,
    // `cold` is left idle until it runs no function.
    let cluster = Cluster::start_with(shardseal(), &["--scale-to-zero-after", "4s"]).await;
    let warm_model = models::mlp(&Default::default());
    let cold_model = models::mlp(&models::Mlp {
        seed: 7,
        ..Default::default()
    });
    cluster.provision_and_register("warm", &warm_model, 2).await;
    cluster.provision_and_register("cold", &cold_model, 2).await;
    let client = Arc::new(
        cluster
            .client()
            .await
            .with_deadline(Duration::from_secs(120)),
    );
    let warm = Arc::new(mlp_workload(&client, &warm_model, "warm").await);
    let cold = mlp_workload(&client, &cold_model, "cold").await;
    let outcomes = Arc::new(Outcomes::default());
    let stop = Arc::new(AtomicBool::new(false));
    let warm_stream = stream(2, &client, &warm, &outcomes, &stop);
    served_more(&outcomes, 4, "by the warm stage").await;
    // The coordinator learns `cold` (from the broker) and serves it once; then it idles.
    let (inputs, expected) = &cold.cases[0];
    let got = client.infer("cold", inputs.clone()).await.unwrap();
    assert!(max_relative_diff(expected, &got.outputs) <= 1e-5);
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while cluster.replica_counts("cold", 2) != [0, 0] {
        assert!(
            std::time::Instant::now() < until,
            "cold did not scale to zero"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    cluster.hold("broker");
    let old = cluster.kill_service("broker");
    // Warm functions hold their keys: they serve without the broker.
    served_more(&outcomes, 8, "by warm functions with the broker down").await;

    // A scale from zero waits for the broker.
    let cold_request = {
        let client = client.clone();
        let (inputs, expected) = cold.cases[0].clone();
        tokio::spawn(async move {
            let got = client.infer("cold", inputs).await?;
            Ok::<_, Error>(max_relative_diff(&expected, &got.outputs))
        })
    };
    let until = std::time::Instant::now() + Duration::from_secs(120);
    let log = loop {
        let log = function_log(&cluster, "cold", 0).unwrap_or_default();
        if log
            .matches("key broker or quoting agent unreachable; retrying")
            .count()
            >= 3
        {
            break log;
        }
        assert!(
            std::time::Instant::now() < until,
            "the cold start did not retry the broker: {log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!log.contains("cold start complete"), "{log}");
    assert!(!log.contains("SHARDSEAL_READY"), "{log}");
    assert!(
        !cold_request.is_finished(),
        "the request waits for the cold start"
    );
    println!("a cold start waiting for the broker logs:\n{log}");

    cluster.release("broker");
    cluster
        .wait_for_restart("broker", old, Duration::from_secs(60))
        .await;
    let diff = cold_request
        .await
        .unwrap()
        .expect("the held request is served once the broker is back");
    assert!(diff <= 1e-5, "diff {diff}");
    let log = function_log(&cluster, "cold", 0).unwrap();
    assert!(
        log.contains("attested after the key broker or quoting agent came back"),
        "{log}"
    );
    for (inputs, expected) in &cold.cases {
        let got = client.infer("cold", inputs.clone()).await.unwrap();
        assert!(max_relative_diff(expected, &got.outputs) <= 1e-5);
    }
    stop.store(true, Ordering::Relaxed);
    for c in warm_stream {
        c.await.unwrap();
    }
    let wrong = outcomes.wrong.lock().unwrap().clone();
    println!(
        "broker outage: warm stage served {} requests, {} unavailable, {} wrong",
        outcomes.ok.load(Ordering::Relaxed),
        outcomes.unavailable.load(Ordering::Relaxed),
        wrong.len()
    );
    assert!(wrong.is_empty(), "{wrong:?}");
    assert_eq!(
        outcomes.unavailable.load(Ordering::Relaxed),
        0,
        "warm functions never needed the broker"
    );
    let state = cluster.state().to_owned();
    cluster.audit_verify(
        &state.join("broker").join("audit"),
        &state.join("broker").join("broker.pub"),
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_that_cannot_write_its_state_refuses_registrations_clearly() {
    let cluster = Cluster::start(shardseal()).await;
    let model = models::mlp(&Default::default());
    cluster.provision_and_register("mlp", &model, 2).await;
    let client = cluster.client().await;
    let workload = mlp_workload(&client, &model, "mlp").await;
    let (inputs, expected) = &workload.cases[0];
    let got = client.infer("mlp", inputs.clone()).await.unwrap();
    assert!(max_relative_diff(expected, &got.outputs) <= 1e-5);

    // A file where the broker must create the new model's folder.
    let state = cluster.state().to_owned();
    let blocker = state.join("broker").join("models").join("blocked");
    std::fs::write(&blocker, b"in the way").unwrap();
    let index_before = std::fs::read(state.join("broker").join("index.json")).unwrap();
    let blocked = models::mlp(&models::Mlp {
        seed: 5,
        ..Default::default()
    });
    let manifest = cluster
        .provision(&state.join("owner"), "blocked", &blocked, 2)
        .await;
    let measurement = *cluster.trust.measurements.iter().next().unwrap();
    let policy = OwnerReleasePolicy::same_for_all_stages(2, &[measurement]);
    let refused = shardseal_keys::broker::owner::register(
        &cluster.broker_url,
        &cluster.pki(),
        &cluster.owner,
        &manifest,
        &policy,
    )
    .await
    .expect_err("the broker cannot write the registration");
    match &refused {
        shardseal_keys::broker::BrokerError::Refused { code, message } => {
            assert_eq!(*code, tonic::Code::Unavailable);
            assert_eq!(
                message,
                "the broker cannot write its state folder: a file is in the way; nothing was acknowledged"
            );
        }
        other => panic!("unexpected error: {other}"),
    }
    // Nothing changed on disk, the broker keeps serving, and the keys registered before
    // are still released: a new function of mlp attests and serves.
    assert_eq!(
        std::fs::read(state.join("broker").join("index.json")).unwrap(),
        index_before
    );
    assert_eq!(std::fs::read(&blocker).unwrap(), b"in the way");
    let mut function = cluster.start_function("mlp", 0).await;
    assert!(function.is_running());
    let again = client.infer("mlp", inputs.clone()).await.unwrap();
    assert!(max_relative_diff(expected, &again.outputs) <= 1e-5);

    // Once the way is clear, the same registration goes through without a restart.
    std::fs::remove_file(&blocker).unwrap();
    cluster.register(&cluster.owner, &manifest, &policy).await;
    let fresh = cluster.client().await;
    let blocked_work = mlp_workload(&fresh, &blocked, "blocked").await;
    let (inputs, expected) = &blocked_work.cases[0];
    let got = fresh.infer("blocked", inputs.clone()).await.unwrap();
    assert!(max_relative_diff(expected, &got.outputs) <= 1e-5);

    cluster.audit_verify(
        &state.join("broker").join("audit"),
        &state.join("broker").join("broker.pub"),
    );
    let registered = cluster.audit_show(&state.join("broker").join("audit"), "model_registered");
    assert_eq!(registered.lines().count(), 2, "{registered}");
    cluster.stop().await;
}
