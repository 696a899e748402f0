//! The client event model v1 (BRIEF §4b, `docs/api.md`) as serde DTOs.
//!
//! Session types are not `Serialize` by design; this module is where they become JSON. Field
//! names here are a public contract: fields may be added, never renamed or removed.

use std::collections::BTreeMap;
use std::path::PathBuf;

use capsule_pool::PoolInfo;
use capsule_session::{Outcome, OutcomeStatus, SessionConfig, SessionInfo};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A client's cell id as the client sent it (a JSON string or number), echoed back verbatim.
pub type ClientId = Value;

/// The map key of a client id (its JSON text, so `"1"` and `1` are different cells).
pub fn id_key(id: &ClientId) -> String {
    id.to_string()
}

/// Whether a JSON value can be a client id.
pub fn valid_id(id: &ClientId) -> bool {
    matches!(id, Value::String(_) | Value::Number(_))
}

/// One line of `capsule stdio` output.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum OutEvent {
    /// The session is up.
    Ready {
        /// Session id.
        session: String,
        /// Python version of the worker.
        python: String,
        /// Negotiated protocol version.
        protocol: u32,
        /// Interpreter path.
        executable: PathBuf,
        /// Worker pid.
        pid: Option<u32>,
    },
    /// Captured text; `id` is absent for output written between cells.
    Output {
        /// The cell.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<ClientId>,
        /// `stdout` or `stderr`.
        stream: &'static str,
        /// The text.
        text: String,
    },
    /// A rich display.
    Display {
        /// The cell.
        id: ClientId,
        /// MIME bundle.
        data: Map<String, Value>,
        /// Display metadata.
        metadata: Map<String, Value>,
    },
    /// The cell waits in `input()`/`getpass()`.
    InputRequest {
        /// The cell.
        id: ClientId,
        /// The request id to answer.
        request: String,
        /// The prompt (not echoed as output).
        prompt: String,
        /// Whether it is a password prompt.
        password: bool,
    },
    /// The cell's one outcome.
    Outcome {
        /// The cell.
        id: ClientId,
        /// Status and fields.
        #[serde(flatten)]
        outcome: OutcomeDto,
    },
    /// A command that could not be carried out, a bad line, or a worker fault between cells.
    Error {
        /// The command's id, when known.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<ClientId>,
        /// What went wrong.
        message: String,
    },
    /// The namespace is fresh: after a `restart` command, or (without `id`) after an outcome
    /// with `state_lost: true`, once the session that serves the next cells is ready.
    Restarted {
        /// The command's id, if it had one.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<ClientId>,
        /// `restart` (the command) or `worker_lost` (the previous worker is gone; the outcome
        /// before this event said why).
        cause: &'static str,
        /// The session now serving cells (a warm one from the pool, so it differs from the
        /// previous one unless the pool could not supply one).
        session: String,
        /// Its worker pid.
        #[serde(skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
    },
    /// A checkpoint was written.
    Checkpoint {
        /// The command's id.
        id: ClientId,
        /// Where the blob was written.
        path: PathBuf,
        /// Blob size.
        bytes: u64,
        /// Names captured.
        names: Vec<String>,
        /// Names that could not be captured.
        skipped: Vec<String>,
        /// Why each skipped name was skipped.
        skipped_reasons: Vec<SkippedDto>,
    },
    /// A checkpoint was restored.
    Restored {
        /// The command's id.
        id: ClientId,
        /// Names restored.
        names: Vec<String>,
    },
    /// Session information.
    Info {
        /// The command's id.
        id: ClientId,
        /// The snapshot.
        #[serde(flatten)]
        info: Box<InfoDto>,
    },
    /// The session is shut down; the process exits 0 next.
    Shutdown {
        /// The command's id, if it had one.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<ClientId>,
    },
}

/// A skipped checkpoint name with its reason.
#[derive(Debug, Serialize)]
pub struct SkippedDto {
    /// The name.
    pub name: String,
    /// Why.
    pub reason: String,
}

/// Output dropped over the per-cell budget.
#[derive(Debug, Serialize)]
pub struct TruncatedDto {
    /// Bytes dropped.
    pub dropped_bytes: u64,
    /// Budget in force.
    pub budget: u64,
}

/// The fields of an outcome (without the cell id).
#[derive(Debug, Serialize)]
pub struct OutcomeDto {
    /// `ok`, `error`, `cancelled`, `timed_out`, `killed`, `worker_lost`.
    pub status: &'static str,
    /// Run time in milliseconds.
    pub duration_ms: f64,
    /// `ok`: JSON value of the trailing expression or `null`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// `ok`: its repr, `""` when none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repr: Option<String>,
    /// `error`: exception class.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ename: Option<String>,
    /// `error`: exception message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evalue: Option<String>,
    /// `error`: traceback text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceback: Option<String>,
    /// Whether the namespace was lost (every status carries it; `worker_lost` and `killed`
    /// always `true`).
    pub state_lost: bool,
    /// `killed`: `oom`, `cpu_limit`, `signal`, ...; `worker_lost`: what is known of the cause.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `killed`: human-readable detail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// `killed` with reason `signal`: the signal number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Set when output went over the per-cell budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated: Option<TruncatedDto>,
}

impl From<&Outcome> for OutcomeDto {
    fn from(o: &Outcome) -> Self {
        let mut dto = OutcomeDto {
            status: o.status.name(),
            duration_ms: (o.duration_ms * 1000.0).round() / 1000.0,
            value: None,
            repr: None,
            ename: None,
            evalue: None,
            traceback: None,
            state_lost: o.status.state_lost(),
            reason: None,
            detail: None,
            signal: None,
            truncated: o.truncated.map(|t| TruncatedDto {
                dropped_bytes: t.dropped_bytes,
                budget: t.budget,
            }),
        };
        match &o.status {
            OutcomeStatus::Ok { value, repr } => {
                dto.value = Some(value.clone());
                dto.repr = Some(repr.clone());
            }
            OutcomeStatus::Error {
                ename,
                evalue,
                traceback,
            } => {
                dto.ename = Some(ename.clone());
                dto.evalue = Some(evalue.clone());
                dto.traceback = Some(traceback.clone());
            }
            OutcomeStatus::Cancelled | OutcomeStatus::TimedOut { .. } => {}
            OutcomeStatus::Killed { reason, detail } => {
                dto.reason = Some(reason.as_str().to_string());
                dto.detail = Some(detail.clone());
                if let capsule_session::KillReason::Signal(sig) = reason {
                    dto.signal = Some(*sig);
                }
            }
            OutcomeStatus::WorkerLost { reason } => dto.reason = Some(reason.clone()),
        }
        dto
    }
}

/// The effective configuration as clients see it (environment values are redacted: only the
/// variable names are listed).
#[derive(Debug, Serialize)]
pub struct ConfigDto {
    /// Interpreter asked for.
    pub python: Option<PathBuf>,
    /// Frame limit.
    pub max_frame: usize,
    /// Output chunk.
    pub output_chunk: usize,
    /// Output budget.
    pub output_budget: u64,
    /// Cancel grace.
    pub cancel_grace_ms: u64,
    /// Default deadline (`null` = none).
    pub timeout_ms: Option<u64>,
    /// Start guard.
    pub start_timeout_ms: u64,
    /// Heartbeat (`null` = off).
    pub heartbeat_ms: Option<u64>,
    /// Event channel capacity.
    pub event_queue: usize,
    /// Queue limit.
    pub max_queued: usize,
    /// `site` processing.
    pub site: bool,
    /// Extra `sys.path`.
    pub sys_path: Vec<PathBuf>,
    /// Runtime cache.
    pub cache_dir: Option<PathBuf>,
    /// Scratch root.
    pub scratch_root: Option<PathBuf>,
    /// Names of the extra environment variables.
    pub env_keys: Vec<String>,
    /// The sandbox policy in force (preset and every layer and limit).
    pub sandbox: capsule_sandbox::Policy,
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl From<&SessionConfig> for ConfigDto {
    fn from(c: &SessionConfig) -> Self {
        ConfigDto {
            python: c.python.clone(),
            max_frame: c.max_frame,
            output_chunk: c.output_chunk,
            output_budget: c.output_budget,
            cancel_grace_ms: ms(c.cancel_grace),
            timeout_ms: c.default_timeout.map(ms),
            start_timeout_ms: ms(c.start_timeout),
            heartbeat_ms: c.heartbeat.map(ms),
            event_queue: c.event_queue,
            max_queued: c.max_queued,
            site: c.enable_site,
            sys_path: c.sys_path.clone(),
            cache_dir: c.cache_dir.clone(),
            scratch_root: c.scratch_root.clone(),
            env_keys: c.env.iter().map(|(k, _)| k.clone()).collect(),
            sandbox: c.sandbox.clone(),
        }
    }
}

/// A session snapshot (the body of the `info` event).
#[derive(Debug, Serialize)]
pub struct InfoDto {
    /// Session id.
    pub session: String,
    /// `idle`, `busy`, `no_worker`, `closed`.
    pub state: &'static str,
    /// Worker pid.
    pub pid: Option<u32>,
    /// Python version.
    pub python: String,
    /// Interpreter path.
    pub executable: PathBuf,
    /// Negotiated protocol version.
    pub protocol: u32,
    /// Negotiated features.
    pub features: Vec<String>,
    /// Cells finished.
    pub executions: u64,
    /// Cells that ended `error`.
    pub errors: u64,
    /// Cancels requested.
    pub cancels: u64,
    /// Cancels that had to kill.
    pub cancel_kills: u64,
    /// Deadlines hit.
    pub timeouts: u64,
    /// Workers lost.
    pub workers_lost: u64,
    /// Workers started.
    pub workers_started: u64,
    /// Executions queued.
    pub queued: usize,
    /// Worker RSS.
    pub rss_bytes: Option<u64>,
    /// Worker CPU seconds.
    pub cpu_seconds: Option<f64>,
    /// Milliseconds since the last heartbeat answer.
    pub last_heartbeat_ms: Option<f64>,
    /// Worker start latency in milliseconds.
    pub start_latency_ms: Option<f64>,
    /// Frames received.
    pub frames_in: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Cells truncated.
    pub output_truncations: u64,
    /// Cells ended `killed`, by reason.
    pub kills: std::collections::BTreeMap<String, u64>,
    /// Protocol errors.
    pub protocol_errors: u64,
    /// Worker faults.
    pub faults: u64,
    /// Scratch directory.
    pub scratch_dir: PathBuf,
    /// Sandbox layers of the current worker: name, state (active/missing/disabled), detail.
    pub sandbox: Vec<SandboxLayerDto>,
    /// Effective configuration.
    pub config: ConfigDto,
    /// The session pool behind the front door (`capsule stdio`, `capsule repl`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolDto>,
}

/// The session pool behind a front door, as `info` reports it: a stable summary of
/// [`capsule_pool::PoolInfo`] plus the front door's own replacement counts.
#[derive(Debug, Serialize)]
pub struct PoolDto {
    /// Warm spare sessions kept beside the one in use (the pool's `min_idle`).
    pub spares: usize,
    /// Cap on sessions (in use + spares + being created or cleaned).
    pub max_sessions: usize,
    /// Spares ready now.
    pub idle: usize,
    /// Sessions handed out (the one in use).
    pub active: usize,
    /// Sessions being created.
    pub creating: usize,
    /// Sessions being cleaned or shut down after use.
    pub returning: usize,
    /// Sessions taken from the ready spares (no waiting).
    pub hits: u64,
    /// Sessions the front door had to wait for (a creation).
    pub misses: u64,
    /// Sessions created so far (the first, the spares, their replacements).
    pub sessions_created: u64,
    /// Sessions created by path (`spawn`, `fork`).
    pub created_by_path: BTreeMap<String, u64>,
    /// Failed creations.
    pub creation_failures: u64,
    /// Sessions that left the pool, by reason (`replaced`, `dead`, `stopped`, ...).
    pub evictions: BTreeMap<String, u64>,
    /// Whether sessions are forked from a warm template.
    pub fork_enabled: bool,
    /// Why not, when they are not.
    pub fork_disabled_reason: Option<String>,
    /// The creation circuit breaker: `closed`, `open` or `half_open`.
    pub breaker: &'static str,
    /// Modules imported into every session before it is handed out.
    pub warm_imports: Vec<String>,
    /// Times the front door moved to a fresh session, by cause (`worker_lost`, `restart`).
    pub replacements: BTreeMap<&'static str, u64>,
    /// The pool's live sessions.
    pub sessions: Vec<PoolSessionDto>,
}

/// One session of the pool in `info`.
#[derive(Debug, Serialize)]
pub struct PoolSessionDto {
    /// Session id.
    pub session: String,
    /// Worker pid.
    pub pid: Option<u32>,
    /// `idle` (a spare), `active` (in use) or `returning` (being shut down or cleaned).
    pub state: &'static str,
}

impl PoolDto {
    /// The summary of `info`, with the front door's replacement counts.
    pub fn new(info: &PoolInfo, replacements: BTreeMap<&'static str, u64>) -> Self {
        PoolDto {
            spares: info.config.min_idle,
            max_sessions: info.config.max_sessions,
            idle: info.idle,
            active: info.active,
            creating: info.creating,
            returning: info.returning,
            hits: info.hits,
            misses: info.misses,
            sessions_created: info.sessions_created,
            created_by_path: info
                .created_by_path
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            creation_failures: info.creation_failures,
            evictions: info
                .evictions
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            fork_enabled: info.fork.enabled,
            fork_disabled_reason: info.fork.disabled_reason.clone(),
            breaker: info.breaker.state.as_str(),
            warm_imports: info.config.warm_imports.clone(),
            replacements,
            sessions: info
                .sessions
                .iter()
                .map(|s| PoolSessionDto {
                    session: s.id.clone(),
                    pid: s.pid,
                    state: s.state,
                })
                .collect(),
        }
    }
}

/// One sandbox layer in `info`.
#[derive(Debug, Serialize)]
pub struct SandboxLayerDto {
    /// Layer name.
    pub name: String,
    /// `active`, `missing` or `disabled`.
    pub state: String,
    /// What it enforces, or why it is missing.
    pub detail: String,
}

impl From<&SessionInfo> for InfoDto {
    fn from(i: &SessionInfo) -> Self {
        let f_ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        InfoDto {
            session: i.id.clone(),
            state: i.state.as_str(),
            pid: i.pid,
            python: i.python.clone(),
            executable: i.executable.clone(),
            protocol: i.protocol_version,
            features: i.features.clone(),
            executions: i.executions,
            errors: i.errors,
            cancels: i.cancels,
            cancel_kills: i.cancel_kills,
            timeouts: i.timeouts,
            workers_lost: i.workers_lost,
            workers_started: i.workers_started,
            queued: i.queued,
            rss_bytes: i.rss_bytes,
            cpu_seconds: i.cpu_seconds,
            last_heartbeat_ms: i.last_heartbeat.map(f_ms),
            start_latency_ms: i.start_latency.map(f_ms),
            frames_in: i.frames_in,
            bytes_in: i.bytes_in,
            output_truncations: i.output_truncations,
            kills: i.kills.clone(),
            protocol_errors: i.protocol_errors,
            faults: i.faults,
            scratch_dir: i.scratch_dir.clone(),
            sandbox: i
                .sandbox
                .iter()
                .map(|l| SandboxLayerDto {
                    name: l.name.clone(),
                    state: l.state.clone(),
                    detail: l.detail.clone(),
                })
                .collect(),
            config: ConfigDto::from(&i.config),
            pool: None,
        }
    }
}

/// One line of `capsule stdio` input.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum InCommand {
    /// Queue a cell.
    Execute {
        /// Client's cell id.
        id: ClientId,
        /// Source.
        code: String,
        /// Deadline for this cell (0 or absent: the session default).
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Answer an input request.
    Input {
        /// The cell.
        id: ClientId,
        /// The line (`null`: end of input, `EOFError` in the cell). Required.
        text: Value,
        /// The request answered (absent: the cell's oldest pending request).
        #[serde(default)]
        request: Option<String>,
    },
    /// Cancel a queued or running cell.
    Cancel {
        /// The cell.
        id: ClientId,
    },
    /// Kill the worker and start a fresh one.
    Restart {
        /// Optional command id echoed in `restarted`.
        #[serde(default)]
        id: Option<ClientId>,
    },
    /// Write a checkpoint to a file.
    Checkpoint {
        /// Command id.
        id: ClientId,
        /// File to write.
        path: PathBuf,
    },
    /// Restore a checkpoint file.
    Restore {
        /// Command id.
        id: ClientId,
        /// File to read.
        path: PathBuf,
        /// Clear the namespace first (default true).
        #[serde(default = "default_true")]
        clear: bool,
    },
    /// Session info.
    Info {
        /// Command id.
        id: ClientId,
    },
    /// Shut down and exit 0.
    Shutdown {
        /// Optional command id echoed in `shutdown`.
        #[serde(default)]
        id: Option<ClientId>,
    },
}

fn default_true() -> bool {
    true
}

/// Every `op` this version understands.
pub const OPS: [&str; 8] = [
    "execute",
    "input",
    "cancel",
    "restart",
    "checkpoint",
    "restore",
    "info",
    "shutdown",
];

/// Parses one input line. On failure returns the line's `id` (if it had a usable one) and a
/// message for the `error` event.
pub fn parse_command(line: &[u8]) -> Result<InCommand, (Option<ClientId>, String)> {
    let value: Value =
        serde_json::from_slice(line).map_err(|e| (None, format!("invalid JSON: {e}")))?;
    let id = value.get("id").filter(|v| valid_id(v)).cloned();
    if !value.is_object() {
        return Err((None, "a command must be a JSON object".to_string()));
    }
    match value.get("op") {
        None => return Err((id, "bad command: missing field `op`".to_string())),
        Some(Value::String(op)) if !OPS.contains(&op.as_str()) => {
            return Err((
                id,
                format!("unknown op {op:?} (expected one of {})", OPS.join(", ")),
            ))
        }
        _ => {}
    }
    let cmd: InCommand =
        serde_json::from_value(value).map_err(|e| (id.clone(), format!("bad command: {e}")))?;
    let cmd_id = match &cmd {
        InCommand::Execute { id, .. }
        | InCommand::Input { id, .. }
        | InCommand::Cancel { id }
        | InCommand::Checkpoint { id, .. }
        | InCommand::Restore { id, .. }
        | InCommand::Info { id } => Some(id),
        InCommand::Restart { id } | InCommand::Shutdown { id } => id.as_ref(),
    };
    if let Some(bad) = cmd_id.filter(|v| !valid_id(v)) {
        return Err((
            None,
            format!("bad command: id must be a string or a number, got {bad}"),
        ));
    }
    if let InCommand::Input { text, .. } = &cmd {
        if !matches!(text, Value::String(_) | Value::Null) {
            return Err((
                id,
                "bad command: text must be a string or null (end of input)".to_string(),
            ));
        }
    }
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsule_session::{KillReason, Truncation};
    use serde_json::json;

    fn outcome_json(status: OutcomeStatus) -> Value {
        let o = Outcome {
            status,
            duration_ms: 1.23456,
            truncated: None,
        };
        serde_json::to_value(OutEvent::Outcome {
            id: json!("c1"),
            outcome: OutcomeDto::from(&o),
        })
        .expect("serializable")
    }

    #[test]
    fn ok_outcome_has_value_and_repr_even_when_null() {
        let v = outcome_json(OutcomeStatus::Ok {
            value: Value::Null,
            repr: String::new(),
        });
        assert_eq!(
            v,
            json!({"event":"outcome","id":"c1","status":"ok","duration_ms":1.235,
                   "value":null,"repr":"","state_lost":false})
        );
    }

    #[test]
    fn error_killed_and_lost_outcomes_carry_their_fields() {
        let v = outcome_json(OutcomeStatus::Error {
            ename: "ZeroDivisionError".into(),
            evalue: "division by zero".into(),
            traceback: "tb".into(),
        });
        assert_eq!(v["ename"], "ZeroDivisionError");
        assert_eq!(v["traceback"], "tb");
        let v = outcome_json(OutcomeStatus::Killed {
            reason: KillReason::Signal(9),
            detail: "d".into(),
        });
        assert_eq!(
            (v["reason"].clone(), v["signal"].clone()),
            (json!("signal"), json!(9))
        );
        assert_eq!(v["state_lost"], true);
        let v = outcome_json(OutcomeStatus::WorkerLost { reason: "r".into() });
        assert_eq!(v["status"], "worker_lost");
        assert_eq!(v["state_lost"], true);
        let v = outcome_json(OutcomeStatus::TimedOut { state_lost: false });
        assert_eq!(v["state_lost"], false);
    }

    #[test]
    fn truncation_is_reported() {
        let o = Outcome {
            status: OutcomeStatus::Cancelled,
            duration_ms: 0.0,
            truncated: Some(Truncation {
                dropped_bytes: 10,
                budget: 5,
            }),
        };
        let v = serde_json::to_value(OutcomeDto::from(&o)).expect("serializable");
        assert_eq!(v["truncated"], json!({"dropped_bytes":10,"budget":5}));
    }

    #[test]
    fn output_between_cells_has_no_id() {
        let v = serde_json::to_value(OutEvent::Output {
            id: None,
            stream: "stdout",
            text: "x".into(),
        })
        .expect("serializable");
        assert_eq!(v, json!({"event":"output","stream":"stdout","text":"x"}));
    }

    #[test]
    fn commands_parse_and_bad_lines_name_the_problem() {
        assert!(matches!(
            parse_command(br#"{"op":"execute","id":"a","code":"1"}"#),
            Ok(InCommand::Execute { .. })
        ));
        assert!(matches!(
            parse_command(br#"{"op":"restore","id":1,"path":"/p"}"#),
            Ok(InCommand::Restore { clear: true, .. })
        ));
        let (id, msg) = parse_command(br#"{"op":"execute","id":"a"}"#).expect_err("no code");
        assert_eq!(id, Some(json!("a")));
        assert!(msg.contains("code"), "{msg}");
        let (_, msg) = parse_command(br#"{"op":"frobnicate","id":"a"}"#).expect_err("unknown");
        assert!(msg.contains("unknown op \"frobnicate\""), "{msg}");
        let (id, msg) = parse_command(b"{not json").expect_err("bad json");
        assert_eq!(id, None);
        assert!(msg.contains("invalid JSON"), "{msg}");
        assert!(parse_command(br#"{"op":"input","id":"a"}"#).is_err());
        assert!(parse_command(br#"{"op":"input","id":"a","text":null}"#).is_ok());
        assert!(parse_command(br#"{"op":"cancel","id":[1]}"#).is_err());
        assert!(parse_command(b"[1]").is_err());
    }
}
