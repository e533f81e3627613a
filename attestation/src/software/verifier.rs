//! Verifying software-TEE evidence against pinned platform keys.

use ring::signature::{ED25519, UnparsedPublicKey};
use subtle::ConstantTimeEq;

use crate::error::AttestationError;
use crate::evidence::{Evidence, Quote, ReportData, TeeKind, VerifiedQuote};
use crate::software::PlatformPublicKey;
use crate::verifier::Verifier;

/// Verifies software-TEE evidence: the signer must be one of the pinned platform keys, the
/// Ed25519 signature must cover the domain-separated quote, and the quote's report data
/// must equal the expected one.
#[derive(Clone, Debug)]
pub struct SoftwareTeeVerifier {
    trusted_roots: Vec<PlatformPublicKey>,
}

impl SoftwareTeeVerifier {
    /// A verifier that trusts exactly these platform keys (none: it trusts nothing).
    pub fn new(trusted_roots: Vec<PlatformPublicKey>) -> Self {
        Self { trusted_roots }
    }
}

impl Verifier for SoftwareTeeVerifier {
    fn tee(&self) -> TeeKind {
        TeeKind::SoftwareTee
    }

    fn verify(
        &self,
        evidence: &Evidence,
        expected: &ReportData,
    ) -> Result<VerifiedQuote, AttestationError> {
        if evidence.tee() != TeeKind::SoftwareTee {
            return Err(AttestationError::UnsupportedTee {
                tee: evidence.tee(),
            });
        }
        let signer: [u8; 32] = evidence
            .signer()
            .try_into()
            .map_err(|_| AttestationError::Malformed("evidence: signer is not a platform key"))?;
        let signer = PlatformPublicKey::from_bytes(signer);
        // The key in the evidence only says which pinned root to try; it is never trusted
        // for being there.
        if !self.trusted_roots.contains(&signer) {
            return Err(AttestationError::UntrustedPlatform);
        }
        UnparsedPublicKey::new(&ED25519, signer.as_bytes())
            .verify(
                &Quote::signed_message(evidence.quote_bytes()),
                evidence.signature(),
            )
            .map_err(|_| AttestationError::BadSignature)?;
        let quote = Quote::from_bytes(evidence.quote_bytes())?;
        if quote.tee != TeeKind::SoftwareTee {
            return Err(AttestationError::Malformed(
                "quote: TEE kind differs from the evidence",
            ));
        }
        // Report data is not secret, but a constant-time compare costs nothing here and
        // keeps the broker's timing independent of how close a forgery came.
        if !bool::from(
            quote
                .report_data
                .as_bytes()
                .ct_eq(expected.as_bytes().as_slice()),
        ) {
            return Err(AttestationError::ReportDataMismatch);
        }
        Ok(VerifiedQuote::new(quote))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Measurement;
    use crate::nonce::Nonce;
    use crate::software::PlatformKey;

    struct Fixture {
        key: PlatformKey,
        verifier: SoftwareTeeVerifier,
        expected: ReportData,
        evidence: Evidence,
    }

    fn fixture() -> Fixture {
        let key = PlatformKey::generate().unwrap();
        let expected = ReportData::bind(&[1; 32], &Nonce::from_bytes([2; 32]));
        let evidence = key
            .sign_quote(&Quote {
                tee: TeeKind::SoftwareTee,
                measurement: Measurement([3; 32]),
                report_data: expected,
            })
            .unwrap();
        let verifier = SoftwareTeeVerifier::new(vec![key.public_key()]);
        Fixture {
            key,
            verifier,
            expected,
            evidence,
        }
    }

    #[test]
    fn accepts_genuine_evidence() {
        let f = fixture();
        let verified = f.verifier.verify(&f.evidence, &f.expected).unwrap();
        assert_eq!(verified.measurement(), Measurement([3; 32]));
        assert_eq!(verified.report_data(), f.expected);
        assert_eq!(verified.tee(), TeeKind::SoftwareTee);
        assert_eq!(f.key.public_key().as_bytes(), f.evidence.signer());
    }

    #[test]
    fn another_platform_is_untrusted() {
        let f = fixture();
        let other = SoftwareTeeVerifier::new(vec![PlatformKey::generate().unwrap().public_key()]);
        assert!(matches!(
            other.verify(&f.evidence, &f.expected),
            Err(AttestationError::UntrustedPlatform)
        ));
        assert!(matches!(
            SoftwareTeeVerifier::new(vec![]).verify(&f.evidence, &f.expected),
            Err(AttestationError::UntrustedPlatform)
        ));
    }

    #[test]
    fn report_data_for_another_key_or_nonce_is_a_mismatch() {
        let f = fixture();
        for expected in [
            ReportData::bind(&[9; 32], &Nonce::from_bytes([2; 32])),
            ReportData::bind(&[1; 32], &Nonce::from_bytes([9; 32])),
        ] {
            assert!(matches!(
                f.verifier.verify(&f.evidence, &expected),
                Err(AttestationError::ReportDataMismatch)
            ));
        }
    }

    #[test]
    fn each_tampered_region_fails_with_its_own_error() {
        let f = fixture();
        let bytes = f.evidence.to_bytes();
        // Layout: header 6, quote len 4, quote 102, signature len 4, signature 64,
        // signer len 4, signer 32.
        let verify = |bytes: &[u8]| {
            Evidence::from_bytes(bytes).and_then(|e| f.verifier.verify(&e, &f.expected))
        };
        let flip = |at: usize| {
            let mut b = bytes.clone();
            b[at] ^= 0x01;
            b
        };
        assert!(matches!(
            verify(&flip(0)),
            Err(AttestationError::Malformed("evidence: unknown format"))
        ));
        // Tee code 1 -> 0: not a known kind.
        assert!(matches!(
            verify(&flip(5)),
            Err(AttestationError::Malformed("evidence: unknown TEE kind"))
        ));
        // A measurement byte inside the signed quote.
        assert!(matches!(
            verify(&flip(10 + 6)),
            Err(AttestationError::BadSignature)
        ));
        // A report-data byte inside the signed quote.
        assert!(matches!(
            verify(&flip(10 + 60)),
            Err(AttestationError::BadSignature)
        ));
        // A signature byte.
        assert!(matches!(
            verify(&flip(6 + 4 + 102 + 4 + 10)),
            Err(AttestationError::BadSignature)
        ));
        // A signer byte: names a key nobody pinned.
        assert!(matches!(
            verify(&flip(bytes.len() - 1)),
            Err(AttestationError::UntrustedPlatform)
        ));
        // Every single-bit flip anywhere is refused.
        for at in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[at] ^= 1 << bit;
                assert!(verify(&b).is_err(), "flip of bit {bit} at {at} accepted");
            }
        }
    }

    #[test]
    fn hardware_evidence_is_not_this_verifiers_business() {
        let f = fixture();
        let evidence = Evidence::new(
            TeeKind::SevSnp,
            f.evidence.quote_bytes().to_vec(),
            f.evidence.signature().to_vec(),
            f.evidence.signer().to_vec(),
        );
        assert!(matches!(
            f.verifier.verify(&evidence, &f.expected),
            Err(AttestationError::UnsupportedTee {
                tee: TeeKind::SevSnp
            })
        ));
    }

    #[test]
    fn a_quote_signed_for_a_hardware_kind_is_malformed() {
        let f = fixture();
        // A platform key signing a quote that claims TDX, wrapped as software evidence.
        let lying = f
            .key
            .sign_quote(&Quote {
                tee: TeeKind::Tdx,
                measurement: Measurement([3; 32]),
                report_data: f.expected,
            })
            .unwrap();
        let wrapped = Evidence::new(
            TeeKind::SoftwareTee,
            lying.quote_bytes().to_vec(),
            lying.signature().to_vec(),
            lying.signer().to_vec(),
        );
        assert!(matches!(
            f.verifier.verify(&wrapped, &f.expected),
            Err(AttestationError::Malformed(
                "quote: TEE kind differs from the evidence"
            ))
        ));
    }
}
