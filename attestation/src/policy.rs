//! Who may receive a stage's keys: trusted platform roots and allowed measurements.

use serde::{Deserialize, Serialize};

use crate::error::AttestationError;
use crate::evidence::{Evidence, ReportData, TeeKind, VerifiedQuote};
use crate::ids::{Measurement, ModelId, StageIndex};
use crate::software::{PlatformPublicKey, SoftwareTeeVerifier};
use crate::verifier::Verifier;

/// The platform roots the broker pins, per TEE kind. Hardware kinds will get their own
/// fields when their verifiers are built; unknown fields are refused so a policy that names
/// them fails to load rather than being silently ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedRoots {
    /// Software-TEE platform public keys (the `.pub` files written by
    /// `shardseal quoting-agent`).
    #[serde(default)]
    pub software_tee: Vec<PlatformPublicKey>,
}

/// The measurements allowed to serve one stage of one model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageRule {
    /// The model.
    pub model: ModelId,
    /// The stage.
    pub stage: StageIndex,
    /// Executables (SHA-256) that may receive this stage's keys.
    pub measurements: Vec<Measurement>,
}

/// A broker's release policy: which platforms are trusted to measure, and which measured
/// code may receive which stage's keys. Nothing is allowed by default. It reads and writes
/// as JSON or TOML, e.g.
///
/// ```toml
/// revoked = []
///
/// [trusted_roots]
/// software_tee = ["<64 hex digits from platform.key.pub>"]
///
/// [[stages]]
/// model = "resnet50"
/// stage = 0
/// measurements = ["<sha256 of the function binary>"]
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleasePolicy {
    /// Pinned platform roots.
    #[serde(default)]
    pub trusted_roots: TrustedRoots,
    /// Allowed measurements per model and stage (rules for the same stage add up).
    #[serde(default)]
    pub stages: Vec<StageRule>,
    /// Measurements refused everywhere, whatever the stage rules say.
    #[serde(default)]
    pub revoked: Vec<Measurement>,
}

impl ReleasePolicy {
    /// Pins a software-TEE platform key.
    pub fn trust_software_platform(&mut self, key: PlatformPublicKey) -> &mut Self {
        if !self.trusted_roots.software_tee.contains(&key) {
            self.trusted_roots.software_tee.push(key);
        }
        self
    }

    /// Allows `measurement` to serve `stage` of `model`.
    pub fn allow(
        &mut self,
        model: ModelId,
        stage: StageIndex,
        measurement: Measurement,
    ) -> &mut Self {
        match self
            .stages
            .iter_mut()
            .find(|rule| rule.model == model && rule.stage == stage)
        {
            Some(rule) if rule.measurements.contains(&measurement) => {}
            Some(rule) => rule.measurements.push(measurement),
            None => self.stages.push(StageRule {
                model,
                stage,
                measurements: vec![measurement],
            }),
        }
        self
    }

    /// Revokes `measurement` for every model and stage.
    pub fn revoke(&mut self, measurement: Measurement) -> &mut Self {
        if !self.revoked.contains(&measurement) {
            self.revoked.push(measurement);
        }
        self
    }

    /// Decides whether the verified code may receive keys for `stage` of `model`: a revoked
    /// measurement is [`AttestationError::MeasurementRevoked`] (even if a rule allows it),
    /// one no rule allows is [`AttestationError::MeasurementNotAllowed`].
    pub fn check(
        &self,
        quote: &VerifiedQuote,
        model: &ModelId,
        stage: StageIndex,
    ) -> Result<(), AttestationError> {
        let measurement = quote.measurement();
        if self.revoked.contains(&measurement) {
            return Err(AttestationError::MeasurementRevoked { measurement });
        }
        let allowed = self.stages.iter().any(|rule| {
            &rule.model == model && rule.stage == stage && rule.measurements.contains(&measurement)
        });
        if allowed {
            Ok(())
        } else {
            Err(AttestationError::MeasurementNotAllowed {
                measurement,
                model: model.clone(),
                stage,
            })
        }
    }

    /// The verifier for `tee` built from this policy's roots, or
    /// [`AttestationError::BackendNotBuilt`] for a hardware kind this build cannot verify.
    pub fn verifier(&self, tee: TeeKind) -> Result<Box<dyn Verifier>, AttestationError> {
        match tee {
            TeeKind::SoftwareTee => Ok(Box::new(SoftwareTeeVerifier::new(
                self.trusted_roots.software_tee.clone(),
            ))),
            TeeKind::SevSnp | TeeKind::Tdx | TeeKind::SgxDcap => {
                Err(AttestationError::BackendNotBuilt { tee })
            }
        }
    }

    /// Everything the broker needs in one call: picks the verifier for the evidence's TEE
    /// kind, verifies the evidence against `expected` report data, then [`Self::check`]s
    /// the measurement for `model` and `stage`. The nonce inside `expected` must still be
    /// consumed with the [`NonceRegistry`](crate::NonceRegistry) that issued it.
    pub fn appraise(
        &self,
        evidence: &Evidence,
        expected: &ReportData,
        model: &ModelId,
        stage: StageIndex,
    ) -> Result<VerifiedQuote, AttestationError> {
        let quote = self.verifier(evidence.tee())?.verify(evidence, expected)?;
        self.check(&quote, model, stage)?;
        Ok(quote)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::Quote;

    fn verified(measurement: Measurement) -> VerifiedQuote {
        VerifiedQuote::new(Quote {
            tee: TeeKind::SoftwareTee,
            measurement,
            report_data: ReportData([0; 64]),
        })
    }

    fn model() -> ModelId {
        ModelId::new("resnet50").unwrap()
    }

    #[test]
    fn allows_only_the_listed_measurement_for_its_own_model_and_stage() {
        let good = Measurement([1; 32]);
        let mut policy = ReleasePolicy::default();
        policy.allow(model(), StageIndex(0), good);
        policy
            .check(&verified(good), &model(), StageIndex(0))
            .unwrap();

        let err = policy
            .check(&verified(good), &model(), StageIndex(1))
            .unwrap_err();
        assert!(matches!(
            err,
            AttestationError::MeasurementNotAllowed { measurement, ref model, stage }
                if measurement == good && model.as_str() == "resnet50" && stage == StageIndex(1)
        ));
        let other = ModelId::new("bert").unwrap();
        assert!(matches!(
            policy.check(&verified(good), &other, StageIndex(0)),
            Err(AttestationError::MeasurementNotAllowed { .. })
        ));
        let stranger = Measurement([2; 32]);
        assert!(matches!(
            policy.check(&verified(stranger), &model(), StageIndex(0)),
            Err(AttestationError::MeasurementNotAllowed { measurement, .. }) if measurement == stranger
        ));
    }

    #[test]
    fn revocation_overrides_an_allow_rule() {
        let m = Measurement([1; 32]);
        let mut policy = ReleasePolicy::default();
        policy.allow(model(), StageIndex(0), m).revoke(m);
        assert!(matches!(
            policy.check(&verified(m), &model(), StageIndex(0)),
            Err(AttestationError::MeasurementRevoked { measurement }) if measurement == m
        ));
    }

    #[test]
    fn hardware_evidence_is_refused_as_not_built() {
        let policy = ReleasePolicy::default();
        for tee in [TeeKind::SevSnp, TeeKind::Tdx, TeeKind::SgxDcap] {
            let evidence = Evidence::new(tee, vec![], vec![], vec![]);
            let err = policy
                .appraise(&evidence, &ReportData([0; 64]), &model(), StageIndex(0))
                .unwrap_err();
            assert!(
                matches!(err, AttestationError::BackendNotBuilt { tee: t } if t == tee),
                "{tee}: {err:?}"
            );
        }
    }

    #[test]
    fn reads_and_writes_json_and_toml() {
        let root: PlatformPublicKey = "11".repeat(32).parse().unwrap();
        let toml_text = format!(
            r#"
revoked = ["{revoked}"]

[trusted_roots]
software_tee = ["{root}"]

[[stages]]
model = "resnet50"
stage = 1
measurements = ["{allowed}"]
"#,
            revoked = "33".repeat(32),
            allowed = "22".repeat(32),
        );
        let policy: ReleasePolicy = toml::from_str(&toml_text).unwrap();
        let mut expected = ReleasePolicy::default();
        expected
            .trust_software_platform(root)
            .allow(model(), StageIndex(1), Measurement([0x22; 32]))
            .revoke(Measurement([0x33; 32]));
        assert_eq!(policy, expected);

        let json = serde_json::to_string(&policy).unwrap();
        assert_eq!(
            serde_json::from_str::<ReleasePolicy>(&json).unwrap(),
            policy
        );
        let back: ReleasePolicy = toml::from_str(&toml::to_string(&policy).unwrap()).unwrap();
        assert_eq!(back, policy);
    }

    #[test]
    fn unknown_fields_and_bad_ids_are_refused() {
        assert!(toml::from_str::<ReleasePolicy>("[trusted_roots]\nsev_snp = []\n").is_err());
        let bad_model = r#"{"stages":[{"model":"../x","stage":0,"measurements":[]}]}"#;
        assert!(serde_json::from_str::<ReleasePolicy>(bad_model).is_err());
    }
}
