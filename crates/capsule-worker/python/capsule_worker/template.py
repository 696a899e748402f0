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
* template -> host: ``{"id": N, "pid": P}`` or ``{"id": N, "error": MSG}`` per request, and
  ``{"exit": P, "status": RAW_WAIT_STATUS}`` when a forked worker ends (the worker is the
  template's child, so the template reaps it and reports the real status).

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


def _child(sock, wake, fds, req):
    """In the forked child: become a worker on fds 1-8 and never return."""
    try:
        import signal
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        sock.close()
        for fd in wake:
            os.close(fd)
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
        # Nothing the template holds open (a warm import's file, say) reaches the worker: each
        # such descriptor is pointed at /dev/null rather than closed, so its number cannot be
        # reused while a template object that still owns it lives (its finaliser would close
        # the new file).
        keep = set(range(9)) | set(extra)
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
        plan = req.get("confine")
        if plan:
            from capsule_worker import confine
            try:
                confine.apply(plan, extra)
            except confine.Fatal:
                os._exit(71)
        for fd in extra:
            os.close(fd)
        os.chdir(req["scratch"])
        os.environ.clear()
        for k, v in req.get("env", []):
            os.environ[k] = v
        sys.argv = ["-c", "3", "4", "5", "6", "7", "8"]
        from capsule_worker import runtime
        runtime.run()
        os._exit(0)
    except SystemExit as e:
        os._exit(e.code if isinstance(e.code, int) else 1)
    except BaseException as e:  # noqa: BLE001 - a forked child must never return into the template
        try:
            os.write(2, ("capsule template child: %r\n" % (e,)).encode())
        finally:
            os._exit(70)


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
    while True:
        readable, _, _ = select.select([sock, wake_r], [], [])
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
                _send(sock, {"exit": pid, "status": status})
        if sock in readable:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(sock, 65536, 16)
            except OSError:
                os._exit(0)
            if not msg:
                os._exit(0)  # the host closed its end
            import json
            req = json.loads(msg)
            n = _threads()
            want = 8 + (req.get("confine_fds") or 0)
            if len(fds) != want or n != 1:
                for fd in fds:
                    os.close(fd)
                why = "got %d descriptors, expected %d" % (len(fds), want) if len(fds) != want else (
                    "template has %d threads; forking it is unsafe" % n)
                _send(sock, {"id": req.get("id"), "error": why})
                continue
            pid = os.fork()
            if pid == 0:
                _child(sock, (wake_r, wake_w), fds, req)
            for fd in fds:
                os.close(fd)
            _send(sock, {"id": req.get("id"), "pid": pid})
