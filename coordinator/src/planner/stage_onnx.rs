//! Writing one stage as a standalone ONNX model.

use tract_onnx::pb::tensor_shape_proto::{Dimension, dimension};
use tract_onnx::pb::type_proto::{self, Value as TypeValue};
use tract_onnx::pb::{
    GraphProto, ModelProto, StringStringEntryProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

use super::TensorInfo;

/// IR version from which initializers need not be listed among the graph inputs.
const IR_VERSION_WITH_FREE_INITIALIZERS: i64 = 4;

/// Builds the ONNX model of the stage holding nodes `node_range` of `graph` (in topological
/// order) and reading the initializers `initializers` (indices, ascending).
pub(crate) fn stage_model(
    header: &ModelProto,
    graph: &GraphProto,
    stage: u32,
    node_range: std::ops::Range<usize>,
    initializers: &[usize],
    inputs: &[&TensorInfo],
    outputs: &[&TensorInfo],
) -> ModelProto {
    let initializer: Vec<_> = initializers
        .iter()
        .filter_map(|&i| graph.initializer.get(i).cloned())
        .collect();
    let mut input: Vec<ValueInfoProto> = inputs.iter().map(|t| value_info(t)).collect();
    if header.ir_version < IR_VERSION_WITH_FREE_INITIALIZERS {
        // Older IR versions require every initializer to be declared as an input too.
        input.extend(initializers.iter().filter_map(|&i| {
            let tensor = graph.initializer.get(i)?;
            Some(ValueInfoProto {
                name: tensor.name.clone(),
                r#type: Some(tensor_type(
                    tensor.data_type,
                    tensor.dims.iter().map(|&d| u64::try_from(d).unwrap_or(0)),
                )),
                doc_string: String::new(),
            })
        }));
    }
    let stage_graph = GraphProto {
        node: graph
            .node
            .get(node_range)
            .map(<[_]>::to_vec)
            .unwrap_or_default(),
        name: format!("{}_stage{stage}", graph.name),
        initializer,
        input,
        output: outputs.iter().map(|t| value_info(t)).collect(),
        ..GraphProto::default()
    };
    let mut metadata_props = header.metadata_props.clone();
    metadata_props.push(StringStringEntryProto {
        key: "shardseal.stage".into(),
        value: stage.to_string(),
    });
    ModelProto {
        graph: Some(stage_graph),
        metadata_props,
        // Training state belongs to the whole model, not to an inference shard.
        training_info: Vec::new(),
        ..header.clone()
    }
}

fn value_info(tensor: &TensorInfo) -> ValueInfoProto {
    ValueInfoProto {
        name: tensor.name.clone(),
        r#type: Some(tensor_type(
            tensor.dtype.onnx_elem_type(),
            tensor.shape.iter().copied(),
        )),
        doc_string: String::new(),
    }
}

fn tensor_type(elem_type: i32, shape: impl Iterator<Item = u64>) -> TypeProto {
    let dim = shape
        .map(|d| Dimension {
            denotation: String::new(),
            value: Some(dimension::Value::DimValue(
                i64::try_from(d).unwrap_or(i64::MAX),
            )),
        })
        .collect();
    TypeProto {
        denotation: String::new(),
        value: Some(TypeValue::TensorType(type_proto::Tensor {
            elem_type,
            shape: Some(TensorShapeProto { dim }),
        })),
    }
}
