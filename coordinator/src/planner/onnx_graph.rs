//! Reading an ONNX model into the planner's view of it: decoded with prost, checked for the
//! structural rules cutting relies on (every tensor defined once, every read defined), and
//! its nodes put in topological order.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};

use prost::Message;
use tract_onnx::pb::{GraphProto, ModelProto, NodeProto};

use super::PlanError;

/// Top-level field numbers and wire types of `onnx.ModelProto`, used to tell a truncated model
/// from bytes that are not a model at all.
const MODEL_PROTO_FIELDS: &[(u64, u64)] = &[
    (1, 0),  // ir_version
    (2, 2),  // producer_name
    (3, 2),  // producer_version
    (4, 2),  // domain
    (5, 0),  // model_version
    (6, 2),  // doc_string
    (7, 2),  // graph
    (8, 2),  // opset_import
    (14, 2), // metadata_props
    (20, 2), // training_info
    (25, 2), // functions
];

/// Decodes ONNX bytes, telling apart bytes that are not a model and a model cut short.
pub(crate) fn decode_model(bytes: &[u8]) -> Result<ModelProto, PlanError> {
    let model = match ModelProto::decode(bytes) {
        Ok(model) => model,
        Err(decode_error) => {
            return Err(match top_level_truncation(bytes) {
                Some((needed, available)) => PlanError::TruncatedOnnx { needed, available },
                None => PlanError::NotOnnx {
                    reason: decode_error.to_string(),
                },
            });
        }
    };
    if model.graph.is_none() {
        return Err(PlanError::NotOnnx {
            reason: "no graph in the model".into(),
        });
    }
    if model.ir_version <= 0 {
        return Err(PlanError::NotOnnx {
            reason: "no ir_version in the model".into(),
        });
    }
    if model.opset_import.is_empty() {
        // Serialised models put the opset list right after the graph, so a model cut exactly
        // at that field boundary decodes but lacks it.
        return Err(PlanError::NotOnnx {
            reason: "no opset_import in the model (truncated?)".into(),
        });
    }
    Ok(model)
}

/// Walks the top-level protobuf fields. If every field so far is a well-formed `ModelProto`
/// field and the last one runs past the end of the input, returns (bytes needed, bytes
/// available). Anything else (an unknown field, a bad wire type) means "not ONNX".
fn top_level_truncation(bytes: &[u8]) -> Option<(u64, u64)> {
    let mut rest = bytes;
    while !rest.is_empty() {
        let key = match read_varint(&mut rest) {
            Varint::Value(key) => key,
            Varint::Truncated => return Some((1, 0)),
            Varint::Malformed => return None,
        };
        let (field, wire_type) = (key >> 3, key & 7);
        if !MODEL_PROTO_FIELDS.contains(&(field, wire_type)) {
            return None;
        }
        if wire_type == 0 {
            match read_varint(&mut rest) {
                Varint::Value(_) => {}
                Varint::Truncated => return Some((1, 0)),
                Varint::Malformed => return None,
            }
        } else {
            let len = match read_varint(&mut rest) {
                Varint::Value(len) => len,
                Varint::Truncated => return Some((1, 0)),
                Varint::Malformed => return None,
            };
            let available = rest.len() as u64;
            if len > available {
                return Some((len, available));
            }
            // `len <= rest.len()`, so it fits a usize.
            rest = &rest[len as usize..];
        }
    }
    None
}

enum Varint {
    Value(u64),
    Truncated,
    Malformed,
}

fn read_varint(rest: &mut &[u8]) -> Varint {
    let mut value = 0u64;
    for (i, byte) in rest.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *rest = &rest[i + 1..];
            return Varint::Value(value);
        }
    }
    if rest.len() < 10 {
        Varint::Truncated
    } else {
        Varint::Malformed
    }
}

/// Where an activation tensor comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A graph input (not an initializer), available before the first node.
    GraphInput,
    /// The output of the node at this topological position.
    Node(usize),
}

/// A tensor computed or fed at run time (initializers are weights, kept apart).
#[derive(Debug, Clone)]
pub(crate) struct Activation {
    pub name: String,
    pub origin: Origin,
    /// Topological position of the last node reading it, if any node does.
    pub last_reader: Option<usize>,
    pub is_graph_output: bool,
}

/// One node, as the planner sees it.
#[derive(Debug, Clone)]
pub(crate) struct NodeRecord {
    /// The node's name, or its first output, or its position and operator: what errors show.
    pub label: String,
    pub op_type: String,
    /// Activations read, deduplicated; includes names a subgraph body reads from this scope.
    pub reads: Vec<usize>,
    /// Initializers read (indices into the graph's initializer list), deduplicated.
    pub initializers: Vec<usize>,
}

/// A model whose graph is in topological order, with its activations indexed.
///
/// Activation ids are in definition order: graph inputs first (graph order), then node
/// outputs by node position and output slot. Sorting by id therefore gives the order a
/// reader of the graph would expect.
#[derive(Debug)]
pub(crate) struct OnnxGraph {
    /// The model's header fields (IR version, opsets, producer); its `graph` is `None`.
    pub header: ModelProto,
    /// The graph, nodes in topological order.
    pub graph: GraphProto,
    pub nodes: Vec<NodeRecord>,
    pub activations: Vec<Activation>,
    pub graph_inputs: Vec<usize>,
    pub graph_outputs: Vec<usize>,
}

impl OnnxGraph {
    /// Checks the structure and orders the nodes topologically (keeping the file's order when
    /// it already is one, so plans are stable).
    pub(crate) fn new(mut header: ModelProto) -> Result<Self, PlanError> {
        let Some(mut graph) = header.graph.take() else {
            return Err(PlanError::NotOnnx {
                reason: "no graph in the model".into(),
            });
        };
        if graph.node.is_empty() {
            return Err(PlanError::EmptyGraph);
        }
        if !graph.sparse_initializer.is_empty() {
            return Err(invalid("sparse initializers are not supported"));
        }

        let mut initializer_ids = HashMap::new();
        for (index, tensor) in graph.initializer.iter().enumerate() {
            // ONNX's DataLocation::EXTERNAL is 1.
            if tensor.data_location == Some(1) || !tensor.external_data.is_empty() {
                return Err(PlanError::ExternalData {
                    tensor: tensor.name.clone(),
                });
            }
            if initializer_ids.insert(tensor.name.clone(), index).is_some() {
                return Err(invalid(format!(
                    "initializer {:?} is defined twice",
                    tensor.name
                )));
            }
        }

        let mut defined: HashSet<String> = initializer_ids.keys().cloned().collect();
        let mut graph_input_names = Vec::new();
        for input in &graph.input {
            // Models before IR 4 list every initializer as an input too: those are weights.
            if initializer_ids.contains_key(&input.name) {
                continue;
            }
            if !defined.insert(input.name.clone()) {
                return Err(invalid(format!(
                    "graph input {:?} is declared twice",
                    input.name
                )));
            }
            graph_input_names.push(input.name.clone());
        }

        let labels: Vec<String> = graph.node.iter().enumerate().map(node_label).collect();
        let mut producer_of: HashMap<&str, usize> = HashMap::new();
        for (position, node) in graph.node.iter().enumerate() {
            for output in node.output.iter().filter(|o| !o.is_empty()) {
                if defined.contains(output) || producer_of.insert(output, position).is_some() {
                    return Err(invalid(format!(
                        "tensor {output:?} is defined more than once"
                    )));
                }
            }
        }

        let dependencies: Vec<Vec<String>> = graph.node.iter().map(node_dependencies).collect();
        for (position, deps) in dependencies.iter().enumerate() {
            for name in deps {
                if !defined.contains(name) && !producer_of.contains_key(name.as_str()) {
                    return Err(PlanError::DanglingInput {
                        node: labels[position].clone(),
                        tensor: name.clone(),
                    });
                }
            }
        }

        let order = topological_order(&dependencies, &producer_of, &labels)?;
        drop(producer_of);
        if order
            .iter()
            .enumerate()
            .any(|(position, &original)| position != original)
        {
            let mut slots: Vec<Option<NodeProto>> = std::mem::take(&mut graph.node)
                .into_iter()
                .map(Some)
                .collect();
            graph.node = order
                .iter()
                .filter_map(|&original| slots[original].take())
                .collect();
        }
        let labels: Vec<String> = order
            .iter()
            .map(|&original| labels[original].clone())
            .collect();
        let dependencies: Vec<&Vec<String>> = order
            .iter()
            .map(|&original| &dependencies[original])
            .collect();

        let mut activation_ids: HashMap<String, usize> = HashMap::new();
        let mut activations = Vec::new();
        for name in &graph_input_names {
            activation_ids.insert(name.clone(), activations.len());
            activations.push(Activation {
                name: name.clone(),
                origin: Origin::GraphInput,
                last_reader: None,
                is_graph_output: false,
            });
        }
        for (position, node) in graph.node.iter().enumerate() {
            for output in node.output.iter().filter(|o| !o.is_empty()) {
                activation_ids.insert(output.clone(), activations.len());
                activations.push(Activation {
                    name: output.clone(),
                    origin: Origin::Node(position),
                    last_reader: None,
                    is_graph_output: false,
                });
            }
        }

        let mut nodes = Vec::with_capacity(graph.node.len());
        for (position, node) in graph.node.iter().enumerate() {
            let mut reads = Vec::new();
            let mut initializers = Vec::new();
            for name in dependencies[position] {
                if let Some(&id) = activation_ids.get(name) {
                    if !reads.contains(&id) {
                        reads.push(id);
                    }
                    activations[id].last_reader = Some(position);
                } else if let Some(&index) = initializer_ids.get(name)
                    && !initializers.contains(&index)
                {
                    initializers.push(index);
                }
            }
            nodes.push(NodeRecord {
                label: labels[position].clone(),
                op_type: node.op_type.clone(),
                reads,
                initializers,
            });
        }

        let mut graph_outputs = Vec::new();
        for output in &graph.output {
            let Some(&id) = activation_ids.get(&output.name) else {
                let why = if initializer_ids.contains_key(&output.name) {
                    "is an initializer; the planner needs outputs computed by nodes or fed as inputs"
                } else {
                    "is produced by no node and is no graph input"
                };
                return Err(invalid(format!("graph output {:?} {why}", output.name)));
            };
            if activations[id].is_graph_output {
                return Err(invalid(format!(
                    "graph output {:?} is listed twice",
                    output.name
                )));
            }
            activations[id].is_graph_output = true;
            graph_outputs.push(id);
        }
        if graph_outputs.is_empty() {
            return Err(invalid("the graph has no outputs"));
        }

        let graph_inputs = (0..graph_input_names.len()).collect();
        Ok(Self {
            header,
            graph,
            nodes,
            activations,
            graph_inputs,
            graph_outputs,
        })
    }

    /// Lends the whole model, nodes in topological order (what tract analyses), without
    /// copying the weights.
    pub(crate) fn with_sorted_model<R>(&mut self, f: impl FnOnce(&ModelProto) -> R) -> R {
        let mut model = ModelProto {
            graph: Some(std::mem::take(&mut self.graph)),
            ..self.header.clone()
        };
        let result = f(&model);
        self.graph = model.graph.take().unwrap_or_default();
        result
    }
}

fn invalid(reason: impl Into<String>) -> PlanError {
    PlanError::InvalidGraph {
        reason: reason.into(),
    }
}

fn node_label((position, node): (usize, &NodeProto)) -> String {
    if !node.name.is_empty() {
        node.name.clone()
    } else if let Some(output) = node.output.iter().find(|o| !o.is_empty()) {
        output.clone()
    } else {
        format!("#{position} {}", node.op_type)
    }
}

/// Every tensor a node needs before it can run: its inputs, and the names its subgraph
/// bodies (If, Loop, Scan) read from the enclosing scope, which ONNX leaves implicit.
fn node_dependencies(node: &NodeProto) -> Vec<String> {
    let mut deps: Vec<String> = Vec::new();
    for input in node.input.iter().filter(|i| !i.is_empty()) {
        if !deps.contains(input) {
            deps.push(input.clone());
        }
    }
    let mut outer = BTreeSet::new();
    for attribute in &node.attribute {
        for body in attribute.g.iter().chain(attribute.graphs.iter()) {
            outer_references(body, &mut outer);
        }
    }
    for name in outer {
        if !deps.contains(&name) {
            deps.push(name);
        }
    }
    deps
}

/// Names `graph` reads but does not define itself (they come from an enclosing scope).
fn outer_references(graph: &GraphProto, outer: &mut BTreeSet<String>) {
    let mut defined: HashSet<&str> = HashSet::new();
    defined.extend(graph.input.iter().map(|i| i.name.as_str()));
    defined.extend(graph.initializer.iter().map(|i| i.name.as_str()));
    for node in &graph.node {
        defined.extend(node.output.iter().map(String::as_str));
    }
    for node in &graph.node {
        for input in node.input.iter().filter(|i| !i.is_empty()) {
            if !defined.contains(input.as_str()) {
                outer.insert(input.clone());
            }
        }
        for attribute in &node.attribute {
            for body in attribute.g.iter().chain(attribute.graphs.iter()) {
                let mut inner = BTreeSet::new();
                outer_references(body, &mut inner);
                outer.extend(
                    inner
                        .into_iter()
                        .filter(|name| !defined.contains(name.as_str())),
                );
            }
        }
    }
}

/// Kahn's algorithm, always taking the ready node that comes first in the file, so a graph
/// already in topological order keeps its order. Returns original positions in the new order.
fn topological_order(
    dependencies: &[Vec<String>],
    producer_of: &HashMap<&str, usize>,
    labels: &[String],
) -> Result<Vec<usize>, PlanError> {
    let count = dependencies.len();
    let mut waiting_on = vec![0usize; count];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); count];
    for (position, deps) in dependencies.iter().enumerate() {
        let mut producers: Vec<usize> = deps
            .iter()
            .filter_map(|name| producer_of.get(name.as_str()).copied())
            .collect();
        producers.sort_unstable();
        producers.dedup();
        waiting_on[position] = producers.len();
        for producer in producers {
            dependents[producer].push(position);
        }
    }
    let mut ready: BinaryHeap<Reverse<usize>> = (0..count)
        .filter(|&p| waiting_on[p] == 0)
        .map(Reverse)
        .collect();
    let mut order = Vec::with_capacity(count);
    while let Some(Reverse(position)) = ready.pop() {
        order.push(position);
        for &dependent in &dependents[position] {
            waiting_on[dependent] -= 1;
            if waiting_on[dependent] == 0 {
                ready.push(Reverse(dependent));
            }
        }
    }
    if order.len() < count {
        const SHOWN: usize = 8;
        let nodes = (0..count)
            .filter(|&p| waiting_on[p] > 0)
            .take(SHOWN)
            .map(|p| labels[p].clone())
            .collect();
        return Err(PlanError::Cycle { nodes });
    }
    Ok(order)
}
