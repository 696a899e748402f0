//! Checkpoint and restore of the namespace.

use crate::support::{run, session};
use serde_json::json;

#[tokio::test]
async fn checkpoint_modify_restore_brings_values_functions_classes_and_modules_back() {
    let s = session().await;
    run(
        &s,
        "import json as j\nimport threading\nx = [1, 2, 3]\ndef double(v):\n    return v * 2\nclass Point:\n    def __init__(self, a):\n        self.a = a\n    def norm(self):\n        return double(self.a)\np = Point(21)\nlock = threading.Lock()",
    )
    .await;
    let ck = s.checkpoint().await.expect("checkpoint");
    assert!(ck.names.iter().any(|n| n == "x"), "{:?}", ck.names);
    assert!(
        ck.skipped.iter().any(|sk| sk.name == "lock"),
        "{:?}",
        ck.skipped
    );
    assert!(ck.blob.starts_with(b"CAPSULE-CKPT\x00"));
    run(&s, "x = 'changed'\ndel double\ndel Point\ndel p").await;
    let restored = s.restore(ck.blob.clone(), true).await.expect("restore");
    assert!(restored.iter().any(|n| n == "double"), "{restored:?}");
    let r = run(
        &s,
        "(x, double(4), p.norm(), isinstance(p, Point), j.dumps(1))",
    )
    .await;
    assert_eq!(r.value(), &json!([[1, 2, 3], 8, 42, true, "1"]));

    // Into a fresh session.
    let fresh = session().await;
    fresh
        .restore(ck.blob, true)
        .await
        .expect("restore in a new session");
    let r = run(&fresh, "(x, double(5), p.norm())").await;
    assert_eq!(r.value(), &json!([[1, 2, 3], 10, 42]));
}

#[tokio::test]
async fn a_corrupted_checkpoint_is_rejected_with_a_reason() {
    let s = session().await;
    run(&s, "x = 1").await;
    let ck = s.checkpoint().await.expect("checkpoint");
    let mut bad = ck.blob.to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    let err = s.restore(bad, true).await.expect_err("checksum must fail");
    assert!(err.to_string().to_lowercase().contains("checksum"), "{err}");
    let err = s
        .restore(b"not a checkpoint".to_vec(), true)
        .await
        .expect_err("magic");
    assert!(!err.to_string().is_empty());
    assert_eq!(
        run(&s, "x").await.value(),
        &json!(1),
        "a failed restore changes nothing"
    );
}

#[tokio::test]
async fn reset_clears_user_names_and_keeps_the_engine_working() {
    let s = session().await;
    run(&s, "x = 1").await;
    s.reset().await.expect("reset");
    assert_eq!(run(&s, "'x' in globals()").await.value(), &json!(false));
    run(&s, "5").await;
    assert_eq!(run(&s, "_").await.value(), &json!(5));
}
