//! Load, shedding and what a core dump would hold, against a real `shardseal up`
//! deployment on loopback. Figures are printed, never asserted against a clock; what is
//! asserted is the outcome of every request and memory that stops growing.
//!
//! - `sixty_four_clients_for_sixty_seconds`: 64 clients (each its own connection) send
//!   requests to a two-stage MLP for 60 s, below saturation (`--max-in-flight 256`):
//!   every request must succeed with the correct output. Prints requests served, p50/p99
//!   latency and the resident memory of the coordinator and of every function, sampled
//!   every 3 s; after a 15 s warm-up none may grow beyond 1.5x + 32 MiB of its warm
//!   figure. Meanwhile 8 of the clients send a canary input to a canary-weight model; a
//!   core dump of the coordinator taken under that load (`gcore` when gdb is installed,
//!   else its memory read through /proc/PID/mem, which is what a core dump holds) must
//!   hold neither canary, and every function process must be non-dumpable with core
//!   files disabled.
//! - `above_saturation_the_coordinator_sheds_load`: `--max-in-flight 4` and 48 clients on
//!   a model that starts from zero replicas: requests held for the cold start count
//!   against the limit, so the burst is refused with RESOURCE_EXHAUSTED rather than
//!   queued; every other request is served correctly; no other error; the coordinator's
//!   memory stays bounded.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardseal_function::StageEngine;
use shardseal_proto::tensor::HostTensor;
use shardseal_sdk::{Client, Error};
use shardseal_testkit::canary::{INPUT, WEIGHT, holds};
use shardseal_testkit::cluster::Cluster;
use shardseal_testkit::metrics::{Metrics, logged_addr, scrape};
use shardseal_testkit::models;
use shardseal_testkit::sealed::{inputs_for, max_abs_diff};

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

/// Resident memory of `pid` in KiB (`VmRSS`), if it still runs.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// RSS samples per process: name -> [(seconds since start, KiB)].
type Samples = BTreeMap<String, Vec<(u64, u64)>>;

fn sample(cluster: &Cluster, started: Instant, samples: &mut Samples) {
    let at = started.elapsed().as_secs();
    let coordinator = cluster.coordinator_pid();
    if let Some(kib) = rss_kib(coordinator) {
        samples
            .entry(format!("coordinator[{coordinator}]"))
            .or_default()
            .push((at, kib));
    }
    for f in cluster.function_processes() {
        if let Some(kib) = rss_kib(f.pid) {
            samples
                .entry(format!("{}/{}[{}]", f.model, f.stage, f.pid))
                .or_default()
                .push((at, kib));
        }
    }
}

/// Checks that no process grew past 1.5x + 32 MiB of its first sample taken at least
/// `warm_up` after the start (and after the process itself started); prints the series.
fn assert_memory_settles(samples: &Samples, warm_up: u64) {
    for (name, series) in samples {
        let line: Vec<String> = series
            .iter()
            .map(|(t, kib)| format!("{t}s:{}", kib / 1024))
            .collect();
        println!("RSS MiB {name}: {}", line.join(" "));
        let first_seen = series[0].0;
        let Some(&(_, warm)) = series
            .iter()
            .find(|(t, _)| *t >= warm_up.max(first_seen + warm_up / 2))
        else {
            continue;
        };
        let peak = series.iter().map(|(_, k)| *k).max().unwrap_or(0);
        let bound = warm * 3 / 2 + 32 * 1024;
        assert!(
            peak <= bound,
            "{name} grew from {warm} KiB after warm-up to {peak} KiB (bound {bound} KiB)"
        );
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// The coordinator's memory as a core dump holds it: `gcore` if gdb is installed, else
/// /proc/PID/mem. Returns the bytes and how they were taken.
fn core_of(pid: u32, dir: &Path) -> (Vec<u8>, &'static str) {
    let prefix = dir.join("coordinator-core");
    let gcore = std::process::Command::new("gcore")
        .arg("-o")
        .arg(&prefix)
        .arg(pid.to_string())
        .output();
    let file = dir.join(format!("coordinator-core.{pid}"));
    if let Ok(out) = gcore
        && out.status.success()
        && let Ok(bytes) = std::fs::read(&file)
    {
        let _ = std::fs::remove_file(&file);
        return (bytes, "gcore");
    }
    let memory = shardseal_testkit::canary::read_process_memory(pid).expect("read /proc/PID/mem");
    (memory, "/proc/PID/mem")
}

/// The function processes that serve are hardened: core files off (`RLIMIT_CORE` 0, read from
/// /proc/PID/limits) and, as each says after `prctl(PR_GET_DUMPABLE)` in its log,
/// non-dumpable; for a test not run as root, /proc/PID is owned by root, as the kernel
/// does for a non-dumpable process.
fn assert_functions_hardened(cluster: &Cluster) -> usize {
    let mut checked = 0;
    for f in cluster.function_processes() {
        // Only functions past their hardening: one the autoscaler has just spawned may
        // not have reached it yet (it hardens before it asks for keys, so it holds none).
        let Ok(log_path) = std::fs::read_link(format!("/proc/{}/fd/2", f.pid)) else {
            continue;
        };
        let log = std::fs::read_to_string(log_path).unwrap_or_default();
        if !log.contains("process hardened") {
            continue;
        }
        checked += 1;
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", f.pid)).unwrap();
        let core = limits
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .unwrap();
        let fields: Vec<&str> = core.split_whitespace().collect();
        assert_eq!(&fields[4..6], ["0", "0"], "function {}: {core}", f.pid);
        assert!(
            log.contains("dumpable=false"),
            "function {} does not report itself non-dumpable",
            f.pid
        );
        if !nix::unistd::geteuid().is_root() {
            use std::os::unix::fs::MetadataExt;
            let owner = std::fs::metadata(format!("/proc/{}", f.pid)).unwrap().uid();
            assert_eq!(owner, 0, "/proc/{} of a non-dumpable process", f.pid);
        }
    }
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_clients_for_sixty_seconds() {
    const CLIENTS: usize = 64;
    const CANARY_CLIENTS: usize = 8;
    const RUN: Duration = Duration::from_secs(60);
    let cluster = Cluster::start_with(shardseal(), &["--scale-to-zero-after", "never"]).await;
    let mlp = models::mlp(&Default::default());
    let canary = shardseal_testkit::canary::fill_f32_initializers(&mlp, WEIGHT);
    cluster.provision_and_register("mlp", &mlp, 2).await;
    cluster.provision_and_register("canary", &canary, 2).await;

    // Cases with their expected outputs.
    let first = cluster.client().await;
    let engine = StageEngine::load(&mlp).unwrap();
    let mut cases = Vec::new();
    for seed in 0..16 {
        let inputs = inputs_for(&first, "mlp", seed).await;
        let expected = engine.run(&inputs).unwrap();
        cases.push((inputs, expected));
    }
    let pipeline = first.pipeline("canary").await.unwrap();
    let spec = &pipeline.inputs[0];
    let shape: Vec<usize> = spec.shape.iter().map(|&d| d as usize).collect();
    let n: usize = shape.iter().product();
    let canary_input =
        vec![HostTensor::from_f32(spec.name.clone(), shape, &vec![INPUT; n]).unwrap()];
    let canary_expected = StageEngine::load(&canary)
        .unwrap()
        .run(&canary_input)
        .unwrap();
    let cases = Arc::new(cases);
    let canary_case = Arc::new((canary_input, canary_expected));

    let latencies = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let client = cluster.client().await;
        let (cases, canary_case, latencies, errors, stop) = (
            cases.clone(),
            canary_case.clone(),
            latencies.clone(),
            errors.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = c;
            let mut mine = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (model, inputs, expected) = if c < CANARY_CLIENTS {
                    ("canary", &canary_case.0, &canary_case.1)
                } else {
                    let (inputs, expected) = &cases[i % cases.len()];
                    ("mlp", inputs, expected)
                };
                i += CLIENTS;
                let sent = Instant::now();
                match client.infer(model, inputs.clone()).await {
                    Ok(got) => {
                        mine.push(sent.elapsed());
                        let ok = if model == "canary" {
                            relative_ok(expected, &got.outputs)
                        } else {
                            max_abs_diff(expected, &got.outputs) <= 1e-5
                        };
                        if !ok {
                            errors
                                .lock()
                                .unwrap()
                                .push(format!("{model}: wrong output"));
                        }
                    }
                    Err(e) => errors.lock().unwrap().push(format!("{model}: {e}")),
                }
            }
            latencies.lock().unwrap().extend(mine);
        }));
    }

    let started = Instant::now();
    let mut samples = Samples::new();
    while started.elapsed() < RUN {
        sample(&cluster, started, &mut samples);
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    sample(&cluster, started, &mut samples);

    // A core dump of the coordinator, taken while the canary clients still run.
    let dump_dir = tempfile::tempdir().unwrap();
    let (core, how) = core_of(cluster.coordinator_pid(), dump_dir.path());
    let hardened = assert_functions_hardened(&cluster);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();

    let mut latencies = std::mem::take(&mut *latencies.lock().unwrap());
    latencies.sort();
    let errors = errors.lock().unwrap().clone();
    println!(
        "load: {CLIENTS} clients, {:.0} s: {} requests served ({:.1}/s), {} errors, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        elapsed.as_secs_f64(),
        latencies.len(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        errors.len(),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    println!(
        "core dump of the coordinator ({how}): {} MiB, no canary; {hardened} function processes non-dumpable with RLIMIT_CORE 0",
        core.len() >> 20
    );
    assert!(errors.is_empty(), "errors below saturation: {errors:?}");
    assert!(latencies.len() > CLIENTS, "served {}", latencies.len());
    assert!(core.len() > 1 << 20, "a {} byte core", core.len());
    for (what, value) in [("weights", WEIGHT), ("input", INPUT)] {
        assert!(
            !holds(&core, value),
            "the coordinator's core dump holds plaintext {what}"
        );
    }
    assert!(hardened >= 4, "{hardened} function processes checked");
    assert_memory_settles(&samples, 15);
    cluster.stop().await;
}

fn relative_ok(expected: &[HostTensor], actual: &[HostTensor]) -> bool {
    expected.len() == actual.len()
        && expected.iter().all(|e| {
            actual.iter().any(|a| {
                a.name() == e.name()
                    && a.shape() == e.shape()
                    && e.to_f64_lossy()
                        .iter()
                        .zip(a.to_f64_lossy())
                        .all(|(x, y)| (x - y).abs() <= 1e-5 * x.abs().max(1.0))
            })
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn above_saturation_the_coordinator_sheds_load() {
    const CLIENTS: usize = 48;
    const LIMIT: usize = 4;
    let cluster = Cluster::start_with_env(
        shardseal(),
        &[
            "--max-in-flight",
            &LIMIT.to_string(),
            "--scale-to-zero-after",
            "never",
        ],
        vec![("SHARDSEAL_COORDINATOR_METRICS_LISTEN", "127.0.0.1:0".into())],
    )
    .await;
    let mlp = models::mlp(&Default::default());
    cluster.provision_and_register("mlp", &mlp, 2).await;
    let first = cluster.client().await;
    let engine = StageEngine::load(&mlp).unwrap();
    let mut cases = Vec::new();
    for seed in 0..8 {
        let inputs = inputs_for(&first, "mlp", seed).await;
        let expected = engine.run(&inputs).unwrap();
        cases.push((inputs, expected));
    }
    let cases = Arc::new(cases);
    assert_eq!(cluster.replica_counts("mlp", 2), vec![0, 0]);

    let served = Arc::new(AtomicUsize::new(0));
    let shed = Arc::new(AtomicUsize::new(0));
    let shed_before_first_served = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let client: Arc<Client> = Arc::new(cluster.client().await);
        let (cases, served, shed, early, errors, stop) = (
            cases.clone(),
            served.clone(),
            shed.clone(),
            shed_before_first_served.clone(),
            errors.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                let (inputs, expected) = &cases[i % cases.len()];
                i += CLIENTS;
                match client.infer("mlp", inputs.clone()).await {
                    Ok(got) if max_abs_diff(expected, &got.outputs) <= 1e-5 => {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => errors.lock().unwrap().push("wrong output".into()),
                    Err(Error::Overloaded(_)) => {
                        shed.fetch_add(1, Ordering::Relaxed);
                        if served.load(Ordering::Relaxed) == 0 {
                            early.fetch_add(1, Ordering::Relaxed);
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => errors.lock().unwrap().push(e.to_string()),
                }
            }
        }));
    }
    let started = Instant::now();
    let mut samples = Samples::new();
    while served.load(Ordering::Relaxed) < 200 || started.elapsed() < Duration::from_secs(15) {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "only {} served",
            served.load(Ordering::Relaxed)
        );
        sample(&cluster, started, &mut samples);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let errors = errors.lock().unwrap().clone();
    println!(
        "shedding: {CLIENTS} clients, --max-in-flight {LIMIT}, {:.0} s: {} served, {} refused with RESOURCE_EXHAUSTED ({} while the stages scaled from zero), {} other errors",
        started.elapsed().as_secs_f64(),
        served.load(Ordering::Relaxed),
        shed.load(Ordering::Relaxed),
        shed_before_first_served.load(Ordering::Relaxed),
        errors.len()
    );
    assert!(errors.is_empty(), "{errors:?}");
    assert!(
        shed_before_first_served.load(Ordering::Relaxed) > 0,
        "requests waiting for the cold start are bounded: the burst was refused, not queued"
    );
    assert!(shed.load(Ordering::Relaxed) > 0 && served.load(Ordering::Relaxed) >= 200);
    // The operator sees every refusal: those shed at the door in `shed_total`, those the
    // router refused once decoded in `requests_total`.
    let (at_the_door, decoded) = refusals_counted(&cluster);
    println!(
        "refusals in the coordinator's metrics: {at_the_door} shed at admission, {decoded} once decoded"
    );
    assert_eq!(
        at_the_door + decoded,
        shed.load(Ordering::Relaxed) as u64,
        "every RESOURCE_EXHAUSTED a client saw is counted once"
    );
    assert!(at_the_door > 0, "admission shed nothing");
    let coordinator: Samples = samples
        .into_iter()
        .filter(|(name, _)| name.starts_with("coordinator"))
        .collect();
    assert_memory_settles(&coordinator, 5);
    cluster.stop().await;
}

/// The coordinator's count of requests refused for capacity: shed at admission
/// (`shardseal_coordinator_shed_total`) and refused once decoded
/// (`shardseal_coordinator_requests_total` with code `RESOURCE_EXHAUSTED`).
fn refusals_counted(cluster: &Cluster) -> (u64, u64) {
    let log = std::fs::read_to_string(cluster.state().join("logs/coordinator.log")).unwrap();
    let metrics = Metrics::parse(&scrape(&logged_addr(&log)));
    (
        metrics.get("shardseal_coordinator_shed_total") as u64,
        metrics
            .try_get(
                r#"shardseal_coordinator_requests_total{model="mlp",code="RESOURCE_EXHAUSTED"}"#,
            )
            .unwrap_or(0.0) as u64,
    )
}
