//! Property tests: messages round-trip through frames; arbitrary byte streams never panic the
//! decoder; how a stream is split into reads never changes the frames it yields.

use bytes::BytesMut;
use capsule_protocol::{
    decode_control, decode_host, decode_worker, encode_message, CellResult, ControlMessage,
    Decoder, HostMessage, Stream, WorkerMessage, DEFAULT_MAX_FRAME,
};
use proptest::prelude::*;

fn stream() -> impl Strategy<Value = Stream> {
    prop_oneof![Just(Stream::Stdout), Just(Stream::Stderr)]
}

fn worker_message() -> impl Strategy<Value = WorkerMessage> {
    prop_oneof![
        (proptest::option::of(".{0,12}"), stream())
            .prop_map(|(exec, stream)| WorkerMessage::Output { exec, stream }),
        (".{0,12}", ".{0,12}", ".{0,40}", any::<bool>()).prop_map(
            |(exec, req, prompt, password)| {
                WorkerMessage::InputRequest {
                    exec,
                    req,
                    prompt,
                    password,
                }
            }
        ),
        (".{0,12}", 0.0f64..1e9, ".{0,40}", any::<i64>()).prop_map(|(exec, d, repr, v)| {
            WorkerMessage::Outcome {
                exec,
                duration_ms: d,
                result: CellResult::Ok {
                    value: serde_json::json!(v),
                    repr,
                },
            }
        }),
        (".{0,12}", ".{0,20}", ".{0,40}", ".{0,200}").prop_map(|(exec, ename, evalue, tb)| {
            WorkerMessage::Outcome {
                exec,
                duration_ms: 0.0,
                result: CellResult::Error {
                    ename,
                    evalue,
                    traceback: tb,
                },
            }
        }),
        (".{0,12}", any::<bool>())
            .prop_map(|(exec, running)| WorkerMessage::CancelAck { exec, running }),
        any::<u64>().prop_map(|n| WorkerMessage::Pong { n }),
    ]
}

fn host_message() -> impl Strategy<Value = HostMessage> {
    prop_oneof![
        (".{0,12}", ".{0,300}", any::<bool>()).prop_map(|(exec, code, history)| {
            HostMessage::Execute {
                exec,
                code,
                history,
            }
        }),
        (".{0,12}", ".{0,12}", proptest::option::of(".{0,40}"))
            .prop_map(|(exec, req, text)| HostMessage::InputReply { exec, req, text }),
        (".{0,12}", any::<bool>()).prop_map(|(req, clear)| HostMessage::Restore { req, clear }),
    ]
}

fn control_message() -> impl Strategy<Value = ControlMessage> {
    prop_oneof![
        ".{0,12}".prop_map(|exec| ControlMessage::Cancel { exec }),
        ".{0,12}".prop_map(|exec| ControlMessage::Interrupt { exec }),
        any::<u64>().prop_map(|n| ControlMessage::Ping { n }),
        Just(ControlMessage::Shutdown {}),
    ]
}

proptest! {
    #[test]
    fn worker_messages_round_trip_with_their_body(msg in worker_message(), body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::new();
        encode_message(&msg, &body, DEFAULT_MAX_FRAME, &mut buf).expect("encode");
        let mut d = Decoder::new(DEFAULT_MAX_FRAME);
        d.push(&buf);
        let f = d.next_frame().expect("ok").expect("frame");
        prop_assert_eq!(decode_worker(&f).expect("decode"), msg);
        prop_assert_eq!(&f.body[..], &body[..]);
    }

    #[test]
    fn host_and_control_messages_round_trip(h in host_message(), c in control_message()) {
        let mut buf = BytesMut::new();
        encode_message(&h, b"", DEFAULT_MAX_FRAME, &mut buf).expect("encode");
        encode_message(&c, b"", DEFAULT_MAX_FRAME, &mut buf).expect("encode");
        let mut d = Decoder::new(DEFAULT_MAX_FRAME);
        d.push(&buf);
        let f1 = d.next_frame().expect("ok").expect("frame");
        let f2 = d.next_frame().expect("ok").expect("frame");
        prop_assert_eq!(decode_host(&f1).expect("decode"), h);
        prop_assert_eq!(decode_control(&f2).expect("decode"), c);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)) {
        let mut d = Decoder::new(4096);
        for c in chunks {
            d.push(&c);
            while let Ok(Some(f)) = d.next_frame() {
                let _ = decode_worker(&f);
                let _ = decode_host(&f);
                let _ = decode_control(&f);
            }
        }
    }

    #[test]
    fn how_a_stream_is_split_never_changes_the_frames(msgs in proptest::collection::vec(worker_message(), 1..8), cuts in proptest::collection::vec(any::<usize>(), 0..12)) {
        let mut buf = BytesMut::new();
        for m in &msgs {
            encode_message(m, b"xyz", DEFAULT_MAX_FRAME, &mut buf).expect("encode");
        }
        let bytes = buf.freeze();
        let mut points: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
        points.sort_unstable();
        points.push(bytes.len());
        let mut d = Decoder::new(DEFAULT_MAX_FRAME);
        let mut got = Vec::new();
        let mut last = 0;
        for p in points {
            d.push(&bytes[last..p]);
            last = p;
            while let Some(f) = d.next_frame().expect("valid stream") {
                got.push(decode_worker(&f).expect("decode"));
            }
        }
        prop_assert_eq!(got, msgs);
        prop_assert_eq!(d.pending(), 0);
    }
}
