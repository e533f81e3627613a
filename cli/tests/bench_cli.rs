//! `shardseal bench --json` on a tiny model: every promised field is there and sane. No
//! figure is judged for speed (the benchmark prints figures; tests do not time).

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use shardseal_testkit::models;

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

/// Runs `shardseal bench <args> --json` and parses its JSON Lines.
fn bench(args: &[&str]) -> Vec<Value> {
    bench_with_progress(args).0
}

/// As [`bench`], with what it said on stderr as it went.
fn bench_with_progress(args: &[&str]) -> (Vec<Value>, String) {
    // `--json` first: `--function-command` takes every argument after it.
    let output = Command::new(shardseal())
        .args(["bench", "--json"])
        .args(args)
        .env_remove(shardseal_function::LOAD_MEMORY_ENV)
        .env_remove(shardseal_function::SERVE_MEMORY_ENV)
        .output()
        .expect("running shardseal bench");
    assert!(
        output.status.success(),
        "shardseal bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reports = String::from_utf8(output.stdout)
        .expect("UTF-8 output")
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    (
        reports,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn number(report: &Value, field: &str) -> f64 {
    report[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} is not a number in {report}"))
}

fn numbers(report: &Value, field: &str) -> Vec<f64> {
    report[field]
        .as_array()
        .unwrap_or_else(|| panic!("{field} is not an array in {report}"))
        .iter()
        .map(|v| v.as_f64().unwrap_or_else(|| panic!("{field} holds {v}")))
        .collect()
}

#[test]
fn bench_json_reports_every_field_for_each_stage_count() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.onnx");
    std::fs::write(&model, models::mlp(&Default::default())).unwrap();
    let (reports, progress) = bench_with_progress(&[
        "--model",
        model.to_str().unwrap(),
        "--stages",
        "1,2",
        "--requests",
        "3",
        "--warmup",
        "1",
        "--concurrency",
        "2",
        "--plain-parallelism",
        "1,2",
        "--batch-probe",
        "2",
    ]);
    assert_eq!(reports.len(), 2, "one object per stage count");
    // Progress goes to stderr with --json too (stdout held only the JSON above), phase by
    // phase for each stage count.
    for stages in [1, 2] {
        assert!(
            progress.contains(&format!("measuring tiny-s{stages} ({stages} stage(s))")),
            "{progress}"
        );
    }
    assert_eq!(
        progress.matches("  latency: 3 requests of each").count(),
        2,
        "{progress}"
    );
    assert_eq!(
        progress.matches("  throughput: round ").count(),
        6,
        "{progress}"
    );
    for (report, stages) in reports.iter().zip([1usize, 2]) {
        assert_eq!(report["model"], format!("tiny-s{stages}"));
        assert_eq!(report["stages"], stages);
        assert_eq!(report["requests"], 3);
        assert_eq!(report["concurrency"], 2);
        let diff = number(report, "max_abs_diff");
        assert!(diff <= 1e-5, "sealed differs from plain by {diff}");
        for (p50, p99) in [
            ("plain_ms_p50", "plain_ms_p99"),
            ("sealed_ms_p50", "sealed_ms_p99"),
        ] {
            assert!(number(report, p50) > 0.0, "{p50}");
            assert!(
                number(report, p99) >= number(report, p50),
                "{p99} below {p50}"
            );
        }
        let ratio = number(report, "sealed_ms_p50") / number(report, "plain_ms_p50");
        assert!((number(report, "overhead_ratio") - ratio).abs() < 1e-9 * ratio);
        let tried = report["plain_rps_by_parallelism"].as_array().unwrap();
        assert_eq!(tried.len(), 2, "parallelism 1 and 2 tried");
        let best = tried
            .iter()
            .map(|pair| pair[1].as_f64().unwrap())
            .fold(0.0, f64::max);
        assert_eq!(number(report, "plain_rps"), best);
        let throughput = number(report, "sealed_rps") / best;
        assert!((number(report, "throughput_ratio") - throughput).abs() < 1e-9 * throughput);
        for field in [
            "cold_start_ms",
            "cold_start_ratio",
            "plain_load_ms",
            "decrypt_gbps",
        ] {
            let v = number(report, field);
            assert!(v.is_finite() && v > 0.0, "{field} = {v}");
        }
        let phases = &report["plain_load_phases"];
        let whole = number(phases, "parse_ms") + number(phases, "optimize_ms");
        assert!((number(report, "plain_load_ms") - whole).abs() < 1e-9 * whole);
        let parts = &report["decrypt_parts_gbps"];
        assert_eq!(
            number(parts, "open_in_place"),
            number(report, "decrypt_gbps")
        );
        assert!(number(parts, "gather_and_open") > 0.0);
        // Every function logs its decryption time; a tiny shard may take under a
        // microsecond, so the rate may be null but never zero or negative.
        let decrypt = &report["function_decrypt_gbps"];
        assert!(
            decrypt.is_null() || decrypt.as_f64().is_some_and(|v| v > 0.0),
            "{decrypt}"
        );
        // Null only if the functions stop logging their fetch and decrypt time.
        let fetch = &report["function_fetch_decrypt_gbps"];
        assert!(
            fetch.is_null() || fetch.as_f64().is_some_and(|v| v > 0.0),
            "{fetch}"
        );
        let cold = report["stage_cold_start"].as_array().unwrap();
        assert_eq!(cold.len(), stages);
        for (i, stage) in cold.iter().enumerate() {
            assert_eq!(stage["stage"], i);
            let ready = number(stage, "spawn_to_ready_ms");
            // Every function build logs its own total and its attestation time, and the
            // benchmark finds its process start (logged, or the rest of spawn to ready).
            let total = number(stage, "total_ms");
            assert!(number(stage, "attest_ms") > 0.0 && total >= number(stage, "attest_ms"));
            let process = number(stage, "process_start_ms");
            assert!(
                process >= 0.0 && process <= ready,
                "process start {process} ms, ready in {ready}"
            );
            // The local platform tells a function when it spawned it, so the function's
            // own count from spawn to ready (not /proc's, in 10 ms steps) stays within
            // the coordinator's, which ends later, on the function's ready line.
            assert!(total <= ready + 0.1, "total {total} ms, ready in {ready}");
            let plain = number(stage, "plain_load_ms");
            assert!(plain > 0.0);
            assert!((number(stage, "ratio") - ready / plain).abs() < 1e-9 * (ready / plain));
            // The plain load of the same shard in a fresh process, timed by the bench.
            let fresh = number(stage, "plain_fresh_process_ms");
            assert!(fresh > 0.0);
            assert!((number(stage, "fresh_ratio") - ready / fresh).abs() < 1e-9 * (ready / fresh));
            // The default (`auto`) loads this small model fast, as the functions logged it.
            assert_eq!(stage["load_memory"], "fast");
            assert_eq!(stage["serve_memory"], "mapped");
            // The load's peak, as the function logged it when ready.
            assert!(number(stage, "ready_peak_rss_mb") > 0.0);
        }
        let fresh_ratio = cold
            .iter()
            .map(|s| number(s, "fresh_ratio"))
            .fold(0.0, f64::max);
        assert_eq!(number(report, "cold_start_fresh_ratio"), fresh_ratio);
        assert_eq!(
            number(report, "cold_start_ms"),
            cold.iter()
                .map(|s| number(s, "spawn_to_ready_ms"))
                .fold(0.0, f64::max)
        );
        let probe = &report["batch_probe"];
        assert_eq!(probe["batch"], 2);
        assert!(probe["error"].is_null(), "{probe}");
        let gain = number(probe, "throughput_gain");
        let expected = 2.0 * number(probe, "batch1_ms") / number(probe, "batched_ms");
        assert!((gain - expected).abs() < 1e-9 * expected);
        let rss = numbers(report, "stage_peak_rss_mb");
        let shard = numbers(report, "stage_shard_mb");
        assert_eq!((rss.len(), shard.len()), (stages, stages));
        assert!(rss.iter().all(|&mb| mb > 1.0), "peak RSS {rss:?}");
        // Each function runs from the mapped executable: part of its peak, not all of it.
        let file = numbers(report, "stage_rss_file_mb");
        assert_eq!(file.len(), stages);
        assert!(
            file.iter().zip(&rss).all(|(&f, &peak)| f > 0.0 && f < peak),
            "file-backed {file:?} of peaks {rss:?}"
        );
        // The whole MLP's weights (11,082 f32, 43 KiB) are split, not copied, across stages.
        let total: f64 = shard.iter().sum();
        assert!(total > 0.035 && total < 0.08, "shards total {total} MiB");
        assert_eq!(report["stage_ms_p50"].as_array().unwrap().len(), stages);
        let cut = report["cut_bytes_per_request"].as_u64().unwrap();
        if stages == 1 {
            assert_eq!(cut, 0, "one stage: nothing crosses a cut");
        } else {
            assert!(cut > 0, "two stages: activations cross the cut");
        }
        assert_cpu_per_request(report, stages);
        let (p50, p99) = (
            number(report, "sealed_loaded_ms_p50"),
            number(report, "sealed_loaded_ms_p99"),
        );
        assert!(p50 > 0.0 && p99 >= p50, "under load p50 {p50} p99 {p99}");
        // Unbatched: every run held one request.
        assert_eq!(report["max_batch"], 1);
        assert_eq!(number(report, "mean_batch"), 1.0);
    }
}

/// CPU per request by process: numbers, one per stage, adding up to the sealed total.
fn assert_cpu_per_request(report: &Value, stages: usize) {
    let cpu = &report["cpu_ms_per_request"];
    let per_stage = numbers(cpu, "stages");
    assert_eq!(per_stage.len(), stages);
    let parts = [number(cpu, "client"), number(cpu, "coordinator")];
    assert!(parts.iter().chain(&per_stage).all(|&ms| ms >= 0.0), "{cpu}");
    let sum = parts.iter().sum::<f64>() + per_stage.iter().sum::<f64>();
    let sealed = number(cpu, "sealed");
    assert!((sealed - sum).abs() <= 1e-9 * sum.max(1.0), "{cpu}");
    assert!(number(cpu, "plain") >= 0.0, "{cpu}");

    // Cores kept busy: CPU over wall-clock time, for each plain parallelism tried and for
    // the sealed pipeline, whose figure is its CPU per request times its requests per second.
    let busy = &report["cores_busy"];
    let parallelisms = |field: &Value| -> Vec<u64> {
        field
            .as_array()
            .unwrap()
            .iter()
            .map(|pair| pair[0].as_u64().unwrap())
            .collect()
    };
    assert_eq!(
        parallelisms(&busy["plain_by_parallelism"]),
        parallelisms(&report["plain_rps_by_parallelism"])
    );
    for pair in busy["plain_by_parallelism"].as_array().unwrap() {
        let cores = pair[1].as_f64().unwrap();
        assert!(cores.is_finite() && cores >= 0.0, "{busy}");
    }
    let sealed_busy = number(busy, "sealed");
    let expected = sealed * number(report, "sealed_rps") / 1e3;
    assert!(
        (sealed_busy - expected).abs() <= 1e-9 * expected.max(1.0),
        "{busy} against {expected}"
    );
}

#[test]
fn max_batch_measures_the_batched_pipeline_beside_the_unbatched_one() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("rows.onnx");
    // One row per request, so the stage can batch.
    let mlp = models::Mlp {
        batch: 1,
        ..Default::default()
    };
    std::fs::write(&model, models::mlp(&mlp)).unwrap();
    let reports = bench(&[
        "--model",
        model.to_str().unwrap(),
        "--stages",
        "1",
        "--max-batch",
        "4",
        "--requests",
        "8",
        "--warmup",
        "1",
        "--concurrency",
        "4",
        "--plain-parallelism",
        "1",
        "--batch-probe",
        "0",
    ]);
    let models: Vec<&Value> = reports.iter().map(|r| &r["model"]).collect();
    assert_eq!(models, ["rows-s1", "rows-s1-b4"], "unbatched, then batched");
    for (report, max_batch) in reports.iter().zip([1, 4]) {
        assert_eq!(report["max_batch"], max_batch);
        let diff = number(report, "max_abs_diff");
        assert!(
            diff <= 1e-4,
            "{}: sealed differs from plain by {diff}",
            report["model"]
        );
        // Requests per run, from the function's log: within what the stage allows.
        let mean = number(report, "mean_batch");
        assert!(
            (1.0..=f64::from(max_batch)).contains(&mean),
            "mean batch {mean}"
        );
        assert_cpu_per_request(report, 1);
    }
}

#[test]
fn routing_mode_reports_coordinator_cost_per_request() {
    let reports = bench(&[
        "--routing",
        "--stages",
        "1",
        "--requests",
        "40",
        "--concurrency",
        "4",
    ]);
    assert_eq!(reports.len(), 1);
    let report = &reports[0];
    assert_eq!(report["model"], "tiny-mlp-s1");
    assert_eq!(report["requests"], 40);
    for field in [
        "routing_rps",
        "sealed_ms_p50",
        "coordinator_cpu_us_per_request",
    ] {
        let v = number(report, field);
        assert!(v.is_finite() && v >= 0.0, "{field} = {v}");
    }
    assert!(number(report, "routing_rps") > 0.0);
    // CPU time is counted in 10 ms ticks: 40 requests may round to no tick at all, and
    // then there is no per-core rate (null) rather than an infinite one.
    let per_core = &report["coordinator_rps_per_core"];
    assert!(
        per_core.is_null() || per_core.as_f64().is_some_and(|v| v > 0.0),
        "{per_core}"
    );
}

/// With `--function-command`, the functions run as the program given: here the standalone
/// `shardseal-function` (built beside `shardseal` by `cargo test --workspace`), which cluster
/// images run. The quoting agent hashes each function's own executable and the bench allows
/// only the given program's hash, so no key reaches a function that runs as anything else.
#[test]
fn bench_runs_the_functions_as_the_program_it_is_given() {
    let standalone = shardseal().with_file_name("shardseal-function");
    assert!(
        standalone.exists(),
        "{} not found: run `cargo test --workspace` or `cargo build -p shardseal-function`",
        standalone.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.onnx");
    std::fs::write(&model, models::mlp(&Default::default())).unwrap();
    let state = dir.path().join("state");
    let reports = bench(&[
        "--model",
        model.to_str().unwrap(),
        "--stages",
        "2",
        "--requests",
        "2",
        "--warmup",
        "1",
        "--plain-parallelism",
        "1",
        "--batch-probe",
        "0",
        "--state",
        state.to_str().unwrap(),
        "--function-command",
        standalone.to_str().unwrap(),
    ]);
    assert_eq!(reports.len(), 1);
    let report = &reports[0];
    assert_eq!(
        report["function_command"],
        serde_json::json!([standalone.to_str().unwrap()])
    );
    let diff = number(report, "max_abs_diff");
    assert!(diff <= 1e-5, "sealed differs from plain by {diff}");
    // The measurement the bench allowed and the client pinned: the standalone's, not this
    // command's.
    let trust: Value =
        serde_json::from_slice(&std::fs::read(state.join("trust.json")).unwrap()).unwrap();
    let sha256 = |path: &Path| {
        shardseal_attestation::measure_executable(path)
            .unwrap()
            .to_hex()
    };
    let allowed = trust["measurements"].to_string();
    assert!(allowed.contains(&sha256(&standalone)), "{allowed}");
    assert!(!allowed.contains(&sha256(shardseal())), "{allowed}");
}

#[test]
fn bench_refuses_a_missing_function_program_with_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.onnx");
    std::fs::write(&model, models::mlp(&Default::default())).unwrap();
    let program = "/nonexistent/shardseal-function";
    let args = [
        "--model",
        model.to_str().unwrap(),
        "--function-command",
        program,
    ];
    assert_refused(&args, program);
}

#[test]
fn bench_refuses_a_missing_model_with_a_one_line_error() {
    assert_refused(
        &["--model", "/nonexistent/model.onnx"],
        "/nonexistent/model.onnx",
    );
}

/// `shardseal bench --json ARGS` fails with an error that names `named`, without a panic
/// and without any JSON.
fn assert_refused(args: &[&str], named: &str) {
    let output = Command::new(shardseal())
        .args(["bench", "--json"])
        .args(args)
        .output()
        .expect("running shardseal bench");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(named), "the error names {named}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(output.stdout.is_empty(), "no JSON on failure");
}
