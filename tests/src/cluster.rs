//! A whole ShardSeal deployment for end-to-end tests, in a few lines:
//!
//! ```no_run
//! # async fn t() {
//! use shardseal_testkit::cluster::Cluster;
//! // The `shardseal` executable: an integration test of the CLI package passes
//! // `env!("CARGO_BIN_EXE_shardseal")`, which also makes cargo build it first.
//! let exe = std::path::Path::new("target/debug/shardseal");
//! let cluster = Cluster::start(exe).await;
//! let model = shardseal_testkit::models::mlp(&Default::default());
//! cluster.provision_and_register("mlp", &model, 2).await;
//! let client = cluster.client().await;
//! # }
//! ```
//!
//! Everything is real: `shardseal up` runs the quoting agent, the key broker and the
//! coordinator as separate processes over TLS on loopback ports; functions are child
//! processes of the coordinator that attest before they get keys. Provisioning runs the
//! `shardseal keys provision` command; registration uses the owner client library.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use shardseal_attestation::ModelVersion;
use shardseal_keys::OwnerKeyStore;
use shardseal_keys::broker::OwnerReleasePolicy;
use shardseal_proto::tls::{Pki, Role};
use shardseal_proto::v1::coordinator_client::CoordinatorClient;
use shardseal_sdk::{Client, Trust};
use shardseal_store::{ShardStore, StoreConfig, StoreKey};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};

/// A function process of a running deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionProcess {
    /// Its process id.
    pub pid: u32,
    /// The model it serves.
    pub model: String,
    /// The stage it serves.
    pub stage: u32,
}

/// A running deployment in a temporary state folder; stopped on drop.
pub struct Cluster {
    exe: PathBuf,
    state: tempfile::TempDir,
    up: Child,
    /// The coordinator's address.
    pub coordinator_url: String,
    /// The key broker's address.
    pub broker_url: String,
    /// What a data owner of this deployment pins.
    pub trust: Trust,
    /// The model owner of `STATE/owner`.
    pub owner: OwnerKeyStore,
    /// The shard store provisioning writes to and functions read from: `STATE/store`, or
    /// an `s3://` URL.
    store_url: String,
    /// The store's credentials, given to `shardseal up` and `keys provision` only.
    store_env: Vec<(&'static str, String)>,
}

impl Cluster {
    /// Starts a deployment of the `shardseal` executable `exe` whose broker trusts one
    /// model owner (`STATE/owner`).
    pub async fn start(exe: &Path) -> Self {
        Self::start_with::<&str>(exe, &[]).await
    }

    /// Starts a deployment with extra `shardseal up` arguments.
    pub async fn start_with<S: AsRef<OsStr>>(exe: &Path, extra_args: &[S]) -> Self {
        Self::launch(exe, extra_args, None, Vec::new()).await
    }

    /// Starts a deployment with extra `shardseal up` arguments and environment variables
    /// (which `shardseal up` passes on to every service and function it starts).
    pub async fn start_with_env<S: AsRef<OsStr>>(
        exe: &Path,
        extra_args: &[S],
        env: Vec<(&'static str, String)>,
    ) -> Self {
        Self::launch(exe, extra_args, None, env).await
    }

    /// Starts a deployment whose shard store is the bucket of `server`: provisioning uploads
    /// there and functions stream their shards from there.
    pub async fn start_with_s3(exe: &Path, server: &crate::s3::S3Server) -> Self {
        Self::launch::<&str>(
            exe,
            &[],
            Some(server.store_url()),
            server.credentials_env().to_vec(),
        )
        .await
    }

    async fn launch<S: AsRef<OsStr>>(
        exe: &Path,
        extra_args: &[S],
        store_url: Option<String>,
        store_env: Vec<(&'static str, String)>,
    ) -> Self {
        let state = tempfile::Builder::new()
            .prefix("shardseal-e2e-")
            .tempdir()
            .expect("temp dir");
        let owner = OwnerKeyStore::init(&state.path().join("owner")).expect("owner key store");
        let mut up = Command::new(exe)
            .arg("up")
            .arg("--state")
            .arg(state.path())
            .arg("--listen")
            .arg("127.0.0.1:0")
            .args(extra_args)
            .args(store_url.iter().flat_map(|url| ["--store", url.as_str()]))
            .envs(store_env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shardseal up");
        let mut lines = BufReader::new(up.stdout.take().expect("stdout")).lines();
        let ready = tokio::time::timeout(Duration::from_secs(120), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.strip_prefix("SHARDSEAL_READY ") {
                    return Some(url.trim().to_owned());
                }
            }
            None
        })
        .await;
        let coordinator_url = match ready {
            Ok(Some(url)) => url,
            other => {
                let _ = up.kill().await;
                let mut err = String::new();
                if let Some(mut e) = up.stderr.take() {
                    let _ = tokio::io::AsyncReadExt::read_to_string(&mut e, &mut err).await;
                }
                panic!("shardseal up did not start ({other:?}): {err}");
            }
        };
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let trust = Trust::from_file(&state.path().join("trust.json")).expect("trust.json");
        let broker_url = broker_url_from_log(state.path());
        Self {
            exe: exe.to_owned(),
            up,
            coordinator_url,
            broker_url,
            trust,
            owner,
            store_url: store_url
                .unwrap_or_else(|| state.path().join("store").display().to_string()),
            store_env,
            state,
        }
    }

    /// The state folder.
    pub fn state(&self) -> &Path {
        self.state.path()
    }

    /// Every function log of the deployment so far, concatenated.
    pub fn function_logs(&self) -> String {
        self.each_function_log().concat()
    }

    /// The functions' `cold start` log lines so far, in no particular order.
    pub fn cold_start_lines(&self) -> Vec<String> {
        self.function_logs()
            .lines()
            .filter(|l| l.contains(" cold start"))
            .map(str::to_owned)
            .collect()
    }

    /// Every function log of the deployment so far, one string per function process.
    pub fn each_function_log(&self) -> Vec<String> {
        std::fs::read_dir(self.state().join("logs"))
            .expect("the logs folder")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("function-"))
            .map(|e| std::fs::read_to_string(e.path()).expect("a function log"))
            .collect()
    }

    /// The local PKI.
    pub fn pki(&self) -> Pki {
        Pki::open(&self.state.path().join("pki")).expect("pki")
    }

    /// Provisions `model` (ONNX bytes) as `model_id` v1 in `stages` stages with the
    /// `shardseal keys provision` command, then registers it with the broker, allowing the
    /// function executable the local platform runs.
    pub async fn provision_and_register(&self, model_id: &str, model: &[u8], stages: u32) {
        self.provision_and_register_as(
            &self.owner,
            &self.state.path().join("owner"),
            model_id,
            model,
            stages,
        )
        .await;
    }

    /// As [`Cluster::provision_and_register`], for another owner's key store.
    pub async fn provision_and_register_as(
        &self,
        owner: &OwnerKeyStore,
        owner_dir: &Path,
        model_id: &str,
        model: &[u8],
        stages: u32,
    ) {
        let manifest = self.provision(owner_dir, model_id, model, stages).await;
        let measurement = self
            .trust
            .measurements
            .iter()
            .next()
            .copied()
            .expect("a trusted measurement");
        let policy = OwnerReleasePolicy::same_for_all_stages(stages, &[measurement]);
        self.register(owner, &manifest, &policy).await;
    }

    /// Provisions `model` (ONNX bytes) as `model_id` v1 in `stages` stages into this
    /// deployment's shard store (`keys provision --store`, to `models/MODEL/v1/`) with the
    /// key store in `owner_dir`; returns the signed model manifest.
    pub async fn provision(
        &self,
        owner_dir: &Path,
        model_id: &str,
        model: &[u8],
        stages: u32,
    ) -> Vec<u8> {
        let stages = stages.to_string();
        self.provision_with(owner_dir, model_id, model, &["--stages", &stages])
            .await
            .0
    }

    /// As [`Cluster::provision`], with planning arguments of `shardseal keys provision`
    /// (e.g. `--stages auto --memory-limit 256MiB`); returns the signed manifest and the
    /// number of stages written.
    pub async fn provision_with(
        &self,
        owner_dir: &Path,
        model_id: &str,
        model: &[u8],
        plan_args: &[&str],
    ) -> (Vec<u8>, u32) {
        let model_path = self.state.path().join(format!("{model_id}.onnx"));
        std::fs::write(&model_path, model).expect("write model");
        let output = Command::new(&self.exe)
            .args(["keys", "provision", "--model"])
            .arg(&model_path)
            .args(["--model-id", model_id])
            .args(plan_args)
            .arg("--keystore")
            .arg(owner_dir)
            .args(["--store", &self.store_url])
            .envs(self.store_env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run keys provision");
        assert!(
            output.status.success(),
            "keys provision failed for {model_id}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let model = shardseal_attestation::ModelId::new(model_id).expect("model id");
        let store = self.store();
        let manifest = StoreKey::manifest(&model, ModelVersion(1));
        let manifest = store
            .get(&manifest)
            .await
            .unwrap_or_else(|e| panic!("reading {manifest}: {e}"))
            .to_vec();
        let stages = store
            .list(&StoreKey::version_prefix(&model, ModelVersion(1)))
            .await
            .expect("listing the provisioned shards")
            .iter()
            .filter(|key| key.as_str().ends_with(".shard"))
            .count() as u32;
        (manifest, stages)
    }

    /// The deployment's shard store, opened with its credentials.
    pub fn store(&self) -> Arc<dyn ShardStore> {
        StoreConfig::from_url_with_env(&self.store_url, |name| {
            self.store_env
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
        })
        .and_then(|config| config.open())
        .expect("open the deployment's shard store")
    }

    /// Starts a stage function by hand, outside the coordinator, with the arguments the local
    /// platform gives it (`shardseal function --broker … --store … --model … --stage …`), as
    /// a cluster would run it; returns once it is ready. It reads this deployment's shard
    /// store. Killed on drop.
    pub async fn start_function(&self, model_id: &str, stage: u32) -> ReadyProcess {
        self.start_function_with(model_id, stage, &[]).await
    }

    /// As [`Cluster::start_function`], with extra function arguments.
    pub async fn start_function_with(
        &self,
        model_id: &str,
        stage: u32,
        extra_args: &[&str],
    ) -> ReadyProcess {
        let mut command = self.function_command(model_id, stage, &self.trust.broker_key.to_hex());
        command.args(extra_args);
        ReadyProcess::start(command, &format!("function {model_id}/{stage}")).await
    }

    /// The command [`Cluster::start_function`] runs, pinning `broker_key` (hex) as the
    /// broker's identity, not started.
    pub fn function_command(&self, model_id: &str, stage: u32, broker_key: &str) -> Command {
        let state = self.state.path();
        let mut command = Command::new(&self.exe);
        command
            .arg("function")
            .args(["--broker", &self.broker_url])
            .args(["--broker-key", broker_key])
            .arg("--pki")
            .arg(state.join("pki"))
            .arg("--agent-socket")
            .arg(state.join("agent").join("agent.sock"))
            .args(["--store", &self.store_url])
            .args(["--model", model_id, "--stage", &stage.to_string()])
            .args(["--listen", "127.0.0.1:0"])
            .envs(self.store_env.iter().map(|(k, v)| (*k, v.as_str())))
            .kill_on_drop(true);
        command
    }

    /// Starts another coordinator of this deployment on the static platform, routing to
    /// `endpoints` (`MODEL/STAGE=URL`) with `extra_args`; returns once it listens. Killed
    /// on drop.
    pub async fn start_static_coordinator(
        &self,
        endpoints: &[String],
        extra_args: &[&str],
    ) -> ReadyProcess {
        let mut command = Command::new(&self.exe);
        command
            .args(["coordinator", "--platform", "static"])
            .args(["--listen", "127.0.0.1:0"])
            .args(["--broker", &self.broker_url])
            .args(["--broker-key", &self.trust.broker_key.to_hex()])
            .arg("--pki")
            .arg(self.state.path().join("pki"))
            .args(endpoints.iter().flat_map(|e| ["--endpoint", e.as_str()]))
            .args(extra_args);
        ReadyProcess::start(command, "static coordinator").await
    }

    /// Registers a signed model `manifest` with the broker as `owner`, under `policy`.
    pub async fn register(
        &self,
        owner: &OwnerKeyStore,
        manifest: &[u8],
        policy: &OwnerReleasePolicy,
    ) {
        shardseal_keys::broker::owner::register(
            &self.broker_url,
            &self.pki(),
            owner,
            manifest,
            policy,
        )
        .await
        .expect("register the model with the broker");
    }

    /// A coordinator connection that sends whatever it is given, as an attacker's would
    /// (no message size limit of its own).
    pub async fn raw_coordinator(&self) -> CoordinatorClient<Channel> {
        let tls = shardseal_proto::tls::client_config_from_ca(
            self.trust.ca_pem.as_bytes(),
            Role::Coordinator,
        );
        let channel = Endpoint::from_shared(self.coordinator_url.clone())
            .expect("coordinator URL")
            .tls_config(tls)
            .expect("coordinator TLS")
            .connect()
            .await
            .expect("connect to the coordinator");
        CoordinatorClient::new(channel)
            .max_encoding_message_size(usize::MAX)
            .max_decoding_message_size(usize::MAX)
    }

    /// `shardseal audit show DIR --kind KIND --json`: the matching entries as JSON lines.
    pub fn audit_show(&self, dir: &Path, kind: &str) -> String {
        let out = std::process::Command::new(&self.exe)
            .args(["audit", "show"])
            .arg(dir)
            .args(["--kind", kind, "--json"])
            .output()
            .expect("run shardseal audit show");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8 JSON lines")
    }

    /// A client that trusts this deployment.
    pub async fn client(&self) -> Client {
        Client::connect(&self.coordinator_url, self.trust.clone())
            .await
            .expect("connect to the coordinator")
    }

    /// The coordinator's process id (from the supervisor's pid file).
    pub fn coordinator_pid(&self) -> u32 {
        self.service_pid("coordinator")
    }

    /// The process id of a service of `shardseal up` (`quoting-agent`, `broker` or
    /// `coordinator`), from the supervisor's pid file (rewritten on each restart).
    pub fn service_pid(&self, service: &str) -> u32 {
        let path = self
            .state
            .path()
            .join("logs")
            .join(format!("{service}.pid"));
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .parse()
            .expect("a pid")
    }

    /// Keeps `shardseal up` from restarting `service` if it stops (`STATE/hold/SERVICE`).
    pub fn hold(&self, service: &str) {
        let dir = self.state.path().join("hold");
        std::fs::create_dir_all(&dir).expect("hold folder");
        std::fs::write(dir.join(service), b"").expect("hold file");
    }

    /// Lets `shardseal up` restart `service` again.
    pub fn release(&self, service: &str) {
        std::fs::remove_file(self.state.path().join("hold").join(service)).expect("hold file");
    }

    /// Sends SIGKILL to `service` and returns its pid.
    pub fn kill_service(&self, service: &str) -> u32 {
        let pid = self.service_pid(service);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap_or_else(|e| panic!("kill -9 the {service}: {e}"));
        pid
    }

    /// Waits (up to `limit`) until `service` runs again under a pid other than `old`, and
    /// returns the new pid.
    pub async fn wait_for_restart(&self, service: &str, old: u32, limit: Duration) -> u32 {
        let until = std::time::Instant::now() + limit;
        loop {
            let pid = self.service_pid(service);
            if pid != old && Path::new(&format!("/proc/{pid}")).exists() {
                return pid;
            }
            assert!(
                std::time::Instant::now() < until,
                "the {service} was not restarted within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `shardseal audit verify DIR --key KEY`: panics unless the log verifies; returns the
    /// report it printed.
    pub fn audit_verify(&self, dir: &Path, key: &Path) -> String {
        let out = std::process::Command::new(&self.exe)
            .args(["audit", "verify"])
            .arg(dir)
            .arg("--key")
            .arg(key)
            .output()
            .expect("run shardseal audit verify");
        let report = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "audit verify {} failed: {}{}",
            dir.display(),
            report,
            String::from_utf8_lossy(&out.stderr)
        );
        report
    }

    /// The function processes the coordinator runs right now, read from `/proc`: the
    /// coordinator's children, with the model and stage from their command lines.
    pub fn function_processes(&self) -> Vec<FunctionProcess> {
        let coordinator = self.coordinator_pid();
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return out;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // `pid (comm) state ppid ...`: comm may hold spaces, so split after the `)`.
            let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                continue;
            };
            let mut fields = after.split_whitespace();
            let (state, ppid) = (fields.next(), fields.next().and_then(|p| p.parse().ok()));
            if ppid != Some(coordinator) || state == Some("Z") {
                continue;
            }
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let value = |flag: &str| {
                args.iter()
                    .position(|a| a == flag)
                    .and_then(|i| args.get(i + 1))
                    .cloned()
            };
            if let (Some(model), Some(stage)) = (value("--model"), value("--stage")) {
                out.push(FunctionProcess {
                    pid,
                    model,
                    stage: stage.parse().unwrap_or(u32::MAX),
                });
            }
        }
        out
    }

    /// How many function processes serve each stage of `model` (index = stage).
    pub fn replica_counts(&self, model: &str, stages: u32) -> Vec<usize> {
        let running = self.function_processes();
        (0..stages)
            .map(|stage| {
                running
                    .iter()
                    .filter(|f| f.model == model && f.stage == stage)
                    .count()
            })
            .collect()
    }

    /// Every file under the state folder, recursively (for plaintext canary scans).
    pub fn files(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        walk(&p, out);
                    } else {
                        out.push(p);
                    }
                }
            }
        }
        let mut out = Vec::new();
        walk(self.state.path(), &mut out);
        out
    }

    /// Stops every process.
    pub async fn stop(mut self) {
        self.terminate().await;
    }

    /// Stops every process and keeps the state folder for inspection; the caller removes
    /// it.
    pub async fn stop_keeping_state(mut self) -> PathBuf {
        self.terminate().await;
        self.state.disable_cleanup(true);
        self.state.path().to_owned()
    }

    async fn terminate(&mut self) {
        if let Some(pid) = self.up.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(20), self.up.wait())
            .await
            .is_err()
        {
            let _ = self.up.kill().await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SIGTERM lets `shardseal up` stop its services and their functions in order;
        // SIGKILL would orphan them.
        if let Some(pid) = self.up.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

/// A process started by a test that announced `SHARDSEAL_READY <addr>` on its stdout; killed
/// on drop.
pub struct ReadyProcess {
    child: Child,
    /// The address it announced, `host:port`.
    pub addr: String,
}

impl ReadyProcess {
    async fn start(mut command: Command, what: &str) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let ready = tokio::time::timeout(Duration::from_secs(120), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addr) = line.strip_prefix("SHARDSEAL_READY ") {
                    return Some(addr.trim().to_owned());
                }
            }
            None
        })
        .await;
        let addr = match ready {
            Ok(Some(addr)) => addr,
            other => {
                let _ = child.kill().await;
                panic!("{what} did not become ready ({other:?})");
            }
        };
        // Keep draining stdout so the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { child, addr }
    }

    /// The `https://` URL of the address it announced.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// The broker's address, as `shardseal up` recorded it.
fn broker_url_from_log(state: &Path) -> String {
    let path = state.join("broker.url");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_owned()
}

/// The value of `field` in a text log line (`field=value`); panics naming the line if the
/// field is missing.
pub fn log_field<'a>(line: &'a str, field: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(field)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {field} in {line}"))
}
