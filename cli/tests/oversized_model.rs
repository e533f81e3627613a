//! A model whose weights exceed any one function's memory is served under per-function
//! limits: 600 MiB of weights, 256 MiB per function, cut by the planner into stages that
//! fit, each function confined by the kernel, outputs equal plain tract.

use std::path::Path;

use shardseal_function::StageEngine;
use shardseal_keys::broker::OwnerReleasePolicy;
use shardseal_testkit::cluster::Cluster;
use shardseal_testkit::models;
use shardseal_testkit::sealed::{inputs_for, max_abs_diff};

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

const LIMIT: u64 = 256 << 20;

/// `/proc/<pid>/status` field `name`, in bytes (the kernel reports kB).
fn status_bytes(pid: u32, name: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"));
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// The memory limit the kernel enforces on `pid`: its cgroup v2 `memory.max` when it runs
/// in a ShardSeal function cgroup, else its `RLIMIT_DATA`.
fn kernel_memory_limit(pid: u32) -> Option<u64> {
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    if let Some(path) = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .filter(|p| p.contains("shardseal-fn-"))
    {
        let max = std::fs::read_to_string(format!("/sys/fs/cgroup{path}/memory.max")).ok()?;
        return max.trim().parse().ok();
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let data = limits.lines().find(|l| l.starts_with("Max data size"))?;
    // "Max data size   <soft>   <hard>   bytes"
    data.split_whitespace().nth(3)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn six_hundred_mib_of_weights_are_served_by_functions_of_256_mib() {
    let model = models::big_weights(600 << 20);
    assert!(model.len() as u64 >= 600 << 20);
    let cluster = Cluster::start_with(shardseal(), &["--memory-limit", "256MiB"]).await;
    let (manifest, stages) = cluster
        .provision_with(
            &cluster.state().join("owner"),
            "big",
            &model,
            &["--stages", "auto", "--memory-limit", "256MiB"],
        )
        .await;
    println!("600 MiB of weights planned into {stages} stages for 256 MiB functions");
    assert!(
        stages >= 3,
        "{stages} stages cannot fit 600 MiB in 256 MiB each"
    );
    let shards = cluster
        .state()
        .join("store")
        .join("models")
        .join("big")
        .join("v1");
    for entry in std::fs::read_dir(&shards).unwrap().flatten() {
        if entry.file_name().to_string_lossy().ends_with(".shard") {
            let size = entry.metadata().unwrap().len();
            assert!(size < LIMIT, "{:?} is {size} bytes", entry.file_name());
        }
    }
    let measurement = *cluster.trust.measurements.iter().next().unwrap();
    cluster
        .register(
            &cluster.owner,
            &manifest,
            &OwnerReleasePolicy::same_for_all_stages(stages, &[measurement]),
        )
        .await;

    let client = cluster.client().await;
    let engine = StageEngine::load(&model).unwrap();
    for seed in 0..2 {
        let inputs = inputs_for(&client, "big", seed).await;
        let expected = engine.run(&inputs).unwrap();
        let got = client.infer("big", inputs).await.expect("sealed inference");
        let diff = max_abs_diff(&expected, &got.outputs);
        println!("seed {seed}: max abs diff {diff:e}");
        assert!(diff <= 1e-4, "seed {seed}: diff {diff}");
    }

    // Every stage ran in its own function, each confined to 256 MiB by the kernel (and
    // it served, so it fit).
    let functions: Vec<_> = cluster
        .function_processes()
        .into_iter()
        .filter(|f| f.model == "big")
        .collect();
    let mut served: Vec<u32> = functions.iter().map(|f| f.stage).collect();
    served.sort_unstable();
    served.dedup();
    assert_eq!(served, (0..stages).collect::<Vec<_>>());
    for f in &functions {
        assert_eq!(kernel_memory_limit(f.pid), Some(LIMIT), "stage {}", f.stage);
        // Resident memory also counts the executable's pages, which the limit does not;
        // printed for the record.
        let peak = status_bytes(f.pid, "VmHWM");
        println!(
            "stage {}: peak resident {} MiB (executable pages included)",
            f.stage,
            peak >> 20
        );
    }
    cluster.stop().await;
}
