//! The circuit breaker on session creation: closed → open after `threshold` consecutive
//! failures → (after an exponential backoff with jitter) half-open, one probe → closed on its
//! success, open again (longer backoff) on its failure.
//!
//! Pure state machine over explicit instants: no IO, no clock reads, no locks, so it is unit
//! tested without timing. The pool owns it under its state lock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::BreakerConfig;

/// Breaker state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Creations are attempted.
    Closed,
    /// Creations are refused until the backoff deadline.
    Open,
    /// One probe creation is allowed; its result decides.
    HalfOpen,
}

impl BreakerState {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// One state change.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BreakerTransition {
    /// Previous state.
    pub from: BreakerState,
    /// New state.
    pub to: BreakerState,
    /// Milliseconds since the pool started.
    pub at_ms: f64,
    /// Why (the failure message when opening).
    pub reason: String,
}

/// Most transitions kept for [`crate::PoolInfo`] (older ones are counted, not kept).
pub const MAX_TRANSITIONS: usize = 64;

#[derive(Debug)]
pub(crate) struct Breaker {
    cfg: BreakerConfig,
    origin: Instant,
    pub state: BreakerState,
    pub consecutive_failures: u32,
    /// Consecutive openings without a success (the backoff exponent).
    opens: u32,
    pub open_until: Option<Instant>,
    probe_in_flight: bool,
    pub last_error: Option<String>,
    pub transitions: VecDeque<BreakerTransition>,
    pub transitions_total: u64,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig, origin: Instant) -> Self {
        Breaker {
            cfg,
            origin,
            state: BreakerState::Closed,
            consecutive_failures: 0,
            opens: 0,
            open_until: None,
            probe_in_flight: false,
            last_error: None,
            transitions: VecDeque::new(),
            transitions_total: 0,
        }
    }

    fn go(&mut self, to: BreakerState, now: Instant, reason: String) {
        if self.state == to {
            return;
        }
        tracing::info!(from = self.state.as_str(), to = to.as_str(), %reason, "pool circuit breaker");
        if self.transitions.len() == MAX_TRANSITIONS {
            self.transitions.pop_front();
        }
        self.transitions.push_back(BreakerTransition {
            from: self.state,
            to,
            at_ms: now.saturating_duration_since(self.origin).as_secs_f64() * 1000.0,
            reason,
        });
        self.transitions_total += 1;
        self.state = to;
    }

    /// Whether a creation may start now; `Err(retry_in)` if not. Moves open → half-open once
    /// the deadline passed (the caller's creation is then the probe).
    pub fn try_acquire(&mut self, now: Instant) -> Result<(), Duration> {
        match self.state {
            BreakerState::Closed => Ok(()),
            BreakerState::Open => {
                let until = self.open_until.unwrap_or(now);
                if now >= until {
                    self.go(
                        BreakerState::HalfOpen,
                        now,
                        "backoff elapsed; probing".into(),
                    );
                    self.probe_in_flight = true;
                    Ok(())
                } else {
                    Err(until - now)
                }
            }
            BreakerState::HalfOpen => {
                if self.probe_in_flight {
                    Err(Duration::ZERO)
                } else {
                    self.probe_in_flight = true;
                    Ok(())
                }
            }
        }
    }

    /// Whether [`Breaker::try_acquire`] would refuse now (no state change).
    pub fn refuses(&self, now: Instant) -> Option<Duration> {
        match self.state {
            BreakerState::Closed => None,
            BreakerState::Open => {
                let until = self.open_until.unwrap_or(now);
                (now < until).then(|| until - now)
            }
            BreakerState::HalfOpen => self.probe_in_flight.then_some(Duration::ZERO),
        }
    }

    pub fn on_success(&mut self, now: Instant) {
        self.consecutive_failures = 0;
        self.opens = 0;
        self.probe_in_flight = false;
        self.open_until = None;
        self.go(BreakerState::Closed, now, "a session was created".into());
    }

    /// `jitter` in [0, 1): the random part of the backoff.
    pub fn on_failure(&mut self, error: String, now: Instant, jitter: f64) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.last_error = Some(error.clone());
        match self.state {
            BreakerState::Closed if self.consecutive_failures >= self.cfg.threshold => {
                self.open(error, now, jitter)
            }
            BreakerState::HalfOpen => {
                self.probe_in_flight = false;
                self.open(error, now, jitter)
            }
            _ => {}
        }
    }

    fn open(&mut self, error: String, now: Instant, jitter: f64) {
        let exp = self.opens.min(20);
        let full = self
            .cfg
            .base_backoff
            .saturating_mul(1u32 << exp)
            .min(self.cfg.max_backoff);
        // "Equal jitter": half fixed, half random, so retries of many pools spread out but
        // never come back sooner than half the backoff.
        let backoff = full / 2 + full.mul_f64(jitter.clamp(0.0, 1.0) / 2.0);
        self.opens += 1;
        self.open_until = Some(now + backoff);
        self.go(BreakerState::Open, now, error);
    }
}

/// A random number in [0, 1) for jitter (std's per-process random hasher keys; no crate).
pub(crate) fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            threshold: 2,
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
        }
    }

    #[test]
    fn opens_after_threshold_probes_then_closes() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg(), t0);
        assert!(b.try_acquire(t0).is_ok());
        b.on_failure("boom".into(), t0, 0.0);
        assert_eq!(b.state, BreakerState::Closed);
        b.on_failure("boom".into(), t0, 0.0);
        assert_eq!(b.state, BreakerState::Open);
        // backoff 100 ms, jitter 0 → 50 ms.
        assert_eq!(b.try_acquire(t0), Err(Duration::from_millis(50)));
        let t1 = t0 + Duration::from_millis(50);
        assert!(b.try_acquire(t1).is_ok());
        assert_eq!(b.state, BreakerState::HalfOpen);
        assert_eq!(b.try_acquire(t1), Err(Duration::ZERO), "single probe");
        b.on_failure("still".into(), t1, 1.0);
        assert_eq!(b.state, BreakerState::Open);
        // second opening: 200 ms, jitter 1 → 200 ms.
        assert_eq!(b.refuses(t1), Some(Duration::from_millis(200)));
        let t2 = t1 + Duration::from_millis(200);
        assert!(b.try_acquire(t2).is_ok());
        b.on_success(t2);
        assert_eq!(b.state, BreakerState::Closed);
        let path: Vec<_> = b.transitions.iter().map(|t| t.to).collect();
        assert_eq!(
            path,
            [
                BreakerState::Open,
                BreakerState::HalfOpen,
                BreakerState::Open,
                BreakerState::HalfOpen,
                BreakerState::Closed
            ]
        );
    }

    #[test]
    fn backoff_is_capped() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg(), t0);
        for _ in 0..10 {
            b.on_failure("x".into(), t0, 1.0);
            let _ = b.try_acquire(t0 + Duration::from_secs(100));
        }
        b.on_failure("x".into(), t0, 1.0);
        assert!(b
            .refuses(t0)
            .is_some_and(|d| d <= Duration::from_millis(300)));
    }

    #[test]
    fn jitter_is_in_range() {
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j));
        }
    }
}
