//! The coordinator's audit log: one entry per request, with its id, model, stages, sealed
//! sizes, durations and outcome; never a tensor value; verifiable with `shardseal audit`.

use std::path::Path;

use shardseal_keys::{RequestId, seal_activation};
use shardseal_proto::tensor::encode_bundle;
use shardseal_proto::v1::InferRequest;
use shardseal_testkit::canary::holds;
use shardseal_testkit::cluster::Cluster;
use shardseal_testkit::models;
use shardseal_testkit::sealed::{inputs_for, request_header, tampered};

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_request_is_audited_with_metadata_only() {
    const INPUT: f32 = -4321.5;
    let cluster = Cluster::start(shardseal()).await;
    cluster
        .provision_and_register("mlp", &models::mlp(&Default::default()), 2)
        .await;
    let client = cluster.client().await;
    for seed in 0..3 {
        let inputs = inputs_for(&client, "mlp", seed).await;
        client.infer("mlp", inputs).await.unwrap();
    }
    let pipeline = client.pipeline("mlp").await.unwrap();
    let spec = &pipeline.inputs[0];
    let shape: Vec<usize> = spec.shape.iter().map(|&d| d as usize).collect();
    let n = shape.iter().product();
    let canary =
        shardseal_proto::tensor::HostTensor::from_f32(spec.name.clone(), shape, &vec![INPUT; n])
            .unwrap();
    client.infer("mlp", vec![canary.clone()]).await.unwrap();

    // A request for a model nobody registered, and one whose activations were tampered.
    let mut raw = cluster.raw_coordinator().await;
    let header = |model: &str, id: RequestId| request_header(&pipeline, model, id);
    let ghost_id = RequestId::random().unwrap();
    let id = RequestId::random().unwrap();
    let sealed = seal_activation(
        &pipeline.stage0_public_key,
        &pipeline.input_context(id),
        &encode_bundle(&[canary]),
    )
    .unwrap();
    let status = raw
        .infer(InferRequest {
            header: Some(header("ghost", ghost_id)),
            input: Some(sealed.clone().into()),
        })
        .await
        .expect_err("unknown model served");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    let sealed = tampered(&sealed, 0);
    let status = raw
        .infer(InferRequest {
            header: Some(header("mlp", id)),
            input: Some(sealed.into()),
        })
        .await
        .expect_err("tampered activations served");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    let coordinator = cluster.state().join("coordinator");
    let log = coordinator.join("audit");
    let entries: Vec<serde_json::Value> = audit(&["show", "--kind", "request", "--json"], &log)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries.len(), 6, "one entry per request: {entries:#?}");
    let text = serde_json::to_string(&entries).unwrap();
    let outcome = |e: &serde_json::Value| find(e, "outcome").as_str().unwrap().to_owned();
    let ok: Vec<_> = entries.iter().filter(|e| outcome(e) == "ok").collect();
    assert_eq!(ok.len(), 4, "{text}");
    for e in &ok {
        assert_eq!(find(e, "model"), "mlp");
        assert_eq!(find(e, "stages"), 2);
        assert_eq!(find(e, "stage_us").as_array().unwrap().len(), 2);
        assert!(find(e, "input_bytes").as_u64().unwrap() > 0);
        assert!(find(e, "output_bytes").as_u64().unwrap() > 0);
        assert!(find(e, "total_us").as_u64().unwrap() > 0);
    }
    let ghost = entries
        .iter()
        .find(|e| find(e, "model") == "ghost")
        .expect("the unknown model's request is filed");
    assert_eq!(outcome(ghost), "invalid_request");
    assert_eq!(
        find(ghost, "request_id"),
        hex::encode(ghost_id.as_bytes()).as_str()
    );
    let denied = entries
        .iter()
        .find(|e| find(e, "request_id") == hex::encode(id.as_bytes()).as_str())
        .expect("the tampered request is filed");
    assert_eq!(outcome(denied), "denied");

    // The chain verifies under the coordinator's published key, and no input value is in
    // the log.
    let key = coordinator.join("audit.key.pub");
    assert!(key.exists());
    let verified = audit_status(&["verify", "--key", &key.display().to_string()], &log);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    for file in std::fs::read_dir(&log).unwrap().flatten() {
        let bytes = std::fs::read(file.path()).unwrap();
        assert!(
            !holds(&bytes, INPUT),
            "{} holds the input",
            file.path().display()
        );
    }

    // An edited entry is caught.
    let state = cluster.stop_keeping_state().await;
    let log = state.join("coordinator").join("audit");
    let segment = log.join(shardseal_audit::segment_name(1));
    let text = std::fs::read_to_string(&segment).unwrap();
    assert!(text.contains("\"outcome\":\"denied\""), "{text}");
    std::fs::write(
        &segment,
        text.replacen("\"outcome\":\"denied\"", "\"outcome\":\"ok\"", 1),
    )
    .unwrap();
    let out = audit_status(&["verify"], &log);
    assert!(!out.status.success(), "an edited outcome verified");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(stderr.contains("entry"), "{stderr}");
    std::fs::remove_dir_all(&state).unwrap();
}

/// The field `name` of a JSON line, looked up at the top and inside the event.
fn find<'a>(entry: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    fn walk<'a>(v: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
        let object = v.as_object()?;
        object
            .get(name)
            .or_else(|| object.values().find_map(|child| walk(child, name)))
    }
    walk(entry, name).unwrap_or_else(|| panic!("no {name} in {entry}"))
}

fn audit_status(args: &[&str], dir: &Path) -> std::process::Output {
    let (verb, rest) = args.split_first().unwrap();
    std::process::Command::new(shardseal())
        .args(["audit", verb])
        .arg(dir)
        .args(rest)
        .output()
        .unwrap()
}

fn audit(args: &[&str], dir: &Path) -> String {
    let out = audit_status(args, dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
