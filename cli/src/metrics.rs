//! `--metrics-listen`: the Prometheus endpoint of the coordinator and the key broker.

use std::future::Future;
use std::net::SocketAddr;

use anyhow::Context;

/// Where to serve Prometheus metrics (off unless given).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct MetricsArgs {
    /// Serve Prometheus metrics (GET /metrics, plain HTTP) on this IP:PORT; port 0 picks a
    /// free port, logged as `metrics endpoint`. Off unless given. Loopback only unless
    /// --metrics-allow-remote.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_listen: Option<String>,
    /// Allow --metrics-listen on a non-loopback address (metrics reveal traffic volume and
    /// timing; put them behind your network policy).
    #[arg(long, requires = "metrics_listen")]
    pub(crate) metrics_allow_remote: bool,
}

impl MetricsArgs {
    /// Binds the endpoint if one was asked for: called before anything else starts, so a
    /// bad or refused address fails at once.
    pub(crate) async fn bind(&self) -> anyhow::Result<Option<tokio::net::TcpListener>> {
        let Some(addr) = &self.metrics_listen else {
            return Ok(None);
        };
        let listener = shardseal_proto::metrics::bind(addr, self.metrics_allow_remote)
            .await
            .context("--metrics-listen")?;
        Ok(Some(listener))
    }
}

/// Serves the endpoint on `listener` (if any) until the process ends; each scrape renders
/// `render()`. Logs the bound address (`metrics endpoint`) and prints it as
/// `SHARDSEAL_METRICS <addr>`.
pub(crate) fn serve<R, F>(
    listener: Option<tokio::net::TcpListener>,
    render: R,
) -> anyhow::Result<Option<SocketAddr>>
where
    R: Fn() -> F + Clone + Send + Sync + 'static,
    F: Future<Output = String> + Send + 'static,
{
    let Some(listener) = listener else {
        return Ok(None);
    };
    let bound = listener
        .local_addr()
        .context("reading the metrics address")?;
    tracing::info!(addr = %bound, "metrics endpoint");
    println!("SHARDSEAL_METRICS {bound}");
    tokio::spawn(shardseal_proto::metrics::serve(
        listener,
        render,
        std::future::pending(),
    ));
    Ok(Some(bound))
}
