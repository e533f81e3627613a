//! `kill -9` of the broker while owners register models loses no acknowledged
//! registration: after each restart every acknowledged model is served with the same keys,
//! and the state (models and audit log) loads. Calls the kill left without an answer were
//! stored whole or not at all.
//!
//! The broker runs as a child process: this test binary started again with only
//! `child_broker_process` selected and its configuration in an environment variable.

mod broker_support;

use std::collections::{HashMap, VecDeque};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker_support::{Agent, Provisioned, connect, provision, this_test_binary};
use shardseal_attestation::StageIndex;
use shardseal_audit::{VerifyOptions, log_files, verify};
use shardseal_keys::broker::owner::OwnerClient;
use shardseal_keys::broker::{BROKER_PUB_FILE, BrokerConfig, KeyBroker, OwnerReleasePolicy};
use shardseal_keys::{
    OwnerKeyStore, RecipientPrivateKey, RecipientPublicKey, VerifyingKey, verify_pipeline,
};
use shardseal_proto::tls::Pki;
use shardseal_proto::v1::PipelineManifestRequest;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tonic::Code;

const CHILD_CONFIG_ENV: &str = "SHARDSEAL_TEST_BROKER_CONFIG";
const MODELS: usize = 24;
const WORKERS: usize = 4;
const KILL_AFTER_ACKS: usize = 4;

/// The broker process of the crash test. When this binary runs without the environment
/// variable (as a normal test), it does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_broker_process() {
    let Ok(config_path) = std::env::var(CHILD_CONFIG_ENV) else {
        return;
    };
    let config: BrokerConfig =
        serde_json::from_slice(&std::fs::read(config_path).unwrap()).unwrap();
    let broker = KeyBroker::open(config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("SHARDSEAL_READY {}", listener.local_addr().unwrap());
    // Stops when the parent closes stdin (or dies).
    let (closed, stdin_closed) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        let _ = std::io::Read::read(&mut std::io::stdin(), &mut byte);
        let _ = closed.send(());
    });
    let shutdown = async {
        let _ = stdin_closed.await;
    };
    broker.run(listener, shutdown).await.unwrap();
}

struct BrokerProcess {
    child: Child,
    url: String,
}

async fn spawn_broker(config_path: &Path) -> BrokerProcess {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["child_broker_process", "--exact", "--nocapture"])
        .env(CHILD_CONFIG_ENV, config_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let address = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("the broker exited before it was ready");
        if let Some(address) = line.strip_prefix("SHARDSEAL_READY ") {
            break address.to_owned();
        }
    };
    // Keep draining its output so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    BrokerProcess {
        child,
        url: format!("https://{address}"),
    }
}

/// What the workers of one round saw.
#[derive(Default)]
struct Outcomes {
    /// Registered: acknowledged now, or found already stored (by a call of an earlier
    /// round that the kill left without an answer).
    registered: Vec<String>,
    /// How many of those were found already stored.
    stored_unacknowledged: usize,
    /// The stage 0 key the broker published right after the registration, when it
    /// answered before the kill.
    stage0_keys: HashMap<String, RecipientPublicKey>,
    /// Calls without an answer: the broker died during them or before them.
    unanswered: Vec<String>,
}

/// One life of the broker: workers register what is queued; with `kill`, the broker gets
/// SIGKILL `delay` after the `acks`-th registration of this round.
async fn run_round(
    broker: &mut BrokerProcess,
    pki: &Pki,
    owner: &Arc<OwnerKeyStore>,
    policy: &Arc<OwnerReleasePolicy>,
    manifests: &Arc<HashMap<String, Vec<u8>>>,
    queue: VecDeque<String>,
    kill: Option<(usize, Duration)>,
) -> Outcomes {
    let queue = Arc::new(Mutex::new(queue));
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let kill_now = Arc::new(Notify::new());
    let kill_after = kill.map_or(usize::MAX, |(acks, _)| acks);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..WORKERS {
        let (queue, outcomes, kill_now) = (queue.clone(), outcomes.clone(), kill_now.clone());
        let (owner, policy, manifests) = (owner.clone(), policy.clone(), manifests.clone());
        let (url, pki) = (broker.url.clone(), pki.clone());
        workers.spawn(async move {
            let mut client = OwnerClient::connect(&url, &pki).await.unwrap();
            let mut function = connect(&url, &pki).await;
            loop {
                let Some(name) = queue.lock().unwrap().pop_front() else {
                    return;
                };
                let stored_before = match client.register(&owner, &manifests[&name], &policy).await
                {
                    Ok(_) => false,
                    Err(e) if e.code() == Code::AlreadyExists => true,
                    Err(_) => {
                        let mut seen = outcomes.lock().unwrap();
                        seen.unanswered.push(name);
                        seen.unanswered.extend(queue.lock().unwrap().drain(..));
                        return;
                    }
                };
                let registered = {
                    let mut seen = outcomes.lock().unwrap();
                    seen.registered.push(name.clone());
                    seen.stored_unacknowledged += usize::from(stored_before);
                    seen.registered.len()
                };
                if registered == kill_after {
                    kill_now.notify_one();
                }
                let published = function
                    .get_pipeline_manifest(PipelineManifestRequest {
                        model_id: name.clone(),
                    })
                    .await;
                if let Ok(blob) = published {
                    let pipeline =
                        verify_pipeline(&blob.into_inner(), &client.identity_key()).unwrap();
                    outcomes
                        .lock()
                        .unwrap()
                        .stage0_keys
                        .insert(name, pipeline.stage0_public_key);
                }
            }
        });
    }
    let workers_done = async {
        while let Some(worker) = workers.join_next().await {
            worker.unwrap();
        }
    };
    match kill {
        Some((_, delay)) => {
            tokio::pin!(workers_done);
            tokio::select! {
                _ = kill_now.notified() => {}
                _ = &mut workers_done => {}
            }
            // Land the kill at a different point of the next writes in each round.
            tokio::time::sleep(delay).await;
            broker.child.start_kill().unwrap();
            let status = broker.child.wait().await.unwrap();
            assert_eq!(status.signal(), Some(9), "{status:?}");
            workers_done.await;
        }
        None => workers_done.await,
    }
    std::mem::take(&mut *outcomes.lock().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_registrations_loses_no_acknowledged_model() {
    if std::env::var(CHILD_CONFIG_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(&dir.path().join("pki")).unwrap();
    let agent = Agent::start();
    let owner = Arc::new(OwnerKeyStore::init(&dir.path().join("owner")).unwrap());
    let state_dir = dir.path().join("broker");
    let mut config = BrokerConfig::new(&state_dir, pki.dir());
    config.trusted_roots.software_tee.push(agent.platform);
    config.owner_keys.push(owner.verifying_key());
    let config_path = dir.path().join("broker.json");
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();

    let policy = Arc::new(OwnerReleasePolicy::same_for_all_stages(
        2,
        &[this_test_binary()],
    ));
    let names: Vec<String> = (0..MODELS).map(|i| format!("model-{i:02}")).collect();
    let models: HashMap<String, Provisioned> = names
        .iter()
        .map(|name| (name.clone(), provision(&owner, name, 1, 2)))
        .collect();
    let manifests: Arc<HashMap<String, Vec<u8>>> = Arc::new(
        models
            .iter()
            .map(|(name, p)| (name.clone(), p.signed_manifest.clone()))
            .collect(),
    );

    let mut pinned: Option<VerifyingKey> = None;
    let mut registered: Vec<String> = Vec::new();
    let mut stage0_keys: HashMap<String, RecipientPublicKey> = HashMap::new();
    let mut queue: VecDeque<String> = names.iter().cloned().collect();
    let mut stored_unacknowledged = 0;
    let mut kills = 0;
    let rounds = [
        Some((KILL_AFTER_ACKS, Duration::ZERO)),
        Some((KILL_AFTER_ACKS, Duration::from_millis(3))),
        Some((KILL_AFTER_ACKS, Duration::from_millis(8))),
        None,
    ];
    let mut broker = None;
    for kill in rounds {
        // (Re)start on the same state: it loads, keeps its identity, and serves every
        // model registered so far with the keys it published before.
        let mut process = spawn_broker(&config_path).await;
        let identity: VerifyingKey = std::fs::read_to_string(state_dir.join(BROKER_PUB_FILE))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(*pinned.get_or_insert(identity), identity);
        let mut function = connect(&process.url, &pki).await;
        for name in &registered {
            let pipeline = published_pipeline(&mut function, name, &identity).await;
            if let Some(before) = stage0_keys.get(name) {
                assert_eq!(&pipeline.stage0_public_key, before, "{name}");
            }
        }
        let outcomes = run_round(
            &mut process,
            &pki,
            &owner,
            &policy,
            &manifests,
            std::mem::take(&mut queue),
            kill,
        )
        .await;
        kills += usize::from(kill.is_some());
        stored_unacknowledged += outcomes.stored_unacknowledged;
        registered.extend(outcomes.registered);
        stage0_keys.extend(outcomes.stage0_keys);
        queue.extend(outcomes.unanswered);
        broker = Some(process);
    }
    eprintln!(
        "{kills} kills; {stored_unacknowledged} registration(s) were stored but not yet \
         acknowledged when the broker died"
    );
    let mut broker = broker.unwrap();
    let pinned = pinned.unwrap();
    assert!(queue.is_empty());
    registered.sort();
    assert_eq!(registered, names);

    // Every model: both stages attest and get the keys the owner registered.
    let mut function = connect(&broker.url, &pki).await;
    for name in &names {
        let pipeline = published_pipeline(&mut function, name, &pinned).await;
        if let Some(before) = stage0_keys.get(name) {
            assert_eq!(&pipeline.stage0_public_key, before, "{name}");
        }
        check_served(
            &broker.url,
            &pki,
            &agent,
            &owner,
            &models[name],
            pipeline.stage0_public_key,
        )
        .await;
    }

    // A clean stop, then the audit log, cut by three kills, verifies under the broker's
    // identity key.
    drop(broker.child.stdin.take());
    assert!(broker.child.wait().await.unwrap().success());
    let audit: PathBuf = state_dir.join("audit");
    let report = verify(
        &log_files(&audit).unwrap(),
        &VerifyOptions::default().with_trusted_key(shardseal_audit::PublicKey(*pinned.as_bytes())),
    )
    .unwrap();
    assert!(report.events >= MODELS as u64);
    agent.stop().await;
}

async fn published_pipeline(
    function: &mut shardseal_proto::v1::key_broker_client::KeyBrokerClient<
        tonic::transport::Channel,
    >,
    name: &str,
    pinned: &VerifyingKey,
) -> shardseal_keys::PipelineManifest {
    let blob = function
        .get_pipeline_manifest(PipelineManifestRequest {
            model_id: name.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    verify_pipeline(&blob, pinned).unwrap()
}

/// Both stages of `model` attest and get the owner's shard keys and the stage keys the
/// pipeline manifest names.
async fn check_served(
    url: &str,
    pki: &Pki,
    agent: &Agent,
    owner: &OwnerKeyStore,
    model: &Provisioned,
    stage0_public_key: RecipientPublicKey,
) {
    let keys = owner.shard_keys(&model.model, model.version).unwrap();
    let mut client = connect(url, pki).await;
    let mut next = None;
    for stage in 0..2u32 {
        let attempt =
            broker_support::Attempt::prepare(&mut client, model.model.as_str(), stage).await;
        let evidence = attempt.quote(&agent.socket_path).await;
        let released = attempt.submit(&mut client, evidence).await.unwrap();
        assert_eq!(
            released.release.shard_key,
            keys.get(StageIndex(stage)).unwrap().expose_secret(),
            "{} stage {stage}",
            model.model
        );
        let public = RecipientPrivateKey::from_bytes(&released.release.stage_private_key)
            .unwrap()
            .public_key();
        match stage {
            0 => {
                assert_eq!(public, stage0_public_key);
                next = Some(
                    RecipientPublicKey::from_slice(&released.release.next_stage_public_key)
                        .unwrap(),
                );
            }
            _ => assert_eq!(Some(public), next),
        }
    }
}
