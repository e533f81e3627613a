//! One supervisor for the embedded default: the quoting agent, the key broker and the
//! coordinator run as separate processes (each its own trust domain), started in order,
//! each considered up when it prints `SHARDSEAL_READY <address>`, and stopped in reverse
//! order with SIGTERM (then SIGKILL after a grace period).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Set for every process a supervisor starts: such a process asks the kernel to stop it
/// when its parent dies, so a killed supervisor leaves no orphan holding keys or ports.
pub(crate) const PARENT_WATCH_ENV: &str = "SHARDSEAL_EXIT_WITH_PARENT";

/// A service process started by the supervisor.
pub(crate) struct Service {
    name: &'static str,
    child: Child,
    /// What it printed after `SHARDSEAL_READY`: its address or socket.
    pub(crate) ready: String,
    log: PathBuf,
}

/// Starts and stops the services of one state folder.
pub(crate) struct Supervisor {
    exe: PathBuf,
    log_dir: PathBuf,
    services: Vec<Service>,
}

impl Supervisor {
    /// A supervisor that starts `shardseal` subcommands from this executable and logs each
    /// service's stderr in `log_dir`.
    pub(crate) fn new(log_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(log_dir)
            .with_context(|| format!("creating {}", log_dir.display()))?;
        Ok(Self {
            exe: std::env::current_exe().context("locating this executable")?,
            log_dir: log_dir.to_path_buf(),
            services: Vec::new(),
        })
    }

    /// This executable (what functions run as, and so what is measured).
    pub(crate) fn exe(&self) -> &Path {
        &self.exe
    }

    /// Starts `shardseal <args>` and waits until it is ready.
    pub(crate) async fn start(
        &mut self,
        name: &'static str,
        args: &[String],
        timeout: Duration,
    ) -> anyhow::Result<&Service> {
        let log = self.log_dir.join(format!("{name}.log"));
        let stderr =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = Command::new(&self.exe)
            .args(args)
            .env(PARENT_WATCH_ENV, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the {name}"))?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(timeout, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix("SHARDSEAL_READY ") {
                    return Some(rest.trim().to_owned());
                }
            }
            None
        })
        .await;
        let ready = match ready {
            Ok(Some(ready)) => ready,
            Ok(None) => {
                let status = child
                    .wait()
                    .await
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                bail!(
                    "the {name} exited before it was ready ({status}); see {}",
                    log.display()
                );
            }
            Err(_) => {
                let _ = child.kill().await;
                bail!(
                    "the {name} was not ready within {} s; see {}",
                    timeout.as_secs(),
                    log.display()
                );
            }
        };
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        if let Some(pid) = child.id() {
            // For operators and tests that need to signal or inspect one service.
            let _ = std::fs::write(self.log_dir.join(format!("{name}.pid")), pid.to_string());
        }
        self.services.push(Service {
            name,
            child,
            ready,
            log,
        });
        self.services.last().context("service just started")
    }

    /// Whether every service still runs; the first one that exited, otherwise.
    pub(crate) fn check(&mut self) -> anyhow::Result<()> {
        for s in &mut self.services {
            if let Ok(Some(status)) = s.child.try_wait() {
                bail!("the {} stopped ({status}); see {}", s.name, s.log.display());
            }
        }
        Ok(())
    }

    /// Stops every service, newest first: SIGTERM, then SIGKILL after `grace`.
    pub(crate) async fn stop(&mut self, grace: Duration) {
        while let Some(mut s) = self.services.pop() {
            if let Some(pid) = s.child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if tokio::time::timeout(grace, s.child.wait()).await.is_err() {
                let _ = s.child.kill().await;
            }
        }
    }
}
