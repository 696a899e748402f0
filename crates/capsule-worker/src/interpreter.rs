//! Finding and describing Python interpreters.
//!
//! An interpreter is probed once (`-I -S -c <probe>`), which also resolves pyenv-style shims
//! (a shell script costing ~110 ms per start) to the real binary. The probe result is cached
//! under `<cache root>/interpreters/`, keyed by the requested path, its canonical target and that
//! target's mtime and size, so later starts skip both the probe and the shim.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bundle::{cache_root, hex};
use crate::error::WorkerError;

/// Oldest supported CPython (major, minor).
const MIN_VERSION: (u32, u32) = (3, 9);
/// Newest CPython that [`find_interpreters`] looks for.
const MAX_MINOR: u32 = 13;

/// A probed Python interpreter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interpreter {
    /// `sys.executable`: the real binary (shims resolved); for a venv, the venv's own `python`
    /// (not the base binary) so that the venv's site-packages are used.
    pub executable: PathBuf,
    /// Version string, e.g. `3.11.7`.
    pub version: String,
    /// (major, minor, micro).
    pub version_info: (u32, u32, u32),
    /// `sys.prefix` (the venv directory for a venv).
    pub prefix: PathBuf,
    /// `sys.base_prefix`.
    pub base_prefix: PathBuf,
    /// Directories a sandbox must allow reading: stdlib, lib-dynload, site-packages,
    /// `<prefix>/lib`, the libpython directory. Only existing directories, no duplicates.
    pub read_paths: Vec<PathBuf>,
}

/// Printed by the probe: one JSON object. Runs under `-I -S`, so venv detection is done here
/// (Python < 3.11 only applies `pyvenv.cfg` in `site`).
const PROBE: &str = r#"
import json, os, sys, sysconfig
exe = sys.executable
prefix = sys.prefix
cfg = os.path.join(os.path.dirname(os.path.dirname(exe)), "pyvenv.cfg")
if os.path.isfile(cfg):
    prefix = os.path.dirname(cfg)
paths = sysconfig.get_paths()
venv_paths = sysconfig.get_paths(vars={"base": prefix, "platbase": prefix})
dirs = [paths.get("stdlib"), paths.get("platstdlib"),
        os.path.join(paths.get("platstdlib") or "", "lib-dynload"),
        paths.get("purelib"), paths.get("platlib"),
        venv_paths.get("purelib"), venv_paths.get("platlib"),
        os.path.join(prefix, "lib"), os.path.join(sys.base_prefix, "lib"),
        sysconfig.get_config_var("LIBDIR")]
print(json.dumps({"executable": exe, "version": sys.version.split()[0],
    "version_info": list(sys.version_info[:3]), "prefix": prefix,
    "base_prefix": sys.base_prefix, "dirs": [d for d in dirs if d]}))
"#;

#[derive(Deserialize)]
struct ProbeOut {
    executable: PathBuf,
    version: String,
    version_info: (u32, u32, u32),
    prefix: PathBuf,
    base_prefix: PathBuf,
    dirs: Vec<PathBuf>,
}

/// Probe `python` by running it (no cache).
fn probe(python: &Path) -> Result<Interpreter, WorkerError> {
    let out = Command::new(python)
        .args(["-I", "-S", "-c", PROBE])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| WorkerError::Spawn {
            python: python.to_path_buf(),
            source,
        })?;
    let fail = |message: String| WorkerError::Probe {
        python: python.to_path_buf(),
        message,
    };
    if !out.status.success() {
        return Err(fail(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let p: ProbeOut = serde_json::from_slice(&out.stdout)
        .map_err(|e| fail(format!("unexpected probe output ({e}); is this CPython 3?")))?;
    let mut seen = HashSet::new();
    let read_paths = p
        .dirs
        .into_iter()
        .filter(|d| d.is_dir())
        .filter(|d| seen.insert(d.clone()))
        .collect();
    Ok(Interpreter {
        executable: p.executable,
        version: p.version,
        version_info: p.version_info,
        prefix: p.prefix,
        base_prefix: p.base_prefix,
        read_paths,
    })
}

/// The interpreter to run for a request: a venv directory means its `bin/python3`.
fn candidate(requested: Option<&Path>) -> Result<PathBuf, WorkerError> {
    let path = match requested {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os("CAPSULE_PYTHON").filter(|v| !v.is_empty()) {
            Some(p) => PathBuf::from(p),
            None => which("python3")
                .ok_or_else(|| WorkerError::NotFound("no python3 on PATH".into()))?,
        },
    };
    if path.is_dir() {
        for name in ["bin/python3", "bin/python"] {
            let exe = path.join(name);
            if exe.is_file() {
                return Ok(exe);
            }
        }
        return Err(WorkerError::NotFound(format!(
            "{} is a directory without bin/python3 (not a venv?)",
            path.display()
        )));
    }
    if path.components().count() == 1 && !path.exists() {
        // A bare name such as "python3.12": look it up on PATH.
        return which(&path.to_string_lossy())
            .ok_or_else(|| WorkerError::NotFound(format!("{} not on PATH", path.display())));
    }
    if !path.exists() {
        return Err(WorkerError::NotFound(format!(
            "{} does not exist",
            path.display()
        )));
    }
    Ok(path)
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Cache key: the requested path (absolute), its canonical target, that target's mtime and size.
fn cache_key(python: &Path) -> Option<String> {
    let abs = std::path::absolute(python).ok()?;
    let real = fs::canonicalize(python).ok()?;
    let meta = fs::metadata(&real).ok()?;
    let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    let mut h = Sha256::new();
    for part in [abs.as_os_str(), real.as_os_str()] {
        h.update(part.as_encoded_bytes());
        h.update([0u8]);
    }
    h.update(mtime.as_nanos().to_be_bytes());
    h.update(meta.len().to_be_bytes());
    Some(hex(&h.finalize())[..32].to_string())
}

fn check_version(i: Interpreter) -> Result<Interpreter, WorkerError> {
    let (major, minor, _) = i.version_info;
    if (major, minor) < MIN_VERSION {
        return Err(WorkerError::UnsupportedVersion {
            python: i.executable,
            version: i.version,
        });
    }
    Ok(i)
}

/// Probe with a cache under `root/interpreters/`; `run_probe` is the uncached probe.
fn resolve_in(
    requested: Option<&Path>,
    root: &Path,
    run_probe: &dyn Fn(&Path) -> Result<Interpreter, WorkerError>,
) -> Result<Interpreter, WorkerError> {
    let python = candidate(requested)?;
    let key = cache_key(&python);
    let cache_file = key
        .as_ref()
        .map(|k| root.join("interpreters").join(format!("{k}.json")));
    if let Some(file) = &cache_file {
        if let Ok(bytes) = fs::read(file) {
            if let Ok(i) = serde_json::from_slice::<Interpreter>(&bytes) {
                if i.executable.exists() {
                    return check_version(i);
                }
            }
        }
    }
    let i = run_probe(&python)?;
    if let Some(file) = &cache_file {
        // Best effort: a read-only cache only costs a probe next time.
        let _ = write_atomic(file, &serde_json::to_vec(&i).unwrap_or_default());
    }
    check_version(i)
}

fn write_atomic(file: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        file.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    fs::write(&tmp, data)?;
    fs::rename(&tmp, file)
}

/// Resolve and probe the interpreter to run: `requested` (a binary, a bare name on `PATH`, or a
/// venv directory), else `$CAPSULE_PYTHON`, else `python3` on `PATH`. The probe is cached (see the
/// module docs). Interpreters older than 3.9 are rejected with
/// [`WorkerError::UnsupportedVersion`].
pub fn resolve_interpreter(requested: Option<&Path>) -> Result<Interpreter, WorkerError> {
    resolve_in(requested, &cache_root(None), &probe)
}

/// Every CPython 3.9–3.13 on this machine: `python3.9` … `python3.13` on `PATH`,
/// `$PYENV_ROOT/versions/*/bin/python3` (default `~/.pyenv`), `/usr/bin/python3*` and
/// `/usr/local/bin/python3*`; deduplicated by real path of the executable, sorted by version.
pub fn find_interpreters() -> Vec<Interpreter> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    for minor in MIN_VERSION.1..=MAX_MINOR {
        if let Some(p) = which(&format!("python3.{minor}")) {
            candidates.push(p);
        }
    }
    let pyenv = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pyenv")));
    if let Some(root) = pyenv {
        if let Ok(entries) = fs::read_dir(root.join("versions")) {
            let mut vs: Vec<PathBuf> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("bin").join("python3"))
                .filter(|p| p.is_file())
                .collect();
            vs.sort();
            candidates.extend(vs);
        }
    }
    for dir in ["/usr/bin", "/usr/local/bin"] {
        if let Ok(entries) = fs::read_dir(dir) {
            let mut vs: Vec<PathBuf> = entries
                .filter_map(|e| e.ok())
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name == "python3"
                        || name
                            .strip_prefix("python3.")
                            .is_some_and(|m| !m.is_empty() && m.chars().all(|c| c.is_ascii_digit()))
                })
                .map(|e| e.path())
                .collect();
            vs.sort();
            candidates.extend(vs);
        }
    }
    let mut seen = HashSet::new();
    let mut found: Vec<Interpreter> = candidates
        .iter()
        .filter_map(|c| resolve_interpreter(Some(c)).ok())
        .filter(|i| i.version_info.0 == 3 && i.version_info.1 <= MAX_MINOR)
        .filter(|i| {
            let real = fs::canonicalize(&i.executable).unwrap_or_else(|_| i.executable.clone());
            seen.insert(real)
        })
        .collect();
    found.sort_by_key(|i| i.version_info);
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn machine_python() -> Option<PathBuf> {
        which("python3")
    }

    #[test]
    fn probes_the_machine_python3() {
        let Some(py) = machine_python() else { return };
        let i = probe(&py).expect("probe");
        assert_eq!(i.version_info.0, 3);
        assert!(i
            .version
            .starts_with(&format!("{}.{}", i.version_info.0, i.version_info.1)));
        assert!(i.executable.is_file(), "{:?}", i.executable);
        assert!(!i.read_paths.is_empty());
        assert!(
            i.read_paths.iter().any(|p| p.join("os.py").is_file()),
            "{:?}",
            i.read_paths
        );
    }

    #[test]
    fn cache_hit_avoids_reprobing() {
        let Some(py) = machine_python() else { return };
        let root = tempfile::tempdir().expect("tempdir");
        let calls = Cell::new(0);
        let counting = |p: &Path| {
            calls.set(calls.get() + 1);
            probe(p)
        };
        let a = resolve_in(Some(&py), root.path(), &counting).expect("first");
        let b = resolve_in(Some(&py), root.path(), &counting).expect("second");
        assert_eq!(a, b);
        assert_eq!(calls.get(), 1);
        assert_eq!(
            fs::read_dir(root.path().join("interpreters"))
                .expect("ls")
                .count(),
            1
        );
    }

    #[test]
    fn old_versions_are_rejected_with_their_version() {
        let root = tempfile::tempdir().expect("tempdir");
        let fake = |p: &Path| {
            Ok(Interpreter {
                executable: p.to_path_buf(),
                version: "3.8.18".into(),
                version_info: (3, 8, 18),
                prefix: "/".into(),
                base_prefix: "/".into(),
                read_paths: vec![],
            })
        };
        let exe = std::env::current_exe().expect("exe");
        match resolve_in(Some(&exe), root.path(), &fake) {
            Err(WorkerError::UnsupportedVersion { version, .. }) => assert_eq!(version, "3.8.18"),
            other => panic!("expected UnsupportedVersion, got {other:?}"),
        }
    }

    #[test]
    fn venv_dir_and_missing_paths() {
        let root = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            candidate(Some(root.path())),
            Err(WorkerError::NotFound(_))
        ));
        assert!(matches!(
            candidate(Some(Path::new("/nonexistent/python3"))),
            Err(WorkerError::NotFound(_))
        ));
        fs::create_dir_all(root.path().join("bin")).expect("mkdir");
        fs::write(root.path().join("bin/python3"), "").expect("write");
        assert_eq!(
            candidate(Some(root.path())).expect("venv"),
            root.path().join("bin/python3")
        );
    }
}
