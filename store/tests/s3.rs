//! The S3 backend against a real S3-compatible server, never a mock.
//!
//! The server is, in order of preference:
//! 1. the one at `SHARDSEAL_S3_TEST_ENDPOINT` (its bucket must exist; bucket, region and
//!    credentials default to the values below and can be overridden with
//!    `SHARDSEAL_S3_TEST_BUCKET`, `_REGION`, `_ACCESS_KEY_ID` and `_SECRET_ACCESS_KEY`);
//! 2. an `s3s-fs` found on PATH (`bash .ci/s3-server.sh` installs it), started for each test
//!    on a free loopback port with a temporary root, and killed afterwards;
//! 3. none: each test prints that it was SKIPPED and why, and passes, unless
//!    `SHARDSEAL_S3_TEST_REQUIRED` is set (as CI should), when it fails instead.

mod conformance;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shardseal_store::{Error, SecretAccessKey, ShardStore, StoreConfig, StoreKey};

const BUCKET: &str = "shardseal-test";
const REGION: &str = "us-east-1";
const ACCESS_KEY_ID: &str = "shardseal-test";
const SECRET_ACCESS_KEY: &str = "shardseal-test-secret";

/// How long a spawned server may take to say where it listens before the test gives up: a
/// guard against hanging, not a timed assertion.
const STARTUP_DEADLINE: Duration = Duration::from_secs(60);

/// A server for one test; a spawned one is killed on drop.
struct S3Server {
    endpoint: String,
    bucket: String,
    region: String,
    access_key_id: String,
    secret_access_key: String,
    child: Option<Child>,
    _root: Option<tempfile::TempDir>,
}

impl S3Server {
    /// The server to test against, or `None` (after printing why) if there is none.
    fn start(test: &str) -> Option<Self> {
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
        let root = tempfile::tempdir().unwrap();
        // s3s-fs serves each folder under its root as a bucket.
        std::fs::create_dir(root.path().join(BUCKET)).unwrap();
        let mut child = Command::new(binary)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args([
                "--access-key",
                ACCESS_KEY_ID,
                "--secret-key",
                SECRET_ACCESS_KEY,
            ])
            .arg(root.path())
            // Port 0: the kernel picks a free port and the server's log says which.
            .env("RUST_LOG", "s3s_fs=info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
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

    fn config(&self) -> StoreConfig {
        self.config_for(&self.bucket, &self.secret_access_key)
    }

    fn config_for(&self, bucket: &str, secret_access_key: &str) -> StoreConfig {
        StoreConfig::S3 {
            endpoint: Some(self.endpoint.clone()),
            bucket: bucket.into(),
            region: self.region.clone(),
            access_key_id: self.access_key_id.clone(),
            secret_access_key: SecretAccessKey::new(secret_access_key),
            allow_http: self.endpoint.starts_with("http://"),
        }
    }

    fn open(&self) -> Arc<dyn ShardStore> {
        self.config().open().unwrap()
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

/// A prefix no other run uses, so tests can share an external server.
fn unique_base(test: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("test-{}-{nanos}-{test}", std::process::id())
}

/// Runs one conformance scenario against a fresh server, then removes what it stored.
macro_rules! s3_scenario {
    ($name:ident $(, $check:expr)?) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let Some(server) = S3Server::start(stringify!($name)) else {
                return;
            };
            let store = server.open();
            let base = unique_base(stringify!($name));
            let _result = conformance::$name(store.as_ref(), &base).await;
            $( ($check)(&_result); )?
            for key in store.list(&base).await.unwrap() {
                store.delete(&key).await.unwrap();
            }
            assert!(store.list(&base).await.unwrap().is_empty());
        }
    };
}

s3_scenario!(round_trip);
s3_scenario!(large_object_streams_in_chunks, |sizes: &Vec<usize>| {
    eprintln!("20 MiB object read from S3 in {} chunks", sizes.len())
});
s3_scenario!(missing_objects);
s3_scenario!(listing);
s3_scenario!(failed_uploads_publish_nothing);
s3_scenario!(put_file);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_a_backend_error_that_names_no_credential() {
    let Some(server) = S3Server::start("refused_credentials") else {
        return;
    };
    let wrong_secret = "wrong-secret-0123456789";
    let config = server.config_for(&server.bucket, wrong_secret);
    let store = config.open().unwrap();
    let key = StoreKey::new(format!(
        "{}/models/m/v1/manifest.json",
        unique_base("refused")
    ))
    .unwrap();
    for result in [
        store.get(&key).await.map(drop),
        store
            .put(&key, bytes::Bytes::from_static(b"x"))
            .await
            .map(drop),
    ] {
        match result {
            Err(Error::Backend(message)) => {
                assert!(message.contains(key.as_str()), "{message}");
                assert!(!message.contains(wrong_secret), "{message}");
                assert!(!message.contains(&server.access_key_id), "{message}");
                assert!(!message.contains(&server.secret_access_key), "{message}");
            }
            other => panic!("expected a Backend error, got {other:?}"),
        }
    }
    // The Debug form names the bucket and endpoint, never a credential.
    let printed = format!("{store:?} {config:?}");
    assert!(printed.contains(&server.bucket), "{printed}");
    assert!(!printed.contains(wrong_secret), "{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_url_opens_the_same_bucket() {
    let Some(server) = S3Server::start("store_url") else {
        return;
    };
    let url = format!(
        "s3://{}?endpoint={}&region={}&allow_http={}",
        server.bucket,
        server.endpoint,
        server.region,
        server.endpoint.starts_with("http://")
    );
    let from_url = StoreConfig::from_url_with_env(&url, |name| match name {
        shardseal_store::ACCESS_KEY_ID_VAR => Some(server.access_key_id.clone()),
        shardseal_store::SECRET_ACCESS_KEY_VAR => Some(server.secret_access_key.clone()),
        _ => None,
    })
    .unwrap();
    assert_eq!(from_url, server.config());

    let key = StoreKey::new(format!(
        "{}/models/m/v1/manifest.json",
        unique_base("store_url")
    ))
    .unwrap();
    server
        .open()
        .put(&key, bytes::Bytes::from_static(b"signed manifest"))
        .await
        .unwrap();
    let store = from_url.open().unwrap();
    assert_eq!(store.get(&key).await.unwrap(), &b"signed manifest"[..]);
    store.delete(&key).await.unwrap();
}

#[tokio::test]
async fn an_https_store_opens_with_the_ring_tls_provider() {
    // Building the HTTPS client needs a rustls provider; without one, reqwest would panic here.
    // Nothing is sent: an S3 store is not contacted until its first request.
    let store = StoreConfig::S3 {
        endpoint: Some("https://127.0.0.1:1".into()),
        bucket: BUCKET.into(),
        region: REGION.into(),
        access_key_id: ACCESS_KEY_ID.into(),
        secret_access_key: SecretAccessKey::new(SECRET_ACCESS_KEY),
        allow_http: false,
    }
    .open()
    .unwrap();
    assert!(format!("{store:?}").contains("s3 bucket shardseal-test at https://127.0.0.1:1"));
    assert!(rustls::crypto::CryptoProvider::get_default().is_some());
}
