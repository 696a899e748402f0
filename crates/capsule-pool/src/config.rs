//! Pool configuration and its precedence: explicit fields > `CAPSULE_POOL_*` environment >
//! defaults (front doors apply a config file between the two).

use std::fmt;
use std::time::Duration;

use capsule_session::{ConfigError, SessionConfig};
use serde::Serialize;

/// What happens to a released session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reuse {
    /// Wipe it (namespace back to fresh, tasks cancelled, scratch dir emptied, cwd restored)
    /// in the background and hand it out again.
    Reset,
    /// Shut it down and create a fresh one (strongest isolation between acquirers).
    Replace,
}

impl Reuse {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reuse::Reset => "reset",
            Reuse::Replace => "replace",
        }
    }
}

/// Circuit breaker on session creation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive creation failures that open the breaker (≥ 1).
    /// Env: `CAPSULE_POOL_BREAKER_THRESHOLD`.
    pub threshold: u32,
    /// Backoff after the first opening; doubles on each further opening.
    /// Env: `CAPSULE_POOL_BREAKER_BASE_MS`.
    pub base_backoff: Duration,
    /// Backoff cap. Env: `CAPSULE_POOL_BREAKER_MAX_MS`.
    pub max_backoff: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            threshold: 5,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// Effective settings of one pool.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolConfig {
    /// Idle sessions kept ready. Env: `CAPSULE_POOL_MIN_IDLE`.
    pub min_idle: usize,
    /// Hard cap on sessions (idle + in use + being created or cleaned).
    /// Env: `CAPSULE_POOL_MAX_SESSIONS`.
    pub max_sessions: usize,
    /// Idle sessions beyond `min_idle` unused this long are shut down (`None`: never).
    /// Env: `CAPSULE_POOL_IDLE_TIMEOUT_MS` (0 = never).
    pub idle_timeout: Option<Duration>,
    /// A session that ran this many user cells is replaced on release; the count starts again
    /// at zero for the replacement (`None`: never). Env: `CAPSULE_POOL_RECYCLE_AFTER` (0 = never).
    pub recycle_after_executions: Option<u64>,
    /// A session whose worker's RSS is over this many bytes is replaced on release and evicted
    /// when idle. Env: `CAPSULE_POOL_SESSION_RSS_BUDGET` (bytes, 0 = none).
    pub session_rss_budget: Option<u64>,
    /// When the RSS of all workers is over this many bytes, idle sessions are evicted,
    /// largest first. Env: `CAPSULE_POOL_RSS_BUDGET` (bytes, 0 = none).
    pub pool_rss_budget: Option<u64>,
    /// Wipe or replace released sessions. Env: `CAPSULE_POOL_REUSE` (`reset`/`replace`).
    pub reuse: Reuse,
    /// Modules imported in every new session before it is handed out (`history: false`).
    /// Env: `CAPSULE_POOL_WARM_IMPORTS` (comma-separated).
    pub warm_imports: Vec<String>,
    /// Circuit breaker on creation failures.
    pub breaker: BreakerConfig,
    /// Baseline period of the health check (it also runs on release and worker death).
    /// Env: `CAPSULE_POOL_HEALTH_MS`.
    pub health_interval: Duration,
    /// Create sessions by forking a warm template (the fork server) instead of spawning an
    /// interpreter; forked workers get the same sandbox layers as spawned ones (see
    /// `docs/operations.md`). Plain spawn is always the fallback. Env: `CAPSULE_POOL_FORK`
    /// (`0`/`1`).
    pub fork_server: bool,
    /// While the fork server's template is still starting (it processes `site` and the warm
    /// imports once, tens of ms), create sessions by plain spawn instead of waiting for it; the
    /// template is built in the background and later sessions are forked. `false`: every
    /// creation waits for the template (all sessions forked). Env:
    /// `CAPSULE_POOL_FORK_SPAWN_WHILE_WARMING` (`0`/`1`).
    pub spawn_while_warming: bool,
    /// Configuration of every session.
    pub session: SessionConfig,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            min_idle: 1,
            max_sessions: 16,
            idle_timeout: Some(Duration::from_secs(300)),
            recycle_after_executions: Some(1000),
            session_rss_budget: None,
            pool_rss_budget: None,
            reuse: Reuse::Reset,
            warm_imports: Vec::new(),
            breaker: BreakerConfig::default(),
            health_interval: Duration::from_secs(5),
            fork_server: true,
            spawn_while_warming: true,
            session: SessionConfig::default(),
        }
    }
}

/// `1`/`true`/`yes`/`on` or `0`/`false`/`no`/`off`.
fn parse_flag(key: &'static str, value: String) -> Result<bool, ConfigError> {
    match value.trim() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::Invalid {
            key,
            value,
            reason: "expected 0 or 1".into(),
        }),
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

fn nonzero<T: Default + PartialEq>(v: T) -> Option<T> {
    (v != T::default()).then_some(v)
}

/// Whether `name` is a dotted Python module name (identifiers separated by dots). Warm imports
/// become code, so anything else is refused.
pub fn is_module_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
                && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
        })
}

impl PoolConfig {
    /// Defaults overlaid with the `CAPSULE_POOL_*` and `CAPSULE_*` environment of this process.
    pub fn from_env() -> Result<Self, ConfigError> {
        let session = SessionConfig::from_env()?;
        PoolConfig {
            session,
            ..PoolConfig::default()
        }
        .with_env(|k| std::env::var(k).ok())
    }

    /// Overlays `CAPSULE_POOL_*` settings found through `get` on `self`, then validates.
    pub fn with_env(mut self, get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        if let Some(v) = get("CAPSULE_POOL_MIN_IDLE") {
            self.min_idle = parse_num("CAPSULE_POOL_MIN_IDLE", &v)?;
        }
        if let Some(v) = get("CAPSULE_POOL_MAX_SESSIONS") {
            self.max_sessions = parse_num("CAPSULE_POOL_MAX_SESSIONS", &v)?;
        }
        if let Some(v) = get("CAPSULE_POOL_IDLE_TIMEOUT_MS") {
            self.idle_timeout = nonzero(parse_num::<u64>("CAPSULE_POOL_IDLE_TIMEOUT_MS", &v)?)
                .map(Duration::from_millis);
        }
        if let Some(v) = get("CAPSULE_POOL_RECYCLE_AFTER") {
            self.recycle_after_executions = nonzero(parse_num("CAPSULE_POOL_RECYCLE_AFTER", &v)?);
        }
        if let Some(v) = get("CAPSULE_POOL_SESSION_RSS_BUDGET") {
            self.session_rss_budget = nonzero(parse_num("CAPSULE_POOL_SESSION_RSS_BUDGET", &v)?);
        }
        if let Some(v) = get("CAPSULE_POOL_RSS_BUDGET") {
            self.pool_rss_budget = nonzero(parse_num("CAPSULE_POOL_RSS_BUDGET", &v)?);
        }
        if let Some(v) = get("CAPSULE_POOL_REUSE") {
            self.reuse = match v.trim() {
                "reset" => Reuse::Reset,
                "replace" => Reuse::Replace,
                _ => {
                    return Err(ConfigError::Invalid {
                        key: "CAPSULE_POOL_REUSE",
                        value: v,
                        reason: "expected reset or replace".into(),
                    })
                }
            };
        }
        if let Some(v) = get("CAPSULE_POOL_WARM_IMPORTS") {
            self.warm_imports = v
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
        }
        if let Some(v) = get("CAPSULE_POOL_BREAKER_THRESHOLD") {
            self.breaker.threshold = parse_num("CAPSULE_POOL_BREAKER_THRESHOLD", &v)?;
        }
        if let Some(v) = get("CAPSULE_POOL_BREAKER_BASE_MS") {
            self.breaker.base_backoff =
                Duration::from_millis(parse_num("CAPSULE_POOL_BREAKER_BASE_MS", &v)?);
        }
        if let Some(v) = get("CAPSULE_POOL_BREAKER_MAX_MS") {
            self.breaker.max_backoff =
                Duration::from_millis(parse_num("CAPSULE_POOL_BREAKER_MAX_MS", &v)?);
        }
        if let Some(v) = get("CAPSULE_POOL_FORK_SPAWN_WHILE_WARMING") {
            self.spawn_while_warming = parse_flag("CAPSULE_POOL_FORK_SPAWN_WHILE_WARMING", v)?;
        }
        if let Some(v) = get("CAPSULE_POOL_FORK") {
            self.fork_server = parse_flag("CAPSULE_POOL_FORK", v)?;
        }
        if let Some(v) = get("CAPSULE_POOL_HEALTH_MS") {
            self.health_interval = Duration::from_millis(parse_num("CAPSULE_POOL_HEALTH_MS", &v)?);
        }
        self.validate()?;
        Ok(self)
    }

    /// Checks the settings are coherent (and the session's).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &'static str, value: String, reason: &str| ConfigError::Invalid {
            key,
            value,
            reason: reason.to_string(),
        };
        if self.max_sessions == 0 {
            return Err(bad("max_sessions", "0".into(), "must be at least 1"));
        }
        if self.min_idle > self.max_sessions {
            return Err(bad(
                "min_idle",
                self.min_idle.to_string(),
                "must not exceed max_sessions",
            ));
        }
        if self.breaker.threshold == 0 {
            return Err(bad("breaker.threshold", "0".into(), "must be at least 1"));
        }
        if self.breaker.base_backoff.is_zero()
            || self.breaker.max_backoff < self.breaker.base_backoff
        {
            return Err(bad(
                "breaker.base_backoff",
                format!("{:?}", self.breaker.base_backoff),
                "must be non-zero and at most breaker.max_backoff",
            ));
        }
        if self.health_interval.is_zero() {
            return Err(bad("health_interval", "0".into(), "must be non-zero"));
        }
        if let Some(m) = self.warm_imports.iter().find(|m| !is_module_name(m)) {
            return Err(bad(
                "warm_imports",
                m.clone(),
                "not a dotted Python module name",
            ));
        }
        self.session.validate()
    }

    /// A short stable digest of what makes sessions interchangeable (interpreter, environment,
    /// site, `sys.path`, warm imports): a session made under one fingerprint is never handed out
    /// under another. Logged and reported in [`crate::PoolInfo`].
    pub fn fingerprint(&self) -> String {
        use std::hash::{Hash, Hasher};
        // FNV-1a through the Hasher API: stable across runs (unlike RandomState).
        struct Fnv(u64);
        impl Hasher for Fnv {
            fn finish(&self) -> u64 {
                self.0
            }
            fn write(&mut self, bytes: &[u8]) {
                for b in bytes {
                    self.0 ^= u64::from(*b);
                    self.0 = self.0.wrapping_mul(0x100_0000_01b3);
                }
            }
        }
        let mut h = Fnv(0xcbf2_9ce4_8422_2325);
        self.session.python.hash(&mut h);
        self.session.env.hash(&mut h);
        self.session.enable_site.hash(&mut h);
        self.session.sys_path.hash(&mut h);
        self.warm_imports.hash(&mut h);
        format!("{:?}", self.session.sandbox).hash(&mut h);
        format!("{:016x}", h.finish())
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
        let c = PoolConfig::default()
            .with_env(env(&[
                ("CAPSULE_POOL_MIN_IDLE", "2"),
                ("CAPSULE_POOL_MAX_SESSIONS", "4"),
                ("CAPSULE_POOL_IDLE_TIMEOUT_MS", "0"),
                ("CAPSULE_POOL_REUSE", "replace"),
                ("CAPSULE_POOL_WARM_IMPORTS", "json, decimal,,sqlite3"),
                ("CAPSULE_POOL_RSS_BUDGET", "1000000"),
                ("CAPSULE_POOL_FORK", "on"),
                ("CAPSULE_POOL_FORK_SPAWN_WHILE_WARMING", " 0 "),
            ]))
            .expect("valid");
        assert!(c.fork_server);
        assert!(!c.spawn_while_warming);
        assert_eq!((c.min_idle, c.max_sessions), (2, 4));
        assert_eq!(c.idle_timeout, None);
        assert_eq!(c.reuse, Reuse::Replace);
        assert_eq!(c.warm_imports, ["json", "decimal", "sqlite3"]);
        assert_eq!(c.pool_rss_budget, Some(1_000_000));
    }

    #[test]
    fn incoherent_settings_are_typed_errors() {
        let e = PoolConfig::default()
            .with_env(env(&[("CAPSULE_POOL_MIN_IDLE", "99")]))
            .expect_err("min > max");
        assert!(e.to_string().contains("min_idle"), "{e}");
        let e = PoolConfig::default()
            .with_env(env(&[("CAPSULE_POOL_WARM_IMPORTS", "os; import evil")]))
            .expect_err("not a module");
        assert!(e.to_string().contains("warm_imports"), "{e}");
        let e = PoolConfig::default()
            .with_env(env(&[("CAPSULE_POOL_REUSE", "sometimes")]))
            .expect_err("bad reuse");
        assert!(e.to_string().contains("CAPSULE_POOL_REUSE"), "{e}");
        let e = PoolConfig::default()
            .with_env(env(&[("CAPSULE_POOL_FORK_SPAWN_WHILE_WARMING", "maybe")]))
            .expect_err("bad flag");
        assert!(
            e.to_string()
                .contains("CAPSULE_POOL_FORK_SPAWN_WHILE_WARMING"),
            "{e}"
        );
    }

    #[test]
    fn module_names() {
        assert!(is_module_name("json"));
        assert!(is_module_name("xml.etree.ElementTree"));
        assert!(!is_module_name("1abc"));
        assert!(!is_module_name("a..b"));
        assert!(!is_module_name("os;x"));
    }

    #[test]
    fn fingerprint_depends_on_warm_imports() {
        let a = PoolConfig::default();
        let mut b = a.clone();
        b.warm_imports.push("json".into());
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint(), PoolConfig::default().fingerprint());
    }
}
