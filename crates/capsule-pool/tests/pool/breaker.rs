//! The circuit breaker: closed → open → half-open → (open →) closed, with typed errors.

use std::path::PathBuf;
use std::time::Duration;

use capsule_pool::{BreakerState, PoolError};

use crate::support::{config, guard, ok, start, wait, ACQUIRE};

fn real_python() -> PathBuf {
    let python = std::env::var("CAPSULE_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(python)
        .args([
            "-c",
            "import os, sys; print(os.path.realpath(sys.executable))",
        ])
        .output()
        .expect("python runs");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn rewire(link: &std::path::Path, target: &std::path::Path) {
    let tmp = link.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).expect("symlink");
    std::fs::rename(&tmp, link).expect("rename");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_on_a_broken_interpreter_and_closes_after_recovery() {
    let dir = tempfile::tempdir().expect("tempdir");
    let link = dir.path().join("python3");
    rewire(&link, &dir.path().join("missing-python"));
    let mut c = config();
    c.session.python = Some(link.clone());
    c.breaker.threshold = 2;
    c.breaker.base_backoff = Duration::from_millis(100);
    c.breaker.max_backoff = Duration::from_millis(400);
    let pool = start(c).await;

    // Closed: each acquire's creation fails with the creation error.
    for _ in 0..2 {
        match pool.acquire(ACQUIRE).await {
            Err(PoolError::Create { message }) => assert!(!message.is_empty()),
            other => panic!("expected Create, got {other:?}"),
        }
    }
    assert_eq!(pool.info().breaker.state, BreakerState::Open);
    // Open: fail fast, saying when to retry and why.
    let retry_in = match pool.acquire(ACQUIRE).await {
        Err(PoolError::BreakerOpen {
            retry_in,
            last_error,
        }) => {
            assert!(!last_error.is_empty());
            retry_in
        }
        other => panic!("expected BreakerOpen, got {other:?}"),
    };
    // After the backoff the next acquire is the half-open probe; still broken → open again.
    tokio::time::sleep(retry_in).await;
    assert!(matches!(
        pool.acquire(ACQUIRE).await,
        Err(PoolError::Create { .. })
    ));
    let retry_in = match pool.acquire(ACQUIRE).await {
        Err(PoolError::BreakerOpen { retry_in, .. }) => retry_in,
        other => panic!("expected BreakerOpen, got {other:?}"),
    };

    // Fix the interpreter; the next probe succeeds and closes the breaker.
    rewire(&link, &real_python());
    tokio::time::sleep(retry_in).await;
    let pool2 = pool.clone();
    let probe = tokio::spawn(async move { pool2.acquire(ACQUIRE).await });
    wait(&pool, "probe in flight", |i| {
        i.breaker.state == BreakerState::HalfOpen && i.creating == 1
    })
    .await;
    // Half-open with the probe in flight: others fail fast instead of piling on.
    match pool.acquire(ACQUIRE).await {
        Err(PoolError::BreakerOpen { retry_in, .. }) => assert_eq!(retry_in, Duration::ZERO),
        other => panic!("expected BreakerOpen while probing, got {other:?}"),
    }
    let s = guard("probe", probe)
        .await
        .expect("task")
        .expect("probe acquire");
    assert_eq!(ok(&s, "6 * 7").await, "42");
    let info = pool.info();
    assert_eq!(info.breaker.state, BreakerState::Closed);
    let path: Vec<_> = info
        .breaker
        .transitions
        .iter()
        .map(|t| (t.from, t.to))
        .collect();
    use BreakerState::*;
    assert_eq!(
        path,
        [
            (Closed, Open),
            (Open, HalfOpen),
            (HalfOpen, Open),
            (Open, HalfOpen),
            (HalfOpen, Closed)
        ]
    );
    assert_eq!(info.creation_failures, 3);
    drop(s);
    pool.stop().await;
}
