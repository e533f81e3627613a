//! Everything that can stop the planner, each with enough context to fix the model or the
//! command line.

use std::path::PathBuf;

/// Why a model could not be planned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// The model file could not be read.
    #[error("cannot read the model file {path}")]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },

    /// The bytes are not an ONNX model (not a protobuf `ModelProto`, or one without a graph).
    #[error("not an ONNX model: {reason}")]
    NotOnnx {
        /// What gave it away.
        reason: String,
    },

    /// The bytes start like an ONNX model but end inside a field: the file was cut short.
    #[error("truncated ONNX model: a field declares {needed} bytes but only {available} remain")]
    TruncatedOnnx {
        /// Bytes the last field declares.
        needed: u64,
        /// Bytes left in the input.
        available: u64,
    },

    /// The graph breaks an ONNX structural rule the planner relies on (a tensor produced twice,
    /// a graph output nothing produces, a graph input without a type, ...).
    #[error("invalid ONNX graph: {reason}")]
    InvalidGraph {
        /// The rule and the names involved.
        reason: String,
    },

    /// The graph has no nodes, so there is nothing to cut.
    #[error("the ONNX graph has no nodes")]
    EmptyGraph,

    /// A node reads a tensor that is no initializer, no graph input and no node's output.
    #[error("node {node:?} reads tensor {tensor:?}, which nothing in the graph defines")]
    DanglingInput {
        /// The reading node.
        node: String,
        /// The undefined tensor.
        tensor: String,
    },

    /// Some nodes depend on each other in a cycle, so there is no topological order.
    #[error("the graph has a cycle through nodes {nodes:?}")]
    Cycle {
        /// The nodes left over when no further node could be ordered (the cycle and what
        /// depends on it), at most a handful.
        nodes: Vec<String>,
    },

    /// A node uses an operator that tract cannot run, so no stage holding it could run.
    #[error("node {node:?} uses operator {op_type:?}, which tract does not support")]
    UnsupportedOp {
        /// The node.
        node: String,
        /// The operator.
        op_type: String,
    },

    /// An initializer keeps its bytes in an external file; stages are written self-contained,
    /// so the planner needs the weights inline.
    #[error(
        "initializer {tensor:?} uses ONNX external data, which the planner does not support: \
         save the model with the weights inline"
    )]
    ExternalData {
        /// The initializer.
        tensor: String,
    },

    /// A graph input has a dynamic or unknown dimension and no override was given.
    #[error(
        "input {input:?} has a dynamic shape {shape}: give a static one with \
         --input-shape {input}=d0,d1,..."
    )]
    DynamicInputShape {
        /// The input.
        input: String,
        /// Its declared shape, with `?` or the symbol for each dynamic dimension.
        shape: String,
    },

    /// An input shape override names no graph input.
    #[error("--input-shape names {name:?}, which is not a graph input (inputs: {inputs:?})")]
    UnknownInput {
        /// The name given.
        name: String,
        /// The graph's inputs.
        inputs: Vec<String>,
    },

    /// An input shape override contradicts the rank or a static dimension the model declares.
    #[error("input {input:?} is declared {declared} but the override says {given:?}")]
    InputShapeMismatch {
        /// The input.
        input: String,
        /// Its declared shape.
        declared: String,
        /// The override.
        given: Vec<usize>,
    },

    /// A tensor's element type has no fixed size or cannot cross a stage boundary.
    #[error("tensor {tensor:?} has element type {dtype}, which the planner does not support")]
    UnsupportedDtype {
        /// The tensor.
        tensor: String,
        /// Its element type, as ONNX or tract names it.
        dtype: String,
    },

    /// tract could not infer the types and shapes of the graph's tensors.
    #[error("shape inference failed: {reason}")]
    ShapeInference {
        /// tract's explanation, with its context chain.
        reason: String,
    },

    /// After inference a tensor's type or shape is still not fully known.
    #[error(
        "could not infer a static type and shape for tensor {tensor:?} (got {fact}); \
         give static input shapes with --input-shape"
    )]
    UnresolvedShape {
        /// The tensor.
        tensor: String,
        /// What inference did learn.
        fact: String,
    },

    /// A tensor's byte size overflows or exceeds 2^40 bytes (1 TiB): a corrupt or hostile shape.
    #[error("tensor {tensor:?} with shape {shape:?} is absurdly large (over 2^40 bytes)")]
    TensorTooLarge {
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<u64>,
    },

    /// Zero stages were asked for.
    #[error("a plan needs at least one stage")]
    NoStages,

    /// More stages were asked for than the graph has nodes; every stage needs a node.
    #[error("{stages} stages asked for, but the graph has only {nodes} nodes")]
    TooManyStages {
        /// Stages asked for.
        stages: usize,
        /// Nodes in the graph.
        nodes: usize,
    },

    /// One node alone (its weights plus the activations live while it runs) needs more memory
    /// than a stage may use, so no cut can help.
    #[error(
        "node {node:?} ({op_type}) alone needs {bytes} bytes, over the memory limit of {limit} bytes"
    )]
    NodeExceedsMemoryLimit {
        /// The node.
        node: String,
        /// Its operator.
        op_type: String,
        /// Its weights plus the activations live while it runs.
        bytes: u64,
        /// The per-stage limit.
        limit: u64,
    },

    /// The stage count asked for is too small for every stage to fit the memory limit.
    #[error(
        "{stages} stages cannot each fit in {limit} bytes; at least {needed} stages are needed"
    )]
    MemoryLimitTooSmall {
        /// Stages asked for.
        stages: usize,
        /// The per-stage limit.
        limit: u64,
        /// The fewest stages that fit.
        needed: usize,
    },

    /// A planner option is out of range.
    #[error("invalid planner option: {reason}")]
    InvalidOption {
        /// Which option and why.
        reason: String,
    },
}
