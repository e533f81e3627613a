//! What the benchmark reads from outside the processes it measures: `/proc` for peak
//! memory and CPU time, and the coordinator's and functions' logs for cold starts.
//!
//! The processes are not asked (no RPC, no extra protocol): a function's address is known
//! only to the coordinator, and a benchmark that needed one would measure a different
//! product. The coordinator logs one `replica ready` line per function it starts, with
//! the process id and the time from spawn to ready; each function logs its own cold-start
//! breakdown in its log.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;

/// Clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`): fixed at 100 by the Linux ABI
/// on every architecture this runs on.
const USER_HZ: f64 = 100.0;

/// One function the coordinator started, as its log tells.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ReplicaReady {
    pub model: String,
    pub stage: u32,
    pub replica: u64,
    pub pid: u32,
    pub spawn_to_ready_ms: f64,
}

/// A function's own cold-start breakdown, from the one info line it logs once ready
/// (message `cold start`, fields in milliseconds). A field the function does not log is
/// `None`: functions built before the finer phases existed log `cold start complete` with
/// `fetch_decrypt_ms` and a `load_ms` that includes tract's optimisation.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct FunctionColdStart {
    /// Process start (fork) to the cold start's first step, when the function logs it.
    pub startup_ms: Option<f64>,
    /// TLS to the broker, its identity and a nonce, when logged apart from `attest_ms`.
    pub connect_ms: Option<f64>,
    /// Quote from the agent, attestation and key release by the broker.
    pub attest_ms: Option<f64>,
    /// Reading the sealed shard from the store.
    pub fetch_ms: Option<f64>,
    /// Opening (AES-256-GCM) the shard.
    pub decrypt_ms: Option<f64>,
    /// Fetch and decrypt together (they overlap: chunks are opened as they arrive).
    pub fetch_decrypt_ms: Option<f64>,
    /// Tract parsing the shard (with optimisation when `optimize_ms` is absent).
    pub load_ms: Option<f64>,
    /// Tract optimising and planning the parsed shard.
    pub optimize_ms: Option<f64>,
    /// The function's cold-start total: from its process start when it logs
    /// `startup_ms`, from the cold start's first step otherwise.
    pub total_ms: Option<f64>,
    /// Plaintext bytes of the shard.
    pub shard_bytes: Option<u64>,
    /// How the function spent memory while it loaded (`--load-memory`: `fast` or `lean`).
    pub load_memory: Option<String>,
    /// How the function spends memory on inferences (`--serve-memory`: `heap` or `mapped`).
    pub serve_memory: Option<String>,
    /// The function's peak resident memory when it became ready: the load's peak.
    pub ready_peak_rss_bytes: Option<u64>,
}

/// Every `replica ready` line of a coordinator log.
pub(super) fn replicas_ready(coordinator_log: &Path) -> anyhow::Result<Vec<ReplicaReady>> {
    let text = std::fs::read_to_string(coordinator_log)
        .with_context(|| format!("reading {}", coordinator_log.display()))?;
    let mut out = Vec::new();
    for line in text.lines().map(strip_ansi) {
        if !line.contains("replica ready") {
            continue;
        }
        let f = fields(&line);
        let parsed = (|| {
            Some(ReplicaReady {
                model: f.get("model")?.to_string(),
                stage: f.get("stage")?.parse().ok()?,
                replica: f.get("replica")?.parse().ok()?,
                pid: f.get("pid")?.parse().ok()?,
                spawn_to_ready_ms: f.get("spawn_to_ready_ms")?.parse().ok()?,
            })
        })();
        out.extend(parsed);
    }
    Ok(out)
}

/// The cold-start line of a function log (message `cold start`, or `cold start complete`
/// from older functions), if there is one.
pub(super) fn function_cold_start(function_log: &Path) -> Option<FunctionColdStart> {
    let text = std::fs::read_to_string(function_log).ok()?;
    let line = text
        .lines()
        .map(strip_ansi)
        .find(|l| l.contains(" cold start") && l.contains("total_ms="))?;
    let f = fields(&line);
    let get = |k: &str| f.get(k).and_then(|v| v.parse::<f64>().ok());
    let fetch_ms = get("fetch_ms");
    let decrypt_ms = get("decrypt_ms");
    Some(FunctionColdStart {
        startup_ms: get("startup_ms"),
        connect_ms: get("connect_ms"),
        attest_ms: get("attest_ms"),
        fetch_ms,
        decrypt_ms,
        fetch_decrypt_ms: get("fetch_decrypt_ms").or(match (fetch_ms, decrypt_ms) {
            (Some(f), Some(d)) => Some(f + d),
            _ => None,
        }),
        load_ms: get("load_ms"),
        optimize_ms: get("optimize_ms"),
        total_ms: get("total_ms"),
        shard_bytes: f.get("shard_bytes").and_then(|v| v.parse().ok()),
        load_memory: f.get("load_memory").map(|v| (*v).to_owned()),
        serve_memory: f.get("serve_memory").map(|v| (*v).to_owned()),
        ready_peak_rss_bytes: f.get("peak_rss_bytes").and_then(|v| v.parse().ok()),
    })
}

/// The batch size of each request a function log records as `processed` (its `batch=`
/// field; a line without one is a run of one), in order.
pub(super) fn processed_batches(log: &Path) -> Vec<f64> {
    let Ok(text) = std::fs::read_to_string(log) else {
        return Vec::new();
    };
    text.lines()
        .map(strip_ansi)
        .filter(|line| line.contains(" processed"))
        .map(|line| {
            fields(&line)
                .get("batch")
                .and_then(|b| b.parse().ok())
                .unwrap_or(1.0)
        })
        .collect()
}

/// Requests per run, given each request's batch size (each request of a run of `k` has
/// its own line, so together they count as one run), or none without any request.
pub(super) fn mean_batch(batches: &[f64]) -> Option<f64> {
    let runs: f64 = batches.iter().map(|b| 1.0 / b).sum();
    (runs > 0.0).then(|| batches.len() as f64 / runs)
}

/// The peak resident set of a live process (`VmHWM`), in bytes.
pub(super) fn peak_rss_bytes(pid: u32) -> Option<u64> {
    status_bytes(pid, "VmHWM:")
}

/// The file-backed part of a live process's resident set now (`RssFile`), in bytes: the
/// pages of its executable and libraries it has mapped, which every process mapping the
/// same files shares.
pub(super) fn file_rss_bytes(pid: u32) -> Option<u64> {
    status_bytes(pid, "RssFile:")
}

/// A `kB` figure of a live process's `/proc/PID/status`, in bytes.
fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// User plus system CPU time a live process has used (all its threads, finished ones
/// included), in seconds.
pub(super) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; count fields after its closing paren.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the paren: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// CPU seconds this process has used so far.
pub(super) fn own_cpu_seconds() -> Option<f64> {
    cpu_seconds(std::process::id())
}

/// `key=value` tokens of a log line (values end at whitespace).
fn fields(line: &str) -> HashMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|token| token.split_once('='))
        .collect()
}

/// The line without terminal colour sequences (`ESC [ ... letter`), which the log writer
/// adds around field names.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_coloured_replica_ready_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("coordinator.log");
        std::fs::write(
            &log,
            "\u{1b}[2m2025-01-01T00:00:00Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x: replica ready \
             \u{1b}[3mmodel\u{1b}[0m\u{1b}[2m=\u{1b}[0mresnet-s2 \u{1b}[3mstage\u{1b}[0m\u{1b}[2m=\u{1b}[0m1 \
             replica=4 pid=4242 spawn_to_ready_ms=812.5\nother line\n",
        )
        .unwrap();
        assert_eq!(
            replicas_ready(&log).unwrap(),
            vec![ReplicaReady {
                model: "resnet-s2".into(),
                stage: 1,
                replica: 4,
                pid: 4242,
                spawn_to_ready_ms: 812.5,
            }]
        );
    }

    #[test]
    fn reads_a_function_cold_start_with_every_phase() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("function-1.log");
        std::fs::write(
            &log,
            "2026-01-01T00:00:00.000001Z  INFO shardseal_function::entry: listening\n\
             2026-01-01T00:00:00.000002Z  INFO shardseal_function::entry: cold start \
             model=m stage=0 startup_ms=4 connect_ms=1.5 attest_ms=10.5 fetch_ms=2 \
             decrypt_ms=3.25 load_ms=15 optimize_ms=20 total_ms=56.5 shard_bytes=4096 \
             peak_rss_bytes=1048576 load_memory=lean serve_memory=mapped mapped_blocks=12\n",
        )
        .unwrap();
        assert_eq!(
            function_cold_start(&log),
            Some(FunctionColdStart {
                startup_ms: Some(4.0),
                connect_ms: Some(1.5),
                attest_ms: Some(10.5),
                fetch_ms: Some(2.0),
                decrypt_ms: Some(3.25),
                fetch_decrypt_ms: Some(5.25),
                load_ms: Some(15.0),
                optimize_ms: Some(20.0),
                total_ms: Some(56.5),
                shard_bytes: Some(4096),
                load_memory: Some("lean".into()),
                serve_memory: Some("mapped".into()),
                ready_peak_rss_bytes: Some(1 << 20),
            })
        );
    }

    #[test]
    fn reads_an_older_function_cold_start_without_the_finer_phases() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("function-1.log");
        std::fs::write(
            &log,
            "INFO cold start complete model=m stage=0 total_ms=30.5 attest_ms=10 \
             fetch_decrypt_ms=5.5 load_ms=15\n",
        )
        .unwrap();
        assert_eq!(
            function_cold_start(&log),
            Some(FunctionColdStart {
                attest_ms: Some(10.0),
                fetch_decrypt_ms: Some(5.5),
                load_ms: Some(15.0),
                total_ms: Some(30.5),
                ..FunctionColdStart::default()
            })
        );
    }

    #[test]
    fn a_function_log_without_a_cold_start_line_gives_none() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("function-1.log");
        std::fs::write(&log, "ERROR attestation refused: PermissionDenied\n").unwrap();
        assert_eq!(function_cold_start(&log), None);
        assert_eq!(function_cold_start(&dir.path().join("missing.log")), None);
    }

    #[test]
    fn batch_sizes_come_from_processed_lines_and_runs_count_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("function-1.log");
        let line = |batch: &str| {
            format!(
                "2026-11-29T14:35:24Z  INFO process{{stage=0 request_id=\"ab\"}}: \
                 shardseal_function::service: processed open_ms=0.6 run_ms=39.6 seal_ms=0.4{batch}\n"
            )
        };
        let text = [
            "INFO cold start model=m stage=0 total_ms=9.0\n".to_owned(),
            // An older function logs no batch: a run of one.
            line(""),
            line(" batch=1"),
            // Three requests that shared one run log a line each.
            line(" \x1b[3mbatch\x1b[0m\x1b[2m=\x1b[0m3"),
            line(" batch=3"),
            line(" batch=3"),
        ]
        .concat();
        std::fs::write(&log, text).unwrap();
        let batches = processed_batches(&log);
        assert_eq!(batches, [1.0, 1.0, 3.0, 3.0, 3.0]);
        // Five requests in three runs.
        let mean = mean_batch(&batches).unwrap();
        assert!((mean - 5.0 / 3.0).abs() < 1e-12, "{mean}");
        assert_eq!(mean_batch(&[]), None);
        assert!(processed_batches(&dir.path().join("missing.log")).is_empty());
    }

    #[test]
    fn reads_this_process() {
        let peak = peak_rss_bytes(std::process::id()).unwrap();
        assert!(peak > 1 << 20);
        // This test's own executable is mapped and has run; it is part of the peak.
        let file = file_rss_bytes(std::process::id()).unwrap();
        assert!(
            file > 0 && file <= peak,
            "file-backed {file} of a peak of {peak}"
        );
        assert!(own_cpu_seconds().unwrap() >= 0.0);
    }
}
