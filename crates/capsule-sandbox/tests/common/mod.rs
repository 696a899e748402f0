//! Shared harness for the sandbox integration tests: spawn a Python snippet the way the session
//! does (`-I -S -c`, fd 0 = /dev/null, own process group, cwd = scratch) through
//! `prepare()` + `install()`, and collect its output, exit status and kill reason.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use capsule_sandbox::{prepare, KillReason, LayerState, Policy, Prepared, SpawnSpec};

/// Debian's interpreter: world-readable, so the worker can drop to an unprivileged uid.
pub const SYSTEM_PY: &str = "/usr/bin/python3";
/// pyenv's interpreter under /root (mode 0700): the worker must keep the host uid.
pub const PYENV_PY: &str = "/root/.pyenv/versions/3.11.7/bin/python3";

pub struct Run {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub kill: Option<KillReason>,
    pub prepared: Prepared,
}

impl Run {
    /// The value printed as `key=value` by the snippet.
    pub fn get(&self, key: &str) -> Option<String> {
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_string))
    }
    pub fn expect(&self, key: &str) -> String {
        self.get(key).unwrap_or_else(|| {
            panic!(
                "no `{key}=` in output\nstatus: {:?}\nstdout:\n{}\nstderr:\n{}",
                self.status, self.stdout, self.stderr
            )
        })
    }
}

pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("capsule-sbx-test-")
            .tempdir()
            .expect("tempdir");
        Scratch { dir }
    }
    pub fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

pub fn spec(python: &str, scratch: &Path) -> SpawnSpec {
    SpawnSpec::new(python, scratch)
}

/// A Python prologue defining `attempt(key, fn)`: prints `key=ok:<repr>` or `key=err:<ExcName>:<errno>`.
pub const PROLOGUE: &str = r#"
import os, sys
def attempt(key, fn):
    try:
        r = fn()
        print(f"{key}=ok:{r!r}", flush=True)
    except BaseException as e:
        print(f"{key}=err:{type(e).__name__}:{getattr(e, 'errno', None)}", flush=True)
"#;

pub fn run_with(policy: &Policy, spec: &SpawnSpec, code: &str) -> Run {
    let mut prepared = prepare(policy, spec).expect("prepare");
    let mut cmd = Command::new(&spec.interpreter);
    cmd.arg("-I")
        .arg("-S")
        .arg("-c")
        .arg(format!("{PROLOGUE}\n{code}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .current_dir(&spec.scratch_dir);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    prepared.install(&mut cmd).expect("install");
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => panic!("spawn failed: {}", prepared.explain_spawn_error(&e)),
    };
    prepared.after_spawn(child.id()).expect("after_spawn");
    let out = child.wait_with_output().expect("wait");
    let kill = prepared.classify_exit(out.status);
    Run {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        kill,
        prepared,
    }
}

pub fn run(policy: &Policy, python: &str, code: &str) -> (Run, Scratch) {
    let scratch = Scratch::new();
    let r = run_with(policy, &spec(python, &scratch.path()), code);
    (r, scratch)
}

/// Run `code` with no sandbox at all (the control).
pub fn run_unsandboxed(python: &str, code: &str) -> String {
    let out = Command::new(python)
        .arg("-I")
        .arg("-S")
        .arg("-c")
        .arg(format!("{PROLOGUE}\n{code}"))
        .stdin(Stdio::null())
        .output()
        .expect("spawn control");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Skip (with a printed reason) unless the layer is active for this run.
pub fn require_layer(p: &Prepared, name: &str) -> bool {
    match p.layer(name) {
        Some(l) if l.state == LayerState::Active => true,
        Some(l) => {
            eprintln!("SKIP: layer `{name}` is {:?} here: {}", l.state, l.detail);
            false
        }
        None => {
            eprintln!("SKIP: layer `{name}` not reported");
            false
        }
    }
}

pub fn have(path: &str) -> bool {
    let ok = Path::new(path).exists();
    if !ok {
        eprintln!("SKIP: {path} not present on this machine");
    }
    ok
}
