//! The public handles: [`Session`], [`Execution`], [`ExecHandle`], and what they report.
//!
//! A `Session` is a cheap clonable handle to one actor task ([`crate::actor`]) that owns the
//! worker. Dropping every handle (and every execution handle) shuts the session down and kills
//! the worker's process group.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use capsule_protocol::{Skipped, Stream};
use serde_json::{Map, Value};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::actor::{self, Command};
use crate::config::SessionConfig;
use crate::error::SessionError;
use crate::event::{Event, Outcome, OutcomeStatus};

/// Counters shared by the reader task and the actor (relaxed atomics: metrics only).
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub frames_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub faults: AtomicU64,
}

/// Something the worker said outside any execution.
#[derive(Clone, Debug, PartialEq)]
pub enum BackgroundEvent {
    /// Output written while no cell ran (a background thread, a detached child).
    Output {
        /// Stream.
        stream: Stream,
        /// Text (lossy UTF-8).
        text: String,
    },
    /// A worker fault or an undecodable frame.
    Fault {
        /// Description.
        message: String,
    },
}

/// What to run.
#[derive(Clone, Debug, PartialEq)]
pub struct ExecuteRequest {
    /// The cell's source.
    pub code: String,
    /// Deadline for this cell (overrides the session default). Counted from when the cell
    /// starts running on the worker, not from submission.
    pub timeout: Option<Duration>,
    /// Whether the cell counts in `In`/`Out` and execution numbers (false for warm-up code).
    pub history: bool,
}

impl ExecuteRequest {
    /// A cell with default settings.
    pub fn new(code: impl Into<String>) -> Self {
        ExecuteRequest {
            code: code.into(),
            timeout: None,
            history: true,
        }
    }

    /// Sets a deadline.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// A checkpoint of a session's namespace.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// The self-describing, checksummed blob (see `docs/protocol.md` §6).
    pub blob: Bytes,
    /// Names captured.
    pub names: Vec<String>,
    /// Names that could not be captured, with reasons.
    pub skipped: Vec<Skipped>,
}

/// Life-cycle state of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionState {
    /// A worker is up and nothing runs.
    Idle,
    /// A cell or checkpoint runs.
    Busy,
    /// No worker right now (it died; the next request starts a fresh one).
    NoWorker,
    /// Shut down.
    Closed,
}

impl SessionState {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Idle => "idle",
            SessionState::Busy => "busy",
            SessionState::NoWorker => "no_worker",
            SessionState::Closed => "closed",
        }
    }
}

/// A snapshot of a session: state, counters, worker resources, effective config.
#[derive(Clone, Debug)]
pub struct SessionInfo {
    /// Session id.
    pub id: String,
    /// State.
    pub state: SessionState,
    /// Worker pid, if a worker is up.
    pub pid: Option<u32>,
    /// Python version of the worker.
    pub python: String,
    /// Interpreter path.
    pub executable: PathBuf,
    /// Negotiated protocol version.
    pub protocol_version: u32,
    /// Negotiated features.
    pub features: Vec<String>,
    /// Cells finished (any outcome).
    pub executions: u64,
    /// Cells that ended `error`.
    pub errors: u64,
    /// Cancels requested.
    pub cancels: u64,
    /// Cancels that had to kill the worker.
    pub cancel_kills: u64,
    /// Cells that hit their deadline.
    pub timeouts: u64,
    /// Workers that died or were killed.
    pub workers_lost: u64,
    /// Workers started (the first included).
    pub workers_started: u64,
    /// Executions waiting behind the running one.
    pub queued: usize,
    /// Worker resident memory (from `/proc/<pid>/statm`).
    pub rss_bytes: Option<u64>,
    /// Worker CPU time, user + system (from `/proc/<pid>/stat`).
    pub cpu_seconds: Option<f64>,
    /// Time since the last pong, if any.
    pub last_heartbeat: Option<Duration>,
    /// Time the current worker took from spawn to ready.
    pub start_latency: Option<Duration>,
    /// Frames received from workers.
    pub frames_in: u64,
    /// Bytes received from workers.
    pub bytes_in: u64,
    /// Cells whose output went over the budget.
    pub output_truncations: u64,
    /// Cells that ended `killed`, by reason (`cpu_limit`, `oom`, `wall_clock`, ...).
    pub kills: std::collections::BTreeMap<String, u64>,
    /// Protocol errors seen (undecodable or torn frames).
    pub protocol_errors: u64,
    /// Worker faults reported.
    pub faults: u64,
    /// The session's scratch directory (the worker's cwd, `HOME` and `TMPDIR`).
    pub scratch_dir: PathBuf,
    /// The sandbox layers of the current worker and their state (active / missing / disabled).
    pub sandbox: Vec<SandboxLayer>,
    /// Effective configuration.
    pub config: SessionConfig,
}

/// One sandbox layer of a worker, as reported in [`SessionInfo`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxLayer {
    /// Layer name (`user_ns`, `landlock`, `seccomp`, `rlimits`, `cgroup`, ...).
    pub name: String,
    /// `active`, `missing` or `disabled`.
    pub state: String,
    /// Why, or what it enforces.
    pub detail: String,
}

/// Everything one execution produced, for callers that do not stream.
#[derive(Clone, Debug, PartialEq)]
pub struct Collected {
    /// All stdout text.
    pub stdout: String,
    /// All stderr text.
    pub stderr: String,
    /// Display bundles.
    pub displays: Vec<Map<String, Value>>,
    /// The outcome.
    pub outcome: Outcome,
}

/// A handle to one persistent Python session.
///
/// ```
/// # tokio::runtime::Runtime::new().expect("runtime").block_on(async {
/// use capsule_session::{OutcomeStatus, Session, SessionConfig};
/// let session = Session::start(SessionConfig::from_env()?).await?;
/// session.run("x = 6 * 7").await?;
/// let done = session.run("print('hi'); x").await?;
/// assert_eq!(done.stdout, "hi\n");
/// assert!(matches!(done.outcome.status, OutcomeStatus::Ok { ref repr, .. } if repr == "42"));
/// session.shutdown().await?;
/// # Ok::<(), capsule_session::SessionError>(())
/// # }).expect("example");
/// ```
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
}

struct Shared {
    id: String,
    cmd: mpsc::Sender<Command>,
    next_exec: AtomicU64,
    event_queue: usize,
    background: broadcast::Sender<BackgroundEvent>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.shared.id)
            .finish()
    }
}

fn new_session_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("s{:x}-{:x}-{n}", std::process::id(), nanos)
}

impl Session {
    /// Starts a worker and returns once it is ready for cells.
    pub async fn start(config: SessionConfig) -> Result<Session, SessionError> {
        Self::start_with(config, None).await
    }

    /// Like [`Session::start`], with a [`crate::Launcher`] that starts this session's workers
    /// (its first and any respawned one) instead of a plain spawn, e.g. a fork server. The
    /// launcher gets the worker's sandbox plan and must have the child apply it, so launched
    /// workers run under the same layers as spawned ones. A launch error falls back to a plain
    /// spawn.
    pub async fn start_with(
        config: SessionConfig,
        launcher: Option<Arc<dyn crate::Launcher>>,
    ) -> Result<Session, SessionError> {
        config.validate()?;
        let id = new_session_id();
        let (background, _) = broadcast::channel(256);
        let event_queue = config.event_queue;
        let cmd = actor::start(id.clone(), config, background.clone(), launcher).await?;
        Ok(Session {
            shared: Arc::new(Shared {
                id,
                cmd,
                next_exec: AtomicU64::new(1),
                event_queue,
                background,
            }),
        })
    }

    /// The session id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, SessionError>>) -> Command,
    ) -> Result<T, SessionError> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .cmd
            .send(make(tx))
            .await
            .map_err(|_| SessionError::Closed)?;
        rx.await.map_err(|_| SessionError::Closed)?
    }

    /// Queues a cell with default settings. Cells run one at a time in submission order.
    pub async fn execute(&self, code: impl Into<String>) -> Result<Execution, SessionError> {
        self.execute_with(ExecuteRequest::new(code)).await
    }

    /// Queues a cell.
    pub async fn execute_with(&self, req: ExecuteRequest) -> Result<Execution, SessionError> {
        let n = self.shared.next_exec.fetch_add(1, Ordering::Relaxed);
        let exec = format!("e{n}");
        let (tx, rx) = mpsc::channel(self.shared.event_queue);
        let exec_id = exec.clone();
        self.request(|reply| Command::Execute {
            exec: exec_id,
            req,
            events: tx,
            reply,
        })
        .await?;
        Ok(Execution {
            handle: ExecHandle {
                exec,
                cmd: self.shared.cmd.clone(),
            },
            rx,
            done: false,
        })
    }

    /// Runs a cell to its outcome and collects its output. `input()` in the cell gets EOF.
    pub async fn run(&self, code: impl Into<String>) -> Result<Collected, SessionError> {
        Ok(self.execute(code).await?.collect().await)
    }

    /// Takes a checkpoint of the namespace (queued behind running cells).
    pub async fn checkpoint(&self) -> Result<Checkpoint, SessionError> {
        self.request(|reply| Command::Checkpoint { reply }).await
    }

    /// Restores a checkpoint blob; returns the names restored. **Runs code: trusted blobs only.**
    pub async fn restore(
        &self,
        blob: impl Into<Bytes>,
        clear: bool,
    ) -> Result<Vec<String>, SessionError> {
        let blob = blob.into();
        self.request(|reply| Command::Restore { blob, clear, reply })
            .await
    }

    /// Resets the namespace to a fresh state without restarting the worker.
    pub async fn reset(&self) -> Result<(), SessionError> {
        self.request(|reply| Command::Reset { reply }).await
    }

    /// Kills the worker and starts a fresh one. A running cell ends `worker_lost`; queued cells
    /// run on the new worker.
    pub async fn restart(&self) -> Result<(), SessionError> {
        self.request(|reply| Command::Restart { reply }).await
    }

    /// A snapshot of the session.
    pub async fn info(&self) -> Result<SessionInfo, SessionError> {
        self.request(|reply| Command::Info { reply }).await
    }

    /// Stops the session: queued cells end `cancelled`, a running cell `worker_lost`, the
    /// worker exits. Idempotent.
    pub async fn shutdown(&self) -> Result<(), SessionError> {
        match self.request(|reply| Command::Shutdown { reply }).await {
            Ok(()) | Err(SessionError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Events the worker produced outside any execution.
    pub fn subscribe_background(&self) -> broadcast::Receiver<BackgroundEvent> {
        self.shared.background.subscribe()
    }

    /// Whether the session's actor is gone.
    pub fn is_closed(&self) -> bool {
        self.shared.cmd.is_closed()
    }
}

/// Control of one execution: cancel, interrupt, answer input. Clonable, usable from any task.
///
/// ```
/// # tokio::runtime::Runtime::new().expect("runtime").block_on(async {
/// use capsule_session::{Event, OutcomeStatus, Session, SessionConfig};
/// let session = Session::start(SessionConfig::from_env()?).await?;
/// let mut exec = session.execute("print('go', flush=True)\nwhile True: pass").await?;
/// let handle = exec.handle();
/// while let Some(event) = exec.next().await {
///     match event {
///         Event::Output { .. } => handle.cancel().await?,
///         Event::Outcome(o) => assert_eq!(o.status, OutcomeStatus::Cancelled),
///         _ => {}
///     }
/// }
/// # Ok::<(), capsule_session::SessionError>(())
/// # }).expect("example");
/// ```
#[derive(Clone, Debug)]
pub struct ExecHandle {
    exec: String,
    cmd: mpsc::Sender<Command>,
}

impl ExecHandle {
    /// The execution id.
    pub fn id(&self) -> &str {
        &self.exec
    }

    /// Cancels the execution: a queued cell is dropped, a running one gets `KeyboardInterrupt`
    /// and, if it does not stop within the grace period, its worker is killed. The outcome
    /// (`cancelled`, or `worker_lost`) arrives on the execution's stream. A cancel for a cell
    /// that already finished does nothing.
    pub async fn cancel(&self) -> Result<(), SessionError> {
        self.cmd
            .send(Command::Cancel {
                exec: self.exec.clone(),
                interrupt: false,
            })
            .await
            .map_err(|_| SessionError::Closed)
    }

    /// Raises `KeyboardInterrupt` in the running cell without the kill ladder; the cell may
    /// catch it.
    pub async fn interrupt(&self) -> Result<(), SessionError> {
        self.cmd
            .send(Command::Cancel {
                exec: self.exec.clone(),
                interrupt: true,
            })
            .await
            .map_err(|_| SessionError::Closed)
    }

    /// Answers an input request (`None` = end of input: `EOFError` in the cell).
    pub async fn reply_input(&self, req: &str, text: Option<String>) -> Result<(), SessionError> {
        self.cmd
            .send(Command::InputReply {
                exec: self.exec.clone(),
                req: req.to_string(),
                text,
            })
            .await
            .map_err(|_| SessionError::Closed)
    }
}

/// One queued or running cell: a stream of [`Event`]s ending in exactly one outcome.
///
/// ```
/// # tokio::runtime::Runtime::new().expect("runtime").block_on(async {
/// use capsule_session::{Event, OutcomeStatus, Session, SessionConfig};
/// let session = Session::start(SessionConfig::from_env()?).await?;
/// let mut exec = session.execute("name = input('Name: ')\nprint('Hi', name)").await?;
/// let mut out = String::new();
/// while let Some(event) = exec.next().await {
///     match event {
///         Event::InputRequest { req, .. } => exec.reply_input(&req, Some("Ada".into())).await?,
///         Event::Output { text, .. } => out.push_str(&text),
///         Event::Outcome(o) => assert!(matches!(o.status, OutcomeStatus::Ok { .. })),
///         Event::Display { .. } => {}
///     }
/// }
/// assert_eq!(out, "Hi Ada\n");
/// # Ok::<(), capsule_session::SessionError>(())
/// # }).expect("example");
/// ```
#[derive(Debug)]
pub struct Execution {
    handle: ExecHandle,
    rx: mpsc::Receiver<Event>,
    done: bool,
}

impl Execution {
    /// The execution id.
    pub fn id(&self) -> &str {
        &self.handle.exec
    }

    /// A clonable control handle.
    pub fn handle(&self) -> ExecHandle {
        self.handle.clone()
    }

    /// The next event; `None` after the outcome has been returned.
    pub async fn next(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        let ev = self.rx.recv().await;
        Some(self.seen(ev))
    }

    /// Marks the end at the outcome. A closed channel (`None`) still yields exactly one outcome:
    /// the actor cannot vanish without ending its executions, but if it ever did the client
    /// would get `worker_lost`, never a silent end.
    fn seen(&mut self, ev: Option<Event>) -> Event {
        let ev = ev.unwrap_or_else(|| {
            Event::Outcome(Outcome {
                status: OutcomeStatus::WorkerLost {
                    reason: "session ended without reporting an outcome".into(),
                },
                duration_ms: 0.0,
                truncated: None,
            })
        });
        if matches!(ev, Event::Outcome(_)) {
            self.done = true;
        }
        ev
    }

    /// The next event if one is already waiting, without waiting (for writers that batch).
    /// `None` means nothing is buffered right now, or the outcome was already returned.
    pub fn try_next(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        match self.rx.try_recv() {
            Ok(ev) => Some(self.seen(Some(ev))),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => Some(self.seen(None)),
        }
    }

    /// See [`ExecHandle::cancel`].
    pub async fn cancel(&self) -> Result<(), SessionError> {
        self.handle.cancel().await
    }

    /// See [`ExecHandle::reply_input`].
    pub async fn reply_input(&self, req: &str, text: Option<String>) -> Result<(), SessionError> {
        self.handle.reply_input(req, text).await
    }

    /// Waits for the outcome, collecting output; input requests are answered with EOF.
    pub async fn collect(mut self) -> Collected {
        let mut out = Collected {
            stdout: String::new(),
            stderr: String::new(),
            displays: Vec::new(),
            outcome: Outcome {
                status: OutcomeStatus::Cancelled,
                duration_ms: 0.0,
                truncated: None,
            },
        };
        while let Some(ev) = self.next().await {
            match ev {
                Event::Output {
                    stream: Stream::Stdout,
                    text,
                } => out.stdout.push_str(&text),
                Event::Output {
                    stream: Stream::Stderr,
                    text,
                } => out.stderr.push_str(&text),
                Event::Display { data, .. } => out.displays.push(data),
                Event::InputRequest { req, .. } => {
                    let _ = self.handle.reply_input(&req, None).await;
                }
                Event::Outcome(o) => out.outcome = o,
            }
        }
        out
    }
}
