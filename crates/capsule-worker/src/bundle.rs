//! The embedded worker package, written to a content-addressed cache directory.
//!
//! `materialize` is safe to call from several processes at once: files are written to a private
//! temporary directory which is renamed into place in one step; a bundle directory that exists
//! always carries the `.complete` marker and is never modified afterwards.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::error::WorkerError;

/// Every file of the worker package: (path relative to the bundle dir, contents).
pub const BUNDLE_FILES: &[(&str, &str)] = &[
    (
        "capsule_worker/__init__.py",
        include_str!("../python/capsule_worker/__init__.py"),
    ),
    (
        "capsule_worker/runtime.py",
        include_str!("../python/capsule_worker/runtime.py"),
    ),
    (
        "capsule_worker/checkpoint.py",
        include_str!("../python/capsule_worker/checkpoint.py"),
    ),
    (
        "capsule_worker/template.py",
        include_str!("../python/capsule_worker/template.py"),
    ),
    (
        "capsule_worker/confine.py",
        include_str!("../python/capsule_worker/confine.py"),
    ),
];

const COMPLETE_MARKER: &str = ".complete";

/// A materialized worker package.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerBundle {
    /// Directory that contains the `capsule_worker/` package (put on `sys.path`).
    pub dir: PathBuf,
    /// Hex SHA-256 of the bundle contents.
    pub hash: String,
}

/// The cache root: `explicit`, else `$CAPSULE_CACHE_DIR`, else `$XDG_CACHE_HOME/capsule`, else
/// `~/.cache/capsule`, else `/tmp/capsule-<uid>`.
pub fn cache_root(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    let non_empty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(p) = non_empty("CAPSULE_CACHE_DIR") {
        return PathBuf::from(p);
    }
    if let Some(p) = non_empty("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("capsule");
    }
    if let Some(p) = non_empty("HOME") {
        return PathBuf::from(p).join(".cache").join("capsule");
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    PathBuf::from(format!("/tmp/capsule-{uid}"))
}

/// Hex SHA-256 over every bundle file's path and contents.
fn bundle_hash() -> String {
    let mut h = Sha256::new();
    for (path, text) in BUNDLE_FILES {
        h.update(path.as_bytes());
        h.update([0u8]);
        h.update((text.len() as u64).to_be_bytes());
        h.update(text.as_bytes());
    }
    hex(&h.finalize())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WorkerError + '_ {
    move |source| WorkerError::Bundle {
        path: path.to_path_buf(),
        source,
    }
}

fn mkdir_public(path: &Path) -> Result<(), WorkerError> {
    fs::create_dir_all(path).map_err(io_err(path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(io_err(path))
}

/// Write the worker package under `<cache root>/worker/<sha256 prefix>/` (see [`cache_root`])
/// unless it is already there, and return where it is.
///
/// Directories are 0755 and files 0644 so that a sandboxed worker running as another user can
/// read them.
pub fn materialize(cache_root_dir: Option<&Path>) -> Result<WorkerBundle, WorkerError> {
    let hash = bundle_hash();
    let parent = cache_root(cache_root_dir).join("worker");
    let dir = parent.join(&hash[..16]);
    if dir.join(COMPLETE_MARKER).is_file() {
        return Ok(WorkerBundle { dir, hash });
    }
    mkdir_public(&parent)?;

    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let tmp = parent.join(format!(
        ".tmp-{}-{}-{}",
        &hash[..16],
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = write_tree(&tmp, &hash).and_then(|()| match fs::rename(&tmp, &dir) {
        Ok(()) => Ok(()),
        // Another process won the race: its complete copy is as good as ours.
        Err(_) if dir.join(COMPLETE_MARKER).is_file() => Ok(()),
        Err(e) => Err(io_err(&dir)(e)),
    });
    if tmp.exists() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result.map(|()| WorkerBundle { dir, hash })
}

fn write_tree(tmp: &Path, hash: &str) -> Result<(), WorkerError> {
    if tmp.exists() {
        fs::remove_dir_all(tmp).map_err(io_err(tmp))?;
    }
    mkdir_public(tmp)?;
    for (rel, text) in BUNDLE_FILES {
        let path = tmp.join(rel);
        if let Some(p) = path.parent() {
            mkdir_public(p)?;
        }
        write_public(&path, text.as_bytes())?;
    }
    write_public(&tmp.join(COMPLETE_MARKER), hash.as_bytes())
}

fn write_public(path: &Path, data: &[u8]) -> Result<(), WorkerError> {
    let mut f = fs::File::create(path).map_err(io_err(path))?;
    f.write_all(data).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).map_err(io_err(path))
}

/// Arguments for the interpreter that start the worker of `bundle`:
/// `["-I", "-S", "-c", "<bootstrap>", "3", "4", "5"]`.
///
/// The directory is embedded as a JSON string literal, which is also a valid Python literal
/// (non-UTF-8 path bytes are replaced: keep the cache root UTF-8).
pub fn bootstrap_args(bundle: &WorkerBundle) -> Vec<String> {
    let dir = bundle.dir.to_string_lossy();
    let literal = serde_json::Value::String(dir.into_owned()).to_string();
    vec![
        "-I".into(),
        "-S".into(),
        "-c".into(),
        format!("import sys; sys.path.insert(0, {literal}); import capsule_worker; capsule_worker.main()"),
        crate::DATA_FD.to_string(),
        crate::EVENT_FD.to_string(),
        crate::CONTROL_FD.to_string(),
        crate::STDOUT_CAPTURE_FD.to_string(),
        crate::STDERR_CAPTURE_FD.to_string(),
        crate::LOG_FD.to_string(),
    ]
}

/// Compiles the bundle's Python files to bytecode for `interp` if they are not compiled yet.
///
/// Sandboxed workers see the bundle read-only, so without this every worker start would
/// recompile the runtime from source. Runs the interpreter once (unsandboxed, on our own files
/// only); later calls find the `.pyc` files and return without spawning anything.
pub fn precompile(bundle: &WorkerBundle, interp: &crate::Interpreter) -> Result<(), WorkerError> {
    let (major, minor, _) = interp.version_info;
    let pkg = bundle.dir.join("capsule_worker");
    let tag = format!("cpython-{major}{minor}");
    let compiled = BUNDLE_FILES.iter().all(|(rel, _)| {
        let path = bundle.dir.join(rel);
        let (Some(dir), Some(stem)) = (path.parent(), path.file_stem()) else {
            return false;
        };
        dir.join("__pycache__")
            .join(format!("{}.{tag}.pyc", stem.to_string_lossy()))
            .exists()
    });
    if compiled {
        return Ok(());
    }
    let status = std::process::Command::new(&interp.executable)
        .args([
            "-I",
            "-S",
            "-c",
            "import compileall, sys; sys.exit(0 if compileall.compile_dir(sys.argv[1], quiet=1) else 1)",
        ])
        .arg(&pkg)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|source| WorkerError::Spawn {
            python: interp.executable.clone(),
            source,
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(WorkerError::Probe {
            python: interp.executable.clone(),
            message: format!("compiling the worker runtime failed ({status})"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn materialize_is_idempotent_and_content_addressed() {
        let root = tempfile::tempdir().expect("tempdir");
        let a = materialize(Some(root.path())).expect("first");
        let b = materialize(Some(root.path())).expect("second");
        assert_eq!(a, b);
        assert_eq!(a.hash, bundle_hash());
        assert_eq!(a.hash.len(), 64);
        assert_eq!(a.dir, root.path().join("worker").join(&a.hash[..16]));
        for (rel, text) in BUNDLE_FILES {
            let on_disk = fs::read_to_string(a.dir.join(rel)).expect("read");
            assert_eq!(&on_disk, text);
            let mode = fs::metadata(a.dir.join(rel))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o644, "{rel}");
        }
        let mode = fs::metadata(&a.dir).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        // No temporary directories left behind.
        let names: Vec<_> = fs::read_dir(root.path().join("worker"))
            .expect("ls")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn concurrent_materialize_agrees() {
        let root = tempfile::tempdir().expect("tempdir");
        let dirs: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| materialize(Some(root.path())).expect("materialize")))
                .collect();
            hs.into_iter().map(|h| h.join().expect("join")).collect()
        });
        assert!(dirs.windows(2).all(|w| w[0] == w[1]));
        assert!(dirs[0].dir.join(COMPLETE_MARKER).is_file());
    }

    #[test]
    fn bootstrap_args_shape() {
        let b = WorkerBundle {
            dir: PathBuf::from("/c/it's \"here\""),
            hash: "x".into(),
        };
        let args = bootstrap_args(&b);
        assert_eq!(&args[..3], &["-I", "-S", "-c"]);
        assert_eq!(&args[4..], &["3", "4", "5", "6", "7", "8"]);
        assert_eq!(
            args[3],
            r#"import sys; sys.path.insert(0, "/c/it's \"here\""); import capsule_worker; capsule_worker.main()"#
        );
    }

    #[test]
    fn precompile_writes_bytecode_once_for_the_interpreter() {
        let root = tempfile::tempdir().expect("tempdir");
        let bundle = materialize(Some(root.path())).expect("materialize");
        let interp = crate::resolve_interpreter(None).expect("python3");
        precompile(&bundle, &interp).expect("compile");
        let (maj, min, _) = interp.version_info;
        let pyc = bundle
            .dir
            .join("capsule_worker/__pycache__")
            .join(format!("runtime.cpython-{maj}{min}.pyc"));
        assert!(pyc.exists(), "{}", pyc.display());
        precompile(&bundle, &interp).expect("second call is a no-op");
    }

    #[test]
    fn explicit_cache_root_wins() {
        assert_eq!(cache_root(Some(Path::new("/x"))), PathBuf::from("/x"));
    }
}
