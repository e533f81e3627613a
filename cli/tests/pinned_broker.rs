//! A function pins the broker's identity key (`--broker-key`). Facing a broker whose key is
//! another (a platform's stand-in with its own TLS certificate from the same CA, say), it
//! stops before it asks for a quote: no evidence of it reaches that broker, and nothing is
//! released.

use std::path::Path;
use std::time::Duration;

use shardseal_testkit::cluster::Cluster;
use shardseal_testkit::models;

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_function_stops_at_a_broker_that_is_not_the_pinned_one() {
    let cluster = Cluster::start(shardseal()).await;
    let model = models::mlp(&Default::default());
    cluster.provision_and_register("mlp", &model, 1).await;

    let not_the_broker = "ab".repeat(32);
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        cluster.function_command("mlp", 0, &not_the_broker).output(),
    )
    .await
    .expect("the function stops on its own")
    .expect("run shardseal function");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("not the pinned one"), "{stderr}");
    assert!(!stderr.contains("cold start"), "{stderr}");
    assert!(!String::from_utf8_lossy(&output.stdout).contains("SHARDSEAL_READY"));

    // The broker appraised no attestation and released no key to it.
    let audit = cluster.state().join("broker").join("audit");
    for kind in ["attest_accepted", "attest_denied", "key_released"] {
        assert_eq!(cluster.audit_show(&audit, kind).trim(), "", "{kind}");
    }
    cluster.stop().await;
}
