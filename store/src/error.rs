//! The one error type of the shard store.

use std::path::PathBuf;

use crate::key::{KeyProblem, StoreKey};

/// What can go wrong with a shard store.
///
/// Messages never carry a credential: backend messages are scrubbed of the configured access
/// key id and secret before they are wrapped here.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No object is stored under this key.
    #[error("no object {key} in the shard store")]
    NotFound {
        /// The key that was asked for.
        key: StoreKey,
    },

    /// A key or list prefix breaks the key rules (see [`StoreKey`]).
    #[error("invalid store key {key:?}: {problem}")]
    InvalidKey {
        /// The rejected text, cut to 128 characters.
        key: String,
        /// Which rule it breaks.
        problem: KeyProblem,
    },

    /// The backend failed: an I/O error of the local folder, or an S3 request that failed
    /// (unreachable endpoint, refused credentials, missing bucket, broken connection while
    /// streaming). The text names the operation and the key.
    #[error("shard store backend: {0}")]
    Backend(String),

    /// A download delivered more or fewer bytes than the store announced for the object: a cut
    /// connection, or an object replaced while it was read.
    #[error("object {key}: the store announced {announced} bytes and delivered {delivered}")]
    SizeMismatch {
        /// The object being read.
        key: StoreKey,
        /// The size the store announced when the read began.
        announced: u64,
        /// The bytes delivered when the mismatch was seen.
        delivered: u64,
    },

    /// The store configuration is unusable: the text says which setting and why.
    #[error("shard store configuration: {0}")]
    Config(String),

    /// A local file given to [`ShardStore::put_file`](crate::ShardStore::put_file) could not be
    /// read.
    #[error("cannot read {}: {source}", path.display())]
    ReadFile {
        /// The file being uploaded.
        path: PathBuf,
        /// Why reading it failed.
        source: std::io::Error,
    },
}

impl Error {
    /// An [`Error::InvalidKey`] for `key`, keeping at most 128 characters of it so a hostile or
    /// runaway key cannot bloat logs.
    pub(crate) fn invalid_key(key: &str, problem: KeyProblem) -> Self {
        Error::InvalidKey {
            key: key.chars().take(128).collect(),
            problem,
        }
    }
}

/// The store's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
