//! Capsule sessions: one Rust [`Session`] owns one Python worker process.
//!
//! # Layout
//!
//! * [`config`]: [`SessionConfig`] and its precedence (explicit > `CAPSULE_*` env > defaults).
//! * `process`: spawning a worker on its pipes (data fd 3, events fd 4, control fd 5), its
//!   process group, the log pipe, and the handshake. The only module that creates processes.
//! * `reader`: the single reader of a worker's event pipe; routes execution events straight
//!   to the execution's channel and reports state changes to the actor.
//! * `routes`: the routing table; the one place an outcome can be emitted, exactly once.
//! * `actor`: the task owning the worker: FIFO queue, deadlines, the cancel ladder,
//!   respawn, host-made outcomes, info.
//! * [`session`]: the public handles ([`Session`], [`Execution`], [`ExecHandle`]).
//! * [`event`]: what clients observe ([`Event`], [`Outcome`], [`OutcomeStatus`]).
//!
//! **Architecture invariants:** one reader per channel; output before outcome; exactly one typed
//! outcome per cell (a dead worker is an outcome, never a hang or a silent success); the host
//! decides deadlines and kills, the worker is never trusted to; no polling and no sleeps (timers
//! are deadlines, waits are on events). This crate never parses frames itself
//! (`capsule-protocol` does) and never runs user code in the host.
//!
//! Tests: unit tests beside the code; end-to-end tests with real Python workers in `tests/`.
//!
//! ```
//! # tokio::runtime::Runtime::new().expect("runtime").block_on(async {
//! use capsule_session::{Event, Session, SessionConfig};
//! let session = Session::start(SessionConfig::from_env()?).await?;
//! let mut exec = session.execute("name = input('Name: ')\nprint('Hi', name)").await?;
//! while let Some(event) = exec.next().await {
//!     match event {
//!         Event::InputRequest { req, .. } => exec.reply_input(&req, Some("Ada".into())).await?,
//!         Event::Output { text, .. } => print!("{text}"),
//!         Event::Outcome(outcome) => println!("-> {}", outcome.status.name()),
//!         Event::Display { .. } => {}
//!     }
//! }
//! # Ok::<(), capsule_session::SessionError>(())
//! # }).expect("example");
//! ```
#![warn(missing_docs)]

mod actor;
pub mod config;
pub mod error;
pub mod event;
mod process;
mod reader;
mod routes;
pub mod session;

pub use config::SessionConfig;
pub use error::{ConfigError, SessionError};
pub use event::{Event, KillReason, Outcome, OutcomeStatus, Stream, Truncation};
pub use process::{ExitFuture, LaunchRequest, Launched, Launcher};
pub use session::{
    BackgroundEvent, Checkpoint, Collected, ExecHandle, ExecuteRequest, Execution, SandboxLayer,
    Session, SessionInfo, SessionState,
};
