//! The fork server: a warm template interpreter per pool (one pool = one fingerprint:
//! interpreter, environment, policy, warm imports) that forks session workers on request,
//! instead of a fresh interpreter spawn per session.
//!
//! The template (`capsule_worker.template_main()`, `python/capsule_worker/template.py`) imports
//! the worker runtime and the warm modules once, stays single-threaded (it reports its thread
//! count when ready and refuses to fork with more than one), and serves a `SOCK_SEQPACKET`
//! socket: the session's 8 child-side descriptors arrive by `SCM_RIGHTS` with the scratch dir and
//! environment; the template forks, the child `setsid`s, places the descriptors on fds 1-8,
//! `chdir`s and runs the normal worker `main` (it says hello on fd 4 like a spawned worker).
//! The template reaps its children and reports `{exit: pid, status}`, so sessions get real exit
//! statuses.
//!
//! **Sandbox.** The template itself runs no user code and holds no sandbox layers (it keeps
//! the host's credentials, with a clean environment). Every fork request carries the session's
//! sandbox plan ([`capsule_sandbox::ForkPlan`], prepared by the session exactly as for a spawn)
//! and its descriptors; the child applies it (`capsule_worker.confine`) before running anything
//! else: its own user, network, IPC, UTS and mount namespaces, private `/dev/shm`, rlimits,
//! identity drop, no_new_privs, its own Landlock domain (scoped: no signals or abstract sockets
//! across domains) and seccomp filter, and the host moves it into its own cgroups by pid. So a
//! forked worker has the layers of a spawned one, and none of the template's open descriptors
//! (they are pointed at `/dev/null`).
//!
//! **Staleness.** The template is keyed by the pool's fingerprint (interpreter, environment,
//! policy, warm imports) and, in addition, by a stamp of the modification times of the
//! interpreter's library directories (site-packages included) and the session's `sys.path`:
//! when a package is installed or removed, the next launch retires the template and starts a
//! new one ([`ForkInfo::templates_stale`]).
//!
//! **Invariants:** one reader of the template socket (the reader task here); the host never
//! touches the worker's pipes (the session does); a template crash loses no session (workers
//! are in their own sessions and keep running; their exits are then observed through a pidfd,
//! status unknown) and the next launch starts a new template, while launches in flight fail
//! and the session falls back to a plain spawn.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use capsule_session::{ExitFuture, LaunchRequest, Launched, Launcher, SessionConfig};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::oneshot;

use crate::liveness::Liveness;

/// A blocking task making a spare's cgroup and moving the spare in.
type SpareCgroup = tokio::task::JoinHandle<Option<capsule_sandbox::PreparedCgroup>>;

/// The forked pid and where its exit status will arrive.
type LaunchReply = Result<(u32, oneshot::Receiver<i32>), String>;

/// How long spawn-while-warming waits after a failed background template build before it
/// starts another (launches spawn meanwhile).
const REBUILD_BACKOFF: Duration = Duration::from_secs(5);

/// The template's current spare, as the host holds it: the host hands it its request directly.
#[derive(Debug)]
struct Spare {
    pid: u32,
    /// It applies the policy-level sandbox plan while it waits.
    preapplied: bool,
    /// The host's copy of the spare's socket.
    sock: OwnedFd,
    /// The cgroup being made for the spare and the spare moved in (policies with cgroups).
    cgroup: Option<SpareCgroup>,
}

/// A fork server for one pool configuration. Implements [`Launcher`]; pass it to
/// [`capsule_session::Session::start_with`].
#[derive(Debug)]
pub struct ForkServer {
    python: PathBuf,
    bootstrap: String,
    warm_imports: Vec<String>,
    /// `{"site", "sys_path", "warm"}` for the template (see `template.py`).
    template_config: String,
    start_timeout: Duration,
    /// Directories whose modification times make up the environment stamp: the interpreter's
    /// stdlib and site-packages, and the session's extra `sys.path`. Installing or removing a
    /// package changes one of them, and a template started before that is retired.
    stamp_dirs: Vec<PathBuf>,
    /// The sessions' sandbox policy: each spare is moved into a cgroup made from it while it
    /// waits, which the session that gets the spare adopts.
    policy: Arc<capsule_sandbox::Policy>,
    current: Mutex<Option<Arc<Template>>>,
    /// Serialises template builds, so concurrent first launches share one template instead of
    /// each starting its own. Held across the build's awaits on purpose; nothing else takes it.
    building: tokio::sync::Mutex<()>,
    /// Pids of workers this server forked and nobody asked about yet ([`ForkServer::forked`]).
    forked: Mutex<HashSet<u32>>,
    templates_started: AtomicU64,
    templates_stale: AtomicU64,
    forks: AtomicU64,
    failures: AtomicU64,
    spare_hits: AtomicU64,
    preapplied_hits: AtomicU64,
    /// Launches answered "spawn instead" because the template was still starting.
    warming_spawns: AtomicU64,
    /// See [`ForkServer::set_spawn_while_warming`].
    spawn_while_warming: AtomicBool,
    /// A background template build is under way (spawn-while-warming mode).
    warming: AtomicBool,
    /// When the last background build failed: no new one is started for
    /// [`REBUILD_BACKOFF`] after it, so a template that cannot start is not retried on every
    /// launch.
    build_failed_at: Mutex<Option<std::time::Instant>>,
    /// Itself, for the background build task.
    me: std::sync::Weak<ForkServer>,
    disabled: Mutex<Option<String>>,
    /// Bumped whenever a template reports something (ready, a spare, a launch, an exit) or
    /// goes away: what [`ForkServer::wait_until`] waits on.
    changed: tokio::sync::watch::Sender<u64>,
}

/// Counters of a fork server, as reported in [`crate::PoolInfo`].
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct ForkInfo {
    /// Whether sessions are created by forking (else: why not).
    pub enabled: bool,
    /// Why the fork server is off (sandbox policy, template threads, ...).
    pub disabled_reason: Option<String>,
    /// Pid of the current template.
    pub template_pid: Option<u32>,
    /// Templates started (more than one: a template died, or went stale, and was rebuilt).
    pub templates_started: u64,
    /// Templates retired because the Python environment changed under them (a package
    /// installed or removed since they imported their modules).
    pub templates_stale: u64,
    /// Workers forked.
    pub forks: u64,
    /// Launches that failed (the session fell back to a plain spawn).
    pub failures: u64,
    /// Workers that were the template's pre-forked spare (the rest were forked on demand).
    pub spare_hits: u64,
    /// Pid of the template's current spare: a child forked ahead of the next request.
    pub spare_pid: Option<u32>,
    /// Workers that were spares which had applied the policy-level sandbox plan ahead (only
    /// Landlock was left for their request).
    pub preapplied_hits: u64,
    /// Whether the current spare applies the policy-level sandbox plan ahead.
    pub spare_preapplied: bool,
    /// Sessions spawned instead because the template was still starting.
    pub warming_spawns: u64,
}

#[derive(Debug)]
struct Template {
    pid: u32,
    /// The environment stamp when the template started.
    stamp: u64,
    /// Pid of its current spare (0: none known).
    spare: std::sync::atomic::AtomicU32,
    /// The current spare, until a launch takes it.
    spare_slot: Mutex<Option<Spare>>,
    /// The policy-level sandbox plan was sent (spares forked after it apply it while they wait).
    plan_sent: AtomicBool,
    sock: OwnedFd,
    alive: AtomicBool,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<LaunchReply>>>,
    exits: Mutex<HashMap<u32, oneshot::Sender<i32>>>,
    child: Mutex<Option<tokio::process::Child>>,
}

impl Template {
    /// Marks the template dead and kills it; the workers it forked live on.
    fn retire(&self) {
        self.alive.store(false, Ordering::Release);
        // Its spare would hand out what the template imported: drop it (it exits on EOF, or is
        // killed with its cgroup).
        lock(&self.spare_slot).take();
        self.spare.store(0, Ordering::Relaxed);
        if let Some(mut child) = lock(&self.child).take() {
            let _ = child.start_kill();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn other(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::other(msg.into())
}

impl ForkServer {
    /// Prepares a fork server for sessions of `session` with `warm_imports` pre-imported in the
    /// template. The template starts on the first launch. Errors if the interpreter or the
    /// worker runtime cannot be prepared.
    pub fn new(session: &SessionConfig, warm_imports: &[String]) -> Result<Arc<Self>, String> {
        let interp = capsule_worker::resolve_interpreter(session.python.as_deref())
            .map_err(|e| e.to_string())?;
        let bundle =
            capsule_worker::materialize(session.cache_dir.as_deref()).map_err(|e| e.to_string())?;
        let literal =
            serde_json::Value::String(bundle.dir.to_string_lossy().into_owned()).to_string();
        Ok(Arc::new_cyclic(|me| {
            ForkServer {
            me: me.clone(),
            warming_spawns: AtomicU64::new(0),
            spawn_while_warming: AtomicBool::new(false),
            warming: AtomicBool::new(false),
            build_failed_at: Mutex::new(None),
            python: interp.executable.clone(),
            bootstrap: format!(
                "import sys; sys.path.insert(0, {literal}); import capsule_worker; capsule_worker.template_main()"
            ),
            warm_imports: warm_imports.to_vec(),
            template_config: serde_json::json!({
                "site": session.enable_site,
                "sys_path": session
                    .sys_path
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect::<Vec<_>>(),
                "warm": warm_imports,
            })
            .to_string(),
            start_timeout: session.start_timeout,
            stamp_dirs: interp
                .read_paths
                .iter()
                .chain(session.sys_path.iter())
                .cloned()
                .collect(),
            policy: Arc::new(session.sandbox.clone()),
            current: Mutex::new(None),
            building: tokio::sync::Mutex::new(()),
            forked: Mutex::new(HashSet::new()),
            templates_started: AtomicU64::new(0),
            templates_stale: AtomicU64::new(0),
            forks: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            spare_hits: AtomicU64::new(0),
            preapplied_hits: AtomicU64::new(0),
            changed: tokio::sync::watch::Sender::new(0),
            disabled: Mutex::new(None),
        }
        }))
    }

    /// With `on`, a launch that finds no running template does not wait for one: it starts
    /// building it in the background and answers [`std::io::ErrorKind::WouldBlock`], so the
    /// session spawns its worker instead (quietly: this is not a failure). Later launches,
    /// once the template is up, fork. Off by default (every launch waits for the template).
    pub fn set_spawn_while_warming(&self, on: bool) {
        self.spawn_while_warming.store(on, Ordering::Relaxed);
    }

    /// Kills the current template (its workers live on; sessions shut them down). The next
    /// launch would start a new one.
    pub fn shutdown(&self) {
        if let Some(t) = lock(&self.current).take() {
            t.retire();
        }
    }

    /// Whether `pid` was forked by this server (each pid answers `true` once).
    pub fn forked(&self, pid: u32) -> bool {
        lock(&self.forked).remove(&pid)
    }

    /// Counters and state.
    pub fn info(&self) -> ForkInfo {
        let disabled = lock(&self.disabled).clone();
        // One lock of `current`, released before anything else is read.
        let live = lock(&self.current)
            .as_ref()
            .filter(|t| t.alive.load(Ordering::Acquire))
            .map(|t| (t.pid, t.spare.load(Ordering::Relaxed)));
        ForkInfo {
            enabled: disabled.is_none(),
            disabled_reason: disabled,
            template_pid: live.map(|(pid, _)| pid),
            templates_started: self.templates_started.load(Ordering::Relaxed),
            templates_stale: self.templates_stale.load(Ordering::Relaxed),
            forks: self.forks.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            spare_hits: self.spare_hits.load(Ordering::Relaxed),
            preapplied_hits: self.preapplied_hits.load(Ordering::Relaxed),
            spare_preapplied: live.is_some()
                && lock(&self.current)
                    .as_ref()
                    .and_then(|t| lock(&t.spare_slot).as_ref().map(|sp| sp.preapplied))
                    .unwrap_or(false),
            spare_pid: live.and_then(|(_, spare)| (spare != 0).then_some(spare)),
            warming_spawns: self.warming_spawns.load(Ordering::Relaxed),
        }
    }

    fn has_live_template(&self) -> bool {
        lock(&self.current)
            .as_ref()
            .is_some_and(|t| t.alive.load(Ordering::Acquire))
    }

    /// A digest of the modification times of [`ForkServer::stamp_dirs`] (a few `stat`s).
    fn env_stamp(&self) -> u64 {
        use std::hash::{DefaultHasher, Hash, Hasher};
        let mut h = DefaultHasher::new();
        for d in &self.stamp_dirs {
            d.hash(&mut h);
            if let Ok(m) = std::fs::metadata(d).and_then(|m| m.modified()) {
                m.hash(&mut h);
            }
        }
        h.finish()
    }

    /// A receiver that changes whenever a template reports something or goes away.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Waits until `pred` holds for [`ForkServer::info`] (re-checked whenever a template
    /// reports something or goes away).
    pub async fn wait_until(&self, pred: impl Fn(&ForkInfo) -> bool) -> ForkInfo {
        let mut rx = self.changed.subscribe();
        loop {
            let info = self.info();
            if pred(&info) {
                return info;
            }
            if rx.changed().await.is_err() {
                return self.info();
            }
        }
    }

    async fn template(&self) -> std::io::Result<Arc<Template>> {
        if let Some(reason) = lock(&self.disabled).clone() {
            return Err(other(reason));
        }
        // A template whose environment changed since it imported its modules would hand out
        // stale modules: retire it (its forked workers live on) and start a new one.
        let stamp = self.env_stamp();
        let stale = lock(&self.current)
            .as_ref()
            .filter(|t| t.alive.load(Ordering::Acquire) && t.stamp != stamp)
            .cloned();
        if let Some(t) = stale {
            self.templates_stale.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                template = t.pid,
                "the Python environment changed; retiring the fork-server template"
            );
            t.retire();
        }
        if let Some(t) = lock(&self.current)
            .as_ref()
            .filter(|t| t.alive.load(Ordering::Acquire))
        {
            return Ok(t.clone());
        }
        let _building = self.building.lock().await;
        // Someone else may have built it while we waited.
        if let Some(t) = lock(&self.current)
            .as_ref()
            .filter(|t| t.alive.load(Ordering::Acquire))
        {
            return Ok(t.clone());
        }
        let t = self.start_template(stamp).await?;
        *lock(&self.current) = Some(t.clone());
        Ok(t)
    }

    async fn start_template(&self, stamp: u64) -> std::io::Result<Arc<Template>> {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (host, tmpl) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        // Above the target descriptor so the dup2 onto 3 clears close-on-exec.
        // SAFETY: fcntl on a descriptor we own; it returns a new one we then own.
        let raw = unsafe { libc::fcntl(tmpl.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor from fcntl.
        let tmpl_high = unsafe { OwnedFd::from_raw_fd(raw) };
        drop(tmpl);
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let fl = libc::fcntl(host.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(host.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        let mut cmd = tokio::process::Command::new(&self.python);
        cmd.args([
            "-I",
            "-S",
            "-c",
            &self.bootstrap,
            "3",
            &self.template_config,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LANG", "C.UTF-8")
        .env("LC_ALL", "C.UTF-8")
        // Like the workers: never write `__pycache__` into the user's directories.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .process_group(0)
        .kill_on_drop(true);
        let fd = tmpl_high.as_raw_fd();
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: runs in the forked child before exec; only raw syscalls on integers.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(tmpl_high);
        let pid = child.id().unwrap_or(0);
        let t = Arc::new(Template {
            pid,
            stamp,
            spare: std::sync::atomic::AtomicU32::new(0),
            spare_slot: Mutex::new(None),
            plan_sent: AtomicBool::new(false),
            sock: host,
            alive: AtomicBool::new(true),
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            exits: Mutex::new(HashMap::new()),
            child: Mutex::new(Some(child)),
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        let reader_sock = t.sock.try_clone()?;
        tokio::spawn(reader(
            t.clone(),
            reader_sock,
            ready_tx,
            self.changed.clone(),
            self.policy.clone(),
        ));
        let ready = tokio::time::timeout(self.start_timeout, ready_rx)
            .await
            .map_err(|_| other("the fork-server template did not get ready in time"))?
            .map_err(|_| other("the fork-server template exited during start-up"))?;
        let threads = ready.get("threads").and_then(|v| v.as_u64()).unwrap_or(0);
        if threads != 1 {
            let why = format!(
                "the template has {threads} threads after its warm imports ({:?}); forking it is unsafe",
                self.warm_imports
            );
            *lock(&self.disabled) = Some(why.clone());
            return Err(other(why));
        }
        self.templates_started.fetch_add(1, Ordering::Relaxed);
        tracing::info!(template = pid, warm = ?self.warm_imports, "fork-server template ready");
        Ok(t)
    }

    async fn fork(&self, t: &Arc<Template>, req: &LaunchRequest<'_>) -> std::io::Result<Launched> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let plan: serde_json::Value = serde_json::from_str(&req.sandbox.json)
            .map_err(|e| other(format!("the sandbox plan is not JSON: {e}")))?;
        if !t.plan_sent.swap(true, Ordering::AcqRel) {
            // Once per template: the policy-level part of the plan (the same for every session
            // of this fork server), for its next spares to apply while they wait.
            let mut policy = plan.clone();
            if let Some(o) = policy.as_object_mut() {
                o.remove("landlock");
                o.remove("report");
            }
            let note = serde_json::json!({ "spare_plan": policy }).to_string();
            match nix::sys::socket::send(
                t.sock.as_raw_fd(),
                note.as_bytes(),
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            ) {
                // The template replaces its current spare (which applies nothing ahead) with
                // one that does: give up ours, so the old one sees EOF and exits.
                Ok(_) => drop(lock(&t.spare_slot).take()),
                Err(e) => {
                    tracing::debug!(template = t.pid, error = %e, "could not send the spare plan")
                }
            }
        }
        let id = t.next_id.fetch_add(1, Ordering::Relaxed);
        let msg = serde_json::json!({
            "id": id,
            "scratch": req.scratch.to_string_lossy(),
            "env": req.env,
            "confine": plan,
            "confine_fds": req.sandbox.fds.len(),
        })
        .to_string();
        let iov = [IoSlice::new(msg.as_bytes())];
        let mut fds: Vec<RawFd> = req.fds.to_vec();
        fds.extend(req.sandbox.fds.iter().map(|f| f.as_raw_fd()));
        let cmsg = [ControlMessage::ScmRights(&fds)];
        // The spare first: the request goes to it directly, and its pid is known already.
        let spare = lock(&t.spare_slot).take();
        let mut launched = None;
        if let Some(sp) = spare {
            let _ = t
                .spare
                .compare_exchange(sp.pid, 0, Ordering::Relaxed, Ordering::Relaxed);
            // Registered before the request goes out, so the exit report (which can only come
            // after the spare got it and died) always finds its slot.
            let (etx, erx) = oneshot::channel();
            lock(&t.exits).insert(sp.pid, etx);
            match sendmsg::<()>(
                sp.sock.as_raw_fd(),
                &iov,
                &cmsg,
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                None,
            ) {
                Ok(_) => {
                    self.spare_hits.fetch_add(1, Ordering::Relaxed);
                    if sp.preapplied {
                        self.preapplied_hits.fetch_add(1, Ordering::Relaxed);
                    }
                    let cgroup = match sp.cgroup {
                        // Usually done long ago; otherwise its move is already under way.
                        Some(task) => task.await.ok().flatten(),
                        None => None,
                    };
                    launched = Some((sp.pid, erx, cgroup));
                }
                Err(e) => {
                    // The spare is gone (its exit is reported and ignored): fork on demand.
                    lock(&t.exits).remove(&sp.pid);
                    tracing::debug!(spare = sp.pid, error = %e, "the spare did not take the request");
                }
            }
        }
        let (pid, exit_rx, cgroup) = match launched {
            Some(l) => l,
            None => {
                let (tx, rx) = oneshot::channel();
                lock(&t.pending).insert(id, tx);
                if let Err(e) = sendmsg::<()>(
                    t.sock.as_raw_fd(),
                    &iov,
                    &cmsg,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                ) {
                    lock(&t.pending).remove(&id);
                    return Err(std::io::Error::from(e));
                }
                let reply = tokio::time::timeout(self.start_timeout, rx)
                    .await
                    .map_err(|_| other("the fork-server template did not answer"))?
                    .map_err(|_| other("the fork-server template died"))?;
                let (pid, exit_rx) = reply.map_err(other)?;
                (pid, exit_rx, None)
            }
        };
        self.forks.fetch_add(1, Ordering::Relaxed);
        lock(&self.forked).insert(pid);
        let exit: ExitFuture = Box::pin(async move {
            match exit_rx.await {
                Ok(raw) => Some(std::process::ExitStatus::from_raw(raw)),
                // The template died: the worker lives on in its own session; wait for it
                // through a pidfd (status unknown).
                Err(_) => {
                    Liveness::new(pid).exited().await;
                    None
                }
            }
        });
        Ok(Launched { pid, exit, cgroup })
    }
}

impl Drop for ForkServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Launcher for ForkServer {
    fn name(&self) -> &'static str {
        "fork"
    }

    fn launch<'a>(
        &'a self,
        req: LaunchRequest<'a>,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Launched>> + Send + 'a>> {
        Box::pin(async move {
            if self.spawn_while_warming.load(Ordering::Relaxed) && !self.has_live_template() {
                let backing_off =
                    lock(&self.build_failed_at).is_some_and(|t| t.elapsed() < REBUILD_BACKOFF);
                if lock(&self.disabled).is_none()
                    && !backing_off
                    && !self.warming.swap(true, Ordering::AcqRel)
                {
                    if let Some(me) = self.me.upgrade() {
                        tokio::spawn(async move {
                            if let Err(e) = me.template().await {
                                tracing::debug!(error = %e, "fork-server template build failed");
                                *lock(&me.build_failed_at) = Some(std::time::Instant::now());
                            }
                            me.warming.store(false, Ordering::Release);
                            me.changed.send_modify(|n| *n += 1);
                        });
                    } else {
                        self.warming.store(false, Ordering::Release);
                    }
                }
                self.warming_spawns.fetch_add(1, Ordering::Relaxed);
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    "the fork-server template is still starting",
                ));
            }
            let result = match self.template().await {
                Ok(t) => {
                    let r = self.fork(&t, &req).await;
                    if r.is_err() {
                        // A template that failed a request is not trusted again.
                        t.alive.store(false, Ordering::Release);
                    }
                    r
                }
                Err(e) => Err(e),
            };
            if result.is_err() {
                self.failures.fetch_add(1, Ordering::Relaxed);
            }
            result
        })
    }
}

/// One `recvmsg` on a `SOCK_SEQPACKET` socket: the message's length and the descriptors it
/// carried (close-on-exec).
fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )
    .map_err(std::io::Error::from)?;
    let mut fds = Vec::new();
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: descriptors just received by this process; nobody else owns them.
                fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
            }
        }
    }
    Ok((msg.bytes, fds))
}

/// The single reader of a template's socket.
async fn reader(
    t: Arc<Template>,
    sock: OwnedFd,
    ready: oneshot::Sender<serde_json::Value>,
    changed: tokio::sync::watch::Sender<u64>,
    policy: Arc<capsule_sandbox::Policy>,
) {
    let mut ready = Some(ready);
    // SAFETY: `sock` is an OwnedFd moved into the AsyncFd and stays open until it is dropped.
    let afd = match unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE) } {
        Ok(a) => a,
        Err(_) => {
            t.alive.store(false, Ordering::Release);
            return;
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (n, mut fds) = match afd
            .async_io(Interest::READABLE, |fd| {
                recv_with_fds(fd.as_raw_fd(), &mut buf)
            })
            .await
        {
            Ok((0, _)) | Err(_) => break,
            Ok(got) => got,
        };
        let Ok(msg) = serde_json::from_slice::<serde_json::Value>(&buf[..n]) else {
            tracing::warn!(
                template = t.pid,
                "undecodable message from the fork-server template"
            );
            break;
        };
        if msg.get("ready").is_some() {
            if let Some(failed) = msg
                .get("failed")
                .and_then(|f| f.as_array())
                .filter(|f| !f.is_empty())
            {
                tracing::debug!(template = t.pid, ?failed, "template warm imports failed");
            }
            if let Some(r) = ready.take() {
                let _ = r.send(msg);
            }
        } else if let Some(pid) = msg.get("exit").and_then(|p| p.as_u64()) {
            let status = msg.get("status").and_then(|s| s.as_i64()).unwrap_or(0) as i32;
            if let Some(tx) = lock(&t.exits).remove(&(pid as u32)) {
                let _ = tx.send(status);
            }
        } else if let (None, Some(pid)) = (msg.get("id"), msg.get("spare").and_then(|p| p.as_u64()))
        {
            let pid = pid as u32;
            let Some(sock) = fds.pop() else {
                tracing::warn!(template = t.pid, "a spare reported without its socket");
                continue;
            };
            // Move the spare into a cgroup of its own now, off any session's start. The
            // previous spare's entry (used or dead) is dropped with it.
            let policy = policy.clone();
            let task = tokio::task::spawn_blocking(move || {
                let mut c = match capsule_sandbox::PreparedCgroup::create(&policy) {
                    Ok(Some(c)) => c,
                    Ok(None) => return None,
                    Err(e) => {
                        tracing::debug!(error = %e, "no cgroup made ahead for the spare");
                        return None;
                    }
                };
                match c.join(pid) {
                    Ok(()) => Some(c),
                    Err(e) => {
                        tracing::debug!(spare = pid, error = %e, "moving the spare into its cgroup failed");
                        None
                    }
                }
            });
            *lock(&t.spare_slot) = Some(Spare {
                pid,
                preapplied: msg.get("preapplied").and_then(|p| p.as_bool()) == Some(true),
                sock,
                cgroup: Some(task),
            });
            t.spare.store(pid, Ordering::Relaxed);
        } else if let Some(id) = msg.get("id").and_then(|i| i.as_u64()) {
            let Some(tx) = lock(&t.pending).remove(&id) else {
                continue;
            };
            let reply = match msg.get("pid").and_then(|p| p.as_u64()) {
                Some(pid) => {
                    let pid = pid as u32;
                    // Registered before the launcher sees the pid, so an exit report (which the
                    // template can only send after this reply) always finds its slot.
                    let (etx, erx) = oneshot::channel();
                    lock(&t.exits).insert(pid, etx);
                    Ok((pid, erx))
                }
                None => Err(msg
                    .get("error")
                    .and_then(|e| e.as_str())
                    .unwrap_or("the template refused to fork")
                    .to_string()),
            };
            let _ = tx.send(reply);
        }
        changed.send_modify(|n| *n += 1);
    }
    t.alive.store(false, Ordering::Release);
    lock(&t.spare_slot).take();
    t.spare.store(0, Ordering::Relaxed);
    lock(&t.pending).clear();
    lock(&t.exits).clear();
    changed.send_modify(|n| *n += 1);
    tracing::info!(template = t.pid, "fork-server template gone");
}
