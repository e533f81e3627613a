//! The ShardSeal coordinator: plans coarse-grained partitions of an ONNX model, routes
//! sealed activations from stage to stage, and drives the serverless platform. It is
//! trusted for availability only and never holds a key.
#![deny(unsafe_code)]

pub mod autoscale;
pub mod billing;
pub mod metrics;
pub mod planner;
pub mod platform;
pub mod router;
pub mod service;

pub use planner::{
    DType, Plan, PlanError, PlanOptions, StageCount, StagePlan, TensorInfo, plan, plan_file,
};
