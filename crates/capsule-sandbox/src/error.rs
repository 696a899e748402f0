//! Typed errors of the sandbox crate. Every failure names the layer it concerns, so a session
//! that refuses to start (fail closed, BRIEF §3.10) can say which layer and why.

use std::path::PathBuf;

/// Everything that can go wrong while preparing or applying a sandbox.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// A layer the policy marks `required` is not available on this kernel/host.
    #[error("sandbox layer `{layer}` is required by the policy but unavailable: {reason}")]
    LayerUnavailable {
        /// Layer name as shown by `capsule doctor` (e.g. `landlock`, `user_ns`).
        layer: &'static str,
        /// Why it is unavailable (kernel reason or errno).
        reason: String,
    },
    /// Unknown preset name.
    #[error("unknown sandbox policy preset `{0}` (known: strict, standard, none)")]
    UnknownPreset(String),
    /// The policy text could not be parsed or has invalid values.
    #[error("invalid sandbox policy: {0}")]
    InvalidPolicy(String),
    /// A policy file could not be read.
    #[error("cannot read sandbox policy file {path}: {source}")]
    PolicyFile {
        /// File that was read.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The spawn spec is unusable (e.g. a path that does not exist).
    #[error("invalid spawn spec: {0}")]
    InvalidSpec(String),
    /// Setting a layer up in the parent failed.
    #[error("sandbox layer `{layer}` setup failed: {reason}")]
    Setup {
        /// Layer name.
        layer: &'static str,
        /// What failed.
        reason: String,
    },
    /// Applying a layer in the forked child failed (reported by [`crate::Prepared::explain_spawn_error`]).
    #[error("sandbox layer `{layer}` failed in the child before exec: {source}")]
    ChildSetup {
        /// Layer (step) that failed.
        layer: &'static str,
        /// The errno it failed with.
        source: std::io::Error,
    },
}
