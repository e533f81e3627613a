//! TLS on every internal endpoint, per role: plaintext (h2c) is refused by every server,
//! a function accepts only the coordinator's client certificate (not a broker's or a
//! function's, although all chain to the same CA), and a peer that connects and never
//! finishes its handshake is dropped instead of holding a socket forever.

use std::net::SocketAddr;
use std::time::Duration;

use shardseal_proto::tls::{Pki, Role, TLS_HANDSHAKE_TIMEOUT};
use shardseal_proto::v1::ReadyRequest;
use shardseal_proto::v1::stage_function_client::StageFunctionClient;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

mod support;
use support::serve_as;

async fn ready(addr: SocketAddr, tls: Option<ClientTlsConfig>) -> Result<u32, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(20))
        .timeout(Duration::from_secs(20));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let reply = StageFunctionClient::new(channel)
        .ready(ReadyRequest {})
        .await
        .map_err(|s| format!("call: {s}"))?;
    Ok(reply.into_inner().stage)
}

/// A client of a function presenting `identity_of`'s certificate and key as its own.
fn client_presenting(pki: &Pki, identity_of: &str) -> ClientTlsConfig {
    let read = |name: String| std::fs::read(pki.dir().join(name)).unwrap();
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem".into())))
        .domain_name(Role::Function.server_name())
        .identity(Identity::from_pem(
            read(format!("{identity_of}.pem")),
            read(format!("{identity_of}.key")),
        ))
}

#[tokio::test]
async fn a_function_accepts_the_coordinator_certificate_and_no_other_role() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::create(&tmp.path().join("pki")).unwrap();
    let function = serve_as(&pki, Role::Function).await;

    assert_eq!(
        ready(function, Some(client_presenting(&pki, "coordinator"))).await,
        Ok(7)
    );
    for impostor in ["function", "broker"] {
        let result = ready(function, Some(client_presenting(&pki, impostor))).await;
        assert!(
            result.is_err(),
            "a client presenting the {impostor} certificate reached a function: {result:?}"
        );
    }
}

#[tokio::test]
async fn plaintext_h2c_is_refused_by_every_role() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::create(&tmp.path().join("pki")).unwrap();
    for role in Role::ALL {
        let addr = serve_as(&pki, role).await;
        let plain = ready(addr, None).await;
        assert!(plain.is_err(), "{role:?} answered plaintext: {plain:?}");
        // The same server speaks TLS to a client that expects its role.
        let caller = (role == Role::Function).then_some(Role::Coordinator);
        let tls = pki.client_config(role, caller).unwrap();
        assert_eq!(ready(addr, Some(tls)).await, Ok(7), "{role:?} over TLS");
    }
}

#[tokio::test]
async fn a_client_that_never_finishes_its_handshake_is_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::create(&tmp.path().join("pki")).unwrap();
    let mut checks = Vec::new();
    for role in Role::ALL {
        let addr = serve_as(&pki, role).await;
        let pki = pki.clone();
        checks.push(tokio::spawn(async move {
            // Connects, sends half a ClientHello record header, and stalls.
            let mut stalled = TcpStream::connect(addr).await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut stalled, &[0x16, 0x03, 0x01])
                .await
                .unwrap();
            // Meanwhile another client is served.
            let caller = (role == Role::Function).then_some(Role::Coordinator);
            let tls = pki.client_config(role, caller).unwrap();
            assert_eq!(
                ready(addr, Some(tls)).await,
                Ok(7),
                "{role:?} while stalled"
            );
            // The server closes the stalled socket once the handshake timeout passes. The
            // bound only keeps a regression from hanging the suite; it is not a speed claim.
            let mut buf = [0u8; 64];
            let closed =
                tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT * 6, stalled.read(&mut buf)).await;
            assert!(
                matches!(closed, Ok(Ok(0) | Err(_))),
                "{role:?} kept a stalled handshake open: {closed:?}"
            );
        }));
    }
    for check in checks {
        check.await.unwrap();
    }
}
