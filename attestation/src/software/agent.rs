//! The quoting agent: the software TEE's stand-in for the CPU's quoting engine.

use std::fs;
use std::future::Future;
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::error::AttestationError;
use crate::evidence::{Evidence, Quote, TeeKind};
use crate::ids::Measurement;
use crate::software::PlatformKey;
use crate::software::caller::{CallerIdentity, MeasurementCache};
use crate::software::protocol;

/// How long a client has to send its request, and the agent to measure and answer, unless
/// configured otherwise.
pub const DEFAULT_AGENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How many connections the agent serves at once unless configured otherwise; more wait in
/// the listen backlog.
pub const DEFAULT_AGENT_MAX_CONNECTIONS: usize = 64;

/// Serves quotes over a Unix socket. For each connection it takes the caller's pid from the
/// socket's peer credentials (`SO_PEERCRED`, filled in by the kernel at `connect`), reads
/// the caller's 64 bytes of report data, hashes `/proc/<pid>/exe` itself, checks that the
/// caller neither exited nor executed another program meanwhile, and answers with evidence
/// signed by the platform key. The caller never states a measurement.
///
/// Each executable is hashed once and remembered by its file identity (device, inode,
/// size, mtime, ctime), read through the descriptor the agent hashes from; any change to
/// the file means a new hash. `caller.rs` says what this trusts.
#[derive(Debug)]
pub struct QuotingAgent {
    key: Arc<PlatformKey>,
    measurements: Arc<MeasurementCache>,
    request_timeout: Duration,
    max_connections: usize,
}

impl QuotingAgent {
    /// An agent that signs with `key`.
    pub fn new(key: PlatformKey) -> Self {
        Self {
            key: Arc::new(key),
            measurements: Arc::default(),
            request_timeout: DEFAULT_AGENT_REQUEST_TIMEOUT,
            max_connections: DEFAULT_AGENT_MAX_CONNECTIONS,
        }
    }

    /// Sets how long one connection may take from accept to answer; a stalled client is
    /// dropped after it.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets how many connections are served at once (at least one).
    pub fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// Measures the executable at `path` now, before any quote asks for it, so that the
    /// first function running it does not wait for its hash (a cold start's largest fixed
    /// cost on a big executable). Blocks for a read and SHA-256 of the whole file. A
    /// function running that very file is then measured from the cache; any change to the
    /// file gives it a new identity, hashed on its quote as usual.
    pub fn prewarm(&self, path: &Path) -> std::io::Result<Measurement> {
        self.measurements.prewarm(path)
    }

    /// Serves `listener` until `shutdown` completes, then stops accepting and lets the
    /// connections in flight finish (each is bounded by the request timeout).
    pub async fn run(self, listener: UnixListener, shutdown: impl Future<Output = ()>) {
        tracing::info!(platform_key = %self.key.public_key(), "quoting agent listening");
        let slots = Arc::new(Semaphore::new(self.max_connections));
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            while connections.try_join_next().is_some() {}
            let slot = tokio::select! {
                () = &mut shutdown => break,
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break, // The semaphore is never closed.
                },
            };
            let stream = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: wait rather than spin or die.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let key = self.key.clone();
            let measurements = self.measurements.clone();
            let timeout = self.request_timeout;
            connections.spawn(async move {
                serve_connection(stream, key, measurements, timeout).await;
                drop(slot);
            });
        }
        while connections.join_next().await.is_some() {}
        tracing::info!("quoting agent stopped");
    }
}

async fn serve_connection(
    mut stream: UnixStream,
    key: Arc<PlatformKey>,
    measurements: Arc<MeasurementCache>,
    timeout: Duration,
) {
    let response = tokio::time::timeout(timeout, quote_for_caller(&mut stream, &key, measurements))
        .await
        .unwrap_or(Err(AttestationError::Timeout("quote request")));
    match &response {
        Ok(evidence) => tracing::debug!(tee = %evidence.tee(), "quote issued"),
        Err(e) => tracing::warn!(error = %e, "quote refused"),
    }
    // The caller may have gone; there is no one left to tell then.
    let sent = tokio::time::timeout(timeout, protocol::write_response(&mut stream, &response));
    if let Ok(Err(e)) = sent.await {
        tracing::debug!(error = %e, "could not deliver the quote response");
    }
}

async fn quote_for_caller(
    stream: &mut UnixStream,
    key: &PlatformKey,
    measurements: Arc<MeasurementCache>,
) -> Result<Evidence, AttestationError> {
    let credentials = stream
        .peer_cred()
        .map_err(|e| AttestationError::io("reading the caller's credentials", e))?;
    let pid = credentials
        .pid()
        .ok_or(AttestationError::CallerUnidentified)?;
    // Pinned before the request is read, so a process that executes another program
    // between connecting and being measured is caught.
    let caller = blocking(move || CallerIdentity::of(pid)).await;
    // Read the request even when the caller cannot be identified: closing a Unix socket
    // with unread data resets it, and the caller would lose the refusal's reason.
    let report_data = protocol::read_request(stream).await;
    let (caller, report_data) = (caller?, report_data?);
    let cache = measurements.clone();
    let measurement = blocking(move || caller.measure(&cache)).await?;
    tracing::info!(
        pid = caller.pid(),
        %measurement,
        executables_hashed = measurements.hashes(),
        "measured caller"
    );
    key.sign_quote(&Quote {
        tee: TeeKind::SoftwareTee,
        measurement,
        report_data,
    })
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, AttestationError> + Send + 'static,
) -> Result<T, AttestationError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| AttestationError::io("measuring the caller", std::io::Error::other(e)))?
}

/// The agent's socket file; dropping it removes the file, unless it has been replaced by
/// another since.
#[derive(Debug)]
pub struct AgentSocket {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl AgentSocket {
    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AgentSocket {
    fn drop(&mut self) {
        if let Ok(metadata) = fs::symlink_metadata(&self.path)
            && metadata.dev() == self.dev
            && metadata.ino() == self.ino
        {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Binds the agent's Unix socket at `path` with permission bits `mode` (0600: only the
/// agent's own user may connect; 0660 to admit a group of function users). The socket is
/// bound inside a fresh 0700 directory, given its mode, and only then linked to `path`, so
/// it is never reachable with looser permissions, and an existing file is never replaced.
/// A stale socket left by a dead agent is removed; a live one is an error. Must be called
/// inside a tokio runtime.
pub fn bind_agent_socket(
    path: &Path,
    mode: u32,
) -> Result<(UnixListener, AgentSocket), AttestationError> {
    let context = || format!("binding the agent socket {}", path.display());
    remove_stale_socket(path)?;
    let staging = staging_dir(path)?;
    let bound = bind_in(&staging, path, mode & 0o777);
    let _ = fs::remove_dir_all(&staging);
    let listener = bound?;
    let metadata = fs::symlink_metadata(path).map_err(|e| AttestationError::io(context(), e))?;
    let socket = AgentSocket {
        path: path.to_owned(),
        dev: metadata.dev(),
        ino: metadata.ino(),
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| AttestationError::io(context(), e))?;
    let listener =
        UnixListener::from_std(listener).map_err(|e| AttestationError::io(context(), e))?;
    Ok((listener, socket))
}

fn bind_in(
    staging: &Path,
    path: &Path,
    mode: u32,
) -> Result<std::os::unix::net::UnixListener, AttestationError> {
    let context = || format!("binding the agent socket {}", path.display());
    let staged = staging.join("agent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&staged)
        .map_err(|e| AttestationError::io(context(), e))?;
    fs::set_permissions(&staged, fs::Permissions::from_mode(mode))
        .map_err(|e| AttestationError::io(context(), e))?;
    fs::hard_link(&staged, path).map_err(|e| AttestationError::io(context(), e))?;
    Ok(listener)
}

fn staging_dir(path: &Path) -> Result<PathBuf, AttestationError> {
    let mut suffix = [0u8; 8];
    SystemRandom::new()
        .fill(&mut suffix)
        .map_err(|_| AttestationError::Randomness)?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let staging = dir.join(format!(".shardseal-agent-{}", hex::encode(suffix)));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(|e| AttestationError::io(format!("creating {}", staging.display()), e))?;
    Ok(staging)
}

fn remove_stale_socket(path: &Path) -> Result<(), AttestationError> {
    let context = || format!("binding the agent socket {}", path.display());
    let metadata = match fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(AttestationError::io(context(), e)),
    };
    if !metadata.file_type().is_socket() {
        return Err(AttestationError::io(
            context(),
            std::io::Error::new(
                ErrorKind::AlreadyExists,
                "the path exists and is not a socket; refusing to replace it",
            ),
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(AttestationError::io(
            context(),
            std::io::Error::new(
                ErrorKind::AddrInUse,
                "another quoting agent is listening there",
            ),
        )),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            fs::remove_file(path).map_err(|e| AttestationError::io(context(), e))
        }
        Err(e) => Err(AttestationError::io(context(), e)),
    }
}
