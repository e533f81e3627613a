//! Pay-per-use accounting: one record per function invocation, and the bill they add up to.
//!
//! An invocation is one stage processing one request. Like a serverless platform, ShardSeal
//! bills it by the function's configured memory size times its duration, rounded up to the
//! millisecond (GB-seconds), plus a price per invocation. The duration is measured by the
//! coordinator around the call, so it includes what the function's own timings do not
//! (transport, queueing inside the function).
//!
//! Records are JSON lines appended to a usage log (`STATE/coordinator/usage.jsonl` under
//! `shardseal up`), one `write` per record, so a coordinator crash loses no record it wrote;
//! a line cut short by a crash is skipped when reading and counted in the report. The log
//! holds ids, names, sizes and durations, never a key or a tensor value.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// One stage processing one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invocation {
    /// When the invocation ended, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The request, as hex.
    pub request_id: String,
    /// The model.
    pub model: String,
    /// The stage.
    pub stage: u32,
    /// The replica that ran it.
    pub replica: u64,
    /// The function's configured memory size, in MiB.
    pub memory_mb: u64,
    /// Wall time of the call, measured by the coordinator, in milliseconds.
    pub duration_ms: f64,
    /// Whether the function produced an output (refused and failed calls are billed too).
    pub ok: bool,
}

impl Invocation {
    /// The billed duration: whole milliseconds, rounded up, at least one.
    pub fn billed_ms(&self) -> u64 {
        (self.duration_ms.ceil() as u64).max(1)
    }

    /// Memory size times billed duration, in GB-seconds (1 GB = 1024 MiB, as serverless
    /// platforms count).
    pub fn gb_seconds(&self) -> f64 {
        self.memory_mb as f64 / 1024.0 * self.billed_ms() as f64 / 1000.0
    }
}

/// Errors of the usage log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UsageError {
    /// The log could not be opened, written or read.
    #[error("usage log {path}: {source}")]
    Io {
        /// The log.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A complete line of the log is not a usage record.
    #[error("usage log {path}, line {line}: not a usage record")]
    Malformed {
        /// The log.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
    },
}

/// An append-only file of [`Invocation`] records.
#[derive(Debug)]
pub struct UsageLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl UsageLog {
    /// Opens (creating if needed) the log at `path` for appending.
    pub fn open(path: &Path) -> Result<Self, UsageError> {
        let io = |source| UsageError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        Ok(Self {
            path: path.to_owned(),
            file: Mutex::new(file),
        })
    }

    /// Appends one record with a single `write`.
    pub fn record(&self, invocation: &Invocation) -> Result<(), UsageError> {
        let mut line = serde_json::to_vec(invocation).map_err(|e| UsageError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(&line).map_err(|source| UsageError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Reads every complete record of the log at `path`. A last line without its newline
    /// (cut by a crash) is skipped and counted; any other bad line is an error.
    pub fn read(path: &Path) -> Result<(Vec<Invocation>, usize), UsageError> {
        let io = |source| UsageError::Io {
            path: path.to_owned(),
            source,
        };
        let mut reader = BufReader::new(File::open(path).map_err(io)?);
        let mut records = Vec::new();
        let mut torn = 0;
        let mut line = String::new();
        let mut number = 0;
        loop {
            line.clear();
            if reader.read_line(&mut line).map_err(io)? == 0 {
                break;
            }
            number += 1;
            if !line.ends_with('\n') {
                torn += 1;
                break;
            }
            if line.trim().is_empty() {
                continue;
            }
            let record =
                serde_json::from_str(line.trim_end()).map_err(|_| UsageError::Malformed {
                    path: path.to_owned(),
                    line: number,
                })?;
            records.push(record);
        }
        Ok((records, torn))
    }
}

/// What compute costs. The defaults are public list prices of late 2024: a serverless
/// platform's $0.0000166667 per GB-second and $0.20 per million invocations (AWS Lambda,
/// x86), and an always-on general-purpose VM's memory at about $0.0126 per GB-hour
/// (an m7i.large, $0.1008 an hour for 8 GB, with its CPUs included).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prices {
    /// Price of one GB-second of function time.
    pub gb_second: f64,
    /// Price of one million invocations.
    pub per_million_invocations: f64,
    /// Price of one GB-hour of an always-on server.
    pub server_gb_hour: f64,
}

impl Default for Prices {
    fn default() -> Self {
        Self {
            gb_second: 0.000_016_666_7,
            per_million_invocations: 0.20,
            server_gb_hour: 0.0126,
        }
    }
}

/// Usage of one group of invocations (a model, a stage or a request).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Usage {
    /// Invocations.
    pub invocations: u64,
    /// Billed GB-seconds.
    pub gb_seconds: f64,
}

impl Usage {
    fn add(&mut self, invocation: &Invocation) {
        self.invocations += 1;
        self.gb_seconds += invocation.gb_seconds();
    }
}

/// The bill of a usage log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageReport {
    /// Everything.
    pub total: Usage,
    /// Requests seen (distinct request ids).
    pub requests: u64,
    /// Per model.
    pub models: BTreeMap<String, Usage>,
    /// Per model and stage, keyed `model/stage`.
    pub stages: BTreeMap<String, Usage>,
    /// Per request id.
    pub by_request: BTreeMap<String, Usage>,
    /// The prices used.
    pub prices: Prices,
    /// Pay-per-use cost: GB-seconds and invocations at the serverless prices.
    pub serverless_cost: f64,
    /// The period the always-on comparison covers, in hours.
    pub period_hours: f64,
    /// Memory an always-on server needs to hold every stage seen at once, in GB.
    pub server_memory_gb: f64,
    /// Cost of that server, always on, for the period.
    pub always_on_cost: f64,
    /// Records skipped because a crash cut them short.
    pub torn_records: usize,
}

impl UsageReport {
    /// Adds up `records`. The always-on server holds one replica of every stage seen (the
    /// sum of their memory sizes) for `period_hours`, or, when `None`, for the span from
    /// the first invocation to the last (at least one second).
    pub fn new(
        records: &[Invocation],
        prices: Prices,
        period_hours: Option<f64>,
        torn_records: usize,
    ) -> Self {
        let mut total = Usage::default();
        let mut models: BTreeMap<String, Usage> = BTreeMap::new();
        let mut stages: BTreeMap<String, Usage> = BTreeMap::new();
        let mut by_request: BTreeMap<String, Usage> = BTreeMap::new();
        let mut stage_memory: BTreeMap<String, u64> = BTreeMap::new();
        for r in records {
            total.add(r);
            models.entry(r.model.clone()).or_default().add(r);
            let stage = format!("{}/{}", r.model, r.stage);
            let memory = stage_memory.entry(stage.clone()).or_default();
            *memory = (*memory).max(r.memory_mb);
            stages.entry(stage).or_default().add(r);
            by_request.entry(r.request_id.clone()).or_default().add(r);
        }
        let first = records
            .iter()
            .map(|r| r.at_ms.saturating_sub(r.billed_ms()))
            .min();
        let last = records.iter().map(|r| r.at_ms).max();
        let span_hours = match (first, last) {
            (Some(a), Some(b)) => (b.saturating_sub(a).max(1000)) as f64 / 3_600_000.0,
            _ => 0.0,
        };
        let period_hours = period_hours.unwrap_or(span_hours);
        let server_memory_gb = stage_memory.values().sum::<u64>() as f64 / 1024.0;
        Self {
            serverless_cost: total.gb_seconds * prices.gb_second
                + total.invocations as f64 / 1e6 * prices.per_million_invocations,
            always_on_cost: server_memory_gb * period_hours * prices.server_gb_hour,
            requests: by_request.len() as u64,
            total,
            models,
            stages,
            by_request,
            prices,
            period_hours,
            server_memory_gb,
            torn_records,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invocation(request: &str, model: &str, stage: u32, ms: f64, at_ms: u64) -> Invocation {
        Invocation {
            at_ms,
            request_id: request.into(),
            model: model.into(),
            stage,
            replica: 1,
            memory_mb: 512,
            duration_ms: ms,
            ok: true,
        }
    }

    #[test]
    fn billed_time_rounds_up_to_the_millisecond() {
        assert_eq!(invocation("a", "m", 0, 0.2, 0).billed_ms(), 1);
        assert_eq!(invocation("a", "m", 0, 10.0, 0).billed_ms(), 10);
        assert_eq!(invocation("a", "m", 0, 10.01, 0).billed_ms(), 11);
        // 512 MiB for 1 s is half a GB-second.
        assert!((invocation("a", "m", 0, 1000.0, 0).gb_seconds() - 0.5).abs() < 1e-12);
    }

    #[test]
    fn the_report_adds_up_per_model_stage_and_request() {
        let records = vec![
            invocation("r1", "m", 0, 100.0, 10_100),
            invocation("r1", "m", 1, 300.0, 10_400),
            invocation("r2", "m", 0, 100.0, 20_000),
            invocation("r3", "n", 0, 1000.0, 3_610_000),
        ];
        let report = UsageReport::new(&records, Prices::default(), None, 0);
        assert_eq!(report.total.invocations, 4);
        assert_eq!(report.requests, 3);
        let gbs = |ms: f64| 0.5 * ms / 1000.0;
        assert!((report.total.gb_seconds - gbs(1500.0)).abs() < 1e-12);
        assert!((report.models["m"].gb_seconds - gbs(500.0)).abs() < 1e-12);
        assert_eq!(report.stages["m/0"].invocations, 2);
        assert!((report.by_request["r1"].gb_seconds - gbs(400.0)).abs() < 1e-12);
        // Three stages seen at 512 MiB each: a 1.5 GB server, for one hour.
        assert!((report.server_memory_gb - 1.5).abs() < 1e-12);
        assert!((report.period_hours - 1.0).abs() < 1e-9);
        let p = Prices::default();
        assert!((report.always_on_cost - 1.5 * p.server_gb_hour).abs() < 1e-9);
        let expected = gbs(1500.0) * p.gb_second + 4.0 / 1e6 * p.per_million_invocations;
        assert!((report.serverless_cost - expected).abs() < 1e-15);
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_counted_and_other_damage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.jsonl");
        let log = UsageLog::open(&path).unwrap();
        log.record(&invocation("r1", "m", 0, 5.0, 1)).unwrap();
        log.record(&invocation("r2", "m", 0, 5.0, 2)).unwrap();
        drop(log);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(b"{\"at_ms\":3,\"requ");
        std::fs::write(&path, &bytes).unwrap();
        let (records, torn) = UsageLog::read(&path).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(torn, 1);

        std::fs::write(&path, b"{\"not\":\"a record\"}\n").unwrap();
        assert!(matches!(
            UsageLog::read(&path),
            Err(UsageError::Malformed { line: 1, .. })
        ));
    }
}
