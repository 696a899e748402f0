//! Escape attempts through real sessions (SEC-001): each attempt is a cell under the `strict`
//! policy that must fail inside the worker with an ordinary exception or a typed kill, while the
//! host and other sessions go on answering. The layer-by-layer tests live in
//! `crates/capsule-sandbox/tests/`; these prove the session actually runs its workers inside.

use crate::support::{run, session};
use capsule_sandbox::Policy;
use capsule_session::{KillReason, OutcomeStatus, Session};
use serde_json::json;

async fn strict(tweak: impl FnOnce(&mut Policy)) -> Session {
    let mut cfg = crate::support::config();
    let mut policy = Policy::strict();
    tweak(&mut policy);
    cfg.sandbox = policy;
    Session::start(cfg)
        .await
        .expect("strict session starts on this machine")
}

/// Runs `attempt` (which must raise on denial) and returns the exception class name.
async fn denied(s: &Session, attempt: &str) -> String {
    let code = format!(
        "def _attempt():\n{}\ntry:\n    _attempt()\n    _r = 'ALLOWED'\nexcept BaseException as e:\n    _r = 'DENIED ' + type(e).__name__ + ': ' + str(e)\n_r",
        attempt
            .lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let r = run(s, &code).await;
    let v = r.value().as_str().expect("string").to_string();
    assert!(
        v.starts_with("DENIED"),
        "escape attempt succeeded:\n{attempt}\n-> {v}"
    );
    v
}

#[tokio::test]
async fn network_is_unreachable_from_a_cell() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let port = listener.local_addr().expect("addr").port();
    let s = strict(|_| {}).await;
    denied(
        &s,
        &format!("import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5)"),
    )
    .await;
    denied(
        &s,
        "import socket\nsocket.create_connection(('192.0.2.1', 443), timeout=5)",
    )
    .await;
    denied(&s, "import socket\nsocket.getaddrinfo('pypi.org', 443)").await;
    denied(
        &s,
        "import socket\nsocket.socket(socket.AF_INET6, socket.SOCK_STREAM).connect(('::1', 80))",
    )
    .await;
    let info = s.info().await.expect("info");
    assert!(
        info.sandbox
            .iter()
            .any(|l| l.name == "net_ns" && l.state == "active"),
        "{:?}",
        info.sandbox
    );
}

#[tokio::test]
async fn host_files_and_other_sessions_files_are_out_of_reach() {
    let a = strict(|_| {}).await;
    let b = strict(|_| {}).await;
    let a_scratch = a.info().await.expect("info").scratch_dir;
    run(&a, "open('mine.txt', 'w').write('secret of a')").await;
    let theirs = a_scratch.join("mine.txt");
    assert!(theirs.exists());
    denied(
        &b,
        &format!("open({:?}).read()", theirs.display().to_string()),
    )
    .await;
    denied(&b, "open('/etc/shadow').read()").await;
    denied(&b, "open('/root/.bashrc').read()").await;
    denied(&b, "open('/tmp/capsule-escape-probe', 'w').write('x')").await;
    denied(&b, "import os\nos.listdir('/proc/1')").await;
    denied(
        &b,
        "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'id'])",
    )
    .await;
    // Its own scratch dir is writable.
    let r = run(
        &b,
        "open('note.txt', 'w').write('ok')\nopen('note.txt').read()",
    )
    .await;
    assert_eq!(r.value(), &json!("ok"));
}

#[tokio::test]
async fn the_host_and_sibling_workers_cannot_be_signalled_or_traced() {
    let a = strict(|_| {}).await;
    let b = strict(|_| {}).await;
    let sibling = a.info().await.expect("info").pid.expect("pid");
    let host = std::process::id();
    denied(&b, &format!("import os\nos.kill({host}, 0)")).await;
    denied(
        &b,
        &format!("import os, signal\nos.kill({sibling}, signal.SIGKILL)"),
    )
    .await;
    denied(
        &b,
        &format!(
            "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nif libc.ptrace(16, {sibling}, None, None) != 0:\n    raise OSError(ctypes.get_errno(), 'ptrace')"
        ),
    )
    .await;
    denied(
        &b,
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nif libc.mount(b'none', b'/mnt', b'tmpfs', 0, None) != 0:\n    raise OSError(ctypes.get_errno(), 'mount')",
    )
    .await;
    denied(
        &b,
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nif libc.syscall(321, 0, None, 0) != 0:\n    raise OSError(ctypes.get_errno(), 'bpf')",
    )
    .await;
    // The sibling is unharmed.
    assert_eq!(run(&a, "'alive'").await.value(), &json!("alive"));
}

#[tokio::test]
async fn host_environment_secrets_are_not_visible() {
    // A variable set on the host process must not reach the worker's environment.
    std::env::set_var("CAPSULE_TEST_HOST_SECRET", "hunter2");
    let s = strict(|_| {}).await;
    let r = run(
        &s,
        "import os\n[k for k, v in os.environ.items() if 'hunter2' in v or 'SECRET' in k]",
    )
    .await;
    assert_eq!(r.value(), &json!([]));
}

#[tokio::test]
async fn fork_and_memory_bombs_hit_limits_while_another_session_answers() {
    let bystander = session().await;
    let s = strict(|p| {
        p.limits.processes = Some(16);
        p.limits.address_space = Some(512 << 20);
    })
    .await;
    let v = denied(
        &s,
        "import os\npids = []\ntry:\n    for _ in range(1000):\n        pid = os.fork()\n        if pid == 0:\n            import time\n            time.sleep(60)\n            os._exit(0)\n        pids.append(pid)\nfinally:\n    for p in pids:\n        os.kill(p, 9)\n        os.waitpid(p, 0)",
    )
    .await;
    assert!(
        v.contains("BlockingIOError") || v.contains("Resource temporarily unavailable"),
        "{v}"
    );
    assert_eq!(run(&bystander, "1 + 1").await.value(), &json!(2));
    let v = denied(&s, "x = bytearray(2 << 30)").await;
    assert!(v.contains("MemoryError"), "{v}");
    assert_eq!(run(&bystander, "2 + 2").await.value(), &json!(4));
    // The worker survived both: its state is intact.
    assert_eq!(run(&s, "'still here'").await.value(), &json!("still here"));
}

#[tokio::test]
async fn a_disk_filling_write_stops_at_the_file_size_limit() {
    let s = strict(|p| p.limits.file_size = Some(1 << 20)).await;
    let v = denied(&s, "with open('big.bin', 'wb') as f:\n    for _ in range(10):\n        f.write(b'x' * (1 << 20))\n        f.flush()").await;
    assert!(
        v.contains("File too large") || v.contains("EFBIG") || v.contains("OSError"),
        "{v}"
    );
}

#[tokio::test]
async fn an_endless_loop_under_a_cpu_limit_is_killed_with_reason_cpu_limit() {
    let bystander = session().await;
    let s = strict(|p| p.limits.cpu_seconds = Some(1)).await;
    let mut e = s.execute("while True: pass").await.expect("queued");
    // While the limit bites, the host and other sessions stay responsive.
    assert_eq!(run(&bystander, "3 * 3").await.value(), &json!(9));
    let mut last = None;
    while let Some(ev) = e.next().await {
        last = Some(ev);
    }
    match last {
        Some(capsule_session::Event::Outcome(o)) => assert!(
            matches!(
                o.status,
                OutcomeStatus::Killed {
                    reason: KillReason::CpuLimit,
                    ..
                }
            ),
            "{:?}",
            o.status
        ),
        other => panic!("no outcome: {other:?}"),
    }
    assert_eq!(
        run(&s, "'fresh worker'").await.value(),
        &json!("fresh worker")
    );
    let kills = s.info().await.expect("info").kills;
    assert_eq!(kills.get("cpu_limit"), Some(&1), "{kills:?}");
}

#[tokio::test]
async fn a_policy_requiring_a_missing_layer_refuses_to_start_and_names_it() {
    let mut cfg = crate::support::config();
    let mut policy = Policy::strict();
    policy.layers.pid_ns = capsule_sandbox::LayerMode::Required;
    cfg.sandbox = policy;
    let err = Session::start(cfg).await.expect_err("fail closed");
    assert!(err.to_string().contains("pid_ns"), "{err}");
}

#[tokio::test]
async fn the_policy_wall_clock_limit_kills_a_cell_with_reason_wall_clock() {
    let s = strict(|p| p.limits.wall_clock_ms = Some(300)).await;
    let r = run(&s, "import time\ntime.sleep(100)").await;
    assert!(
        matches!(
            r.status(),
            OutcomeStatus::Killed {
                reason: KillReason::WallClock,
                ..
            }
        ),
        "{:?}",
        r.status()
    );
    assert_eq!(
        run(&s, "'within the limit'").await.value(),
        &json!("within the limit")
    );
}
