//! `capsule stdio`: the client event model v1 as JSON lines (`docs/api.md`).
//!
//! # The session
//!
//! The session comes from a session pool ([`crate::front`]): one in use and `--pool-size` warm
//! spares beside it (default 1). When a cell's outcome says its state is lost (`worker_lost`,
//! `killed`, `timed_out` after a kill), or a checkpoint or restore lost the worker, a spare
//! takes over before the next piece of work starts, and `restarted {cause: "worker_lost"}`
//! follows that outcome. `restart` also takes a spare (`restarted {id?, cause: "restart"}`).
//! `info` carries the pool's state under `pool`.
//!
//! # Tasks
//!
//! * **stdin reader** (one task): reads bounded lines and hands them to the main loop.
//! * **main loop** (this module's [`run`]): parses commands and acts on them. It never waits
//!   for a cell: cells, checkpoints and restores go into the front door's FIFO queue, `info`
//!   and `restart` run in their own tasks, so an `input` or `cancel` line is always handled
//!   promptly.
//! * **runner** (one task): hands the queue's work to the session in use one piece at a time
//!   and forwards a cell's events until its outcome; it answers input requests from answers
//!   buffered before they arrived, and with end of input after stdin closed. One piece at a
//!   time is what lets the work queued behind a crash run on the warm spare, in order: a
//!   `Session` would respawn a cold worker for cells already queued in it.
//! * **background forwarders** (one per session used): output written between cells (`output`
//!   without `id`) and worker faults.
//! * **writer** (one OS thread): the only owner of stdout. Every event goes through one bounded
//!   channel, so lines never interleave; it writes a batch of whatever is queued and flushes.
//!
//! **Exactly one outcome per cell:** a cell is either in the queue (a `cancel` or the shutdown
//! removes it under the lock and writes its `cancelled` outcome) or taken by the runner (its
//! `Execution` ends in exactly one outcome, which the runner forwards; a session that refuses
//! the cell gets it a `worker_lost`, or `cancelled` during shutdown).
//!
//! On `shutdown` the queued cells end `cancelled` and the pool is stopped (a running cell ends
//! `worker_lost`; every worker, in use or spare, has exited), every forwarder finishes,
//! `shutdown` is written and the process exits 0. On EOF on stdin the work already sent runs to
//! its end first (input requests are answered with end of input), then the same shutdown
//! follows. If stdout goes away the pool is stopped at once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use capsule_pool::PoolConfig;
use capsule_session::{
    BackgroundEvent, Event, ExecHandle, ExecuteRequest, Execution, Outcome, OutcomeStatus, Session,
    SessionError,
};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{broadcast, mpsc, Notify};
use tokio::task::JoinSet;

use crate::front::{Cause, FrontSession};
use crate::model::{self, id_key, ClientId, InCommand, OutEvent, OutcomeDto, SkippedDto};
use crate::settings::MAX_TIMEOUT_MS;
use crate::{code, Failure};

/// Longest accepted command line (a cell's source travels in one line).
pub const MAX_LINE: usize = 64 * 1024 * 1024;
/// Events waiting for the writer before producers wait (backpressure to the session).
const WRITER_QUEUE: usize = 1024;

/// The front door's session and pool, shared by the runner and the `info`/`restart` tasks.
/// Held across `.await` only to hand work to the session or to replace it.
type Front = Arc<tokio::sync::Mutex<FrontSession>>;

/// Work that runs on the session, in the order sent.
enum Work {
    Cell {
        id: ClientId,
        key: String,
        code: String,
        timeout_ms: Option<u64>,
    },
    Checkpoint {
        id: ClientId,
        path: PathBuf,
    },
    Restore {
        id: ClientId,
        path: PathBuf,
        clear: bool,
    },
    /// A `restarted` event, written once the work taken before the restart has ended.
    Announce(OutEvent),
}

/// A cell the client sent that has not reached its outcome.
struct Cell {
    /// Set once the runner handed the cell to the session; `None` while it is queued here.
    handle: Option<ExecHandle>,
    /// A `cancel` arrived while the runner was handing the cell over.
    cancel: bool,
    /// Input requests seen and not answered yet, oldest first.
    pending: VecDeque<String>,
    /// Answers sent without a `request` before any request was pending, oldest first.
    answers: VecDeque<Option<String>>,
}

/// The cells and the queue, under one lock so a cell is in exactly one place.
#[derive(Default)]
struct Book {
    cells: HashMap<String, Cell>,
    queue: VecDeque<Work>,
}

/// State shared by the main loop, the runner and the tasks. Its locks are never held across
/// `.await`.
#[derive(Default)]
struct Shared {
    book: Mutex<Book>,
    /// Wakes the runner: work was queued, or it should finish.
    wake: Notify,
    /// Set once stdin reached EOF: input requests are answered with end of input.
    stdin_closed: AtomicBool,
    /// The runner ends once the queue is empty.
    draining: AtomicBool,
    /// Shutting down: a lost worker is no longer replaced.
    stopping: AtomicBool,
    /// Epochs ended by `restart`: a cell lost with them says "the session was restarted".
    restarted: Mutex<HashSet<u64>>,
    /// Background forwarders, one per session used.
    background: Mutex<JoinSet<()>>,
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a task panicked; the data is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn book(&self) -> MutexGuard<'_, Book> {
        relock(&self.book)
    }

    fn watch_background(&self, session: &Session, tx: &mpsc::Sender<OutEvent>) {
        let rx = session.subscribe_background();
        relock(&self.background).spawn(forward_background(rx, tx.clone()));
    }

    /// Queues an announcement before any other work, after the announcements already there.
    fn announce(&self, ev: OutEvent) {
        let mut book = self.book();
        let at = book
            .queue
            .iter()
            .take_while(|w| matches!(w, Work::Announce(_)))
            .count();
        book.queue.insert(at, Work::Announce(ev));
        drop(book);
        self.wake.notify_one();
    }
}

/// The outcome of a cell that never started.
fn cancelled(id: ClientId) -> OutEvent {
    OutEvent::Outcome {
        id,
        outcome: OutcomeDto::from(&Outcome {
            status: OutcomeStatus::Cancelled,
            duration_ms: 0.0,
            truncated: None,
        }),
    }
}

/// Runs `capsule stdio` to completion; returns the exit code.
pub async fn run(config: PoolConfig, wait_spares: bool) -> Result<u8, Failure> {
    let max_queued = config.session.max_queued;
    let (tx, rx) = mpsc::channel::<OutEvent>(WRITER_QUEUE);
    let writer = std::thread::Builder::new()
        .name("capsule-stdout".into())
        .spawn(move || write_events(rx))?;
    let mut front = match FrontSession::start(config, wait_spares).await {
        Ok(f) => f,
        Err(message) => {
            start_failed(&tx, message).await;
            drop(tx);
            let _ = writer.join();
            return Ok(code::START);
        }
    };
    let pool = front.pool();
    let session = front.session().clone();
    match session.info().await {
        Ok(info) => {
            let _ = tx
                .send(OutEvent::Ready {
                    session: info.id,
                    python: info.python,
                    protocol: info.protocol_version,
                    executable: info.executable,
                    pid: info.pid,
                })
                .await;
        }
        Err(e) => {
            start_failed(&tx, format!("could not start a session: {e}")).await;
            front.stop().await;
            drop(tx);
            let _ = writer.join();
            return Ok(code::START);
        }
    }
    let shared = Arc::new(Shared::default());
    shared.watch_background(&session, &tx);
    let front: Front = Arc::new(tokio::sync::Mutex::new(front));
    let mut runner = tokio::spawn(run_work(shared.clone(), front.clone(), tx.clone()));
    let mut runner_done = false;
    let mut tasks = JoinSet::new();
    let (lines_tx, mut lines) = mpsc::channel(16);
    let reader = tokio::spawn(read_lines(tokio::io::stdin(), lines_tx));

    let mut ctx = Ctx {
        front: front.clone(),
        shared: shared.clone(),
        tx: tx.clone(),
        max_queued,
    };
    let end = loop {
        tokio::select! {
            line = lines.recv() => match line {
                Some(Line::Text(bytes)) => {
                    if let Some(end) = ctx.on_line(&bytes, &mut tasks).await {
                        break end;
                    }
                }
                Some(Line::TooLong(n)) => {
                    ctx.emit(OutEvent::Error {
                        id: None,
                        message: format!("line of {n} bytes exceeds the limit of {MAX_LINE} bytes"),
                    })
                    .await;
                }
                Some(Line::Failed(e)) => {
                    tracing::warn!(error = %e, "reading stdin failed; treating it as end of input");
                    break End::Eof;
                }
                None => break End::Eof,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = tx.closed() => break End::StdoutGone,
        }
    };
    reader.abort();

    if matches!(end, End::Eof) {
        // Let the work already sent finish; nobody can answer input any more.
        shared.stdin_closed.store(true, Ordering::SeqCst);
        let waiting: Vec<(ExecHandle, Vec<String>)> = shared
            .book()
            .cells
            .values_mut()
            .filter_map(|c| Some((c.handle.clone()?, c.pending.drain(..).collect())))
            .collect();
        for (handle, reqs) in waiting {
            for req in reqs {
                let _ = handle.reply_input(&req, None).await;
            }
        }
        shared.draining.store(true, Ordering::SeqCst);
        shared.wake.notify_one();
        while !(runner_done && tasks.is_empty()) {
            tokio::select! {
                _ = &mut runner, if !runner_done => runner_done = true,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = tx.closed() => break,
            }
        }
    }

    // Shut down: what is still queued never starts; stopping the pool ends a running cell
    // (`worker_lost`) and every worker.
    shared.stopping.store(true, Ordering::SeqCst);
    shared.draining.store(true, Ordering::SeqCst);
    let left: Vec<Work> = {
        let mut book = shared.book();
        let left: Vec<Work> = book.queue.drain(..).collect();
        for w in &left {
            if let Work::Cell { key, .. } = w {
                book.cells.remove(key);
            }
        }
        left
    };
    let mut announcements = Vec::new();
    for work in left {
        let ev = match work {
            Work::Cell { id, .. } => cancelled(id),
            Work::Checkpoint { id, .. } | Work::Restore { id, .. } => OutEvent::Error {
                id: Some(id),
                message: SessionError::WorkerLost {
                    operation: "shutdown",
                }
                .to_string(),
            },
            // After the outcome of the cell the restart ended, as always.
            Work::Announce(ev) => {
                announcements.push(ev);
                continue;
            }
        };
        ctx.emit(ev).await;
    }
    pool.stop().await;
    shared.wake.notify_one();
    if !runner_done {
        let _ = runner.await;
    }
    front.lock().await.stop().await;
    while tasks.join_next().await.is_some() {}
    // A restart that finished while the runner was ending queued its announcement late.
    announcements.extend(shared.book().queue.drain(..).filter_map(|w| match w {
        Work::Announce(ev) => Some(ev),
        _ => None,
    }));
    for ev in announcements {
        ctx.emit(ev).await;
    }
    let mut background = std::mem::take(&mut *relock(&shared.background));
    background.shutdown().await;
    let stdout_ok = !tx.is_closed();
    let shutdown_id = match end {
        End::Shutdown(id) => id,
        _ => None,
    };
    let _ = tx.send(OutEvent::Shutdown { id: shutdown_id }).await;
    drop(tx);
    drop(ctx);
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    Ok(if stdout_ok { code::OK } else { code::ERROR })
}

/// The first (and only) line when no session starts.
async fn start_failed(tx: &mpsc::Sender<OutEvent>, message: String) {
    tracing::error!("{message}");
    let _ = tx.send(OutEvent::Error { id: None, message }).await;
}

/// Why the main loop ended.
enum End {
    Shutdown(Option<ClientId>),
    Eof,
    StdoutGone,
}

struct Ctx {
    front: Front,
    shared: Arc<Shared>,
    tx: mpsc::Sender<OutEvent>,
    max_queued: usize,
}

impl Ctx {
    async fn emit(&self, ev: OutEvent) {
        let _ = self.tx.send(ev).await;
    }

    async fn error(&self, id: Option<ClientId>, message: impl Into<String>) {
        self.emit(OutEvent::Error {
            id,
            message: message.into(),
        })
        .await;
    }

    /// Queues work for the runner.
    fn enqueue(&self, work: Work) {
        self.shared.book().queue.push_back(work);
        self.shared.wake.notify_one();
    }

    async fn on_line(&mut self, line: &[u8], tasks: &mut JoinSet<()>) -> Option<End> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        let cmd = match model::parse_command(line) {
            Ok(cmd) => cmd,
            Err((id, message)) => {
                self.error(id, message).await;
                return None;
            }
        };
        match cmd {
            InCommand::Execute {
                id,
                code,
                timeout_ms,
            } => self.execute(id, code, timeout_ms).await,
            InCommand::Input { id, text, request } => {
                let text = match text {
                    Value::String(s) => Some(s),
                    _ => None,
                };
                self.input(id, text, request).await;
            }
            InCommand::Cancel { id } => self.cancel(id).await,
            InCommand::Restart { id } => {
                let (front, shared, tx) =
                    (self.front.clone(), self.shared.clone(), self.tx.clone());
                tasks.spawn(restart(front, shared, tx, id));
            }
            InCommand::Checkpoint { id, path } => self.enqueue(Work::Checkpoint { id, path }),
            InCommand::Restore { id, path, clear } => {
                self.enqueue(Work::Restore { id, path, clear })
            }
            InCommand::Info { id } => {
                let (front, shared, tx) =
                    (self.front.clone(), self.shared.clone(), self.tx.clone());
                tasks.spawn(async move {
                    let (current, pool) = {
                        let f = front.lock().await;
                        (f.current(), f.pool_dto())
                    };
                    let queued = shared
                        .book()
                        .queue
                        .iter()
                        .filter(|w| !matches!(w, Work::Announce(_)))
                        .count();
                    let ev = match current.info().await {
                        Ok(mut info) => {
                            info.queued = queued;
                            info.pool = Some(pool);
                            OutEvent::Info {
                                id,
                                info: Box::new(info),
                            }
                        }
                        Err(e) => OutEvent::Error {
                            id: Some(id),
                            message: format!("info failed: {e}"),
                        },
                    };
                    let _ = tx.send(ev).await;
                });
            }
            InCommand::Shutdown { id } => return Some(End::Shutdown(id)),
        }
        None
    }

    async fn execute(&mut self, id: ClientId, code: String, timeout_ms: Option<u64>) {
        let key = id_key(&id);
        let refused = {
            let mut book = self.shared.book();
            if book.cells.contains_key(&key) {
                Some("a cell with this id is still queued or running".to_string())
            } else if book.queue.len() >= self.max_queued {
                Some(format!(
                    "execute failed: {}",
                    SessionError::QueueFull {
                        max: self.max_queued
                    }
                ))
            } else {
                book.cells.insert(
                    key.clone(),
                    Cell {
                        handle: None,
                        cancel: false,
                        pending: VecDeque::new(),
                        answers: VecDeque::new(),
                    },
                );
                book.queue.push_back(Work::Cell {
                    id: id.clone(),
                    key,
                    code,
                    timeout_ms,
                });
                None
            }
        };
        match refused {
            Some(message) => self.error(Some(id), message).await,
            None => self.shared.wake.notify_one(),
        }
    }

    async fn cancel(&mut self, id: ClientId) {
        let key = id_key(&id);
        enum Act {
            Unknown,
            /// Taken out of the queue: it never starts.
            Dequeued,
            /// The runner is handing it over and will cancel it.
            Flagged,
            Running(ExecHandle),
        }
        let act = {
            let mut book = self.shared.book();
            let Book { cells, queue } = &mut *book;
            match cells.get_mut(&key) {
                None => Act::Unknown,
                Some(cell) => match &cell.handle {
                    Some(h) => Act::Running(h.clone()),
                    None => {
                        let at = queue
                            .iter()
                            .position(|w| matches!(w, Work::Cell { key: k, .. } if *k == key));
                        match at {
                            Some(at) => {
                                queue.remove(at);
                                cells.remove(&key);
                                Act::Dequeued
                            }
                            None => {
                                cell.cancel = true;
                                Act::Flagged
                            }
                        }
                    }
                },
            }
        };
        match act {
            Act::Unknown => {
                self.error(Some(id), "no queued or running cell has this id")
                    .await
            }
            Act::Dequeued => self.emit(cancelled(id)).await,
            Act::Flagged => {}
            Act::Running(h) => {
                if let Err(e) = h.cancel().await {
                    self.error(Some(id), format!("cancel failed: {e}")).await;
                }
            }
        }
    }

    async fn input(&mut self, id: ClientId, text: Option<String>, request: Option<String>) {
        let target = {
            let mut book = self.shared.book();
            match book.cells.get_mut(&id_key(&id)) {
                None => Err("no queued or running cell has this id"),
                Some(cell) => match request {
                    // A request id can only come from a cell that runs (it has a handle); one
                    // nobody asked for is dropped, as the session drops it.
                    Some(req) => {
                        cell.pending.retain(|p| *p != req);
                        Ok(cell.handle.clone().map(|h| (h, req)))
                    }
                    None => match cell.pending.pop_front() {
                        Some(req) => Ok(cell.handle.clone().map(|h| (h, req))),
                        None => {
                            // Not asked yet: keep it for the cell's next input request.
                            cell.answers.push_back(text.clone());
                            Ok(None)
                        }
                    },
                },
            }
        };
        match target {
            Err(message) => self.error(Some(id), message).await,
            Ok(None) => {}
            Ok(Some((handle, req))) => {
                if let Err(e) = handle.reply_input(&req, text).await {
                    self.error(Some(id), format!("input failed: {e}")).await;
                }
            }
        }
    }
}

/// `restart`: a warm session from the pool (or, failing that, a restart in place). The
/// `restarted` event is queued ahead of all other work, so it is written after the outcome of
/// a cell the restart ended and before anything runs on the fresh session.
async fn restart(
    front: Front,
    shared: Arc<Shared>,
    tx: mpsc::Sender<OutEvent>,
    id: Option<ClientId>,
) {
    let mut f = front.lock().await;
    let before = f.current();
    // Marked before the old worker goes, so a cell lost with it says why.
    relock(&shared.restarted).insert(before.epoch);
    match f.restart().await {
        Ok(()) => {
            let now = f.current();
            if now.session.id() != before.session.id() {
                shared.watch_background(&now.session, &tx);
            }
            let pid = now.session.info().await.ok().and_then(|i| i.pid);
            shared.announce(OutEvent::Restarted {
                id,
                cause: Cause::Restart.as_str(),
                session: now.session.id().to_string(),
                pid,
            });
        }
        Err(e) => {
            relock(&shared.restarted).remove(&before.epoch);
            drop(f);
            let _ = tx
                .send(OutEvent::Error {
                    id,
                    message: format!("restart failed: {e}"),
                })
                .await;
        }
    }
}

/// The runner: hands queued work to the session in use, one piece at a time, in order.
async fn run_work(shared: Arc<Shared>, front: Front, tx: mpsc::Sender<OutEvent>) {
    loop {
        if shared.book().queue.is_empty() {
            if shared.draining.load(Ordering::SeqCst) {
                return;
            }
            shared.wake.notified().await;
            continue;
        }
        // The front door's lock first, so a restart cannot slip between taking work and
        // handing it to the session.
        let guard = front.lock().await;
        let Some(work) = shared.book().queue.pop_front() else {
            continue;
        };
        let current = guard.current();
        let lost = match work {
            Work::Announce(ev) => {
                drop(guard);
                let _ = tx.send(ev).await;
                false
            }
            Work::Cell {
                id,
                key,
                code,
                timeout_ms,
            } => {
                let mut req = ExecuteRequest::new(code);
                if let Some(ms) = timeout_ms.filter(|&ms| ms > 0) {
                    req = req.timeout(Duration::from_millis(ms.min(MAX_TIMEOUT_MS)));
                }
                let submitted = current.session.execute_with(req).await;
                drop(guard);
                match submitted {
                    Ok(exec) => run_cell(exec, id, key, current.epoch, &shared, &tx).await,
                    Err(e) => {
                        shared.book().cells.remove(&key);
                        let ev = if shared.stopping.load(Ordering::SeqCst) {
                            cancelled(id)
                        } else {
                            OutEvent::Outcome {
                                id,
                                outcome: OutcomeDto::from(&Outcome {
                                    status: OutcomeStatus::WorkerLost {
                                        reason: format!("the session refused the cell: {e}"),
                                    },
                                    duration_ms: 0.0,
                                    truncated: None,
                                }),
                            }
                        };
                        let _ = tx.send(ev).await;
                        !shared.stopping.load(Ordering::SeqCst)
                    }
                }
            }
            Work::Checkpoint { id, path } => {
                drop(guard);
                let (ev, lost) = checkpoint(&current.session, id, path).await;
                let _ = tx.send(ev).await;
                lost
            }
            Work::Restore { id, path, clear } => {
                drop(guard);
                let (ev, lost) = restore(&current.session, id, path, clear).await;
                let _ = tx.send(ev).await;
                lost
            }
        };
        if lost {
            replace_after_loss(&shared, &front, &tx, current.epoch).await;
        }
    }
}

/// After work on the session of `epoch` lost its worker: a warm session from the pool serves
/// what comes next, and the client hears of it. Nothing happens if the session was already
/// replaced (a `restart`), or during shutdown. If the pool cannot supply one, the session in
/// use stays: it starts a fresh worker for the next request, as a plain session does.
async fn replace_after_loss(
    shared: &Shared,
    front: &Front,
    tx: &mpsc::Sender<OutEvent>,
    epoch: u64,
) {
    if shared.stopping.load(Ordering::SeqCst) {
        return;
    }
    let mut f = front.lock().await;
    if f.epoch() != epoch || shared.stopping.load(Ordering::SeqCst) {
        return;
    }
    if let Err(e) = f.replace(Cause::WorkerLost).await {
        tracing::warn!(error = %e, "no fresh session from the pool; the next cell respawns the worker");
        return;
    }
    let now = f.current();
    shared.watch_background(&now.session, tx);
    drop(f);
    let pid = now.session.info().await.ok().and_then(|i| i.pid);
    let _ = tx
        .send(OutEvent::Restarted {
            id: None,
            cause: Cause::WorkerLost.as_str(),
            session: now.session.id().to_string(),
            pid,
        })
        .await;
}

/// Runs one cell the session accepted; returns whether its outcome lost the state.
async fn run_cell(
    exec: Execution,
    id: ClientId,
    key: String,
    epoch: u64,
    shared: &Shared,
    tx: &mpsc::Sender<OutEvent>,
) -> bool {
    let cancel = match shared.book().cells.get_mut(&key) {
        Some(cell) => {
            cell.handle = Some(exec.handle());
            cell.cancel
        }
        None => false,
    };
    if cancel {
        let _ = exec.cancel().await;
    }
    forward_cell(exec, id, key, epoch, shared, tx).await
}

async fn checkpoint(session: &Session, id: ClientId, path: PathBuf) -> (OutEvent, bool) {
    let cp = match session.checkpoint().await {
        Ok(cp) => cp,
        Err(e) => {
            let lost = matches!(e, SessionError::WorkerLost { .. });
            let ev = OutEvent::Error {
                id: Some(id),
                message: e.to_string(),
            };
            return (ev, lost);
        }
    };
    if let Err(e) = tokio::fs::write(&path, &cp.blob).await {
        let ev = OutEvent::Error {
            id: Some(id),
            message: format!("cannot write {}: {e}", path.display()),
        };
        return (ev, false);
    }
    let ev = OutEvent::Checkpoint {
        id,
        path,
        bytes: cp.blob.len() as u64,
        names: cp.names,
        skipped: cp.skipped.iter().map(|s| s.name.clone()).collect(),
        skipped_reasons: cp
            .skipped
            .into_iter()
            .map(|s| SkippedDto {
                name: s.name,
                reason: s.reason,
            })
            .collect(),
    };
    (ev, false)
}

async fn restore(session: &Session, id: ClientId, path: PathBuf, clear: bool) -> (OutEvent, bool) {
    match tokio::fs::read(&path).await {
        Err(e) => (
            OutEvent::Error {
                id: Some(id),
                message: format!("cannot read {}: {e}", path.display()),
            },
            false,
        ),
        Ok(blob) => match session.restore(blob, clear).await {
            Ok(names) => (OutEvent::Restored { id, names }, false),
            Err(e) => {
                let lost = matches!(e, SessionError::WorkerLost { .. });
                let ev = OutEvent::Error {
                    id: Some(id),
                    message: e.to_string(),
                };
                (ev, lost)
            }
        },
    }
}

/// Forwards one cell's events until its outcome; returns whether the outcome lost the state.
async fn forward_cell(
    mut exec: Execution,
    id: ClientId,
    key: String,
    epoch: u64,
    shared: &Shared,
    tx: &mpsc::Sender<OutEvent>,
) -> bool {
    let mut lost = false;
    while let Some(ev) = exec.next().await {
        let out = match ev {
            Event::Output { stream, text } => OutEvent::Output {
                id: Some(id.clone()),
                stream: stream.as_str(),
                text,
            },
            Event::Display { data, metadata } => OutEvent::Display {
                id: id.clone(),
                data,
                metadata,
            },
            Event::InputRequest {
                req,
                prompt,
                password,
            } => {
                let answer = {
                    let mut book = shared.book();
                    match book.cells.get_mut(&key) {
                        Some(cell) => match cell.answers.pop_front() {
                            Some(a) => Some(a),
                            None if shared.stdin_closed.load(Ordering::SeqCst) => Some(None),
                            None => {
                                cell.pending.push_back(req.clone());
                                None
                            }
                        },
                        None => Some(None),
                    }
                };
                let _ = tx
                    .send(OutEvent::InputRequest {
                        id: id.clone(),
                        request: req.clone(),
                        prompt,
                        password,
                    })
                    .await;
                if let Some(text) = answer {
                    let _ = exec.reply_input(&req, text).await;
                }
                continue;
            }
            Event::Outcome(o) => {
                lost = o.status.state_lost();
                let mut outcome = OutcomeDto::from(&o);
                if matches!(o.status, OutcomeStatus::WorkerLost { .. })
                    && relock(&shared.restarted).contains(&epoch)
                {
                    // The pool shut the old session down for the restart; say what happened.
                    outcome.reason = Some("the session was restarted".into());
                }
                // Forget the id before the client can see the outcome, so it may reuse it.
                shared.book().cells.remove(&key);
                OutEvent::Outcome {
                    id: id.clone(),
                    outcome,
                }
            }
        };
        if tx.send(out).await.is_err() {
            break;
        }
    }
    shared.book().cells.remove(&key);
    lost
}

/// Forwards output written between cells and worker faults of one session.
async fn forward_background(
    mut rx: broadcast::Receiver<BackgroundEvent>,
    tx: mpsc::Sender<OutEvent>,
) {
    loop {
        let ev = match rx.recv().await {
            Ok(BackgroundEvent::Output { stream, text }) => OutEvent::Output {
                id: None,
                stream: stream.as_str(),
                text,
            },
            Ok(BackgroundEvent::Fault { message }) => OutEvent::Error {
                id: None,
                message: format!("worker fault: {message}"),
            },
            Err(broadcast::error::RecvError::Lagged(n)) => OutEvent::Error {
                id: None,
                message: format!("{n} events written between cells were dropped"),
            },
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if tx.send(ev).await.is_err() {
            return;
        }
    }
}

/// One line of input.
enum Line {
    Text(Vec<u8>),
    TooLong(usize),
    Failed(std::io::Error),
}

/// Reads `\n`-terminated lines of at most [`MAX_LINE`] bytes; an over-long line is reported and
/// skipped, not buffered.
async fn read_lines(input: impl AsyncRead + Unpin, out: mpsc::Sender<Line>) {
    let mut reader = BufReader::with_capacity(64 * 1024, input);
    let mut buf = Vec::new();
    let mut len = 0usize;
    loop {
        let chunk = match reader.fill_buf().await {
            Ok(c) => c,
            Err(e) => {
                let _ = out.send(Line::Failed(e)).await;
                return;
            }
        };
        if chunk.is_empty() {
            if len > 0 {
                let line = if len > MAX_LINE {
                    Line::TooLong(len)
                } else {
                    Line::Text(std::mem::take(&mut buf))
                };
                let _ = out.send(line).await;
            }
            return;
        }
        let (part, used, end) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (&chunk[..i], i + 1, true),
            None => (chunk, chunk.len(), false),
        };
        len += part.len();
        if len <= MAX_LINE {
            buf.extend_from_slice(part);
        } else {
            buf = Vec::new();
        }
        reader.consume(used);
        if end {
            let line = if len > MAX_LINE {
                Line::TooLong(len)
            } else {
                Line::Text(std::mem::take(&mut buf))
            };
            len = 0;
            if out.send(line).await.is_err() {
                return;
            }
        }
    }
}

/// The writer thread: the only code that touches stdout.
fn write_events(mut rx: mpsc::Receiver<OutEvent>) {
    let stdout = std::io::stdout();
    let mut out = BufWriter::with_capacity(64 * 1024, stdout.lock());
    let write = |out: &mut BufWriter<_>, ev: &OutEvent| -> std::io::Result<()> {
        serde_json::to_writer(&mut *out, ev)?;
        out.write_all(b"\n")
    };
    while let Some(ev) = rx.blocking_recv() {
        let mut result = write(&mut out, &ev);
        while result.is_ok() {
            match rx.try_recv() {
                Ok(ev) => result = write(&mut out, &ev),
                Err(_) => break,
            }
        }
        if let Err(e) = result.and_then(|()| out.flush()) {
            tracing::warn!(error = %e, "stdout closed; stopping");
            return;
        }
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines_of(input: &'static [u8]) -> Vec<String> {
        let (tx, mut rx) = mpsc::channel(16);
        tokio::spawn(read_lines(input, tx));
        let mut got = Vec::new();
        while let Some(line) = rx.recv().await {
            got.push(match line {
                Line::Text(t) => String::from_utf8_lossy(&t).into_owned(),
                Line::TooLong(n) => format!("<too long {n}>"),
                Line::Failed(e) => format!("<failed {e}>"),
            });
        }
        got
    }

    #[tokio::test]
    async fn lines_are_split_and_a_last_unterminated_line_counts() {
        assert_eq!(lines_of(b"a\nbb\n\nc").await, vec!["a", "bb", "", "c"]);
    }
}
