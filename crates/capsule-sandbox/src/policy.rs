//! The sandbox [`Policy`]: which layers are required, best-effort or off, the resource limits,
//! the filesystem view, the environment allowlist and the identity the worker runs as.
//!
//! Policies come from presets ([`Policy::strict`], [`Policy::standard`], [`Policy::none`]) or
//! from TOML. A TOML policy starts from a preset (`preset = "strict"`, default `standard`) and
//! overrides only the keys it names, so precedence is: keys in the file > the named preset's
//! values. Unknown keys are rejected (a typo must never silently weaken a policy).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use crate::SandboxError;

/// How much a policy insists on one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerMode {
    /// The layer must be active; if the kernel lacks it, [`crate::prepare`] fails closed.
    Required,
    /// Used when available; a missing layer is reported and logged once.
    BestEffort,
    /// Not applied.
    Off,
}

impl LayerMode {
    /// `true` unless `Off`.
    pub fn wanted(self) -> bool {
        self != LayerMode::Off
    }
}

/// Per-layer modes. Names match [`crate::LayerStatus::name`] and `capsule doctor`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layers {
    /// New user namespace (no capabilities in the host namespace; uid/gid mapped).
    pub user_ns: LayerMode,
    /// New network namespace: only a loopback interface that is down.
    pub net_ns: LayerMode,
    /// New IPC namespace (SysV IPC, POSIX message queues).
    pub ipc_ns: LayerMode,
    /// New UTS namespace (hostname).
    pub uts_ns: LayerMode,
    /// New mount namespace (mount changes, if any were possible, stay private).
    pub mount_ns: LayerMode,
    /// PID namespace. Not implemented (see docs/security.md); `required` always fails closed.
    pub pid_ns: LayerMode,
    /// Landlock filesystem rules (ABI ≥ 1).
    pub landlock: LayerMode,
    /// Landlock TCP bind/connect denial (ABI ≥ 4).
    pub landlock_net: LayerMode,
    /// Landlock signal and abstract-unix-socket scoping (ABI ≥ 6).
    pub landlock_scope: LayerMode,
    /// seccomp-bpf deny list.
    pub seccomp: LayerMode,
    /// `PR_SET_NO_NEW_PRIVS` (also implied by Landlock and seccomp).
    pub no_new_privs: LayerMode,
    /// Resource limits (`setrlimit`).
    pub rlimits: LayerMode,
    /// Per-worker cgroup (memory + pids; v2 delegated subtree or v1 hierarchies).
    pub cgroup: LayerMode,
    /// Run the worker as an unprivileged uid (needed for `RLIMIT_NPROC` and DAC protection when
    /// the host is root). Only possible when the interpreter is readable by that uid.
    pub unprivileged_uid: LayerMode,
    /// The process limit is enforced by something (cgroup pids controller, or `RLIMIT_NPROC`
    /// for a non-root kernel uid). A composite requirement: see docs/security.md.
    pub process_limit: LayerMode,
}

impl Layers {
    fn all(mode: LayerMode) -> Self {
        Layers {
            user_ns: mode,
            net_ns: mode,
            ipc_ns: mode,
            uts_ns: mode,
            mount_ns: mode,
            pid_ns: LayerMode::Off,
            landlock: mode,
            landlock_net: mode,
            landlock_scope: mode,
            seccomp: mode,
            no_new_privs: mode,
            rlimits: mode,
            cgroup: mode,
            unprivileged_uid: mode,
            process_limit: mode,
        }
    }
}

/// Network access of the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// No network at all: the way out is the capability broker (BRIEF §3.9).
    None,
    /// The host's network (only meaningful for the `none` preset).
    Host,
}

/// Resource limits. In TOML a size is an integer of bytes or a string such as `"512MiB"`;
/// `0` or `"unlimited"` means "not set".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// `RLIMIT_AS`: address space in bytes. Exceeding it gives Python a clean `MemoryError`.
    #[serde(deserialize_with = "de_limit")]
    pub address_space: Option<u64>,
    /// cgroup memory limit in bytes (`memory.max` / `memory.limit_in_bytes`); exceeding it is an
    /// OOM kill, classified as [`crate::KillReason::Oom`].
    #[serde(deserialize_with = "de_limit")]
    pub memory: Option<u64>,
    /// `RLIMIT_CPU` soft limit in CPU seconds over the worker's whole life (SIGXCPU at the soft
    /// limit, SIGKILL one second later).
    #[serde(deserialize_with = "de_limit")]
    pub cpu_seconds: Option<u64>,
    /// `RLIMIT_FSIZE`: largest file the worker may write, in bytes.
    #[serde(deserialize_with = "de_limit")]
    pub file_size: Option<u64>,
    /// `RLIMIT_NOFILE`: open file descriptors.
    #[serde(deserialize_with = "de_limit")]
    pub open_files: Option<u64>,
    /// Processes/threads of the worker: cgroup `pids.max`, and `RLIMIT_NPROC` (counted per user
    /// namespace, so per worker) when the worker's kernel uid is not root.
    #[serde(deserialize_with = "de_limit")]
    pub processes: Option<u64>,
    /// Wall-clock budget per cell in milliseconds. Enforced by the session, not this crate.
    #[serde(deserialize_with = "de_limit")]
    pub wall_clock_ms: Option<u64>,
}

/// The filesystem view besides the interpreter, the spec's read paths and the scratch dir.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filesystem {
    /// Grant read+execute on the system paths a dynamically linked CPython needs
    /// (`/usr`, `/lib*`, `/bin`, `/etc/ld.so.cache`, `/etc/localtime`, `/etc/ssl`, ...). See
    /// [`crate::SYSTEM_READ_PATHS`].
    pub system_paths: bool,
    /// Extra read-only paths.
    pub read_paths: Vec<PathBuf>,
    /// Extra paths the worker may execute programs from (default none: no shell, no
    /// `/usr/bin/*`; only the interpreter itself). E.g. `["/usr/bin", "/bin"]`.
    pub exec_paths: Vec<PathBuf>,
    /// Extra read-write paths (beyond the session's scratch dir).
    pub write_paths: Vec<PathBuf>,
}

/// The worker's environment: a fixed clean base plus these.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvPolicy {
    /// Host variables copied when set (names only; empty by default: no host secrets).
    pub passthrough: Vec<String>,
    /// Variables set to fixed values (override the base).
    pub set: BTreeMap<String, String>,
}

/// Which kernel uid the worker runs as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserMode {
    /// Drop to [`Identity::uid`] when the host is root and the interpreter and read paths are
    /// reachable by that uid; otherwise keep the host uid (mapped to [`Identity::inner_uid`]
    /// inside the user namespace, with no capabilities in the host namespace).
    Auto,
    /// Always drop (spawn fails if the host cannot).
    Unprivileged,
    /// Never change the kernel uid.
    Keep,
}

/// Identity knobs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// Dropping policy.
    pub user: UserMode,
    /// Unprivileged kernel uid to drop to (default 65534, `nobody`).
    pub uid: u32,
    /// Unprivileged kernel gid to drop to (default 65534, `nogroup`).
    pub gid: u32,
    /// uid the worker sees inside its user namespace.
    pub inner_uid: u32,
    /// gid the worker sees inside its user namespace.
    pub inner_gid: u32,
}

/// A complete sandbox policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Preset this policy started from (informational; shown in session info).
    pub preset: String,
    /// Layer modes.
    pub layers: Layers,
    /// Network access.
    pub network: Network,
    /// Limits.
    pub limits: Limits,
    /// Filesystem view.
    pub filesystem: Filesystem,
    /// Environment.
    pub env: EnvPolicy,
    /// Identity.
    pub identity: Identity,
}

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

impl Default for Policy {
    fn default() -> Self {
        Policy::standard()
    }
}

impl Policy {
    /// The default: every layer best-effort, no network, generous limits.
    pub fn standard() -> Self {
        Policy {
            preset: "standard".into(),
            layers: Layers::all(LayerMode::BestEffort),
            network: Network::None,
            limits: Limits {
                address_space: Some(4 * GIB),
                memory: Some(2 * GIB),
                cpu_seconds: None,
                file_size: Some(GIB),
                open_files: Some(1024),
                processes: Some(256),
                wall_clock_ms: None,
            },
            filesystem: Filesystem {
                system_paths: true,
                read_paths: Vec::new(),
                exec_paths: Vec::new(),
                write_paths: Vec::new(),
            },
            env: EnvPolicy {
                passthrough: Vec::new(),
                set: BTreeMap::new(),
            },
            identity: Identity {
                user: UserMode::Auto,
                uid: 65534,
                gid: 65534,
                inner_uid: 1000,
                inner_gid: 1000,
            },
        }
    }

    /// Every layer required (except `pid_ns`, not implemented, and `cgroup` and
    /// `unprivileged_uid`, whose jobs `process_limit` and Landlock cover: see docs/security.md),
    /// tighter limits.
    pub fn strict() -> Self {
        let mut p = Policy::standard();
        p.preset = "strict".into();
        p.layers = Layers::all(LayerMode::Required);
        p.layers.cgroup = LayerMode::BestEffort;
        p.layers.unprivileged_uid = LayerMode::BestEffort;
        p.limits = Limits {
            address_space: Some(GIB),
            memory: Some(GIB),
            cpu_seconds: Some(600),
            file_size: Some(256 * MIB),
            open_files: Some(256),
            processes: Some(64),
            wall_clock_ms: None,
        };
        p
    }

    /// No isolation at all (host network, no limits). Only the clean environment remains.
    /// [`crate::prepare`] logs a loud warning every time it is used.
    pub fn none() -> Self {
        Policy {
            preset: "none".into(),
            layers: Layers::all(LayerMode::Off),
            network: Network::Host,
            limits: Limits {
                address_space: None,
                memory: None,
                cpu_seconds: None,
                file_size: None,
                open_files: None,
                processes: None,
                wall_clock_ms: None,
            },
            identity: Identity {
                user: UserMode::Keep,
                ..Policy::standard().identity
            },
            ..Policy::standard()
        }
    }

    /// A preset by name: `strict`, `standard` (alias `default`) or `none`.
    pub fn preset(name: &str) -> Result<Policy, SandboxError> {
        match name.trim().to_ascii_lowercase().as_str() {
            "strict" => Ok(Policy::strict()),
            "standard" | "default" => Ok(Policy::standard()),
            "none" | "off" => Ok(Policy::none()),
            other => Err(SandboxError::UnknownPreset(other.to_string())),
        }
    }

    /// Parse a TOML policy. `preset = "..."` selects the base (default `standard`); every other
    /// key overrides that preset's value.
    pub fn from_toml_str(text: &str) -> Result<Policy, SandboxError> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| SandboxError::InvalidPolicy(e.to_string()))?;
        let base_name = match table.get("preset") {
            None => "standard",
            Some(toml::Value::String(s)) => s.as_str(),
            Some(_) => {
                return Err(SandboxError::InvalidPolicy(
                    "`preset` must be a string".into(),
                ))
            }
        };
        let base = Policy::preset(base_name)?;
        let mut merged =
            serde_json::to_value(&base).map_err(|e| SandboxError::InvalidPolicy(e.to_string()))?;
        let overrides =
            serde_json::to_value(&table).map_err(|e| SandboxError::InvalidPolicy(e.to_string()))?;
        merge(&mut merged, overrides);
        let mut policy: Policy = serde_json::from_value(merged)
            .map_err(|e| SandboxError::InvalidPolicy(e.to_string()))?;
        policy.preset = Policy::preset(base_name)?.preset;
        policy.validate()?;
        Ok(policy)
    }

    /// Read and parse a TOML policy file.
    pub fn from_file(path: &Path) -> Result<Policy, SandboxError> {
        let text = std::fs::read_to_string(path).map_err(|source| SandboxError::PolicyFile {
            path: path.to_path_buf(),
            source,
        })?;
        Policy::from_toml_str(&text)
    }

    /// Reject contradictory settings.
    pub fn validate(&self) -> Result<(), SandboxError> {
        if self.network == Network::Host
            && (self.layers.net_ns == LayerMode::Required
                || self.layers.landlock_net == LayerMode::Required)
        {
            return Err(SandboxError::InvalidPolicy(
                "network = \"host\" contradicts a required net_ns/landlock_net layer".into(),
            ));
        }
        if self.identity.user == UserMode::Unprivileged && self.identity.uid == 0 {
            return Err(SandboxError::InvalidPolicy(
                "identity.user = \"unprivileged\" needs a non-zero identity.uid".into(),
            ));
        }
        for p in self
            .filesystem
            .read_paths
            .iter()
            .chain(&self.filesystem.write_paths)
            .chain(&self.filesystem.exec_paths)
        {
            if !p.is_absolute() {
                return Err(SandboxError::InvalidPolicy(format!(
                    "filesystem path {} must be absolute",
                    p.display()
                )));
            }
        }
        Ok(())
    }

    /// `true` when no isolation layer at all is wanted (the `none` preset or equivalent).
    pub fn is_unconfined(&self) -> bool {
        let l = &self.layers;
        ![
            l.user_ns,
            l.net_ns,
            l.ipc_ns,
            l.uts_ns,
            l.mount_ns,
            l.landlock,
            l.landlock_net,
            l.landlock_scope,
            l.seccomp,
            l.no_new_privs,
            l.rlimits,
            l.cgroup,
        ]
        .iter()
        .any(|m| m.wanted())
    }
}

/// Deep-merge `over` into `base` (objects merge key by key; anything else replaces).
fn merge(base: &mut serde_json::Value, over: serde_json::Value) {
    match (base, over) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Parse a limit: integer (0 = unset), `null`, or a string like `"4GiB"`, `"512M"`, `"unlimited"`.
fn de_limit<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }
    let raw: Option<Raw> = Option::deserialize(d)?;
    match raw {
        None | Some(Raw::Int(0)) => Ok(None),
        Some(Raw::Int(n)) => Ok(Some(n)),
        Some(Raw::Text(s)) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

/// Parse `"4GiB"`, `"512 MB"`, `"100k"`, `"unlimited"` into bytes (binary multiples).
pub fn parse_size(s: &str) -> Result<Option<u64>, String> {
    let t = s.trim().to_ascii_lowercase();
    if t == "unlimited" || t == "none" || t == "0" {
        return Ok(None);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size `{s}`: expected a number with an optional unit"))?;
    let mult: u64 = match unit.trim() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("invalid size unit `{other}` in `{s}`")),
    };
    n.checked_mul(mult)
        .map(|v| if v == 0 { None } else { Some(v) })
        .ok_or_else(|| format!("size `{s}` overflows"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_by_name() {
        assert_eq!(
            Policy::preset("strict").unwrap_or_default(),
            Policy::strict()
        );
        assert_eq!(
            Policy::preset("Standard").unwrap_or_default(),
            Policy::standard()
        );
        assert_eq!(Policy::preset("none").unwrap_or_default(), Policy::none());
        assert!(matches!(
            Policy::preset("lax"),
            Err(SandboxError::UnknownPreset(_))
        ));
        assert_eq!(Policy::default(), Policy::standard());
    }

    #[test]
    fn preset_shapes() {
        let s = Policy::strict();
        assert_eq!(s.layers.landlock, LayerMode::Required);
        assert_eq!(s.layers.seccomp, LayerMode::Required);
        assert_eq!(s.layers.pid_ns, LayerMode::Off);
        assert_eq!(s.network, Network::None);
        let st = Policy::standard();
        assert_eq!(st.layers.landlock, LayerMode::BestEffort);
        assert!(st.limits.address_space > s.limits.address_space);
        assert!(Policy::none().is_unconfined());
        assert!(!st.is_unconfined());
        assert!(st.env.passthrough.is_empty());
    }

    #[test]
    fn toml_overrides_preset_keys_only() {
        let p = Policy::from_toml_str(
            r#"
            preset = "strict"
            [limits]
            address_space = "512MiB"
            cpu_seconds = 0
            [layers]
            cgroup = "off"
            [env.set]
            FOO = "bar"
            "#,
        )
        .expect("parse");
        assert_eq!(p.preset, "strict");
        assert_eq!(p.limits.address_space, Some(512 << 20));
        assert_eq!(p.limits.cpu_seconds, None);
        assert_eq!(p.limits.processes, Policy::strict().limits.processes);
        assert_eq!(p.layers.cgroup, LayerMode::Off);
        assert_eq!(p.layers.landlock, LayerMode::Required);
        assert_eq!(p.env.set.get("FOO").map(String::as_str), Some("bar"));
    }

    #[test]
    fn toml_default_base_is_standard() {
        let p = Policy::from_toml_str("[limits]\nopen_files = 64\n").expect("parse");
        assert_eq!(p.preset, "standard");
        assert_eq!(p.limits.open_files, Some(64));
        assert_eq!(p.layers, Policy::standard().layers);
    }

    #[test]
    fn toml_rejects_typos_and_bad_values() {
        for bad in [
            "[limits]\naddress_spase = 1\n",
            "[layers]\nlandlock = \"maybe\"\n",
            "[limits]\nmemory = \"12 parsecs\"\n",
            "preset = 3\n",
            "preset = \"lax\"\n",
            "network = \"host\"\n[layers]\nnet_ns = \"required\"\n",
            "[filesystem]\nread_paths = [\"relative/dir\"]\n",
        ] {
            assert!(Policy::from_toml_str(bad).is_err(), "accepted: {bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4GiB"), Ok(Some(4 << 30)));
        assert_eq!(parse_size("512 mb"), Ok(Some(512 << 20)));
        assert_eq!(parse_size("100k"), Ok(Some(100 << 10)));
        assert_eq!(parse_size("12"), Ok(Some(12)));
        assert_eq!(parse_size("unlimited"), Ok(None));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999999999999T").is_err());
    }
}
