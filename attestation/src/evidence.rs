//! What a TEE says about a process, and the stable byte encodings it travels in.

use std::fmt;

use ring::digest;
use serde::{Deserialize, Serialize};

use crate::error::AttestationError;
use crate::ids::Measurement;
use crate::nonce::Nonce;

/// A kind of trusted execution environment. Only [`TeeKind::SoftwareTee`] has a verifier in
/// this crate today; the hardware kinds exist so that evidence naming them is recognised and
/// refused with [`AttestationError::BackendNotBuilt`] instead of being misread.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TeeKind {
    /// The software TEE: a quoting agent process measures its callers and signs with an
    /// Ed25519 platform key. For development and CI; see the crate doc for its limits.
    SoftwareTee,
    /// AMD SEV-SNP attestation reports (not built).
    SevSnp,
    /// Intel TDX quotes (not built).
    Tdx,
    /// Intel SGX quotes verified with DCAP collateral (not built).
    SgxDcap,
}

impl TeeKind {
    /// The kind's one-byte code in the wire encodings.
    pub fn code(self) -> u8 {
        match self {
            Self::SoftwareTee => 1,
            Self::SevSnp => 2,
            Self::Tdx => 3,
            Self::SgxDcap => 4,
        }
    }

    /// The kind with this wire code, if any.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::SoftwareTee),
            2 => Some(Self::SevSnp),
            3 => Some(Self::Tdx),
            4 => Some(Self::SgxDcap),
            _ => None,
        }
    }
}

impl fmt::Display for TeeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::SoftwareTee => "software TEE",
            Self::SevSnp => "AMD SEV-SNP",
            Self::Tdx => "Intel TDX",
            Self::SgxDcap => "Intel SGX (DCAP)",
        })
    }
}

/// The 64 bytes a quote carries on behalf of the caller. In ShardSeal they always come
/// from [`ReportData::bind`], so a quote names the one ephemeral key that may receive keys
/// and the one broker nonce it answers.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReportData(pub [u8; 64]);

const REPORT_DATA_DOMAIN: &[u8] = b"shardseal/attestation/report-data/v1";

impl ReportData {
    /// SHA-512 over a domain-separated, length-prefixed encoding of the function's ephemeral
    /// public key and the broker's nonce. The broker recomputes it from the key it will seal
    /// to and the nonce it issued, and compares it with the quote's.
    pub fn bind(ephemeral_public_key: &[u8; 32], nonce: &Nonce) -> Self {
        let mut ctx = digest::Context::new(&digest::SHA512);
        for field in [REPORT_DATA_DOMAIN, ephemeral_public_key, nonce.as_bytes()] {
            ctx.update(&(field.len() as u64).to_be_bytes());
            ctx.update(field);
        }
        let mut out = [0u8; 64];
        out.copy_from_slice(ctx.finish().as_ref());
        Self(out)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 64] {
        &self.0
    }
}

impl fmt::Debug for ReportData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReportData({})", hex::encode(self.0))
    }
}

/// What the software TEE signs: which TEE, which code, and the caller's report data.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Quote {
    /// The TEE that measured the code.
    pub tee: TeeKind,
    /// The SHA-256 of the caller's executable, as measured by the TEE.
    pub measurement: Measurement,
    /// The caller's report data.
    pub report_data: ReportData,
}

const QUOTE_MAGIC: &[u8; 4] = b"SSQT";
const QUOTE_VERSION: u8 = 1;
/// The length of a quote's canonical encoding.
pub const QUOTE_LEN: usize = 4 + 1 + 1 + 32 + 64;
/// Prepended to the canonical quote before signing, so a platform signature over a quote
/// can never be taken for a signature over anything else.
const QUOTE_SIGNING_DOMAIN: &[u8] = b"shardseal/attestation/software-tee-quote/v1\0";

impl Quote {
    /// The canonical encoding: `"SSQT" ‖ version 1 ‖ tee code ‖ measurement ‖ report data`.
    pub fn to_bytes(&self) -> [u8; QUOTE_LEN] {
        let mut out = [0u8; QUOTE_LEN];
        out[..4].copy_from_slice(QUOTE_MAGIC);
        out[4] = QUOTE_VERSION;
        out[5] = self.tee.code();
        out[6..38].copy_from_slice(&self.measurement.0);
        out[38..].copy_from_slice(&self.report_data.0);
        out
    }

    /// Parses a canonical encoding; anything else (other length, magic, version or an
    /// unknown TEE code) is [`AttestationError::Malformed`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, AttestationError> {
        let bytes: &[u8; QUOTE_LEN] = bytes
            .try_into()
            .map_err(|_| AttestationError::Malformed("quote: wrong length"))?;
        if &bytes[..4] != QUOTE_MAGIC || bytes[4] != QUOTE_VERSION {
            return Err(AttestationError::Malformed("quote: unknown format"));
        }
        let tee = TeeKind::from_code(bytes[5])
            .ok_or(AttestationError::Malformed("quote: unknown TEE kind"))?;
        let mut measurement = [0u8; 32];
        measurement.copy_from_slice(&bytes[6..38]);
        let mut report_data = [0u8; 64];
        report_data.copy_from_slice(&bytes[38..]);
        Ok(Self {
            tee,
            measurement: Measurement(measurement),
            report_data: ReportData(report_data),
        })
    }

    /// The exact bytes the platform key signs.
    pub(crate) fn signed_message(quote_bytes: &[u8]) -> Vec<u8> {
        [QUOTE_SIGNING_DOMAIN, quote_bytes].concat()
    }
}

/// The largest evidence accepted from a peer, in bytes. Hardware evidence with certificate
/// chains is a few KiB; the software TEE's is under 250 bytes.
pub const MAX_EVIDENCE_LEN: usize = 64 * 1024;

const EVIDENCE_MAGIC: &[u8; 4] = b"SSEV";
const EVIDENCE_VERSION: u8 = 1;

/// A TEE's signed statement about a process, as it travels from the function to the broker.
/// Nothing in it is trusted until a [`Verifier`](crate::Verifier) has checked it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Evidence {
    tee: TeeKind,
    quote: Vec<u8>,
    signature: Vec<u8>,
    signer: Vec<u8>,
}

impl Evidence {
    pub(crate) fn new(tee: TeeKind, quote: Vec<u8>, signature: Vec<u8>, signer: Vec<u8>) -> Self {
        Self {
            tee,
            quote,
            signature,
            signer,
        }
    }

    /// The TEE kind the evidence claims; it picks the verifier.
    pub fn tee(&self) -> TeeKind {
        self.tee
    }

    /// The signed quote, in the backend's encoding (for the software TEE, [`Quote::to_bytes`]).
    pub fn quote_bytes(&self) -> &[u8] {
        &self.quote
    }

    /// The platform's signature over the quote.
    pub fn signature(&self) -> &[u8] {
        &self.signature
    }

    /// Who signed: for the software TEE the platform's 32-byte Ed25519 public key (checked
    /// against pinned roots, never trusted because it is here); for hardware backends the
    /// endorsement chain.
    pub fn signer(&self) -> &[u8] {
        &self.signer
    }

    /// The stable wire encoding: `"SSEV" ‖ version 1 ‖ tee code ‖ (u32 BE length ‖ bytes)`
    /// for the quote, the signature and the signer, in that order.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            6 + 12 + self.quote.len() + self.signature.len() + self.signer.len(),
        );
        out.extend_from_slice(EVIDENCE_MAGIC);
        out.push(EVIDENCE_VERSION);
        out.push(self.tee.code());
        for part in [&self.quote, &self.signature, &self.signer] {
            // Parts come from `new` (fixed small sizes) or `from_bytes` (bounded by
            // MAX_EVIDENCE_LEN), so each length fits in a u32.
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    /// Decodes untrusted bytes. Any deviation from the encoding — too long, unknown magic,
    /// version or TEE code, a length that overruns, trailing bytes — is
    /// [`AttestationError::Malformed`]; it never panics.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, AttestationError> {
        if bytes.len() > MAX_EVIDENCE_LEN {
            return Err(AttestationError::Malformed("evidence: too long"));
        }
        let (head, mut rest) = bytes
            .split_at_checked(6)
            .ok_or(AttestationError::Malformed("evidence: truncated header"))?;
        if &head[..4] != EVIDENCE_MAGIC || head[4] != EVIDENCE_VERSION {
            return Err(AttestationError::Malformed("evidence: unknown format"));
        }
        let tee = TeeKind::from_code(head[5])
            .ok_or(AttestationError::Malformed("evidence: unknown TEE kind"))?;
        let mut parts: [Vec<u8>; 3] = Default::default();
        for part in &mut parts {
            let (len, after) = rest
                .split_first_chunk::<4>()
                .ok_or(AttestationError::Malformed("evidence: truncated length"))?;
            let len = u32::from_be_bytes(*len) as usize;
            let (body, after) = after
                .split_at_checked(len)
                .ok_or(AttestationError::Malformed("evidence: truncated part"))?;
            *part = body.to_vec();
            rest = after;
        }
        if !rest.is_empty() {
            return Err(AttestationError::Malformed("evidence: trailing bytes"));
        }
        let [quote, signature, signer] = parts;
        Ok(Self {
            tee,
            quote,
            signature,
            signer,
        })
    }
}

/// A quote whose signature chains to a trusted root and whose report data matched what the
/// verifier expected. Only verifiers in this crate make one, so holding one means the checks
/// ran; the release policy then decides whether the measured code may have keys.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct VerifiedQuote {
    tee: TeeKind,
    measurement: Measurement,
    report_data: ReportData,
}

impl VerifiedQuote {
    pub(crate) fn new(quote: Quote) -> Self {
        Self {
            tee: quote.tee,
            measurement: quote.measurement,
            report_data: quote.report_data,
        }
    }

    /// The TEE that vouched for the measurement.
    pub fn tee(&self) -> TeeKind {
        self.tee
    }

    /// The measured code.
    pub fn measurement(&self) -> Measurement {
        self.measurement
    }

    /// The report data, equal to the one the verifier was asked to expect.
    pub fn report_data(&self) -> ReportData {
        self.report_data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_quote() -> Quote {
        Quote {
            tee: TeeKind::SoftwareTee,
            measurement: Measurement([7; 32]),
            report_data: ReportData([9; 64]),
        }
    }

    #[test]
    fn report_data_binds_key_and_nonce() {
        let key = [1u8; 32];
        let nonce = Nonce::from_bytes([2; 32]);
        let bound = ReportData::bind(&key, &nonce);
        assert_eq!(bound, ReportData::bind(&key, &nonce));
        assert_ne!(bound, ReportData::bind(&[3; 32], &nonce));
        assert_ne!(bound, ReportData::bind(&key, &Nonce::from_bytes([3; 32])));
        // Swapping key and nonce must not collide: the fields are positional.
        assert_ne!(
            ReportData::bind(&[1; 32], &Nonce::from_bytes([2; 32])),
            ReportData::bind(&[2; 32], &Nonce::from_bytes([1; 32]))
        );
    }

    #[test]
    fn report_data_is_sha512_of_the_documented_encoding() {
        let key = [0xaa; 32];
        let nonce = Nonce::from_bytes([0xbb; 32]);
        let mut encoding = Vec::new();
        encoding.extend_from_slice(&36u64.to_be_bytes());
        encoding.extend_from_slice(b"shardseal/attestation/report-data/v1");
        encoding.extend_from_slice(&32u64.to_be_bytes());
        encoding.extend_from_slice(&key);
        encoding.extend_from_slice(&32u64.to_be_bytes());
        encoding.extend_from_slice(&[0xbb; 32]);
        let expected = digest::digest(&digest::SHA512, &encoding);
        assert_eq!(
            ReportData::bind(&key, &nonce).as_bytes().as_slice(),
            expected.as_ref()
        );
    }

    #[test]
    fn quote_round_trips_and_has_a_fixed_layout() {
        let quote = sample_quote();
        let bytes = quote.to_bytes();
        assert_eq!(&bytes[..6], b"SSQT\x01\x01");
        assert_eq!(&bytes[6..38], &[7; 32]);
        assert_eq!(&bytes[38..], &[9; 64]);
        assert_eq!(Quote::from_bytes(&bytes).unwrap(), quote);
    }

    #[test]
    fn quote_rejects_wrong_length_magic_and_tee() {
        let bytes = sample_quote().to_bytes();
        let err = Quote::from_bytes(&bytes[..QUOTE_LEN - 1]).unwrap_err();
        assert!(matches!(
            err,
            AttestationError::Malformed("quote: wrong length")
        ));
        let mut bad = bytes;
        bad[0] = b'X';
        let err = Quote::from_bytes(&bad).unwrap_err();
        assert!(matches!(
            err,
            AttestationError::Malformed("quote: unknown format")
        ));
        let mut bad = bytes;
        bad[5] = 0;
        let err = Quote::from_bytes(&bad).unwrap_err();
        assert!(matches!(
            err,
            AttestationError::Malformed("quote: unknown TEE kind")
        ));
    }

    #[test]
    fn evidence_round_trips_with_a_stable_encoding() {
        let evidence = Evidence::new(TeeKind::SoftwareTee, vec![1, 2], vec![3], vec![]);
        let bytes = evidence.to_bytes();
        assert_eq!(
            bytes,
            [
                b'S', b'S', b'E', b'V', 1, 1, 0, 0, 0, 2, 1, 2, 0, 0, 0, 1, 3, 0, 0, 0, 0
            ]
        );
        assert_eq!(Evidence::from_bytes(&bytes).unwrap(), evidence);
    }

    #[test]
    fn evidence_rejects_truncation_trailing_bytes_and_oversize() {
        let bytes = Evidence::new(TeeKind::Tdx, vec![1; 10], vec![2; 64], vec![3; 32]).to_bytes();
        for cut in 0..bytes.len() {
            let err = Evidence::from_bytes(&bytes[..cut]).unwrap_err();
            assert!(matches!(err, AttestationError::Malformed(_)), "cut {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        let err = Evidence::from_bytes(&long).unwrap_err();
        assert!(matches!(
            err,
            AttestationError::Malformed("evidence: trailing bytes")
        ));
        let huge = vec![0u8; MAX_EVIDENCE_LEN + 1];
        let err = Evidence::from_bytes(&huge).unwrap_err();
        assert!(matches!(
            err,
            AttestationError::Malformed("evidence: too long")
        ));
    }

    #[test]
    fn tee_codes_round_trip_and_serde_names_are_stable() {
        for tee in [
            TeeKind::SoftwareTee,
            TeeKind::SevSnp,
            TeeKind::Tdx,
            TeeKind::SgxDcap,
        ] {
            assert_eq!(TeeKind::from_code(tee.code()), Some(tee));
        }
        assert_eq!(TeeKind::from_code(0), None);
        assert_eq!(
            serde_json::to_string(&TeeKind::SoftwareTee).unwrap(),
            "\"software_tee\""
        );
        assert_eq!(
            serde_json::to_string(&TeeKind::SgxDcap).unwrap(),
            "\"sgx_dcap\""
        );
    }

    mod decoding_never_panics {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = Evidence::from_bytes(&bytes);
                let _ = Quote::from_bytes(&bytes);
            }

            #[test]
            fn on_valid_headers_with_arbitrary_bodies(
                tee in 0u8..6,
                body in proptest::collection::vec(any::<u8>(), 0..300),
            ) {
                let mut bytes = b"SSEV\x01".to_vec();
                bytes.push(tee);
                bytes.extend_from_slice(&body);
                if let Ok(evidence) = Evidence::from_bytes(&bytes) {
                    // Whatever decodes re-encodes to the same bytes: the encoding is canonical.
                    prop_assert_eq!(evidence.to_bytes(), bytes);
                }
            }

            #[test]
            fn round_trip(
                quote in proptest::collection::vec(any::<u8>(), 0..200),
                signature in proptest::collection::vec(any::<u8>(), 0..100),
                signer in proptest::collection::vec(any::<u8>(), 0..100),
            ) {
                let evidence = Evidence::new(TeeKind::SoftwareTee, quote, signature, signer);
                prop_assert_eq!(Evidence::from_bytes(&evidence.to_bytes()).unwrap(), evidence);
            }
        }
    }
}
