//! Serving without the function's own TLS, for a proxy in the same pod.
//!
//! On Knative, a request reaches a function through the pod's queue-proxy, which speaks
//! plain HTTP/2 (h2c) to the container on the pod's loopback interface and cannot pass TLS
//! through. [`serve_h2c_on_loopback`] serves the stage that way: the function's own mTLS
//! (only the coordinator may call) is then replaced by the cluster's transport security in
//! front of the queue-proxy (Knative's system-internal TLS or a mesh with mTLS and an
//! authorization policy), which `deploy/README.md` describes.
//!
//! What this does not weaken: activations stay HPKE-sealed to the stage and the results
//! sealed onward, so neither the proxy nor anyone on the wire reads a tensor; keys are
//! released only after attestation, as always. What it does weaken: any process in the pod
//! (and, without the cluster's measures, any caller the proxy admits) can call the stage,
//! and request headers travel in the clear inside the pod. So it listens on loopback only:
//! nothing outside the pod's network namespace can connect to it directly.

use std::future::Future;

use tokio::net::TcpListener;
use tonic::transport::Server;

use crate::Error;
use crate::service::{StageService, serve_stage};

/// Serves `service` over plaintext h2c until `shutdown` resolves; refuses a listener that
/// is not on a loopback address.
pub async fn serve_h2c_on_loopback(
    listener: TcpListener,
    service: StageService,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Config(format!("listen: {e}")))?;
    if !addr.ip().is_loopback() {
        return Err(Error::Config(format!(
            "plaintext h2c is served on a loopback address only, for a proxy in the same pod; \
             {addr} is not one"
        )));
    }
    tracing::warn!(%addr, "serving plaintext h2c on loopback: transport security is the proxy's");
    serve_stage(Server::builder(), listener, service, shutdown).await
}
