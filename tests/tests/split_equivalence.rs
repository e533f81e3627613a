//! The numerical oracle for partitioning: running a plan's stages one after another (stage
//! ONNX through tract, passthrough tensors forwarded by name) gives the same outputs as
//! running the whole model.
#![allow(clippy::unwrap_used)] // Tests may unwrap.

use shardseal_coordinator::{PlanOptions, plan};
use shardseal_testkit::models::{
    Mlp, ResidualCnn, big_weights, max_abs_diff, mlp, multi_cross, random_inputs, residual_cnn,
    run_model, run_plan, two_io,
};

const TOLERANCE: f32 = 1e-5;

fn check_all_stage_counts(name: &str, model: &[u8]) {
    let inputs = random_inputs(model, 5).unwrap();
    let whole = run_model(model, &inputs).unwrap();
    // A dead network (all zeros) would match trivially.
    let spread = whole[0]
        .1
        .to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()));
    assert!(spread > 1e-3, "{name}: outputs are all near zero");
    for stages in 1..=4 {
        let plan = plan(model, &PlanOptions::fixed(stages)).unwrap();
        assert_eq!(plan.stages().len(), stages);
        let staged = run_plan(&plan, &inputs).unwrap();
        let diff = max_abs_diff(&whole, &staged).unwrap();
        let cuts: Vec<usize> = plan
            .stages()
            .iter()
            .map(|s| s.node_range.start)
            .skip(1)
            .collect();
        println!("{name}: {stages} stage(s), cuts before nodes {cuts:?}, max abs diff {diff:e}");
        assert!(
            diff <= TOLERANCE,
            "{name} with {stages} stages differs by {diff}"
        );
    }
}

#[test]
fn residual_cnn_stages_match_the_whole_model() {
    check_all_stage_counts("residual_cnn", &residual_cnn(&ResidualCnn::default()));
}

#[test]
fn mlp_stages_match_the_whole_model() {
    check_all_stage_counts("mlp", &mlp(&Mlp::default()));
}

#[test]
fn multi_cross_stages_match_the_whole_model() {
    check_all_stage_counts("multi_cross", &multi_cross());
}

#[test]
fn two_io_stages_match_the_whole_model() {
    check_all_stage_counts("two_io", &two_io());
}

#[test]
fn a_model_bigger_than_the_memory_limit_runs_split() {
    // 8 MiB of weights in 1 MiB layers; at 3 MiB per stage, two layers fit (plus their 2 KiB
    // activations) and three do not.
    let model = big_weights(8 << 20);
    let limit = 3 << 20;
    let plan = plan(&model, &PlanOptions::auto(limit)).unwrap();
    assert_eq!(plan.stages().len(), 4);
    for stage in plan.stages() {
        assert!(
            stage.memory_bytes() <= limit,
            "{} needs {}",
            stage.index,
            stage.memory_bytes()
        );
        assert_eq!(stage.param_bytes, 2 << 20);
    }
    let inputs = random_inputs(&model, 9).unwrap();
    let diff = max_abs_diff(
        &run_model(&model, &inputs).unwrap(),
        &run_plan(&plan, &inputs).unwrap(),
    )
    .unwrap();
    println!(
        "big_weights 8 MiB, auto at 3 MiB: {} stages, max abs diff {diff:e}",
        plan.stages().len()
    );
    assert!(diff <= TOLERANCE);
}
