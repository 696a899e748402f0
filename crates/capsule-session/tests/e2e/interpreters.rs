//! The worker runs on every CPython 3.9-3.13 found on this machine.

use crate::support::{drain, until};
use capsule_session::{Event, OutcomeStatus, Session};
use serde_json::json;

#[tokio::test]
async fn core_semantics_hold_on_every_interpreter_found() {
    let found = capsule_worker::find_interpreters();
    assert!(!found.is_empty(), "no CPython 3.9+ found");
    for interp in found {
        let mut cfg = crate::support::config();
        cfg.python = Some(interp.executable.clone());
        let label = format!("{} ({})", interp.executable.display(), interp.version);
        let s = Session::start(cfg)
            .await
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        let r = drain(s.execute("x = 6 * 7\nprint('hi')\nx").await.expect("q")).await;
        assert_eq!(r.value(), &json!(42), "{label}");
        assert_eq!(r.out(), "hi\n", "{label}");
        let r = drain(
            s.execute("import asyncio\nawait asyncio.sleep(0, 'tla')")
                .await
                .expect("q"),
        )
        .await;
        assert_eq!(r.value(), &json!("tla"), "{label}");
        let mut e = s.execute("input('? ')").await.expect("q");
        let seen = until(&mut e, |ev| matches!(ev, Event::InputRequest { .. })).await;
        let Some(Event::InputRequest { req, .. }) = seen.last() else {
            panic!()
        };
        e.reply_input(req, Some("in".into())).await.expect("reply");
        assert_eq!(drain(e).await.value(), &json!("in"), "{label}");
        let mut e = s
            .execute("print('started', flush=True)\nwhile True: pass")
            .await
            .expect("q");
        crate::support::started(&mut e, "started").await;
        e.cancel().await.expect("cancel");
        assert_eq!(
            drain(e).await.status(),
            &OutcomeStatus::Cancelled,
            "{label}"
        );
        s.shutdown().await.expect("shutdown");
    }
}
