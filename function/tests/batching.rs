//! Stage batching in the engine: a graph that batches runs stacked requests exactly as it
//! runs each alone; a graph that would mix or fold a batch's rows is refused batching at
//! load and runs requests one by one.

use shardseal_function::{Error, StageEngine};
use shardseal_proto::tensor::HostTensor;
use shardseal_testkit::models::{self, Mlp, Xorshift};

/// One request: random values for every input the engine declares.
fn request(engine: &StageEngine, seed: u64) -> Vec<HostTensor> {
    let mut rng = Xorshift::new(seed);
    engine
        .inputs()
        .iter()
        .map(|spec| {
            let values: Vec<f32> = (0..spec.shape.iter().product::<usize>())
                .map(|_| rng.next_f32())
                .collect();
            HostTensor::from_f32(spec.name.clone(), spec.shape.clone(), &values).unwrap()
        })
        .collect()
}

fn max_abs_diff(a: &[HostTensor], b: &[HostTensor]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!((x.name(), x.shape()), (y.name(), y.shape()));
            x.to_f64_lossy()
                .into_iter()
                .zip(y.to_f64_lossy())
                .map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f64::max)
}

fn one_row_mlp() -> Vec<u8> {
    models::mlp(&Mlp {
        batch: 1,
        input: 48,
        hidden: vec![96, 96],
        output: 12,
        seed: 5,
    })
}

#[test]
fn a_batch_runs_each_request_as_it_runs_alone() {
    let engine = StageEngine::load_batched(&one_row_mlp(), 4).unwrap();
    assert_eq!(engine.max_batch(), 4);
    for rows in 1..=4 {
        let requests: Vec<_> = (0..rows).map(|r| request(&engine, 10 + r)).collect();
        let together = engine.run_batch(&requests).unwrap();
        assert_eq!(together.len(), rows as usize);
        for (alone, batched) in requests.iter().zip(&together) {
            let alone = engine.run(alone).unwrap();
            let diff = max_abs_diff(&alone, batched);
            assert!(diff <= 1e-5, "{rows} rows: {diff}");
            assert_eq!(batched[0].shape(), [1, 12]);
        }
    }
    // The rows are the requests' own, in order: two different requests differ.
    let requests = vec![request(&engine, 1), request(&engine, 2)];
    let together = engine.run_batch(&requests).unwrap();
    assert!(max_abs_diff(&together[0], &together[1]) > 1e-3);
}

#[test]
fn a_batch_above_the_maximum_or_empty_is_refused() {
    let engine = StageEngine::load_batched(&one_row_mlp(), 2).unwrap();
    let requests: Vec<_> = (0..3).map(|r| request(&engine, r)).collect();
    assert!(matches!(
        engine.run_batch(&requests),
        Err(Error::Inference(m)) if m.contains("takes 1 to 2")
    ));
    assert!(engine.run_batch(&[]).is_err());
}

#[test]
fn a_request_that_does_not_fit_is_found_before_it_joins_a_batch() {
    let engine = StageEngine::load_batched(&one_row_mlp(), 4).unwrap();
    let good = request(&engine, 1);
    engine.check_inputs(&good).unwrap();
    let wrong_shape = vec![HostTensor::from_f32("x", vec![1, 47], &[0.0; 47]).unwrap()];
    assert!(matches!(
        engine.check_inputs(&wrong_shape),
        Err(Error::InputMismatch { .. })
    ));
    assert!(matches!(
        engine.check_inputs(&[]),
        Err(Error::MissingInput(name)) if name == "x"
    ));
}

#[test]
fn batching_off_runs_one_by_one() {
    let engine = StageEngine::load(&one_row_mlp()).unwrap();
    assert_eq!(engine.max_batch(), 1);
    let requests = vec![request(&engine, 1), request(&engine, 2)];
    assert!(engine.run_batch(&requests).is_err());
    assert_eq!(engine.run_batch(&requests[..1]).unwrap().len(), 1);
}

#[test]
fn a_graph_that_mixes_or_folds_a_batchs_rows_is_not_batched() {
    // Softmax over the batch axis keeps the rows in front, so only running a batch and its
    // requests alone tells it apart; Flatten at axis 0 folds the rows into one, which the
    // batched plan's output shape gives away.
    for model in [models::batch_rows_mixed(), models::batch_axis_flattened()] {
        let engine = StageEngine::load_batched(&model, 4).unwrap();
        assert_eq!(engine.max_batch(), 1);
        // It still serves, one request at a time, as plain tract does.
        let plain = StageEngine::load(&model).unwrap();
        let input = request(&engine, 3);
        assert_eq!(
            max_abs_diff(&engine.run(&input).unwrap(), &plain.run(&input).unwrap()),
            0.0
        );
    }
}

#[test]
fn inputs_without_a_leading_axis_of_one_are_not_batched() {
    // The default MLP takes two rows per request.
    let engine = StageEngine::load_batched(&models::mlp(&Mlp::default()), 4).unwrap();
    assert_eq!(engine.max_batch(), 1);
}
