//! The key broker refuses every attestation it must refuse, each with its exact status:
//! foreign platforms, other executables, stale or replayed nonces, the wrong stage, revoked
//! measurements and models, and malformed requests.

mod broker_support;

use std::time::Duration;

use broker_support::{
    Agent, Attempt, Harness, python_evidence, some_other_binary, this_test_binary,
};
use shardseal_attestation::{Nonce, StageIndex};
use shardseal_audit::{AuditEvent, LogReader, RecordBody};
use shardseal_keys::broker::OwnerReleasePolicy;
use shardseal_keys::{RecipientPrivateKey, verify_pipeline};
use shardseal_proto::v1::PipelineManifestRequest;
use tonic::Code;

fn allow_this_binary(stages: u32) -> OwnerReleasePolicy {
    OwnerReleasePolicy::same_for_all_stages(stages, &[this_test_binary()])
}

#[track_caller]
fn assert_status<T>(result: Result<T, tonic::Status>, code: Code, message: &str) {
    match result {
        Ok(_) => panic!("expected {code:?} ({message}), got a success"),
        Err(status) => {
            assert_eq!(status.code(), code, "{}", status.message());
            assert_eq!(status.message(), message);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quote_signed_by_another_platform_is_refused_and_spends_the_nonce() {
    let harness = Harness::start().await;
    harness.register("m", 1, 1, &allow_this_binary(1)).await;
    let impostor = Agent::start();

    let mut client = harness.function_client().await;
    let attempt = Attempt::prepare(&mut client, "m", 0).await;
    let forged = attempt.quote(&impostor.socket_path).await;
    assert_status(
        attempt.submit(&mut client, forged).await,
        Code::PermissionDenied,
        "the evidence is signed by a platform that is not trusted",
    );
    // The nonce answered that attempt: genuine evidence cannot be retried against it.
    let genuine = attempt.quote(&harness.agent.socket_path).await;
    assert_status(
        attempt.submit(&mut client, genuine).await,
        Code::FailedPrecondition,
        "nonce already used",
    );
    impostor.stop().await;
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_executable_is_refused_and_the_denial_is_audited() {
    let harness = Harness::start().await;
    harness.register("m", 1, 1, &allow_this_binary(1)).await;

    let mut client = harness.function_client().await;
    let attempt = Attempt::prepare(&mut client, "m", 0).await;
    // python3 asks the same agent for a quote over this attempt's report data: the agent
    // measures python, whatever python claims.
    let (evidence, python) =
        python_evidence(&harness.agent.socket_path, &attempt.report_data()).await;
    assert_ne!(python, this_test_binary());
    assert_status(
        attempt.submit(&mut client, evidence).await,
        Code::PermissionDenied,
        &format!("measurement {python} is not allowed for model m stage 0"),
    );

    let audit_dir = harness.broker.handle.audit_dir();
    let _kept = harness.stop_keeping_files().await;
    let denials: Vec<_> = LogReader::open(&audit_dir)
        .unwrap()
        .filter_map(|entry| match entry.unwrap().record.body {
            RecordBody::Event(event @ AuditEvent::AttestDenied { .. }) => Some(event),
            _ => None,
        })
        .collect();
    assert_eq!(denials.len(), 1);
    let AuditEvent::AttestDenied {
        model,
        stage,
        measurement,
        reason,
    } = &denials[0]
    else {
        unreachable!()
    };
    assert_eq!(model.as_ref().map(|m| m.as_str()), Some("m"));
    assert_eq!(*stage, Some(StageIndex(0)));
    assert_eq!(*measurement, Some(python));
    assert_eq!(
        reason.as_str(),
        format!("measurement {python} is not allowed for model m stage 0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_nonce_is_refused() {
    let harness = Harness::start().await;
    harness.register("m", 1, 1, &allow_this_binary(1)).await;
    let mut client = harness.function_client().await;
    let attempt = Attempt::prepare(&mut client, "m", 0).await;
    let evidence = attempt.quote(&harness.agent.socket_path).await;
    let request = attempt.request(&evidence);
    client.attest(request.clone()).await.unwrap();
    assert_status(
        client.attest(request).await,
        Code::FailedPrecondition,
        "nonce already used",
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_or_unknown_nonce_is_refused() {
    let harness = Harness::start().await;
    harness.register("m", 1, 1, &allow_this_binary(1)).await;
    let mut client = harness.function_client().await;

    let attempt = Attempt::prepare(&mut client, "m", 0).await;
    let evidence = attempt.quote(&harness.agent.socket_path).await;
    // The broker's nonce clock moves past the 30 s lifetime.
    harness.clock.advance(Duration::from_secs(31));
    assert_status(
        attempt.submit(&mut client, evidence).await,
        Code::FailedPrecondition,
        "nonce expired",
    );

    let invented = Attempt {
        ephemeral: RecipientPrivateKey::generate().unwrap(),
        nonce: Nonce::from_bytes([7; 32]),
        model: "m".into(),
        stage: 0,
    };
    let evidence = invented.quote(&harness.agent.socket_path).await;
    assert_status(
        invented.submit(&mut client, evidence).await,
        Code::FailedPrecondition,
        "unknown nonce",
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_1_evidence_does_not_get_stage_2_keys() {
    let harness = Harness::start().await;
    let mut policy = OwnerReleasePolicy::default();
    policy
        .allow(StageIndex(0), some_other_binary())
        .allow(StageIndex(1), this_test_binary())
        .allow(StageIndex(2), some_other_binary());
    harness.register("m", 1, 3, &policy).await;

    let stage1 = harness.attest("m", 1).await.unwrap();
    assert_eq!(stage1.release.stage, 1);
    assert_status(
        harness.attest("m", 2).await,
        Code::PermissionDenied,
        &format!(
            "measurement {} is not allowed for model m stage 2",
            this_test_binary()
        ),
    );
    assert_status(
        harness.attest("m", 0).await,
        Code::PermissionDenied,
        &format!(
            "measurement {} is not allowed for model m stage 0",
            this_test_binary()
        ),
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_measurement_then_a_revoked_model_get_nothing() {
    let harness = Harness::start().await;
    let measurement = this_test_binary();
    let mut policy = OwnerReleasePolicy::default();
    policy
        .allow(StageIndex(0), measurement)
        .allow(StageIndex(0), some_other_binary());
    let provisioned = harness.register("m", 1, 1, &policy).await;
    harness.attest("m", 0).await.unwrap();

    let mut owner = harness.owner_client().await;
    owner
        .revoke(&harness.owner, &provisioned.model, Some(measurement))
        .await
        .unwrap();
    assert_status(
        harness.attest("m", 0).await,
        Code::PermissionDenied,
        &format!("measurement {measurement} has been revoked"),
    );
    // Clients are no longer told to expect it.
    let mut client = harness.function_client().await;
    let blob = client
        .get_pipeline_manifest(PipelineManifestRequest {
            model_id: "m".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let pipeline = verify_pipeline(&blob, &harness.broker.handle.identity_key()).unwrap();
    assert_eq!(
        pipeline.allowed_measurements,
        vec![vec![some_other_binary()]]
    );

    owner
        .revoke(&harness.owner, &provisioned.model, None)
        .await
        .unwrap();
    assert_status(
        harness.attest("m", 0).await,
        Code::PermissionDenied,
        "model m has been revoked",
    );
    assert_status(
        client
            .get_pipeline_manifest(PipelineManifestRequest {
                model_id: "m".into(),
            })
            .await,
        Code::PermissionDenied,
        "model m has been revoked",
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_models_and_stages_and_malformed_requests_are_refused() {
    let harness = Harness::start().await;
    harness.register("m", 1, 2, &allow_this_binary(2)).await;
    let mut client = harness.function_client().await;

    assert_status(
        harness.attest("nope", 0).await,
        Code::NotFound,
        "unknown model nope",
    );
    assert_status(
        harness.attest("m", 5).await,
        Code::PermissionDenied,
        "model m has 2 stage(s); there is no stage 5",
    );
    assert_status(
        harness.attest("../m", 0).await,
        Code::InvalidArgument,
        "invalid request: invalid model id \"../m\"",
    );
    assert_status(
        client
            .get_pipeline_manifest(PipelineManifestRequest {
                model_id: "nope".into(),
            })
            .await,
        Code::NotFound,
        "unknown model nope",
    );

    let attempt = Attempt::prepare(&mut client, "m", 0).await;
    let evidence = attempt.quote(&harness.agent.socket_path).await;
    let mut garbage = attempt.request(&evidence);
    garbage.evidence = b"SSEV not evidence".to_vec();
    assert_status(
        client.attest(garbage).await,
        Code::InvalidArgument,
        "malformed evidence: unknown format",
    );
    let attempt = Attempt::prepare(&mut client, "m", 0).await;
    let mut short_nonce = attempt.request(&evidence);
    short_nonce.nonce.pop();
    assert_status(
        client.attest(short_nonce).await,
        Code::InvalidArgument,
        "invalid request: the nonce is not 32 bytes",
    );
    let mut short_key = attempt.request(&evidence);
    short_key.ephemeral_key.pop();
    assert_status(
        client.attest(short_key).await,
        Code::InvalidArgument,
        "invalid request: the ephemeral key is not 32 bytes",
    );

    // Evidence bound to another key than the one the keys would be sealed to.
    let attempt = Attempt::prepare(&mut client, "m", 0).await;
    let evidence = attempt.quote(&harness.agent.socket_path).await;
    let mut substituted = attempt.request(&evidence);
    substituted.ephemeral_key = RecipientPrivateKey::generate()
        .unwrap()
        .public_key()
        .as_bytes()
        .to_vec();
    assert_status(
        client.attest(substituted).await,
        Code::PermissionDenied,
        "the quote's report data does not bind the expected key and nonce",
    );
    harness.stop().await;
}
