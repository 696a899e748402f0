//! The Capsule side of every workload, each next to its floor where one is meaningful.
//!
//! All waits are on events (the next `Event` of an execution, a child's exit); the only timers
//! are the measurement windows of the aggregate-throughput workload.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use capsule_session::{Event, OutcomeStatus, Session, SessionConfig, Stream};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::floor::{self, FloorWorker};
use crate::machine;
use crate::stats::Summary;

/// 1 MiB.
pub const MIB: usize = 1024 * 1024;

/// How much of everything to run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sizes {
    /// Child processes per pinning variant (A/B/A/B: unpinned, pinned, unpinned, ...).
    pub rt_rounds: usize,
    /// Blocks per child; each block runs Capsule then the floor.
    pub rt_blocks: usize,
    /// Cells per block and system.
    pub rt_cells: usize,
    /// Warm-up cells per system and child (not measured).
    pub rt_warmup: usize,
    /// Cold starts (each paired with one `python -I -S -c pass`).
    pub cold: usize,
    /// Lines printed by the print workload.
    pub lines: usize,
    /// MiB written in 1 MiB `sys.stdout.write` calls.
    pub mib: usize,
    /// Repetitions of each output workload.
    pub out_reps: usize,
    /// Cancels per cancel variant.
    pub cancel: usize,
    /// Concurrent session counts for aggregate throughput.
    pub agg_sessions: Vec<usize>,
    /// Measurement window of aggregate throughput, ms.
    pub agg_window_ms: u64,
    /// Windows per session count.
    pub agg_windows: usize,
    /// Session counts for the memory workload.
    pub mem_sessions: Vec<usize>,
}

impl Sizes {
    /// Full sizes (BENCH-001) or the tiny smoke sizes.
    pub fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                rt_rounds: 1,
                rt_blocks: 2,
                rt_cells: 25,
                rt_warmup: 10,
                cold: 3,
                lines: 1000,
                mib: 1,
                out_reps: 1,
                cancel: 3,
                agg_sessions: vec![1, 4, 16],
                agg_window_ms: 100,
                agg_windows: 1,
                mem_sessions: vec![1, 3],
            }
        } else {
            Sizes {
                rt_rounds: 3,
                rt_blocks: 4,
                rt_cells: 300,
                rt_warmup: 200,
                cold: 20,
                lines: 100_000,
                mib: 100,
                out_reps: 3,
                cancel: 30,
                agg_sessions: vec![1, 4, 16],
                agg_window_ms: 1000,
                agg_windows: 3,
                mem_sessions: vec![1, 50, 200],
            }
        }
    }
}

/// Runs `code` and returns (round-trip time, outcome status name), draining all events.
async fn run_timed(session: &Session, code: &str) -> Result<(Duration, &'static str)> {
    let t0 = Instant::now();
    let mut exec = session.execute(code).await?;
    let mut status = "none";
    while let Some(ev) = exec.next().await {
        if let Event::Outcome(o) = ev {
            status = o.status.name();
        }
    }
    Ok((t0.elapsed(), status))
}

async fn run_ok(session: &Session, code: &str) -> Result<Duration> {
    let (dt, status) = run_timed(session, code).await?;
    if status != "ok" {
        bail!("cell {code:?} ended {status}");
    }
    Ok(dt)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

// ------------------------------------------------------------------------------------------
// 1. Warm round trip (one child process per variant; see main.rs)
// ------------------------------------------------------------------------------------------

/// Raw samples of one child run: Capsule and floor blocks alternate (A B A B ...).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoundtripSamples {
    /// CPU the child was pinned to, if any.
    pub pinned: Option<usize>,
    /// Capsule round trips, µs.
    pub capsule_us: Vec<f64>,
    /// Floor round trips, µs.
    pub floor_us: Vec<f64>,
    /// Per block pair: Capsule median / floor median.
    pub pair_ratios: Vec<f64>,
}

/// The child-process side of workload 1.
pub async fn roundtrip_child(
    config: SessionConfig,
    sizes: &Sizes,
    pinned: Option<usize>,
) -> Result<RoundtripSamples> {
    let session = Session::start(config).await?;
    let python = session.info().await?.executable;
    let mut fw = FloorWorker::start(&python)?;
    for _ in 0..sizes.rt_warmup {
        run_ok(&session, "x=1").await?;
        fw.execute("x=1")?;
    }
    let mut out = RoundtripSamples {
        pinned,
        capsule_us: Vec::new(),
        floor_us: Vec::new(),
        pair_ratios: Vec::new(),
    };
    for _ in 0..sizes.rt_blocks {
        let mut a = Vec::with_capacity(sizes.rt_cells);
        for _ in 0..sizes.rt_cells {
            a.push(us(run_ok(&session, "x=1").await?));
        }
        let mut b = Vec::with_capacity(sizes.rt_cells);
        for _ in 0..sizes.rt_cells {
            b.push(us(fw.execute("x=1")?));
        }
        out.pair_ratios
            .push(Summary::of(&a, "us").median / Summary::of(&b, "us").median);
        out.capsule_us.extend(a);
        out.floor_us.extend(b);
    }
    drop(fw);
    session.shutdown().await?;
    Ok(out)
}

/// Workload 1 aggregated over the child runs of one variant.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Roundtrip {
    /// `unpinned` or `pinned (cpu 0)`.
    pub variant: String,
    /// Capsule `execute("x=1")` → outcome, µs.
    pub capsule: Summary,
    /// Floor write → reply, µs.
    pub floor: Summary,
    /// Capsule median / floor median over all samples.
    pub ratio: f64,
    /// Ratios of medians block pair by block pair (their spread shows the noise).
    pub pair_ratios: Summary,
}

/// Merges the child runs of one variant.
pub fn roundtrip_merge(variant: &str, runs: &[RoundtripSamples]) -> Roundtrip {
    let cat = |f: fn(&RoundtripSamples) -> &Vec<f64>| -> Vec<f64> {
        runs.iter().flat_map(|r| f(r).iter().copied()).collect()
    };
    let capsule = Summary::of(&cat(|r| &r.capsule_us), "us");
    let floor = Summary::of(&cat(|r| &r.floor_us), "us");
    Roundtrip {
        variant: variant.to_string(),
        ratio: capsule.median / floor.median,
        capsule,
        floor,
        pair_ratios: Summary::of(&cat(|r| &r.pair_ratios), "x"),
    }
}

// ------------------------------------------------------------------------------------------
// 2. Cold start
// ------------------------------------------------------------------------------------------

/// Workload 2.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cold {
    /// `Session::start` → returned (worker said hello, `hello_ack` sent), µs.
    pub ready: Summary,
    /// `Session::start` → first `x=1` outcome, µs.
    pub first_result: Summary,
    /// The session's own `start_latency` (spawn → ready), µs.
    pub session_start_latency: Summary,
    /// Variant with `enable_site = false` (no `site`/`.pth` processing after the handshake):
    /// `Session::start` → first `x=1` outcome, µs. Shows what `site` costs on this interpreter.
    pub first_result_no_site: Summary,
    /// Variant with the sandbox off (`none` policy): `Session::start` → returned, µs. The
    /// difference to `ready` is what the sandbox (default `standard` policy) adds.
    pub ready_no_sandbox: Summary,
    /// `python -I -S -c pass`, spawn → exit, µs (same interpreter binary).
    pub spawn_pass: Summary,
    /// ready median / spawn_pass median.
    pub ratio_ready: f64,
    /// first_result median / spawn_pass median.
    pub ratio_first_result: f64,
    /// Ratios pair by pair (ready / pass of the same iteration).
    pub pair_ratios_ready: Summary,
}

/// Workload 2: A/B pairs of a Capsule cold start and a bare interpreter start.
pub async fn cold(config: &SessionConfig, python: &Path, n: usize) -> Result<Cold> {
    // One unmeasured start materialises the worker bundle and warms the page cache.
    Session::start(config.clone()).await?.shutdown().await?;
    floor::spawn_pass(python)?;
    let (mut ready, mut first, mut own, mut pass, mut pairs, mut nosite) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let mut no_site = config.clone();
    no_site.enable_site = false;
    let mut no_sandbox = config.clone();
    no_sandbox.sandbox = capsule_session::config::load_policy("none")?;
    let mut unsandboxed = Vec::new();
    for _ in 0..n {
        let t0 = Instant::now();
        let s = Session::start(config.clone()).await?;
        let t_ready = t0.elapsed();
        run_ok(&s, "x=1").await?;
        let t_first = t0.elapsed();
        if let Some(l) = s.info().await?.start_latency {
            own.push(us(l));
        }
        s.shutdown().await?;
        let p = floor::spawn_pass(python)?;
        ready.push(us(t_ready));
        first.push(us(t_first));
        pass.push(us(p));
        pairs.push(us(t_ready) / us(p));
        let t0 = Instant::now();
        let s = Session::start(no_site.clone()).await?;
        run_ok(&s, "x=1").await?;
        nosite.push(us(t0.elapsed()));
        s.shutdown().await?;
        let t0 = Instant::now();
        let s = Session::start(no_sandbox.clone()).await?;
        unsandboxed.push(us(t0.elapsed()));
        s.shutdown().await?;
    }
    let ready = Summary::of(&ready, "us");
    let first_result = Summary::of(&first, "us");
    let spawn_pass = Summary::of(&pass, "us");
    Ok(Cold {
        ratio_ready: ready.median / spawn_pass.median,
        ratio_first_result: first_result.median / spawn_pass.median,
        ready,
        first_result,
        session_start_latency: Summary::of(&own, "us"),
        first_result_no_site: Summary::of(&nosite, "us"),
        ready_no_sandbox: Summary::of(&unsandboxed, "us"),
        spawn_pass,
        pair_ratios_ready: Summary::of(&pairs, "x"),
    })
}

// ------------------------------------------------------------------------------------------
// 3. Pool and fork server
// ------------------------------------------------------------------------------------------

/// Workload 3.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pool {
    /// `acquire()` of an idle session, timed by the caller, µs.
    pub warm_acquire: Summary,
    /// `Session::start` → ready through the fork server, policy `none`, µs.
    pub fork_ready: Summary,
    /// `Session::start` → ready by plain spawn, same policy, interleaved with `fork_ready`, µs.
    pub spawn_ready: Summary,
    /// fork_ready median / spawn_ready median.
    pub ratio_fork_spawn: f64,
    /// `Session::start` → ready through the fork server, default (sandboxed) policy, µs.
    pub fork_ready_sandboxed: Summary,
    /// Plain spawn, default policy, interleaved with `fork_ready_sandboxed`, µs.
    pub spawn_ready_sandboxed: Summary,
    /// fork_ready_sandboxed median / spawn_ready_sandboxed median.
    pub ratio_fork_spawn_sandboxed: f64,
    /// Pool start with `min_idle = 4` until 4 sessions are ready (default policy, fork
    /// server, the default), µs.
    pub pool_start_4: Summary,
    /// The same with `fork_server = false` (every session spawned), µs.
    pub pool_start_4_spawn: Summary,
}

/// Fork server vs plain spawn under `cfg`'s policy, A/B interleaved: (forked, spawned) µs.
async fn fork_vs_spawn(cfg: &SessionConfig, rounds: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let fork =
        capsule_pool::ForkServer::new(cfg, &[]).map_err(|e| anyhow::anyhow!("fork server: {e}"))?;
    let launcher: std::sync::Arc<dyn capsule_session::Launcher> = fork.clone();
    // The template (and its first spare) start outside the measurement.
    Session::start_with(cfg.clone(), Some(launcher.clone()))
        .await?
        .shutdown()
        .await?;
    let (mut forked, mut spawned) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        let s = Session::start(cfg.clone()).await?;
        spawned.push(us(t.elapsed()));
        s.shutdown().await?;
        // As in a pool, where creations are spaced by use: the spare is back before the next.
        fork.wait_until(|i| i.spare_pid.is_some()).await;
        let t = Instant::now();
        let s = Session::start_with(cfg.clone(), Some(launcher.clone())).await?;
        forked.push(us(t.elapsed()));
        run_ok(&s, "x=1").await?;
        s.shutdown().await?;
    }
    let info = fork.info();
    if info.failures > 0 {
        anyhow::bail!(
            "the fork server failed {} launches: {info:?}",
            info.failures
        );
    }
    fork.shutdown();
    Ok((forked, spawned))
}

/// Workload 3: warm acquire, fork server vs plain spawn (unconfined and sandboxed), pool start
/// to `min_idle = 4` by fork and by spawn.
pub async fn pool(config: &SessionConfig, sizes: &Sizes) -> Result<Pool> {
    use capsule_pool::{PoolConfig, SessionPool};
    let quick = sizes.cold < 10;
    let rounds = if quick { 3 } else { 30 };
    let mut none = config.clone();
    none.sandbox = capsule_session::config::load_policy("none")?;
    let (forked, spawned) = fork_vs_spawn(&none, rounds).await?;
    let (forked_sb, spawned_sb) = fork_vs_spawn(config, rounds).await?;
    // Pool start, fork server (the default) and spawn, interleaved.
    let (mut starts, mut starts_spawn) = (Vec::new(), Vec::new());
    for _ in 0..if quick { 1 } else { 3 } {
        for (fork_server, into) in [(true, &mut starts), (false, &mut starts_spawn)] {
            let t = Instant::now();
            let pool = SessionPool::start(PoolConfig {
                min_idle: 4,
                max_sessions: 4,
                fork_server,
                // Every creation waits for the template, so this row measures forked sessions.
                spawn_while_warming: false,
                session: config.clone(),
                ..PoolConfig::default()
            })
            .await?;
            pool.wait_ready().await?;
            into.push(us(t.elapsed()));
            pool.stop().await;
        }
    }
    // Warm acquire: take every idle session, give them back, wait until all are idle again.
    let n = 8;
    let pool = SessionPool::start(PoolConfig {
        min_idle: n,
        max_sessions: n,
        session: config.clone(),
        ..PoolConfig::default()
    })
    .await?;
    pool.wait_ready().await?;
    let mut hits = Vec::new();
    for _ in 0..rounds * 4 {
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let s = pool.acquire(Duration::from_secs(30)).await?;
            hits.push(us(t.elapsed()));
            held.push(s);
        }
        drop(held);
        pool.wait_until(|i| i.idle == n).await;
    }
    pool.stop().await;
    let fork_ready = Summary::of(&forked, "us");
    let spawn_ready = Summary::of(&spawned, "us");
    let fork_ready_sandboxed = Summary::of(&forked_sb, "us");
    let spawn_ready_sandboxed = Summary::of(&spawned_sb, "us");
    Ok(Pool {
        ratio_fork_spawn: fork_ready.median / spawn_ready.median,
        ratio_fork_spawn_sandboxed: fork_ready_sandboxed.median / spawn_ready_sandboxed.median,
        warm_acquire: Summary::of(&hits, "us"),
        fork_ready,
        spawn_ready,
        fork_ready_sandboxed,
        spawn_ready_sandboxed,
        pool_start_4: Summary::of(&starts, "us"),
        pool_start_4_spawn: Summary::of(&starts_spawn, "us"),
    })
}

// ------------------------------------------------------------------------------------------
// 4. Output throughput
// ------------------------------------------------------------------------------------------

/// Workload 4 (one of its two cells).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Output {
    /// `print_lines` or `write_1mib`.
    pub name: String,
    /// The cell.
    pub code: String,
    /// MB/s (10^6 bytes per second) received by the client, cell submit → outcome.
    pub capsule: Summary,
    /// Lines per second (print workload only).
    pub lines_per_s: Option<Summary>,
    /// Bytes the cell writes.
    pub bytes_expected: u64,
    /// Bytes received in the last repetition (every repetition is checked).
    pub bytes_received: u64,
    /// Every repetition: byte count equal and content as written.
    pub verified: bool,
    /// Floor: the floor worker sending the same bytes as 1 MiB frames, MB/s.
    pub floor: Option<Summary>,
    /// Floor bytes received in the last repetition.
    pub floor_bytes_received: Option<u64>,
    /// capsule median / floor median.
    pub ratio: Option<f64>,
    /// How this run's configuration differs from the defaults.
    pub config_note: String,
}

/// Streaming check of `line 0\nline 1\n...` without buffering the whole output.
struct LineCheck {
    carry: String,
    next: u64,
    ok: bool,
}

impl LineCheck {
    fn feed(&mut self, text: &str) {
        self.carry.push_str(text);
        let mut start = 0;
        while let Some(pos) = self.carry[start..].find('\n') {
            let line = &self.carry[start..start + pos];
            self.ok &= line
                .strip_prefix("line ")
                .and_then(|n| n.parse::<u64>().ok())
                == Some(self.next);
            self.next += 1;
            start += pos + 1;
        }
        self.carry.drain(..start);
    }
}

/// Runs one output cell and counts/validates what arrives. Returns (bytes, elapsed, ok).
async fn output_once(
    session: &Session,
    code: &str,
    lines: Option<usize>,
) -> Result<(u64, Duration, bool)> {
    let t0 = Instant::now();
    let mut exec = session.execute(code).await?;
    let mut got = 0u64;
    let mut ok = true;
    let mut check = LineCheck {
        carry: String::new(),
        next: 0,
        ok: true,
    };
    while let Some(ev) = exec.next().await {
        match ev {
            Event::Output {
                stream: Stream::Stdout,
                text,
            } => {
                got += text.len() as u64;
                match lines {
                    Some(_) => check.feed(&text),
                    None => ok &= text.bytes().all(|b| b == b'x'),
                }
            }
            Event::Output { .. } | Event::Display { .. } | Event::InputRequest { .. } => ok = false,
            Event::Outcome(o) => {
                ok &= matches!(o.status, OutcomeStatus::Ok { .. }) && o.truncated.is_none();
            }
        }
    }
    let dt = t0.elapsed();
    if let Some(n) = lines {
        ok &= check.ok && check.next == n as u64 && check.carry.is_empty();
    }
    Ok((got, dt, ok))
}

/// Workload 4: 100,000 printed lines and 100 × 1 MiB writes.
pub async fn output(config: &SessionConfig, python: &Path, sizes: &Sizes) -> Result<Vec<Output>> {
    let mut config = config.clone();
    let total = (sizes.mib * MIB) as u64;
    let note = if config.output_budget < 2 * total {
        let old = config.output_budget;
        config.output_budget = 2 * total;
        format!(
            "output_budget raised from {} MiB to {} MiB so the {}-MiB cell is not truncated; everything else default",
            old / MIB as u64,
            config.output_budget / MIB as u64,
            sizes.mib
        )
    } else {
        "defaults".into()
    };
    let session = Session::start(config).await?;
    run_ok(&session, "x=1").await?;
    let mut results = Vec::new();

    // print lines
    let n = sizes.lines;
    let code = format!("for i in range({n}): print('line', i)");
    let expected: u64 = (0..n).map(|i| format!("line {i}\n").len() as u64).sum();
    let (mut rates, mut lps, mut ok, mut last) = (Vec::new(), Vec::new(), true, 0);
    for _ in 0..sizes.out_reps {
        let (got, dt, good) = output_once(&session, &code, Some(n)).await?;
        ok &= good && got == expected;
        last = got;
        rates.push(got as f64 / dt.as_secs_f64() / 1e6);
        lps.push(n as f64 / dt.as_secs_f64());
    }
    results.push(Output {
        name: "print_lines".into(),
        code: code.clone(),
        capsule: Summary::of(&rates, "MB/s"),
        lines_per_s: Some(Summary::of(&lps, "lines/s")),
        bytes_expected: expected,
        bytes_received: last,
        verified: ok,
        floor: None,
        floor_bytes_received: None,
        ratio: None,
        config_note: note.clone(),
    });

    // 1 MiB writes, A/B with the floor flooding the same bytes in 1 MiB frames
    let m = sizes.mib;
    let code = format!("import sys\n_b = 'x' * {MIB}\nfor _ in range({m}): sys.stdout.write(_b)\n");
    let mut fw = FloorWorker::start(python)?;
    let (mut rates, mut frates, mut ok, mut last, mut flast) = (Vec::new(), Vec::new(), true, 0, 0);
    for _ in 0..sizes.out_reps {
        let (got, dt, good) = output_once(&session, &code, None).await?;
        ok &= good && got == total;
        last = got;
        rates.push(got as f64 / dt.as_secs_f64() / 1e6);
        let (fgot, fdt, fgood) = fw.flood(MIB, m)?;
        ok &= fgood && fgot == total;
        flast = fgot;
        frates.push(fgot as f64 / fdt.as_secs_f64() / 1e6);
    }
    drop(fw);
    let capsule = Summary::of(&rates, "MB/s");
    let floor = Summary::of(&frates, "MB/s");
    results.push(Output {
        name: "write_1mib".into(),
        code,
        ratio: Some(capsule.median / floor.median),
        capsule,
        lines_per_s: None,
        bytes_expected: total,
        bytes_received: last,
        verified: ok,
        floor: Some(floor),
        floor_bytes_received: Some(flast),
        config_note: note,
    });
    session.shutdown().await?;
    Ok(results)
}

// ------------------------------------------------------------------------------------------
// 5. Cancel latency
// ------------------------------------------------------------------------------------------

/// The cancel cells; each prints `READY` once it runs. Shared with the Jupyter driver.
pub const CANCEL_CELLS: [(&str, &str); 4] = [
    ("cancel_busy", "print('READY', flush=True)\nwhile True: pass"),
    (
        "cancel_sleep",
        "import time\nprint('READY', flush=True)\ntime.sleep(100)",
    ),
    (
        "cancel_flood_busy",
        "print('READY', flush=True)\ni = 0\nwhile True:\n    print('line', i)\n    i += 1",
    ),
    (
        "cancel_flood_sleep",
        "import threading, time, sys\n_stop = threading.Event()\ndef _f():\n    while not _stop.is_set():\n        sys.stdout.write('y' * 200 + '\\n')\n_t = threading.Thread(target=_f, daemon=True)\nprint('READY', flush=True)\n_t.start()\ntry:\n    time.sleep(100)\nfinally:\n    _stop.set(); _t.join()\n",
    ),
];

/// Workload 5 (one variant).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cancel {
    /// Variant name.
    pub name: String,
    /// The cell.
    pub code: String,
    /// `cancel()` requested → outcome received, µs.
    pub latency: Summary,
    /// Outcome names and counts (all `cancelled` when the cooperative rung worked).
    pub outcomes: BTreeMap<String, usize>,
    /// Output bytes received while cancelling (flood variants).
    pub bytes_during_cancel: u64,
}

/// Workload 5: cancel once the cell has printed READY; time to the outcome.
pub async fn cancel(config: &SessionConfig, n: usize) -> Result<Vec<Cancel>> {
    let session = Session::start(config.clone()).await?;
    run_ok(&session, "x=1").await?;
    let mut out = Vec::new();
    for (name, code) in CANCEL_CELLS {
        let mut lat = Vec::new();
        let mut outcomes = BTreeMap::new();
        let mut flood_bytes = 0u64;
        for _ in 0..n {
            let mut exec = session.execute(code).await?;
            let mut seen = String::new();
            loop {
                match exec.next().await {
                    Some(Event::Output { text, .. }) => {
                        seen.push_str(&text);
                        if seen.contains("READY") {
                            break;
                        }
                        if seen.len() > 64 {
                            seen.drain(..seen.len() - 8);
                        }
                    }
                    Some(Event::Outcome(o)) => {
                        bail!("{name}: ended {} before READY", o.status.name())
                    }
                    Some(_) => {}
                    None => bail!("{name}: stream ended before READY"),
                }
            }
            let t0 = Instant::now();
            exec.cancel().await?;
            let mut status = "none";
            while let Some(ev) = exec.next().await {
                match ev {
                    Event::Output { text, .. } => flood_bytes += text.len() as u64,
                    Event::Outcome(o) => status = o.status.name(),
                    _ => {}
                }
            }
            lat.push(us(t0.elapsed()));
            *outcomes.entry(status.to_string()).or_insert(0) += 1;
        }
        out.push(Cancel {
            name: name.into(),
            code: code.into(),
            latency: Summary::of(&lat, "us"),
            outcomes,
            bytes_during_cancel: flood_bytes,
        });
    }
    session.shutdown().await?;
    Ok(out)
}

// ------------------------------------------------------------------------------------------
// 6. Aggregate throughput
// ------------------------------------------------------------------------------------------

/// Workload 6 (one session count).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Aggregate {
    /// Concurrent sessions.
    pub sessions: usize,
    /// Cells per second over all sessions, one sample per window.
    pub capsule: Summary,
    /// Per-cell round trip under this load, µs.
    pub capsule_latency: Summary,
    /// The same number of floor workers, each driven by its own thread, cells/s per window.
    pub floor: Summary,
    /// capsule median / floor median.
    pub ratio: f64,
}

async fn start_many(config: &SessionConfig, n: usize) -> Result<Vec<Session>> {
    let mut sessions = Vec::with_capacity(n);
    // Batches of 16 concurrent starts keep 200 interpreter start-ups from thrashing 2 CPUs.
    while sessions.len() < n {
        let mut set = JoinSet::new();
        for _ in 0..(n - sessions.len()).min(16) {
            let c = config.clone();
            set.spawn(async move { Session::start(c).await });
        }
        while let Some(r) = set.join_next().await {
            sessions.push(r.context("start task")??);
        }
    }
    Ok(sessions)
}

/// Workload 6: N sessions each running `x=1` back to back for a window.
pub async fn aggregate(
    config: &SessionConfig,
    python: &Path,
    sizes: &Sizes,
) -> Result<Vec<Aggregate>> {
    let window = Duration::from_millis(sizes.agg_window_ms);
    let mut out = Vec::new();
    for &n in &sizes.agg_sessions {
        let sessions = start_many(config, n).await?;
        for s in &sessions {
            run_ok(s, "x=1").await?;
        }
        let floors = (0..n)
            .map(|_| FloorWorker::start(python))
            .collect::<Result<Vec<_>>>()?;
        let mut floors: Vec<Option<FloorWorker>> = floors.into_iter().map(Some).collect();
        let (mut rates, mut lat, mut frates) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..sizes.agg_windows {
            // Capsule window.
            let t0 = Instant::now();
            let end = t0 + window;
            let mut set = JoinSet::new();
            for s in &sessions {
                let s = s.clone();
                set.spawn(async move {
                    let mut l = Vec::new();
                    while Instant::now() < end {
                        l.push(us(run_ok(&s, "x=1").await?));
                    }
                    anyhow::Ok(l)
                });
            }
            let mut count = 0usize;
            while let Some(r) = set.join_next().await {
                let l = r.context("aggregate task")??;
                count += l.len();
                lat.extend(l);
            }
            rates.push(count as f64 / t0.elapsed().as_secs_f64());
            // Floor window: one blocking thread per floor worker.
            let t0 = Instant::now();
            let end = t0 + window;
            let handles: Vec<_> = floors
                .iter_mut()
                .map(|slot| {
                    let mut fw = slot.take().context("floor worker in use")?;
                    Ok(std::thread::spawn(
                        move || -> Result<(FloorWorker, usize)> {
                            let mut c = 0;
                            while Instant::now() < end {
                                fw.execute("x=1")?;
                                c += 1;
                            }
                            Ok((fw, c))
                        },
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            let mut count = 0;
            for (slot, h) in floors.iter_mut().zip(handles) {
                let (fw, c) = h
                    .join()
                    .map_err(|_| anyhow::anyhow!("floor thread panicked"))??;
                *slot = Some(fw);
                count += c;
            }
            frates.push(count as f64 / t0.elapsed().as_secs_f64());
        }
        drop(floors);
        for s in &sessions {
            s.shutdown().await?;
        }
        let capsule = Summary::of(&rates, "cells/s");
        let floor = Summary::of(&frates, "cells/s");
        out.push(Aggregate {
            sessions: n,
            ratio: capsule.median / floor.median,
            capsule,
            capsule_latency: Summary::of(&lat, "us"),
            floor,
        });
    }
    Ok(out)
}

// ------------------------------------------------------------------------------------------
// 7. Memory
// ------------------------------------------------------------------------------------------

/// Workload 7 (one session count).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Memory {
    /// Idle sessions alive (each has run one `x=1`).
    pub sessions: usize,
    /// Host VmRSS before starting them, bytes.
    pub host_rss_before: u64,
    /// Host VmRSS with all of them idle, bytes.
    pub host_rss_after: u64,
    /// (after - before) / sessions, bytes.
    pub host_rss_per_session: f64,
    /// Worker RSS (`SessionInfo::rss_bytes`), bytes.
    pub worker_rss: Summary,
}

/// Workload 7: host and worker memory at 1, 50, 200 idle sessions.
pub async fn memory(config: &SessionConfig, counts: &[usize]) -> Result<Vec<Memory>> {
    let mut out = Vec::new();
    // Warm the host's allocator and runtime once so the first count does not pay for it.
    Session::start(config.clone()).await?.shutdown().await?;
    for &n in counts {
        let before = machine::self_rss().unwrap_or(0);
        let sessions = start_many(config, n).await?;
        let mut rss = Vec::new();
        for s in &sessions {
            run_ok(s, "x=1").await?;
        }
        for s in &sessions {
            if let Some(b) = s.info().await?.rss_bytes {
                rss.push(b as f64);
            }
        }
        let after = machine::self_rss().unwrap_or(0);
        for s in &sessions {
            s.shutdown().await?;
        }
        drop(sessions);
        out.push(Memory {
            sessions: n,
            host_rss_before: before,
            host_rss_after: after,
            host_rss_per_session: (after as f64 - before as f64) / n as f64,
            worker_rss: Summary::of(&rss, "bytes"),
        });
    }
    Ok(out)
}

/// The interpreter a default session uses (shims resolved by the session) and its version.
pub async fn probe_python(config: &SessionConfig) -> Result<(PathBuf, String)> {
    let s = Session::start(config.clone()).await?;
    let info = s.info().await?;
    s.shutdown().await?;
    Ok((info.executable, info.python))
}
