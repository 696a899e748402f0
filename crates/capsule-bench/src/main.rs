//! `capsule-bench`: measures Capsule against the physical floor and Jupyter (BENCH-001).
//!
//! It is a benchmark, **not a test**: it prints figures and asserts no times. Workloads:
//!
//! 1. warm `x=1` round trip (`execute` → outcome), unpinned and pinned to CPU 0, next to the
//!    raw floor (`bench/floor/floor_worker.py` over blocking std pipes, same frame format),
//!    Capsule and floor blocks interleaved A/B/A/B inside child processes that alternate
//!    unpinned / pinned;
//! 2. cold session start to ready and to the first result vs `python -I -S -c pass` (the same
//!    interpreter binary the session resolved, shims excluded);
//! 3. the pool: warm acquire, fork server vs plain spawn, pool start to `min_idle = 4`;
//! 4. stdout throughput: 100,000 `print` lines and 100 × 1 MiB writes, every byte counted and
//!    checked, next to the floor worker sending the same bytes;
//! 5. cancel latency (busy loop, `time.sleep`, each idle and under an output flood);
//! 6. aggregate cells/s with 1, 4, 16 concurrent sessions (and as many floor workers);
//! 7. host and worker memory at 1, 50, 200 idle sessions.
//!
//! Usage: `cargo run --release -p capsule-bench -- [--quick] [--out FILE] [--json]
//! [--json-out FILE] [--jupyter FILE]`. Pinning: a pinned child calls `sched_setaffinity(CPU 0)`
//! before creating any thread, which is `taskset -c 0` on the whole child process (host
//! threads, Capsule worker and floor worker all inherit the mask).

mod floor;
mod machine;
mod report;
mod stats;
mod workloads;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use capsule_session::SessionConfig;
use clap::Parser;

use crate::report::Report;
use crate::workloads::{RoundtripSamples, Sizes};

#[derive(Parser, Debug)]
#[command(
    name = "capsule-bench",
    about = "Capsule benchmarks vs the raw floor and Jupyter (not a test)"
)]
struct Args {
    /// Every workload at tiny sizes (a smoke run of a few seconds; figures meaningless).
    #[arg(long)]
    quick: bool,
    /// Write the markdown report here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the JSON report on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
    /// Write the JSON report here.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// JSON from `bench/jupyter/driver.py`, merged as the Jupyter column.
    #[arg(long)]
    jupyter: Option<PathBuf>,
    /// Why the Jupyter column is missing (used by bench/run.sh when the venv cannot be made).
    #[arg(long)]
    jupyter_missing: Option<String>,
    /// Internal: run one child workload and print its JSON.
    #[arg(long, hide = true)]
    child: Option<String>,
    /// Internal: pin the child to this CPU.
    #[arg(long, hide = true)]
    pin: Option<usize>,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    // CAPSULE_BENCH_RUNTIME=current runs every host task on one thread (a variant).
    if std::env::var("CAPSULE_BENCH_RUNTIME").as_deref() == Ok("current") {
        return Ok(tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?);
    }
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn config() -> Result<SessionConfig> {
    SessionConfig::from_env().context("CAPSULE_* environment")
}

fn child_main(args: &Args) -> Result<()> {
    if let Some(cpu) = args.pin {
        machine::pin_to(cpu).context("sched_setaffinity")?;
    }
    let sizes = Sizes::new(args.quick);
    match args.child.as_deref() {
        Some("roundtrip") => {
            let rt = runtime()?;
            let out = rt.block_on(workloads::roundtrip_child(config()?, &sizes, args.pin))?;
            println!("{}", serde_json::to_string(&out)?);
            Ok(())
        }
        other => bail!("unknown child workload {other:?}"),
    }
}

fn run_child_roundtrip(
    quick: bool,
    pin: Option<usize>,
    sandbox_off: bool,
) -> Result<RoundtripSamples> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(["--child", "roundtrip"]);
    if sandbox_off {
        // Same workload with the `none` policy: what the sandbox costs per round trip.
        cmd.env("CAPSULE_SANDBOX", "none");
    }
    if quick {
        cmd.arg("--quick");
    }
    if let Some(cpu) = pin {
        cmd.args(["--pin", &cpu.to_string()]);
    }
    let out = cmd.output().context("running the round-trip child")?;
    if !out.status.success() {
        bail!(
            "round-trip child failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[capsule-bench] {}", msg.as_ref());
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.child.is_some() {
        return child_main(&args);
    }
    let started = Instant::now();
    let sizes = Sizes::new(args.quick);
    let cfg = config()?;
    let rt = runtime()?;

    let (python, py_version) = rt.block_on(workloads::probe_python(&cfg))?;
    let machine = machine::probe(&py_version, &python);
    log(format!(
        "{} × {} CPUs; Python {} at {}; Capsule {}",
        machine.cpu_model,
        machine.cores,
        machine.python,
        machine.python_executable,
        machine.capsule_commit
    ));

    // 1. Round trip: child processes alternate unpinned / pinned (A B A B ...).
    let mut unpinned = Vec::new();
    let mut pinned = Vec::new();
    let mut pinned_nosandbox = Vec::new();
    for round in 0..sizes.rt_rounds {
        log(format!("round trip: round {} unpinned", round + 1));
        unpinned.push(run_child_roundtrip(args.quick, None, false)?);
        log(format!("round trip: round {} pinned to CPU 0", round + 1));
        pinned.push(run_child_roundtrip(args.quick, Some(0), false)?);
        log(format!(
            "round trip: round {} pinned to CPU 0, sandbox off",
            round + 1
        ));
        pinned_nosandbox.push(run_child_roundtrip(args.quick, Some(0), true)?);
    }
    let roundtrip = vec![
        workloads::roundtrip_merge("unpinned", &unpinned),
        workloads::roundtrip_merge("pinned (CPU 0)", &pinned),
        workloads::roundtrip_merge("pinned (CPU 0), sandbox off", &pinned_nosandbox),
    ];
    for r in &roundtrip {
        log(format!(
            "round trip {}: capsule {} | floor {} | ratio {:.2}",
            r.variant,
            r.capsule.line(),
            r.floor.line(),
            r.ratio
        ));
    }

    // 2. Cold start.
    let cold = rt.block_on(workloads::cold(&cfg, &python, sizes.cold))?;
    log(format!(
        "cold: ready {} | first result {} | -c pass {} | ratio {:.2}",
        cold.ready.line(),
        cold.first_result.line(),
        cold.spawn_pass.line(),
        cold.ratio_ready
    ));

    // 3. Pool.
    let pool = rt.block_on(workloads::pool(&cfg, &sizes))?;
    log(format!(
        "pool: warm acquire {} | fork ready {} vs spawn {} (none) | fork ready {} vs spawn {} (default policy) | pool start (4) fork {} vs spawn {}",
        pool.warm_acquire.line(),
        pool.fork_ready.line(),
        pool.spawn_ready.line(),
        pool.fork_ready_sandboxed.line(),
        pool.spawn_ready_sandboxed.line(),
        pool.pool_start_4.line(),
        pool.pool_start_4_spawn.line()
    ));

    // 4. Output.
    let output = rt.block_on(workloads::output(&cfg, &python, &sizes))?;
    for o in &output {
        log(format!(
            "output {}: {} | {} of {} bytes, verified={}",
            o.name,
            o.capsule.line(),
            o.bytes_received,
            o.bytes_expected,
            o.verified
        ));
    }

    // 5. Cancel.
    let cancel = rt.block_on(workloads::cancel(&cfg, sizes.cancel))?;
    for c in &cancel {
        log(format!("{}: {} {:?}", c.name, c.latency.line(), c.outcomes));
    }

    // 6. Aggregate.
    let aggregate = rt.block_on(workloads::aggregate(&cfg, &python, &sizes))?;
    for a in &aggregate {
        log(format!(
            "aggregate {} sessions: {} | floor {}",
            a.sessions,
            a.capsule.line(),
            a.floor.line()
        ));
    }

    // 7. Memory.
    let memory = rt.block_on(workloads::memory(&cfg, &sizes.mem_sessions))?;
    for m in &memory {
        log(format!(
            "memory {} sessions: host {:.0} bytes/session | worker {}",
            m.sessions,
            m.host_rss_per_session,
            m.worker_rss.line()
        ));
    }

    let jupyter = match &args.jupyter {
        Some(p) => Some(
            serde_json::from_slice(
                &std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| format!("parsing {}", p.display()))?,
        ),
        None => None,
    };
    let report = Report {
        machine,
        quick: args.quick,
        sizes,
        roundtrip,
        cold,
        pool,
        output,
        cancel,
        aggregate,
        memory,
        jupyter,
        jupyter_missing: args.jupyter_missing.clone(),
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    let md = report.markdown();
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(p) = &args.out {
        std::fs::write(p, &md).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &args.json_out {
        std::fs::write(p, &json).with_context(|| format!("writing {}", p.display()))?;
    }
    if args.json {
        println!("{json}");
    } else {
        println!("{md}");
    }
    Ok(())
}
