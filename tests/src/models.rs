//! Deterministic ONNX test models, built in Rust with `tract_onnx::pb` (no Python, no files),
//! and the helpers that run them with tract: a whole model, or a plan's stages in sequence
//! the way the runtime does (stage ONNX plus passthrough forwarding by name).
//!
//! Every builder takes or fixes a seed, so the same call always yields the same bytes.

use std::collections::HashMap;

use prost::Message;
use tract_onnx::pb::tensor_shape_proto::{Dimension, dimension};
use tract_onnx::pb::type_proto::{self, Value as TypeValue};
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto::AttributeType,
};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::{TractErrorContext, bail, ensure, format_err};

use shardseal_coordinator::Plan;

/// Tensors by name, in a meaningful order (graph inputs or outputs order).
pub type NamedTensors = Vec<(String, Tensor)>;

/// ONNX `TensorProto.DataType` for f32.
const ONNX_FLOAT: i32 = 1;
/// The opset the models are written against (tract is tested on 9 to 18).
const OPSET: i64 = 13;
/// ONNX IR version matching opset 13.
const IR_VERSION: i64 = 7;

/// A small, fast, seeded generator (xorshift64*): deterministic across platforms, no
/// dependency, good enough for weights and inputs.
#[derive(Debug, Clone)]
pub struct Xorshift(u64);

impl Xorshift {
    /// A generator from a seed (any value, 0 included).
    pub fn new(seed: u64) -> Self {
        // splitmix64 scrambles the seed so that nearby seeds give unrelated streams (a
        // plain `seed ^ K | 1` made seeds 2n and 2n+1 identical); xorshift needs a
        // non-zero state.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Self(if z == 0 { 0x9E37_79B9_7F4A_7C15 } else { z })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A uniform f32 in [-1, 1).
    pub fn next_f32(&mut self) -> f32 {
        // 24 random bits: exactly representable.
        ((self.next_u64() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
}

/// Writes a graph node by node, naming nothing twice.
struct GraphWriter {
    rng: Xorshift,
    graph: GraphProto,
}

impl GraphWriter {
    fn new(name: &str, seed: u64) -> Self {
        Self {
            rng: Xorshift::new(seed),
            graph: GraphProto {
                name: name.into(),
                ..Default::default()
            },
        }
    }

    fn input(&mut self, name: &str, dims: &[usize]) -> String {
        self.graph.input.push(value_info(name, dims));
        name.into()
    }

    fn output(&mut self, name: &str, dims: &[usize]) {
        self.graph.output.push(value_info(name, dims));
    }

    /// A random f32 initializer, uniform in ±`scale`.
    fn weight(&mut self, name: &str, dims: &[usize], scale: f32) -> String {
        let count: usize = dims.iter().product();
        let mut raw_data = Vec::with_capacity(count * 4);
        for _ in 0..count {
            raw_data.extend_from_slice(&(self.rng.next_f32() * scale).to_le_bytes());
        }
        self.graph.initializer.push(TensorProto {
            name: name.into(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: ONNX_FLOAT,
            raw_data,
            ..Default::default()
        });
        name.into()
    }

    /// He-style weights for a layer reading `fan_in` values, so activations stay O(1).
    fn layer_weight(&mut self, name: &str, dims: &[usize], fan_in: usize) -> String {
        let scale = (6.0 / fan_in.max(1) as f32).sqrt();
        self.weight(name, dims, scale)
    }

    fn node(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        output: &str,
        attribute: Vec<AttributeProto>,
    ) -> String {
        self.graph.node.push(NodeProto {
            // Node names equal their output's name: ONNX keeps the two namespaces apart, and
            // errors naming a node then point straight at the tensor.
            name: output.into(),
            op_type: op_type.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            attribute,
            ..Default::default()
        });
        output.into()
    }

    fn dense(&mut self, prefix: &str, x: &str, fan_in: usize, fan_out: usize) -> String {
        let w = self.layer_weight(&format!("{prefix}_w"), &[fan_in, fan_out], fan_in);
        let b = self.weight(&format!("{prefix}_b"), &[fan_out], 0.1);
        let product = self.node("MatMul", &[x, &w], &format!("{prefix}_matmul"), vec![]);
        self.node("Add", &[&product, &b], &format!("{prefix}_dense"), vec![])
    }

    fn finish(self) -> Vec<u8> {
        ModelProto {
            ir_version: IR_VERSION,
            producer_name: "shardseal-testkit".into(),
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            graph: Some(self.graph),
            ..Default::default()
        }
        .encode_to_vec()
    }
}

fn value_info(name: &str, dims: &[usize]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|&d| Dimension {
            denotation: String::new(),
            value: Some(dimension::Value::DimValue(d as i64)),
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            denotation: String::new(),
            value: Some(TypeValue::TensorType(type_proto::Tensor {
                elem_type: ONNX_FLOAT,
                shape: Some(TensorShapeProto { dim }),
            })),
        }),
        doc_string: String::new(),
    }
}

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..Default::default()
    }
}

fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

/// Shape of the residual CNN: the built-in demo model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResidualCnn {
    /// Channels of every convolution after the stem.
    pub channels: usize,
    /// Residual blocks (Conv, Relu, Conv, Add skip, Relu).
    pub blocks: usize,
    /// Height and width of the square input image (3 channels, batch 1).
    pub image_size: usize,
    /// Classes of the classifier head.
    pub classes: usize,
    /// Weight seed.
    pub seed: u64,
}

impl Default for ResidualCnn {
    /// 128 channels, 3 blocks, 16×16 images, 10 classes: about 3.6 MB of weights and 0.5
    /// GFLOP, quick enough for debug-build tests.
    fn default() -> Self {
        Self {
            channels: 128,
            blocks: 3,
            image_size: 16,
            classes: 10,
            seed: 7,
        }
    }
}

impl ResidualCnn {
    /// Bytes of f32 weights the model holds.
    pub fn weight_bytes(&self) -> u64 {
        let c = self.channels as u64;
        let stem = 3 * c * 9 + c;
        let block = 2 * (c * c * 9 + c);
        let head = c * self.classes as u64 + self.classes as u64;
        4 * (stem + self.blocks as u64 * block + head)
    }

    /// The model: input `image` [1,3,H,W], output `logits` [1,classes].
    pub fn build(&self) -> Vec<u8> {
        let (c, size) = (self.channels, self.image_size);
        let mut g = GraphWriter::new("residual_cnn", self.seed);
        let image = g.input("image", &[1, 3, size, size]);
        let conv = |g: &mut GraphWriter, prefix: &str, x: &str, in_channels: usize| {
            let w = g.layer_weight(
                &format!("{prefix}_w"),
                &[c, in_channels, 3, 3],
                in_channels * 9,
            );
            let b = g.weight(&format!("{prefix}_b"), &[c], 0.1);
            let attributes = vec![ints("kernel_shape", &[3, 3]), ints("pads", &[1, 1, 1, 1])];
            g.node("Conv", &[x, &w, &b], &format!("{prefix}_conv"), attributes)
        };
        let stem = conv(&mut g, "stem", &image, 3);
        let mut x = g.node("Relu", &[&stem], "stem_relu", vec![]);
        for block in 0..self.blocks {
            let p = format!("block{block}");
            let first = conv(&mut g, &format!("{p}_a"), &x, c);
            let first = g.node("Relu", &[&first], &format!("{p}_a_relu"), vec![]);
            let second = conv(&mut g, &format!("{p}_b"), &first, c);
            let sum = g.node("Add", &[&second, &x], &format!("{p}_sum"), vec![]);
            x = g.node("Relu", &[&sum], &format!("{p}_out"), vec![]);
        }
        let pooled = g.node("GlobalAveragePool", &[&x], "pooled", vec![]);
        let features = g.node("Flatten", &[&pooled], "features", vec![int("axis", 1)]);
        let w = g.layer_weight("head_w", &[self.classes, c], c);
        let b = g.weight("head_b", &[self.classes], 0.1);
        g.node(
            "Gemm",
            &[&features, &w, &b],
            "logits",
            vec![int("transB", 1)],
        );
        g.output("logits", &[1, self.classes]);
        g.finish()
    }
}

/// The residual CNN with `config` (see [`ResidualCnn`]).
pub fn residual_cnn(config: &ResidualCnn) -> Vec<u8> {
    config.build()
}

/// Shape of a multi-layer perceptron.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mlp {
    /// Rows of the input.
    pub batch: usize,
    /// Input features.
    pub input: usize,
    /// Width of each hidden layer (MatMul, Add bias, Relu).
    pub hidden: Vec<usize>,
    /// Output features (a final MatMul and Add, no activation).
    pub output: usize,
    /// Weight seed.
    pub seed: u64,
}

impl Default for Mlp {
    /// Batch 2, 32 inputs, three hidden layers of 64, 10 outputs.
    fn default() -> Self {
        Self {
            batch: 2,
            input: 32,
            hidden: vec![64, 64, 64],
            output: 10,
            seed: 11,
        }
    }
}

/// An MLP: input `x` [batch,input], output `y` [batch,output].
pub fn mlp(config: &Mlp) -> Vec<u8> {
    let mut g = GraphWriter::new("mlp", config.seed);
    let mut x = g.input("x", &[config.batch, config.input]);
    let mut width = config.input;
    for (layer, &hidden) in config.hidden.iter().enumerate() {
        let dense = g.dense(&format!("layer{layer}"), &x, width, hidden);
        x = g.node("Relu", &[&dense], &format!("layer{layer}_relu"), vec![]);
        width = hidden;
    }
    let last = g.dense("out", &x, width, config.output);
    g.node("Identity", &[&last], "y", vec![]);
    g.output("y", &[config.batch, config.output]);
    g.finish()
}

/// Three branches read `x`, run two layers each (interleaved in the node order, so any cut
/// between the first and second layers is crossed by all three branches), meet in a
/// Concat, and a skip from `x` joins the head at the very end (so `x` crosses every cut).
/// Input `x` [1,32], output `y` [1,16].
pub fn multi_cross() -> Vec<u8> {
    let mut g = GraphWriter::new("multi_cross", 23);
    let x = g.input("x", &[1, 32]);
    let activations = ["Relu", "Tanh", "Sigmoid"];
    let mut level: Vec<String> = Vec::new();
    for (branch, activation) in ["a", "b", "c"].iter().zip(activations) {
        let w = g.layer_weight(&format!("{branch}1_w"), &[32, 32], 32);
        let product = g.node("MatMul", &[&x, &w], &format!("{branch}1_matmul"), vec![]);
        level.push(g.node(activation, &[&product], &format!("{branch}1"), vec![]));
    }
    let mut second: Vec<String> = Vec::new();
    for (branch, input) in ["a", "b", "c"].iter().zip(&level) {
        let w = g.layer_weight(&format!("{branch}2_w"), &[32, 32], 32);
        let product = g.node("MatMul", &[input, &w], &format!("{branch}2_matmul"), vec![]);
        second.push(g.node("Relu", &[&product], &format!("{branch}2"), vec![]));
    }
    let refs: Vec<&str> = second.iter().map(String::as_str).collect();
    let joined = g.node("Concat", &refs, "joined", vec![int("axis", 1)]);
    let wh = g.layer_weight("head_w", &[96, 16], 96);
    let head = g.node("MatMul", &[&joined, &wh], "head", vec![]);
    let ws = g.layer_weight("skip_w", &[32, 16], 32);
    let skip = g.node("MatMul", &[&x, &ws], "skip", vec![]);
    g.node("Add", &[&head, &skip], "y", vec![]);
    g.output("y", &[1, 16]);
    g.finish()
}

/// A layer whose output mixes the rows of a batch although it keeps them in front: `x`
/// [1,8] through MatMul, then Softmax over axis 0 (the batch axis), output `y` [1,8]. Run
/// one request at a time it is a constant 1; stacked, each row depends on the others.
pub fn batch_rows_mixed() -> Vec<u8> {
    matmul_then("batch_rows_mixed", 41, "Softmax")
}

/// A layer that folds the batch axis away: `x` [1,8] through MatMul, then Flatten at axis
/// 0, output `y` [1,8] ([1, 8 x rows] for stacked rows).
pub fn batch_axis_flattened() -> Vec<u8> {
    matmul_then("batch_axis_flattened", 43, "Flatten")
}

/// `x` [1,8] through an 8x8 MatMul, then `op` with `axis` 0, as output `y` [1,8].
fn matmul_then(name: &str, seed: u64, op: &str) -> Vec<u8> {
    let mut g = GraphWriter::new(name, seed);
    let x = g.input("x", &[1, 8]);
    let w = g.layer_weight("w", &[8, 8], 8);
    let product = g.node("MatMul", &[&x, &w], "product", vec![]);
    g.node(op, &[&product], "y", vec![int("axis", 0)]);
    g.output("y", &[1, 8]);
    g.finish()
}

/// Two inputs (`image` [1,16], `meta` [1,4]) and two outputs listed as (`main` [1,5],
/// `aux` [1,3]); `aux` is computed early, so it crosses later cuts as a graph output.
pub fn two_io() -> Vec<u8> {
    let mut g = GraphWriter::new("two_io", 31);
    let image = g.input("image", &[1, 16]);
    let meta = g.input("meta", &[1, 4]);
    let wm = g.layer_weight("meta_w", &[4, 8], 4);
    let m = g.node("MatMul", &[&meta, &wm], "meta_matmul", vec![]);
    let m = g.node("Relu", &[&m], "meta_features", vec![]);
    let wa = g.layer_weight("aux_w", &[8, 3], 8);
    g.node("MatMul", &[&m, &wa], "aux", vec![]);
    let h = g.dense("h1", &image, 16, 32);
    let h = g.node("Relu", &[&h], "h1_relu", vec![]);
    let h = g.dense("h2", &h, 32, 32);
    let h = g.node("Relu", &[&h], "h2_relu", vec![]);
    let joined = g.node("Concat", &[&h, &m], "joined", vec![int("axis", 1)]);
    let w = g.layer_weight("main_w", &[40, 5], 40);
    g.node("MatMul", &[&joined, &w], "main", vec![]);
    g.output("main", &[1, 5]);
    g.output("aux", &[1, 3]);
    g.finish()
}

/// An MLP of square layers (MatMul then Relu) holding about `bytes` of f32 weights (rounded
/// up to whole layers): a model bigger than one function's memory. Input `x` [1,width],
/// output `y` [1,width]; the width is 1024 from 16 MiB up, smaller below.
pub fn big_weights(bytes: u64) -> Vec<u8> {
    let width: u64 = [1024, 512, 256, 128, 64]
        .into_iter()
        .find(|w| w * w * 4 * 4 <= bytes)
        .unwrap_or(32);
    let layer_bytes = width * width * 4;
    let layers = bytes.div_ceil(layer_bytes).max(1);
    let width = width as usize;
    let mut g = GraphWriter::new("big_weights", 41);
    let mut x = g.input("x", &[1, width]);
    for layer in 0..layers {
        let w = g.layer_weight(&format!("layer{layer}_w"), &[width, width], width);
        let product = g.node("MatMul", &[&x, &w], &format!("layer{layer}_matmul"), vec![]);
        x = g.node("Relu", &[&product], &format!("layer{layer}_relu"), vec![]);
    }
    g.node("Identity", &[&x], "y", vec![]);
    g.output("y", &[1, width]);
    g.finish()
}

/// Seeded inputs for every graph input of an ONNX model: f32 uniform in [-1, 1), using the
/// declared static shapes.
pub fn random_inputs(model: &[u8], seed: u64) -> TractResult<NamedTensors> {
    let proto = ModelProto::decode(model)?;
    let graph = proto.graph.context("model without a graph")?;
    let initializers: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let mut rng = Xorshift::new(seed);
    let mut inputs = Vec::new();
    for input in graph
        .input
        .iter()
        .filter(|i| !initializers.contains(&i.name.as_str()))
    {
        let Some(TypeValue::TensorType(tensor)) =
            input.r#type.as_ref().and_then(|t| t.value.as_ref())
        else {
            bail!("input {} has no tensor type", input.name);
        };
        ensure!(
            tensor.elem_type == ONNX_FLOAT,
            "input {} is not f32",
            input.name
        );
        let shape: Vec<usize> = tensor
            .shape
            .as_ref()
            .context("input without a shape")?
            .dim
            .iter()
            .map(|d| match d.value {
                Some(dimension::Value::DimValue(v)) if v >= 0 => Ok(v as usize),
                _ => Err(format_err!("input {} has a dynamic shape", input.name)),
            })
            .collect::<TractResult<_>>()?;
        let count = shape.iter().product();
        let values: Vec<f32> = (0..count).map(|_| rng.next_f32()).collect();
        inputs.push((input.name.clone(), Tensor::from_shape(&shape, &values)?));
    }
    Ok(inputs)
}

/// Runs a whole ONNX model with tract: `inputs` by name, outputs in graph order.
pub fn run_model(model: &[u8], inputs: &[(String, Tensor)]) -> TractResult<NamedTensors> {
    let proto = ModelProto::decode(model)?;
    let graph = proto.graph.as_ref().context("model without a graph")?;
    let initializers: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let mut args: TVec<TValue> = tvec![];
    for input in graph
        .input
        .iter()
        .filter(|i| !initializers.contains(&i.name.as_str()))
    {
        let (_, tensor) = inputs
            .iter()
            .find(|(name, _)| name == &input.name)
            .with_context(|| format!("no value for input {}", input.name))?;
        args.push(tensor.clone().into_tvalue());
    }
    let runnable = tract_onnx::onnx()
        .model_for_proto_model(&proto)?
        .into_optimized()?
        .into_runnable()?;
    let outputs = runnable.run(args)?;
    ensure!(
        outputs.len() == graph.output.len(),
        "tract returned {} outputs",
        outputs.len()
    );
    Ok(graph
        .output
        .iter()
        .zip(outputs)
        .map(|(o, t)| (o.name.clone(), t.into_tensor()))
        .collect())
}

/// Runs a plan's stages in sequence as the runtime does: each stage's ONNX gets its
/// `model_inputs` from the tensors carried so far, and the next stage gets exactly this
/// stage's `outputs`, each either computed by the stage or forwarded as passthrough. Checks
/// every carried tensor against the plan's shape. Returns the last stage's outputs.
pub fn run_plan(plan: &Plan, inputs: &[(String, Tensor)]) -> TractResult<NamedTensors> {
    let mut carried: HashMap<String, Tensor> = HashMap::new();
    for info in plan.graph_inputs() {
        let (_, tensor) = inputs
            .iter()
            .find(|(name, _)| name == &info.name)
            .with_context(|| format!("no value for input {}", info.name))?;
        carried.insert(info.name.clone(), tensor.clone());
    }
    let mut last = Vec::new();
    for stage in plan.stages() {
        let onnx = plan
            .stage_model(stage.index)
            .context("stage without a model")?;
        let stage_inputs: NamedTensors = stage
            .model_inputs
            .iter()
            .map(|name| {
                let tensor = carried
                    .get(name)
                    .with_context(|| format!("{} not carried into {}", name, stage.index))?;
                Ok((name.clone(), tensor.clone()))
            })
            .collect::<TractResult<_>>()?;
        let mut computed: HashMap<String, Tensor> =
            run_model(&onnx, &stage_inputs)?.into_iter().collect();
        let mut next = Vec::new();
        for info in &stage.outputs {
            let tensor = if stage.passthrough.contains(&info.name) {
                carried.remove(&info.name)
            } else {
                computed.remove(&info.name)
            }
            .with_context(|| {
                format!(
                    "{} neither computed nor forwarded by {}",
                    info.name, stage.index
                )
            })?;
            let shape: Vec<u64> = tensor.shape().iter().map(|&d| d as u64).collect();
            ensure!(
                shape == info.shape,
                "{}: plan says {:?}, stage gave {:?}",
                info.name,
                info.shape,
                shape
            );
            next.push((info.name.clone(), tensor));
        }
        carried = next.iter().cloned().collect();
        last = next;
    }
    Ok(last)
}

/// The largest absolute difference between two sets of f32 outputs, matched by name; fails
/// if names, shapes or types differ.
pub fn max_abs_diff(
    expected: &[(String, Tensor)],
    actual: &[(String, Tensor)],
) -> TractResult<f32> {
    ensure!(
        expected.len() == actual.len(),
        "{} outputs vs {}",
        expected.len(),
        actual.len()
    );
    let mut worst = 0f32;
    for (name, want) in expected {
        let (_, got) = actual
            .iter()
            .find(|(n, _)| n == name)
            .with_context(|| format!("missing output {name}"))?;
        ensure!(
            want.shape() == got.shape(),
            "{name}: shape {:?} vs {:?}",
            want.shape(),
            got.shape()
        );
        let want = want.to_plain_array_view::<f32>()?;
        let got = got.to_plain_array_view::<f32>()?;
        for (w, g) in want.iter().zip(got) {
            let diff = (w - g).abs();
            ensure!(!diff.is_nan(), "{name}: NaN");
            worst = worst.max(diff);
        }
    }
    Ok(worst)
}

#[cfg(test)]
mod rng_tests {
    use super::Xorshift;

    #[test]
    fn adjacent_seeds_give_different_streams() {
        let firsts: std::collections::HashSet<u64> =
            (0..64).map(|seed| Xorshift::new(seed).next_u64()).collect();
        assert_eq!(firsts.len(), 64);
    }
}
