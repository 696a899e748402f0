//! Message-level encoding on top of [`crate::frame`]: catalogue types in, frames out, and back.
//! Still pure: a [`Decoder`] is a buffer plus the frame parser, fed by whoever owns the pipe.

use bytes::{Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};

use crate::error::ProtocolError;
use crate::frame::{self, Encoding, RawFrame};
use crate::message::{ControlMessage, HostMessage, WorkerMessage};

/// Encodes `msg` with `body` as one JSON frame appended to `out`.
pub fn encode_message<T: Serialize>(
    msg: &T,
    body: &[u8],
    max_frame: usize,
    out: &mut BytesMut,
) -> Result<(), ProtocolError> {
    let header = serde_json::to_vec(msg).map_err(ProtocolError::Encode)?;
    frame::encode(Encoding::Json, &header, body, max_frame, out)?;
    Ok(())
}

/// Encodes `msg` with `body` into a fresh buffer.
pub fn encode_to_vec<T: Serialize>(
    msg: &T,
    body: &[u8],
    max_frame: usize,
) -> Result<Bytes, ProtocolError> {
    let mut out = BytesMut::new();
    encode_message(msg, body, max_frame, &mut out)?;
    Ok(out.freeze())
}

fn decode_header<T: DeserializeOwned>(
    frame: &RawFrame,
    direction: &'static str,
) -> Result<T, ProtocolError> {
    match frame.encoding {
        Encoding::Json => serde_json::from_slice(&frame.header)
            .map_err(|source| ProtocolError::MalformedHeader { direction, source }),
    }
}

/// Decodes a worker → host frame.
pub fn decode_worker(frame: &RawFrame) -> Result<WorkerMessage, ProtocolError> {
    decode_header(frame, "worker")
}

/// Decodes a host → worker data frame.
pub fn decode_host(frame: &RawFrame) -> Result<HostMessage, ProtocolError> {
    decode_header(frame, "host")
}

/// Decodes a host → worker control frame.
pub fn decode_control(frame: &RawFrame) -> Result<ControlMessage, ProtocolError> {
    decode_header(frame, "control")
}

/// Incremental frame decoder: push bytes as they arrive, pull whole frames out.
///
/// Owns its buffer; does no IO. After an error the stream is unusable (framing cannot
/// resynchronise) and every later call returns the same error.
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    max_frame: usize,
    failed: Option<crate::error::FrameError>,
}

impl Decoder {
    /// A decoder enforcing `max_frame`.
    pub fn new(max_frame: usize) -> Self {
        Decoder {
            buf: BytesMut::with_capacity(64 * 1024),
            max_frame,
            failed: None,
        }
    }

    /// Appends bytes read from the channel.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Gives the spare capacity to read into directly (avoids a copy); call [`Self::buffer_mut`]
    /// users must only append.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<RawFrame>, crate::error::FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match frame::parse(&mut self.buf, self.max_frame) {
            Ok(f) => Ok(f),
            Err(e) => {
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Bytes buffered but not yet returned as frames (a non-zero value at EOF means a torn frame).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::DEFAULT_MAX_FRAME;
    use crate::message::Stream;

    #[test]
    fn decoder_yields_frames_split_across_pushes() {
        let msg = WorkerMessage::Output {
            exec: Some("e1".into()),
            stream: Stream::Stdout,
        };
        let bytes = encode_to_vec(&msg, b"hello\n", DEFAULT_MAX_FRAME).expect("encode");
        let mut d = Decoder::new(DEFAULT_MAX_FRAME);
        for b in bytes.iter() {
            assert!(d.next_frame().expect("ok").is_none());
            d.push(&[*b]);
        }
        let f = d.next_frame().expect("ok").expect("frame");
        assert_eq!(decode_worker(&f).expect("decode"), msg);
        assert_eq!(&f.body[..], b"hello\n");
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn decoder_stays_failed_after_a_framing_error() {
        let mut d = Decoder::new(1024);
        d.push(&[0xff, 0xff, 0xff, 0xff]);
        assert!(d.next_frame().is_err());
        d.push(&[0; 16]);
        assert!(d.next_frame().is_err());
    }

    #[test]
    fn malformed_header_is_a_typed_error() {
        let mut out = BytesMut::new();
        frame::encode(Encoding::Json, b"{\"type\":\"nope\"}", b"", 1024, &mut out).expect("enc");
        let f = frame::parse(&mut out, 1024).expect("ok").expect("frame");
        assert!(matches!(
            decode_worker(&f),
            Err(ProtocolError::MalformedHeader {
                direction: "worker",
                ..
            })
        ));
    }
}
