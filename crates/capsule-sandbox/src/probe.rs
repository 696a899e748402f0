//! Kernel probe: what this machine supports, per layer, with reasons. Run once per process
//! ([`probe`] caches it in a `OnceLock`); `capsule doctor` prints it (`Probe::to_json`).
//!
//! The namespace probe forks a short-lived child that only calls `unshare(2)` and `_exit(2)`
//! (async-signal-safe, so it is sound in a multi-threaded host).

use std::fs;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::Serialize;

/// One layer as the kernel offers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProbedLayer {
    /// Layer name (same names as [`crate::Layers`] fields).
    pub name: &'static str,
    /// Whether the layer can be applied here.
    pub available: bool,
    /// Why (kernel version, errno, paths found).
    pub detail: String,
}

/// Cgroup facilities found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CgroupProbe {
    /// A v2 directory under which per-worker children with `memory` and `pids` can be created.
    pub v2_parent: Option<PathBuf>,
    /// v1 memory hierarchy directory of this process, writable.
    pub v1_memory_parent: Option<PathBuf>,
    /// v1 pids hierarchy directory of this process, writable.
    pub v1_pids_parent: Option<PathBuf>,
}

/// What this kernel supports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Probe {
    /// `uname -r`.
    pub kernel: String,
    /// CPU architecture.
    pub arch: &'static str,
    /// Effective uid of the host process.
    pub euid: u32,
    /// Landlock ABI version, if Landlock is enabled.
    pub landlock_abi: Option<i32>,
    /// Cgroup directories usable for per-worker cgroups.
    pub cgroup: CgroupProbe,
    /// Current hard limits (they cannot be raised without `CAP_SYS_RESOURCE`).
    pub hard_limits: Vec<(String, Option<u64>)>,
    /// Every layer with availability and reason.
    pub layers: Vec<ProbedLayer>,
}

impl Probe {
    /// The probed layer of that name.
    pub fn layer(&self, name: &str) -> Option<&ProbedLayer> {
        self.layers.iter().find(|l| l.name == name)
    }

    /// `true` if the named layer is available.
    pub fn available(&self, name: &str) -> bool {
        self.layer(name).is_some_and(|l| l.available)
    }

    /// JSON for `capsule doctor --json`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

static PROBE: OnceLock<Probe> = OnceLock::new();

/// Probe the kernel (cached for the life of the process).
pub fn probe() -> &'static Probe {
    PROBE.get_or_init(run_probe)
}

fn layer(name: &'static str, available: bool, detail: impl Into<String>) -> ProbedLayer {
    ProbedLayer {
        name,
        available,
        detail: detail.into(),
    }
}

fn errno_str(e: i32) -> String {
    std::io::Error::from_raw_os_error(e).to_string()
}

fn run_probe() -> Probe {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let mut layers = Vec::new();

    // Namespaces.
    let ns = probe_namespaces();
    let user_ok = ns.errnos[0] == 0;
    layers.push(layer(
        "user_ns",
        user_ok,
        if user_ok {
            "unshare(CLONE_NEWUSER) works".to_string()
        } else {
            format!(
                "unshare(CLONE_NEWUSER) failed: {} (user namespaces disabled, restricted by AppArmor/sysctl, or blocked by a container seccomp profile)",
                errno_str(ns.errnos[0])
            )
        },
    ));
    for (i, (name, flag)) in NS_FLAGS.iter().enumerate() {
        let e = ns.errnos[i + 1];
        layers.push(layer(
            name,
            e == 0,
            if e == 0 {
                format!(
                    "unshare({flag}) works{}",
                    if user_ok {
                        " inside a user namespace"
                    } else {
                        " (privileged)"
                    }
                )
            } else {
                format!("unshare({flag}) failed: {}", errno_str(e))
            },
        ));
    }
    layers.push(layer(
        "pid_ns",
        false,
        "not implemented by capsule-sandbox: a pid namespace needs an init process between the host and the worker; Landlock signal scoping + seccomp ptrace denial cover the gap (docs/security.md)",
    ));

    // Landlock.
    // SAFETY: landlock_create_ruleset with NULL attr, size 0 and the VERSION flag only returns
    // the ABI version; it creates no fd.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32, /* LANDLOCK_CREATE_RULESET_VERSION */
        )
    };
    let (landlock_abi, ll_reason) = if abi > 0 {
        (Some(abi as i32), format!("Landlock ABI {abi}"))
    } else {
        let e = std::io::Error::last_os_error();
        let why = match e.raw_os_error() {
            Some(libc::ENOSYS) => "kernel built without Landlock (ENOSYS)".to_string(),
            Some(libc::EOPNOTSUPP) => {
                "Landlock compiled in but not enabled at boot (add `landlock` to lsm=)".to_string()
            }
            _ => format!("landlock_create_ruleset failed: {e}"),
        };
        (None, why)
    };
    let v = landlock_abi.unwrap_or(0);
    layers.push(layer("landlock", v >= 1, ll_reason.clone()));
    layers.push(layer(
        "landlock_net",
        v >= 4,
        if v >= 4 {
            format!("TCP bind/connect rules (ABI {v} ≥ 4)")
        } else {
            format!("needs Landlock ABI ≥ 4 (kernel ≥ 6.7); {ll_reason}")
        },
    ));
    layers.push(layer(
        "landlock_scope",
        v >= 6,
        if v >= 6 {
            format!("signal + abstract-unix-socket scoping (ABI {v} ≥ 6)")
        } else {
            format!("needs Landlock ABI ≥ 6 (kernel ≥ 6.12); {ll_reason}")
        },
    ));

    // seccomp.
    // SAFETY: PR_GET_SECCOMP only reads the calling thread's seccomp mode.
    let sc = unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) };
    let actions = fs::read_to_string("/proc/sys/kernel/seccomp/actions_avail").unwrap_or_default();
    let seccomp_ok = sc >= 0 && (actions.is_empty() || actions.contains("errno"));
    layers.push(layer(
        "seccomp",
        seccomp_ok,
        if seccomp_ok {
            format!(
                "seccomp filter mode available (current mode {sc}; actions: {})",
                actions.trim()
            )
        } else {
            format!("seccomp unavailable: {}", std::io::Error::last_os_error())
        },
    ));
    layers.push(layer(
        "no_new_privs",
        true,
        "prctl(PR_SET_NO_NEW_PRIVS) (Linux ≥ 3.5)",
    ));
    layers.push(layer("rlimits", true, "setrlimit(2)"));

    // cgroups.
    let cgroup = probe_cgroups();
    let cg_detail = match (&cgroup.v2_parent, &cgroup.v1_memory_parent, &cgroup.v1_pids_parent) {
        (Some(p), _, _) => format!("cgroup v2 delegated subtree at {}", p.display()),
        (None, m, p) if m.is_some() || p.is_some() => format!(
            "cgroup v1: memory {}, pids {}",
            m.as_ref().map_or("unavailable".into(), |p| p.display().to_string()),
            p.as_ref().map_or("unavailable".into(), |p| p.display().to_string())
        ),
        _ => "no writable cgroup v2 subtree with memory+pids and no writable v1 memory/pids hierarchy (needs root or a delegated subtree)".into(),
    };
    let cg_ok = cgroup.v2_parent.is_some()
        || cgroup.v1_memory_parent.is_some()
        || cgroup.v1_pids_parent.is_some();
    layers.push(layer("cgroup", cg_ok, cg_detail));
    layers.push(layer(
        "unprivileged_uid",
        true,
        if euid == 0 {
            "host is root: the worker can drop to an unprivileged uid when its interpreter is reachable by that uid"
        } else {
            "host is not root: the worker keeps the host's (unprivileged) uid"
        },
    ));

    let hard_limits = [
        ("AS", libc::RLIMIT_AS),
        ("CPU", libc::RLIMIT_CPU),
        ("FSIZE", libc::RLIMIT_FSIZE),
        ("NOFILE", libc::RLIMIT_NOFILE),
        ("NPROC", libc::RLIMIT_NPROC),
    ]
    .into_iter()
    .map(|(n, r)| (n.to_string(), hard_limit(r)))
    .collect();

    Probe {
        kernel,
        arch: std::env::consts::ARCH,
        euid,
        landlock_abi,
        cgroup,
        hard_limits,
        layers,
    }
}

/// Current hard limit of a resource (`None` = unlimited).
pub(crate) fn hard_limit(resource: libc::__rlimit_resource_t) -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit we own.
    let rc = unsafe { libc::getrlimit(resource, &mut r) };
    if rc != 0 || r.rlim_max == libc::RLIM_INFINITY {
        None
    } else {
        Some(r.rlim_max)
    }
}

pub(crate) const NS_FLAGS: [(&str, &str); 4] = [
    ("net_ns", "CLONE_NEWNET"),
    ("ipc_ns", "CLONE_NEWIPC"),
    ("uts_ns", "CLONE_NEWUTS"),
    ("mount_ns", "CLONE_NEWNS"),
];

struct NsProbe {
    /// errno per [user, net, ipc, uts, mount]; 0 = works.
    errnos: [i32; 5],
}

fn probe_namespaces() -> NsProbe {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        let e = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        return NsProbe { errnos: [e; 5] };
    }
    // SAFETY: both fds were just created by pipe2 and are owned by nobody else.
    let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let flags = [
        libc::CLONE_NEWNET,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWNS,
    ];
    // SAFETY: the child only calls async-signal-safe functions (unshare, write, _exit) on data
    // that existed before the fork, so forking from a multi-threaded process is sound.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        use std::os::fd::AsRawFd;
        let mut out = [0i32; 5];
        // SAFETY: raw syscalls in the forked child; see above.
        unsafe {
            if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                out[0] = *libc::__errno_location();
            }
            for (i, f) in flags.iter().enumerate() {
                if libc::unshare(*f) != 0 {
                    out[i + 1] = *libc::__errno_location();
                }
            }
            libc::write(
                tx.as_raw_fd(),
                out.as_ptr().cast(),
                std::mem::size_of_val(&out),
            );
            libc::_exit(0);
        }
    }
    drop(tx);
    if pid < 0 {
        let e = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        return NsProbe { errnos: [e; 5] };
    }
    let mut out = [libc::EIO; 5];
    let mut buf = [0u8; 20];
    let n = read_full(&rx, &mut buf);
    if n == buf.len() {
        for (i, c) in buf.chunks_exact(4).enumerate() {
            out[i] = i32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
    let mut status = 0;
    // SAFETY: reaping the child we forked.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    NsProbe { errnos: out }
}

fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> usize {
    use std::os::fd::AsRawFd;
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: reading into the unfilled tail of our buffer.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                buf[got..].as_mut_ptr().cast(),
                buf.len() - got,
            )
        };
        if n > 0 {
            got += n as usize;
        } else if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        } else {
            break;
        }
    }
    got
}

/// Mount points of cgroup filesystems: (fstype, super options, mount point).
fn cgroup_mounts() -> Vec<(String, String, PathBuf)> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        // `id parent maj:min root mountpoint opts [optional...] - fstype source superopts`
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let mnt = pre.split(' ').nth(4).unwrap_or("");
        let mut post_it = post.split(' ');
        let fstype = post_it.next().unwrap_or("");
        let _source = post_it.next();
        let superopts = post_it.next().unwrap_or("");
        if fstype == "cgroup" || fstype == "cgroup2" {
            out.push((
                fstype.to_string(),
                superopts.to_string(),
                PathBuf::from(mnt),
            ));
        }
    }
    out
}

/// Our own cgroup path per hierarchy: (controllers, path); v2 has empty controllers.
fn own_cgroups() -> Vec<(String, String)> {
    fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let _id = it.next()?;
            let ctrls = it.next()?;
            let path = it.next()?;
            Some((ctrls.to_string(), path.to_string()))
        })
        .collect()
}

fn writable_dir(dir: &Path) -> bool {
    let probe = dir.join(format!("capsule-probe-{}", std::process::id()));
    if fs::create_dir(&probe).is_ok() {
        let _ = fs::remove_dir(&probe);
        true
    } else {
        false
    }
}

fn probe_cgroups() -> CgroupProbe {
    let mounts = cgroup_mounts();
    let own = own_cgroups();
    let mut out = CgroupProbe::default();
    for (fstype, opts, mnt) in &mounts {
        if fstype == "cgroup2" {
            let Some((_, path)) = own.iter().find(|(c, _)| c.is_empty()) else {
                continue;
            };
            let dir = mnt.join(path.trim_start_matches('/'));
            let sub = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
            let has = |c: &str| sub.split_whitespace().any(|w| w == c);
            if has("memory") && has("pids") && writable_dir(&dir) {
                out.v2_parent = Some(dir);
            }
        } else {
            let opt_has = |c: &str| opts.split(',').any(|o| o == c);
            for ctrl in ["memory", "pids"] {
                if !opt_has(ctrl) {
                    continue;
                }
                let Some((_, path)) = own.iter().find(|(c, _)| c.split(',').any(|x| x == ctrl))
                else {
                    continue;
                };
                let dir = mnt.join(path.trim_start_matches('/'));
                if writable_dir(&dir) {
                    if ctrl == "memory" {
                        out.v1_memory_parent = Some(dir);
                    } else {
                        out.v1_pids_parent = Some(dir);
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_is_coherent() {
        let p = probe();
        for name in [
            "user_ns",
            "net_ns",
            "ipc_ns",
            "uts_ns",
            "mount_ns",
            "pid_ns",
            "landlock",
            "landlock_net",
            "landlock_scope",
            "seccomp",
            "no_new_privs",
            "rlimits",
            "cgroup",
            "unprivileged_uid",
        ] {
            let l = p.layer(name).unwrap_or_else(|| panic!("missing {name}"));
            assert!(!l.detail.is_empty());
        }
        // Landlock sub-layers imply the base layer.
        if p.available("landlock_net") || p.available("landlock_scope") {
            assert!(p.available("landlock"));
        }
        assert_eq!(p.available("landlock"), p.landlock_abi.is_some());
        assert_eq!(
            p.available("cgroup"),
            p.cgroup.v2_parent.is_some()
                || p.cgroup.v1_memory_parent.is_some()
                || p.cgroup.v1_pids_parent.is_some()
        );
        let j = p.to_json();
        assert!(j["layers"].as_array().is_some_and(|a| a.len() >= 14));
        // Cached: same instance.
        assert!(std::ptr::eq(p, probe()));
    }
}
