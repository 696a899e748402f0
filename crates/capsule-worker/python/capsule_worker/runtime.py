"""The worker runtime: framing, the reader and pump threads, cell execution, input, cancel.

Threads (see docs/worker.md):

* the **main thread** runs cells, checkpoints, restores and resets, one at a time, in the order
  the host sent them;
* the **reader thread** is the only reader of fd 5 (control) and fd 3 (data); it answers
  ping/cancel/interrupt/shutdown itself, routes ``input_reply`` to the waiting ``input()`` and
  queues everything else for the main thread;
* the **pump thread** is the only reader of the stdout/stderr capture pipes and turns what it
  reads into ``output`` frames; it also carries out drain requests (output before outcome).

Imports are deliberately low level (``_thread``, ``_signal``, ``_json``, ``_ast``) because the
friendly modules (threading, signal, json, ast) pull in ``re``/``enum``/``collections`` and cost
10-20 ms of start-up. Nothing here ever writes to fd 1/2: those are the user's streams; worker
diagnostics go to a private dup of the host's log pipe.
"""

import _thread
import _signal
import builtins
import io
import os
import sys
import time
from _collections import deque

try:
    import _json
except ImportError:  # pragma: no cover - CPython always has _json
    _json = None

# Compiler flags and code flags (stable since 3.8); using the numbers avoids importing ast/inspect.
PyCF_ONLY_AST = 0x400
PyCF_ALLOW_TOP_LEVEL_AWAIT = 0x2000
CO_COROUTINE = 0x80
F_SETPIPE_SZ = 1031  # Linux fcntl; best effort

PROTOCOL_VERSION = 1
FEATURES = ["tla", "input", "checkpoint", "reset"]
DEFAULT_MAX_FRAME = 16 * 1024 * 1024
DEFAULT_OUTPUT_CHUNK = 256 * 1024
# The text streams pass writes of this size straight to the pipe; smaller ones are buffered
# until a newline, "\r", flush() or the end of the cell.
STREAM_BUFFER = 64 * 1024

_WORKER_DIR = os.path.dirname(os.path.abspath(__file__))

# Engine keys of the namespace: never removed by reset/restore, never checkpointed.
ENGINE_KEYS = frozenset(
    ["_", "__", "___", "_i", "_ii", "_iii", "In", "Out", "_oh", "_ih", "_exit_code",
     "_exception", "__name__", "__builtins__", "__doc__", "__spec__", "__loader__",
     "__package__", "__annotations__", "__file__", "__cached__"]
)


def is_engine_key(k):
    """True for the engine's own names (history and module dunders), which survive reset."""
    if k in ENGINE_KEYS:
        return True
    if k.startswith("_i") and k[2:].isdigit():  # _iN
        return True
    if k.startswith("_") and k[1:].isdigit():  # _N
        return True
    return False


# --------------------------------------------------------------------------------------------
# JSON (via the C accelerator directly: `import json` costs ~15 ms because it imports `re`)
# --------------------------------------------------------------------------------------------

class _ScanCtx:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float
    memo = None


def _no_default(o):
    raise TypeError("Object of type %s is not JSON serializable" % type(o).__name__)


if _json is not None:
    _scanner = _json.make_scanner(_ScanCtx())

    def json_loads(s):
        """Decode one JSON document (the whole string)."""
        end = len(s)
        i = 0
        while i < end and s[i] in " \t\r\n":
            i += 1
        try:
            obj, pos = _scanner(s, i)
        except StopIteration:
            raise ValueError("invalid JSON")
        while pos < end and s[pos] in " \t\r\n":
            pos += 1
        if pos != end:
            raise ValueError("extra data after JSON document")
        return obj

    def json_dumps(obj, allow_nan=True):
        """Encode compactly, ASCII only (robust against lone surrogates)."""
        enc = _json.make_encoder({}, _no_default, _json.encode_basestring_ascii, None, ":", ",",
                                 False, False, allow_nan)
        return "".join(enc(obj, 0))
else:  # pragma: no cover
    import json as _pyjson

    def json_loads(s):
        return _pyjson.loads(s)

    def json_dumps(obj, allow_nan=True):
        return _pyjson.dumps(obj, separators=(",", ":"), allow_nan=allow_nan)


# --------------------------------------------------------------------------------------------
# Small synchronisation helpers on _thread locks (threading costs ~4 ms to import)
# --------------------------------------------------------------------------------------------

class Signal:
    """A one-shot event: ``wait()`` blocks until ``set()``. Built on a lock so that, on the main
    thread, a signal handler that raises (KeyboardInterrupt) interrupts the wait."""

    __slots__ = ("_lock", "value")

    def __init__(self):
        self._lock = _thread.allocate_lock()
        self._lock.acquire()
        self.value = None

    def set(self, value=None):
        self.value = value
        try:
            self._lock.release()
        except RuntimeError:  # already set
            pass

    def wait(self):
        self._lock.acquire()
        self._lock.release()
        return self.value


class WorkQueue:
    """Unbounded FIFO with one consumer (the main thread) and any number of producers. The
    host sends one request at a time and waits for its answer, so the queue stays tiny."""

    def __init__(self):
        self._items = deque()
        self._mutex = _thread.allocate_lock()
        self._ready = _thread.allocate_lock()
        self._ready.acquire()
        self._waiting = False

    def put(self, item):
        with self._mutex:
            self._items.append(item)
            if self._waiting:
                self._waiting = False
                self._ready.release()

    def get(self):
        while True:
            with self._mutex:
                if self._items:
                    return self._items.popleft()
                self._waiting = True
            self._ready.acquire()


# --------------------------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------------------------

class FramingError(Exception):
    """The byte stream cannot be split into frames any more (fatal for the channel)."""


def encode_frame(header_json, body=b""):
    """Frame bytes for a JSON header (str) and a binary body."""
    h = header_json.encode("utf-8")
    n = 5 + len(h) + len(body)
    return b"".join(((n).to_bytes(4, "big"), b"\x01", len(h).to_bytes(4, "big"), h, body))


class FrameReader:
    """Incremental frame splitter for one input channel (bytes in, (header, body) out)."""

    def __init__(self, fd, max_frame):
        self.fd = fd
        self.max_frame = max_frame
        self.buf = bytearray()

    def feed(self, data):
        self.buf += data

    def frames(self):
        """Yield every complete frame buffered so far as (header_bytes, body_bytes)."""
        buf = self.buf
        pos = 0
        try:
            while len(buf) - pos >= 4:
                n = int.from_bytes(buf[pos:pos + 4], "big")
                if n < 5:
                    raise FramingError("frame length %d < 5" % n)
                if 4 + n > self.max_frame:
                    raise FramingError("frame of %d bytes over the %d byte limit" % (4 + n, self.max_frame))
                if len(buf) - pos < 4 + n:
                    break
                enc = buf[pos + 4]
                if enc != 1:
                    raise FramingError("unknown header encoding %d" % enc)
                hlen = int.from_bytes(buf[pos + 5:pos + 9], "big")
                if hlen > n - 5:
                    raise FramingError("header length %d past the frame (%d)" % (hlen, n))
                header = bytes(buf[pos + 9:pos + 9 + hlen])
                body = bytes(buf[pos + 9 + hlen:pos + 4 + n])
                pos += 4 + n
                yield header, body
        finally:
            if pos:
                del buf[:pos]


# --------------------------------------------------------------------------------------------
# The worker
# --------------------------------------------------------------------------------------------

class Worker:
    def __init__(self, data_fd, event_fd, control_fd):
        self.data_fd = data_fd
        self.event_fd = event_fd
        self.control_fd = control_fd
        self.capture_fds = None  # (stdout read end, stderr read end, log fd) when host-made
        self.max_frame = DEFAULT_MAX_FRAME
        self.output_chunk = DEFAULT_OUTPUT_CHUNK
        self.write_lock = _thread.allocate_lock()
        self.main_ident = _thread.get_ident()
        self.queue = WorkQueue()

        # Cell state, shared with the reader thread under state_lock. `running` is the exec id
        # of the cell whose user code is running (None otherwise); `pending` means a SIGINT was
        # sent for it and not yet turned into KeyboardInterrupt; `cancelled` records a cancel.
        self.state_lock = _thread.allocate_lock()
        self.running = None
        self.pending = False
        self.cancelled = False
        self.out_exec = None  # exec id that output frames are attributed to (pump reads it)
        self.inputs = {}  # (exec, req) -> Signal, for input() calls waiting for a reply
        self.input_eof = False  # data channel closed: every input() gets EOF
        self.req_counter = 0

        self.exec_count = 0  # IPython execution counter (history cells only)
        self.cell_serial = 0  # counter for non-history cell file names
        self.loop = None  # the persistent asyncio loop, created on first use
        self.cell_sources = {}  # virtual file name -> source (also registered in linecache)
        self.cell_order = {}  # virtual file name -> registration order (checkpoint ordering)
        self.linecache = None

        self.drain_requests = []  # (Signal, end_exec) for the pump
        self.drain_lock = _thread.allocate_lock()

    # ---- diagnostics --------------------------------------------------------------------

    def log(self, msg):
        try:
            os.write(self.log_fd, ("capsule-worker[%d]: %s\n" % (os.getpid(), msg)).encode("utf-8", "backslashreplace"))
        except OSError:
            pass

    # ---- sending --------------------------------------------------------------------------

    def send_raw(self, frame):
        """Write one whole frame to the event pipe; frames from several threads never
        interleave. A host that stopped reading (EPIPE) means it is gone: exit."""
        mv = memoryview(frame)
        with self.write_lock:
            try:
                while mv:
                    n = os.write(self.event_fd, mv)
                    mv = mv[n:]
            except OSError:
                os._exit(0)

    def send(self, msg, body=b""):
        self.send_raw(encode_frame(json_dumps(msg), body))

    def fault(self, message, fatal):
        self.log("fault: %s" % message)
        self.send({"type": "fault", "message": message, "fatal": fatal})
        if fatal:
            os._exit(2)

    # ---- start-up -----------------------------------------------------------------------

    def setup(self):
        for fd in (self.data_fd, self.event_fd, self.control_fd):
            os.set_inheritable(fd, False)
        if self.capture_fds is not None:
            # The host created the capture pipes: fd 1 and fd 2 are their write ends already,
            # and we were handed the read ends plus a log descriptor. The host keeps its own
            # copies of the read ends (never reading them while we live), so whatever this
            # process wrote just before dying is still in the pipes for the host to collect.
            self.out_r, self.err_r, self.log_fd = self.capture_fds
            for fd in self.capture_fds:
                os.set_inheritable(fd, False)
            read_ends = (self.out_r, self.err_r)
        else:
            # Stand-alone launch (3 descriptors): keep the log pipe (fd 2) for diagnostics and
            # create the capture pipes here; their write ends become fd 1 and fd 2.
            self.log_fd = os.dup(2)
            self.out_r, out_w = os.pipe()
            self.err_r, err_w = os.pipe()
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.close(out_w)
            os.close(err_w)
            read_ends = (self.out_r, self.err_r)
        for fd in read_ends:
            try:
                import fcntl
                fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)
            except (ImportError, OSError):
                pass
            os.set_blocking(fd, False)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)

        # Text streams over the captured fds: C TextIOWrapper with line buffering flushes on
        # "\n" and "\r"; larger writes go straight through the BufferedWriter.
        def stream(fd):
            return io.TextIOWrapper(
                io.BufferedWriter(io.FileIO(fd, "w", closefd=False), STREAM_BUFFER),
                encoding="utf-8", errors="backslashreplace", newline="\n",
                line_buffering=True)

        self.stdout = stream(1)
        self.stderr = stream(2)
        sys.stdout = sys.__stdout__ = self.stdout
        sys.stderr = sys.__stderr__ = self.stderr
        sys.stdin = sys.__stdin__ = InputStream(self)
        sys.argv = [""]

        # The namespace is __main__'s own dict (so pickle finds cell classes by reference and
        # `import __main__` works); drop the bootstrap's names from it.
        main_mod = sys.modules["__main__"]
        self.ns = main_mod.__dict__
        for k in ("sys", "capsule_worker"):
            self.ns.pop(k, None)
        self.ns["__name__"] = "__main__"
        self.ns["__builtins__"] = builtins
        self.init_history()

        builtins.input = self.input
        sys.meta_path.insert(0, GetpassHook(self))
        _signal.signal(_signal.SIGINT, self.on_sigint)

    def init_history(self):
        ns = self.ns
        In = ns.get("In")
        if isinstance(In, list):
            del In[:]
            In.append("")
        else:
            ns["In"] = In = [""]
        Out = ns.get("Out")
        if isinstance(Out, dict):
            Out.clear()
        else:
            ns["Out"] = Out = {}
        ns["_ih"] = In
        ns["_oh"] = Out
        for k in ("_", "__", "___", "_i", "_ii", "_iii"):
            ns[k] = ""
        ns["_exception"] = None
        ns["_exit_code"] = None
        self.exec_count = 0

    def hello(self):
        self.send({
            "type": "hello", "min_version": PROTOCOL_VERSION, "max_version": PROTOCOL_VERSION,
            "encodings": ["json"], "features": FEATURES, "python": sys.version.split()[0],
            "implementation": sys.implementation.name, "executable": sys.executable or "",
            "pid": os.getpid(),
        })

    def apply_settings(self, msg):
        settings = msg.get("settings") or {}
        self.output_chunk = int(settings.get("output_chunk") or DEFAULT_OUTPUT_CHUNK)
        self.max_frame = int(settings.get("max_frame") or DEFAULT_MAX_FRAME)
        self.readers_max_frame(self.max_frame)
        if settings.get("enable_site", True):
            try:
                import site
                site.main()
            except Exception as e:  # a broken .pth must not kill the worker
                self.log("site.main() failed: %r" % (e,))
        extra = settings.get("sys_path") or []
        sys.path[0:0] = [str(p) for p in extra]

    def readers_max_frame(self, n):
        for r in self.frame_readers:
            r.max_frame = n

    # ---- reader thread ------------------------------------------------------------------

    def reader_loop(self):
        import select
        ctl = FrameReader(self.control_fd, self.max_frame)
        data = FrameReader(self.data_fd, self.max_frame)
        self.frame_readers = (ctl, data)
        fds = [self.control_fd, self.data_fd]
        try:
            while True:
                readable, _, _ = select.select(fds, [], [])
                # Control first: everything buffered on fd 5 is handled before any data.
                if self.control_fd in readable:
                    chunk = os.read(self.control_fd, 1 << 16)
                    if not chunk:
                        os._exit(0)  # host gone
                    ctl.feed(chunk)
                    for header, body in ctl.frames():
                        self.on_control(header)
                    continue  # re-check control before reading data
                if self.data_fd in readable:
                    chunk = os.read(self.data_fd, 1 << 20)
                    if not chunk:
                        fds.remove(self.data_fd)
                        self.on_data_eof()
                        continue
                    data.feed(chunk)
                    for header, body in data.frames():
                        self.on_data(header, body)
        except FramingError as e:
            self.fault("malformed frame from host: %s" % e, True)
        except BaseException as e:  # an internal bug: say so, then die (no half-alive worker)
            self.fault("reader thread failed: %r" % (e,), True)

    def decode(self, header):
        try:
            msg = json_loads(header.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            self.fault("undecodable header: %s" % e, False)
            return None
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            self.fault("header is not a message object", False)
            return None
        return msg

    def on_control(self, header):
        msg = self.decode(header)
        if msg is None:
            return
        t = msg["type"]
        if t == "ping":
            self.send({"type": "pong", "n": msg.get("n", 0)})
        elif t in ("cancel", "interrupt"):
            ex = msg.get("exec")
            with self.state_lock:
                running = ex is not None and ex == self.running
                if running:
                    if t == "cancel":
                        self.cancelled = True
                    if not self.pending:  # at most one outstanding KeyboardInterrupt
                        self.pending = True
                        _signal.pthread_kill(self.main_ident, _signal.SIGINT)
                    # Also wake an input() wait directly: a signal that lands just before the
                    # main thread blocks on the lock would not interrupt it (lost wake-up).
                    for key in [k for k in self.inputs if k[0] == ex]:
                        self.inputs.pop(key).set(("interrupt", None))
            self.send({"type": "cancel_ack", "exec": ex, "running": running})
        elif t == "shutdown":
            os._exit(0)
        else:
            self.fault("unknown control message %r" % (t,), False)

    def on_data(self, header, body):
        msg = self.decode(header)
        if msg is None:
            return
        t = msg["type"]
        if t == "input_reply":
            key = (msg.get("exec"), msg.get("req"))
            with self.state_lock:
                waiter = self.inputs.pop(key, None)
            if waiter is None:
                self.log("input_reply for no waiting input: %r" % (key,))
            else:
                waiter.set(("text", msg.get("text")))
        elif t in ("hello_ack", "execute", "checkpoint", "restore", "reset"):
            self.queue.put((msg, body))
        else:
            self.fault("unknown data message %r" % (t,), False)

    def on_data_eof(self):
        with self.state_lock:
            self.input_eof = True
            waiters = list(self.inputs.values())
            self.inputs.clear()
        for w in waiters:
            w.set(("eof", None))
        self.queue.put(None)

    # ---- pump thread --------------------------------------------------------------------

    def pump_loop(self):
        import select
        headers = {}
        names = {self.out_r: "stdout", self.err_r: "stderr"}
        fds = [self.out_r, self.err_r, self.wake_r]

        def forward(fd, until_empty):
            # Read what is available (at most output_chunk per frame) and send it.
            while True:
                try:
                    chunk = os.read(fd, self.output_chunk)
                except BlockingIOError:
                    return
                if not chunk:  # every write end closed (user closed fd 1/2)
                    fds.remove(fd)
                    return
                ex = self.out_exec
                key = (ex, fd)
                h = headers.get(key)
                if h is None:
                    h = headers[key] = json_dumps({"type": "output", "exec": ex, "stream": names[fd]})
                    if len(headers) > 64:
                        headers.clear()
                self.send_raw(encode_frame(h, chunk))
                if not until_empty and len(chunk) < self.output_chunk:
                    return

        try:
            while True:
                readable, _, _ = select.select(fds, [], [])
                for fd in (self.out_r, self.err_r):
                    if fd in readable and fd in fds:
                        forward(fd, False)
                if self.wake_r in readable:
                    try:
                        os.read(self.wake_r, 4096)
                    except BlockingIOError:
                        pass
                    with self.drain_lock:
                        reqs = self.drain_requests
                        self.drain_requests = []
                    if reqs:
                        # Everything written before the request is in the pipes now: read
                        # until EAGAIN, send, then acknowledge.
                        for fd in (self.out_r, self.err_r):
                            if fd in fds:
                                forward(fd, True)
                        for sig, end_exec in reqs:
                            if end_exec:
                                self.out_exec = None
                            sig.set()
        except BaseException as e:
            self.fault("pump thread failed: %r" % (e,), True)

    def flush_streams(self):
        seen = []
        for s in (sys.stdout, sys.stderr, self.stdout, self.stderr):
            if s is None or any(s is x for x in seen):
                continue
            seen.append(s)
            try:
                s.flush()
            except Exception:
                pass

    def drain(self, end_exec):
        """Flush the Python streams and wait until the pump has sent every byte written so far.
        With end_exec, output after the drain is attributed to no cell."""
        self.flush_streams()
        sig = Signal()
        with self.drain_lock:
            self.drain_requests.append((sig, end_exec))
        os.write(self.wake_w, b"x")
        sig.wait()

    # ---- signals / cancel ---------------------------------------------------------------

    def on_sigint(self, signum, frame):
        # Raise only for a cell targeted by cancel/interrupt; stray or late signals are ignored.
        if self.running is not None and self.pending:
            self.pending = False
            raise KeyboardInterrupt

    # ---- input ------------------------------------------------------------------------------

    def input(self, prompt="", password=False):
        """builtins.input replacement: ask the host for a line."""
        prompt = "" if prompt is None else str(prompt)
        ex = self.running
        if ex is None:
            raise EOFError("no input available outside a running cell")
        self.drain(False)
        with self.state_lock:
            if self.input_eof:
                raise EOFError("input closed")
            self.req_counter += 1
            req = "r%d" % self.req_counter
            sig = Signal()
            self.inputs[(ex, req)] = sig
        on_main = _thread.get_ident() == self.main_ident
        try:
            # Never tear the request frame with a KeyboardInterrupt: block SIGINT while writing;
            # a pending signal is delivered right after and interrupts the wait below.
            if on_main:
                _signal.pthread_sigmask(_signal.SIG_BLOCK, [_signal.SIGINT])
            try:
                self.send({"type": "input_request", "exec": ex, "req": req, "prompt": prompt,
                           "password": bool(password)})
            finally:
                if on_main:
                    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [_signal.SIGINT])
            kind, text = sig.wait()
        finally:
            with self.state_lock:
                self.inputs.pop((ex, req), None)
        if kind == "interrupt":
            # Woken by the reader for a cancel/interrupt: raise here and consume the pending
            # signal so it cannot raise a second time later in the cell.
            self.pending = False
            raise KeyboardInterrupt
        if kind == "eof" or text is None:
            raise EOFError("EOF when reading a line")
        return str(text)

    def getpass(self, prompt="Password: ", stream=None):
        return self.input(prompt, password=True)

    # ---- main loop --------------------------------------------------------------------------

    def main_loop(self):
        while True:
            item = self.queue.get()
            if item is None:  # data channel closed by the host
                os._exit(0)
            msg, body = item
            t = msg["type"]
            try:
                if t == "execute":
                    self.execute(msg)
                elif t == "hello_ack":
                    self.apply_settings(msg)
                elif t == "checkpoint":
                    from capsule_worker import checkpoint
                    checkpoint.take(self, msg)
                elif t == "restore":
                    from capsule_worker import checkpoint
                    checkpoint.restore(self, msg, body)
                elif t == "reset":
                    from capsule_worker import checkpoint
                    checkpoint.reset(self, msg)
            except KeyboardInterrupt:
                # A signal that slipped past the cell's own handling: never fatal.
                self.log("stray KeyboardInterrupt while handling %s" % t)
            except BaseException as e:
                self.fault("internal error handling %s: %r" % (t, e), False)

    # ---- cells ------------------------------------------------------------------------------

    def register_source(self, filename, source):
        self.cell_sources[filename] = source
        self.cell_order[filename] = len(self.cell_order) + 1
        lc = self.linecache
        if lc is None:
            import linecache as lc
            self.linecache = lc
        lines = source.splitlines(True)
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lc.cache[filename] = (len(source), None, lines, filename)

    def compile_cell(self, source, filename):
        """Compile once: (body code, trailing-expression code or None)."""
        import _ast
        flags = PyCF_ALLOW_TOP_LEVEL_AWAIT
        tree = compile(source, filename, "exec", flags | PyCF_ONLY_AST, dont_inherit=True)
        last = None
        if tree.body and isinstance(tree.body[-1], _ast.Expr):
            last = tree.body.pop()
        body = compile(tree, filename, "exec", flags, dont_inherit=True)
        if last is None:
            return body, None
        expr = _ast.Expression(last.value)
        return body, compile(expr, filename, "eval", flags, dont_inherit=True)

    async def cell_coroutine(self, body, last):
        r = eval(body, self.ns)
        if body.co_flags & CO_COROUTINE:
            await r
        if last is None:
            return None
        v = eval(last, self.ns)
        if last.co_flags & CO_COROUTINE:
            v = await v
        return v

    def get_loop(self):
        import asyncio
        if self.loop is None or self.loop.is_closed():
            self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        return self.loop

    def run_async(self, coro):
        loop = self.get_loop()
        task = loop.create_task(coro)
        try:
            return loop.run_until_complete(task)
        except KeyboardInterrupt:
            # Cancel the top-level task (its finally blocks run) and leave the loop usable.
            if not task.done():
                task.cancel()
                try:
                    loop.run_until_complete(task)
                except BaseException:
                    pass
            raise

    def execute(self, msg):
        ex = msg.get("exec")
        source = msg.get("code") or ""
        history = msg.get("history", True)
        ns = self.ns
        t0 = time.perf_counter()
        with self.state_lock:
            # Order matters for the signal handler (no lock there): clear stale state first.
            self.pending = False
            self.cancelled = False
            self.out_exec = ex
            self.running = ex
        value = None
        exc = None
        try:
            try:
                if history:
                    self.exec_count += 1
                    n = self.exec_count
                    filename = "<cell-%d>" % n
                    In = ns.get("In")
                    if isinstance(In, list):
                        In.append(source)
                    ns["_iii"] = ns.get("_ii", "")
                    ns["_ii"] = ns.get("_i", "")
                    ns["_i"] = ns.get("_i%d" % (n - 1), "") if n > 1 else ""
                    ns["_i%d" % n] = source
                else:
                    self.cell_serial += 1
                    filename = "<cell-x%d>" % self.cell_serial
                self.register_source(filename, source)
                body, last = self.compile_cell(source, filename)
                flags = body.co_flags | (last.co_flags if last is not None else 0)
                if flags & CO_COROUTINE:
                    # Any await in the cell: the whole cell runs as one task on the loop, so
                    # synchronous parts (asyncio.create_task) see the running loop too.
                    value = self.run_async(self.cell_coroutine(body, last))
                else:
                    eval(body, ns)
                    if last is not None:
                        value = eval(last, ns)
            except BaseException as e:
                exc = e
        except BaseException as e:  # a KeyboardInterrupt landing inside the handler above
            exc = e
        _signal.pthread_sigmask(_signal.SIG_BLOCK, [_signal.SIGINT])
        with self.state_lock:
            self.running = None
            cancelled = self.cancelled
            self.pending = False
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [_signal.SIGINT])

        if cancelled:
            result = {"status": "cancelled"}
        elif exc is not None:
            result = self.error_result(exc)
        else:
            result = self.value_result(value, history)
        if exc is not None:
            ns["_exception"] = exc
        del exc
        self.drain(True)
        duration = (time.perf_counter() - t0) * 1000.0
        head = json_dumps({"type": "outcome", "exec": ex, "duration_ms": duration})
        # value JSON was produced once in value_result; splice it in rather than re-encode.
        vjson = result.pop("_value_json", None)
        rest = json_dumps(result)
        text = head[:-1] + "," + rest[1:]
        if vjson is not None:
            text = text[:-1] + ',"value":' + vjson + "}"
        self.send_raw(encode_frame(text))

    def value_result(self, value, history):
        if value is None:
            return {"status": "ok", "value": None, "repr": ""}
        if history:
            ns = self.ns
            n = self.exec_count
            Out = ns.get("Out")
            if isinstance(Out, dict):
                Out[n] = value
            ns["_%d" % n] = value
            ns["___"] = ns.get("__", "")
            ns["__"] = ns.get("_", "")
            ns["_"] = value
        limit = max(1024, self.max_frame // 4)
        try:
            r = repr(value)
        except BaseException as e:
            r = "<repr failed: %s: %s>" % (type(e).__name__, e)
        if len(r) > limit:
            r = r[:limit] + "... [repr truncated: %d of %d characters shown]" % (limit, len(r))
        vjson = "null"
        try:
            s = json_dumps(value, allow_nan=False)
            if len(s) <= limit:
                vjson = s
        except (TypeError, ValueError, RecursionError, OverflowError):
            pass
        except Exception:
            pass
        return {"status": "ok", "repr": r, "_value_json": vjson}

    def error_result(self, exc):
        import traceback
        tb = exc.__traceback__
        # Drop the worker's own frames (and asyncio's, before the first cell frame).
        frames = []
        t = tb
        while t is not None:
            frames.append(t)
            t = t.tb_next
        first_cell = None
        for i, f in enumerate(frames):
            if f.tb_frame.f_code.co_filename.startswith("<cell-"):
                first_cell = i
                break
        kept = []
        for i, f in enumerate(frames):
            fn = f.tb_frame.f_code.co_filename
            if first_cell is not None and i < first_cell:
                continue
            if fn.startswith(_WORKER_DIR):
                continue
            kept.append(f)
        # Re-link a fresh chain: tb objects' tb_next is writable since 3.7.
        new_tb = None
        for f in reversed(kept):
            f.tb_next = new_tb
            new_tb = f
        exc.__traceback__ = new_tb
        try:
            text = "".join(traceback.format_exception(type(exc), exc, new_tb))
        except BaseException as e:
            text = "%s: %s\n(traceback formatting failed: %r)\n" % (type(exc).__name__, exc, e)
        try:
            evalue = str(exc)
        except BaseException:
            evalue = "<unprintable %s>" % type(exc).__name__
        sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, new_tb
        if sys.version_info >= (3, 12):
            sys.last_exc = exc
        limit = max(1024, self.max_frame // 4)
        if len(text) > limit:
            text = text[:limit // 2] + "\n... [traceback truncated] ...\n" + text[-limit // 2:]
        if len(evalue) > limit:
            evalue = evalue[:limit] + "... [truncated]"
        return {"status": "error", "ename": type(exc).__name__, "evalue": evalue,
                "traceback": text}

    def clear_user_names(self):
        ns = self.ns
        for k in list(ns):
            if not is_engine_key(k):
                del ns[k]


class InputStream(io.TextIOBase):
    """sys.stdin for cells: each line is requested from the host like input()."""

    def __init__(self, worker):
        self._w = worker
        self._buf = ""

    encoding = "utf-8"
    errors = "strict"

    def readable(self):
        return True

    def isatty(self):
        return False

    def fileno(self):
        return 0

    def _more(self):
        try:
            self._buf += self._w.input("") + "\n"
            return True
        except EOFError:  # end of input for this read; a later read may ask again
            return False

    def readline(self, size=-1):
        if size is None:
            size = -1
        while "\n" not in self._buf and (size < 0 or len(self._buf) < size):
            if not self._more():
                break
        if size >= 0:
            cut = self._buf.find("\n", 0, size)
            n = cut + 1 if cut >= 0 else min(size, len(self._buf))
        else:
            cut = self._buf.find("\n")
            n = cut + 1 if cut >= 0 else len(self._buf)
        line, self._buf = self._buf[:n], self._buf[n:]
        return line

    def read(self, size=-1):
        if size is None:
            size = -1
        while size < 0 or len(self._buf) < size:
            if not self._more():
                break
        if size < 0:
            out, self._buf = self._buf, ""
        else:
            out, self._buf = self._buf[:size], self._buf[size:]
        return out


class GetpassHook:
    """A meta-path finder that patches `getpass.getpass` the moment the user imports getpass
    (importing it eagerly would cost ~20 ms of start-up). It removes itself once done."""

    def __init__(self, worker):
        self.worker = worker

    def find_spec(self, name, path=None, target=None):
        if name != "getpass":
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _PatchingLoader(spec.loader, self.worker)
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
        return spec


class _PatchingLoader:
    def __init__(self, loader, worker):
        self._loader = loader
        self._worker = worker

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        module.getpass = self._worker.getpass

    def __getattr__(self, name):
        return getattr(self._loader, name)


def run():
    args = sys.argv[1:]
    try:
        data_fd, event_fd, control_fd = (int(a) for a in args[:3])
    except ValueError:
        data_fd, event_fd, control_fd = 3, 4, 5
    w = Worker(data_fd, event_fd, control_fd)
    # Optional: stdout-capture read end, stderr-capture read end, log descriptor (host-made).
    try:
        w.capture_fds = tuple(int(a) for a in args[3:6]) if len(args) >= 6 else None
    except ValueError:
        w.capture_fds = None
    w.frame_readers = ()
    w.setup()
    # If getpass is already loaded (it never is under -I -S), patch it directly.
    gp = sys.modules.get("getpass")
    if gp is not None:
        gp.getpass = w.getpass
    _thread.start_new_thread(w.pump_loop, ())
    _thread.start_new_thread(w.reader_loop, ())
    w.hello()
    w.main_loop()
