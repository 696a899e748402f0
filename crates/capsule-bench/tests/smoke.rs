//! Smoke test of the benchmark harness: runs `capsule-bench --quick --json` (every workload at
//! tiny sizes) and checks the report is well formed and that every byte the output workloads
//! sent was received. It asserts no timing: figures from a smoke run mean nothing.

use std::process::Command;

use serde_json::Value;

fn get<'a>(v: &'a Value, key: &str) -> &'a Value {
    v.get(key)
        .unwrap_or_else(|| panic!("report has no {key:?}: {v}"))
}

fn summary_ok(s: &Value, what: &str) {
    let n = get(s, "n").as_u64().expect("n");
    assert!(n > 0, "{what}: no samples");
    for k in ["median", "p99", "min", "max", "mean"] {
        assert!(get(s, k).is_number(), "{what}.{k} is not a number: {s}");
    }
}

#[test]
fn quick_run_produces_a_complete_report_with_every_byte_accounted_for() {
    let out = Command::new(env!("CARGO_BIN_EXE_capsule-bench"))
        .args(["--quick", "--json"])
        .output()
        .expect("running capsule-bench");
    assert!(
        out.status.success(),
        "capsule-bench --quick failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(get(&report, "quick"), &Value::Bool(true));
    for key in ["cpu_model", "python", "python_executable", "capsule_commit"] {
        assert!(
            get(get(&report, "machine"), key).is_string(),
            "machine.{key}"
        );
    }

    let rt = get(&report, "roundtrip").as_array().expect("roundtrip");
    assert_eq!(
        rt.len(),
        3,
        "unpinned, pinned and pinned-with-the-sandbox-off variants"
    );
    for r in rt {
        summary_ok(get(r, "capsule"), "roundtrip.capsule");
        summary_ok(get(r, "floor"), "roundtrip.floor");
    }
    let cold = get(&report, "cold");
    for k in ["ready", "first_result", "spawn_pass"] {
        summary_ok(get(cold, k), k);
    }
    assert!(
        get(&report, "pool")["warm_acquire"]["n"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "{report}"
    );
    assert!(
        get(&report, "pool")["fork_ready"]["n"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "{report}"
    );

    let output = get(&report, "output").as_array().expect("output");
    let names: Vec<&str> = output
        .iter()
        .map(|o| get(o, "name").as_str().expect("name"))
        .collect();
    assert_eq!(names, ["print_lines", "write_1mib"]);
    for o in output {
        let name = get(o, "name");
        let expected = get(o, "bytes_expected").as_u64().expect("bytes_expected");
        assert!(expected > 0, "{name}: nothing sent");
        assert_eq!(
            get(o, "bytes_received").as_u64(),
            Some(expected),
            "{name}: bytes received"
        );
        if let Some(f) = o.get("floor_bytes_received").and_then(Value::as_u64) {
            assert_eq!(f, expected, "{name}: floor bytes received");
        }
        assert_eq!(get(o, "verified"), &Value::Bool(true), "{name}: content");
        summary_ok(get(o, "capsule"), "output");
    }

    let cancel = get(&report, "cancel").as_array().expect("cancel");
    assert_eq!(cancel.len(), 4);
    for c in cancel {
        summary_ok(get(c, "latency"), "cancel");
        let outcomes = get(c, "outcomes").as_object().expect("outcomes");
        assert!(
            outcomes.keys().all(|k| k == "cancelled"),
            "{}: {outcomes:?}",
            get(c, "name")
        );
    }

    let agg = get(&report, "aggregate").as_array().expect("aggregate");
    let counts: Vec<u64> = agg
        .iter()
        .map(|a| get(a, "sessions").as_u64().expect("sessions"))
        .collect();
    assert_eq!(counts, [1, 4, 16]);
    for a in agg {
        summary_ok(get(a, "capsule"), "aggregate");
        summary_ok(get(a, "floor"), "aggregate floor");
    }

    let mem = get(&report, "memory").as_array().expect("memory");
    assert!(!mem.is_empty());
    for m in mem {
        summary_ok(get(m, "worker_rss"), "worker_rss");
    }
}
