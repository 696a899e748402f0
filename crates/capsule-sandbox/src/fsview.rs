//! The worker's filesystem view: Landlock rules (built in the parent, enforced in the child by
//! `landlock_restrict_self`), the minimal system paths CPython needs, the ELF interpreter of the
//! Python binary, and the DAC reachability check used to decide whether the worker can run as
//! an unprivileged uid.

use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use landlock::{
    path_beneath_rules, Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, Ruleset,
    RulesetAttr, RulesetCreatedAttr, Scope, ABI,
};

use crate::SandboxError;

/// Read-only system paths granted when `filesystem.system_paths` is on: shared libraries,
/// the loader cache, time zones, CA certificates. Directories are read-only and *not*
/// executable (no shell, no `/usr/bin/*`), only the interpreter and its ELF loader are.
pub const SYSTEM_READ_PATHS: &[&str] = &[
    "/usr/lib",
    "/usr/lib64",
    "/usr/lib32",
    "/usr/local/lib",
    "/lib",
    "/lib64",
    "/lib32",
    "/usr/share/zoneinfo",
    "/usr/share/ca-certificates",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/ssl",
    "/etc/mime.types",
];

/// Device files the worker may open read-write.
pub const DEVICE_PATHS: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// What the Landlock ruleset grants.
#[derive(Debug, Default)]
pub(crate) struct FsView {
    /// Read + execute (the interpreter and its ELF loader, plus `exec_paths`).
    pub exec: Vec<PathBuf>,
    /// Read only.
    pub read: Vec<PathBuf>,
    /// Read-write (scratch + extra write paths), no execute.
    pub write: Vec<PathBuf>,
    /// Devices (read-write, ioctl).
    pub devices: Vec<PathBuf>,
}

fn ll_err(layer: &'static str, e: impl std::fmt::Display) -> SandboxError {
    SandboxError::Setup {
        layer,
        reason: e.to_string(),
    }
}

/// Build a Landlock ruleset for the given ABI; returns its fd (CLOEXEC) and a description.
pub(crate) fn build_ruleset(
    abi_version: i32,
    view: &FsView,
    fs_rules: bool,
    deny_tcp: bool,
    scope: bool,
) -> Result<(OwnedFd, String), SandboxError> {
    let abi = ABI::from(abi_version);
    let mut ruleset = Ruleset::default().set_compatibility(CompatLevel::HardRequirement);
    let mut what = Vec::new();
    if fs_rules {
        ruleset = ruleset
            .handle_access(AccessFs::from_all(abi))
            .map_err(|e| ll_err("landlock", e))?;
        what.push(format!("fs rules (ABI {abi_version})"));
    }
    if deny_tcp && abi_version >= 4 {
        ruleset = ruleset
            .handle_access(AccessNet::from_all(abi))
            .map_err(|e| ll_err("landlock_net", e))?;
        what.push("TCP bind/connect denied".into());
    }
    if scope && abi_version >= 6 {
        ruleset = ruleset
            .scope(Scope::from_all(abi))
            .map_err(|e| ll_err("landlock_scope", e))?;
        what.push("signal + abstract unix socket scoped".into());
    }
    let mut created = ruleset.create().map_err(|e| ll_err("landlock", e))?;
    if fs_rules {
        let all = AccessFs::from_all(abi);
        let read: BitFlags<AccessFs> = (AccessFs::ReadFile | AccessFs::ReadDir) & all;
        let exec: BitFlags<AccessFs> = read | (BitFlags::from(AccessFs::Execute) & all);
        let write: BitFlags<AccessFs> = all & !AccessFs::Execute;
        let mut dev: BitFlags<AccessFs> = AccessFs::ReadFile | AccessFs::WriteFile;
        if abi_version >= 3 {
            dev |= AccessFs::Truncate;
        }
        if abi_version >= 5 {
            dev |= AccessFs::IoctlDev;
        }
        created = created
            .add_rules(path_beneath_rules(&view.exec, exec))
            .and_then(|c| c.add_rules(path_beneath_rules(&view.read, read)))
            .and_then(|c| c.add_rules(path_beneath_rules(&view.write, write)))
            .and_then(|c| c.add_rules(path_beneath_rules(&view.devices, dev & all)))
            .map_err(|e| ll_err("landlock", e))?;
        what.push(format!(
            "{} exec, {} read-only, {} read-write paths",
            view.exec.len(),
            view.read.len(),
            view.write.len()
        ));
    }
    let fd: Option<OwnedFd> = created.into();
    let fd = fd.ok_or_else(|| SandboxError::LayerUnavailable {
        layer: "landlock",
        reason: "the kernel returned no ruleset".into(),
    })?;
    Ok((fd, what.join("; ")))
}

/// Landlock access bits granted on read-write paths (everything but execute) for an ABI.
pub(crate) fn write_access_bits(abi_version: i32) -> u64 {
    let all = AccessFs::from_all(ABI::from(abi_version));
    (all & !AccessFs::Execute).bits()
}

/// `PT_INTERP` of an ELF executable (the dynamic loader), if any.
pub(crate) fn elf_interpreter(exe: &Path) -> Option<PathBuf> {
    use std::io::Read;
    // Headers only: 64 KiB covers the ELF header, the program headers and PT_INTERP of any
    // real interpreter binary (reading the whole multi-MiB binary would cost milliseconds).
    let mut data = Vec::with_capacity(64 << 10);
    fs::File::open(exe)
        .ok()?
        .take(64 << 10)
        .read_to_end(&mut data)
        .ok()?;
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
        return None; // only 64-bit little-endian is parsed
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(data.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(data.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(data.get(o..o + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? == 3 {
            let off = usize::try_from(u64_at(ph + 8)?).ok()?;
            let size = usize::try_from(u64_at(ph + 32)?).ok()?;
            let raw = data.get(off..off.checked_add(size)?)?;
            let s = std::str::from_utf8(raw).ok()?.trim_end_matches('\0');
            return Some(PathBuf::from(s));
        }
    }
    None
}

/// Whether `uid`/`gid` (with no supplementary groups) can reach `path`: search permission on
/// every ancestor directory, and read (plus search/exec when `exec`) on the path itself.
pub(crate) fn reachable_by(path: &Path, uid: u32, gid: u32, exec: bool) -> Result<(), String> {
    let allowed = |md: &fs::Metadata, bits: u32| -> bool {
        let mode = md.mode();
        let shift = if md.uid() == uid {
            6
        } else if md.gid() == gid {
            3
        } else {
            0
        };
        (mode >> shift) & bits == bits
    };
    let mut anc = PathBuf::from("/");
    let comps: Vec<_> = path.components().skip(1).collect();
    for (i, c) in comps.iter().enumerate() {
        let md = fs::metadata(&anc).map_err(|e| format!("{}: {e}", anc.display()))?;
        if !allowed(&md, 0o1) {
            return Err(format!(
                "{} is mode {:o} owned by uid {}: uid {uid} cannot search it",
                anc.display(),
                md.mode() & 0o7777,
                md.uid()
            ));
        }
        anc.push(c);
        if i + 1 == comps.len() {
            let md = fs::metadata(&anc).map_err(|e| format!("{}: {e}", anc.display()))?;
            let need = if md.is_dir() || exec { 0o5 } else { 0o4 };
            if !allowed(&md, need) {
                return Err(format!(
                    "{} is mode {:o} owned by uid {}: uid {uid} cannot {}",
                    anc.display(),
                    md.mode() & 0o7777,
                    md.uid(),
                    if exec { "execute it" } else { "read it" }
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_interp_of_system_binary() {
        let interp = elf_interpreter(Path::new("/bin/sh"));
        if let Some(i) = interp {
            assert!(i.is_absolute());
            assert!(i.to_string_lossy().contains("ld"));
        }
        assert_eq!(elf_interpreter(Path::new("/etc/hostname")), None);
    }

    #[test]
    fn reachability() {
        assert!(reachable_by(Path::new("/bin/sh"), 65534, 65534, true).is_ok());
        let dir = tempfile::tempdir().expect("tempdir");
        let locked = dir.path().join("locked");
        fs::create_dir(&locked).expect("mkdir");
        fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .expect("chmod");
        fs::write(locked.join("f"), "x").expect("write");
        let err =
            reachable_by(&locked.join("f"), 65534, 65534, false).expect_err("0700 dir must block");
        assert!(err.contains("cannot search"), "{err}");
    }
}
