//! Golden frames shared with the Python worker (which reads the same files in its unittest).
//! Every frame must parse, decode into the catalogue of its channel, carry the recorded body,
//! and re-encode to a frame that decodes to the same message. Frames of older versions stay.

use std::path::PathBuf;

use bytes::BytesMut;
use capsule_protocol::{
    decode_control, decode_host, decode_worker, encode_to_vec, frame, DEFAULT_MAX_FRAME,
};
use serde_json::Value;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn every_golden_frame_decodes_to_its_recorded_message_and_body() {
    let index: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(golden_dir().join("index.json")).expect("index"),
    )
    .expect("json");
    assert!(index.len() >= 20, "golden index is unexpectedly small");
    for case in index {
        let name = case["name"].as_str().expect("name");
        let bytes = std::fs::read(golden_dir().join(format!("{name}.frame"))).expect("frame");
        let mut buf = BytesMut::from(&bytes[..]);
        let raw = frame::parse(&mut buf, DEFAULT_MAX_FRAME)
            .expect("valid frame")
            .expect("complete frame");
        assert!(buf.is_empty(), "{name}: trailing bytes");
        assert_eq!(
            raw.body.to_vec(),
            hex(case["body_hex"].as_str().expect("hex")),
            "{name}: body"
        );
        let expected = &case["message"];
        let header_value: Value = serde_json::from_slice(&raw.header).expect("header json");
        assert_eq!(&header_value, expected, "{name}: header");
        // Decode into the typed catalogue and re-encode: the value must survive.
        let reencoded = match case["channel"].as_str().expect("channel") {
            "worker" => {
                let m = decode_worker(&raw).unwrap_or_else(|e| panic!("{name}: {e}"));
                encode_to_vec(&m, &raw.body, DEFAULT_MAX_FRAME).expect("encode")
            }
            "host" => {
                let m = decode_host(&raw).unwrap_or_else(|e| panic!("{name}: {e}"));
                encode_to_vec(&m, &raw.body, DEFAULT_MAX_FRAME).expect("encode")
            }
            "control" => {
                let m = decode_control(&raw).unwrap_or_else(|e| panic!("{name}: {e}"));
                encode_to_vec(&m, &raw.body, DEFAULT_MAX_FRAME).expect("encode")
            }
            other => panic!("unknown channel {other}"),
        };
        let mut buf = BytesMut::from(&reencoded[..]);
        let again = frame::parse(&mut buf, DEFAULT_MAX_FRAME)
            .expect("ok")
            .expect("frame");
        let again_value: Value = serde_json::from_slice(&again.header).expect("json");
        assert_eq!(&again_value, expected, "{name}: re-encoded header");
        assert_eq!(again.body, raw.body, "{name}: re-encoded body");
    }
}
