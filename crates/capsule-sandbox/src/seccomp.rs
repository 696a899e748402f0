//! The seccomp-bpf deny list, compiled with `seccompiler` (pure Rust) in the parent.
//!
//! Default action: allow. Matching syscalls fail with `EPERM` (the cell sees a normal
//! `PermissionError`), except `clone3`, which fails with `ENOSYS` so glibc falls back to
//! `clone(2)`, whose flags *can* be inspected (namespace flags are denied).

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use crate::SandboxError;

/// Syscalls denied outright (EPERM), with the reason a cell has no use for them.
pub const DENIED_SYSCALLS: &[(&str, i64)] = &[
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("kcmp", libc::SYS_kcmp),
    ("pidfd_getfd", libc::SYS_pidfd_getfd),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("reboot", libc::SYS_reboot),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("acct", libc::SYS_acct),
    ("quotactl", libc::SYS_quotactl),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("syslog", libc::SYS_syslog),
    ("vhangup", libc::SYS_vhangup),
    ("sethostname", libc::SYS_sethostname),
    ("setdomainname", libc::SYS_setdomainname),
    ("fanotify_init", libc::SYS_fanotify_init),
    #[cfg(target_arch = "x86_64")]
    ("iopl", libc::SYS_iopl),
    #[cfg(target_arch = "x86_64")]
    ("ioperm", libc::SYS_ioperm),
    #[cfg(target_arch = "x86_64")]
    ("modify_ldt", libc::SYS_modify_ldt),
    #[cfg(target_arch = "x86_64")]
    ("uselib", libc::SYS_uselib),
    #[cfg(target_arch = "x86_64")]
    ("ustat", libc::SYS_ustat),
    #[cfg(target_arch = "x86_64")]
    ("sysfs", libc::SYS_sysfs),
    #[cfg(target_arch = "x86_64")]
    ("_sysctl", libc::SYS__sysctl),
];

/// Namespace flags that `clone(2)` may not carry.
const CLONE_NS_FLAGS: &[i32] = &[
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNS,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWCGROUP,
];

fn cond(
    arg: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    val: u64,
) -> Result<SeccompCondition, SandboxError> {
    SeccompCondition::new(arg, len, op, val).map_err(bpf_err)
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, SandboxError> {
    SeccompRule::new(conds).map_err(bpf_err)
}

fn bpf_err(e: impl std::fmt::Display) -> SandboxError {
    SandboxError::Setup {
        layer: "seccomp",
        reason: e.to_string(),
    }
}

fn target_arch() -> Result<TargetArch, SandboxError> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|e| SandboxError::LayerUnavailable {
        layer: "seccomp",
        reason: format!("unsupported architecture {}: {e:?}", std::env::consts::ARCH),
    })
}

/// Compile the filters (applied in order in the child). `deny_inet`: deny every socket family
/// but `AF_UNIX` (the network policy is `none`). The programs depend only on `deny_inet` and the
/// architecture, so each variant is compiled once per process (≈ 0.1 ms saved per worker).
pub fn compile(deny_inet: bool) -> Result<Vec<BpfProgram>, SandboxError> {
    static CACHE: [std::sync::OnceLock<Result<Vec<BpfProgram>, String>>; 2] =
        [std::sync::OnceLock::new(), std::sync::OnceLock::new()];
    CACHE[usize::from(deny_inet)]
        .get_or_init(|| compile_uncached(deny_inet).map_err(|e| e.to_string()))
        .clone()
        .map_err(|reason| SandboxError::Setup {
            layer: "seccomp",
            reason,
        })
}

fn compile_uncached(deny_inet: bool) -> Result<Vec<BpfProgram>, SandboxError> {
    use SeccompCmpArgLen::{Dword, Qword};
    let arch = target_arch()?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (_, nr) in DENIED_SYSCALLS {
        rules.insert(*nr, Vec::new());
    }
    // clone(2) with any namespace flag.
    let mut clone_rules = Vec::new();
    for f in CLONE_NS_FLAGS {
        let f = *f as u64;
        clone_rules.push(rule(vec![cond(0, Qword, SeccompCmpOp::MaskedEq(f), f)?])?);
    }
    rules.insert(libc::SYS_clone, clone_rules);
    // personality(2): only queries and the default persona.
    rules.insert(
        libc::SYS_personality,
        vec![rule(vec![
            cond(0, Dword, SeccompCmpOp::Ne, 0)?,
            cond(0, Dword, SeccompCmpOp::Ne, 0xffff_ffff)?,
        ])?],
    );
    // Terminal injection.
    rules.insert(
        libc::SYS_ioctl,
        vec![
            rule(vec![cond(1, Dword, SeccompCmpOp::Eq, libc::TIOCSTI)?])?,
            rule(vec![cond(1, Dword, SeccompCmpOp::Eq, libc::TIOCLINUX)?])?,
        ],
    );
    if deny_inet {
        for nr in [libc::SYS_socket, libc::SYS_socketpair] {
            rules.insert(
                nr,
                vec![rule(vec![cond(
                    0,
                    Dword,
                    SeccompCmpOp::Ne,
                    libc::AF_UNIX as u64,
                )?])?],
            );
        }
    }
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(bpf_err)?;
    let deny: BpfProgram = deny.try_into().map_err(bpf_err)?;

    let mut clone3 = BTreeMap::new();
    clone3.insert(libc::SYS_clone3, Vec::new());
    let clone3 = SeccompFilter::new(
        clone3,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(bpf_err)?;
    let clone3: BpfProgram = clone3.try_into().map_err(bpf_err)?;

    let mut out = vec![deny, clone3];
    if let Some(x32) = x32_filter() {
        out.push(x32);
    }
    Ok(out)
}

/// On x86_64, deny every x32-ABI syscall number (bit 30), so a denied syscall cannot be
/// reached through its x32 alias on kernels built with `CONFIG_X86_X32_ABI`.
fn x32_filter() -> Option<BpfProgram> {
    if !cfg!(target_arch = "x86_64") {
        return None;
    }
    const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const BPF_JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
    const BPF_RET_K: u16 = 0x06;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let ins = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    Some(vec![
        // A = seccomp_data.nr (offset 0)
        ins(BPF_LD_W_ABS, 0, 0, 0),
        ins(BPF_JSET_K, 0, 1, 0x4000_0000),
        ins(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | libc::EPERM as u32),
        ins(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpf_compiles_for_this_arch() {
        let progs = compile(true).expect("compile");
        assert!(progs.len() >= 2);
        for p in &progs {
            assert!(!p.is_empty());
            assert!(p.len() < 4096, "BPF program too long: {}", p.len());
        }
        let without_net = compile(false).expect("compile");
        assert!(without_net[0].len() < progs[0].len());
        // Cached per variant: the same programs again, and the same as a fresh compile.
        let fresh = compile_uncached(true).expect("compile");
        let again = compile(true).expect("compile");
        assert_eq!(again.len(), fresh.len());
        for (a, b) in again.iter().zip(&fresh) {
            let raw = |p: &BpfProgram| {
                p.iter()
                    .map(|i| (i.code, i.jt, i.jf, i.k))
                    .collect::<Vec<_>>()
            };
            assert_eq!(raw(a), raw(b));
        }
    }

    #[test]
    fn deny_list_has_no_duplicates() {
        let mut nrs: Vec<i64> = DENIED_SYSCALLS.iter().map(|(_, n)| *n).collect();
        nrs.sort_unstable();
        let before = nrs.len();
        nrs.dedup();
        assert_eq!(before, nrs.len());
    }
}
