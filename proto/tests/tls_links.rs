//! Every internal link is TLS with a pinned CA; functions accept only the coordinator.

use std::net::SocketAddr;

use shardseal_proto::tls::{Pki, Role};
use shardseal_proto::v1::stage_function_client::StageFunctionClient;
use shardseal_proto::v1::stage_function_server::{StageFunction, StageFunctionServer};
use shardseal_proto::v1::{ProcessRequest, ProcessResponse, ReadyRequest, ReadyResponse};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Server};
use tonic::{Request, Response, Status};

struct AlwaysReady;

#[tonic::async_trait]
impl StageFunction for AlwaysReady {
    async fn process(
        &self,
        _: Request<ProcessRequest>,
    ) -> Result<Response<ProcessResponse>, Status> {
        Err(Status::unimplemented("test"))
    }
    async fn ready(&self, _: Request<ReadyRequest>) -> Result<Response<ReadyResponse>, Status> {
        Ok(Response::new(ReadyResponse {
            ready: true,
            stage: 7,
            ..Default::default()
        }))
    }
}

async fn serve_function(pki: &Pki) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = pki.server_config(Role::Function).unwrap();
    tokio::spawn(
        Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(StageFunctionServer::new(AlwaysReady))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

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
    let addr = serve_function(&pki).await;

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
    let addr = serve_function(&ours).await;
    let foreign = theirs
        .client_config(Role::Function, Some(Role::Coordinator))
        .unwrap();
    assert!(ready(addr, Some(foreign)).await.is_err());
}
