//! What a client observes: the events of one execution, ending in exactly one [`Outcome`].
//!
//! These are library types, not wire types: front doors convert them to their own DTOs (the
//! client event model v1 of `docs/api.md`).

use serde_json::{Map, Value};

pub use capsule_protocol::Stream;

/// One event of an execution. The last one is always [`Event::Outcome`].
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Captured text (decoded as UTF-8; invalid bytes become U+FFFD).
    Output {
        /// Which stream.
        stream: Stream,
        /// The text.
        text: String,
    },
    /// A rich display (MIME bundle).
    Display {
        /// MIME type → content.
        data: Map<String, Value>,
        /// Metadata.
        metadata: Map<String, Value>,
    },
    /// The cell waits for input; answer with [`crate::ExecHandle::reply_input`].
    InputRequest {
        /// Request id.
        req: String,
        /// Prompt.
        prompt: String,
        /// Whether the input is a password (`getpass`).
        password: bool,
    },
    /// The cell's one outcome.
    Outcome(Outcome),
}

/// How a cell ended, with its timing and any truncation.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The status and its fields.
    pub status: OutcomeStatus,
    /// Time from the cell's start on the worker (or its dequeue) to the outcome, in ms.
    pub duration_ms: f64,
    /// Set when output went over the per-cell budget.
    pub truncated: Option<Truncation>,
}

/// Output dropped over the per-cell budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Truncation {
    /// Bytes dropped.
    pub dropped_bytes: u64,
    /// The budget in force.
    pub budget: u64,
}

pub use capsule_sandbox::KillReason;

/// The typed outcome of a cell (BRIEF §3.3).
#[derive(Clone, Debug, PartialEq)]
pub enum OutcomeStatus {
    /// Ran to the end.
    Ok {
        /// JSON value of the trailing expression, or `null`.
        value: Value,
        /// Its `repr`, `""` when none.
        repr: String,
    },
    /// Raised.
    Error {
        /// Exception class name.
        ename: String,
        /// Exception message.
        evalue: String,
        /// Traceback of the cell's frames.
        traceback: String,
    },
    /// Stopped by a cancel; the session's state is intact.
    Cancelled,
    /// Stopped by its deadline. `state_lost` when the worker had to be killed.
    TimedOut {
        /// Whether the namespace was lost.
        state_lost: bool,
    },
    /// The sandbox or host killed the worker for a reason it knows.
    Killed {
        /// Why.
        reason: KillReason,
        /// Human-readable detail.
        detail: String,
    },
    /// The worker died or had to be killed; its state is gone. A fresh worker serves the next cell.
    WorkerLost {
        /// What is known of the cause (exit status, "cancel did not take effect within the grace period", ...).
        reason: String,
    },
}

impl OutcomeStatus {
    /// Stable status name (`ok`, `error`, `cancelled`, `timed_out`, `killed`, `worker_lost`).
    pub fn name(&self) -> &'static str {
        match self {
            OutcomeStatus::Ok { .. } => "ok",
            OutcomeStatus::Error { .. } => "error",
            OutcomeStatus::Cancelled => "cancelled",
            OutcomeStatus::TimedOut { .. } => "timed_out",
            OutcomeStatus::Killed { .. } => "killed",
            OutcomeStatus::WorkerLost { .. } => "worker_lost",
        }
    }

    /// Whether the session's namespace was lost with this outcome.
    pub fn state_lost(&self) -> bool {
        matches!(
            self,
            OutcomeStatus::TimedOut { state_lost: true }
                | OutcomeStatus::Killed { .. }
                | OutcomeStatus::WorkerLost { .. }
        )
    }
}
