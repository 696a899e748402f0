//! Session pools on the command line: `capsule pool status [--json]`, and the pool behind the
//! interactive front doors (`capsule stdio`, `capsule repl`).
//!
//! One place builds every [`PoolConfig`] the binary uses ([`build`]): precedence is flag >
//! `CAPSULE_POOL_*` / `CAPSULE_*` environment > defaults, as everywhere else.
//! [`front_door`] is the front doors' variant: `min_idle` is the number of warm **spares** kept
//! beside the one session in use (default 1), and `max_sessions` defaults to spares + 2 (the
//! session in use, the spares, and the spent session a replacement takes over from).
//!
//! `capsule pool status` starts a pool with the effective configuration, waits until
//! `min_idle` sessions are warm, prints [`capsule_pool::PoolInfo`] and stops the pool.
//!
//! Glue only: the pool's logic lives in `capsule-pool`; this module converts its report to
//! text or JSON at the edge.

use std::time::{Duration, Instant};

use anyhow::anyhow;
use capsule_pool::{PoolConfig, SessionPool};
use capsule_session::{ConfigError, SessionConfig};
use clap::Subcommand;

use crate::{code, Failure};

/// Pool settings given as flags; each overrides its `CAPSULE_POOL_*` variable.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides {
    /// `min_idle` (`CAPSULE_POOL_MIN_IDLE`).
    pub min_idle: Option<usize>,
    /// `max_sessions` (`CAPSULE_POOL_MAX_SESSIONS`).
    pub max_sessions: Option<usize>,
    /// `warm_imports` (`CAPSULE_POOL_WARM_IMPORTS`).
    pub warm_imports: Option<Vec<String>>,
}

/// `base` overlaid with the `CAPSULE_POOL_*` variables found through `env`, then with the flags.
pub fn build(
    base: PoolConfig,
    flags: &Overrides,
    env: impl Fn(&str) -> Option<String>,
) -> Result<PoolConfig, ConfigError> {
    let mut config = base.with_env(env)?;
    if let Some(n) = flags.max_sessions {
        config.max_sessions = n;
    }
    if let Some(n) = flags.min_idle {
        config.min_idle = n;
    }
    if let Some(w) = &flags.warm_imports {
        config.warm_imports = w.clone();
    }
    config.validate()?;
    Ok(config)
}

/// The pool of an interactive front door: `spares` (flag, else `CAPSULE_POOL_MIN_IDLE`, else 1)
/// warm sessions wait beside the one in use, so a lost worker is replaced without a cold start.
/// `max_sessions` (`CAPSULE_POOL_MAX_SESSIONS`) defaults to spares + 2: the session in use, the
/// spares, and room to take a fresh session while the spent one is still held (with no spare,
/// that fresh session is created on demand). A smaller value is a usage error.
pub fn front_door(
    session: SessionConfig,
    spares: Option<usize>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<PoolConfig, ConfigError> {
    let max_from_env = env("CAPSULE_POOL_MAX_SESSIONS").is_some();
    let flags = Overrides {
        min_idle: spares,
        ..Overrides::default()
    };
    let base = PoolConfig {
        session,
        // Set below from the spares, unless the environment sets it.
        max_sessions: usize::MAX,
        ..PoolConfig::default()
    };
    let mut config = build(base, &flags, env)?;
    let needed = config.min_idle.saturating_add(2);
    if !max_from_env {
        config.max_sessions = needed;
    } else if config.max_sessions < needed {
        return Err(ConfigError::Invalid {
            key: "CAPSULE_POOL_MAX_SESSIONS",
            value: config.max_sessions.to_string(),
            reason: format!(
                "a front door needs room for the session in use, {} warm spare(s) and a replacement: at least {needed}",
                config.min_idle
            ),
        });
    }
    config.validate()?;
    Ok(config)
}

/// `capsule pool ...` subcommands.
#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Start a pool, wait for its warm sessions, print its status (hit rate, creation latency,
    /// warm imports, breaker, per-session RSS) and stop it.
    Status {
        /// Print PoolInfo as JSON.
        #[arg(long)]
        json: bool,
        /// Sessions to keep warm (overrides CAPSULE_POOL_MIN_IDLE).
        #[arg(long)]
        min_idle: Option<usize>,
        /// Maximum sessions (overrides CAPSULE_POOL_MAX_SESSIONS).
        #[arg(long)]
        max_sessions: Option<usize>,
        /// Comma-separated modules to import in every session (overrides
        /// CAPSULE_POOL_WARM_IMPORTS).
        #[arg(long, value_delimiter = ',')]
        warm_imports: Option<Vec<String>>,
    },
}

/// Runs a `capsule pool` subcommand with the resolved session configuration.
pub async fn run(session: SessionConfig, cmd: PoolCommand) -> Result<u8, Failure> {
    let PoolCommand::Status {
        json,
        min_idle,
        max_sessions,
        warm_imports,
    } = cmd;
    let flags = Overrides {
        min_idle,
        max_sessions,
        warm_imports,
    };
    let base = PoolConfig {
        session,
        ..PoolConfig::default()
    };
    let config = build(base, &flags, |k| std::env::var(k).ok()).map_err(Failure::usage)?;
    let t0 = Instant::now();
    let pool = SessionPool::start(config).await.map_err(Failure::start)?;
    let ready = tokio::time::timeout(Duration::from_secs(120), pool.wait_ready()).await;
    let elapsed = t0.elapsed();
    let info = pool.info();
    pool.stop().await;
    match ready {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(Failure::start(e)),
        Err(_) => {
            return Err(Failure::start(anyhow!(
                "the pool did not become ready in 120 s"
            )))
        }
    }
    if json {
        let mut v = serde_json::to_value(&info).map_err(|e| Failure::from(anyhow!(e)))?;
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "ready_ms".into(),
                serde_json::json!(elapsed.as_secs_f64() * 1000.0),
            );
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| Failure::from(anyhow!(e)))?
        );
        return Ok(code::OK);
    }
    println!(
        "pool {}  (ready in {:.1} ms)",
        info.fingerprint,
        elapsed.as_secs_f64() * 1000.0
    );
    println!(
        "  sessions: {} idle, {} active, {} total (min_idle {}, max {})",
        info.idle, info.active, info.total, info.config.min_idle, info.config.max_sessions
    );
    for (path, h) in &info.creation_latency {
        println!(
            "  created via {path}: {} (mean {:.1} ms incl. warm-up)",
            info.created_by_path.get(path).copied().unwrap_or(0),
            h.mean_us / 1000.0
        );
    }
    println!(
        "  breaker: {} ({} consecutive failures){}",
        info.breaker.state.as_str(),
        info.breaker.consecutive_failures,
        info.breaker
            .last_error
            .as_deref()
            .map(|e| format!(", last error: {e}"))
            .unwrap_or_default()
    );
    for w in &info.warm_imports {
        match &w.last_error {
            None => println!(
                "  warm import {}: ok, {:.1} ms",
                w.module, w.mean_latency_ms
            ),
            Some(e) => println!("  warm import {}: FAILED ({e})", w.module),
        }
    }
    for s in &info.sessions {
        println!(
            "  session {} pid {} {} rss {}",
            s.id,
            s.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            s.state,
            s.rss_bytes
                .map(|b| format!("{:.1} MiB", b as f64 / 1048576.0))
                .unwrap_or_else(|| "?".into())
        );
    }
    Ok(code::OK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn flags_override_the_environment() {
        let flags = Overrides {
            min_idle: Some(3),
            ..Overrides::default()
        };
        let c = build(
            PoolConfig::default(),
            &flags,
            env(&[
                ("CAPSULE_POOL_MIN_IDLE", "2"),
                ("CAPSULE_POOL_MAX_SESSIONS", "5"),
            ]),
        )
        .expect("valid");
        assert_eq!((c.min_idle, c.max_sessions), (3, 5));
    }

    #[test]
    fn a_front_door_keeps_one_spare_beside_the_session_in_use_by_default() {
        let c = front_door(SessionConfig::default(), None, env(&[])).expect("valid");
        assert_eq!((c.min_idle, c.max_sessions), (1, 3));
        let c = front_door(SessionConfig::default(), Some(0), env(&[])).expect("valid");
        assert_eq!((c.min_idle, c.max_sessions), (0, 2));
        let c = front_door(
            SessionConfig::default(),
            None,
            env(&[("CAPSULE_POOL_MIN_IDLE", "2")]),
        )
        .expect("valid");
        assert_eq!((c.min_idle, c.max_sessions), (2, 4));
        let c = front_door(
            SessionConfig::default(),
            None,
            env(&[("CAPSULE_POOL_MIN_IDLE", "20")]),
        )
        .expect("valid");
        assert_eq!((c.min_idle, c.max_sessions), (20, 22));
    }

    #[test]
    fn a_front_door_refuses_a_cap_that_leaves_no_room_for_its_spares() {
        let e = front_door(
            SessionConfig::default(),
            Some(1),
            env(&[("CAPSULE_POOL_MAX_SESSIONS", "2")]),
        )
        .expect_err("1 in use + 1 spare + 1 replacement > 2");
        assert!(e.to_string().contains("CAPSULE_POOL_MAX_SESSIONS"), "{e}");
        let c = front_door(
            SessionConfig::default(),
            Some(1),
            env(&[("CAPSULE_POOL_MAX_SESSIONS", "8")]),
        )
        .expect("room to spare");
        assert_eq!((c.min_idle, c.max_sessions), (1, 8));
    }
}
