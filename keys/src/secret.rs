//! Secret newtypes: bytes that must never be printed, compared in variable time, or left
//! in memory after use.
//!
//! Each type here
//! - prints a redacted marker from `Debug` and has no `Display`,
//! - is wiped on drop (`zeroize`), and lives behind a `Box` so that moving the value does
//!   not leave stray copies of the bytes on the stack,
//! - compares in constant time (`subtle`),
//! - is not `Clone`: a copy of a secret is an explicit [`SecretBytes::from_slice`] or
//!   `from_bytes` call,
//! - lets its bytes out only through `expose_secret`, whose callers must keep them under a
//!   seal or in another secret type (for example to serialize a key inside an envelope).

use std::collections::BTreeMap;
use std::fmt;

use ring::rand::{SecureRandom, SystemRandom};
use shardseal_attestation::StageIndex;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use crate::error::Error;

/// Fills `out` from the operating system's CSPRNG.
pub(crate) fn fill_random(out: &mut [u8]) -> Result<(), Error> {
    SystemRandom::new().fill(out).map_err(|_| Error::Randomness)
}

/// Secret bytes of any length: a decrypted shard chunk or activation, a serialized key
/// bundle.
///
/// Growing the buffer ([`SecretBytes::extend_from_slice`]) moves the bytes into a larger
/// allocation and wipes the old one, which a plain `Vec` would free unwiped.
#[derive(Default)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    /// An empty buffer that can take `capacity` bytes before it reallocates.
    pub fn with_capacity(capacity: usize) -> Self {
        Self(Vec::with_capacity(capacity))
    }

    /// Takes ownership of bytes that are already secret (they are wiped when this drops).
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// Copies secret bytes; the caller remains responsible for wiping its own copy.
    pub fn from_slice(bytes: &[u8]) -> Self {
        Self(bytes.to_vec())
    }

    /// `len` random bytes from the system CSPRNG.
    pub fn random(len: usize) -> Result<Self, Error> {
        let mut bytes = vec![0u8; len];
        fill_random(&mut bytes)?;
        Ok(Self(bytes))
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The secret bytes. Keep what you derive from them secret too.
    pub fn expose_secret(&self) -> &[u8] {
        &self.0
    }

    /// The secret bytes, writable in place (to decrypt or fill them).
    pub fn expose_secret_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }

    /// Appends bytes. When the buffer must grow, the old allocation is wiped before it is
    /// freed.
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        let needed = self.0.len().saturating_add(bytes.len());
        if needed > self.0.capacity() {
            let mut grown = Vec::with_capacity(needed.max(self.0.capacity().saturating_mul(2)));
            grown.extend_from_slice(&self.0);
            std::mem::swap(&mut self.0, &mut grown);
            // `grown` now holds the old allocation: wipe its whole capacity before freeing.
            grown.zeroize();
        }
        self.0.extend_from_slice(bytes);
    }

    /// The bytes as a [`Bytes`](bytes::Bytes) that slices share without copying (a decoder
    /// reads fields out of it in place); wiped when the last slice drops.
    pub fn into_shared(mut self) -> bytes::Bytes {
        // The buffer moves, uncopied, into an owner that wipes it on drop.
        bytes::Bytes::from_owner(Zeroizing::new(std::mem::take(&mut self.0)))
    }

    /// Shortens the buffer, wiping the bytes cut off.
    pub fn truncate(&mut self, len: usize) {
        if len < self.0.len() {
            self.0[len..].zeroize();
            self.0.truncate(len);
        }
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<redacted>, {} bytes)", self.0.len())
    }
}

impl PartialEq for SecretBytes {
    /// Constant time in the contents (the lengths are not secret).
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for SecretBytes {}

/// Declares a 32-byte secret key newtype with the properties listed in the module doc.
macro_rules! secret_key_32 {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub struct $name(Box<[u8; 32]>);

        impl $name {
            /// Key length in bytes.
            pub const LEN: usize = 32;

            /// A fresh random key from the system CSPRNG.
            pub fn generate() -> Result<Self, Error> {
                let mut key = Box::new([0u8; 32]);
                fill_random(&mut key[..])?;
                Ok(Self(key))
            }

            /// Wraps key bytes. The argument is a copy the caller should wipe if it came from
            /// anywhere but a secret type.
            pub fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(Box::new(bytes))
            }

            /// Copies key bytes out of a slice (for example a decrypted key bundle).
            pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
                if bytes.len() != 32 {
                    return Err(Error::InvalidLength {
                        what: stringify!($name),
                        expected: 32,
                        actual: bytes.len(),
                    });
                }
                let mut key = Box::new([0u8; 32]);
                key.copy_from_slice(bytes);
                Ok(Self(key))
            }

            /// The key bytes, for a cipher or to serialize the key under a seal. Never log
            /// or store them in the clear.
            pub fn expose_secret(&self) -> &[u8; 32] {
                &self.0
            }
        }

        impl Drop for $name {
            fn drop(&mut self) {
                self.0.zeroize();
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(<redacted>)"))
            }
        }

        impl PartialEq for $name {
            /// Constant time.
            fn eq(&self, other: &Self) -> bool {
                self.0[..].ct_eq(&other.0[..]).into()
            }
        }

        impl Eq for $name {}
    };
}

secret_key_32!(
    /// The data-encryption key (DEK) of one shard of one model version (AES-256-GCM).
    ///
    /// Generate a fresh one for every shard and every version: keys are never reused, so a
    /// chunk sealed for one shard can never authenticate in another.
    ShardKey
);

secret_key_32!(
    /// The key store's master key (AES-256-GCM): it seals shard keys at rest.
    MasterKey
);

/// The shard keys of one model version, one per stage: what the owner's key store keeps
/// and what is sealed to the broker when a version is registered.
#[derive(Default, PartialEq, Eq)]
pub struct ShardKeys(BTreeMap<StageIndex, ShardKey>);

impl ShardKeys {
    /// No keys.
    pub fn new() -> Self {
        Self::default()
    }

    /// A fresh key for each of `stages` stages (0 to `stages - 1`).
    pub fn generate(stages: u32) -> Result<Self, Error> {
        let mut keys = Self::new();
        for stage in 0..stages {
            keys.insert(StageIndex(stage), ShardKey::generate()?);
        }
        Ok(keys)
    }

    /// Sets a stage's key, returning the one it replaces.
    pub fn insert(&mut self, stage: StageIndex, key: ShardKey) -> Option<ShardKey> {
        self.0.insert(stage, key)
    }

    /// A stage's key.
    pub fn get(&self, stage: StageIndex) -> Option<&ShardKey> {
        self.0.get(&stage)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The stages that have a key, in order.
    pub fn stages(&self) -> impl Iterator<Item = StageIndex> + '_ {
        self.0.keys().copied()
    }

    /// The canonical encoding (`count u32 ‖ (stage u32 ‖ key [32])*`, big-endian, stages
    /// ascending), to be sealed (at rest, or to the broker) and nowhere else.
    pub fn expose_secret(&self) -> SecretBytes {
        let mut out = SecretBytes::with_capacity(4 + self.0.len() * 36);
        // At most one key per u32 stage index, so the count fits.
        out.extend_from_slice(&(self.0.len() as u32).to_be_bytes());
        for (stage, key) in &self.0 {
            out.extend_from_slice(&stage.0.to_be_bytes());
            out.extend_from_slice(key.expose_secret());
        }
        out
    }

    /// Reads the encoding of [`expose_secret`](Self::expose_secret) (e.g. just opened from
    /// a seal). Stages must be strictly ascending, so each encoding is the only one.
    pub fn from_secret_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let malformed = |detail: &str| Error::Malformed {
            what: "shard key list",
            detail: detail.to_owned(),
        };
        let (count, mut rest) = bytes
            .split_first_chunk::<4>()
            .ok_or_else(|| malformed("too short"))?;
        let count = u32::from_be_bytes(*count) as usize;
        if rest.len() != count.saturating_mul(36) {
            return Err(malformed("length does not match the key count"));
        }
        let mut keys = Self::new();
        let mut previous: Option<u32> = None;
        while let Some((stage, after)) = rest.split_first_chunk::<4>() {
            let stage = u32::from_be_bytes(*stage);
            if previous.is_some_and(|p| p >= stage) {
                return Err(malformed("stages are not strictly ascending"));
            }
            previous = Some(stage);
            let (key, after) = after
                .split_first_chunk::<32>()
                .ok_or_else(|| malformed("too short"))?;
            keys.insert(StageIndex(stage), ShardKey::from_slice(key)?);
            rest = after;
        }
        Ok(keys)
    }
}

impl fmt::Debug for ShardKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stages: Vec<u32> = self.0.keys().map(|s| s.0).collect();
        write!(f, "ShardKeys(<redacted>, stages {stages:?})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_prints_no_key_bytes() {
        let key = ShardKey::from_bytes([0xab; 32]);
        let shown = format!("{key:?}");
        assert_eq!(shown, "ShardKey(<redacted>)");
        let master = MasterKey::from_bytes([0xcd; 32]);
        assert_eq!(format!("{master:?}"), "MasterKey(<redacted>)");
        let bytes = SecretBytes::from_slice(b"top secret");
        let shown = format!("{bytes:?}");
        assert_eq!(shown, "SecretBytes(<redacted>, 10 bytes)");
        assert!(!shown.contains("top"));
    }

    #[test]
    fn generated_keys_differ_and_compare_by_value() {
        let a = ShardKey::generate().unwrap();
        let b = ShardKey::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a, ShardKey::from_bytes(*a.expose_secret()));
        assert_eq!(
            ShardKey::from_slice(&[1; 31]).unwrap_err().to_string(),
            "ShardKey must be 32 bytes, got 31"
        );
    }

    #[test]
    fn secret_bytes_grow_truncate_and_compare() {
        let mut s = SecretBytes::with_capacity(2);
        s.extend_from_slice(b"ab");
        s.extend_from_slice(b"cdef");
        s.extend_from_slice(b"g");
        assert_eq!(s.expose_secret(), b"abcdefg");
        s.truncate(3);
        assert_eq!(s, SecretBytes::from_slice(b"abc"));
        assert_ne!(s, SecretBytes::from_slice(b"abd"));
        assert_ne!(s, SecretBytes::from_slice(b"ab"));
        assert_eq!(SecretBytes::random(40).unwrap().len(), 40);
    }

    #[test]
    fn shard_keys_encode_canonically_and_hide_their_bytes() {
        let mut keys = ShardKeys::new();
        keys.insert(StageIndex(2), ShardKey::from_bytes([0x22; 32]));
        keys.insert(StageIndex(0), ShardKey::from_bytes([0x11; 32]));
        let encoded = keys.expose_secret();
        assert_eq!(encoded.len(), 4 + 2 * 36);
        assert_eq!(&encoded.expose_secret()[..8], &[0, 0, 0, 2, 0, 0, 0, 0]);
        assert_eq!(
            ShardKeys::from_secret_bytes(encoded.expose_secret()).unwrap(),
            keys
        );
        assert_eq!(format!("{keys:?}"), "ShardKeys(<redacted>, stages [0, 2])");

        // Out of order, duplicated or cut: refused.
        let mut swapped = encoded.expose_secret()[..4].to_vec();
        swapped.extend_from_slice(&encoded.expose_secret()[40..]);
        swapped.extend_from_slice(&encoded.expose_secret()[4..40]);
        for bad in [&swapped[..], &encoded.expose_secret()[..75], &[0, 0, 0][..]] {
            assert!(matches!(
                ShardKeys::from_secret_bytes(bad),
                Err(Error::Malformed {
                    what: "shard key list",
                    ..
                })
            ));
        }
        assert_eq!(ShardKeys::generate(3).unwrap().stages().count(), 3);
    }
}
