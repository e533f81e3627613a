//! A data owner's `.npy` input file: refused with a typed error unless header and data
//! agree, and what is read writes back to a file that reads the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardseal_sdk::tensor_file::{read_npy, write_npy};

fuzz_target!(|data: &[u8]| {
    if let Ok(tensor) = read_npy("x", data) {
        let again = read_npy("x", &write_npy(&tensor)).expect("re-written .npy");
        assert_eq!(again, tensor);
    }
});
