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
//!
//! [`oip`] is the standard Open Inference Protocol, compiled from the upstream
//! `proto/kserve/grpc_predict_v2.proto`: `shardseal proxy` speaks it to local clients.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

/// Version 1 of the ShardSeal protocol.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("shardseal.v1");
}

/// The Open Inference Protocol (KServe v2 predict protocol, package `inference`),
/// compiled from the upstream `grpc_predict_v2.proto`: what `shardseal proxy` speaks to
/// standard clients such as `tritonclient` and `kserve`.
pub mod oip {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("inference");
}

pub mod metrics;
pub mod request_id;
pub mod tensor;
pub mod tls;
