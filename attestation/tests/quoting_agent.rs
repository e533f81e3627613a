//! The software TEE end to end: a real quoting agent on a real Unix socket, real callers
//! (this test process, and a python process), the verifier, the policy and the nonces.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ring::digest;
use shardseal_attestation::{
    AgentSocket, AttestationError, Evidence, ManualClock, Measurement, ModelId, NonceRegistry,
    PlatformKey, QuotingAgent, ReleasePolicy, ReportData, SoftwareTeeVerifier, StageIndex, TeeKind,
    Verifier, bind_agent_socket, request_quote,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Agent {
    _dir: tempfile::TempDir,
    socket_path: PathBuf,
    platform: shardseal_attestation::PlatformPublicKey,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    socket: Option<AgentSocket>,
}

impl Agent {
    fn start() -> Self {
        Self::start_with(|agent| agent)
    }

    fn start_with(configure: impl FnOnce(QuotingAgent) -> QuotingAgent) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket_path = dir.path().join("agent.sock");
        let key = PlatformKey::create_file(&dir.path().join("platform.key")).unwrap();
        let platform = key.public_key();
        let (listener, socket) = bind_agent_socket(&socket_path, 0o600).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let agent = configure(QuotingAgent::new(key));
        let task = tokio::spawn(agent.run(listener, async {
            let _ = stopped.await;
        }));
        Self {
            _dir: dir,
            socket_path,
            platform,
            stop: Some(stop),
            task: Some(task),
            socket: Some(socket),
        }
    }

    fn policy_allowing(&self, measurement: Measurement) -> ReleasePolicy {
        let mut policy = ReleasePolicy::default();
        policy
            .trust_software_platform(self.platform)
            .allow(model(), StageIndex(0), measurement);
        policy
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).unwrap();
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
        drop(self.socket.take());
    }
}

fn model() -> ModelId {
    ModelId::new("resnet50").unwrap()
}

fn sha256_of(path: &Path) -> Measurement {
    let bytes = std::fs::read(path).unwrap();
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, &bytes).as_ref());
    Measurement(out)
}

fn this_test_binary() -> Measurement {
    sha256_of(&std::env::current_exe().unwrap())
}

fn ephemeral_key(fill: u8) -> [u8; 32] {
    [fill; 32]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_binary_is_measured_as_itself_and_released_once() {
    let agent = Agent::start();
    let nonces = NonceRegistry::new();
    let nonce = nonces.issue().unwrap();
    let expected = ReportData::bind(&ephemeral_key(1), &nonce);

    let evidence = request_quote(&agent.socket_path, &expected).await.unwrap();
    let policy = agent.policy_allowing(this_test_binary());
    let verified = policy
        .appraise(&evidence, &expected, &model(), StageIndex(0))
        .unwrap();
    assert_eq!(verified.measurement(), this_test_binary());
    assert_eq!(verified.tee(), TeeKind::SoftwareTee);
    assert_eq!(verified.report_data(), expected);
    nonces.consume(&nonce).unwrap();

    // The same evidence presented again still verifies, but its nonce is spent.
    let wire = Evidence::from_bytes(&evidence.to_bytes()).unwrap();
    policy
        .appraise(&wire, &expected, &model(), StageIndex(0))
        .unwrap();
    assert!(matches!(
        nonces.consume(&nonce),
        Err(AttestationError::NonceReused)
    ));
    agent.stop().await;
}

/// A python process connects to the same agent: it gets the measurement of the python
/// interpreter, whatever it sends, and the policy (which allows only this test binary)
/// refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_executable_gets_its_own_measurement_and_is_refused() {
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
    let agent = Agent::start();
    let nonces = NonceRegistry::new();
    let nonce = nonces.issue().unwrap();
    let expected = ReportData::bind(&ephemeral_key(2), &nonce);

    let output = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(CLIENT)
        .arg(&agent.socket_path)
        .arg(hex::encode(expected.as_bytes()))
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let mut lines = stdout.lines();
    let python_exe = PathBuf::from(lines.next().unwrap());
    let body = hex::decode(lines.next().unwrap()).unwrap();
    assert_eq!(
        body[0],
        0,
        "agent refused: {}",
        String::from_utf8_lossy(&body[1..])
    );
    let evidence = Evidence::from_bytes(&body[1..]).unwrap();

    let python = sha256_of(&python_exe);
    assert_ne!(python, this_test_binary());
    let verified = SoftwareTeeVerifier::new(vec![agent.platform])
        .verify(&evidence, &expected)
        .unwrap();
    assert_eq!(verified.measurement(), python);

    let policy = agent.policy_allowing(this_test_binary());
    let err = policy
        .appraise(&evidence, &expected, &model(), StageIndex(0))
        .unwrap_err();
    assert!(
        matches!(
            &err,
            AttestationError::MeasurementNotAllowed { measurement, model: m, stage }
                if *measurement == python && *m == model() && *stage == StageIndex(0)
        ),
        "{err:?}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quote_from_another_platform_is_untrusted() {
    let agent = Agent::start();
    let impostor = Agent::start();
    let expected = ReportData::bind(&ephemeral_key(3), &NonceRegistry::new().issue().unwrap());
    let evidence = request_quote(&impostor.socket_path, &expected)
        .await
        .unwrap();
    let err = agent
        .policy_allowing(this_test_binary())
        .appraise(&evidence, &expected, &model(), StageIndex(0))
        .unwrap_err();
    assert!(
        matches!(err, AttestationError::UntrustedPlatform),
        "{err:?}"
    );
    agent.stop().await;
    impostor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_data_for_another_key_or_nonce_is_a_mismatch() {
    let agent = Agent::start();
    let nonces = NonceRegistry::new();
    let nonce = nonces.issue().unwrap();
    let other_nonce = nonces.issue().unwrap();
    let evidence = request_quote(
        &agent.socket_path,
        &ReportData::bind(&ephemeral_key(4), &nonce),
    )
    .await
    .unwrap();
    let policy = agent.policy_allowing(this_test_binary());
    for expected in [
        ReportData::bind(&ephemeral_key(5), &nonce),
        ReportData::bind(&ephemeral_key(4), &other_nonce),
    ] {
        let err = policy
            .appraise(&evidence, &expected, &model(), StageIndex(0))
            .unwrap_err();
        assert!(
            matches!(err, AttestationError::ReportDataMismatch),
            "{err:?}"
        );
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_nonce_is_refused() {
    let agent = Agent::start();
    let clock = Arc::new(ManualClock::new());
    let nonces = NonceRegistry::with_clock(clock.clone(), Duration::from_secs(30), 100);
    let nonce = nonces.issue().unwrap();
    let expected = ReportData::bind(&ephemeral_key(6), &nonce);
    let evidence = request_quote(&agent.socket_path, &expected).await.unwrap();
    agent
        .policy_allowing(this_test_binary())
        .appraise(&evidence, &expected, &model(), StageIndex(0))
        .unwrap();
    clock.advance(Duration::from_secs(31));
    assert!(matches!(
        nonces.consume(&nonce),
        Err(AttestationError::NonceExpired)
    ));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_measurement_is_refused() {
    let agent = Agent::start();
    let expected = ReportData::bind(&ephemeral_key(7), &NonceRegistry::new().issue().unwrap());
    let evidence = request_quote(&agent.socket_path, &expected).await.unwrap();
    let mut policy = agent.policy_allowing(this_test_binary());
    policy.revoke(this_test_binary());
    let err = policy
        .appraise(&evidence, &expected, &model(), StageIndex(0))
        .unwrap_err();
    assert!(
        matches!(err, AttestationError::MeasurementRevoked { measurement } if measurement == this_test_binary()),
        "{err:?}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_evidence_is_refused() {
    let agent = Agent::start();
    let expected = ReportData::bind(&ephemeral_key(8), &NonceRegistry::new().issue().unwrap());
    let evidence = request_quote(&agent.socket_path, &expected).await.unwrap();
    let policy = agent.policy_allowing(this_test_binary());
    let bytes = evidence.to_bytes();

    // A measurement byte: the policy would refuse it anyway, but the signature fails first.
    let mut tampered = bytes.clone();
    tampered[6 + 4 + 6] ^= 0x80;
    let err = Evidence::from_bytes(&tampered)
        .and_then(|e| policy.appraise(&e, &expected, &model(), StageIndex(0)))
        .unwrap_err();
    assert!(matches!(err, AttestationError::BadSignature), "{err:?}");

    // A truncated copy does not even decode.
    let err = Evidence::from_bytes(&bytes[..bytes.len() - 1]).unwrap_err();
    assert!(matches!(err, AttestationError::Malformed(_)), "{err:?}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_requests_all_get_their_own_quote() {
    let agent = Agent::start();
    let nonces = Arc::new(NonceRegistry::new());
    let mut requests = Vec::new();
    for _ in 0..50 {
        let socket_path = agent.socket_path.clone();
        let nonce = nonces.issue().unwrap();
        requests.push(tokio::spawn(async move {
            let expected = ReportData::bind(&ephemeral_key(9), &nonce);
            let evidence = request_quote(&socket_path, &expected).await;
            (nonce, expected, evidence)
        }));
    }
    let policy = agent.policy_allowing(this_test_binary());
    let mut ok = 0;
    for request in requests {
        let (nonce, expected, evidence) = request.await.unwrap();
        let verified = policy
            .appraise(&evidence.unwrap(), &expected, &model(), StageIndex(0))
            .unwrap();
        assert_eq!(verified.report_data(), expected);
        nonces.consume(&nonce).unwrap();
        ok += 1;
    }
    assert_eq!(ok, 50);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_is_timed_out_with_a_refusal() {
    let agent = Agent::start_with(|a| a.request_timeout(Duration::from_millis(200)));
    let mut stream = UnixStream::connect(&agent.socket_path).await.unwrap();
    // Send half a request, then nothing.
    stream.write_all(&[0, 0, 0, 65, 1, 2, 3]).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    assert_eq!(response[4], 1, "expected a refusal");
    assert_eq!(
        std::str::from_utf8(&response[5..]).unwrap(),
        "timed out waiting for the quote request"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_refused_without_reading_it() {
    let agent = Agent::start();
    let mut stream = UnixStream::connect(&agent.socket_path).await.unwrap();
    stream.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    assert_eq!(
        std::str::from_utf8(&response[5..]).unwrap(),
        "malformed quote request: wrong length"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_private_unique_and_removed_on_shutdown() {
    let agent = Agent::start();
    let path = agent.socket_path.clone();
    let metadata = std::fs::symlink_metadata(&path).unwrap();
    assert!(metadata.file_type().is_socket());
    assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
    // A second agent cannot take over a live socket.
    let err = bind_agent_socket(&path, 0o600).unwrap_err();
    assert!(
        matches!(&err, AttestationError::Io { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse),
        "{err:?}"
    );
    // No staging directory is left next to it.
    let entries = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
    assert_eq!(entries, 3, "agent.sock, platform.key, platform.key.pub");

    agent.stop().await;
    assert!(!path.exists());
    let err = request_quote(&path, &ReportData([0; 64]))
        .await
        .unwrap_err();
    assert!(matches!(err, AttestationError::Io { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_is_replaced_and_a_regular_file_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    // A socket nobody listens on any more.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let (_listener, socket) = bind_agent_socket(&path, 0o600).unwrap();
    drop(socket);
    assert!(!path.exists());

    std::fs::write(&path, b"precious").unwrap();
    let err = bind_agent_socket(&path, 0o600).unwrap_err();
    assert!(
        matches!(&err, AttestationError::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists),
        "{err:?}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}
