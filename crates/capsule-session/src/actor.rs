//! The session actor: one task that owns the worker process and every decision about it.
//!
//! It holds the FIFO queue of work (cells, checkpoints, restores), sends one item at a time,
//! enforces deadlines, runs the cancel ladder (cooperative cancel → kill of the process group
//! after the grace period), respawns dead workers, and synthesises the outcomes only the host can
//! know (`timed_out` after a kill, `killed`, `worker_lost`).
//!
//! **Invariants:**
//! * The actor never reads the event pipe; the reader task does ([`crate::reader`]).
//! * A host-made outcome is emitted only after the dead worker's reader has drained and closed,
//!   so the cell's output still precedes it.
//! * Control messages go on their own pipe and are tiny (one atomic write), so a cancel never
//!   waits behind bulk data.
//! * Notices carry the worker generation; notices of an older worker are ignored, so a late
//!   event can never be attributed to the wrong worker.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use capsule_protocol::{encode_message, ControlMessage, HostMessage, Stream};
use capsule_worker::{Interpreter, WorkerBundle};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::sleep_until;

use crate::config::SessionConfig;
use crate::error::SessionError;
use crate::event::{Event, KillReason, OutcomeStatus};
use crate::process::{kill_group, spawn_worker, Captures, Launcher, LogTail};
use crate::reader::{Notice, Reader};
use crate::routes::{CancelReason, Routes};
use crate::session::{
    BackgroundEvent, Checkpoint, ExecuteRequest, SandboxLayer, SessionInfo, SessionState, Stats,
};

type Reply<T> = oneshot::Sender<Result<T, SessionError>>;

/// Requests from handles to the actor.
pub(crate) enum Command {
    Execute {
        exec: String,
        req: ExecuteRequest,
        events: mpsc::Sender<Event>,
        reply: Reply<()>,
    },
    InputReply {
        exec: String,
        req: String,
        text: Option<String>,
    },
    Cancel {
        exec: String,
        interrupt: bool,
    },
    Checkpoint {
        reply: Reply<Checkpoint>,
    },
    Restore {
        blob: Bytes,
        clear: bool,
        reply: Reply<Vec<String>>,
    },
    Reset {
        reply: Reply<()>,
    },
    Restart {
        reply: Reply<()>,
    },
    Info {
        reply: Reply<SessionInfo>,
    },
    Shutdown {
        reply: Reply<()>,
    },
}

/// Queued work.
enum Work {
    Cell {
        exec: String,
        code: String,
        history: bool,
        timeout: Option<Duration>,
    },
    Checkpoint {
        reply: Reply<Checkpoint>,
    },
    Restore {
        blob: Bytes,
        clear: bool,
        reply: Reply<Vec<String>>,
    },
    Reset {
        reply: Reply<()>,
    },
}

/// The item in flight on the worker.
enum Current {
    Cell {
        exec: String,
        /// When the deadline passes (cleared once the deadline cancel is sent).
        deadline: Option<Instant>,
        /// When the grace period of a sent cancel ends.
        grace_until: Option<Instant>,
        /// The sandbox policy's per-cell wall-clock limit (`limits.wall_clock_ms`): a hard limit,
        /// the worker is killed at once and the cell ends `killed {reason: wall_clock}`.
        hard_deadline: Option<Instant>,
    },
    Checkpoint {
        req: String,
        reply: Reply<Checkpoint>,
    },
    Restore {
        req: String,
        reply: Reply<Vec<String>>,
    },
    Reset {
        req: String,
        reply: Reply<()>,
    },
}

/// Why the host killed a worker (decides the synthesised outcome).
#[derive(Clone, Debug)]
enum KillCause {
    CancelEscalation(CancelReason),
    WallClock,
    Restart,
    Shutdown,
    Protocol(String),
}

/// One live worker.
struct Worker {
    gen: u64,
    pid: u32,
    /// Data pipe (fd 3). Written only by the actor.
    data: pipe::Sender,
    /// Control pipe (fd 5). Written only by the actor.
    control: pipe::Sender,
    /// Tells the reader the worker is dead: drain without waiting, then close. Dropping it
    /// has the same effect.
    reader_stop: Option<oneshot::Sender<()>>,
    exit: Option<Option<std::process::ExitStatus>>,
    reader_closed: Option<Option<String>>,
    /// Set when the event stream ended cleanly before the process exited: a dying process
    /// closes its pipes just before it becomes a zombie, so the exit is given until this instant
    /// to arrive before the worker is declared broken and killed.
    eof_deadline: Option<Instant>,
    kill_cause: Option<KillCause>,
    python: String,
    executable: PathBuf,
    version: u32,
    features: Vec<String>,
    start_latency: Duration,
    last_pong: Option<Instant>,
    ping_n: u64,
    log_tail: LogTail,
    /// Read ends of the capture pipes, drained after the worker's death.
    captures: Captures,
    /// The worker's sandbox (layers for info, exit classification; cleaned up on drop).
    sandbox: capsule_sandbox::Prepared,
}

struct Actor {
    id: String,
    /// Starts workers instead of a plain spawn when set (the fork server); spawn is the fallback.
    launcher: Option<Arc<dyn Launcher>>,
    config: SessionConfig,
    interp: Interpreter,
    bundle: WorkerBundle,
    scratch: tempfile::TempDir,
    routes: Arc<Routes>,
    stats: Arc<Stats>,
    background: broadcast::Sender<BackgroundEvent>,
    notices_tx: mpsc::Sender<Notice>,
    notices: mpsc::Receiver<Notice>,
    worker: Option<Worker>,
    gen: u64,
    queue: VecDeque<Work>,
    current: Option<Current>,
    next_req: u64,
    closing: bool,
    shutdown_waiters: Vec<Reply<()>>,
    restart_waiters: Vec<Reply<()>>,
    // Counters.
    executions: u64,
    errors: u64,
    cancels: u64,
    cancel_kills: u64,
    timeouts: u64,
    workers_lost: u64,
    workers_started: u64,
    truncations: u64,
    /// Cells ended `killed`, by reason.
    kills: std::collections::BTreeMap<&'static str, u64>,
    last_python: String,
    last_version: u32,
}

/// Prepares interpreter and runtime, starts the first worker, and spawns the actor task.
pub(crate) async fn start(
    id: String,
    config: SessionConfig,
    background: broadcast::Sender<BackgroundEvent>,
    launcher: Option<Arc<dyn Launcher>>,
) -> Result<mpsc::Sender<Command>, SessionError> {
    let interp = capsule_worker::resolve_interpreter(config.python.as_deref())?;
    let bundle = capsule_worker::materialize(config.cache_dir.as_deref())?;
    // Sandboxed workers see the bundle read-only: compile it once, outside the sandbox. A
    // failure only costs speed (the worker compiles in memory), so it is logged, not fatal;
    // concurrent compiles of the same fresh bundle (several sessions starting at once) race
    // harmlessly on CPython's temporary file names.
    {
        static COMPILING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one_at_a_time = COMPILING.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = capsule_worker::precompile(&bundle, &interp) {
            tracing::warn!(error = %e, "could not precompile the worker runtime");
        }
    }
    let prefix = format!("capsule-{id}-");
    let mut scratch = tempfile::Builder::new();
    scratch.prefix(&prefix);
    let scratch = match &config.scratch_root {
        Some(root) => scratch.tempdir_in(root),
        None => scratch.tempdir(),
    }
    .map_err(|source| SessionError::Io {
        context: "creating the session scratch directory",
        source,
    })?;
    let (notices_tx, notices) = mpsc::channel(64);
    let mut actor = Actor {
        id,
        launcher,
        routes: Arc::new(Routes::new(config.output_budget)),
        config,
        interp,
        bundle,
        scratch,
        stats: Arc::new(Stats::default()),
        background,
        notices_tx,
        notices,
        worker: None,
        gen: 0,
        queue: VecDeque::new(),
        current: None,
        next_req: 0,
        closing: false,
        shutdown_waiters: Vec::new(),
        restart_waiters: Vec::new(),
        executions: 0,
        errors: 0,
        cancels: 0,
        cancel_kills: 0,
        timeouts: 0,
        workers_lost: 0,
        workers_started: 0,
        truncations: 0,
        kills: std::collections::BTreeMap::new(),
        last_python: String::new(),
        last_version: 0,
    };
    actor.spawn_worker().await?;
    let (cmd_tx, cmd_rx) = mpsc::channel(256);
    let span = tracing::info_span!("session", id = %actor.id);
    tokio::spawn(tracing::Instrument::instrument(actor.run(cmd_rx), span));
    Ok(cmd_tx)
}

impl Drop for Actor {
    fn drop(&mut self) {
        if let Some(w) = &self.worker {
            kill_group(w.pid);
        }
    }
}

impl Actor {
    async fn spawn_worker(&mut self) -> Result<(), SessionError> {
        let spawned = spawn_worker(
            &self.id,
            &self.config,
            &self.interp,
            &self.bundle,
            self.scratch.path(),
            self.launcher.as_deref(),
        )
        .await?;
        self.gen += 1;
        self.workers_started += 1;
        let gen = self.gen;
        let (stop_tx, stop_rx) = oneshot::channel();
        let reader = Reader {
            gen,
            events: spawned.events,
            decoder: spawned.decoder,
            routes: self.routes.clone(),
            notices: self.notices_tx.clone(),
            stop: stop_rx,
            stats: self.stats.clone(),
            background: self.background.clone(),
        };
        tokio::spawn(reader.run());
        let exit = spawned.exit;
        let notices = self.notices_tx.clone();
        tokio::spawn(async move {
            let status = exit.await;
            let _ = notices.send(Notice::Exited { gen, status }).await;
        });
        tracing::debug!(session = %self.id, pid = spawned.pid, gen, latency_ms = spawned.start_latency.as_secs_f64() * 1000.0, launched_by = spawned.launched_by, "worker ready");
        self.last_python = spawned.hello.python.clone();
        self.last_version = spawned.version;
        self.worker = Some(Worker {
            gen,
            pid: spawned.pid,
            data: spawned.data,
            control: spawned.control,
            reader_stop: Some(stop_tx),
            exit: None,
            reader_closed: None,
            eof_deadline: None,
            kill_cause: None,
            python: spawned.hello.python,
            executable: PathBuf::from(spawned.hello.executable),
            version: spawned.version,
            features: spawned.features,
            start_latency: spawned.start_latency,
            last_pong: None,
            ping_n: 0,
            log_tail: spawned.log_tail,
            captures: spawned.captures,
            sandbox: spawned.sandbox,
        });
        Ok(())
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut heartbeat = self.config.heartbeat.map(|p| {
            let mut i = tokio::time::interval(p);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        loop {
            if self.closing && self.worker.is_none() {
                break;
            }
            let timer = self.next_timer();
            tokio::select! {
                biased;
                // Notices first: a cell's outcome reaches its client only after its notice was
                // queued here, so a command sent after seeing an outcome sees its effects.
                Some(notice) = self.notices.recv() => self.on_notice(notice).await,
                cmd = commands.recv(), if !self.closing => match cmd {
                    Some(cmd) => self.on_command(cmd).await,
                    None => self.begin_shutdown().await,
                },
                _ = sleep_until(timer.unwrap_or_else(far_future).into()), if timer.is_some() => self.on_timer().await,
                _ = tick(&mut heartbeat), if self.worker.is_some() && heartbeat.is_some() => self.ping().await,
            }
            if !self.closing {
                self.dispatch().await;
            }
        }
        for w in self.shutdown_waiters.drain(..) {
            let _ = w.send(Ok(()));
        }
        tracing::debug!(session = %self.id, "session closed");
    }

    fn next_timer(&self) -> Option<Instant> {
        let eof = self.worker.as_ref().and_then(|w| w.eof_deadline);
        let cell = self.cell_timer();
        match (eof, cell) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn cell_timer(&self) -> Option<Instant> {
        match &self.current {
            Some(Current::Cell {
                deadline,
                grace_until,
                hard_deadline,
                ..
            }) => [*deadline, *grace_until, *hard_deadline]
                .into_iter()
                .flatten()
                .min(),
            _ => None,
        }
    }

    fn new_req(&mut self) -> String {
        self.next_req += 1;
        format!("q{}", self.next_req)
    }

    async fn send_data(&mut self, msg: &HostMessage, body: &[u8]) -> bool {
        let mut buf = BytesMut::new();
        if let Err(e) = encode_message(msg, body, self.config.max_frame, &mut buf) {
            tracing::warn!(error = %e, "could not encode a message for the worker");
            return false;
        }
        match self.worker.as_mut() {
            // A write error means the worker is dying; its exit notice will follow.
            Some(w) if w.exit.is_none() => w.data.write_all(&buf).await.is_ok(),
            _ => false,
        }
    }

    async fn send_control(&mut self, msg: &ControlMessage) {
        let mut buf = BytesMut::new();
        if encode_message(msg, &[], self.config.max_frame, &mut buf).is_err() {
            return;
        }
        if let Some(w) = self.worker.as_mut() {
            if w.exit.is_none() {
                let _ = w.control.write_all(&buf).await;
            }
        }
    }

    async fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Execute {
                exec,
                req,
                events,
                reply,
            } => {
                if self.queue.len() >= self.config.max_queued {
                    let _ = reply.send(Err(SessionError::QueueFull {
                        max: self.config.max_queued,
                    }));
                    return;
                }
                self.routes.insert(exec.clone(), events);
                self.queue.push_back(Work::Cell {
                    exec,
                    code: req.code,
                    history: req.history,
                    timeout: req.timeout.or(self.config.default_timeout),
                });
                let _ = reply.send(Ok(()));
            }
            Command::InputReply { exec, req, text } => {
                // Only answers to a request the worker made and nobody answered yet go out:
                // unsolicited replies could otherwise fill the data pipe while a cell runs.
                if self.routes.take_input(&exec, &req) {
                    self.send_data(&HostMessage::InputReply { exec, req, text }, &[])
                        .await;
                } else {
                    tracing::debug!(%exec, %req, "dropping an input reply nobody asked for");
                }
            }
            Command::Cancel { exec, interrupt } => self.cancel(exec, interrupt).await,
            Command::Checkpoint { reply } => self.queue.push_back(Work::Checkpoint { reply }),
            Command::Restore { blob, clear, reply } => {
                self.queue.push_back(Work::Restore { blob, clear, reply })
            }
            Command::Reset { reply } => self.queue.push_back(Work::Reset { reply }),
            Command::Restart { reply } => {
                if self.worker.is_some() {
                    self.restart_waiters.push(reply);
                    self.kill(KillCause::Restart);
                } else {
                    let r = self.spawn_worker().await;
                    let _ = reply.send(r);
                }
            }
            Command::Info { reply } => {
                let _ = reply.send(Ok(self.info()));
            }
            Command::Shutdown { reply } => {
                self.shutdown_waiters.push(reply);
                self.begin_shutdown().await;
            }
        }
    }

    async fn cancel(&mut self, exec: String, interrupt: bool) {
        // A queued cell never started: it ends here.
        if let Some(pos) = self
            .queue
            .iter()
            .position(|w| matches!(w, Work::Cell { exec: e, .. } if *e == exec))
        {
            self.queue.remove(pos);
            self.cancels += 1;
            self.emit_host_outcome(&exec, |_| OutcomeStatus::Cancelled)
                .await;
            return;
        }
        let running = matches!(&self.current, Some(Current::Cell { exec: e, .. }) if *e == exec);
        if !running {
            return; // Finished already: a late cancel is a no-op (and not counted).
        }
        self.cancels += 1;
        if interrupt {
            self.send_control(&ControlMessage::Interrupt { exec }).await;
            return;
        }
        self.routes.mark_cancel(&exec, CancelReason::User);
        tracing::debug!(%exec, "cancel sent (cooperative rung)");
        self.start_cancel(exec).await;
    }

    /// Sends a cooperative cancel and arms the grace timer (once).
    async fn start_cancel(&mut self, exec: String) {
        let grace = self.config.cancel_grace;
        if let Some(Current::Cell { grace_until, .. }) = &mut self.current {
            if grace_until.is_none() {
                *grace_until = Some(Instant::now() + grace);
            }
        }
        self.send_control(&ControlMessage::Cancel { exec }).await;
    }

    async fn on_timer(&mut self) {
        let now = Instant::now();
        if let Some(w) = self.worker.as_mut() {
            if w.exit.is_none() && w.eof_deadline.is_some_and(|d| d <= now) {
                w.eof_deadline = None;
                if w.kill_cause.is_none() {
                    w.kill_cause = Some(KillCause::Protocol(
                        "worker closed its event pipe but kept running".into(),
                    ));
                }
                kill_group(w.pid);
                return;
            }
        }
        let Some(Current::Cell {
            exec,
            deadline,
            grace_until,
            hard_deadline,
        }) = &mut self.current
        else {
            return;
        };
        if hard_deadline.is_some_and(|d| d <= now) {
            *hard_deadline = None;
            *grace_until = None;
            *deadline = None;
            tracing::info!(session = %self.id, exec = %exec, "the policy's wall-clock limit passed; killing the worker");
            self.kill(KillCause::WallClock);
            return;
        }
        if grace_until.is_some_and(|g| g <= now) {
            *grace_until = None;
            *deadline = None;
            let reason = self
                .routes
                .cancel_reason(exec)
                .unwrap_or(CancelReason::User);
            if reason == CancelReason::User {
                self.cancel_kills += 1;
            }
            tracing::info!(session = %self.id, exec = %exec, "cancel did not take effect within the grace period; killing the worker");
            self.kill(KillCause::CancelEscalation(reason));
            return;
        }
        if deadline.is_some_and(|d| d <= now) {
            *deadline = None;
            let exec = exec.clone();
            self.timeouts += 1;
            self.routes.mark_cancel(&exec, CancelReason::Deadline);
            self.start_cancel(exec).await;
        }
    }

    fn kill(&mut self, cause: KillCause) {
        if let Some(w) = self.worker.as_mut() {
            if w.kill_cause.is_none() {
                w.kill_cause = Some(cause);
            }
            kill_group(w.pid);
        }
    }

    async fn ping(&mut self) {
        let n = match self.worker.as_mut() {
            Some(w) => {
                w.ping_n += 1;
                w.ping_n
            }
            None => return,
        };
        self.send_control(&ControlMessage::Ping { n }).await;
    }

    async fn begin_shutdown(&mut self) {
        if self.closing {
            return;
        }
        self.closing = true;
        let queued: Vec<Work> = self.queue.drain(..).collect();
        for work in queued {
            self.fail_work(work, "shutdown").await;
        }
        if self.worker.is_some() {
            self.send_control(&ControlMessage::Shutdown {}).await;
            self.kill(KillCause::Shutdown);
        }
    }

    async fn fail_work(&mut self, work: Work, operation: &'static str) {
        match work {
            Work::Cell { exec, .. } => {
                self.emit_host_outcome(&exec, |_| OutcomeStatus::Cancelled)
                    .await
            }
            Work::Checkpoint { reply } => {
                let _ = reply.send(Err(SessionError::WorkerLost { operation }));
            }
            Work::Restore { reply, .. } => {
                let _ = reply.send(Err(SessionError::WorkerLost { operation }));
            }
            Work::Reset { reply } => {
                let _ = reply.send(Err(SessionError::WorkerLost { operation }));
            }
        }
    }

    /// Emits an outcome the host decided, after any output already routed.
    async fn emit_host_outcome(
        &mut self,
        exec: &str,
        status: impl FnOnce(Option<CancelReason>) -> OutcomeStatus,
    ) {
        if let Some((tx, events)) = self.routes.finish(exec, status, None) {
            if let Some(Event::Outcome(o)) = events.last() {
                tracing::debug!(%exec, status = o.status.name(), "host-made outcome");
            }
            self.count_outcome(&events);
            for ev in events {
                let _ = tx.send(ev).await;
            }
        }
    }

    fn count_outcome(&mut self, events: &[Event]) {
        if let Some(Event::Outcome(o)) = events.last() {
            self.executions += 1;
            if matches!(o.status, OutcomeStatus::Error { .. }) {
                self.errors += 1;
            }
            if o.truncated.is_some() {
                self.truncations += 1;
            }
            if let OutcomeStatus::Killed { reason, .. } = &o.status {
                *self.kills.entry(reason.as_str()).or_insert(0) += 1;
            }
        }
    }

    async fn dispatch(&mut self) {
        while self.current.is_none() && !self.queue.is_empty() && self.restart_waiters.is_empty() {
            if self.worker.is_none() {
                if let Err(e) = self.spawn_worker().await {
                    tracing::error!(session = %self.id, error = %e, "could not start a worker");
                    // Nothing can run: every queued item fails with the reason.
                    let queued: Vec<Work> = self.queue.drain(..).collect();
                    for work in queued {
                        let msg = e.to_string();
                        match work {
                            Work::Cell { exec, .. } => {
                                self.emit_host_outcome(&exec, |_| OutcomeStatus::WorkerLost {
                                    reason: format!("could not start a worker: {msg}"),
                                })
                                .await
                            }
                            other => self.fail_work(other, "worker start").await,
                        }
                    }
                    return;
                }
            }
            let Some(work) = self.queue.pop_front() else {
                return;
            };
            match work {
                Work::Cell {
                    exec,
                    code,
                    history,
                    timeout,
                } => {
                    if !self.routes.contains(&exec) {
                        continue;
                    }
                    tracing::debug!(%exec, ?timeout, queued = self.queue.len(), "cell dispatched");
                    self.current = Some(Current::Cell {
                        exec: exec.clone(),
                        deadline: timeout.map(|t| Instant::now() + t),
                        grace_until: None,
                        hard_deadline: self
                            .config
                            .sandbox
                            .limits
                            .wall_clock_ms
                            .map(|ms| Instant::now() + Duration::from_millis(ms)),
                    });
                    self.send_data(
                        &HostMessage::Execute {
                            exec,
                            code,
                            history,
                        },
                        &[],
                    )
                    .await;
                }
                Work::Checkpoint { reply } => {
                    let req = self.new_req();
                    self.current = Some(Current::Checkpoint {
                        req: req.clone(),
                        reply,
                    });
                    self.send_data(&HostMessage::Checkpoint { req }, &[]).await;
                }
                Work::Restore { blob, clear, reply } => {
                    let req = self.new_req();
                    if blob.len() + 4096 > self.config.max_frame {
                        let _ = reply.send(Err(SessionError::Restore(format!(
                            "checkpoint of {} bytes exceeds the frame limit of {} bytes",
                            blob.len(),
                            self.config.max_frame
                        ))));
                        continue;
                    }
                    self.current = Some(Current::Restore {
                        req: req.clone(),
                        reply,
                    });
                    self.send_data(&HostMessage::Restore { req, clear }, &blob)
                        .await;
                }
                Work::Reset { reply } => {
                    let req = self.new_req();
                    self.current = Some(Current::Reset {
                        req: req.clone(),
                        reply,
                    });
                    self.send_data(&HostMessage::Reset { req }, &[]).await;
                }
            }
        }
    }

    fn is_current_gen(&self, gen: u64) -> bool {
        self.worker.as_ref().is_some_and(|w| w.gen == gen)
    }

    async fn on_notice(&mut self, notice: Notice) {
        match notice {
            Notice::CellDone {
                gen,
                exec,
                error,
                truncated,
            } => {
                if !self.is_current_gen(gen) {
                    return;
                }
                self.executions += 1;
                self.errors += u64::from(error);
                self.truncations += u64::from(truncated);
                if matches!(&self.current, Some(Current::Cell { exec: e, .. }) if *e == exec) {
                    self.current = None;
                }
            }
            Notice::CheckpointDone {
                gen,
                req,
                blob,
                names,
                skipped,
            } => {
                if !self.is_current_gen(gen) {
                    return;
                }
                if matches!(&self.current, Some(Current::Checkpoint { req: r, .. }) if *r == req) {
                    if let Some(Current::Checkpoint { reply, .. }) = self.current.take() {
                        let _ = reply.send(Ok(Checkpoint {
                            blob,
                            names,
                            skipped,
                        }));
                    }
                }
            }
            Notice::CheckpointFailed { gen, req, message } => {
                if !self.is_current_gen(gen) {
                    return;
                }
                if matches!(&self.current, Some(Current::Checkpoint { req: r, .. }) if *r == req) {
                    if let Some(Current::Checkpoint { reply, .. }) = self.current.take() {
                        let _ = reply.send(Err(SessionError::Checkpoint(message)));
                    }
                }
            }
            Notice::RestoreDone {
                gen,
                req,
                restored,
                error,
            } => {
                if !self.is_current_gen(gen) {
                    return;
                }
                match self.current.take() {
                    Some(Current::Restore { req: r, reply }) if r == req => {
                        let _ = reply.send(match error {
                            None => Ok(restored),
                            Some(e) => Err(SessionError::Restore(e)),
                        });
                    }
                    Some(Current::Reset { req: r, reply }) if r == req => {
                        let _ = reply.send(match error {
                            None => Ok(()),
                            Some(e) => Err(SessionError::Restore(e)),
                        });
                    }
                    other => self.current = other,
                }
            }
            Notice::Pong { gen } => {
                if let Some(w) = self.worker.as_mut().filter(|w| w.gen == gen) {
                    w.last_pong = Some(Instant::now());
                }
            }
            Notice::Exited { gen, status } => {
                let Some(w) = self.worker.as_mut().filter(|w| w.gen == gen) else {
                    return;
                };
                w.exit = Some(status);
                if let Some(stop) = w.reader_stop.take() {
                    let _ = stop.send(());
                }
                self.maybe_finalize().await;
            }
            Notice::Closed { gen, error } => {
                let Some(w) = self.worker.as_mut().filter(|w| w.gen == gen) else {
                    return;
                };
                if w.exit.is_none() {
                    match &error {
                        // A corrupt stream cannot be resynchronised: the worker is useless.
                        Some(e) => {
                            if w.kill_cause.is_none() {
                                w.kill_cause = Some(KillCause::Protocol(e.clone()));
                            }
                            kill_group(w.pid);
                        }
                        // Clean EOF: normally the process is exiting; give the exit notice the
                        // grace period to arrive with its status before declaring it broken.
                        None => w.eof_deadline = Some(Instant::now() + self.config.cancel_grace),
                    }
                }
                w.reader_closed = Some(error);
                self.maybe_finalize().await;
            }
        }
    }

    /// Once the worker has exited and its reader has drained, end whatever was in flight.
    async fn maybe_finalize(&mut self) {
        let ready = self
            .worker
            .as_ref()
            .is_some_and(|w| w.exit.is_some() && w.reader_closed.is_some());
        if !ready {
            return;
        }
        let Some(mut w) = self.worker.take() else {
            return;
        };
        self.workers_lost += 1;
        let status = w.exit.flatten();
        let protocol_error = w.reader_closed.flatten();
        let cause = w.kill_cause.clone();
        let sandbox_reason = status.and_then(|s| w.sandbox.classify_exit(s));
        w.sandbox.cleanup();
        tracing::info!(session = %self.id, pid = w.pid, ?status, ?cause, "worker ended");
        // What the worker wrote to fd 1/2 but its pump never forwarded (it died first).
        let (out, err) = w.captures.drain();
        self.route_leftover(&out, &err).await;
        if let Some(current) = self.current.take() {
            match current {
                Current::Cell { exec, .. } => {
                    let tail = w.log_tail.text();
                    self.emit_host_outcome(&exec, |_| {
                        lost_status(cause, status, sandbox_reason, protocol_error, &tail)
                    })
                    .await;
                }
                Current::Checkpoint { reply, .. } => {
                    let _ = reply.send(Err(SessionError::WorkerLost {
                        operation: "checkpoint",
                    }));
                }
                Current::Restore { reply, .. } => {
                    let _ = reply.send(Err(SessionError::WorkerLost {
                        operation: "restore",
                    }));
                }
                Current::Reset { reply, .. } => {
                    let _ = reply.send(Err(SessionError::WorkerLost { operation: "reset" }));
                }
            }
        }
        if !self.restart_waiters.is_empty() && !self.closing {
            let result = self.spawn_worker().await;
            for waiter in self.restart_waiters.drain(..) {
                let _ = waiter.send(match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(SessionError::Handshake {
                        reason: e.to_string(),
                    }),
                });
            }
        }
    }

    /// Delivers output collected from a dead worker's capture pipes to the running cell (or as
    /// background output), before that cell's outcome.
    async fn route_leftover(&mut self, out: &[u8], err: &[u8]) {
        let exec = match &self.current {
            Some(Current::Cell { exec, .. }) => Some(exec.clone()),
            _ => None,
        };
        for (stream, bytes) in [(Stream::Stdout, out), (Stream::Stderr, err)] {
            if bytes.is_empty() {
                continue;
            }
            match exec
                .as_deref()
                .and_then(|x| self.routes.output(x, stream, bytes))
            {
                Some(routed) => {
                    if let Some(ev) = routed.event {
                        let _ = routed.tx.send(ev).await;
                    }
                }
                None => {
                    let _ = self.background.send(BackgroundEvent::Output {
                        stream,
                        text: String::from_utf8_lossy(bytes).into_owned(),
                    });
                }
            }
        }
    }

    fn info(&self) -> SessionInfo {
        let state = if self.closing {
            SessionState::Closed
        } else if self.worker.is_none() {
            SessionState::NoWorker
        } else if self.current.is_some() {
            SessionState::Busy
        } else {
            SessionState::Idle
        };
        let w = self.worker.as_ref();
        let (rss_bytes, cpu_seconds) = w.map(|w| proc_usage(w.pid)).unwrap_or((None, None));
        SessionInfo {
            id: self.id.clone(),
            state,
            pid: w.map(|w| w.pid),
            python: w
                .map(|w| w.python.clone())
                .unwrap_or_else(|| self.last_python.clone()),
            executable: w
                .map(|w| w.executable.clone())
                .unwrap_or_else(|| self.interp.executable.clone()),
            protocol_version: w.map(|w| w.version).unwrap_or(self.last_version),
            features: w.map(|w| w.features.clone()).unwrap_or_default(),
            executions: self.executions,
            errors: self.errors,
            cancels: self.cancels,
            cancel_kills: self.cancel_kills,
            timeouts: self.timeouts,
            workers_lost: self.workers_lost,
            workers_started: self.workers_started,
            queued: self.queue.len(),
            rss_bytes,
            cpu_seconds,
            last_heartbeat: w.and_then(|w| w.last_pong).map(|t| t.elapsed()),
            start_latency: w.map(|w| w.start_latency),
            frames_in: self.stats.frames_in.load(Ordering::Relaxed),
            bytes_in: self.stats.bytes_in.load(Ordering::Relaxed),
            output_truncations: self.truncations,
            kills: self
                .kills
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            protocol_errors: self.stats.protocol_errors.load(Ordering::Relaxed),
            faults: self.stats.faults.load(Ordering::Relaxed),
            scratch_dir: self.scratch.path().to_path_buf(),
            sandbox: w
                .map(|w| {
                    w.sandbox
                        .layers()
                        .iter()
                        .map(|l| SandboxLayer {
                            name: l.name.to_string(),
                            state: format!("{:?}", l.state).to_lowercase(),
                            detail: l.detail.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            config: self.config.clone(),
        }
    }
}

/// The outcome of a cell whose worker is gone.
fn lost_status(
    cause: Option<KillCause>,
    status: Option<std::process::ExitStatus>,
    sandbox_reason: Option<KillReason>,
    protocol_error: Option<String>,
    log_tail: &str,
) -> OutcomeStatus {
    use std::os::unix::process::ExitStatusExt;
    match cause {
        Some(KillCause::CancelEscalation(CancelReason::Deadline)) => {
            OutcomeStatus::TimedOut { state_lost: true }
        }
        Some(KillCause::CancelEscalation(CancelReason::User)) => OutcomeStatus::WorkerLost {
            reason: "the cell did not stop within the cancel grace period; the worker was killed"
                .into(),
        },
        Some(KillCause::WallClock) => OutcomeStatus::Killed {
            reason: KillReason::WallClock,
            detail: "the sandbox policy's per-cell wall-clock limit passed".into(),
        },
        Some(KillCause::Restart) => OutcomeStatus::WorkerLost {
            reason: "the session was restarted".into(),
        },
        Some(KillCause::Shutdown) => OutcomeStatus::WorkerLost {
            reason: "the session was shut down".into(),
        },
        Some(KillCause::Protocol(msg)) => OutcomeStatus::WorkerLost { reason: msg },
        None => {
            if let Some(msg) = protocol_error {
                return OutcomeStatus::WorkerLost { reason: msg };
            }
            if let Some(reason) = sandbox_reason {
                if !matches!(reason, KillReason::Signal(_)) {
                    return OutcomeStatus::Killed {
                        reason,
                        detail: format!("the sandbox's {} limit ended the worker", reason.as_str()),
                    };
                }
            }
            match status {
                Some(s) => match s.signal() {
                    Some(libc::SIGXCPU) => OutcomeStatus::Killed {
                        reason: KillReason::CpuLimit,
                        detail: "CPU time limit exceeded (SIGXCPU)".into(),
                    },
                    Some(libc::SIGXFSZ) => OutcomeStatus::Killed {
                        reason: KillReason::FileSize,
                        detail: "file size limit exceeded (SIGXFSZ)".into(),
                    },
                    Some(sig) => OutcomeStatus::Killed {
                        reason: KillReason::Signal(sig),
                        detail: format!("worker killed by signal {sig}"),
                    },
                    None => {
                        let code = s.code().unwrap_or(-1);
                        let mut reason = format!("worker exited with status {code}");
                        if !log_tail.is_empty() {
                            reason.push_str(": ");
                            reason.push_str(log_tail.lines().last().unwrap_or_default());
                        }
                        OutcomeStatus::WorkerLost { reason }
                    }
                },
                None => OutcomeStatus::WorkerLost {
                    reason: "worker exited (status unknown)".into(),
                },
            }
        }
    }
}

/// RSS (bytes) and CPU seconds of a process, read from `/proc`.
pub(crate) fn proc_usage(pid: u32) -> (Option<u64>, Option<f64>) {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    // SAFETY: as above.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let rss = std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * page);
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime and stime are 14th and 15th.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ut: f64 = f.get(11)?.parse().ok()?;
            let st: f64 = f.get(12)?.parse().ok()?;
            Some((ut + st) / ticks)
        });
    (rss, cpu)
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365)
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn deadline_escalation_is_timed_out_with_state_lost() {
        assert_eq!(
            lost_status(
                Some(KillCause::CancelEscalation(CancelReason::Deadline)),
                None,
                None,
                None,
                ""
            ),
            OutcomeStatus::TimedOut { state_lost: true }
        );
    }

    #[test]
    fn sigxcpu_is_a_cpu_limit_kill() {
        let st = std::process::ExitStatus::from_raw(libc::SIGXCPU);
        assert!(matches!(
            lost_status(None, Some(st), None, None, ""),
            OutcomeStatus::Killed {
                reason: KillReason::CpuLimit,
                ..
            }
        ));
    }

    #[test]
    fn plain_exit_is_worker_lost_with_the_status() {
        let st = std::process::ExitStatus::from_raw(3 << 8);
        match lost_status(None, Some(st), None, None, "") {
            OutcomeStatus::WorkerLost { reason } => {
                assert!(reason.contains("status 3"), "{reason}")
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn proc_usage_reads_this_process() {
        let (rss, cpu) = proc_usage(std::process::id());
        assert!(rss.is_some_and(|r| r > 0));
        assert!(cpu.is_some());
    }
}
