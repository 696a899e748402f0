//! capsule-sandbox: builds the OS sandbox every Capsule worker runs in.
//!
//! It owns the sandbox [`Policy`] (presets and TOML), the kernel [`probe`] shown by
//! `capsule doctor`, and [`prepare`], which allocates every layer in the parent (seccomp BPF,
//! Landlock ruleset, uid/gid maps, rlimits, per-worker cgroup) so that the `pre_exec` hook
//! registered by [`Prepared::install`] only issues raw, async-signal-safe syscalls in the forked
//! child. It also classifies how a worker died ([`KillReason`]).
//!
//! What it must never do: run user code, read or write the worker's protocol pipes, pick the
//! interpreter, or decide deadlines (the session owns those). It never weakens a `required`
//! layer: if one is unavailable, [`prepare`] fails closed with
//! [`SandboxError::LayerUnavailable`] (BRIEF §3.10).
//!
//! Typical use (the session):
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use capsule_sandbox::{prepare, Policy, SpawnSpec};
//! let spec = SpawnSpec::new("/usr/bin/python3", "/tmp/scratch-1");
//! let mut prepared = prepare(&Policy::standard(), &spec)?;
//! let mut cmd = std::process::Command::new(&spec.interpreter);
//! cmd.args(["-I", "-S", "-c", "pass"]).current_dir(&spec.scratch_dir);
//! prepared.install(&mut cmd)?; // clean env + pre_exec hook
//! let mut child = match cmd.spawn() {
//!     Ok(c) => c,
//!     Err(e) => return Err(prepared.explain_spawn_error(&e).into()),
//! };
//! prepared.after_spawn(child.id())?;
//! let status = child.wait()?;
//! let reason = prepared.classify_exit(status); // None: normal exit
//! prepared.cleanup();
//! # let _ = reason; Ok(()) }
//! ```

mod cgroup;
mod child;
mod error;
mod fork_plan;
mod fsview;
mod kill;
mod policy;
mod probe;
mod seccomp;

use std::collections::HashSet;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use serde::Serialize;

pub use cgroup::LimitEvents;
pub use error::SandboxError;
pub use fork_plan::ForkPlan;
pub use fsview::{DEVICE_PATHS, SYSTEM_READ_PATHS};
pub use kill::KillReason;
pub use policy::{
    parse_size, EnvPolicy, Filesystem, Identity, LayerMode, Layers, Limits, Network, Policy,
    UserMode,
};
pub use probe::{probe, CgroupProbe, Probe, ProbedLayer};
pub use seccomp::DENIED_SYSCALLS;

use child::{ChildPlan, ChildRule, IdMaps, Rlimit, Step, TmpfsMount};

/// What the session gives the sandbox about one worker.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpawnSpec {
    /// The real interpreter binary (not a shim). Symlinks are resolved.
    pub interpreter: PathBuf,
    /// Read-only paths: interpreter prefix, stdlib, site-packages, the worker code cache.
    pub read_paths: Vec<PathBuf>,
    /// The per-session read-write scratch directory (also `HOME` and `TMPDIR`).
    pub scratch_dir: PathBuf,
    /// Extra environment for the worker (applied last: wins over the policy's `env.set`).
    pub extra_env: Vec<(String, String)>,
    /// Make the worker's cgroup only when it is joined ([`Prepared::join_cgroups`]) rather
    /// than in [`prepare`]: for a worker that may come with a cgroup of its own (a fork
    /// server's spare, see [`Prepared::adopt_cgroup`]), so none is made in vain.
    pub defer_cgroup: bool,
}

impl SpawnSpec {
    /// A spec with only the interpreter and the scratch dir.
    pub fn new(interpreter: impl Into<PathBuf>, scratch_dir: impl Into<PathBuf>) -> Self {
        SpawnSpec {
            interpreter: interpreter.into(),
            read_paths: Vec::new(),
            scratch_dir: scratch_dir.into(),
            extra_env: Vec::new(),
            defer_cgroup: false,
        }
    }
}

/// State of one layer for one worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerState {
    /// Applied.
    Active,
    /// Wanted (best-effort) but not available here.
    Missing,
    /// Off in the policy.
    Disabled,
}

/// One layer as applied to one worker (session info, `capsule doctor`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LayerStatus {
    /// Layer name (a [`Layers`] field name).
    pub name: &'static str,
    /// Active / missing / disabled.
    pub state: LayerState,
    /// Details: what it does here, or why it is missing.
    pub detail: String,
}

/// A sandbox prepared for one worker spawn. See the crate docs for the call sequence.
#[derive(Debug)]
pub struct Prepared {
    preset: String,
    env: Vec<(String, String)>,
    layers: Vec<LayerStatus>,
    plan: Option<ChildPlan>,
    report_rx: Option<OwnedFd>,
    cgroup: Option<cgroup::WorkerCgroup>,
    /// Open `cgroup.procs` handles of the worker's cgroups. The parent writes the worker's pid
    /// into them right after the spawn (see [`Prepared::after_spawn`]).
    cgroup_procs: Vec<OwnedFd>,
    /// Whether the policy requires the cgroup layer (a failed join is then fatal).
    cgroup_required: bool,
    /// A cgroup to make at the join (memory limit, pids limit): see [`SpawnSpec::defer_cgroup`].
    pending_cgroup: Option<(Option<u64>, Option<u64>)>,
    baseline: LimitEvents,
    cpu_limit: Option<u64>,
    pid: Option<u32>,
    worker_uid: u32,
}

fn warn_once(key: &str, msg: &str) {
    static SEEN: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let seen = SEEN.get_or_init(|| Mutex::new(HashSet::new()));
    let first = match seen.lock() {
        Ok(mut s) => s.insert(key.to_string()),
        Err(p) => p.into_inner().insert(key.to_string()),
    };
    if first {
        tracing::warn!(layer = key, "sandbox layer missing: {msg}");
    }
}

struct Decider<'a> {
    layers: &'a mut Vec<LayerStatus>,
}

impl Decider<'_> {
    /// Record the decision for a layer; fail closed when required and unavailable.
    fn decide(
        &mut self,
        name: &'static str,
        mode: LayerMode,
        available: Result<(), String>,
    ) -> Result<bool, SandboxError> {
        match (mode, available) {
            (LayerMode::Off, _) => {
                self.set(name, LayerState::Disabled, "off in the policy".into());
                Ok(false)
            }
            (_, Ok(())) => {
                self.set(name, LayerState::Active, String::new());
                Ok(true)
            }
            (LayerMode::Required, Err(reason)) => Err(SandboxError::LayerUnavailable {
                layer: name,
                reason,
            }),
            (LayerMode::BestEffort, Err(reason)) => {
                warn_once(name, &reason);
                self.set(name, LayerState::Missing, reason);
                Ok(false)
            }
        }
    }

    fn set(&mut self, name: &'static str, state: LayerState, detail: String) {
        if let Some(l) = self.layers.iter_mut().find(|l| l.name == name) {
            l.state = state;
            l.detail = detail;
        } else {
            self.layers.push(LayerStatus {
                name,
                state,
                detail,
            });
        }
    }

    fn detail(&mut self, name: &'static str, detail: String) {
        if let Some(l) = self.layers.iter_mut().find(|l| l.name == name) {
            l.detail = detail;
        }
    }
}

fn probe_ok(p: &Probe, name: &str) -> Result<(), String> {
    match p.layer(name) {
        Some(l) if l.available => Ok(()),
        Some(l) => Err(l.detail.clone()),
        None => Err("not probed".into()),
    }
}

fn cstring(s: &str) -> Result<CString, SandboxError> {
    CString::new(s).map_err(|e| SandboxError::InvalidSpec(e.to_string()))
}

/// Build the clean environment: a fixed base, host variables the policy passes through,
/// the policy's fixed values, then the spec's extra variables.
fn build_env(policy: &Policy, spec: &SpawnSpec) -> Vec<(String, String)> {
    let scratch = spec.scratch_dir.to_string_lossy().into_owned();
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("LC_ALL".into(), "C.UTF-8".into()),
        ("HOME".into(), scratch.clone()),
        ("TMPDIR".into(), scratch),
        ("USER".into(), "sandbox".into()),
        ("LOGNAME".into(), "sandbox".into()),
        ("PYTHONDONTWRITEBYTECODE".into(), "1".into()),
        ("PYTHONNOUSERSITE".into(), "1".into()),
    ];
    let mut put = |k: &str, v: &str| {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return;
        }
        if let Some(slot) = env.iter_mut().find(|(ek, _)| ek == k) {
            slot.1 = v.to_string();
        } else {
            env.push((k.to_string(), v.to_string()));
        }
    };
    for name in &policy.env.passthrough {
        if let Ok(v) = std::env::var(name) {
            put(name, &v);
        }
    }
    for (k, v) in &policy.env.set {
        put(k, v);
    }
    for (k, v) in &spec.extra_env {
        put(k, v);
    }
    env
}

/// Read-only paths implied by the interpreter itself: for `<prefix>/bin/python*` (both the
/// invoked path, e.g. a venv, and the resolved binary), `<prefix>/lib` and `<prefix>/pyvenv.cfg`;
/// for the system prefixes `/usr` and `/usr/local`, only their `lib/python*` directories.
fn interpreter_read_paths(invoked: &Path, canonical: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for exe in [invoked, canonical] {
        let Some(bin) = exe.parent() else { continue };
        if bin.file_name().and_then(|n| n.to_str()) != Some("bin") {
            continue;
        }
        let Some(prefix) = bin.parent() else { continue };
        if prefix == Path::new("/") {
            continue;
        }
        if prefix == Path::new("/usr") || prefix == Path::new("/usr/local") {
            if let Ok(rd) = std::fs::read_dir(prefix.join("lib")) {
                for e in rd.flatten() {
                    if e.file_name().to_string_lossy().starts_with("python") {
                        out.push(e.path());
                    }
                }
            }
            continue;
        }
        for p in [prefix.join("lib"), prefix.join("pyvenv.cfg")] {
            if p.exists() && !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// What the `cgroup` layer reports for a worker's cgroup.
fn cgroup_detail(c: &cgroup::WorkerCgroup, memory: Option<u64>, processes: Option<u64>) -> String {
    let mut parts = Vec::new();
    if let Some(m) = &c.memory_dir {
        parts.push(format!(
            "memory {} ({})",
            m.display(),
            memory.map_or("no limit".into(), |m| format!("{m} bytes"))
        ));
    }
    if let Some(p) = &c.pids_dir {
        if c.memory_dir.as_ref() != Some(p) || processes.is_some() {
            parts.push(format!(
                "pids {} (max {})",
                p.display(),
                processes.map_or("none".into(), |p| p.to_string())
            ));
        }
    }
    format!("{}{}", if c.v2 { "v2 " } else { "v1 " }, parts.join(", "))
}

/// A worker's cgroup(s), made ahead of time for a process that already exists: the pool's fork
/// server moves its pre-forked spare into one while the spare waits, so that the session that
/// later gets the spare adopts it ([`Prepared::adopt_cgroup`]) instead of paying for the move
/// on its start (on cgroup v1 a move waits for an RCU grace period: ~8 ms here).
///
/// Dropped without being adopted, it kills what is inside and removes the directories.
#[derive(Debug)]
pub struct PreparedCgroup {
    cg: Option<cgroup::WorkerCgroup>,
    procs: Vec<OwnedFd>,
    pid: Option<u32>,
}

impl PreparedCgroup {
    /// Creates the cgroup(s) `policy` gives each worker, with its limits. `Ok(None)` when the
    /// policy gives workers no cgroup here (layer off, no limit to enforce, or cgroups
    /// unavailable: then [`prepare`] decides, and fails closed if the layer is required).
    pub fn create(policy: &Policy) -> Result<Option<PreparedCgroup>, SandboxError> {
        let lim = &policy.limits;
        if !policy.layers.cgroup.wanted()
            || (lim.memory.is_none() && lim.processes.is_none())
            || probe_ok(probe(), "cgroup").is_err()
        {
            return Ok(None);
        }
        let (cg, procs) = cgroup::create(&probe().cgroup, lim.memory, lim.processes)?;
        Ok(Some(PreparedCgroup {
            cg: Some(cg),
            procs,
            pid: None,
        }))
    }

    /// Moves `pid` (and so its future children) in. Blocking; once only.
    pub fn join(&mut self, pid: u32) -> Result<(), SandboxError> {
        let text = pid.to_string();
        for fd in std::mem::take(&mut self.procs) {
            // SAFETY: write(2) of a byte slice to a cgroup.procs descriptor we own.
            let n = unsafe { libc::write(fd.as_raw_fd(), text.as_ptr().cast(), text.len()) };
            if n != text.len() as isize {
                return Err(SandboxError::ChildSetup {
                    layer: "cgroup",
                    source: io::Error::last_os_error(),
                });
            }
        }
        self.pid = Some(pid);
        Ok(())
    }

    /// The pid moved in by [`PreparedCgroup::join`].
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }
}

impl Drop for PreparedCgroup {
    fn drop(&mut self) {
        if let Some(cg) = &mut self.cg {
            cg.remove();
        }
    }
}

/// Prepare the sandbox for one worker (in the parent, before fork). Probes the kernel (cached),
/// allocates every layer, and fails closed on a required layer that is unavailable.
pub fn prepare(policy: &Policy, spec: &SpawnSpec) -> Result<Prepared, SandboxError> {
    policy.validate()?;
    let probe = probe();
    // SAFETY: geteuid/getegid have no preconditions.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let interpreter = std::fs::canonicalize(&spec.interpreter).map_err(|e| {
        SandboxError::InvalidSpec(format!("interpreter {}: {e}", spec.interpreter.display()))
    })?;
    if !spec.scratch_dir.is_dir() {
        return Err(SandboxError::InvalidSpec(format!(
            "scratch dir {} is not a directory",
            spec.scratch_dir.display()
        )));
    }
    let scratch = std::fs::canonicalize(&spec.scratch_dir)
        .map_err(|e| SandboxError::InvalidSpec(format!("scratch dir: {e}")))?;
    let loader = fsview::elf_interpreter(&interpreter).and_then(|p| std::fs::canonicalize(p).ok());

    if policy.is_unconfined() {
        warn_once(
            "policy_none",
            "SANDBOX DISABLED: the worker runs with the host's network, files and privileges \
             (policy preset `none`). Never use this for untrusted code.",
        );
    }

    let mut layers = Vec::new();
    let mut d = Decider {
        layers: &mut layers,
    };
    let l = &policy.layers;
    let mut plan = ChildPlan::default();

    // Report pipe (child → parent), both ends CLOEXEC, read end non-blocking.
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(SandboxError::Setup {
            layer: "spawn",
            reason: format!("pipe2: {}", io::Error::last_os_error()),
        });
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    let (report_rx, report_tx) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    plan.report = Some(report_tx);

    // pid namespace: not implemented (see docs/security.md).
    d.decide("pid_ns", l.pid_ns, probe_ok(probe, "pid_ns"))?;

    // Identity.
    let mut read_paths: Vec<PathBuf> = interpreter_read_paths(&spec.interpreter, &interpreter);
    read_paths.extend(spec.read_paths.iter().cloned());
    read_paths.extend(policy.filesystem.read_paths.iter().cloned());
    let mut worker_uid = euid;
    let drop_avail: Result<(), String> = if euid != 0 {
        Err(format!(
            "host uid {euid} is already unprivileged; nothing to drop"
        ))
    } else if policy.identity.user == UserMode::Keep {
        Err("identity.user = \"keep\"".into())
    } else {
        let (u, g) = (policy.identity.uid, policy.identity.gid);
        let mut checks: Vec<(PathBuf, bool)> = vec![(interpreter.clone(), true)];
        if let Some(ld) = &loader {
            checks.push((ld.clone(), true));
        }
        checks.extend(
            read_paths
                .iter()
                .filter(|p| p.exists())
                .map(|p| (p.clone(), false)),
        );
        if let Some(parent) = scratch.parent() {
            checks.push((parent.to_path_buf(), true));
        }
        checks
            .iter()
            .try_for_each(|(p, exec)| fsview::reachable_by(p, u, g, *exec))
            .map_err(|why| format!("the worker would not reach its files as uid {u}: {why}; keeping the host uid (mapped to {} inside the user namespace)", policy.identity.inner_uid))
    };
    let drop_mode = if euid != 0 && l.unprivileged_uid != LayerMode::Off {
        d.set(
            "unprivileged_uid",
            LayerState::Active,
            format!("host uid {euid} is not root"),
        );
        false
    } else if policy.identity.user == UserMode::Unprivileged {
        match drop_avail {
            Ok(()) => {
                d.set("unprivileged_uid", LayerState::Active, String::new());
                true
            }
            Err(reason) => {
                return Err(SandboxError::LayerUnavailable {
                    layer: "unprivileged_uid",
                    reason,
                })
            }
        }
    } else {
        d.decide("unprivileged_uid", l.unprivileged_uid, drop_avail)?
    };
    if drop_mode {
        let (u, g) = (policy.identity.uid, policy.identity.gid);
        // The scratch dir (only the directory itself) becomes the worker's.
        std::os::unix::fs::chown(&scratch, Some(u), Some(g)).map_err(|e| SandboxError::Setup {
            layer: "unprivileged_uid",
            reason: format!("chown {} to {u}:{g}: {e}", scratch.display()),
        })?;
        plan.drop_to = Some((u, g));
        plan.require(Step::DropUid);
        worker_uid = u;
        d.detail(
            "unprivileged_uid",
            format!("worker runs as kernel uid {u}, gid {g}"),
        );
    }
    if euid == 0 && l.unprivileged_uid != LayerMode::Off {
        plan.clear_groups = true;
    }

    // Namespaces.
    let user = d.decide("user_ns", l.user_ns, probe_ok(probe, "user_ns"))?;
    let priv_ok = user || (euid == 0 && !drop_mode);
    let ns_avail = |name: &str| -> Result<(), String> {
        probe_ok(probe, name)?;
        if priv_ok {
            Ok(())
        } else {
            Err(format!("{name} needs a user namespace or CAP_SYS_ADMIN"))
        }
    };
    let net_mode = if policy.network == Network::Host {
        LayerMode::Off
    } else {
        l.net_ns
    };
    let mut flags = 0;
    let mut any_ns_required = false;
    for (name, mode, flag) in [
        ("net_ns", net_mode, libc::CLONE_NEWNET),
        ("ipc_ns", l.ipc_ns, libc::CLONE_NEWIPC),
        ("uts_ns", l.uts_ns, libc::CLONE_NEWUTS),
        ("mount_ns", l.mount_ns, libc::CLONE_NEWNS),
    ] {
        if d.decide(name, mode, ns_avail(name))? {
            flags |= flag;
            any_ns_required |= mode == LayerMode::Required;
        }
    }
    if user {
        flags |= libc::CLONE_NEWUSER;
        any_ns_required |= l.user_ns == LayerMode::Required;
        let outer_uid = plan.drop_to.map_or(euid, |(u, _)| u);
        let outer_gid = plan.drop_to.map_or(egid, |(_, g)| g);
        let (iu, ig) = (policy.identity.inner_uid, policy.identity.inner_gid);
        plan.id_maps = Some(IdMaps {
            setgroups_path: cstring("/proc/self/setgroups")?,
            uid_map_path: cstring("/proc/self/uid_map")?,
            gid_map_path: cstring("/proc/self/gid_map")?,
            uid_line: format!("{iu} {outer_uid} 1\n").into_bytes(),
            gid_line: format!("{ig} {outer_gid} 1\n").into_bytes(),
        });
        if l.user_ns == LayerMode::Required {
            plan.require(Step::IdMaps);
        }
        d.detail(
            "user_ns",
            format!("uid {iu} inside = kernel uid {outer_uid}; gid {ig} = {outer_gid}; setgroups denied; no capabilities in the host namespace"),
        );
    }
    plan.unshare_flags = flags;
    if any_ns_required {
        plan.require(Step::Unshare);
    }
    if flags & libc::CLONE_NEWNET != 0 {
        d.detail(
            "net_ns",
            "empty network namespace: only a down loopback".into(),
        );
    }
    let private_shm = user && flags & libc::CLONE_NEWNS != 0 && Path::new("/dev/shm").is_dir();
    if private_shm {
        plan.shm_tmpfs = Some(TmpfsMount {
            source: cstring("tmpfs")?,
            target: cstring("/dev/shm")?,
            fstype: cstring("tmpfs")?,
            data: cstring("size=64m,mode=1777")?,
        });
        d.detail(
            "mount_ns",
            "private mount namespace; a private 64 MiB tmpfs on /dev/shm".into(),
        );
    }

    // rlimits.
    let lim = &policy.limits;
    let rl = d.decide("rlimits", l.rlimits, Ok(()))?;
    let mut cpu_limit = None;
    let nproc_effective = worker_uid != 0;
    if rl {
        let mut notes = Vec::new();
        let mut push = |name: &str, res: libc::__rlimit_resource_t, cur: u64, max: u64| -> Rlimit {
            let hard = probe::hard_limit(res).unwrap_or(u64::MAX);
            let (cur, max) = (cur.min(hard), max.min(hard));
            notes.push(format!("{name}={cur}"));
            Rlimit {
                resource: res,
                cur,
                max,
            }
        };
        let mut v = vec![push("CORE", libc::RLIMIT_CORE, 0, 0)];
        if let Some(n) = lim.address_space {
            v.push(push("AS", libc::RLIMIT_AS, n, n));
        }
        if let Some(n) = lim.cpu_seconds {
            v.push(push("CPU", libc::RLIMIT_CPU, n, n.saturating_add(1)));
            cpu_limit = Some(n);
        }
        if let Some(n) = lim.file_size {
            v.push(push("FSIZE", libc::RLIMIT_FSIZE, n, n));
        }
        if let Some(n) = lim.open_files {
            v.push(push("NOFILE", libc::RLIMIT_NOFILE, n, n));
        }
        if let Some(n) = lim.processes {
            let r = push("NPROC", libc::RLIMIT_NPROC, n, n);
            if user {
                plan.nproc = Some(r);
            } else {
                v.push(r);
            }
        }
        plan.rlimits = v;
        if l.rlimits == LayerMode::Required {
            plan.require(Step::Rlimits);
            plan.require(Step::Nproc);
        }
        if lim.processes.is_some() && !nproc_effective {
            notes.push("NPROC not enforced (kernel uid 0 is exempt)".into());
        }
        d.detail("rlimits", notes.join(" "));
    }

    // cgroup.
    let mut cg = None;
    let mut cgroup_procs = Vec::new();
    let cg_avail = if lim.memory.is_none() && lim.processes.is_none() {
        Err("no memory or process limit to enforce".to_string())
    } else {
        probe_ok(probe, "cgroup")
    };
    let mut pending_cgroup = None;
    let want_cgroup = d.decide("cgroup", l.cgroup, cg_avail)?;
    if want_cgroup && spec.defer_cgroup {
        pending_cgroup = Some((lim.memory, lim.processes));
        d.detail(
            "cgroup",
            "made when the worker is joined (or adopted from its launcher)".into(),
        );
    } else if want_cgroup {
        match cgroup::create(&probe.cgroup, lim.memory, lim.processes) {
            Ok((c, fds)) => {
                // Joined from the parent after the spawn, not from the child: moving a task
                // between cgroup v1 hierarchies takes a global rwsem whose writer side waits
                // for an RCU grace period (several ms here). Done by the parent, that wait
                // overlaps the interpreter's own start-up instead of preceding it. No user code
                // runs before the join: the session sends no cell before its handshake, which
                // follows `after_spawn`.
                cgroup_procs = fds;
                d.detail("cgroup", cgroup_detail(&c, lim.memory, lim.processes));
                cg = Some(c);
            }
            Err(e) => {
                if l.cgroup == LayerMode::Required {
                    return Err(SandboxError::LayerUnavailable {
                        layer: "cgroup",
                        reason: e.to_string(),
                    });
                }
                warn_once("cgroup", &e.to_string());
                d.set("cgroup", LayerState::Missing, e.to_string());
            }
        }
    }
    let pids_controller = cg.as_ref().is_some_and(|c| c.pids_dir.is_some())
        || (pending_cgroup.is_some()
            && (probe.cgroup.v2_parent.is_some() || probe.cgroup.v1_pids_parent.is_some()));
    let cg_pids = pids_controller && lim.processes.is_some();
    let pl_avail = if lim.processes.is_none() {
        Err("limits.processes is not set".to_string())
    } else if cg_pids || (rl && nproc_effective) {
        Ok(())
    } else {
        Err("neither a cgroup pids controller nor RLIMIT_NPROC (the worker's kernel uid is root, which RLIMIT_NPROC exempts) is available".to_string())
    };
    if d.decide("process_limit", l.process_limit, pl_avail)? {
        d.detail(
            "process_limit",
            match (cg_pids, rl && nproc_effective) {
                (true, true) => "cgroup pids.max and RLIMIT_NPROC (per user namespace)".into(),
                (true, false) => "cgroup pids.max".into(),
                _ => "RLIMIT_NPROC (counted per user namespace, i.e. per worker)".into(),
            },
        );
    }

    // Landlock.
    let ll_fs = d.decide("landlock", l.landlock, probe_ok(probe, "landlock"))?;
    let ll_net_mode = if policy.network == Network::Host {
        LayerMode::Off
    } else {
        l.landlock_net
    };
    let ll_net = d.decide("landlock_net", ll_net_mode, probe_ok(probe, "landlock_net"))?;
    let ll_scope = d.decide(
        "landlock_scope",
        l.landlock_scope,
        probe_ok(probe, "landlock_scope"),
    )?;
    if ll_fs || ll_net || ll_scope {
        let mut view = fsview::FsView::default();
        view.exec.push(interpreter.clone());
        if let Some(ld) = &loader {
            view.exec.push(ld.clone());
        }
        view.exec
            .extend(policy.filesystem.exec_paths.iter().cloned());
        view.read.extend(read_paths.iter().cloned());
        if policy.filesystem.system_paths {
            view.read
                .extend(SYSTEM_READ_PATHS.iter().map(PathBuf::from));
            view.devices.extend(DEVICE_PATHS.iter().map(PathBuf::from));
        }
        view.write.push(scratch.clone());
        view.write
            .extend(policy.filesystem.write_paths.iter().cloned());
        let abi = probe.landlock_abi.unwrap_or(0);
        if private_shm && ll_fs {
            plan.shm_rule = Some(ChildRule {
                path: cstring("/dev/shm")?,
                access: fsview::write_access_bits(abi),
            });
        }
        let (fd, what) = fsview::build_ruleset(abi, &view, ll_fs, ll_net, ll_scope)?;
        plan.landlock = Some(fd);
        plan.no_new_privs = true;
        if [l.landlock, ll_net_mode, l.landlock_scope].contains(&LayerMode::Required) {
            plan.require(Step::Landlock);
            plan.require(Step::NoNewPrivs);
        }
        for (name, on) in [
            ("landlock", ll_fs),
            ("landlock_net", ll_net),
            ("landlock_scope", ll_scope),
        ] {
            if on {
                d.detail(name, what.clone());
            }
        }
    }

    // seccomp.
    if d.decide("seccomp", l.seccomp, probe_ok(probe, "seccomp"))? {
        let deny_inet = policy.network == Network::None;
        plan.seccomp = seccomp::compile(deny_inet)?;
        plan.no_new_privs = true;
        if l.seccomp == LayerMode::Required {
            plan.require(Step::Seccomp);
            plan.require(Step::NoNewPrivs);
        }
        d.detail(
            "seccomp",
            format!(
                "{} syscalls denied (EPERM), clone namespace flags denied, clone3 → ENOSYS{}",
                DENIED_SYSCALLS.len(),
                if deny_inet {
                    ", sockets other than AF_UNIX denied"
                } else {
                    ""
                }
            ),
        );
    }

    // no_new_privs.
    if d.decide("no_new_privs", l.no_new_privs, Ok(()))? || plan.no_new_privs {
        plan.no_new_privs = true;
        if l.no_new_privs == LayerMode::Required {
            plan.require(Step::NoNewPrivs);
        }
        d.set(
            "no_new_privs",
            LayerState::Active,
            "PR_SET_NO_NEW_PRIVS: setuid/file capabilities cannot raise privileges".into(),
        );
    }

    let env = build_env(policy, spec);
    layers.push(LayerStatus {
        name: "clean_env",
        state: LayerState::Active,
        detail: format!(
            "{} variables: {}",
            env.len(),
            env.iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>()
                .join(",")
        ),
    });
    let baseline = cg.as_ref().map(|c| c.events()).unwrap_or_default();
    Ok(Prepared {
        preset: policy.preset.clone(),
        env,
        layers,
        plan: Some(plan),
        report_rx: Some(report_rx),
        cgroup: cg,
        cgroup_procs,
        cgroup_required: l.cgroup == LayerMode::Required,
        pending_cgroup,
        baseline,
        cpu_limit,
        pid: None,
        worker_uid,
    })
}

impl Prepared {
    /// The clean environment for the worker ([`Prepared::install`] applies it already).
    pub fn env(&self) -> Vec<(String, String)> {
        self.env.clone()
    }

    /// Every layer with its state and details.
    pub fn layers(&self) -> &[LayerStatus] {
        &self.layers
    }

    /// The state of one layer.
    pub fn layer(&self, name: &str) -> Option<&LayerStatus> {
        self.layers.iter().find(|l| l.name == name)
    }

    /// `true` if the named layer is active.
    pub fn is_active(&self, name: &str) -> bool {
        self.layer(name)
            .is_some_and(|l| l.state == LayerState::Active)
    }

    /// Preset the policy came from.
    pub fn preset(&self) -> &str {
        &self.preset
    }

    /// Kernel uid the worker runs as.
    pub fn worker_uid(&self) -> u32 {
        self.worker_uid
    }

    /// Clear `cmd`'s environment, set [`Prepared::env`], and register the `pre_exec` hook that
    /// applies the layers in the forked child. Works for `tokio::process::Command` through
    /// `as_std_mut()`. Can be called once per `Prepared`.
    pub fn install(&mut self, cmd: &mut std::process::Command) -> Result<(), SandboxError> {
        let plan = self.plan.take().ok_or_else(|| SandboxError::Setup {
            layer: "spawn",
            reason: "Prepared::install called twice".into(),
        })?;
        cmd.env_clear();
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        // SAFETY: the hook is async-signal-safe: `ChildPlan::apply` performs only raw syscalls
        // (write, setrlimit, setgroups, setres[ug]id, prctl, unshare, open/close, mount,
        // landlock_restrict_self, seccomp) on data built in the parent; it neither allocates
        // nor takes locks, so it is sound between fork and exec in a multi-threaded host.
        unsafe {
            cmd.pre_exec(move || plan.apply().map_err(io::Error::from_raw_os_error));
        }
        Ok(())
    }

    /// The child plan as data, for a worker forked from a warm template rather than spawned
    /// (the pool's fork server): the forked child applies it with `capsule_worker.confine`,
    /// step for step what [`Prepared::install`]'s hook does. Send [`ForkPlan::fds`] along.
    /// Consumes the plan like [`Prepared::install`] (one or the other, once); the environment
    /// to give the child is [`Prepared::env`]. After the fork: [`Prepared::join_cgroups`] with
    /// the child's pid, then, once the worker has said hello (it applies the plan first),
    /// [`Prepared::fold_reports`].
    pub fn fork_plan(&mut self) -> Result<ForkPlan, SandboxError> {
        let plan = self.plan.take().ok_or_else(|| SandboxError::Setup {
            layer: "spawn",
            reason: "the child plan was already used".into(),
        })?;
        Ok(fork_plan::serialise(plan))
    }

    /// Call right after a successful spawn: records the pid, joins the worker's cgroups and
    /// folds failures of best-effort steps (reported by the child) into [`Prepared::layers`].
    pub fn after_spawn(&mut self, pid: u32) -> Result<(), SandboxError> {
        self.join_cgroups(pid)?;
        self.fold_reports()
    }

    /// Whether [`Prepared::join_cgroups`] has cgroups to join (a blocking write each: moving a
    /// task between cgroup v1 hierarchies waits for an RCU grace period, several ms, so callers
    /// on an async runtime run it on a blocking thread).
    pub fn has_cgroups_to_join(&self) -> bool {
        !self.cgroup_procs.is_empty() || self.pending_cgroup.is_some()
    }

    /// For a worker that already sits in a cgroup made for it ahead of time (see
    /// [`PreparedCgroup`]): that cgroup becomes this worker's (limits, OOM and pids counters,
    /// cleanup) in place of the one [`prepare`] made, which is removed. Records the pid;
    /// replaces [`Prepared::join_cgroups`]. Both cgroups come from the same policy, so the
    /// limits are the same.
    pub fn adopt_cgroup(&mut self, mut adopted: PreparedCgroup, pid: u32) {
        self.pid = Some(pid);
        let Some(new) = adopted.cg.take() else {
            return;
        };
        self.cgroup_procs.clear();
        if let Some((memory, processes)) = self.pending_cgroup.take() {
            // Deferred: nothing of our own was made. Report the adopted one.
            if let Some(l) = self.layers.iter_mut().find(|l| l.name == "cgroup") {
                l.detail = cgroup_detail(&new, memory, processes);
            }
        }
        if let Some(mut own) = self.cgroup.take() {
            if let Some(l) = self.layers.iter_mut().find(|l| l.name == "cgroup") {
                for (old, newer) in [
                    (&own.memory_dir, &new.memory_dir),
                    (&own.pids_dir, &new.pids_dir),
                ] {
                    if let (Some(o), Some(n)) = (old, newer) {
                        l.detail = l
                            .detail
                            .replace(&*o.to_string_lossy(), &n.to_string_lossy());
                    }
                }
            }
            own.remove();
        }
        if let Some(l) = self.layers.iter_mut().find(|l| l.name == "cgroup") {
            if l.state != LayerState::Active {
                // This worker's own cgroup could not be made, but it sits in one with the
                // policy's limits all the same.
                l.state = LayerState::Active;
                l.detail = format!(
                    "{} (made ahead for the worker)",
                    [&new.memory_dir, &new.pids_dir]
                        .into_iter()
                        .flatten()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        self.baseline = new.events();
        self.cgroup = Some(new);
    }

    /// Records the pid and moves the worker into its cgroups (memory, pids). Part of
    /// [`Prepared::after_spawn`]; called alone for a forked worker, whose plan is still being
    /// applied when its pid is known.
    pub fn join_cgroups(&mut self, pid: u32) -> Result<(), SandboxError> {
        self.pid = Some(pid);
        if let Some((memory, processes)) = self.pending_cgroup.take() {
            match cgroup::create(&probe().cgroup, memory, processes) {
                Ok((c, fds)) => {
                    if let Some(l) = self.layers.iter_mut().find(|l| l.name == "cgroup") {
                        l.detail = cgroup_detail(&c, memory, processes);
                    }
                    self.baseline = c.events();
                    self.cgroup = Some(c);
                    self.cgroup_procs = fds;
                }
                Err(e) => {
                    if self.cgroup_required {
                        return Err(SandboxError::LayerUnavailable {
                            layer: "cgroup",
                            reason: e.to_string(),
                        });
                    }
                    warn_once("cgroup", &e.to_string());
                    if let Some(l) = self.layers.iter_mut().find(|l| l.name == "cgroup") {
                        l.state = LayerState::Missing;
                        l.detail = e.to_string();
                    }
                }
            }
        }
        // Join the worker's cgroups (memory, pids): writing its pid moves the whole process.
        let text = pid.to_string();
        for fd in std::mem::take(&mut self.cgroup_procs) {
            // SAFETY: write(2) of a byte slice to a cgroup.procs descriptor we own.
            let n = unsafe { libc::write(fd.as_raw_fd(), text.as_ptr().cast(), text.len()) };
            if n != text.len() as isize {
                let err = io::Error::last_os_error();
                if self.cgroup_required {
                    return Err(SandboxError::ChildSetup {
                        layer: "cgroup",
                        source: err,
                    });
                }
                let reason = format!("joining the worker's cgroup failed: {err}");
                warn_once("cgroup", &reason);
                if let Some(l) = self.layers.iter_mut().find(|l| l.name == "cgroup") {
                    l.state = LayerState::Missing;
                    l.detail = reason;
                }
            }
        }
        Ok(())
    }

    /// Reads the child's step-failure reports: a required step that failed is an error naming
    /// the layer; a best-effort one marks its layer missing. Part of [`Prepared::after_spawn`];
    /// for a forked worker call it once the worker said hello (it applies its plan first).
    pub fn fold_reports(&mut self) -> Result<(), SandboxError> {
        if let Some(rx) = &self.report_rx {
            for f in child::read_reports(rx) {
                let name = f.step.layer();
                let reason = format!(
                    "failed in the child ({:?}): {}",
                    f.step,
                    io::Error::from_raw_os_error(f.errno)
                );
                if f.fatal {
                    return Err(SandboxError::ChildSetup {
                        layer: name,
                        source: io::Error::from_raw_os_error(f.errno),
                    });
                }
                warn_once(name, &reason);
                if let Some(l) = self.layers.iter_mut().find(|l| l.name == name) {
                    l.state = LayerState::Missing;
                    l.detail = reason;
                }
            }
        }
        Ok(())
    }

    /// Turn a spawn error into a typed error naming the layer that failed in the child.
    pub fn explain_spawn_error(&self, err: &io::Error) -> SandboxError {
        self.fatal_report().unwrap_or_else(|| SandboxError::Setup {
            layer: "spawn",
            reason: err.to_string(),
        })
    }

    /// The first required step the child reported failed, as a typed error (`None`: none
    /// reported). For a forked worker that died before its hello.
    pub fn fatal_report(&self) -> Option<SandboxError> {
        let rx = self.report_rx.as_ref()?;
        child::read_reports(rx)
            .into_iter()
            .find(|f| f.fatal)
            .map(|f| SandboxError::ChildSetup {
                layer: f.step.layer(),
                source: io::Error::from_raw_os_error(f.errno),
            })
    }

    /// OOM-kill and pids-limit counters of the worker's cgroup (zero without a cgroup).
    pub fn limit_events(&self) -> LimitEvents {
        self.cgroup.as_ref().map(|c| c.events()).unwrap_or_default()
    }

    /// Why the worker died, if the sandbox can tell (`None` for a normal exit). See
    /// [`KillReason`] for the heuristics. Call before [`Prepared::cleanup`].
    pub fn classify_exit(&self, status: ExitStatus) -> Option<KillReason> {
        self.classify_exit_with_cpu_time(status, None)
    }

    /// Like [`Prepared::classify_exit`], with the worker's CPU time (user + system, e.g. from
    /// `wait4` rusage) to recognise the hard `RLIMIT_CPU` `SIGKILL`.
    pub fn classify_exit_with_cpu_time(
        &self,
        status: ExitStatus,
        cpu_time: Option<Duration>,
    ) -> Option<KillReason> {
        kill::classify(
            status,
            self.baseline,
            self.limit_events(),
            self.cpu_limit,
            cpu_time,
        )
    }

    /// Remove the worker's cgroup (killing stragglers left in it). Idempotent; also on drop.
    pub fn cleanup(&mut self) {
        if let Some(cg) = &mut self.cgroup {
            cg.remove();
        }
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        self.cleanup();
    }
}
