//! Output capture and ordering, input.

use crate::support::{drain, run, session, until};
use capsule_session::{Event, OutcomeStatus};
use serde_json::json;

#[tokio::test]
async fn stdout_and_stderr_are_separated_and_every_byte_precedes_the_outcome() {
    let s = session().await;
    let r = run(
        &s,
        "import os, sys, subprocess\nprint('py-out')\nprint('py-err', file=sys.stderr)\nos.write(1, b'fd-out\\n')\nos.write(2, b'fd-err\\n')\nsubprocess.run([sys.executable, '-I', '-S', '-c', 'print(\"child-out\")'])\nsys.stdout.write('no newline')",
    )
    .await;
    assert_eq!(r.out(), "py-out\nfd-out\nchild-out\nno newline");
    assert_eq!(r.err(), "py-err\nfd-err\n");
}

#[tokio::test]
async fn output_just_before_an_exception_arrives_before_the_error() {
    let s = session().await;
    let r = run(
        &s,
        "import os\nos.write(1, b'last words')\nraise ValueError('x')",
    )
    .await;
    assert_eq!(r.out(), "last words");
    assert!(matches!(r.status(), OutcomeStatus::Error { .. }));
}

#[tokio::test]
async fn a_hundred_thousand_lines_arrive_complete_and_in_order() {
    let s = session().await;
    let r = run(&s, "for i in range(100_000):\n    print('line', i)").await;
    let out = r.out();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 100_000);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(*l, format!("line {i}"));
    }
}

#[tokio::test]
async fn large_writes_are_chunked_and_complete() {
    let s = session().await;
    let r = run(
        &s,
        "import sys\nfor _ in range(8):\n    sys.stdout.write('x' * (1 << 20))",
    )
    .await;
    assert_eq!(r.out().len(), 8 << 20);
    assert!(r.out().bytes().all(|b| b == b'x'));
}

#[tokio::test]
async fn unicode_and_carriage_returns_survive() {
    let s = session().await;
    let r = run(&s, "print('héllo wörld €𝄞 日本')\nimport sys\nfor i in range(3):\n    sys.stdout.write(f'\\rprogress {i}')\nsys.stdout.write('\\n')").await;
    assert_eq!(
        r.out(),
        "héllo wörld €𝄞 日本\n\rprogress 0\rprogress 1\rprogress 2\n"
    );
}

#[tokio::test]
async fn output_over_the_budget_is_truncated_with_a_marker_and_counts() {
    let mut cfg = crate::support::config();
    cfg.output_budget = 1000;
    let s = capsule_session::Session::start(cfg).await.expect("start");
    let r = run(&s, "print('y' * 5000)").await;
    let out = r.out();
    assert_eq!(out.len(), 1000);
    assert!(
        r.err().contains("output truncated: 4001 bytes"),
        "{}",
        r.err()
    );
    let t = r.outcome().truncated.expect("truncation reported");
    assert_eq!((t.dropped_bytes, t.budget), (4001, 1000));
    assert_eq!(s.info().await.expect("info").output_truncations, 1);
}

#[tokio::test]
async fn input_works_in_every_cell_and_eof_raises() {
    let s = session().await;
    for (cell, answer) in [("a", "Ada"), ("b", "Bob")] {
        let mut e = s
            .execute(format!("{cell} = input('Name? ')\n{cell}.upper()"))
            .await
            .expect("queued");
        let seen = until(&mut e, |ev| matches!(ev, Event::InputRequest { .. })).await;
        let Some(Event::InputRequest {
            req,
            prompt,
            password,
        }) = seen.last()
        else {
            panic!("no request");
        };
        assert_eq!(prompt, "Name? ");
        assert!(!password);
        e.reply_input(req, Some(answer.to_string()))
            .await
            .expect("reply");
        let r = drain(e).await;
        assert_eq!(r.value(), &json!(answer.to_uppercase()));
        assert!(
            !r.out().contains("Name?"),
            "the prompt is not echoed as output"
        );
    }
    let mut e = s.execute("input('more? ')").await.expect("queued");
    let seen = until(&mut e, |ev| matches!(ev, Event::InputRequest { .. })).await;
    let Some(Event::InputRequest { req, .. }) = seen.last() else {
        panic!("no request");
    };
    e.reply_input(req, None).await.expect("eof");
    let r = drain(e).await;
    assert!(matches!(r.status(), OutcomeStatus::Error { ename, .. } if ename == "EOFError"));
}

#[tokio::test]
async fn getpass_is_a_password_request() {
    let s = session().await;
    let mut e = s
        .execute("import getpass\np = getpass.getpass('pw: ')\nlen(p)")
        .await
        .expect("q");
    let seen = until(&mut e, |ev| matches!(ev, Event::InputRequest { .. })).await;
    let Some(Event::InputRequest { req, password, .. }) = seen.last() else {
        panic!("no request");
    };
    assert!(*password);
    e.reply_input(req, Some("secret".into()))
        .await
        .expect("reply");
    assert_eq!(drain(e).await.value(), &json!(6));
}

#[tokio::test]
async fn try_next_and_next_together_see_every_event_once() {
    let s = session().await;
    let mut e = s
        .execute("for i in range(2000):\n    print(i)")
        .await
        .expect("q");
    let mut out = String::new();
    let mut outcomes = 0;
    loop {
        let ev = match e.try_next() {
            Some(ev) => ev,
            None => match e.next().await {
                Some(ev) => ev,
                None => break,
            },
        };
        match ev {
            Event::Output { text, .. } => out.push_str(&text),
            Event::Outcome(_) => outcomes += 1,
            _ => {}
        }
    }
    assert_eq!(outcomes, 1);
    let expected: String = (0..2000).map(|i| format!("{i}\n")).collect();
    assert_eq!(out, expected);
    assert!(e.try_next().is_none());
}

#[tokio::test]
async fn unsolicited_input_replies_are_dropped_and_never_block_control() {
    let s = session().await;
    let mut e = s
        .execute("print('started', flush=True)\nwhile True: pass")
        .await
        .expect("q");
    crate::support::started(&mut e, "started").await;
    // Far more than a pipe holds: nothing asked for them, so none may reach the worker.
    let big = "x".repeat(4096);
    for i in 0..5_000 {
        e.reply_input(&format!("never-asked-{i}"), Some(big.clone()))
            .await
            .expect("accepted");
    }
    e.cancel().await.expect("cancel");
    assert_eq!(drain(e).await.status(), &OutcomeStatus::Cancelled);
    // A real request still gets its answer.
    let mut e = s.execute("input('? ')").await.expect("q");
    let seen = until(&mut e, |ev| matches!(ev, Event::InputRequest { .. })).await;
    let Some(Event::InputRequest { req, .. }) = seen.last() else {
        panic!("no request");
    };
    e.reply_input(req, Some("real".into()))
        .await
        .expect("reply");
    e.reply_input(req, Some("twice".into()))
        .await
        .expect("a second answer is dropped");
    assert_eq!(drain(e).await.value(), &json!("real"));
}
