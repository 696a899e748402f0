//! Capsule's host ↔ worker wire protocol: frames, the message catalogue, and negotiation.
//!
//! # Layout
//!
//! * [`frame`]: the frame codec (`[len u32 BE][enc u8][hlen u32 BE][header][body]`) as pure
//!   functions over byte buffers, with `check`/`parse` in the mini-redis style.
//! * [`message`]: the three catalogues ([`WorkerMessage`], [`HostMessage`],
//!   [`ControlMessage`]), each variant documenting the version that introduced it.
//! * [`codec`]: message ↔ frame, and the incremental [`Decoder`].
//! * [`version`]: the single version counter and the negotiation rule.
//! * [`error`]: [`FrameError`] and [`ProtocolError`].
//!
//! **Architecture invariant:** this crate does no IO and depends on no async runtime. It knows
//! nothing of processes, sessions or pipes; whoever owns a channel feeds bytes in and takes
//! frames out. That keeps it reusable by other clients, fuzzable, and testable byte for byte.
//!
//! The spec is `docs/protocol.md`. Tests: unit tests beside the code, golden vectors shared with
//! the Python worker in `tests/golden/` (read by `tests/golden.rs` and by the worker's own
//! unittest), property tests in `tests/props.rs`, and the fuzz target in `fuzz/`.
#![warn(missing_docs)]

pub mod codec;
pub mod error;
pub mod frame;
pub mod message;
pub mod version;

pub use codec::{
    decode_control, decode_host, decode_worker, encode_message, encode_to_vec, Decoder,
};
pub use error::{FrameError, ProtocolError};
pub use frame::{Encoding, RawFrame, DEFAULT_MAX_FRAME};
pub use message::{
    CellResult, ControlMessage, ExecId, Hello, HelloAck, HostMessage, Skipped, Stream,
    WorkerMessage, WorkerSettings,
};
pub use version::{negotiate, Negotiated, MAX_VERSION, MIN_VERSION};
