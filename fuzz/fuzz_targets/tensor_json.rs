//! A data owner's JSON input file: typed errors, never a panic, and what is read writes
//! back to JSON that reads the same, bit for bit (any NaN equal to any NaN: JSON has one).
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardseal_sdk::tensor_file::{read_json, write_json};
use shardseal_sdk::{DType, HostTensor};

fn same(a: &HostTensor, b: &HostTensor) -> bool {
    let floats = |t: &HostTensor| -> Vec<Option<u64>> {
        t.to_f64_lossy()
            .into_iter()
            .map(|v| (!v.is_nan()).then(|| v.to_bits()))
            .collect()
    };
    (a.name(), a.dtype(), a.shape()) == (b.name(), b.dtype(), b.shape())
        && match a.dtype() {
            // f32 widens to f64 exactly, so comparing the widened bits is exact too.
            DType::F32 | DType::F64 => floats(a) == floats(b),
            _ => a.data() == b.data(),
        }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(tensors) = read_json(data) {
        let again = read_json(write_json(&tensors).as_bytes()).expect("re-written JSON");
        assert_eq!(again.len(), tensors.len());
        for (a, b) in again.iter().zip(&tensors) {
            assert!(same(a, b), "{a:?} changed through JSON");
        }
    }
});
