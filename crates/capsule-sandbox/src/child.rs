//! The pre-exec hook: runs in the forked child, between `fork` and `execve`.
//!
//! Everything here must be async-signal-safe because the host is a multi-threaded tokio
//! process: no allocation, no locks, no `std::io` formatting, only raw syscalls on data that
//! [`crate::prepare`] built in the parent. Failures are reported to the parent through a
//! CLOEXEC pipe as fixed 8-byte records (step, fatal, errno); the parent reads them in
//! [`crate::Prepared::after_spawn`] and [`crate::Prepared::explain_spawn_error`].

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};

use seccompiler::BpfProgram;

/// Steps of the hook, in the order they run. Values go over the report pipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Step {
    Cgroup = 1,
    Rlimits = 2,
    DropUid = 3,
    Unshare = 4,
    IdMaps = 5,
    ShmTmpfs = 6,
    Nproc = 7,
    NoNewPrivs = 8,
    Landlock = 9,
    Seccomp = 10,
}

impl Step {
    pub(crate) fn from_u8(v: u8) -> Option<Step> {
        Some(match v {
            1 => Step::Cgroup,
            2 => Step::Rlimits,
            3 => Step::DropUid,
            4 => Step::Unshare,
            5 => Step::IdMaps,
            6 => Step::ShmTmpfs,
            7 => Step::Nproc,
            8 => Step::NoNewPrivs,
            9 => Step::Landlock,
            10 => Step::Seccomp,
            _ => return None,
        })
    }

    /// Layer name the step belongs to (as in [`crate::LayerStatus::name`]).
    pub(crate) fn layer(self) -> &'static str {
        match self {
            Step::Cgroup => "cgroup",
            Step::Rlimits | Step::Nproc => "rlimits",
            Step::DropUid => "unprivileged_uid",
            Step::Unshare | Step::IdMaps => "user_ns",
            Step::ShmTmpfs => "mount_ns",
            Step::NoNewPrivs => "no_new_privs",
            Step::Landlock => "landlock",
            Step::Seccomp => "seccomp",
        }
    }

    fn bit(self) -> u32 {
        1 << (self as u8)
    }
}

/// One rlimit to set.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rlimit {
    pub resource: libc::__rlimit_resource_t,
    pub cur: u64,
    pub max: u64,
}

/// `/proc/self/{setgroups,uid_map,gid_map}` writes, prepared in the parent.
#[derive(Debug)]
pub(crate) struct IdMaps {
    pub setgroups_path: CString,
    pub uid_map_path: CString,
    pub gid_map_path: CString,
    pub uid_line: Vec<u8>,
    pub gid_line: Vec<u8>,
}

/// A private tmpfs mount (for `/dev/shm`, so POSIX semaphores work without sharing the host's).
#[derive(Debug)]
pub(crate) struct TmpfsMount {
    pub source: CString,
    pub target: CString,
    pub fstype: CString,
    pub data: CString,
}

/// A Landlock path-beneath rule added in the child, for a path that only exists there (the
/// private `/dev/shm` tmpfs: a rule on the host's `/dev/shm` would sit on a covered mount
/// point, which Landlock ignores).
#[derive(Debug)]
pub(crate) struct ChildRule {
    pub path: CString,
    pub access: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// Everything the child needs, built in the parent. Moved into the `pre_exec` closure.
#[derive(Debug, Default)]
pub(crate) struct ChildPlan {
    pub report: Option<OwnedFd>,
    pub required: u32,
    pub cgroup_procs: Vec<OwnedFd>,
    pub rlimits: Vec<Rlimit>,
    pub clear_groups: bool,
    pub drop_to: Option<(libc::uid_t, libc::gid_t)>,
    pub unshare_flags: libc::c_int,
    pub id_maps: Option<IdMaps>,
    pub shm_tmpfs: Option<TmpfsMount>,
    pub shm_rule: Option<ChildRule>,
    pub nproc: Option<Rlimit>,
    pub no_new_privs: bool,
    pub landlock: Option<OwnedFd>,
    pub seccomp: Vec<BpfProgram>,
}

impl ChildPlan {
    pub(crate) fn require(&mut self, step: Step) {
        self.required |= step.bit();
    }

    fn errno() -> i32 {
        // SAFETY: __errno_location returns this thread's errno slot; reading it is safe.
        unsafe { *libc::__errno_location() }
    }

    /// Report a failed step; returns `Err` if the step was required.
    fn fail(&self, step: Step, errno: i32) -> Result<(), i32> {
        let fatal = self.required & step.bit() != 0;
        if let Some(fd) = &self.report {
            let e = errno.to_ne_bytes();
            let rec = [step as u8, u8::from(fatal), 0, 0, e[0], e[1], e[2], e[3]];
            // SAFETY: write(2) of an 8-byte stack buffer to our CLOEXEC pipe; atomic (< PIPE_BUF).
            unsafe { libc::write(fd.as_raw_fd(), rec.as_ptr().cast(), rec.len()) };
        }
        if fatal {
            Err(errno)
        } else {
            Ok(())
        }
    }

    /// Write a whole buffer to a path (no allocation: the path is a prepared CString).
    fn write_file(path: &CString, data: &[u8]) -> Result<(), i32> {
        // SAFETY: open/write/close on a NUL-terminated path and a borrowed buffer.
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(Self::errno());
            }
            let n = libc::write(fd, data.as_ptr().cast(), data.len());
            let e = Self::errno();
            libc::close(fd);
            if n != data.len() as isize {
                return Err(if n < 0 { e } else { libc::EIO });
            }
        }
        Ok(())
    }

    /// `landlock_add_rule(PATH_BENEATH)` for a path opened here, in the child.
    fn add_rule(ruleset: &OwnedFd, rule: &ChildRule) -> Result<(), i32> {
        // SAFETY: open(O_PATH) of a prepared NUL-terminated path; landlock_add_rule with a
        // packed stack struct matching `struct landlock_path_beneath_attr`; close of our fd.
        unsafe {
            let fd = libc::open(
                rule.path.as_ptr(),
                libc::O_PATH | libc::O_CLOEXEC | libc::O_DIRECTORY,
            );
            if fd < 0 {
                return Err(Self::errno());
            }
            let attr = PathBeneathAttr {
                allowed_access: rule.access,
                parent_fd: fd,
            };
            let rc = libc::syscall(
                libc::SYS_landlock_add_rule,
                ruleset.as_raw_fd(),
                1u32, /* LANDLOCK_RULE_PATH_BENEATH */
                &attr as *const PathBeneathAttr,
                0u32,
            );
            let e = Self::errno();
            libc::close(fd);
            if rc != 0 {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Apply every layer. Runs in the child after `fork`, before `execve`.
    ///
    /// Async-signal-safe: only raw syscalls on prepared data; returns the errno of the first
    /// required step that failed.
    pub(crate) fn apply(&self) -> Result<(), i32> {
        // 1. cgroup membership first, while still privileged: "0" moves the writer itself.
        for fd in &self.cgroup_procs {
            // SAFETY: write(2) of a static byte string to a prepared cgroup.procs fd.
            let n = unsafe { libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) };
            if n != 1 {
                self.fail(Step::Cgroup, Self::errno())?;
            }
        }
        // 2. rlimits (all but NPROC, which must follow the user namespace: see below).
        for r in &self.rlimits {
            let lim = libc::rlimit {
                rlim_cur: r.cur,
                rlim_max: r.max,
            };
            // SAFETY: setrlimit with a stack struct.
            if unsafe { libc::setrlimit(r.resource, &lim) } != 0 {
                self.fail(Step::Rlimits, Self::errno())?;
            }
        }
        // 3. identity: drop supplementary groups, then gid, then uid; keep /proc/self writable.
        if self.clear_groups {
            // SAFETY: setgroups(0, NULL) clears supplementary groups.
            if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
                self.fail(Step::DropUid, Self::errno())?;
            }
        }
        if let Some((uid, gid)) = self.drop_to {
            // SAFETY: plain credential syscalls.
            let ok = unsafe {
                libc::setresgid(gid, gid, gid) == 0 && libc::setresuid(uid, uid, uid) == 0
            };
            if ok {
                // SAFETY: prctl with integer args. A uid change clears "dumpable", which would
                // make /proc/self/* root-owned and the id maps unwritable.
                unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
            } else {
                self.fail(Step::DropUid, Self::errno())?;
            }
        }
        // 4. namespaces.
        let mut in_userns = false;
        if self.unshare_flags != 0 {
            // SAFETY: unshare(2) with prepared flags.
            if unsafe { libc::unshare(self.unshare_flags) } != 0 {
                self.fail(Step::Unshare, Self::errno())?;
            } else {
                in_userns = self.unshare_flags & libc::CLONE_NEWUSER != 0;
            }
        }
        let mut maps_ok = false;
        if in_userns {
            if let Some(m) = &self.id_maps {
                let r = Self::write_file(&m.setgroups_path, b"deny")
                    .and_then(|()| Self::write_file(&m.uid_map_path, &m.uid_line))
                    .and_then(|()| Self::write_file(&m.gid_map_path, &m.gid_line));
                match r {
                    Ok(()) => maps_ok = true,
                    Err(e) => self.fail(Step::IdMaps, e)?,
                }
            }
        }
        // 5. private /dev/shm (needs the new mount namespace and its user namespace's caps).
        if let Some(t) = &self.shm_tmpfs {
            if in_userns && maps_ok && self.unshare_flags & libc::CLONE_NEWNS != 0 {
                // SAFETY: mount(2) with prepared NUL-terminated strings.
                let rc = unsafe {
                    libc::mount(
                        t.source.as_ptr(),
                        t.target.as_ptr(),
                        t.fstype.as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                        t.data.as_ptr().cast(),
                    )
                };
                if rc != 0 {
                    self.fail(Step::ShmTmpfs, Self::errno())?;
                } else if let (Some(rule), Some(ruleset)) = (&self.shm_rule, &self.landlock) {
                    if let Err(e) = Self::add_rule(ruleset, rule) {
                        self.fail(Step::ShmTmpfs, e)?;
                    }
                }
            }
        }
        // 6. RLIMIT_NPROC after the user namespace exists: the new namespace's per-uid count
        //    is checked against it, while its parent levels keep the creator's (larger) limit.
        if let Some(r) = &self.nproc {
            let lim = libc::rlimit {
                rlim_cur: r.cur,
                rlim_max: r.max,
            };
            // SAFETY: setrlimit with a stack struct.
            if unsafe { libc::setrlimit(r.resource, &lim) } != 0 {
                self.fail(Step::Nproc, Self::errno())?;
            }
        }
        // 7. no_new_privs (also a precondition of unprivileged Landlock and seccomp).
        if self.no_new_privs {
            // SAFETY: prctl with integer args.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                self.fail(Step::NoNewPrivs, Self::errno())?;
            }
        }
        // 8. Landlock.
        if let Some(fd) = &self.landlock {
            // SAFETY: landlock_restrict_self(ruleset_fd, 0) on a ruleset fd built in the parent.
            let rc =
                unsafe { libc::syscall(libc::SYS_landlock_restrict_self, fd.as_raw_fd(), 0u32) };
            if rc != 0 {
                self.fail(Step::Landlock, Self::errno())?;
            }
        }
        // 9. seccomp last: it denies unshare/mount that the steps above needed.
        for prog in &self.seccomp {
            let fprog = libc::sock_fprog {
                len: prog.len() as libc::c_ushort,
                filter: prog.as_ptr() as *mut libc::sock_filter,
            };
            // SAFETY: seccomp(SET_MODE_FILTER) with a pointer to a prepared BPF program that
            // outlives the call; seccompiler's sock_filter has libc's layout (repr(C), same
            // fields).
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0u32,
                    &fprog as *const libc::sock_fprog,
                )
            };
            if rc != 0 {
                self.fail(Step::Seccomp, Self::errno())?;
                break;
            }
        }
        Ok(())
    }
}

/// A failure record read back from the report pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StepFailure {
    pub step: Step,
    pub fatal: bool,
    pub errno: i32,
}

/// Drain the (non-blocking) report pipe.
pub(crate) fn read_reports(fd: &OwnedFd) -> Vec<StepFailure> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8];
    loop {
        // SAFETY: read into a stack buffer from our own non-blocking pipe end.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n != 8 {
            break;
        }
        if let Some(step) = Step::from_u8(buf[0]) {
            out.push(StepFailure {
                step,
                fatal: buf[1] != 0,
                errno: i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]),
            });
        }
    }
    out
}
