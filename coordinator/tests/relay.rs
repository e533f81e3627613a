//! The router's relay of answers in pieces, against stand-in functions that only move
//! bytes (no keys, no model): what reaches a stage is exactly one stage's whole answer,
//! even when the replica sending it dies halfway.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use shardseal_attestation::ModelId;
use shardseal_coordinator::platform::{Platform, PlatformError, Replica, StageRef};
use shardseal_coordinator::router::{Router, RouterConfig};
use shardseal_proto::pieces::{PIECE_BYTES, Pieces};
use shardseal_proto::tls::{Pki, Role};
use shardseal_proto::v1::stage_function_server::{StageFunction, StageFunctionServer};
use shardseal_proto::v1::{
    ActivationPiece, ProcessRequest, ProcessResponse, ReadyRequest, ReadyResponse, RequestHeader,
    Sealed, StageTiming,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic::{Request, Response, Status, Streaming};

/// A stage-0 answer of three pieces and a bit, so that it is relayed in several.
const ANSWER_BYTES: usize = 3 * PIECE_BYTES + 100;

/// What a stand-in function does with a request.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Answers `ANSWER_BYTES` of `fill`, in pieces.
    Answer { fill: u8 },
    /// Sends the first piece of such an answer, then fails as a dying replica's call does.
    DieHalfway { fill: u8 },
    /// Answers a small, fixed output, after checking the request added up.
    Last,
}

/// A stand-in function; every request it gathered, whole or not, is kept.
#[derive(Clone)]
struct StandIn {
    behaviour: Behaviour,
    received: Arc<Mutex<Vec<Result<Sealed, String>>>>,
}

type Answers = tokio_stream::Iter<std::vec::IntoIter<Result<ActivationPiece, Status>>>;

#[tonic::async_trait]
impl StageFunction for StandIn {
    async fn process(
        &self,
        _: Request<ProcessRequest>,
    ) -> Result<Response<ProcessResponse>, Status> {
        Err(Status::unimplemented("the router relays in pieces"))
    }

    type ProcessPiecesStream = Answers;

    async fn process_pieces(
        &self,
        request: Request<Streaming<ActivationPiece>>,
    ) -> Result<Response<Answers>, Status> {
        let mut incoming = request.into_inner();
        let gathered = async {
            let first = incoming
                .message()
                .await?
                .ok_or(Status::invalid_argument("empty"))?;
            let mut pieces = Pieces::start(first, usize::MAX)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            while let Some(piece) = incoming.message().await? {
                pieces
                    .push(piece)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
            }
            pieces
                .finish()
                .map_err(|e| Status::invalid_argument(e.to_string()))
        }
        .await;
        let outcome = gathered.as_ref().map(|p| p.clone().into_sealed());
        self.received
            .lock()
            .unwrap()
            .push(outcome.map_err(|s| s.message().to_owned()));
        gathered?;
        let answer = |fill: u8, len: usize| {
            Pieces::from_sealed(Sealed {
                enc: Bytes::from(vec![fill; 32]),
                ciphertext: Bytes::from(vec![fill; len]),
            })
            .to_messages(None, 0, Some(StageTiming::default()))
        };
        let messages: Vec<Result<ActivationPiece, Status>> = match self.behaviour {
            Behaviour::Answer { fill } => answer(fill, ANSWER_BYTES).into_iter().map(Ok).collect(),
            Behaviour::DieHalfway { fill } => {
                let mut messages = answer(fill, ANSWER_BYTES);
                messages.truncate(1);
                let mut messages: Vec<_> = messages.into_iter().map(Ok).collect();
                messages.push(Err(Status::unavailable("the function process exited")));
                messages
            }
            Behaviour::Last => answer(9, 64).into_iter().map(Ok).collect(),
        };
        Ok(Response::new(tokio_stream::iter(messages)))
    }

    async fn ready(&self, _: Request<ReadyRequest>) -> Result<Response<ReadyResponse>, Status> {
        Err(Status::unimplemented("not asked"))
    }
}

async fn serve(pki: &Pki, function: StandIn) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::builder()
        .tls_config(pki.server_config(Role::Function).unwrap())
        .unwrap()
        .add_service(StageFunctionServer::new(function))
        .serve_with_incoming(TcpListenerStream::new(listener));
    tokio::spawn(server);
    addr
}

/// Hands out the given endpoints of each stage in turn, and remembers what it stopped.
struct Endpoints {
    stages: Mutex<Vec<Vec<SocketAddr>>>,
    next_id: Mutex<u64>,
    stopped: Mutex<Vec<String>>,
}

#[tonic::async_trait]
impl Platform for Endpoints {
    async fn start_replica(&self, stage: &StageRef) -> Result<Replica, PlatformError> {
        let addr = self.stages.lock().unwrap()[stage.stage.0 as usize].remove(0);
        let mut id = self.next_id.lock().unwrap();
        *id += 1;
        Ok(Replica {
            id: *id,
            stage: stage.clone(),
            endpoint: format!("https://{addr}"),
        })
    }

    async fn stop_replica(&self, replica: &Replica) {
        self.stopped.lock().unwrap().push(replica.endpoint.clone());
    }

    async fn shutdown(&self) {}
}

fn stand_in(behaviour: Behaviour) -> StandIn {
    StandIn {
        behaviour,
        received: Arc::default(),
    }
}

#[tokio::test]
async fn a_stage_dying_halfway_through_its_answer_is_run_again_and_the_next_stage_gets_only_the_whole_new_answer()
 {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(&dir.path().join("pki")).unwrap();
    let dying = stand_in(Behaviour::DieHalfway { fill: 1 });
    let healthy = stand_in(Behaviour::Answer { fill: 2 });
    let last = stand_in(Behaviour::Last);
    let dying_at = serve(&pki, dying.clone()).await;
    let platform = Arc::new(Endpoints {
        stages: Mutex::new(vec![
            vec![dying_at, serve(&pki, healthy.clone()).await],
            vec![serve(&pki, last.clone()).await],
        ]),
        next_id: Mutex::new(0),
        stopped: Mutex::default(),
    });
    let router = Arc::new(Router::new(platform.clone(), &pki, RouterConfig::default()).unwrap());
    let model = ModelId::new("relay").unwrap();
    router.deploy(model.clone(), 2).await.unwrap();

    let input = Sealed {
        enc: Bytes::from_static(&[0; 32]),
        ciphertext: Bytes::from(vec![0; 2 * PIECE_BYTES + 1]),
    };
    let header = RequestHeader {
        model_id: model.to_string(),
        version: 1,
        request_id: vec![7; 16],
        response_key: vec![8; 32],
    };
    let routed = router
        .route(header, input.clone(), None)
        .await
        .expect("routed after running stage 0 again");

    assert_eq!(routed.output.ciphertext, Bytes::from(vec![9u8; 64]));
    assert_eq!(routed.retries, 1);
    // Stage 0 got the client's input whole, twice: from the dying replica and from the
    // one that ran it again.
    for function in [&dying, &healthy] {
        let received = function.received.lock().unwrap();
        assert_eq!(*received, vec![Ok(input.clone())]);
    }
    // Stage 1's first call, fed the dying replica's piece, ended short and was refused;
    // the one it served is exactly the healthy replica's answer, nothing of the other's.
    let received = last.received.lock().unwrap();
    assert_eq!(received.len(), 2, "{received:?}");
    assert!(
        received[0].as_ref().is_err_and(|e| e.contains("short")),
        "{:?}",
        received[0]
    );
    let expected = Sealed {
        enc: Bytes::from_static(&[2; 32]),
        ciphertext: Bytes::from(vec![2u8; ANSWER_BYTES]),
    };
    assert_eq!(received[1], Ok(expected));
    // The dying replica was retired.
    assert_eq!(
        *platform.stopped.lock().unwrap(),
        vec![format!("https://{dying_at}")]
    );
}
