//! The routing table between the reader task and the executions' event channels.
//!
//! **Invariant (exactly one outcome):** an execution's entry is removed under the lock by
//! whoever emits its outcome (the reader for worker-reported outcomes, the actor for outcomes only
//! the host can know). Whoever removes it sends the outcome; nobody else can. The lock is never
//! held across an `.await`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use capsule_protocol::Stream;
use tokio::sync::mpsc;

use crate::event::{Event, Outcome, OutcomeStatus, Truncation};

/// Why a cancel was sent for an execution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CancelReason {
    /// The client asked.
    User,
    /// The deadline passed.
    Deadline,
}

/// Per-execution routing state.
pub(crate) struct Route {
    /// Events to the client. Bounded: a slow client backpressures the reader, and through the
    /// pipes the worker; nothing is dropped.
    pub tx: mpsc::Sender<Event>,
    /// Set when a cancel was sent; turns a worker-reported `cancelled` into `timed_out`.
    pub cancel_reason: Option<CancelReason>,
    /// When the execution was submitted (for host-made outcomes' duration).
    pub submitted: Instant,
    /// Output bytes seen so far.
    used: u64,
    /// Output bytes dropped over the budget.
    dropped: u64,
    /// Incomplete UTF-8 tails per stream (stdout, stderr).
    partial: [Vec<u8>; 2],
    /// Input requests the worker made and nobody answered yet. Only replies to these are
    /// forwarded, so a client cannot fill the data pipe with replies nobody asked for.
    inputs: std::collections::HashSet<String>,
}

/// The table.
pub(crate) struct Routes {
    inner: Mutex<HashMap<String, Route>>,
    budget: u64,
}

fn idx(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

/// Decodes `bytes` appended to `partial`, keeping an incomplete trailing sequence for later.
fn decode_utf8(partial: &mut Vec<u8>, bytes: &[u8]) -> String {
    partial.extend_from_slice(bytes);
    let keep = incomplete_tail(partial);
    let split = partial.len() - keep;
    let text = String::from_utf8_lossy(&partial[..split]).into_owned();
    partial.drain(..split);
    text
}

/// Length of a trailing, possibly incomplete UTF-8 sequence (0..=3 bytes).
fn incomplete_tail(buf: &[u8]) -> usize {
    let n = buf.len();
    for back in 1..=3.min(n) {
        let b = buf[n - back];
        if b & 0b1100_0000 == 0b1000_0000 {
            continue; // continuation byte: look further back for the lead
        }
        let need = if b & 0b1110_0000 == 0b1100_0000 {
            2
        } else if b & 0b1111_0000 == 0b1110_0000 {
            3
        } else if b & 0b1111_1000 == 0b1111_0000 {
            4
        } else {
            return 0;
        };
        return if need > back { back } else { 0 };
    }
    0
}

/// What the reader must send for one output chunk.
pub(crate) struct Routed {
    pub tx: mpsc::Sender<Event>,
    pub event: Option<Event>,
}

impl Routes {
    pub fn new(budget: u64) -> Self {
        Routes {
            inner: Mutex::new(HashMap::new()),
            budget,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Route>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts and
        // removes), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, exec: String, tx: mpsc::Sender<Event>) {
        self.lock().insert(
            exec,
            Route {
                tx,
                cancel_reason: None,
                submitted: Instant::now(),
                used: 0,
                dropped: 0,
                partial: [Vec::new(), Vec::new()],
                inputs: std::collections::HashSet::new(),
            },
        );
    }

    pub fn contains(&self, exec: &str) -> bool {
        self.lock().contains_key(exec)
    }

    /// Marks an execution as cancelled for `reason` unless it already was. Returns the reason
    /// in force, or `None` if the execution is unknown.
    pub fn mark_cancel(&self, exec: &str, reason: CancelReason) -> Option<CancelReason> {
        let mut g = self.lock();
        let r = g.get_mut(exec)?;
        Some(*r.cancel_reason.get_or_insert(reason))
    }

    pub fn cancel_reason(&self, exec: &str) -> Option<CancelReason> {
        self.lock().get(exec).and_then(|r| r.cancel_reason)
    }

    /// Accounts an output chunk and returns what to send. `None` when the execution is unknown.
    pub fn output(&self, exec: &str, stream: Stream, bytes: &[u8]) -> Option<Routed> {
        let mut g = self.lock();
        let r = g.get_mut(exec)?;
        let room = self.budget.saturating_sub(r.used);
        let take = (bytes.len() as u64).min(room) as usize;
        r.used += take as u64;
        r.dropped += (bytes.len() - take) as u64;
        let text = decode_utf8(&mut r.partial[idx(stream)], &bytes[..take]);
        Some(Routed {
            tx: r.tx.clone(),
            event: (!text.is_empty()).then_some(Event::Output { stream, text }),
        })
    }

    /// Records an input request of `exec`; returns its event sender.
    pub fn input_requested(&self, exec: &str, req: &str) -> Option<mpsc::Sender<Event>> {
        let mut g = self.lock();
        let r = g.get_mut(exec)?;
        r.inputs.insert(req.to_string());
        Some(r.tx.clone())
    }

    /// Whether `req` is an unanswered input request of `exec`; if so it counts as answered.
    pub fn take_input(&self, exec: &str, req: &str) -> bool {
        self.lock()
            .get_mut(exec)
            .is_some_and(|r| r.inputs.remove(req))
    }

    /// A non-output event for an execution.
    pub fn sender(&self, exec: &str) -> Option<mpsc::Sender<Event>> {
        self.lock().get(exec).map(|r| r.tx.clone())
    }

    /// Removes the execution and returns the events that end it: any undecodable output tail,
    /// a truncation marker, then the outcome. `None` if someone else already ended it.
    pub fn finish(
        &self,
        exec: &str,
        status: impl FnOnce(Option<CancelReason>) -> OutcomeStatus,
        duration_ms: Option<f64>,
    ) -> Option<(mpsc::Sender<Event>, Vec<Event>)> {
        let mut r = self.lock().remove(exec)?;
        let mut events = Vec::new();
        for stream in [Stream::Stdout, Stream::Stderr] {
            let tail = std::mem::take(&mut r.partial[idx(stream)]);
            if !tail.is_empty() {
                events.push(Event::Output {
                    stream,
                    text: String::from_utf8_lossy(&tail).into_owned(),
                });
            }
        }
        let truncated = (r.dropped > 0).then_some(Truncation {
            dropped_bytes: r.dropped,
            budget: self.budget,
        });
        if let Some(t) = truncated {
            events.push(Event::Output {
                stream: Stream::Stderr,
                text: format!(
                    "\n[capsule: output truncated: {} bytes over the {}-byte budget of this cell were dropped]\n",
                    t.dropped_bytes, t.budget
                ),
            });
        }
        let duration_ms =
            duration_ms.unwrap_or_else(|| r.submitted.elapsed().as_secs_f64() * 1000.0);
        events.push(Event::Outcome(Outcome {
            status: status(r.cancel_reason),
            duration_ms,
            truncated,
        }));
        Some((r.tx, events))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn split_multibyte_sequences_are_joined_across_chunks() {
        let mut p = Vec::new();
        let euro = "€".as_bytes();
        assert_eq!(decode_utf8(&mut p, &euro[..1]), "");
        assert_eq!(decode_utf8(&mut p, &euro[1..2]), "");
        assert_eq!(decode_utf8(&mut p, &euro[2..]), "€");
        assert!(p.is_empty());
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut p = Vec::new();
        assert_eq!(decode_utf8(&mut p, b"a\xffb"), "a\u{fffd}b");
    }

    proptest! {
        #[test]
        fn any_chunking_of_valid_utf8_decodes_to_the_original(s in "\\PC{0,64}", cuts in proptest::collection::vec(0usize..256, 0..8)) {
            let bytes = s.as_bytes();
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            points.sort_unstable();
            let mut p = Vec::new();
            let mut out = String::new();
            let mut last = 0;
            for c in points.into_iter().chain(std::iter::once(bytes.len())) {
                out.push_str(&decode_utf8(&mut p, &bytes[last..c]));
                last = c;
            }
            prop_assert!(p.is_empty());
            prop_assert_eq!(out, s);
        }
    }

    #[tokio::test]
    async fn budget_drops_excess_and_finish_reports_it_once() {
        let routes = Routes::new(5);
        let (tx, _rx) = mpsc::channel(8);
        routes.insert("e".into(), tx);
        let r = routes
            .output("e", Stream::Stdout, b"hello world")
            .expect("known");
        assert_eq!(
            r.event,
            Some(Event::Output {
                stream: Stream::Stdout,
                text: "hello".into()
            })
        );
        let (_, events) = routes
            .finish("e", |_| OutcomeStatus::Cancelled, Some(1.0))
            .expect("first finish");
        match events.last() {
            Some(Event::Outcome(o)) => assert_eq!(
                o.truncated,
                Some(Truncation {
                    dropped_bytes: 6,
                    budget: 5
                })
            ),
            other => panic!("unexpected {other:?}"),
        }
        assert!(routes
            .finish("e", |_| OutcomeStatus::Cancelled, None)
            .is_none());
    }
}
