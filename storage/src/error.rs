//! The one error type of the crate.
//!
//! `Error` is `Clone` because one failed group commit has to be reported to
//! every waiter of the group; the non-clonable sources (`io::Error`,
//! `fjall::Error`) are therefore kept behind an `Arc`.

use std::path::PathBuf;
use std::sync::Arc;

/// Everything that can go wrong in `sluice-storage`.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An earlier commit or fsync failed. From then on the store refuses every
    /// write, because it can no longer tell what reached the disk. Restart the
    /// node: recovery replays the journal up to the last complete batch.
    #[error("storage is poisoned: an earlier write or fsync failed, further writes are refused")]
    Poisoned,

    /// The store was closed (`Store::close`) or its writer thread is gone.
    #[error("storage is closed")]
    Closed,

    /// Another process (or another `Store` in this process) holds the data directory.
    #[error("data directory {} is locked by another process", path.display())]
    Locked {
        /// The data directory that could not be locked.
        path: PathBuf,
    },

    /// The data directory cannot be created, is not a directory, or cannot be written.
    #[error("data directory {} is unusable: {source}", path.display())]
    Unusable {
        /// The data directory.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: Arc<std::io::Error>,
    },

    /// An I/O error outside fjall (for example spawning a thread).
    #[error("I/O error: {0}")]
    Io(#[source] Arc<std::io::Error>),

    /// An error reported by the fjall storage engine.
    #[error("fjall: {0}")]
    Fjall(#[source] Arc<fjall::Error>),

    /// A stored key or value does not have the expected format.
    #[error("corrupt {what} at key {key:02x?}: {detail}")]
    Corrupt {
        /// Which kind of entry (message record, ack floor, counters...).
        what: &'static str,
        /// The raw key of the entry.
        key: Vec<u8>,
        /// What is wrong with it.
        detail: String,
    },

    /// The caller passed an operation that cannot be stored (e.g. an empty
    /// meta key, a key longer than 65535 bytes). Nothing of the write was applied.
    #[error("invalid operation: {0}")]
    InvalidOp(String),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(Arc::new(e))
    }
}

impl From<fjall::Error> for Error {
    fn from(e: fjall::Error) -> Self {
        match e {
            // fjall poisons itself after a failed journal write/fsync; report
            // that with our own variant so callers need to match only one.
            fjall::Error::Poisoned => Error::Poisoned,
            other => Error::Fjall(Arc::new(other)),
        }
    }
}

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
