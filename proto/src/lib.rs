//! ShardSeal's gRPC services and messages.
//!
//! Generated at build time from `proto/shardseal/v1/*.proto` by protox and
//! tonic-prost-build; no `protoc` is needed. Every service in ShardSeal speaks
//! these types, so they are the wire contract between the trust domains:
//!
//! ```text
//!  client SDK ──► coordinator ──► function (stage 1) ──► … ──► function (stage k)
//!                      │                   ▲
//!                      └── key broker ◄────┘ (attest, key release)
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

/// Version 1 of the ShardSeal protocol.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("shardseal.v1");
}

pub mod tensor;
pub mod tls;
