//! The ShardSeal client SDK: verifies the broker-signed pipeline manifest, seals
//! inputs to the first stage and opens outputs sealed to the client.
#![forbid(unsafe_code)]
