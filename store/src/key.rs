//! Store keys: relative paths checked before they reach a backend.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use shardseal_attestation::{ModelId, ModelVersion, StageIndex};

use crate::error::{Error, Result};

/// The longest key, in bytes: S3's limit on an object key.
pub const MAX_KEY_LEN: usize = 1024;

/// The folder every model's objects live under.
const MODELS_DIR: &str = "models";

/// The file name of a model version's signed manifest.
const MANIFEST_FILE: &str = "manifest.json";

/// Which rule a rejected key (or list prefix) breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyProblem {
    /// The key is the empty string.
    #[error("a key cannot be empty")]
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`] bytes.
    #[error("a key is at most {MAX_KEY_LEN} bytes")]
    TooLong,
    /// The key starts with `/`: keys are relative to the store's root.
    #[error("a key is relative: drop the leading '/'")]
    Absolute,
    /// Two `/` in a row, or a trailing `/`.
    #[error("a key has no empty path components ('//' or a trailing '/')")]
    EmptyComponent,
    /// A `.` or `..` component, which could climb out of the store's folder.
    #[error("'.' and '..' are not path components of a key")]
    DotComponent,
    /// A character outside `A-Z a-z 0-9 . _ -` (and `/` between components).
    #[error("character {0:?} is not allowed: use A-Z a-z 0-9 . _ - and '/' between components")]
    BadCharacter(char),
}

/// The key of one object in a shard store: a relative path such as
/// `models/mlp/v2/stage-0.shard`.
///
/// Components are separated by `/`, are not empty, are not `.` or `..`, and use only
/// `A-Z a-z 0-9 . _ -`; the whole key is at most [`MAX_KEY_LEN`] bytes. The narrow alphabet
/// keeps a key the same file name on every backend: nothing to percent-encode for S3, and no
/// clash with the `#<n>` suffix of the local backend's staging files.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StoreKey(String);

impl StoreKey {
    /// Checks and wraps a key.
    pub fn new(key: impl Into<String>) -> Result<Self> {
        let key = key.into();
        check_path(&key)?;
        Ok(Self(key))
    }

    /// The key of a model version's encrypted shard for one stage:
    /// `models/<model>/v<version>/stage-<index>.shard`.
    pub fn shard(model: &ModelId, version: ModelVersion, stage: StageIndex) -> Self {
        // A ModelId is one component of the allowed alphabet that does not start with '.', so
        // the result is valid by construction.
        Self(format!(
            "{}/stage-{}.shard",
            Self::version_prefix(model, version),
            stage.0
        ))
    }

    /// The key of a model version's signed manifest: `models/<model>/v<version>/manifest.json`.
    pub fn manifest(model: &ModelId, version: ModelVersion) -> Self {
        Self(format!(
            "{}/{MANIFEST_FILE}",
            Self::version_prefix(model, version)
        ))
    }

    /// The prefix under which all objects of one model version live, `models/<model>/v<version>`,
    /// for [`ShardStore::list`](crate::ShardStore::list).
    pub fn version_prefix(model: &ModelId, version: ModelVersion) -> String {
        format!("{}/v{}", Self::model_prefix(model), version.0)
    }

    /// The prefix under which all versions of a model live, `models/<model>`, for
    /// [`ShardStore::list`](crate::ShardStore::list).
    pub fn model_prefix(model: &ModelId) -> String {
        format!("{MODELS_DIR}/{model}")
    }

    /// The newest version of `model` among `keys` that holds a shard of `stage` where
    /// [`StoreKey::shard`] puts it. What a store lists is only a hint (the broker decides
    /// which version a function serves).
    pub fn newest_shard_version<'a>(
        keys: impl IntoIterator<Item = &'a StoreKey>,
        model: &ModelId,
        stage: StageIndex,
    ) -> Option<ModelVersion> {
        let versions = format!("{}/v", Self::model_prefix(model));
        keys.into_iter()
            .filter_map(|key| {
                let rest = key.as_str().strip_prefix(&versions)?;
                let version = ModelVersion(rest.split('/').next()?.parse().ok()?);
                (Self::shard(model, version, stage) == *key).then_some(version)
            })
            .max()
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks a list prefix: empty (the whole store) or a key-shaped path of whole components.
pub(crate) fn check_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty() {
        Ok(())
    } else {
        check_path(prefix)
    }
}

fn check_path(key: &str) -> Result<()> {
    let problem = if key.is_empty() {
        Some(KeyProblem::Empty)
    } else if key.len() > MAX_KEY_LEN {
        Some(KeyProblem::TooLong)
    } else if key.starts_with('/') {
        Some(KeyProblem::Absolute)
    } else {
        key.split('/').find_map(component_problem)
    };
    match problem {
        Some(problem) => Err(Error::invalid_key(key, problem)),
        None => Ok(()),
    }
}

fn component_problem(component: &str) -> Option<KeyProblem> {
    if component.is_empty() {
        return Some(KeyProblem::EmptyComponent);
    }
    if component == "." || component == ".." {
        return Some(KeyProblem::DotComponent);
    }
    component
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        .map(KeyProblem::BadCharacter)
}

impl FromStr for StoreKey {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

impl TryFrom<String> for StoreKey {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::new(s)
    }
}

impl TryFrom<&str> for StoreKey {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

impl From<StoreKey> for String {
    fn from(key: StoreKey) -> String {
        key.0
    }
}

impl AsRef<str> for StoreKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreKey({:?})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn problem_of(key: &str) -> KeyProblem {
        match StoreKey::new(key) {
            Err(Error::InvalidKey { problem, .. }) => problem,
            other => panic!("{key:?} should be rejected, got {other:?}"),
        }
    }

    #[test]
    fn accepts_the_layout_keys() {
        for key in [
            "models/mlp/v2/stage-0.shard",
            "models/mlp/v2/manifest.json",
            "a",
            "x/.hidden/y_z-1",
        ] {
            assert_eq!(StoreKey::new(key).unwrap().as_str(), key);
        }
    }

    #[test]
    fn names_the_rule_each_bad_key_breaks() {
        assert_eq!(problem_of(""), KeyProblem::Empty);
        assert_eq!(problem_of("/etc/passwd"), KeyProblem::Absolute);
        assert_eq!(problem_of("models/../../etc"), KeyProblem::DotComponent);
        assert_eq!(problem_of(".."), KeyProblem::DotComponent);
        assert_eq!(problem_of("models/./x"), KeyProblem::DotComponent);
        assert_eq!(problem_of("models//x"), KeyProblem::EmptyComponent);
        assert_eq!(problem_of("models/x/"), KeyProblem::EmptyComponent);
        assert_eq!(problem_of("models\\..\\x"), KeyProblem::BadCharacter('\\'));
        assert_eq!(problem_of("a b"), KeyProblem::BadCharacter(' '));
        assert_eq!(problem_of("shard#1"), KeyProblem::BadCharacter('#'));
        assert_eq!(problem_of("c:x"), KeyProblem::BadCharacter(':'));
        assert_eq!(problem_of("é"), KeyProblem::BadCharacter('é'));
        assert_eq!(
            problem_of(&"a".repeat(MAX_KEY_LEN + 1)),
            KeyProblem::TooLong
        );
        assert!(StoreKey::new("a".repeat(MAX_KEY_LEN)).is_ok());
    }

    #[test]
    fn the_error_keeps_at_most_128_characters_of_the_key() {
        let long = format!("/{}", "a".repeat(5000));
        match StoreKey::new(long) {
            Err(Error::InvalidKey { key, problem }) => {
                assert_eq!(problem, KeyProblem::TooLong);
                assert_eq!(key.len(), 128);
            }
            other => panic!("expected InvalidKey, got {other:?}"),
        }
    }

    #[test]
    fn layout_keys_follow_the_documented_shape() {
        let model = ModelId::new("mlp").unwrap();
        assert_eq!(
            StoreKey::shard(&model, ModelVersion(2), StageIndex(1)).as_str(),
            "models/mlp/v2/stage-1.shard"
        );
        assert_eq!(
            StoreKey::manifest(&model, ModelVersion(2)).as_str(),
            "models/mlp/v2/manifest.json"
        );
        assert_eq!(
            StoreKey::version_prefix(&model, ModelVersion(2)),
            "models/mlp/v2"
        );
    }

    #[test]
    fn the_newest_version_with_this_stages_shard_is_found_among_listed_keys() {
        let model = ModelId::new("mlp").unwrap();
        let keys: Vec<StoreKey> = [
            "models/mlp/v2/stage-0.shard",
            "models/mlp/v2/stage-1.shard",
            "models/mlp/v10/stage-0.shard",
            "models/mlp/v10/manifest.json",
            // Not where `shard` puts a shard of stage 1, or not a version at all.
            "models/mlp/v11/stage-1.shard.tmp",
            "models/mlp/v12/extra/stage-1.shard",
            "models/mlp/v012/stage-1.shard",
            "models/mlp/vx/stage-1.shard",
            "models/mlp/v99999999999/stage-1.shard",
            "models/mlp2/v40/stage-1.shard",
        ]
        .into_iter()
        .map(|k| StoreKey::new(k).unwrap())
        .collect();
        let newest = |stage| StoreKey::newest_shard_version(&keys, &model, StageIndex(stage));
        assert_eq!(newest(0), Some(ModelVersion(10)));
        assert_eq!(newest(1), Some(ModelVersion(2)));
        assert_eq!(newest(2), None);
        assert_eq!(StoreKey::model_prefix(&model), "models/mlp");
    }

    #[test]
    fn prefixes_follow_the_key_rules_but_may_be_empty() {
        assert!(check_prefix("").is_ok());
        assert!(check_prefix("models/mlp").is_ok());
        assert!(matches!(
            check_prefix("models/"),
            Err(Error::InvalidKey {
                problem: KeyProblem::EmptyComponent,
                ..
            })
        ));
        assert!(matches!(
            check_prefix("../x"),
            Err(Error::InvalidKey {
                problem: KeyProblem::DotComponent,
                ..
            })
        ));
    }

    #[test]
    fn serde_checks_keys_too() {
        let key: StoreKey = serde_json::from_str("\"models/m/v1/stage-0.shard\"").unwrap();
        assert_eq!(key.as_str(), "models/m/v1/stage-0.shard");
        assert!(serde_json::from_str::<StoreKey>("\"../secret\"").is_err());
        assert_eq!(
            serde_json::to_string(&key).unwrap(),
            "\"models/m/v1/stage-0.shard\""
        );
    }

    proptest! {
        #[test]
        fn an_accepted_key_never_climbs_or_roots(key in "[a-z./_#-]{0,24}") {
            if let Ok(key) = StoreKey::new(key.clone()) {
                prop_assert!(!key.as_str().starts_with('/'));
                prop_assert!(key.as_str().split('/').all(|c| !c.is_empty() && c != "." && c != ".."));
            }
        }

        #[test]
        fn every_model_id_gives_valid_layout_keys(
            id in "[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}",
            version: u32,
            stage: u32,
        ) {
            let model = ModelId::new(id).unwrap();
            let shard = StoreKey::shard(&model, ModelVersion(version), StageIndex(stage));
            prop_assert_eq!(StoreKey::new(shard.as_str()).unwrap(), shard.clone());
            let manifest = StoreKey::manifest(&model, ModelVersion(version));
            prop_assert_eq!(StoreKey::new(manifest.as_str()).unwrap(), manifest.clone());
            let prefix = StoreKey::version_prefix(&model, ModelVersion(version));
            prop_assert!(check_prefix(&prefix).is_ok());
            let dir = format!("{prefix}/");
            prop_assert!(shard.as_str().starts_with(&dir));
        }
    }
}
