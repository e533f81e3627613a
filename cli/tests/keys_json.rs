//! `shardseal keys init --json` and `keys provision --json` print one JSON object that a
//! tool can read, and it agrees with what was written: the owner key of the key store, the
//! shard files with their sizes and the SHA-256 the signed manifest names.

use std::path::Path;
use std::process::Command;

use shardseal_keys::{OwnerKeyStore, SignedManifest};
use shardseal_testkit::models;

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

fn run_json(args: &[&str]) -> serde_json::Value {
    let output = Command::new(shardseal()).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "one JSON line: {stdout}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn init_and_provision_report_what_they_wrote_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("owner");
    let init = run_json(&["keys", "init", "--dir", keys.to_str().unwrap(), "--json"]);
    let store = OwnerKeyStore::open(&keys).unwrap();
    assert_eq!(init["owner_public_key"], store.verifying_key().to_hex());
    assert_eq!(init["dir"], keys.display().to_string());

    let model = dir.path().join("mlp.onnx");
    std::fs::write(&model, models::mlp(&Default::default())).unwrap();
    let out = dir.path().join("provisioned");
    let report = run_json(&[
        "keys",
        "provision",
        "--model",
        model.to_str().unwrap(),
        "--stages",
        "2",
        "--keystore",
        keys.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(report["model_id"], "mlp");
    assert_eq!(report["version"], 1);
    assert_eq!(report["destination"], out.display().to_string());
    let manifest_path = report["manifest"].as_str().unwrap();
    let signed = SignedManifest::from_bytes(&std::fs::read(manifest_path).unwrap()).unwrap();
    let manifest = signed.verify(&store.verifying_key()).unwrap();
    let stages = report["stages"].as_array().unwrap();
    assert_eq!(stages.len(), manifest.stages.len());
    assert_eq!(stages.len(), 2);
    for (reported, entry) in stages.iter().zip(&manifest.stages) {
        assert_eq!(reported["stage"], entry.index.0);
        assert_eq!(reported["shard_digest"], hex::encode(entry.shard_digest));
        let file = out.join(reported["shard_file"].as_str().unwrap());
        assert_eq!(
            reported["ciphertext_bytes"],
            std::fs::metadata(&file).unwrap().len()
        );
        assert!(reported["plaintext_bytes"].as_u64().unwrap() > 0);
    }
}
