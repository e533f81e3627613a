//! The ShardSeal coordinator: plans coarse-grained partitions of an ONNX model, routes
//! sealed activations from stage to stage, and drives the serverless platform. It is
//! trusted for availability only and never holds a key.
#![forbid(unsafe_code)]
