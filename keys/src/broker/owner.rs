//! The model owner's side of the broker: register, rotate and revoke models.
//!
//! Shard keys never leave the owner in plaintext: they are sealed (HPKE) to the broker's
//! sealing key, which [`OwnerClient::connect`] fetches with `GetBrokerInfo` over TLS
//! (the broker's certificate is checked against the PKI's CA and the broker role). Every
//! call is signed with the owner's key ([`super::authorize`]).
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use shardseal_keys::OwnerKeyStore;
//! use shardseal_keys::broker::{OwnerReleasePolicy, owner};
//! use shardseal_proto::tls::Pki;
//!
//! let pki = Pki::open("state/pki".as_ref())?;
//! let store = OwnerKeyStore::open("owner-keys".as_ref())?;
//! let manifest = std::fs::read("provisioned/resnet/manifest.signed.json")?;
//! let function: shardseal_attestation::Measurement =
//!     shardseal_attestation::Measurement::from_hex(&"ab".repeat(32))?;
//! let policy = OwnerReleasePolicy::same_for_all_stages(2, &[function]);
//! let registered =
//!     owner::register("https://127.0.0.1:7000", &pki, &store, &manifest, &policy).await?;
//! println!("registered {} {}", registered.model, registered.version);
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

use shardseal_attestation::{Measurement, ModelId, ModelVersion};
use shardseal_proto::tls::{Pki, Role};
use shardseal_proto::v1::key_broker_client::KeyBrokerClient;
use shardseal_proto::v1::{BrokerInfoRequest, RegisterModelRequest, RevokeRequest};
use tonic::transport::{Channel, Endpoint};

use crate::broker::auth::{OwnerMethod, authorize, unix_millis_now};
use crate::broker::error::BrokerError;
use crate::broker::policy::OwnerReleasePolicy;
use crate::keystore::OwnerKeyStore;
use crate::manifest::{ModelManifest, SignedManifest};
use crate::seal::{
    ContextEncoder, RecipientPrivateKey, RecipientPublicKey, Sealed, open_sealed, seal_to,
};
use crate::secret::ShardKeys;
use crate::signing::{SigningKey, VerifyingKey};

const SHARD_KEYS_DOMAIN: &str = "shardseal/v1/broker/shard-keys";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A model version the broker acknowledged: it is durably stored and served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registered {
    /// The model.
    pub model: ModelId,
    /// The version now registered.
    pub version: ModelVersion,
}

fn shard_keys_aad(model: &ModelId, version: ModelVersion) -> Vec<u8> {
    ContextEncoder::new(SHARD_KEYS_DOMAIN)
        .text(model.as_str())
        .u32(version.0)
        .finish()
}

/// Seals a model version's shard keys to the broker's sealing key, bound to the model id
/// and version: they open only on that broker, and only as that model version's keys.
pub fn seal_shard_keys(
    broker_sealing_key: &RecipientPublicKey,
    model: &ModelId,
    version: ModelVersion,
    keys: &ShardKeys,
) -> Result<Sealed, BrokerError> {
    seal_to(
        broker_sealing_key,
        SHARD_KEYS_DOMAIN.as_bytes(),
        &shard_keys_aad(model, version),
        keys.expose_secret().expose_secret(),
    )
    .map_err(BrokerError::Crypto)
}

/// The broker's side of [`seal_shard_keys`].
pub(crate) fn open_shard_keys(
    sealing_key: &RecipientPrivateKey,
    model: &ModelId,
    version: ModelVersion,
    sealed: &Sealed,
) -> Result<ShardKeys, BrokerError> {
    let cannot_open = || BrokerError::ShardKeysDoNotOpen {
        model: model.clone(),
        version,
    };
    let plaintext = open_sealed(
        sealing_key,
        SHARD_KEYS_DOMAIN.as_bytes(),
        &shard_keys_aad(model, version),
        sealed,
    )
    .map_err(|_| cannot_open())?;
    ShardKeys::from_secret_bytes(plaintext.expose_secret())
        .map_err(|e| BrokerError::ShardKeysMismatch(e.to_string()))
}

/// Builds a signed `RegisterModelRequest` (for `method` RegisterModel or RotateModel):
/// the owner-signed manifest file, the shard keys sealed to `broker_sealing_key`, and the
/// release policy.
pub fn registration_request(
    method: OwnerMethod,
    owner: &SigningKey,
    broker_sealing_key: &RecipientPublicKey,
    signed_manifest: &[u8],
    shard_keys: &ShardKeys,
    policy: &OwnerReleasePolicy,
) -> Result<RegisterModelRequest, BrokerError> {
    let manifest = read_own_manifest(signed_manifest, owner)?;
    let sealed = seal_shard_keys(
        broker_sealing_key,
        &manifest.model_id,
        manifest.version,
        shard_keys,
    )?;
    let mut request = RegisterModelRequest {
        signed_manifest: signed_manifest.to_vec(),
        shard_keys: Some(sealed.into()),
        release_policy: policy.to_json(),
        auth: None,
    };
    authorize(&mut request, method, owner, unix_millis_now())?;
    Ok(request)
}

/// Checks the owner's own signature on the manifest before sending it anywhere.
fn read_own_manifest(bytes: &[u8], owner: &SigningKey) -> Result<ModelManifest, BrokerError> {
    SignedManifest::from_bytes(bytes)
        .and_then(|signed| signed.verify(&owner.verifying_key()))
        .map_err(BrokerError::InvalidManifest)
}

/// A connection to a key broker, for a model owner.
#[derive(Debug, Clone)]
pub struct OwnerClient {
    broker: KeyBrokerClient<Channel>,
    identity: VerifyingKey,
    sealing: RecipientPublicKey,
}

impl OwnerClient {
    /// Connects over TLS (the broker's certificate must chain to the PKI's CA and name the
    /// broker role) and fetches the broker's identity and sealing keys.
    pub async fn connect(broker_url: &str, pki: &Pki) -> Result<Self, BrokerError> {
        let tls = pki.client_config(Role::Broker, None)?;
        let channel = Endpoint::from_shared(broker_url.to_owned())?
            .tls_config(tls)?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .connect()
            .await?;
        let mut broker = KeyBrokerClient::new(channel);
        let info = broker
            .get_broker_info(BrokerInfoRequest {})
            .await?
            .into_inner();
        let identity = VerifyingKey::from_slice(&info.identity_key)
            .map_err(|_| BrokerError::BadReply("the identity key is not 32 bytes"))?;
        let sealing = RecipientPublicKey::from_slice(&info.sealing_key)
            .map_err(|_| BrokerError::BadReply("the sealing key is not 32 bytes"))?;
        Ok(Self {
            broker,
            identity,
            sealing,
        })
    }

    /// Fails unless the broker's identity key is `expected` (pinned from its `broker.pub`).
    pub fn require_identity(self, expected: &VerifyingKey) -> Result<Self, BrokerError> {
        if &self.identity != expected {
            return Err(BrokerError::BrokerIdentityMismatch {
                expected: *expected,
                found: self.identity,
            });
        }
        Ok(self)
    }

    /// The broker's identity key.
    pub fn identity_key(&self) -> VerifyingKey {
        self.identity
    }

    /// The key shard keys are sealed to.
    pub fn sealing_key(&self) -> RecipientPublicKey {
        self.sealing
    }

    /// Registers a new model: `signed_manifest` is the manifest file the owner signed
    /// (`shardseal keys provision` wrote it); its shard keys come from `store`.
    pub async fn register(
        &mut self,
        store: &OwnerKeyStore,
        signed_manifest: &[u8],
        policy: &OwnerReleasePolicy,
    ) -> Result<Registered, BrokerError> {
        self.send_version(OwnerMethod::RegisterModel, store, signed_manifest, policy)
            .await
    }

    /// Registers a higher version of a model this owner registered, and makes it current.
    pub async fn rotate(
        &mut self,
        store: &OwnerKeyStore,
        signed_manifest: &[u8],
        policy: &OwnerReleasePolicy,
    ) -> Result<Registered, BrokerError> {
        self.send_version(OwnerMethod::RotateModel, store, signed_manifest, policy)
            .await
    }

    async fn send_version(
        &mut self,
        method: OwnerMethod,
        store: &OwnerKeyStore,
        signed_manifest: &[u8],
        policy: &OwnerReleasePolicy,
    ) -> Result<Registered, BrokerError> {
        let manifest = read_own_manifest(signed_manifest, store.signing_key())?;
        policy.check(u32::try_from(manifest.stages.len()).unwrap_or(u32::MAX))?;
        let shard_keys = store
            .shard_keys(&manifest.model_id, manifest.version)
            .map_err(BrokerError::State)?;
        let request = registration_request(
            method,
            store.signing_key(),
            &self.sealing,
            signed_manifest,
            &shard_keys,
            policy,
        )?;
        let reply = match method {
            OwnerMethod::RotateModel => self.broker.rotate_model(request).await?,
            OwnerMethod::RegisterModel | OwnerMethod::Revoke => {
                self.broker.register_model(request).await?
            }
        }
        .into_inner();
        let registered = Registered {
            model: ModelId::new(reply.model_id)
                .map_err(|_| BrokerError::BadReply("invalid model id"))?,
            version: ModelVersion(reply.version),
        };
        if registered.model != manifest.model_id || registered.version != manifest.version {
            return Err(BrokerError::BadReply(
                "the broker acknowledged another model version",
            ));
        }
        Ok(registered)
    }

    /// Revokes one function measurement for every version of `model`, or, with `None`, the
    /// whole model (no key of it is released again).
    pub async fn revoke(
        &mut self,
        store: &OwnerKeyStore,
        model: &ModelId,
        measurement: Option<Measurement>,
    ) -> Result<(), BrokerError> {
        let mut request = RevokeRequest {
            model_id: model.to_string(),
            measurement: measurement.map(|m| m.to_hex()).unwrap_or_default(),
            auth: None,
        };
        authorize(
            &mut request,
            OwnerMethod::Revoke,
            store.signing_key(),
            unix_millis_now(),
        )?;
        self.broker.revoke(request).await?;
        Ok(())
    }
}

/// Connects to the broker at `broker_url` and registers a new model (see
/// [`OwnerClient::register`]).
pub async fn register(
    broker_url: &str,
    pki: &Pki,
    store: &OwnerKeyStore,
    signed_manifest: &[u8],
    policy: &OwnerReleasePolicy,
) -> Result<Registered, BrokerError> {
    OwnerClient::connect(broker_url, pki)
        .await?
        .register(store, signed_manifest, policy)
        .await
}

/// Connects to the broker at `broker_url` and rotates a model to a higher version (see
/// [`OwnerClient::rotate`]).
pub async fn rotate(
    broker_url: &str,
    pki: &Pki,
    store: &OwnerKeyStore,
    signed_manifest: &[u8],
    policy: &OwnerReleasePolicy,
) -> Result<Registered, BrokerError> {
    OwnerClient::connect(broker_url, pki)
        .await?
        .rotate(store, signed_manifest, policy)
        .await
}

/// Connects to the broker at `broker_url` and revokes a measurement or a whole model (see
/// [`OwnerClient::revoke`]).
pub async fn revoke(
    broker_url: &str,
    pki: &Pki,
    store: &OwnerKeyStore,
    model: &ModelId,
    measurement: Option<Measurement>,
) -> Result<(), BrokerError> {
    OwnerClient::connect(broker_url, pki)
        .await?
        .revoke(store, model, measurement)
        .await
}

#[cfg(test)]
mod tests {
    use shardseal_attestation::StageIndex;

    use super::*;
    use crate::secret::ShardKey;

    #[test]
    fn shard_keys_open_only_for_their_broker_model_and_version() {
        let broker = RecipientPrivateKey::generate().unwrap();
        let model = ModelId::new("m").unwrap();
        let mut keys = ShardKeys::new();
        keys.insert(StageIndex(0), ShardKey::from_bytes([7; 32]));
        let sealed = seal_shard_keys(&broker.public_key(), &model, ModelVersion(3), &keys).unwrap();
        assert_eq!(
            open_shard_keys(&broker, &model, ModelVersion(3), &sealed).unwrap(),
            keys
        );
        let other_model = ModelId::new("n").unwrap();
        for (key, model, version) in [
            (&RecipientPrivateKey::generate().unwrap(), &model, 3),
            (&broker, &other_model, 3),
            (&broker, &model, 4),
        ] {
            assert!(matches!(
                open_shard_keys(key, model, ModelVersion(version), &sealed),
                Err(BrokerError::ShardKeysDoNotOpen { .. })
            ));
        }
    }
}
