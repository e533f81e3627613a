//! The key broker's owner API: only authorized, fresh, correctly signed calls are served;
//! a registration is verified before anything is stored; models belong to their owner
//! and versions only move forward.

mod broker_support;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use broker_support::{Harness, provision, this_test_binary};
use shardseal_attestation::{ModelVersion, StageIndex};
use shardseal_keys::broker::owner::{registration_request, seal_shard_keys};
use shardseal_keys::broker::{
    BrokerError, OwnerMethod, OwnerReleasePolicy, authorize, unix_millis_now,
};
use shardseal_keys::{OwnerKeyStore, ShardKeys, verify_pipeline};
use shardseal_proto::v1::{PipelineManifestRequest, RegisterModelRequest, RevokeRequest};
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

#[track_caller]
fn assert_refused<T: std::fmt::Debug>(result: Result<T, BrokerError>, code: Code, message: &str) {
    match result {
        Err(BrokerError::Refused {
            code: got,
            message: text,
        }) => {
            assert_eq!(got, code, "{text}");
            assert_eq!(text, message);
        }
        other => panic!("expected {code:?} ({message}), got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_calls_without_valid_authentication_are_unauthenticated() {
    let harness = Harness::start().await;
    let sealing = harness.broker.handle.sealing_key();
    let provisioned = provision(&harness.owner, "m", 1, 1);
    let keys = harness
        .owner
        .shard_keys(&provisioned.model, provisioned.version)
        .unwrap();
    let signed = |owner: &OwnerKeyStore| {
        registration_request(
            OwnerMethod::RegisterModel,
            owner.signing_key(),
            &sealing,
            &provisioned.signed_manifest,
            &keys,
            &allow_this_binary(1),
        )
        .unwrap()
    };
    let mut client = harness.function_client().await;

    let mut no_auth = signed(&harness.owner);
    no_auth.auth = None;
    assert_status(
        client.register_model(no_auth).await,
        Code::Unauthenticated,
        "the call carries no owner authentication",
    );

    let stranger = OwnerKeyStore::init(&harness.dir.path().join("stranger")).unwrap();
    let theirs = provision(&stranger, "m", 1, 1);
    let their_request = registration_request(
        OwnerMethod::RegisterModel,
        stranger.signing_key(),
        &sealing,
        &theirs.signed_manifest,
        &stranger.shard_keys(&theirs.model, theirs.version).unwrap(),
        &allow_this_binary(1),
    )
    .unwrap();
    assert_status(
        client.register_model(their_request).await,
        Code::Unauthenticated,
        &format!(
            "owner key {} is not authorized on this broker",
            stranger.verifying_key()
        ),
    );

    let mut altered = signed(&harness.owner);
    altered.release_policy =
        OwnerReleasePolicy::same_for_all_stages(1, &[shardseal_attestation::Measurement([9; 32])])
            .to_json();
    assert_status(
        client.register_model(altered).await,
        Code::Unauthenticated,
        "the owner signature does not verify for this request",
    );

    // Signed for RegisterModel, sent as RotateModel.
    assert_status(
        client.rotate_model(signed(&harness.owner)).await,
        Code::Unauthenticated,
        "the owner signature does not verify for this request",
    );

    let mut stale = signed(&harness.owner);
    let six_minutes_ago = unix_millis_now() - 6 * 60 * 1000;
    authorize(
        &mut stale,
        OwnerMethod::RegisterModel,
        harness.owner.signing_key(),
        six_minutes_ago,
    )
    .unwrap();
    let status = client.register_model(stale).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status
            .message()
            .starts_with("the owner authentication was issued 3"),
        "{}",
        status.message()
    );
    assert!(status.message().ends_with("(at most 300000 ms allowed)"));

    // None of the refused calls registered anything.
    assert_eq!(harness.broker.handle.model_count(), 0);

    let genuine = signed(&harness.owner);
    client.register_model(genuine.clone()).await.unwrap();
    assert_status(
        client.register_model(genuine).await,
        Code::Unauthenticated,
        "this owner authentication was already used (replay)",
    );
    assert_eq!(harness.broker.handle.model_count(), 1);
    harness.stop().await;
}

/// A registration request built by hand, with a valid owner signature over whatever it
/// holds.
fn request(
    harness: &Harness,
    signed_manifest: Vec<u8>,
    keys: &ShardKeys,
    sealed_for: (&str, u32),
    policy: &OwnerReleasePolicy,
) -> RegisterModelRequest {
    let sealed = seal_shard_keys(
        &harness.broker.handle.sealing_key(),
        &shardseal_attestation::ModelId::new(sealed_for.0).unwrap(),
        ModelVersion(sealed_for.1),
        keys,
    )
    .unwrap();
    let mut request = RegisterModelRequest {
        signed_manifest,
        shard_keys: Some(sealed.into()),
        release_policy: policy.to_json(),
        auth: None,
    };
    authorize(
        &mut request,
        OwnerMethod::RegisterModel,
        harness.owner.signing_key(),
        unix_millis_now(),
    )
    .unwrap();
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_manifest_or_mismatched_keys_are_refused_at_registration() {
    let second = tempfile::tempdir().unwrap();
    let other_owner = OwnerKeyStore::init(&second.path().join("owner")).unwrap();
    let other_key = other_owner.verifying_key();
    let harness = Harness::start_with(|config| config.owner_keys.push(other_key)).await;
    let provisioned = provision(&harness.owner, "m", 1, 2);
    let keys = harness
        .owner
        .shard_keys(&provisioned.model, provisioned.version)
        .unwrap();
    let policy = allow_this_binary(2);
    let mut client = harness.function_client().await;

    // One byte of the signed body changed (chunk size 64 -> 65).
    let mut file: serde_json::Value = serde_json::from_slice(&provisioned.signed_manifest).unwrap();
    let body = BASE64.decode(file["body"].as_str().unwrap()).unwrap();
    let text = String::from_utf8(body).unwrap();
    let tampered_body = text.replacen("\"chunk_size\":64", "\"chunk_size\":65", 1);
    assert_ne!(tampered_body, text);
    file["body"] = BASE64.encode(tampered_body).into();
    let tampered = serde_json::to_vec(&file).unwrap();
    assert_status(
        client
            .register_model(request(&harness, tampered, &keys, ("m", 1), &policy))
            .await,
        Code::InvalidArgument,
        "the signed model manifest is invalid: the signature does not verify",
    );

    // A manifest another (authorized) owner signed, sent by this owner.
    let theirs = provision(&other_owner, "m", 1, 2);
    assert_status(
        client
            .register_model(request(
                &harness,
                theirs.signed_manifest,
                &keys,
                ("m", 1),
                &policy,
            ))
            .await,
        Code::PermissionDenied,
        &format!(
            "the model manifest is signed by {other_key}, not by the calling owner {}",
            harness.owner.verifying_key()
        ),
    );

    // Shard keys sealed as another version's keys.
    assert_status(
        client
            .register_model(request(
                &harness,
                provisioned.signed_manifest.clone(),
                &keys,
                ("m", 2),
                &policy,
            ))
            .await,
        Code::InvalidArgument,
        "the shard keys do not open for m v1",
    );

    // One key for a two-stage model.
    let one_key = ShardKeys::generate(1).unwrap();
    assert_status(
        client
            .register_model(request(
                &harness,
                provisioned.signed_manifest.clone(),
                &one_key,
                ("m", 1),
                &policy,
            ))
            .await,
        Code::InvalidArgument,
        "the shard keys do not match the manifest: keys for stages [0], but the manifest has 2 stage(s)",
    );

    // A policy that leaves a stage out.
    let mut partial = OwnerReleasePolicy::default();
    partial.allow(StageIndex(0), this_test_binary());
    assert_status(
        client
            .register_model(request(
                &harness,
                provisioned.signed_manifest.clone(),
                &keys,
                ("m", 1),
                &partial,
            ))
            .await,
        Code::InvalidArgument,
        "invalid release policy: stage 1 is not listed",
    );

    assert_eq!(harness.broker.handle.model_count(), 0);
    assert_status(
        client
            .get_pipeline_manifest(PipelineManifestRequest {
                model_id: "m".into(),
            })
            .await,
        Code::NotFound,
        "unknown model m",
    );

    // The untampered request goes through.
    client
        .register_model(request(
            &harness,
            provisioned.signed_manifest.clone(),
            &keys,
            ("m", 1),
            &policy,
        ))
        .await
        .unwrap();
    assert_eq!(harness.broker.handle.model_count(), 1);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_belong_to_their_owner_and_versions_only_move_forward() {
    let second = tempfile::tempdir().unwrap();
    let other_owner = OwnerKeyStore::init(&second.path().join("owner")).unwrap();
    let other_key = other_owner.verifying_key();
    let harness = Harness::start_with(|config| config.owner_keys.push(other_key)).await;
    let policy = allow_this_binary(1);
    let v1 = harness.register("m", 1, 1, &policy).await;
    let mut owner = harness.owner_client().await;

    assert_refused(
        owner
            .register(&harness.owner, &v1.signed_manifest, &policy)
            .await,
        Code::AlreadyExists,
        "m v1 is already registered",
    );
    let v2 = provision(&harness.owner, "m", 2, 1);
    assert_refused(
        owner
            .register(&harness.owner, &v2.signed_manifest, &policy)
            .await,
        Code::AlreadyExists,
        "model m is already registered; use RotateModel to add a version",
    );

    // Another owner cannot rotate or revoke this model.
    let theirs = provision(&other_owner, "m", 3, 1);
    let mut other = harness.owner_client().await;
    assert_refused(
        other
            .rotate(&other_owner, &theirs.signed_manifest, &policy)
            .await,
        Code::PermissionDenied,
        "model m belongs to another owner",
    );
    assert_refused(
        other.revoke(&other_owner, &v1.model, None).await,
        Code::PermissionDenied,
        "model m belongs to another owner",
    );
    let mut client = harness.function_client().await;
    let mut revoke = RevokeRequest {
        model_id: "m".into(),
        measurement: "zz".into(),
        auth: None,
    };
    authorize(
        &mut revoke,
        OwnerMethod::Revoke,
        harness.owner.signing_key(),
        unix_millis_now(),
    )
    .unwrap();
    assert_status(
        client.revoke(revoke).await,
        Code::InvalidArgument,
        "invalid request: a measurement is 64 hex digits (a SHA-256)",
    );

    assert_refused(
        owner
            .rotate(&harness.owner, &v1.signed_manifest, &policy)
            .await,
        Code::FailedPrecondition,
        "m is at v1; a rotation must offer a higher version than v1",
    );
    let rotated = owner
        .rotate(&harness.owner, &v2.signed_manifest, &policy)
        .await
        .unwrap();
    assert_eq!(rotated.version, ModelVersion(2));
    assert_refused(
        owner
            .rotate(&harness.owner, &v1.signed_manifest, &policy)
            .await,
        Code::FailedPrecondition,
        "m is at v2; a rotation must offer a higher version than v1",
    );
    let unknown = provision(&harness.owner, "other", 1, 1);
    assert_refused(
        owner
            .rotate(&harness.owner, &unknown.signed_manifest, &policy)
            .await,
        Code::NotFound,
        "unknown model other",
    );

    // Functions and clients now get version 2.
    let released = harness.attest("m", 0).await.unwrap();
    assert_eq!(released.release.version, 2);
    assert_eq!(released.release.deployment, "m@v2");
    let v2_keys = harness.owner.shard_keys(&v2.model, v2.version).unwrap();
    assert_eq!(
        released.release.shard_key,
        v2_keys.get(StageIndex(0)).unwrap().expose_secret()
    );
    assert_eq!(released.release.signed_manifest, v2.signed_manifest);
    let blob = client
        .get_pipeline_manifest(PipelineManifestRequest {
            model_id: "m".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let pipeline = verify_pipeline(&blob, &harness.broker.handle.identity_key()).unwrap();
    assert_eq!(pipeline.version, ModelVersion(2));
    assert_eq!(pipeline.deployment, "m@v2");
    harness.stop().await;
}
