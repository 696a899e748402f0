//! What the figures were measured on: CPU, cores, kernel, Python, Capsule commit; and CPU
//! pinning for the pinned variants.

use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

/// Machine and version facts printed with every table.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// CPUs this process may run on.
    pub cores: usize,
    /// `uname -r`.
    pub kernel: String,
    /// Python version of the workers (from the session's handshake).
    pub python: String,
    /// Interpreter binary used by Capsule, the floor and `-c pass` (shims resolved).
    pub python_executable: String,
    /// `git rev-parse --short HEAD` of the Capsule checkout, `+dirty` when it has changes.
    pub capsule_commit: String,
    /// Build profile of this binary (`release` or `debug`).
    pub profile: String,
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

fn cmd_out(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Collects the machine facts; `python`/`exe` come from a live session.
pub fn probe(python: &str, exe: &Path) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| first_line(&s))
        .unwrap_or_default();
    let repo = env!("CARGO_MANIFEST_DIR");
    let commit = cmd_out("git", &["-C", repo, "rev-parse", "--short", "HEAD"])
        .map(|s| first_line(&s))
        .unwrap_or_else(|| "unknown".into());
    let dirty = cmd_out(
        "git",
        &["-C", repo, "status", "--porcelain", "--untracked-files=no"],
    )
    .map(|s| !s.trim().is_empty())
    .unwrap_or(false);
    Machine {
        cpu_model,
        cores,
        kernel,
        python: python.to_string(),
        python_executable: exe.display().to_string(),
        capsule_commit: if dirty {
            format!("{commit}+dirty")
        } else {
            commit
        },
        profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
        .into(),
    }
}

/// Restricts the calling thread — and so every thread and process created after it — to `cpu`.
/// Called first thing in a child bench process, this is `taskset -c <cpu>` on the whole process:
/// the tokio threads, the Capsule worker and the floor worker all inherit the mask.
pub fn pin_to(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write into it, and
    // sched_setaffinity reads it for the duration of the call.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// VmRSS of this process in bytes, from /proc/self/status.
pub fn self_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}
