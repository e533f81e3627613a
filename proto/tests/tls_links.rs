//! Every internal link is TLS with a pinned CA; functions accept only the coordinator.

use std::net::SocketAddr;

use shardseal_proto::tls::{Pki, Role};
use shardseal_proto::v1::ReadyRequest;
use shardseal_proto::v1::stage_function_client::StageFunctionClient;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

mod support;
use support::serve_as;

async fn ready(addr: SocketAddr, tls: Option<ClientTlsConfig>) -> Result<u32, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}")).unwrap();
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    let channel: Channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let reply = StageFunctionClient::new(channel)
        .ready(ReadyRequest {})
        .await
        .map_err(|s| format!("call: {s}"))?;
    Ok(reply.into_inner().stage)
}

#[tokio::test]
async fn only_the_coordinator_reaches_a_function() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::create(&tmp.path().join("pki")).unwrap();
    let addr = serve_as(&pki, Role::Function).await;

    let coordinator = pki
        .client_config(Role::Function, Some(Role::Coordinator))
        .unwrap();
    assert_eq!(ready(addr, Some(coordinator)).await, Ok(7));

    let anonymous = pki.client_config(Role::Function, None).unwrap();
    assert!(
        ready(addr, Some(anonymous)).await.is_err(),
        "a client without a certificate got in"
    );

    assert!(
        ready(addr, None).await.is_err(),
        "a plaintext client got in"
    );

    // The function's certificate does not name the broker: a client dialing the broker
    // must not accept it.
    let wrong_role = pki
        .client_config(Role::Broker, Some(Role::Coordinator))
        .unwrap();
    assert!(
        ready(addr, Some(wrong_role)).await.is_err(),
        "a function passed as the broker"
    );
}

#[tokio::test]
async fn another_pki_is_not_trusted() {
    let tmp = tempfile::tempdir().unwrap();
    let ours = Pki::create(&tmp.path().join("ours")).unwrap();
    let theirs = Pki::create(&tmp.path().join("theirs")).unwrap();
    let addr = serve_as(&ours, Role::Function).await;
    let foreign = theirs
        .client_config(Role::Function, Some(Role::Coordinator))
        .unwrap();
    assert!(ready(addr, Some(foreign)).await.is_err());
}
