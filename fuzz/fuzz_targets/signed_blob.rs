//! What the broker signs for others (the pipeline manifest a client verifies, a function's
//! token) as it arrives in a protobuf `SignedBlob`, and the payload parsers and validators
//! behind the signature check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use shardseal_keys::{
    FunctionToken, PipelineManifest, Signed, SignedPayload, SigningKey, from_blob, verify_pipeline,
};
use shardseal_proto::v1::SignedBlob;

fuzz_target!(|data: &[u8]| {
    let broker = SigningKey::from_seed(&[3; 32]).expect("32 bytes");
    if let Ok(blob) = SignedBlob::decode(data) {
        // Never signed by the pinned key: refused, whatever the bytes.
        assert!(verify_pipeline(&blob, &broker.verifying_key()).is_err());
        if let Ok(signed) = from_blob::<FunctionToken>(&blob) {
            assert!(signed.verify(&broker.verifying_key()).is_err());
        }
        let _ = Signed::<PipelineManifest>::try_from(blob);
    }
    if let Ok(manifest) = serde_json::from_slice::<PipelineManifest>(data)
        && manifest.validate().is_ok()
    {
        let signed = Signed::sign(&manifest, &broker).expect("a valid manifest signs");
        let blob = shardseal_keys::to_blob(&signed);
        assert_eq!(
            verify_pipeline(&blob, &broker.verifying_key()).expect("verifies"),
            manifest
        );
    }
    if let Ok(token) = serde_json::from_slice::<FunctionToken>(data) {
        let _ = token.validate();
    }
});
