//! A function built from another binary gets no keys, and the request it should have served
//! fails cleanly: the owner allowed the genuine `shardseal` executable only, while the
//! platform runs a different one. (Its own test binary: it writes an executable, and no
//! other test of this process may fork while that file is open.)

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use shardseal_attestation::Measurement;
use shardseal_keys::broker::OwnerReleasePolicy;
use shardseal_sdk::{Client, Trust};
use shardseal_testkit::cluster::Cluster;
use shardseal_testkit::models;
use shardseal_testkit::sealed::{expect_unavailable, inputs_for};

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

fn sha256(path: &Path) -> Measurement {
    shardseal_attestation::measure_executable(path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_function_from_another_binary_gets_no_keys_and_the_request_fails_cleanly() {
    // Another binary: the same program with bytes appended, so it runs as before but
    // measures differently (as any rebuilt or patched function would).
    let scratch = tempfile::tempdir().unwrap();
    let other = scratch.path().join("shardseal-patched");
    let mut bytes = std::fs::read(shardseal()).unwrap();
    bytes.extend_from_slice(b"\0patched by the platform");
    std::fs::write(&other, &bytes).unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o755)).unwrap();
    drop(bytes);
    let genuine = sha256(shardseal());
    let patched = sha256(&other);
    assert_ne!(genuine, patched);

    let cluster = Cluster::start_with(
        shardseal(),
        &[
            "--function-command".to_owned(),
            other.display().to_string(),
            "function".to_owned(),
        ],
    )
    .await;
    assert_eq!(
        cluster
            .trust
            .measurements
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        vec![patched],
        "trust.json names what the platform runs"
    );
    // The owner allows the genuine executable only; the data owner pins it too.
    let model = models::mlp(&Default::default());
    let manifest = cluster
        .provision(&cluster.state().join("owner"), "mlp", &model, 2)
        .await;
    let policy = OwnerReleasePolicy::same_for_all_stages(2, &[genuine]);
    cluster.register(&cluster.owner, &manifest, &policy).await;
    let trust = Trust {
        measurements: [genuine].into_iter().collect(),
        ..cluster.trust.clone()
    };
    let client = Client::connect(&cluster.coordinator_url, trust)
        .await
        .unwrap();
    let inputs = inputs_for(&client, "mlp", 3).await;
    expect_unavailable(&client, "mlp", inputs, 0, "measurement").await;

    // The broker refused the patched measurement and released nothing.
    let audit = cluster.state().join("broker").join("audit");
    let denied = cluster.audit_show(&audit, "attest_denied");
    assert!(
        denied.contains(&patched.to_string()),
        "the denial names the patched measurement: {denied}"
    );
    assert!(denied.contains("\"mlp\""), "{denied}");
    assert_eq!(
        cluster.audit_show(&audit, "key_released"),
        "",
        "no key was released"
    );
    assert_eq!(cluster.audit_show(&audit, "attest_accepted"), "");
    // The function says why it stopped, in its own log.
    let logs = cluster.function_logs();
    assert!(logs.contains("attestation refused"), "{logs}");
    cluster.stop().await;
}
