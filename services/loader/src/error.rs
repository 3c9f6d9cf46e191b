//! The loader's one error type. `service.rs` maps every variant to a gRPC status.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("invalid model reference '{reference}': {reason}")]
    InvalidReference { reference: String, reason: String },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("repository '{repo}' (revision '{revision}') was not found on {endpoint}")]
    RepoNotFound {
        repo: String,
        revision: String,
        endpoint: String,
    },

    #[error("{0}")]
    FileNotFound(String),

    #[error("'{0}' is not in the cache")]
    NotCached(String),

    #[error("{0}")]
    OutOfRange(String),

    #[error("lease '{0}' not found (expired or released)")]
    LeaseNotFound(String),

    #[error("local model file '{path}': {source}")]
    LocalFile {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("'{reference}' is leased by {holders}; release the leases or evict with force")]
    Leased { reference: String, holders: String },

    #[error("cache full: {0}")]
    CacheFull(String),

    #[error("hub request failed: {0}")]
    Hub(String),

    #[error("download of {file} failed after {attempts} attempts: {last}")]
    Download {
        file: String,
        attempts: u32,
        last: String,
    },

    #[error("integrity check failed for {file}: {detail}")]
    Integrity { file: String, detail: String },

    #[error("cache I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("cache manifest: {0}")]
    Manifest(String),

    #[error("the loader is shutting down")]
    ShuttingDown,
}

impl LoaderError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LoaderError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = LoaderError> = std::result::Result<T, E>;
