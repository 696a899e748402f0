//! End-to-end tests of `capsule-session` with real Python workers, one binary with one module
//! per area. Waits are on events (the next event, an outcome); no sleeps synchronise anything
//! and nothing asserts on elapsed time. Each test builds its own session and scratch dir.

mod cancel;
mod cells;
mod checkpoint;
mod faults;
mod interpreters;
mod io;
mod sandbox;
mod support;
