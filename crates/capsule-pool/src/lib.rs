//! Capsule session pool: hands out warm [`capsule_session::Session`]s in microseconds and keeps
//! them healthy.
//!
//! # What it owns
//!
//! * [`SessionPool`]: `min_idle` warm sessions, `max_sessions` cap, [`SessionPool::acquire`]
//!   with FIFO-fair waiters and a typed timeout, release through [`PooledSession`] (drop or
//!   [`PooledSession::release`]) with the check and wipe done **off the caller's path**,
//!   [`SessionPool::stop`].
//! * Hygiene between users ([`Reuse::Reset`] or [`Reuse::Replace`]), recycling after N cells,
//!   per-session and pool RSS budgets, idle timeout, dead-worker removal (pidfd events).
//! * Warm imports with per-module results, a circuit breaker on creation failures
//!   ([`breaker`]), and [`PoolInfo`] (hit rate, latency histograms, evictions by reason).
//!
//! # What it must never do
//!
//! * Touch bytes or pipes: it talks to workers only through `capsule-session`'s public API
//!   (`start`, `execute_with`, `reset`, `info`, `shutdown`) and reads `/proc/<pid>/statm`.
//! * Await while holding a lock (the one `std::sync::Mutex` is held for short synchronous
//!   sections only), or poll: background work is woken by `Notify`/watch channels and pidfd
//!   readiness; the only timers are deadlines (breaker backoff, idle expiry, health baseline).
//! * Hand one session to two acquirers, or hand out a session whose worker is known dead.
//!
//! # Layout
//!
//! * [`config`]: [`PoolConfig`] (`CAPSULE_POOL_*` environment, validation, fingerprint).
//! * `pool`: [`SessionPool`], [`PooledSession`], the warmer, health and cleaning tasks.
//! * [`breaker`]: the circuit breaker state machine (pure).
//! * `liveness`: pidfd-based worker death detection.
//! * [`metrics`]: histograms and the [`PoolInfo`] snapshot types.
//! * [`error`]: the typed [`PoolError`].
//!
//! Tests: unit tests beside the code; end-to-end tests with real Python workers in `tests/`.
#![warn(missing_docs)]

pub mod breaker;
pub mod config;
pub mod error;
pub mod fork;
mod liveness;
pub mod metrics;
mod pool;

pub use breaker::{BreakerState, BreakerTransition};
pub use config::{BreakerConfig, PoolConfig, Reuse};
pub use error::PoolError;
pub use fork::{ForkInfo, ForkServer};
pub use metrics::{
    CreatePath, EvictReason, HistogramSnapshot, PoolInfo, SessionSummary, WarmImportInfo,
};
pub use pool::{PooledSession, SessionPool};
