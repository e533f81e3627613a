//! Every way planning can fail, each asserted as its exact error variant, and the near
//! misses that must succeed.
#![allow(clippy::unwrap_used)] // Tests may unwrap.

use prost::Message;
use shardseal_coordinator::{PlanError, PlanOptions, StageCount, plan, plan_file};
use shardseal_testkit::models::{
    Mlp, ResidualCnn, big_weights, max_abs_diff, mlp, residual_cnn, run_model, run_plan,
};
use tract_onnx::pb::tensor_shape_proto::dimension;
use tract_onnx::pb::type_proto::Value as TypeValue;
use tract_onnx::pb::{GraphProto, ModelProto};
use tract_onnx::prelude::Tensor;

fn edit(model: &[u8], change: impl FnOnce(&mut GraphProto)) -> Vec<u8> {
    let mut proto = ModelProto::decode(model).unwrap();
    change(proto.graph.as_mut().unwrap());
    proto.encode_to_vec()
}

fn one_stage() -> PlanOptions {
    PlanOptions::fixed(1)
}

#[test]
fn bytes_that_are_not_onnx() {
    for junk in [
        &b"name,age\nalice,42\n"[..],
        b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR",
        b"",
    ] {
        let error = plan(junk, &one_stage()).unwrap_err();
        assert!(
            matches!(error, PlanError::NotOnnx { .. }),
            "{junk:?}: {error:?}"
        );
    }
    let missing = std::env::temp_dir().join("shardseal-planner-test-no-such-model.onnx");
    assert!(
        matches!(plan_file(&missing, &one_stage()), Err(PlanError::Read { path, .. }) if path == missing)
    );
}

#[test]
fn a_truncated_model() {
    let model = residual_cnn(&ResidualCnn::default());
    for cut in [100, model.len() / 2, model.len() - 1] {
        let error = plan(&model[..cut], &one_stage()).unwrap_err();
        let PlanError::TruncatedOnnx { needed, available } = error else {
            panic!("cut at {cut}: {error:?}");
        };
        assert!(
            needed > available,
            "cut at {cut}: needs {needed}, has {available}"
        );
    }
}

/// The default MLP with its batch dimension made symbolic on input and output.
fn dynamic_batch_mlp() -> Vec<u8> {
    edit(&mlp(&Mlp::default()), |graph| {
        for value in graph.input.iter_mut().chain(graph.output.iter_mut()) {
            let TypeValue::TensorType(tensor) =
                value.r#type.as_mut().unwrap().value.as_mut().unwrap();
            tensor.shape.as_mut().unwrap().dim[0].value =
                Some(dimension::Value::DimParam("batch".into()));
        }
    })
}

#[test]
fn a_dynamic_input_needs_an_override() {
    let model = dynamic_batch_mlp();
    let error = plan(&model, &PlanOptions::fixed(2)).unwrap_err();
    assert!(
        matches!(&error, PlanError::DynamicInputShape { input, shape } if input == "x" && shape == "[batch,32]"),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("--input-shape x=d0,d1,..."),
        "{error}"
    );

    let bad_rank = PlanOptions::fixed(2).with_input_shape("x", vec![3, 32, 1]);
    assert!(matches!(
        plan(&model, &bad_rank),
        Err(PlanError::InputShapeMismatch { .. })
    ));
    let bad_dim = PlanOptions::fixed(2).with_input_shape("x", vec![3, 31]);
    assert!(matches!(
        plan(&model, &bad_dim),
        Err(PlanError::InputShapeMismatch { .. })
    ));
    let unknown = PlanOptions::fixed(2).with_input_shape("images", vec![3, 32]);
    assert!(
        matches!(plan(&model, &unknown), Err(PlanError::UnknownInput { name, .. }) if name == "images")
    );
}

#[test]
fn a_dynamic_input_with_an_override_plans_static_stages_that_run() {
    let model = dynamic_batch_mlp();
    let plan = plan(
        &model,
        &PlanOptions::fixed(2).with_input_shape("x", vec![3, 32]),
    )
    .unwrap();
    assert_eq!(plan.graph_inputs()[0].shape, [3, 32]);
    assert_eq!(plan.graph_outputs()[0].shape, [3, 10]);
    assert_eq!(plan.graph_outputs()[0].bytes, 3 * 10 * 4);
    for stage in plan.stages() {
        for tensor in stage.inputs.iter().chain(&stage.outputs) {
            assert_eq!(tensor.shape[0], 3, "{} in {}", tensor.name, stage.index);
        }
    }
    let values: Vec<f32> = (0..96).map(|i| (i as f32 * 0.37).sin()).collect();
    let inputs = vec![(
        "x".to_string(),
        Tensor::from_shape(&[3, 32], &values).unwrap(),
    )];
    let diff = max_abs_diff(
        &run_model(&model, &inputs).unwrap(),
        &run_plan(&plan, &inputs).unwrap(),
    )
    .unwrap();
    println!("dynamic-batch mlp, batch 3, 2 stages: max abs diff {diff:e}");
    assert!(diff <= 1e-5);
}

#[test]
fn an_operator_tract_does_not_support() {
    let model = edit(&mlp(&Mlp::default()), |graph| {
        graph.node.last_mut().unwrap().op_type = "FrobnicateTensor".into();
    });
    let error = plan(&model, &one_stage()).unwrap_err();
    assert!(
        matches!(&error, PlanError::UnsupportedOp { node, op_type } if node == "y" && op_type == "FrobnicateTensor"),
        "{error:?}"
    );
}

#[test]
fn more_stages_than_nodes() {
    let model = mlp(&Mlp::default());
    let nodes = ModelProto::decode(model.as_slice())
        .unwrap()
        .graph
        .unwrap()
        .node
        .len();
    assert_eq!(nodes, 12);
    assert!(matches!(
        plan(&model, &PlanOptions::fixed(nodes + 1)),
        Err(PlanError::TooManyStages {
            stages: 13,
            nodes: 12
        })
    ));
    assert!(matches!(
        plan(&model, &PlanOptions::fixed(0)),
        Err(PlanError::NoStages)
    ));
    // One node per stage is the most there can be, and it still computes the same thing.
    let finest = plan(&model, &PlanOptions::fixed(nodes)).unwrap();
    assert!(finest.stages().iter().all(|s| s.node_count == 1));
}

#[test]
fn a_memory_limit_below_the_largest_node() {
    // 8 layers of 512×512 f32 weights: 1 MiB each.
    let model = big_weights(8 << 20);
    let limit = 512 << 10;
    for options in [
        PlanOptions::auto(limit),
        PlanOptions::fixed(8).with_memory_limit(limit),
    ] {
        let error = plan(&model, &options).unwrap_err();
        let PlanError::NodeExceedsMemoryLimit {
            node,
            op_type,
            bytes,
            limit: reported,
        } = error
        else {
            panic!("{options:?}: {error:?}");
        };
        assert_eq!(
            (node.as_str(), op_type.as_str()),
            ("layer0_matmul", "MatMul")
        );
        // Its weights plus its 2 KiB input and 2 KiB output.
        assert_eq!(bytes, (1 << 20) + 4096);
        assert_eq!(reported, limit);
    }
}

#[test]
fn too_few_stages_for_the_memory_limit() {
    let model = big_weights(8 << 20);
    let options = PlanOptions::fixed(3).with_memory_limit(3 << 19);
    assert!(matches!(
        plan(&model, &options),
        Err(PlanError::MemoryLimitTooSmall {
            stages: 3,
            needed: 8,
            ..
        })
    ));
    assert_eq!(options.stages, StageCount::Fixed(3));
}

#[test]
fn a_cycle() {
    let model = edit(&mlp(&Mlp::default()), |graph| {
        // layer0 now reads layer1's output, which depends on layer0.
        graph.node[0].input[0] = "layer1_relu".into();
    });
    let error = plan(&model, &one_stage()).unwrap_err();
    let PlanError::Cycle { nodes } = error else {
        panic!("{error:?}")
    };
    assert!(nodes.contains(&"layer0_matmul".to_string()), "{nodes:?}");
    assert!(nodes.contains(&"layer1_relu".to_string()), "{nodes:?}");
}

#[test]
fn a_dangling_input() {
    let model = edit(&mlp(&Mlp::default()), |graph| {
        let node = graph
            .node
            .iter_mut()
            .find(|n| n.name == "layer1_matmul")
            .unwrap();
        node.input[0] = "ghost".into();
    });
    let error = plan(&model, &one_stage()).unwrap_err();
    assert!(
        matches!(&error, PlanError::DanglingInput { node, tensor } if node == "layer1_matmul" && tensor == "ghost"),
        "{error:?}"
    );
}
