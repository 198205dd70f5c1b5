//! Content addresses: `ChunkId` and `ManifestId` (BLAKE3, 32 bytes, lower-case hex as text).

use crate::error::StoreError;
use std::fmt;
use std::str::FromStr;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The BLAKE3 hash of `data` as an id.
            pub fn hash(data: &[u8]) -> Self {
                $name(*blake3::hash(data).as_bytes())
            }

            /// The raw 32 bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// Lower-case hex (64 characters).
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            /// Parses 64 hex characters.
            pub fn from_hex(s: &str) -> Result<Self, StoreError> {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out).map_err(|e| {
                    StoreError::Invalid(format!(
                        concat!("bad ", stringify!($name), " {:?}: {}"),
                        s, e
                    ))
                })?;
                Ok($name(out))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.to_hex())
            }
        }

        impl FromStr for $name {
            type Err = StoreError;
            fn from_str(s: &str) -> Result<Self, StoreError> {
                Self::from_hex(s)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::from_hex(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// Address of a stored chunk: BLAKE3 of its plaintext bytes. The all-zero id is reserved
    /// (it encodes "zero chunk" in serialized manifests) and never names a stored chunk.
    ChunkId
);

id_type!(
    /// Address of a manifest: BLAKE3 of its serialized bytes. This is what an image row holds.
    ManifestId
);

impl ChunkId {
    /// The reserved all-zero id (never a real chunk).
    pub const RESERVED_ZERO: ChunkId = ChunkId([0u8; 32]);
}
