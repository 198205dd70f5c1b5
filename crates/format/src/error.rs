//! The crate's one error type.

/// Errors from inspecting, reading or writing image files.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The underlying file or sink failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The file is structurally invalid (truncated, inconsistent, out-of-range values).
    #[error("invalid {format} image: {reason}")]
    Invalid {
        format: &'static str,
        reason: String,
    },
    /// The file is well-formed but uses something this crate refuses or cannot handle.
    #[error("unsupported {format} image: {reason}")]
    Unsupported {
        format: &'static str,
        reason: String,
    },
    /// The file failed a safety check; see `inspect::Violation` for the named reasons.
    #[error("unsafe image: {0}")]
    Unsafe(String),
}

pub type Result<T, E = FormatError> = std::result::Result<T, E>;
