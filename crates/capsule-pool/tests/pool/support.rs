//! Shared helpers: test configs, a hang guard, and cell helpers.

use std::future::Future;
use std::time::Duration;

use capsule_pool::{PoolConfig, PoolInfo, SessionPool};
use capsule_session::{OutcomeStatus, Session, SessionConfig};

/// Session settings for tests: defaults plus the environment (CI picks the interpreter).
pub fn session_config() -> SessionConfig {
    let mut c = SessionConfig::from_env().expect("valid CAPSULE_* environment");
    c.heartbeat = None;
    c
}

/// A small pool: nothing warm, two sessions, no timers that could fire during a test.
pub fn config() -> PoolConfig {
    PoolConfig {
        min_idle: 0,
        max_sessions: 2,
        idle_timeout: None,
        recycle_after_executions: None,
        health_interval: Duration::from_secs(3600),
        // Creations wait for the fork server's template, so which path made a session is
        // deterministic (`fork::while_the_template_warms_sessions_are_spawned` covers the
        // default).
        spawn_while_warming: false,
        session: session_config(),
        ..PoolConfig::default()
    }
}

pub async fn start(config: PoolConfig) -> SessionPool {
    SessionPool::start(config).await.expect("pool starts")
}

/// Guards a wait against hanging forever (a failure, never a synchronisation device).
pub async fn guard<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(120), f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

pub async fn wait(pool: &SessionPool, what: &str, pred: impl Fn(&PoolInfo) -> bool) -> PoolInfo {
    let pool2 = pool.clone();
    match tokio::time::timeout(Duration::from_secs(120), pool2.wait_until(pred)).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}; pool: {:#?}", pool.info()),
    }
}

/// Runs a cell that must end `ok` and returns its repr.
pub async fn ok(s: &Session, code: &str) -> String {
    let done = s.run(code).await.expect("cell queued");
    match done.outcome.status {
        OutcomeStatus::Ok { repr, .. } => repr,
        other => panic!("cell {code:?} ended {other:?}; stderr: {}", done.stderr),
    }
}

pub const ACQUIRE: Duration = Duration::from_secs(60);

/// Waits (blocking, off the runtime) until `pid` has exited, via a pidfd.
pub async fn await_exit(pid: u32) {
    tokio::task::spawn_blocking(move || {
        // SAFETY: pidfd_open returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) } as i32;
        if fd < 0 {
            return;
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; blocks until the process exits.
        unsafe {
            libc::poll(&mut p, 1, -1);
            libc::close(fd);
        }
    })
    .await
    .expect("join");
}
