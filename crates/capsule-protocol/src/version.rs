//! Version and encoding negotiation (see `docs/VERSIONING.md`).
//!
//! One counter. The worker offers `min_version..=max_version` in its `hello`; the host picks the
//! highest version both speak and answers with `hello_ack`. A message or field introduced in a
//! later version is never sent to a peer that negotiated an earlier one.

use crate::error::ProtocolError;
use crate::message::{Hello, HOST_FEATURES};

/// Lowest protocol version this crate speaks.
pub const MIN_VERSION: u32 = 1;
/// Highest protocol version this crate speaks.
pub const MAX_VERSION: u32 = 1;

/// What negotiation settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The protocol version both speak.
    pub version: u32,
    /// The header encoding.
    pub encoding: String,
    /// Features both support.
    pub features: Vec<String>,
}

/// Picks the highest common version, the first common encoding, and the common features.
pub fn negotiate(hello: &Hello) -> Result<Negotiated, ProtocolError> {
    let version = MAX_VERSION.min(hello.max_version);
    if version < MIN_VERSION.max(hello.min_version) || hello.min_version > hello.max_version {
        return Err(ProtocolError::VersionMismatch {
            host_min: MIN_VERSION,
            host_max: MAX_VERSION,
            worker_min: hello.min_version,
            worker_max: hello.max_version,
        });
    }
    let encoding = hello
        .encodings
        .iter()
        .find(|e| e.as_str() == "json")
        .cloned()
        .ok_or_else(|| ProtocolError::NoCommonEncoding {
            offered: hello.encodings.clone(),
        })?;
    let features = hello
        .features
        .iter()
        .filter(|f| HOST_FEATURES.contains(&f.as_str()))
        .cloned()
        .collect();
    Ok(Negotiated {
        version,
        encoding,
        features,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(min: u32, max: u32, enc: &[&str]) -> Hello {
        Hello {
            min_version: min,
            max_version: max,
            encodings: enc.iter().map(|s| s.to_string()).collect(),
            features: vec!["tla".into(), "future-thing".into()],
            python: "3.11.7".into(),
            implementation: "cpython".into(),
            executable: "/usr/bin/python3".into(),
            pid: 1,
        }
    }

    #[test]
    fn picks_the_highest_common_version_and_common_features() {
        let n = negotiate(&hello(1, 7, &["msgpack", "json"])).expect("ok");
        assert_eq!(n.version, 1);
        assert_eq!(n.encoding, "json");
        assert_eq!(n.features, vec!["tla".to_string()]);
    }

    #[test]
    fn refuses_a_worker_that_only_speaks_newer_versions() {
        assert!(matches!(
            negotiate(&hello(2, 3, &["json"])),
            Err(ProtocolError::VersionMismatch { .. })
        ));
    }

    #[test]
    fn refuses_a_worker_without_json() {
        assert!(matches!(
            negotiate(&hello(1, 1, &["msgpack"])),
            Err(ProtocolError::NoCommonEncoding { .. })
        ));
    }
}
