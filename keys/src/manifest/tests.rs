use super::*;
use crate::signing::SigningKey;

fn spec(name: &str, shape: &[u64]) -> TensorSpec {
    TensorSpec::new(name, DType::F32, shape.to_vec())
}

fn stage(index: u32, inputs: Vec<TensorSpec>, outputs: Vec<TensorSpec>) -> StageEntry {
    let plaintext_size = 1000 + u64::from(index);
    let binding = ShardBinding::new(
        ModelId::new("mlp").unwrap(),
        ModelVersion(2),
        StageIndex(index),
    );
    StageEntry {
        index: StageIndex(index),
        inputs,
        outputs,
        shard_file: format!("mlp-v2-stage{index}.shard"),
        shard_digest: [index as u8; 32],
        shard_size: sealed_shard_len(&binding, 256, plaintext_size).unwrap(),
        plaintext_size,
        param_bytes: 800,
    }
}

pub(crate) fn manifest() -> ModelManifest {
    ModelManifest {
        model_id: ModelId::new("mlp").unwrap(),
        version: ModelVersion(2),
        chunk_size: 256,
        inputs: vec![spec("x", &[1, 3])],
        outputs: vec![spec("y", &[1, 2])],
        stages: vec![
            stage(0, vec![spec("x", &[1, 3])], vec![spec("h", &[1, 8])]),
            // Stage 1 takes a skip connection from the model input too.
            stage(
                1,
                vec![spec("h", &[1, 8]), spec("x", &[1, 3])],
                vec![spec("y", &[1, 2])],
            ),
        ],
    }
}

#[test]
fn a_signed_manifest_round_trips_through_its_file_form() {
    let owner = SigningKey::generate().unwrap();
    let signed = manifest().sign(&owner).unwrap();
    let bytes = signed.to_bytes();
    let text = std::str::from_utf8(&bytes).unwrap();
    assert!(
        text.contains("\"kind\": \"shardseal/v1/model-manifest\""),
        "{text}"
    );
    let read = SignedManifest::from_bytes(&bytes).unwrap();
    assert_eq!(read.signer(), owner.verifying_key());
    assert_eq!(read.verify(&owner.verifying_key()).unwrap(), manifest());
}

#[test]
fn the_body_is_canonical_json_with_hex_digests() {
    let owner = SigningKey::generate().unwrap();
    let signed = manifest().sign(&owner).unwrap();
    let body = std::str::from_utf8(signed.body()).unwrap();
    assert!(
        body.starts_with(r#"{"model_id":"mlp","version":2,"chunk_size":256,"#),
        "{body}"
    );
    assert!(body.contains(&format!("\"shard_digest\":\"{}\"", "01".repeat(32))));
    assert!(body.contains(r#"{"name":"x","dtype":"f32","shape":[1,3]}"#));
    // Signing twice gives the same body (Ed25519 is deterministic, so the same bytes).
    assert_eq!(manifest().sign(&owner).unwrap(), signed);
}

#[test]
fn a_manifest_signed_by_another_key_is_refused() {
    let owner = SigningKey::generate().unwrap();
    let mallory = SigningKey::generate().unwrap();
    let signed = manifest().sign(&mallory).unwrap();
    assert!(matches!(
        signed.verify(&owner.verifying_key()),
        Err(Error::WrongSigner { expected, found })
            if expected == owner.verifying_key() && found == mallory.verifying_key()
    ));
    // Claiming the owner as signer does not help: the signature is checked.
    let forged = SignedManifest::from_parts(
        signed.body().to_vec(),
        owner.verifying_key(),
        *signed.signature(),
    );
    assert!(matches!(
        forged.verify(&owner.verifying_key()),
        Err(Error::BadSignature)
    ));
}

#[test]
fn any_changed_body_byte_is_refused_before_parsing() {
    let owner = SigningKey::generate().unwrap();
    let signed = manifest().sign(&owner).unwrap();
    for i in 0..signed.body().len() {
        let mut body = signed.body().to_vec();
        body[i] ^= 0x01;
        let tampered = SignedManifest::from_parts(body, signed.signer(), *signed.signature());
        assert!(
            matches!(
                tampered.verify(&owner.verifying_key()),
                Err(Error::BadSignature)
            ),
            "byte {i}"
        );
    }
    let mut sig = *signed.signature().as_bytes();
    sig[10] ^= 0x40;
    let tampered = SignedManifest::from_parts(
        signed.body().to_vec(),
        signed.signer(),
        crate::signing::Signature::from_bytes(sig),
    );
    assert!(matches!(
        tampered.verify(&owner.verifying_key()),
        Err(Error::BadSignature)
    ));
}

#[test]
fn any_changed_file_byte_is_refused() {
    let owner = SigningKey::generate().unwrap();
    let bytes = manifest().sign(&owner).unwrap().to_bytes();
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x01;
        let verdict =
            SignedManifest::from_bytes(&bad).and_then(|s| s.verify(&owner.verifying_key()));
        // Whitespace that JSON ignores may change harmlessly; anything else must fail.
        match verdict {
            Ok(m) => {
                assert!(
                    bytes[i].is_ascii_whitespace() && bad[i].is_ascii_whitespace(),
                    "byte {i}"
                );
                assert_eq!(m, manifest());
            }
            Err(
                Error::Malformed { .. }
                | Error::InvalidEncoding(_)
                | Error::BadSignature
                | Error::WrongSigner { .. },
            ) => {}
            Err(other) => panic!("byte {i}: unexpected {other:?}"),
        }
    }
}

#[test]
fn invalid_manifests_are_neither_signed_nor_accepted() {
    let owner = SigningKey::generate().unwrap();
    type Breakage = Box<dyn Fn(&mut ModelManifest)>;
    let cases: Vec<(&str, Breakage)> = vec![
        ("no stages", Box::new(|m| m.stages.clear())),
        ("stage order", Box::new(|m| m.stages.swap(0, 1))),
        ("index gap", Box::new(|m| m.stages[1].index = StageIndex(2))),
        ("no inputs", Box::new(|m| m.inputs.clear())),
        (
            "duplicate output",
            Box::new(|m| {
                let y = m.outputs[0].clone();
                m.outputs.push(y);
            }),
        ),
        (
            "dangling stage input",
            Box::new(|m| m.stages[1].inputs[0].name = "ghost".into()),
        ),
        (
            "mismatched shape",
            Box::new(|m| m.stages[1].inputs[0].shape = vec![1, 9]),
        ),
        (
            "unproduced output",
            Box::new(|m| m.outputs[0].name = "z".into()),
        ),
        ("shard size", Box::new(|m| m.stages[0].shard_size += 1)),
        ("empty shard", Box::new(|m| m.stages[0].plaintext_size = 0)),
        ("param bytes", Box::new(|m| m.stages[0].param_bytes = 5000)),
        (
            "shard path",
            Box::new(|m| m.stages[0].shard_file = "../etc/passwd".into()),
        ),
        (
            "shared shard file",
            Box::new(|m| {
                m.stages[1].shard_file = m.stages[0].shard_file.clone();
            }),
        ),
        ("empty tensor name", Box::new(|m| m.inputs[0].name.clear())),
        (
            "huge tensor",
            Box::new(|m| m.inputs[0].shape = vec![u64::MAX, 2]),
        ),
    ];
    for (what, break_it) in cases {
        let mut m = manifest();
        break_it(&mut m);
        assert!(
            matches!(m.sign(&owner), Err(Error::InvalidManifest(_))),
            "{what} was signed"
        );
        // Signed regardless of the rules (as a buggy or hostile owner tool could):
        // verification still refuses it, after the signature check.
        let body = serde_json::to_vec(&m).unwrap();
        let message = crate::signing::tests_support::signed_message_for::<ModelManifest>(&body);
        let forged = SignedManifest::from_parts(body, owner.verifying_key(), owner.sign(&message));
        assert!(
            matches!(
                forged.verify(&owner.verifying_key()),
                Err(Error::InvalidManifest(_))
            ),
            "{what} was accepted"
        );
    }
    let mut m = manifest();
    m.chunk_size = 3;
    assert!(matches!(m.validate(), Err(Error::ChunkSizeOutOfRange(3))));
}

#[test]
fn unknown_fields_and_dtypes_are_refused() {
    let owner = SigningKey::generate().unwrap();
    let mut value = serde_json::to_value(manifest()).unwrap();
    value["extra"] = serde_json::json!(1);
    let body = serde_json::to_vec(&value).unwrap();
    let message = crate::signing::tests_support::signed_message_for::<ModelManifest>(&body);
    let signed = SignedManifest::from_parts(body, owner.verifying_key(), owner.sign(&message));
    assert!(matches!(
        signed.verify(&owner.verifying_key()),
        Err(Error::Malformed { .. })
    ));

    let wire = shardseal_proto::v1::TensorSpec {
        name: "x".into(),
        dtype: "f16".into(),
        shape: vec![1],
    };
    assert!(matches!(
        TensorSpec::try_from(&wire),
        Err(Error::Malformed { .. })
    ));
    let ok = shardseal_proto::v1::TensorSpec::from(&spec("x", &[2, 2]));
    assert_eq!(TensorSpec::try_from(&ok).unwrap(), spec("x", &[2, 2]));
    assert_eq!(spec("x", &[2, 2]).byte_len(), Some(16));
}

#[test]
fn lookups_by_stage() {
    let m = manifest();
    assert_eq!(m.stage(StageIndex(1)).unwrap().plaintext_size, 1001);
    assert!(m.stage(StageIndex(2)).is_none());
    assert_eq!(
        m.shard_binding(StageIndex(1)).to_string(),
        "model mlp v2 stage 1"
    );
}
