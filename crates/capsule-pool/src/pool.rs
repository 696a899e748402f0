//! [`SessionPool`] and [`PooledSession`]: the pool's state machine.
//!
//! One `std::sync::Mutex` guards the bookkeeping ([`State`]); it is held only for short,
//! synchronous sections and **never across an `.await`**. Everything slow (creating, checking,
//! wiping, shutting down sessions) runs in background tasks, woken by events:
//!
//! * the **warmer** (woken by a `Notify` on every acquire miss, release, creation, eviction)
//!   creates sessions while `waiters + (min_idle - idle)` exceeds what is already in flight,
//!   within `max_sessions` and as far as the circuit breaker allows; its only timer is the
//!   breaker's backoff deadline;
//! * the **health** task (woken by releases and worker deaths, plus a baseline timer and the
//!   next idle-expiry deadline) removes dead idle sessions, idle sessions past `idle_timeout`,
//!   and sessions over the RSS budgets;
//! * one **cleaning** task per release checks the session (dead, busy, recycle count, RSS) and
//!   wipes it (`reset`, scratch dir emptied, cwd restored) or replaces it, off the caller's path;
//! * one **death watcher** per worker: a pidfd that becomes readable when the process exits.
//!
//! Accounting: `total = idle + active + creating + returning ≤ max_sessions`, always, because a
//! slot is reserved (`creating += 1`) under the lock before any creation starts.
//! A session is handed to exactly one acquirer: it is either in `idle` (owned by the pool) or
//! moved into one [`PooledSession`]; the hand-off to a waiter moves it through a oneshot.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use capsule_session::{ExecuteRequest, Launcher, OutcomeStatus, Session, SessionState};
use tokio::runtime::Handle;
use tokio::sync::{oneshot, watch, Notify};

use crate::breaker::{jitter, Breaker};
use crate::config::{PoolConfig, Reuse};
use crate::error::PoolError;
use crate::fork::{ForkInfo, ForkServer};
use crate::liveness::Liveness;
use crate::metrics::{
    BreakerInfo, ConfigSummary, CreatePath, EvictReason, Histogram, PoolInfo, SessionSummary,
    WarmImportInfo,
};

/// A pool of warm, interchangeable sessions. Cheap to clone (a shared handle).
///
/// ```no_run
/// # async fn demo() -> Result<(), capsule_pool::PoolError> {
/// use std::time::Duration;
/// use capsule_pool::{PoolConfig, SessionPool};
/// let pool = SessionPool::start(PoolConfig { min_idle: 2, ..PoolConfig::default() }).await?;
/// let session = pool.acquire(Duration::from_secs(5)).await?;
/// let done = session.run("print(6 * 7)").await?;
/// assert_eq!(done.stdout, "42\n");
/// session.release(); // wiped in the background, then handed out again
/// pool.stop().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SessionPool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SessionPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionPool")
            .field("fingerprint", &self.inner.fingerprint)
            .finish()
    }
}

/// Wake-ups shared by the pool and its background tasks (which hold only a `Weak` pool).
struct Signals {
    warm: Notify,
    health: Notify,
    /// Bumped on every observable change; [`SessionPool::wait_until`] waits on it.
    changed: watch::Sender<u64>,
    stop: watch::Sender<bool>,
}

impl Signals {
    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

struct Inner {
    config: PoolConfig,
    fingerprint: String,
    runtime: Handle,
    state: Mutex<State>,
    signals: Arc<Signals>,
    hits: AtomicU64,
    misses: AtomicU64,
    timeouts: AtomicU64,
    acquire_errors: AtomicU64,
    acquire_latency: Histogram,
    hit_latency: Histogram,
    spawn_latency: Histogram,
    fork_latency: Histogram,
    created: AtomicU64,
    created_fork: AtomicU64,
    fork: Option<Arc<ForkServer>>,
    fork_disabled: Option<String>,
    creation_failures: AtomicU64,
    health_passes: AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Background tasks end; the sessions (dropped with the state) shut their workers down.
        self.signals.stop.send_replace(true);
    }
}

struct State {
    /// Ready sessions; released ones are pushed at the back and acquires pop from the back, so
    /// the front holds the longest-idle ones (evicted first by `idle_timeout`).
    idle: VecDeque<Entry>,
    active: usize,
    creating: usize,
    returning: usize,
    waiters: VecDeque<Waiter>,
    next_waiter: u64,
    next_key: u64,
    stopped: bool,
    breaker: Breaker,
    /// Every session the pool owns or has handed out, for info, RSS accounting and `stop`.
    sessions: BTreeMap<u64, Meta>,
    warm: BTreeMap<String, WarmAgg>,
    warned: HashSet<String>,
    evictions: BTreeMap<EvictReason, u64>,
}

impl State {
    fn total(&self) -> usize {
        self.idle.len() + self.active + self.creating + self.returning
    }
}

type HandOff = Result<PooledSession, PoolError>;

struct Waiter {
    id: u64,
    tx: oneshot::Sender<HandOff>,
}

/// A session owned by the pool (or moved into a [`PooledSession`]).
struct Entry {
    key: u64,
    session: Session,
    live: Arc<Liveness>,
    scratch: PathBuf,
    /// Cells the pool itself ran (warm-up, hygiene): not counted towards recycling.
    pool_cells: u64,
    idle_since: Instant,
}

struct Meta {
    session: Session,
    id: String,
    pid: Option<u32>,
    state: &'static str,
    rss: Option<u64>,
    executions: u64,
    uses: u64,
    created: Instant,
}

#[derive(Default)]
struct WarmAgg {
    successes: u64,
    failures: u64,
    last_ms: f64,
    total_ms: f64,
    last_error: Option<String>,
}

struct WarmResult {
    module: String,
    latency: Duration,
    error: Option<String>,
}

/// A session handed out by the pool. Derefs to [`Session`]. Dropping it (or
/// [`PooledSession::release`]) gives it back; the pool checks and wipes it in the background.
///
/// Do not keep clones of the inner `Session` past the release: the next acquirer owns it.
pub struct PooledSession {
    session: Session,
    key: u64,
    entry: Option<Entry>,
    pool: Weak<Inner>,
    discard: bool,
}

impl std::fmt::Debug for PooledSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledSession")
            .field("key", &self.key)
            .field("session", &self.session)
            .finish()
    }
}

impl PooledSession {
    fn new(entry: Entry, pool: Weak<Inner>) -> Self {
        PooledSession {
            session: entry.session.clone(),
            key: entry.key,
            entry: Some(entry),
            pool,
            discard: false,
        }
    }

    /// The session.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The pool-local key of this session (stable across uses; see [`PoolInfo::sessions`]).
    pub fn key(&self) -> u64 {
        self.key
    }

    /// Worker pid when it was handed out.
    pub fn pid(&self) -> Option<u32> {
        self.entry.as_ref().map(|e| e.live.pid)
    }

    /// Gives the session back (same as dropping it). Returns immediately; the check and wipe
    /// run in the background.
    pub fn release(self) {}

    /// Gives the session back for replacement instead of reuse (e.g. the holder knows its state
    /// is tainted).
    pub fn discard(mut self) {
        self.discard = true;
    }
}

impl Deref for PooledSession {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.session
    }
}

impl Drop for PooledSession {
    fn drop(&mut self) {
        let Some(entry) = self.entry.take() else {
            return;
        };
        match self.pool.upgrade() {
            Some(inner) => inner.release(entry, self.discard),
            None => {
                if let Ok(h) = Handle::try_current() {
                    let s = entry.session;
                    h.spawn(async move {
                        let _ = s.shutdown().await;
                    });
                }
            }
        }
    }
}

impl SessionPool {
    /// Validates `config`, starts the background tasks and begins filling to `min_idle` (in the
    /// background: this returns at once; see [`SessionPool::wait_ready`]). Must be called
    /// inside a tokio runtime.
    pub async fn start(config: PoolConfig) -> Result<SessionPool, PoolError> {
        config.validate()?;
        let (fork, fork_disabled) = if !config.fork_server {
            (
                None,
                Some("disabled by configuration (fork_server = false)".to_string()),
            )
        } else {
            match ForkServer::new(&config.session, &config.warm_imports) {
                Ok(f) => {
                    f.set_spawn_while_warming(config.spawn_while_warming);
                    (Some(f), None)
                }
                Err(why) => {
                    tracing::info!(reason = %why, "fork server off; sessions are spawned");
                    (None, Some(why))
                }
            }
        };
        let origin = Instant::now();
        let (changed, _) = watch::channel(0u64);
        let (stop, _) = watch::channel(false);
        let signals = Arc::new(Signals {
            warm: Notify::new(),
            health: Notify::new(),
            changed,
            stop,
        });
        let inner = Arc::new(Inner {
            fingerprint: config.fingerprint(),
            state: Mutex::new(State {
                idle: VecDeque::new(),
                active: 0,
                creating: 0,
                returning: 0,
                waiters: VecDeque::new(),
                next_waiter: 0,
                next_key: 0,
                stopped: false,
                breaker: Breaker::new(config.breaker.clone(), origin),
                sessions: BTreeMap::new(),
                warm: BTreeMap::new(),
                warned: HashSet::new(),
                evictions: BTreeMap::new(),
            }),
            config,
            runtime: Handle::current(),
            signals: signals.clone(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            acquire_errors: AtomicU64::new(0),
            acquire_latency: Histogram::default(),
            hit_latency: Histogram::default(),
            spawn_latency: Histogram::default(),
            fork_latency: Histogram::default(),
            created: AtomicU64::new(0),
            created_fork: AtomicU64::new(0),
            fork,
            fork_disabled,
            creation_failures: AtomicU64::new(0),
            health_passes: AtomicU64::new(0),
        });
        tracing::info!(fingerprint = %inner.fingerprint, min_idle = inner.config.min_idle, max_sessions = inner.config.max_sessions, "session pool starting");
        tokio::spawn(warmer(Arc::downgrade(&inner), signals.clone()));
        tokio::spawn(health(
            Arc::downgrade(&inner),
            signals.clone(),
            inner.config.health_interval,
        ));
        if let Some(fork) = &inner.fork {
            // The fork server's state is part of PoolInfo: its changes wake pool waiters too.
            // Ends when the fork server reports no more (dropped with the pool).
            let mut rx = fork.subscribe();
            let relay = Arc::downgrade(&signals);
            tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    match relay.upgrade() {
                        Some(s) => s.bump(),
                        None => break,
                    }
                }
            });
        }
        signals.warm.notify_one();
        Ok(SessionPool { inner })
    }

    /// The effective configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.config
    }

    /// Hands out a ready session: an idle one at once (no await on that path), else waits (in
    /// FIFO order with other waiters) for one being created or released, up to `timeout`.
    ///
    /// Errors: [`PoolError::Timeout`], [`PoolError::Stopped`], [`PoolError::BreakerOpen`]
    /// (immediately, when a session would have to be created and creation is failing),
    /// [`PoolError::Create`] (the creation made for this acquirer failed).
    pub async fn acquire(&self, timeout: Duration) -> Result<PooledSession, PoolError> {
        let t0 = Instant::now();
        let inner = &self.inner;
        let (id, mut rx) = {
            let mut st = inner.lock();
            if st.stopped {
                drop(st);
                inner.acquire_errors.fetch_add(1, Ordering::Relaxed);
                return Err(PoolError::Stopped);
            }
            let mut dead = Vec::new();
            let mut hit = None;
            while let Some(entry) = st.idle.pop_back() {
                if entry.live.is_dead() {
                    dead.push(inner.evict_locked(&mut st, entry, EvictReason::Dead));
                    continue;
                }
                st.active += 1;
                if let Some(m) = st.sessions.get_mut(&entry.key) {
                    m.state = "active";
                    m.uses += 1;
                }
                hit = Some(entry);
                break;
            }
            if let Some(entry) = hit {
                let refill = st.idle.len() < inner.config.min_idle || !dead.is_empty();
                drop(st);
                inner.shutdown_later(dead);
                if refill {
                    inner.signals.warm.notify_one();
                }
                inner.hits.fetch_add(1, Ordering::Relaxed);
                let took = t0.elapsed();
                inner.acquire_latency.record(took);
                inner.hit_latency.record(took);
                inner.signals.bump();
                return Ok(PooledSession::new(entry, Arc::downgrade(inner)));
            }
            // Miss. Fail fast if a creation would be needed and the breaker refuses it.
            let in_flight = st.creating + st.returning;
            if st.total() < inner.config.max_sessions && in_flight <= st.waiters.len() {
                if let Some(retry_in) = st.breaker.refuses(Instant::now()) {
                    let last_error = st.breaker.last_error.clone().unwrap_or_default();
                    drop(st);
                    inner.shutdown_later(dead);
                    inner.acquire_errors.fetch_add(1, Ordering::Relaxed);
                    return Err(PoolError::BreakerOpen {
                        retry_in,
                        last_error,
                    });
                }
            }
            let (tx, rx) = oneshot::channel();
            let id = st.next_waiter;
            st.next_waiter += 1;
            st.waiters.push_back(Waiter { id, tx });
            drop(st);
            inner.shutdown_later(dead);
            (id, rx)
        };
        inner.signals.warm.notify_one();
        inner.signals.bump();
        let result = match tokio::time::timeout_at((t0 + timeout).into(), &mut rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(PoolError::Stopped),
            Err(_) => {
                let removed = {
                    let mut st = inner.lock();
                    match st.waiters.iter().position(|w| w.id == id) {
                        Some(pos) => {
                            st.waiters.remove(pos);
                            true
                        }
                        None => false,
                    }
                };
                // Not in the queue any more: a hand-off raced the deadline and is in `rx`.
                let raced = if removed { None } else { rx.try_recv().ok() };
                match raced {
                    Some(r) => r,
                    None => Err(PoolError::Timeout {
                        waited: t0.elapsed(),
                        active: inner.lock().active,
                        max_sessions: inner.config.max_sessions,
                    }),
                }
            }
        };
        match &result {
            Ok(_) => {
                inner.misses.fetch_add(1, Ordering::Relaxed);
                inner.acquire_latency.record(t0.elapsed());
            }
            Err(PoolError::Timeout { .. }) => {
                inner.timeouts.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                inner.acquire_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        inner.signals.bump();
        result
    }

    /// A snapshot of the pool (synchronous; no session is asked anything).
    pub fn info(&self) -> PoolInfo {
        self.inner.info()
    }

    /// Waits until `pred` holds for the pool's state, re-checking on every change (no polling),
    /// and returns the snapshot that satisfied it. Wrap it in a timeout if it may never hold.
    pub async fn wait_until(&self, pred: impl Fn(&PoolInfo) -> bool) -> PoolInfo {
        let mut rx = self.inner.signals.changed.subscribe();
        loop {
            let info = self.info();
            if pred(&info) {
                return info;
            }
            if rx.changed().await.is_err() {
                return self.info();
            }
        }
    }

    /// Waits until `min_idle` sessions are ready. Fails with [`PoolError::BreakerOpen`] if
    /// creation fails often enough to open the breaker, or [`PoolError::Stopped`].
    pub async fn wait_ready(&self) -> Result<PoolInfo, PoolError> {
        let min = self.inner.config.min_idle;
        let info = self
            .wait_until(|i| {
                i.idle >= min || i.stopped || i.breaker.state == crate::BreakerState::Open
            })
            .await;
        if info.idle >= min {
            Ok(info)
        } else if info.stopped {
            Err(PoolError::Stopped)
        } else {
            Err(PoolError::BreakerOpen {
                retry_in: Duration::from_secs_f64(
                    info.breaker.retry_in_ms.unwrap_or(0.0).max(0.0) / 1000.0,
                ),
                last_error: info.breaker.last_error.unwrap_or_default(),
            })
        }
    }

    /// Runs a health pass now (it also runs on its own; see the module docs).
    pub fn check_health(&self) {
        self.inner.signals.health.notify_one();
    }

    /// Stops the pool: new acquires fail with [`PoolError::Stopped`], waiting acquirers are
    /// woken with it, and every session (idle or handed out) is shut down. Returns once
    /// in-flight creations and cleanings have finished. Idempotent.
    pub async fn stop(&self) {
        let inner = &self.inner;
        let (waiters, sessions) = {
            let mut st = inner.lock();
            st.stopped = true;
            let mut sessions = Vec::new();
            while let Some(e) = st.idle.pop_front() {
                sessions.push(inner.evict_locked(&mut st, e, EvictReason::Stopped));
            }
            // Handed-out sessions are shut down too; their holders see `Closed` errors and the
            // release path removes them.
            sessions.extend(st.sessions.values().map(|m| m.session.clone()));
            (std::mem::take(&mut st.waiters), sessions)
        };
        for w in waiters {
            let _ = w.tx.send(Err(PoolError::Stopped));
        }
        inner.signals.stop.send_replace(true);
        inner.signals.bump();
        futures::future::join_all(sessions.iter().map(|s| s.shutdown())).await;
        if let Some(f) = &inner.fork {
            f.shutdown();
        }
        self.wait_until(|i| i.creating == 0 && i.returning == 0)
            .await;
        tracing::info!(fingerprint = %inner.fingerprint, "session pool stopped");
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough counters; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes `entry`'s bookkeeping; the caller shuts the returned session down.
    fn evict_locked(&self, st: &mut State, entry: Entry, reason: EvictReason) -> Session {
        st.sessions.remove(&entry.key);
        *st.evictions.entry(reason).or_insert(0) += 1;
        tracing::debug!(session = %entry.session.id(), key = entry.key, reason = reason.as_str(), "session evicted");
        entry.session
    }

    fn shutdown_later(&self, sessions: Vec<Session>) {
        if sessions.is_empty() {
            return;
        }
        self.signals.warm.notify_one();
        self.runtime.spawn(async move {
            futures::future::join_all(sessions.iter().map(|s| s.shutdown())).await;
        });
    }

    /// Gives `entry` to the first waiter still waiting, or makes it idle. Lock held.
    fn offer(self: &Arc<Self>, st: &mut State, mut entry: Entry) {
        while let Some(w) = st.waiters.pop_front() {
            st.active += 1;
            let key = entry.key;
            match w
                .tx
                .send(Ok(PooledSession::new(entry, Arc::downgrade(self))))
            {
                Ok(()) => {
                    if let Some(m) = st.sessions.get_mut(&key) {
                        m.state = "active";
                        m.uses += 1;
                    }
                    return;
                }
                Err(back) => {
                    // The waiter gave up; take the session back without running its Drop
                    // (which would re-enter this lock).
                    st.active -= 1;
                    let Ok(mut ps) = back else { return };
                    match ps.entry.take() {
                        Some(e) => entry = e,
                        None => return,
                    }
                }
            }
        }
        entry.idle_since = Instant::now();
        if let Some(m) = st.sessions.get_mut(&entry.key) {
            m.state = "idle";
        }
        st.idle.push_back(entry);
    }

    fn release(self: &Arc<Self>, entry: Entry, discard: bool) {
        {
            let mut st = self.lock();
            st.active = st.active.saturating_sub(1);
            st.returning += 1;
            if let Some(m) = st.sessions.get_mut(&entry.key) {
                m.state = "returning";
            }
        }
        self.signals.bump();
        let inner = self.clone();
        self.runtime
            .spawn(async move { inner.clean(entry, discard).await });
    }

    /// Background half of a release: check, wipe or evict, then hand out or park.
    async fn clean(self: Arc<Self>, mut entry: Entry, discard: bool) {
        let verdict = if discard {
            Err(EvictReason::Replaced)
        } else {
            self.check_and_wipe(&mut entry).await
        };
        let evicted = {
            let mut st = self.lock();
            st.returning = st.returning.saturating_sub(1);
            if st.stopped {
                Some(self.evict_locked(&mut st, entry, EvictReason::Stopped))
            } else {
                match verdict {
                    Ok(()) => {
                        self.offer(&mut st, entry);
                        None
                    }
                    Err(reason) => Some(self.evict_locked(&mut st, entry, reason)),
                }
            }
        };
        self.signals.warm.notify_one();
        self.signals.health.notify_one();
        self.signals.bump();
        if let Some(s) = evicted {
            let _ = s.shutdown().await;
        }
    }

    async fn check_and_wipe(self: &Arc<Self>, entry: &mut Entry) -> Result<(), EvictReason> {
        let before = entry.session.info().await.map_err(|_| EvictReason::Dead)?;
        if matches!(before.state, SessionState::NoWorker | SessionState::Closed) {
            return Err(EvictReason::Dead);
        }
        match before.pid {
            // The session restarted its worker while it was handed out: watch the new one.
            Some(pid) if pid != entry.live.pid => entry.live = self.watch(pid),
            Some(_) => {}
            None => return Err(EvictReason::Dead),
        }
        if entry.live.is_dead() {
            return Err(EvictReason::Dead);
        }
        if let Some(m) = self.lock().sessions.get_mut(&entry.key) {
            m.rss = before.rss_bytes.or(m.rss);
            m.pid = before.pid;
        }
        if self.config.reuse == Reuse::Replace {
            return Err(EvictReason::Replaced);
        }
        if before.queued > 0 {
            return Err(EvictReason::Busy);
        }
        // RSS as released (before the wipe frees the namespace).
        if let (Some(budget), Some(rss)) = (self.config.session_rss_budget, before.rss_bytes) {
            if rss > budget {
                return Err(EvictReason::SessionRss);
            }
        }
        // Wipe the namespace, history and loop tasks (worker side). The reset queues behind a
        // cell still running: `Busy` in `before` is often just the actor not having processed
        // the finished cell's notice yet (the client sees the outcome first). A cell that really
        // keeps running gets the cancel grace period, then the session is replaced.
        let grace = if before.state == SessionState::Busy {
            self.config.session.cancel_grace
        } else {
            self.config.session.start_timeout
        };
        match tokio::time::timeout(grace, entry.session.reset()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(EvictReason::ResetFailed),
            Err(_) => return Err(EvictReason::Busy),
        }
        // Counted after the reset, when every cell of the holder has been accounted.
        let after = entry.session.info().await.map_err(|_| EvictReason::Dead)?;
        let user_execs = after.executions.saturating_sub(entry.pool_cells);
        if let Some(m) = self.lock().sessions.get_mut(&entry.key) {
            m.executions = user_execs;
        }
        if self
            .config
            .recycle_after_executions
            .is_some_and(|n| user_execs >= n)
        {
            return Err(EvictReason::Recycled);
        }
        // Scratch dir (here) and cwd (worker side).
        let scratch = entry.scratch.clone();
        tokio::task::spawn_blocking(move || empty_dir(&scratch))
            .await
            .map_err(|_| EvictReason::ResetFailed)?
            .map_err(|e| {
                tracing::debug!(error = %e, "emptying a scratch dir failed");
                EvictReason::ResetFailed
            })?;
        let hex: String = entry
            .scratch
            .as_os_str()
            .as_encoded_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let code = format!(
            "__import__('os').chdir(bytes.fromhex('{hex}').decode('utf-8', 'surrogateescape'))"
        );
        let done = entry
            .session
            .execute_with(ExecuteRequest {
                code,
                timeout: Some(self.config.session.start_timeout),
                history: false,
            })
            .await
            .map_err(|_| EvictReason::ResetFailed)?
            .collect()
            .await;
        entry.pool_cells += 1;
        if !matches!(done.outcome.status, OutcomeStatus::Ok { .. }) {
            return Err(EvictReason::ResetFailed);
        }
        Ok(())
    }

    /// A liveness handle for `pid` plus a watcher task that wakes the health check on exit.
    fn watch(&self, pid: u32) -> Arc<Liveness> {
        let live = Liveness::new(pid);
        let watched = live.clone();
        let signals = self.signals.clone();
        self.runtime.spawn(async move {
            if watched.clone().exited().await {
                tracing::debug!(pid, "pooled worker exited");
                signals.health.notify_one();
                signals.bump();
            }
        });
        live
    }

    /// Reserves slots and starts creations for unmet demand. Returns the breaker's retry
    /// deadline when it held creations back.
    fn rebalance(self: &Arc<Self>) -> Option<Instant> {
        let mut n = 0;
        let mut retry = None;
        {
            let mut st = self.lock();
            if st.stopped {
                return None;
            }
            let demand = st.waiters.len() + self.config.min_idle.saturating_sub(st.idle.len());
            let supply = st.creating + st.returning;
            let room = self.config.max_sessions.saturating_sub(st.total());
            let mut need = demand.saturating_sub(supply).min(room);
            let now = Instant::now();
            while need > 0 {
                match st.breaker.try_acquire(now) {
                    Ok(()) => {
                        st.creating += 1;
                        n += 1;
                        need -= 1;
                    }
                    Err(d) => {
                        if !d.is_zero() {
                            retry = Some(now + d);
                        }
                        break;
                    }
                }
            }
        }
        for _ in 0..n {
            let inner = self.clone();
            self.runtime.spawn(async move { inner.create_one().await });
        }
        if n > 0 {
            self.signals.bump();
        }
        retry
    }

    async fn create_one(self: Arc<Self>) {
        let t0 = Instant::now();
        let result = self.build().await;
        let latency = t0.elapsed();
        let rss = result.as_ref().ok().and_then(|(e, _)| read_rss(e.live.pid));
        let mut stop_it = None;
        {
            let mut st = self.lock();
            st.creating = st.creating.saturating_sub(1);
            let now = Instant::now();
            match result {
                Ok((mut entry, warm)) => {
                    st.breaker.on_success(now);
                    for w in warm {
                        self.record_warm(&mut st, w);
                    }
                    entry.key = st.next_key;
                    st.next_key += 1;
                    st.sessions.insert(
                        entry.key,
                        Meta {
                            session: entry.session.clone(),
                            id: entry.session.id().to_string(),
                            pid: Some(entry.live.pid),
                            state: "idle",
                            rss,
                            executions: 0,
                            uses: 0,
                            created: now,
                        },
                    );
                    self.created.fetch_add(1, Ordering::Relaxed);
                    let path = match &self.fork {
                        Some(f) if f.forked(entry.live.pid) => CreatePath::Fork,
                        _ => CreatePath::Spawn,
                    };
                    match path {
                        CreatePath::Fork => {
                            self.created_fork.fetch_add(1, Ordering::Relaxed);
                            self.fork_latency.record(latency);
                        }
                        CreatePath::Spawn => self.spawn_latency.record(latency),
                    }
                    tracing::debug!(session = %entry.session.id(), key = entry.key, pid = entry.live.pid, path = path.as_str(), latency_ms = latency.as_secs_f64() * 1000.0, "pooled session created");
                    if st.stopped {
                        stop_it = Some(self.evict_locked(&mut st, entry, EvictReason::Stopped));
                    } else {
                        self.offer(&mut st, entry);
                    }
                }
                Err(message) => {
                    self.creation_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(fingerprint = %self.fingerprint, error = %message, "pooled session creation failed");
                    st.breaker.on_failure(message.clone(), now, jitter());
                    while let Some(w) = st.waiters.pop_front() {
                        let err = PoolError::Create {
                            message: message.clone(),
                        };
                        if w.tx.send(Err(err)).is_ok() {
                            break;
                        }
                    }
                }
            }
        }
        self.signals.warm.notify_one();
        self.signals.bump();
        if let Some(s) = stop_it {
            let _ = s.shutdown().await;
        }
    }

    fn record_warm(&self, st: &mut State, w: WarmResult) {
        let ms = w.latency.as_secs_f64() * 1000.0;
        let agg = st.warm.entry(w.module.clone()).or_default();
        agg.last_ms = ms;
        agg.total_ms += ms;
        match w.error {
            None => agg.successes += 1,
            Some(e) => {
                agg.failures += 1;
                agg.last_error = Some(e.clone());
                if st.warned.insert(w.module.clone()) {
                    tracing::warn!(module = %w.module, error = %e, fingerprint = %self.fingerprint, "warm import failed (sessions are still handed out)");
                }
            }
        }
    }

    /// Starts and warms one session.
    async fn build(self: &Arc<Self>) -> Result<(Entry, Vec<WarmResult>), String> {
        let launcher = self.fork.clone().map(|f| f as Arc<dyn Launcher>);
        let session = Session::start_with(self.config.session.clone(), launcher)
            .await
            .map_err(|e| e.to_string())?;
        match self.warm_up(&session).await {
            Ok(r) => Ok(r),
            Err(e) => {
                let _ = session.shutdown().await;
                Err(e)
            }
        }
    }

    async fn warm_up(
        self: &Arc<Self>,
        session: &Session,
    ) -> Result<(Entry, Vec<WarmResult>), String> {
        let mut results = Vec::new();
        // `__import__` does not bind a name, so the namespace stays fresh. With no warm imports
        // a `pass` cell still pays `site` and the first cell's imports before a user arrives.
        let mut cells: Vec<(Option<&str>, String)> = self
            .config
            .warm_imports
            .iter()
            .map(|m| (Some(m.as_str()), format!("__import__('{m}')")))
            .collect();
        if cells.is_empty() {
            cells.push((None, "pass".to_string()));
        }
        // Counted here, not read from `info`: the session's counter may lag the outcome.
        let pool_cells = cells.len() as u64;
        for (module, code) in cells {
            let t = Instant::now();
            let done = session
                .execute_with(ExecuteRequest {
                    code,
                    timeout: Some(self.config.session.start_timeout),
                    history: false,
                })
                .await
                .map_err(|e| format!("warm-up: {e}"))?
                .collect()
                .await;
            let latency = t.elapsed();
            let error = match done.outcome.status {
                OutcomeStatus::Ok { .. } => None,
                OutcomeStatus::Error { ename, evalue, .. } => Some(format!("{ename}: {evalue}")),
                other => {
                    return Err(format!(
                        "warm-up {}: {}",
                        module.unwrap_or("pass"),
                        other.name()
                    ))
                }
            };
            if let Some(module) = module {
                results.push(WarmResult {
                    module: module.to_string(),
                    latency,
                    error,
                });
            }
        }
        let info = session.info().await.map_err(|e| e.to_string())?;
        let pid = info.pid.ok_or("the worker died during warm-up")?;
        Ok((
            Entry {
                key: 0,
                session: session.clone(),
                live: self.watch(pid),
                scratch: info.scratch_dir,
                pool_cells,
                idle_since: Instant::now(),
            },
            results,
        ))
    }

    /// One health pass. Returns when the next baseline pass is due.
    fn health_pass(self: &Arc<Self>) -> Instant {
        let now = Instant::now();
        let pids: Vec<(u64, u32)> = {
            let st = self.lock();
            st.sessions
                .iter()
                .filter_map(|(k, m)| m.pid.map(|p| (*k, p)))
                .collect()
        };
        // /proc reads outside the lock.
        let rss: Vec<(u64, Option<u64>)> =
            pids.into_iter().map(|(k, p)| (k, read_rss(p))).collect();
        let mut evicted = Vec::new();
        let mut next = now + self.config.health_interval;
        {
            let mut st = self.lock();
            for (k, r) in rss {
                if let (Some(m), Some(r)) = (st.sessions.get_mut(&k), r) {
                    m.rss = Some(r);
                }
            }
            let rss_of = |st: &State, e: &Entry| st.sessions.get(&e.key).and_then(|m| m.rss);
            // Dead, or over the per-session budget.
            let idle = std::mem::take(&mut st.idle);
            for e in idle {
                let reason = if e.live.is_dead() {
                    Some(EvictReason::Dead)
                } else if let (Some(b), Some(r)) = (self.config.session_rss_budget, rss_of(&st, &e))
                {
                    (r > b).then_some(EvictReason::SessionRss)
                } else {
                    None
                };
                match reason {
                    Some(reason) => evicted.push(self.evict_locked(&mut st, e, reason)),
                    None => st.idle.push_back(e),
                }
            }
            // Idle timeout: the front is the longest idle; keep `min_idle`.
            if let Some(timeout) = self.config.idle_timeout {
                while st.idle.len() > self.config.min_idle {
                    let expired = st
                        .idle
                        .front()
                        .is_some_and(|e| e.idle_since + timeout <= now);
                    if !expired {
                        break;
                    }
                    if let Some(e) = st.idle.pop_front() {
                        evicted.push(self.evict_locked(&mut st, e, EvictReason::IdleTimeout));
                    }
                }
                if st.idle.len() > self.config.min_idle {
                    if let Some(e) = st.idle.front() {
                        next = next.min(e.idle_since + timeout);
                    }
                }
            }
            // Pool budget: evict idle sessions, largest first, until under it (keeping
            // `min_idle`, so a pool over budget because of busy sessions does not churn).
            if let Some(budget) = self.config.pool_rss_budget {
                let total: u64 = st.sessions.values().filter_map(|m| m.rss).sum();
                let idle: Vec<(u64, u64)> = st
                    .idle
                    .iter()
                    .map(|e| (e.key, rss_of(&st, e).unwrap_or(0)))
                    .collect();
                for key in pool_rss_victims(&idle, total, budget, self.config.min_idle) {
                    if let Some(i) = st.idle.iter().position(|e| e.key == key) {
                        if let Some(e) = st.idle.remove(i) {
                            evicted.push(self.evict_locked(&mut st, e, EvictReason::PoolRss));
                        }
                    }
                }
            }
        }
        self.health_passes.fetch_add(1, Ordering::Relaxed);
        self.shutdown_later(evicted);
        self.signals.bump();
        next
    }

    fn info(&self) -> PoolInfo {
        let now = Instant::now();
        let hits = self.hits.load(Ordering::Relaxed);
        let misses = self.misses.load(Ordering::Relaxed);
        let created = self.created.load(Ordering::Relaxed);
        let st = self.lock();
        let b = &st.breaker;
        let sessions: Vec<SessionSummary> = st
            .sessions
            .iter()
            .map(|(k, m)| SessionSummary {
                key: *k,
                id: m.id.clone(),
                pid: m.pid,
                state: m.state,
                rss_bytes: m.rss,
                executions: m.executions,
                uses: m.uses,
                age_ms: now.saturating_duration_since(m.created).as_secs_f64() * 1000.0,
            })
            .collect();
        PoolInfo {
            config: ConfigSummary::from(&self.config),
            fingerprint: self.fingerprint.clone(),
            stopped: st.stopped,
            idle: st.idle.len(),
            active: st.active,
            creating: st.creating,
            returning: st.returning,
            total: st.total(),
            waiters: st.waiters.len(),
            hits,
            misses,
            hit_rate: if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
            timeouts: self.timeouts.load(Ordering::Relaxed),
            acquire_errors: self.acquire_errors.load(Ordering::Relaxed),
            acquire_latency: self.acquire_latency.snapshot(),
            hit_latency: self.hit_latency.snapshot(),
            sessions_created: created,
            created_by_path: {
                let fork = self.created_fork.load(Ordering::Relaxed);
                [
                    (CreatePath::Spawn.as_str(), created.saturating_sub(fork)),
                    (CreatePath::Fork.as_str(), fork),
                ]
                .into_iter()
                .collect()
            },
            creation_latency: [
                (CreatePath::Spawn.as_str(), self.spawn_latency.snapshot()),
                (CreatePath::Fork.as_str(), self.fork_latency.snapshot()),
            ]
            .into_iter()
            .collect(),
            fork: match &self.fork {
                Some(f) => f.info(),
                None => ForkInfo {
                    enabled: false,
                    disabled_reason: self.fork_disabled.clone(),
                    ..ForkInfo::default()
                },
            },
            creation_failures: self.creation_failures.load(Ordering::Relaxed),
            evictions: st.evictions.iter().map(|(r, n)| (r.as_str(), *n)).collect(),
            breaker: BreakerInfo {
                state: b.state,
                consecutive_failures: b.consecutive_failures,
                retry_in_ms: b
                    .open_until
                    .filter(|_| b.state == crate::BreakerState::Open)
                    .map(|t| t.saturating_duration_since(now).as_secs_f64() * 1000.0),
                last_error: b.last_error.clone(),
                transitions: b.transitions.iter().cloned().collect(),
                transitions_total: b.transitions_total,
            },
            warm_imports: self
                .config
                .warm_imports
                .iter()
                .map(|m| {
                    let a = st.warm.get(m);
                    let n = a.map(|a| a.successes + a.failures).unwrap_or(0);
                    WarmImportInfo {
                        module: m.clone(),
                        successes: a.map(|a| a.successes).unwrap_or(0),
                        failures: a.map(|a| a.failures).unwrap_or(0),
                        last_latency_ms: a.map(|a| a.last_ms).unwrap_or(0.0),
                        mean_latency_ms: if n == 0 {
                            0.0
                        } else {
                            a.map(|a| a.total_ms).unwrap_or(0.0) / n as f64
                        },
                        last_error: a.and_then(|a| a.last_error.clone()),
                    }
                })
                .collect(),
            health_passes: self.health_passes.load(Ordering::Relaxed),
            rss_bytes_total: sessions.iter().filter_map(|s| s.rss_bytes).sum(),
            sessions,
        }
    }
}

/// Creates sessions for unmet demand, woken by events; its only timer is the breaker's retry
/// deadline.
async fn warmer(pool: Weak<Inner>, signals: Arc<Signals>) {
    let mut stop = signals.stop.subscribe();
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        let retry_at = match pool.upgrade() {
            Some(inner) => inner.rebalance(),
            None => return,
        };
        let backoff = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = signals.warm.notified() => {}
            _ = backoff => {}
            _ = stop.changed() => return,
        }
    }
}

/// The hybrid health check: woken by events (release, death) and by its baseline timer.
async fn health(pool: Weak<Inner>, signals: Arc<Signals>, interval: Duration) {
    let mut stop = signals.stop.subscribe();
    let mut next = Instant::now() + interval;
    loop {
        tokio::select! {
            _ = signals.health.notified() => {}
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow_and_update() {
            return;
        }
        next = match pool.upgrade() {
            Some(inner) => inner.health_pass(),
            None => return,
        };
    }
}

/// Which idle sessions (`(key, rss)`) to evict, largest first, to bring `total` under `budget`
/// while keeping at least `keep` idle.
fn pool_rss_victims(idle: &[(u64, u64)], total: u64, budget: u64, keep: usize) -> Vec<u64> {
    let mut by_size: Vec<(u64, u64)> = idle.to_vec();
    by_size.sort_by_key(|e| std::cmp::Reverse(e.1));
    let mut total = total;
    let mut left = idle.len();
    let mut out = Vec::new();
    for (key, rss) in by_size {
        if total <= budget || left <= keep {
            break;
        }
        out.push(key);
        total = total.saturating_sub(rss);
        left -= 1;
    }
    out
}

/// Worker RSS in bytes from `/proc/<pid>/statm`.
fn read_rss(pid: u32) -> Option<u64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * page)
}

/// Removes everything inside `dir` (not `dir` itself).
fn empty_dir(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            std::fs::remove_dir_all(e.path())?;
        } else {
            std::fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_dir_keeps_the_dir() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(d.path().join("a/b")).expect("mkdir");
        std::fs::write(d.path().join("a/b/f"), b"x").expect("write");
        std::fs::write(d.path().join("g"), b"x").expect("write");
        empty_dir(d.path()).expect("empty");
        assert!(d.path().is_dir());
        assert_eq!(std::fs::read_dir(d.path()).expect("read").count(), 0);
    }

    #[test]
    fn pool_budget_evicts_largest_idle_first_and_keeps_min_idle() {
        let idle = [(1, 10), (2, 300), (3, 50), (4, 20)];
        assert_eq!(pool_rss_victims(&idle, 500, 200, 0), vec![2]);
        assert_eq!(pool_rss_victims(&idle, 500, 150, 0), vec![2, 3]);
        assert_eq!(pool_rss_victims(&idle, 500, 100, 3), vec![2]);
        assert_eq!(pool_rss_victims(&idle, 100, 200, 0), Vec::<u64>::new());
    }

    #[test]
    fn rss_of_this_process() {
        assert!(read_rss(std::process::id()).is_some_and(|r| r > 0));
    }
}
