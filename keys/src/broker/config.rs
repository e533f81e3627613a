//! The broker's configuration: a serde struct with defaults, checked by
//! [`BrokerConfig::validate`] before anything starts.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shardseal_attestation::{DEFAULT_MAX_OUTSTANDING_NONCES, DEFAULT_NONCE_LIFETIME, TrustedRoots};

use crate::broker::auth::DEFAULT_OWNER_AUTH_WINDOW;
use crate::broker::error::BrokerError;
use crate::signing::VerifyingKey;

/// How long a function token is valid, by default.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// How many attestations the broker works on at once, by default; more are refused with
/// `RESOURCE_EXHAUSTED`.
pub const DEFAULT_MAX_CONCURRENT_ATTESTATIONS: usize = 256;
/// The longest any RPC may take on the broker, by default.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything a key broker needs to start. Reads from JSON or TOML with every field but
/// the two folders optional, e.g.
///
/// ```toml
/// state_dir = "/var/lib/shardseal/broker"
/// pki_dir = "/var/lib/shardseal/pki"
/// owner_keys = ["<64 hex digits: an owner's Ed25519 public key>"]
///
/// [trusted_roots]
/// software_tee = ["<64 hex digits from platform.key.pub>"]
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// The state folder (identity, master key, registered models, audit log). Created
    /// 0700 if missing.
    pub state_dir: PathBuf,
    /// The PKI folder whose broker identity the service presents over TLS.
    pub pki_dir: PathBuf,
    /// The TEE platform roots whose quotes the broker accepts. Owners never choose these.
    pub trusted_roots: TrustedRoots,
    /// Owner public keys allowed to use the owner API. Empty: the owner API refuses
    /// everyone (the broker still serves models registered earlier).
    pub owner_keys: Vec<VerifyingKey>,
    /// How long a nonce stays usable (milliseconds).
    pub nonce_lifetime_ms: u64,
    /// How many nonces may be outstanding at once.
    pub max_outstanding_nonces: usize,
    /// How long a function token is valid (milliseconds).
    pub token_lifetime_ms: u64,
    /// How far an owner call's timestamp may be from the broker's clock (milliseconds).
    pub owner_auth_window_ms: u64,
    /// How many attestations are worked on at once.
    pub max_concurrent_attestations: usize,
    /// The deadline of every RPC (milliseconds).
    pub request_timeout_ms: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::new(),
            pki_dir: PathBuf::new(),
            trusted_roots: TrustedRoots::default(),
            owner_keys: Vec::new(),
            nonce_lifetime_ms: millis(DEFAULT_NONCE_LIFETIME),
            max_outstanding_nonces: DEFAULT_MAX_OUTSTANDING_NONCES,
            token_lifetime_ms: millis(DEFAULT_TOKEN_LIFETIME),
            owner_auth_window_ms: millis(DEFAULT_OWNER_AUTH_WINDOW),
            max_concurrent_attestations: DEFAULT_MAX_CONCURRENT_ATTESTATIONS,
            request_timeout_ms: millis(DEFAULT_REQUEST_TIMEOUT),
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl BrokerConfig {
    /// The defaults, with the state and PKI folders set.
    pub fn new(state_dir: impl Into<PathBuf>, pki_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            pki_dir: pki_dir.into(),
            ..Self::default()
        }
    }

    /// Checks every setting; the error names the first bad one.
    pub fn validate(&self) -> Result<(), BrokerError> {
        let bad = |text: &str| Err(BrokerError::Config(text.to_owned()));
        if self.state_dir.as_os_str().is_empty() {
            return bad("state_dir is required");
        }
        if self.pki_dir.as_os_str().is_empty() {
            return bad("pki_dir is required");
        }
        if self.trusted_roots.software_tee.is_empty() {
            return bad(
                "trusted_roots lists no TEE platform key: no function could ever attest \
                 (pass the quoting agent's platform.key.pub)",
            );
        }
        if !(1_000..=600_000).contains(&self.nonce_lifetime_ms) {
            return bad("nonce_lifetime_ms must be 1 s to 10 min");
        }
        if self.max_outstanding_nonces == 0 {
            return bad("max_outstanding_nonces must be at least 1");
        }
        if !(1_000..=86_400_000).contains(&self.token_lifetime_ms) {
            return bad("token_lifetime_ms must be 1 s to 24 h");
        }
        if !(1_000..=3_600_000).contains(&self.owner_auth_window_ms) {
            return bad("owner_auth_window_ms must be 1 s to 1 h");
        }
        if self.max_concurrent_attestations == 0 {
            return bad("max_concurrent_attestations must be at least 1");
        }
        if self.request_timeout_ms < 100 {
            return bad("request_timeout_ms must be at least 100");
        }
        Ok(())
    }

    /// [`Self::nonce_lifetime_ms`] as a duration.
    pub fn nonce_lifetime(&self) -> Duration {
        Duration::from_millis(self.nonce_lifetime_ms)
    }

    /// [`Self::owner_auth_window_ms`] as a duration.
    pub fn owner_auth_window(&self) -> Duration {
        Duration::from_millis(self.owner_auth_window_ms)
    }

    /// [`Self::request_timeout_ms`] as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> BrokerConfig {
        let mut config = BrokerConfig::new("/tmp/state", "/tmp/pki");
        config
            .trusted_roots
            .software_tee
            .push("11".repeat(32).parse().unwrap());
        config
    }

    #[test]
    fn defaults_need_folders_and_a_platform_root() {
        assert!(matches!(
            BrokerConfig::default().validate(),
            Err(BrokerError::Config(text)) if text == "state_dir is required"
        ));
        let mut config = valid();
        config.trusted_roots.software_tee.clear();
        assert!(matches!(
            config.validate(),
            Err(BrokerError::Config(text)) if text.starts_with("trusted_roots lists no")
        ));
        valid().validate().unwrap();
        assert_eq!(valid().token_lifetime_ms, 15 * 60 * 1000);
        assert_eq!(valid().owner_auth_window_ms, 5 * 60 * 1000);
    }

    #[test]
    fn out_of_range_settings_are_named() {
        let mut config = valid();
        config.nonce_lifetime_ms = 10;
        assert!(matches!(
            config.validate(),
            Err(BrokerError::Config(text)) if text.starts_with("nonce_lifetime_ms")
        ));
        let mut config = valid();
        config.max_concurrent_attestations = 0;
        assert!(matches!(
            config.validate(),
            Err(BrokerError::Config(text)) if text.starts_with("max_concurrent_attestations")
        ));
    }

    #[test]
    fn reads_json_with_defaults() {
        let json = format!(
            r#"{{"state_dir":"s","pki_dir":"p","trusted_roots":{{"software_tee":["{}"]}},"owner_keys":["{}"]}}"#,
            "11".repeat(32),
            "22".repeat(32)
        );
        let config: BrokerConfig = serde_json::from_str(&json).unwrap();
        config.validate().unwrap();
        assert_eq!(
            config.max_outstanding_nonces,
            DEFAULT_MAX_OUTSTANDING_NONCES
        );
        assert_eq!(config.owner_keys.len(), 1);
        assert!(serde_json::from_str::<BrokerConfig>(r#"{"colour":"red"}"#).is_err());
    }
}
