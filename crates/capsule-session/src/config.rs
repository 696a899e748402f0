//! Session configuration and its precedence: explicit arguments > `CAPSULE_*` environment >
//! config file (applied by front doors) > the defaults here.
//!
//! Every limit of BRIEF §3.6 that a session enforces has a field here, an environment knob and a
//! counter in [`crate::SessionInfo`].

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::ConfigError;

/// Effective settings of one session. Build with [`SessionConfig::default`] or
/// [`SessionConfig::from_env`], then override fields explicitly.
///
/// ```
/// use std::time::Duration;
/// use capsule_session::SessionConfig;
/// // Environment first, then explicit settings win (BRIEF §3.11).
/// let mut config = SessionConfig::default()
///     .with_env(|key| (key == "CAPSULE_CANCEL_GRACE_MS").then(|| "250".to_string()))?;
/// assert_eq!(config.cancel_grace, Duration::from_millis(250));
/// config.default_timeout = Some(Duration::from_secs(30));
/// config.sandbox = capsule_session::config::load_policy("strict")?;
/// # Ok::<(), capsule_session::ConfigError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct SessionConfig {
    /// Interpreter (a binary, a venv's `bin/python`, or a venv directory). `None`: `$CAPSULE_PYTHON`,
    /// else `python3` on `PATH`. Env: `CAPSULE_PYTHON`.
    pub python: Option<PathBuf>,
    /// Hard limit on one protocol frame in either direction. Env: `CAPSULE_MAX_FRAME`.
    pub max_frame: usize,
    /// Largest output body the worker puts in one frame. Env: `CAPSULE_OUTPUT_CHUNK`.
    pub output_chunk: usize,
    /// Per-cell output budget (stdout + stderr bytes); past it output is dropped, counted, and a
    /// truncation marker is emitted before the outcome. Env: `CAPSULE_OUTPUT_BUDGET`.
    pub output_budget: u64,
    /// Cooperative-cancel grace period before the worker's process group is killed.
    /// Env: `CAPSULE_CANCEL_GRACE_MS`.
    pub cancel_grace: Duration,
    /// Deadline applied to cells that do not set their own. Env: `CAPSULE_TIMEOUT_MS` (0 = none).
    pub default_timeout: Option<Duration>,
    /// How long a new worker may take to say hello. A guard against a broken interpreter, not a
    /// synchronisation device. Env: `CAPSULE_START_TIMEOUT_MS`.
    pub start_timeout: Duration,
    /// Interval of liveness pings (`None`: no pings; liveness still comes from the child-exit
    /// future). Env: `CAPSULE_HEARTBEAT_MS` (0 = off).
    pub heartbeat: Option<Duration>,
    /// Capacity of each execution's event channel (backpressure to the worker when full).
    /// Env: `CAPSULE_EVENT_QUEUE`.
    pub event_queue: usize,
    /// Maximum executions waiting behind the running one. Env: `CAPSULE_MAX_QUEUED`.
    pub max_queued: usize,
    /// Process `site` (site-packages, venvs, `.pth`) in the worker after the handshake.
    /// Env: `CAPSULE_SITE` (`0`/`1`).
    pub enable_site: bool,
    /// Extra `sys.path` entries for cells.
    pub sys_path: Vec<PathBuf>,
    /// Where the worker runtime is materialised. Env: `CAPSULE_CACHE_DIR`.
    pub cache_dir: Option<PathBuf>,
    /// Parent directory of per-session scratch directories (default: the system temp dir).
    /// Env: `CAPSULE_SCRATCH_ROOT`.
    pub scratch_root: Option<PathBuf>,
    /// Extra environment variables given to the worker.
    pub env: Vec<(String, String)>,
    /// The sandbox every worker of the session runs in (default: the `standard` preset).
    /// Env: `CAPSULE_SANDBOX` = a preset name (`strict`, `standard`, `none`) or a TOML file.
    pub sandbox: capsule_sandbox::Policy,
}

/// Default hard frame limit (16 MiB).
pub const DEFAULT_MAX_FRAME: usize = capsule_protocol::DEFAULT_MAX_FRAME;
/// Default per-frame output chunk (256 KiB).
pub const DEFAULT_OUTPUT_CHUNK: usize = 256 * 1024;
/// Default per-cell output budget (64 MiB).
pub const DEFAULT_OUTPUT_BUDGET: u64 = 64 * 1024 * 1024;
/// Default cancel grace (500 ms).
pub const DEFAULT_CANCEL_GRACE: Duration = Duration::from_millis(500);

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            python: None,
            max_frame: DEFAULT_MAX_FRAME,
            output_chunk: DEFAULT_OUTPUT_CHUNK,
            output_budget: DEFAULT_OUTPUT_BUDGET,
            cancel_grace: DEFAULT_CANCEL_GRACE,
            default_timeout: None,
            start_timeout: Duration::from_secs(30),
            heartbeat: Some(Duration::from_secs(5)),
            event_queue: 1024,
            max_queued: 1024,
            enable_site: true,
            sys_path: Vec::new(),
            cache_dir: None,
            scratch_root: None,
            env: Vec::new(),
            sandbox: capsule_sandbox::Policy::standard(),
        }
    }
}

fn parse_num<T: std::str::FromStr>(key: &'static str, value: &str) -> Result<T, ConfigError>
where
    T::Err: fmt::Display,
{
    value.trim().parse::<T>().map_err(|e| ConfigError::Invalid {
        key,
        value: value.to_string(),
        reason: e.to_string(),
    })
}

fn ms_opt(key: &'static str, value: &str) -> Result<Option<Duration>, ConfigError> {
    let ms: u64 = parse_num(key, value)?;
    Ok((ms > 0).then(|| Duration::from_millis(ms)))
}

/// A sandbox policy from a preset name or a TOML file path.
pub fn load_policy(spec: &str) -> Result<capsule_sandbox::Policy, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        key: "CAPSULE_SANDBOX",
        value: spec.to_string(),
        reason,
    };
    if matches!(spec, "strict" | "standard" | "none") {
        capsule_sandbox::Policy::preset(spec).map_err(|e| invalid(e.to_string()))
    } else {
        capsule_sandbox::Policy::from_file(std::path::Path::new(spec))
            .map_err(|e| invalid(e.to_string()))
    }
}

impl SessionConfig {
    /// Defaults overlaid with the `CAPSULE_*` environment of this process.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::default().with_env(|k| std::env::var(k).ok())
    }

    /// Overlays settings found through `get` (an environment lookup) on `self`.
    pub fn with_env(mut self, get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        if let Some(v) = get("CAPSULE_PYTHON").filter(|v| !v.is_empty()) {
            self.python = Some(PathBuf::from(v));
        }
        if let Some(v) = get("CAPSULE_MAX_FRAME") {
            self.max_frame = parse_num("CAPSULE_MAX_FRAME", &v)?;
        }
        if let Some(v) = get("CAPSULE_OUTPUT_CHUNK") {
            self.output_chunk = parse_num("CAPSULE_OUTPUT_CHUNK", &v)?;
        }
        if let Some(v) = get("CAPSULE_OUTPUT_BUDGET") {
            self.output_budget = parse_num("CAPSULE_OUTPUT_BUDGET", &v)?;
        }
        if let Some(v) = get("CAPSULE_CANCEL_GRACE_MS") {
            self.cancel_grace = Duration::from_millis(parse_num("CAPSULE_CANCEL_GRACE_MS", &v)?);
        }
        if let Some(v) = get("CAPSULE_TIMEOUT_MS") {
            self.default_timeout = ms_opt("CAPSULE_TIMEOUT_MS", &v)?;
        }
        if let Some(v) = get("CAPSULE_START_TIMEOUT_MS") {
            self.start_timeout = Duration::from_millis(parse_num("CAPSULE_START_TIMEOUT_MS", &v)?);
        }
        if let Some(v) = get("CAPSULE_HEARTBEAT_MS") {
            self.heartbeat = ms_opt("CAPSULE_HEARTBEAT_MS", &v)?;
        }
        if let Some(v) = get("CAPSULE_EVENT_QUEUE") {
            self.event_queue = parse_num("CAPSULE_EVENT_QUEUE", &v)?;
        }
        if let Some(v) = get("CAPSULE_MAX_QUEUED") {
            self.max_queued = parse_num("CAPSULE_MAX_QUEUED", &v)?;
        }
        if let Some(v) = get("CAPSULE_SITE") {
            self.enable_site = match v.trim() {
                "1" | "true" | "yes" | "on" => true,
                "0" | "false" | "no" | "off" => false,
                _ => {
                    return Err(ConfigError::Invalid {
                        key: "CAPSULE_SITE",
                        value: v,
                        reason: "expected 0 or 1".into(),
                    })
                }
            };
        }
        if let Some(v) = get("CAPSULE_CACHE_DIR").filter(|v| !v.is_empty()) {
            self.cache_dir = Some(PathBuf::from(v));
        }
        if let Some(v) = get("CAPSULE_SANDBOX").filter(|v| !v.is_empty()) {
            self.sandbox = load_policy(&v)?;
        }
        if let Some(v) = get("CAPSULE_SCRATCH_ROOT").filter(|v| !v.is_empty()) {
            self.scratch_root = Some(PathBuf::from(v));
        }
        self.validate()?;
        Ok(self)
    }

    /// Checks the limits are coherent.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &'static str, value: String, reason: &str| ConfigError::Invalid {
            key,
            value,
            reason: reason.to_string(),
        };
        if self.max_frame < capsule_protocol::frame::MIN_MAX_FRAME {
            return Err(bad(
                "max_frame",
                self.max_frame.to_string(),
                "must be at least 64 KiB",
            ));
        }
        if self.output_chunk == 0 || self.output_chunk + 4096 > self.max_frame {
            return Err(bad(
                "output_chunk",
                self.output_chunk.to_string(),
                "must be non-zero and leave 4 KiB of a frame for the header",
            ));
        }
        if self.event_queue == 0 {
            return Err(bad("event_queue", "0".into(), "must be at least 1"));
        }
        Ok(())
    }
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

    #[test]
    fn environment_overrides_defaults() {
        let c = SessionConfig::default()
            .with_env(env(&[
                ("CAPSULE_CANCEL_GRACE_MS", "250"),
                ("CAPSULE_TIMEOUT_MS", "1000"),
                ("CAPSULE_HEARTBEAT_MS", "0"),
                ("CAPSULE_SITE", "0"),
            ]))
            .expect("valid");
        assert_eq!(c.cancel_grace, Duration::from_millis(250));
        assert_eq!(c.default_timeout, Some(Duration::from_secs(1)));
        assert_eq!(c.heartbeat, None);
        assert!(!c.enable_site);
    }

    #[test]
    fn sandbox_preset_comes_from_the_environment_and_bad_names_are_errors() {
        let c = SessionConfig::default()
            .with_env(env(&[("CAPSULE_SANDBOX", "strict")]))
            .expect("valid");
        assert_eq!(c.sandbox, capsule_sandbox::Policy::strict());
        assert_eq!(
            SessionConfig::default().sandbox,
            capsule_sandbox::Policy::standard()
        );
        let e = SessionConfig::default()
            .with_env(env(&[("CAPSULE_SANDBOX", "/nonexistent/policy.toml")]))
            .expect_err("missing file");
        assert!(e.to_string().contains("CAPSULE_SANDBOX"), "{e}");
    }

    #[test]
    fn explicit_settings_win_over_environment() {
        let mut c = SessionConfig::default()
            .with_env(env(&[("CAPSULE_OUTPUT_BUDGET", "10")]))
            .expect("valid");
        c.output_budget = 99;
        assert_eq!(c.output_budget, 99);
    }

    #[test]
    fn bad_values_are_typed_errors_naming_the_key() {
        let e = SessionConfig::default()
            .with_env(env(&[("CAPSULE_MAX_FRAME", "lots")]))
            .expect_err("invalid");
        assert!(e.to_string().contains("CAPSULE_MAX_FRAME"), "{e}");
        let e = SessionConfig::default()
            .with_env(env(&[("CAPSULE_MAX_FRAME", "100")]))
            .expect_err("too small");
        assert!(e.to_string().contains("max_frame"), "{e}");
    }
}
