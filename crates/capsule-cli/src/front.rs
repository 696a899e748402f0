//! The session of an interactive front door (`capsule stdio`, `capsule repl`), taken from a
//! [`SessionPool`] so that a lost worker is replaced by a warm spare instead of a cold start.
//!
//! The pool ([`crate::pool::front_door`]) keeps `spares` warm sessions beside the one in use.
//! When a cell's outcome says the state is lost (`worker_lost`, `killed`, `timed_out` after a
//! kill) the front door calls [`FrontSession::replace`]: the spent session is discarded (the
//! pool shuts it down in the background) and an idle spare takes its place, so the next cell
//! runs on a worker that has already processed `site` and run a first cell; the pool then
//! warms a new spare. `restart` does the same ([`FrontSession::restart`]), falling back to a
//! restart in place (`Session::restart`, a cold start) when the pool cannot supply a session.
//!
//! Every replacement bumps the **epoch**, so a front door can tell whether a cell ran on the
//! session now in use. Nothing here depends on how the pool creates sessions (fork or spawn).
//!
//! [`FrontSession::stop`] stops the pool: every session it made, in use or spare, is shut down
//! and its worker has exited when it returns.

use std::collections::BTreeMap;
use std::time::Duration;

use capsule_pool::{PoolConfig, PoolError, PooledSession, SessionPool};
use capsule_session::{Session, SessionError};

use crate::model::{InfoDto, PoolDto};

/// Why the front door moved to a fresh session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// A cell's outcome said the state was lost (the worker is gone).
    WorkerLost,
    /// The client asked (`restart`, `%restart`).
    Restart,
}

impl Cause {
    /// Stable name (the `cause` of the stdio `restarted` event).
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::WorkerLost => "worker_lost",
            Cause::Restart => "restart",
        }
    }
}

/// Counters of a session when it was handed out: the pool's warm-up cells, which the client
/// never sent, are subtracted from what `info` reports.
#[derive(Clone, Copy, Debug, Default)]
struct Baseline {
    executions: u64,
    errors: u64,
}

/// The session in use, detached from the [`FrontSession`] so a caller can ask it things without
/// holding the front door's lock.
#[derive(Clone, Debug)]
pub struct Current {
    /// The session.
    pub session: Session,
    /// Bumped by every replacement and restart.
    pub epoch: u64,
    baseline: Baseline,
}

impl Current {
    /// The session's info as the client sees it (warm-up cells not counted).
    pub async fn info(&self) -> Result<InfoDto, SessionError> {
        let info = self.session.info().await?;
        let mut dto = InfoDto::from(&info);
        dto.executions = dto.executions.saturating_sub(self.baseline.executions);
        dto.errors = dto.errors.saturating_sub(self.baseline.errors);
        Ok(dto)
    }
}

/// The pool and the one session of a front door.
pub struct FrontSession {
    pool: SessionPool,
    /// The session in use (after [`FrontSession::stop`], a closed one).
    session: Session,
    /// Its pool lease; `None` only after [`FrontSession::stop`].
    lease: Option<PooledSession>,
    epoch: u64,
    baseline: Baseline,
    replacements: BTreeMap<&'static str, u64>,
    acquire_timeout: Duration,
}

impl FrontSession {
    /// Starts the pool and takes the first session. With `wait_spares`, then waits (at most
    /// the session start timeout) until the spares are warm too, so a crash in the very first
    /// cell already finds one; without, the spares warm in the background while the client
    /// already works. Errors are the message for the client.
    pub async fn start(config: PoolConfig, wait_spares: bool) -> Result<FrontSession, String> {
        // A creation is a start plus a warm-up cell, each bounded by the start timeout.
        let acquire_timeout = config.session.start_timeout.saturating_mul(2);
        let spare_timeout = config.session.start_timeout;
        let pool = SessionPool::start(config)
            .await
            .map_err(|e| format!("could not start a session: {e}"))?;
        let first = match pool.acquire(acquire_timeout).await {
            Ok(s) => s,
            Err(e) => {
                pool.stop().await;
                return Err(format!("could not start a session: {}", unwrap_create(&e)));
            }
        };
        let baseline = baseline(&first).await;
        if wait_spares {
            match tokio::time::timeout(spare_timeout, pool.wait_ready()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "the warm spare session is not ready"),
                Err(_) => tracing::warn!("the warm spare session is not ready in time"),
            }
        }
        Ok(FrontSession {
            pool,
            session: first.session().clone(),
            lease: Some(first),
            epoch: 0,
            baseline,
            replacements: BTreeMap::new(),
            acquire_timeout,
        })
    }

    /// A handle on the pool (for [`SessionPool::stop`] without the front door's lock).
    pub fn pool(&self) -> SessionPool {
        self.pool.clone()
    }

    /// The session in use.
    pub fn current(&self) -> Current {
        Current {
            session: self.session().clone(),
            epoch: self.epoch,
            baseline: self.baseline,
        }
    }

    /// The session in use (after [`FrontSession::stop`], a closed one: requests fail with
    /// `SessionError::Closed`).
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Bumped by every replacement and restart.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The pool as `info` reports it.
    pub fn pool_dto(&self) -> PoolDto {
        PoolDto::new(&self.pool.info(), self.replacements.clone())
    }

    /// Moves to a fresh session from the pool (normally a warm spare: no waiting) and discards
    /// the one in use; a cell still running there ends `worker_lost` as its worker is shut
    /// down. On error nothing changed.
    pub async fn replace(&mut self, cause: Cause) -> Result<(), PoolError> {
        let fresh = self.pool.acquire(self.acquire_timeout).await?;
        self.baseline = baseline(&fresh).await;
        tracing::info!(
            cause = cause.as_str(),
            session = %fresh.id(),
            pid = ?fresh.pid(),
            "moved to a fresh session from the pool"
        );
        self.session = fresh.session().clone();
        let spent = self.lease.replace(fresh);
        self.epoch += 1;
        *self.replacements.entry(cause.as_str()).or_insert(0) += 1;
        if let Some(spent) = spent {
            spent.discard();
        }
        Ok(())
    }

    /// A fresh namespace on a fresh worker: [`FrontSession::replace`], or when the pool cannot
    /// supply a session, a restart of the session in use (a cold start).
    pub async fn restart(&mut self) -> Result<(), SessionError> {
        match self.replace(Cause::Restart).await {
            Ok(()) => Ok(()),
            Err(PoolError::Stopped) => Err(SessionError::Closed),
            Err(e) => {
                tracing::warn!(error = %e, "the pool has no session to give; restarting in place");
                self.session().restart().await?;
                self.epoch += 1;
                Ok(())
            }
        }
    }

    /// Stops the pool: every session, in use or spare, is shut down (a running cell ends
    /// `worker_lost`) and every worker has exited when this returns. Idempotent.
    pub async fn stop(&mut self) {
        self.pool.stop().await;
        if let Some(s) = self.lease.take() {
            s.discard();
        }
    }
}

/// `acquire` errors from a failed first creation say "could not create a session: ...";
/// the caller already says "could not start a session".
fn unwrap_create(e: &PoolError) -> String {
    match e {
        PoolError::Create { message } => message.clone(),
        other => other.to_string(),
    }
}

async fn baseline(session: &Session) -> Baseline {
    match session.info().await {
        Ok(i) => Baseline {
            executions: i.executions,
            errors: i.errors,
        },
        Err(_) => Baseline::default(),
    }
}
