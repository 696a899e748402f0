//! `capsule repl`: an interactive prompt over one persistent session.
//!
//! Line editing and history come from rustyline (history file: `$CAPSULE_HISTORY`, else
//! `$XDG_DATA_HOME/capsule/history`, else `~/.local/share/capsule/history`; an empty
//! `CAPSULE_HISTORY` disables it). A cell continues on `... ` lines while it has unclosed
//! brackets or triple-quoted strings, ends in `\`, or opened an indented block (`:` at the end
//! of a line, or a decorator); a blank line ends a block. Values print like Python's REPL.
//!
//! Ctrl-C at the prompt clears the line (rustyline reads it in raw mode). While a cell runs the
//! terminal is in cooked mode, so Ctrl-C is a `SIGINT` to this process (the worker sits in its
//! own process group and never sees it); it is read with tokio's signal stream only then and
//! cancels the cell through the session's cancel ladder, which keeps the namespace unless the
//! cell ignores the interrupt for the whole grace period. Ctrl-D at the prompt exits.
//!
//! The session comes from a session pool with `--pool-size` warm spares (default 1,
//! [`crate::front`]): after a cell whose outcome lost the state (the worker died, was killed,
//! or ignored a cancel) the next cell runs on a spare that is already warm, and `%restart`
//! takes a spare too. Leaving the repl stops the pool and every worker.

use std::io::Write;
use std::path::PathBuf;

use capsule_pool::PoolConfig;
use capsule_session::{Event, OutcomeStatus, Session, Stream};
use rustyline::error::ReadlineError;
use rustyline::DefaultEditor;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::exec::{print_outcome, ready_now, Console};
use crate::front::{Cause, FrontSession};
use crate::{code, Failure};

const HELP: &str = "\
Cells run in one persistent Python session. Commands:
  %help               this text
  %info               session and pool information (JSON)
  %restart            move to a fresh worker from the pool (namespace lost)
  %reset              fresh namespace, same worker
  %checkpoint PATH    write the namespace to a file
  %restore PATH       restore a namespace written by %checkpoint
  %exit               leave (Ctrl-D also does)
Ctrl-C cancels a running cell; at the prompt it clears the line.
";

/// Where the history lives (see the module docs); `None` disables it.
fn history_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CAPSULE_HISTORY") {
        return (!p.is_empty()).then(|| PathBuf::from(p));
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))?;
    Some(data.join("capsule").join("history"))
}

/// Whether `src` is a complete cell (see the module docs for the rules).
pub fn is_complete(src: &str) -> bool {
    let mut depth: i64 = 0;
    // The quote byte and whether the string is triple-quoted.
    let mut string: Option<(u8, bool)> = None;
    let mut in_comment = false;
    let mut block = false;
    let mut last_sig: Option<u8> = None;
    let mut line_start = true;
    let bytes = src.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if let Some((q, triple)) = string {
            if b == b'\\' {
                i += 2;
                continue;
            }
            if b == b'\n' && !triple {
                string = None; // An unterminated string: a syntax error Python will report.
            } else if b == q && (!triple || bytes[i..].starts_with(&[q, q, q])) {
                string = None;
                if triple {
                    i += 3;
                    last_sig = Some(q);
                    continue;
                }
            }
            last_sig = Some(b'"');
            if b != b'\n' {
                i += 1;
                continue;
            }
        }
        if in_comment && b != b'\n' {
            i += 1;
            continue;
        }
        match b {
            b'\n' => {
                in_comment = false;
                if depth <= 0 && string.is_none() {
                    if last_sig == Some(b':') {
                        block = true;
                    }
                    last_sig = None;
                    line_start = true;
                }
                i += 1;
                continue;
            }
            b'#' => in_comment = true,
            b'\'' | b'"' => {
                let triple = bytes[i..].starts_with(&[b, b, b]);
                string = Some((b, triple));
                i += if triple { 3 } else { 1 };
                last_sig = Some(b);
                line_start = false;
                continue;
            }
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            b'@' if line_start && depth <= 0 => block = true,
            _ => {}
        }
        if !b.is_ascii_whitespace() && !in_comment {
            last_sig = Some(b);
            line_start = false;
        }
        i += 1;
    }
    if matches!(string, Some((_, true))) || depth > 0 {
        return false;
    }
    let last_line = src.rsplit('\n').next().unwrap_or_default();
    if last_line.trim_end().ends_with('\\') {
        return false;
    }
    if last_sig == Some(b':') {
        return false;
    }
    if block {
        // A block ends with a blank line.
        return src.contains('\n') && last_line.trim().is_empty();
    }
    true
}

/// Reads one cell; `None` on Ctrl-D at the main prompt.
fn read_cell(editor: &mut DefaultEditor) -> Result<Option<String>, ReadlineError> {
    let mut buf = String::new();
    loop {
        let prompt = if buf.is_empty() { ">>> " } else { "... " };
        match tokio::task::block_in_place(|| editor.readline(prompt)) {
            Ok(line) => {
                if buf.is_empty() {
                    buf = line;
                } else {
                    buf.push('\n');
                    buf.push_str(&line);
                }
                if buf.trim().is_empty() {
                    buf.clear();
                    continue;
                }
                if buf.trim_start().starts_with('%') || is_complete(&buf) {
                    return Ok(Some(buf));
                }
            }
            Err(ReadlineError::Interrupted) => {
                println!("KeyboardInterrupt");
                buf.clear();
            }
            Err(ReadlineError::Eof) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// Runs the repl until Ctrl-D or `%exit`.
pub async fn run(config: PoolConfig, wait_spares: bool) -> Result<u8, Failure> {
    let mut front = FrontSession::start(config, wait_spares)
        .await
        .map_err(|message| Failure::start(anyhow::anyhow!(message)))?;
    let result = serve(&mut front).await;
    front.stop().await;
    result
}

/// The prompt loop, on the front door's session.
async fn serve(front: &mut FrontSession) -> Result<u8, Failure> {
    let mut editor = DefaultEditor::new().map_err(anyhow::Error::new)?;
    let history = history_path();
    if let Some(path) = &history {
        let _ = editor.load_history(path);
    }
    let banner = match front.session().info().await {
        Ok(info) => format!(
            "Capsule {} (Python {} at {}). %help for commands, Ctrl-D to exit.",
            env!("CARGO_PKG_VERSION"),
            info.python.lines().next().unwrap_or_default(),
            info.executable.display()
        ),
        Err(_) => format!("Capsule {}", env!("CARGO_PKG_VERSION")),
    };
    println!("{banner}");
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut console = Console::unlocked();
    loop {
        let cell = match read_cell(&mut editor) {
            Ok(Some(cell)) => cell,
            Ok(None) => break,
            Err(e) => {
                eprintln!("capsule: cannot read the terminal: {e}");
                break;
            }
        };
        let _ = editor.add_history_entry(cell.as_str());
        if let Some(path) = &history {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            if let Err(e) = editor.save_history(path) {
                tracing::debug!(error = %e, path = %path.display(), "could not save the history");
            }
        }
        let trimmed = cell.trim();
        if let Some(magic) = trimmed.strip_prefix('%') {
            if !run_magic(front, magic).await {
                break;
            }
            continue;
        }
        let session = front.session().clone();
        let lost = run_one(&session, cell, &mut editor, &mut sigint, &mut console).await?;
        if lost {
            // The namespace is gone with the worker; the next cell runs on a warm spare.
            match front.replace(Cause::WorkerLost).await {
                Ok(()) => {
                    let pid = front.session().info().await.ok().and_then(|i| i.pid);
                    let pid = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
                    console.stderr(&format!(
                        "[capsule] continuing on a fresh worker{pid}: the namespace is empty\n"
                    ))?;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no fresh session from the pool; the next cell respawns the worker");
                }
            }
        }
    }
    Ok(code::OK)
}

/// Runs a `%` command; `false` means exit.
async fn run_magic(front: &mut FrontSession, magic: &str) -> bool {
    let session = front.session().clone();
    let (name, arg) = match magic.split_once(char::is_whitespace) {
        Some((n, a)) => (n, a.trim()),
        None => (magic, ""),
    };
    let result: anyhow::Result<()> = async {
        match name {
            "help" | "?" => print!("{HELP}"),
            "exit" | "quit" => return Err(anyhow::anyhow!("exit")),
            "info" => {
                let mut info = front.current().info().await?;
                info.pool = Some(front.pool_dto());
                println!("{}", serde_json::to_string_pretty(&info)?);
            }
            "restart" => {
                front.restart().await?;
                println!("restarted: fresh namespace");
            }
            "reset" => {
                session.reset().await?;
                println!("namespace reset");
            }
            "checkpoint" if !arg.is_empty() => {
                let cp = session.checkpoint().await?;
                std::fs::write(arg, &cp.blob)?;
                println!(
                    "checkpoint: {} names, {} bytes written to {arg}",
                    cp.names.len(),
                    cp.blob.len()
                );
                for s in &cp.skipped {
                    println!("  skipped {}: {}", s.name, s.reason);
                }
            }
            "restore" if !arg.is_empty() => {
                let blob = std::fs::read(arg)?;
                let names = session.restore(blob, true).await?;
                println!("restored {} names", names.len());
            }
            _ => println!("unknown command %{magic}; %help lists them"),
        }
        Ok(())
    }
    .await;
    match result {
        Err(e) if e.to_string() == "exit" => false,
        Err(e) => {
            eprintln!("error: {e:#}");
            true
        }
        Ok(()) => true,
    }
}

/// Runs one cell, streaming it; Ctrl-C cancels it. Returns whether its outcome lost the
/// session's state (the worker is gone).
async fn run_one(
    session: &Session,
    code: String,
    editor: &mut DefaultEditor,
    sigint: &mut Signal,
    console: &mut Console<std::io::Stdout>,
) -> Result<bool, Failure> {
    // Forget a SIGINT that arrived after the previous cell ended.
    while ready_now(sigint.recv()).is_some() {}
    let mut exec = match session.execute(code).await {
        Ok(exec) => exec,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(false);
        }
    };
    let handle = exec.handle();
    let mut cancelled = false;
    loop {
        let ev = tokio::select! {
            ev = exec.next() => ev,
            _ = sigint.recv() => {
                if !cancelled {
                    cancelled = true;
                    let _ = handle.cancel().await;
                }
                continue;
            }
        };
        let mut next = ev;
        loop {
            match next {
                None => return Ok(false),
                Some(Event::Outcome(outcome)) => {
                    if matches!(outcome.status, OutcomeStatus::Cancelled) {
                        console.flush()?;
                        console.stderr("KeyboardInterrupt\n")?;
                        return Ok(false);
                    }
                    print_outcome(console, &outcome)?;
                    return Ok(outcome.status.state_lost());
                }
                Some(Event::Output { stream, text }) => console.output(stream, &text)?,
                Some(Event::Display { data, .. }) => {
                    if let Some(serde_json::Value::String(text)) = data.get("text/plain") {
                        console.output(Stream::Stdout, &format!("{text}\n"))?;
                    }
                }
                Some(Event::InputRequest { req, prompt, .. }) => {
                    console.flush()?;
                    let _ = std::io::stderr().flush();
                    let answer = match tokio::task::block_in_place(|| editor.readline(&prompt)) {
                        Ok(line) => Some(line),
                        Err(ReadlineError::Interrupted) => {
                            if !cancelled {
                                cancelled = true;
                                let _ = handle.cancel().await;
                            }
                            None
                        }
                        Err(_) => None,
                    };
                    let _ = handle.reply_input(&req, answer).await;
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

#[cfg(test)]
mod tests {
    use super::is_complete;

    #[test]
    fn simple_statements_are_complete() {
        assert!(is_complete("x = 1"));
        assert!(is_complete("print('a:')"));
        assert!(is_complete("x = {'a': 1}"));
        assert!(is_complete("x = 1  # comment:"));
    }

    #[test]
    fn open_brackets_strings_and_backslashes_continue() {
        assert!(!is_complete("x = [1,"));
        assert!(is_complete("x = [1,\n2]"));
        assert!(!is_complete("s = '''abc"));
        assert!(is_complete("s = '''abc\ndef'''"));
        assert!(!is_complete("x = 1 + \\"));
        assert!(is_complete("x = 1 + \\\n2"));
        assert!(is_complete("s = 'it\\'s'"));
    }

    #[test]
    fn blocks_end_with_a_blank_line() {
        assert!(!is_complete("def f(x):"));
        assert!(!is_complete("def f(x):\n    return x"));
        assert!(is_complete("def f(x):\n    return x\n"));
        assert!(!is_complete("@dec"));
        assert!(!is_complete(
            "for i in range(3):\n    if i:\n        print(i)"
        ));
        assert!(is_complete(
            "for i in range(3):\n    if i:\n        print(i)\n"
        ));
        assert!(!is_complete("d = {\n'a': 1,"));
    }
}
