//! ShardSeal keys: secret newtypes, sealed envelopes (chunked AES-256-GCM shards and
//! HPKE sealing to a public key), signed manifests, and the key broker.
#![forbid(unsafe_code)]
