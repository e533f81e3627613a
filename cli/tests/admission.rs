//! Admission before decoding: the coordinator admits at most `--max-in-flight` calls
//! before it decodes a request's body, so many large requests at once cannot make it
//! buffer more than `max_in_flight` x message size.
//!
//! `many_large_requests_are_shed_before_decoding_and_memory_stays_bounded`: with
//! `--max-in-flight 2`, 16 clients on their own connections each send a 32 MiB request at
//! once; the excess is refused with RESOURCE_EXHAUSTED naming the limit, the others reach
//! the stage (which refuses their junk ciphertext with PERMISSION_DENIED, after the
//! coordinator decoded and forwarded them); the coordinator's peak RSS (VmHWM) grows by
//! less than a bound computed from the limit (2 x 32 MiB x 6 copies + 64 MiB), a fraction
//! of what decoding all 16 would take (16 x 32 MiB x 2 = 1 GiB); and it serves a correct
//! inference afterwards.

use std::path::Path;

use shardseal_keys::{RequestId, seal_activation};
use shardseal_proto::v1::{InferRequest, RequestHeader};
use shardseal_testkit::cluster::Cluster;
use shardseal_testkit::models;
use shardseal_testkit::sealed::{inputs_for, max_abs_diff};
use tonic::Code;

const MAX_IN_FLIGHT: usize = 2;
const CLIENTS: usize = 16;
const REQUEST_BYTES: usize = 32 << 20;
const MIB: u64 = 1 << 20;

/// The peak resident memory of `pid`, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmHWM in kB");
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_large_requests_are_shed_before_decoding_and_memory_stays_bounded() {
    let exe = Path::new(env!("CARGO_BIN_EXE_shardseal"));
    let cluster = Cluster::start_with(
        exe,
        &["--max-in-flight".to_owned(), MAX_IN_FLIGHT.to_string()],
    )
    .await;
    let model = models::mlp(&Default::default());
    cluster.provision_and_register("big", &model, 1).await;
    let client = cluster.client().await;
    let pipeline = client.pipeline("big").await.unwrap();
    let inputs = inputs_for(&client, "big", 0).await;
    let expected = shardseal_function::StageEngine::load(&model)
        .unwrap()
        .run(&inputs)
        .unwrap();
    // Warm: the stage runs and the coordinator's steady memory is reached.
    client.infer("big", inputs.clone()).await.unwrap();
    let coordinator = cluster.coordinator_pid();
    let before = peak_rss(coordinator);

    // A request sealed to stage 0 whose ciphertext is then replaced by 32 MiB of junk.
    let request_id = RequestId::random().unwrap();
    let context = pipeline.input_context(request_id);
    let mut sealed: shardseal_proto::v1::Sealed =
        seal_activation(&pipeline.stage0_public_key, &context, b"x")
            .unwrap()
            .into();
    sealed.ciphertext = vec![0x5a; REQUEST_BYTES].into();
    let request = InferRequest {
        header: Some(RequestHeader {
            model_id: pipeline.model_id.to_string(),
            version: pipeline.version.0,
            request_id: request_id.as_bytes().to_vec(),
            response_key: vec![7; 32],
        }),
        input: Some(sealed),
    };
    let mut connections = Vec::new();
    for _ in 0..CLIENTS {
        connections.push(cluster.raw_coordinator().await);
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let calls: Vec<_> = connections
        .into_iter()
        .map(|mut raw| {
            let (request, barrier) = (request.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                raw.infer(request).await.expect_err("junk is never served")
            })
        })
        .collect();
    let (mut shed, mut admitted) = (0, 0);
    for call in calls {
        let status = call.await.unwrap();
        match status.code() {
            Code::ResourceExhausted => {
                assert!(status.message().contains("--max-in-flight"), "{status:?}");
                shed += 1;
            }
            // Decoded, routed, refused by the stage: the junk does not open.
            Code::PermissionDenied => admitted += 1,
            _ => panic!("unexpected status {status:?}"),
        }
    }
    let after = peak_rss(coordinator);
    let grown = after.saturating_sub(before);
    let bound = MAX_IN_FLIGHT as u64 * REQUEST_BYTES as u64 * 6 + 64 * MIB;
    println!(
        "{CLIENTS} x {} MiB requests, --max-in-flight {MAX_IN_FLIGHT}: {admitted} admitted, \
         {shed} shed; coordinator peak RSS {} MiB -> {} MiB (+{} MiB, bound +{} MiB)",
        REQUEST_BYTES as u64 / MIB,
        before / MIB,
        after / MIB,
        grown / MIB,
        bound / MIB
    );
    assert!(shed >= 1, "nothing was shed");
    assert!(admitted >= 1, "nothing was admitted");
    assert!(grown < bound, "the coordinator grew by {} MiB", grown / MIB);

    // Still serving, correctly.
    let got = client.infer("big", inputs).await.unwrap();
    assert!(max_abs_diff(&expected, &got.outputs) <= 1e-4);
    cluster.stop().await;
}
