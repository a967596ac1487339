//! The crate's error type: every failure of c10d, of the environment or of tch ends up here.

/// Errors of cnx-dist. c10d's own messages (timeouts, closed connections, bad arguments) are kept
/// verbatim in [`DistError::C10d`].
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A launcher variable is present but malformed (or one it implies is missing).
    #[error("environment variable {var}: {reason}")]
    Env { var: String, reason: String },
    /// An exception from c10d (store, Gloo, NCCL), caught in the shim.
    #[error("c10d {0}")]
    C10d(String),
    /// A call that cannot work, found before reaching c10d.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = DistError> = std::result::Result<T, E>;

impl DistError {
    pub(crate) fn env(var: &str, reason: impl Into<String>) -> Self {
        DistError::Env {
            var: var.to_string(),
            reason: reason.into(),
        }
    }
}
