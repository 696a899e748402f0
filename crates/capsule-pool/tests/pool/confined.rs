//! Forked workers under a sandbox policy: the fork server's children get the same per-session
//! layers as spawned workers (SEC-001 + POOL-001). Each escape attempt is a cell in a forked
//! session that must fail inside the worker, while its sibling (forked from the same template)
//! and the template itself stay out of reach.

use capsule_pool::PoolConfig;
use capsule_session::{OutcomeStatus, Session};

use crate::support::{config, guard, ok, start, ACQUIRE};

fn strict_fork_config() -> PoolConfig {
    let mut c = config();
    c.session.sandbox = capsule_session::config::load_policy("strict").expect("strict preset");
    c.fork_server = true;
    c.min_idle = 2;
    c
}

/// Runs `attempt` (which must raise on denial) and returns `DENIED <exception>`.
async fn denied(s: &Session, attempt: &str) -> String {
    let body = attempt
        .lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n");
    let code = format!(
        "def _attempt():\n{body}\ntry:\n    _attempt()\n    _r = 'ALLOWED'\nexcept BaseException as e:\n    _r = 'DENIED ' + type(e).__name__ + ': ' + str(e)\n_r"
    );
    let v = ok(s, &code).await;
    assert!(
        v.trim_start_matches(['\'', '"']).starts_with("DENIED"),
        "escape attempt succeeded:\n{attempt}\n-> {v}"
    );
    v
}

fn ns(pid: u32, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap_or_else(|e| panic!("ns/{kind} of {pid}: {e}"))
        .display()
        .to_string()
}

fn cgroups(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup file")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forked_workers_get_their_own_sandbox_layers() {
    let held = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        held.path().join("holds_fd.py"),
        // Enough descriptors that some land above the worker's 0-8.
        "HELD = [open(__file__, 'rb') for _ in range(16)]\n",
    )
    .expect("module");
    let mut c = strict_fork_config();
    c.session.sys_path.push(held.path().to_path_buf());
    c.warm_imports.push("holds_fd".into());
    let pool = start(c).await;
    let info = guard("ready", pool.wait_ready()).await.expect("ready");
    assert!(info.fork.enabled, "{:?}", info.fork);
    assert_eq!(info.created_by_path.get("fork"), Some(&2), "{info:#?}");
    assert_eq!(info.fork.failures, 0, "{:?}", info.fork);
    let template = info.fork.template_pid.expect("template pid");
    let a = pool.acquire(ACQUIRE).await.expect("acquire a");
    let b = pool.acquire(ACQUIRE).await.expect("acquire b");
    let (ia, ib) = (a.info().await.expect("info"), b.info().await.expect("info"));
    let (pa, pb) = (ia.pid.expect("pid a"), ib.pid.expect("pid b"));
    // Both really are the template's children.
    for (s, pid) in [(&a, pa), (&b, pb)] {
        assert_eq!(ok(s, "import os; os.getppid()").await, template.to_string());
        assert_eq!(ok(s, "os.getpid()").await, pid.to_string());
    }

    // The same layers, in the same states, as a worker spawned under the same policy.
    let spawned = Session::start(pool.config().session.clone())
        .await
        .expect("spawned session");
    let states = |l: &[capsule_session::SandboxLayer]| {
        l.iter()
            .map(|l| format!("{}={}", l.name, l.state))
            .collect::<Vec<_>>()
    };
    let want = states(&spawned.info().await.expect("info").sandbox);
    assert_eq!(states(&ia.sandbox), want);
    assert_eq!(states(&ib.sandbox), want);
    assert!(want.contains(&"seccomp=active".to_string()), "{want:?}");
    assert!(want.contains(&"landlock=active".to_string()), "{want:?}");

    // Kernel evidence: each worker has namespaces of its own (not the template's, not its
    // sibling's), its own cgroups, no_new_privs and a seccomp filter.
    for kind in ["user", "net", "ipc", "uts", "mnt"] {
        let (x, y, t) = (ns(pa, kind), ns(pb, kind), ns(template, kind));
        assert_ne!(x, y, "{kind} namespace shared between siblings");
        assert_ne!(x, t, "{kind} namespace shared with the template");
    }
    let (ca, cb, ct) = (cgroups(pa), cgroups(pb), cgroups(template));
    assert_ne!(ca, cb, "siblings share cgroups");
    assert_ne!(ca, ct, "the worker stayed in the template's cgroups");
    for pid in [pa, pb] {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        assert_eq!(field("NoNewPrivs:").as_deref(), Some("1"), "{status}");
        assert_eq!(field("Seccomp:").as_deref(), Some("2"), "{status}");
    }

    // Escape attempts from b.
    let a_scratch = ia.scratch_dir;
    ok(&a, "open('mine.txt', 'w').write('secret of a')").await;
    assert!(a_scratch.join("mine.txt").exists());
    let theirs = a_scratch.join("mine.txt").display().to_string();
    denied(&b, &format!("open({theirs:?}).read()")).await;
    denied(&b, &format!("open({theirs:?}, 'w').write('x')")).await;
    denied(&b, "open('/tmp/capsule-fork-escape-probe', 'w').write('x')").await;
    denied(&b, "open('/etc/shadow').read()").await;
    denied(
        &b,
        "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)",
    )
    .await;
    for target in [template, pa, std::process::id()] {
        denied(&b, &format!("import os\nos.kill({target}, 0)")).await;
    }
    denied(
        &b,
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nif libc.unshare(0x40000000) != 0:\n    raise OSError(ctypes.get_errno(), 'unshare')",
    )
    .await;
    denied(
        &b,
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nif libc.mount(b'none', b'/mnt', b'tmpfs', 0, None) != 0:\n    raise OSError(ctypes.get_errno(), 'mount')",
    )
    .await;
    // Nothing the template had open reaches a worker: the warm import `holds_fd` keeps a file
    // open in the template; no descriptor of the worker refers to it.
    let held = held.path().join("holds_fd.py").display().to_string();
    let template_fds: Vec<String> = std::fs::read_dir(format!("/proc/{template}/fd"))
        .expect("template fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    assert!(template_fds.contains(&held), "{template_fds:?}");
    let leaked = ok(
        &b,
        &format!(
            "import os
st = os.stat({held:?})
def _same(fd):
    try:
        f = os.fstat(fd)
    except OSError:
        return False
    return (f.st_dev, f.st_ino) == (st.st_dev, st.st_ino)
[fd for fd in range(1024) if _same(fd)]"
        ),
    )
    .await;
    assert_eq!(leaked, "[]", "the template's open file reached the worker");
    // Own scratch dir is writable; the sibling is unharmed.
    assert_eq!(
        ok(
            &b,
            "open('note.txt', 'w').write('ok'); open('note.txt').read()"
        )
        .await,
        "'ok'"
    );
    assert_eq!(ok(&a, "open('mine.txt').read()").await, "'secret of a'");
    drop((a, b));
    pool.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_in_a_forked_worker_hits_its_own_process_limit() {
    let mut c = strict_fork_config();
    c.session.sandbox.limits.processes = Some(16);
    let pool = start(c).await;
    guard("ready", pool.wait_ready()).await.expect("ready");
    let a = pool.acquire(ACQUIRE).await.expect("acquire");
    let b = pool.acquire(ACQUIRE).await.expect("acquire");
    let v = denied(
        &a,
        "import os\npids = []\ntry:\n    for _ in range(1000):\n        pid = os.fork()\n        if pid == 0:\n            import time\n            time.sleep(60)\n            os._exit(0)\n        pids.append(pid)\nfinally:\n    for p in pids:\n        os.kill(p, 9)\n        os.waitpid(p, 0)",
    )
    .await;
    assert!(
        v.contains("BlockingIOError") || v.contains("Resource temporarily unavailable"),
        "{v}"
    );
    // The limit is the worker's own: its sibling can still start processes.
    assert_eq!(
        ok(
            &b,
            "import os\npid = os.fork()\nif pid == 0:\n    os._exit(7)\nos.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])"
        )
        .await,
        "7"
    );
    let done = a.run("'still here'").await.expect("queued");
    assert!(
        matches!(done.outcome.status, OutcomeStatus::Ok { .. }),
        "{:?}",
        done.outcome
    );
    assert_eq!(pool.info().created_by_path.get("fork"), Some(&2));
    drop((a, b));
    pool.stop().await;
}
