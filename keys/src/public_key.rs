//! The text forms every 32-byte public key type shares: hex in `Display`, `FromStr`,
//! `Debug` and serde, so keys read the same in files, flags and logs.

/// Implements `FromStr`, `Display`, `Debug`, `Serialize` and `Deserialize` as lower-case
/// hex for a newtype `$name([u8; 32])` with a `to_hex` method. `$what` names the key in
/// parse errors.
macro_rules! hex_public_key {
    ($name:ident, $what:literal) => {
        impl std::str::FromStr for $name {
            type Err = crate::error::Error;
            fn from_str(s: &str) -> Result<Self, crate::error::Error> {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s.trim(), &mut out)
                    .map_err(|_| crate::error::Error::InvalidEncoding($what))?;
                Ok(Self(out))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.to_hex())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                <String as serde::Deserialize>::deserialize(d)?
                    .parse()
                    .map_err(serde::de::Error::custom)
            }
        }
    };
}
