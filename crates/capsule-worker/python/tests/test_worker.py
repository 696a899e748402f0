"""End-to-end tests of the worker runtime: a real worker subprocess on real pipes, driven by the
tiny host in host.py. Synchronisation is always by waiting for a frame or for process exit."""

import json
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host import PKG_DIR, TIMEOUT, Host, encode  # noqa: E402

sys.path.insert(0, PKG_DIR)
from capsule_worker import runtime  # noqa: E402

GOLDEN = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                                       "capsule-protocol", "tests", "golden"))


class GoldenFrames(unittest.TestCase):
    def test_golden_frames_decode_and_encode_byte_for_byte(self):
        with open(os.path.join(GOLDEN, "index.json")) as f:
            cases = json.load(f)
        self.assertGreater(len(cases), 10)
        for case in cases:
            with open(os.path.join(GOLDEN, case["name"] + ".frame"), "rb") as f:
                raw = f.read()
            r = runtime.FrameReader(0, runtime.DEFAULT_MAX_FRAME)
            r.feed(raw)
            frames = list(r.frames())
            self.assertEqual(len(frames), 1, case["name"])
            header, body = frames[0]
            self.assertEqual(runtime.json_loads(header.decode()), case["message"], case["name"])
            self.assertEqual(body.hex(), case["body_hex"], case["name"])
            again = runtime.encode_frame(runtime.json_dumps(case["message"]), bytes.fromhex(case["body_hex"]))
            self.assertEqual(again, raw, case["name"])

    def test_frame_reader_rejects_broken_framing(self):
        for bad in (b"\x00\x00\x00\x02\x01\x00", b"\x00\x00\x00\x09\x07\x00\x00\x00\x00abcd",
                    b"\x00\x00\x00\x06\x01\x00\x00\x00\x09x"):
            r = runtime.FrameReader(0, 1024)
            r.feed(bad)
            with self.assertRaises(runtime.FramingError):
                list(r.frames())
        r = runtime.FrameReader(0, 16)
        r.feed(b"\x00\x00\x01\x00")
        with self.assertRaises(runtime.FramingError):
            list(r.frames())

    def test_partial_frames_wait_for_more_bytes(self):
        raw = encode({"type": "ping", "n": 1}) * 2
        r = runtime.FrameReader(0, 1024)
        r.feed(raw[:7])
        self.assertEqual(list(r.frames()), [])
        r.feed(raw[7:])
        self.assertEqual(len(list(r.frames())), 2)


class WorkerTest(unittest.TestCase):
    def setUp(self):
        self.h = Host()

    def tearDown(self):
        self.h.close()

    def ok(self, code, **kw):
        o, out, err, _ = self.h.run(code, **kw)
        self.assertEqual(o["status"], "ok", o)
        return o, out, err


class Handshake(WorkerTest):
    def test_hello(self):
        hello = self.h.hello
        self.assertEqual(hello["type"], "hello")
        self.assertEqual((hello["min_version"], hello["max_version"]), (1, 1))
        self.assertEqual(hello["encodings"], ["json"])
        self.assertEqual(hello["features"], ["tla", "input", "checkpoint", "reset"])
        self.assertEqual(hello["implementation"], "cpython")
        self.assertEqual(hello["pid"], self.h.proc.pid)
        self.assertTrue(hello["python"].startswith("%d.%d" % sys.version_info[:2]))

    def test_ping_pong_and_argv(self):
        self.h.control_send({"type": "ping", "n": 42})
        self.assertEqual(self.h.recv()[0], {"type": "pong", "n": 42})
        o, _, _ = self.ok("import sys\nsys.argv")
        self.assertEqual(o["value"], [""])

    def test_ping_answered_while_a_cell_runs(self):
        self.h.send({"type": "execute", "exec": "e", "code": "import time\nprint('go', flush=True)\ntime.sleep(0.3)"})
        self.h.recv_until(lambda m: m["type"] == "output")
        self.h.control_send({"type": "ping", "n": 5})
        m, _, _ = self.h.recv_until(lambda m: m["type"] in ("pong", "outcome"))
        self.assertEqual(m["type"], "pong")
        self.h.recv_until(lambda m: m["type"] == "outcome")

    def test_protocol_fds_are_close_on_exec_and_stdio_captured(self):
        o, _, _ = self.ok("import os\n[os.get_inheritable(fd) for fd in (3, 4, 5)] + [os.isatty(1)]")
        self.assertEqual(o["value"], [False, False, False, False])

    def test_sys_path_setting_is_prepended(self):
        h = Host(settings={"sys_path": ["/nonexistent/capsule-test"]})
        try:
            o, _, _, _ = h.run("import sys\nsys.path[0]")
            self.assertEqual(o["value"], "/nonexistent/capsule-test")
        finally:
            h.close()


class Values(WorkerTest):
    def test_values_and_reprs(self):
        cases = [
            ("6 * 7", 42, "42"),
            ("{'a': [1, 2.5, None, True]}", {"a": [1, 2.5, None, True]}, "{'a': [1, 2.5, None, True]}"),
            ("float('nan')", None, "nan"),
            ("float('inf')", None, "inf"),
            ("'h\u00e9'", "h\u00e9", "'h\u00e9'"),
            ("None", None, ""),
            ("x = 1", None, ""),
        ]
        for code, value, r in cases:
            o, _, _ = self.ok(code)
            self.assertEqual(o["value"], value, code)
            self.assertEqual(o["repr"], r, code)
        o, _, _ = self.ok("object()")
        self.assertIsNone(o["value"])
        self.assertTrue(o["repr"].startswith("<object object"))
        self.assertIsInstance(o["duration_ms"], float)

    def test_trailing_expression_evaluated_once(self):
        o, out, _ = self.ok("print('x')")
        self.assertEqual(out, b"x\n")
        self.assertEqual(o["repr"], "")
        self.ok("it = iter(range(10))")
        self.assertEqual(self.ok("next(it)")[0]["value"], 0)
        self.assertEqual(self.ok("y = 5\nnext(it)")[0]["value"], 1)

    def test_history_variables(self):
        self.ok("10")
        self.ok("_ * 2")
        self.ok("z = 3")  # no value: _ unchanged
        o, _, _ = self.ok("(_, __, _1, _2, Out[1], In[1], _i1, _i, _ii, _ih is In, _oh is Out, len(In))")
        self.assertEqual(o["value"], [20, 10, 10, 20, 10, "10", "10", "z = 3", "_ * 2", True, True, 5])
        o, _, _ = self.ok("___")
        self.assertEqual(o["value"], 10)  # after the tuple cell: _ = tuple, __ = 20, ___ = 10

    def test_history_false_does_not_count(self):
        self.ok("1", history=True)
        self.ok("99", history=False)
        o, _, _ = self.ok("(_, len(In))")
        self.assertEqual(o["value"], [1, 3])

    def test_merge_only_namespace(self):
        self.ok("g = globals()\nimport __main__\nassert g is __main__.__dict__")
        self.h.send({"type": "reset", "req": "q"})
        m, _ = self.h.recv()
        self.assertEqual(m, {"type": "restore_done", "req": "q", "restored": [], "error": None})
        o, _, _ = self.ok("'g' in globals()")
        self.assertFalse(o["value"])
        o, _, _ = self.ok("(__name__, type(__builtins__).__name__, 'In' in globals(), 'sys' in globals())")
        self.assertEqual(o["value"], ["__main__", "module", True, False])

    def test_errors_traceback_without_worker_frames(self):
        self.ok("def f(a):\n    return 1 / a")
        o, out, _, _ = self.h.run("print('before')\nf(0)")
        self.assertEqual(out, b"before\n")
        self.assertEqual(o["status"], "error")
        self.assertEqual(o["ename"], "ZeroDivisionError")
        self.assertEqual(o["evalue"], "division by zero")
        tb = o["traceback"]
        self.assertTrue(tb.startswith("Traceback (most recent call last):\n  File \"<cell-2>\", line 2"), tb)
        self.assertIn("<cell-1>", tb)
        self.assertIn("return 1 / a", tb)
        self.assertNotIn("capsule_worker", tb)
        o, _, _ = self.ok("type(_exception).__name__")
        self.assertEqual(o["value"], "ZeroDivisionError")
        o, _, _ = self.ok("import inspect\ninspect.getsource(f)")
        self.assertEqual(o["value"], "def f(a):\n    return 1 / a\n")

    def test_syntax_error_points_at_cell_line(self):
        o, _, _, _ = self.h.run("x = 1\ny = (\n")
        self.assertEqual(o["ename"], "SyntaxError")
        self.assertIn("<cell-1>", o["traceback"])
        self.assertNotIn("capsule_worker", o["traceback"])

    def test_system_exit_keeps_worker(self):
        o, _, _, _ = self.h.run("import sys\nsys.exit(3)")
        self.assertEqual((o["status"], o["ename"], o["evalue"]), ("error", "SystemExit", "3"))
        self.assertEqual(self.ok("1")[0]["value"], 1)


class Output(WorkerTest):
    def test_stdout_stderr_and_fd_level(self):
        _, out, err = self.ok("import sys, os\nprint('a')\nprint('b', file=sys.stderr)\nos.write(1, b'raw1\\n')\nos.write(2, b'raw2')")
        self.assertEqual(out, b"a\nraw1\n")
        self.assertEqual(err, b"b\nraw2")

    def test_subprocess_output_arrives_before_outcome(self):
        _, out, err = self.ok("import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'import sys; print(\"child\"); sys.stderr.write(\"cerr\")'])\nNone")
        self.assertEqual(out, b"child\n")
        self.assertEqual(err, b"cerr")

    def test_partial_line_flushed_at_cell_end_and_cr_kept(self):
        _, out, _ = self.ok("import sys\nprint('a\\rb')\nsys.stdout.write('no newline')")
        self.assertEqual(out, b"a\rb\nno newline")

    def test_unicode(self):
        s = "h\u00e9llo \u2713 \U0001F600 \u4e2d"
        _, out, _ = self.ok("print(%r)\nprint('\\ud800')" % s)
        self.assertEqual(out.decode("utf-8"), s + "\n\\ud800\n")

    def test_100k_lines_in_order(self):
        _, out, _ = self.ok("for i in range(100000):\n    print(i)")
        self.assertEqual(out, "".join("%d\n" % i for i in range(100000)).encode())

    def test_large_write_chunked(self):
        o, out, _, msgs = self.h.run("import sys\nsys.stdout.write('x' * (1 << 20))\nNone")
        self.assertEqual(out, b"x" * (1 << 20))
        for m, b in msgs:
            if m["type"] == "output":
                self.assertLessEqual(len(b), 262144)

    def test_streams_look_like_files(self):
        o, _, _ = self.ok("import sys\n(sys.stdout.isatty(), sys.stdout.fileno(), sys.stderr.fileno(), sys.stdout.encoding, hasattr(sys.stdout, 'buffer'), sys.stdin.isatty())")
        self.assertEqual(o["value"], [False, 1, 2, "utf-8", True, False])
        _, out, _ = self.ok("sys.stdout.buffer.write(b'bin\\n')\nNone")
        self.assertEqual(out, b"bin\n")

    def test_output_between_cells_has_null_exec(self):
        self.ok("import threading\nev = threading.Event()\ndef bg():\n    ev.wait()\n    print('late')\nthreading.Thread(target=bg).start()")
        self.h.send({"type": "execute", "exec": "e2", "code": "ev.set()"})
        seen = []
        while len(seen) < 2:
            m, b = self.h.recv()
            if m["type"] in ("outcome", "output"):
                seen.append((m, b))
        # "late" is printed by a thread after ev.set(): it belongs to e2 or to no cell.
        outs = [(m["exec"], b) for m, b in seen if m["type"] == "output"]
        if not outs:
            m, b = self.h.recv()
            outs = [(m["exec"], b)]
        self.assertIn(outs[0][0], ("e2", None))
        self.assertEqual(outs[0][1], b"late\n")


class Input(WorkerTest):
    def test_input_in_several_cells_and_eof(self):
        o, _, _, msgs = self.h.run("a = input('First: ')\nb = input()\n(a, b)", inputs=["x", "y"])
        self.assertEqual(o["value"], ["x", "y"])
        reqs = [m for m, _ in msgs if m["type"] == "input_request"]
        self.assertEqual(reqs[0]["prompt"], "First: ")
        self.assertFalse(reqs[0]["password"])
        self.assertNotEqual(reqs[0]["req"], reqs[1]["req"])
        o, _, _ = self.ok("input('again')", inputs=["z"])
        self.assertEqual(o["value"], "z")
        o, _, _, _ = self.h.run("input()", inputs=[None])
        self.assertEqual(o["ename"], "EOFError")

    def test_output_before_input_request(self):
        o, _, _, msgs = self.h.run("print('hello')\ninput('?')", inputs=["ok"])
        kinds = [m["type"] for m, _ in msgs]
        self.assertLess(kinds.index("output"), kinds.index("input_request"))

    def test_getpass(self):
        o, _, _, msgs = self.h.run("import getpass\ngetpass.getpass('pw: ')", inputs=["secret"])
        self.assertEqual(o["value"], "secret")
        req = [m for m, _ in msgs if m["type"] == "input_request"][0]
        self.assertTrue(req["password"])
        self.assertEqual(req["prompt"], "pw: ")
        o, _, _ = self.ok("from getpass import getpass\ngetpass()", inputs=["s2"])
        self.assertEqual(o["value"], "s2")

    def test_stdin_reads_through_requests(self):
        o, _, _ = self.ok("import sys\nl = sys.stdin.readline()\nrest = [x for x in sys.stdin]\n(l, rest)", inputs=["abc", "d", "e", None])
        self.assertEqual(o["value"], ["abc\n", ["d\n", "e\n"]])


class Async(WorkerTest):
    def test_top_level_await_and_task_survives(self):
        o, _, _ = self.ok("import sys\n'asyncio' in sys.modules")
        self.assertFalse(o["value"])  # plain cells never import asyncio
        self.ok("import asyncio\nL = []\nasync def bg():\n    while True:\n        L.append(1)\n        await asyncio.sleep(0.001)\nt = asyncio.create_task(bg())\nawait asyncio.sleep(0)")
        o, _, _ = self.ok("n = len(L)\nawait asyncio.sleep(0.05)\nlen(L) > n")
        self.assertTrue(o["value"])
        o, _, _ = self.ok("async def f():\n    return 7\nawait f()")
        self.assertEqual(o["value"], 7)

    def test_async_error_traceback(self):
        o, _, _, _ = self.h.run("import asyncio\nasync def boom():\n    raise ValueError('x')\nawait boom()")
        self.assertEqual(o["ename"], "ValueError")
        self.assertTrue(o["traceback"].startswith("Traceback (most recent call last):\n  File \"<cell-1>\""), o["traceback"])
        self.assertNotIn("asyncio", o["traceback"])


class Cancel(WorkerTest):
    def start(self, code, exec_id="c"):
        self.h.send({"type": "execute", "exec": exec_id, "code": code})
        self.h.recv_until(lambda m: m["type"] == "output" and m["exec"] == exec_id)

    def cancel(self, exec_id="c", kind="cancel"):
        self.h.control_send({"type": kind, "exec": exec_id})
        ack, _, before = self.h.recv_until(lambda m: m["type"] == "cancel_ack")
        self.assertEqual(ack, {"type": "cancel_ack", "exec": exec_id, "running": True})
        m, _, more = self.h.recv_until(lambda m: m["type"] == "outcome")
        return m, before + more

    def test_cancel_busy_loop(self):
        self.start("print('go', flush=True)\nwhile True:\n    pass")
        m, _ = self.cancel()
        self.assertEqual(m["status"], "cancelled")
        self.assertEqual(self.ok("1")[0]["value"], 1)

    def test_cancel_sleep(self):
        self.start("import time\nprint('go', flush=True)\ntime.sleep(100)")
        self.assertEqual(self.cancel()[0]["status"], "cancelled")

    def test_cancel_input(self):
        self.h.send({"type": "execute", "exec": "c", "code": "input('?')"})
        self.h.recv_until(lambda m: m["type"] == "input_request")
        self.assertEqual(self.cancel()[0]["status"], "cancelled")
        o, _, _ = self.ok("input()", inputs=["fine"])
        self.assertEqual(o["value"], "fine")

    def test_cancel_runs_finally(self):
        self.start("import time\ntry:\n    print('go', flush=True)\n    time.sleep(100)\nfinally:\n    print('finally ran')")
        m, msgs = self.cancel()
        self.assertEqual(m["status"], "cancelled")
        self.assertIn(b"finally ran\n", b"".join(b for x, b in msgs if x["type"] == "output"))

    def test_cancel_async_cell_keeps_loop_usable(self):
        self.start("import asyncio\ntry:\n    print('go', flush=True)\n    await asyncio.sleep(100)\nfinally:\n    print('fin')")
        m, msgs = self.cancel()
        self.assertEqual(m["status"], "cancelled")
        self.assertIn(b"fin\n", b"".join(b for x, b in msgs if x["type"] == "output"))
        o, _, _ = self.ok("await asyncio.sleep(0.01)\n3")
        self.assertEqual(o["value"], 3)

    def test_late_cancel_does_not_hit_next_cell(self):
        self.ok("1", exec_id="a")
        self.h.control_send({"type": "cancel", "exec": "a"})
        ack, _, _ = self.h.recv_until(lambda m: m["type"] == "cancel_ack")
        self.assertFalse(ack["running"])
        o, _, _ = self.ok("import time\ntime.sleep(0.1)\n2", exec_id="b")
        self.assertEqual(o["value"], 2)
        # A stray SIGINT between/within cells that nobody targeted is ignored too.
        o, _, _ = self.ok("import os, signal\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(0.05)\n'alive'")
        self.assertEqual(o["value"], "alive")

    def test_interrupt_caught_by_user_code(self):
        self.start("import time\ntry:\n    print('go', flush=True)\n    time.sleep(100)\nexcept KeyboardInterrupt:\n    r = 'caught'\nr")
        m, _ = self.cancel(kind="interrupt")
        self.assertEqual((m["status"], m["value"]), ("ok", "caught"))

    def test_interrupt_uncaught_is_error(self):
        self.start("import time\nprint('go', flush=True)\ntime.sleep(100)")
        m, _ = self.cancel(kind="interrupt")
        self.assertEqual((m["status"], m["ename"]), ("error", "KeyboardInterrupt"))


class Checkpoint(WorkerTest):
    SETUP = ("import os as o\nimport json\nimport threading\nx = [1, 2]\ndef f(a):\n    return a * 2\n"
             "class P:\n    def __init__(self, v):\n        self.v = v\n    def get(self):\n        return self.v\n"
             "p = P(5)\nsq = lambda n: n * n\nlock = threading.Lock()")

    def checkpoint(self):
        self.h.send({"type": "checkpoint", "req": "k"})
        m, blob = self.h.recv()
        self.assertEqual(m["type"], "checkpoint_done", m)
        return m, blob

    def restore(self, blob, clear=True):
        self.h.send({"type": "restore", "req": "r", "clear": clear}, blob)
        m, _ = self.h.recv()
        self.assertEqual(m["type"], "restore_done")
        return m

    def test_checkpoint_modify_restore(self):
        self.ok(self.SETUP)
        m, blob = self.checkpoint()
        self.assertTrue(blob.startswith(b"CAPSULE-CKPT\x00\x00\x01"))
        self.assertEqual(sorted(m["names"]), sorted(["o", "json", "threading", "x", "f", "P", "p", "sq"]))
        self.assertEqual([s["name"] for s in m["skipped"]], ["lock"])
        self.assertIn("lock", m["skipped"][0]["reason"])
        self.ok("x = 0\ndel f, P, p, o, sq")
        r = self.restore(blob)
        self.assertIsNone(r["error"], r)
        o, _, _ = self.ok("(x, f(3), p.get(), isinstance(p, P), o.sep, sq(4), 'lock' in globals())")
        self.assertEqual(o["value"], [[1, 2], 6, 5, True, "/", 16, False])
        o, _, _ = self.ok("import inspect\ninspect.getsource(f)")
        self.assertEqual(o["value"], "def f(a):\n    return a * 2\n")
        # A second checkpoint of restored state works too.
        m2, _ = self.checkpoint()
        self.assertIn("f", m2["names"])

    def test_restore_without_clear_keeps_other_names(self):
        self.ok("a = 1")
        _, blob = self.checkpoint()
        self.ok("b = 2\na = 5")
        self.restore(blob, clear=False)
        self.assertEqual(self.ok("(a, b)")[0]["value"], [1, 2])

    def test_bad_blobs_rejected(self):
        self.ok("a = 1")
        _, blob = self.checkpoint()
        bad = blob[:-1] + bytes([blob[-1] ^ 1])
        r = self.restore(bad)
        self.assertIn("checksum", r["error"])
        self.assertEqual(r["restored"], [])
        self.assertIn("magic", self.restore(b"NOT-A-CKPT" + blob[10:])["error"])
        self.assertIn("version", self.restore(blob[:13] + b"\x00\x09" + blob[15:])["error"])
        self.assertEqual(self.ok("a")[0]["value"], 1)

    def test_reset(self):
        self.ok("y = 1\nimport asyncio")
        self.h.send({"type": "reset", "req": "z"})
        self.assertEqual(self.h.recv()[0]["type"], "restore_done")
        o, _, _ = self.ok("('y' in globals(), In, _i1)")
        self.assertEqual(o["value"], [False, ["", "('y' in globals(), In, _i1)"], "('y' in globals(), In, _i1)"])


class Faults(unittest.TestCase):
    def test_host_eof_makes_worker_exit(self):
        h = Host()
        try:
            os.close(h.control)
            h.control = -1
            self.assertEqual(h.proc.wait(TIMEOUT), 0)
        finally:
            h.close()

    def test_undecodable_header_is_a_nonfatal_fault(self):
        with Host() as h:
            h.write(h.data, b"\x00\x00\x00\x0c\x01\x00\x00\x00\x07notjson")
            m, _ = h.recv()
            self.assertEqual(m["type"], "fault")
            self.assertFalse(m["fatal"])
            o, _, _, _ = h.run("1")
            self.assertEqual(o["value"], 1)

    def test_broken_framing_is_fatal(self):
        with Host() as h:
            h.write(h.data, b"\x00\x00\x00\x09\x07\x00\x00\x00\x00abcd")
            m, _ = h.recv()
            self.assertEqual(m["type"], "fault")
            self.assertTrue(m["fatal"])
            self.assertNotEqual(h.proc.wait(TIMEOUT), 0)

    def test_shutdown_exits_zero(self):
        with Host() as h:
            h.control_send({"type": "shutdown"})
            self.assertEqual(h.proc.wait(TIMEOUT), 0)


if __name__ == "__main__":
    unittest.main()


def _plan(**kw):
    """A sandbox fork plan as `capsule_sandbox::ForkPlan` serialises it (Linux constants)."""
    plan = {
        "version": 1,
        "steps": [["rlimits", 2], ["drop_uid", 3], ["unshare", 4], ["id_maps", 5],
                  ["shm_tmpfs", 6], ["nproc", 7], ["no_new_privs", 8], ["landlock", 9],
                  ["seccomp", 10]],
        "required": 0, "report": None, "rlimits": [], "clear_groups": False, "drop_to": None,
        "unshare": 0, "id_maps": None, "shm": None, "nproc": None, "no_new_privs": False,
        "landlock": None, "seccomp": [],
        "sys": {"landlock_add_rule": 445, "landlock_restrict_self": 446, "seccomp": 317},
        "consts": {"clone_newuser": 0x10000000, "clone_newns": 0x20000,
                   "rlim_infinity": 2 ** 64 - 1, "pr_set_dumpable": 4,
                   "pr_set_no_new_privs": 38, "seccomp_set_mode_filter": 1,
                   "o_path": 0o10000000, "o_directory": 0o200000, "o_cloexec": 0o2000000},
    }
    plan.update(kw)
    return plan


class Confine(unittest.TestCase):
    """`confine.apply` (the sandbox plan of a forked worker), run in forked children."""

    def in_child(self, plan, check):
        """Fork; the child applies `plan` with a report pipe as descriptor 0 and exits with
        `check()`'s truth (or 71 on a fatal step). Returns (exit code, report records)."""
        from capsule_worker import confine

        def body(w):
            try:
                confine.apply(plan, [w])
            except confine.Fatal:
                return 71
            return 0 if check() else 1
        return self.run_child(body)

    def run_child(self, body):
        """Fork; the child runs `body(report_write_fd)` and exits with its return value.
        Returns (exit code, the 8-byte report records the child wrote)."""
        import struct
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(r)
                code = body(w)
            finally:
                os._exit(code)
        os.close(w)
        data = b""
        while True:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            data += chunk
        os.close(r)
        _, status = os.waitpid(pid, 0)
        records = [struct.unpack("=BBxxi", data[i:i + 8]) for i in range(0, len(data), 8)]
        return os.waitstatus_to_exitcode(status), records

    def test_unknown_plan_version_is_refused(self):
        from capsule_worker import confine
        with self.assertRaises(ValueError):
            confine.apply(_plan(version=99), [])

    def test_rlimits_and_no_new_privs_are_applied(self):
        import resource

        def check():
            with open("/proc/self/status") as f:
                nnp = [line.split()[1] for line in f if line.startswith("NoNewPrivs")]
            return resource.getrlimit(resource.RLIMIT_CORE) == (0, 0) and nnp == ["1"]
        plan = _plan(report=0, rlimits=[[resource.RLIMIT_CORE, 0, 0]], no_new_privs=True,
                     required=(1 << 2) | (1 << 8))
        code, records = self.in_child(plan, check)
        self.assertEqual((code, records), (0, []))

    def test_a_failed_required_step_is_reported_and_fatal(self):
        import errno
        # unshare(2) with a flag it does not know fails with EINVAL, privileged or not.
        plan = _plan(report=0, unshare=0x1, required=1 << 4)
        code, records = self.in_child(plan, lambda: True)
        self.assertEqual(code, 71)
        self.assertEqual(records, [(4, 1, errno.EINVAL)])

    def test_a_failed_best_effort_step_is_reported_and_not_fatal(self):
        import errno
        plan = _plan(report=0, unshare=0x1)
        code, records = self.in_child(plan, lambda: True)
        self.assertEqual(code, 0)
        self.assertEqual(records, [(4, 0, errno.EINVAL)])

    def test_a_plan_applied_ahead_reports_at_the_request(self):
        import errno
        import resource
        from capsule_worker import confine
        # What a spare does: the policy part ahead (no report pipe yet), the rest at the request.
        plan = _plan(report=0, rlimits=[[resource.RLIMIT_CORE, 0, 0]], no_new_privs=True,
                     unshare=0x1)

        def check():
            with open("/proc/self/status") as f:
                nnp = [line.split()[1] for line in f if line.startswith("NoNewPrivs")]
            return nnp == ["1"]

        def body(w):
            ahead = dict(plan)
            del ahead["report"]
            applied = confine.preapply(ahead)
            try:
                confine.finish(applied, dict(plan, no_new_privs=False), [w])
                return 3  # a different plan must be refused
            except confine.Mismatch:
                confine.finish(applied, plan, [w])
                return 0 if check() else 1

        code, records = self.run_child(body)
        self.assertEqual(code, 0)
        # The best-effort failure met ahead of time reaches the request's report pipe.
        self.assertEqual(records, [(4, 0, errno.EINVAL)])
