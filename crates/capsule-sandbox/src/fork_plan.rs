//! The child plan as data, for a worker that is *forked* from a warm template instead of
//! spawned (the pool's fork server).
//!
//! A spawned worker gets its layers from the `pre_exec` hook ([`crate::child`]). A forked worker
//! never passes through our Rust code: the template (a Python process) forks it. So the very
//! same plan that [`crate::prepare`] built is serialised here, with the descriptors it needs
//! (the report pipe, the Landlock ruleset) passed alongside by `SCM_RIGHTS`, and the worker's
//! `capsule_worker.confine` module applies it in the forked child with the same steps, in the
//! same order, reporting failures on the same pipe in the same 8-byte records. Syscall numbers,
//! step numbers and flag values all come from here, so the Python side holds no
//! architecture-specific constants.
//!
//! The per-worker cgroup is joined by the host, by pid, as for a spawned worker.

use std::os::fd::OwnedFd;

use serde::Serialize;

use crate::child::{ChildPlan, Step};

/// A serialised child plan and the descriptors it refers to (by index).
#[derive(Debug)]
pub struct ForkPlan {
    /// The plan as JSON (see `python/capsule_worker/confine.py` in `capsule-worker`).
    pub json: String,
    /// Descriptors the plan refers to by index: send them with the fork request.
    pub fds: Vec<OwnedFd>,
}

#[derive(Serialize)]
struct Wire {
    version: u32,
    /// Step name → the number its failure records carry.
    steps: [(&'static str, u8); 9],
    /// Bit `1 << step` set: the step is required (failure is fatal).
    required: u32,
    /// Index into the descriptors of the report pipe's write end.
    report: Option<usize>,
    rlimits: Vec<(u32, u64, u64)>,
    clear_groups: bool,
    drop_to: Option<(u32, u32)>,
    unshare: i32,
    id_maps: Option<IdMapsWire>,
    shm: Option<ShmWire>,
    nproc: Option<(u32, u64, u64)>,
    no_new_privs: bool,
    /// Index into the descriptors of the Landlock ruleset.
    landlock: Option<usize>,
    /// Each BPF program as hex of its raw `struct sock_filter` array (native byte order).
    seccomp: Vec<String>,
    sys: SysWire,
    consts: ConstsWire,
}

#[derive(Serialize)]
struct IdMapsWire {
    uid: String,
    gid: String,
}

#[derive(Serialize)]
struct ShmWire {
    target: String,
    data: String,
    flags: libc::c_ulong,
    /// Landlock access bits to grant beneath the new tmpfs (None: no rule).
    rule: Option<u64>,
}

#[derive(Serialize)]
struct SysWire {
    landlock_add_rule: i64,
    landlock_restrict_self: i64,
    seccomp: i64,
}

#[derive(Serialize)]
struct ConstsWire {
    clone_newuser: i32,
    clone_newns: i32,
    rlim_infinity: u64,
    pr_set_dumpable: i32,
    pr_set_no_new_privs: i32,
    seccomp_set_mode_filter: u32,
    o_path: i32,
    o_directory: i32,
    o_cloexec: i32,
}

fn hex(bytes: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(D[usize::from(b >> 4)] as char);
        s.push(D[usize::from(b & 15)] as char);
    }
    s
}

/// Serialise `plan` (consumed: its descriptors move into the result).
pub(crate) fn serialise(mut plan: ChildPlan) -> ForkPlan {
    let mut fds = Vec::new();
    let mut take = |fd: Option<OwnedFd>| {
        fd.map(|fd| {
            fds.push(fd);
            fds.len() - 1
        })
    };
    let report = take(plan.report.take());
    let landlock = take(plan.landlock.take());
    let rl = |r: &crate::child::Rlimit| (r.resource, r.cur, r.max);
    let seccomp = plan
        .seccomp
        .iter()
        .map(|prog| {
            let mut raw = Vec::with_capacity(prog.len() * 8);
            for ins in prog {
                raw.extend_from_slice(&ins.code.to_ne_bytes());
                raw.push(ins.jt);
                raw.push(ins.jf);
                raw.extend_from_slice(&ins.k.to_ne_bytes());
            }
            hex(&raw)
        })
        .collect();
    let text = |c: &std::ffi::CString| c.to_string_lossy().into_owned();
    let wire = Wire {
        version: 1,
        steps: [
            ("rlimits", Step::Rlimits as u8),
            ("drop_uid", Step::DropUid as u8),
            ("unshare", Step::Unshare as u8),
            ("id_maps", Step::IdMaps as u8),
            ("shm_tmpfs", Step::ShmTmpfs as u8),
            ("nproc", Step::Nproc as u8),
            ("no_new_privs", Step::NoNewPrivs as u8),
            ("landlock", Step::Landlock as u8),
            ("seccomp", Step::Seccomp as u8),
        ],
        required: plan.required,
        report,
        rlimits: plan.rlimits.iter().map(rl).collect(),
        clear_groups: plan.clear_groups,
        drop_to: plan.drop_to,
        unshare: plan.unshare_flags,
        id_maps: plan.id_maps.as_ref().map(|m| IdMapsWire {
            uid: String::from_utf8_lossy(&m.uid_line).into_owned(),
            gid: String::from_utf8_lossy(&m.gid_line).into_owned(),
        }),
        shm: plan.shm_tmpfs.as_ref().map(|t| ShmWire {
            target: text(&t.target),
            data: text(&t.data),
            flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            rule: plan.shm_rule.as_ref().map(|r| r.access),
        }),
        nproc: plan.nproc.as_ref().map(rl),
        no_new_privs: plan.no_new_privs,
        landlock,
        seccomp,
        sys: SysWire {
            landlock_add_rule: libc::SYS_landlock_add_rule,
            landlock_restrict_self: libc::SYS_landlock_restrict_self,
            seccomp: libc::SYS_seccomp,
        },
        consts: ConstsWire {
            clone_newuser: libc::CLONE_NEWUSER,
            clone_newns: libc::CLONE_NEWNS,
            rlim_infinity: libc::RLIM_INFINITY,
            pr_set_dumpable: libc::PR_SET_DUMPABLE,
            pr_set_no_new_privs: libc::PR_SET_NO_NEW_PRIVS,
            seccomp_set_mode_filter: libc::SECCOMP_SET_MODE_FILTER,
            o_path: libc::O_PATH,
            o_directory: libc::O_DIRECTORY,
            o_cloexec: libc::O_CLOEXEC,
        },
    };
    // Serialising plain data (strings, integers, vectors) cannot fail.
    let json = serde_json::to_string(&wire).unwrap_or_default();
    ForkPlan { json, fds }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase_pairs() {
        assert_eq!(hex(&[0, 1, 0xab, 0xff]), "0001abff");
    }

    #[test]
    fn an_empty_plan_serialises_with_no_descriptors() {
        let p = serialise(ChildPlan::default());
        assert!(p.fds.is_empty());
        let v: serde_json::Value = serde_json::from_str(&p.json).expect("json");
        assert_eq!(v["version"], 1);
        assert_eq!(v["unshare"], 0);
        assert!(v["report"].is_null());
        assert!(v["seccomp"].as_array().is_some_and(|a| a.is_empty()));
        // Step numbers are the ones the failure records carry.
        assert_eq!(
            v["steps"][0],
            serde_json::json!(["rlimits", Step::Rlimits as u8])
        );
    }
}
