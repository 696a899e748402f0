//! Typed errors of the session crate.
//!
//! A dead worker is not an error: it is an outcome ([`crate::OutcomeStatus::WorkerLost`]).
//! These errors are for requests that could not be carried out at all.

/// A setting that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The value is not acceptable for the key.
    #[error("invalid {key} {value:?}: {reason}")]
    Invalid {
        /// Setting name (environment variable or field).
        key: &'static str,
        /// The offending value.
        value: String,
        /// Why.
        reason: String,
    },
}

/// Errors of session operations.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The interpreter or the worker runtime could not be prepared.
    #[error("failed to prepare the worker: {0}")]
    Worker(#[from] capsule_worker::WorkerError),
    /// The sandbox the policy demands cannot be set up (fail closed: names the layer and why).
    #[error("sandbox: {0}")]
    Sandbox(#[from] capsule_sandbox::SandboxError),
    /// The worker process could not be started.
    #[error("failed to spawn the worker {program}: {source}")]
    Spawn {
        /// The interpreter.
        program: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The worker did not complete the handshake.
    #[error("worker failed to start: {reason}")]
    Handshake {
        /// What happened (exit status, protocol error, timeout), plus the worker's stderr tail.
        reason: String,
    },
    /// Negotiation failed.
    #[error(transparent)]
    Protocol(#[from] capsule_protocol::ProtocolError),
    /// Too many executions are already queued.
    #[error("execution queue is full ({max} waiting)")]
    QueueFull {
        /// The configured maximum.
        max: usize,
    },
    /// The session has been shut down.
    #[error("session is closed")]
    Closed,
    /// A checkpoint could not be taken.
    #[error("checkpoint failed: {0}")]
    Checkpoint(String),
    /// A checkpoint could not be restored.
    #[error("restore failed: {0}")]
    Restore(String),
    /// The worker was lost while the request was in flight.
    #[error("worker lost during {operation}")]
    WorkerLost {
        /// The interrupted operation.
        operation: &'static str,
    },
    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}
