//! The seam between evidence and the TEE that produced it.

use crate::error::AttestationError;
use crate::evidence::{Evidence, ReportData, TeeKind, VerifiedQuote};

/// Checks one kind of TEE evidence: that it is signed by a trusted platform root, is well
/// formed, and carries exactly the report data the caller expects. Deciding whether the
/// measured code may have keys is the [`ReleasePolicy`](crate::ReleasePolicy)'s job, not the
/// verifier's.
///
/// The software TEE's verifier is [`SoftwareTeeVerifier`](crate::SoftwareTeeVerifier);
/// hardware backends (SEV-SNP, TDX, SGX DCAP) will implement this same trait.
pub trait Verifier: Send + Sync {
    /// The TEE kind this verifier understands.
    fn tee(&self) -> TeeKind;

    /// Verifies `evidence`, requiring its report data to equal `expected` (which the caller
    /// recomputes with [`ReportData::bind`] from the key it will release to and the nonce it
    /// issued).
    fn verify(
        &self,
        evidence: &Evidence,
        expected: &ReportData,
    ) -> Result<VerifiedQuote, AttestationError>;
}
