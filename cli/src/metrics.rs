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
    /// Binds and serves the endpoint if one was asked for; each scrape renders `render()`.
    /// Returns the bound address (logged, and printed as `SHARDSEAL_METRICS <addr>`).
    pub(crate) async fn serve<R, F>(
        &self,
        render: R,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<Option<SocketAddr>>
    where
        R: Fn() -> F + Clone + Send + Sync + 'static,
        F: Future<Output = String> + Send + 'static,
    {
        let Some(addr) = &self.metrics_listen else {
            return Ok(None);
        };
        let listener = shardseal_proto::metrics::bind(addr, self.metrics_allow_remote)
            .await
            .context("--metrics-listen")?;
        let bound = listener
            .local_addr()
            .context("reading the metrics address")?;
        tracing::info!(addr = %bound, "metrics endpoint");
        println!("SHARDSEAL_METRICS {bound}");
        tokio::spawn(shardseal_proto::metrics::serve(listener, render, shutdown));
        Ok(Some(bound))
    }
}
