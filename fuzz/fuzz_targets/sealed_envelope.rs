//! A sealed activation or key release off the wire: the proto message, then HPKE open
//! under a fixed context. Forged envelopes are refused with a typed error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use shardseal_attestation::{ModelId, Nonce, StageIndex};
use shardseal_keys::{
    ActivationContext, Direction, Error, KeyReleaseContext, RecipientPrivateKey, RequestId, Sealed,
    open_activation, open_key_release,
};

fuzz_target!(|data: &[u8]| {
    let Ok(wire) = shardseal_proto::v1::Sealed::decode(data) else {
        return;
    };
    let Ok(sealed) = Sealed::try_from(wire) else {
        return;
    };
    let key = RecipientPrivateKey::from_bytes(&[0x42; 32]).expect("32 bytes");
    let activation = ActivationContext {
        deployment: "fuzz@v1".into(),
        request_id: RequestId::from_bytes([1; 16]),
        hop: 0,
        direction: Direction::TowardNextStage,
    };
    let release = KeyReleaseContext {
        broker_id: "broker".into(),
        nonce: Nonce::from_bytes([2; 32]),
        model: ModelId::new("fuzz").expect("valid id"),
        stage: StageIndex(0),
    };
    for result in [
        open_activation(&key, &activation, &sealed),
        open_key_release(&key, &release, &sealed),
    ] {
        match result {
            Err(Error::OpenFailed | Error::SealedMalformed(_)) => {}
            Err(other) => panic!("unexpected error {other:?}"),
            Ok(_) => panic!("a forged envelope opened"),
        }
    }
});
