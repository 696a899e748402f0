//! `capsule doctor`: what this machine offers Capsule.
//!
//! Reports the interpreter that sessions would use (`capsule_worker::resolve_interpreter`),
//! the worker runtime cache, the sandbox kernel probe (`capsule_sandbox::probe`), and whether
//! a session actually starts and runs a cell. Exit code 0 when a session works, 5 when not.

use std::time::Instant;

use capsule_session::{OutcomeStatus, Session, SessionConfig};
use serde::Serialize;
use serde_json::Value;

use crate::{code, Failure};

/// A check's result: `{"ok": {...}}` or `{"error": "..."}`.
#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
enum Check<T> {
    Ok(T),
    Error(String),
}

impl<T> From<Result<T, String>> for Check<T> {
    fn from(r: Result<T, String>) -> Self {
        match r {
            Ok(v) => Check::Ok(v),
            Err(e) => Check::Error(e),
        }
    }
}

#[derive(Serialize)]
struct Report {
    version: &'static str,
    interpreter: Check<InterpreterDto>,
    cache: Check<CacheDto>,
    sandbox: Value,
    session: Check<SessionDto>,
}

#[derive(Serialize)]
struct InterpreterDto {
    executable: String,
    version: String,
    prefix: String,
    base_prefix: String,
    venv: bool,
}

#[derive(Serialize)]
struct CacheDto {
    root: String,
    bundle_dir: String,
    bundle_hash: String,
}

#[derive(Serialize)]
struct SessionDto {
    python: String,
    protocol: u32,
    features: Vec<String>,
    start_ms: f64,
    /// The sandbox policy in force (preset name, or "custom").
    policy: String,
    /// What that policy actually did to a real worker on this machine, layer by layer.
    layers: Vec<LayerDto>,
}

#[derive(Serialize)]
struct LayerDto {
    name: String,
    state: String,
    detail: String,
}

async fn check_session(config: SessionConfig) -> Result<SessionDto, String> {
    let policy = config.sandbox.preset.clone();
    let t0 = Instant::now();
    let session = Session::start(config).await.map_err(|e| e.to_string())?;
    let start_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let done = session.run("1 + 1").await.map_err(|e| e.to_string())?;
    let info = session.info().await.map_err(|e| e.to_string())?;
    let _ = session.shutdown().await;
    match done.outcome.status {
        OutcomeStatus::Ok { ref repr, .. } if repr == "2" => Ok(SessionDto {
            python: info.python,
            protocol: info.protocol_version,
            features: info.features,
            start_ms,
            policy,
            layers: info
                .sandbox
                .into_iter()
                .map(|l| LayerDto {
                    name: l.name,
                    state: l.state,
                    detail: l.detail,
                })
                .collect(),
        }),
        other => Err(format!("test cell ended {}: {other:?}", other.name())),
    }
}

/// Runs the checks and prints the report.
pub async fn run(config: SessionConfig, json: bool) -> Result<u8, Failure> {
    let interpreter = capsule_worker::resolve_interpreter(config.python.as_deref())
        .map(|i| InterpreterDto {
            venv: i.prefix != i.base_prefix,
            executable: i.executable.display().to_string(),
            version: i.version,
            prefix: i.prefix.display().to_string(),
            base_prefix: i.base_prefix.display().to_string(),
        })
        .map_err(|e| e.to_string());
    let cache = capsule_worker::materialize(config.cache_dir.as_deref())
        .map(|b| CacheDto {
            root: capsule_worker::cache_root(config.cache_dir.as_deref())
                .display()
                .to_string(),
            bundle_dir: b.dir.display().to_string(),
            bundle_hash: b.hash,
        })
        .map_err(|e| e.to_string());
    let sandbox = capsule_sandbox::probe().to_json();
    let session = check_session(config).await;
    let ok = session.is_ok();
    let report = Report {
        version: env!("CARGO_PKG_VERSION"),
        interpreter: interpreter.into(),
        cache: cache.into(),
        sandbox,
        session: session.into(),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(anyhow::Error::new)?
        );
    } else {
        print_text(&report);
    }
    Ok(if ok { code::OK } else { code::START })
}

fn print_text(r: &Report) {
    println!("capsule {}", r.version);
    match &r.interpreter {
        Check::Ok(i) => println!(
            "interpreter: {} (Python {}{})",
            i.executable,
            i.version,
            if i.venv { ", venv" } else { "" }
        ),
        Check::Error(e) => println!("interpreter: NOT FOUND: {e}"),
    }
    match &r.cache {
        Check::Ok(c) => println!("worker cache: {} (bundle {})", c.bundle_dir, c.bundle_hash),
        Check::Error(e) => println!("worker cache: UNUSABLE: {e}"),
    }
    println!("sandbox:");
    if let Some(k) = r.sandbox.get("kernel").and_then(Value::as_str) {
        println!("  kernel {k}");
    }
    if let Some(layers) = r.sandbox.get("layers").and_then(Value::as_array) {
        for l in layers {
            let name = l.get("name").and_then(Value::as_str).unwrap_or("?");
            let ok = l.get("available").and_then(Value::as_bool).unwrap_or(false);
            let detail = l.get("detail").and_then(Value::as_str).unwrap_or("");
            println!(
                "  {:<12} {:<11} {detail}",
                name,
                if ok { "available" } else { "unavailable" }
            );
        }
    }
    match &r.session {
        Check::Ok(s) => {
            println!(
                "session: ok (Python {}, protocol v{}, started in {:.1} ms)",
                s.python.lines().next().unwrap_or_default(),
                s.protocol,
                s.start_ms
            );
            println!("what the `{}` policy did to that worker:", s.policy);
            for l in &s.layers {
                println!("  {:<16} {:<8} {}", l.name, l.state, l.detail);
            }
        }
        Check::Error(e) => println!("session: FAILED: {e}"),
    }
}
