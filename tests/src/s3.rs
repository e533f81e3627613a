//! A real S3-compatible server for tests, never a mock: shared by the shard store's S3 tests
//! (`store/tests/s3.rs`) and the end-to-end test that provisions to and serves from S3
//! (`cli/tests/s3_store_e2e.rs`).
//!
//! The server is, in order of preference:
//! 1. the one at `SHARDSEAL_S3_TEST_ENDPOINT` (its bucket must exist; bucket, region and
//!    credentials default to the constants below and can be overridden with
//!    `SHARDSEAL_S3_TEST_BUCKET`, `_REGION`, `_ACCESS_KEY_ID` and `_SECRET_ACCESS_KEY`);
//! 2. an `s3s-fs` found on PATH (`bash .ci/s3-server.sh` installs it), started for each test
//!    on a free loopback port with a temporary root, and killed when dropped;
//! 3. none: [`S3Server::start`] prints that the test was SKIPPED and why and returns `None`,
//!    unless `SHARDSEAL_S3_TEST_REQUIRED` is set (as CI sets it), when it panics instead.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The bucket a spawned server serves.
pub const BUCKET: &str = "shardseal-test";
/// The region requests are signed for.
pub const REGION: &str = "us-east-1";
/// The access key id of a spawned server.
pub const ACCESS_KEY_ID: &str = "shardseal-test";
/// The secret access key of a spawned server (a test credential, not a secret).
pub const SECRET_ACCESS_KEY: &str = "shardseal-test-secret";

/// How long a spawned server may take to say where it listens before the test gives up: a
/// guard against hanging, not a timed assertion.
const STARTUP_DEADLINE: Duration = Duration::from_secs(60);

/// An S3 server for one test; a spawned one is killed on drop.
#[derive(Debug)]
pub struct S3Server {
    /// The base URL, `http://127.0.0.1:PORT` for a spawned server.
    pub endpoint: String,
    /// A bucket that exists.
    pub bucket: String,
    /// The region.
    pub region: String,
    /// The access key id.
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: String,
    child: Option<Child>,
    _root: Option<tempfile::TempDir>,
}

impl S3Server {
    /// The server to test against, or `None` (after printing why) if there is none; panics
    /// instead of skipping when `SHARDSEAL_S3_TEST_REQUIRED` is set.
    pub fn start(test: &str) -> Option<Self> {
        let var = |name: &str, default: &str| {
            std::env::var(format!("SHARDSEAL_S3_TEST_{name}")).unwrap_or_else(|_| default.into())
        };
        if let Ok(endpoint) = std::env::var("SHARDSEAL_S3_TEST_ENDPOINT") {
            return Some(Self {
                endpoint,
                bucket: var("BUCKET", BUCKET),
                region: var("REGION", REGION),
                access_key_id: var("ACCESS_KEY_ID", ACCESS_KEY_ID),
                secret_access_key: var("SECRET_ACCESS_KEY", SECRET_ACCESS_KEY),
                child: None,
                _root: None,
            });
        }
        let Some(binary) = find_on_path("s3s-fs") else {
            let why = "no S3 server to test against: SHARDSEAL_S3_TEST_ENDPOINT is not set and \
                       no s3s-fs binary is on PATH (`bash .ci/s3-server.sh` installs it)";
            assert!(
                std::env::var_os("SHARDSEAL_S3_TEST_REQUIRED").is_none(),
                "{test}: {why}, and SHARDSEAL_S3_TEST_REQUIRED is set"
            );
            // Straight to stderr, past the test harness's capture, so a skip is always seen.
            let _ = writeln!(std::io::stderr(), "SKIPPED s3 test {test}: {why}");
            return None;
        };
        Some(Self::spawn(&binary))
    }

    fn spawn(binary: &Path) -> Self {
        let root = tempfile::tempdir().expect("temporary root for s3s-fs");
        // s3s-fs serves each folder under its root as a bucket.
        std::fs::create_dir(root.path().join(BUCKET)).expect("bucket folder");
        let mut child = Command::new(binary)
            // Port 0: the kernel picks a free port and the server's log says which.
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args([
                "--access-key",
                ACCESS_KEY_ID,
                "--secret-key",
                SECRET_ACCESS_KEY,
            ])
            .arg(root.path())
            .env("RUST_LOG", "s3s_fs=info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn s3s-fs");
        let stdout = child.stdout.take().expect("s3s-fs stdout");
        let (found, address) = mpsc::channel();
        std::thread::spawn(move || {
            let mut found = Some(found);
            // Keep draining after the address so the server never blocks on a full pipe.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(at) = line.find("server is running at http://") {
                    let url = line[at + "server is running at ".len()..]
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    if let Some(found) = found.take() {
                        let _ = found.send(url);
                    }
                }
            }
        });
        let endpoint = match address.recv_timeout(STARTUP_DEADLINE) {
            Ok(endpoint) => endpoint,
            Err(error) => {
                let _ = child.kill();
                panic!("s3s-fs did not report its address: {error}");
            }
        };
        Self {
            endpoint,
            bucket: BUCKET.into(),
            region: REGION.into(),
            access_key_id: ACCESS_KEY_ID.into(),
            secret_access_key: SECRET_ACCESS_KEY.into(),
            child: Some(child),
            _root: Some(root),
        }
    }

    /// Whether the endpoint is plain `http://` (a loopback test server).
    pub fn allow_http(&self) -> bool {
        self.endpoint.starts_with("http://")
    }

    /// The store URL of the bucket, as `--store` takes it:
    /// `s3://BUCKET?endpoint=…&region=…&allow_http=…`. It carries no credential.
    pub fn store_url(&self) -> String {
        format!(
            "s3://{}?endpoint={}&region={}&allow_http={}",
            self.bucket,
            self.endpoint,
            self.region,
            self.allow_http()
        )
    }

    /// The environment variables a process that opens [`store_url`](Self::store_url) needs.
    pub fn credentials_env(&self) -> [(&'static str, String); 2] {
        [
            ("AWS_ACCESS_KEY_ID", self.access_key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_access_key.clone()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// A name no other run uses (process id, time, test name), so tests can share an external
/// server: a key prefix, or a model id.
pub fn unique_name(test: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("test-{}-{nanos}-{test}", std::process::id())
}
