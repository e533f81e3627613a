//! The stage engine: one decrypted ONNX shard, optimised and made runnable by tract.
//!
//! Inputs and outputs are matched by ONNX tensor name, never by position, because a stage
//! receives every tensor live at its cut (see the planner) and takes only those its graph
//! declares.

use std::sync::Arc;

use prost::Message;
use shardseal_proto::tensor::{DType, HostTensor};
use tract_onnx::pb;
use tract_onnx::prelude::*;

use crate::Error;

/// A declared model input: name, element type and fixed shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputSpec {
    /// The ONNX tensor name.
    pub name: String,
    /// Its element type.
    pub dtype: DType,
    /// Its fixed shape.
    pub shape: Vec<usize>,
}

/// A shard loaded into tract, ready to run.
pub struct StageEngine {
    plan: Arc<TypedRunnableModel>,
    inputs: Vec<InputSpec>,
    outputs: Vec<String>,
}

impl std::fmt::Debug for StageEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The graph is the model owner's secret: show only its interface.
        f.debug_struct("StageEngine")
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish_non_exhaustive()
    }
}

impl StageEngine {
    /// Parses, optimises and plans an ONNX model whose inputs have fixed shapes.
    pub fn load(onnx: &[u8]) -> Result<Self, Error> {
        let proto = pb::ModelProto::decode(onnx)
            .map_err(|_| Error::ModelLoad("not an ONNX model".into()))?;
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| Error::ModelLoad("the ONNX model has no graph".into()))?;
        let initializers: std::collections::HashSet<&str> =
            graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let inputs = graph
            .input
            .iter()
            .filter(|i| !initializers.contains(i.name.as_str()))
            .map(input_spec)
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = graph.output.iter().map(|o| o.name.clone()).collect();

        let mut model = tract_onnx::onnx()
            .model_for_proto_model(&proto)
            .map_err(|e| Error::ModelLoad(format!("{e:#}")))?;
        for (ix, spec) in inputs.iter().enumerate() {
            model
                .set_input_fact(
                    ix,
                    InferenceFact::dt_shape(datum_type(spec.dtype), &spec.shape),
                )
                .map_err(|e| Error::ModelLoad(format!("{e:#}")))?;
        }
        let plan = model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| Error::ModelLoad(format!("{e:#}")))?;
        Ok(Self {
            plan,
            inputs,
            outputs,
        })
    }

    /// The inputs the shard's graph declares, in graph order.
    pub fn inputs(&self) -> &[InputSpec] {
        &self.inputs
    }

    /// The names of the graph's outputs, in graph order.
    pub fn outputs(&self) -> &[String] {
        &self.outputs
    }

    /// Runs the shard on the tensors it declares, picked by name from `available`.
    pub fn run(&self, available: &[HostTensor]) -> Result<Vec<HostTensor>, Error> {
        let mut values = TVec::with_capacity(self.inputs.len());
        for spec in &self.inputs {
            let tensor = available
                .iter()
                .find(|t| t.name() == spec.name)
                .ok_or_else(|| Error::MissingInput(spec.name.clone()))?;
            if tensor.dtype() != spec.dtype || tensor.shape() != spec.shape.as_slice() {
                return Err(Error::InputMismatch {
                    name: spec.name.clone(),
                    expected: format!("{} {:?}", spec.dtype, spec.shape),
                    actual: format!("{} {:?}", tensor.dtype(), tensor.shape()),
                });
            }
            values.push(to_tract(tensor)?.into_tvalue());
        }
        let results = self
            .plan
            .run(values)
            .map_err(|e| Error::Inference(format!("{e:#}")))?;
        results
            .iter()
            .zip(&self.outputs)
            .map(|(value, name)| from_tract(name, value))
            .collect()
    }
}

fn input_spec(info: &pb::ValueInfoProto) -> Result<InputSpec, Error> {
    let bad = |why: &str| Error::ModelLoad(format!("input {:?}: {why}", info.name));
    let Some(pb::type_proto::Value::TensorType(tensor)) =
        info.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Err(bad("not a tensor"));
    };
    let dtype = match pb::tensor_proto::DataType::try_from(tensor.elem_type) {
        Ok(pb::tensor_proto::DataType::Float) => DType::F32,
        Ok(pb::tensor_proto::DataType::Double) => DType::F64,
        Ok(pb::tensor_proto::DataType::Int64) => DType::I64,
        Ok(pb::tensor_proto::DataType::Int32) => DType::I32,
        Ok(pb::tensor_proto::DataType::Uint8) => DType::U8,
        _ => return Err(bad("element type is not one of f32, f64, i64, i32, u8")),
    };
    let dims = tensor
        .shape
        .as_ref()
        .map(|s| s.dim.as_slice())
        .unwrap_or_default();
    let shape = dims
        .iter()
        .map(|d| match d.value {
            Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) if v >= 0 => Ok(v as usize),
            _ => Err(bad("dynamic dimension; give the stage fixed shapes")),
        })
        .collect::<Result<_, _>>()?;
    Ok(InputSpec {
        name: info.name.clone(),
        dtype,
        shape,
    })
}

fn datum_type(dtype: DType) -> DatumType {
    match dtype {
        DType::F32 => f32::datum_type(),
        DType::F64 => f64::datum_type(),
        DType::I64 => i64::datum_type(),
        DType::I32 => i32::datum_type(),
        DType::U8 => u8::datum_type(),
    }
}

fn to_tract(t: &HostTensor) -> Result<Tensor, Error> {
    // SAFETY: `from_raw_dt` is unsafe because arbitrary bytes are not valid values of every
    // datum type (strings, blobs). The five types mapped by `datum_type` are plain numbers
    // for which every bit pattern is valid, and `HostTensor` guarantees the byte length
    // matches the shape.
    #[allow(unsafe_code)]
    let tensor = unsafe { Tensor::from_raw_dt(datum_type(t.dtype()), t.shape(), t.data()) };
    tensor.map_err(|e| Error::Inference(format!("{e:#}")))
}

fn from_tract(name: &str, value: &TValue) -> Result<HostTensor, Error> {
    let dt = value.datum_type();
    let dtype = DType::ALL
        .into_iter()
        .find(|d| datum_type(*d) == dt)
        .ok_or_else(|| Error::Inference(format!("output {name:?} has unsupported type {dt:?}")))?;
    HostTensor::new(
        name,
        dtype,
        value.shape().to_vec(),
        value.as_bytes().to_vec(),
    )
    .map_err(|e| Error::Inference(e.to_string()))
}
