//! The function's side: asking the local quoting agent for a quote.

use std::path::Path;
use std::time::Duration;

use tokio::net::UnixStream;

use crate::error::AttestationError;
use crate::evidence::{Evidence, ReportData};
use crate::software::protocol;

/// How long [`request_quote`] waits for the agent, from connecting to the last byte of its
/// answer. Measuring a large executable takes a while on a busy host.
pub const QUOTE_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Asks the quoting agent listening at `socket_path` to measure this process and sign a
/// quote over `report_data` (normally [`ReportData::bind`] of the function's ephemeral key
/// and the broker's nonce). The evidence is returned unverified: the broker verifies it.
///
/// The agent measures the process that connected, so call this from the process whose
/// executable should be measured, and keep the connection to yourself.
pub async fn request_quote(
    socket_path: &Path,
    report_data: &ReportData,
) -> Result<Evidence, AttestationError> {
    let exchange = async {
        let mut stream = UnixStream::connect(socket_path).await.map_err(|e| {
            AttestationError::io(
                format!(
                    "connecting to the quoting agent at {}",
                    socket_path.display()
                ),
                e,
            )
        })?;
        protocol::write_request(&mut stream, report_data).await?;
        protocol::read_response(&mut stream).await
    };
    tokio::time::timeout(QUOTE_REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| AttestationError::Timeout("quoting agent"))?
}
