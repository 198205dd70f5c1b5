//! The crate's one error type.

use openims_format::FormatError;

/// Errors from the chunk store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object (chunk, manifest, backend key) does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// An object exists but its content does not match its address or checksum.
    #[error("corrupt object {key}: {reason}")]
    Corrupt {
        /// Backend key of the corrupt object.
        key: String,
        /// What did not match.
        reason: String,
    },
    /// The backend or the local file system failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// Reading the source virtual disk failed.
    #[error("source disk: {0}")]
    Format(#[from] FormatError),
    /// A caller passed something unusable (bad key, bad config, inconsistent manifest).
    #[error("invalid: {0}")]
    Invalid(String),
}

/// Result alias for this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    /// Builds a `Corrupt` error.
    pub fn corrupt(key: impl Into<String>, reason: impl Into<String>) -> Self {
        StoreError::Corrupt {
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// True for `Corrupt`.
    pub fn is_corrupt(&self) -> bool {
        matches!(self, StoreError::Corrupt { .. })
    }

    /// True for `NotFound`.
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound(_))
    }

    /// Finds the `StoreError` carried inside a `FormatError` returned by
    /// [`ManifestDisk`](crate::ManifestDisk)'s `VirtualDisk` methods (which must return
    /// `FormatError`); `None` when the error did not come from the store.
    pub fn from_format_error(e: &FormatError) -> Option<&StoreError> {
        match e {
            FormatError::Io(io) => Self::from_io_error(io),
            _ => None,
        }
    }

    /// Finds the `StoreError` carried inside an `io::Error` returned by
    /// [`ManifestReader`](crate::ManifestReader).
    pub fn from_io_error(e: &std::io::Error) -> Option<&StoreError> {
        let inner = e.get_ref()?;
        if let Some(s) = inner.downcast_ref::<StoreError>() {
            return Some(s);
        }
        match inner.downcast_ref::<FormatError>() {
            Some(f) => Self::from_format_error(f),
            None => None,
        }
    }

    /// Wraps this error in an `io::Error` (kind `InvalidData` for `Corrupt`, `NotFound` for
    /// `NotFound`), keeping it retrievable with [`StoreError::from_io_error`].
    pub fn into_io_error(self) -> std::io::Error {
        use std::io::ErrorKind;
        let kind = match &self {
            StoreError::Corrupt { .. } => ErrorKind::InvalidData,
            StoreError::NotFound(_) => ErrorKind::NotFound,
            StoreError::Invalid(_) => ErrorKind::InvalidInput,
            StoreError::Io(e) => e.kind(),
            StoreError::Format(_) => ErrorKind::Other,
        };
        std::io::Error::new(kind, self)
    }
}
