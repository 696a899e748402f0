//! Typed errors of this crate.

use std::path::PathBuf;

/// Everything that can go wrong materializing the worker or finding an interpreter.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The bundle could not be written to the cache directory.
    #[error("cannot write the worker bundle at {path}: {source}")]
    Bundle {
        /// The path being written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// No interpreter was requested and none could be found.
    #[error("no Python interpreter found: {0}")]
    NotFound(String),
    /// The interpreter could not be started.
    #[error("cannot run the Python interpreter {python}: {source}")]
    Spawn {
        /// The interpreter.
        python: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The interpreter ran but the probe failed or printed something unexpected.
    #[error("probing the Python interpreter {python} failed: {message}")]
    Probe {
        /// The interpreter.
        python: PathBuf,
        /// What went wrong (stderr of the probe, or the parse error).
        message: String,
    },
    /// The interpreter is older than the oldest supported version (3.9).
    #[error("{python} is Python {version}; Capsule needs CPython 3.9 or newer")]
    UnsupportedVersion {
        /// The interpreter.
        python: PathBuf,
        /// Its version.
        version: String,
    },
}
