//! `capsule exec CODE` and `capsule run FILE`: one cell, streamed to the console.
//!
//! Output goes to this process's stdout/stderr as it arrives; stdout is locked once and
//! buffered, and flushed when no further event is immediately available (and before anything
//! is written to stderr, so the two streams keep their relative order on a terminal). The
//! value's repr is printed last on stdout, like a REPL. `input()` reads a line from stdin,
//! with its prompt on stderr; EOF answers end of input (`EOFError` in the cell). A first
//! Ctrl-C cancels the cell (the cancel ladder applies); the exit code tells how it ended.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{BufWriter, StdoutLock, Write};
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use capsule_session::{Event, Execution, Outcome, OutcomeStatus, Session, SessionConfig, Stream};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader, Lines, Stdin};
use tokio::signal::unix::{signal, SignalKind};

use crate::model::OutcomeDto;
use crate::{code, Failure};

/// The exit code for an outcome (see [`crate::code`]).
pub fn exit_code(status: &OutcomeStatus) -> u8 {
    match status {
        OutcomeStatus::Ok { .. } => code::OK,
        OutcomeStatus::Error { .. } => code::ERROR,
        OutcomeStatus::Cancelled | OutcomeStatus::TimedOut { .. } => code::STOPPED,
        OutcomeStatus::Killed { .. } | OutcomeStatus::WorkerLost { .. } => code::LOST,
    }
}

/// Polls a future once; `Some` if it was ready. Used to batch writes: flush only when the next
/// event is not already waiting. Only for cancel-safe futures.
pub fn ready_now<F: Future>(fut: F) -> Option<F::Output> {
    let fut = pin!(fut);
    match fut.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// Where a cell's output goes: stdout through `W` (locked once for `exec`, unlocked for the
/// repl, whose line editor also writes to the terminal), stderr unbuffered.
pub struct Console<W: Write = StdoutLock<'static>> {
    out: BufWriter<W>,
    /// `--json`: collect instead of writing.
    collect: Option<(String, String)>,
}

impl Console {
    /// A console writing to this process's stdout/stderr, or collecting (`--json`).
    pub fn new(collect: bool) -> Self {
        Console {
            out: BufWriter::with_capacity(64 * 1024, std::io::stdout().lock()),
            collect: collect.then(|| (String::new(), String::new())),
        }
    }
}

impl Console<std::io::Stdout> {
    /// A console for the repl (stdout not held locked).
    pub fn unlocked() -> Self {
        Console {
            out: BufWriter::with_capacity(64 * 1024, std::io::stdout()),
            collect: None,
        }
    }
}

impl<W: Write> Console<W> {
    /// Writes captured output.
    pub fn output(&mut self, stream: Stream, text: &str) -> std::io::Result<()> {
        if let Some((out, err)) = &mut self.collect {
            match stream {
                Stream::Stdout => out.push_str(text),
                Stream::Stderr => err.push_str(text),
            }
            return Ok(());
        }
        match stream {
            Stream::Stdout => self.out.write_all(text.as_bytes()),
            Stream::Stderr => self.stderr(text),
        }
    }

    /// Writes to stderr after flushing stdout.
    pub fn stderr(&mut self, text: &str) -> std::io::Result<()> {
        self.out.flush()?;
        let mut err = std::io::stderr().lock();
        err.write_all(text.as_bytes())?;
        err.flush()
    }

    /// Writes to stdout (buffered).
    pub fn stdout(&mut self, text: &str) -> std::io::Result<()> {
        self.out.write_all(text.as_bytes())
    }

    /// Flushes stdout.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Prints how a cell ended, REPL style: the repr on stdout, a traceback or notice on stderr.
pub fn print_outcome<W: Write>(console: &mut Console<W>, outcome: &Outcome) -> std::io::Result<()> {
    if let Some(t) = outcome.truncated {
        console.stderr(&format!(
            "[capsule] output truncated: {} bytes dropped over the budget of {} bytes\n",
            t.dropped_bytes, t.budget
        ))?;
    }
    match &outcome.status {
        OutcomeStatus::Ok { repr, .. } => {
            if !repr.is_empty() {
                console.stdout(repr)?;
                console.stdout("\n")?;
            }
        }
        OutcomeStatus::Error {
            ename,
            evalue,
            traceback,
        } => {
            let mut text = if traceback.is_empty() {
                if evalue.is_empty() {
                    ename.clone()
                } else {
                    format!("{ename}: {evalue}")
                }
            } else {
                traceback.clone()
            };
            if !text.ends_with('\n') {
                text.push('\n');
            }
            console.stderr(&text)?;
        }
        OutcomeStatus::Cancelled => console.stderr("KeyboardInterrupt (cell cancelled)\n")?,
        OutcomeStatus::TimedOut { state_lost } => console.stderr(&format!(
            "[capsule] the cell timed out{}\n",
            if *state_lost {
                "; the worker was killed and its state is lost"
            } else {
                ""
            }
        ))?,
        OutcomeStatus::Killed { reason, detail } => console.stderr(&format!(
            "[capsule] the worker was killed ({}): {detail}; its state is lost\n",
            reason.as_str()
        ))?,
        OutcomeStatus::WorkerLost { reason } => console.stderr(&format!(
            "[capsule] the worker was lost: {reason}; its state is lost\n"
        ))?,
    }
    console.flush()
}

/// `--json` output of `exec`/`run`.
#[derive(Serialize)]
struct JsonResult {
    stdout: String,
    stderr: String,
    #[serde(flatten)]
    outcome: OutcomeDto,
}

/// Lines of this process's stdin, opened on the first `input()`.
#[derive(Default)]
pub struct StdinLines {
    lines: Option<Lines<BufReader<Stdin>>>,
    eof: bool,
}

impl StdinLines {
    /// The next line without its line ending; `None` at EOF (or on a read error).
    pub async fn next(&mut self) -> Option<String> {
        if self.eof {
            return None;
        }
        let lines = self
            .lines
            .get_or_insert_with(|| BufReader::new(tokio::io::stdin()).lines());
        match lines.next_line().await {
            Ok(Some(mut line)) => {
                if line.ends_with('\r') {
                    line.pop();
                }
                Some(line)
            }
            Ok(None) | Err(_) => {
                self.eof = true;
                None
            }
        }
    }

    /// Whether EOF was seen.
    pub fn at_eof(&self) -> bool {
        self.eof
    }
}

/// Runs one cell and prints it; returns the exit code.
pub async fn run_cell(config: SessionConfig, code: String, json: bool) -> Result<u8, Failure> {
    let session = Session::start(config)
        .await
        .map_err(|e| Failure::start(anyhow::Error::new(e).context("could not start a session")))?;
    let exec = session
        .execute(code)
        .await
        .map_err(|e| anyhow::Error::new(e).context("could not queue the cell"))?;
    let mut console = Console::new(json);
    let outcome = drive(exec, &mut console).await?;
    let _ = session.shutdown().await;
    let exit = exit_code(&outcome.status);
    if let Some((stdout, stderr)) = console.collect.take() {
        let result = JsonResult {
            stdout,
            stderr,
            outcome: OutcomeDto::from(&outcome),
        };
        let text = serde_json::to_string(&result).map_err(anyhow::Error::new)?;
        console.stdout(&text)?;
        console.stdout("\n")?;
        console.flush()?;
    } else {
        print_outcome(&mut console, &outcome)?;
    }
    Ok(exit)
}

/// Streams an execution to the console, answering input from stdin; returns its outcome.
async fn drive(mut exec: Execution, console: &mut Console) -> Result<Outcome, Failure> {
    let handle = exec.handle();
    let mut stdin = StdinLines::default();
    let mut pending: VecDeque<String> = VecDeque::new();
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut cancelled = false;
    loop {
        let first = tokio::select! {
            ev = exec.next() => ev,
            _ = sigint.recv(), if !cancelled => {
                cancelled = true;
                handle.cancel().await.map_err(anyhow::Error::new)?;
                continue;
            }
            line = stdin.next(), if !pending.is_empty() => {
                if let Some(req) = pending.pop_front() {
                    let _ = handle.reply_input(&req, line).await;
                }
                continue;
            }
        };
        let mut next = first;
        loop {
            match next {
                None => {
                    // Unreachable in practice: an execution always ends with an outcome.
                    return Err(anyhow::anyhow!("the execution ended without an outcome").into());
                }
                Some(Event::Outcome(outcome)) => {
                    console.flush()?;
                    return Ok(outcome);
                }
                Some(Event::Output { stream, text }) => console.output(stream, &text)?,
                Some(Event::Display { data, .. }) => {
                    if let Some(serde_json::Value::String(text)) = data.get("text/plain") {
                        console.output(Stream::Stdout, &format!("{text}\n"))?;
                    }
                }
                Some(Event::InputRequest { req, prompt, .. }) => {
                    if stdin.at_eof() {
                        let _ = handle.reply_input(&req, None).await;
                    } else {
                        if !prompt.is_empty() {
                            console.stderr(&prompt)?;
                        }
                        pending.push_back(req);
                    }
                }
            }
            match ready_now(exec.next()) {
                Some(ev) => next = ev,
                None => break,
            }
        }
        console.flush()?;
    }
}
