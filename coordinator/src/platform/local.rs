//! The embedded default platform: each replica is a child process on this machine.
//!
//! A replica is started with the configured function command plus its stage arguments.
//! It attests, fetches and opens its shard, then prints one line on its standard output,
//! `SHARDSEAL_READY <addr>`; that line is the platform's only signal that the cold start
//! is over. Its standard error goes to a log file of its own, so a refused attestation
//! can be read afterwards. Nothing a function prints can contain a key: the function
//! logs names, sizes and timings only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use shardseal_attestation::ModelId;

use super::memory::{self, MemoryLimit};
use super::{Platform, PlatformError, Replica, StageRef};

/// The line a function prints once it is ready, followed by its listening address.
pub const READY_MARKER: &str = "SHARDSEAL_READY";

/// The environment variable that tells a function when it was spawned: `CLOCK_BOOTTIME`
/// in nanoseconds, read just before the spawn. The function times its start-up from it to
/// the nanosecond, where `/proc` gives its start to 10 ms; it is a timing for the logs,
/// decides nothing, and a function checks it against `/proc` before it believes it.
pub const SPAWNED_AT_ENV: &str = "SHARDSEAL_SPAWNED_AT_BOOTTIME_NS";

/// How to start functions on this machine.
#[derive(Debug, Clone)]
pub struct LocalPlatformConfig {
    /// The program and its leading arguments (e.g. `[shardseal, function]`).
    pub command: Vec<String>,
    /// Arguments every function gets (broker address, PKI, shard store, agent socket).
    pub common_args: Vec<String>,
    /// Folder for one stderr log per replica.
    pub log_dir: PathBuf,
    /// How long a cold start may take before the replica is killed.
    pub start_timeout: Duration,
    /// The memory every function may use, enforced by the kernel (none: unlimited).
    pub memory_limit: Option<MemoryLimit>,
    /// How many waiting requests the functions of a model may run as one batch
    /// (`--max-batch`); a model not named runs requests one by one.
    pub max_batch: HashMap<ModelId, u16>,
}

/// A running function process, and the cgroup confining it, if any.
struct LocalChild {
    child: Child,
    cgroup: Option<PathBuf>,
}

impl LocalChild {
    async fn stop(mut self) {
        let _ = self.child.kill().await;
        if let Some(cgroup) = &self.cgroup {
            memory::release(cgroup);
        }
    }
}

/// Functions as child processes.
pub struct LocalPlatform {
    config: LocalPlatformConfig,
    next_id: AtomicU64,
    children: Mutex<HashMap<u64, LocalChild>>,
}

impl LocalPlatform {
    /// A platform that starts functions with `config`.
    pub fn new(config: LocalPlatformConfig) -> Self {
        Self {
            config,
            next_id: AtomicU64::new(1),
            children: Mutex::new(HashMap::new()),
        }
    }

    /// The process id of a replica, while it runs (for tests that kill one).
    pub fn pid(&self, replica: &Replica) -> Option<u32> {
        self.children
            .lock()
            .ok()?
            .get(&replica.id)
            .and_then(|c| c.child.id())
    }

    /// The stderr log of a replica.
    pub fn log_path(&self, replica_id: u64) -> PathBuf {
        self.config
            .log_dir
            .join(format!("function-{replica_id}.log"))
    }

    fn spawn_error(stage: &StageRef, reason: impl Into<String>) -> PlatformError {
        PlatformError::Spawn {
            stage: stage.clone(),
            reason: reason.into(),
        }
    }
}

#[tonic::async_trait]
impl Platform for LocalPlatform {
    async fn start_replica(&self, stage: &StageRef) -> Result<Replica, PlatformError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (program, leading) = self
            .config
            .command
            .split_first()
            .ok_or_else(|| Self::spawn_error(stage, "no function command configured"))?;
        std::fs::create_dir_all(&self.config.log_dir)
            .map_err(|e| Self::spawn_error(stage, format!("log folder: {e}")))?;
        let log_path = self.log_path(id);
        let log = std::fs::File::create(&log_path)
            .map_err(|e| Self::spawn_error(stage, format!("{}: {e}", log_path.display())))?;
        let spawned_at = std::time::Instant::now();

        let mut command = Command::new(program);
        if let Ok(now) = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
            let nanos = std::time::Duration::from(now).as_nanos();
            command.env(SPAWNED_AT_ENV, nanos.to_string());
        }
        if let Some(limit) = &self.config.memory_limit {
            limit.prepare(&mut command);
        }
        let mut child = command
            .args(leading)
            .args(&self.config.common_args)
            .arg("--model")
            .arg(stage.model.as_str())
            .arg("--stage")
            .arg(stage.stage.0.to_string())
            .arg("--listen")
            .arg("127.0.0.1:0")
            .args(
                self.config
                    .max_batch
                    .get(&stage.model)
                    .filter(|&&n| n > 1)
                    .map(|n| ["--max-batch".to_owned(), n.to_string()])
                    .into_iter()
                    .flatten(),
            )
            .env("SHARDSEAL_EXIT_WITH_PARENT", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Self::spawn_error(stage, format!("{program}: {e}")))?;
        let cgroup = match (&self.config.memory_limit, child.id()) {
            (Some(limit), Some(pid)) => match limit.confine(id, pid) {
                Ok(cgroup) => cgroup,
                Err(e) => {
                    let _ = child.kill().await;
                    return Err(Self::spawn_error(stage, format!("memory cgroup: {e}")));
                }
            },
            _ => None,
        };
        let release_cgroup = |cgroup: &Option<PathBuf>| {
            if let Some(cgroup) = cgroup {
                memory::release(cgroup);
            }
        };

        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| Self::spawn_error(stage, "no stdout pipe"))?;
        let mut lines = BufReader::new(stdout).lines();
        let wait_ready = async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addr) = line.strip_prefix(READY_MARKER) {
                    return addr.trim().parse::<SocketAddr>().ok();
                }
            }
            None
        };
        let addr = match tokio::time::timeout(self.config.start_timeout, wait_ready).await {
            Ok(Some(addr)) => addr,
            Ok(None) => {
                let status = child
                    .wait()
                    .await
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                let last = last_log_line(&log_path);
                release_cgroup(&cgroup);
                return Err(PlatformError::ColdStartFailed {
                    stage: stage.clone(),
                    reason: format!("{status}: {last}"),
                });
            }
            Err(_) => {
                let _ = child.kill().await;
                release_cgroup(&cgroup);
                return Err(PlatformError::StartTimeout {
                    stage: stage.clone(),
                    seconds: self.config.start_timeout.as_secs(),
                });
            }
        };
        // Operators and `shardseal bench` read cold starts, and find the replica's
        // process, from this line.
        tracing::info!(
            model = %stage.model, stage = stage.stage.0, replica = id, pid = child.id().unwrap_or(0),
            spawn_to_ready_ms = spawned_at.elapsed().as_secs_f64() * 1e3,
            "replica ready"
        );
        // Keep draining stdout so a chatty function never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        if let Ok(mut children) = self.children.lock() {
            children.insert(id, LocalChild { child, cgroup });
        }
        Ok(Replica {
            id,
            stage: stage.clone(),
            endpoint: format!("https://{addr}"),
        })
    }

    async fn stop_replica(&self, replica: &Replica) {
        let child = self
            .children
            .lock()
            .ok()
            .and_then(|mut c| c.remove(&replica.id));
        if let Some(child) = child {
            child.stop().await;
        }
    }

    async fn shutdown(&self) {
        let children: Vec<LocalChild> = match self.children.lock() {
            Ok(mut c) => c.drain().map(|(_, child)| child).collect(),
            Err(_) => return,
        };
        for child in children {
            child.stop().await;
        }
    }
}

fn last_log_line(path: &std::path::Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "no output".to_owned())
}
