//! What the broker signs for others (pipeline manifests, function tokens) as it arrives
//! from an untrusted coordinator or peer: arbitrary blobs and files never panic and never
//! verify, valid documents round-trip, any single-bit flip is refused with its exact error,
//! and even a correctly signed body that is not a valid document is refused as malformed.

use proptest::prelude::*;
use shardseal_attestation::{Measurement, ModelId, ModelVersion, StageIndex};
use shardseal_keys::{
    ContextEncoder, DType, Error, FunctionToken, PipelineManifest, RecipientPublicKey,
    SIGNATURE_LEN, Signature, Signed, SignedPayload, SigningKey, TensorSpec, VerifyingKey,
    from_blob, to_blob, verify_pipeline,
};
use shardseal_proto::v1::SignedBlob;

fn broker() -> SigningKey {
    SigningKey::from_seed(&[0x5b; 32]).unwrap()
}

fn manifest() -> impl Strategy<Value = PipelineManifest> {
    (
        "[a-z][a-z0-9-]{0,12}",
        1u32..50,
        1u32..5,
        prop::collection::vec(1u64..8, 1..4),
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
        any::<u64>(),
    )
        .prop_map(
            |(model, version, stages, shape, stage0, measurement, issued)| {
                let model_id = ModelId::new(model).unwrap();
                let version = ModelVersion(version);
                PipelineManifest {
                    deployment: PipelineManifest::deployment_name(&model_id, version),
                    model_id,
                    version,
                    stage_count: stages,
                    inputs: vec![TensorSpec::new("input", DType::F32, shape.clone())],
                    outputs: vec![TensorSpec::new("output", DType::I64, shape)],
                    stage0_public_key: RecipientPublicKey::from_bytes(stage0),
                    allowed_measurements: vec![vec![Measurement(measurement)]; stages as usize],
                    owner_key: SigningKey::from_seed(&[0x11; 32]).unwrap().verifying_key(),
                    issued_at_ms: issued,
                }
            },
        )
}

fn token() -> impl Strategy<Value = FunctionToken> {
    (
        "[a-z][a-z0-9-]{0,12}",
        any::<u32>(),
        any::<u32>(),
        any::<[u8; 32]>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(model, version, stage, measurement, issued, expires)| FunctionToken {
                model_id: ModelId::new(model).unwrap(),
                version: ModelVersion(version),
                stage: StageIndex(stage),
                measurement: Measurement(measurement),
                ephemeral_key: hex::encode(measurement),
                issued_at_ms: issued,
                expires_at_ms: expires,
            },
        )
}

/// The exact message a [`Signed<T>`] signature covers (domain-separated body), rebuilt here
/// so a test can sign bodies that `Signed::sign` would refuse to produce.
fn sign_raw<T: SignedPayload>(body: &[u8], key: &SigningKey) -> SignedBlob {
    let message = ContextEncoder::new("shardseal/v1/signed")
        .text(T::DOMAIN)
        .bytes(body)
        .finish();
    SignedBlob {
        body: body.to_vec(),
        signature: key.sign(&message).as_bytes().to_vec(),
        signer: key.verifying_key().as_bytes().to_vec(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_blobs_never_verify(
        body in prop::collection::vec(any::<u8>(), 0..400),
        signature in prop::collection::vec(any::<u8>(), 0..80),
        signer in prop::collection::vec(any::<u8>(), 0..40),
    ) {
        let lengths_ok = signature.len() == SIGNATURE_LEN && signer.len() == 32;
        let blob = SignedBlob { body, signature, signer };
        let result = verify_pipeline(&blob, &broker().verifying_key());
        match result {
            Err(Error::InvalidLength { .. }) => prop_assert!(!lengths_ok),
            Err(Error::WrongSigner { .. } | Error::BadSignature) => prop_assert!(lengths_ok),
            other => prop_assert!(false, "unexpected {other:?}"),
        }
        match from_blob::<FunctionToken>(&blob) {
            Ok(signed) => prop_assert!(signed.verify(&broker().verifying_key()).is_err()),
            Err(e) => prop_assert!(matches!(e, Error::InvalidLength { .. }), "{e:?}"),
        }
    }

    #[test]
    fn arbitrary_file_forms_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(signed) = Signed::<PipelineManifest>::from_bytes(&bytes) {
            prop_assert!(signed.verify(&broker().verifying_key()).is_err());
        }
        if let Ok(signed) = Signed::<FunctionToken>::from_bytes(&bytes) {
            prop_assert!(signed.verify(&broker().verifying_key()).is_err());
        }
    }

    #[test]
    fn pipeline_manifests_round_trip_through_blob_and_file(m in manifest()) {
        let signed = Signed::sign(&m, &broker()).unwrap();
        prop_assert_eq!(verify_pipeline(&to_blob(&signed), &broker().verifying_key()).unwrap(), m.clone());
        let file = Signed::<PipelineManifest>::from_bytes(&signed.to_bytes()).unwrap();
        prop_assert_eq!(file.verify(&broker().verifying_key()).unwrap(), m);
    }

    #[test]
    fn function_tokens_round_trip(t in token()) {
        let signed = Signed::sign(&t, &broker()).unwrap();
        let blob = SignedBlob::from(signed);
        let back = Signed::<FunctionToken>::try_from(blob).unwrap();
        prop_assert_eq!(back.verify(&broker().verifying_key()).unwrap(), t);
    }

    #[test]
    fn any_single_bit_flip_of_a_signed_pipeline_is_refused(
        m in manifest(),
        at in any::<usize>(),
        bit in 0u8..8,
    ) {
        let blob = to_blob(&Signed::sign(&m, &broker()).unwrap());
        let total = blob.body.len() + blob.signature.len() + blob.signer.len();
        let at = at % total;
        let mut bad = blob.clone();
        let signer_at = blob.body.len() + SIGNATURE_LEN;
        if at < blob.body.len() {
            bad.body[at] ^= 1 << bit;
        } else if at < signer_at {
            bad.signature[at - blob.body.len()] ^= 1 << bit;
        } else {
            bad.signer[at - signer_at] ^= 1 << bit;
        }
        match verify_pipeline(&bad, &broker().verifying_key()) {
            Err(Error::WrongSigner { .. }) => prop_assert!(at >= signer_at, "flip at {at}"),
            Err(Error::BadSignature) => prop_assert!(at < signer_at, "flip at {at}"),
            other => prop_assert!(false, "flip at {at}: {other:?}"),
        }
    }

    #[test]
    fn a_document_signed_by_another_key_is_refused_even_if_it_names_the_broker(m in manifest()) {
        let impostor = SigningKey::from_seed(&[0x99; 32]).unwrap();
        let mut blob = to_blob(&Signed::sign(&m, &impostor).unwrap());
        prop_assert!(matches!(
            verify_pipeline(&blob, &broker().verifying_key()),
            Err(Error::WrongSigner { .. })
        ), "unexpected result");
        blob.signer = broker().verifying_key().as_bytes().to_vec();
        prop_assert!(matches!(
            verify_pipeline(&blob, &broker().verifying_key()),
            Err(Error::BadSignature)
        ));
    }

    #[test]
    fn a_signed_body_that_is_not_a_valid_document_is_malformed(
        body in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        // The signature is genuine, so this reaches the parser a forger never can: it must
        // still refuse, with a typed error.
        let blob = sign_raw::<PipelineManifest>(&body, &broker());
        prop_assert!(matches!(
            verify_pipeline(&blob, &broker().verifying_key()),
            Err(Error::Malformed { .. })
        ), "unexpected result");
        let blob = sign_raw::<FunctionToken>(&body, &broker());
        let signed = from_blob::<FunctionToken>(&blob).unwrap();
        prop_assert!(matches!(
            signed.verify(&broker().verifying_key()),
            Err(Error::Malformed { .. })
        ), "unexpected result");
    }

    #[test]
    fn a_signed_pipeline_that_breaks_its_rules_is_refused(m in manifest(), which in 0u8..4) {
        let mut bad = m;
        match which {
            0 => bad.stage_count = 0,
            1 => bad.allowed_measurements.push(Vec::new()),
            2 => bad.deployment.push('x'),
            _ => bad.inputs.clear(),
        }
        // Signed::sign validates first, so sign the serialized body by hand.
        let body = serde_json::to_vec(&bad).unwrap();
        let blob = sign_raw::<PipelineManifest>(&body, &broker());
        prop_assert!(matches!(
            verify_pipeline(&blob, &broker().verifying_key()),
            Err(Error::Malformed { .. })
        ), "unexpected result");
    }

    #[test]
    fn a_signature_of_one_kind_never_verifies_as_another(t in token()) {
        let blob = to_blob(&Signed::sign(&t, &broker()).unwrap());
        // A token is never accepted where a pipeline manifest is expected.
        prop_assert!(matches!(
            verify_pipeline(&blob, &broker().verifying_key()),
            Err(Error::BadSignature)
        ));
    }
}

#[test]
fn signature_and_key_lengths_are_checked_before_anything_else() {
    let blob = SignedBlob {
        body: b"{}".to_vec(),
        signature: vec![0; SIGNATURE_LEN - 1],
        signer: vec![0; 32],
    };
    assert!(matches!(
        from_blob::<PipelineManifest>(&blob),
        Err(Error::InvalidLength {
            what: "signature",
            expected: 64,
            actual: 63
        })
    ));
    let blob = SignedBlob {
        body: b"{}".to_vec(),
        signature: vec![0; SIGNATURE_LEN],
        signer: vec![0; 33],
    };
    assert!(matches!(
        from_blob::<PipelineManifest>(&blob),
        Err(Error::InvalidLength {
            what: "signer",
            expected: 32,
            actual: 33
        })
    ));
    // Unused-import guard: the public types named in the module doc exist.
    let _ = (
        Signature::from_bytes([0; 64]),
        VerifyingKey::from_bytes([0; 32]),
    );
}

/// A token's lease is its expiry less its issue, both on the broker's clock, so where on
/// the calendar they fall (a broker clock years off) changes nothing; a token that
/// expires before it was issued has no lifetime.
#[test]
fn a_token_lifetime_is_its_expiry_less_its_issue() {
    let token = |issued_at_ms, expires_at_ms| FunctionToken {
        model_id: ModelId::new("m").unwrap(),
        version: ModelVersion(1),
        stage: StageIndex(0),
        measurement: Measurement([7; 32]),
        ephemeral_key: hex::encode([7; 32]),
        issued_at_ms,
        expires_at_ms,
    };
    let minute = std::time::Duration::from_secs(60);
    assert_eq!(token(1_000, 61_000).lifetime(), Some(minute));
    assert_eq!(
        token(4_102_444_800_000, 4_102_444_860_000).lifetime(),
        Some(minute)
    );
    assert_eq!(token(5, 5).lifetime(), Some(std::time::Duration::ZERO));
    assert_eq!(token(61_000, 1_000).lifetime(), None);
}
