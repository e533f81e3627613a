//! Ed25519 signatures (ring), and [`Signed<T>`]: a document signed over its exact bytes.
//!
//! The model owner signs model manifests; the broker signs pipeline manifests and tokens.
//! All of them are a [`Signed<T>`]: the canonical serialized body, the signer's public key
//! and the signature. A verifier checks the signer against the key it trusts and the
//! signature over the exact body bytes *before* parsing the body, then parses it and checks
//! its rules ([`SignedPayload::validate`]). Each payload type has its own domain label in
//! the signed message, so a signature over one kind of document never verifies as another.

use std::fmt;
use std::marker::PhantomData;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

use crate::error::Error;
use crate::seal::ContextEncoder;
use crate::secret::fill_random;

/// Length of an Ed25519 public key.
pub const VERIFYING_KEY_LEN: usize = 32;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// The largest signed document [`Signed::from_bytes`] reads (a manifest is a few KiB).
pub const MAX_SIGNED_LEN: usize = 4 << 20;

const SIGNED_DOMAIN: &str = "shardseal/v1/signed";
const FILE_FORMAT: &str = "shardseal-signed-v1";

/// An Ed25519 signing key, kept as its 32-byte seed.
///
/// ring's key pair (which expands the seed) is rebuilt for each signature and dropped right
/// after, because ring does not wipe it; the seed itself is wiped on drop.
pub struct SigningKey {
    seed: Box<[u8; 32]>,
    public: VerifyingKey,
}

impl SigningKey {
    /// A fresh key from the system CSPRNG.
    pub fn generate() -> Result<Self, Error> {
        let mut seed = Box::new([0u8; 32]);
        fill_random(&mut seed[..])?;
        Ok(Self::from_boxed_seed(seed))
    }

    /// Rebuilds a key from its 32-byte seed.
    pub fn from_seed(seed: &[u8]) -> Result<Self, Error> {
        if seed.len() != 32 {
            return Err(Error::InvalidLength {
                what: "Ed25519 seed",
                expected: 32,
                actual: seed.len(),
            });
        }
        let mut boxed = Box::new([0u8; 32]);
        boxed.copy_from_slice(seed);
        Ok(Self::from_boxed_seed(boxed))
    }

    fn from_boxed_seed(seed: Box<[u8; 32]>) -> Self {
        let mut public = [0u8; VERIFYING_KEY_LEN];
        // ring's Ed25519 public keys are 32 bytes.
        public.copy_from_slice(keypair(&seed).public_key().as_ref());
        Self {
            seed,
            public: VerifyingKey(public),
        }
    }

    /// The seed, to store the key (in a 0600 file or under a seal) and nowhere else.
    pub fn expose_seed(&self) -> &[u8; 32] {
        &self.seed
    }

    /// The public half.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.public
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> Signature {
        let sig = keypair(&self.seed).sign(message);
        let mut out = [0u8; SIGNATURE_LEN];
        out.copy_from_slice(sig.as_ref());
        Signature(out)
    }
}

fn keypair(seed: &[u8; 32]) -> Ed25519KeyPair {
    match Ed25519KeyPair::from_seed_unchecked(seed) {
        Ok(pair) => pair,
        // ring rejects only a seed that is not 32 bytes, and this one is 32 by type.
        Err(_) => unreachable!("an Ed25519 seed is 32 bytes"),
    }
}

impl Drop for SigningKey {
    fn drop(&mut self) {
        self.seed.zeroize();
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey(<redacted>, public {})", self.public)
    }
}

impl PartialEq for SigningKey {
    /// Constant time.
    fn eq(&self, other: &Self) -> bool {
        self.seed[..].ct_eq(&other.seed[..]).into()
    }
}

impl Eq for SigningKey {}

/// An Ed25519 public key. Shown and serialized as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VerifyingKey([u8; VERIFYING_KEY_LEN]);

impl VerifyingKey {
    /// Wraps 32 bytes.
    pub fn from_bytes(bytes: [u8; VERIFYING_KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// Reads a key received from a peer.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
        bytes
            .try_into()
            .map(Self)
            .map_err(|_| Error::InvalidLength {
                what: "Ed25519 public key",
                expected: VERIFYING_KEY_LEN,
                actual: bytes.len(),
            })
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8; VERIFYING_KEY_LEN] {
        &self.0
    }

    /// The key as 64 lower-case hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Checks `signature` over `message`.
    pub fn verify(&self, message: &[u8], signature: &Signature) -> Result<(), Error> {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(message, &signature.0)
            .map_err(|_| Error::BadSignature)
    }
}

hex_public_key!(VerifyingKey, "Ed25519 public key");

/// An Ed25519 signature (64 bytes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature([u8; SIGNATURE_LEN]);

impl Signature {
    /// Wraps 64 bytes.
    pub fn from_bytes(bytes: [u8; SIGNATURE_LEN]) -> Self {
        Self(bytes)
    }

    /// Reads a signature received from a peer.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
        bytes
            .try_into()
            .map(Self)
            .map_err(|_| Error::InvalidLength {
                what: "Ed25519 signature",
                expected: SIGNATURE_LEN,
                actual: bytes.len(),
            })
    }

    /// The signature's bytes.
    pub fn as_bytes(&self) -> &[u8; SIGNATURE_LEN] {
        &self.0
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({})", hex::encode(self.0))
    }
}

/// A document type that travels signed.
pub trait SignedPayload: Serialize + DeserializeOwned {
    /// The domain label mixed into the signed message (e.g. `"shardseal/v1/model-manifest"`),
    /// unique per document type. It is also the `kind` of the file form.
    const DOMAIN: &'static str;

    /// Checks the rules serde cannot express; run before signing and after verifying.
    fn validate(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// A document of type `T`, signed over its exact serialized bytes.
pub struct Signed<T> {
    body: Vec<u8>,
    signer: VerifyingKey,
    signature: Signature,
    payload: PhantomData<fn() -> T>,
}

impl<T> Clone for Signed<T> {
    fn clone(&self) -> Self {
        Self {
            body: self.body.clone(),
            signer: self.signer,
            signature: self.signature,
            payload: PhantomData,
        }
    }
}

impl<T> PartialEq for Signed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.body == other.body && self.signer == other.signer && self.signature == other.signature
    }
}

impl<T> Eq for Signed<T> {}

impl<T> fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signed")
            .field("body_len", &self.body.len())
            .field("signer", &self.signer)
            .finish_non_exhaustive()
    }
}

/// The file form of a [`Signed`] document.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignedFile {
    format: String,
    kind: String,
    signer: String,
    signature: String,
    body: String,
}

fn signed_message(domain: &str, body: &[u8]) -> Vec<u8> {
    ContextEncoder::new(SIGNED_DOMAIN)
        .text(domain)
        .bytes(body)
        .finish()
}

impl<T: SignedPayload> Signed<T> {
    /// Checks `payload`, serializes it canonically (JSON, fields in declaration order) and
    /// signs the bytes.
    pub fn sign(payload: &T, key: &SigningKey) -> Result<Self, Error> {
        payload.validate()?;
        let body = serde_json::to_vec(payload).map_err(|e| Error::Malformed {
            what: T::DOMAIN,
            detail: e.to_string(),
        })?;
        let signature = key.sign(&signed_message(T::DOMAIN, &body));
        Ok(Self {
            body,
            signer: key.verifying_key(),
            signature,
            payload: PhantomData,
        })
    }

    /// Reassembles a signed document from its parts (e.g. a proto `SignedBlob`); nothing is
    /// checked until [`verify`](Self::verify).
    pub fn from_parts(body: Vec<u8>, signer: VerifyingKey, signature: Signature) -> Self {
        Self {
            body,
            signer,
            signature,
            payload: PhantomData,
        }
    }

    /// The signed body bytes (unverified until [`verify`](Self::verify) succeeds).
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The key the document claims to be signed by.
    pub fn signer(&self) -> VerifyingKey {
        self.signer
    }

    /// The signature.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// Checks, in this order, that the signer is `expected_signer`, that the signature
    /// verifies over the exact body bytes, that the body parses, and that it follows
    /// [`SignedPayload::validate`]. Only then is the payload returned.
    pub fn verify(&self, expected_signer: &VerifyingKey) -> Result<T, Error> {
        if self.signer != *expected_signer {
            return Err(Error::WrongSigner {
                expected: *expected_signer,
                found: self.signer,
            });
        }
        expected_signer.verify(&signed_message(T::DOMAIN, &self.body), &self.signature)?;
        let payload: T = serde_json::from_slice(&self.body).map_err(|e| Error::Malformed {
            what: T::DOMAIN,
            detail: e.to_string(),
        })?;
        payload.validate()?;
        Ok(payload)
    }

    /// The file form: JSON with the format, kind, signer (hex), signature (hex) and body
    /// (base64). Stable across versions of this crate.
    pub fn to_bytes(&self) -> Vec<u8> {
        let file = SignedFile {
            format: FILE_FORMAT.to_owned(),
            kind: T::DOMAIN.to_owned(),
            signer: self.signer.to_hex(),
            signature: hex::encode(self.signature.0),
            body: BASE64.encode(&self.body),
        };
        // Serializing a struct of strings into memory cannot fail.
        let mut out = serde_json::to_vec_pretty(&file).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Reads the file form. Checks the structure only; call [`verify`](Self::verify).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let malformed = |detail: &str| Error::Malformed {
            what: "signed document",
            detail: detail.to_owned(),
        };
        if bytes.len() > MAX_SIGNED_LEN {
            return Err(malformed("too large"));
        }
        let file: SignedFile =
            serde_json::from_slice(bytes).map_err(|e| malformed(&e.to_string()))?;
        if file.format != FILE_FORMAT {
            return Err(malformed("unknown format"));
        }
        if file.kind != T::DOMAIN {
            return Err(malformed("not this kind of document"));
        }
        let signer = file.signer.parse()?;
        let mut signature = [0u8; SIGNATURE_LEN];
        hex::decode_to_slice(&file.signature, &mut signature)
            .map_err(|_| Error::InvalidEncoding("signature"))?;
        let body = BASE64
            .decode(&file.body)
            .map_err(|_| Error::InvalidEncoding("signed body"))?;
        Ok(Self::from_parts(body, signer, Signature(signature)))
    }
}

impl<T> From<Signed<T>> for shardseal_proto::v1::SignedBlob {
    fn from(signed: Signed<T>) -> Self {
        Self {
            body: signed.body,
            signature: signed.signature.0.to_vec(),
            signer: signed.signer.0.to_vec(),
        }
    }
}

impl<T: SignedPayload> TryFrom<shardseal_proto::v1::SignedBlob> for Signed<T> {
    type Error = Error;
    fn try_from(blob: shardseal_proto::v1::SignedBlob) -> Result<Self, Error> {
        if blob.body.len() > MAX_SIGNED_LEN {
            return Err(Error::Malformed {
                what: "signed document",
                detail: "too large".to_owned(),
            });
        }
        Ok(Self::from_parts(
            blob.body,
            VerifyingKey::from_slice(&blob.signer)?,
            Signature::from_slice(&blob.signature)?,
        ))
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    /// The exact bytes `Signed::<T>::sign` signs, for tests that forge signed documents.
    pub(crate) fn signed_message_for<T: super::SignedPayload>(body: &[u8]) -> Vec<u8> {
        super::signed_message(T::DOMAIN, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Note {
        text: String,
    }

    impl SignedPayload for Note {
        const DOMAIN: &'static str = "shardseal/test/note";
        fn validate(&self) -> Result<(), Error> {
            if self.text.is_empty() {
                return Err(Error::InvalidManifest("empty note".into()));
            }
            Ok(())
        }
    }

    #[derive(Debug, Serialize, Deserialize)]
    struct OtherNote {
        text: String,
    }

    impl SignedPayload for OtherNote {
        const DOMAIN: &'static str = "shardseal/test/other-note";
    }

    #[test]
    fn signing_key_debug_prints_no_seed() {
        let key = SigningKey::from_seed(&[0x5a; 32]).unwrap();
        let shown = format!("{key:?}");
        assert_eq!(
            shown,
            format!("SigningKey(<redacted>, public {})", key.verifying_key())
        );
        assert!(!shown.contains(&hex::encode([0x5a; 32])));
        assert!(!shown.contains("5a5a"));
    }

    #[test]
    fn seed_round_trip_gives_the_same_key() {
        let key = SigningKey::generate().unwrap();
        let again = SigningKey::from_seed(key.expose_seed()).unwrap();
        assert_eq!(key, again);
        assert_eq!(key.verifying_key(), again.verifying_key());
        assert_ne!(key, SigningKey::generate().unwrap());
    }

    #[test]
    fn signatures_verify_and_reject_changes() {
        let key = SigningKey::generate().unwrap();
        let sig = key.sign(b"hello");
        let vk = key.verifying_key();
        vk.verify(b"hello", &sig).unwrap();
        assert!(matches!(
            vk.verify(b"hellp", &sig),
            Err(Error::BadSignature)
        ));
        let other = SigningKey::generate().unwrap().verifying_key();
        assert!(matches!(
            other.verify(b"hello", &sig),
            Err(Error::BadSignature)
        ));
        assert_eq!(vk.to_string().parse::<VerifyingKey>().unwrap(), vk);
    }

    #[test]
    fn signed_documents_round_trip_through_file_and_proto() {
        let key = SigningKey::generate().unwrap();
        let note = Note { text: "hi".into() };
        let signed = Signed::sign(&note, &key).unwrap();
        let file = Signed::<Note>::from_bytes(&signed.to_bytes()).unwrap();
        assert_eq!(file, signed);
        assert_eq!(file.verify(&key.verifying_key()).unwrap(), note);
        let blob: shardseal_proto::v1::SignedBlob = signed.clone().into();
        let back = Signed::<Note>::try_from(blob).unwrap();
        assert_eq!(back.verify(&key.verifying_key()).unwrap(), note);
    }

    #[test]
    fn a_signature_for_one_kind_does_not_verify_as_another() {
        let key = SigningKey::generate().unwrap();
        let signed = Signed::sign(&OtherNote { text: "hi".into() }, &key).unwrap();
        let (body, signer, sig) = (signed.body().to_vec(), signed.signer(), *signed.signature());
        let as_note = Signed::<Note>::from_parts(body, signer, sig);
        assert!(matches!(
            as_note.verify(&key.verifying_key()),
            Err(Error::BadSignature)
        ));
        // The file form names its kind, too.
        assert!(matches!(
            Signed::<Note>::from_bytes(&signed.to_bytes()),
            Err(Error::Malformed { detail, .. }) if detail == "not this kind of document"
        ));
    }

    #[test]
    fn invalid_payloads_are_neither_signed_nor_accepted() {
        let key = SigningKey::generate().unwrap();
        let empty = Note {
            text: String::new(),
        };
        assert!(matches!(
            Signed::sign(&empty, &key),
            Err(Error::InvalidManifest(_))
        ));
        // Signed anyway (bypassing sign): verify still refuses it after the signature check.
        let body = serde_json::to_vec(&empty).unwrap();
        let sig = key.sign(&signed_message(Note::DOMAIN, &body));
        let forged = Signed::<Note>::from_parts(body, key.verifying_key(), sig);
        assert!(matches!(
            forged.verify(&key.verifying_key()),
            Err(Error::InvalidManifest(_))
        ));
    }
}
