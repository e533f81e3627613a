//! Malformed and malicious ONNX at provisioning: `shardseal keys provision` on a graph with
//! a cycle, a dangling input, giant or negative declared shapes, truncated or random bytes
//! fails with a clear one-line error and a non-zero exit, never a panic or a hang, and
//! writes nothing: no output folder, no staging folder, no shard keys in the key store.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use prost::Message;
use shardseal_keys::OwnerKeyStore;
use shardseal_testkit::models;
use tract_onnx::pb::tensor_shape_proto::dimension;
use tract_onnx::pb::type_proto;
use tract_onnx::pb::{ModelProto, NodeProto};

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

fn mlp() -> ModelProto {
    ModelProto::decode(models::mlp(&Default::default()).as_slice()).unwrap()
}

fn edit(change: impl FnOnce(&mut ModelProto)) -> Vec<u8> {
    let mut model = mlp();
    change(&mut model);
    model.encode_to_vec()
}

fn nodes(model: &mut ModelProto) -> &mut Vec<NodeProto> {
    &mut model.graph.as_mut().unwrap().node
}

/// Sets the declared dimensions of the graph input `x`.
fn declare_input_dims(model: &mut ModelProto, dims: &[i64]) {
    let input = &mut model.graph.as_mut().unwrap().input[0];
    let Some(type_proto::Value::TensorType(t)) = input.r#type.as_mut().unwrap().value.as_mut()
    else {
        panic!("x is a tensor")
    };
    let shape = t.shape.as_mut().unwrap();
    for (d, &v) in shape.dim.iter_mut().zip(dims) {
        d.value = Some(dimension::Value::DimValue(v));
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Runs `keys provision` on `model`; returns (exit success, stderr).
async fn provision(tmp: &Path, model: &[u8]) -> (bool, String) {
    let model_path = tmp.join("model.onnx");
    std::fs::write(&model_path, model).unwrap();
    let child = tokio::process::Command::new(shardseal())
        .args(["keys", "provision", "--model"])
        .arg(&model_path)
        .args(["--model-id", "hostile", "--stages", "2", "--keystore"])
        .arg(tmp.join("owner"))
        .arg("--out")
        .arg(tmp.join("out").join("hostile"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Only a guard against a hang, far above any real run.
    let out = tokio::time::timeout(Duration::from_secs(300), child.wait_with_output())
        .await
        .expect("keys provision hung")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn malformed_models_are_refused_with_one_line_and_nothing_written() {
    let giant = 1i64 << 40;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "a cycle",
            edit(|m| {
                // The first layer reads the model's own output: y depends on itself.
                nodes(m)[0].input[0] = "y".into();
            }),
        ),
        (
            "a two-node cycle",
            edit(|m| {
                let n = nodes(m);
                let (first, second) = (n[0].output[0].clone(), n[1].output[0].clone());
                n[0].input[0] = second;
                n[1].input[0] = first;
            }),
        ),
        (
            "a dangling input",
            edit(|m| nodes(m)[2].input[0] = "no_such_tensor".into()),
        ),
        (
            "an output nothing produces",
            edit(|m| m.graph.as_mut().unwrap().output[0].name = "ghost".into()),
        ),
        (
            "a giant declared input shape",
            edit(|m| declare_input_dims(m, &[giant, 32])),
        ),
        (
            "the largest declared dimension",
            edit(|m| declare_input_dims(m, &[i64::MAX, 32])),
        ),
        (
            "a negative declared dimension",
            edit(|m| declare_input_dims(m, &[-5, 32])),
        ),
        (
            "a giant declared initializer",
            edit(|m| {
                let w = &mut m.graph.as_mut().unwrap().initializer[0];
                w.dims = vec![giant, giant];
            }),
        ),
        ("no graph", edit(|m| m.graph = None)),
        (
            "an unknown operator",
            edit(|m| nodes(m)[1].op_type = "NoSuchOp".into()),
        ),
        ("random bytes", {
            let mut rng = models::Xorshift::new(7);
            (0..4096).map(|_| rng.next_u64() as u8).collect()
        }),
        ("a truncated model", {
            let bytes = models::mlp(&Default::default());
            bytes[..bytes.len() / 2].to_vec()
        }),
        ("an empty file", Vec::new()),
    ];
    let mut failures = Vec::new();
    for (what, model) in cases {
        let tmp = tempfile::tempdir().unwrap();
        OwnerKeyStore::init(&tmp.path().join("owner")).unwrap();
        std::fs::create_dir(tmp.path().join("out")).unwrap();
        let keystore_before = files_under(&tmp.path().join("owner"));
        let (ok, stderr) = provision(tmp.path(), &model).await;
        let last = stderr.trim_end().lines().last().unwrap_or("").to_owned();
        println!("{what}: {last}");
        if ok {
            failures.push(format!("{what}: provisioning succeeded"));
            continue;
        }
        if stderr.contains("panicked") || !last.starts_with("error: ") {
            failures.push(format!("{what}: not a clear error:\n{stderr}"));
        }
        let written = files_under(&tmp.path().join("out"));
        if !written.is_empty() {
            failures.push(format!("{what}: wrote {written:?}"));
        }
        if files_under(&tmp.path().join("owner")) != keystore_before {
            failures.push(format!("{what}: the key store changed"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
