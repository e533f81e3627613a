//! ShardSeal's gRPC services and messages.
//!
//! Generated at build time from `proto/shardseal/v1/*.proto` by protox and
//! tonic-prost-build; no `protoc` is needed. Every service in ShardSeal speaks
//! these types, so they are the wire contract between the trust domains:
//!
//! ```text
//!  client SDK ──► coordinator ──► function (stage 1) ──► … ──► function (stage k)
//!                      │                   ▲
//!                      └── key broker ◄────┘ (attest, key release)
//! ```
//!
//! [`oip`] is the standard Open Inference Protocol, compiled from the upstream
//! `proto/kserve/grpc_predict_v2.proto`: `shardseal proxy` speaks it to local clients.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

/// Version 1 of the ShardSeal protocol.
///
/// [`Sealed`](v1::Sealed)'s fields are [`bytes::Bytes`]: a received envelope is a slice of
/// the message it arrived in, and the coordinator passes it on (and keeps it for a retry)
/// without copying it.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("shardseal.v1");
}

/// The Open Inference Protocol (KServe v2 predict protocol, package `inference`),
/// compiled from the upstream `grpc_predict_v2.proto`: what `shardseal proxy` speaks to
/// standard clients such as `tritonclient` and `kserve`.
pub mod oip {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("inference");
}

pub mod metrics;
pub mod request_id;
pub mod tensor;
pub mod tls;

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use prost::Message;

    use super::v1::{ProcessRequest, Sealed};

    /// tonic decodes a message from the `BytesMut` it received it into; the sealed
    /// payload must come out as a slice of that buffer, not a copy.
    #[test]
    fn a_sealed_payload_decodes_as_a_slice_of_the_received_buffer() {
        let request = ProcessRequest {
            header: None,
            stage: 1,
            activations: Some(Sealed {
                enc: vec![1; 32].into(),
                ciphertext: vec![7; 1 << 20].into(),
            }),
        };
        let mut received = BytesMut::from(&request.encode_to_vec()[..]);
        let buffer = received.as_ptr_range();
        let decoded = ProcessRequest::decode(&mut received).unwrap();
        assert_eq!(decoded, request);
        let sealed = decoded.activations.unwrap();
        assert!(buffer.contains(&sealed.ciphertext.as_ptr()));
        assert!(buffer.contains(&sealed.enc.as_ptr()));
    }
}
