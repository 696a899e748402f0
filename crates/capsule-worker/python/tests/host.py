"""A tiny test host: spawns a REAL worker subprocess on real pipes (fds 3/4/5), performs the
handshake and exchanges frames. Standard library only. Waits are blocking reads or process
waits with generous timeouts, never sleeps."""

import json
import os
import select
import struct
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PKG_DIR = os.path.dirname(HERE)  # contains capsule_worker/
TIMEOUT = 30.0  # generous upper bound for any single wait; never used as synchronisation


def encode(msg, body=b""):
    h = json.dumps(msg, separators=(",", ":")).encode()
    return struct.pack(">IBI", 5 + len(h) + len(body), 1, len(h)) + h + body


def bootstrap(pkg_dir=PKG_DIR):
    return ("import sys; sys.path.insert(0, %r); import capsule_worker; capsule_worker.main()"
            % pkg_dir)


class Host:
    def __init__(self, python=None, settings=None, handshake=True, env=None):
        python = python or sys.executable
        d_r, d_w = os.pipe()  # data: host writes
        e_r, e_w = os.pipe()  # events: worker writes
        c_r, c_w = os.pipe()  # control: host writes
        child = (d_r, e_w, c_r)

        def place():
            # Move the child's ends onto fds 3, 4, 5 (via high numbers to avoid clobbering).
            import fcntl
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in child]
            for target, fd in zip((3, 4, 5), high):
                os.dup2(fd, target)
            for fd in high:
                os.close(fd)

        self.proc = subprocess.Popen(
            [python, "-I", "-S", "-c", bootstrap(), "3", "4", "5"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=child + (3, 4, 5), preexec_fn=place, env=env)
        for fd in child:
            os.close(fd)
        self.data = d_w
        self.control = c_w
        self.events = e_r
        self.buf = b""
        self.hello = None
        self.outputs = []
        if handshake:
            self.hello, _ = self.recv()
            s = {"output_chunk": 262144, "max_frame": 16777216, "enable_site": True, "sys_path": []}
            s.update(settings or {})
            self.send({"type": "hello_ack", "version": 1, "encoding": "json", "features": ["tla"],
                       "session": "s-test", "settings": s})

    # ---- raw io --------------------------------------------------------------------------

    def send(self, msg, body=b""):
        self.write(self.data, encode(msg, body))

    def control_send(self, msg):
        self.write(self.control, encode(msg))

    @staticmethod
    def write(fd, data):
        mv = memoryview(data)
        while mv:
            mv = mv[os.write(fd, mv):]

    def _fill(self, n):
        while len(self.buf) < n:
            r, _, _ = select.select([self.events], [], [], TIMEOUT)
            if not r:
                raise TimeoutError("no frame from the worker within %ss" % TIMEOUT)
            chunk = os.read(self.events, 1 << 20)
            if not chunk:
                raise EOFError("worker closed the event pipe")
            self.buf += chunk

    def recv(self):
        """Next (message, body) from the worker."""
        self._fill(4)
        n = struct.unpack(">I", self.buf[:4])[0]
        self._fill(4 + n)
        frame, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
        assert frame[0] == 1, frame[:1]
        hlen = struct.unpack(">I", frame[1:5])[0]
        return json.loads(frame[5:5 + hlen]), frame[5 + hlen:]

    # ---- helpers ---------------------------------------------------------------------------

    def recv_until(self, pred):
        """Collect messages until pred(msg) is true; returns (that msg, list of all before)."""
        seen = []
        while True:
            m, b = self.recv()
            if pred(m):
                return m, b, seen
            seen.append((m, b))

    def run(self, code, exec_id="e", history=True, inputs=None, on_request=None):
        """Execute a cell; returns (outcome, stdout bytes, stderr bytes, all messages).
        `inputs`: texts to answer successive input requests with (None = EOF)."""
        self.send({"type": "execute", "exec": exec_id, "code": code, "history": history})
        inputs = list(inputs or [])
        out, err, msgs = bytearray(), bytearray(), []
        while True:
            m, b = self.recv()
            msgs.append((m, b))
            t = m["type"]
            if t == "output":
                if m["exec"] == exec_id:
                    (out if m["stream"] == "stdout" else err).extend(b)
            elif t == "input_request":
                if on_request is not None:
                    on_request(self, m)
                else:
                    text = inputs.pop(0) if inputs else None
                    self.send({"type": "input_reply", "exec": m["exec"], "req": m["req"], "text": text})
            elif t == "outcome" and m["exec"] == exec_id:
                return m, bytes(out), bytes(err), msgs

    def close(self):
        for fd in (self.data, self.control, self.events):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)
        self.proc.stdout.close()
        self.proc.stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
