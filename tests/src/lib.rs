//! Test support for ShardSeal (unpublished): model builders and helpers that start a
//! broker, a coordinator and functions in a few lines.
#![forbid(unsafe_code)]

pub mod canary;
pub mod cluster;
pub mod metrics;
pub mod models;
pub mod s3;
pub mod sealed;
