//! Sealing to a public key: HPKE (RFC 9180) base mode with DHKEM(X25519, HKDF-SHA256),
//! HKDF-SHA256 and AES-256-GCM, from the `hpke` crate.
//!
//! A sender seals to a [`RecipientPublicKey`]: a stage's public key (activations), the
//! client's per-request response key (outputs), or a function's ephemeral key (key
//! release). Only the holder of the matching [`RecipientPrivateKey`] opens the envelope.
//! The wire form is [`Sealed`] `{ enc, ciphertext }`, the proto message
//! `shardseal.v1.Sealed`.
//!
//! # What an envelope is bound to
//!
//! Every envelope carries two bindings that are never sent, because both ends rebuild them:
//! the HPKE `info` (mixed into the key schedule) names the *purpose*, and the AEAD's AAD is
//! the canonical encoding of the *context*. Both are built with [`ContextEncoder`]: a
//! domain label, then each field length-prefixed, so two different contexts never encode
//! to the same bytes.
//!
//! - [`ActivationContext`]: deployment, [`RequestId`], hop and [`Direction`]. An activation
//!   sealed for one request, hop or direction does not open in another: it cannot be
//!   replayed into another request or spliced into another hop.
//! - [`KeyReleaseContext`]: broker id, broker nonce, model and stage. A key bundle released
//!   for one attestation does not open as the answer to another.
//! - Any other purpose (the owner sealing shard keys to the broker, ...) uses
//!   [`seal_to`]/[`open_sealed`] with its own `info` and AAD.
//!
//! Opening with the wrong private key, under any other context, or after any change to
//! `enc` or the ciphertext fails with [`Error::OpenFailed`].
//!
//! # Two AEAD paths, picked per use
//!
//! Activations can be many megabytes, and the `hpke` crate's AES-256-GCM (RustCrypto
//! `aes-gcm`) is far slower than ring's. Measured once with
//! `cargo run --release -p shardseal-keys --example aead_throughput` on the development
//! machine (2 vCPUs, x86-64 with AES-NI, VAES and VPCLMULQDQ, shared with other builds at
//! a load average of about 6, so read the ratios more than the absolute figures), GB/s of
//! plaintext, best run, one thread:
//!
//! | operation                                     | 1 MiB | 64 MiB |
//! | --------------------------------------------- | ----- | ------ |
//! | ring AES-256-GCM, in place                    | 10.5  | 10.3   |
//! | `aes-gcm` crate AES-256-GCM, in place         | 1.45  | 0.99   |
//! | HPKE seal, hpke's AEAD ([`seal_to`])          | 1.25  | 0.58   |
//! | HPKE seal, export + ring ([`seal_bulk_to`])   | 5.09  | 1.28   |
//! | HPKE open, hpke's AEAD ([`open_sealed`])      | 1.13  | 0.54   |
//! | HPKE open, export + ring ([`open_sealed_bulk`]) | 3.61 | 1.53  |
//!
//! ring is 7 to 10 times faster as a cipher; through the envelope API the export path is
//! 2 to 4 times faster than hpke's AEAD. At 64 MiB both envelope paths are bound by
//! memory rather than the cipher: each call copies the payload into a fresh allocation
//! (page faults on a new mapping of that size) and wipes the plaintext buffer on drop.
//!
//! Whatever its size, an envelope also costs its key agreement (X25519 and the HPKE key
//! schedule): 63 us to seal and 50 us to open, the same example's last line, with
//! x25519-dalek's precomputed base-point table on (94 and 66 us without it), which is
//! why the workspace turns that feature on for hpke.
//!
//! So:
//! - **bulk payloads** (activations, model inputs and outputs: [`seal_activation`],
//!   [`seal_bulk_to`]) use HPKE only to agree on a key: the sender sets up the HPKE context,
//!   derives a single-use AES-256 key with the secret export of RFC 9180 §5.3
//!   (`Export("shardseal/v1/bulk-aes-256-gcm-key", 32)`), and seals the payload with ring's
//!   AES-256-GCM under the same AAD. The nonce is all zeros: the exported key is fresh for
//!   every envelope (a new encapsulation each time) and seals exactly one message, which is
//!   the condition for a fixed nonce to be safe.
//! - **small messages** (key release, [`seal_key_release`], [`seal_to`]) use HPKE's own
//!   single-shot AEAD, exactly as RFC 9180 specifies: a few hundred bytes gain nothing from
//!   ring, and the plain construction is the easiest to audit and to interoperate with.
//!
//! The two paths derive different keys, so an envelope of one never opens on the other.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

use hpke::aead::{AeadTag, AesGcm256};
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use ring::aead::{Aad, NONCE_LEN, Nonce};
use ring::rand::{SecureRandom, SystemRandom};
use shardseal_attestation::{ModelId, Nonce as BrokerNonce, StageIndex};
use zeroize::{Zeroize, Zeroizing};

use crate::error::Error;
use crate::secret::{SecretBytes, fill_random};
use crate::shard::aes_256_gcm_key;

type Kem = X25519HkdfSha256;
type Kdf = HkdfSha256;
type HpkeAead = AesGcm256;
type HpkePrivateKey = <Kem as hpke::Kem>::PrivateKey;
type HpkePublicKey = <Kem as hpke::Kem>::PublicKey;
type EncappedKey = <Kem as hpke::Kem>::EncappedKey;
type SenderContext = hpke::aead::AeadCtxS<HpkeAead, Kdf, Kem>;
type ReceiverContext = hpke::aead::AeadCtxR<HpkeAead, Kdf, Kem>;

/// Length of an X25519 public key and of an HPKE `enc`.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length of the AES-GCM tag that ends every ciphertext.
pub const TAG_LEN: usize = 16;

const BULK_KEY_EXPORT_CONTEXT: &[u8] = b"shardseal/v1/bulk-aes-256-gcm-key";
const ACTIVATION_DOMAIN: &str = "shardseal/v1/activation";
const KEY_RELEASE_DOMAIN: &str = "shardseal/v1/key-release";

/// An X25519 private key that envelopes are sealed to: a stage keypair (kept by the broker,
/// released to attested functions), a client's response key, or a function's ephemeral
/// key. It holds its public half.
pub struct RecipientPrivateKey {
    // Boxed so that moving the key does not copy the secret scalar around the stack; the
    // inner x25519 secret wipes itself on drop.
    secret: Box<HpkePrivateKey>,
    public: RecipientPublicKey,
}

impl RecipientPrivateKey {
    /// A fresh keypair from the system CSPRNG.
    pub fn generate() -> Result<Self, Error> {
        let mut ikm = Zeroizing::new([0u8; 32]);
        fill_random(&mut ikm[..])?;
        let (secret, public) = Kem::derive_keypair(&ikm[..]);
        Ok(Self::from_parts(secret, &public))
    }

    /// Rebuilds a private key from its 32 bytes (as [`expose_secret`](Self::expose_secret)
    /// gave them, for example inside a released key bundle).
    pub fn from_bytes(secret: &[u8]) -> Result<Self, Error> {
        let secret = HpkePrivateKey::from_bytes(secret).map_err(|_| Error::InvalidLength {
            what: "X25519 private key",
            expected: 32,
            actual: secret.len(),
        })?;
        let public = Kem::sk_to_pk(&secret);
        Ok(Self::from_parts(secret, &public))
    }

    fn from_parts(secret: HpkePrivateKey, public: &HpkePublicKey) -> Self {
        let mut bytes = [0u8; PUBLIC_KEY_LEN];
        public.write_exact(&mut bytes);
        Self {
            secret: Box::new(secret),
            public: RecipientPublicKey(bytes),
        }
    }

    /// The public key senders seal to.
    pub fn public_key(&self) -> RecipientPublicKey {
        self.public
    }

    /// The 32 private key bytes, to be sealed into a key bundle or a key store and nowhere
    /// else.
    pub fn expose_secret(&self) -> SecretBytes {
        let mut out = SecretBytes::new(vec![0u8; 32]);
        self.secret.write_exact(out.expose_secret_mut());
        out
    }
}

impl fmt::Debug for RecipientPrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecipientPrivateKey(<redacted>, public {})", self.public)
    }
}

impl PartialEq for RecipientPrivateKey {
    /// Constant time (hpke compares X25519 secrets with `subtle`).
    fn eq(&self, other: &Self) -> bool {
        *self.secret == *other.secret
    }
}

impl Eq for RecipientPrivateKey {}

/// An X25519 public key (32 bytes) that envelopes are sealed to. Shown and serialized as
/// 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecipientPublicKey([u8; PUBLIC_KEY_LEN]);

impl RecipientPublicKey {
    /// Wraps the 32 bytes of a public key.
    pub fn from_bytes(bytes: [u8; PUBLIC_KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// Reads a public key received from a peer (32 bytes).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
        bytes
            .try_into()
            .map(Self)
            .map_err(|_| Error::InvalidLength {
                what: "X25519 public key",
                expected: PUBLIC_KEY_LEN,
                actual: bytes.len(),
            })
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.0
    }

    /// The key as 64 lower-case hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    fn to_hpke(self) -> Result<HpkePublicKey, Error> {
        HpkePublicKey::from_bytes(&self.0).map_err(|_| Error::SealFailed)
    }
}

hex_public_key!(RecipientPublicKey, "X25519 public key");

/// A sealed envelope: the HPKE encapsulated key and the AEAD ciphertext with its tag. It is
/// `shardseal.v1.Sealed` on the wire, and converts to and from it without a copy.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The HPKE encapsulated key (the sender's ephemeral X25519 public key).
    pub enc: [u8; PUBLIC_KEY_LEN],
    /// The ciphertext, ending with its 16-byte tag: as received, a slice of the message it
    /// arrived in.
    pub ciphertext: Bytes,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Sealed {{ enc: {}, ciphertext: {} bytes }}",
            hex::encode(self.enc),
            self.ciphertext.len()
        )
    }
}

impl From<Sealed> for shardseal_proto::v1::Sealed {
    fn from(sealed: Sealed) -> Self {
        Self {
            enc: Bytes::copy_from_slice(&sealed.enc),
            ciphertext: sealed.ciphertext,
        }
    }
}

impl TryFrom<shardseal_proto::v1::Sealed> for Sealed {
    type Error = Error;
    fn try_from(wire: shardseal_proto::v1::Sealed) -> Result<Self, Error> {
        let enc = wire
            .enc
            .as_ref()
            .try_into()
            .map_err(|_| Error::SealedMalformed("enc is not 32 bytes"))?;
        if wire.ciphertext.len() < TAG_LEN {
            return Err(Error::SealedMalformed("ciphertext shorter than its tag"));
        }
        Ok(Self {
            enc,
            ciphertext: wire.ciphertext,
        })
    }
}

/// The OS CSPRNG in the shape hpke wants. `fill_bytes` cannot fail in that trait, so a
/// failure is recorded and checked after use: the output is then discarded, never used.
struct HpkeRng {
    system: SystemRandom,
    failed: bool,
}

impl HpkeRng {
    fn new() -> Self {
        Self {
            system: SystemRandom::new(),
            failed: false,
        }
    }
}

impl hpke::rand_core::RngCore for HpkeRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }

    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        if self.system.fill(dst).is_err() {
            self.failed = true;
        }
    }
}

impl hpke::rand_core::CryptoRng for HpkeRng {}

fn setup_sender(
    recipient: &RecipientPublicKey,
    info: &[u8],
) -> Result<([u8; PUBLIC_KEY_LEN], SenderContext), Error> {
    let pk = recipient.to_hpke()?;
    let mut rng = HpkeRng::new();
    let result = hpke::setup_sender::<HpkeAead, Kdf, Kem, _>(&OpModeS::Base, &pk, info, &mut rng);
    if rng.failed {
        return Err(Error::Randomness);
    }
    // Encapsulation fails only for a low-order recipient key (an all-zero shared secret).
    let (enc, ctx) = result.map_err(|_| Error::SealFailed)?;
    let mut enc_bytes = [0u8; PUBLIC_KEY_LEN];
    enc.write_exact(&mut enc_bytes);
    Ok((enc_bytes, ctx))
}

fn setup_receiver(
    key: &RecipientPrivateKey,
    info: &[u8],
    sealed: &Sealed,
) -> Result<ReceiverContext, Error> {
    if sealed.ciphertext.len() < TAG_LEN {
        return Err(Error::SealedMalformed("ciphertext shorter than its tag"));
    }
    let enc = EncappedKey::from_bytes(&sealed.enc)
        .map_err(|_| Error::SealedMalformed("enc is not an X25519 public key"))?;
    hpke::setup_receiver::<HpkeAead, Kdf, Kem>(&OpModeR::Base, &key.secret, &enc, info)
        .map_err(|_| Error::OpenFailed)
}

/// Seals a small message to `recipient` with HPKE's own AEAD (RFC 9180 single-shot).
/// `info` names the purpose; `aad` is the canonical context (see [`ContextEncoder`]).
pub fn seal_to(
    recipient: &RecipientPublicKey,
    info: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Sealed, Error> {
    let (enc, mut ctx) = setup_sender(recipient, info)?;
    let ciphertext = ctx.seal(plaintext, aad).map_err(|_| Error::SealFailed)?;
    Ok(Sealed {
        enc,
        ciphertext: ciphertext.into(),
    })
}

/// Opens what [`seal_to`] sealed, given the same `info` and `aad`.
pub fn open_sealed(
    key: &RecipientPrivateKey,
    info: &[u8],
    aad: &[u8],
    sealed: &Sealed,
) -> Result<SecretBytes, Error> {
    let mut ctx = setup_receiver(key, info, sealed)?;
    let (body, tag) = sealed
        .ciphertext
        .split_at(sealed.ciphertext.len() - TAG_LEN);
    let tag = AeadTag::<HpkeAead>::from_bytes(tag)
        .map_err(|_| Error::SealedMalformed("bad tag length"))?;
    let mut plaintext = SecretBytes::from_slice(body);
    ctx.open_in_place_detached(plaintext.expose_secret_mut(), aad, &tag)
        .map_err(|_| Error::OpenFailed)?;
    Ok(plaintext)
}

fn export_bulk_key<E>(export: E) -> Result<Zeroizing<[u8; 32]>, Error>
where
    E: FnOnce(&[u8], &mut [u8]) -> Result<(), hpke::HpkeError>,
{
    let mut key = Zeroizing::new([0u8; 32]);
    // Export fails only for outputs longer than 255 hash lengths; this one is 32 bytes.
    export(BULK_KEY_EXPORT_CONTEXT, &mut key[..]).map_err(|_| Error::SealFailed)?;
    Ok(key)
}

/// Seals a large payload to `recipient`: HPKE agrees on a single-use AES-256 key (secret
/// export, RFC 9180 §5.3) and ring's AES-256-GCM seals the payload under `aad`. See the
/// module doc for why and for the measured speed.
pub fn seal_bulk_to(
    recipient: &RecipientPublicKey,
    info: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Sealed, Error> {
    let mut buffer = Vec::with_capacity(plaintext.len() + TAG_LEN);
    buffer.extend_from_slice(plaintext);
    seal_bulk_in_place(recipient, info, aad, buffer)
}

/// As [`seal_bulk_to`], encrypting `plaintext` where it lies: the buffer becomes the
/// ciphertext (with room for the tag at the end of its capacity, nothing is moved). On
/// failure the plaintext is wiped.
pub fn seal_bulk_in_place(
    recipient: &RecipientPublicKey,
    info: &[u8],
    aad: &[u8],
    mut buffer: Vec<u8>,
) -> Result<Sealed, Error> {
    let key = setup_sender(recipient, info).and_then(|(enc, ctx)| {
        let key = export_bulk_key(|c, out| ctx.export(c, out))?;
        Ok((enc, aes_256_gcm_key(&key)))
    });
    let (enc, key) = match key {
        Ok(agreed) => agreed,
        Err(e) => {
            buffer.zeroize();
            return Err(e);
        }
    };
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key([0u8; NONCE_LEN]),
            Aad::from(aad),
            &mut buffer,
        )
        .map_err(|_| {
            // ring refuses only payloads of tens of GiB; do not leave the plaintext behind.
            buffer.zeroize();
            Error::SealFailed
        })?;
    buffer.extend_from_slice(tag.as_ref());
    Ok(Sealed {
        enc,
        ciphertext: buffer.into(),
    })
}

/// Opens what [`seal_bulk_to`] sealed, given the same `info` and `aad`.
pub fn open_sealed_bulk(
    key: &RecipientPrivateKey,
    info: &[u8],
    aad: &[u8],
    sealed: &Sealed,
) -> Result<SecretBytes, Error> {
    let ctx = setup_receiver(key, info, sealed)?;
    let aead = aes_256_gcm_key(&*export_bulk_key(|c, out| ctx.export(c, out))?);
    let mut plaintext = SecretBytes::from_slice(&sealed.ciphertext);
    let len = aead
        .open_in_place(
            Nonce::assume_unique_for_key([0u8; NONCE_LEN]),
            Aad::from(aad),
            plaintext.expose_secret_mut(),
        )
        .map_err(|_| Error::OpenFailed)?
        .len();
    plaintext.truncate(len);
    Ok(plaintext)
}

/// Builds a canonical, unambiguous context encoding: a domain label, then each field as a
/// 4-byte big-endian length and its bytes. Two different field lists never encode alike,
/// so an AAD built this way binds exactly the fields given.
///
/// ```
/// use shardseal_keys::ContextEncoder;
/// let a = ContextEncoder::new("demo").text("ab").text("c").finish();
/// let b = ContextEncoder::new("demo").text("a").text("bc").finish();
/// assert_ne!(a, b);
/// ```
#[derive(Clone, Debug)]
pub struct ContextEncoder(Vec<u8>);

impl ContextEncoder {
    /// Starts an encoding for one purpose, e.g. `"shardseal/v1/activation"`.
    pub fn new(domain: &str) -> Self {
        Self(Vec::with_capacity(128)).bytes(domain.as_bytes())
    }

    /// Appends a byte-string field.
    pub fn bytes(mut self, field: &[u8]) -> Self {
        // Contexts are small (ids, nonces); a field of 4 GiB is a caller bug, and
        // saturating keeps the encoding well defined rather than panicking.
        let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(field);
        self
    }

    /// Appends a text field.
    pub fn text(self, field: &str) -> Self {
        self.bytes(field.as_bytes())
    }

    /// Appends an integer field (4 bytes, big-endian).
    pub fn u32(self, field: u32) -> Self {
        self.bytes(&field.to_be_bytes())
    }

    /// The encoding.
    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// The id of one inference request: 16 random bytes chosen by the client. Shown as 32 hex
/// digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId([u8; 16]);

impl RequestId {
    /// A fresh random id.
    pub fn random() -> Result<Self, Error> {
        let mut id = [0u8; 16];
        fill_random(&mut id)?;
        Ok(Self(id))
    }

    /// Wraps 16 bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// Reads an id received from a peer (16 bytes).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
        bytes
            .try_into()
            .map(Self)
            .map_err(|_| Error::InvalidLength {
                what: "request id",
                expected: 16,
                actual: bytes.len(),
            })
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({self})")
    }
}

impl FromStr for RequestId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let mut out = [0u8; 16];
        hex::decode_to_slice(s.trim(), &mut out)
            .map_err(|_| Error::InvalidEncoding("request id"))?;
        Ok(Self(out))
    }
}

/// Which way an activation travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the client or a stage to the next stage (the model's inputs and activations).
    TowardNextStage,
    /// From the last stage back to the client (the model's outputs).
    TowardClient,
}

impl Direction {
    fn code(self) -> u32 {
        match self {
            Direction::TowardNextStage => 1,
            Direction::TowardClient => 2,
        }
    }
}

/// Everything an activation envelope is bound to. Both ends rebuild it from the request
/// header; its [`aad`](Self::aad) is the AEAD's associated data.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ActivationContext {
    /// The deployment (e.g. model id and version as served), so envelopes of one
    /// deployment never open in another.
    pub deployment: String,
    /// The request this activation belongs to.
    pub request_id: RequestId,
    /// The hop: the index of the stage the envelope is addressed to (the client's output
    /// is addressed to hop = number of stages).
    pub hop: u32,
    /// Which way it travels.
    pub direction: Direction,
}

impl ActivationContext {
    /// The canonical encoding, used as AAD.
    pub fn aad(&self) -> Vec<u8> {
        ContextEncoder::new(ACTIVATION_DOMAIN)
            .text(&self.deployment)
            .bytes(self.request_id.as_bytes())
            .u32(self.hop)
            .u32(self.direction.code())
            .finish()
    }
}

/// Seals an activation (or a model input or output) to a stage's or a client's public key,
/// bound to `context`. Uses the bulk path (HPKE export + ring AES-256-GCM).
pub fn seal_activation(
    recipient: &RecipientPublicKey,
    context: &ActivationContext,
    plaintext: &[u8],
) -> Result<Sealed, Error> {
    seal_bulk_to(
        recipient,
        ACTIVATION_DOMAIN.as_bytes(),
        &context.aad(),
        plaintext,
    )
}

/// As [`seal_activation`], encrypting `plaintext` in its own buffer (see
/// [`seal_bulk_in_place`]): for a payload the caller has just encoded and no longer needs.
pub fn seal_activation_in_place(
    recipient: &RecipientPublicKey,
    context: &ActivationContext,
    plaintext: Vec<u8>,
) -> Result<Sealed, Error> {
    seal_bulk_in_place(
        recipient,
        ACTIVATION_DOMAIN.as_bytes(),
        &context.aad(),
        plaintext,
    )
}

/// Opens an activation sealed with [`seal_activation`] under the same context.
pub fn open_activation(
    key: &RecipientPrivateKey,
    context: &ActivationContext,
    sealed: &Sealed,
) -> Result<SecretBytes, Error> {
    open_sealed_bulk(key, ACTIVATION_DOMAIN.as_bytes(), &context.aad(), sealed)
}

/// Everything a key-release envelope (the broker sealing a stage's keys to an attested
/// function's ephemeral key) is bound to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyReleaseContext {
    /// The releasing broker's identity (e.g. its identity key in hex).
    pub broker_id: String,
    /// The nonce the broker issued for this attestation.
    pub nonce: BrokerNonce,
    /// The model whose keys are released.
    pub model: ModelId,
    /// The stage whose keys are released.
    pub stage: StageIndex,
}

impl KeyReleaseContext {
    /// The canonical encoding, used as AAD.
    pub fn aad(&self) -> Vec<u8> {
        ContextEncoder::new(KEY_RELEASE_DOMAIN)
            .text(&self.broker_id)
            .bytes(self.nonce.as_bytes())
            .text(self.model.as_str())
            .u32(self.stage.0)
            .finish()
    }
}

/// Seals a key bundle to a function's ephemeral public key, bound to `context`. Uses
/// HPKE's own AEAD (small message).
pub fn seal_key_release(
    recipient: &RecipientPublicKey,
    context: &KeyReleaseContext,
    bundle: &[u8],
) -> Result<Sealed, Error> {
    seal_to(
        recipient,
        KEY_RELEASE_DOMAIN.as_bytes(),
        &context.aad(),
        bundle,
    )
}

/// Opens a key bundle sealed with [`seal_key_release`] under the same context.
pub fn open_key_release(
    key: &RecipientPrivateKey,
    context: &KeyReleaseContext,
    sealed: &Sealed,
) -> Result<SecretBytes, Error> {
    open_sealed(key, KEY_RELEASE_DOMAIN.as_bytes(), &context.aad(), sealed)
}

#[cfg(test)]
mod tests;
