//! The standalone `shardseal-function` binary: what a container image runs, and what the
//! end-to-end test `cli/tests/standalone_function.rs` serves a model with. (This test also
//! makes `cargo test --workspace` build the binary.)

use std::process::Command;

const EXE: &str = env!("CARGO_BIN_EXE_shardseal-function");

#[test]
fn it_documents_its_arguments() {
    let out = Command::new(EXE).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--broker",
        "--model",
        "--stage",
        "--agent-socket",
        "--listen",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}

#[test]
fn it_refuses_to_start_without_its_stage() {
    let out = Command::new(EXE)
        .arg("--broker")
        .arg("https://127.0.0.1:1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!out.stderr.is_empty(), "a reason on stderr");
}
