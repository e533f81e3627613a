//! Owner authentication: every owner API call carries an [`OwnerAuth`], an Ed25519
//! signature by an owner key over
//!
//! ```text
//! ContextEncoder("shardseal/v1/broker/owner-auth")
//!   ‖ method ("/shardseal.v1.KeyBroker/RegisterModel", ...)
//!   ‖ SHA-256(request protobuf with its `auth` field cleared)
//!   ‖ issued_at_ms (u64 BE)
//!   ‖ request_nonce (16 to 64 random bytes)
//! ```
//!
//! The method name keeps a signed Register from being replayed as a Rotate; the digest
//! binds every field of the request; `issued_at_ms` must be within a window (5 minutes by
//! default) of the broker's clock; and the broker remembers each `(owner key,
//! request_nonce)` it accepted until it falls out of that window, so the same call cannot be
//! played twice.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use ring::digest;
use shardseal_proto::v1::{OwnerAuth, RegisterModelRequest, RevokeRequest};

use crate::broker::error::BrokerError;
use crate::seal::ContextEncoder;
use crate::secret::fill_random;
use crate::signing::{Signature, SigningKey, VerifyingKey};

const OWNER_AUTH_DOMAIN: &str = "shardseal/v1/broker/owner-auth";
/// How far an owner call's `issued_at_ms` may be from the broker's clock, by default.
pub const DEFAULT_OWNER_AUTH_WINDOW: Duration = Duration::from_secs(5 * 60);
/// Length of the request nonce [`authorize`] puts in each call.
pub const REQUEST_NONCE_LEN: usize = 16;
const MIN_REQUEST_NONCE_LEN: usize = 16;
const MAX_REQUEST_NONCE_LEN: usize = 64;
/// How many accepted owner calls the broker remembers for replay detection at most.
const MAX_REMEMBERED_CALLS: usize = 100_000;

/// The owner API methods, each signed under its own name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OwnerMethod {
    /// `RegisterModel`.
    RegisterModel,
    /// `RotateModel`.
    RotateModel,
    /// `Revoke`.
    Revoke,
}

impl OwnerMethod {
    /// The gRPC method path, as signed.
    pub fn path(self) -> &'static str {
        match self {
            Self::RegisterModel => "/shardseal.v1.KeyBroker/RegisterModel",
            Self::RotateModel => "/shardseal.v1.KeyBroker/RotateModel",
            Self::Revoke => "/shardseal.v1.KeyBroker/Revoke",
        }
    }
}

/// An owner API request: a protobuf message with an `auth` field.
pub trait OwnerRequest: Message + Clone {
    /// The request's authentication.
    fn auth(&self) -> Option<&OwnerAuth>;
    /// Replaces the request's authentication.
    fn set_auth(&mut self, auth: Option<OwnerAuth>);
}

impl OwnerRequest for RegisterModelRequest {
    fn auth(&self) -> Option<&OwnerAuth> {
        self.auth.as_ref()
    }
    fn set_auth(&mut self, auth: Option<OwnerAuth>) {
        self.auth = auth;
    }
}

impl OwnerRequest for RevokeRequest {
    fn auth(&self) -> Option<&OwnerAuth> {
        self.auth.as_ref()
    }
    fn set_auth(&mut self, auth: Option<OwnerAuth>) {
        self.auth = auth;
    }
}

/// SHA-256 of the request's protobuf encoding with `auth` cleared.
fn request_digest<R: OwnerRequest>(request: &R) -> [u8; 32] {
    let mut bare = request.clone();
    bare.set_auth(None);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, &bare.encode_to_vec()).as_ref());
    out
}

fn signed_message(
    method: OwnerMethod,
    digest: &[u8; 32],
    issued_at_ms: u64,
    nonce: &[u8],
) -> Vec<u8> {
    ContextEncoder::new(OWNER_AUTH_DOMAIN)
        .text(method.path())
        .bytes(digest)
        .bytes(&issued_at_ms.to_be_bytes())
        .bytes(nonce)
        .finish()
}

/// Signs `request` for `method` with the owner's key, stamped `issued_at_ms` (Unix
/// milliseconds; normally [`unix_millis_now`]) and a fresh random request nonce, and sets
/// its `auth` field.
pub fn authorize<R: OwnerRequest>(
    request: &mut R,
    method: OwnerMethod,
    owner: &SigningKey,
    issued_at_ms: u64,
) -> Result<(), BrokerError> {
    let mut nonce = [0u8; REQUEST_NONCE_LEN];
    fill_random(&mut nonce).map_err(BrokerError::Crypto)?;
    let digest = request_digest(request);
    let signature = owner.sign(&signed_message(method, &digest, issued_at_ms, &nonce));
    request.set_auth(Some(OwnerAuth {
        owner_key: owner.verifying_key().as_bytes().to_vec(),
        issued_at_ms,
        request_nonce: nonce.to_vec(),
        signature: signature.as_bytes().to_vec(),
    }));
    Ok(())
}

/// The current time in Unix milliseconds.
pub fn unix_millis_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The broker's side: the authorized owner keys and the calls seen recently.
#[derive(Debug)]
pub(crate) struct OwnerAuthenticator {
    owners: HashSet<VerifyingKey>,
    window_ms: u64,
    seen: Mutex<SeenCalls>,
}

#[derive(Debug, Default)]
struct SeenCalls {
    /// (owner key, request nonce) -> when it may be forgotten (Unix ms).
    calls: HashMap<(VerifyingKey, Vec<u8>), u64>,
    /// The same calls ordered by when they may be forgotten.
    by_expiry: BTreeSet<(u64, VerifyingKey, Vec<u8>)>,
}

impl OwnerAuthenticator {
    pub(crate) fn new(owners: &[VerifyingKey], window: Duration) -> Self {
        Self {
            owners: owners.iter().copied().collect(),
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            seen: Mutex::new(SeenCalls::default()),
        }
    }

    /// Checks the request's `OwnerAuth` for `method` at broker time `now_ms`, in this order:
    /// present and well-formed, a listed owner key, within the time window, a valid
    /// signature, and not seen before. Returns the owner's key.
    pub(crate) fn authenticate<R: OwnerRequest>(
        &self,
        method: OwnerMethod,
        request: &R,
        now_ms: u64,
    ) -> Result<VerifyingKey, BrokerError> {
        let auth = request.auth().ok_or(BrokerError::OwnerAuthMissing)?;
        let owner = VerifyingKey::from_slice(&auth.owner_key)
            .map_err(|_| BrokerError::OwnerAuthMalformed("the owner key is not 32 bytes"))?;
        let signature = Signature::from_slice(&auth.signature)
            .map_err(|_| BrokerError::OwnerAuthMalformed("the signature is not 64 bytes"))?;
        if !(MIN_REQUEST_NONCE_LEN..=MAX_REQUEST_NONCE_LEN).contains(&auth.request_nonce.len()) {
            return Err(BrokerError::OwnerAuthMalformed(
                "the request nonce must be 16 to 64 bytes",
            ));
        }
        if !self.owners.contains(&owner) {
            return Err(BrokerError::UnknownOwner(owner));
        }
        let skew = i128::from(now_ms) - i128::from(auth.issued_at_ms);
        if skew.unsigned_abs() > u128::from(self.window_ms) {
            return Err(BrokerError::OwnerAuthStale {
                skew_ms: i64::try_from(skew).unwrap_or(if skew > 0 { i64::MAX } else { i64::MIN }),
                window_ms: self.window_ms,
            });
        }
        let message = signed_message(
            method,
            &request_digest(request),
            auth.issued_at_ms,
            &auth.request_nonce,
        );
        owner
            .verify(&message, &signature)
            .map_err(|_| BrokerError::OwnerSignatureInvalid)?;
        // Remembered until its issued_at leaves the window: after that the call is refused
        // as stale anyway.
        let forget_at = auth.issued_at_ms.saturating_add(self.window_ms);
        self.remember(owner, auth.request_nonce.clone(), forget_at, now_ms)?;
        Ok(owner)
    }

    fn remember(
        &self,
        owner: VerifyingKey,
        nonce: Vec<u8>,
        forget_at: u64,
        now_ms: u64,
    ) -> Result<(), BrokerError> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((expiry, _, _)) = seen.by_expiry.first() {
            if *expiry >= now_ms {
                break;
            }
            if let Some((_, key, nonce)) = seen.by_expiry.pop_first() {
                seen.calls.remove(&(key, nonce));
            }
        }
        let key = (owner, nonce);
        if seen.calls.contains_key(&key) {
            return Err(BrokerError::OwnerAuthReplayed);
        }
        if seen.calls.len() >= MAX_REMEMBERED_CALLS {
            return Err(BrokerError::OwnerReplayCacheFull);
        }
        seen.by_expiry.insert((forget_at, key.0, key.1.clone()));
        seen.calls.insert(key, forget_at);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> RevokeRequest {
        RevokeRequest {
            model_id: "m".into(),
            measurement: String::new(),
            auth: None,
        }
    }

    const NOW: u64 = 1_700_000_000_000;

    fn setup() -> (SigningKey, OwnerAuthenticator) {
        let owner = SigningKey::generate().unwrap();
        let auth = OwnerAuthenticator::new(&[owner.verifying_key()], DEFAULT_OWNER_AUTH_WINDOW);
        (owner, auth)
    }

    #[test]
    fn a_signed_call_is_accepted_once() {
        let (owner, auth) = setup();
        let mut req = request();
        authorize(&mut req, OwnerMethod::Revoke, &owner, NOW).unwrap();
        assert_eq!(
            auth.authenticate(OwnerMethod::Revoke, &req, NOW + 1000)
                .unwrap(),
            owner.verifying_key()
        );
        assert!(matches!(
            auth.authenticate(OwnerMethod::Revoke, &req, NOW + 2000),
            Err(BrokerError::OwnerAuthReplayed)
        ));
    }

    #[test]
    fn changed_fields_methods_and_keys_are_refused() {
        let (owner, auth) = setup();
        let mut req = request();
        authorize(&mut req, OwnerMethod::Revoke, &owner, NOW).unwrap();

        let mut changed = req.clone();
        changed.measurement = "aa".repeat(32);
        assert!(matches!(
            auth.authenticate(OwnerMethod::Revoke, &changed, NOW),
            Err(BrokerError::OwnerSignatureInvalid)
        ));
        let mut register = RegisterModelRequest {
            auth: req.auth.clone(),
            ..Default::default()
        };
        assert!(matches!(
            auth.authenticate(OwnerMethod::RotateModel, &register, NOW),
            Err(BrokerError::OwnerSignatureInvalid)
        ));
        // Signed for Register, presented as Rotate.
        authorize(&mut register, OwnerMethod::RegisterModel, &owner, NOW).unwrap();
        assert!(matches!(
            auth.authenticate(OwnerMethod::RotateModel, &register, NOW),
            Err(BrokerError::OwnerSignatureInvalid)
        ));

        let stranger = SigningKey::generate().unwrap();
        let mut theirs = request();
        authorize(&mut theirs, OwnerMethod::Revoke, &stranger, NOW).unwrap();
        assert!(matches!(
            auth.authenticate(OwnerMethod::Revoke, &theirs, NOW),
            Err(BrokerError::UnknownOwner(key)) if key == stranger.verifying_key()
        ));
        assert!(matches!(
            auth.authenticate(OwnerMethod::Revoke, &request(), NOW),
            Err(BrokerError::OwnerAuthMissing)
        ));
        let mut short_nonce = req.clone();
        if let Some(a) = short_nonce.auth.as_mut() {
            a.request_nonce.truncate(8);
        }
        assert!(matches!(
            auth.authenticate(OwnerMethod::Revoke, &short_nonce, NOW),
            Err(BrokerError::OwnerAuthMalformed(_))
        ));
    }

    #[test]
    fn calls_outside_the_window_are_stale() {
        let (owner, auth) = setup();
        let window = DEFAULT_OWNER_AUTH_WINDOW.as_millis() as u64;
        for (issued, skew) in [
            (NOW - window - 1, (window + 1) as i64),
            (NOW + window + 1, -((window + 1) as i64)),
        ] {
            let mut req = request();
            authorize(&mut req, OwnerMethod::Revoke, &owner, issued).unwrap();
            assert!(matches!(
                auth.authenticate(OwnerMethod::Revoke, &req, NOW),
                Err(BrokerError::OwnerAuthStale { skew_ms, .. }) if skew_ms == skew
            ));
        }
        // At the edge of the window it is still accepted.
        let mut req = request();
        authorize(&mut req, OwnerMethod::Revoke, &owner, NOW - window).unwrap();
        auth.authenticate(OwnerMethod::Revoke, &req, NOW).unwrap();
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_auth_fields_are_refused_without_panicking(
            owner_key in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
            nonce in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80),
            signature in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80),
            issued_at_ms in proptest::prelude::any::<u64>(),
        ) {
            let (_, auth) = setup();
            let mut req = request();
            req.auth = Some(OwnerAuth { owner_key, issued_at_ms, request_nonce: nonce, signature });
            proptest::prop_assert!(auth.authenticate(OwnerMethod::Revoke, &req, NOW).is_err());
        }
    }

    #[test]
    fn remembered_calls_are_forgotten_after_the_window() {
        let (owner, auth) = setup();
        let window = DEFAULT_OWNER_AUTH_WINDOW.as_millis() as u64;
        let mut first = request();
        authorize(&mut first, OwnerMethod::Revoke, &owner, NOW).unwrap();
        auth.authenticate(OwnerMethod::Revoke, &first, NOW).unwrap();
        let mut later = request();
        authorize(&mut later, OwnerMethod::Revoke, &owner, NOW + window + 1).unwrap();
        auth.authenticate(OwnerMethod::Revoke, &later, NOW + window + 1)
            .unwrap();
        let seen = auth.seen.lock().unwrap();
        assert_eq!(seen.calls.len(), 1);
    }
}
