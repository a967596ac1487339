//! Errors of the dataset crate: every variant names the file (and, for JSON, line and column)
//! so a bad input in a 118k-image dataset can be found.

use std::path::PathBuf;

/// Everything that can go wrong while reading annotations or images.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image file missing: {0}")]
    MissingImage(PathBuf),
    #[error("image file truncated: {0}")]
    TruncatedImage(PathBuf),
    #[error("cannot decode image {path}: {msg}")]
    Decode { path: PathBuf, msg: String },
    #[error("{path}: malformed JSON at line {line}, column {column}: {msg}")]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        msg: String,
    },
    #[error("{path}: annotation JSON says {json_w}x{json_h}, decoded image is {w}x{h}")]
    SizeMismatch {
        path: PathBuf,
        json_w: u32,
        json_h: u32,
        w: u32,
        h: u32,
    },
    #[error("{path}: label map is {lw}x{lh}, image is {w}x{h}")]
    LabelSize {
        path: PathBuf,
        lw: u32,
        lh: u32,
        w: u32,
        h: u32,
    },
    #[error("invalid dataset: {0}")]
    Invalid(String),
    #[error("cannot encode {path}: {msg}")]
    Encode { path: PathBuf, msg: String },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, DatasetError>;

impl DatasetError {
    /// Whether this is a problem of one input file (missing, truncated, undecodable, unreadable,
    /// of the wrong size) rather than of the dataset as a whole: what the training loader
    /// replaces and evaluation skips.
    pub fn is_unreadable_input(&self) -> bool {
        matches!(
            self,
            DatasetError::MissingImage(_)
                | DatasetError::TruncatedImage(_)
                | DatasetError::Decode { .. }
                | DatasetError::SizeMismatch { .. }
                | DatasetError::LabelSize { .. }
                | DatasetError::Io { .. }
        )
    }

    /// The file an error is about, when it names one.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            DatasetError::Io { path, .. }
            | DatasetError::Decode { path, .. }
            | DatasetError::Json { path, .. }
            | DatasetError::SizeMismatch { path, .. }
            | DatasetError::LabelSize { path, .. }
            | DatasetError::Encode { path, .. } => Some(path),
            DatasetError::MissingImage(p) | DatasetError::TruncatedImage(p) => Some(p),
            DatasetError::Invalid(_) => None,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DatasetError::Io {
            path: path.into(),
            source,
        }
    }
}
