//! Typed errors of the protocol crate.

/// A byte stream that can never become a valid frame.
///
/// Every variant is fatal for the stream it came from: framing cannot resynchronise, so the
/// reader must stop reading that channel (and the session treats the worker as broken).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The declared frame is larger than the configured hard limit.
    #[error("frame of {size} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Declared size including the length prefix.
        size: usize,
        /// The limit in force.
        max: usize,
    },
    /// The declared length cannot even hold the fixed part of a frame.
    #[error("frame length {size} is shorter than the minimum {min}")]
    FrameTooShort {
        /// Declared length (after the prefix).
        size: usize,
        /// Minimum length.
        min: usize,
    },
    /// The header length runs past the end of the frame.
    #[error("header length {header} runs past the frame length {frame}")]
    HeaderOutOfBounds {
        /// Declared header length.
        header: usize,
        /// Declared frame length (after the prefix).
        frame: usize,
    },
    /// The encoding byte names no known encoding.
    #[error("unknown header encoding byte {0}")]
    UnknownEncoding(u8),
}

/// Errors of message-level encoding and decoding, and of negotiation.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Framing failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The header is not a valid message of the expected catalogue.
    #[error("malformed {direction} message header: {source}")]
    MalformedHeader {
        /// Which catalogue was expected (`worker`, `host`, `control`).
        direction: &'static str,
        /// The decoder's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// A message could not be encoded (should not happen for catalogue types).
    #[error("failed to encode message: {0}")]
    Encode(#[source] serde_json::Error),
    /// The two sides share no protocol version.
    #[error("no common protocol version: host speaks {host_min}..={host_max}, worker speaks {worker_min}..={worker_max}")]
    VersionMismatch {
        /// Lowest version the host speaks.
        host_min: u32,
        /// Highest version the host speaks.
        host_max: u32,
        /// Lowest version the worker speaks.
        worker_min: u32,
        /// Highest version the worker speaks.
        worker_max: u32,
    },
    /// The two sides share no header encoding.
    #[error("no common encoding; worker offered {offered:?}")]
    NoCommonEncoding {
        /// What the worker offered.
        offered: Vec<String>,
    },
}
