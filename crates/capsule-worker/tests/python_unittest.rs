//! Runs the worker's Python unittest suite (`python/tests/`) under every CPython 3.9–3.13 that
//! [`capsule_worker::find_interpreters`] finds on this machine, and fails with the unittest output
//! of every interpreter whose run failed.

use std::path::Path;
use std::process::{Command, Stdio};

#[test]
fn python_suite_passes_on_every_interpreter() {
    let python_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("python");
    let interpreters = capsule_worker::find_interpreters();
    assert!(
        !interpreters.is_empty(),
        "no CPython 3.9-3.13 found on this machine"
    );
    let mut failures = Vec::new();
    for i in &interpreters {
        let out = Command::new(&i.executable)
            .args(["-m", "unittest", "discover", "-s", "tests"])
            .current_dir(&python_dir)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", i.executable.display()));
        let text = String::from_utf8_lossy(&out.stderr);
        let summary = text.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
        eprintln!("{} ({}): {}", i.executable.display(), i.version, summary);
        if !out.status.success() {
            failures.push(format!(
                "=== {} ({}) ===\n{}{}",
                i.executable.display(),
                i.version,
                String::from_utf8_lossy(&out.stdout),
                text
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
