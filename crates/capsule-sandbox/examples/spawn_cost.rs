//! Measures what the sandbox adds to a cold worker spawn: `/usr/bin/python3 -I -S -c pass`
//! spawned and waited for, plain vs `prepare()` + `install()` (+ `after_spawn`; `cleanup()`, which runs after the worker is gone, is timed apart),
//! interleaved in one run. Prints medians and p99s. Not a test: no thresholds.
//!
//! `cargo run --release -p capsule-sandbox --example spawn_cost -- [runs] [python] [preset]`

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use capsule_sandbox::{prepare, Policy, SpawnSpec};

fn cmd(python: &str, scratch: &std::path::Path) -> Command {
    let mut c = Command::new(python);
    c.args(["-I", "-S", "-c", "pass"])
        .stdin(Stdio::null())
        .current_dir(scratch);
    std::os::unix::process::CommandExt::process_group(&mut c, 0);
    c
}

fn stats(name: &str, v: &mut [Duration]) {
    v.sort();
    let pct = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "{name:<28} median {:>8.2} ms   p99 {:>8.2} ms   (n={})",
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        v.len()
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = args.get(1).map_or(Ok(200), |s| s.parse())?;
    let python = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| "/usr/bin/python3".into());
    let preset = args.get(3).map_or("standard", String::as_str);
    // Optional 4th argument: TOML overrides, e.g. 'layers.cgroup = "off"'.
    let policy = match args.get(4) {
        Some(extra) => Policy::from_toml_str(&format!("preset = \"{preset}\"\n{extra}"))?,
        None => Policy::preset(preset)?,
    };
    let scratch = tempfile::tempdir()?;
    let spec = SpawnSpec::new(&python, scratch.path());
    let (mut plain, mut sandboxed, mut prep, mut clean) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs + 10 {
        let t = Instant::now();
        let st = cmd(&python, scratch.path()).status()?;
        let d_plain = t.elapsed();
        assert!(st.success());

        let t = Instant::now();
        let mut p = prepare(&policy, &spec)?;
        let d_prep = t.elapsed();
        let mut c = cmd(&python, scratch.path());
        p.install(&mut c)?;
        let mut child = c.spawn()?;
        p.after_spawn(child.id())?;
        let st = child.wait()?;
        let d_sb = t.elapsed();
        let t = Instant::now();
        p.cleanup();
        let d_clean = t.elapsed();
        assert!(st.success());
        if i >= 10 {
            plain.push(d_plain);
            sandboxed.push(d_sb);
            prep.push(d_prep);
            clean.push(d_clean);
        }
    }
    println!("python: {python}, policy: {}", policy.preset);
    stats("plain spawn+wait", &mut plain);
    stats("sandboxed spawn+wait", &mut sandboxed);
    stats("  of which prepare()", &mut prep);
    stats("cleanup() after exit", &mut clean);
    let mp = plain[plain.len() / 2];
    let ms = sandboxed[sandboxed.len() / 2];
    println!(
        "added by the sandbox (median): {:.2} ms",
        (ms.as_secs_f64() - mp.as_secs_f64()) * 1e3
    );
    Ok(())
}
