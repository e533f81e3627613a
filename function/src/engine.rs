//! The stage engine: one decrypted ONNX shard, optimised and made runnable by tract.
//!
//! Inputs and outputs are matched by ONNX tensor name, never by position, because a stage
//! receives every tensor live at its cut (see the planner) and takes only those its graph
//! declares.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use prost::bytes::Buf;
use shardseal_keys::PlaintextChunk;
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

/// How long [`StageEngine::load_shard`] spent in each phase.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadTimings {
    /// Protobuf decoding and tract's parse into an inference model.
    pub load: Duration,
    /// Type analysis, optimisation and planning into a runnable model.
    pub optimize: Duration,
}

impl StageEngine {
    /// Parses, optimises and plans an ONNX model whose inputs have fixed shapes.
    pub fn load(onnx: &[u8]) -> Result<Self, Error> {
        let proto = pb::ModelProto::decode(onnx)
            .map_err(|_| Error::ModelLoad("not an ONNX model".into()))?;
        Ok(Self::from_proto(proto, Instant::now())?.0)
    }

    /// Loads a decrypted shard given as its verified chunks, in order, freeing each chunk
    /// (wiped) as soon as the protobuf decoder has read past it, so that the plaintext and
    /// its decoded copy are never both whole in memory. tract cannot parse a partial
    /// protobuf, so decoding starts only once the whole shard is authenticated.
    pub fn load_shard(chunks: Vec<PlaintextChunk>) -> Result<(Self, LoadTimings), Error> {
        let started = Instant::now();
        let mut plaintext = ConsumedChunks::new(chunks);
        let proto = pb::ModelProto::decode(&mut plaintext)
            .map_err(|_| Error::ModelLoad("not an ONNX model".into()))?;
        drop(plaintext);
        Self::from_proto(proto, started)
    }

    /// Builds the engine from a decoded model, dropping each large intermediate as soon as
    /// the next form exists: the proto's weights one by one while they become tract
    /// tensors, the proto before optimisation, the inference model inside it.
    fn from_proto(
        mut proto: pb::ModelProto,
        started: Instant,
    ) -> Result<(Self, LoadTimings), Error> {
        let graph = proto
            .graph
            .as_mut()
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

        // tract converts every initializer while it still holds the whole proto, which
        // would keep two copies of every weight. Convert them here instead, freeing each
        // proto tensor right after its conversion, and hand tract the graph without them:
        // the names it then cannot resolve become sources, turned into constants below.
        let onnx = tract_onnx::onnx();
        let mut weights = HashMap::with_capacity(graph.initializer.len());
        for tensor in std::mem::take(&mut graph.initializer) {
            let value = tract_onnx::tensor::load_tensor(&*onnx.provider, &tensor, None)
                .map_err(|e| Error::ModelLoad(format!("initializer {:?}: {e:#}", tensor.name)))?;
            weights.insert(tensor.name, value);
        }
        let parsed = onnx
            .parse(&proto, None)
            .map_err(|e| Error::ModelLoad(format!("{e:#}")))?;
        drop(proto);
        let mut model = parsed.model;
        if let Some(missing) = parsed
            .unresolved_inputs
            .iter()
            .find(|name| !weights.contains_key(name.as_str()))
        {
            return Err(Error::ModelLoad(format!(
                "the graph uses {missing:?}, which nothing defines"
            )));
        }
        let mut constant_nodes = std::collections::HashSet::new();
        for (name, value) in weights {
            // An initializer no node reads has no outlet; tract would keep it as a dead
            // constant that optimisation removes anyway.
            let Some(outlet) = parsed.outlets_by_name.get(&name) else {
                continue;
            };
            if !model.inputs.contains(outlet) {
                return Err(Error::ModelLoad(format!(
                    "{name:?} is both an initializer and a node's output"
                )));
            }
            let value = Arc::new(value);
            let fact = TypedFact::try_from(value.clone())
                .map_err(|e| Error::ModelLoad(format!("initializer {name:?}: {e:#}")))?;
            let node = &mut model.nodes[outlet.node];
            node.op = Box::new(
                tract_onnx::tract_core::ops::konst::Const::new(value)
                    .map_err(|e| Error::ModelLoad(format!("initializer {name:?}: {e:#}")))?,
            );
            node.outputs[0].fact = fact.into();
            constant_nodes.insert(outlet.node);
        }
        model.inputs.retain(|o| !constant_nodes.contains(&o.node));
        if model.inputs.len() != inputs.len() {
            return Err(Error::ModelLoad(format!(
                "the graph declares {} inputs, tract found {}",
                inputs.len(),
                model.inputs.len()
            )));
        }
        for (ix, spec) in inputs.iter().enumerate() {
            model
                .set_input_fact(
                    ix,
                    InferenceFact::dt_shape(datum_type(spec.dtype), &spec.shape),
                )
                .map_err(|e| Error::ModelLoad(format!("{e:#}")))?;
        }
        let parsed_at = Instant::now();
        // Each step consumes the previous model, so its weights are freed as soon as the
        // next form no longer shares them.
        let plan = model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| Error::ModelLoad(format!("{e:#}")))?;
        let timings = LoadTimings {
            load: parsed_at - started,
            optimize: parsed_at.elapsed(),
        };
        Ok((
            Self {
                plan,
                inputs,
                outputs,
            },
            timings,
        ))
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

/// A decrypted shard as a protobuf input that gives each chunk back (wiped on drop) once
/// the decoder has read past it.
struct ConsumedChunks {
    chunks: VecDeque<PlaintextChunk>,
    /// How far into the front chunk the decoder is.
    offset: usize,
    remaining: usize,
}

impl ConsumedChunks {
    fn new(chunks: Vec<PlaintextChunk>) -> Self {
        // `Buf::chunk` may be empty only at the end: leave out empty chunks (an empty
        // shard's one chunk).
        let chunks: VecDeque<_> = chunks
            .into_iter()
            .filter(|c| !c.expose_secret().is_empty())
            .collect();
        let remaining = chunks.iter().map(|c| c.expose_secret().len()).sum();
        Self {
            chunks,
            offset: 0,
            remaining,
        }
    }
}

impl Buf for ConsumedChunks {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        match self.chunks.front() {
            Some(front) => &front.expose_secret()[self.offset..],
            None => &[],
        }
    }

    fn advance(&mut self, count: usize) {
        // Advancing past the end breaks the `Buf` contract; stop at the end instead.
        let mut count = count.min(self.remaining);
        while count > 0 {
            let Some(front) = self.chunks.front() else {
                return;
            };
            let left = front.expose_secret().len() - self.offset;
            if count < left {
                self.offset += count;
                self.remaining -= count;
                return;
            }
            count -= left;
            self.remaining -= left;
            self.offset = 0;
            // A plaintext chunk wipes itself on drop; the allocator need not wipe it again.
            crate::WipeOnFree::free_unwiped(self.chunks.pop_front());
        }
    }
}
