//! Observability end to end: Prometheus metrics of the coordinator, the key broker and each
//! function count exactly what was sent, carry no tensor or secret, and one request id
//! ties the JSON log lines of the coordinator and of every function together.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use shardseal_keys::{RequestId, seal_activation};
use shardseal_proto::tensor::{HostTensor, encode_bundle};
use shardseal_proto::v1::InferRequest;
use shardseal_testkit::cluster::Cluster;
use shardseal_testkit::metrics::{Metrics, scrape};
use shardseal_testkit::models;
use shardseal_testkit::sealed::request_header;

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

/// Every input value is this, so a leak into a metric or a log line would show.
const CANARY: f32 = -4321.625;
const REQUESTS: usize = 5;
const TRACE_ID: &str = "trace-e2e-0001";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_what_was_sent_and_one_request_id_crosses_every_process() {
    let cluster = Cluster::start_with_env(
        shardseal(),
        &[
            "--log-format",
            "json",
            // One replica per stage: the counts below are then exact.
            "--max-replicas",
            "1",
        ],
        vec![
            ("SHARDSEAL_COORDINATOR_METRICS_LISTEN", "127.0.0.1:0".into()),
            ("SHARDSEAL_BROKER_METRICS_LISTEN", "127.0.0.1:0".into()),
        ],
    )
    .await;
    cluster
        .provision_and_register("mlp", &models::mlp(&Default::default()), 2)
        .await;
    let client = cluster.client().await;
    let pipeline = client.pipeline("mlp").await.unwrap();
    let spec = &pipeline.inputs[0];
    let shape: Vec<usize> = spec.shape.iter().map(|&d| d as usize).collect();
    let n = shape.iter().product();
    let canary = HostTensor::from_f32(spec.name.clone(), shape, &vec![CANARY; n]).unwrap();
    for _ in 0..REQUESTS {
        client.infer("mlp", vec![canary.clone()]).await.unwrap();
    }

    // One request that brings its own id, and one for a model nobody registered.
    let mut raw = cluster.raw_coordinator().await;
    let header = |model: &str, id: RequestId| request_header(&pipeline, model, id);
    let id = RequestId::random().unwrap();
    let sealed = seal_activation(
        &pipeline.stage0_public_key,
        &pipeline.input_context(id),
        &encode_bundle(&[canary]),
    )
    .unwrap();
    let mut traced = tonic::Request::new(InferRequest {
        header: Some(header("mlp", id)),
        input: Some(sealed.clone().into()),
    });
    traced
        .metadata_mut()
        .insert("x-shardseal-request-id", TRACE_ID.parse().unwrap());
    raw.infer(traced).await.expect("the traced request");
    let status = raw
        .infer(InferRequest {
            header: Some(header("ghost", RequestId::random().unwrap())),
            input: Some(sealed.into()),
        })
        .await
        .expect_err("unknown model served");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    let sent_ok = (REQUESTS + 1) as f64;

    // The coordinator.
    let logs = cluster.state().join("logs");
    let coordinator_text = scrape(&metrics_addr(&logs.join("coordinator.log")));
    let coordinator = Metrics::parse(&coordinator_text);
    assert_eq!(
        coordinator.get(r#"shardseal_coordinator_requests_total{model="mlp",code="OK"}"#),
        sent_ok,
        "{coordinator_text}"
    );
    assert_eq!(
        coordinator
            .get(r#"shardseal_coordinator_requests_total{model="_unknown",code="NOT_FOUND"}"#),
        1.0,
        "{coordinator_text}"
    );
    assert_eq!(
        coordinator.get(r#"shardseal_coordinator_request_duration_seconds_count{model="mlp"}"#),
        sent_ok
    );
    let running = cluster.replica_counts("mlp", 2);
    assert_eq!(running, vec![1, 1]);
    let mut cold_starts = 0.0;
    for (stage, replicas) in running.iter().enumerate() {
        let labels = format!(r#"model="mlp",stage="{stage}""#);
        assert_eq!(
            coordinator.get(&format!(
                "shardseal_coordinator_stage_duration_seconds_count{{{labels}}}"
            )),
            sent_ok
        );
        assert_eq!(
            coordinator.get(&format!("shardseal_coordinator_replicas{{{labels}}}")),
            *replicas as f64,
            "{coordinator_text}"
        );
        assert_eq!(
            coordinator.get(&format!("shardseal_coordinator_queue_depth{{{labels}}}")),
            0.0
        );
        let started = coordinator.get(&format!(
            r#"shardseal_coordinator_cold_starts_total{{{labels},outcome="ok"}}"#
        ));
        assert!(started >= 1.0, "{coordinator_text}");
        assert_eq!(
            coordinator.get(&format!(
                "shardseal_coordinator_cold_start_duration_seconds_count{{{labels}}}"
            )),
            started
        );
        cold_starts += started;
    }

    // The broker: one attestation and one key release per cold start, none denied.
    let broker_text = scrape(&metrics_addr(&logs.join("broker.log")));
    let broker = Metrics::parse(&broker_text);
    let releases: f64 = (0..2)
        .map(|stage| {
            broker.get(&format!(
                r#"shardseal_broker_key_releases_total{{model="mlp",stage="{stage}"}}"#
            ))
        })
        .sum();
    assert_eq!(releases, cold_starts, "{broker_text}\n{coordinator_text}");
    assert_eq!(
        broker.get(r#"shardseal_broker_attestations_total{outcome="accepted"}"#),
        cold_starts
    );
    assert_eq!(
        broker.try_get(r#"shardseal_broker_attestations_total{outcome="denied"}"#),
        None
    );

    // Each function, found through its log.
    let function_logs = function_logs(&logs);
    let mut scraped = Vec::new();
    for log in &function_logs {
        let Some(addr) = try_metrics_addr(log) else {
            continue;
        };
        let text = scrape(&addr);
        let metrics = Metrics::parse(&text);
        let stage = (0..2)
            .find(|s| {
                metrics
                    .try_get(&format!(
                        r#"shardseal_function_requests_total{{model="mlp",stage="{s}",code="OK"}}"#
                    ))
                    .is_some()
            })
            .unwrap_or_else(|| panic!("{}: no request counted\n{text}", log.display()));
        let labels = format!(r#"model="mlp",stage="{stage}""#);
        assert_eq!(
            metrics.get(&format!(
                r#"shardseal_function_requests_total{{{labels},code="OK"}}"#
            )),
            sent_ok,
            "{text}"
        );
        assert_eq!(
            metrics.get(&format!(
                "shardseal_function_request_duration_seconds_count{{{labels}}}"
            )),
            sent_ok
        );
        scraped.push((stage, text));
    }
    let stages: BTreeSet<u32> = scraped.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        stages,
        BTreeSet::from([0, 1]),
        "every stage's function scraped"
    );

    // No label carries anything but names, indexes, codes and outcomes, and no value or
    // label holds the input.
    for text in [&coordinator_text, &broker_text]
        .into_iter()
        .chain(scraped.iter().map(|(_, t)| t))
    {
        assert_only_safe_labels(text);
        assert!(!text.contains("4321.625"), "{text}");
    }

    // JSON logs: every line parses; the traced request's id is in the coordinator's lines
    // and in each stage function's lines.
    let coordinator_lines = json_lines(&logs.join("coordinator.log"));
    assert!(
        coordinator_lines
            .iter()
            .any(|l| mentions(l, TRACE_ID) && message(l) == "request answered"),
        "the coordinator did not log the traced request"
    );
    let mut traced_stages = BTreeSet::new();
    let mut function_lines = Vec::new();
    for log in &function_logs {
        for line in json_lines(log) {
            if mentions(&line, TRACE_ID) && message(&line) == "processed" {
                traced_stages.insert(find(&line, "stage").and_then(|s| s.as_u64()));
            }
            function_lines.push(line);
        }
    }
    assert_eq!(
        traced_stages,
        BTreeSet::from([Some(0), Some(1)]),
        "each stage's function logs the coordinator's request id"
    );
    // Each SDK request's id (the coordinator made it) is logged by both stages too.
    let answered: Vec<String> = coordinator_lines
        .iter()
        .filter(|l| message(l) == "request answered" && mentions(l, "\"OK\""))
        .filter_map(|l| find(l, "request_id").and_then(|v| v.as_str().map(str::to_owned)))
        .collect();
    assert_eq!(answered.len(), REQUESTS + 1, "{answered:?}");
    for id in &answered {
        let stages: BTreeSet<_> = function_lines
            .iter()
            .filter(|l| message(l) == "processed" && mentions(l, id))
            .map(|l| find(l, "stage").and_then(|s| s.as_u64()))
            .collect();
        assert_eq!(stages, BTreeSet::from([Some(0), Some(1)]), "{id}");
    }
    for line in coordinator_lines.iter().chain(&function_lines) {
        assert!(!line.to_string().contains("4321.625"), "{line}");
    }
    cluster.stop().await;
}

/// Label names are a fixed set; their values are model ids, numbers, codes or outcomes.
fn assert_only_safe_labels(text: &str) {
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let Some((_, rest)) = line.split_once('{') else {
            continue;
        };
        let labels = rest.split_once('}').expect("closing brace").0;
        for pair in labels.split(',') {
            let (name, value) = pair.split_once('=').expect("name=value");
            let value = value.trim_matches('"');
            let ok = match name {
                "model" => ["mlp", "_unknown"].contains(&value),
                "stage" => value.parse::<u32>().is_ok(),
                "le" => value == "+Inf" || value.parse::<f64>().is_ok(),
                "code" => value.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
                "outcome" => ["ok", "failed", "accepted", "denied"].contains(&value),
                _ => false,
            };
            assert!(ok, "unexpected label {name}={value} in {line}");
        }
    }
}

fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {l}", path.display()))
        })
        .collect()
}

fn message(line: &serde_json::Value) -> &str {
    find(line, "message").and_then(|m| m.as_str()).unwrap_or("")
}

fn mentions(line: &serde_json::Value, text: &str) -> bool {
    line.to_string().contains(text)
}

/// The first field `name` anywhere in a JSON log line (top level, fields, spans).
fn find<'a>(value: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    match value {
        serde_json::Value::Object(object) => object
            .get(name)
            .or_else(|| object.values().find_map(|child| find(child, name))),
        serde_json::Value::Array(items) => items.iter().find_map(|child| find(child, name)),
        _ => None,
    }
}

fn try_metrics_addr(log: &Path) -> Option<String> {
    json_lines(log)
        .iter()
        .find(|l| message(l) == "metrics endpoint")
        .and_then(|l| find(l, "addr").and_then(|a| a.as_str().map(str::to_owned)))
}

fn metrics_addr(log: &Path) -> String {
    try_metrics_addr(log).unwrap_or_else(|| panic!("{}: no metrics endpoint", log.display()))
}

fn function_logs(logs: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(logs)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("function-") && n.ends_with(".log"))
        })
        .collect();
    out.sort();
    out
}
