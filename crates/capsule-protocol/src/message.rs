//! The message catalogue of protocol v1.
//!
//! Three catalogues, one per channel (see `docs/protocol.md`):
//!
//! * [`WorkerMessage`]: worker → host, on the event pipe (worker fd 4).
//! * [`HostMessage`]: host → worker, on the data pipe (worker fd 3).
//! * [`ControlMessage`]: host → worker, on the control pipe (worker fd 5), read by the worker's
//!   reader thread ahead of any data so that a cancel never queues behind bulk frames.
//!
//! Every message is a JSON object tagged by `"type"`. Bulk bytes (output, checkpoint blobs)
//! travel in the frame body, never in the header. Each variant says since which protocol
//! version it exists; fields may be added (with serde defaults), never renamed or removed.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Execution id chosen by the host, unique within a session.
pub type ExecId = String;

/// Which captured stream an output chunk belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// fd 1 and `sys.stdout`.
    Stdout,
    /// fd 2 and `sys.stderr`.
    Stderr,
}

impl Stream {
    /// The stream's name as used on the wire and by clients.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// First message of a worker, sent unprompted as soon as its pipes are set up. Since v1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Lowest protocol version the worker speaks.
    pub min_version: u32,
    /// Highest protocol version the worker speaks.
    pub max_version: u32,
    /// Header encodings the worker can read and write, in preference order.
    pub encodings: Vec<String>,
    /// Optional features the worker supports (e.g. `tla`, `input`, `checkpoint`).
    #[serde(default)]
    pub features: Vec<String>,
    /// `platform.python_version()` of the interpreter.
    pub python: String,
    /// `sys.implementation.name`.
    #[serde(default)]
    pub implementation: String,
    /// `sys.executable`.
    #[serde(default)]
    pub executable: String,
    /// The worker's process id (in its own pid namespace).
    pub pid: u32,
}

/// Settings the host imposes on the worker, sent in [`HelloAck`]. Since v1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerSettings {
    /// Largest body the worker may put in one `output` frame.
    pub output_chunk: usize,
    /// Hard frame limit in force on both directions.
    pub max_frame: usize,
    /// Whether the worker should process `site` (site-packages, `.pth` files) before the first
    /// cell. The worker always starts with `-I -S` for speed; see docs/architecture.md.
    #[serde(default = "yes")]
    pub enable_site: bool,
    /// Extra entries prepended to `sys.path`.
    #[serde(default)]
    pub sys_path: Vec<String>,
}

fn yes() -> bool {
    true
}

/// The host's answer to [`Hello`]: the chosen version, encoding and settings. Since v1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HelloAck {
    /// Negotiated protocol version.
    pub version: u32,
    /// Negotiated header encoding (only `json` in v1).
    pub encoding: String,
    /// Features both sides support.
    #[serde(default)]
    pub features: Vec<String>,
    /// Session id, for the worker's own logs.
    #[serde(default)]
    pub session: String,
    /// Settings.
    pub settings: WorkerSettings,
}

/// How a cell ended, as reported by the worker. Since v1.
///
/// The host adds the outcomes only it can know (`timed_out`, `killed`, `worker_lost`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum CellResult {
    /// The cell ran to the end.
    Ok {
        /// The trailing expression's value as JSON, or `null` (no value, or not representable).
        #[serde(default)]
        value: Value,
        /// `repr()` of the trailing expression's value; `""` when the cell has no value.
        #[serde(default)]
        repr: String,
    },
    /// The cell raised.
    Error {
        /// Exception class name.
        ename: String,
        /// `str()` of the exception.
        evalue: String,
        /// Formatted traceback limited to the cell's own frames.
        traceback: String,
    },
    /// The cell was stopped by a cancel (cooperatively).
    Cancelled {},
}

/// Messages from the worker to the host (event pipe, worker fd 4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMessage {
    /// Since v1. See [`Hello`].
    Hello(Hello),
    /// Since v1. A chunk of captured output; the frame body holds the raw bytes (which may split
    /// a UTF-8 sequence: the host decodes incrementally per stream).
    Output {
        /// The execution this output belongs to, or `None` when no cell is running (output of
        /// a background thread or child process between cells).
        exec: Option<ExecId>,
        /// Which stream.
        stream: Stream,
    },
    /// Since v1 (reserved; rich display lands with EW display work). A MIME bundle.
    Display {
        /// The execution.
        exec: Option<ExecId>,
        /// MIME type → content (text, or base64 for binary types).
        data: Map<String, Value>,
        /// Display metadata.
        #[serde(default)]
        metadata: Map<String, Value>,
    },
    /// Since v1. The cell called `input()` or `getpass()` and blocks until [`HostMessage::InputReply`].
    InputRequest {
        /// The execution.
        exec: ExecId,
        /// Request id, unique within the execution.
        req: String,
        /// The prompt text.
        prompt: String,
        /// `true` for `getpass()`.
        password: bool,
    },
    /// Since v1. The cell's one outcome; always after all of its output.
    Outcome {
        /// The execution.
        exec: ExecId,
        /// Time spent running the cell inside the worker.
        duration_ms: f64,
        /// The result.
        #[serde(flatten)]
        result: CellResult,
    },
    /// Since v1. Answer to [`ControlMessage::Cancel`] or [`ControlMessage::Interrupt`].
    CancelAck {
        /// The execution named by the cancel.
        exec: ExecId,
        /// Whether that execution was running when the cancel arrived (else it was a no-op).
        running: bool,
    },
    /// Since v1. Answer to [`ControlMessage::Ping`].
    Pong {
        /// Echo of the ping's counter.
        n: u64,
    },
    /// Since v1. A checkpoint was taken; the frame body is the checkpoint blob.
    CheckpointDone {
        /// Request id.
        req: String,
        /// Names captured.
        names: Vec<String>,
        /// Names that could not be captured, with the reason.
        #[serde(default)]
        skipped: Vec<Skipped>,
    },
    /// Since v1. A restore finished (or failed, with `error`).
    RestoreDone {
        /// Request id.
        req: String,
        /// Names restored.
        #[serde(default)]
        restored: Vec<String>,
        /// Why the restore failed, if it did.
        #[serde(default)]
        error: Option<String>,
    },
    /// Since v1. A checkpoint could not be taken at all.
    CheckpointFailed {
        /// Request id.
        req: String,
        /// Why.
        message: String,
    },
    /// Since v1. Something went wrong in the worker outside any cell (bad frame from the host,
    /// internal error). `fatal` means the worker is about to exit.
    Fault {
        /// Description.
        message: String,
        /// Whether the worker exits after this.
        #[serde(default)]
        fatal: bool,
    },
}

/// A name a checkpoint could not capture.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// The namespace key.
    pub name: String,
    /// Why (e.g. "cannot pickle '_thread.lock' object").
    pub reason: String,
}

/// Messages from the host to the worker on the data pipe (worker fd 3).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HostMessage {
    /// Since v1. See [`HelloAck`].
    HelloAck(HelloAck),
    /// Since v1. Run a cell. The host sends one at a time and waits for its outcome.
    Execute {
        /// Execution id.
        exec: ExecId,
        /// Source code of the cell.
        code: String,
        /// Whether the cell counts in `In`/`Out`/`_`/execution numbers (false for warm-up code).
        #[serde(default = "yes")]
        history: bool,
    },
    /// Since v1. Answer to an [`WorkerMessage::InputRequest`]. `text: None` means end of input
    /// (the worker raises `EOFError` in the cell).
    InputReply {
        /// Execution id.
        exec: ExecId,
        /// Request id.
        req: String,
        /// The line, without a trailing newline; `None` for EOF.
        text: Option<String>,
    },
    /// Since v1. Take a checkpoint of the namespace.
    Checkpoint {
        /// Request id.
        req: String,
    },
    /// Since v1. Restore a checkpoint; the frame body is the blob.
    Restore {
        /// Request id.
        req: String,
        /// Clear user names from the namespace first (engine keys are kept).
        #[serde(default = "yes")]
        clear: bool,
    },
    /// Since v1. Reset the namespace to a fresh state (pool reuse between users).
    Reset {
        /// Request id; answered with `restore_done` carrying the same id.
        req: String,
    },
}

/// Messages from the host to the worker on the control pipe (worker fd 5). Since v1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlMessage {
    /// Stop the named execution: raise `KeyboardInterrupt` in it (and cancel its top-level
    /// task); the worker reports `cancelled`. A cancel for an execution that is not running is
    /// acknowledged with `running: false` and has no effect.
    Cancel {
        /// Execution id.
        exec: ExecId,
    },
    /// Raise `KeyboardInterrupt` in the named execution, like Ctrl-C in a terminal; the cell
    /// may catch it and the outcome is whatever the cell then does.
    Interrupt {
        /// Execution id.
        exec: ExecId,
    },
    /// Liveness probe; answered with `pong` by the reader thread.
    Ping {
        /// Counter echoed back.
        n: u64,
    },
    /// Exit now. The worker exits with status 0 without finishing the current cell.
    Shutdown {},
}

/// Features this crate's host side knows about (offered in negotiation).
pub const HOST_FEATURES: &[&str] = &["tla", "input", "checkpoint", "display", "reset"];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn outcome_flattens_status_beside_exec() {
        let m = WorkerMessage::Outcome {
            exec: "e1".into(),
            duration_ms: 1.5,
            result: CellResult::Ok {
                value: json!(42),
                repr: "42".into(),
            },
        };
        let v = serde_json::to_value(&m).expect("encode");
        assert_eq!(
            v,
            json!({"type":"outcome","exec":"e1","duration_ms":1.5,"status":"ok","value":42,"repr":"42"})
        );
        let back: WorkerMessage = serde_json::from_value(v).expect("decode");
        assert_eq!(back, m);
    }

    #[test]
    fn cancelled_outcome_decodes_without_extra_fields() {
        let m: WorkerMessage = serde_json::from_value(
            json!({"type":"outcome","exec":"e","duration_ms":0.0,"status":"cancelled"}),
        )
        .expect("decode");
        assert!(matches!(
            m,
            WorkerMessage::Outcome {
                result: CellResult::Cancelled {},
                ..
            }
        ));
    }

    #[test]
    fn unknown_fields_are_ignored_for_forward_compatibility() {
        let m: ControlMessage =
            serde_json::from_value(json!({"type":"ping","n":3,"added_in_v2":true}))
                .expect("decode");
        assert_eq!(m, ControlMessage::Ping { n: 3 });
    }

    #[test]
    fn execute_history_defaults_to_true() {
        let m: HostMessage =
            serde_json::from_value(json!({"type":"execute","exec":"e","code":"1"}))
                .expect("decode");
        assert_eq!(
            m,
            HostMessage::Execute {
                exec: "e".into(),
                code: "1".into(),
                history: true
            }
        );
    }
}
