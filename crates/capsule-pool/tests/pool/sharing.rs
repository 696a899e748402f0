//! Acquire/release under concurrency: the cap holds, nobody shares a session, waiters are FIFO,
//! timeouts and stop are typed.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capsule_pool::PoolError;

use crate::support::{config, guard, ok, start, wait, ACQUIRE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_acquirers_never_exceed_max_or_share_a_session() {
    let mut c = config();
    c.max_sessions = 4;
    c.min_idle = 2;
    let pool = start(c).await;
    let in_use = Arc::new(Mutex::new(HashSet::new()));
    let mut tasks = Vec::new();
    for t in 0..24u32 {
        let pool = pool.clone();
        let in_use = in_use.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..4u32 {
                let s = pool.acquire(ACQUIRE).await.expect("acquire");
                assert!(
                    in_use.lock().expect("lock").insert(s.key()),
                    "session {} handed out twice",
                    s.key()
                );
                let info = pool.info();
                assert!(
                    info.total <= 4 && info.active <= 4,
                    "over the cap: {info:?}"
                );
                // A second holder would overwrite `holder` between these cells.
                ok(&s, &format!("holder = {t}")).await;
                tokio::task::yield_now().await;
                assert_eq!(ok(&s, "holder").await, t.to_string(), "round {round}");
                assert!(in_use.lock().expect("lock").remove(&s.key()));
                s.release();
            }
        }));
    }
    for t in tasks {
        guard("acquirers", t).await.expect("task");
    }
    let info = wait(&pool, "all returned", |i| i.active == 0 && i.returning == 0).await;
    assert!(info.total <= 4);
    assert_eq!(info.hits + info.misses, 96);
    assert!(info.sessions_created <= 4, "{info:?}");
    assert_eq!(info.acquire_latency.count, 96);
    pool.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_in_arrival_order() {
    let mut c = config();
    c.max_sessions = 1;
    c.min_idle = 1;
    let pool = start(c).await;
    guard("ready", pool.wait_ready()).await.expect("ready");
    let held = pool.acquire(ACQUIRE).await.expect("acquire");
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for n in 0..4usize {
        let (pool2, order2) = (pool.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let s = pool2.acquire(ACQUIRE).await.expect("acquire");
            order2.lock().expect("lock").push(n);
            ok(&s, "1").await;
            s.release();
        }));
        wait(&pool, "waiter queued", move |i| i.waiters == n + 1).await;
    }
    held.release();
    for t in tasks {
        guard("waiters", t).await.expect("task");
    }
    assert_eq!(*order.lock().expect("lock"), vec![0, 1, 2, 3]);
    let info = pool.info();
    assert_eq!(info.sessions_created, 1, "one session served everyone");
    pool.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_times_out_with_a_typed_error() {
    let mut c = config();
    c.max_sessions = 1;
    let pool = start(c).await;
    let held = pool.acquire(ACQUIRE).await.expect("acquire");
    match pool.acquire(Duration::from_millis(50)).await {
        Err(PoolError::Timeout {
            active,
            max_sessions,
            ..
        }) => assert_eq!((active, max_sessions), (1, 1)),
        other => panic!("expected a timeout, got {other:?}"),
    }
    let info = pool.info();
    assert_eq!((info.timeouts, info.waiters), (1, 0));
    drop(held);
    // The slot is usable again after the timed-out waiter left.
    let s = pool.acquire(ACQUIRE).await.expect("acquire after timeout");
    ok(&s, "1").await;
    drop(s);
    pool.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_wakes_waiters_rejects_acquires_and_ends_sessions() {
    let mut c = config();
    c.max_sessions = 1;
    let pool = start(c).await;
    let held = pool.acquire(ACQUIRE).await.expect("acquire");
    let pool2 = pool.clone();
    let waiter = tokio::spawn(async move { pool2.acquire(ACQUIRE).await });
    wait(&pool, "waiter queued", |i| i.waiters == 1).await;
    guard("stop", pool.stop()).await;
    match guard("waiter", waiter).await.expect("task") {
        Err(PoolError::Stopped) => {}
        other => panic!("expected Stopped, got {other:?}"),
    }
    assert!(matches!(
        pool.acquire(ACQUIRE).await,
        Err(PoolError::Stopped)
    ));
    // The handed-out session was shut down too.
    assert!(
        held.run("1").await.is_err(),
        "session still running after stop"
    );
    drop(held);
    let info = wait(&pool, "empty", |i| i.total == 0).await;
    assert!(info.stopped);
}
