//! A stage-function test server behind a role's TLS configuration, shared by the TLS tests.

use std::net::SocketAddr;

use shardseal_proto::tls::{Pki, Role};
use shardseal_proto::v1::stage_function_server::{StageFunction, StageFunctionServer};
use shardseal_proto::v1::{ProcessRequest, ProcessResponse, ReadyRequest, ReadyResponse};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

/// Answers `Ready` with stage 7 and refuses `Process`.
pub struct AlwaysReady;

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

/// Serves [`AlwaysReady`] with the TLS configuration of `role`, on a free loopback port.
pub async fn serve_as(pki: &Pki, role: Role) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = pki.server_config(role).unwrap();
    tokio::spawn(
        Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(StageFunctionServer::new(AlwaysReady))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}
