//! The embedded default's process tree and state folder, shared by `shardseal up` and
//! `shardseal demo`.
//!
//! ```text
//! STATE/
//!   pki/            local CA and TLS identities (CA key never written)
//!   agent/          platform.key (0600), platform.key.pub, agent.sock
//!   broker/         the broker's sealed state, identity (broker.pub) and audit log
//!   coordinator/    the coordinator's per-request audit log (audit/) and its signing
//!                   seed (audit.key, 0600; audit.key.pub); usage.jsonl, one billing
//!                   record per function invocation (`shardseal usage`)
//!   store/          the shard store: models/MODEL/vVERSION/stage-N.shard + manifest.json
//!   owner/          a model owner's key store (demo only)
//!   logs/           one stderr log per service and per function replica, and the
//!                   pid of each service (SERVICE.pid)
//!   hold/           SERVICE files: services `shardseal up` must not restart
//!   trust.json      what a data owner pins: broker key, function measurements, CA
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use shardseal_attestation::Measurement;
use shardseal_keys::VerifyingKey;
use shardseal_proto::tls::Pki;
use shardseal_sdk::Trust;

use crate::supervisor::Supervisor;

/// Paths inside a state folder.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    root: PathBuf,
}

impl Layout {
    pub(crate) fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }
    pub(crate) fn pki(&self) -> PathBuf {
        self.root.join("pki")
    }
    pub(crate) fn agent_socket(&self) -> PathBuf {
        self.root.join("agent").join("agent.sock")
    }
    pub(crate) fn platform_key(&self) -> PathBuf {
        self.root.join("agent").join("platform.key")
    }
    pub(crate) fn broker(&self) -> PathBuf {
        self.root.join("broker")
    }
    pub(crate) fn store(&self) -> PathBuf {
        self.root.join("store")
    }
    pub(crate) fn owner(&self) -> PathBuf {
        self.root.join("owner")
    }
    pub(crate) fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    pub(crate) fn coordinator_audit(&self) -> PathBuf {
        self.root.join("coordinator").join("audit")
    }
    pub(crate) fn coordinator_audit_key(&self) -> PathBuf {
        self.root.join("coordinator").join("audit.key")
    }
    pub(crate) fn usage_log(&self) -> PathBuf {
        self.root.join("coordinator").join("usage.jsonl")
    }
    /// Services held down: while `hold/<service>` exists, `shardseal up` does not restart
    /// that service if it stops.
    pub(crate) fn hold(&self) -> PathBuf {
        self.root.join("hold")
    }
    pub(crate) fn trust_file(&self) -> PathBuf {
        self.root.join("trust.json")
    }
}

/// The running services of one state folder.
pub(crate) struct Stack {
    pub(crate) layout: Layout,
    pub(crate) supervisor: Supervisor,
    pub(crate) pki: Pki,
    pub(crate) broker_url: String,
    pub(crate) broker_key: VerifyingKey,
    pub(crate) coordinator_url: Option<String>,
    /// The measurement of the function executable, hashed once.
    function_measurement: Measurement,
    /// The function program and its leading arguments, when not this executable's
    /// `function` subcommand.
    function_command: Vec<String>,
    /// More `shardseal coordinator` arguments (scaling, memory limit).
    coordinator_args: Vec<String>,
    /// The shard store functions read from, when not the state folder's `store/`.
    function_store: Option<String>,
}

const START_TIMEOUT: Duration = Duration::from_secs(60);

impl Stack {
    /// Creates what is missing in the state folder and starts the quoting agent and the
    /// key broker, which trusts `owner_keys` for its owner API and leases keys to functions
    /// for `token_lifetime_ms` (the broker's default if `None`). The agent measures the
    /// functions' executable as it starts: `function_program`, or this executable (whose
    /// `function` subcommand functions run by default).
    pub(crate) async fn start(
        state: &Path,
        owner_keys: &[VerifyingKey],
        token_lifetime_ms: Option<u64>,
        function_program: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let layout = Layout::new(state);
        for dir in [layout.broker(), layout.store(), layout.logs()] {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let agent_dir = layout.root.join("agent");
        std::fs::create_dir_all(&agent_dir)?;
        std::fs::set_permissions(
            &agent_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
        let pki = Pki::open_or_create(&layout.pki()).context("creating the local PKI")?;
        let mut supervisor = Supervisor::new(&layout.logs(), &layout.hold())?;
        let function_program = function_program.unwrap_or(supervisor.exe()).to_owned();

        supervisor
            .start(
                "quoting-agent",
                &[
                    "quoting-agent".into(),
                    "--socket".into(),
                    layout.agent_socket().display().to_string(),
                    "--key".into(),
                    layout.platform_key().display().to_string(),
                    "--prewarm".into(),
                    function_program.display().to_string(),
                ],
                START_TIMEOUT,
            )
            .await?;

        let mut broker_args = vec![
            "broker".to_owned(),
            "--state".into(),
            layout.broker().display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--pki".into(),
            layout.pki().display().to_string(),
            "--platform-key".into(),
            shardseal_attestation::public_key_path(&layout.platform_key())
                .display()
                .to_string(),
        ];
        for key in owner_keys {
            broker_args.extend(["--owner-key".to_owned(), key.to_hex()]);
        }
        if let Some(lifetime) = token_lifetime_ms {
            broker_args.extend(["--token-lifetime-ms".to_owned(), lifetime.to_string()]);
        }
        let broker = supervisor
            .start("broker", &broker_args, START_TIMEOUT)
            .await?;
        let broker_url = format!("https://{}", broker.ready);
        let broker_pub = layout.broker().join("broker.pub");
        let broker_key = read_verifying_key(&broker_pub)?;
        let function_measurement = measure_file(supervisor.exe())?;
        Ok(Self {
            layout,
            supervisor,
            pki,
            broker_url,
            broker_key,
            coordinator_url: None,
            function_measurement,
            function_command: Vec::new(),
            coordinator_args: Vec::new(),
            function_store: None,
        })
    }

    /// Passes `args` on to the coordinator when it starts (scaling and memory flags).
    pub(crate) fn add_coordinator_args(&mut self, args: impl IntoIterator<Item = String>) {
        self.coordinator_args.extend(args);
    }

    /// Runs functions as `command` (a program and its leading arguments, for example the
    /// standalone `shardseal-function`) instead of this executable's `function`
    /// subcommand. The program's file is what the quoting agent measures.
    pub(crate) fn use_function_command(&mut self, command: Vec<String>) -> anyhow::Result<()> {
        let program = command
            .first()
            .context("the function command names no program")?;
        self.function_measurement = measure_file(Path::new(program))?;
        self.function_command = command;
        Ok(())
    }

    /// Has functions read their shards from `store` (a folder or an `s3://` URL) instead of
    /// the state folder's `store/`.
    pub(crate) fn use_store(&mut self, store: String) {
        self.function_store = Some(store);
    }

    /// Starts the coordinator, serving `deployments` (model id, stage count).
    pub(crate) async fn start_coordinator(
        &mut self,
        listen: &str,
        deployments: &[(String, u32)],
        replicas: usize,
    ) -> anyhow::Result<String> {
        let l = &self.layout;
        let mut args = vec![
            "coordinator".to_owned(),
            "--listen".into(),
            listen.into(),
            "--broker".into(),
            self.broker_url.clone(),
            "--broker-key".into(),
            self.broker_key.to_hex(),
            "--pki".into(),
            l.pki().display().to_string(),
            "--store".into(),
            self.function_store
                .clone()
                .unwrap_or_else(|| l.store().display().to_string()),
            "--agent-socket".into(),
            l.agent_socket().display().to_string(),
            "--log-dir".into(),
            l.logs().display().to_string(),
            "--replicas".into(),
            replicas.to_string(),
            "--audit-dir".into(),
            l.coordinator_audit().display().to_string(),
            "--audit-key".into(),
            l.coordinator_audit_key().display().to_string(),
            "--usage-log".into(),
            l.usage_log().display().to_string(),
        ];
        args.extend(self.coordinator_args.iter().cloned());
        for (model, stages) in deployments {
            args.extend(["--deploy".to_owned(), format!("{model}={stages}")]);
        }
        if !self.function_command.is_empty() {
            // Last: `--function-command` takes every argument after it.
            args.push("--function-command".into());
            args.extend(self.function_command.iter().cloned());
        }
        // Deploying cold-starts every stage: give it time.
        let coordinator = self
            .supervisor
            .start("coordinator", &args, Duration::from_secs(300))
            .await?;
        let url = format!("https://{}", coordinator.ready);
        self.coordinator_url = Some(url.clone());
        Ok(url)
    }

    /// The measurement of the function executable the local platform runs.
    pub(crate) fn function_measurement(&self) -> Measurement {
        self.function_measurement
    }

    /// What a data owner of this deployment pins, written to `trust.json` too.
    pub(crate) fn write_trust(&self) -> anyhow::Result<Trust> {
        let trust = Trust {
            broker_key: self.broker_key,
            measurements: [self.function_measurement].into_iter().collect(),
            ca_pem: std::fs::read_to_string(self.layout.pki().join("ca.pem"))
                .context("reading the CA certificate")?,
        };
        let json = serde_json::to_vec_pretty(&trust)?;
        shardseal_keys::atomic_write(&self.layout.trust_file(), &json, 0o644)
            .context("writing trust.json")?;
        Ok(trust)
    }

    /// Stops every service.
    pub(crate) async fn stop(&mut self) {
        self.supervisor.stop(Duration::from_secs(10)).await;
    }
}

/// The measurement of the executable at `path`, as the quoting agent takes it.
fn measure_file(path: &Path) -> anyhow::Result<Measurement> {
    shardseal_attestation::measure_executable(path)
        .with_context(|| format!("reading {}", path.display()))
}

fn read_verifying_key(path: &Path) -> anyhow::Result<VerifyingKey> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.trim()
        .parse::<VerifyingKey>()
        .with_context(|| format!("{} is not a public key", path.display()))
}
