//! Per-worker cgroups: a v2 delegated subtree (`memory.max`, `pids.max`, `memory.events`,
//! `cgroup.kill`) or the v1 `memory` and `pids` hierarchies (root only; the case on the build
//! machine). The directory is created in the parent by [`crate::prepare`]; the child joins it by
//! writing `0` to a `cgroup.procs` fd opened in the parent (race-free: the worker is inside
//! before it executes a single instruction of Python).

use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::probe::CgroupProbe;
use crate::SandboxError;

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Name prefix of every directory this crate creates (used by the stale-directory sweep).
pub const CGROUP_PREFIX: &str = "capsule-";

/// Counters read from a worker's cgroup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LimitEvents {
    /// OOM kills inside the cgroup (`memory.events` / v1 `memory.oom_control` `oom_kill`).
    pub oom_kills: u64,
    /// Times a fork/clone failed because `pids.max` was reached (`pids.events` `max`).
    pub pids_max_hits: u64,
}

/// A created per-worker cgroup.
#[derive(Debug)]
pub(crate) struct WorkerCgroup {
    pub v2: bool,
    pub memory_dir: Option<PathBuf>,
    pub pids_dir: Option<PathBuf>,
    pub removed: bool,
}

fn setup_err(reason: String) -> SandboxError {
    SandboxError::Setup {
        layer: "cgroup",
        reason,
    }
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), SandboxError> {
    fs::write(dir.join(file), value).map_err(|e| {
        setup_err(format!(
            "write {value} to {}: {e}",
            dir.join(file).display()
        ))
    })
}

fn open_procs(dir: &Path) -> Result<OwnedFd, SandboxError> {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))
        .map_err(|e| setup_err(format!("open {}/cgroup.procs: {e}", dir.display())))?;
    Ok(OwnedFd::from(f))
}

fn new_dir(parent: &Path) -> Result<PathBuf, SandboxError> {
    sweep_stale(parent);
    let name = format!(
        "{CGROUP_PREFIX}{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let dir = parent.join(name);
    fs::create_dir(&dir).map_err(|e| setup_err(format!("mkdir {}: {e}", dir.display())))?;
    Ok(dir)
}

/// Create the worker's cgroup(s) and return them with the `cgroup.procs` fds the child writes.
pub(crate) fn create(
    probe: &CgroupProbe,
    memory: Option<u64>,
    pids: Option<u64>,
) -> Result<(WorkerCgroup, Vec<OwnedFd>), SandboxError> {
    if let Some(parent) = &probe.v2_parent {
        let dir = new_dir(parent)?;
        let cg = WorkerCgroup {
            v2: true,
            memory_dir: Some(dir.clone()),
            pids_dir: Some(dir.clone()),
            removed: false,
        };
        let r = (|| {
            if let Some(m) = memory {
                write(&dir, "memory.max", &m.to_string())?;
                let _ = fs::write(dir.join("memory.swap.max"), "0");
            }
            if let Some(p) = pids {
                write(&dir, "pids.max", &p.to_string())?;
            }
            open_procs(&dir)
        })();
        return match r {
            Ok(fd) => Ok((cg, vec![fd])),
            Err(e) => {
                let _ = fs::remove_dir(&dir);
                Err(e)
            }
        };
    }
    let mut cg = WorkerCgroup {
        v2: false,
        memory_dir: None,
        pids_dir: None,
        removed: false,
    };
    let mut fds = Vec::new();
    let r = (|| {
        if let Some(parent) = &probe.v1_memory_parent {
            let dir = new_dir(parent)?;
            cg.memory_dir = Some(dir.clone());
            if let Some(m) = memory {
                write(&dir, "memory.limit_in_bytes", &m.to_string())?;
            }
            fds.push(open_procs(&dir)?);
        }
        if let Some(parent) = &probe.v1_pids_parent {
            let dir = new_dir(parent)?;
            cg.pids_dir = Some(dir.clone());
            if let Some(p) = pids {
                write(&dir, "pids.max", &p.to_string())?;
            }
            fds.push(open_procs(&dir)?);
        }
        Ok::<(), SandboxError>(())
    })();
    match r {
        Ok(()) => Ok((cg, fds)),
        Err(e) => {
            cg.remove();
            Err(e)
        }
    }
}

fn read_key(path: &Path, key: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

impl WorkerCgroup {
    /// Current OOM-kill and pids-limit counters.
    pub(crate) fn events(&self) -> LimitEvents {
        let oom_kills = self
            .memory_dir
            .as_ref()
            .and_then(|d| {
                if self.v2 {
                    read_key(&d.join("memory.events"), "oom_kill")
                } else {
                    read_key(&d.join("memory.oom_control"), "oom_kill")
                }
            })
            .unwrap_or(0);
        let pids_max_hits = self
            .pids_dir
            .as_ref()
            .and_then(|d| read_key(&d.join("pids.events"), "max"))
            .unwrap_or(0);
        LimitEvents {
            oom_kills,
            pids_max_hits,
        }
    }

    /// Kill whatever is left inside (orphaned grandchildren) and remove the directories.
    /// Directories that are still busy are left for the next sweep (no waiting here).
    pub(crate) fn remove(&mut self) {
        if self.removed {
            return;
        }
        let mut dirs: Vec<&PathBuf> = self.memory_dir.iter().collect();
        if let Some(p) = &self.pids_dir {
            if Some(p) != self.memory_dir.as_ref() {
                dirs.push(p);
            }
        }
        let mut all_gone = true;
        for d in dirs {
            let killed = kill_members(d, self.v2);
            let mut result = fs::remove_dir(d);
            if result
                .as_ref()
                .is_err_and(|e| e.raw_os_error() == Some(libc::EBUSY))
            {
                // A process just killed leaves its cgroup only once it has exited: wait for
                // those (briefly, bounded), then try once more.
                await_exits(&killed, 100);
                result = fs::remove_dir(d);
            }
            if let Err(e) = result {
                if e.kind() != std::io::ErrorKind::NotFound {
                    all_gone = false;
                    tracing::debug!(dir = %d.display(), error = %e, "cgroup still busy; left for the next sweep");
                }
            }
        }
        self.removed = all_gone;
    }
}

/// Kills every process in the cgroup; returns the pids it signalled (empty with `cgroup.kill`).
fn kill_members(dir: &Path, v2: bool) -> Vec<i32> {
    if v2 && fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return Vec::new();
    }
    let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    let pids: Vec<i32> = procs
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .collect();
    for pid in &pids {
        // SAFETY: kill(2) of a pid listed in our own worker cgroup.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    pids
}

/// Waits until each of `pids` has exited, at most `budget_ms` in all (pidfd + poll).
fn await_exits(pids: &[i32], budget_ms: i32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(budget_ms as u64);
    for pid in pids {
        // SAFETY: pidfd_open returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, *pid, 0) } as i32;
        if fd < 0 {
            continue; // already gone (ESRCH)
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on a descriptor we own, then close it.
        unsafe {
            libc::poll(&mut p, 1, left.as_millis() as i32);
            libc::close(fd);
        }
    }
}

/// Remove empty `capsule-<pid>-<n>` directories whose creating process is gone.
fn sweep_stale(parent: &Path) {
    let Ok(rd) = fs::read_dir(parent) else {
        return;
    };
    for ent in rd.flatten() {
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(CGROUP_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = fs::remove_dir(ent.path());
    }
}
