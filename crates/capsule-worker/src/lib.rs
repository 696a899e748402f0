//! `capsule-worker`: the Python side of a Capsule session, and the host-side helpers to start it.
//!
//! This crate owns:
//!
//! * the **worker runtime**, a standard-library-only Python package (`python/capsule_worker/`)
//!   embedded in the binary with `include_str!` and written to a content-addressed cache
//!   directory by [`materialize`];
//! * the **launch contract**: [`bootstrap_args`] and the fixed descriptors [`DATA_FD`],
//!   [`EVENT_FD`], [`CONTROL_FD`] (see `docs/protocol.md` §1 and `docs/worker.md`);
//! * **interpreter discovery**: [`resolve_interpreter`] (shims resolved once, probe cached) and
//!   [`find_interpreters`].
//!
//! It must never: speak the protocol itself (that is `capsule-session`), spawn or sandbox the
//! worker (`capsule-session` / `capsule-sandbox`), or add any non-stdlib dependency to the
//! Python runtime.

mod bundle;
mod error;
mod interpreter;

pub use bundle::{bootstrap_args, cache_root, materialize, precompile, WorkerBundle, BUNDLE_FILES};
pub use error::WorkerError;
pub use interpreter::{find_interpreters, resolve_interpreter, Interpreter};

/// Worker descriptor of the data pipe (host → worker).
pub const DATA_FD: i32 = 3;
/// Worker descriptor of the event pipe (worker → host).
pub const EVENT_FD: i32 = 4;
/// Worker descriptor of the control pipe (host → worker; cancel, ping, shutdown).
pub const CONTROL_FD: i32 = 5;
/// Worker descriptor of the stdout capture pipe's read end (its write end is fd 1). The host
/// keeps a copy it reads only after the worker died, so output written just before a crash is
/// not lost.
pub const STDOUT_CAPTURE_FD: i32 = 6;
/// Worker descriptor of the stderr capture pipe's read end (its write end is fd 2).
pub const STDERR_CAPTURE_FD: i32 = 7;
/// Worker descriptor of the host's log pipe (worker diagnostics; never user output).
pub const LOG_FD: i32 = 8;
