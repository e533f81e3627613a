//! TLS everywhere, against a running deployment: every internal endpoint (the coordinator,
//! the broker's function and owner APIs, every function) refuses plaintext h2c; a function
//! refuses a client without a certificate and a client presenting another role's
//! certificate; the broker refuses owner calls not signed by a trusted owner and key
//! requests without valid evidence.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use shardseal_keys::OwnerKeyStore;
use shardseal_keys::broker::{BrokerError, OwnerReleasePolicy};
use shardseal_proto::tls::Role;
use shardseal_proto::v1::coordinator_client::CoordinatorClient;
use shardseal_proto::v1::key_broker_client::KeyBrokerClient;
use shardseal_proto::v1::stage_function_client::StageFunctionClient;
use shardseal_proto::v1::{AttestRequest, GetPipelineRequest, NonceRequest, ReadyRequest};
use shardseal_testkit::cluster::Cluster;
use shardseal_testkit::models;
use shardseal_testkit::sealed::inputs_for;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

async fn channel(url: &str, tls: Option<ClientTlsConfig>) -> Result<Channel, String> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect_timeout(Duration::from_secs(20))
        .timeout(Duration::from_secs(20));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    endpoint
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))
}

fn plaintext(url: &str) -> String {
    url.replacen("https://", "http://", 1)
}

/// The TCP ports the processes that are children of `parent` listen on, from `/proc`.
fn listening_ports_of_children(parent: u32) -> Vec<u16> {
    let mut children = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{parent}/task"))
        .unwrap()
        .flatten()
    {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        children.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    let mut inodes = Vec::new();
    for pid in children {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let target = target.to_string_lossy().into_owned();
                if let Some(inode) = target
                    .strip_prefix("socket:[")
                    .and_then(|s| s.strip_suffix(']'))
                {
                    inodes.push(inode.to_owned());
                }
            }
        }
    }
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let mut ports = Vec::new();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // local_address, ..., st (0A = LISTEN), ..., inode (column 10).
        if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
            let port = f[1].rsplit(':').next().unwrap();
            ports.push(u16::from_str_radix(port, 16).unwrap());
        }
    }
    ports
}

/// A client of a function presenting `role`'s certificate and key as its own.
fn presenting(cluster: &Cluster, role: &str) -> ClientTlsConfig {
    let dir = cluster.state().join("pki");
    let read = |name: String| std::fs::read(dir.join(name)).unwrap();
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem".into())))
        .domain_name(Role::Function.server_name())
        .identity(Identity::from_pem(
            read(format!("{role}.pem")),
            read(format!("{role}.key")),
        ))
}

async fn function_ready(addr: SocketAddr, tls: Option<ClientTlsConfig>) -> Result<u32, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let channel = channel(&format!("{scheme}://{addr}"), tls).await?;
    StageFunctionClient::new(channel)
        .ready(ReadyRequest {})
        .await
        .map(|r| r.into_inner().stage)
        .map_err(|s| format!("call: {s}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_internal_endpoint_refuses_plaintext_and_the_wrong_identity() {
    let cluster = Cluster::start(shardseal()).await;
    let model = models::mlp(&Default::default());
    cluster.provision_and_register("mlp", &model, 2).await;
    let client = cluster.client().await;
    let inputs = inputs_for(&client, "mlp", 1).await;
    client.infer("mlp", inputs).await.expect("genuine request");

    // The coordinator: plaintext h2c is refused, TLS is served.
    let refused = match channel(&plaintext(&cluster.coordinator_url), None).await {
        Err(e) => Err(e),
        Ok(ch) => CoordinatorClient::new(ch)
            .get_pipeline(GetPipelineRequest {
                model_id: "mlp".into(),
            })
            .await
            .map(|_| ())
            .map_err(|s| s.to_string()),
    };
    assert!(refused.is_err(), "the coordinator answered plaintext");

    // The broker, function API and owner API alike: plaintext is refused.
    if let Ok(ch) = channel(&plaintext(&cluster.broker_url), None).await {
        let mut broker = KeyBrokerClient::new(ch);
        assert!(
            broker.get_nonce(NonceRequest {}).await.is_err(),
            "the broker's function API answered plaintext"
        );
        assert!(
            broker
                .get_broker_info(shardseal_proto::v1::BrokerInfoRequest {})
                .await
                .is_err(),
            "the broker's owner API answered plaintext"
        );
    }

    // Over TLS, the broker still refuses what is not authenticated: key requests without
    // valid evidence, and owner calls signed by an owner it does not trust.
    let pki = cluster.pki();
    let mut broker = KeyBrokerClient::new(
        channel(
            &cluster.broker_url,
            Some(pki.client_config(Role::Broker, None).unwrap()),
        )
        .await
        .unwrap(),
    );
    let nonce = broker
        .get_nonce(NonceRequest {})
        .await
        .unwrap()
        .into_inner();
    let status = broker
        .attest(AttestRequest {
            evidence: b"SSEV\x01\x01 no quote here".to_vec(),
            nonce: nonce.nonce,
            ephemeral_key: vec![9; 32],
            model_id: "mlp".into(),
            stage: 0,
        })
        .await
        .expect_err("keys released without evidence");
    assert!(
        matches!(
            status.code(),
            Code::InvalidArgument | Code::PermissionDenied
        ),
        "{status:?}"
    );
    let stranger_dir = tempfile::tempdir().unwrap();
    let stranger = OwnerKeyStore::init(&stranger_dir.path().join("owner")).unwrap();
    let manifest = cluster
        .provision(&stranger_dir.path().join("owner"), "stranger", &model, 1)
        .await;
    let measurement = *cluster.trust.measurements.iter().next().unwrap();
    let err = shardseal_keys::broker::owner::register(
        &cluster.broker_url,
        &pki,
        &stranger,
        &manifest,
        &OwnerReleasePolicy::same_for_all_stages(1, &[measurement]),
    )
    .await
    .expect_err("an untrusted owner registered a model");
    assert!(
        matches!(
            err,
            BrokerError::Refused {
                code: Code::PermissionDenied | Code::Unauthenticated,
                ..
            }
        ),
        "{err:?}"
    );

    // Every function: only the coordinator's client certificate gets in.
    let coordinator_pid: u32 =
        std::fs::read_to_string(cluster.state().join("logs").join("coordinator.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    let ports = listening_ports_of_children(coordinator_pid);
    assert_eq!(
        ports.len(),
        2,
        "one function per stage listening: {ports:?}"
    );
    let mut stages = Vec::new();
    for port in ports {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let as_coordinator = function_ready(addr, Some(presenting(&cluster, "coordinator"))).await;
        stages.push(
            as_coordinator
                .clone()
                .expect("the coordinator reaches a function"),
        );
        let plain = function_ready(addr, None).await;
        assert!(plain.is_err(), "a function answered plaintext: {plain:?}");
        let anonymous =
            function_ready(addr, Some(pki.client_config(Role::Function, None).unwrap())).await;
        assert!(
            anonymous.is_err(),
            "a function answered a client without a certificate"
        );
        for impostor in ["function", "broker"] {
            let result = function_ready(addr, Some(presenting(&cluster, impostor))).await;
            assert!(
                result.is_err(),
                "a function answered a client presenting the {impostor} certificate"
            );
        }
    }
    stages.sort();
    assert_eq!(stages, vec![0, 1]);
    cluster.stop().await;
}
