//! ShardSeal's tamper-evident audit log: hash-chained entries with signed checkpoints.
#![forbid(unsafe_code)]
