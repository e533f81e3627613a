//! The quoting agent's wire protocol, one request and one response per connection:
//!
//! ```text
//! request:  u32 BE length (= 65) ‖ version 1 ‖ report data (64 bytes)
//! response: u32 BE length ‖ 0 ‖ evidence bytes          (a quote)
//!         | u32 BE length ‖ 1 ‖ UTF-8 reason            (a refusal)
//! ```
//!
//! The request carries no measurement: the agent finds that out for itself.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::AttestationError;
use crate::evidence::{Evidence, MAX_EVIDENCE_LEN, ReportData};

const PROTOCOL_VERSION: u8 = 1;
const REQUEST_LEN: usize = 1 + 64;
const STATUS_QUOTE: u8 = 0;
const STATUS_REFUSED: u8 = 1;
/// Refusal reasons are one line; longer ones are cut.
const MAX_REASON_LEN: usize = 512;
const MAX_RESPONSE_LEN: usize = 1 + MAX_EVIDENCE_LEN;

fn io_error(context: &'static str) -> impl Fn(std::io::Error) -> AttestationError {
    move |e| AttestationError::io(context, e)
}

pub(crate) async fn write_request<W: AsyncWrite + Unpin>(
    writer: &mut W,
    report_data: &ReportData,
) -> Result<(), AttestationError> {
    let mut frame = Vec::with_capacity(4 + REQUEST_LEN);
    frame.extend_from_slice(&(REQUEST_LEN as u32).to_be_bytes());
    frame.push(PROTOCOL_VERSION);
    frame.extend_from_slice(report_data.as_bytes());
    writer
        .write_all(&frame)
        .await
        .map_err(io_error("sending the quote request"))?;
    writer
        .flush()
        .await
        .map_err(io_error("sending the quote request"))
}

/// Reads one request. The length is checked before any body is read, so a client cannot
/// make the agent buffer more than 65 bytes.
pub(crate) async fn read_request<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<ReportData, AttestationError> {
    let mut len = [0u8; 4];
    reader
        .read_exact(&mut len)
        .await
        .map_err(io_error("reading the quote request"))?;
    if u32::from_be_bytes(len) as usize != REQUEST_LEN {
        return Err(AttestationError::Malformed("quote request: wrong length"));
    }
    let mut body = [0u8; REQUEST_LEN];
    reader
        .read_exact(&mut body)
        .await
        .map_err(io_error("reading the quote request"))?;
    if body[0] != PROTOCOL_VERSION {
        return Err(AttestationError::Malformed(
            "quote request: unknown protocol version",
        ));
    }
    let mut report_data = [0u8; 64];
    report_data.copy_from_slice(&body[1..]);
    Ok(ReportData(report_data))
}

pub(crate) async fn write_response<W: AsyncWrite + Unpin>(
    writer: &mut W,
    response: &Result<Evidence, AttestationError>,
) -> Result<(), AttestationError> {
    let body = match response {
        Ok(evidence) => [&[STATUS_QUOTE][..], &evidence.to_bytes()].concat(),
        Err(refusal) => {
            let mut reason = refusal.to_string();
            if reason.len() > MAX_REASON_LEN {
                let mut cut = MAX_REASON_LEN;
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                reason.truncate(cut);
            }
            [&[STATUS_REFUSED][..], reason.as_bytes()].concat()
        }
    };
    let mut frame = Vec::with_capacity(4 + body.len());
    // Bounded by MAX_RESPONSE_LEN: evidence is bounded by the signer, reasons are cut.
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    writer
        .write_all(&frame)
        .await
        .map_err(io_error("sending the quote response"))?;
    writer
        .shutdown()
        .await
        .map_err(io_error("sending the quote response"))
}

pub(crate) async fn read_response<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Evidence, AttestationError> {
    let mut len = [0u8; 4];
    reader
        .read_exact(&mut len)
        .await
        .map_err(io_error("reading the quoting agent's response"))?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_RESPONSE_LEN {
        return Err(AttestationError::Malformed(
            "quote response: length out of range",
        ));
    }
    let mut body = vec![0u8; len];
    reader
        .read_exact(&mut body)
        .await
        .map_err(io_error("reading the quoting agent's response"))?;
    match body[0] {
        STATUS_QUOTE => Evidence::from_bytes(&body[1..]),
        STATUS_REFUSED => Err(AttestationError::AgentRefused {
            reason: String::from_utf8_lossy(&body[1..]).into_owned(),
        }),
        _ => Err(AttestationError::Malformed(
            "quote response: unknown status",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn request_round_trips() {
        let mut wire = Vec::new();
        write_request(&mut wire, &ReportData([4; 64]))
            .await
            .unwrap();
        assert_eq!(wire.len(), 4 + 65);
        assert_eq!(&wire[..5], &[0, 0, 0, 65, 1]);
        assert_eq!(
            read_request(&mut wire.as_slice()).await.unwrap(),
            ReportData([4; 64])
        );
    }

    #[tokio::test]
    async fn oversized_or_unversioned_requests_are_refused_before_reading_a_body() {
        let huge = [0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        assert!(matches!(
            read_request(&mut huge.as_slice()).await,
            Err(AttestationError::Malformed("quote request: wrong length"))
        ));
        let mut wire = Vec::new();
        write_request(&mut wire, &ReportData([4; 64]))
            .await
            .unwrap();
        wire[4] = 2;
        assert!(matches!(
            read_request(&mut wire.as_slice()).await,
            Err(AttestationError::Malformed(
                "quote request: unknown protocol version"
            ))
        ));
        let truncated = &wire[..30];
        assert!(matches!(
            read_request(&mut &truncated[..]).await,
            Err(AttestationError::Io { .. })
        ));
    }

    #[tokio::test]
    async fn refusals_carry_the_reason() {
        let mut wire = Vec::new();
        write_response(&mut wire, &Err(AttestationError::CallerChanged { pid: 7 }))
            .await
            .unwrap();
        match read_response(&mut wire.as_slice()).await {
            Err(AttestationError::AgentRefused { reason }) => {
                assert_eq!(reason, "process 7 changed while it was being measured");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_oversized_response_length_is_refused() {
        let wire = ((MAX_RESPONSE_LEN + 1) as u32).to_be_bytes();
        assert!(matches!(
            read_response(&mut wire.as_slice()).await,
            Err(AttestationError::Malformed(
                "quote response: length out of range"
            ))
        ));
    }
}
