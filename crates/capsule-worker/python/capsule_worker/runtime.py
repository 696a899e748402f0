"""The worker runtime: framing, the control and pump threads, cell execution, input, cancel.

Threads (see docs/worker.md):

* the **main thread** runs cells, checkpoints, restores and resets, one at a time, in the order
  the host sent them; between cells it reads the data pipe (fd 3) itself, so an ``execute``
  wakes exactly the thread that runs it;
* the **control thread** is the only reader of fd 5 (control) and answers
  ping/cancel/interrupt/shutdown itself, never waiting for a cell;
* the **pump thread** is the only reader of the stdout/stderr capture pipes and turns what it
  reads into ``output`` frames; it also carries out drain requests (output before outcome).

The data pipe has one reader at a time (leader/follower): whichever thread is waiting for
something from it (the idle main loop for its next request, an ``input()`` for its reply) reads
it and routes every frame to its addressee; others wait on a lock until the reader steps down.

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

# An unhandled cancel SIGINT is re-sent after 2 ms, then 4, 8, ... up to 64 ms (see
# Worker.resend_sigint): only while a signal is outstanding, never otherwise.
SIGINT_RESEND_FIRST = 0.002
SIGINT_RESEND_MAX = 0.064

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

    # Worker-built messages (never circular) share one encoder: with markers=None the C
    # encoder keeps no state between calls. User values (allow_nan=False) get a fresh one per
    # call with circular-reference checking, as json.dumps does.
    _plain_encoder = _json.make_encoder(None, _no_default, _json.encode_basestring_ascii, None,
                                        ":", ",", False, False, True)

    def json_dumps(obj, allow_nan=True):
        """Encode compactly, ASCII only (robust against lone surrogates)."""
        if allow_nan:
            return "".join(_plain_encoder(obj, 0))
        enc = _json.make_encoder({}, _no_default, _json.encode_basestring_ascii, None, ":", ",",
                                 False, False, False)
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


# --------------------------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------------------------

EOF_ITEM = ("eof", None)  # the main loop's "data channel closed"


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

    def want(self):
        """Bytes to ask the next read for: 64 KiB, or the rest of a larger partial frame (one
        read, one allocation for a big blob). A fixed 1 MiB read would cost an mmap, mremap
        and munmap for every small frame."""
        buf = self.buf
        if len(buf) >= 4:
            need = 4 + int.from_bytes(buf[0:4], "big") - len(buf)
            if need > 65536:
                return min(need, self.max_frame)
        return 65536

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
# Compiling cells
# --------------------------------------------------------------------------------------------

CodeType = type(compile("", "", "exec"))
CODE_CACHE_SIZE = 256  # sources
CODE_CACHE_MAX_SOURCE = 64 * 1024  # characters; longer sources are compiled every time


def compile_source(source, filename):
    """Compile a cell once: (body code, trailing-expression code or None). A trailing
    expression statement is split off and compiled in eval mode so that it runs exactly once."""
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


def retarget_code(code, filename):
    """``code`` (and every code object nested in it) with co_filename = filename."""
    consts = code.co_consts
    for c in consts:
        if type(c) is CodeType:
            consts = tuple(retarget_code(c, filename) if type(c) is CodeType else c
                           for c in consts)
            return code.replace(co_filename=filename, co_consts=consts)
    return code.replace(co_filename=filename)


def source_lines(source):
    """The line list linecache holds for a cell source."""
    lines = source.splitlines(True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return lines


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

        # Cell state, shared with the control thread under state_lock. `running` is the exec id
        # of the cell whose user code is running (None otherwise); `pending` means a SIGINT was
        # sent for it and not yet turned into KeyboardInterrupt; `cancelled` records a cancel.
        self.state_lock = _thread.allocate_lock()
        self.running = None
        self.pending = False
        self.cancelled = False
        # While sigint_defer is set the SIGINT handler does not raise (it records the signal in
        # sigint_deferred). The main thread sets it while it waits on the data pipe (a
        # KeyboardInterrupt must never drop bytes already read or leave the pipe without a
        # reader) and while it closes a cell (user code is over).
        self.sigint_defer = False
        self.sigint_deferred = False
        self.sig_retry = None  # control thread: seconds until a still-unhandled SIGINT is resent
        self.out_exec = None  # exec id that output frames are attributed to (pump reads it)
        self.inputs = {}  # (exec, req) -> [result], for input() calls waiting for a reply
        self.input_eof = False  # data channel closed: every input() gets EOF
        self.req_counter = 0

        # The data channel (fd 3), also under state_lock: at most one thread reads it at a time
        # (d_reading); the others wait on a private lock in d_followers and are released when
        # the reader steps down. Requests for the main loop go to d_items.
        self.d_items = deque()
        self.d_reading = False
        self.d_wakeable = False  # the current reader selects on the data wake pipe too
        self.d_followers = []
        self.data_reader = None  # FrameReader for fd 3 (only ever used by the current reader)

        self.exec_count = 0  # IPython execution counter (history cells only)
        self.cell_serial = 0  # counter for non-history cell file names
        self.loop = None  # the persistent asyncio loop, created on first use
        self.cell_sources = {}  # virtual file name -> source (also registered in linecache)
        self.cell_order = {}  # virtual file name -> registration order (checkpoint ordering)
        self.linecache = None
        self.code_cache = {}  # source -> (body, last, lines): see compile_cell

        self.drain_requests = []  # (Signal, end_exec) for the pump
        self.drain_lock = _thread.allocate_lock()
        # True while the pump holds bytes it has read from a capture pipe but not yet sent
        # (under drain_lock). With both pipes empty and this false, everything written to fd
        # 1/2 so far has been sent: drain() then needs no hand-off to the pump.
        self.pump_busy = False
        self.capture_poll = None  # select.poll over both capture pipes (set up in setup())

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
        fcntl = None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - every POSIX CPython has fcntl
            pass
        for fd in read_ends:
            if fcntl is not None:
                try:
                    fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)
                except OSError:
                    pass
            os.set_blocking(fd, False)
        if fcntl is not None:
            # fd 3 is read only by a thread waiting for something from it (the idle main loop,
            # an input()); while a cell runs without input() the host's occasional frames (an
            # input_reply nobody asked for) wait in the pipe: give them room. Best effort.
            try:
                fcntl.fcntl(self.data_fd, F_SETPIPE_SZ, 1 << 20)
            except OSError:
                pass
        import select
        self.capture_poll = select.poll()  # drain()'s "are both pipes empty?" (no read)
        for fd in read_ends:
            self.capture_poll.register(fd, select.POLLIN)
        self.wake_r, self.wake_w = os.pipe()  # wakes the pump (drain requests)
        os.set_blocking(self.wake_r, False)
        self.dwake_r, self.dwake_w = os.pipe()  # wakes a data-pipe reader inside input()
        os.set_blocking(self.dwake_r, False)

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

    # ---- control thread -----------------------------------------------------------------

    def control_loop(self):
        """The only reader of fd 5: control is handled here, never behind a cell or a large
        data frame."""
        ctl = self.control_reader
        import select
        try:
            while True:
                if self.sig_retry is not None and not select.select(
                        [self.control_fd], [], [], self.sig_retry)[0]:
                    self.resend_sigint()
                    continue
                chunk = os.read(self.control_fd, 1 << 16)
                if not chunk:
                    os._exit(0)  # host gone
                ctl.feed(chunk)
                for header, body in ctl.frames():
                    self.on_control(header)
        except FramingError as e:
            self.fault("malformed control frame from host: %s" % e, True)
        except BaseException as e:  # an internal bug: say so, then die (no half-alive worker)
            self.fault("control thread failed: %r" % (e,), True)

    # ---- data channel (fd 3): one reader at a time ----------------------------------------

    def wait_data(self, ready, wakeable):
        """Block until ``ready()`` (called with state_lock held) returns something other than
        None, and return that. While waiting, this thread is the data pipe's reader if nobody
        else is (else it waits until the reader steps down or wakes it). ``wakeable``: wait in
        select() together with the data wake pipe, so that the control thread can wake us (an
        input() that a cancel must end); otherwise block in read() (the idle main loop).

        On the main thread SIGINT is deferred for the whole wait: a KeyboardInterrupt must not
        land between reading bytes and routing them, nor while the reader role is handed back
        (the pipe would have no reader). A cancel ends an input() wait through its slot (set
        by the control thread, which also wakes us); a deferred signal is re-checked on exit."""
        on_main = _thread.get_ident() == self.main_ident
        if on_main:
            self.sigint_defer = True
        try:
            return self._wait_data(ready, wakeable)
        finally:
            if on_main:
                self.sigint_defer = False
                if self.sigint_deferred:
                    self.sigint_deferred = False
                    self.on_sigint(_signal.SIGINT, None)

    def _wait_data(self, ready, wakeable):
        lock = self.state_lock
        while True:
            with lock:
                r = ready()
                if r is not None:
                    return r
                if self.d_reading:
                    f = _thread.allocate_lock()
                    f.acquire()
                    self.d_followers.append(f)
                else:
                    f = None
                    self.d_reading = True
                    self.d_wakeable = wakeable
            if f is not None:
                f.acquire()  # released when the reader steps down (or a cancel wakes us)
                continue
            try:
                while True:
                    self.read_data(wakeable)
                    with lock:
                        r = ready()
                        if r is not None or self.d_followers:
                            break
            finally:
                with lock:
                    self.d_reading = False
                    followers = self.d_followers
                    self.d_followers = []
                for f in followers:
                    f.release()
            if r is not None:
                return r

    def wake_data_waiters(self):
        """Make every thread waiting in wait_data() re-check its condition (the control
        thread, for a cancel). Caller holds state_lock."""
        followers = self.d_followers
        self.d_followers = []
        for f in followers:
            f.release()
        if self.d_reading and self.d_wakeable:
            try:
                os.write(self.dwake_w, b"x")
            except OSError:
                pass

    def read_data(self, wakeable):
        """Read once from fd 3 and route every complete frame (by the current reader)."""
        fd = self.data_fd
        if wakeable:
            import select
            readable = select.select([fd, self.dwake_r], [], [])[0]
            if self.dwake_r in readable:
                try:
                    os.read(self.dwake_r, 4096)
                except BlockingIOError:
                    pass
            if fd not in readable:
                return
        data = self.data_reader
        chunk = os.read(fd, data.want())
        if not chunk:
            self.on_data_eof()
            return
        data.feed(chunk)
        try:
            for header, body in data.frames():
                self.on_data(header, body)
        except FramingError as e:
            self.fault("malformed data frame from host: %s" % e, True)

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
                        self.sig_retry = SIGINT_RESEND_FIRST
                    # Also end an input() wait directly: a signal that lands just before the
                    # main thread blocks (select, a lock) would not interrupt it (lost wake-up).
                    woke = False
                    for key in [k for k in self.inputs if k[0] == ex]:
                        self.inputs.pop(key)[0] = ("interrupt", None)
                        woke = True
                    if woke:
                        self.wake_data_waiters()
                # The ack is written before state_lock is released: the cell cannot end (its
                # end takes state_lock before the outcome is sent), so cancel_ack always
                # precedes the outcome of the cell it hit.
                self.send({"type": "cancel_ack", "exec": ex, "running": running})
        elif t == "shutdown":
            os._exit(0)
        else:
            self.fault("unknown control message %r" % (t,), False)

    def resend_sigint(self):
        """The SIGINT sent for a cancel/interrupt has not been handled yet (``pending`` is
        still set for the same cell): send it again, backing off. A signal can be lost for
        good: the main thread drops the GIL right before a blocking call (time.sleep, a read),
        which is exactly when this thread gets the GIL and signals; if the signal lands between
        the GIL release and the system call, the C handler runs, the call then blocks, and no
        Python code checks the flag until it returns. Only runs while a signal is unhandled."""
        with self.state_lock:
            if self.running is not None and self.pending:
                _signal.pthread_kill(self.main_ident, _signal.SIGINT)
                self.sig_retry = min(self.sig_retry * 2, SIGINT_RESEND_MAX)
            else:
                self.sig_retry = None

    def on_data(self, header, body):
        """Route one data frame (called by the current data-pipe reader)."""
        msg = self.decode(header)
        if msg is None:
            return
        t = msg["type"]
        if t == "input_reply":
            key = (msg.get("exec"), msg.get("req"))
            with self.state_lock:
                slot = self.inputs.pop(key, None)
                if slot is not None:
                    # Its waiter re-checks once this reader steps down (or it is this reader).
                    slot[0] = ("text", msg.get("text"))
            if slot is None:
                self.log("input_reply for no waiting input: %r" % (key,))
        elif t in ("hello_ack", "execute", "checkpoint", "restore", "reset"):
            with self.state_lock:
                self.d_items.append((msg, body))
        else:
            self.fault("unknown data message %r" % (t,), False)

    def on_data_eof(self):
        with self.state_lock:
            self.input_eof = True
            for slot in self.inputs.values():
                slot[0] = ("eof", None)
            self.inputs.clear()

    def next_item(self):
        """wait_data() condition of the main loop: the next request, or EOF_ITEM."""
        if self.d_items:
            return self.d_items.popleft()
        if self.input_eof:
            return EOF_ITEM
        return None

    # ---- pump thread --------------------------------------------------------------------

    def pump_loop(self):
        import select
        headers = {}
        names = {self.out_r: "stdout", self.err_r: "stderr"}
        fds = [self.out_r, self.err_r, self.wake_r]

        busy_lock = self.drain_lock

        def forward(fd, until_empty):
            # Read what is available (at most output_chunk per frame) and send it. pump_busy
            # covers every read → send, so that drain() can tell "read but not yet sent".
            with busy_lock:
                self.pump_busy = True
            try:
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
            finally:
                with busy_lock:
                    self.pump_busy = False

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
        out, err = sys.stdout, sys.stderr
        if out is self.stdout and err is self.stderr:  # the usual case: only our two streams
            streams = (out, err)
        else:
            streams = []
            for x in (out, err, self.stdout, self.stderr):
                if x is not None and not any(x is y for y in streams):
                    streams.append(x)
        for x in streams:
            try:
                x.flush()
            except Exception:
                pass

    def pipes_empty(self):
        """True if both capture pipes hold no bytes: one poll() with a zero timeout, which
        reads nothing (the pump stays their only reader). A pipe whose writers are all gone
        also reports an event, and a poll object in use by another thread (two threads
        draining at once) raises: both answer False, so drain() takes the hand-off path."""
        try:
            return not self.capture_poll.poll(0)
        except RuntimeError:  # "concurrent poll() invocation"
            return False

    def drain(self, end_exec):
        """Flush the Python streams and wait until the pump has sent every byte written so far.
        With end_exec, output after the drain is attributed to no cell."""
        self.flush_streams()
        # Fast path, no hand-off: if both pipes are empty now, every byte written before this
        # point has been read by the pump (their only reader); if, after that, the pump holds
        # nothing read-but-unsent, all of it has been sent. (Order matters: pipes first, then
        # the flag, which is set before each read and cleared after the send.)
        if self.pipes_empty():
            with self.drain_lock:
                idle = not self.pump_busy
                if idle and end_exec:
                    self.out_exec = None
            if idle:
                return
        sig = Signal()
        with self.drain_lock:
            self.drain_requests.append((sig, end_exec))
        os.write(self.wake_w, b"x")
        sig.wait()

    # ---- signals / cancel ---------------------------------------------------------------

    def on_sigint(self, signum, frame):
        # Raise only for a cell targeted by cancel/interrupt; stray or late signals are ignored.
        if self.sigint_defer:
            self.sigint_deferred = True  # re-checked when the deferring section ends
            return
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
            slot = [None]
            self.inputs[(ex, req)] = slot
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

            def ready():
                if slot[0] is not None:
                    return slot[0]
                if self.input_eof:
                    return ("eof", None)
                return None

            # The reply arrives on the data pipe: wait for it, reading the pipe ourselves when
            # nobody else does (a cancel wakes us through the data wake pipe).
            kind, text = self.wait_data(ready, True)
        finally:
            with self.state_lock:
                self.inputs.pop((ex, req), None)
        if kind == "interrupt":
            # Woken by the control thread for a cancel/interrupt: raise here and consume the
            # pending signal so it cannot raise a second time later in the cell.
            self.pending = False
            raise KeyboardInterrupt
        if kind == "eof" or text is None:
            raise EOFError("EOF when reading a line")
        return str(text)

    def getpass(self, prompt="Password: ", stream=None):
        return self.input(prompt, password=True)

    # ---- main loop --------------------------------------------------------------------------

    def main_loop(self):
        next_item = self.next_item
        wait_data = self.wait_data
        while True:
            item = wait_data(next_item, False)
            if item is EOF_ITEM:  # data channel closed by the host
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

    def register_source(self, filename, source, lines=None):
        self.cell_sources[filename] = source
        self.cell_order[filename] = len(self.cell_order) + 1
        lc = self.linecache
        if lc is None:
            import linecache as lc
            self.linecache = lc
        if lines is None:
            lines = source_lines(source)
        lc.cache[filename] = (len(source), None, lines, filename)

    def compile_cell(self, source, filename):
        """(body code, trailing-expression code or None, linecache lines), compiled under
        ``filename``. Compiling is deterministic for a given source (fixed flags,
        dont_inherit), so recent sources are cached and a repeated cell only gets its code
        objects re-labelled with the new file name (~0.5 µs instead of ~20 µs)."""
        cache = self.code_cache
        hit = cache.get(source)
        if hit is not None:
            body, last, lines = hit
            return (retarget_code(body, filename),
                    retarget_code(last, filename) if last is not None else None, lines)
        body, last = compile_source(source, filename)
        lines = source_lines(source)
        if len(source) <= CODE_CACHE_MAX_SOURCE:
            if len(cache) >= CODE_CACHE_SIZE:
                del cache[next(iter(cache))]  # oldest first
            cache[source] = (body, last, lines)
        return body, last, lines

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
                body, last, lines = self.compile_cell(source, filename)
                self.register_source(filename, source, lines)
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
            finally:
                # From here on the SIGINT handler only records a signal (user code is over);
                # cheaper than blocking SIGINT with two sigprocmask calls per cell.
                self.sigint_defer = True
        except BaseException as e:  # a KeyboardInterrupt landing inside the handlers above
            exc = e
            self.sigint_defer = True
        with self.state_lock:
            self.running = None
            cancelled = self.cancelled
            self.pending = False
        self.sigint_defer = False
        self.sigint_deferred = False  # a signal for the cell that just ended: moot

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
    w.data_reader = FrameReader(w.data_fd, w.max_frame)
    w.control_reader = FrameReader(w.control_fd, w.max_frame)
    w.frame_readers = (w.data_reader, w.control_reader)
    w.setup()
    # If getpass is already loaded (it never is under -I -S), patch it directly.
    gp = sys.modules.get("getpass")
    if gp is not None:
        gp.getpass = w.getpass
    _thread.start_new_thread(w.pump_loop, ())
    _thread.start_new_thread(w.control_loop, ())
    w.hello()
    w.main_loop()
