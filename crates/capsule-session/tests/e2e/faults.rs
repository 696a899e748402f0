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
