"""Apply a sandbox child plan in a worker forked from the fork-server template.

A spawned worker is confined by the host's ``pre_exec`` hook (Rust, ``capsule-sandbox``). A
forked worker never passes through that hook, so the host sends the same plan as data
(``capsule_sandbox::ForkPlan``) with the fork request and the child calls :func:`apply` before
it runs anything else. A spare (a child forked ahead of its request) may apply the policy-level
part ahead with :func:`preapply` and the per-session rest (Landlock) at the request with
:func:`finish`. The steps, their order, and the 8-byte failure records on the report pipe
(``step u8, fatal u8, 0, 0, errno i32 native``) mirror ``ChildPlan::apply`` exactly; every
number (steps, syscalls, flags) comes from the host, so nothing here is architecture-specific.

Standard library only (``ctypes``, ``os``, ``resource``, ``struct``). Runs in the forked child,
which is single-threaded (the template refuses to fork otherwise), so ``unshare`` of a user
namespace is allowed.
"""

import os
import struct


_LIBC = None


def libc():
    """The C library through ``ctypes`` (loaded once; the template calls this before forking,
    so children do not pay for it)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


class Fatal(Exception):
    """A required step failed (already reported on the report pipe)."""

    def __init__(self, step, errno):
        super().__init__("sandbox step %d failed: %s" % (step, os.strerror(errno)))
        self.step = step
        self.errno = errno


class _Plan:
    def __init__(self, plan, fds, records=None):
        self.p = plan
        self.fds = fds
        self.steps = dict(plan["steps"])
        self.required = plan.get("required", 0)
        r = plan.get("report")
        self.report = fds[r] if r is not None and r < len(fds) else None
        # Without a report pipe yet (a spare applying ahead of its request): failure records
        # are kept here and written once the request brings the pipe.
        self.records = records
        self.libc = libc()

    def write_record(self, rec):
        if self.report is not None:
            try:
                os.write(self.report, rec)
            except OSError:
                pass
        elif self.records is not None:
            self.records.append(rec)

    def fail(self, step_name, errno):
        step = self.steps[step_name]
        fatal = bool(self.required & (1 << step))
        self.write_record(struct.pack("=BBxxi", step, int(fatal), errno))
        if fatal:
            raise Fatal(step, errno)

    def call(self, step_name, fn, *args):
        """Run a libc call; report ``step_name`` on a non-zero return."""
        import ctypes
        ctypes.set_errno(0)
        rc = fn(*args)
        if rc != 0:
            self.fail(step_name, ctypes.get_errno() or 1)
            return False
        return True


def _write_file(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        if os.write(fd, data) != len(data):
            raise OSError(5, "short write")  # EIO
    finally:
        os.close(fd)


def _setrlimit(plan, step, res, cur, mx):
    import resource
    inf = plan.p["consts"]["rlim_infinity"]
    cur = resource.RLIM_INFINITY if cur >= inf else cur
    mx = resource.RLIM_INFINITY if mx >= inf else mx
    try:
        resource.setrlimit(res, (cur, mx))
    except (OSError, ValueError) as e:
        plan.fail(step, getattr(e, "errno", None) or 22)  # EINVAL


# The parts of a plan that are the same for every worker of a policy (everything but the
# per-session Landlock ruleset and the report pipe): what a spare may apply ahead of time.
POLICY_KEYS = ("version", "steps", "required", "rlimits", "clear_groups", "drop_to", "unshare",
               "id_maps", "shm", "nproc", "no_new_privs", "seccomp", "sys", "consts")


def policy_part(plan):
    """The policy-level part of ``plan`` (see :data:`POLICY_KEYS`)."""
    return {k: plan.get(k) for k in POLICY_KEYS}


class Mismatch(Exception):
    """A request's plan differs from the one its spare applied ahead (never expected: a fork
    server serves one policy). The spare cannot undo what it applied."""


class Applied:
    """What :func:`preapply` did: the plan part, failure records awaiting the report pipe, and
    whether the private ``/dev/shm`` is mounted (its Landlock rule goes in the session's
    ruleset)."""

    def __init__(self, policy, records, shm_mounted):
        self.policy = policy
        self.records = records
        self.shm_mounted = shm_mounted


def _check_version(plan):
    if plan.get("version") != 1:
        raise ValueError("unknown sandbox plan version %r" % (plan.get("version"),))


def apply(plan, fds):
    """Apply ``plan`` (the decoded JSON) with its descriptors ``fds`` (indexed by the plan), in
    the spawn hook's order: rlimits, identity, namespaces, ``/dev/shm``, NPROC, no_new_privs,
    Landlock, seccomp.

    Raises :class:`Fatal` when a required step fails; best-effort failures are only reported.
    """
    _check_version(plan)
    p = _Plan(plan, fds)
    shm_mounted = _policy_steps(p)
    _landlock(p, fds, shm_mounted)
    _seccomp_steps(p)


def preapply(plan):
    """In a spare, before any request: apply every policy-level step of ``plan`` (all but
    Landlock, seccomp included), keeping failure records for the request's report pipe.
    Returns an :class:`Applied`; raises :class:`Fatal` on a required step."""
    _check_version(plan)
    p = _Plan(plan, [], records=[])
    shm_mounted = _policy_steps(p)
    _seccomp_steps(p)
    return Applied(policy_part(plan), p.records, shm_mounted)


def finish(applied, plan, fds):
    """At the request: check ``plan`` is the one applied ahead, write the kept failure records
    to its report pipe, and apply the per-session rest (Landlock, with the ``/dev/shm`` rule).
    The order differs from :func:`apply` only in that seccomp came before Landlock; the filters
    allow the Landlock calls, and the final state is the same."""
    _check_version(plan)
    if policy_part(plan) != applied.policy:
        raise Mismatch("the request's sandbox plan is not the one applied ahead")
    p = _Plan(plan, fds)
    for rec in applied.records:
        p.write_record(rec)
    _landlock(p, fds, applied.shm_mounted)


def _policy_steps(p):
    """Steps 2-7 of the plan. Returns whether a private ``/dev/shm`` was mounted."""
    plan = p.p
    c = plan["consts"]
    # 1. (cgroup: joined by the host, by pid.) 2. rlimits but NPROC.
    for res, cur, mx in plan.get("rlimits", []):
        _setrlimit(p, "rlimits", res, cur, mx)
    # 3. identity: supplementary groups, then gid, then uid; stay dumpable for /proc/self.
    if plan.get("clear_groups"):
        try:
            os.setgroups([])
        except OSError as e:
            p.fail("drop_uid", e.errno)
    if plan.get("drop_to"):
        uid, gid = plan["drop_to"]
        try:
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        except OSError as e:
            p.fail("drop_uid", e.errno)
        else:
            p.libc.prctl(c["pr_set_dumpable"], 1, 0, 0, 0)
    # 4. namespaces.
    flags = plan.get("unshare", 0)
    in_userns = False
    if flags:
        if p.call("unshare", p.libc.unshare, flags):
            in_userns = bool(flags & c["clone_newuser"])
    maps_ok = False
    if in_userns and plan.get("id_maps"):
        m = plan["id_maps"]
        try:
            _write_file("/proc/self/setgroups", b"deny")
            _write_file("/proc/self/uid_map", m["uid"].encode())
            _write_file("/proc/self/gid_map", m["gid"].encode())
            maps_ok = True
        except OSError as e:
            p.fail("id_maps", e.errno or 5)
    # 5. private /dev/shm in the new mount namespace.
    shm = plan.get("shm")
    shm_mounted = False
    if shm and in_userns and maps_ok and flags & c["clone_newns"]:
        shm_mounted = p.call("shm_tmpfs", p.libc.mount, b"tmpfs", shm["target"].encode(),
                             b"tmpfs", shm["flags"], shm["data"].encode())
    # 6. RLIMIT_NPROC after the user namespace exists.
    if plan.get("nproc"):
        res, cur, mx = plan["nproc"]
        _setrlimit(p, "nproc", res, cur, mx)
    # 7. no_new_privs.
    if plan.get("no_new_privs"):
        p.call("no_new_privs", p.libc.prctl, c["pr_set_no_new_privs"], 1, 0, 0, 0)
    return shm_mounted


def _landlock(p, fds, shm_mounted):
    """Step 8: the session's Landlock domain (with the private ``/dev/shm`` rule)."""
    plan = p.p
    ruleset = fds[plan["landlock"]] if plan.get("landlock") is not None else None
    if ruleset is None:
        return
    shm = plan.get("shm")
    if shm_mounted and shm and shm.get("rule") is not None:
        _add_rule(p, ruleset, shm["target"], shm["rule"])
    p.call("landlock", p.libc.syscall, plan["sys"]["landlock_restrict_self"], ruleset, 0)


def _seccomp_steps(p):
    """Step 9: the seccomp filters (they deny what the steps above needed)."""
    for prog in p.p.get("seccomp", []):
        if not _seccomp(p, bytes.fromhex(prog)):
            break


def _add_rule(p, ruleset, path, access):
    import ctypes
    c = p.p["consts"]
    try:
        fd = os.open(path, c["o_path"] | c["o_directory"] | c["o_cloexec"])
    except OSError as e:
        p.fail("shm_tmpfs", e.errno)
        return
    try:
        # struct landlock_path_beneath_attr { __u64 allowed_access; __s32 parent_fd; } packed
        attr = ctypes.create_string_buffer(struct.pack("=Qi", access, fd), 12)
        p.call("shm_tmpfs", p.libc.syscall, p.p["sys"]["landlock_add_rule"], ruleset, 1,
               attr, 0)
    finally:
        os.close(fd)


def _seccomp(p, raw):
    import ctypes

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(raw, len(raw))
    prog = SockFprog(len(raw) // 8, ctypes.cast(buf, ctypes.c_void_p))
    return p.call("seccomp", p.libc.syscall, p.p["sys"]["seccomp"],
                  p.p["consts"]["seccomp_set_mode_filter"], 0, ctypes.byref(prog))
