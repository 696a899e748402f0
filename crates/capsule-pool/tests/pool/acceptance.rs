//! POOL-001 acceptance: 200 concurrent clients × 50 cells through 16 sessions, zero errors,
//! zero cross-session leaks.

use std::time::Instant;

use capsule_pool::PoolConfig;
use capsule_session::OutcomeStatus;

use crate::support::{config, guard, start, wait, ACQUIRE};

const CLIENTS: usize = 200;
const CELLS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_fifty_cells_sixteen_sessions() {
    let pool = start(PoolConfig {
        min_idle: 16,
        max_sessions: 16,
        ..config()
    })
    .await;
    guard("ready", pool.wait_ready()).await.expect("ready");
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            let mut leaks = Vec::new();
            let s = pool.acquire(ACQUIRE).await.expect("acquire");
            let mine = format!("client_{client}");
            for cell in 0..CELLS {
                let code = if cell == 0 {
                    format!("{mine} = {client}\n[k for k in globals() if k.startswith('client_')]")
                } else {
                    format!("{mine} += 0\n[k for k in globals() if k.startswith('client_')]")
                };
                match s.run(code).await {
                    Ok(done) => match done.outcome.status {
                        OutcomeStatus::Ok { value, .. } => {
                            if value != serde_json::json!([mine]) {
                                leaks.push(format!("cell {cell}: {value}"));
                            }
                        }
                        other => errors.push(format!("cell {cell}: {other:?}")),
                    },
                    Err(e) => errors.push(format!("cell {cell}: {e}")),
                }
            }
            s.release();
            (errors, leaks)
        }));
    }
    let mut errors = Vec::new();
    let mut leaks = Vec::new();
    for t in tasks {
        let (e, l) = guard("clients", t).await.expect("client task");
        errors.extend(e);
        leaks.extend(l);
    }
    let elapsed = t0.elapsed();
    let info = wait(&pool, "all returned", |i| i.active == 0 && i.returning == 0).await;
    eprintln!(
        "{CLIENTS} clients x {CELLS} cells through {} sessions: {:.2} s, {} created, hit rate {:.2}, acquire p50 <= {:?} us",
        info.config.max_sessions,
        elapsed.as_secs_f64(),
        info.sessions_created,
        info.hit_rate,
        info.acquire_latency.p50_le_us
    );
    assert!(
        errors.is_empty(),
        "{} errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(
        leaks.is_empty(),
        "{} leaks: {:?}",
        leaks.len(),
        &leaks[..leaks.len().min(5)]
    );
    assert!(info.total <= 16 && info.sessions_created <= 16, "{info:#?}");
    assert_eq!(info.hits + info.misses, CLIENTS as u64);
    pool.stop().await;
}
