//! One supervisor for the embedded default: the quoting agent, the key broker and the
//! coordinator run as separate processes (each its own trust domain), started in order,
//! each considered up when it prints `SHARDSEAL_READY <address>`, restarted when it dies,
//! and stopped in reverse order with SIGTERM (then SIGKILL after a grace period).
//!
//! A restarted service comes back on the address it had: a service started with
//! `--listen HOST:0` is restarted with `--listen` set to the address it printed, so the
//! broker URL functions hold and the coordinator URL clients hold stay valid; the quoting
//! agent binds the same socket path. Its state is on disk (the broker's registrations and
//! audit log, the coordinator's audit log), written atomically or recovered on open.
//!
//! Restarts back off (1 s, 2 s, 4 s ... 30 s) while a service keeps dying or failing to
//! start. An operator holds a service down (maintenance, or a test of an outage) by
//! creating the file `HOLD_DIR/<service>`: while it exists, the supervisor does not restart
//! that service.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Set for every process a supervisor starts: such a process asks the kernel to stop it
/// when its parent dies, so a killed supervisor leaves no orphan holding keys or ports.
pub(crate) const PARENT_WATCH_ENV: &str = "SHARDSEAL_EXIT_WITH_PARENT";

/// The longest wait between two restarts of a service that keeps failing.
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(30);

/// A service process started by the supervisor.
pub(crate) struct Service {
    name: &'static str,
    child: Option<Child>,
    /// What it printed after `SHARDSEAL_READY`: its address or socket.
    pub(crate) ready: String,
    log: PathBuf,
    /// The arguments a restart uses: the first start's, bound to the same address.
    restart_args: Vec<String>,
    timeout: Duration,
    /// Restarts since the service last ran well, and when the next may be tried.
    failures: u32,
    next_restart: Instant,
}

/// Starts, restarts and stops the services of one state folder.
pub(crate) struct Supervisor {
    exe: PathBuf,
    log_dir: PathBuf,
    hold_dir: PathBuf,
    services: Vec<Service>,
}

impl Supervisor {
    /// A supervisor that starts `shardseal` subcommands from this executable, logs each
    /// service's stderr in `log_dir` and leaves a service down while `hold_dir/<name>`
    /// exists.
    pub(crate) fn new(log_dir: &Path, hold_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(log_dir)
            .with_context(|| format!("creating {}", log_dir.display()))?;
        Ok(Self {
            exe: std::env::current_exe().context("locating this executable")?,
            log_dir: log_dir.to_path_buf(),
            hold_dir: hold_dir.to_path_buf(),
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
        let (child, ready) = self.spawn(name, args, stderr, &log, timeout).await?;
        self.services.push(Service {
            name,
            child: Some(child),
            restart_args: same_address(args, &ready),
            ready,
            log,
            timeout,
            failures: 0,
            next_restart: Instant::now(),
        });
        self.services.last().context("service just started")
    }

    async fn spawn(
        &self,
        name: &'static str,
        args: &[String],
        stderr: std::fs::File,
        log: &Path,
        timeout: Duration,
    ) -> anyhow::Result<(Child, String)> {
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
            let _ = shardseal_keys::atomic_write(
                &self.log_dir.join(format!("{name}.pid")),
                pid.to_string().as_bytes(),
                0o644,
            );
        }
        Ok((child, ready))
    }

    /// Restarts every service that exited, unless it is held down or backing off. Returns
    /// an error only for a service that cannot be restarted at all (its log cannot be
    /// opened, or this executable is gone).
    pub(crate) async fn restart_exited(&mut self) -> anyhow::Result<()> {
        for index in 0..self.services.len() {
            let s = &mut self.services[index];
            if let Some(child) = &mut s.child {
                match child.try_wait() {
                    Ok(None) => {
                        // Running: a service that ran for a while starts its backoff afresh.
                        if s.failures > 0 && Instant::now() > s.next_restart + MAX_RESTART_BACKOFF {
                            s.failures = 0;
                        }
                        continue;
                    }
                    Ok(Some(status)) => {
                        eprintln!(
                            "the {} stopped ({status}); restarting it (see {})",
                            s.name,
                            s.log.display()
                        );
                    }
                    Err(e) => {
                        eprintln!("the {} cannot be waited for ({e}); restarting it", s.name);
                    }
                }
                s.child = None;
            }
            if self.hold_dir.join(s.name).exists() || Instant::now() < s.next_restart {
                continue;
            }
            let (name, args, timeout, log) =
                (s.name, s.restart_args.clone(), s.timeout, s.log.clone());
            let stderr = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .with_context(|| format!("opening {}", log.display()))?;
            let restarted = self.spawn(name, &args, stderr, &log, timeout).await;
            let s = &mut self.services[index];
            match restarted {
                Ok((child, ready)) => {
                    eprintln!("the {name} is back at {ready}");
                    s.child = Some(child);
                    s.ready = ready;
                }
                Err(e) => eprintln!("restarting the {name} failed: {e:#}"),
            }
            let backoff = Duration::from_secs(1 << s.failures.min(5)).min(MAX_RESTART_BACKOFF);
            s.failures = s.failures.saturating_add(1);
            s.next_restart = Instant::now() + backoff;
        }
        Ok(())
    }

    /// Stops every service, newest first: SIGTERM, then SIGKILL after `grace`.
    pub(crate) async fn stop(&mut self, grace: Duration) {
        while let Some(s) = self.services.pop() {
            let Some(mut child) = s.child else { continue };
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if tokio::time::timeout(grace, child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
    }
}

/// `args` with the value of `--listen` replaced by `ready`, the address the service
/// announced: a port chosen by the system (`:0`) is kept across restarts.
fn same_address(args: &[String], ready: &str) -> Vec<String> {
    let mut out = args.to_vec();
    if let Some(i) = out.iter().position(|a| a == "--listen")
        && let Some(value) = out.get_mut(i + 1)
        && ready.parse::<std::net::SocketAddr>().is_ok()
    {
        *value = ready.to_owned();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_binds_the_address_first_announced() {
        let args: Vec<String> = [
            "broker",
            "--state",
            "s",
            "--listen",
            "127.0.0.1:0",
            "--pki",
            "p",
        ]
        .map(String::from)
        .to_vec();
        let again = same_address(&args, "127.0.0.1:41234");
        assert_eq!(again[4], "127.0.0.1:41234");
        assert_eq!(again[..4], args[..4]);
        assert_eq!(again[5..], args[5..]);
        // A socket path (the quoting agent) is not an address: nothing changes.
        let agent: Vec<String> = ["quoting-agent", "--socket", "/s/agent.sock"]
            .map(String::from)
            .to_vec();
        assert_eq!(same_address(&agent, "/s/agent.sock"), agent);
    }
}
