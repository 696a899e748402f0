//! Values, persistence, history variables, errors, top-level await, queueing.

use crate::support::{drain, run, session};
use capsule_session::OutcomeStatus;
use serde_json::json;

#[tokio::test]
async fn values_persist_across_cells_and_come_back_as_json_and_repr() {
    let s = session().await;
    let r = run(&s, "x = 6 * 7").await;
    assert_eq!(r.repr(), "");
    assert_eq!(r.value(), &serde_json::Value::Null);
    let r = run(&s, "x").await;
    assert_eq!(r.value(), &json!(42));
    assert_eq!(r.repr(), "42");
    let r = run(&s, "{'a': [1, 2.5, None, 'z']}").await;
    assert_eq!(r.value(), &json!({"a": [1, 2.5, null, "z"]}));
    let r = run(&s, "object()").await;
    assert_eq!(r.value(), &serde_json::Value::Null);
    assert!(r.repr().starts_with("<object object at"));
    let r = run(&s, "float('nan')").await;
    assert_eq!(r.value(), &serde_json::Value::Null, "NaN is not JSON");
    assert_eq!(r.repr(), "nan");
}

#[tokio::test]
async fn trailing_expression_is_evaluated_exactly_once() {
    let s = session().await;
    run(
        &s,
        "calls = []\ndef f():\n    calls.append(1)\n    return len(calls)",
    )
    .await;
    let r = run(&s, "y = 1\nf()").await;
    assert_eq!(r.value(), &json!(1));
    let r = run(&s, "len(calls)").await;
    assert_eq!(r.value(), &json!(1));
    let r = run(&s, "print('side effect')").await;
    assert_eq!(r.out(), "side effect\n");
}

#[tokio::test]
async fn history_variables_behave_like_ipython() {
    let s = session().await;
    run(&s, "1").await;
    run(&s, "2").await;
    run(&s, "3").await;
    let r = run(&s, "(_, __, ___)").await;
    assert_eq!(r.value(), &json!([3, 2, 1]));
    let r = run(&s, "Out[1] + Out[2]").await;
    assert_eq!(r.value(), &json!(3));
    let r = run(&s, "In[1]").await;
    assert_eq!(r.value(), &json!("1"));
}

#[tokio::test]
async fn an_exception_gives_an_error_outcome_with_the_cells_own_traceback() {
    let s = session().await;
    let r = run(&s, "def g():\n    return 1 / 0\nprint('before')\ng()").await;
    assert_eq!(
        r.out(),
        "before\n",
        "output printed before the exception arrives"
    );
    match r.status() {
        OutcomeStatus::Error {
            ename,
            evalue,
            traceback,
        } => {
            assert_eq!(ename, "ZeroDivisionError");
            assert_eq!(evalue, "division by zero");
            assert!(traceback.contains("return 1 / 0"), "{traceback}");
            assert!(!traceback.contains("capsule_worker"), "{traceback}");
        }
        other => panic!("expected error, got {other:?}"),
    }
    // The session goes on.
    assert_eq!(run(&s, "2 + 2").await.value(), &json!(4));
}

#[tokio::test]
async fn syntax_errors_and_system_exit_are_error_outcomes_and_the_worker_survives() {
    let s = session().await;
    let r = run(&s, "x = = 1").await;
    assert!(matches!(r.status(), OutcomeStatus::Error { ename, .. } if ename == "SyntaxError"));
    let r = run(&s, "raise SystemExit(3)").await;
    assert!(matches!(r.status(), OutcomeStatus::Error { ename, .. } if ename == "SystemExit"));
    assert_eq!(run(&s, "'alive'").await.value(), &json!("alive"));
    let info = s.info().await.expect("info");
    assert_eq!(info.workers_started, 1);
}

#[tokio::test]
async fn top_level_await_works_and_tasks_survive_into_later_cells() {
    let s = session().await;
    let r = run(&s, "import asyncio\nawait asyncio.sleep(0, 'r')").await;
    assert_eq!(r.value(), &json!("r"));
    run(
        &s,
        "ticks = []\nasync def ticker():\n    while True:\n        ticks.append(1)\n        await asyncio.sleep(0)\ntask = asyncio.get_event_loop().create_task(ticker())",
    )
    .await;
    let r = run(
        &s,
        "before = len(ticks)\nawait asyncio.sleep(0.01)\n(task.done(), len(ticks) > before)",
    )
    .await;
    assert_eq!(r.value(), &json!([false, true]));
}

#[tokio::test]
async fn concurrent_executes_queue_and_run_in_submission_order() {
    let s = session().await;
    run(&s, "order = []").await;
    let mut execs = Vec::new();
    for i in 0..5 {
        execs.push(
            s.execute(format!("order.append({i})\n{i}"))
                .await
                .expect("queued"),
        );
    }
    for (i, e) in execs.into_iter().enumerate() {
        assert_eq!(drain(e).await.value(), &json!(i));
    }
    assert_eq!(run(&s, "order").await.value(), &json!([0, 1, 2, 3, 4]));
}

#[tokio::test]
async fn info_reports_the_worker_and_counters() {
    let s = session().await;
    run(&s, "x = bytearray(10_000_000)").await;
    run(&s, "1/0").await;
    let info = s.info().await.expect("info");
    assert!(info.pid.is_some());
    assert!(info.rss_bytes.is_some_and(|r| r > 10_000_000), "{info:?}");
    assert!(info.cpu_seconds.is_some());
    assert_eq!(info.executions, 2);
    assert_eq!(info.errors, 1);
    assert_eq!(info.protocol_version, 1);
    assert!(!info.python.is_empty());
    s.shutdown().await.expect("shutdown");
    assert!(
        s.execute("1").await.is_err(),
        "a closed session refuses work"
    );
}

#[tokio::test]
async fn info_right_after_an_outcome_already_counts_that_cell() {
    let s = session().await;
    for i in 1..=50u64 {
        run(&s, "1/0").await;
        let info = s.info().await.expect("info");
        assert_eq!(
            (info.errors, info.executions, info.state),
            (i, i, capsule_session::SessionState::Idle),
            "after cell {i}"
        );
    }
}
