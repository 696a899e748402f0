//! `capsule stdio`: the client event model v1 as JSON lines (`docs/api.md`).
//!
//! # Tasks
//!
//! * **stdin reader** (one task): reads bounded lines and hands them to the main loop.
//! * **main loop** (this module's [`run`]): parses commands and acts on them. It never waits
//!   for a cell: cells are queued with `Session::execute_with` (the session runs them FIFO) and
//!   slow requests (checkpoint, restore, restart, info) run in their own tasks, so an `input`
//!   or `cancel` line is always handled promptly.
//! * **one forwarder per cell**: turns the execution's events into client events; answers
//!   input requests from answers buffered before they arrived, and EOF after stdin closed.
//! * **background forwarder**: output written between cells (`output` without `id`).
//! * **writer** (one OS thread): the only owner of stdout. Every event goes through one bounded
//!   channel, so lines never interleave; it writes a batch of whatever is queued and flushes.
//!
//! On `shutdown` the session is shut down (queued cells end `cancelled`, a running one
//! `worker_lost`), every forwarder finishes, `shutdown` is written and the process exits 0.
//! On EOF on stdin the cells already sent run to their outcomes first (input requests are
//! answered with end of input), then the same shutdown follows. If stdout goes away the
//! session is shut down at once.

use std::collections::{HashMap, VecDeque};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use capsule_session::{
    BackgroundEvent, Event, ExecHandle, ExecuteRequest, Execution, Session, SessionConfig,
};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;

use crate::model::{self, id_key, ClientId, InCommand, InfoDto, OutEvent, OutcomeDto, SkippedDto};
use crate::settings::MAX_TIMEOUT_MS;
use crate::{code, Failure};

/// Longest accepted command line (a cell's source travels in one line).
pub const MAX_LINE: usize = 64 * 1024 * 1024;
/// Events waiting for the writer before producers wait (backpressure to the session).
const WRITER_QUEUE: usize = 1024;

/// A cell the client sent that has not reached its outcome.
struct Cell {
    handle: ExecHandle,
    /// Input requests seen and not answered yet, oldest first.
    pending: VecDeque<String>,
    /// Answers sent without a `request` before any request was pending, oldest first.
    answers: VecDeque<Option<String>>,
}

/// State shared by the main loop and the forwarders. The lock is never held across `.await`.
#[derive(Default)]
struct Shared {
    cells: Mutex<HashMap<String, Cell>>,
    /// Set once stdin reached EOF: input requests are answered with end of input.
    stdin_closed: AtomicBool,
}

impl Shared {
    fn cells(&self) -> MutexGuard<'_, HashMap<String, Cell>> {
        // A poisoned map only means a forwarder panicked; the data is still consistent.
        self.cells.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs `capsule stdio` to completion; returns the exit code.
pub async fn run(config: SessionConfig) -> Result<u8, Failure> {
    let (tx, rx) = mpsc::channel::<OutEvent>(WRITER_QUEUE);
    let writer = std::thread::Builder::new()
        .name("capsule-stdout".into())
        .spawn(move || write_events(rx))?;
    let session = match Session::start(config).await {
        Ok(s) => s,
        Err(e) => {
            let message = format!("could not start a session: {e}");
            tracing::error!("{message}");
            let _ = tx.send(OutEvent::Error { id: None, message }).await;
            drop(tx);
            let _ = writer.join();
            return Ok(code::START);
        }
    };
    let background = session.subscribe_background();
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
            let _ = tx
                .send(OutEvent::Error {
                    id: None,
                    message: format!("could not start a session: {e}"),
                })
                .await;
            drop(tx);
            let _ = writer.join();
            return Ok(code::START);
        }
    }
    let bg_task = tokio::spawn(forward_background(background, tx.clone()));
    let shared = Arc::new(Shared::default());
    let mut tasks = JoinSet::new();
    let (lines_tx, mut lines) = mpsc::channel(16);
    let reader = tokio::spawn(read_lines(tokio::io::stdin(), lines_tx));

    let mut ctx = Ctx {
        session: session.clone(),
        shared: shared.clone(),
        tx: tx.clone(),
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
        // Let the cells already sent finish; nobody can answer their input any more.
        shared.stdin_closed.store(true, Ordering::SeqCst);
        let waiting: Vec<(ExecHandle, Vec<String>)> = shared
            .cells()
            .values_mut()
            .map(|c| (c.handle.clone(), c.pending.drain(..).collect()))
            .collect();
        for (handle, reqs) in waiting {
            for req in reqs {
                let _ = handle.reply_input(&req, None).await;
            }
        }
        loop {
            tokio::select! {
                done = tasks.join_next() => if done.is_none() { break },
                _ = tx.closed() => break,
            }
        }
    }

    if let Err(e) = session.shutdown().await {
        tracing::warn!(error = %e, "session shutdown reported an error");
    }
    while tasks.join_next().await.is_some() {}
    bg_task.abort();
    let _ = bg_task.await;
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

/// Why the main loop ended.
enum End {
    Shutdown(Option<ClientId>),
    Eof,
    StdoutGone,
}

struct Ctx {
    session: Session,
    shared: Arc<Shared>,
    tx: mpsc::Sender<OutEvent>,
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
            } => self.execute(id, code, timeout_ms, tasks).await,
            InCommand::Input { id, text, request } => {
                let text = match text {
                    Value::String(s) => Some(s),
                    _ => None,
                };
                self.input(id, text, request).await;
            }
            InCommand::Cancel { id } => {
                let handle = self
                    .shared
                    .cells()
                    .get(&id_key(&id))
                    .map(|c| c.handle.clone());
                match handle {
                    Some(h) => {
                        if let Err(e) = h.cancel().await {
                            self.error(Some(id), format!("cancel failed: {e}")).await;
                        }
                    }
                    None => {
                        self.error(Some(id), "no queued or running cell has this id")
                            .await
                    }
                }
            }
            InCommand::Restart { id } => {
                let (session, tx) = (self.session.clone(), self.tx.clone());
                tasks.spawn(async move {
                    let ev = match session.restart().await {
                        Ok(()) => OutEvent::Restarted { id },
                        Err(e) => OutEvent::Error {
                            id,
                            message: format!("restart failed: {e}"),
                        },
                    };
                    let _ = tx.send(ev).await;
                });
            }
            InCommand::Checkpoint { id, path } => {
                let (session, tx) = (self.session.clone(), self.tx.clone());
                tasks.spawn(async move {
                    let _ = tx.send(checkpoint(&session, id, path).await).await;
                });
            }
            InCommand::Restore { id, path, clear } => {
                let (session, tx) = (self.session.clone(), self.tx.clone());
                tasks.spawn(async move {
                    let ev = match tokio::fs::read(&path).await {
                        Err(e) => OutEvent::Error {
                            id: Some(id),
                            message: format!("cannot read {}: {e}", path.display()),
                        },
                        Ok(blob) => match session.restore(blob, clear).await {
                            Ok(names) => OutEvent::Restored { id, names },
                            Err(e) => OutEvent::Error {
                                id: Some(id),
                                message: e.to_string(),
                            },
                        },
                    };
                    let _ = tx.send(ev).await;
                });
            }
            InCommand::Info { id } => {
                let (session, tx) = (self.session.clone(), self.tx.clone());
                tasks.spawn(async move {
                    let ev = match session.info().await {
                        Ok(info) => OutEvent::Info {
                            id,
                            info: Box::new(InfoDto::from(&info)),
                        },
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

    async fn execute(
        &mut self,
        id: ClientId,
        code: String,
        timeout_ms: Option<u64>,
        tasks: &mut JoinSet<()>,
    ) {
        let key = id_key(&id);
        if self.shared.cells().contains_key(&key) {
            self.error(Some(id), "a cell with this id is still queued or running")
                .await;
            return;
        }
        let mut req = ExecuteRequest::new(code);
        if let Some(ms) = timeout_ms.filter(|&ms| ms > 0) {
            req = req.timeout(Duration::from_millis(ms.min(MAX_TIMEOUT_MS)));
        }
        match self.session.execute_with(req).await {
            Ok(exec) => {
                self.shared.cells().insert(
                    key.clone(),
                    Cell {
                        handle: exec.handle(),
                        pending: VecDeque::new(),
                        answers: VecDeque::new(),
                    },
                );
                tasks.spawn(forward_cell(
                    exec,
                    id,
                    key,
                    self.shared.clone(),
                    self.tx.clone(),
                ));
            }
            Err(e) => self.error(Some(id), format!("execute failed: {e}")).await,
        }
    }

    async fn input(&mut self, id: ClientId, text: Option<String>, request: Option<String>) {
        let target = {
            let mut cells = self.shared.cells();
            match cells.get_mut(&id_key(&id)) {
                None => Err("no queued or running cell has this id"),
                Some(cell) => match request {
                    Some(req) => {
                        cell.pending.retain(|p| *p != req);
                        Ok(Some((cell.handle.clone(), req)))
                    }
                    None => match cell.pending.pop_front() {
                        Some(req) => Ok(Some((cell.handle.clone(), req))),
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

async fn checkpoint(session: &Session, id: ClientId, path: PathBuf) -> OutEvent {
    let cp = match session.checkpoint().await {
        Ok(cp) => cp,
        Err(e) => {
            return OutEvent::Error {
                id: Some(id),
                message: e.to_string(),
            }
        }
    };
    if let Err(e) = tokio::fs::write(&path, &cp.blob).await {
        return OutEvent::Error {
            id: Some(id),
            message: format!("cannot write {}: {e}", path.display()),
        };
    }
    OutEvent::Checkpoint {
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
    }
}

/// Forwards one cell's events until its outcome.
async fn forward_cell(
    mut exec: Execution,
    id: ClientId,
    key: String,
    shared: Arc<Shared>,
    tx: mpsc::Sender<OutEvent>,
) {
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
                    let mut cells = shared.cells();
                    match cells.get_mut(&key) {
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
                // Forget the id before the client can see the outcome, so it may reuse it.
                shared.cells().remove(&key);
                OutEvent::Outcome {
                    id: id.clone(),
                    outcome: OutcomeDto::from(&o),
                }
            }
        };
        if tx.send(out).await.is_err() {
            break;
        }
    }
    shared.cells().remove(&key);
}

/// Forwards output written between cells and worker faults.
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
