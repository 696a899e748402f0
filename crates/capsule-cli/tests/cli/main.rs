//! End-to-end tests of the `capsule` binary: one test binary, one module per area.
//!
//! Every test spawns the built binary (`CARGO_BIN_EXE_capsule`) with real Python workers.
//! Waiting is always on an event (a line, an exit, a pane update) with a generous overall
//! deadline that only guards against hangs; nothing sleeps to synchronise and nothing asserts
//! on timing.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// `capsule exec` / `capsule run`.
mod exec;
/// `capsule repl` driven through tmux.
mod repl;
/// `capsule stdio`: the client event model v1.
mod stdio;
/// Workspace hygiene: module docs, no `#[ignore]`, no `anyhow` in libraries.
mod tidy;

/// Hang guard for one wait. Never a synchronisation device: waits end on events.
pub const HANG_GUARD: Duration = Duration::from_secs(90);

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_capsule")
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A `capsule` command with a quiet, test-local environment.
pub fn capsule() -> Command {
    let mut cmd = Command::new(bin());
    cmd.env("CAPSULE_HISTORY", "")
        .env_remove("CAPSULE_CONFIG")
        .env_remove("CAPSULE_TIMEOUT_MS")
        .env("CAPSULE_LOG", "warn");
    cmd
}

/// Kills `pid` if `done` is not signalled within the hang guard.
fn watchdog(pid: u32) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(HANG_GUARD) {
            eprintln!("hang guard: killing pid {pid}");
            // SAFETY: kill has no memory-safety preconditions.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
    });
    tx
}

/// Waits for a child under the hang guard.
pub fn wait_exit(child: &mut Child) -> ExitStatus {
    let done = watchdog(child.id());
    let status = child.wait().expect("wait for capsule");
    let _ = done.send(());
    status
}

/// Runs `cmd` with `input` on stdin and collects everything, under the hang guard.
pub fn run_with_input(mut cmd: Command, input: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn capsule");
    let done = watchdog(child.id());
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let mut stderr = child.stderr.take().expect("stderr");
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let mut stdout = Vec::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_end(&mut stdout)
        .expect("read stdout");
    let status = child.wait().expect("wait");
    let _ = done.send(());
    let _ = writer.join();
    let stderr = err_reader.join().unwrap_or_default();
    Output {
        status,
        stdout,
        stderr,
    }
}

/// A running `capsule stdio` with a reader thread turning its stdout into JSON values.
pub struct StdioClient {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    events: mpsc::Receiver<Value>,
    /// Every event read so far, for failure messages.
    pub log: Vec<Value>,
}

impl StdioClient {
    /// Starts `capsule stdio` with extra arguments and waits for `ready`.
    pub fn start(args: &[&str]) -> (Self, Value) {
        let mut cmd = capsule();
        cmd.arg("stdio").args(args);
        let mut c = Self::spawn(cmd);
        let ready = c.wait(|e| e["event"] == "ready");
        (c, ready)
    }

    /// Spawns a prepared command.
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn capsule stdio");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.trim().is_empty() {
                    continue;
                }
                let ev = serde_json::from_str(&line).unwrap_or_else(
                    |_| serde_json::json!({"event": "__unparseable__", "raw": line}),
                );
                if tx.send(ev).is_err() {
                    return;
                }
            }
            let _ = tx.send(serde_json::json!({"event": "__eof__"}));
        });
        let stdin = child.stdin.take();
        StdioClient {
            child,
            stdin,
            events: rx,
            log: Vec::new(),
        }
    }

    /// Sends one command object.
    pub fn send(&mut self, cmd: Value) {
        self.send_raw(&format!("{cmd}\n"));
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, raw: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(raw.as_bytes()).expect("write to capsule");
        stdin.flush().expect("flush");
    }

    /// Closes stdin (EOF for capsule).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The next event (including the `__eof__` marker), under the hang guard.
    pub fn next_event(&mut self) -> Value {
        match self.events.recv_timeout(HANG_GUARD) {
            Ok(ev) => {
                self.log.push(ev.clone());
                ev
            }
            Err(_) => panic!("no event within the hang guard; saw {}", self.summary()),
        }
    }

    /// Reads events until one matches; panics at EOF.
    pub fn wait(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            assert!(
                Instant::now() < deadline,
                "hang guard; saw {}",
                self.summary()
            );
            let ev = self.next_event();
            assert_ne!(
                ev["event"],
                "__eof__",
                "stdout closed; saw {}",
                self.summary()
            );
            if pred(&ev) {
                return ev;
            }
        }
    }

    /// Reads events until the outcome of `id`; returns that cell's events (outcome last).
    pub fn collect(&mut self, id: &str) -> Vec<Value> {
        let mut evs = Vec::new();
        loop {
            let ev = self.wait(|e| e["id"] == id);
            let done = ev["event"] == "outcome";
            evs.push(ev);
            if done {
                return evs;
            }
        }
    }

    /// Executes a cell and returns its events (outcome last).
    pub fn run(&mut self, id: &str, code: &str) -> Vec<Value> {
        self.send(serde_json::json!({"op": "execute", "id": id, "code": code}));
        self.collect(id)
    }

    /// Executes a cell and returns its outcome.
    pub fn outcome(&mut self, id: &str, code: &str) -> Value {
        self.run(id, code).pop().expect("an outcome")
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        wait_exit(&mut self.child)
    }

    /// The `capsule` process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn summary(&self) -> String {
        let s = serde_json::to_string(&self.log).unwrap_or_default();
        let start = s.len().saturating_sub(1500);
        s.get(start..).unwrap_or(&s).to_string()
    }
}

impl Drop for StdioClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(pid, parent pid, state)` of every process, from `/proc/<pid>/stat`.
fn processes() -> Vec<(u32, u32, char)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            let mut rest = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
            let state = rest.next()?.chars().next()?;
            let ppid = rest.next()?.parse().ok()?;
            Some((pid, ppid, state))
        })
        .collect()
}

/// Every live process descended from `root` (children, their children, ...).
pub fn descendants(root: u32) -> Vec<u32> {
    let all = processes();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            all.iter()
                .filter(|(pid, ppid, state)| *ppid == parent && *pid != root && *state != 'Z')
                .map(|(pid, _, _)| *pid),
        );
        i += 1;
    }
    found.remove(0);
    found
}

/// Whether `pid` is a process that has not exited (a zombie has).
pub fn running(pid: u32) -> bool {
    processes()
        .iter()
        .any(|(p, _, state)| *p == pid && !matches!(state, 'Z' | 'X'))
}

/// Waits, on a pidfd (an event, under the hang guard), until `pid` has exited.
pub fn wait_gone(pid: u32) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return; // Already reaped.
    }
    let mut pfd = libc::pollfd {
        fd: fd as i32,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = HANG_GUARD.as_millis() as i32;
    // SAFETY: one valid pollfd; the descriptor is ours and closed right after.
    let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
    // SAFETY: closing the descriptor pidfd_open gave us.
    unsafe { libc::close(fd as i32) };
    assert_eq!(
        ready, 1,
        "pid {pid} outlived capsule (poll returned {ready})"
    );
}

/// Concatenated `output` text of `stream` among `evs`.
pub fn text(evs: &[Value], stream: &str) -> String {
    evs.iter()
        .filter(|e| e["event"] == "output" && e["stream"] == stream)
        .filter_map(|e| e["text"].as_str())
        .collect()
}
