//! The ONNX model inside a function's shard, after the shard's AEAD: `decode_model` reads
//! its weights straight into tract tensors, and must accept, refuse and decode exactly as
//! prost (and tract's `load_tensor`) would, whatever the bytes and however they are split
//! into chunks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardseal_function::fuzzing::assert_decodes_as_prost;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size the decoder is handed the rest in.
    let Some((&piece, model)) = data.split_first() else {
        return;
    };
    assert_decodes_as_prost(model, usize::from(piece) + 1);
    assert_decodes_as_prost(model, model.len());
});
