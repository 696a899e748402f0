//! Pool benchmark (not a test: no thresholds). Prints medians and p99s, next to a plain
//! `Session::start` measured in the same run:
//!
//! * plain spawn: `Session::start` → ready (the floor a pool hides), under the default
//!   sandbox policy and under `none`;
//! * fork server vs plain spawn, interleaved, under the default policy and under `none`:
//!   `Session::start_with(.., ForkServer)` → ready, and the same session's first cell;
//! * pool creation: start + warm-up cell, as recorded by the pool's histogram;
//! * pool start with `min_idle = 4` until 4 sessions are ready;
//! * warm acquire (idle hit), measured around `acquire()` by the caller.
//!
//! Run: `cargo run --release -p capsule-pool --example pool_bench [ROUNDS]`

use std::time::{Duration, Instant};

use std::sync::Arc;

use capsule_pool::{ForkServer, PoolConfig, SessionPool};
use capsule_session::{Launcher, Session, SessionConfig};

fn pct(samples: &mut [Duration], q: f64) -> f64 {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
    samples[i].as_secs_f64() * 1e6
}

fn line(name: &str, samples: &mut [Duration]) {
    println!(
        "{name:<40} n={:<5} p50={:>10.1} us  p99={:>10.1} us",
        samples.len(),
        pct(samples, 0.5),
        pct(samples, 0.99)
    );
}

/// Plain spawn vs fork server, both under `cfg`'s policy, interleaved.
async fn spawn_vs_fork(
    policy: &str,
    cfg: &SessionConfig,
) -> Result<(), Box<dyn std::error::Error>> {
    let fork = ForkServer::new(cfg, &[]).map_err(|e| e.to_string())?;
    let launcher: Arc<dyn Launcher> = fork.clone();
    // Start the template outside the measurement.
    Session::start_with(cfg.clone(), Some(launcher.clone()))
        .await?
        .shutdown()
        .await?;
    let (mut spawned, mut forked, mut spawn_first, mut fork_first) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut spawn_hs, mut fork_hs) = (Vec::new(), Vec::new());
    for _ in 0..40 {
        let t = Instant::now();
        let s = Session::start(cfg.clone()).await?;
        spawned.push(t.elapsed());
        spawn_hs.extend(s.info().await?.start_latency);
        s.run("x = 1").await?;
        spawn_first.push(t.elapsed());
        s.shutdown().await?;
        let t = Instant::now();
        let s = Session::start_with(cfg.clone(), Some(launcher.clone())).await?;
        forked.push(t.elapsed());
        fork_hs.extend(s.info().await?.start_latency);
        s.run("x = 1").await?;
        fork_first.push(t.elapsed());
        s.shutdown().await?;
    }
    line(
        &format!("plain spawn (policy {policy}) -> ready"),
        &mut spawned,
    );
    line(
        &format!("fork server (policy {policy}) -> ready"),
        &mut forked,
    );
    line("  of which launch -> hello_ack (spawn)", &mut spawn_hs);
    line("  of which launch -> hello_ack (fork)", &mut fork_hs);
    line(
        &format!("plain spawn (policy {policy}) -> 1st cell"),
        &mut spawn_first,
    );
    line(
        &format!("fork server (policy {policy}) -> 1st cell"),
        &mut fork_first,
    );
    println!("fork server ({policy}): {:?}", fork.info());
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let mut session = SessionConfig::from_env()?;
    session.heartbeat = None;

    // Plain spawn.
    let mut plain = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let s = Session::start(session.clone()).await?;
        plain.push(t.elapsed());
        s.shutdown().await?;
    }
    line("plain spawn (default policy) -> ready", &mut plain);

    // Plain spawn vs fork server under the same policy, interleaved in the same run.
    let mut none = session.clone();
    none.sandbox = capsule_session::config::load_policy("none")?;
    for (policy, cfg) in [("default", session.clone()), ("none", none.clone())] {
        spawn_vs_fork(policy, &cfg).await?;
    }
    // Pool start to min_idle = 4.
    for (name, cfg, fork_server) in [
        (
            "pool start min_idle=4, spawn (default)",
            session.clone(),
            false,
        ),
        (
            "pool start min_idle=4, fork (default)",
            session.clone(),
            true,
        ),
    ] {
        let mut starts = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let pool = SessionPool::start(PoolConfig {
                min_idle: 4,
                max_sessions: 4,
                fork_server,
                spawn_while_warming: false,
                session: cfg.clone(),
                ..PoolConfig::default()
            })
            .await?;
            pool.wait_ready().await?;
            starts.push(t.elapsed());
            pool.stop().await;
        }
        line(name, &mut starts);
    }

    // Warm acquire.
    let n = 8;
    let pool = SessionPool::start(PoolConfig {
        min_idle: n,
        max_sessions: n,
        session: session.clone(),
        ..PoolConfig::default()
    })
    .await?;
    pool.wait_ready().await?;
    let mut hits = Vec::new();
    for _ in 0..rounds {
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let s = pool.acquire(Duration::from_secs(10)).await?;
            hits.push(t.elapsed());
            held.push(s);
        }
        drop(held);
        pool.wait_until(|i| i.idle == n).await;
    }
    line("warm acquire (idle hit)", &mut hits);
    let info = pool.info();
    for (path, h) in &info.creation_latency {
        println!(
            "{:<40} n={:<5} p50<={:>9} us  p99<={:>9} us  mean={:.1} us",
            format!("pool creation ({path}) incl. warm-up"),
            h.count,
            h.p50_le_us.unwrap_or(0),
            h.p99_le_us.unwrap_or(0),
            h.mean_us
        );
    }
    println!(
        "pool hit histogram: p50<={:?} us p99<={:?} us (bucket bounds), hit rate {:.3}",
        info.hit_latency.p50_le_us, info.hit_latency.p99_le_us, info.hit_rate
    );
    pool.stop().await;
    Ok(())
}
