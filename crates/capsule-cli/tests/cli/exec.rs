//! `capsule exec CODE` and `capsule run FILE`: streaming, values, exit codes, `--json`, input.

use serde_json::{json, Value};

use crate::{capsule, run_with_input};

fn exec(args: &[&str], stdin: &[u8]) -> (Option<i32>, String, String) {
    let mut cmd = capsule();
    cmd.args(args);
    let out = run_with_input(cmd, stdin);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn exec_json(args: &[&str]) -> (Option<i32>, Value) {
    let (code, out, err) = exec(args, b"");
    let v =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}\n{err}"));
    (code, v)
}

#[test]
fn the_value_of_the_last_expression_is_printed() {
    let (code, out, err) = exec(&["exec", "x = 6*7; x"], b"");
    assert_eq!((code, out.as_str()), (Some(0), "42\n"), "{err}");
}

#[test]
fn output_streams_to_stdout_and_stderr_and_no_value_prints_nothing() {
    let (code, out, err) = exec(
        &[
            "exec",
            "import sys\nprint('out')\nprint('err', file=sys.stderr)\ny = 1",
        ],
        b"",
    );
    assert_eq!(code, Some(0));
    assert_eq!(out, "out\n");
    assert!(err.contains("err\n"), "{err}");
}

#[test]
fn an_exception_exits_1_with_the_traceback_on_stderr() {
    let (code, out, err) = exec(&["exec", "def f():\n    return 1/0\nf()"], b"");
    assert_eq!(code, Some(1));
    assert_eq!(out, "");
    assert!(
        err.contains("ZeroDivisionError") && err.contains("return 1/0"),
        "{err}"
    );
}

#[test]
fn json_prints_one_object_with_output_and_outcome_fields() {
    let (code, v) = exec_json(&["exec", "--json", "print('hi')\n{'a': 1}"]);
    assert_eq!(code, Some(0));
    assert_eq!(v["stdout"], "hi\n");
    assert_eq!(v["stderr"], "");
    assert_eq!(v["status"], "ok");
    assert_eq!(v["value"], json!({"a": 1}));
    assert_eq!(v["repr"], "{'a': 1}");
    assert!(v["duration_ms"].is_number(), "{v}");

    let (code, v) = exec_json(&["exec", "--json", "raise ValueError('bad')"]);
    assert_eq!(code, Some(1));
    assert_eq!(
        (v["status"].clone(), v["ename"].clone(), v["evalue"].clone()),
        (json!("error"), json!("ValueError"), json!("bad"))
    );
    assert!(
        v["traceback"]
            .as_str()
            .is_some_and(|t| t.contains("ValueError")),
        "{v}"
    );
}

#[test]
fn worker_death_exits_4_with_status_worker_lost() {
    let (code, _, err) = exec(&["exec", "import os; os._exit(1)"], b"");
    assert_eq!(code, Some(4), "{err}");
    let (code, v) = exec_json(&["exec", "--json", "import os; os._exit(1)"]);
    assert_eq!(code, Some(4));
    assert_eq!(
        (v["status"].clone(), v["state_lost"].clone()),
        (json!("worker_lost"), json!(true)),
        "{v}"
    );
}

#[test]
fn a_timeout_exits_3() {
    let (code, _, err) = exec(
        &[
            "exec",
            "--timeout-ms",
            "300",
            "import time; time.sleep(100)",
        ],
        b"",
    );
    assert_eq!(code, Some(3), "{err}");
    let (code, v) = exec_json(&["--timeout-ms", "300", "exec", "--json", "while True: pass"]);
    assert_eq!(code, Some(3));
    assert_eq!(v["status"], "timed_out", "{v}");
}

#[test]
fn run_prints_100000_lines_complete_and_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("lines.py");
    std::fs::write(&script, "for i in range(100000):\n    print(i)\n").expect("write script");
    let (code, out, err) = exec(&["run", script.to_str().expect("utf-8 path")], b"");
    assert_eq!(code, Some(0), "{err}");
    let mut n = 0usize;
    for (i, line) in out.lines().enumerate() {
        assert_eq!(line, i.to_string(), "line {i}");
        n += 1;
    }
    assert_eq!(n, 100_000);
}

#[test]
fn input_reads_lines_from_stdin_and_eof_is_eoferror() {
    let (code, out, err) = exec(
        &[
            "exec",
            "name = input('Name: ')\nage = input('Age: ')\nprint('Hi', name, age)",
        ],
        b"Ada\n36\n",
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "Hi Ada 36\n");
    assert!(
        err.contains("Name: ") && err.contains("Age: "),
        "prompts go to stderr: {err}"
    );
    let (code, _, err) = exec(&["exec", "input()"], b"");
    assert_eq!(code, Some(1));
    assert!(err.contains("EOFError"), "{err}");
}

#[test]
fn usage_and_config_errors_exit_2() {
    let (code, _, _) = exec(&["exec"], b"");
    assert_eq!(code, Some(2));
    let (code, _, err) = exec(&["run", "/nonexistent/script.py"], b"");
    assert_eq!(code, Some(2), "{err}");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("capsule.toml");
    std::fs::write(&cfg, "no_such_key = 1\n").expect("write config");
    let (code, _, err) = exec(
        &["exec", "--config", cfg.to_str().expect("utf-8"), "1"],
        b"",
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no_such_key"), "{err}");
}

#[test]
fn the_config_file_is_used_and_flags_win_over_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("capsule.toml");
    std::fs::write(&cfg, "timeout_ms = 300\n").expect("write config");
    let cfg = cfg.to_str().expect("utf-8");
    let (code, _, err) = exec(
        &["exec", "--config", cfg, "import time; time.sleep(100)"],
        b"",
    );
    assert_eq!(code, Some(3), "{err}");
    let (code, out, err) = exec(
        &[
            "exec",
            "--config",
            cfg,
            "--timeout-ms",
            "0",
            "import time; time.sleep(0.5); 'slept'",
        ],
        b"",
    );
    assert_eq!((code, out.as_str()), (Some(0), "'slept'\n"), "{err}");
}

#[test]
fn a_missing_interpreter_exits_5() {
    let (code, _, err) = exec(&["exec", "--python", "/nonexistent/python3", "1"], b"");
    assert_eq!(code, Some(5), "{err}");
}

#[test]
fn doctor_reports_interpreter_and_sandbox() {
    let (code, out, err) = exec(&["doctor", "--json"], b"");
    assert_eq!(code, Some(0), "{out}\n{err}");
    let v: Value = serde_json::from_str(&out).expect("doctor --json is JSON");
    assert!(v["interpreter"]["ok"]["executable"].is_string(), "{v}");
    assert!(v["sandbox"]["layers"].is_array(), "{v}");
    assert!(v["session"]["ok"]["protocol"].is_u64(), "{v}");

    // The report must match what this machine supports, checked independently of the probe.
    let available = |name: &str| {
        v["sandbox"]["layers"]
            .as_array()
            .and_then(|ls| ls.iter().find(|l| l["name"] == name))
            .map(|l| l["available"] == true)
            .unwrap_or_else(|| panic!("layer {name} missing from doctor: {v}"))
    };
    let active = |name: &str| {
        v["session"]["ok"]["layers"]
            .as_array()
            .and_then(|ls| ls.iter().find(|l| l["name"] == name))
            .map(|l| l["state"] == "active")
            .unwrap_or_else(|| panic!("layer {name} missing from the session report: {v}"))
    };
    // Landlock: ask the kernel for its ABI version directly.
    let abi = std::process::Command::new("python3")
        .args([
            "-c",
            "import ctypes; print(ctypes.CDLL(None, use_errno=True).syscall(444, None, 0, 1))",
        ])
        .output()
        .expect("python3");
    let abi: i64 = String::from_utf8_lossy(&abi.stdout)
        .trim()
        .parse()
        .expect("an integer");
    assert_eq!(available("landlock"), abi > 0, "kernel says ABI {abi}: {v}");
    if abi > 0 {
        assert_eq!(v["sandbox"]["landlock_abi"], abi, "{v}");
    }
    // seccomp: the kernel lists its filter actions when filters are supported.
    let seccomp = std::path::Path::new("/proc/sys/kernel/seccomp/actions_avail").exists();
    assert_eq!(available("seccomp"), seccomp, "{v}");
    // User namespaces: try one with util-linux's unshare, when installed.
    if let Ok(out) = std::process::Command::new("unshare")
        .args(["-Ur", "true"])
        .output()
    {
        assert_eq!(available("user_ns"), out.status.success(), "{v}");
    }
    // The default (standard, best-effort) policy applies every available layer it names.
    for layer in [
        "user_ns",
        "net_ns",
        "landlock",
        "seccomp",
        "rlimits",
        "no_new_privs",
    ] {
        assert_eq!(active(layer), available(layer), "{layer}: {v}");
    }
}

#[test]
fn sigint_cancels_the_cell_and_exits_3() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut child = capsule()
        .args(["exec", "print('go', flush=True)\nwhile True: pass"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn capsule");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read the first line");
    assert_eq!(line, "go\n");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let status = crate::wait_exit(&mut child);
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err);
    assert_eq!(status.code(), Some(3), "{err}");
    assert!(err.contains("KeyboardInterrupt"), "{err}");
}
