//! Frame codec: pure functions over byte buffers, no IO.
//!
//! Wire format of one frame (all integers big-endian):
//!
//! ```text
//! [len: u32 BE][enc: u8][hlen: u32 BE][header: hlen bytes][body: len - 5 - hlen bytes]
//! ```
//!
//! `len` counts every byte after the length field (so `len >= 5`). `enc` names the encoding of
//! the header (`1` = JSON, the only one in protocol v1; `2` is reserved for msgpack). The header
//! is one encoded message object; the body is an opaque binary attachment (output bytes, a
//! checkpoint blob) so that bulk data never pays for escaping or base64.
//!
//! As in mini-redis, [`check`] is a cheap pass that allocates nothing and reports whether a whole
//! frame is buffered; [`parse`] then splits it off. An incomplete frame is an expected condition
//! (`Ok(None)`), not an error.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::FrameError;

/// Bytes taken by the length prefix.
pub const LEN_PREFIX: usize = 4;
/// Bytes after the length prefix that every frame has: encoding byte + header length.
pub const FIXED_AFTER_LEN: usize = 5;

/// Default and recommended hard limit on one frame (`len` + the prefix), 16 MiB.
///
/// Why: a frame is buffered whole before it is routed, so this bounds the memory one bad or
/// hostile peer can make the other side allocate. Knob: `CAPSULE_MAX_FRAME` / `max_frame`
/// (session config). Metric: `frames_rejected_too_large` in session info. Bulk output is
/// chunked by the worker far below this limit, so only a broken peer ever reaches it.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Smallest hard limit a peer may configure; below this a checkpoint chunk or a large code
/// cell could not travel at all.
pub const MIN_MAX_FRAME: usize = 64 * 1024;

/// Header encodings. The byte value is on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Encoding {
    /// UTF-8 JSON object. Since v1; always available (the worker is stdlib-only).
    Json = 1,
}

impl Encoding {
    /// Decodes the encoding byte.
    pub fn from_byte(b: u8) -> Result<Self, FrameError> {
        match b {
            1 => Ok(Encoding::Json),
            other => Err(FrameError::UnknownEncoding(other)),
        }
    }

    /// Name used during negotiation.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Json => "json",
        }
    }
}

/// One frame split into its parts; the header is not decoded yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawFrame {
    /// Encoding of `header`.
    pub encoding: Encoding,
    /// The encoded message object.
    pub header: Bytes,
    /// The binary attachment (may be empty).
    pub body: Bytes,
}

/// Checks whether `buf` starts with a complete frame.
///
/// Returns `Ok(Some(n))` with the frame's total size (prefix included) when it is complete,
/// `Ok(None)` when more bytes are needed, and an error when the bytes can never form a valid
/// frame under `max_frame`. Allocates nothing.
pub fn check(buf: &[u8], max_frame: usize) -> Result<Option<usize>, FrameError> {
    if buf.len() < LEN_PREFIX {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let total = len.saturating_add(LEN_PREFIX);
    if total > max_frame {
        return Err(FrameError::FrameTooLarge {
            size: total,
            max: max_frame,
        });
    }
    if len < FIXED_AFTER_LEN {
        return Err(FrameError::FrameTooShort {
            size: len,
            min: FIXED_AFTER_LEN,
        });
    }
    // The fixed part is validated as soon as it is present, so a corrupt header length is
    // reported before the whole (possibly huge) body has arrived.
    if buf.len() >= LEN_PREFIX + FIXED_AFTER_LEN {
        Encoding::from_byte(buf[4])?;
        let hlen = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) as usize;
        if hlen > len - FIXED_AFTER_LEN {
            return Err(FrameError::HeaderOutOfBounds {
                header: hlen,
                frame: len,
            });
        }
    }
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some(total))
}

/// Splits one complete frame off the front of `buf`.
///
/// `Ok(None)` means more bytes are needed and `buf` is untouched.
pub fn parse(buf: &mut BytesMut, max_frame: usize) -> Result<Option<RawFrame>, FrameError> {
    let Some(total) = check(buf, max_frame)? else {
        return Ok(None);
    };
    let mut frame = buf.split_to(total);
    frame.advance(LEN_PREFIX);
    let encoding = Encoding::from_byte(frame.get_u8())?;
    let hlen = frame.get_u32() as usize;
    let header = frame.split_to(hlen).freeze();
    let body = frame.freeze();
    Ok(Some(RawFrame {
        encoding,
        header,
        body,
    }))
}

/// Size on the wire of a frame with this header and body.
pub fn encoded_len(header_len: usize, body_len: usize) -> usize {
    LEN_PREFIX + FIXED_AFTER_LEN + header_len + body_len
}

/// Appends one frame to `out`.
///
/// Fails (and appends nothing) when the frame would exceed `max_frame`.
pub fn encode(
    encoding: Encoding,
    header: &[u8],
    body: &[u8],
    max_frame: usize,
    out: &mut BytesMut,
) -> Result<(), FrameError> {
    let total = encoded_len(header.len(), body.len());
    if total > max_frame || total - LEN_PREFIX > u32::MAX as usize {
        return Err(FrameError::FrameTooLarge {
            size: total,
            max: max_frame,
        });
    }
    out.reserve(total);
    out.put_u32((total - LEN_PREFIX) as u32);
    out.put_u8(encoding as u8);
    out.put_u32(header.len() as u32);
    out.put_slice(header);
    out.put_slice(body);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(header: &[u8], body: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        encode(Encoding::Json, header, body, DEFAULT_MAX_FRAME, &mut out).expect("encode");
        out
    }

    #[test]
    fn round_trip_keeps_header_and_body() {
        let mut buf = frame(br#"{"type":"pong","n":1}"#, b"\x00\xffbody");
        let f = parse(&mut buf, DEFAULT_MAX_FRAME)
            .expect("ok")
            .expect("complete");
        assert_eq!(&f.header[..], br#"{"type":"pong","n":1}"#);
        assert_eq!(&f.body[..], b"\x00\xffbody");
        assert!(buf.is_empty());
    }

    #[test]
    fn incomplete_frame_is_not_an_error_and_leaves_buffer_alone() {
        let full = frame(b"{}", b"abc");
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(parse(&mut part, DEFAULT_MAX_FRAME).expect("no error"), None);
            assert_eq!(part.len(), cut);
        }
    }

    #[test]
    fn check_rejects_oversized_length_before_body_arrives() {
        let mut buf = BytesMut::new();
        buf.put_u32(100 * 1024 * 1024);
        assert_eq!(
            check(&buf, DEFAULT_MAX_FRAME),
            Err(FrameError::FrameTooLarge {
                size: 100 * 1024 * 1024 + 4,
                max: DEFAULT_MAX_FRAME
            })
        );
    }

    #[test]
    fn check_rejects_too_short_length() {
        let mut buf = BytesMut::new();
        buf.put_u32(2);
        buf.put_slice(&[1, 0]);
        assert!(matches!(
            check(&buf, DEFAULT_MAX_FRAME),
            Err(FrameError::FrameTooShort { size: 2, min: 5 })
        ));
    }

    #[test]
    fn check_rejects_header_longer_than_frame() {
        let mut buf = BytesMut::new();
        buf.put_u32(6);
        buf.put_u8(1);
        buf.put_u32(10);
        assert!(matches!(
            check(&buf, DEFAULT_MAX_FRAME),
            Err(FrameError::HeaderOutOfBounds {
                header: 10,
                frame: 6
            })
        ));
    }

    #[test]
    fn check_rejects_unknown_encoding() {
        let mut buf = BytesMut::new();
        buf.put_u32(5);
        buf.put_u8(9);
        buf.put_u32(0);
        assert_eq!(
            check(&buf, DEFAULT_MAX_FRAME),
            Err(FrameError::UnknownEncoding(9))
        );
    }

    #[test]
    fn encode_refuses_frames_over_the_limit() {
        let mut out = BytesMut::new();
        let body = vec![0u8; 100];
        assert!(encode(Encoding::Json, b"{}", &body, 50, &mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn two_frames_back_to_back_parse_in_order() {
        let mut buf = frame(b"{\"a\":1}", b"");
        buf.extend_from_slice(&frame(b"{\"b\":2}", b"xyz"));
        let a = parse(&mut buf, DEFAULT_MAX_FRAME).expect("ok").expect("a");
        let b = parse(&mut buf, DEFAULT_MAX_FRAME).expect("ok").expect("b");
        assert_eq!(&a.header[..], b"{\"a\":1}");
        assert_eq!(&b.body[..], b"xyz");
        assert_eq!(parse(&mut buf, DEFAULT_MAX_FRAME).expect("ok"), None);
    }
}
