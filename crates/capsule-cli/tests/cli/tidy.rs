//! Workspace hygiene checked as tests (rust-analyzer's `tidy.rs`): every `.rs` file under
//! `crates/` opens with `//!`, no test is `#[ignore]`d, and no library crate depends on
//! `anyhow` (binaries only).

use std::path::{Path, PathBuf};

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            walk(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn crate_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    walk(&crate::workspace().join("crates"), &mut files);
    files
}

#[test]
fn every_rust_file_under_crates_starts_with_a_module_doc() {
    let missing: Vec<_> = crate_files()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .filter(|p| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            !text.trim_start().starts_with("//!")
        })
        .collect();
    assert!(
        missing.is_empty(),
        "missing `//!` module docs: {missing:#?}"
    );
}

#[test]
fn no_test_is_ignored() {
    // Built from parts so this file does not match itself.
    let needle = format!("#[{}", "ignore");
    let offenders: Vec<_> = crate_files()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .filter(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .any(|l| l.trim_start().starts_with(&needle))
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "assert the current behaviour with a FIXME instead of ignoring: {offenders:#?}"
    );
}

#[test]
fn library_crates_do_not_depend_on_anyhow() {
    let mut offenders = Vec::new();
    for manifest in crate_files()
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "Cargo.toml"))
    {
        let text = std::fs::read_to_string(&manifest).unwrap_or_default();
        let dir = manifest.parent().unwrap_or(Path::new("."));
        let is_binary_only = text.contains("[[bin]]") && !dir.join("src/lib.rs").exists();
        if is_binary_only {
            continue;
        }
        let mut section = String::new();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('[') {
                section = line.to_string();
                continue;
            }
            let is_runtime_dep = section == "[dependencies]" || section.starts_with("[target.");
            if is_runtime_dep && (line.starts_with("anyhow ") || line.starts_with("anyhow=")) {
                offenders.push(manifest.clone());
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "libraries must use thiserror, not anyhow: {offenders:#?}"
    );
}
