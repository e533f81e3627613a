//! The plaintext of an opened activation: a protobuf `TensorBundle` whose claims (dtype,
//! shape, data length, names) are checked before anything trusts them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardseal_proto::tensor::{byte_len, decode_bundle, encode_bundle};

fuzz_target!(|data: &[u8]| {
    if let Ok(tensors) = decode_bundle(data) {
        for t in &tensors {
            assert_eq!(byte_len(t.dtype(), t.shape()), Some(t.data().len()));
        }
        let again = decode_bundle(&encode_bundle(&tensors)).expect("re-encoded bundle");
        assert_eq!(again, tensors);
    }
});
