//! The reader task: the one and only reader of a worker's event pipe (BRIEF §3.1).
//!
//! It decodes frames, sends execution events straight to the execution's channel (awaiting
//! capacity: backpressure, never dropping), and tells the actor about everything that changes
//! the session's state (outcomes, checkpoint replies, pongs, faults, end of stream). Because the
//! same task forwards a cell's output and then its outcome, output always precedes the outcome.
//!
//! When the actor learns that the worker exited it sends `stop`: the reader then reads what is
//! left in the pipe without waiting (until `WouldBlock`), forwards it, and reports `Closed`.
//! Everything the dead worker wrote is in the pipe by then, so nothing is lost and nothing waits
//! on a descendant that may still hold the descriptor.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use capsule_protocol::{decode_worker, CellResult, Decoder, RawFrame, WorkerMessage};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::event::{Event, OutcomeStatus};
use crate::routes::{CancelReason, Routes};
use crate::session::{BackgroundEvent, Stats};

/// What the reader tells the actor. Every notice carries the worker generation it came from.
#[derive(Debug)]
pub(crate) enum Notice {
    /// The worker reported a cell's outcome (already forwarded to the client).
    CellDone {
        gen: u64,
        exec: String,
        error: bool,
        truncated: bool,
    },
    /// Checkpoint blob.
    CheckpointDone {
        gen: u64,
        req: String,
        blob: Bytes,
        names: Vec<String>,
        skipped: Vec<capsule_protocol::Skipped>,
    },
    /// Checkpoint failure.
    CheckpointFailed {
        gen: u64,
        req: String,
        message: String,
    },
    /// Restore or reset finished.
    RestoreDone {
        gen: u64,
        req: String,
        restored: Vec<String>,
        error: Option<String>,
    },
    /// Heartbeat answer.
    Pong { gen: u64 },
    /// The event stream ended: EOF, an IO error, or a framing error (`error`).
    Closed { gen: u64, error: Option<String> },
    /// The worker process exited (sent by the waiter task).
    Exited {
        gen: u64,
        status: Option<std::process::ExitStatus>,
    },
}

pub(crate) struct Reader {
    pub gen: u64,
    pub events: pipe::Receiver,
    pub decoder: Decoder,
    pub routes: Arc<Routes>,
    pub notices: mpsc::Sender<Notice>,
    pub stop: oneshot::Receiver<()>,
    pub stats: Arc<Stats>,
    pub background: broadcast::Sender<BackgroundEvent>,
}

impl Reader {
    pub async fn run(mut self) {
        let error = self.read_loop().await;
        let _ = self
            .notices
            .send(Notice::Closed {
                gen: self.gen,
                error,
            })
            .await;
    }

    /// Returns the reason the stream ended abnormally, if it did.
    async fn read_loop(&mut self) -> Option<String> {
        loop {
            if let Err(e) = self.drain_frames().await {
                return Some(e);
            }
            let buf = self.decoder.buffer_mut();
            buf.reserve(64 * 1024);
            tokio::select! {
                biased;
                _ = &mut self.stop => return self.drain_now().await,
                r = self.events.read_buf(buf) => match r {
                    Ok(0) => return self.torn_frame(),
                    Ok(n) => { self.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed); }
                    Err(e) => return Some(format!("reading the event pipe: {e}")),
                },
            }
        }
    }

    fn torn_frame(&self) -> Option<String> {
        let pending = self.decoder.pending();
        (pending > 0).then(|| format!("event stream ended inside a frame ({pending} bytes)"))
    }

    /// The worker is dead: take what is in the pipe without waiting for EOF.
    async fn drain_now(&mut self) -> Option<String> {
        loop {
            if let Err(e) = self.drain_frames().await {
                return Some(e);
            }
            let buf = self.decoder.buffer_mut();
            buf.reserve(64 * 1024);
            match self.events.try_read_buf(buf) {
                Ok(0) => return self.torn_frame(),
                Ok(n) => {
                    self.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return self.torn_frame(),
                Err(e) => return Some(format!("reading the event pipe: {e}")),
            }
        }
    }

    async fn drain_frames(&mut self) -> Result<(), String> {
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => {
                    self.stats.frames_in.fetch_add(1, Ordering::Relaxed);
                    self.handle(frame).await;
                }
                Ok(None) => return Ok(()),
                Err(e) => {
                    self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                    return Err(format!("protocol error from worker: {e}"));
                }
            }
        }
    }

    async fn deliver(&self, tx: mpsc::Sender<Event>, event: Event) {
        // A closed receiver means the client dropped its execution handle: the cell goes on,
        // its events have nowhere to go.
        let _ = tx.send(event).await;
    }

    async fn handle(&mut self, frame: RawFrame) {
        let msg = match decode_worker(&frame) {
            Ok(m) => m,
            Err(e) => {
                self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "skipping an undecodable frame from the worker");
                let _ = self.background.send(BackgroundEvent::Fault {
                    message: e.to_string(),
                });
                return;
            }
        };
        match msg {
            WorkerMessage::Output { exec, stream } => {
                let routed = exec
                    .as_deref()
                    .and_then(|x| self.routes.output(x, stream, &frame.body));
                match routed {
                    Some(r) => {
                        if let Some(ev) = r.event {
                            self.deliver(r.tx, ev).await;
                        }
                    }
                    None => {
                        let _ = self.background.send(BackgroundEvent::Output {
                            stream,
                            text: String::from_utf8_lossy(&frame.body).into_owned(),
                        });
                    }
                }
            }
            WorkerMessage::Display {
                exec,
                data,
                metadata,
            } => {
                if let Some(tx) = exec.as_deref().and_then(|x| self.routes.sender(x)) {
                    self.deliver(tx, Event::Display { data, metadata }).await;
                }
            }
            WorkerMessage::InputRequest {
                exec,
                req,
                prompt,
                password,
            } => {
                if let Some(tx) = self.routes.input_requested(&exec, &req) {
                    self.deliver(
                        tx,
                        Event::InputRequest {
                            req,
                            prompt,
                            password,
                        },
                    )
                    .await;
                }
            }
            WorkerMessage::Outcome {
                exec,
                duration_ms,
                result,
            } => {
                let finished = self.routes.finish(
                    &exec,
                    |reason| match result {
                        CellResult::Ok { value, repr } => OutcomeStatus::Ok { value, repr },
                        CellResult::Error {
                            ename,
                            evalue,
                            traceback,
                        } => OutcomeStatus::Error {
                            ename,
                            evalue,
                            traceback,
                        },
                        CellResult::Cancelled {} => match reason {
                            Some(CancelReason::Deadline) => {
                                OutcomeStatus::TimedOut { state_lost: false }
                            }
                            _ => OutcomeStatus::Cancelled,
                        },
                    },
                    Some(duration_ms),
                );
                let (mut error, mut truncated) = (false, false);
                if let Some((_, events)) = &finished {
                    if let Some(Event::Outcome(o)) = events.last() {
                        tracing::debug!(%exec, status = o.status.name(), duration_ms, "outcome");
                        error = matches!(o.status, OutcomeStatus::Error { .. });
                        truncated = o.truncated.is_some();
                    }
                }
                // The actor hears of the outcome before the client does, so anything the client
                // asks after seeing it (info, a pool release) finds the session already idle and
                // its counters updated: the actor serves notices ahead of commands.
                let _ = self
                    .notices
                    .send(Notice::CellDone {
                        gen: self.gen,
                        exec,
                        error,
                        truncated,
                    })
                    .await;
                if let Some((tx, events)) = finished {
                    for ev in events {
                        self.deliver(tx.clone(), ev).await;
                    }
                }
            }
            WorkerMessage::CancelAck { exec, running } => {
                tracing::debug!(%exec, running, "cancel acknowledged");
            }
            WorkerMessage::Pong { .. } => {
                let _ = self.notices.send(Notice::Pong { gen: self.gen }).await;
            }
            WorkerMessage::CheckpointDone {
                req,
                names,
                skipped,
            } => {
                let _ = self
                    .notices
                    .send(Notice::CheckpointDone {
                        gen: self.gen,
                        req,
                        blob: frame.body.clone(),
                        names,
                        skipped,
                    })
                    .await;
            }
            WorkerMessage::CheckpointFailed { req, message } => {
                let _ = self
                    .notices
                    .send(Notice::CheckpointFailed {
                        gen: self.gen,
                        req,
                        message,
                    })
                    .await;
            }
            WorkerMessage::RestoreDone {
                req,
                restored,
                error,
            } => {
                let _ = self
                    .notices
                    .send(Notice::RestoreDone {
                        gen: self.gen,
                        req,
                        restored,
                        error,
                    })
                    .await;
            }
            WorkerMessage::Fault { message, fatal } => {
                tracing::warn!(%message, fatal, "worker fault");
                self.stats.faults.fetch_add(1, Ordering::Relaxed);
                let _ = self.background.send(BackgroundEvent::Fault { message });
            }
            WorkerMessage::Hello(_) => {
                self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("unexpected second hello from the worker");
            }
        }
    }
}
