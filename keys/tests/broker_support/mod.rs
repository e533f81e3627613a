//! Test support for the key broker tests: a real quoting agent on a Unix socket, a PKI, an
//! owner key store, provisioned models, and a broker served over TLS on 127.0.0.1:0.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message;
use ring::digest;
use shardseal_attestation::{
    AgentSocket, Evidence, ManualClock, Measurement, ModelId, ModelVersion, Nonce, PlatformKey,
    PlatformPublicKey, QuotingAgent, ReportData, StageIndex, bind_agent_socket, request_quote,
};
use shardseal_keys::broker::{
    BrokerConfig, BrokerError, KeyBroker, OwnerReleasePolicy, owner::OwnerClient,
};
use shardseal_keys::{
    DType, KeyReleaseContext, ModelManifest, OwnerKeyStore, RecipientPrivateKey, Sealed,
    ShardBinding, ShardKeys, StageEntry, TensorSpec, open_key_release, seal_shard,
};
use shardseal_proto::tls::{Pki, Role};
use shardseal_proto::v1::key_broker_client::KeyBrokerClient;
use shardseal_proto::v1::{AttestRequest, AttestResponse, KeyRelease, NonceRequest, SignedBlob};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

/// A quoting agent serving on a socket in its own temporary folder, with its own
/// platform key.
pub struct Agent {
    _dir: tempfile::TempDir,
    pub socket_path: PathBuf,
    pub platform: PlatformPublicKey,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    _socket: AgentSocket,
}

impl Agent {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket_path = dir.path().join("agent.sock");
        let key = PlatformKey::generate().unwrap();
        let platform = key.public_key();
        let (listener, socket) = bind_agent_socket(&socket_path, 0o600).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(QuotingAgent::new(key).run(listener, async {
            let _ = stopped.await;
        }));
        Self {
            _dir: dir,
            socket_path,
            platform,
            stop: Some(stop),
            task: Some(task),
            _socket: socket,
        }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

pub fn sha256_of(path: &Path) -> Measurement {
    let bytes = std::fs::read(path).unwrap();
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, &bytes).as_ref());
    Measurement(out)
}

/// What the quoting agent measures this test process as.
pub fn this_test_binary() -> Measurement {
    sha256_of(&std::env::current_exe().unwrap())
}

/// A measurement no process here has.
pub fn some_other_binary() -> Measurement {
    Measurement([0x5e; 32])
}

fn spec(index: u32) -> TensorSpec {
    TensorSpec::new(format!("t{index}"), DType::F32, vec![1, 4])
}

/// One stage's shard, in the clear and sealed.
pub struct Shard {
    pub plaintext: Vec<u8>,
    pub sealed: Vec<u8>,
}

/// A model version provisioned by the owner: its signed manifest file and its shards (its
/// shard keys are in the owner's key store).
pub struct Provisioned {
    pub model: ModelId,
    pub version: ModelVersion,
    pub manifest: ModelManifest,
    pub signed_manifest: Vec<u8>,
    pub shards: Vec<Shard>,
}

/// Provisions `stages` stages of `model` at `version`: fresh shard keys stored in `store`,
/// a small sealed shard per stage, and a manifest signed by the store's key.
pub fn provision(store: &OwnerKeyStore, model: &str, version: u32, stages: u32) -> Provisioned {
    let model_id = ModelId::new(model).unwrap();
    let version = ModelVersion(version);
    let keys = ShardKeys::generate(stages).unwrap();
    let chunk_size = 64;
    let mut entries = Vec::new();
    let mut shards = Vec::new();
    for stage in 0..stages {
        let plaintext: Vec<u8> = (0..300 + stage)
            .map(|i| (i as u8).wrapping_mul(31) ^ stage as u8 ^ version.0 as u8)
            .collect();
        let binding = ShardBinding::new(model_id.clone(), version, StageIndex(stage));
        let mut sealed = Vec::new();
        let info = seal_shard(
            keys.get(StageIndex(stage)).unwrap(),
            &binding,
            chunk_size,
            &plaintext[..],
            &mut sealed,
        )
        .unwrap();
        entries.push(StageEntry {
            index: StageIndex(stage),
            inputs: vec![spec(stage)],
            outputs: vec![spec(stage + 1)],
            shard_file: format!("{model}-v{}-{stage}.shard", version.0),
            shard_digest: info.digest,
            shard_size: info.ciphertext_len,
            plaintext_size: info.plaintext_len,
            param_bytes: 0,
        });
        shards.push(Shard { plaintext, sealed });
    }
    let manifest = ModelManifest {
        model_id: model_id.clone(),
        version,
        chunk_size: chunk_size as u32,
        inputs: vec![spec(0)],
        outputs: vec![spec(stages)],
        stages: entries,
    };
    let signed_manifest = manifest.sign(store.signing_key()).unwrap().to_bytes();
    store.put_shard_keys(&model_id, version, &keys).unwrap();
    Provisioned {
        model: model_id,
        version,
        manifest,
        signed_manifest,
        shards,
    }
}

/// A broker served in this process.
pub struct RunningBroker {
    pub handle: KeyBroker,
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), BrokerError>>>,
}

impl RunningBroker {
    pub async fn start(config: BrokerConfig, clock: Arc<ManualClock>) -> Self {
        let handle = KeyBroker::open_with_clock(config, clock).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(handle.clone().run(listener, async {
            let _ = stopped.await;
        }));
        Self {
            handle,
            url,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

/// Everything a broker test needs, in one temporary folder.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub agent: Agent,
    pub owner: OwnerKeyStore,
    pub clock: Arc<ManualClock>,
    pub broker: RunningBroker,
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts with the default configuration (this agent's platform trusted, this owner
    /// authorized), changed by `configure`.
    pub async fn start_with(configure: impl FnOnce(&mut BrokerConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::create(&dir.path().join("pki")).unwrap();
        let agent = Agent::start();
        let owner = OwnerKeyStore::init(&dir.path().join("owner")).unwrap();
        let mut config = BrokerConfig::new(dir.path().join("broker"), pki.dir());
        config.trusted_roots.software_tee.push(agent.platform);
        config.owner_keys.push(owner.verifying_key());
        configure(&mut config);
        let clock = Arc::new(ManualClock::new());
        let broker = RunningBroker::start(config, clock.clone()).await;
        Self {
            dir,
            pki,
            agent,
            owner,
            clock,
            broker,
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("broker")
    }

    pub async fn function_client(&self) -> KeyBrokerClient<Channel> {
        connect(&self.broker.url, &self.pki).await
    }

    pub async fn owner_client(&self) -> OwnerClient {
        OwnerClient::connect(&self.broker.url, &self.pki)
            .await
            .unwrap()
    }

    /// Provisions and registers a model; panics if the broker refuses.
    pub async fn register(
        &self,
        model: &str,
        version: u32,
        stages: u32,
        policy: &OwnerReleasePolicy,
    ) -> Provisioned {
        let provisioned = provision(&self.owner, model, version, stages);
        let registered = self
            .owner_client()
            .await
            .register(&self.owner, &provisioned.signed_manifest, policy)
            .await
            .unwrap();
        assert_eq!(registered.model, provisioned.model);
        assert_eq!(registered.version, provisioned.version);
        provisioned
    }

    /// The whole function flow with this harness's agent: nonce, quote, attest, open.
    pub async fn attest(&self, model: &str, stage: u32) -> Result<Released, Status> {
        let mut client = self.function_client().await;
        let attempt = Attempt::prepare(&mut client, model, stage).await;
        let evidence = attempt.quote(&self.agent.socket_path).await;
        attempt.submit(&mut client, evidence).await
    }

    pub async fn stop(self) {
        drop(self.stop_keeping_files().await);
    }

    /// Stops the broker and the agent; the files stay until the returned folder drops.
    pub async fn stop_keeping_files(self) -> tempfile::TempDir {
        self.broker.stop().await;
        self.agent.stop().await;
        self.dir
    }
}

pub async fn connect(url: &str, pki: &Pki) -> KeyBrokerClient<Channel> {
    let channel = Endpoint::from_shared(url.to_owned())
        .unwrap()
        .tls_config(pki.client_config(Role::Broker, None).unwrap())
        .unwrap()
        .connect()
        .await
        .unwrap();
    KeyBrokerClient::new(channel)
}

/// A key release, opened as a function opens it.
pub struct Released {
    pub release: KeyRelease,
    pub token: SignedBlob,
}

/// One attestation in progress: an ephemeral key and a broker nonce.
pub struct Attempt {
    pub ephemeral: RecipientPrivateKey,
    pub nonce: Nonce,
    pub model: String,
    pub stage: u32,
}

impl Attempt {
    pub async fn prepare(client: &mut KeyBrokerClient<Channel>, model: &str, stage: u32) -> Self {
        let reply = client
            .get_nonce(NonceRequest {})
            .await
            .unwrap()
            .into_inner();
        Self {
            ephemeral: RecipientPrivateKey::generate().unwrap(),
            nonce: Nonce::from_bytes(reply.nonce.as_slice().try_into().unwrap()),
            model: model.to_owned(),
            stage,
        }
    }

    pub fn report_data(&self) -> ReportData {
        ReportData::bind(self.ephemeral.public_key().as_bytes(), &self.nonce)
    }

    /// Evidence for this process from the agent at `socket`.
    pub async fn quote(&self, socket: &Path) -> Evidence {
        request_quote(socket, &self.report_data()).await.unwrap()
    }

    pub fn request(&self, evidence: &Evidence) -> AttestRequest {
        AttestRequest {
            evidence: evidence.to_bytes(),
            nonce: self.nonce.as_bytes().to_vec(),
            ephemeral_key: self.ephemeral.public_key().as_bytes().to_vec(),
            model_id: self.model.clone(),
            stage: self.stage,
        }
    }

    pub async fn submit(
        &self,
        client: &mut KeyBrokerClient<Channel>,
        evidence: Evidence,
    ) -> Result<Released, Status> {
        let broker_id = hex::encode(
            client
                .get_broker_info(shardseal_proto::v1::BrokerInfoRequest {})
                .await?
                .into_inner()
                .identity_key,
        );
        let reply = client.attest(self.request(&evidence)).await?.into_inner();
        Ok(self.open(&broker_id, reply))
    }

    /// Opens a reply exactly as `function::cold_start` does.
    pub fn open(&self, broker_id: &str, reply: AttestResponse) -> Released {
        let sealed = Sealed::try_from(reply.release.unwrap()).unwrap();
        let context = KeyReleaseContext {
            broker_id: broker_id.to_owned(),
            nonce: self.nonce,
            model: ModelId::new(&self.model).unwrap(),
            stage: StageIndex(self.stage),
        };
        let plaintext = open_key_release(&self.ephemeral, &context, &sealed).unwrap();
        Released {
            release: KeyRelease::decode(plaintext.expose_secret()).unwrap(),
            token: reply.token.unwrap(),
        }
    }
}

/// Has python3 ask the agent at `socket` for a quote over `report_data`: evidence for the
/// python interpreter's measurement, which is returned with it.
pub async fn python_evidence(socket: &Path, report_data: &ReportData) -> (Evidence, Measurement) {
    const CLIENT: &str = r#"
import os, socket, struct, sys
report_data = bytes.fromhex(sys.argv[2])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(struct.pack(">I", 65) + b"\x01" + report_data)
def recv_exact(n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            sys.exit("agent closed the connection")
        buf += chunk
    return buf
(length,) = struct.unpack(">I", recv_exact(4))
body = recv_exact(length)
print(os.path.realpath("/proc/self/exe"))
print(body.hex())
"#;
    let output = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(CLIENT)
        .arg(socket)
        .arg(hex::encode(report_data.as_bytes()))
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let mut lines = stdout.lines();
    let exe = PathBuf::from(lines.next().unwrap());
    let body = hex::decode(lines.next().unwrap()).unwrap();
    assert_eq!(
        body[0],
        0,
        "agent refused: {}",
        String::from_utf8_lossy(&body[1..])
    );
    (Evidence::from_bytes(&body[1..]).unwrap(), sha256_of(&exe))
}
