//! The key broker releases keys to a genuine function: real gRPC over TLS, a real quoting
//! agent measuring this test process, and keys that open what they must open.

mod broker_support;

use broker_support::{Attempt, Harness, Released, connect, this_test_binary};
use shardseal_attestation::{ModelVersion, StageIndex};
use shardseal_audit::{AuditEvent, LogReader, RecordBody, VerifyOptions, log_files, verify};
use shardseal_keys::broker::{BROKER_PUB_FILE, OwnerReleasePolicy, unix_millis_now};
use shardseal_keys::{
    ActivationContext, Direction, FunctionToken, RecipientPrivateKey, RecipientPublicKey,
    RequestId, ShardBinding, ShardKey, VerifyingKey, from_blob, open_activation, open_shard,
    seal_activation, verify_pipeline,
};
use shardseal_proto::v1::PipelineManifestRequest;

fn pinned_broker_key(harness: &Harness) -> VerifyingKey {
    std::fs::read_to_string(harness.state_dir().join(BROKER_PUB_FILE))
        .unwrap()
        .parse()
        .unwrap()
}

fn stage_key(released: &Released) -> RecipientPrivateKey {
    RecipientPrivateKey::from_bytes(&released.release.stage_private_key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_genuine_function_gets_keys_that_open_its_shard_and_activations() {
    let harness = Harness::start().await;
    let measurement = this_test_binary();
    let policy = OwnerReleasePolicy::same_for_all_stages(2, &[measurement]);
    let provisioned = harness.register("resnet", 1, 2, &policy).await;
    let pinned = pinned_broker_key(&harness);
    assert_eq!(pinned, harness.broker.handle.identity_key());

    // The client's view: a pipeline manifest signed by the pinned broker key.
    let blob = harness
        .function_client()
        .await
        .get_pipeline_manifest(PipelineManifestRequest {
            model_id: "resnet".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let pipeline = verify_pipeline(&blob, &pinned).unwrap();
    assert_eq!(pipeline.model_id, provisioned.model);
    assert_eq!(pipeline.version, ModelVersion(1));
    assert_eq!(pipeline.deployment, "resnet@v1");
    assert_eq!(pipeline.stage_count, 2);
    assert_eq!(pipeline.inputs, provisioned.manifest.inputs);
    assert_eq!(pipeline.outputs, provisioned.manifest.outputs);
    assert_eq!(
        pipeline.allowed_measurements,
        vec![vec![measurement], vec![measurement]]
    );
    assert_eq!(pipeline.owner_key, harness.owner.verifying_key());

    let before_ms = unix_millis_now();
    let stage0 = harness.attest("resnet", 0).await.unwrap();
    let stage1 = harness.attest("resnet", 1).await.unwrap();
    let after_ms = unix_millis_now();

    for (stage, released) in [(0u32, &stage0), (1, &stage1)] {
        let release = &released.release;
        assert_eq!(release.model_id, "resnet");
        assert_eq!(release.version, 1);
        assert_eq!(release.stage, stage);
        assert_eq!(release.stage_count, 2);
        assert_eq!(release.deployment, "resnet@v1");
        assert_eq!(release.signed_manifest, provisioned.signed_manifest);
        assert_eq!(release.token.as_ref(), Some(&released.token));

        // The shard key decrypts the shard the owner sealed for this stage.
        let shard = &provisioned.shards[stage as usize];
        let key = ShardKey::from_slice(&release.shard_key).unwrap();
        let binding = ShardBinding::new(
            provisioned.model.clone(),
            ModelVersion(1),
            StageIndex(stage),
        );
        let plaintext =
            open_shard(&key, binding, &shard.sealed[..], shard.plaintext.len()).unwrap();
        assert_eq!(plaintext.expose_secret(), &shard.plaintext[..]);

        // The token is the broker's, and names this function.
        let token: FunctionToken = from_blob(&released.token).unwrap().verify(&pinned).unwrap();
        assert_eq!(token.model_id, provisioned.model);
        assert_eq!(token.version, ModelVersion(1));
        assert_eq!(token.stage, StageIndex(stage));
        assert_eq!(token.measurement, measurement);
        let lifetime_ms = 15 * 60 * 1000;
        assert!(token.issued_at_ms >= before_ms && token.issued_at_ms <= after_ms);
        assert_eq!(
            token.lifetime(),
            Some(std::time::Duration::from_millis(lifetime_ms))
        );
    }

    // Stage 0's private key opens an activation sealed to the stage 0 key of the pipeline
    // manifest, as the client seals its input.
    assert_eq!(stage_key(&stage0).public_key(), pipeline.stage0_public_key);
    let context = ActivationContext {
        deployment: pipeline.deployment.clone(),
        request_id: RequestId::random().unwrap(),
        hop: 0,
        direction: Direction::TowardNextStage,
    };
    let sealed = seal_activation(&pipeline.stage0_public_key, &context, b"input tensor").unwrap();
    let opened = open_activation(&stage_key(&stage0), &context, &sealed).unwrap();
    assert_eq!(opened.expose_secret(), b"input tensor");

    // Stage 0 was told stage 1's public key, and stage 1 holds its private half; the last
    // stage seals to the client, so it gets no next key.
    let next = RecipientPublicKey::from_slice(&stage0.release.next_stage_public_key).unwrap();
    assert_eq!(stage_key(&stage1).public_key(), next);
    assert!(stage1.release.next_stage_public_key.is_empty());
    let hop1 = ActivationContext { hop: 1, ..context };
    let sealed = seal_activation(&next, &hop1, b"activation").unwrap();
    assert_eq!(
        open_activation(&stage_key(&stage1), &hop1, &sealed)
            .unwrap()
            .expose_secret(),
        b"activation"
    );
    assert!(open_activation(&stage_key(&stage0), &hop1, &sealed).is_err());

    // Every decision is in the audit log, signed by the same identity key; no key is.
    let audit_dir = harness.broker.handle.audit_dir();
    let shard_key_hex = hex::encode(&stage0.release.shard_key);
    let stage_key_hex = hex::encode(&stage0.release.stage_private_key);
    let _files_kept = harness.stop_keeping_files().await;
    let files = log_files(&audit_dir).unwrap();
    let report = verify(
        &files,
        &VerifyOptions::default().with_trusted_key(shardseal_audit::PublicKey(*pinned.as_bytes())),
    )
    .unwrap();
    assert!(report.key_pinned);
    let mut kinds = Vec::new();
    for entry in LogReader::from_files(files) {
        let entry = entry.unwrap();
        assert!(!entry.line.contains(&shard_key_hex));
        assert!(!entry.line.contains(&stage_key_hex));
        if let RecordBody::Event(event) = entry.record.body {
            kinds.push(event.kind().as_str());
            if let AuditEvent::KeyReleased { measurement: m, .. } = event {
                assert_eq!(m, measurement);
            }
        }
    }
    assert_eq!(
        kinds,
        [
            "model_registered",
            "manifest_served",
            "attest_accepted",
            "key_released",
            "attest_accepted",
            "key_released"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_functions_attest_at_once() {
    let harness = Harness::start().await;
    let policy = OwnerReleasePolicy::same_for_all_stages(2, &[this_test_binary()]);
    let provisioned = harness.register("bert", 1, 2, &policy).await;
    let keys = harness
        .owner
        .shard_keys(&provisioned.model, provisioned.version)
        .unwrap();

    let mut tasks = tokio::task::JoinSet::new();
    for function in 0..50u32 {
        let url = harness.broker.url.clone();
        let pki = harness.pki.clone();
        let socket = harness.agent.socket_path.clone();
        tasks.spawn(async move {
            let stage = function % 2;
            let mut client = connect(&url, &pki).await;
            let attempt = Attempt::prepare(&mut client, "bert", stage).await;
            let evidence = attempt.quote(&socket).await;
            let released = attempt.submit(&mut client, evidence).await;
            (stage, attempt.ephemeral.public_key(), released)
        });
    }
    let mut released_to = std::collections::HashSet::new();
    let mut stage_publics = [None, None];
    while let Some(joined) = tasks.join_next().await {
        let (stage, ephemeral, released) = joined.unwrap();
        let released = released.unwrap();
        assert_eq!(released.release.stage, stage);
        assert_eq!(
            released.release.shard_key,
            keys.get(StageIndex(stage)).unwrap().expose_secret()
        );
        // Every replica of a stage gets the same stage key.
        let public = stage_key(&released).public_key();
        let known = stage_publics[stage as usize].get_or_insert(public);
        assert_eq!(*known, public);
        released_to.insert(ephemeral);
    }
    assert_eq!(released_to.len(), 50);
    assert_ne!(stage_publics[0], stage_publics[1]);
    harness.stop().await;
}
