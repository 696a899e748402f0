//! Shared helpers: a session per test, and collectors that wait on events.

use capsule_session::{Event, Execution, Outcome, OutcomeStatus, Session, SessionConfig, Stream};

/// A config for tests: defaults plus the environment (so CI can pick the interpreter).
pub fn config() -> SessionConfig {
    let mut c = SessionConfig::from_env().expect("valid CAPSULE_* environment");
    c.heartbeat = None;
    c
}

pub async fn session() -> Session {
    Session::start(config()).await.expect("session starts")
}

/// Everything an execution produced, in order.
#[derive(Debug, Default)]
pub struct Run {
    pub events: Vec<Event>,
}

impl Run {
    pub fn out(&self) -> String {
        self.text(Stream::Stdout)
    }
    pub fn err(&self) -> String {
        self.text(Stream::Stderr)
    }
    fn text(&self, s: Stream) -> String {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Output { stream, text } if *stream == s => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }
    pub fn outcome(&self) -> &Outcome {
        match self.events.last() {
            Some(Event::Outcome(o)) => o,
            other => panic!("last event is not an outcome: {other:?}"),
        }
    }
    pub fn status(&self) -> &OutcomeStatus {
        &self.outcome().status
    }
    /// The repr of an `ok` outcome.
    pub fn repr(&self) -> &str {
        match self.status() {
            OutcomeStatus::Ok { repr, .. } => repr,
            other => panic!("expected ok, got {other:?}; stderr: {}", self.err()),
        }
    }
    pub fn value(&self) -> &serde_json::Value {
        match self.status() {
            OutcomeStatus::Ok { value, .. } => value,
            other => panic!("expected ok, got {other:?}; stderr: {}", self.err()),
        }
    }
}

/// Drains an execution to its outcome, asserting exactly one outcome and that it is last.
pub async fn drain(mut exec: Execution) -> Run {
    let mut run = Run::default();
    while let Some(ev) = exec.next().await {
        run.events.push(ev);
    }
    let outcomes = run
        .events
        .iter()
        .filter(|e| matches!(e, Event::Outcome(_)))
        .count();
    assert_eq!(outcomes, 1, "exactly one outcome: {:?}", run.events);
    run
}

pub async fn run(s: &Session, code: &str) -> Run {
    drain(s.execute(code).await.expect("queued")).await
}

/// Waits for the first event matching `pred`, returning the events seen so far.
pub async fn until(exec: &mut Execution, pred: impl Fn(&Event) -> bool) -> Vec<Event> {
    let mut seen = Vec::new();
    while let Some(ev) = exec.next().await {
        let hit = pred(&ev);
        seen.push(ev);
        if hit {
            return seen;
        }
    }
    panic!("execution ended before the awaited event: {seen:?}");
}

/// Waits until the cell has printed `marker` on stdout (proof it is running).
pub async fn started(exec: &mut Execution, marker: &str) {
    let mut out = String::new();
    while let Some(ev) = exec.next().await {
        match ev {
            Event::Output { text, .. } => {
                out.push_str(&text);
                if out.contains(marker) {
                    return;
                }
            }
            Event::Outcome(o) => panic!("cell ended before printing {marker:?}: {o:?}; out={out}"),
            _ => {}
        }
    }
}
