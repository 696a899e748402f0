//! The cancel ladder and deadlines.

use std::time::Duration;

use crate::support::{drain, run, session, started, until};
use capsule_session::{Event, ExecuteRequest, OutcomeStatus};
use serde_json::json;

async fn cancel_running(s: &capsule_session::Session, code: &str) -> crate::support::Run {
    let mut e = s.execute(code).await.expect("queued");
    started(&mut e, "started").await;
    e.cancel().await.expect("cancel sent");
    drain(e).await
}

#[tokio::test]
async fn cancel_stops_a_busy_loop_and_keeps_the_session_state() {
    let s = session().await;
    run(&s, "kept = 'yes'").await;
    let r = cancel_running(&s, "print('started', flush=True)\nwhile True:\n    pass").await;
    assert_eq!(r.status(), &OutcomeStatus::Cancelled);
    assert_eq!(run(&s, "kept").await.value(), &json!("yes"));
    assert_eq!(s.info().await.expect("info").workers_started, 1);
}

#[tokio::test]
async fn cancel_interrupts_time_sleep() {
    let s = session().await;
    let r = cancel_running(
        &s,
        "import time\nprint('started', flush=True)\ntime.sleep(100)",
    )
    .await;
    assert_eq!(r.status(), &OutcomeStatus::Cancelled);
}

#[tokio::test]
async fn cancel_runs_finally_blocks() {
    let s = session().await;
    let r = cancel_running(
        &s,
        "cleaned = False\ntry:\n    print('started', flush=True)\n    while True: pass\nfinally:\n    cleaned = True",
    )
    .await;
    assert_eq!(r.status(), &OutcomeStatus::Cancelled);
    assert_eq!(run(&s, "cleaned").await.value(), &json!(true));
}

#[tokio::test]
async fn cancel_of_a_cell_waiting_for_input_is_cancelled() {
    let s = session().await;
    let mut e = s.execute("input('? ')").await.expect("queued");
    until(&mut e, |ev| matches!(ev, Event::InputRequest { .. })).await;
    e.cancel().await.expect("cancel");
    assert_eq!(drain(e).await.status(), &OutcomeStatus::Cancelled);
    assert_eq!(run(&s, "1").await.value(), &json!(1));
}

#[tokio::test]
async fn cancel_of_a_queued_cell_ends_it_without_running_it() {
    let s = session().await;
    run(&s, "ran = False").await;
    let mut blocker = s
        .execute("import time\nprint('started', flush=True)\ntime.sleep(100)")
        .await
        .expect("q");
    let queued = s.execute("ran = True").await.expect("q");
    started(&mut blocker, "started").await;
    queued.cancel().await.expect("cancel");
    assert_eq!(drain(queued).await.status(), &OutcomeStatus::Cancelled);
    blocker.cancel().await.expect("cancel");
    assert_eq!(drain(blocker).await.status(), &OutcomeStatus::Cancelled);
    assert_eq!(run(&s, "ran").await.value(), &json!(false));
}

#[tokio::test]
async fn a_late_cancel_never_hits_the_next_cell() {
    let s = session().await;
    let first = s.execute("1").await.expect("q");
    let handle = first.handle();
    drain(first).await;
    let mut second = s
        .execute("import time\nprint('started', flush=True)\ntime.sleep(0.2)\n'finished'")
        .await
        .expect("q");
    started(&mut second, "started").await;
    handle
        .cancel()
        .await
        .expect("late cancel is accepted and ignored");
    assert_eq!(drain(second).await.value(), &json!("finished"));
}

#[tokio::test]
async fn a_cell_that_swallows_the_cancel_is_killed_after_the_grace_period() {
    let mut cfg = crate::support::config();
    cfg.cancel_grace = Duration::from_millis(200);
    let s = capsule_session::Session::start(cfg).await.expect("start");
    run(&s, "state = 1").await;
    let r = cancel_running(
        &s,
        "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('started', flush=True)\nwhile True:\n    pass",
    )
    .await;
    assert!(
        matches!(r.status(), OutcomeStatus::WorkerLost { .. }),
        "{:?}",
        r.status()
    );
    assert!(r.status().state_lost());
    let r = run(&s, "'state' in globals()").await;
    assert_eq!(
        r.value(),
        &json!(false),
        "a fresh worker serves the next cell"
    );
    let info = s.info().await.expect("info");
    assert_eq!((info.cancel_kills, info.workers_started), (1, 2));
}

#[tokio::test]
async fn cancel_works_under_an_output_flood() {
    let s = session().await;
    let r = cancel_running(
        &s,
        "print('started', flush=True)\nwhile True:\n    print('flood' * 20)",
    )
    .await;
    assert_eq!(r.status(), &OutcomeStatus::Cancelled);
    assert_eq!(run(&s, "2").await.value(), &json!(2));
}

#[tokio::test]
async fn interrupt_lets_the_cell_handle_keyboard_interrupt() {
    let s = session().await;
    let mut e = s
        .execute("import time\ntry:\n    print('started', flush=True)\n    time.sleep(100)\nexcept KeyboardInterrupt:\n    caught = 'handled'\ncaught")
        .await
        .expect("q");
    started(&mut e, "started").await;
    e.handle().interrupt().await.expect("interrupt");
    assert_eq!(drain(e).await.value(), &json!("handled"));
}

#[tokio::test]
async fn a_deadline_times_out_a_cell_and_keeps_the_state() {
    let s = session().await;
    run(&s, "kept = 5").await;
    let e = s
        .execute_with(
            ExecuteRequest::new("import time\ntime.sleep(100)").timeout(Duration::from_millis(100)),
        )
        .await
        .expect("q");
    let r = drain(e).await;
    assert_eq!(r.status(), &OutcomeStatus::TimedOut { state_lost: false });
    assert_eq!(run(&s, "kept").await.value(), &json!(5));
    assert_eq!(s.info().await.expect("info").timeouts, 1);
}

#[tokio::test]
async fn a_deadline_on_a_cell_that_ignores_interrupts_kills_the_worker() {
    let mut cfg = crate::support::config();
    cfg.cancel_grace = Duration::from_millis(100);
    let s = capsule_session::Session::start(cfg).await.expect("start");
    // Ignore SIGINT in an earlier cell (no deadline), so the timed cell cannot be stopped
    // cooperatively however long it takes to start on a loaded machine.
    run(
        &s,
        "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)",
    )
    .await;
    let e = s
        .execute_with(
            ExecuteRequest::new("while True:\n    pass").timeout(Duration::from_millis(100)),
        )
        .await
        .expect("q");
    assert_eq!(
        drain(e).await.status(),
        &OutcomeStatus::TimedOut { state_lost: true }
    );
    assert_eq!(run(&s, "3").await.value(), &json!(3));
}
