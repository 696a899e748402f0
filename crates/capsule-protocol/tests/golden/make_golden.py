#!/usr/bin/env python3
"""Regenerates the golden frames in this folder. Run only when the protocol version changes;
the frames of older versions must stay and keep decoding (docs/VERSIONING.md)."""
import json, os, struct

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = [
    ("v1_hello", "worker", {"type": "hello", "min_version": 1, "max_version": 1, "encodings": ["json"], "features": ["tla", "input", "checkpoint", "reset"], "python": "3.11.7", "implementation": "cpython", "executable": "/usr/bin/python3", "pid": 1234}, b""),
    ("v1_output", "worker", {"type": "output", "exec": "e1", "stream": "stdout"}, b"hi\n"),
    ("v1_output_between_cells", "worker", {"type": "output", "exec": None, "stream": "stderr"}, b"\xe2\x82"),
    ("v1_input_request", "worker", {"type": "input_request", "exec": "e1", "req": "r1", "prompt": "Name: ", "password": False}, b""),
    ("v1_outcome_ok", "worker", {"type": "outcome", "exec": "e1", "duration_ms": 0.5, "status": "ok", "value": 42, "repr": "42"}, b""),
    ("v1_outcome_error", "worker", {"type": "outcome", "exec": "e2", "duration_ms": 1.25, "status": "error", "ename": "ZeroDivisionError", "evalue": "division by zero", "traceback": "Traceback (most recent call last):\n  File \"<cell-1>\", line 1, in <module>\n    1/0\nZeroDivisionError: division by zero\n"}, b""),
    ("v1_outcome_cancelled", "worker", {"type": "outcome", "exec": "e3", "duration_ms": 500.0, "status": "cancelled"}, b""),
    ("v1_cancel_ack", "worker", {"type": "cancel_ack", "exec": "e3", "running": True}, b""),
    ("v1_pong", "worker", {"type": "pong", "n": 7}, b""),
    ("v1_checkpoint_done", "worker", {"type": "checkpoint_done", "req": "q1", "names": ["x", "f"], "skipped": [{"name": "lock", "reason": "cannot pickle '_thread.lock' object"}]}, b"CAPSULE-CKPT\x00\x00\x01"),
    ("v1_restore_done", "worker", {"type": "restore_done", "req": "q2", "restored": ["x"], "error": None}, b""),
    ("v1_fault", "worker", {"type": "fault", "message": "malformed frame", "fatal": False}, b""),
    ("v1_hello_ack", "host", {"type": "hello_ack", "version": 1, "encoding": "json", "features": ["tla"], "session": "s1", "settings": {"output_chunk": 262144, "max_frame": 16777216, "enable_site": True, "sys_path": []}}, b""),
    ("v1_execute", "host", {"type": "execute", "exec": "e1", "code": "x = 6 * 7\nx", "history": True}, b""),
    ("v1_input_reply", "host", {"type": "input_reply", "exec": "e1", "req": "r1", "text": "Ada"}, b""),
    ("v1_input_reply_eof", "host", {"type": "input_reply", "exec": "e1", "req": "r2", "text": None}, b""),
    ("v1_checkpoint", "host", {"type": "checkpoint", "req": "q1"}, b""),
    ("v1_restore", "host", {"type": "restore", "req": "q2", "clear": True}, b"CAPSULE-CKPT\x00\x00\x01"),
    ("v1_reset", "host", {"type": "reset", "req": "q3"}, b""),
    ("v1_cancel", "control", {"type": "cancel", "exec": "e3"}, b""),
    ("v1_interrupt", "control", {"type": "interrupt", "exec": "e3"}, b""),
    ("v1_ping", "control", {"type": "ping", "n": 7}, b""),
    ("v1_shutdown", "control", {"type": "shutdown"}, b""),
]


def frame(header: bytes, body: bytes) -> bytes:
    return struct.pack(">IBI", 5 + len(header) + len(body), 1, len(header)) + header + body


def main():
    index = []
    for name, channel, msg, body in CASES:
        header = json.dumps(msg, separators=(",", ":")).encode()
        with open(os.path.join(HERE, name + ".frame"), "wb") as f:
            f.write(frame(header, body))
        index.append({"name": name, "channel": channel, "message": msg, "body_hex": body.hex()})
    with open(os.path.join(HERE, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
