//! Typed errors of the pool.
//!
//! Errors that reach waiting acquirers travel through channels, so they carry messages
//! (`String`) rather than the non-clonable [`capsule_session::SessionError`].

use std::time::Duration;

use capsule_session::{ConfigError, SessionError};

/// Why an acquire (or another pool operation) failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The pool configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No session became available before the acquire deadline.
    #[error(
        "no session available within {waited:?} ({active} in use, max_sessions {max_sessions})"
    )]
    Timeout {
        /// How long the acquirer waited.
        waited: Duration,
        /// Sessions handed out when the deadline passed.
        active: usize,
        /// The configured maximum.
        max_sessions: usize,
    },
    /// The pool was stopped (before or while the acquirer waited).
    #[error("the pool is stopped")]
    Stopped,
    /// Session creation keeps failing; the circuit breaker refuses to try again yet.
    #[error(
        "session creation is failing (circuit breaker open, retry in {retry_in:?}): {last_error}"
    )]
    BreakerOpen {
        /// When the breaker will let a probe through (zero: a half-open probe is in flight).
        retry_in: Duration,
        /// The last creation failure.
        last_error: String,
    },
    /// Creating a session for this acquirer failed.
    #[error("could not create a session: {message}")]
    Create {
        /// What went wrong (interpreter, handshake, warm-up).
        message: String,
    },
    /// A session operation failed.
    #[error(transparent)]
    Session(#[from] SessionError),
}
