//! `shardseal proxy` end to end: standard Open Inference Protocol clients (the pip
//! `tritonclient` package, and a Rust client of the upstream proto) talk plaintext gRPC to
//! the proxy on loopback, which runs every request through a real sealed deployment. The
//! outputs must equal plain tract on the whole model.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use shardseal_function::StageEngine;
use shardseal_proto::oip::grpc_inference_service_client::GrpcInferenceServiceClient;
use shardseal_proto::oip::model_infer_request::InferInputTensor;
use shardseal_proto::oip::{
    InferTensorContents, ModelInferRequest, ModelMetadataRequest, ModelReadyRequest,
    ServerLiveRequest,
};
use shardseal_proto::tensor::HostTensor;
use shardseal_sdk::tensor_file::{read_npy, write_npy};
use shardseal_testkit::cluster::Cluster;
use shardseal_testkit::metrics::{Metrics, scrape};
use shardseal_testkit::models;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::Code;
use tonic::transport::Channel;

/// Set in CI: a missing Python or `tritonclient` fails the test instead of skipping it.
const REQUIRED_ENV: &str = "SHARDSEAL_OIP_TEST_REQUIRED";

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

/// A running `shardseal proxy`, killed on drop.
struct Proxy {
    _child: Child,
    /// `host:port`, as standard clients take it.
    address: String,
    /// Its Prometheus endpoint, `host:port`.
    metrics: String,
}

impl Proxy {
    async fn start(cluster: &Cluster) -> Self {
        let mut child = Command::new(shardseal())
            .args([
                "proxy",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .arg("--coordinator")
            .arg(&cluster.coordinator_url)
            .arg("--trust")
            .arg(cluster.state().join("trust.json"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn shardseal proxy");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (address, metrics) = tokio::time::timeout(Duration::from_secs(60), async {
            let mut metrics = None;
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(address) = line.strip_prefix("SHARDSEAL_METRICS ") {
                    metrics = Some(address.trim().to_owned());
                }
                if let Some(address) = line.strip_prefix("SHARDSEAL_READY ") {
                    let metrics = metrics.expect("the metrics endpoint before ready");
                    return (address.trim().to_owned(), metrics);
                }
            }
            panic!("shardseal proxy exited before it was ready");
        })
        .await
        .expect("shardseal proxy ready in time");
        // Keep reading so the proxy never writes into a closed pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            _child: child,
            address,
            metrics,
        }
    }

    async fn client(&self) -> GrpcInferenceServiceClient<Channel> {
        GrpcInferenceServiceClient::connect(format!("http://{}", self.address))
            .await
            .expect("connect to the proxy")
    }
}

/// A deployment serving `models::mlp` as "mlp" in two stages, and its ONNX bytes.
async fn mlp_deployment() -> (Cluster, Vec<u8>) {
    let cluster = Cluster::start(shardseal()).await;
    let model = models::mlp(&Default::default());
    cluster.provision_and_register("mlp", &model, 2).await;
    (cluster, model)
}

/// Deterministic inputs for every input of the verified manifest of `model`.
async fn inputs_for(cluster: &Cluster, model: &str, seed: u64) -> Vec<HostTensor> {
    let pipeline = cluster.client().await.pipeline(model).await.unwrap();
    let mut rng = models::Xorshift::new(seed);
    pipeline
        .inputs
        .iter()
        .map(|spec| {
            let shape: Vec<usize> = spec.shape.iter().map(|&d| d as usize).collect();
            let values: Vec<f32> = (0..shape.iter().product::<usize>())
                .map(|_| rng.next_f32())
                .collect();
            HostTensor::from_f32(spec.name.clone(), shape, &values).unwrap()
        })
        .collect()
}

fn assert_close(expected: &HostTensor, actual: &HostTensor, what: &str) {
    assert_eq!(actual.shape(), expected.shape(), "{what}: shape");
    assert_eq!(actual.dtype(), expected.dtype(), "{what}: dtype");
    let diff = expected
        .to_f64_lossy()
        .iter()
        .zip(actual.to_f64_lossy())
        .map(|(e, a)| (e - a).abs())
        .fold(0.0f64, f64::max);
    println!("{what}: max abs diff against plain tract {diff:e}");
    assert!(diff <= 1e-5, "{what}: diff {diff}");
}

/// Whether `python3` can import `tritonclient.grpc` and numpy; `Err` says why not.
fn python_client_available() -> Result<(), String> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import tritonclient.grpc, numpy"])
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/oip_client.py")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tritonclient_from_pip_infers_through_the_sealed_pipeline_like_plain_tract() {
    if let Err(why) = python_client_available() {
        if std::env::var_os(REQUIRED_ENV).is_some() {
            panic!("{REQUIRED_ENV} is set but the Python client is missing: {why}");
        }
        eprintln!(
            "SKIPPED: tritonclient is not installed (`python3 -m pip install 'tritonclient[grpc]'`): {why}"
        );
        return;
    }
    let (cluster, model) = mlp_deployment().await;
    let proxy = Proxy::start(&cluster).await;
    let pipeline = cluster.client().await.pipeline("mlp").await.unwrap();
    let inputs = inputs_for(&cluster, "mlp", 11).await;
    let expected = StageEngine::load(&model).unwrap().run(&inputs).unwrap();

    let dir = tempfile::tempdir().unwrap();
    for (i, input) in inputs.iter().enumerate() {
        std::fs::write(dir.path().join(format!("input_{i}.npy")), write_npy(input)).unwrap();
    }
    let out = Command::new("python3")
        .arg(script())
        .args(["--url", &proxy.address, "--model", "mlp", "--dir"])
        .arg(dir.path())
        .output()
        .await
        .expect("run python3");
    assert!(
        out.status.success(),
        "oip_client.py failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["server_live"], true);
    assert_eq!(summary["server_ready"], true);
    assert_eq!(summary["model_ready"], true);
    assert_eq!(summary["unknown_model_ready"], false);
    assert_eq!(summary["server_name"], "shardseal");
    assert_eq!(summary["model_name"], "mlp");
    assert_eq!(
        summary["versions"],
        serde_json::json!([pipeline.version.0.to_string()])
    );
    for (key, specs) in [("inputs", &pipeline.inputs), ("outputs", &pipeline.outputs)] {
        let described: Vec<serde_json::Value> = specs
            .iter()
            .map(|s| serde_json::json!({"name": s.name, "datatype": "FP32", "shape": s.shape}))
            .collect();
        assert_eq!(summary[key], serde_json::Value::from(described), "{key}");
    }
    assert_eq!(summary["response_id"], "oip-test-1");
    assert_eq!(summary["typed_response_raw_entries"], 0);
    assert_eq!(summary["unknown_model"]["status"], "StatusCode.NOT_FOUND");
    assert_eq!(
        summary["wrong_datatype"]["status"],
        "StatusCode.INVALID_ARGUMENT"
    );
    let message = summary["wrong_datatype"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("input {:?} must be FP32", inputs[0].name())),
        "{message}"
    );

    for (i, spec) in expected.iter().enumerate() {
        for form in ["raw", "typed"] {
            let bytes = std::fs::read(dir.path().join(format!("{form}_output_{i}.npy"))).unwrap();
            let got = read_npy(spec.name(), &bytes).unwrap();
            assert_close(spec, &got, &format!("tritonclient, {form} contents"));
        }
    }
    cluster.stop().await;
}

fn input_tensor(tensor: &HostTensor, datatype: &str) -> InferInputTensor {
    InferInputTensor {
        name: tensor.name().into(),
        datatype: datatype.into(),
        shape: tensor.shape().iter().map(|&d| d as i64).collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_proxy_answers_the_protocol_with_exact_statuses() {
    let (cluster, model) = mlp_deployment().await;
    let proxy = Proxy::start(&cluster).await;
    let mut client = proxy.client().await;
    let inputs = inputs_for(&cluster, "mlp", 5).await;
    let input = &inputs[0];
    let expected = StageEngine::load(&model).unwrap().run(&inputs).unwrap();

    let live = client.server_live(ServerLiveRequest {}).await.unwrap();
    assert!(live.into_inner().live);
    let metadata = client
        .model_metadata(ModelMetadataRequest {
            name: "mlp".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(metadata.inputs.len(), 1);
    assert_eq!(metadata.inputs[0].name, input.name());
    assert_eq!(metadata.inputs[0].datatype, "FP32");
    let shape: Vec<i64> = input.shape().iter().map(|&d| d as i64).collect();
    assert_eq!(metadata.inputs[0].shape, shape);
    assert_eq!(metadata.outputs[0].name, expected[0].name());

    // Typed contents in: typed contents out, equal to plain tract.
    let mut typed = input_tensor(input, "FP32");
    typed.contents = Some(InferTensorContents {
        fp32_contents: input.to_f32().unwrap(),
        ..Default::default()
    });
    let request = ModelInferRequest {
        model_name: "mlp".into(),
        inputs: vec![typed],
        ..Default::default()
    };
    let response = client
        .model_infer(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(response.raw_output_contents.is_empty());
    let out = &response.outputs[0];
    let shape: Vec<usize> = out.shape.iter().map(|&d| d as usize).collect();
    let values = &out.contents.as_ref().unwrap().fp32_contents;
    let got = HostTensor::from_f32(out.name.clone(), shape, values).unwrap();
    assert_close(&expected[0], &got, "typed contents");

    // Raw contents in: raw contents out.
    let raw = ModelInferRequest {
        model_name: "mlp".into(),
        inputs: vec![input_tensor(input, "FP32")],
        raw_input_contents: vec![input.data().to_vec()],
        ..Default::default()
    };
    let response = client.model_infer(raw.clone()).await.unwrap().into_inner();
    assert_eq!(response.raw_output_contents.len(), 1);
    let got = HostTensor::new(
        response.outputs[0].name.clone(),
        expected[0].dtype(),
        expected[0].shape().to_vec(),
        response.raw_output_contents[0].clone(),
    )
    .unwrap();
    assert_close(&expected[0], &got, "raw contents");

    // Unknown model: NOT_FOUND for inference, not ready for ModelReady.
    let mut unknown = raw.clone();
    unknown.model_name = "no-such-model".into();
    let status = client.model_infer(unknown).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let ready = client
        .model_ready(ModelReadyRequest {
            name: "no-such-model".into(),
            version: String::new(),
        })
        .await
        .unwrap();
    assert!(!ready.into_inner().ready);
    let mut other_version = raw.clone();
    other_version.model_version = "99".into();
    let status = client.model_infer(other_version).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    // Wrong datatype and wrong byte length: INVALID_ARGUMENT naming the tensor.
    let mut wrong_dtype = raw.clone();
    wrong_dtype.inputs[0].datatype = "INT32".into();
    let status = client.model_infer(wrong_dtype).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains(&format!("input {:?} must be FP32", input.name())),
        "{status:?}"
    );
    let mut short = raw.clone();
    short.raw_input_contents[0].truncate(input.data().len() - 1);
    let status = client.model_infer(short).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains(&format!(
            "input {:?}: FP32 {:?} needs {} bytes, got {}",
            input.name(),
            input.shape(),
            input.data().len(),
            input.data().len() - 1
        )),
        "{status:?}"
    );

    // The proxy keeps serving after refusals.
    assert!(client.model_infer(request).await.is_ok());

    // Its metrics count each inference once, under the model when its pipeline was
    // verified and `_unknown` otherwise (an unknown name, a version not served).
    let text = scrape(&proxy.metrics);
    let metrics = Metrics::parse(&text);
    let total = "shardseal_proxy_requests_total";
    assert_eq!(
        metrics.get(&format!(r#"{total}{{model="mlp",code="OK"}}"#)),
        3.0
    );
    assert_eq!(
        metrics.get(&format!(
            r#"{total}{{model="mlp",code="INVALID_ARGUMENT"}}"#
        )),
        2.0
    );
    assert_eq!(
        metrics.get(&format!(r#"{total}{{model="_unknown",code="NOT_FOUND"}}"#)),
        2.0
    );
    assert_eq!(
        metrics.get(r#"shardseal_proxy_request_duration_seconds_count{model="mlp"}"#),
        5.0
    );
    assert!(!text.contains("no-such-model"), "{text}");
    cluster.stop().await;
}

#[tokio::test]
async fn the_proxy_refuses_a_non_loopback_address_without_allow_remote() {
    let out = Command::new(shardseal())
        .args([
            "proxy",
            "--listen",
            "0.0.0.0:0",
            "--coordinator",
            "https://127.0.0.1:1",
            "--trust",
            "/nonexistent/trust.json",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("0.0.0.0 is not a loopback address") && stderr.contains("--allow-remote"),
        "{stderr}"
    );
}
