//! Counters and bounded histograms (relaxed atomics: metrics only) and the [`PoolInfo`]
//! snapshot types.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::breaker::{BreakerState, BreakerTransition};
use crate::config::{PoolConfig, Reuse};

/// Upper bounds (µs) of the histogram buckets; one more bucket catches everything above.
pub const BUCKETS_US: [u64; 20] = [
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000,
    200_000, 500_000, 1_000_000, 5_000_000,
];

/// A latency histogram with fixed buckets (bounded memory, lock-free recording).
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    counts: [AtomicU64; BUCKETS_US.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn record(&self, d: Duration) {
        let us = d.as_micros() as u64;
        let i = BUCKETS_US.partition_point(|&b| b < us);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let count: u64 = counts.iter().sum();
        let quantile = |q: f64| -> Option<u64> {
            if count == 0 {
                return None;
            }
            let rank = ((count as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return Some(BUCKETS_US.get(i).copied().unwrap_or(u64::MAX));
                }
            }
            None
        };
        HistogramSnapshot {
            count,
            mean_us: if count == 0 {
                0.0
            } else {
                self.sum_ns.load(Ordering::Relaxed) as f64 / count as f64 / 1000.0
            },
            p50_le_us: quantile(0.5),
            p99_le_us: quantile(0.99),
            buckets: BUCKETS_US
                .iter()
                .map(|b| Some(*b))
                .chain(std::iter::once(None))
                .zip(counts)
                .filter(|(_, c)| *c > 0)
                .map(|(le_us, count)| Bucket { le_us, count })
                .collect(),
        }
    }
}

/// One non-empty histogram bucket.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Bucket {
    /// Upper bound in µs (`None`: above the last bound).
    pub le_us: Option<u64>,
    /// Samples in the bucket.
    pub count: u64,
}

/// A histogram snapshot. Quantiles are bucket upper bounds ("p50 ≤ x µs").
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HistogramSnapshot {
    /// Samples.
    pub count: u64,
    /// Exact mean (µs).
    pub mean_us: f64,
    /// Upper bound of the bucket holding the median.
    pub p50_le_us: Option<u64>,
    /// Upper bound of the bucket holding the 99th percentile.
    pub p99_le_us: Option<u64>,
    /// Non-empty buckets.
    pub buckets: Vec<Bucket>,
}

/// Why a session left the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EvictReason {
    /// Its worker died (or the session closed).
    Dead,
    /// Idle longer than `idle_timeout` (beyond `min_idle`).
    IdleTimeout,
    /// Ran `recycle_after_executions` cells.
    Recycled,
    /// Over the per-session RSS budget.
    SessionRss,
    /// Evicted (largest first) because the pool was over its RSS budget.
    PoolRss,
    /// Released under `reuse = replace`, or discarded by its holder.
    Replaced,
    /// Released with a cell still running or queued.
    Busy,
    /// The reset between users failed.
    ResetFailed,
    /// The pool stopped.
    Stopped,
}

impl EvictReason {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            EvictReason::Dead => "dead",
            EvictReason::IdleTimeout => "idle_timeout",
            EvictReason::Recycled => "recycled",
            EvictReason::SessionRss => "session_rss",
            EvictReason::PoolRss => "pool_rss",
            EvictReason::Replaced => "replaced",
            EvictReason::Busy => "busy",
            EvictReason::ResetFailed => "reset_failed",
            EvictReason::Stopped => "stopped",
        }
    }
}

/// How a session's worker was created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CreatePath {
    /// A fresh interpreter process (`posix_spawn`/fork+exec).
    Spawn,
    /// Forked from the warm template (the fork server).
    Fork,
}

impl CreatePath {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            CreatePath::Spawn => "spawn",
            CreatePath::Fork => "fork",
        }
    }
}

/// The configuration, as reported.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConfigSummary {
    /// `min_idle`.
    pub min_idle: usize,
    /// `max_sessions`.
    pub max_sessions: usize,
    /// `idle_timeout` in ms.
    pub idle_timeout_ms: Option<u64>,
    /// `recycle_after_executions`.
    pub recycle_after_executions: Option<u64>,
    /// `session_rss_budget` (bytes).
    pub session_rss_budget: Option<u64>,
    /// `pool_rss_budget` (bytes).
    pub pool_rss_budget: Option<u64>,
    /// `reuse`.
    pub reuse: Reuse,
    /// `warm_imports`.
    pub warm_imports: Vec<String>,
    /// `breaker.threshold`.
    pub breaker_threshold: u32,
    /// `breaker.base_backoff` in ms.
    pub breaker_base_backoff_ms: u64,
    /// `breaker.max_backoff` in ms.
    pub breaker_max_backoff_ms: u64,
    /// `health_interval` in ms.
    pub health_interval_ms: u64,
    /// `fork_server`.
    pub fork_server: bool,
    /// The session interpreter as configured.
    pub python: Option<String>,
}

impl From<&PoolConfig> for ConfigSummary {
    fn from(c: &PoolConfig) -> Self {
        ConfigSummary {
            min_idle: c.min_idle,
            max_sessions: c.max_sessions,
            idle_timeout_ms: c.idle_timeout.map(|d| d.as_millis() as u64),
            recycle_after_executions: c.recycle_after_executions,
            session_rss_budget: c.session_rss_budget,
            pool_rss_budget: c.pool_rss_budget,
            reuse: c.reuse,
            warm_imports: c.warm_imports.clone(),
            breaker_threshold: c.breaker.threshold,
            breaker_base_backoff_ms: c.breaker.base_backoff.as_millis() as u64,
            breaker_max_backoff_ms: c.breaker.max_backoff.as_millis() as u64,
            health_interval_ms: c.health_interval.as_millis() as u64,
            fork_server: c.fork_server,
            python: c.session.python.as_ref().map(|p| p.display().to_string()),
        }
    }
}

/// Results of one warm import across the pool's sessions.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct WarmImportInfo {
    /// Module name.
    pub module: String,
    /// Sessions where it imported.
    pub successes: u64,
    /// Sessions where it failed.
    pub failures: u64,
    /// Latency of the last attempt (ms).
    pub last_latency_ms: f64,
    /// Mean latency over all attempts (ms).
    pub mean_latency_ms: f64,
    /// The last failure (`ModuleNotFoundError: ...`).
    pub last_error: Option<String>,
}

/// The breaker, as reported.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BreakerInfo {
    /// Current state.
    pub state: BreakerState,
    /// Creation failures since the last success.
    pub consecutive_failures: u32,
    /// When open: time until a probe is allowed (ms).
    pub retry_in_ms: Option<f64>,
    /// The last creation failure.
    pub last_error: Option<String>,
    /// Recent transitions (at most [`crate::breaker::MAX_TRANSITIONS`]).
    pub transitions: Vec<BreakerTransition>,
    /// All transitions since start.
    pub transitions_total: u64,
}

/// One session, as reported.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SessionSummary {
    /// Pool-local key.
    pub key: u64,
    /// Session id.
    pub id: String,
    /// Worker pid.
    pub pid: Option<u32>,
    /// `idle`, `active` (handed out) or `returning` (being checked and cleaned).
    pub state: &'static str,
    /// Worker RSS at the last health pass or release (bytes).
    pub rss_bytes: Option<u64>,
    /// User cells run since this session was created (the recycle counter).
    pub executions: u64,
    /// Times handed out.
    pub uses: u64,
    /// Age (ms).
    pub age_ms: f64,
}

/// A snapshot of the pool.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PoolInfo {
    /// Effective configuration.
    pub config: ConfigSummary,
    /// See [`PoolConfig::fingerprint`].
    pub fingerprint: String,
    /// Whether `stop` was called.
    pub stopped: bool,
    /// Ready sessions.
    pub idle: usize,
    /// Handed-out sessions.
    pub active: usize,
    /// Sessions being created.
    pub creating: usize,
    /// Released sessions being checked and cleaned.
    pub returning: usize,
    /// idle + active + creating + returning (never above `max_sessions`).
    pub total: usize,
    /// Acquirers waiting.
    pub waiters: usize,
    /// Acquires served from idle sessions.
    pub hits: u64,
    /// Acquires that had to wait (for a creation or a release).
    pub misses: u64,
    /// hits / (hits + misses).
    pub hit_rate: f64,
    /// Acquires that timed out.
    pub timeouts: u64,
    /// Acquires that failed otherwise (breaker, creation, stop).
    pub acquire_errors: u64,
    /// Latency of successful acquires (hits and waits).
    pub acquire_latency: HistogramSnapshot,
    /// Latency of acquires served from an idle session (the hot path).
    pub hit_latency: HistogramSnapshot,
    /// Sessions created, all paths.
    pub sessions_created: u64,
    /// Sessions created by path.
    pub created_by_path: BTreeMap<&'static str, u64>,
    /// Creation latency (start to warm, ready to hand out) by path.
    pub creation_latency: BTreeMap<&'static str, HistogramSnapshot>,
    /// Failed creations.
    pub creation_failures: u64,
    /// The fork server.
    pub fork: crate::fork::ForkInfo,
    /// Sessions evicted, by reason.
    pub evictions: BTreeMap<&'static str, u64>,
    /// Circuit breaker.
    pub breaker: BreakerInfo,
    /// Warm import results.
    pub warm_imports: Vec<WarmImportInfo>,
    /// Health passes run.
    pub health_passes: u64,
    /// Sum of the known worker RSS (bytes).
    pub rss_bytes_total: u64,
    /// Every live session.
    pub sessions: Vec<SessionSummary>,
}

impl PoolInfo {
    /// Evictions for one reason.
    pub fn evicted(&self, reason: EvictReason) -> u64 {
        self.evictions.get(reason.as_str()).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_bucket_bounds() {
        let h = Histogram::default();
        for _ in 0..98 {
            h.record(Duration::from_micros(7));
        }
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 100);
        assert_eq!(s.p50_le_us, Some(10));
        assert_eq!(s.p99_le_us, Some(5_000));
        assert_eq!(s.buckets.last().map(|b| b.le_us), Some(None));
    }
}
