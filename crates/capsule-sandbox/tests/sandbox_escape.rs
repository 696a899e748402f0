//! Escape attempts, each run as a Python cell in a worker spawned through `prepare()` +
//! `install()` exactly as the session spawns workers (`-I -S -c`, own process group, cwd =
//! scratch). Every attempt must fail inside the sandbox; where meaningful, an unsandboxed
//! control shows the same attempt succeeds on this host. No sleeps, no timing thresholds:
//! synchronisation is by pipes and exit statuses.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};

use capsule_sandbox::{prepare, KillReason, LayerMode, LayerState, Policy, SandboxError};
use common::*;

const CTYPES: &str = r#"
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
def sc(*args):
    r = libc.syscall(*args)
    if r == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r
def call(fn, *args):
    r = fn(*args)
    if r == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r
"#;

fn assert_denied(r: &Run, key: &str) {
    let v = r.expect(key);
    assert!(
        v.starts_with("err:"),
        "`{key}` escaped the sandbox: {v}\nstdout:\n{}\nstderr:\n{}",
        r.stdout,
        r.stderr
    );
}

fn assert_ok(r: &Run, key: &str) {
    let v = r.expect(key);
    assert!(
        v.starts_with("ok:"),
        "`{key}` failed inside the sandbox: {v}\nstdout:\n{}\nstderr:\n{}",
        r.stdout,
        r.stderr
    );
}

#[test]
fn strict_activates_every_layer_on_this_machine() {
    let (r, _s) = run(&Policy::strict(), SYSTEM_PY, "print('x=ok:1')");
    assert!(r.status.success(), "{}", r.stderr);
    for l in r.prepared.layers() {
        eprintln!("{:16} {:?} {}", l.name, l.state, l.detail);
        if l.name != "pid_ns" && l.name != "cgroup" && l.name != "unprivileged_uid" {
            assert_eq!(l.state, LayerState::Active, "{}: {}", l.name, l.detail);
        }
    }
}

#[test]
fn normal_work_succeeds_inside() {
    let code = r#"
attempt("imports", lambda: __import__("ssl") and __import__("sqlite3") and __import__("decimal") and __import__("json") and __import__("ctypes") and __import__("hashlib") and __import__("zlib") and "done")
def db():
    import sqlite3
    c = sqlite3.connect(":memory:")
    c.execute("create table t(x)"); c.execute("insert into t values (42)")
    return c.execute("select x from t").fetchone()[0]
attempt("sqlite", db)
def ctx():
    import ssl
    return type(ssl.create_default_context()).__name__
attempt("ssl_context", ctx)
def mp_pipe():
    import multiprocessing as mp
    a, b = mp.Pipe()
    def child(conn):
        conn.send(sum(range(10)))
    p = mp.get_context("fork").Process(target=child, args=(b,))
    p.start(); v = a.recv(); p.join()
    return (v, p.exitcode)
attempt("mp_pipe", mp_pipe)
def mp_queue():
    import multiprocessing as mp
    q = mp.Queue(); q.put(7); return q.get()
attempt("mp_queue", mp_queue)
def threads():
    import threading
    out = []
    ts = [threading.Thread(target=out.append, args=(i,)) for i in range(4)]
    [t.start() for t in ts]; [t.join() for t in ts]
    return sorted(out)
attempt("threads", threads)
def aio():
    import asyncio
    async def f():
        await asyncio.sleep(0)
        return 5
    return asyncio.run(f())
attempt("asyncio", aio)
def sub():
    import subprocess
    return subprocess.run([sys.executable, "-I", "-S", "-c", "print(6*7)"], capture_output=True, text=True, check=True).stdout.strip()
attempt("subprocess_python", sub)
def scratch_rw():
    with open("work.txt", "w") as f:
        f.write("hello")
    os.makedirs("d/e", exist_ok=True)
    os.rename("work.txt", "d/e/w.txt")
    with open("d/e/w.txt") as f:
        return f.read()
attempt("scratch_rw", scratch_rw)
def tmp():
    import tempfile
    with tempfile.NamedTemporaryFile() as f:
        f.write(b"x"); f.flush()
        return os.path.dirname(f.name) == os.environ["TMPDIR"]
attempt("tempfile", tmp)
def urandom():
    return len(os.urandom(16))
attempt("urandom", urandom)
def sock_unix():
    import socket
    a, b = socket.socketpair()
    a.sendall(b"hi"); return b.recv(2)
attempt("socketpair", sock_unix)
attempt("home", lambda: os.path.expanduser("~") == os.getcwd())
"#;
    for py in [SYSTEM_PY, PYENV_PY] {
        if !have(py) {
            continue;
        }
        let (r, _s) = run(&Policy::strict(), py, code);
        for key in [
            "imports",
            "sqlite",
            "ssl_context",
            "mp_pipe",
            "mp_queue",
            "threads",
            "asyncio",
            "subprocess_python",
            "scratch_rw",
            "tempfile",
            "urandom",
            "socketpair",
            "home",
        ] {
            assert_ok(&r, key);
        }
        assert_eq!(r.expect("sqlite"), "ok:42");
        assert_eq!(r.expect("mp_pipe"), "ok:(45, 0)");
        assert_eq!(r.expect("subprocess_python"), "ok:'42'");
        assert_eq!(r.expect("home"), "ok:True");
        assert!(r.status.success(), "{py}: {}", r.stderr);
    }
}

#[test]
fn tcp_connect_to_host_listener_denied() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let code = format!(
        r#"
import socket
def conn():
    s = socket.create_connection(("127.0.0.1", {port}), timeout=5)
    s.close(); return "connected"
attempt("tcp_loopback", conn)
def bind():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(); return s.getsockname()
attempt("tcp_bind", bind)
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b"x", ("127.0.0.1", {port})); return "sent"
attempt("udp", udp)
attempt("raw_packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))
attempt("netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))
attempt("inet6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM))
"#
    );
    // Control: the same connect works without the sandbox.
    let control = run_unsandboxed(SYSTEM_PY, &code);
    assert!(
        control.contains("tcp_loopback=ok:"),
        "control failed: {control}"
    );
    let _accepted = listener.accept().expect("control connection");
    let (r, _s) = run(&Policy::strict(), SYSTEM_PY, &code);
    for key in [
        "tcp_loopback",
        "tcp_bind",
        "udp",
        "raw_packet",
        "netlink",
        "inet6",
    ] {
        assert_denied(&r, key);
    }
    // seccomp answers first: EPERM at socket(2).
    assert_eq!(r.expect("tcp_loopback"), "err:PermissionError:1");
}

#[test]
fn tcp_connect_denied_by_landlock_and_netns_without_seccomp() {
    // Take seccomp away to prove the next layers hold on their own.
    let mut p = Policy::strict();
    p.layers.seccomp = LayerMode::Off;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let code = format!(
        r#"
import socket
attempt("tcp_loopback", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=5))
def ifaces():
    return [n for _, n in socket.if_nameindex()]
attempt("interfaces", ifaces)
"#
    );
    let (r, _s) = run(&p, SYSTEM_PY, &code);
    // Landlock TCP connect → EACCES (13).
    assert_eq!(r.expect("tcp_loopback"), "err:PermissionError:13");
    assert_eq!(r.expect("interfaces"), "ok:['lo']");
}

#[test]
fn external_connect_and_dns_fail() {
    // Run only inside the sandbox: socket(AF_INET) is denied before any packet exists, and the
    // network namespace has no route anyway. 192.0.2.1 is TEST-NET-1 (never routed).
    let code = r#"
import socket
attempt("external", lambda: socket.create_connection(("192.0.2.1", 443), timeout=2))
attempt("dns", lambda: socket.getaddrinfo("example.com", 443))
"#;
    let (r, _s) = run(&Policy::strict(), SYSTEM_PY, code);
    assert!(r.prepared.is_active("seccomp") && r.prepared.is_active("net_ns"));
    assert_denied(&r, "external");
    assert_denied(&r, "dns");
    // Same with the default policy.
    let (r, _s) = run(&Policy::standard(), SYSTEM_PY, code);
    assert_denied(&r, "external");
    assert_denied(&r, "dns");
}

#[test]
fn host_files_outside_scratch_denied() {
    let other = tempfile::Builder::new()
        .prefix("capsule-other-session-")
        .tempdir()
        .expect("tempdir");
    let secret = other.path().join("secret.txt");
    std::fs::write(&secret, "other session's data").expect("write");
    let code = format!(
        r#"
def rd(p):
    with open(p) as f:
        return f.read()
def wr(p):
    with open(p, "w") as f:
        f.write("pwned")
    return p
attempt("shadow", lambda: rd("/etc/shadow"))
attempt("passwd", lambda: rd("/etc/passwd"))
attempt("other_session", lambda: rd({secret:?}))
attempt("other_session_ls", lambda: os.listdir({other:?}))
attempt("root_home", lambda: os.listdir("/root"))
attempt("proc_environ", lambda: rd("/proc/1/environ"))
attempt("proc_self", lambda: rd("/proc/self/status"))
attempt("write_tmp", lambda: wr("/tmp/capsule-escape-test-{pid}"))
attempt("write_other", lambda: wr({other_file:?}))
attempt("write_etc", lambda: wr("/etc/capsule-escape-test"))
attempt("exec_shell", lambda: __import__("subprocess").run(["/bin/sh", "-c", "echo pwned"]))
attempt("exec_echo", lambda: __import__("subprocess").run(["/bin/echo", "x"]))
attempt("mkdir_outside", lambda: os.mkdir("/tmp/capsule-escape-dir-{pid}"))
attempt("symlink_escape", lambda: (os.symlink("/etc/shadow", "link"), rd("link")))
attempt("hardlink_escape", lambda: os.link({secret:?}, "hl"))
"#,
        secret = secret.to_string_lossy(),
        other = other.path().to_string_lossy(),
        other_file = other.path().join("new.txt").to_string_lossy(),
        pid = std::process::id(),
    );
    // Control: as root on the host, these reads work.
    let control = run_unsandboxed(SYSTEM_PY, &code);
    assert!(control.contains("shadow=ok:"), "control: {control}");
    assert!(control.contains("other_session=ok:"), "control: {control}");
    let _ = std::fs::remove_file(format!("/tmp/capsule-escape-test-{}", std::process::id()));
    let _ = std::fs::remove_file("/etc/capsule-escape-test");
    let _ = std::fs::remove_dir(format!("/tmp/capsule-escape-dir-{}", std::process::id()));
    let _ = std::fs::remove_file(other.path().join("new.txt"));

    for policy in [Policy::strict(), Policy::standard()] {
        for py in [SYSTEM_PY, PYENV_PY] {
            if !have(py) {
                continue;
            }
            let (r, _s) = run(&policy, py, &code);
            for key in [
                "shadow",
                "passwd",
                "other_session",
                "other_session_ls",
                "root_home",
                "proc_environ",
                "proc_self",
                "write_tmp",
                "write_other",
                "write_etc",
                "exec_shell",
                "exec_echo",
                "mkdir_outside",
                "symlink_escape",
                "hardlink_escape",
            ] {
                assert_denied(&r, key);
            }
            assert!(!other.path().join("new.txt").exists());
            assert_eq!(
                std::fs::read_to_string(&secret).ok().as_deref(),
                Some("other session's data")
            );
        }
    }
}

#[test]
fn exec_paths_knob_grants_system_binaries() {
    let mut p = Policy::strict();
    p.filesystem.exec_paths = vec!["/usr/bin".into(), "/bin".into()];
    let code = r#"
import subprocess
attempt("echo", lambda: subprocess.run(["/bin/echo", "x"], capture_output=True, text=True, check=True).stdout.strip())
"#;
    let (r, _s) = run(&p, SYSTEM_PY, code);
    assert_eq!(r.expect("echo"), "ok:'x'");
}

/// A sandboxed sibling worker that waits for EOF on stdin, then prints `alive` and exits 0.
struct Sibling {
    child: std::process::Child,
    _prepared: capsule_sandbox::Prepared,
    _scratch: Scratch,
}

impl Sibling {
    fn start() -> Sibling {
        let scratch = Scratch::new();
        let spec = spec(SYSTEM_PY, &scratch.path());
        let mut prepared = prepare(&Policy::strict(), &spec).expect("prepare");
        let mut cmd = Command::new(SYSTEM_PY);
        cmd.args([
            "-I",
            "-S",
            "-c",
            "import sys; print('ready', flush=True); sys.stdin.read(); print('alive', flush=True)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .current_dir(scratch.path());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        prepared.install(&mut cmd).expect("install");
        let mut child = cmd.spawn().expect("spawn sibling");
        prepared.after_spawn(child.id()).expect("after_spawn");
        let mut line = String::new();
        let out = child.stdout.as_mut().expect("stdout");
        BufReader::new(out)
            .read_line(&mut line)
            .expect("ready line");
        assert_eq!(line.trim(), "ready");
        Sibling {
            child,
            _prepared: prepared,
            _scratch: scratch,
        }
    }

    /// Close stdin and check the sibling was never disturbed.
    fn finish(mut self) {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.flush();
        }
        let out = self.child.wait_with_output().expect("wait sibling");
        assert!(
            out.status.success(),
            "sibling was disturbed: {:?}",
            out.status
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "alive");
    }
}

#[test]
fn signals_ptrace_and_memory_of_others_denied() {
    let sib = Sibling::start();
    let spid = sib.child.id();
    let host = std::process::id();
    let code = format!(
        r#"{CTYPES}
import signal
attempt("kill_host", lambda: os.kill({host}, 0))
attempt("kill_sibling", lambda: os.kill({spid}, signal.SIGKILL))
attempt("kill_init", lambda: os.kill(1, 0))
attempt("killpg_sibling", lambda: os.killpg({spid}, signal.SIGKILL))
attempt("ptrace_attach", lambda: call(libc.ptrace, 16, {spid}, 0, 0))
attempt("ptrace_syscall", lambda: sc(101, 16, {spid}, 0, 0))
attempt("process_vm_readv", lambda: sc(310, {spid}, 0, 1, 0, 1, 0))
attempt("proc_mem", lambda: open("/proc/{spid}/mem", "rb").read(1))
attempt("pidfd_open", lambda: sc(434, {spid}, 0))
"#
    );
    // Control: signal 0 to the host works without the sandbox.
    let control = run_unsandboxed(
        SYSTEM_PY,
        &format!("attempt('kill_host', lambda: os.kill({host}, 0))"),
    );
    assert!(control.contains("kill_host=ok:"), "control: {control}");
    let (r, _s) = run(&Policy::strict(), SYSTEM_PY, &code);
    for key in [
        "kill_host",
        "kill_sibling",
        "kill_init",
        "killpg_sibling",
        "ptrace_attach",
        "ptrace_syscall",
        "process_vm_readv",
        "proc_mem",
    ] {
        assert_denied(&r, key);
    }
    assert_eq!(r.expect("ptrace_syscall"), "err:PermissionError:1");
    // pidfd_open itself may succeed; what matters is that nothing can be done with it.
    sib.finish();
}

#[test]
fn mount_and_namespace_games_denied() {
    let code = format!(
        r#"{CTYPES}
attempt("mount", lambda: call(libc.mount, b"tmpfs", b"/tmp", b"tmpfs", 0, None))
attempt("unshare_user", lambda: call(libc.unshare, 0x10000000))
attempt("unshare_net", lambda: call(libc.unshare, 0x40000000))
attempt("chroot", lambda: os.chroot("/"))
attempt("setns", lambda: sc(308, 0, 0))
attempt("setuid0", lambda: os.setuid(0))
"#
    );
    let (r, _s) = run(&Policy::strict(), SYSTEM_PY, &code);
    for key in [
        "mount",
        "unshare_user",
        "unshare_net",
        "chroot",
        "setns",
        "setuid0",
    ] {
        assert_denied(&r, key);
    }
}

#[test]
fn denied_syscalls_via_ctypes_get_eperm() {
    let code = format!(
        r#"{CTYPES}
attempt("bpf", lambda: sc(321, 0, 0, 0))
attempt("perf_event_open", lambda: sc(298, 0, 0, -1, -1, 0))
attempt("keyctl", lambda: sc(250, 0, 0))
attempt("io_uring_setup", lambda: sc(425, 1, 0))
attempt("userfaultfd", lambda: sc(323, 0))
attempt("kexec_load", lambda: sc(246, 0, 0, 0, 0))
attempt("init_module", lambda: sc(175, 0, 0, 0))
attempt("personality", lambda: sc(135, 0x0040000))
attempt("x32_alias_of_getpid", lambda: sc(0x40000000 + 39))
attempt("clone_newuser", lambda: sc(56, 0x10000000 | 17, 0, 0, 0, 0))
attempt("getpid_allowed", lambda: sc(39))
"#
    );
    let (r, _s) = run(&Policy::strict(), SYSTEM_PY, &code);
    for key in [
        "bpf",
        "perf_event_open",
        "keyctl",
        "io_uring_setup",
        "userfaultfd",
        "kexec_load",
        "init_module",
        "personality",
        "x32_alias_of_getpid",
        "clone_newuser",
    ] {
        assert_eq!(r.expect(key), "err:PermissionError:1", "{key}");
    }
    assert_ok(&r, "getpid_allowed");
}

#[test]
fn fork_bomb_hits_the_process_limit() {
    let mut p = Policy::strict();
    p.limits.processes = Some(16);
    // Children block on a pipe read (no sleeps); the parent forks until refused, then closes
    // the pipe so every child exits, and reaps them.
    let code = r#"
r, w = os.pipe()
kids = []
def bomb():
    while len(kids) < 200:
        pid = os.fork()
        if pid == 0:
            os.close(w)
            os.read(r, 1)
            os._exit(0)
        kids.append(pid)
    return "unbounded"
attempt("fork_bomb", bomb)
os.close(w)
for k in kids:
    os.waitpid(k, 0)
print(f"forked={len(kids)}", flush=True)
"#;
    for py in [SYSTEM_PY, PYENV_PY] {
        if !have(py) {
            continue;
        }
        let prepared = match prepare(&p, &spec(py, &Scratch::new().path())) {
            Ok(pr) => pr,
            Err(SandboxError::LayerUnavailable { layer, reason }) => {
                eprintln!("SKIP ({py}): {layer} unavailable: {reason}");
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        drop(prepared);
        let (r, _s) = run(&p, py, code);
        assert_eq!(r.expect("fork_bomb"), "err:BlockingIOError:11", "{py}");
        let n: usize = r.expect("forked").parse().expect("count");
        assert!(n < 16, "{py}: forked {n} with a limit of 16");
        assert!(r.status.success());
        if r.prepared
            .layer("cgroup")
            .is_some_and(|l| l.state == LayerState::Active)
        {
            assert!(r.prepared.limit_events().pids_max_hits > 0 || r.prepared.worker_uid() != 0);
        }
    }
}

#[test]
fn memory_bomb_under_rlimit_as_is_a_clean_memory_error() {
    let mut p = Policy::strict();
    p.limits.address_space = Some(256 << 20);
    p.limits.memory = None;
    let code = r#"
attempt("bomb", lambda: len(bytearray(512 << 20)))
attempt("after", lambda: sum(range(10)))
"#;
    let (r, _s) = run(&p, SYSTEM_PY, code);
    assert_eq!(r.expect("bomb"), "err:MemoryError:None");
    assert_eq!(r.expect("after"), "ok:45");
    assert_eq!(r.kill, None);
}

#[test]
fn memory_bomb_under_cgroup_is_an_oom_kill() {
    let mut p = Policy::strict();
    p.limits.address_space = None;
    p.limits.memory = Some(128 << 20);
    let code = r#"
print("started=1", flush=True)
b = bytearray(400 << 20)
print("survived=1", flush=True)
"#;
    let (r, _s) = run(&p, SYSTEM_PY, code);
    if !require_layer(&r.prepared, "cgroup") {
        return;
    }
    assert_eq!(r.get("survived"), None, "{}", r.stdout);
    assert_eq!(r.kill, Some(KillReason::Oom), "status {:?}", r.status);
    assert!(r.prepared.limit_events().oom_kills >= 1);
}

#[test]
fn cpu_loop_is_killed_with_cpu_limit() {
    let mut p = Policy::strict();
    p.limits.cpu_seconds = Some(1);
    let (r, _s) = run(
        &p,
        SYSTEM_PY,
        "print('looping=1', flush=True)\nwhile True: pass",
    );
    assert_eq!(r.kill, Some(KillReason::CpuLimit), "status {:?}", r.status);
    assert_eq!(r.kill.map(|k| k.as_str()), Some("cpu_limit"));
}

#[test]
fn disk_filling_write_hits_file_size_limit() {
    let mut p = Policy::strict();
    p.limits.file_size = Some(1 << 20);
    let code = r#"
def fill():
    with open("big.bin", "wb") as f:
        for _ in range(64):
            f.write(b"\0" * (256 << 10))
            f.flush()
    return "filled"
attempt("fill", fill)
attempt("size", lambda: os.path.getsize("big.bin"))
"#;
    let (r, _s) = run(&p, SYSTEM_PY, code);
    // CPython ignores SIGXFSZ, so the write fails with EFBIG (27) instead of a kill.
    assert_eq!(r.expect("fill"), "err:OSError:27");
    assert_eq!(r.expect("size"), format!("ok:{}", 1 << 20));
}

#[test]
fn pyenv_interpreter_under_root_home_keeps_host_uid_and_stays_confined() {
    if !have(PYENV_PY) {
        return;
    }
    let code = r#"
attempt("uid", lambda: os.getuid())
attempt("shadow", lambda: open("/etc/shadow").read())
attempt("other_pyenv_version", lambda: os.listdir("/root/.pyenv/versions"))
attempt("stdlib", lambda: __import__("json").dumps([1]))
"#;
    let (r, _s) = run(&Policy::strict(), PYENV_PY, code);
    let l = r.prepared.layer("unprivileged_uid").expect("layer");
    if r.prepared.worker_uid() == 0 {
        assert_eq!(l.state, LayerState::Missing);
        assert!(l.detail.contains("/root"), "{}", l.detail);
        // Kernel uid 0 would pass DAC checks on /etc/shadow: Landlock alone denies it.
        assert!(r.prepared.is_active("landlock"));
    }
    assert_eq!(r.expect("uid"), "ok:1000");
    assert_denied(&r, "shadow");
    assert_denied(&r, "other_pyenv_version");
    assert_ok(&r, "stdlib");
    // Forcing an unprivileged uid with this interpreter fails closed, naming the layer.
    let mut p = Policy::strict();
    p.identity.user = capsule_sandbox::UserMode::Unprivileged;
    let s = Scratch::new();
    match prepare(&p, &spec(PYENV_PY, &s.path())) {
        Err(SandboxError::LayerUnavailable { layer, reason }) if unsafe_is_root() => {
            assert_eq!(layer, "unprivileged_uid");
            assert!(reason.contains("/root"), "{reason}");
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => assert!(!unsafe_is_root()),
    }
}

fn unsafe_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

#[test]
fn required_but_missing_layer_fails_closed() {
    let mut p = Policy::strict();
    p.layers.pid_ns = LayerMode::Required;
    let s = Scratch::new();
    match prepare(&p, &spec(SYSTEM_PY, &s.path())) {
        Err(SandboxError::LayerUnavailable { layer, reason }) => {
            assert_eq!(layer, "pid_ns");
            assert!(!reason.is_empty());
        }
        other => panic!("expected LayerUnavailable, got {other:?}"),
    }
    // A process limit cannot be required without a limit to enforce.
    let mut p = Policy::strict();
    p.limits.processes = None;
    match prepare(&p, &spec(SYSTEM_PY, &s.path())) {
        Err(SandboxError::LayerUnavailable { layer, .. }) => assert_eq!(layer, "process_limit"),
        other => panic!("expected LayerUnavailable, got {other:?}"),
    }
}

#[test]
fn none_preset_applies_nothing_but_the_clean_env() {
    let (r, _s) = run(
        &Policy::none(),
        SYSTEM_PY,
        "attempt('shadow', lambda: len(open('/etc/shadow').read()) > 0)",
    );
    assert_eq!(r.expect("shadow"), "ok:True");
    for l in r.prepared.layers() {
        if l.name != "clean_env" {
            assert_eq!(l.state, LayerState::Disabled, "{}", l.name);
        }
    }
}

#[test]
fn cgroup_is_removed_on_cleanup() {
    let (mut r, _s) = run(&Policy::strict(), SYSTEM_PY, "pass");
    if !require_layer(&r.prepared, "cgroup") {
        return;
    }
    let detail = r.prepared.layer("cgroup").expect("cgroup").detail.clone();
    let dirs: Vec<String> = detail
        .split_whitespace()
        .filter(|w| w.starts_with("/sys/fs/cgroup"))
        .map(str::to_string)
        .collect();
    assert!(!dirs.is_empty(), "{detail}");
    for d in &dirs {
        assert!(std::path::Path::new(d).exists(), "{d}");
    }
    r.prepared.cleanup();
    for d in &dirs {
        assert!(!std::path::Path::new(d).exists(), "{d} left behind");
    }
}
