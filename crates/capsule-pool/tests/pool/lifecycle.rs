//! Sessions leave the pool for the right reasons: recycling, idle timeout, RSS budgets, death.

use std::time::Duration;

use capsule_pool::EvictReason;

use crate::support::{await_exit, config, guard, ok, start, wait, ACQUIRE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recycles_after_n_executions_and_resets_the_counter() {
    let mut c = config();
    c.max_sessions = 1;
    c.recycle_after_executions = Some(3);
    let pool = start(c).await;
    let s = pool.acquire(ACQUIRE).await.expect("acquire");
    let first = s.key();
    ok(&s, "1").await;
    ok(&s, "2").await;
    s.release();
    let info = wait(&pool, "back after 2 cells", |i| i.idle == 1).await;
    assert_eq!(info.sessions[0].executions, 2, "warm-up cells do not count");
    let s = pool.acquire(ACQUIRE).await.expect("acquire");
    assert_eq!(s.key(), first);
    ok(&s, "3").await;
    s.release();
    wait(&pool, "recycled", |i| {
        i.evicted(EvictReason::Recycled) == 1 && i.returning == 0
    })
    .await;
    let s = pool.acquire(ACQUIRE).await.expect("acquire");
    let second = s.key();
    assert_ne!(second, first, "a fresh session after recycling");
    ok(&s, "1").await;
    ok(&s, "2").await;
    s.release();
    let info = wait(&pool, "back", |i| i.idle == 1).await;
    // The counter restarted at zero: two cells do not recycle the new session.
    assert_eq!(info.evicted(EvictReason::Recycled), 1);
    assert_eq!(info.sessions[0].key, second);
    assert_eq!(info.sessions[0].executions, 2);
    pool.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_beyond_min_idle_time_out() {
    let mut c = config();
    c.max_sessions = 3;
    c.min_idle = 1;
    c.idle_timeout = Some(Duration::from_millis(30));
    let pool = start(c).await;
    let held: Vec<_> = futures::future::join_all((0..3).map(|_| pool.acquire(ACQUIRE)))
        .await
        .into_iter()
        .map(|r| r.expect("acquire"))
        .collect();
    drop(held);
    // The health task wakes at the next idle expiry (a deadline), not on its baseline timer.
    let info = wait(&pool, "idle eviction", |i| {
        i.evicted(EvictReason::IdleTimeout) == 2 && i.total == 1
    })
    .await;
    assert_eq!(info.idle, 1, "min_idle is kept");
    pool.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_over_its_rss_budget_is_evicted_on_release() {
    let mut c = config();
    c.max_sessions = 1;
    c.session_rss_budget = Some(150 << 20);
    let pool = start(c).await;
    let s = pool.acquire(ACQUIRE).await.expect("acquire");
    let key = s.key();
    ok(&s, "x = b'x' * (200 << 20)").await;
    s.release();
    let info = wait(&pool, "rss eviction", |i| {
        i.evicted(EvictReason::SessionRss) == 1 && i.returning == 0
    })
    .await;
    assert!(info.sessions.iter().all(|s| s.key != key));
    let s = pool.acquire(ACQUIRE).await.expect("acquire");
    assert_ne!(s.key(), key);
    assert_eq!(ok(&s, "'x' in globals()").await, "False");
    drop(s);
    pool.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_pool_budget_idle_sessions_are_evicted_largest_first() {
    let mut c = config();
    c.max_sessions = 3;
    c.pool_rss_budget = Some(200 << 20);
    let pool = start(c).await;
    let held: Vec<_> = futures::future::join_all((0..3).map(|_| pool.acquire(ACQUIRE)))
        .await
        .into_iter()
        .map(|r| r.expect("acquire"))
        .collect();
    // A leak that survives reset (stashed on a module), pushing the pool over its budget.
    ok(
        &held[1],
        "import sys; sys.capsule_test_leak = b'x' * (220 << 20)",
    )
    .await;
    let big = held[1].key();
    drop(held);
    // Which small sessions go too depends on when the health pass sees them idle (while the
    // big one is still being cleaned, only small ones are evictable); the big one must go,
    // and the pool must end under its budget.
    let info = wait(&pool, "pool budget eviction", |i| {
        i.sessions.iter().all(|s| s.key != big) && i.returning == 0 && i.active == 0
    })
    .await;
    assert!(info.evicted(EvictReason::PoolRss) >= 1, "{info:#?}");
    assert!(info.rss_bytes_total <= 200 << 20, "{info:#?}");
    assert_eq!(info.evicted(EvictReason::SessionRss), 0);
    pool.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_externally_killed_worker_is_replaced_and_never_handed_out() {
    let mut c = config();
    c.max_sessions = 2;
    c.min_idle = 2;
    let pool = start(c).await;
    let info = guard("ready", pool.wait_ready()).await.expect("ready");
    let victim = info.sessions[0].pid.expect("pid");
    // SAFETY: kill(2) on a worker pid this test's pool started.
    unsafe {
        libc::kill(victim as libc::pid_t, libc::SIGKILL);
    }
    await_exit(victim).await;
    // Straight away: the dead worker must be skipped even if the health task has not run yet.
    for _ in 0..3 {
        let held: Vec<_> = futures::future::join_all((0..2).map(|_| pool.acquire(ACQUIRE)))
            .await
            .into_iter()
            .map(|r| r.expect("acquire"))
            .collect();
        for s in &held {
            assert_ne!(s.pid(), Some(victim), "a dead session was handed out");
            let pid = ok(s, "import os; os.getpid()").await;
            assert_ne!(pid, victim.to_string());
            let si = s.info().await.expect("info");
            assert_eq!(si.workers_lost, 0, "the acquirer's worker had died");
        }
        drop(held);
        wait(&pool, "returned", |i| i.idle == 2).await;
    }
    let info = pool.info();
    assert_eq!(info.evicted(EvictReason::Dead), 1);
    assert_eq!(info.sessions_created, 3, "one replacement");
    pool.stop().await;
}
