//! Attestation for ShardSeal: evidence, the verifier seam, release policy, and the
//! software TEE backend.
#![forbid(unsafe_code)]
