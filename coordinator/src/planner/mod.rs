//! The coarse-grained partition planner: cuts an ONNX model into a few pipeline stages.
//!
//! ```text
//!  model.onnx ──decode──► graph in topological order ──tract──► dtype + static shape of
//!                                                                every tensor
//!        ┌──────────────────────────────────────────────────────────────┘
//!        ▼
//!  per node: FLOPs, weights, live activation bytes; per cut: crossing bytes
//!        │
//!        ▼  dynamic programme (see the objective below)
//!  Plan { stages: [0..c1) [c1..c2) ... } ──stage_model()──► one standalone ONNX per stage
//! ```
//!
//! # Cuts
//!
//! Cuts sit between nodes of the topological order, so each stage is a contiguous run of
//! nodes. At a cut, every tensor produced before it (or fed as a graph input) and read after
//! it (or named as a graph output) crosses. Stage `k`'s `inputs` are the tensors crossing the
//! cut before it (stage 0: the graph inputs, in graph order), its `outputs` those crossing the
//! cut after it (last stage: the graph outputs, in graph order); in between, tensors appear in
//! definition order (graph inputs, then node outputs in topological order). Tensors in both
//! a stage's inputs and outputs are its `passthrough`: the runtime forwards them untouched (a
//! skip connection spanning the whole stage, a graph input needed later).
//!
//! Each stage's ONNX ([`Plan::stage_model`]) takes `model_inputs` (the stage inputs its nodes
//! read) and returns `model_outputs` (the stage outputs its nodes produce), in those orders,
//! with static shapes; passthrough tensors are not part of it.
//!
//! # Choosing cuts
//!
//! Every cut costs a network hop and a seal/open, so the planner cuts only as often as asked
//! ([`StageCount::Fixed`]) or as the memory limit demands ([`StageCount::Auto`]: the fewest
//! stages whose weights plus peak live activations each fit). Among cuts with that many
//! stages it keeps those whose most expensive stage is within `1 + balance_tolerance` of the
//! best achievable balance, and among those picks the fewest bytes crossing the cuts, so a
//! cut after a small tensor wins over a marginally better balanced one after a big tensor.
//! Costs are FLOP estimates from shapes (see `node_flops` in the `flops` module for why
//! estimates and not profiles).

mod cuts;
mod error;
mod flops;
mod onnx_graph;
mod shape_inference;
mod stage_onnx;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::ops::Range;
use std::path::Path;

use prost::Message;
use serde::{Deserialize, Serialize};
use shardseal_attestation::StageIndex;

pub use error::PlanError;

use cuts::{CutError, CutProblem};
use onnx_graph::{OnnxGraph, Origin};
use shape_inference::{TensorFacts, infer_facts, initializer_bytes};

/// How much worse than the best achievable balance a plan may be to save crossing bytes: the
/// most expensive stage may cost up to 10% more than in the best balanced plan.
pub const DEFAULT_BALANCE_TOLERANCE: f64 = 0.10;

/// How many stages to cut the model into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageCount {
    /// Exactly this many stages (each at least one node).
    Fixed(usize),
    /// The fewest stages that each fit in `memory_limit` bytes (weights plus peak live
    /// activations).
    Auto {
        /// Per-stage memory limit in bytes, typically a function's memory size minus the
        /// runtime's own footprint.
        memory_limit: u64,
    },
}

/// What to plan: stage count, memory limit, input shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOptions {
    /// How many stages.
    pub stages: StageCount,
    /// A per-stage memory limit for [`StageCount::Fixed`] (planning fails if the stages cannot
    /// fit). With [`StageCount::Auto`] the smaller of the two limits applies.
    pub memory_limit: Option<u64>,
    /// Static shapes for graph inputs, by name: required for inputs with dynamic dimensions,
    /// and must agree with any static dimension the model declares.
    pub input_shapes: BTreeMap<String, Vec<usize>>,
    /// See [`DEFAULT_BALANCE_TOLERANCE`]; 0 means "best balance, crossing bytes only break ties".
    pub balance_tolerance: f64,
}

impl PlanOptions {
    /// Exactly `stages` stages, no memory limit.
    pub fn fixed(stages: usize) -> Self {
        Self::with_count(StageCount::Fixed(stages))
    }

    /// The fewest stages that each fit `memory_limit` bytes.
    pub fn auto(memory_limit: u64) -> Self {
        Self::with_count(StageCount::Auto { memory_limit })
    }

    fn with_count(stages: StageCount) -> Self {
        Self {
            stages,
            memory_limit: None,
            input_shapes: BTreeMap::new(),
            balance_tolerance: DEFAULT_BALANCE_TOLERANCE,
        }
    }

    /// Adds a per-stage memory limit.
    pub fn with_memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// Gives a graph input a static shape.
    pub fn with_input_shape(mut self, input: impl Into<String>, shape: Vec<usize>) -> Self {
        self.input_shapes.insert(input.into(), shape);
        self
    }
}

/// A tensor's element type. Serialised as its lower-case short name (`"f32"`, `"i64"`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)] // The names are the documentation.
pub enum DType {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    F32,
    F64,
}

impl DType {
    /// Bytes per element.
    pub fn size_bytes(self) -> u64 {
        match self {
            DType::Bool | DType::U8 | DType::I8 => 1,
            DType::U16 | DType::I16 | DType::F16 => 2,
            DType::U32 | DType::I32 | DType::F32 => 4,
            DType::U64 | DType::I64 | DType::F64 => 8,
        }
    }

    /// The short name, as serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::U8 => "u8",
            DType::U16 => "u16",
            DType::U32 => "u32",
            DType::U64 => "u64",
            DType::I8 => "i8",
            DType::I16 => "i16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::F16 => "f16",
            DType::F32 => "f32",
            DType::F64 => "f64",
        }
    }

    /// The ONNX `TensorProto.DataType` code.
    pub fn onnx_elem_type(self) -> i32 {
        match self {
            DType::F32 => 1,
            DType::U8 => 2,
            DType::I8 => 3,
            DType::U16 => 4,
            DType::I16 => 5,
            DType::I32 => 6,
            DType::I64 => 7,
            DType::Bool => 9,
            DType::F16 => 10,
            DType::F64 => 11,
            DType::U32 => 12,
            DType::U64 => 13,
        }
    }

    /// The type for an ONNX `TensorProto.DataType` code, if the planner supports it.
    pub fn from_onnx(code: i32) -> Option<Self> {
        [
            DType::F32,
            DType::U8,
            DType::I8,
            DType::U16,
            DType::I16,
            DType::I32,
            DType::I64,
            DType::Bool,
            DType::F16,
            DType::F64,
            DType::U32,
            DType::U64,
        ]
        .into_iter()
        .find(|dtype| dtype.onnx_elem_type() == code)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A tensor crossing a cut (or a graph input or output): what the runtime seals and sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorInfo {
    /// The ONNX tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Static shape.
    pub shape: Vec<u64>,
    /// Size in bytes (elements × element size).
    pub bytes: u64,
}

impl TensorInfo {
    fn new(name: &str, facts: &TensorFacts) -> Self {
        Self {
            name: name.to_owned(),
            dtype: facts.dtype,
            shape: facts.shape.clone(),
            bytes: facts.bytes,
        }
    }
}

/// One pipeline stage. Serialised with `nodes` for `node_count`, `in_tensors` for `inputs`
/// and `out_tensors` for `outputs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagePlan {
    /// Position in the pipeline, from 0.
    pub index: StageIndex,
    /// The stage's nodes, as positions in the model's topological order.
    pub node_range: Range<usize>,
    /// Number of nodes (`node_range.len()`).
    #[serde(rename = "nodes")]
    pub node_count: usize,
    /// Bytes of the initializers (weights) its nodes read.
    pub param_bytes: u64,
    /// Estimated FLOPs.
    pub cost: u64,
    /// This stage's fraction of the model's estimated FLOPs (0 to 1).
    pub cost_share: f64,
    /// The most activation bytes live at once while one of its nodes runs (passthrough
    /// tensors included: the function holds them meanwhile).
    pub peak_activation_bytes: u64,
    /// Every tensor live at the stage's entry.
    #[serde(rename = "in_tensors")]
    pub inputs: Vec<TensorInfo>,
    /// Every tensor live at the stage's exit.
    #[serde(rename = "out_tensors")]
    pub outputs: Vec<TensorInfo>,
    /// Names of the tensors the runtime forwards from `inputs` to `outputs` untouched.
    pub passthrough: Vec<String>,
    /// Names of the stage ONNX model's inputs, in its order: the `inputs` its nodes read.
    pub model_inputs: Vec<String>,
    /// Names of the stage ONNX model's outputs, in its order: the `outputs` its nodes produce.
    pub model_outputs: Vec<String>,
}

impl StagePlan {
    /// Weights plus peak live activations: what the stage needs in memory.
    pub fn memory_bytes(&self) -> u64 {
        self.param_bytes.saturating_add(self.peak_activation_bytes)
    }

    /// Bytes of all outputs: what crosses the cut after this stage.
    pub fn output_bytes(&self) -> u64 {
        self.outputs.iter().map(|t| t.bytes).sum()
    }
}

/// A partition of a model into pipeline stages, holding the model so it can write each
/// stage's ONNX. Serialises as `{"stages": [...]}`.
#[derive(Serialize)]
pub struct Plan {
    stages: Vec<StagePlan>,
    #[serde(skip)]
    graph: OnnxGraph,
}

impl fmt::Debug for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The model is left out: it is mostly weights.
        f.debug_struct("Plan")
            .field("stages", &self.stages)
            .finish_non_exhaustive()
    }
}

impl Plan {
    /// The stages, in pipeline order.
    pub fn stages(&self) -> &[StagePlan] {
        &self.stages
    }

    /// The model's inputs (stage 0's inputs), in graph order.
    pub fn graph_inputs(&self) -> &[TensorInfo] {
        self.stages
            .first()
            .map(|s| s.inputs.as_slice())
            .unwrap_or(&[])
    }

    /// The model's outputs (the last stage's outputs), in graph order.
    pub fn graph_outputs(&self) -> &[TensorInfo] {
        self.stages
            .last()
            .map(|s| s.outputs.as_slice())
            .unwrap_or(&[])
    }

    /// The ONNX bytes of one stage: a standalone model with the source's IR version and
    /// opsets, the stage's nodes and only the initializers they read, and `model_inputs` /
    /// `model_outputs` as graph inputs and outputs with static shapes. `None` if there is no
    /// such stage.
    pub fn stage_model(&self, stage: StageIndex) -> Option<Vec<u8>> {
        let plan = self.stages.get(usize::try_from(stage.0).ok()?)?;
        let mut initializers = BTreeSet::new();
        for node in &self.graph.nodes[plan.node_range.clone()] {
            initializers.extend(node.initializers.iter().copied());
        }
        let initializers: Vec<usize> = initializers.into_iter().collect();
        let find = |tensors: &'_ [TensorInfo], names: &[String]| -> Vec<TensorInfo> {
            names
                .iter()
                .filter_map(|n| tensors.iter().find(|t| &t.name == n).cloned())
                .collect()
        };
        let inputs = find(&plan.inputs, &plan.model_inputs);
        let outputs = find(&plan.outputs, &plan.model_outputs);
        let model = stage_onnx::stage_model(
            &self.graph.header,
            &self.graph.graph,
            stage.0,
            plan.node_range.clone(),
            &initializers,
            &inputs.iter().collect::<Vec<_>>(),
            &outputs.iter().collect::<Vec<_>>(),
        );
        Some(model.encode_to_vec())
    }

    /// The ONNX bytes of every stage, in order (see [`Plan::stage_model`]).
    pub fn stage_models(&self) -> Vec<Vec<u8>> {
        (0..self.stages.len())
            .filter_map(|i| self.stage_model(StageIndex(u32::try_from(i).ok()?)))
            .collect()
    }

    /// The plan as one line of JSON: `{"stages":[{"index":0,"nodes":..,"param_bytes":..,
    /// "cost_share":..,"out_tensors":[{"name":..,"dtype":..,"shape":[..],"bytes":..}],..}]}`.
    pub fn to_json(&self) -> String {
        // Plain structs, strings and finite numbers: serialisation cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Plans the ONNX model in `model`.
pub fn plan(model: &[u8], options: &PlanOptions) -> Result<Plan, PlanError> {
    if !options.balance_tolerance.is_finite() || options.balance_tolerance < 0.0 {
        return Err(PlanError::InvalidOption {
            reason: format!(
                "balance tolerance must be a finite number >= 0, not {}",
                options.balance_tolerance
            ),
        });
    }
    if options.stages == StageCount::Fixed(0) {
        return Err(PlanError::NoStages);
    }
    let model = onnx_graph::decode_model(model)?;
    let mut graph = OnnxGraph::new(model)?;
    let facts = infer_facts(&mut graph, &options.input_shapes)?;
    Planner::new(graph, facts)?.plan(options)
}

/// Plans the ONNX model in the file at `path`.
pub fn plan_file(path: &Path, options: &PlanOptions) -> Result<Plan, PlanError> {
    let bytes = std::fs::read(path).map_err(|source| PlanError::Read {
        path: path.to_owned(),
        source,
    })?;
    plan(&bytes, options)
}

/// Everything the cut choice and the stage descriptions need, per node and per tensor.
struct Planner {
    graph: OnnxGraph,
    facts: Vec<Option<TensorFacts>>,
    costs: Vec<u64>,
    live_bytes: Vec<u64>,
    crossing_bytes: Vec<u64>,
    node_weights: Vec<Vec<(usize, u64)>>,
    weight_bytes: Vec<u64>,
}

impl Planner {
    fn new(graph: OnnxGraph, facts: Vec<Option<TensorFacts>>) -> Result<Self, PlanError> {
        let n = graph.nodes.len();
        let weight_bytes: Vec<u64> = graph
            .graph
            .initializer
            .iter()
            .map(initializer_bytes)
            .collect::<Result<_, _>>()?;

        let activation_ids: HashMap<&str, usize> = graph
            .activations
            .iter()
            .enumerate()
            .map(|(id, a)| (a.name.as_str(), id))
            .collect();
        let initializer_ids: HashMap<&str, usize> = graph
            .graph
            .initializer
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        let shape_of = |name: &str| -> Option<Vec<u64>> {
            if let Some(&id) = activation_ids.get(name) {
                facts[id].as_ref().map(|f| f.shape.clone())
            } else {
                let &index = initializer_ids.get(name)?;
                let dims = &graph.graph.initializer[index].dims;
                Some(
                    dims.iter()
                        .map(|&d| u64::try_from(d).unwrap_or(0))
                        .collect(),
                )
            }
        };
        let costs = graph
            .graph
            .node
            .iter()
            .map(|node| {
                let shapes = |names: &[String]| -> Vec<Option<Vec<u64>>> {
                    names
                        .iter()
                        .map(|n| if n.is_empty() { None } else { shape_of(n) })
                        .collect()
                };
                let inputs = shapes(&node.input);
                let outputs = shapes(&node.output);
                let inputs: Vec<Option<&[u64]>> = inputs.iter().map(|s| s.as_deref()).collect();
                let outputs: Vec<Option<&[u64]>> = outputs.iter().map(|s| s.as_deref()).collect();
                flops::node_flops(node, &inputs, &outputs)
            })
            .collect();

        // Difference arrays: each activation adds its bytes over the node positions where it
        // is live, and over the cut positions it crosses.
        let mut live_delta = vec![0i128; n + 1];
        let mut crossing_delta = vec![0i128; n + 2];
        for (activation, facts) in graph.activations.iter().zip(&facts) {
            let bytes = i128::from(facts.as_ref().map_or(0, |f| f.bytes));
            let (first_live, produced_before) = match activation.origin {
                Origin::GraphInput => (0, 0),
                Origin::Node(p) => (p, p + 1),
            };
            let last_live = if activation.is_graph_output {
                Some(n - 1)
            } else {
                match (activation.origin, activation.last_reader) {
                    (_, Some(reader)) => Some(reader.max(first_live)),
                    // Computed, then dropped: live while its node runs.
                    (Origin::Node(p), None) => Some(p),
                    (Origin::GraphInput, None) => None,
                }
            };
            if let Some(last_live) = last_live {
                live_delta[first_live] += bytes;
                live_delta[last_live + 1] -= bytes;
            }
            // Cut c (before node c) is crossed if produced before c and needed at or after c.
            let needed_until = if activation.is_graph_output {
                Some(n)
            } else {
                activation.last_reader
            };
            if let Some(last) = needed_until
                && produced_before <= last
            {
                crossing_delta[produced_before] += bytes;
                crossing_delta[last + 1] -= bytes;
            }
        }
        let running = |deltas: &[i128], len: usize| -> Vec<u64> {
            let mut sum = 0i128;
            deltas[..len]
                .iter()
                .map(|d| {
                    sum += d;
                    u64::try_from(sum).unwrap_or(u64::MAX)
                })
                .collect()
        };
        let live_bytes = running(&live_delta, n);
        let crossing_bytes = running(&crossing_delta, n + 1);

        let node_weights = graph
            .nodes
            .iter()
            .map(|node| {
                node.initializers
                    .iter()
                    .map(|&i| (i, weight_bytes[i]))
                    .collect()
            })
            .collect();
        Ok(Self {
            graph,
            facts,
            costs,
            live_bytes,
            crossing_bytes,
            node_weights,
            weight_bytes,
        })
    }

    fn plan(self, options: &PlanOptions) -> Result<Plan, PlanError> {
        let n = self.graph.nodes.len();
        let memory_limit = match options.stages {
            StageCount::Fixed(_) => options.memory_limit,
            StageCount::Auto { memory_limit } => {
                Some(memory_limit.min(options.memory_limit.unwrap_or(u64::MAX)))
            }
        };
        let problem = CutProblem {
            costs: &self.costs,
            live_bytes: &self.live_bytes,
            crossing_bytes: &self.crossing_bytes,
            node_weights: &self.node_weights,
            memory_limit,
        };
        let stages = match options.stages {
            StageCount::Fixed(0) => return Err(PlanError::NoStages),
            StageCount::Fixed(stages) if stages > n => {
                return Err(PlanError::TooManyStages { stages, nodes: n });
            }
            StageCount::Fixed(stages) => stages,
            StageCount::Auto { .. } => problem
                .fewest_stages()
                .map_err(|e| self.cut_error(e, 0, memory_limit))?,
        };
        let boundaries = problem
            .choose(stages, options.balance_tolerance)
            .map_err(|e| self.cut_error(e, stages, memory_limit))?;
        let stages = boundaries
            .windows(2)
            .enumerate()
            .map(|(index, range)| self.describe_stage(index, range[0]..range[1]))
            .collect();
        Ok(Plan {
            stages,
            graph: self.graph,
        })
    }

    fn cut_error(&self, error: CutError, stages: usize, limit: Option<u64>) -> PlanError {
        let limit = limit.unwrap_or(u64::MAX);
        match error {
            CutError::NodeTooLarge { node, bytes } => PlanError::NodeExceedsMemoryLimit {
                node: self.graph.nodes[node].label.clone(),
                op_type: self.graph.nodes[node].op_type.clone(),
                bytes,
                limit,
            },
            CutError::TooFewStages { needed } => PlanError::MemoryLimitTooSmall {
                stages,
                limit,
                needed,
            },
        }
    }

    /// Tensors crossing the cut before node `cut`, in definition order.
    fn crossing(&self, cut: usize) -> Vec<usize> {
        let n = self.graph.nodes.len();
        self.graph
            .activations
            .iter()
            .enumerate()
            .filter(|(_, a)| {
                let produced_before = match a.origin {
                    Origin::GraphInput => true,
                    Origin::Node(p) => p < cut,
                };
                let needed_from = if a.is_graph_output {
                    Some(n)
                } else {
                    a.last_reader
                };
                produced_before && needed_from.is_some_and(|last| last >= cut)
            })
            .map(|(id, _)| id)
            .collect()
    }

    fn info(&self, id: usize) -> TensorInfo {
        let name = &self.graph.activations[id].name;
        match &self.facts[id] {
            Some(facts) => TensorInfo::new(name, facts),
            // Only tensors nothing needs lack facts, and those never cross a cut.
            None => TensorInfo {
                name: name.clone(),
                dtype: DType::F32,
                shape: Vec::new(),
                bytes: 0,
            },
        }
    }

    fn describe_stage(&self, index: usize, range: Range<usize>) -> StagePlan {
        let n = self.graph.nodes.len();
        let input_ids = if range.start == 0 {
            self.graph.graph_inputs.clone()
        } else {
            self.crossing(range.start)
        };
        let output_ids = if range.end == n {
            self.graph.graph_outputs.clone()
        } else {
            self.crossing(range.end)
        };

        let mut read_here = BTreeSet::new();
        let mut weights = BTreeSet::new();
        for node in &self.graph.nodes[range.clone()] {
            read_here.extend(node.reads.iter().copied());
            weights.extend(node.initializers.iter().copied());
        }
        let produced_here = |id: usize| matches!(self.graph.activations[id].origin, Origin::Node(p) if range.contains(&p));
        let name = |id: usize| self.graph.activations[id].name.clone();

        let passthrough = output_ids
            .iter()
            .filter(|id| input_ids.contains(id))
            .map(|&id| name(id))
            .collect();
        let model_inputs = input_ids
            .iter()
            .filter(|id| read_here.contains(id))
            .map(|&id| name(id))
            .collect();
        let model_outputs = output_ids
            .iter()
            .filter(|&&id| produced_here(id))
            .map(|&id| name(id))
            .collect();

        let param_bytes = weights.iter().map(|&i| self.weight_bytes[i]).sum();
        let cost = self.costs[range.clone()]
            .iter()
            .fold(0u64, |a, &c| a.saturating_add(c));
        let total = self.costs.iter().fold(0u64, |a, &c| a.saturating_add(c));
        let cost_share = if total == 0 {
            range.len() as f64 / n as f64
        } else {
            cost as f64 / total as f64
        };
        let peak_activation_bytes = self.live_bytes[range.clone()]
            .iter()
            .copied()
            .max()
            .unwrap_or(0);
        StagePlan {
            index: StageIndex(u32::try_from(index).unwrap_or(u32::MAX)),
            node_count: range.len(),
            node_range: range,
            param_bytes,
            cost,
            cost_share,
            peak_activation_bytes,
            inputs: input_ids.iter().map(|&id| self.info(id)).collect(),
            outputs: output_ids.iter().map(|&id| self.info(id)).collect(),
            passthrough,
            model_inputs,
            model_outputs,
        }
    }
}
