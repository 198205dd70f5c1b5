//! Typed identifiers.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! hex_id {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// A new random id: 32 lowercase hex characters.
            pub fn generate() -> Self {
                $name(uuid::Uuid::new_v4().simple().to_string())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

hex_id!(
    /// A domain (account): owns projects and users.
    DomainId
);
hex_id!(
    /// A project (tenant): owns images, jobs and keys.
    ProjectId
);
hex_id!(
    /// A user of a domain.
    UserId
);
hex_id!(
    /// An asynchronous job.
    JobId
);

/// An image id: a UUID, rendered hyphenated in lower case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ImageId(pub uuid::Uuid);

impl ImageId {
    pub fn generate() -> Self {
        ImageId(uuid::Uuid::new_v4())
    }
    /// Parses a UUID in any of its usual spellings.
    pub fn parse(s: &str) -> Option<Self> {
        uuid::Uuid::parse_str(s).ok().map(ImageId)
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.hyphenated())
    }
}

/// True if `s` looks like one of our 32-hex ids.
pub fn is_hex_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
