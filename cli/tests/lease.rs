//! The broker's function token as a lease on a stage's keys, with a short lifetime
//! (`shardseal up --token-lifetime-ms 4000`).
//!
//! `a_warm_function_renews_its_lease_and_stops_when_the_broker_stays_away`:
//! - across three lifetimes of steady requests, the same function process keeps serving
//!   correct outputs and its log shows the lease renewed again and again (it attests
//!   anew: no replacement process, no failed request);
//! - with the broker killed and held down past the lease, the function logs that its
//!   lease expired and exits (its keys go with the process); a request then fails with
//!   a clear status instead of being served, and the replacement's cold start waits for
//!   the broker;
//! - once the broker is back, the model is served again.
//!
//! `a_revoked_model_stops_its_running_functions_at_their_next_renewal`: the owner revokes a
//! model a warm function serves; at its next renewal (half a lifetime later) the broker
//! refuses it and the function exits (its log says the renewal was refused, not that the
//! lease ran out), and the model is not served again.
//!
//! That a warm function serves on while the broker is down and its lease still runs is
//! shown with the default 15 min lease by the `faults` test
//! `with_the_broker_down_warm_functions_serve_and_a_cold_start_waits_for_it`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shardseal_attestation::ModelId;
use shardseal_function::StageEngine;
use shardseal_keys::broker::owner::OwnerClient;
use shardseal_sdk::{Client, Error};
use shardseal_testkit::cluster::Cluster;
use shardseal_testkit::models;
use shardseal_testkit::sealed::{inputs_for, max_relative_diff};

const LEASE_MS: u64 = 4_000;

/// The pid and log file of the function process serving `model` stage 0.
fn function(cluster: &Cluster, model: &str) -> Option<(u32, PathBuf)> {
    let f = cluster
        .function_processes()
        .into_iter()
        .find(|f| f.model == model && f.stage == 0)?;
    // The coordinator opened the log as the function's stderr: fd 2 names the file.
    let log = std::fs::read_link(format!("/proc/{}/fd/2", f.pid)).ok()?;
    Some((f.pid, log))
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .is_some_and(|i| !stat[i + 1..].trim_start().starts_with('Z'))
    })
}

/// A deployment under `LEASE_MS` leases serving `models::mlp` as `name` in one stage, the
/// model's bytes, and a patient client of it.
async fn leased_mlp(name: &str) -> (Cluster, Vec<u8>, Client) {
    let exe = Path::new(env!("CARGO_BIN_EXE_shardseal"));
    let cluster = Cluster::start_with(
        exe,
        &["--token-lifetime-ms".to_owned(), LEASE_MS.to_string()],
    )
    .await;
    let model = models::mlp(&Default::default());
    cluster.provision_and_register(name, &model, 1).await;
    let client = cluster
        .client()
        .await
        .with_deadline(Duration::from_secs(60));
    (cluster, model, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_warm_function_renews_its_lease_and_stops_when_the_broker_stays_away() {
    let (cluster, model, client) = leased_mlp("leased").await;
    let engine = StageEngine::load(&model).unwrap();
    let inputs = inputs_for(&client, "leased", 0).await;
    let expected = engine.run(&inputs).unwrap();
    let served = |got: Result<shardseal_sdk::Inference, Error>| {
        let got = got.expect("served");
        let diff = max_relative_diff(&expected, &got.outputs);
        assert!(diff <= 1e-5, "diff {diff}");
    };
    served(client.infer("leased", inputs.clone()).await);
    let (pid, log_path) = function(&cluster, "leased").expect("a function serves");

    // Three lifetimes of requests: the lease is renewed, the same process serves them all.
    let until = Instant::now() + Duration::from_millis(3 * LEASE_MS);
    let mut requests = 0;
    while Instant::now() < until {
        served(client.infer("leased", inputs.clone()).await);
        requests += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(alive(pid), "the function was replaced instead of renewing");
    let log = std::fs::read_to_string(&log_path).unwrap();
    let renewals = log.matches("key lease renewed").count();
    println!("{requests} requests over three lease lifetimes; {renewals} renewals");
    assert!(renewals >= 3, "{renewals} renewals:\n{log}");
    assert!(!log.contains("key lease expired"), "{log}");

    // The broker goes away for longer than the lease: the function stops.
    cluster.hold("broker");
    let old_broker = cluster.kill_service("broker");
    let until = Instant::now() + Duration::from_secs(30);
    while alive(pid) {
        assert!(
            Instant::now() < until,
            "the function outlived its lease by far"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("key lease expired before the broker renewed it"),
        "{log}"
    );
    println!("the function's last log lines:\n{}", {
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(6)..].join("\n")
    });
    // No function holds keys: a request is not served while the broker is away.
    let impatient = cluster.client().await.with_deadline(Duration::from_secs(3));
    let refused = impatient.infer("leased", inputs.clone()).await;
    match &refused {
        Err(Error::Deadline(text) | Error::Unavailable(text)) => {
            println!("with the lease expired and the broker away: {text}")
        }
        other => panic!("expected a deadline or unavailable status, got {other:?}"),
    }

    cluster.release("broker");
    cluster
        .wait_for_restart("broker", old_broker, Duration::from_secs(60))
        .await;
    served(client.infer("leased", inputs.clone()).await);
    let (new_pid, _) = function(&cluster, "leased").expect("a function serves again");
    assert_ne!(new_pid, pid);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_model_stops_its_running_functions_at_their_next_renewal() {
    let (cluster, _, client) = leased_mlp("revoked").await;
    let inputs = inputs_for(&client, "revoked", 0).await;
    client
        .infer("revoked", inputs.clone())
        .await
        .expect("served before the revocation");
    let (pid, log_path) = function(&cluster, "revoked").expect("a function serves");

    let mut owner = OwnerClient::connect(&cluster.broker_url, &cluster.pki())
        .await
        .unwrap();
    owner
        .revoke(&cluster.owner, &ModelId::new("revoked").unwrap(), None)
        .await
        .expect("the owner revokes its model");
    let revoked_at = Instant::now();

    // Its next renewal comes at most half a lifetime later; debug builds on a shared
    // machine get a wide margin, and the log tells a refusal from an expiry.
    let until = revoked_at + Duration::from_millis(LEASE_MS) + Duration::from_secs(20);
    while alive(pid) {
        assert!(
            Instant::now() < until,
            "the function kept serving a revoked model"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone_after = revoked_at.elapsed();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("key lease renewal refused"), "{log}");
    assert!(!log.contains("key lease expired"), "{log}");
    println!("the function exited {gone_after:?} after the revocation");

    // No function gets the keys again: the model is not served.
    let impatient = cluster.client().await.with_deadline(Duration::from_secs(5));
    let refused = impatient.infer("revoked", inputs).await;
    println!("a request after the revocation: {refused:?}");
    assert!(
        matches!(&refused, Err(Error::AttestationRefused(why)) if why.contains("revoked")),
        "{refused:?}"
    );
    cluster.stop().await;
}
