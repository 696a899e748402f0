//! Typed kill reasons and how an exit status is classified.
//!
//! Heuristics (documented in docs/security.md):
//! - `SIGXCPU` → [`KillReason::CpuLimit`]: the soft `RLIMIT_CPU` is set one second below the
//!   hard one, so the kernel first sends `SIGXCPU`, which CPython does not handle.
//! - `SIGKILL` with the cgroup's OOM-kill counter above its value at spawn → [`KillReason::Oom`].
//! - `SIGKILL` with the worker's CPU time (when the caller has it, e.g. from `wait4` rusage) at or
//!   above the CPU limit → [`KillReason::CpuLimit`] (the hard limit, after a cell ignored
//!   `SIGXCPU`).
//! - `SIGXFSZ` → [`KillReason::FileSize`].
//! - Death by signal or a non-zero exit while the cgroup's `pids.max` counter grew →
//!   [`KillReason::PidsLimit`] (only when nothing above matched).
//! - Any other signal → [`KillReason::Signal`]. A normal exit → `None`.
//! - [`KillReason::WallClock`] is never produced here: the session sets it when its deadline
//!   fired, since only it knows that it sent the kill.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use crate::cgroup::LimitEvents;

/// Why the sandbox (or the session) ended a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[non_exhaustive]
pub enum KillReason {
    /// Out of memory: killed by the cgroup OOM killer.
    Oom,
    /// CPU-time limit (`RLIMIT_CPU`).
    CpuLimit,
    /// Wall-clock deadline (set by the session).
    WallClock,
    /// Process limit reached (cgroup `pids.max` / `RLIMIT_NPROC`).
    PidsLimit,
    /// File-size limit (`RLIMIT_FSIZE`, `SIGXFSZ`).
    FileSize,
    /// Killed by this signal for another reason.
    Signal(i32),
}

impl KillReason {
    /// Wire name used in `killed {reason}` outcomes.
    pub fn as_str(&self) -> &'static str {
        match self {
            KillReason::Oom => "oom",
            KillReason::CpuLimit => "cpu_limit",
            KillReason::WallClock => "wall_clock",
            KillReason::PidsLimit => "pids_limit",
            KillReason::FileSize => "file_size",
            KillReason::Signal(_) => "signal",
        }
    }
}

impl std::fmt::Display for KillReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KillReason::Signal(n) => write!(f, "signal {n}"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// Pure classification from the facts (unit-testable without spawning anything).
pub(crate) fn classify(
    status: ExitStatus,
    before: LimitEvents,
    after: LimitEvents,
    cpu_limit: Option<u64>,
    cpu_used: Option<Duration>,
) -> Option<KillReason> {
    let pids_hit = after.pids_max_hits > before.pids_max_hits;
    match status.signal() {
        Some(libc::SIGXCPU) => Some(KillReason::CpuLimit),
        Some(libc::SIGXFSZ) => Some(KillReason::FileSize),
        Some(libc::SIGKILL) => {
            if after.oom_kills > before.oom_kills {
                Some(KillReason::Oom)
            } else if matches!((cpu_limit, cpu_used), (Some(l), Some(u)) if u.as_secs() >= l) {
                Some(KillReason::CpuLimit)
            } else if pids_hit {
                Some(KillReason::PidsLimit)
            } else {
                Some(KillReason::Signal(libc::SIGKILL))
            }
        }
        Some(sig) => Some(if pids_hit {
            KillReason::PidsLimit
        } else {
            KillReason::Signal(sig)
        }),
        None => {
            if status.success() || !pids_hit {
                None
            } else {
                Some(KillReason::PidsLimit)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(n: i32) -> ExitStatus {
        ExitStatus::from_raw(n)
    }
    fn code(n: i32) -> ExitStatus {
        ExitStatus::from_raw(n << 8)
    }
    const Z: LimitEvents = LimitEvents {
        oom_kills: 0,
        pids_max_hits: 0,
    };

    #[test]
    fn classification() {
        let oom = LimitEvents {
            oom_kills: 1,
            pids_max_hits: 0,
        };
        let pids = LimitEvents {
            oom_kills: 0,
            pids_max_hits: 3,
        };
        assert_eq!(classify(code(0), Z, Z, None, None), None);
        assert_eq!(classify(code(1), Z, Z, None, None), None);
        assert_eq!(
            classify(code(1), Z, pids, None, None),
            Some(KillReason::PidsLimit)
        );
        assert_eq!(
            classify(sig(libc::SIGXCPU), Z, Z, None, None),
            Some(KillReason::CpuLimit)
        );
        assert_eq!(
            classify(sig(libc::SIGXFSZ), Z, Z, None, None),
            Some(KillReason::FileSize)
        );
        assert_eq!(
            classify(sig(libc::SIGKILL), Z, oom, None, None),
            Some(KillReason::Oom)
        );
        assert_eq!(
            classify(sig(libc::SIGKILL), oom, oom, None, None),
            Some(KillReason::Signal(9))
        );
        assert_eq!(
            classify(
                sig(libc::SIGKILL),
                Z,
                Z,
                Some(2),
                Some(Duration::from_millis(2100))
            ),
            Some(KillReason::CpuLimit)
        );
        assert_eq!(
            classify(
                sig(libc::SIGKILL),
                Z,
                Z,
                Some(2),
                Some(Duration::from_millis(100))
            ),
            Some(KillReason::Signal(9))
        );
        assert_eq!(
            classify(sig(libc::SIGSEGV), Z, Z, None, None),
            Some(KillReason::Signal(11))
        );
    }

    #[test]
    fn wire_names() {
        assert_eq!(KillReason::Oom.as_str(), "oom");
        assert_eq!(KillReason::CpuLimit.as_str(), "cpu_limit");
        assert_eq!(KillReason::WallClock.as_str(), "wall_clock");
        assert_eq!(KillReason::PidsLimit.as_str(), "pids_limit");
        assert_eq!(KillReason::FileSize.as_str(), "file_size");
        assert_eq!(KillReason::Signal(2).as_str(), "signal");
        assert_eq!(KillReason::Signal(2).to_string(), "signal 2");
    }
}
