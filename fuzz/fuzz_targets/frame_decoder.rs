//! Fuzz target: arbitrary bytes, split into arbitrary reads, through the frame decoder and all
//! three message decoders. Nothing may panic, and a decoder that failed must stay failed.
//!
//! Run: `cargo +nightly fuzz run frame_decoder` from the repository root.
#![no_main]

use capsule_protocol::{decode_control, decode_host, decode_worker, Decoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (split, rest) = match data.split_first() {
        Some((s, r)) => (usize::from(*s).max(1), r),
        None => return,
    };
    let mut d = Decoder::new(64 * 1024);
    let mut failed = false;
    for chunk in rest.chunks(split) {
        d.push(chunk);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => {
                    assert!(!failed);
                    let _ = decode_worker(&f);
                    let _ = decode_host(&f);
                    let _ = decode_control(&f);
                }
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    assert!(d.next_frame().is_err());
                    break;
                }
            }
        }
    }
});
