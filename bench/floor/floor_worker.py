"""The raw floor: the least a persistent Python worker can do per cell over pipes.

Standard library only. Reads frames on stdin and answers on stdout using Capsule's frame format
(docs/protocol.md §2): ``[len u32 BE][enc u8 = 1][hlen u32 BE][JSON header][body]``.

Messages (header ``type``):

* ``execute {exec, code}``: ``exec(compile(code))`` in one persistent dict, reply
  ``outcome {exec, status: "ok"}`` (or ``status: "error"`` with ``ename``).
* ``flood {exec, size, count}``: write ``count`` output frames whose body is ``size`` bytes of
  ``b"x"``, then an outcome. The ceiling of Python -> pipe -> client throughput.
* ``shutdown``: exit.

No output capture, no threads, no signals, no history: this is what Capsule's warm path is
compared against, not a competitor.
"""

import os
import sys
from json import dumps, loads
from struct import Struct

HDR = Struct(">IBI")  # len, enc, hlen


def main():
    rd = sys.stdin.buffer
    wr = sys.stdout.buffer
    ns = {"__name__": "__main__", "__builtins__": __builtins__}

    def send(header, body=b""):
        h = dumps(header, separators=(",", ":")).encode()
        wr.write(HDR.pack(5 + len(h) + len(body), 1, len(h)) + h + body)

    while True:
        pre = rd.read(9)
        if len(pre) < 9:
            return
        n, enc, hlen = HDR.unpack(pre)
        rest = rd.read(n - 5)
        msg = loads(rest[:hlen])
        kind = msg.get("type")
        if kind == "execute":
            try:
                exec(compile(msg["code"], "<cell>", "exec"), ns)
                send({"type": "outcome", "exec": msg["exec"], "status": "ok"})
            except BaseException as e:  # noqa: BLE001 - report and continue, like a worker
                send({"type": "outcome", "exec": msg["exec"], "status": "error",
                      "ename": type(e).__name__})
        elif kind == "flood":
            body = b"x" * msg["size"]
            head = {"type": "output", "exec": msg["exec"], "stream": "stdout"}
            for _ in range(msg["count"]):
                send(head, body)
            send({"type": "outcome", "exec": msg["exec"], "status": "ok"})
        elif kind == "shutdown":
            return
        wr.flush()


if __name__ == "__main__":
    os.environ.pop("PYTHONSTARTUP", None)
    main()
