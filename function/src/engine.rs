//! The stage engine: one decrypted ONNX shard, optimised and made runnable by tract.
//!
//! Inputs and outputs are matched by ONNX tensor name, never by position, because a stage
//! receives every tensor live at its cut (see the planner) and takes only those its graph
//! declares.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::bytes::Buf;
use shardseal_keys::PlaintextChunk;
use shardseal_proto::tensor::{DType, HostTensor};
use tract_onnx::pb;
use tract_onnx::prelude::*;

use crate::Error;
use crate::onnx_decode::{Initializer, decode_model};

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
    /// The most requests one run may hold (1: the plan runs one request at a time).
    max_batch: usize,
}

impl std::fmt::Debug for StageEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The graph is the model owner's secret: show only its interface.
        f.debug_struct("StageEngine")
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .field("max_batch", &self.max_batch)
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
        Self::load_batched(onnx, 1)
    }

    /// As [`StageEngine::load`], with runs of up to `max_batch` requests when the graph
    /// allows it (see [`StageEngine::run_batch`]); [`StageEngine::max_batch`] says whether
    /// it did.
    pub fn load_batched(mut onnx: &[u8], max_batch: usize) -> Result<Self, Error> {
        let started = Instant::now();
        let (proto, initializers) =
            decode_model(&mut onnx).map_err(|_| Error::ModelLoad("not an ONNX model".into()))?;
        Ok(Self::from_proto(proto, initializers, started, max_batch)?.0)
    }

    /// Loads a decrypted shard given as its verified chunks, in order, freeing each chunk
    /// (wiped) as soon as the protobuf decoder has read past it, so that the plaintext and
    /// its decoded copy are never both whole in memory; each weight is copied once, from
    /// the chunks into the tensor tract runs with (`onnx_decode`). tract cannot parse a
    /// partial protobuf, so decoding starts only once the whole shard is authenticated.
    ///
    /// With `max_batch` above 1 the engine runs up to that many requests at once if the
    /// shard's graph batches; otherwise it runs them one by one (and says why in the log).
    pub fn load_shard(
        chunks: Vec<PlaintextChunk>,
        max_batch: usize,
    ) -> Result<(Self, LoadTimings), Error> {
        let started = Instant::now();
        let mut plaintext = ConsumedChunks::new(chunks);
        let (proto, initializers) = decode_model(&mut plaintext)
            .map_err(|_| Error::ModelLoad("not an ONNX model".into()))?;
        drop(plaintext);
        Self::from_proto(proto, initializers, started, max_batch)
    }

    /// Builds the engine from a decoded model and its initializers, dropping each large
    /// intermediate as soon as the next form exists: the proto before optimisation, the
    /// inference model inside it.
    fn from_proto(
        proto: pb::ModelProto,
        initializers: Vec<Initializer>,
        started: Instant,
        max_batch: usize,
    ) -> Result<(Self, LoadTimings), Error> {
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| Error::ModelLoad("the ONNX model has no graph".into()))?;
        let initialized: std::collections::HashSet<&str> =
            initializers.iter().map(Initializer::name).collect();
        let inputs = graph
            .input
            .iter()
            .filter(|i| !initialized.contains(i.name.as_str()))
            .map(input_spec)
            .collect::<Result<Vec<_>, _>>()?;
        let outputs: Vec<String> = graph.output.iter().map(|o| o.name.clone()).collect();

        // tract converts every initializer while it still holds the whole proto, which
        // would keep two copies of every weight. They come decoded on their own instead,
        // and tract gets the graph without them: the names it then cannot resolve become
        // sources, turned into constants below.
        let onnx = tract_onnx::onnx();
        let mut weights = HashMap::with_capacity(initializers.len());
        for initializer in initializers {
            let (name, value) = match initializer {
                Initializer::Loaded { name, value } => (name, value),
                Initializer::Proto(tensor) => {
                    let value = tract_onnx::tensor::load_tensor(&*onnx.provider, &tensor, None)
                        .map_err(|e| {
                            Error::ModelLoad(format!("initializer {:?}: {e:#}", tensor.name))
                        })?;
                    (tensor.name, value)
                }
            };
            weights.insert(name, value);
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
        let parsed_at = Instant::now();
        // The batched plan is tried on a copy (the weights are shared, not copied), the
        // model kept to plan the stage unbatched should the graph not batch.
        let batched = batchable(&inputs, max_batch)
            .and_then(|()| plan_batched(model.clone(), &inputs, outputs.len()));
        let (plan, max_batch) = match batched {
            Ok(plan) => (plan, max_batch),
            Err(why) => {
                if max_batch > 1 {
                    tracing::warn!(%why, "the stage runs requests one by one");
                }
                (plan_fixed(model, &inputs)?, 1)
            }
        };
        let mut engine = Self {
            plan,
            inputs,
            outputs,
            max_batch,
        };
        if engine.max_batch > 1
            && let Err(why) = engine.check_batches_rows_apart()
        {
            // The batched plan still runs one request exactly as the graph says.
            tracing::warn!(%why, "the stage runs requests one by one");
            engine.max_batch = 1;
        }
        let timings = LoadTimings {
            load: parsed_at - started,
            optimize: parsed_at.elapsed(),
        };
        Ok((engine, timings))
    }

    /// The most requests [`StageEngine::run_batch`] takes at once (1: batching is off, or
    /// the graph does not batch).
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Runs a batch of two made-up requests and each alone, and compares: a graph that
    /// mixes the rows of a batch (a reduction or a reshape over the leading axis, say)
    /// would pass the shape checks of [`plan_batched`] but not this one.
    fn check_batches_rows_apart(&self) -> Result<(), String> {
        let rows: Vec<Vec<HostTensor>> = (0..2u32)
            .map(|row| {
                self.inputs
                    .iter()
                    .map(|spec| probe_tensor(spec, row))
                    .collect()
            })
            .collect::<Result<_, _>>()?;
        let together = self.run_batch(&rows).map_err(|e| e.to_string())?;
        for (row, batched) in rows.iter().zip(&together) {
            let alone = self.run(row).map_err(|e| e.to_string())?;
            for (a, b) in alone.iter().zip(batched) {
                if a.shape() != b.shape() || !close(a, b) {
                    return Err(format!(
                        "output {:?} of a batch differs from the same request run alone",
                        a.name()
                    ));
                }
            }
        }
        Ok(())
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
            values.push(to_tract(self.input(spec, available)?)?.into_tvalue());
        }
        let results = self.run_plan(values)?;
        results
            .iter()
            .zip(&self.outputs)
            .map(|(value, name)| from_tract(name, value))
            .collect()
    }

    /// Runs the optimised plan on `values`, holding a long time slice while tract runs.
    fn run_plan(&self, values: TVec<TValue>) -> Result<TVec<TValue>, Error> {
        let _slice = crate::sched::LongSlice::hold();
        self.plan
            .run(values)
            .map_err(|e| Error::Inference(format!("{e:#}")))
    }

    /// Checks that `available` holds every tensor the shard declares, of its type and
    /// shape: what [`StageEngine::run`] would refuse, found before a request joins a batch.
    pub fn check_inputs(&self, available: &[HostTensor]) -> Result<(), Error> {
        for spec in &self.inputs {
            self.input(spec, available)?;
        }
        Ok(())
    }

    /// Runs several requests as one: each request's tensors (as for [`StageEngine::run`])
    /// stacked along the leading axis, and each output split back, in request order. A
    /// failure fails the whole batch, so check each request first
    /// ([`StageEngine::check_inputs`]). More than [`StageEngine::max_batch`] requests are
    /// refused.
    pub fn run_batch(&self, requests: &[Vec<HostTensor>]) -> Result<Vec<Vec<HostTensor>>, Error> {
        if requests.len() == 1 {
            return Ok(vec![self.run(&requests[0])?]);
        }
        if requests.is_empty() || requests.len() > self.max_batch {
            return Err(Error::Inference(format!(
                "a batch of {} requests; this stage takes 1 to {}",
                requests.len(),
                self.max_batch
            )));
        }
        let rows = requests.len();
        let mut values = TVec::with_capacity(self.inputs.len());
        for spec in &self.inputs {
            let mut shape = spec.shape.clone();
            shape[0] = rows;
            // SAFETY: every byte is written below before the tensor is read; the element
            // types are plain numbers, valid for any bit pattern.
            #[allow(unsafe_code)]
            let mut stacked = unsafe { Tensor::uninitialized_dt(datum_type(spec.dtype), &shape) }
                .map_err(|e| Error::Inference(format!("{e:#}")))?;
            let bytes = stacked.as_bytes_mut();
            let row_len = bytes.len() / rows;
            for (row, available) in bytes.chunks_exact_mut(row_len).zip(requests) {
                row.copy_from_slice(self.input(spec, available)?.data());
            }
            values.push(stacked.into_tvalue());
        }
        let results = self.run_plan(values)?;
        let mut split: Vec<Vec<HostTensor>> = (0..rows)
            .map(|_| Vec::with_capacity(self.outputs.len()))
            .collect();
        for (value, name) in results.iter().zip(&self.outputs) {
            let whole = from_tract(name, value)?;
            if whole.shape().first() != Some(&rows) {
                return Err(Error::Inference(format!(
                    "output {name:?} of a batch of {rows} has shape {:?}",
                    whole.shape()
                )));
            }
            let mut shape = whole.shape().to_vec();
            shape[0] = 1;
            let row_len = whole.data().len() / rows;
            for (row, outputs) in whole.data().chunks_exact(row_len).zip(&mut split) {
                outputs.push(
                    HostTensor::new(name, whole.dtype(), shape.clone(), row.to_vec())
                        .map_err(|e| Error::Inference(e.to_string()))?,
                );
            }
        }
        Ok(split)
    }

    /// The tensor of `available` that `spec` declares, checked against it.
    fn input<'a>(
        &self,
        spec: &InputSpec,
        available: &'a [HostTensor],
    ) -> Result<&'a HostTensor, Error> {
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
        Ok(tensor)
    }
}

/// Whether requests of these inputs can be stacked: each input has a leading axis of 1.
fn batchable(inputs: &[InputSpec], max_batch: usize) -> Result<(), String> {
    if max_batch <= 1 {
        return Err("batching is off".into());
    }
    match inputs.iter().find(|spec| spec.shape.first() != Some(&1)) {
        Some(spec) => Err(format!(
            "input {:?} has shape {:?}, not a leading axis of 1 to batch along",
            spec.name, spec.shape
        )),
        None => Ok(()),
    }
}

/// Plans the model for the fixed input shapes.
fn plan_fixed(
    mut model: InferenceModel,
    inputs: &[InputSpec],
) -> Result<Arc<TypedRunnableModel>, Error> {
    for (ix, spec) in inputs.iter().enumerate() {
        model
            .set_input_fact(
                ix,
                InferenceFact::dt_shape(datum_type(spec.dtype), &spec.shape),
            )
            .map_err(|e| Error::ModelLoad(format!("{e:#}")))?;
    }
    // Each step consumes the previous model, so its weights are freed as soon as the next
    // form no longer shares them.
    model
        .into_optimized()
        .and_then(|m| m.into_runnable())
        .map_err(|e| Error::ModelLoad(format!("{e:#}")))
}

/// Plans the model with a symbolic leading axis on every input: one plan that runs any
/// number of stacked requests. Refused (with the reason) unless every output keeps that
/// axis, alone, in front.
fn plan_batched(
    mut model: InferenceModel,
    inputs: &[InputSpec],
    output_count: usize,
) -> Result<Arc<TypedRunnableModel>, String> {
    let rows = model.symbols.sym("batch").to_dim();
    for (ix, spec) in inputs.iter().enumerate() {
        let mut shape: TVec<TDim> = spec.shape.iter().map(|&d| d.to_dim()).collect();
        shape[0] = rows.clone();
        model
            .set_input_fact(ix, InferenceFact::dt_shape(datum_type(spec.dtype), shape))
            .map_err(|e| format!("{e:#}"))?;
    }
    let optimized = model.into_optimized().map_err(|e| format!("{e:#}"))?;
    for ix in 0..output_count {
        let fact = optimized.output_fact(ix).map_err(|e| format!("{e:#}"))?;
        let dims = fact.shape.dims();
        let leading = dims.first() == Some(&rows);
        let rest_fixed = dims.iter().skip(1).all(|d| d.to_i64().is_ok());
        if !(leading && rest_fixed) {
            return Err(format!(
                "output {ix} has shape {:?} for a batch, not the batch axis in front",
                fact.shape
            ));
        }
    }
    optimized.into_runnable().map_err(|e| format!("{e:#}"))
}

/// A made-up request tensor for [`StageEngine::check_batches_rows_apart`]: floats spread
/// over [-1, 1), differing between rows; integers zero (any other value might be out of
/// range for an index input).
fn probe_tensor(spec: &InputSpec, row: u32) -> Result<HostTensor, String> {
    let count: usize = spec.shape.iter().product();
    let mut state = 0x9e37_79b9_u32 ^ row.wrapping_mul(0x85eb_ca6b);
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (state >> 8) as f32 / (1u32 << 23) as f32 - 1.0
    };
    let data: Vec<u8> = match spec.dtype {
        DType::F32 => (0..count).flat_map(|_| next().to_le_bytes()).collect(),
        DType::F64 => (0..count)
            .flat_map(|_| f64::from(next()).to_le_bytes())
            .collect(),
        DType::I64 | DType::I32 | DType::U8 => vec![0; count * spec.dtype.size()],
    };
    HostTensor::new(&spec.name, spec.dtype, spec.shape.clone(), data).map_err(|e| e.to_string())
}

/// Whether two outputs agree up to the rounding a batched kernel may order differently.
fn close(a: &HostTensor, b: &HostTensor) -> bool {
    let (x, y) = (a.to_f64_lossy(), b.to_f64_lossy());
    a.dtype() == b.dtype()
        && x.len() == y.len()
        && x.iter()
            .zip(&y)
            .all(|(p, q)| (p - q).abs() <= 1e-4 * (1.0 + p.abs().max(q.abs())))
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
