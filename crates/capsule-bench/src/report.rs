//! The report: one JSON document with every figure, and the markdown table
//! Capsule / floor / Jupyter / ratio / target assembled from it.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::machine::Machine;
use crate::stats::{fmt_num, Summary};
use crate::workloads::{Aggregate, Cancel, Cold, Memory, Output, Roundtrip, Sizes};

/// Everything one run measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// Machine and versions.
    pub machine: Machine,
    /// Whether this was a `--quick` (smoke-size) run.
    pub quick: bool,
    /// Sizes used.
    pub sizes: Sizes,
    /// Workload 1: unpinned and pinned.
    pub roundtrip: Vec<Roundtrip>,
    /// Workload 2.
    pub cold: Cold,
    /// Workload 3: pool and fork server.
    pub pool: crate::workloads::Pool,
    /// Workload 4.
    pub output: Vec<Output>,
    /// Workload 5.
    pub cancel: Vec<Cancel>,
    /// Workload 6.
    pub aggregate: Vec<Aggregate>,
    /// Workload 7.
    pub memory: Vec<Memory>,
    /// The Jupyter driver's JSON, when given with `--jupyter`.
    pub jupyter: Option<Value>,
    /// Why there is no Jupyter column, when there is none.
    pub jupyter_missing: Option<String>,
    /// Wall time of the whole run, s.
    pub elapsed_s: f64,
}

fn t(us: f64) -> String {
    if us >= 1e6 {
        format!("{} s", fmt_num(us / 1e6))
    } else if us >= 1e3 {
        format!("{} ms", fmt_num(us / 1e3))
    } else {
        format!("{} µs", fmt_num(us))
    }
}

fn mib(b: f64) -> String {
    format!("{} MiB", fmt_num(b / (1024.0 * 1024.0)))
}

fn kib(b: f64) -> String {
    format!("{} KiB", fmt_num(b / 1024.0))
}

fn med_p99(s: &Summary) -> String {
    format!("{} (p99 {})", t(s.median), t(s.p99))
}

fn x(r: f64) -> String {
    format!("{}×", fmt_num(r))
}

fn jsum(j: Option<&Value>, key: &str) -> Option<Summary> {
    serde_json::from_value(j?.get("workloads")?.get(key)?.clone()).ok()
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "**met**"
    } else {
        "**missed**"
    }
}

impl Report {
    /// The markdown report: header, main table, every summary in detail.
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let j = self.jupyter.as_ref();
        let mut s = String::new();
        let _ = writeln!(s, "# Capsule benchmark report\n");
        let _ = writeln!(
            s,
            "- machine: {} × {} CPUs, Linux {}\n- Python {} (`{}`)\n- Capsule commit {} ({} build){}\n- elapsed: {:.1} s",
            m.cpu_model,
            m.cores,
            m.kernel,
            m.python,
            m.python_executable,
            m.capsule_commit,
            m.profile,
            if self.quick { ", **--quick (smoke sizes: not a measurement)**" } else { "" },
            self.elapsed_s
        );
        match (j, &self.jupyter_missing) {
            (Some(j), _) => {
                let v = &j["versions"];
                let _ = writeln!(
                    s,
                    "- Jupyter: ipykernel {} / jupyter_client {} on Python {}, {} transport",
                    v["ipykernel"].as_str().unwrap_or("?"),
                    v["jupyter_client"].as_str().unwrap_or("?"),
                    v["python"].as_str().unwrap_or("?"),
                    v["transport"].as_str().unwrap_or("?")
                );
            }
            (None, Some(why)) => {
                let _ = writeln!(s, "- Jupyter column missing: {why}");
            }
            (None, None) => {
                let _ = writeln!(s, "- Jupyter column missing: no `--jupyter FILE` given");
            }
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "| figure | Capsule | floor | Jupyter | Capsule / floor | Jupyter / Capsule | target | status |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        let none = "—".to_string();
        let mut row = |fig: String,
                       cap: String,
                       floor: String,
                       jup: String,
                       rf: String,
                       rj: String,
                       target: &str,
                       status: &str| {
            let _ = writeln!(
                s,
                "| {fig} | {cap} | {floor} | {jup} | {rf} | {rj} | {target} | {status} |"
            );
        };

        // 1. round trip
        let jr = jsum(j, "roundtrip");
        for r in &self.roundtrip {
            let pinned = r.variant != "unpinned";
            let jup = if pinned { None } else { jr.clone() };
            let rj = jup.as_ref().map(|js| js.median / r.capsule.median);
            let ok = r.ratio <= 1.5 && rj.is_none_or(|v| v >= 30.0);
            let status = if pinned {
                format!("{} (floor)", verdict(r.ratio <= 1.5))
            } else if rj.is_none() {
                format!("{} (floor; Jupyter n/a)", verdict(ok))
            } else {
                verdict(ok).to_string()
            };
            row(
                format!("`x=1` round trip, {}", r.variant),
                med_p99(&r.capsule),
                med_p99(&r.floor),
                jup.as_ref().map(med_p99).unwrap_or_else(|| none.clone()),
                format!(
                    "{} (pairs {}–{})",
                    x(r.ratio),
                    fmt_num(r.pair_ratios.min),
                    fmt_num(r.pair_ratios.max)
                ),
                rj.map(x).unwrap_or_else(|| none.clone()),
                if pinned {
                    "≤ 1.5× floor"
                } else {
                    "≤ 1.5× floor; Jupyter/Capsule ≥ 30×"
                },
                &status,
            );
        }
        // 2. cold start
        let c = &self.cold;
        let jc = jsum(j, "cold_ready");
        row(
            "cold start → ready".into(),
            med_p99(&c.ready),
            format!("{} `-I -S -c pass`", med_p99(&c.spawn_pass)),
            jc.as_ref().map(med_p99).unwrap_or_else(|| none.clone()),
            x(c.ratio_ready),
            jc.map(|js| x(js.median / c.ready.median))
                .unwrap_or_else(|| none.clone()),
            "≤ 3× `python3 -I -S -c pass`",
            verdict(c.ratio_ready <= 3.0),
        );
        let jf = jsum(j, "cold_first_result");
        row(
            "cold start → first `x=1` result".into(),
            med_p99(&c.first_result),
            format!("{} `-I -S -c pass`", med_p99(&c.spawn_pass)),
            jf.as_ref().map(med_p99).unwrap_or_else(|| none.clone()),
            x(c.ratio_first_result),
            jf.map(|js| x(js.median / c.first_result.median))
                .unwrap_or_else(|| none.clone()),
            "— (informative)",
            "—",
        );
        row(
            "cold start → first result, `enable_site=false` (variant)".into(),
            med_p99(&c.first_result_no_site),
            format!("{} `-I -S -c pass`", med_p99(&c.spawn_pass)),
            none.clone(),
            x(c.first_result_no_site.median / c.spawn_pass.median),
            none.clone(),
            "— (shows the cost of `site`)",
            "—",
        );
        let sandbox_cost = format!(
            "sandbox adds ≤ 5 ms (here {:+.1} ms)",
            (c.ready.median - c.ready_no_sandbox.median) / 1000.0
        );
        row(
            "cold start → ready, sandbox off (`none` policy, variant)".into(),
            med_p99(&c.ready_no_sandbox),
            format!("{} `-I -S -c pass`", med_p99(&c.spawn_pass)),
            none.clone(),
            x(c.ready_no_sandbox.median / c.spawn_pass.median),
            none.clone(),
            &sandbox_cost,
            verdict(c.ready.median - c.ready_no_sandbox.median <= 5000.0),
        );
        // 3. pool
        let p = &self.pool;
        row(
            "warm acquire from the pool (idle hit)".into(),
            med_p99(&p.warm_acquire),
            none.clone(),
            none.clone(),
            none.clone(),
            none.clone(),
            "p50 ≤ 20 µs",
            verdict(p.warm_acquire.median <= 20.0),
        );
        row(
            "session from the fork server → ready (policy `none`, spare ready)".into(),
            med_p99(&p.fork_ready),
            format!("{} plain spawn, same policy", med_p99(&p.spawn_ready)),
            none.clone(),
            x(p.ratio_fork_spawn),
            none.clone(),
            "p50 ≤ 3 ms",
            verdict(p.fork_ready.median <= 3000.0),
        );
        row(
            "session from the fork server → ready (default policy, sandboxed, spare ready)".into(),
            med_p99(&p.fork_ready_sandboxed),
            format!(
                "{} plain spawn, same policy",
                med_p99(&p.spawn_ready_sandboxed)
            ),
            none.clone(),
            x(p.ratio_fork_spawn_sandboxed),
            none.clone(),
            "p50 ≤ 3 ms",
            verdict(p.fork_ready_sandboxed.median <= 3000.0),
        );
        row(
            "pool start, `min_idle = 4` (default policy, fork server, waiting for the template)"
                .into(),
            med_p99(&p.pool_start_4),
            format!("{} all spawned", med_p99(&p.pool_start_4_spawn)),
            none.clone(),
            x(p.pool_start_4.median / p.pool_start_4_spawn.median),
            none.clone(),
            "— (informative)",
            "—",
        );
        // 4. output
        for o in &self.output {
            let jo = jsum(j, &o.name);
            let rate = |s: &Summary| format!("{} MB/s (min {})", fmt_num(s.median), fmt_num(s.min));
            let fig = if o.name == "print_lines" {
                format!(
                    "stdout: {} `print` lines{}",
                    self.sizes.lines,
                    o.lines_per_s
                        .as_ref()
                        .map(|l| format!(" ({} lines/s)", fmt_num(l.median)))
                        .unwrap_or_default()
                )
            } else {
                format!("stdout: {} × 1 MiB writes", self.sizes.mib)
            };
            let is_big = o.name == "write_1mib";
            row(
                format!(
                    "{fig}{}",
                    if o.verified {
                        ", bytes verified"
                    } else {
                        ", **BYTES NOT VERIFIED**"
                    }
                ),
                rate(&o.capsule),
                o.floor.as_ref().map(rate).unwrap_or_else(|| none.clone()),
                jo.as_ref().map(rate).unwrap_or_else(|| none.clone()),
                o.ratio.map(x).unwrap_or_else(|| none.clone()),
                jo.map(|js| x(o.capsule.median / js.median) + " (Capsule / Jupyter)")
                    .unwrap_or_else(|| none.clone()),
                if is_big { "≥ 200 MB/s" } else { "—" },
                if is_big {
                    verdict(o.capsule.median >= 200.0)
                } else {
                    "—"
                },
            );
        }
        // 5. cancel
        for cn in &self.cancel {
            let jc = jsum(j, &cn.name);
            let outcomes: Vec<String> = cn
                .outcomes
                .iter()
                .map(|(k, v)| format!("{k}×{v}"))
                .collect();
            row(
                format!("{} ({})", cn.name, outcomes.join(", ")),
                med_p99(&cn.latency),
                none.clone(),
                jc.as_ref().map(med_p99).unwrap_or_else(|| none.clone()),
                none.clone(),
                jc.map(|js| x(js.p99 / cn.latency.p99) + " at p99")
                    .unwrap_or_else(|| none.clone()),
                "p99 ≤ 20 ms",
                verdict(cn.latency.p99 <= 20_000.0 && cn.outcomes.keys().all(|k| k == "cancelled")),
            );
        }
        // 6. aggregate
        for a in &self.aggregate {
            row(
                format!("aggregate, {} sessions", a.sessions),
                format!(
                    "{} cells/s (cell {})",
                    fmt_num(a.capsule.median),
                    t(a.capsule_latency.median)
                ),
                format!("{} cells/s", fmt_num(a.floor.median)),
                none.clone(),
                x(a.ratio),
                none.clone(),
                "— (informative)",
                "—",
            );
        }
        // 7. memory
        if let Some(first) = self.memory.first() {
            let jk = j
                .and_then(|j| j["workloads"]["kernel_rss"]["bytes"].as_f64())
                .map(mib);
            row(
                "worker RSS, idle".into(),
                mib(first.worker_rss.median),
                "`python3 -I -S` ≈ 7.6 MB (env.md)".into(),
                jk.unwrap_or_else(|| none.clone()),
                none.clone(),
                none.clone(),
                "— (informative)",
                "—",
            );
        }
        for mm in &self.memory {
            row(
                format!("host RSS per idle session, {} sessions", mm.sessions),
                kib(mm.host_rss_per_session),
                none.clone(),
                none.clone(),
                none.clone(),
                none.clone(),
                "≤ 1 MiB",
                verdict(mm.host_rss_per_session <= 1024.0 * 1024.0),
            );
        }
        let _ = writeln!(s);
        s.push_str(&self.details());
        s
    }

    /// Every summary with n, median, p99, min, max.
    fn details(&self) -> String {
        let mut rows: Vec<(String, Summary)> = Vec::new();
        for r in &self.roundtrip {
            rows.push((
                format!("roundtrip {} capsule", r.variant),
                r.capsule.clone(),
            ));
            rows.push((format!("roundtrip {} floor", r.variant), r.floor.clone()));
            rows.push((
                format!("roundtrip {} pair ratios", r.variant),
                r.pair_ratios.clone(),
            ));
        }
        let c = &self.cold;
        rows.push(("cold ready".into(), c.ready.clone()));
        rows.push(("cold first result".into(), c.first_result.clone()));
        rows.push((
            "cold: session's own start_latency".into(),
            c.session_start_latency.clone(),
        ));
        rows.push((
            "cold first result, enable_site=false".into(),
            c.first_result_no_site.clone(),
        ));
        rows.push(("cold ready, sandbox off".into(), c.ready_no_sandbox.clone()));
        rows.push(("python -I -S -c pass".into(), c.spawn_pass.clone()));
        rows.push(("cold ready pair ratios".into(), c.pair_ratios_ready.clone()));
        for o in &self.output {
            rows.push((format!("{} capsule", o.name), o.capsule.clone()));
            if let Some(l) = &o.lines_per_s {
                rows.push((format!("{} capsule (lines/s)", o.name), l.clone()));
            }
            if let Some(f) = &o.floor {
                rows.push((format!("{} floor", o.name), f.clone()));
            }
        }
        for cn in &self.cancel {
            rows.push((cn.name.clone(), cn.latency.clone()));
        }
        for a in &self.aggregate {
            rows.push((
                format!("aggregate {} capsule", a.sessions),
                a.capsule.clone(),
            ));
            rows.push((
                format!("aggregate {} capsule cell latency", a.sessions),
                a.capsule_latency.clone(),
            ));
            rows.push((format!("aggregate {} floor", a.sessions), a.floor.clone()));
        }
        for mm in &self.memory {
            rows.push((
                format!("worker RSS at {} sessions", mm.sessions),
                mm.worker_rss.clone(),
            ));
        }
        if let Some(w) = self.jupyter.as_ref().and_then(|j| j.get("workloads")) {
            if let Some(obj) = w.as_object() {
                for (k, v) in obj {
                    if let Ok(sm) = serde_json::from_value::<Summary>(v.clone()) {
                        rows.push((format!("jupyter {k}"), sm));
                    }
                }
            }
        }
        let mut s = String::from(
            "## Details (every summary)\n\n| series | n | median | p99 | min | max | unit |\n|---|---|---|---|---|---|---|\n",
        );
        for (name, sm) in rows {
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {} | {} | {} | {} |",
                sm.n,
                fmt_num(sm.median),
                fmt_num(sm.p99),
                fmt_num(sm.min),
                fmt_num(sm.max),
                sm.unit
            );
        }
        s
    }
}
