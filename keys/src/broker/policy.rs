//! The release policy a model owner sends with a registration: which function executables
//! may receive each stage's keys. The broker adds its own trusted platform roots; an owner
//! never chooses which TEE platforms to trust.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use shardseal_attestation::{Measurement, ModelId, ReleasePolicy, StageIndex, TrustedRoots};

use crate::broker::error::BrokerError;

/// The largest release policy accepted, in bytes of JSON.
pub const MAX_POLICY_LEN: usize = 64 << 10;
/// The most measurements one stage may allow.
pub const MAX_MEASUREMENTS_PER_STAGE: usize = 64;

/// The owner's release policy: per stage, the function measurements (SHA-256 of the
/// executable) allowed to receive that stage's keys. Every stage of the model must be
/// listed exactly once, with at least one measurement. As JSON:
///
/// ```json
/// {"stages": [
///   {"stage": 0, "measurements": ["<64 hex digits>"]},
///   {"stage": 1, "measurements": ["<64 hex digits>", "<64 hex digits>"]}
/// ]}
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnerReleasePolicy {
    /// One entry per stage.
    pub stages: Vec<StageMeasurements>,
}

/// The measurements allowed for one stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageMeasurements {
    /// The stage.
    pub stage: StageIndex,
    /// Executables allowed to serve it.
    pub measurements: Vec<Measurement>,
}

impl OwnerReleasePolicy {
    /// The same allowed executables for each of `stage_count` stages: the usual case, one
    /// function binary serving every stage.
    pub fn same_for_all_stages(stage_count: u32, measurements: &[Measurement]) -> Self {
        Self {
            stages: (0..stage_count)
                .map(|stage| StageMeasurements {
                    stage: StageIndex(stage),
                    measurements: measurements.to_vec(),
                })
                .collect(),
        }
    }

    /// Allows `measurement` to serve `stage` (adding the stage if it is not listed yet).
    pub fn allow(&mut self, stage: StageIndex, measurement: Measurement) -> &mut Self {
        match self.stages.iter_mut().find(|s| s.stage == stage) {
            Some(entry) if entry.measurements.contains(&measurement) => {}
            Some(entry) => entry.measurements.push(measurement),
            None => self.stages.push(StageMeasurements {
                stage,
                measurements: vec![measurement],
            }),
        }
        self
    }

    /// Reads the JSON form.
    pub fn from_json(bytes: &[u8]) -> Result<Self, BrokerError> {
        if bytes.len() > MAX_POLICY_LEN {
            return Err(BrokerError::InvalidPolicy(format!(
                "larger than {MAX_POLICY_LEN} bytes"
            )));
        }
        serde_json::from_slice(bytes).map_err(|e| BrokerError::InvalidPolicy(e.to_string()))
    }

    /// The JSON form.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of ids and hex strings always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The measurements allowed for `stage` (empty if the stage is not listed).
    pub fn allowed(&self, stage: StageIndex) -> &[Measurement] {
        self.stages
            .iter()
            .find(|s| s.stage == stage)
            .map(|s| s.measurements.as_slice())
            .unwrap_or_default()
    }

    /// Checks the policy against a model of `stage_count` stages: each stage listed exactly
    /// once, none beyond the last, each with 1 to [`MAX_MEASUREMENTS_PER_STAGE`] distinct
    /// measurements.
    pub fn check(&self, stage_count: u32) -> Result<(), BrokerError> {
        let invalid = |text: String| Err(BrokerError::InvalidPolicy(text));
        let mut seen = BTreeSet::new();
        for entry in &self.stages {
            if entry.stage.0 >= stage_count {
                return invalid(format!(
                    "{} is beyond the model's {stage_count} stage(s)",
                    entry.stage
                ));
            }
            if !seen.insert(entry.stage) {
                return invalid(format!("{} is listed twice", entry.stage));
            }
            let distinct: BTreeSet<_> = entry.measurements.iter().collect();
            if distinct.is_empty() || entry.measurements.len() > MAX_MEASUREMENTS_PER_STAGE {
                return invalid(format!(
                    "{} must allow 1 to {MAX_MEASUREMENTS_PER_STAGE} measurements",
                    entry.stage
                ));
            }
            if distinct.len() != entry.measurements.len() {
                return invalid(format!("{} lists a measurement twice", entry.stage));
            }
        }
        if let Some(missing) = (0..stage_count).map(StageIndex).find(|s| !seen.contains(s)) {
            return invalid(format!("{missing} is not listed"));
        }
        Ok(())
    }

    /// The attestation crate's policy for `model`: the broker's platform roots, these stage
    /// rules, and the model's revoked measurements.
    pub(crate) fn to_release_policy(
        &self,
        model: &ModelId,
        roots: &TrustedRoots,
        revoked: &[Measurement],
    ) -> ReleasePolicy {
        let mut policy = ReleasePolicy {
            trusted_roots: roots.clone(),
            ..ReleasePolicy::default()
        };
        for entry in &self.stages {
            for measurement in &entry.measurements {
                policy.allow(model.clone(), entry.stage, *measurement);
            }
        }
        for measurement in revoked {
            policy.revoke(*measurement);
        }
        policy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(byte: u8) -> Measurement {
        Measurement([byte; 32])
    }

    #[test]
    fn reads_the_documented_json() {
        let json = format!(
            r#"{{"stages":[{{"stage":0,"measurements":["{}"]}},{{"stage":1,"measurements":["{}","{}"]}}]}}"#,
            "aa".repeat(32),
            "bb".repeat(32),
            "cc".repeat(32)
        );
        let policy = OwnerReleasePolicy::from_json(json.as_bytes()).unwrap();
        policy.check(2).unwrap();
        assert_eq!(policy.allowed(StageIndex(0)), &[m(0xaa)]);
        assert_eq!(policy.allowed(StageIndex(1)), &[m(0xbb), m(0xcc)]);
        assert_eq!(policy.allowed(StageIndex(2)), &[] as &[Measurement]);
        assert_eq!(
            OwnerReleasePolicy::from_json(&policy.to_json()).unwrap(),
            policy
        );
    }

    #[test]
    fn every_stage_once_with_distinct_measurements() {
        let reason = |policy: &OwnerReleasePolicy, stages| match policy.check(stages) {
            Err(BrokerError::InvalidPolicy(reason)) => reason,
            other => panic!("{other:?}"),
        };
        let mut one = OwnerReleasePolicy::default();
        one.allow(StageIndex(0), m(1));
        assert_eq!(reason(&one, 2), "stage 1 is not listed");
        assert_eq!(reason(&one, 0), "stage 0 is beyond the model's 0 stage(s)");
        let mut twice = one.clone();
        twice.stages.push(StageMeasurements {
            stage: StageIndex(0),
            measurements: vec![m(2)],
        });
        assert_eq!(reason(&twice, 1), "stage 0 is listed twice");
        let empty = OwnerReleasePolicy {
            stages: vec![StageMeasurements {
                stage: StageIndex(0),
                measurements: vec![],
            }],
        };
        assert_eq!(reason(&empty, 1), "stage 0 must allow 1 to 64 measurements");
        let doubled = OwnerReleasePolicy {
            stages: vec![StageMeasurements {
                stage: StageIndex(0),
                measurements: vec![m(1), m(1)],
            }],
        };
        assert_eq!(reason(&doubled, 1), "stage 0 lists a measurement twice");
        OwnerReleasePolicy::same_for_all_stages(3, &[m(1)])
            .check(3)
            .unwrap();
    }

    #[test]
    fn unknown_fields_and_owner_chosen_roots_are_refused() {
        let with_roots = r#"{"stages":[],"trusted_roots":{"software_tee":[]}}"#;
        assert!(matches!(
            OwnerReleasePolicy::from_json(with_roots.as_bytes()),
            Err(BrokerError::InvalidPolicy(_))
        ));
        let huge = vec![b' '; MAX_POLICY_LEN + 1];
        assert!(matches!(
            OwnerReleasePolicy::from_json(&huge),
            Err(BrokerError::InvalidPolicy(reason)) if reason.contains("larger than")
        ));
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            if let Ok(policy) = OwnerReleasePolicy::from_json(&bytes) {
                let _ = policy.check(4);
            }
        }
    }

    #[test]
    fn the_release_policy_adds_roots_and_revocations() {
        let model = ModelId::new("m").unwrap();
        let root = "11".repeat(32).parse().unwrap();
        let roots = TrustedRoots {
            software_tee: vec![root],
        };
        let policy = OwnerReleasePolicy::same_for_all_stages(2, &[m(1)]).to_release_policy(
            &model,
            &roots,
            &[m(9)],
        );
        assert_eq!(policy.trusted_roots.software_tee, vec![root]);
        assert_eq!(policy.stages.len(), 2);
        assert_eq!(policy.revoked, vec![m(9)]);
    }
}
