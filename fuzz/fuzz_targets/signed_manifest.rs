//! A model manifest from a shard store or an owner: the signed file form, and the body
//! parser and validator that run once a signature verified (fuzzed directly here, since a
//! fuzzer cannot forge the signature that guards them).
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardseal_keys::{ModelManifest, SignedManifest, SigningKey};

fuzz_target!(|data: &[u8]| {
    if let Ok(signed) = SignedManifest::from_bytes(data) {
        let owner = SigningKey::from_seed(&[1; 32]).expect("32 bytes");
        // Not signed by `owner`: whatever the bytes, it must not verify.
        assert!(signed.verify(&owner.verifying_key()).is_err());
        // The file form is stable: what decodes re-encodes and decodes to the same.
        let again = SignedManifest::from_bytes(&signed.to_bytes()).expect("re-encoded form");
        assert_eq!(again, signed);
    }
    if let Ok(manifest) = serde_json::from_slice::<ModelManifest>(data)
        && manifest.validate().is_ok()
    {
        // A valid manifest signs, and its signed body parses back to itself.
        let owner = SigningKey::from_seed(&[1; 32]).expect("32 bytes");
        let signed = manifest.sign(&owner).expect("a valid manifest signs");
        assert_eq!(
            signed.verify(&owner.verifying_key()).expect("verifies"),
            manifest
        );
    }
});
