//! The effective session configuration of one `capsule` invocation.
//!
//! Precedence (BRIEF §3.11): explicit flag > `CAPSULE_*` environment > `--config FILE` >
//! defaults. The file is applied first, then [`SessionConfig::with_env`] overlays only the
//! variables that are set, then the flags. Relative paths in the file are relative to the
//! file's directory (for `python`, only when the value contains a `/`, so `python3` still
//! means "look it up on `PATH`").

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use capsule_session::SessionConfig;
use serde::Deserialize;

use crate::{Failure, GlobalArgs};

/// Longest deadline accepted anywhere (ten years): larger values are clamped so that adding
/// them to an `Instant` can never overflow.
pub const MAX_TIMEOUT_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

/// Keys of the TOML config file. Every key is optional; unknown keys are an error so a typo
/// does not silently do nothing.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Interpreter, venv directory or venv python.
    pub python: Option<PathBuf>,
    /// Hard frame limit in bytes.
    pub max_frame: Option<usize>,
    /// Largest output body per frame in bytes.
    pub output_chunk: Option<usize>,
    /// Per-cell output budget in bytes.
    pub output_budget: Option<u64>,
    /// Cancel grace period in milliseconds.
    pub cancel_grace_ms: Option<u64>,
    /// Default cell deadline in milliseconds (0 = none).
    pub timeout_ms: Option<u64>,
    /// Worker start guard in milliseconds.
    pub start_timeout_ms: Option<u64>,
    /// Heartbeat interval in milliseconds (0 = off).
    pub heartbeat_ms: Option<u64>,
    /// Capacity of each execution's event channel.
    pub event_queue: Option<usize>,
    /// Maximum queued executions.
    pub max_queued: Option<usize>,
    /// Process `site` in the worker.
    #[serde(alias = "enable_site")]
    pub site: Option<bool>,
    /// Extra `sys.path` entries.
    pub sys_path: Option<Vec<PathBuf>>,
    /// Worker runtime cache directory.
    pub cache_dir: Option<PathBuf>,
    /// Parent of per-session scratch directories.
    pub scratch_root: Option<PathBuf>,
    /// Extra environment variables for the worker.
    pub env: Option<BTreeMap<String, String>>,
}

fn ms_opt(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms.min(MAX_TIMEOUT_MS)))
}

impl FileConfig {
    /// Parses a config file's text.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Overlays the keys present on `config`; relative paths are taken from `base`.
    pub fn apply(self, config: &mut SessionConfig, base: &Path) {
        let rel = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        if let Some(p) = self.python {
            let has_sep = p.to_string_lossy().contains('/');
            config.python = Some(if has_sep { rel(p) } else { p });
        }
        if let Some(v) = self.max_frame {
            config.max_frame = v;
        }
        if let Some(v) = self.output_chunk {
            config.output_chunk = v;
        }
        if let Some(v) = self.output_budget {
            config.output_budget = v;
        }
        if let Some(v) = self.cancel_grace_ms {
            config.cancel_grace = Duration::from_millis(v.min(MAX_TIMEOUT_MS));
        }
        if let Some(v) = self.timeout_ms {
            config.default_timeout = ms_opt(v);
        }
        if let Some(v) = self.start_timeout_ms {
            config.start_timeout = Duration::from_millis(v.min(MAX_TIMEOUT_MS));
        }
        if let Some(v) = self.heartbeat_ms {
            config.heartbeat = ms_opt(v);
        }
        if let Some(v) = self.event_queue {
            config.event_queue = v;
        }
        if let Some(v) = self.max_queued {
            config.max_queued = v;
        }
        if let Some(v) = self.site {
            config.enable_site = v;
        }
        if let Some(v) = self.sys_path {
            config.sys_path = v.into_iter().map(rel).collect();
        }
        if let Some(v) = self.cache_dir {
            config.cache_dir = Some(rel(v));
        }
        if let Some(v) = self.scratch_root {
            config.scratch_root = Some(rel(v));
        }
        if let Some(v) = self.env {
            config.env = v.into_iter().collect();
        }
    }
}

/// Builds the configuration from defaults, an optional file, an environment lookup and flags.
pub fn build(
    global: &GlobalArgs,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<SessionConfig> {
    let mut config = SessionConfig::default();
    if let Some(path) = &global.config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let file = FileConfig::parse(&text)
            .with_context(|| format!("invalid config file {}", path.display()))?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        file.apply(&mut config, base);
    }
    let mut config = config.with_env(env)?;
    if let Some(python) = &global.python {
        config.python = Some(python.clone());
    }
    if let Some(ms) = global.timeout_ms {
        config.default_timeout = ms_opt(ms);
    }
    config.validate()?;
    tracing::debug!(?config, "effective session configuration");
    Ok(config)
}

/// [`build`] with this process's environment; errors are usage errors (exit 2).
pub fn resolve(global: &GlobalArgs) -> Result<SessionConfig, Failure> {
    build(global, |k| std::env::var(k).ok()).map_err(Failure::usage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    fn with_file(text: &str) -> (tempfile::TempDir, GlobalArgs) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("capsule.toml");
        std::fs::write(&path, text).expect("write config");
        let global = GlobalArgs {
            config: Some(path),
            ..GlobalArgs::default()
        };
        (dir, global)
    }

    #[test]
    fn file_overrides_defaults_and_environment_overrides_file() {
        let (_dir, global) = with_file("timeout_ms = 1000\noutput_budget = 5000\n");
        let c = build(&global, env(&[("CAPSULE_TIMEOUT_MS", "2000")])).expect("valid");
        assert_eq!(c.default_timeout, Some(Duration::from_millis(2000)));
        assert_eq!(c.output_budget, 5000);
    }

    #[test]
    fn flags_override_environment() {
        let (_dir, mut global) = with_file("python = \"python3\"\n");
        global.timeout_ms = Some(0);
        global.python = Some(PathBuf::from("/opt/py/bin/python"));
        let c = build(
            &global,
            env(&[("CAPSULE_TIMEOUT_MS", "2000"), ("CAPSULE_PYTHON", "/x")]),
        )
        .expect("valid");
        assert_eq!(c.default_timeout, None);
        assert_eq!(c.python, Some(PathBuf::from("/opt/py/bin/python")));
    }

    #[test]
    fn relative_paths_in_the_file_are_relative_to_the_file() {
        let (dir, global) = with_file("python = \"venv/bin/python\"\ncache_dir = \"cache\"\n");
        let c = build(&global, env(&[])).expect("valid");
        assert_eq!(c.python, Some(dir.path().join("venv/bin/python")));
        assert_eq!(c.cache_dir, Some(dir.path().join("cache")));
        let (_dir, global) = with_file("python = \"python3\"\n");
        let c = build(&global, env(&[])).expect("valid");
        assert_eq!(c.python, Some(PathBuf::from("python3")));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let (_dir, global) = with_file("timeout = 5\n");
        let e = build(&global, env(&[])).expect_err("unknown key");
        assert!(format!("{e:#}").contains("timeout"), "{e:#}");
        let (_dir, global) = with_file("max_frame = 10\n");
        let e = build(&global, env(&[])).expect_err("too small");
        assert!(format!("{e:#}").contains("max_frame"), "{e:#}");
    }
}
