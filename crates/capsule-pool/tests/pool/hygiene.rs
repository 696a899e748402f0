//! What the next acquirer sees: nothing of the previous one; warm imports already loaded.

use crate::support::{config, guard, ok, start, wait, ACQUIRE};
use capsule_pool::{EvictReason, Reuse};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_state_leaks_between_acquirers() {
    let mut c = config();
    c.max_sessions = 1;
    let pool = start(c).await;
    let a = pool.acquire(ACQUIRE).await.expect("acquire");
    let key = a.key();
    let scratch = a.info().await.expect("info").scratch_dir;
    let fresh_history = ok(&a, "len(In)").await;
    ok(&a, "secret = 'a'\ndef helper(): return secret\nimport os\nopen('left-behind.txt', 'w').write('x')\nos.makedirs('sub/dir')\nimport asyncio\nasync def forever():\n    await asyncio.sleep(3600)\n").await;
    ok(
        &a,
        "t = asyncio.ensure_future(forever())\nawait asyncio.sleep(0)",
    )
    .await;
    ok(&a, "os.chdir('/')").await;
    ok(&a, "secret").await;
    a.release();
    wait(&pool, "session back", |i| i.idle == 1).await;
    let b = pool.acquire(ACQUIRE).await.expect("acquire");
    assert_eq!(b.key(), key, "same session, wiped");
    assert_eq!(ok(&b, "len(In)").await, fresh_history, "history restarted");
    assert_eq!(
        ok(
            &b,
            "[k for k in ('secret', 'helper', 'os', 'asyncio', 't', 'forever') if k in globals()]"
        )
        .await,
        "[]"
    );
    assert_eq!(ok(&b, "import os; sorted(os.listdir('.'))").await, "[]");
    assert_eq!(
        ok(&b, "os.getcwd()").await,
        format!("{:?}", scratch.display().to_string()).replace('"', "'")
    );
    assert_eq!(
        ok(&b, "import asyncio; len([t for t in asyncio.all_tasks(asyncio.get_event_loop()) if not t.done()]) if 'asyncio' in __import__('sys').modules else 0").await,
        "0"
    );
    drop(b);
    pool.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_mode_hands_out_a_fresh_session() {
    let mut c = config();
    c.max_sessions = 1;
    c.reuse = Reuse::Replace;
    let pool = start(c).await;
    let a = pool.acquire(ACQUIRE).await.expect("acquire");
    let key = a.key();
    ok(&a, "x = 1").await;
    a.release();
    let b = pool.acquire(ACQUIRE).await.expect("acquire");
    assert_ne!(b.key(), key);
    assert_eq!(ok(&b, "'x' in globals()").await, "False");
    drop(b);
    let info = wait(&pool, "both replaced", |i| {
        i.evicted(EvictReason::Replaced) == 2 && i.returning == 0
    })
    .await;
    assert_eq!(info.sessions_created, 2);
    pool.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_imports_are_loaded_and_reported() {
    let mut c = config();
    c.min_idle = 1;
    c.warm_imports = ["json", "decimal", "sqlite3", "capsule_no_such_module"]
        .map(String::from)
        .to_vec();
    let pool = start(c).await;
    let info = guard("ready", pool.wait_ready()).await.expect("ready");
    let s = pool.acquire(ACQUIRE).await.expect("acquire");
    assert_eq!(
        ok(
            &s,
            "import sys; [m for m in ('json', 'decimal', 'sqlite3') if m in sys.modules]"
        )
        .await,
        "['json', 'decimal', 'sqlite3']"
    );
    assert_eq!(
        ok(
            &s,
            "[m for m in ('json', 'decimal', 'sqlite3') if m in globals()]"
        )
        .await,
        "[]",
        "warm imports do not bind names"
    );
    assert_eq!(info.warm_imports.len(), 4);
    for w in &info.warm_imports[..3] {
        assert_eq!((w.successes, w.failures), (1, 0), "{w:?}");
        assert!(w.last_latency_ms > 0.0, "{w:?}");
    }
    let bad = &info.warm_imports[3];
    assert_eq!((bad.successes, bad.failures), (0, 1));
    assert!(
        bad.last_error
            .as_deref()
            .is_some_and(|e| e.contains("ModuleNotFoundError")),
        "{bad:?}"
    );
    drop(s);
    pool.stop().await;
}
