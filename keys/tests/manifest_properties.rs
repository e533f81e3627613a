//! Decoding a signed manifest from untrusted bytes never panics, whatever the bytes.

use proptest::prelude::*;
use shardseal_attestation::{ModelId, ModelVersion, StageIndex};
use shardseal_keys::{
    DType, ModelManifest, ShardBinding, SignedManifest, SigningKey, StageEntry, TensorSpec,
    sealed_shard_len,
};

fn valid_file(owner: &SigningKey) -> Vec<u8> {
    let x = TensorSpec::new("x", DType::F32, vec![1, 4]);
    let y = TensorSpec::new("y", DType::I64, vec![1]);
    let binding = ShardBinding::new(ModelId::new("m").unwrap(), ModelVersion(1), StageIndex(0));
    let manifest = ModelManifest {
        model_id: ModelId::new("m").unwrap(),
        version: ModelVersion(1),
        chunk_size: 1024,
        inputs: vec![x.clone()],
        outputs: vec![y.clone()],
        stages: vec![StageEntry {
            index: StageIndex(0),
            inputs: vec![x],
            outputs: vec![y],
            shard_file: "m.shard".into(),
            shard_digest: [3; 32],
            shard_size: sealed_shard_len(&binding, 1024, 5000).unwrap(),
            plaintext_size: 5000,
            param_bytes: 4000,
        }],
    };
    manifest.sign(owner).unwrap().to_bytes()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let owner = SigningKey::from_seed(&[1; 32]).unwrap();
        if let Ok(signed) = SignedManifest::from_bytes(&bytes) {
            let _ = signed.verify(&owner.verifying_key());
        }
    }

    #[test]
    fn mutated_valid_files_never_panic_and_never_verify_changed(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let owner = SigningKey::from_seed(&[1; 32]).unwrap();
        let original = valid_file(&owner);
        let mut bytes = original.clone();
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        let verified = SignedManifest::from_bytes(&bytes)
            .and_then(|s| s.verify(&owner.verifying_key()));
        if let Ok(manifest) = verified {
            // Only edits JSON ignores (whitespace) may leave it valid, and then it is the
            // same manifest.
            let reference = SignedManifest::from_bytes(&original)
                .unwrap()
                .verify(&owner.verifying_key())
                .unwrap();
            prop_assert_eq!(manifest, reference);
        }
    }

    #[test]
    fn arbitrary_json_shapes_never_panic(
        format in "[a-z0-9-]{0,24}",
        kind in "[a-z/0-9-]{0,32}",
        signer in "[0-9a-f]{0,70}",
        signature in "[0-9a-f]{0,130}",
        body in "[A-Za-z0-9+/=]{0,200}",
    ) {
        let doc = serde_json::json!({
            "format": format, "kind": kind, "signer": signer,
            "signature": signature, "body": body,
        });
        let owner = SigningKey::from_seed(&[1; 32]).unwrap();
        if let Ok(signed) = SignedManifest::from_bytes(doc.to_string().as_bytes()) {
            let _ = signed.verify(&owner.verifying_key());
        }
    }
}
