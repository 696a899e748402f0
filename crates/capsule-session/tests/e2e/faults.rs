//! Worker deaths, malformed frames, restart and shutdown: always a typed outcome, never a hang.

use crate::support::{drain, run, session, started};
use capsule_session::{KillReason, OutcomeStatus};
use serde_json::json;

#[tokio::test]
async fn a_worker_that_exits_gives_worker_lost_and_a_fresh_worker_serves_the_next_cell() {
    let s = session().await;
    run(&s, "x = 1").await;
    let r = run(&s, "import os\nprint('bye', flush=True)\nos._exit(3)").await;
    assert_eq!(r.out(), "bye\n");
    match r.status() {
        OutcomeStatus::WorkerLost { reason } => assert!(reason.contains("status 3"), "{reason}"),
        other => panic!("expected worker_lost, got {other:?}"),
    }
    assert_eq!(run(&s, "'x' in globals()").await.value(), &json!(false));
    let info = s.info().await.expect("info");
    assert_eq!((info.workers_lost, info.workers_started), (1, 2));
}

#[tokio::test]
async fn a_worker_killed_by_a_signal_reports_killed_with_the_signal() {
    let s = session().await;
    let r = run(
        &s,
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    )
    .await;
    assert!(
        matches!(
            r.status(),
            OutcomeStatus::Killed {
                reason: KillReason::Signal(9),
                ..
            }
        ),
        "{:?}",
        r.status()
    );
}

#[tokio::test]
async fn a_garbage_frame_from_the_worker_is_a_typed_loss_not_a_crash_or_hang() {
    let s = session().await;
    let r = run(
        &s,
        "import os\nos.write(4, b'\\xff\\xff\\xff\\xff' + b'junk' * 10)",
    )
    .await;
    match r.status() {
        OutcomeStatus::WorkerLost { reason } => {
            assert!(reason.contains("exceeds the limit"), "{reason}")
        }
        other => panic!("expected worker_lost, got {other:?}"),
    }
    assert!(s.info().await.expect("info").protocol_errors >= 1);
    assert_eq!(run(&s, "'ok'").await.value(), &json!("ok"));
}

#[tokio::test]
async fn a_well_framed_unknown_message_is_skipped_and_counted() {
    let s = session().await;
    let r = run(
        &s,
        "import os, struct\nh = b'{\"type\":\"from_the_future\"}'\nos.write(4, struct.pack('>IBI', 5 + len(h), 1, len(h)) + h)\n'still fine'",
    )
    .await;
    assert_eq!(r.value(), &json!("still fine"));
    assert_eq!(s.info().await.expect("info").protocol_errors, 1);
}

#[tokio::test]
async fn a_worker_that_closes_its_event_pipe_is_replaced() {
    let s = session().await;
    let r = run(&s, "import os\nos.close(4)\nimport time\ntime.sleep(100)").await;
    assert!(
        matches!(r.status(), OutcomeStatus::WorkerLost { .. }),
        "{:?}",
        r.status()
    );
    assert_eq!(run(&s, "7").await.value(), &json!(7));
}

#[tokio::test]
async fn restart_ends_the_running_cell_and_gives_a_fresh_namespace() {
    let s = session().await;
    run(&s, "x = 1").await;
    let mut e = s
        .execute("import time\nprint('started', flush=True)\ntime.sleep(100)")
        .await
        .expect("q");
    let queued = s.execute("'queued ran'").await.expect("q");
    started(&mut e, "started").await;
    s.restart().await.expect("restart");
    assert!(matches!(
        drain(e).await.status(),
        OutcomeStatus::WorkerLost { .. }
    ));
    assert_eq!(drain(queued).await.value(), &json!("queued ran"));
    assert_eq!(run(&s, "'x' in globals()").await.value(), &json!(false));
}

#[tokio::test]
async fn shutdown_ends_running_and_queued_cells_with_outcomes() {
    let s = session().await;
    let mut running = s
        .execute("import time\nprint('started', flush=True)\ntime.sleep(100)")
        .await
        .expect("q");
    let queued = s.execute("1").await.expect("q");
    started(&mut running, "started").await;
    s.shutdown().await.expect("shutdown");
    assert!(matches!(
        drain(running).await.status(),
        OutcomeStatus::WorkerLost { .. }
    ));
    assert_eq!(drain(queued).await.status(), &OutcomeStatus::Cancelled);
    s.shutdown().await.expect("idempotent");
}

#[tokio::test]
async fn a_missing_interpreter_is_a_typed_start_error() {
    let mut cfg = crate::support::config();
    cfg.python = Some("/nonexistent/python3".into());
    let err = capsule_session::Session::start(cfg)
        .await
        .expect_err("must fail");
    assert!(err.to_string().contains("/nonexistent/python3"), "{err}");
}

/// Not a test of its own: the child-process half of
/// `a_worker_exits_promptly_when_its_host_is_killed`, which runs this test binary again with
/// `CAPSULE_TEST_HOST_MODE=1` so that a real host process can be killed. Without the variable it
/// returns at once.
#[tokio::test]
async fn host_process_for_the_host_exit_test() {
    if std::env::var_os("CAPSULE_TEST_HOST_MODE").is_none() {
        return;
    }
    let s = session().await;
    let pid = s.info().await.expect("info").pid.expect("pid");
    let mut e = s
        .execute("print('started', flush=True)\nwhile True: pass")
        .await
        .expect("q");
    started(&mut e, "started").await;
    println!("WORKER_PID={pid}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::future::pending::<()>().await;
}

#[test]
fn a_worker_exits_promptly_when_its_host_is_killed() {
    use std::io::BufRead;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let exe = std::env::current_exe().expect("test binary");
    let mut host = std::process::Command::new(exe)
        .args([
            "--exact",
            "faults::host_process_for_the_host_exit_test",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CAPSULE_TEST_HOST_MODE", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn host");
    let stdout = host.stdout.take().expect("stdout");
    let mut pid = None;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.expect("line");
        // libtest prints "test <name> ... " without a newline first, so search the line.
        if let Some((_, p)) = line.split_once("WORKER_PID=") {
            pid = Some(p.trim().parse::<i32>().expect("pid"));
            break;
        }
    }
    let pid = pid.expect("the host printed its worker pid");
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    assert!(raw >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw) };
    let t0 = std::time::Instant::now();
    host.kill().expect("kill -9 the host");
    host.wait().expect("reap host");
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // Event-driven wait for the worker's exit; the 30 s bound only guards against a hang.
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 30_000) };
    assert_eq!(n, 1, "the worker outlived its host");
    eprintln!("worker exited {:?} after its host was killed", t0.elapsed());
}
