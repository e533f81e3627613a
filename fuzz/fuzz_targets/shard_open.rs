//! A sealed shard stream from an untrusted store: the opener must refuse anything it did
//! not seal with a typed error, whatever the bytes and however they are split, and never
//! yield a chunk it could not authenticate.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardseal_attestation::{ModelId, ModelVersion, StageIndex};
use shardseal_keys::{ShardBinding, ShardKey, ShardOpener};

fuzz_target!(|data: &[u8]| {
    // The first byte picks where the stream is cut in two, as a network read would.
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let key = ShardKey::from_bytes([7; 32]);
    let binding = ShardBinding::new(
        ModelId::new("fuzz").expect("valid id"),
        ModelVersion(1),
        StageIndex(0),
    );
    let mut opener = ShardOpener::new(&key, binding);
    let cut = usize::from(split).min(bytes.len());
    let (first, second) = bytes.split_at(cut);
    for piece in [first, second] {
        match opener.update(piece) {
            // Forged bytes never authenticate under this key.
            Ok(chunks) => assert!(chunks.is_empty(), "a forged chunk opened"),
            Err(_) => return,
        }
    }
    assert!(opener.finish().is_err(), "a forged shard completed");
});
