"""Fork-server template: a warm, single-threaded interpreter that forks session workers.

Started by the host as ``capsule_worker.template_main()`` with argv ``[SOCK_FD, CONFIG_JSON]``
(``{"site": bool, "sys_path": [...], "warm": [module...]}``). It processes ``site`` (when the
sessions would) and ``sys_path`` first, so warm imports see the same packages as cells, imports
the worker runtime, what a first cell needs and the warm modules once, then serves one request at
a time on
``SOCK_FD`` (a ``SOCK_SEQPACKET`` Unix socket; the host's reader task is its only reader):

* host -> template: ``{"id": N, "scratch": PATH, "env": [[K, V], ...], "confine": PLAN}``
  with 8 descriptors (SCM_RIGHTS): data (->3), events (->4), control (->5), stdout-capture read
  (->6), stderr-capture read (->7), log (->8), stdout-capture write (->1), stderr-capture write
  (->2), then the descriptors the sandbox plan refers to (``PLAN["fds"]`` of them: its report
  pipe and Landlock ruleset). ``PLAN`` is ``capsule_sandbox::ForkPlan`` (``confine.py``): the
  child applies it before anything else, so a forked worker gets the same per-session layers as
  a spawned one (its own namespaces, Landlock domain, seccomp filter, rlimits, identity; the
  host moves it into its own cgroup by pid). A required layer that fails ends the child with
  status 71 before it says hello.
* template -> host: ``{"id": N, "pid": P}`` or ``{"id": N, "error": MSG}`` per request,
  ``{"exit": P, "status": RAW_WAIT_STATUS}`` when a child ends (workers are the template's
  children, so the template reaps them and reports the real status), and ``{"spare": P}`` with
  one descriptor, the spare's socket, when it forked a new spare (see below; ``"preapplied"``
  says whether it applies the policy-level sandbox plan ahead).
* host -> spare (on that socket): the same request as above, with the same descriptors.
* host -> template, once: ``{"spare_plan": PLAN}``, the policy-level part of the sessions'
  sandbox plan (all but the Landlock ruleset and the report pipe). Spares forked after it apply
  it while they wait (``confine.preapply``) and only Landlock at the request
  (``confine.finish``); a spare that fails a required step with it says ``F`` on its socket and
  exits, and later spares apply the whole plan at the request again.

**Spare.** ``fork()`` of a warm interpreter and the child's first steps cost milliseconds, so
they are done ahead of time: the template keeps one *spare*, a child forked in advance that has
already dropped the template's descriptors, rehearsed the start-up, and waits on a socket of its
own. The host gets a copy of that socket with the spare's pid and hands its next request to
the spare directly: no template hop, no reply to wait for. The template keeps its copy only to
see the spare finish its set-up (the spare closes its end then: EOF), and forks the next spare
at that point, so the fork does not compete with that start for the CPU. A request that reaches
the template (the host had no spare) is forked on the spot. A spare whose template and host
are gone sees EOF on its socket and exits.

Forking is refused (``error``) unless the template has exactly one thread: modules that start
threads at import make a template unsafe to fork; the host then falls back to a plain spawn.
The child runs the normal worker ``main`` and says ``hello`` on fd 4 like a spawned worker.
Imported only in template mode; standard library only.
"""

import os
import sys


def _threads():
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading
        return threading.active_count()


def _send(sock, obj):
    import json
    sock.send(json.dumps(obj).encode())


def _drop_template_fds(keep):
    """Point every descriptor but ``keep`` at /dev/null.

    Nothing the template holds open (a warm import's file, say) may reach a worker. Descriptors
    are replaced rather than closed, so their numbers cannot be reused while a template object
    that still owns one lives (its finaliser would close the new file)."""
    keep = set(keep)
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    keep.add(null)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.dup2(null, fd, inheritable=False)
            except OSError:
                pass  # the listdir's own descriptor, closed by now
    os.close(null)


def _become_child():
    """First steps of any forked child: leave the template's signal set-up and session."""
    import signal
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()


def _worker(fds, req, started=None, applied=None):
    """In a forked child: become a worker on fds 1-8 and never return. ``started`` (a spare's
    socket) is closed once the worker's own set-up is done, telling the template it may fork
    the next spare without competing with this start for the CPU. ``applied``: what a spare
    applied of the sandbox plan ahead of time (``confine.preapply``)."""
    try:
        import fcntl
        targets = (3, 4, 5, 6, 7, 8, 1, 2)
        # Move every received descriptor to >= 10 first so no dup2 clobbers another.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds]
        for fd in fds:
            if fd not in targets:
                os.close(fd)
        for src, dst in zip(high, targets):
            os.dup2(src, dst, inheritable=True)
        for fd in high[:len(targets)]:
            os.close(fd)
        extra = high[len(targets):]
        plan = req.get("confine")
        if plan or applied is not None:
            from capsule_worker import confine
            try:
                if applied is not None:
                    confine.finish(applied, plan or {}, extra)
                else:
                    confine.apply(plan, extra)
            except confine.Fatal:
                os._exit(71)
            except (confine.Mismatch, ValueError, KeyError):
                os._exit(72)
        for fd in extra:
            os.close(fd)
        os.chdir(req["scratch"])
        os.environ.clear()
        for k, v in req.get("env", []):
            os.environ[k] = v
        sys.argv = ["-c", "3", "4", "5", "6", "7", "8"]
        from capsule_worker import runtime
        if started is not None:
            started.close()
        runtime.run()
        os._exit(0)
    except SystemExit as e:
        os._exit(e.code if isinstance(e.code, int) else 1)
    except BaseException as e:  # noqa: BLE001 - a forked child must never return into the template
        try:
            os.write(2, ("capsule template child: %r\n" % (e,)).encode())
        finally:
            os._exit(70)


def _rehearse():
    """In a spare, while it waits: walk the request-independent parts of a worker's start-up on
    throwaway objects, so the pages they touch (refcounts of the functions, types and strings
    involved) are copied now instead of on the request's path. Side-effect free: nothing here
    survives, and no global state (streams, signals, the namespace) is changed."""
    import fcntl
    import io
    import json
    import select
    import _thread
    from capsule_worker import confine, runtime
    req = json.loads(json.dumps({
        "id": 0, "scratch": "/", "env": [["PATH", "/usr/bin"]], "confine": None,
        "confine_fds": 0}))
    r, w = os.pipe()
    try:
        hi = fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, 10)
        os.dup2(hi, w, inheritable=True)
        os.close(hi)
        os.set_inheritable(w, False)
        os.set_blocking(r, False)
        try:
            fcntl.fcntl(r, runtime.F_SETPIPE_SZ, 1 << 16)
        except OSError:
            pass
        poll = select.poll()
        poll.register(r, select.POLLIN)
        poll.poll(0)
        poll.unregister(r)
        wk = runtime.Worker(3, 4, 5)
        runtime.FrameReader(r, wk.max_frame)
        stream = io.TextIOWrapper(
            io.BufferedWriter(io.FileIO(w, "w", closefd=False), runtime.STREAM_BUFFER),
            encoding="utf-8", errors="backslashreplace", newline="\n", line_buffering=True)
        stream.detach()
        runtime.encode_frame(runtime.json_dumps({
            "type": "hello", "min_version": 1, "max_version": 1, "encodings": ["json"],
            "features": [], "python": sys.version.split()[0],
            "implementation": sys.implementation.name, "executable": sys.executable or "",
            "pid": os.getpid()}))
    finally:
        os.close(r)
        os.close(w)
    done = _thread.allocate_lock()
    done.acquire()
    _thread.start_new_thread(done.release, ())
    done.acquire()
    os.chdir(os.getcwd())
    os.environ["CAPSULE_REHEARSAL"] = req["env"][0][1]
    del os.environ["CAPSULE_REHEARSAL"]
    confine.libc()


def _fork_now(fds, req):
    """Fork a worker on the spot (no spare). Returns its pid in the template."""
    pid = os.fork()
    if pid == 0:
        try:
            _become_child()
            _drop_template_fds(set(range(3)) | set(fds))
        except BaseException:  # noqa: BLE001 - never return into the template
            os._exit(70)
        _worker(fds, req)
    return pid


def _fork_spare(host, preplan=None):
    """Fork a spare: a child that waits for its request on a socket of its own. Sends the host
    its pid and a copy of that socket. With ``preplan`` (the policy-level part of the sessions'
    sandbox plan) the spare applies it while it waits; if a required step fails it says ``F``
    on its socket and exits 71. Returns ``(pid, template_end)``."""
    import socket
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        try:
            _become_child()
            # Out of the way of the worker descriptors (1-8) the request will bring.
            import fcntl
            high = fcntl.fcntl(theirs.fileno(), fcntl.F_DUPFD_CLOEXEC, 64)
            theirs.close()
            theirs = socket.socket(fileno=high)
            _drop_template_fds({0, 1, 2, high})
            applied = None
            if preplan is not None:
                from capsule_worker import confine
                try:
                    applied = confine.preapply(preplan)
                except BaseException:  # noqa: BLE001 - Fatal, or a plan this runtime cannot read
                    try:
                        theirs.send(b"F")
                    finally:
                        os._exit(71)
            try:
                _rehearse()
            except Exception:  # noqa: BLE001 - an optimisation only
                pass
            msg, fds, _flags, _addr = socket.recv_fds(theirs, 65536, 16)
        except BaseException:  # noqa: BLE001 - never return into the template
            os._exit(70)
        if not msg:
            os._exit(0)  # the template is gone (or retired this spare)
        import json
        _worker(fds, json.loads(msg), started=theirs, applied=applied)
    theirs.close()
    # The host gets its own copy of the spare's socket and hands requests to the spare
    # directly; the template keeps one only to see the spare finish (EOF).
    import json
    socket.send_fds(host, [json.dumps({"spare": pid, "preapplied": preplan is not None}).encode()],
                    [mine.fileno()])
    return pid, mine


def template_main():
    import select
    import signal
    import socket

    import json
    sock_fd = int(sys.argv[1])
    config = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    sock = socket.socket(fileno=sock_fd)
    sock.setblocking(True)
    if config.get("site"):
        import site
        site.main()
    for p in reversed(config.get("sys_path", [])):
        sys.path.insert(0, p)
    # What every worker and its first cell need, loaded once here and shared copy-on-write by
    # the children (the worker re-runs `site.main()` after its handshake; it is cheap then).
    from capsule_worker import runtime  # noqa: F401
    for name in ("select", "fcntl", "linecache", "_ast", "traceback", "site", "resource",
                 "ctypes", "struct"):
        try:
            __import__(name)
        except ImportError:
            pass
    # The sandbox plan's applier and its libc handle, shared by every child.
    from capsule_worker import confine
    try:
        confine.libc()
    except OSError:
        pass
    failed = []
    for name in config.get("warm", []):
        try:
            __import__(name)
        except BaseException as e:  # noqa: BLE001 - reported, never fatal
            failed.append([name, "%s: %s" % (type(e).__name__, e)])
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    _send(sock, {"ready": os.getpid(), "threads": _threads(), "failed": failed})
    spare = None  # (pid, socket) of the pre-forked child the host may hand a request to
    # The policy-level sandbox plan spares apply while they wait (sent by the host once);
    # dropped for good if a spare fails a required step with it.
    preplan = None
    preplan_broken = False
    if _threads() == 1:
        spare = _fork_spare(sock)
    while True:
        watch = [sock, wake_r] if spare is None else [sock, wake_r, spare[1]]
        readable, _, _ = select.select(watch, [], [])
        if wake_r in readable:
            try:
                while os.read(wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                # Every child is reported, an unused spare included (the host ignores pids it
                # never launched).
                _send(sock, {"exit": pid, "status": status})
        if sock in readable:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(sock, 65536, 16)
            except OSError:
                os._exit(0)
            if not msg:
                os._exit(0)  # the host closed its end
            req = json.loads(msg)
            if "spare_plan" in req:
                for fd in fds:
                    os.close(fd)
                if not preplan_broken:
                    preplan = req["spare_plan"]
                    # The current spare applies nothing ahead: replace it now. The host dropped
                    # its copy of that spare's socket when it sent the plan, so once ours is
                    # closed the spare sees EOF and exits (unless a request reached it first:
                    # then it is a worker already).
                    if spare is not None and _threads() == 1:
                        spare[1].close()
                        spare = _fork_spare(sock, preplan)
                continue
            n = _threads()
            want = 8 + (req.get("confine_fds") or 0)
            if len(fds) != want or n != 1:
                for fd in fds:
                    os.close(fd)
                why = "got %d descriptors, expected %d" % (len(fds), want) if len(fds) != want else (
                    "template has %d threads; forking it is unsafe" % n)
                _send(sock, {"id": req.get("id"), "error": why})
                continue
            # The host had no spare to hand this to: fork on the spot. (The spare is the
            # host's alone; forwarding to it here could hand it two requests.)
            pid = _fork_now(fds, req)
            for fd in fds:
                os.close(fd)
            _send(sock, {"id": req.get("id"), "pid": pid})
        if spare is not None and spare[1] in readable:
            # (After the host's messages, so a spare plan that came with them is used.)
            # EOF: the spare finished its set-up after the host handed it a request (or it
            # died). Either way it is no longer the spare: fork the next one. "F" first: it
            # could not apply the plan ahead; later spares apply it at the request instead.
            try:
                if spare[1].recv(16, socket.MSG_DONTWAIT) == b"F":
                    preplan = None
                    preplan_broken = True
            except OSError:
                pass
            spare[1].close()
            spare = None
            if _threads() == 1:
                spare = _fork_spare(sock, preplan)
