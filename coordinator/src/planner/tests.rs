//! Planner unit tests on tiny hand-built graphs, where every cost and byte is known.
#![allow(clippy::unwrap_used)] // Tests may unwrap.

use prost::Message;
use tract_onnx::pb::tensor_shape_proto::{Dimension, dimension};
use tract_onnx::pb::type_proto::{self, Value as TypeValue};
use tract_onnx::pb::{
    GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto,
    TypeProto, ValueInfoProto,
};

use super::*;

/// A graph of MatMuls (and Adds) on f32 row vectors, with zero weights: only the planning
/// matters here.
struct Chain {
    graph: GraphProto,
}

impl Chain {
    fn new(input: &str, width: usize) -> Self {
        let mut graph = GraphProto::default();
        graph.input.push(value_info(input, &[1, width]));
        Self { graph }
    }

    /// `output = input × W`, W of shape [inner, outer].
    fn matmul(&mut self, input: &str, output: &str, inner: usize, outer: usize) -> &mut Self {
        let weight = format!("{output}_w");
        self.graph.initializer.push(TensorProto {
            name: weight.clone(),
            dims: vec![inner as i64, outer as i64],
            data_type: 1,
            raw_data: vec![0; inner * outer * 4],
            ..TensorProto::default()
        });
        self.node("MatMul", &[input, &weight], output)
    }

    fn node(&mut self, op_type: &str, inputs: &[&str], output: &str) -> &mut Self {
        self.graph.node.push(NodeProto {
            name: output.into(),
            op_type: op_type.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..NodeProto::default()
        });
        self
    }

    fn output(&mut self, name: &str, width: usize) -> Vec<u8> {
        self.graph.output.push(value_info(name, &[1, width]));
        ModelProto {
            ir_version: 7,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            graph: Some(self.graph.clone()),
            ..ModelProto::default()
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
                elem_type: 1,
                shape: Some(TensorShapeProto { dim }),
            })),
        }),
        doc_string: String::new(),
    }
}

fn names(tensors: &[TensorInfo]) -> Vec<&str> {
    tensors.iter().map(|t| t.name.as_str()).collect()
}

/// Six 64×64 layers: 16 KiB of weights each, 256-byte activations.
fn six_layers() -> Vec<u8> {
    let mut chain = Chain::new("x", 64);
    let mut previous = "x".to_string();
    for layer in 0..6 {
        let output = format!("h{layer}");
        chain.matmul(&previous, &output, 64, 64);
        previous = output;
    }
    chain.output(&previous, 64)
}

#[test]
fn auto_mode_picks_the_fewest_stages_that_fit() {
    let model = six_layers();
    // A stage of k layers needs k × 16 KiB of weights plus 512 bytes of activations (the
    // layer's input and output): 40 KiB fits two layers, not three.
    let limit = 40 * 1024;
    let plan = plan(&model, &PlanOptions::auto(limit)).unwrap();
    assert_eq!(plan.stages().len(), 3);
    for stage in plan.stages() {
        assert_eq!(stage.node_count, 2);
        assert_eq!(stage.param_bytes, 2 * 16384);
        assert_eq!(stage.peak_activation_bytes, 512);
        assert!(stage.memory_bytes() <= limit);
    }
    // Just below one layer's needs, nothing fits; just above two, two stages would not do.
    assert!(matches!(
        plan_err(&model, PlanOptions::auto(16384 + 511)),
        PlanError::NodeExceedsMemoryLimit { ref node, bytes: 16896, .. } if node == "h0"
    ));
    assert!(matches!(
        plan_err(&model, PlanOptions::fixed(2).with_memory_limit(limit)),
        PlanError::MemoryLimitTooSmall {
            stages: 2,
            needed: 3,
            ..
        }
    ));
    // A looser limit needs fewer stages.
    assert_eq!(
        plan_ok(&model, PlanOptions::auto(50 * 1024)).stages().len(),
        2
    );
    assert_eq!(
        plan_ok(&model, PlanOptions::auto(1 << 30)).stages().len(),
        1
    );
}

fn plan_ok(model: &[u8], options: PlanOptions) -> Plan {
    plan(model, &options).unwrap()
}

fn plan_err(model: &[u8], options: PlanOptions) -> PlanError {
    plan(model, &options).unwrap_err()
}

#[test]
fn fixed_mode_prefers_the_cut_where_a_small_tensor_crosses() {
    // Layer FLOPs (2·inner·outer): a 131k, b 8k, c 8k, d 131k, e 33k. The best balance cuts
    // after c (148k | 164k) where 2 KiB cross; cutting after b (139k | 172k, within 10%)
    // sends only b's 8 floats.
    let model = Chain::new("x", 128)
        .matmul("x", "a", 128, 512)
        .matmul("a", "b", 512, 8)
        .matmul("b", "c", 8, 512)
        .matmul("c", "d", 512, 128)
        .matmul("d", "e", 128, 128)
        .output("e", 128);
    let plan = plan_ok(&model, PlanOptions::fixed(2));
    let first = &plan.stages()[0];
    assert_eq!(first.node_range, 0..2);
    assert_eq!(
        first.outputs,
        vec![TensorInfo {
            name: "b".into(),
            dtype: DType::F32,
            shape: vec![1, 8],
            bytes: 32,
        }]
    );
    assert_eq!(plan.stages()[1].inputs, first.outputs);

    // With no tolerance, balance alone decides.
    let mut strict = PlanOptions::fixed(2);
    strict.balance_tolerance = 0.0;
    let plan = plan_ok(&model, strict);
    assert_eq!(plan.stages()[0].node_range, 0..3);
    assert_eq!(names(&plan.stages()[0].outputs), ["c"]);
}

#[test]
fn a_skip_over_a_whole_stage_is_passed_through() {
    // h0 feeds h1 and the final Add; stage [h1, h2] neither reads nor produces it.
    let model = Chain::new("x", 64)
        .matmul("x", "h0", 64, 64)
        .matmul("h0", "h1", 64, 64)
        .matmul("h1", "h2", 64, 64)
        .matmul("h2", "h3", 64, 64)
        .node("Add", &["h3", "h0"], "y")
        .output("y", 64);
    let plan = plan_ok(&model, PlanOptions::fixed(3));
    let ranges: Vec<_> = plan.stages().iter().map(|s| s.node_range.clone()).collect();
    assert_eq!(ranges, [0..1, 1..3, 3..5]);

    let [first, middle, last] = plan.stages() else {
        panic!("three stages")
    };
    assert_eq!(names(&first.inputs), ["x"]);
    assert_eq!(names(&first.outputs), ["h0"]);
    assert!(first.passthrough.is_empty());

    assert_eq!(names(&middle.inputs), ["h0"]);
    assert_eq!(names(&middle.outputs), ["h0", "h2"]);
    assert_eq!(middle.passthrough, ["h0"]);
    assert_eq!(middle.model_inputs, ["h0"]);
    assert_eq!(middle.model_outputs, ["h2"]);

    assert_eq!(names(&last.inputs), ["h0", "h2"]);
    assert_eq!(names(&last.outputs), ["y"]);
    assert!(last.passthrough.is_empty());

    // The stage ONNX holds only what its nodes touch.
    let onnx = ModelProto::decode(plan.stage_model(StageIndex(1)).unwrap().as_slice()).unwrap();
    let graph = onnx.graph.unwrap();
    let io = |v: &[ValueInfoProto]| v.iter().map(|i| i.name.clone()).collect::<Vec<_>>();
    assert_eq!(io(&graph.input), ["h0"]);
    assert_eq!(io(&graph.output), ["h2"]);
    let weights: Vec<_> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(weights, ["h1_w", "h2_w"]);
    assert_eq!(onnx.ir_version, 7);
    assert_eq!(onnx.opset_import.len(), 1);
}

#[test]
fn a_skip_where_the_stage_also_reads_the_tensor_is_input_and_passthrough() {
    // x is read by the first node and by the last: the middle stage forwards it, and
    // stage 0 both reads and forwards it.
    let model = Chain::new("x", 64)
        .matmul("x", "h0", 64, 64)
        .matmul("h0", "h1", 64, 64)
        .node("Add", &["h1", "x"], "y")
        .output("y", 64);
    let plan = plan_ok(&model, PlanOptions::fixed(3));
    let [first, middle, last] = plan.stages() else {
        panic!("three stages")
    };
    assert_eq!(first.passthrough, ["x"]);
    assert_eq!(first.model_inputs, ["x"]);
    assert_eq!(first.model_outputs, ["h0"]);
    assert_eq!(names(&first.outputs), ["x", "h0"]);
    assert_eq!(middle.passthrough, ["x"]);
    assert_eq!(middle.model_inputs, ["h0"]);
    assert_eq!(last.model_inputs, ["x", "h1"]);
}

#[test]
fn out_of_order_nodes_are_sorted_and_plan_the_same() {
    let mut graph = ModelProto::decode(six_layers().as_slice()).unwrap();
    graph.graph.as_mut().unwrap().node.reverse();
    let reversed = graph.encode_to_vec();
    let a = plan_ok(&six_layers(), PlanOptions::fixed(3));
    let b = plan_ok(&reversed, PlanOptions::fixed(3));
    assert_eq!(a.stages(), b.stages());
}

#[test]
fn json_has_the_documented_shape() {
    let plan = plan_ok(&six_layers(), PlanOptions::fixed(2));
    let json: serde_json::Value = serde_json::from_str(&plan.to_json()).unwrap();
    let stage = &json["stages"][0];
    assert_eq!(stage["index"], 0);
    assert_eq!(stage["nodes"], 3);
    assert_eq!(stage["param_bytes"], 3 * 16384);
    assert_eq!(stage["cost_share"], 0.5);
    assert_eq!(
        stage["out_tensors"],
        serde_json::json!([{"name": "h2", "dtype": "f32", "shape": [1, 64], "bytes": 256}])
    );
}

#[test]
fn truncation_is_told_apart_from_garbage() {
    let model = six_layers();
    assert!(matches!(
        plan_err(&model[..model.len() / 2], PlanOptions::fixed(1)),
        PlanError::TruncatedOnnx { .. }
    ));
    assert!(matches!(
        plan_err(b"\x89PNG\r\n\x1a\n", PlanOptions::fixed(1)),
        PlanError::NotOnnx { .. }
    ));
    assert!(matches!(
        plan_err(b"", PlanOptions::fixed(1)),
        PlanError::NotOnnx { .. }
    ));
}
