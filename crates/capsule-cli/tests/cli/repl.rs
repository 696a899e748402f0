//! `capsule repl` in a real terminal: a detached tmux session, typed into with `send-keys` and
//! observed through a tmux control-mode client, whose `%output` notifications stream
//! everything the pane prints. Waits are on that stream (event-driven, with a hang guard).
//! Skipped, with a printed reason, when tmux is not installed. Plus the repl with piped stdin
//! (no terminal needed): a crash moves it to the pool's warm spare.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use crate::HANG_GUARD;

/// Decodes a control-mode `%output` payload (octal escapes for control bytes and `\`).
fn decode(payload: &str) -> Vec<u8> {
    let b = payload.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Removes ANSI escape sequences and carriage returns.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => match chars.next() {
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('\x40'..='\x7e').contains(&c) {
                            break;
                        }
                    }
                }
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\x07' {
                            break;
                        }
                        if c == '\x1b' {
                            chars.next();
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\r' | '\x07' => {}
            c => out.push(c),
        }
    }
    out
}

enum Msg {
    Output(Vec<u8>),
    Exit,
}

struct Term {
    socket: String,
    control: Child,
    rx: mpsc::Receiver<Msg>,
    raw: Vec<u8>,
    exited: bool,
    history: PathBuf,
    _dir: tempfile::TempDir,
}

impl Term {
    fn tmux(&self) -> Command {
        let mut cmd = Command::new("tmux");
        cmd.args(["-L", &self.socket, "-f", "/dev/null"]);
        cmd
    }

    fn start() -> Option<Term> {
        if Command::new("tmux").arg("-V").output().is_err() {
            println!("skipped: tmux is not installed (apt-get install -y tmux)");
            return None;
        }
        static N: AtomicUsize = AtomicUsize::new(0);
        let socket = format!(
            "capsule-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let history = dir.path().join("history");
        // The pane waits for "go" so that nothing it prints is missed by the control client.
        let shell_cmd = format!(
            "tmux -L {socket} wait-for go; exec '{}' repl --wait-spares",
            crate::bin()
        );
        let status = Command::new("tmux")
            .args([
                "-L",
                &socket,
                "-f",
                "/dev/null",
                "new-session",
                "-d",
                "-s",
                "t",
                "-x",
                "160",
                "-y",
                "50",
            ])
            .arg("-e")
            .arg(format!("CAPSULE_HISTORY={}", history.display()))
            .arg(shell_cmd)
            .env("CAPSULE_HISTORY", &history)
            .env("CAPSULE_LOG", "warn")
            .env_remove("CAPSULE_CONFIG")
            .status()
            .expect("run tmux");
        assert!(status.success(), "tmux new-session failed");
        let mut control = Command::new("tmux")
            .args(["-L", &socket, "-f", "/dev/null", "-C", "attach", "-t", "t"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("tmux control client");
        let stdout = control.stdout.take().expect("control stdout");
        let (tx, rx) = mpsc::channel();
        let (attached_tx, attached_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut attached = Some(attached_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(a) = attached.take() {
                    let _ = a.send(());
                }
                if let Some(rest) = line.strip_prefix("%output ") {
                    let payload = rest.split_once(' ').map(|(_, p)| p).unwrap_or("");
                    if tx.send(Msg::Output(decode(payload))).is_err() {
                        return;
                    }
                } else if line.starts_with("%exit") {
                    let _ = tx.send(Msg::Exit);
                }
            }
            let _ = tx.send(Msg::Exit);
        });
        // The control client prints a %begin/%end block once attached.
        attached_rx
            .recv_timeout(HANG_GUARD)
            .expect("control client attached");
        let term = Term {
            socket,
            control,
            rx,
            raw: Vec::new(),
            exited: false,
            history,
            _dir: dir,
        };
        let ok = term
            .tmux()
            .args(["wait-for", "-S", "go"])
            .status()
            .expect("tmux wait-for");
        assert!(ok.success());
        Some(term)
    }

    fn text(&self) -> String {
        strip_ansi(&String::from_utf8_lossy(&self.raw))
    }

    fn mark(&self) -> usize {
        self.text().len()
    }

    fn pump(&mut self) -> bool {
        match self.rx.recv_timeout(HANG_GUARD) {
            Ok(Msg::Output(b)) => {
                self.raw.extend_from_slice(&b);
                true
            }
            Ok(Msg::Exit) | Err(_) => {
                self.exited = true;
                false
            }
        }
    }

    /// Waits until the text printed after `from` contains `needle`.
    fn wait_for(&mut self, from: usize, needle: &str) {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            let text = self.text();
            if text.get(from..).is_some_and(|t| t.contains(needle)) {
                return;
            }
            assert!(
                Instant::now() < deadline && !self.exited,
                "never saw {needle:?}; terminal so far:\n{text}"
            );
            self.pump();
        }
    }

    fn keys(&self, literal: &str) {
        let ok = self
            .tmux()
            .args(["send-keys", "-t", "t", "-l", literal])
            .status()
            .expect("send-keys");
        assert!(ok.success());
    }

    fn key(&self, key: &str) {
        let ok = self
            .tmux()
            .args(["send-keys", "-t", "t", key])
            .status()
            .expect("send-keys");
        assert!(ok.success());
    }

    /// Types a line and presses Enter.
    fn line(&self, text: &str) {
        if !text.is_empty() {
            self.keys(text);
        }
        self.key("Enter");
    }

    /// Types a cell line and waits for `expect` in what follows.
    fn enter(&mut self, text: &str, expect: &str) {
        let m = self.mark();
        self.line(text);
        self.wait_for(m, expect);
    }

    fn wait_exit(&mut self) {
        let deadline = Instant::now() + HANG_GUARD;
        while !self.exited {
            assert!(
                Instant::now() < deadline,
                "repl did not exit:\n{}",
                self.text()
            );
            self.pump();
        }
    }
}

impl Drop for Term {
    fn drop(&mut self) {
        let _ = self
            .tmux()
            .arg("kill-server")
            .stderr(Stdio::null())
            .status();
        let _ = self.control.kill();
        let _ = self.control.wait();
    }
}

#[test]
fn control_mode_payloads_decode_and_ansi_is_stripped() {
    assert_eq!(decode("a\\015\\012b\\134"), b"a\r\nb\\");
    assert_eq!(
        strip_ansi("\x1b[?2004h>>> x\x1b[K\r\n42\r\n"),
        ">>> x\n42\n"
    );
}

#[test]
fn repl_keeps_state_handles_blocks_input_ctrl_c_and_ctrl_d() {
    let Some(mut t) = Term::start() else { return };
    t.wait_for(0, ">>> ");
    t.enter("x = 41", ">>> ");
    t.enter("x + 1", "\n42\n");

    // A multi-line definition: continuation prompts until a blank line.
    let m = t.mark();
    t.line("def spin():");
    t.wait_for(m, "... ");
    t.line("    print('spin' + 'ning', flush=True)");
    t.line("    while True: pass");
    t.line("");
    t.wait_for(m, ">>> ");

    // Ctrl-C while the cell runs cancels it; the session and its state survive.
    let m = t.mark();
    t.line("spin()");
    t.wait_for(m, "spinning\n");
    t.key("C-c");
    t.wait_for(m, "KeyboardInterrupt");
    t.enter("x", "\n41\n");

    // input() is answered inline.
    let m = t.mark();
    t.line("name = input('Name? ')");
    t.wait_for(m, "Name? ");
    t.line("Ada");
    t.wait_for(m, ">>> ");
    t.enter("name.upper()", "'ADA'");

    // Ctrl-C at the prompt clears the line; the session is untouched.
    t.keys("this is not python");
    t.key("C-c");
    t.enter("x * 2", "\n82\n");

    // A crash: the next cell runs on the pool's warm spare, with a fresh namespace.
    let m = t.mark();
    t.line("import os; os._exit(1)");
    t.wait_for(m, "the worker was lost");
    t.wait_for(m, "continuing on a fresh worker");
    t.wait_for(m, ">>> ");
    t.enter("'x' in globals()", "\nFalse\n");
    // Ctrl-C still cancels there and keeps that session's state.
    t.enter("z = 7", ">>> ");
    let m = t.mark();
    t.line("import time; print('wait' + 'ing', flush=True); time.sleep(100)");
    t.wait_for(m, "waiting\n");
    t.key("C-c");
    t.wait_for(m, "KeyboardInterrupt");
    t.enter("z", "\n7\n");

    t.key("C-d");
    t.wait_exit();
    let history = std::fs::read_to_string(&t.history).unwrap_or_default();
    assert!(history.contains("x = 41"), "history file: {history:?}");
}

/// Parses the first JSON value in `text` after `marker`.
fn json_after(text: &str, marker: &str) -> serde_json::Value {
    let rest = text
        .split_once(marker)
        .map(|(_, r)| r)
        .unwrap_or_else(|| panic!("no {marker:?} in:\n{text}"));
    let start = rest
        .find('{')
        .unwrap_or_else(|| panic!("no JSON in:\n{rest}"));
    serde_json::Deserializer::from_str(&rest[start..])
        .into_iter::<serde_json::Value>()
        .next()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("bad JSON in:\n{rest}"))
}

#[test]
fn a_crash_in_a_piped_repl_continues_on_the_warm_spare() {
    let mut cmd = crate::capsule();
    cmd.args(["repl", "--wait-spares"]);
    let input = "x = 41\nprint('BEFORE>')\n%info\nimport os; os._exit(1)\n'x' in globals()\nprint('AFTER>')\n%info\n";
    let out = crate::run_with_input(cmd, input.as_bytes());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stderr.contains("the worker was lost"), "{stderr}");
    assert!(stderr.contains("continuing on a fresh worker"), "{stderr}");
    assert!(stdout.contains("\nFalse\nAFTER>\n"), "{stdout}");
    let before = json_after(&stdout, "BEFORE>\n");
    let spare = before["pool"]["sessions"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["state"] == "idle"))
        .cloned()
        .unwrap_or_else(|| panic!("a warm spare: {before}"));
    let after = json_after(&stdout, "AFTER>\n");
    // The cell after the crash ran on the spare made before it, on that spare's own worker.
    assert_eq!(
        (&after["session"], &after["pid"]),
        (&spare["session"], &spare["pid"]),
        "{after}"
    );
    assert_eq!(after["workers_started"], 1, "{after}");
    assert_eq!(after["pool"]["hits"], 1, "{after}");
    assert_eq!(after["pool"]["replacements"]["worker_lost"], 1, "{after}");
}
