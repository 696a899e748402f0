//! Spawning one worker process: pipes on fixed descriptors, process group, parent-death signal,
//! the log pipe, and the handshake. The only place in the crate that creates processes.
//!
//! **Invariant:** every descriptor the host creates is close-on-exec, and the child's ends are
//! moved to descriptors ≥ 10 before the fork so the `dup2` onto 3/4/5 in the child can never
//! clobber one another. Killing is by process group (`kill(-pgid, SIGKILL)`), so children a cell
//! started die with the worker.

use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use capsule_protocol::{
    decode_worker, encode_message, negotiate, Decoder, HelloAck, HostMessage, WorkerMessage,
    WorkerSettings,
};
use capsule_worker::{
    Interpreter, WorkerBundle, CONTROL_FD, DATA_FD, EVENT_FD, LOG_FD, STDERR_CAPTURE_FD,
    STDOUT_CAPTURE_FD,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::pipe;

use crate::config::SessionConfig;
use crate::error::SessionError;

/// A future resolving with a worker's exit status (`None` when it cannot be known).
pub type ExitFuture = Pin<Box<dyn Future<Output = Option<ExitStatus>> + Send>>;

/// What a [`Launcher`] is asked to start.
#[derive(Debug)]
pub struct LaunchRequest<'a> {
    /// The session.
    pub session_id: &'a str,
    /// Descriptors to place in the worker, in this order: data (→ 3), events (→ 4), control
    /// (→ 5), stdout-capture read end (→ 6), stderr-capture read end (→ 7), log (→ 8),
    /// stdout-capture write end (→ 1), stderr-capture write end (→ 2). They stay owned by the
    /// session, which closes its copies once the launch future resolves.
    pub fds: [RawFd; 8],
    /// The worker's working directory (its scratch dir).
    pub scratch: &'a Path,
    /// The worker's complete environment.
    pub env: &'a [(String, String)],
    /// The worker's sandbox plan: the launcher must have the child apply it
    /// (`capsule_worker.confine`) before anything else, and pass [`capsule_sandbox::ForkPlan::fds`]
    /// along. The session joins the worker's cgroups by pid and reads the plan's reports.
    pub sandbox: &'a capsule_sandbox::ForkPlan,
}

/// A worker a [`Launcher`] started.
pub struct Launched {
    /// Its pid; it must lead its own process group (kills are `kill(-pid)`).
    pub pid: u32,
    /// Resolves when it exits.
    pub exit: ExitFuture,
    /// The cgroup the worker already sits in, if the launcher made and joined one ahead of
    /// time (the fork server does so for its spare); the session adopts it instead of moving
    /// the worker into the one it prepared.
    pub cgroup: Option<capsule_sandbox::PreparedCgroup>,
}

/// Starts worker processes some other way than a fresh spawn (the fork-server seam, used by
/// `capsule-pool`). The worker must run the normal worker `main` on the given descriptors and
/// say hello on fd 4 exactly as a spawned one, after applying [`LaunchRequest::sandbox`], so it
/// runs under the same per-session layers as a spawned worker. On any launch error the session
/// falls back to a plain spawn; [`std::io::ErrorKind::WouldBlock`] means "not ready yet, spawn
/// this one" and is not logged as a failure.
pub trait Launcher: Send + Sync + std::fmt::Debug {
    /// A stable name for logs and metrics (e.g. `fork`).
    fn name(&self) -> &'static str;
    /// Starts one worker.
    fn launch<'a>(
        &'a self,
        req: LaunchRequest<'a>,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Launched>> + Send + 'a>>;
}

/// A live worker process right after a successful handshake.
pub(crate) struct Spawned {
    /// OS pid (also the process-group id).
    pub pid: u32,
    /// Resolves with the worker's exit status (`None`: unknown). Owned by the waiter task.
    pub exit: ExitFuture,
    /// How the worker was started (`spawn`, or the launcher's name).
    pub launched_by: &'static str,
    /// Write end of the data pipe (worker fd 3).
    pub data: pipe::Sender,
    /// Write end of the control pipe (worker fd 5).
    pub control: pipe::Sender,
    /// Read end of the event pipe (worker fd 4) and the decoder holding any bytes read past
    /// the hello frame. Handed to the reader task, the pipe's only reader.
    pub events: pipe::Receiver,
    /// Decoder state to continue from.
    pub decoder: Decoder,
    /// What the worker said in its hello.
    pub hello: capsule_protocol::Hello,
    /// Negotiated protocol version.
    pub version: u32,
    /// Negotiated features.
    pub features: Vec<String>,
    /// Time from spawn to hello_ack sent.
    pub start_latency: Duration,
    /// Tail of the worker's log pipe (worker diagnostics).
    pub log_tail: LogTail,
    /// The host's copies of the capture pipes' read ends.
    pub captures: Captures,
    /// The worker's sandbox: active layers, exit classification, cleanup (on drop too).
    pub sandbox: capsule_sandbox::Prepared,
}

/// The host's copies of the read ends of a worker's stdout/stderr capture pipes.
///
/// While the worker lives, its pump thread is the only reader; the host never reads these.
/// Once the worker is dead (and so its pump), [`Captures::drain`] collects what it wrote but
/// never forwarded, e.g. a `print` just before `os._exit`.
pub(crate) struct Captures {
    stdout: OwnedFd,
    stderr: OwnedFd,
}

impl Captures {
    /// Reads what is buffered in both pipes without blocking: (stdout bytes, stderr bytes).
    /// Call only when no worker process can still be reading them.
    pub fn drain(&self) -> (Vec<u8>, Vec<u8>) {
        (drain_fd(&self.stdout), drain_fd(&self.stderr))
    }
}

fn drain_fd(fd: &OwnedFd) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        // SAFETY: reading into a stack buffer of the given length from a descriptor we own.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            out.extend_from_slice(&buf[..n as usize]);
            continue;
        }
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        return out; // 0 = no writer left, -1/EAGAIN = nothing more buffered
    }
}

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0
        || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The last few KiB a worker wrote to its log pipe.
#[derive(Clone, Default)]
pub(crate) struct LogTail(Arc<Mutex<VecDeque<String>>>);

impl LogTail {
    const MAX_LINES: usize = 40;

    fn push(&self, line: String) {
        if let Ok(mut q) = self.0.lock() {
            if q.len() == Self::MAX_LINES {
                q.pop_front();
            }
            q.push_back(line);
        }
    }

    /// The retained lines joined.
    pub fn text(&self) -> String {
        self.0
            .lock()
            .map(|q| q.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }
}

fn io_err(context: &'static str) -> impl FnOnce(std::io::Error) -> SessionError {
    move |source| SessionError::Io { context, source }
}

/// A pipe whose ends are close-on-exec.
fn cloexec_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two ints; pipe2 fills it on success.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Moves `fd` to a descriptor ≥ 10 (close-on-exec), so a later `dup2` onto 3..=5 is safe.
fn high_fd(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    // SAFETY: fcntl on a descriptor we own; on success it returns a new descriptor we then own.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh descriptor returned by fcntl.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Sends SIGKILL to a whole process group. Errors (already gone) are ignored.
pub(crate) fn kill_group(pgid: u32) {
    if pgid == 0 {
        return;
    }
    // SAFETY: kill(2) with a negative pid signals the process group; no memory is involved.
    unsafe {
        libc::kill(-(pgid as libc::pid_t), libc::SIGKILL);
    }
}

/// Spawns a worker and completes the handshake.
pub(crate) async fn spawn_worker(
    session_id: &str,
    config: &SessionConfig,
    interp: &Interpreter,
    bundle: &WorkerBundle,
    scratch: &Path,
    launcher: Option<&dyn Launcher>,
) -> Result<Spawned, SessionError> {
    let started = Instant::now();
    let (data_r, data_w) = cloexec_pipe().map_err(io_err("creating the data pipe"))?;
    let (ev_r, ev_w) = cloexec_pipe().map_err(io_err("creating the event pipe"))?;
    let (ctl_r, ctl_w) = cloexec_pipe().map_err(io_err("creating the control pipe"))?;
    let (log_r, log_w) = cloexec_pipe().map_err(io_err("creating the log pipe"))?;
    let (out_r, out_w) = cloexec_pipe().map_err(io_err("creating the stdout capture pipe"))?;
    let (err_r, err_w) = cloexec_pipe().map_err(io_err("creating the stderr capture pipe"))?;
    let child_data = high_fd(data_r).map_err(io_err("moving the data pipe"))?;
    let child_ev = high_fd(ev_w).map_err(io_err("moving the event pipe"))?;
    let child_ctl = high_fd(ctl_r).map_err(io_err("moving the control pipe"))?;
    let child_out_r = high_fd(
        out_r
            .try_clone()
            .map_err(io_err("duplicating the stdout capture pipe"))?,
    )
    .map_err(io_err("moving the stdout capture pipe"))?;
    let child_err_r = high_fd(
        err_r
            .try_clone()
            .map_err(io_err("duplicating the stderr capture pipe"))?,
    )
    .map_err(io_err("moving the stderr capture pipe"))?;
    let child_log = high_fd(log_w).map_err(io_err("moving the log pipe"))?;
    // The child's ends, in the order of the worker descriptors they become (3..=8).
    let child_ends = [
        child_data,
        child_ev,
        child_ctl,
        child_out_r,
        child_err_r,
        child_log,
    ];
    let worker_fds = [
        DATA_FD,
        EVENT_FD,
        CONTROL_FD,
        STDOUT_CAPTURE_FD,
        STDERR_CAPTURE_FD,
        LOG_FD,
    ];
    set_nonblocking(&out_r).map_err(io_err("configuring the stdout capture pipe"))?;
    set_nonblocking(&err_r).map_err(io_err("configuring the stderr capture pipe"))?;
    let captures = Captures {
        stdout: out_r,
        stderr: err_r,
    };

    // The sandbox is prepared in the parent (allocations, BPF, Landlock ruleset, cgroup); its
    // child-side hook runs before ours (see below). A layer the policy requires but the kernel lacks fails
    // here, before anything is spawned (fail closed).
    let mut read_paths = interp.read_paths.clone();
    read_paths.push(bundle.dir.clone());
    let mut extra_env = base_env(scratch);
    extra_env.extend(config.env.iter().cloned());
    let spec = capsule_sandbox::SpawnSpec {
        interpreter: interp.executable.clone(),
        read_paths,
        scratch_dir: scratch.to_path_buf(),
        extra_env,
        // Made on the blocking thread that joins it, while the worker starts (and not at all
        // when the worker comes in a cgroup of its own from the fork server's spare).
        defer_cgroup: true,
    };
    let mut sandbox = capsule_sandbox::prepare(&config.sandbox, &spec)?;
    let mut launched = None;
    let mut adopted = None;
    if let Some(launcher) = launcher {
        // The forked child applies this same plan itself (capsule_worker.confine), so a forked
        // worker gets exactly the layers a spawned one would.
        let plan = sandbox.fork_plan()?;
        let env = sandbox.env();
        let req = LaunchRequest {
            session_id,
            fds: [
                child_ends[0].as_raw_fd(),
                child_ends[1].as_raw_fd(),
                child_ends[2].as_raw_fd(),
                child_ends[3].as_raw_fd(),
                child_ends[4].as_raw_fd(),
                child_ends[5].as_raw_fd(),
                out_w.as_raw_fd(),
                err_w.as_raw_fd(),
            ],
            scratch,
            env: &env,
            sandbox: &plan,
        };
        match launcher.launch(req).await {
            Ok(l) => {
                adopted = l.cgroup;
                launched = Some((l.pid, l.exit, launcher.name()));
            }
            Err(e) => {
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    tracing::debug!(session = %session_id, launcher = launcher.name(), reason = %e, "launcher not ready; spawning");
                } else {
                    tracing::warn!(session = %session_id, launcher = launcher.name(), error = %e, "launcher failed; falling back to a plain spawn");
                }
                // The plan went (or may have gone) to the template: prepare afresh for the spawn.
                drop(plan);
                drop(sandbox);
                sandbox = capsule_sandbox::prepare(&config.sandbox, &spec)?;
            }
        }
    }
    let (pid, exit, launched_by) = match launched {
        Some(l) => {
            drop((child_ends, out_w, err_w));
            l
        }
        None => {
            let mut cmd = tokio::process::Command::new(&interp.executable);
            cmd.args(capsule_worker::bootstrap_args(bundle))
                .stdin(Stdio::null())
                .stdout(Stdio::from(out_w))
                .stderr(Stdio::from(err_w))
                .current_dir(scratch)
                .process_group(0)
                .kill_on_drop(true);
            let mut moves = [(0, 0); 6];
            for (m, (end, dst)) in moves.iter_mut().zip(child_ends.iter().zip(worker_fds)) {
                *m = (end.as_raw_fd(), dst);
            }
            // The sandbox's hook runs first: it works on descriptors prepared in this process
            // (Landlock ruleset, cgroup and report pipes), whose numbers may be anywhere,
            // including 3..=8; our `dup2`s onto 3..=8 come after it, when it no longer needs
            // them. (In the other order a `dup2` could replace the ruleset with a pipe: seen as
            // EBADFD from landlock_restrict_self.) The parent-death signal is also set after the
            // sandbox's credential changes, which would clear it.
            sandbox.install(cmd.as_std_mut())?;
            let parent_pid = std::process::id() as libc::pid_t;
            // SAFETY: the closure runs in the forked child before exec and only makes raw syscalls
            // (dup2, prctl, getppid, _exit) on integers captured by value: no allocation, no locks.
            unsafe {
                cmd.pre_exec(move || {
                    for (src, dst) in moves {
                        if libc::dup2(src, dst) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    // Die with the host even if the worker's reader thread cannot run (a cell holding
                    // the GIL in C code). EOF on the control pipe is the primary mechanism.
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                    if libc::getppid() != parent_pid {
                        libc::_exit(1);
                    }
                    Ok(())
                });
            }
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(source) => {
                    return Err(match sandbox.explain_spawn_error(&source) {
                        e @ capsule_sandbox::SandboxError::ChildSetup { .. } => e.into(),
                        _ => SessionError::Spawn {
                            program: interp.executable.display().to_string(),
                            source,
                        },
                    })
                }
            };
            drop(child_ends);
            let pid = child.id().unwrap_or(0);
            // Best-effort step failures: the hook ran to completion before `spawn` returned.
            if let Err(e) = sandbox.fold_reports() {
                kill_group(pid);
                let _ = child.wait().await;
                return Err(e.into());
            }
            (
                pid,
                Box::pin(async move { child.wait().await.ok() }) as ExitFuture,
                "spawn",
            )
        }
    };
    let forked = launched_by != "spawn";

    // Move the worker into its cgroups. A blocking write that can take several ms (cgroup v1),
    // so it runs on a blocking thread while the worker starts and says hello. No cell reaches
    // the worker before the join: the hello_ack (after which the host sends commands) waits
    // for it.
    let join = if let Some(c) = adopted.filter(|c| c.pid() == Some(pid)) {
        sandbox.adopt_cgroup(c, pid);
        Ok(sandbox)
    } else if sandbox.has_cgroups_to_join() {
        let mut sb = sandbox;
        Err(tokio::task::spawn_blocking(move || {
            let r = sb.join_cgroups(pid);
            (sb, r)
        }))
    } else {
        sandbox.join_cgroups(pid)?;
        Ok(sandbox)
    };

    let log_tail = LogTail::default();
    let log_task = spawn_log_task(session_id, log_r, log_tail.clone())?;

    let data = pipe::Sender::from_owned_fd(data_w).map_err(io_err("registering the data pipe"))?;
    let control =
        pipe::Sender::from_owned_fd(ctl_w).map_err(io_err("registering the control pipe"))?;
    let mut events =
        pipe::Receiver::from_owned_fd(ev_r).map_err(io_err("registering the event pipe"))?;

    let mut decoder = Decoder::new(config.max_frame);
    let hello = tokio::time::timeout(config.start_timeout, read_hello(&mut events, &mut decoder))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no hello within {} ms",
                config.start_timeout.as_millis()
            ))
        });
    let (mut sandbox, joined) = match join {
        Ok(sb) => (sb, Ok(())),
        Err(task) => match task.await {
            Ok(pair) => pair,
            Err(e) => {
                kill_group(pid);
                let _ = exit.await;
                return Err(SessionError::Handshake {
                    reason: format!("joining the worker's cgroup: {e}"),
                });
            }
        },
    };
    if let Err(e) = joined {
        kill_group(pid);
        let _ = exit.await;
        return Err(e.into());
    }
    // A forked worker applies its sandbox plan before it says hello: by now its reports are in.
    let confined = if forked {
        sandbox.fold_reports()
    } else {
        Ok(())
    };
    let hello = match (hello, confined) {
        (Ok(h), Ok(())) => h,
        (_, Err(e)) => {
            kill_group(pid);
            let _ = exit.await;
            return Err(e.into());
        }
        (Err(reason), Ok(())) => {
            kill_group(pid);
            let status = exit.await;
            if forked {
                if let Some(e) = sandbox.fatal_report() {
                    return Err(e.into());
                }
            }
            // The log pipe reaches EOF once the (dead) worker's descriptors are gone.
            let _ = tokio::time::timeout(Duration::from_secs(2), log_task).await;
            // Interpreter start-up errors go to fd 2, the stderr capture pipe.
            let (_, err) = captures.drain();
            let mut tail = String::from_utf8_lossy(&err).trim_end().to_string();
            let log = log_tail.text();
            if !log.is_empty() {
                tail = format!("{tail}\n{log}").trim().to_string();
            }
            let status = status.map(|s| format!(" ({s})")).unwrap_or_default();
            return Err(SessionError::Handshake {
                reason: if tail.is_empty() {
                    format!("{reason}{status}")
                } else {
                    format!("{reason}{status}; worker stderr:\n{tail}")
                },
            });
        }
    };
    let negotiated = match negotiate(&hello) {
        Ok(n) => n,
        Err(e) => {
            kill_group(pid);
            let _ = exit.await;
            return Err(e.into());
        }
    };
    let ack = HostMessage::HelloAck(HelloAck {
        version: negotiated.version,
        encoding: negotiated.encoding.clone(),
        features: negotiated.features.clone(),
        session: session_id.to_string(),
        settings: WorkerSettings {
            output_chunk: config.output_chunk,
            max_frame: config.max_frame,
            enable_site: config.enable_site,
            sys_path: config
                .sys_path
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
        },
    });
    let mut data = data;
    let mut buf = BytesMut::new();
    encode_message(&ack, &[], config.max_frame, &mut buf)?;
    if let Err(e) = data.write_all(&buf).await {
        kill_group(pid);
        let _ = exit.await;
        return Err(SessionError::Handshake {
            reason: format!("could not send hello_ack: {e}"),
        });
    }
    Ok(Spawned {
        pid,
        exit,
        launched_by,
        data,
        control,
        events,
        decoder,
        hello,
        version: negotiated.version,
        features: negotiated.features,
        start_latency: started.elapsed(),
        log_tail,
        captures,
        sandbox,
    })
}

/// The environment every worker starts from (the host's own environment is not inherited).
fn base_env(scratch: &Path) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "PATH".to_string(),
            "/usr/local/bin:/usr/bin:/bin".to_string(),
        ),
        ("LANG".to_string(), "C.UTF-8".to_string()),
        ("LC_ALL".to_string(), "C.UTF-8".to_string()),
        ("PYTHONIOENCODING".to_string(), "utf-8".to_string()),
        ("HOME".to_string(), scratch.display().to_string()),
        ("TMPDIR".to_string(), scratch.display().to_string()),
    ];
    if let Ok(tz) = std::env::var("TZ") {
        env.push(("TZ".to_string(), tz));
    }
    env
}

async fn read_hello(
    events: &mut pipe::Receiver,
    decoder: &mut Decoder,
) -> Result<capsule_protocol::Hello, String> {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match decoder.next_frame() {
            Ok(Some(frame)) => {
                return match decode_worker(&frame) {
                    Ok(WorkerMessage::Hello(h)) => Ok(h),
                    Ok(other) => Err(format!("expected hello, got {other:?}")),
                    Err(e) => Err(format!("bad hello frame: {e}")),
                };
            }
            Ok(None) => {}
            Err(e) => return Err(format!("bad hello frame: {e}")),
        }
        match events.read(&mut chunk).await {
            Ok(0) => return Err("worker exited before saying hello".to_string()),
            Ok(n) => decoder.push(&chunk[..n]),
            Err(e) => return Err(format!("reading the event pipe: {e}")),
        }
    }
}

fn spawn_log_task(
    session_id: &str,
    log_r: OwnedFd,
    tail: LogTail,
) -> Result<tokio::task::JoinHandle<()>, SessionError> {
    let rx = pipe::Receiver::from_owned_fd(log_r).map_err(io_err("registering the log pipe"))?;
    let session = session_id.to_string();
    Ok(tokio::spawn(async move {
        // Always read to EOF: a worker must never block on a full log pipe.
        let mut reader = BufReader::new(rx);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line).trim_end().to_string();
                    tracing::debug!(target: "capsule::worker", session = %session, "{text}");
                    tail.push(text);
                }
            }
        }
    }))
}
