//! Attestation evidence from a function that has not proved anything yet, and the quote
//! inside it: typed errors, never a panic, and a canonical encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardseal_attestation::{Evidence, Quote};

fuzz_target!(|data: &[u8]| {
    if let Ok(evidence) = Evidence::from_bytes(data) {
        assert_eq!(
            evidence.to_bytes(),
            data,
            "the evidence encoding is canonical"
        );
        if let Ok(quote) = Quote::from_bytes(evidence.quote_bytes()) {
            assert_eq!(&quote.to_bytes()[..], evidence.quote_bytes());
        }
    }
    if let Ok(quote) = Quote::from_bytes(data) {
        assert_eq!(
            &quote.to_bytes()[..],
            data,
            "the quote encoding is canonical"
        );
    }
});
