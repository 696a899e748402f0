//! The worker never sees the host's environment. A single test in its own binary, so setting
//! a variable on the test process cannot race with other test threads.

mod common;

use capsule_sandbox::Policy;
use common::*;

#[test]
fn host_env_secret_is_not_visible() {
    // SAFETY: this test binary has exactly one test, so no other thread reads the environment.
    unsafe { std::env::set_var("CAPSULE_TEST_SECRET", "hunter2") };
    let code = r#"
attempt("secret", lambda: os.environ["CAPSULE_TEST_SECRET"])
attempt("env_keys", lambda: sorted(os.environ))
attempt("proc_environ_host", lambda: open(f"/proc/{os.getppid()}/environ", "rb").read())
"#;
    let control = run_unsandboxed(SYSTEM_PY, code);
    assert!(
        control.contains("secret=ok:'hunter2'"),
        "control: {control}"
    );
    for policy in [Policy::strict(), Policy::standard(), Policy::none()] {
        let (r, _s) = run(&policy, SYSTEM_PY, code);
        assert_eq!(r.expect("secret"), "err:KeyError:None");
        assert!(!r.stdout.contains("hunter2"), "{}", r.stdout);
        let keys = r.expect("env_keys");
        assert!(keys.contains("'HOME'") && keys.contains("'PATH'"), "{keys}");
    }
}
