//! Types and static shapes of every tensor, inferred by tract from the graph inputs' shapes
//! (the declared ones, or the caller's overrides for dynamic dimensions).

use std::collections::BTreeMap;

use tract_onnx::pb::tensor_shape_proto::dimension::Value as DimValue;
use tract_onnx::pb::type_proto::Value as TypeValue;
use tract_onnx::pb::{GraphProto, TensorProto, ValueInfoProto};
use tract_onnx::prelude::{DatumType, InferenceFact, InferenceModelExt};
use tract_onnx::tract_hir::infer::Factoid;

use super::onnx_graph::OnnxGraph;
use super::{DType, PlanError};

/// The largest tensor the planner accepts: anything bigger is a corrupt or hostile shape, and
/// no serverless function holds it anyway.
pub(crate) const MAX_TENSOR_BYTES: u64 = 1 << 40;

/// A tensor's element type, static shape and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TensorFacts {
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub bytes: u64,
}

impl TensorFacts {
    pub(crate) fn new(name: &str, dtype: DType, shape: Vec<u64>) -> Result<Self, PlanError> {
        let bytes = shape
            .iter()
            .try_fold(dtype.size_bytes(), |acc, &d| acc.checked_mul(d))
            .filter(|&b| b <= MAX_TENSOR_BYTES)
            .ok_or_else(|| PlanError::TensorTooLarge {
                tensor: name.to_owned(),
                shape: shape.clone(),
            })?;
        Ok(Self {
            dtype,
            shape,
            bytes,
        })
    }
}

/// The bytes an initializer's values take once loaded: from its type and dims, so it does not
/// matter which of the ONNX encodings the file used.
pub(crate) fn initializer_bytes(tensor: &TensorProto) -> Result<u64, PlanError> {
    let shape: Vec<u64> = tensor
        .dims
        .iter()
        .map(|&d| u64::try_from(d).unwrap_or(u64::MAX))
        .collect();
    match DType::from_onnx(tensor.data_type) {
        Some(dtype) => Ok(TensorFacts::new(&tensor.name, dtype, shape)?.bytes),
        // Strings and exotic types have no fixed size: their encoded size is the best guess.
        None => Ok(prost::Message::encoded_len(tensor) as u64),
    }
}

/// Infers every activation's facts. `None` for a tensor nothing reads and no graph output
/// names (an unused optional output), where tract may legitimately not know the shape.
pub(crate) fn infer_facts(
    graph: &mut OnnxGraph,
    input_shapes: &BTreeMap<String, Vec<usize>>,
) -> Result<Vec<Option<TensorFacts>>, PlanError> {
    let inputs = graph_input_facts(graph, input_shapes)?;
    let onnx = tract_onnx::onnx().with_ignore_value_info(true);
    check_ops_supported(&graph.graph, &onnx)?;

    let parsed = graph
        .with_sorted_model(|model| onnx.parse(model, None))
        .map_err(|e| PlanError::ShapeInference {
            reason: format!("{e:#}"),
        })?;
    let mut model = parsed.model;
    for (&id, facts) in graph.graph_inputs.iter().zip(&inputs) {
        let name = &graph.activations[id].name;
        let outlet =
            parsed
                .outlets_by_name
                .get(name)
                .copied()
                .ok_or_else(|| PlanError::ShapeInference {
                    reason: format!("tract lost graph input {name:?}"),
                })?;
        let shape: Vec<usize> = facts.shape.iter().map(|&d| d as usize).collect();
        model
            .set_outlet_fact(
                outlet,
                InferenceFact::dt_shape(facts.dtype.datum_type(), shape),
            )
            .map_err(|e| PlanError::ShapeInference {
                reason: format!("{e:#}"),
            })?;
    }
    model
        .analyse(false)
        .map_err(|e| PlanError::ShapeInference {
            reason: format!("{e:#}"),
        })?;

    let mut all = Vec::with_capacity(graph.activations.len());
    for (id, activation) in graph.activations.iter().enumerate() {
        if let Some(position) = graph.graph_inputs.iter().position(|&input| input == id) {
            all.push(Some(inputs[position].clone()));
            continue;
        }
        let needed = activation.last_reader.is_some() || activation.is_graph_output;
        let fact = parsed
            .outlets_by_name
            .get(&activation.name)
            .and_then(|&outlet| model.outlet_fact(outlet).ok());
        let unresolved = |fact: String| PlanError::UnresolvedShape {
            tensor: activation.name.clone(),
            fact,
        };
        let Some(fact) = fact else {
            if needed {
                return Err(unresolved("nothing".into()));
            }
            all.push(None);
            continue;
        };
        let datum_type = fact.datum_type.concretize();
        let shape = fact.shape.as_concrete_finite().ok().flatten();
        match (datum_type, shape) {
            (Some(datum_type), Some(shape)) => {
                let dtype = DType::from_datum_type(datum_type).ok_or_else(|| {
                    PlanError::UnsupportedDtype {
                        tensor: activation.name.clone(),
                        dtype: format!("{datum_type:?}"),
                    }
                })?;
                let shape = shape.iter().map(|&d| d as u64).collect();
                all.push(Some(TensorFacts::new(&activation.name, dtype, shape)?));
            }
            _ if needed => return Err(unresolved(fact.format_dt_shape())),
            _ => all.push(None),
        }
    }
    Ok(all)
}

/// The graph inputs' types and static shapes, from the model and the overrides.
fn graph_input_facts(
    graph: &OnnxGraph,
    overrides: &BTreeMap<String, Vec<usize>>,
) -> Result<Vec<TensorFacts>, PlanError> {
    let input_names: Vec<String> = graph
        .graph_inputs
        .iter()
        .map(|&id| graph.activations[id].name.clone())
        .collect();
    if let Some(unknown) = overrides.keys().find(|name| !input_names.contains(name)) {
        return Err(PlanError::UnknownInput {
            name: unknown.clone(),
            inputs: input_names,
        });
    }
    let mut facts = Vec::with_capacity(input_names.len());
    for name in &input_names {
        let Some(info) = graph.graph.input.iter().find(|i| &i.name == name) else {
            return Err(PlanError::InvalidGraph {
                reason: format!("graph input {name:?} vanished"),
            });
        };
        let (elem_type, declared) = declared_type(info);
        let elem_type = elem_type.ok_or_else(|| PlanError::InvalidGraph {
            reason: format!("graph input {name:?} has no tensor type"),
        })?;
        let dtype = DType::from_onnx(elem_type).ok_or_else(|| PlanError::UnsupportedDtype {
            tensor: name.clone(),
            dtype: format!("ONNX element type {elem_type}"),
        })?;
        let shape = match (overrides.get(name), &declared) {
            (Some(given), Some(dims)) => {
                let agrees = given.len() == dims.len()
                    && dims.iter().zip(given).all(|(dim, &g)| match dim {
                        DeclaredDim::Static(d) => *d == g as u64,
                        DeclaredDim::Dynamic(_) => true,
                    });
                if !agrees {
                    return Err(PlanError::InputShapeMismatch {
                        input: name.clone(),
                        declared: format_declared(&declared),
                        given: given.clone(),
                    });
                }
                given.iter().map(|&d| d as u64).collect()
            }
            (Some(given), None) => given.iter().map(|&d| d as u64).collect(),
            (None, Some(dims)) => {
                let statics: Option<Vec<u64>> = dims
                    .iter()
                    .map(|dim| match dim {
                        DeclaredDim::Static(d) => Some(*d),
                        DeclaredDim::Dynamic(_) => None,
                    })
                    .collect();
                statics.ok_or_else(|| PlanError::DynamicInputShape {
                    input: name.clone(),
                    shape: format_declared(&declared),
                })?
            }
            (None, None) => {
                return Err(PlanError::DynamicInputShape {
                    input: name.clone(),
                    shape: format_declared(&declared),
                });
            }
        };
        facts.push(TensorFacts::new(name, dtype, shape)?);
    }
    Ok(facts)
}

enum DeclaredDim {
    Static(u64),
    /// The symbol, or `?` when the dimension is simply unknown.
    Dynamic(String),
}

fn declared_type(info: &ValueInfoProto) -> (Option<i32>, Option<Vec<DeclaredDim>>) {
    let Some(TypeValue::TensorType(tensor)) = info.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return (None, None);
    };
    let dims = tensor.shape.as_ref().map(|shape| {
        shape
            .dim
            .iter()
            .map(|dim| match &dim.value {
                Some(DimValue::DimValue(v)) if *v >= 0 => DeclaredDim::Static(*v as u64),
                Some(DimValue::DimParam(p)) if !p.is_empty() => DeclaredDim::Dynamic(p.clone()),
                _ => DeclaredDim::Dynamic("?".into()),
            })
            .collect()
    });
    (Some(tensor.elem_type), dims)
}

fn format_declared(dims: &Option<Vec<DeclaredDim>>) -> String {
    match dims {
        None => "of unknown rank".into(),
        Some(dims) => {
            let dims: Vec<String> = dims
                .iter()
                .map(|dim| match dim {
                    DeclaredDim::Static(d) => d.to_string(),
                    DeclaredDim::Dynamic(s) => s.clone(),
                })
                .collect();
            format!("[{}]", dims.join(","))
        }
    }
}

/// Fails on the first node (subgraph bodies included) whose operator tract does not know:
/// tract would otherwise parse it as a placeholder and fail later with a vaguer message.
fn check_ops_supported(graph: &GraphProto, onnx: &tract_onnx::Onnx) -> Result<(), PlanError> {
    for (position, node) in graph.node.iter().enumerate() {
        if !onnx.op_register.0.contains_key(&node.op_type) {
            let node_name = if !node.name.is_empty() {
                node.name.clone()
            } else if let Some(output) = node.output.iter().find(|o| !o.is_empty()) {
                output.clone()
            } else {
                format!("#{position} {}", node.op_type)
            };
            return Err(PlanError::UnsupportedOp {
                node: node_name,
                op_type: node.op_type.clone(),
            });
        }
        for attribute in &node.attribute {
            for body in attribute.g.iter().chain(attribute.graphs.iter()) {
                check_ops_supported(body, onnx)?;
            }
        }
    }
    Ok(())
}

impl DType {
    /// The tract element type for this type.
    pub(crate) fn datum_type(self) -> DatumType {
        match self {
            DType::Bool => DatumType::Bool,
            DType::U8 => DatumType::U8,
            DType::U16 => DatumType::U16,
            DType::U32 => DatumType::U32,
            DType::U64 => DatumType::U64,
            DType::I8 => DatumType::I8,
            DType::I16 => DatumType::I16,
            DType::I32 => DatumType::I32,
            DType::I64 => DatumType::I64,
            DType::F16 => DatumType::F16,
            DType::F32 => DatumType::F32,
            DType::F64 => DatumType::F64,
        }
    }

    /// The type tract inferred, if it can cross a stage boundary. tract computes shapes as
    /// symbolic dimensions (`TDim`); once concrete they travel as ONNX int64.
    pub(crate) fn from_datum_type(datum_type: DatumType) -> Option<Self> {
        Some(match datum_type {
            DatumType::Bool => DType::Bool,
            DatumType::U8 => DType::U8,
            DatumType::U16 => DType::U16,
            DatumType::U32 => DType::U32,
            DatumType::U64 => DType::U64,
            DatumType::I8 => DType::I8,
            DatumType::I16 => DType::I16,
            DatumType::I32 => DType::I32,
            DatumType::I64 | DatumType::TDim => DType::I64,
            DatumType::F16 => DType::F16,
            DatumType::F32 => DType::F32,
            DatumType::F64 => DType::F64,
            _ => return None,
        })
    }
}
