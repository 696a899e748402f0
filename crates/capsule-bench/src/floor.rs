//! The raw floor: `bench/floor/floor_worker.py` driven over blocking std pipes, and the
//! interpreter's cold start (`python -I -S -c pass`).
//!
//! The floor worker speaks Capsule's frame format (docs/protocol.md §2) on stdin/stdout and does
//! the minimum per cell (`exec(compile(...))` in a persistent dict, a tiny JSON reply). Timing
//! write → full reply read here, with no async runtime in between, is the least any host can
//! pay for a cell on this machine.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// The floor worker's source, embedded so the binary runs from anywhere.
pub const FLOOR_WORKER: &str = include_str!("../../../bench/floor/floor_worker.py");

/// One running floor worker.
pub struct FloorWorker {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    buf: Vec<u8>,
    n: u64,
}

/// Encodes one frame: `[len u32 BE][enc u8 = 1][hlen u32 BE][header][body]`.
pub fn encode_frame(header: &Value, body: &[u8], out: &mut Vec<u8>) {
    let h = header.to_string();
    out.clear();
    out.extend_from_slice(&((5 + h.len() + body.len()) as u32).to_be_bytes());
    out.push(1);
    out.extend_from_slice(&(h.len() as u32).to_be_bytes());
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(body);
}

impl FloorWorker {
    /// Starts `python -I -S -c <floor_worker.py>`.
    pub fn start(python: &Path) -> Result<FloorWorker> {
        let mut child = Command::new(python)
            .args(["-I", "-S", "-c", FLOOR_WORKER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawning the floor worker with {}", python.display()))?;
        let stdin = child.stdin.take().context("floor stdin")?;
        let stdout = child.stdout.take().context("floor stdout")?;
        Ok(FloorWorker {
            child,
            stdin,
            stdout,
            buf: Vec::with_capacity(256),
            n: 0,
        })
    }

    fn send(&mut self, header: Value) -> Result<()> {
        let mut frame = std::mem::take(&mut self.buf);
        encode_frame(&header, &[], &mut frame);
        self.stdin
            .write_all(&frame)
            .context("writing to the floor worker")?;
        self.stdin.flush()?;
        self.buf = frame;
        Ok(())
    }

    /// Reads one frame into `body`; returns its header.
    fn recv(&mut self, body: &mut Vec<u8>) -> Result<Value> {
        let mut pre = [0u8; 9];
        self.stdout
            .read_exact(&mut pre)
            .context("reading from the floor worker")?;
        let len = u32::from_be_bytes([pre[0], pre[1], pre[2], pre[3]]) as usize;
        let hlen = u32::from_be_bytes([pre[5], pre[6], pre[7], pre[8]]) as usize;
        if pre[4] != 1 || len < 5 || hlen > len - 5 {
            bail!("bad frame from the floor worker");
        }
        let mut header = vec![0u8; hlen];
        self.stdout.read_exact(&mut header)?;
        body.resize(len - 5 - hlen, 0);
        self.stdout.read_exact(body)?;
        Ok(serde_json::from_slice(&header)?)
    }

    /// Runs one cell and waits for its reply; returns the write → reply time.
    pub fn execute(&mut self, code: &str) -> Result<Duration> {
        self.n += 1;
        let exec = format!("e{}", self.n);
        let t0 = Instant::now();
        self.send(json!({"type": "execute", "exec": exec, "code": code}))?;
        let mut body = Vec::new();
        let reply = self.recv(&mut body)?;
        let dt = t0.elapsed();
        if reply["status"] != "ok" || reply["exec"] != exec.as_str() {
            bail!("floor worker replied {reply}");
        }
        Ok(dt)
    }

    /// Asks for `count` output frames of `size` bytes; returns (bytes received and verified,
    /// elapsed). Every body byte is checked to be `x`.
    pub fn flood(&mut self, size: usize, count: usize) -> Result<(u64, Duration, bool)> {
        self.n += 1;
        let exec = format!("e{}", self.n);
        let t0 = Instant::now();
        self.send(json!({"type": "flood", "exec": exec, "size": size, "count": count}))?;
        let mut body = Vec::with_capacity(size);
        let mut got = 0u64;
        let mut ok = true;
        loop {
            let h = self.recv(&mut body)?;
            if h["type"] == "outcome" {
                break;
            }
            ok &= body.iter().all(|&b| b == b'x');
            got += body.len() as u64;
        }
        Ok((got, t0.elapsed(), ok))
    }
}

impl Drop for FloorWorker {
    fn drop(&mut self) {
        let mut frame = Vec::new();
        encode_frame(&json!({"type": "shutdown"}), &[], &mut frame);
        let _ = self.stdin.write_all(&frame);
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

/// Times one `python -I -S -c pass` from spawn to exit.
pub fn spawn_pass(python: &Path) -> Result<Duration> {
    let t0 = Instant::now();
    let status = Command::new(python)
        .args(["-I", "-S", "-c", "pass"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("running {} -I -S -c pass", python.display()))?;
    let dt = t0.elapsed();
    if !status.success() {
        bail!("{} -I -S -c pass failed: {status}", python.display());
    }
    Ok(dt)
}
