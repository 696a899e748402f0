//! `capsule stdio`: the client event model v1 (docs/api.md), far past the public smoke test.

use std::io::Write;
use std::process::Command;

use serde_json::{json, Value};

use crate::{capsule, text, StdioClient};

fn info(c: &mut StdioClient, id: &str) -> Value {
    c.send(json!({"op": "info", "id": id}));
    c.wait(|e| e["event"] == "info" && e["id"] == id)
}

/// The `(session, pid)` of the pool's one idle spare, from an `info` event.
fn spare(info: &Value) -> (Value, Value) {
    let idle: Vec<&Value> = info["pool"]["sessions"]
        .as_array()
        .map(|s| s.iter().filter(|s| s["state"] == "idle").collect())
        .unwrap_or_default();
    assert_eq!(idle.len(), 1, "one warm spare: {info}");
    (idle[0]["session"].clone(), idle[0]["pid"].clone())
}

/// Reads events until `n` outcomes have arrived; returns everything read.
fn until_outcomes(c: &mut StdioClient, n: usize) -> Vec<Value> {
    let mut evs = Vec::new();
    while evs
        .iter()
        .filter(|e: &&Value| e["event"] == "outcome")
        .count()
        < n
    {
        evs.push(c.wait(|_| true));
    }
    evs
}

fn kinds(evs: &[Value]) -> Vec<String> {
    evs.iter()
        .map(|e| e["event"].as_str().unwrap_or("?").to_string())
        .collect()
}

fn assert_one_outcome_last(evs: &[Value]) {
    let k = kinds(evs);
    assert_eq!(k.last().map(String::as_str), Some("outcome"), "{evs:?}");
    assert_eq!(k.iter().filter(|k| *k == "outcome").count(), 1, "{evs:?}");
}

#[test]
fn ready_names_the_session_python_and_protocol() {
    let (_c, ready) = StdioClient::start(&[]);
    assert!(ready["session"].is_string(), "{ready}");
    assert!(
        ready["python"].as_str().is_some_and(|p| p.starts_with('3')),
        "{ready}"
    );
    assert!(
        ready["protocol"].as_u64().is_some_and(|p| p >= 1),
        "{ready}"
    );
}

#[test]
fn state_persists_between_cells_and_values_are_json_and_repr() {
    let (mut c, _) = StdioClient::start(&[]);
    let oc = c.outcome("a", "x = 6 * 7");
    assert_eq!(
        (
            oc["status"].clone(),
            oc["value"].clone(),
            oc["repr"].clone()
        ),
        (json!("ok"), Value::Null, json!(""))
    );
    let oc = c.outcome("b", "x");
    assert_eq!(
        (oc["value"].clone(), oc["repr"].clone()),
        (json!(42), json!("42"))
    );
    let oc = c.outcome("c", "{'k': [1, 2]}");
    assert_eq!(oc["value"], json!({"k": [1, 2]}));
    let oc = c.outcome("d", "object()");
    assert!(
        oc["repr"]
            .as_str()
            .is_some_and(|r| r.starts_with("<object")),
        "{oc}"
    );
    assert!(oc["duration_ms"].is_number(), "{oc}");
}

#[test]
fn output_precedes_exactly_one_outcome_and_streams_stay_apart() {
    let (mut c, _) = StdioClient::start(&[]);
    let evs = c.run(
        "a",
        "import sys\nfor i in range(3): print(i)\nprint('oops', file=sys.stderr)\n'end'",
    );
    assert_one_outcome_last(&evs);
    assert_eq!(text(&evs, "stdout"), "0\n1\n2\n");
    assert_eq!(text(&evs, "stderr"), "oops\n");
    assert_eq!(evs.last().map(|o| o["value"].clone()), Some(json!("end")));
}

#[test]
fn errors_carry_ename_evalue_and_a_traceback_of_the_cell() {
    let (mut c, _) = StdioClient::start(&[]);
    let oc = c.outcome("a", "def f():\n    return 1/0\nf()");
    assert_eq!(oc["status"], "error", "{oc}");
    assert_eq!(oc["ename"], "ZeroDivisionError");
    assert_eq!(oc["evalue"], "division by zero");
    let tb = oc["traceback"].as_str().unwrap_or_default();
    assert!(
        tb.contains("ZeroDivisionError") && tb.contains("return 1/0"),
        "{tb}"
    );
}

#[test]
fn fd_level_and_subprocess_output_arrive_before_the_outcome() {
    let (mut c, _) = StdioClient::start(&[]);
    let evs = c.run(
        "a",
        "import os, subprocess, sys\nos.write(1, b'raw fd\\n')\n\
         subprocess.run([sys.executable, '-c', 'print(\"from child\")'], check=True)\n\
         os.write(2, b'raw err\\n')",
    );
    assert_one_outcome_last(&evs);
    assert_eq!(
        evs.last().map(|o| o["status"].clone()),
        Some(json!("ok")),
        "{evs:?}"
    );
    assert_eq!(text(&evs, "stdout"), "raw fd\nfrom child\n");
    assert_eq!(text(&evs, "stderr"), "raw err\n");
}

#[test]
fn input_requests_are_answered_by_request_id_or_oldest_first() {
    let (mut c, _) = StdioClient::start(&[]);
    c.send(
        json!({"op": "execute", "id": "a", "code": "name = input('Name: ')\nprint('Hi', name)"}),
    );
    let req = c.wait(|e| e["event"] == "input_request" && e["id"] == "a");
    assert_eq!(
        (req["prompt"].clone(), req["password"].clone()),
        (json!("Name: "), json!(false))
    );
    c.send(json!({"op": "input", "id": "a", "text": "Ada", "request": req["request"]}));
    let evs = c.collect("a");
    // The prompt is not echoed as output.
    assert_eq!(text(&evs, "stdout"), "Hi Ada\n");

    // Two inputs in one cell, answered without request ids (oldest pending first).
    c.send(
        json!({"op": "execute", "id": "b", "code": "a = input('1? ')\nb = input('2? ')\na + b"}),
    );
    c.wait(|e| e["event"] == "input_request" && e["id"] == "b");
    c.send(json!({"op": "input", "id": "b", "text": "x"}));
    let r2 = c.wait(|e| e["event"] == "input_request" && e["id"] == "b");
    assert_eq!(r2["prompt"], "2? ");
    c.send(json!({"op": "input", "id": "b", "text": "y"}));
    let evs = c.collect("b");
    assert_eq!(evs.last().map(|o| o["value"].clone()), Some(json!("xy")));

    // getpass is a password request; null text is end of input.
    c.send(json!({"op": "execute", "id": "c", "code": "import getpass\ntry:\n    getpass.getpass()\nexcept EOFError:\n    r = 'eof'\nr"}));
    let req = c.wait(|e| e["event"] == "input_request" && e["id"] == "c");
    assert_eq!(req["password"], true);
    c.send(json!({"op": "input", "id": "c", "text": null}));
    let evs = c.collect("c");
    assert_eq!(
        evs.last().map(|o| o["value"].clone()),
        Some(json!("eof")),
        "{evs:?}"
    );
}

#[test]
fn an_answer_sent_before_the_request_is_kept_for_it() {
    let (mut c, _) = StdioClient::start(&[]);
    c.send(json!({"op": "execute", "id": "a", "code": "input('? ').upper()"}));
    c.send(json!({"op": "input", "id": "a", "text": "early"}));
    let evs = c.collect("a");
    assert!(
        kinds(&evs).contains(&"input_request".to_string()),
        "{evs:?}"
    );
    assert_eq!(evs.last().map(|o| o["value"].clone()), Some(json!("EARLY")));
}

#[test]
fn cancel_of_a_busy_loop_and_of_a_sleep_keeps_the_session_and_its_state() {
    let (mut c, _) = StdioClient::start(&[]);
    c.outcome("setup", "x = 41");
    for (id, code) in [
        ("loop", "print('started', flush=True)\nwhile True: pass"),
        (
            "sleep",
            "import time\nprint('started', flush=True)\ntime.sleep(100)",
        ),
    ] {
        c.send(json!({"op": "execute", "id": id, "code": code}));
        c.wait(|e| e["event"] == "output" && e["id"] == id);
        c.send(json!({"op": "cancel", "id": id}));
        let oc = c.wait(|e| e["event"] == "outcome" && e["id"] == id);
        assert_eq!(oc["status"], "cancelled", "{oc}");
        assert_eq!(oc["state_lost"], false, "{oc}");
    }
    assert_eq!(c.outcome("after", "x + 1")["value"], 42);
}

#[test]
fn cancel_of_a_queued_cell_ends_it_without_running() {
    let (mut c, _) = StdioClient::start(&[]);
    c.send(json!({"op": "execute", "id": "busy", "code": "import time\nprint('started', flush=True)\ntime.sleep(100)"}));
    c.wait(|e| e["event"] == "output" && e["id"] == "busy");
    c.send(json!({"op": "execute", "id": "queued", "code": "ran = True\nprint('should not run')"}));
    c.send(json!({"op": "cancel", "id": "queued"}));
    let evs = c.collect("queued");
    assert_eq!(kinds(&evs), vec!["outcome"], "{evs:?}");
    assert_eq!(evs[0]["status"], "cancelled");
    c.send(json!({"op": "cancel", "id": "busy"}));
    let oc = c.wait(|e| e["event"] == "outcome" && e["id"] == "busy");
    assert_eq!(oc["status"], "cancelled");
    assert_eq!(c.outcome("check", "'ran' in globals()")["value"], false);
}

#[test]
fn cancel_of_an_unknown_id_is_an_error_event() {
    let (mut c, _) = StdioClient::start(&[]);
    c.send(json!({"op": "cancel", "id": "nope"}));
    let ev = c.wait(|e| e["event"] == "error");
    assert_eq!(ev["id"], "nope", "{ev}");
}

#[test]
fn a_cell_past_its_timeout_ends_timed_out() {
    let (mut c, _) = StdioClient::start(&[]);
    c.outcome("a", "y = 'kept'");
    c.send(json!({"op": "execute", "id": "t", "code": "import time\ntime.sleep(100)", "timeout_ms": 300}));
    let oc = c.wait(|e| e["event"] == "outcome" && e["id"] == "t");
    assert_eq!(oc["status"], "timed_out", "{oc}");
    assert_eq!(oc["state_lost"], false, "{oc}");
    assert_eq!(c.outcome("b", "y")["value"], "kept");
}

#[test]
fn the_default_timeout_flag_applies_to_every_cell() {
    let (mut c, _) = StdioClient::start(&["--timeout-ms", "300"]);
    let oc = c.outcome("t", "while True: pass");
    assert_eq!(oc["status"], "timed_out", "{oc}");
}

#[test]
fn worker_death_is_worker_lost_and_the_next_cell_gets_a_fresh_worker() {
    let (mut c, _) = StdioClient::start(&[]);
    c.outcome("a", "x = 1");
    let oc = c.outcome("die", "import os\nos._exit(3)");
    assert_eq!(
        (oc["status"].clone(), oc["state_lost"].clone()),
        (json!("worker_lost"), json!(true)),
        "{oc}"
    );
    assert!(oc["reason"].is_string(), "{oc}");
    let oc = c.outcome("b", "'x' in globals()");
    assert_eq!(
        (oc["status"].clone(), oc["value"].clone()),
        (json!("ok"), json!(false)),
        "{oc}"
    );
}

#[test]
fn restart_gives_a_fresh_namespace_and_ends_a_running_cell() {
    let (mut c, _) = StdioClient::start(&[]);
    c.outcome("a", "x = 1");
    c.send(json!({"op": "restart", "id": "r1"}));
    let ev = c.wait(|e| e["event"] == "restarted");
    assert_eq!(ev["id"], "r1");
    assert_eq!(c.outcome("b", "'x' in globals()")["value"], false);

    c.send(json!({"op": "execute", "id": "busy", "code": "import time\nprint('go', flush=True)\ntime.sleep(100)"}));
    c.wait(|e| e["event"] == "output" && e["id"] == "busy");
    c.send(json!({"op": "restart"}));
    let oc = c.wait(|e| e["event"] == "outcome" && e["id"] == "busy");
    assert_eq!(oc["status"], "worker_lost", "{oc}");
    let ev = c.wait(|e| e["event"] == "restarted");
    assert!(ev.get("id").is_none(), "{ev}");
    assert_eq!(c.outcome("c", "1 + 1")["value"], 2);
}

#[test]
fn checkpoint_then_restore_brings_back_values_and_functions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ns.ckpt");
    let (mut c, _) = StdioClient::start(&[]);
    c.outcome("a", "import threading\nx = [1, 2, 3]\ndef double(v):\n    return v * 2\nlock = threading.Lock()");
    c.send(json!({"op": "checkpoint", "id": "k", "path": path}));
    let ev = c.wait(|e| e["id"] == "k");
    assert_eq!(ev["event"], "checkpoint", "{ev}");
    assert_eq!(ev["path"], json!(path));
    let bytes = std::fs::metadata(&path).expect("checkpoint file").len();
    assert_eq!(ev["bytes"], bytes);
    assert!(
        ev["skipped"]
            .as_array()
            .is_some_and(|s| s.contains(&json!("lock"))),
        "{ev}"
    );

    c.outcome("b", "x = 'changed'\ndel double");
    c.send(json!({"op": "restore", "id": "r", "path": path}));
    let ev = c.wait(|e| e["id"] == "r");
    assert_eq!(ev["event"], "restored", "{ev}");
    assert_eq!(
        c.outcome("c", "double(x)")["value"],
        json!([1, 2, 3, 1, 2, 3])
    );

    c.send(json!({"op": "restore", "id": "bad", "path": dir.path().join("missing")}));
    let ev = c.wait(|e| e["id"] == "bad");
    assert_eq!(ev["event"], "error", "{ev}");
}

#[test]
fn info_reports_the_session() {
    let (mut c, ready) = StdioClient::start(&[]);
    c.outcome("a", "1/0");
    c.send(json!({"op": "info", "id": "i"}));
    let ev = c.wait(|e| e["id"] == "i");
    assert_eq!(ev["event"], "info", "{ev}");
    assert_eq!(ev["session"], ready["session"]);
    assert_eq!(ev["state"], "idle");
    assert!(ev["pid"].is_u64(), "{ev}");
    assert_eq!(ev["errors"], 1, "{ev}");
    assert!(ev["config"]["max_frame"].is_u64(), "{ev}");
}

#[test]
fn bad_lines_and_unknown_ops_are_answered_and_the_session_goes_on() {
    let (mut c, _) = StdioClient::start(&[]);
    c.send_raw("{not json\n");
    let ev = c.wait(|e| e["event"] == "error");
    assert!(ev.get("id").is_none(), "{ev}");
    c.send(json!({"op": "frobnicate", "id": "f"}));
    let ev = c.wait(|e| e["event"] == "error");
    assert_eq!(ev["id"], "f", "{ev}");
    c.send(json!({"op": "execute", "id": "m"}));
    let ev = c.wait(|e| e["event"] == "error");
    assert!(
        ev["message"].as_str().is_some_and(|m| m.contains("code")),
        "{ev}"
    );
    c.send(json!({"op": "input", "id": "nobody", "text": "x"}));
    let ev = c.wait(|e| e["event"] == "error");
    assert_eq!(ev["id"], "nobody", "{ev}");
    assert_eq!(c.outcome("ok", "3")["value"], 3);
}

#[test]
fn a_duplicate_id_of_a_running_cell_is_refused() {
    let (mut c, _) = StdioClient::start(&[]);
    c.send(json!({"op": "execute", "id": "d", "code": "import time\nprint('go', flush=True)\ntime.sleep(100)"}));
    c.wait(|e| e["event"] == "output" && e["id"] == "d");
    c.send(json!({"op": "execute", "id": "d", "code": "1"}));
    let ev = c.wait(|e| e["event"] == "error");
    assert_eq!(ev["id"], "d", "{ev}");
    c.send(json!({"op": "cancel", "id": "d"}));
    let oc = c.wait(|e| e["event"] == "outcome" && e["id"] == "d");
    assert_eq!(oc["status"], "cancelled");
    // Once its outcome is out, the id may be used again.
    assert_eq!(c.outcome("d", "5")["value"], 5);
}

#[test]
fn concurrent_executes_queue_and_finish_in_order() {
    let (mut c, _) = StdioClient::start(&[]);
    for (id, code) in [
        ("q1", "import time\ntime.sleep(0.2)\norder = [1]"),
        ("q2", "order.append(2)"),
        ("q3", "order.append(3)\norder"),
    ] {
        c.send(json!({"op": "execute", "id": id, "code": code}));
    }
    let mut outcomes = Vec::new();
    while outcomes.len() < 3 {
        let ev = c.wait(|e| e["event"] == "outcome");
        outcomes.push(ev);
    }
    let ids: Vec<_> = outcomes.iter().map(|o| o["id"].clone()).collect();
    assert_eq!(ids, vec![json!("q1"), json!("q2"), json!("q3")]);
    assert_eq!(outcomes[2]["value"], json!([1, 2, 3]));
}

#[test]
fn numeric_ids_are_echoed_as_numbers() {
    let (mut c, _) = StdioClient::start(&[]);
    c.send(json!({"op": "execute", "id": 7, "code": "7"}));
    let oc = c.wait(|e| e["event"] == "outcome");
    assert_eq!(
        (oc["id"].clone(), oc["value"].clone()),
        (json!(7), json!(7))
    );
}

#[test]
fn output_between_cells_is_an_output_event_without_id() {
    let (mut c, _) = StdioClient::start(&[]);
    // A thread that prints once the test writes to a FIFO, i.e. while no cell runs.
    let oc = c.outcome(
        "a",
        "import os, threading\np = os.path.abspath('bg.fifo')\nos.mkfifo(p)\n\
         def w():\n    open(p).read()\n    print('between cells', flush=True)\n\
         threading.Thread(target=w, daemon=True).start()\np",
    );
    let fifo = oc["value"].as_str().expect("fifo path").to_string();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .expect("open fifo");
    f.write_all(b"go").expect("write fifo");
    drop(f);
    let ev = c.wait(|e| e["event"] == "output");
    assert!(ev.get("id").is_none(), "{ev}");
    assert_eq!(
        (ev["stream"].clone(), ev["text"].clone()),
        (json!("stdout"), json!("between cells\n"))
    );
}

#[test]
fn shutdown_answers_shutdown_and_exits_0() {
    let (mut c, _) = StdioClient::start(&[]);
    c.send(json!({"op": "execute", "id": "busy", "code": "import time\nprint('go', flush=True)\ntime.sleep(100)"}));
    c.wait(|e| e["event"] == "output" && e["id"] == "busy");
    c.send(json!({"op": "shutdown"}));
    let oc = c.wait(|e| e["event"] == "outcome");
    assert_eq!(oc["status"], "worker_lost", "{oc}");
    c.wait(|e| e["event"] == "shutdown");
    assert_eq!(c.next_event()["event"], "__eof__");
    assert_eq!(c.wait_exit().code(), Some(0));
}

#[test]
fn eof_on_stdin_finishes_the_cells_sent_and_exits_0() {
    let (mut c, _) = StdioClient::start(&[]);
    c.send(json!({"op": "execute", "id": "a", "code": "print('last words')\n'done'"}));
    c.send(json!({"op": "execute", "id": "b", "code": "try:\n    input()\nexcept EOFError:\n    r = 'eof'\nr"}));
    c.close_stdin();
    let evs = c.collect("a");
    assert_eq!(text(&evs, "stdout"), "last words\n");
    let evs = c.collect("b");
    assert_eq!(
        evs.last().map(|o| o["value"].clone()),
        Some(json!("eof")),
        "{evs:?}"
    );
    c.wait(|e| e["event"] == "shutdown");
    assert_eq!(c.wait_exit().code(), Some(0));
}

#[test]
fn a_session_that_cannot_start_is_an_error_event_and_exit_5() {
    let mut cmd = capsule();
    cmd.args(["stdio", "--python", "/nonexistent/python3"]);
    let mut c = StdioClient::spawn(cmd);
    let ev = c.next_event();
    assert_eq!(ev["event"], "error", "{ev}");
    assert_eq!(c.wait_exit().code(), Some(5));
}

#[test]
fn the_public_conformance_smoke_passes() {
    let script = crate::workspace().join("../shared/conformance/stdio_smoke.py");
    if !script.exists() {
        println!("skipped: {} is absent", script.display());
        return;
    }
    if Command::new("python3").arg("--version").output().is_err() {
        println!("skipped: python3 is not on PATH");
        return;
    }
    let mut cmd = Command::new("python3");
    cmd.arg(&script)
        .arg(crate::bin())
        .env("CAPSULE_HISTORY", "");
    let out = crate::run_with_input(cmd, b"");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(" 0 failed"),
        "conformance smoke failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_lost_worker_is_replaced_by_the_warm_spare_before_the_next_cell() {
    let (mut c, ready) = StdioClient::start(&["--wait-spares"]);
    // `ready` is written once the spare is warm too.
    let before = info(&mut c, "i0");
    let pool = &before["pool"];
    assert_eq!(
        [&pool["spares"], &pool["idle"], &pool["active"]],
        [1, 1, 1],
        "{pool}"
    );
    assert_eq!(pool["sessions_created"], 2, "{pool}");
    assert_eq!((&pool["hits"], &pool["misses"]), (&json!(0), &json!(1)));
    let (spare_session, spare_pid) = spare(&before);

    c.outcome("a", "x = 1");
    let oc = c.outcome("die", "import os\nos._exit(1)");
    assert_eq!(
        (&oc["status"], &oc["state_lost"]),
        (&json!("worker_lost"), &json!(true)),
        "{oc}"
    );
    // The outcome is followed by the move to the spare, made before the crash.
    let ev = c.next_event();
    assert_eq!(ev["event"], "restarted", "{ev}");
    assert!(ev.get("id").is_none(), "{ev}");
    assert_eq!(ev["cause"], "worker_lost", "{ev}");
    assert_eq!((&ev["session"], &ev["pid"]), (&spare_session, &spare_pid));
    assert_ne!(ev["session"], ready["session"]);

    let oc = c.outcome("b", "'x' in globals()");
    assert_eq!((&oc["status"], &oc["value"]), (&json!("ok"), &json!(false)));
    let after = info(&mut c, "i1");
    assert_eq!(
        (&after["session"], &after["pid"]),
        (&spare_session, &spare_pid)
    );
    // The spare's own worker ran the cell: no respawn, no cold start.
    assert_eq!(after["workers_started"], 1, "{after}");
    // The pool's warm-up cells are not the client's.
    assert_eq!(after["executions"], 1, "{after}");
    let pool = &after["pool"];
    assert_eq!(
        (&pool["hits"], &pool["misses"]),
        (&json!(1), &json!(1)),
        "{pool}"
    );
    assert_eq!(pool["replacements"]["worker_lost"], 1, "{pool}");
}

#[test]
fn cells_queued_behind_a_crash_run_in_order_on_the_spare_with_one_outcome_each() {
    let (mut c, _) = StdioClient::start(&["--wait-spares"]);
    let (_, spare_pid) = spare(&info(&mut c, "i0"));
    for (id, code) in [
        ("die", "print('going', flush=True)\nimport os\nos._exit(1)"),
        ("q1", "y = 5\nprint('q1 ran')"),
        ("q2", "y + 1"),
    ] {
        c.send(json!({"op": "execute", "id": id, "code": code}));
    }
    let evs = until_outcomes(&mut c, 3);
    for id in ["die", "q1", "q2"] {
        let n = evs
            .iter()
            .filter(|e| e["event"] == "outcome" && e["id"] == id)
            .count();
        assert_eq!(n, 1, "{id}: {evs:?}");
    }
    let at = |pred: &dyn Fn(&Value) -> bool| evs.iter().position(pred).expect("event");
    let died = at(&|e| e["event"] == "outcome" && e["id"] == "die");
    let moved = at(&|e| e["event"] == "restarted");
    let q1 = at(&|e| e["id"] == "q1");
    assert!(died < moved && moved < q1, "{evs:?}");
    assert_eq!(evs[died]["status"], "worker_lost", "{evs:?}");
    let die: Vec<Value> = evs.iter().filter(|e| e["id"] == "die").cloned().collect();
    assert_eq!(text(&die, "stdout"), "going\n");
    let q: Vec<Value> = evs.iter().filter(|e| e["id"] == "q1").cloned().collect();
    assert_eq!(text(&q, "stdout"), "q1 ran\n");
    let q2 = evs
        .iter()
        .find(|e| e["event"] == "outcome" && e["id"] == "q2")
        .expect("q2 outcome");
    assert_eq!(q2["value"], 6, "{q2}");
    let after = info(&mut c, "i1");
    assert_eq!(after["pid"], spare_pid, "{after}");
    assert_eq!(after["workers_started"], 1, "{after}");
}

#[test]
fn restart_takes_the_warm_spare() {
    let (mut c, ready) = StdioClient::start(&["--wait-spares"]);
    let (spare_session, spare_pid) = spare(&info(&mut c, "i0"));
    c.outcome("a", "x = 1");
    c.send(json!({"op": "restart", "id": "r"}));
    let ev = c.wait(|e| e["event"] == "restarted");
    assert_eq!((&ev["id"], &ev["cause"]), (&json!("r"), &json!("restart")));
    assert_eq!((&ev["session"], &ev["pid"]), (&spare_session, &spare_pid));
    assert_ne!(ev["session"], ready["session"]);
    assert_eq!(c.outcome("b", "'x' in globals()")["value"], false);
    let pool = info(&mut c, "i1")["pool"].clone();
    assert_eq!(pool["hits"], 1, "{pool}");
    assert_eq!(pool["replacements"]["restart"], 1, "{pool}");
}

#[test]
fn with_no_spare_a_crash_still_moves_to_a_fresh_session() {
    let (mut c, ready) = StdioClient::start(&["--pool-size", "0"]);
    let pool = info(&mut c, "i0")["pool"].clone();
    assert_eq!(
        [&pool["spares"], &pool["idle"], &pool["sessions_created"]],
        [0, 0, 1],
        "{pool}"
    );
    let oc = c.outcome("die", "import os\nos._exit(1)");
    assert_eq!(oc["status"], "worker_lost", "{oc}");
    let ev = c.next_event();
    assert_eq!(
        (&ev["event"], &ev["cause"]),
        (&json!("restarted"), &json!("worker_lost")),
        "{ev}"
    );
    assert_ne!(ev["session"], ready["session"]);
    assert_eq!(c.outcome("b", "1 + 1")["value"], 2);
    let pool = info(&mut c, "i1")["pool"].clone();
    assert_eq!(
        (&pool["hits"], &pool["misses"]),
        (&json!(0), &json!(2)),
        "{pool}"
    );
}

#[test]
fn shutdown_stops_the_pool_and_every_worker_it_made() {
    let (mut c, _) = StdioClient::start(&["--wait-spares"]);
    let before = info(&mut c, "i0");
    let workers: Vec<u32> = before["pool"]["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .filter_map(|s| s["pid"].as_u64())
        .map(|p| p as u32)
        .collect();
    assert_eq!(workers.len(), 2, "in use + spare: {before}");
    let made = crate::descendants(c.pid());
    for w in &workers {
        assert!(made.contains(w), "worker {w} among {made:?}");
    }
    c.send(json!({"op": "execute", "id": "busy", "code": "import time\nprint('go', flush=True)\ntime.sleep(100)"}));
    c.wait(|e| e["event"] == "output" && e["id"] == "busy");
    c.send(json!({"op": "execute", "id": "queued", "code": "print('never')"}));
    c.send(json!({"op": "shutdown", "id": "s"}));
    let mut outcomes = Vec::new();
    loop {
        let ev = c.wait(|e| e["event"] == "outcome" || e["event"] == "shutdown");
        if ev["event"] == "shutdown" {
            assert_eq!(ev["id"], "s");
            break;
        }
        outcomes.push(ev);
    }
    outcomes.sort_by_key(|o| o["id"].as_str().unwrap_or_default().to_string());
    let got: Vec<(Value, Value)> = outcomes
        .iter()
        .map(|o| (o["id"].clone(), o["status"].clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (json!("busy"), json!("worker_lost")),
            (json!("queued"), json!("cancelled"))
        ]
    );
    // The pool was stopped before `shutdown` was written: its workers have exited.
    for w in &workers {
        assert!(!crate::running(*w), "worker {w} still runs after shutdown");
    }
    assert_eq!(c.wait_exit().code(), Some(0));
    for p in made {
        crate::wait_gone(p);
    }
}

#[test]
fn a_pool_cap_without_room_for_the_spares_is_a_usage_error() {
    let out = crate::run_with_input(
        {
            let mut cmd = capsule();
            cmd.args(["stdio", "--pool-size", "1"])
                .env("CAPSULE_POOL_MAX_SESSIONS", "2");
            cmd
        },
        b"",
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CAPSULE_POOL_MAX_SESSIONS"), "{err}");
}
