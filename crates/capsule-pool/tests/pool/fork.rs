//! The fork server: sessions forked from a warm template, real exit statuses, template crash
//! recovery with fallback to plain spawn.

use capsule_pool::{PoolConfig, Reuse};
use capsule_session::OutcomeStatus;

use crate::support::{await_exit, config, guard, ok, start, wait, ACQUIRE};

fn fork_config() -> PoolConfig {
    let mut c = config();
    c.session.sandbox = capsule_session::config::load_policy("none").expect("none preset");
    c.fork_server = true;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_forked_from_a_warm_template() {
    let mut c = fork_config();
    c.min_idle = 2;
    c.warm_imports = ["json", "decimal", "sqlite3"].map(String::from).to_vec();
    let pool = start(c).await;
    let info = guard("ready", pool.wait_ready()).await.expect("ready");
    assert!(info.fork.enabled, "{:?}", info.fork);
    assert_eq!(info.created_by_path.get("fork"), Some(&2), "{info:#?}");
    let template = info.fork.template_pid.expect("template pid");
    let s = pool.acquire(ACQUIRE).await.expect("acquire");
    let scratch = s.info().await.expect("info").scratch_dir;
    assert_eq!(
        ok(&s, "import os; os.getppid()").await,
        template.to_string()
    );
    assert_eq!(
        ok(
            &s,
            "import sys; [m for m in ('json', 'decimal', 'sqlite3') if m in sys.modules]"
        )
        .await,
        "['json', 'decimal', 'sqlite3']"
    );
    assert_eq!(
        ok(&s, "os.getcwd() == os.environ['HOME']").await,
        "True",
        "cwd and HOME are the scratch dir {scratch:?}"
    );
    assert_eq!(ok(&s, "print('out'); 6 * 7").await, "42");
    // The template reaps its child and reports the real exit status.
    let done = s.run("import os; os._exit(3)").await.expect("queued");
    match done.outcome.status {
        OutcomeStatus::WorkerLost { reason } => assert!(reason.contains("status 3"), "{reason}"),
        other => panic!("expected worker_lost, got {other:?}"),
    }
    drop(s);
    pool.stop().await;
    // Stopping the pool ends its template too.
    await_exit(template).await;
    assert_eq!(pool.info().fork.template_pid, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_template_is_rebuilt_and_its_sessions_survive() {
    let mut c = fork_config();
    c.min_idle = 1;
    c.max_sessions = 3;
    c.reuse = Reuse::Replace;
    let pool = start(c).await;
    let info = guard("ready", pool.wait_ready()).await.expect("ready");
    let template = info.fork.template_pid.expect("template pid");
    let survivor = pool.acquire(ACQUIRE).await.expect("acquire");
    // SAFETY: kill(2) on the template this test's pool started.
    unsafe {
        libc::kill(template as libc::pid_t, libc::SIGKILL);
    }
    await_exit(template).await;
    // A worker forked earlier lives on (it is in its own session).
    assert_eq!(ok(&survivor, "1 + 1").await, "2");
    drop(survivor);
    // New sessions keep coming: a launch in flight at the crash falls back to a plain spawn,
    // the next one starts a new template.
    for _ in 0..4 {
        let s = pool
            .acquire(ACQUIRE)
            .await
            .expect("acquire after template crash");
        assert_eq!(ok(&s, "2 + 2").await, "4");
        s.discard();
        if pool.info().fork.templates_started >= 2 {
            break;
        }
    }
    let info = wait(&pool, "a new template", |i| i.fork.templates_started >= 2).await;
    assert_ne!(info.fork.template_pid, Some(template));
    pool.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_with_threads_is_not_forked_and_sessions_are_spawned() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("capsule_threaded_mod.py"),
        "import threading, time\nthreading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n",
    )
    .expect("write module");
    let mut c = fork_config();
    c.min_idle = 1;
    c.session.sys_path = vec![dir.path().to_path_buf()];
    c.warm_imports = vec!["capsule_threaded_mod".into()];
    let pool = start(c).await;
    let info = guard("ready", pool.wait_ready()).await.expect("ready");
    assert_eq!(info.created_by_path.get("spawn"), Some(&1), "{info:#?}");
    assert!(!info.fork.enabled);
    assert!(
        info.fork
            .disabled_reason
            .as_deref()
            .is_some_and(|r| r.contains("threads")),
        "{:?}",
        info.fork
    );
    let s = pool.acquire(ACQUIRE).await.expect("acquire");
    assert_eq!(
        ok(&s, "import sys; 'capsule_threaded_mod' in sys.modules").await,
        "True"
    );
    drop(s);
    pool.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_is_retired_when_the_environment_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let module = dir.path().join("capsule_stamped_mod.py");
    std::fs::write(&module, "V = 1\n").expect("write module");
    let mut c = fork_config();
    c.min_idle = 1;
    c.max_sessions = 3;
    c.session.sys_path = vec![dir.path().to_path_buf()];
    c.warm_imports = vec!["capsule_stamped_mod".into()];
    let pool = start(c).await;
    let info = guard("ready", pool.wait_ready()).await.expect("ready");
    assert_eq!(info.fork.templates_started, 1);
    let old_template = info.fork.template_pid.expect("template pid");
    // "Install a new version": replace the module and move the directory's mtime (set
    // explicitly, so the test does not depend on the file system's timestamp granularity).
    let staged = dir.path().join("staged.tmp");
    std::fs::write(&staged, "V = 2  # a new release\n").expect("write");
    std::fs::rename(&staged, &module).expect("rename");
    std::fs::File::open(dir.path())
        .and_then(|d| {
            d.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1))
        })
        .expect("set the directory's mtime");
    // The idle session was forked before the change and keeps what it imported.
    let before = pool.acquire(ACQUIRE).await.expect("acquire");
    assert_eq!(
        ok(&before, "import capsule_stamped_mod as m; m.V").await,
        "1"
    );
    // Its replacement comes from a new template that imported the new version.
    let info = wait(&pool, "a fresh template and an idle session", |i| {
        i.fork.templates_stale == 1 && i.idle == 1
    })
    .await;
    assert_eq!(info.fork.templates_started, 2, "{:?}", info.fork);
    assert_ne!(info.fork.template_pid, Some(old_template));
    await_exit(old_template).await;
    let after = pool.acquire(ACQUIRE).await.expect("acquire");
    assert_eq!(
        ok(&after, "import capsule_stamped_mod as m; m.V").await,
        "2"
    );
    assert_eq!(ok(&before, "m.V").await, "1");
    drop((before, after));
    pool.stop().await;
}

/// A session started through `fork` (a fork server used as the session's launcher).
async fn forked_session(
    cfg: &capsule_session::SessionConfig,
    fork: &std::sync::Arc<capsule_pool::ForkServer>,
) -> capsule_session::Session {
    let launcher: std::sync::Arc<dyn capsule_session::Launcher> = fork.clone();
    guard(
        "a forked session",
        capsule_session::Session::start_with(cfg.clone(), Some(launcher)),
    )
    .await
    .expect("session starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_come_from_the_spare_and_a_dead_spare_is_replaced() {
    // Under the strict policy, so both ways a worker is made (the pre-forked spare and an
    // on-demand fork) are shown to apply the sandbox plan.
    let mut cfg = crate::support::session_config();
    cfg.sandbox = capsule_session::config::load_policy("strict").expect("strict preset");
    let fork = capsule_pool::ForkServer::new(&cfg, &[]).expect("fork server");
    let confined = |s: &capsule_session::SessionInfo| {
        s.sandbox
            .iter()
            .filter(|l| ["seccomp", "landlock", "user_ns", "net_ns"].contains(&l.name.as_str()))
            .all(|l| l.state == "active")
    };

    let first = forked_session(&cfg, &fork).await;
    // The first launch gave the template the policy-level plan: the spare after it applies
    // that while it waits, leaving only Landlock for its request.
    let info = guard(
        "a spare that applied the plan ahead",
        fork.wait_until(|i| i.spare_pid.is_some() && i.spare_preapplied),
    )
    .await;
    let spare = info.spare_pid.expect("spare pid");
    // The next worker is that spare.
    let second = forked_session(&cfg, &fork).await;
    let si = second.info().await.expect("info");
    assert_eq!(si.pid, Some(spare));
    assert!(confined(&si), "{:?}", si.sandbox);
    let after = fork.info();
    assert_eq!(after.spare_hits, 1 + info.spare_hits);
    assert_eq!(after.preapplied_hits, 1 + info.preapplied_hits);
    assert_eq!(ok(&second, "6 * 7").await, "42");
    // Its layers are really there, the ones applied ahead and the one applied at the request.
    let status = std::fs::read_to_string(format!("/proc/{spare}/status")).expect("status");
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["NoNewPrivs:", "1"]),
        "{status}"
    );
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Seccomp:", "2"]),
        "{status}"
    );
    let template = info.template_pid.expect("template");
    for kind in ["user", "net", "mnt"] {
        let link = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).expect("ns");
        assert_ne!(
            link(spare),
            link(template),
            "{kind} namespace shared with the template"
        );
    }
    let denied = ok(
        &second,
        "import os\ndef _t(f):\n    try:\n        f()\n        return 'ALLOWED'\n    except OSError as e:\n        return type(e).__name__\n[_t(lambda: open('/etc/shadow').read()), _t(lambda: open('/tmp/capsule-preapply-probe', 'w')), _t(lambda: os.kill(1, 0)), _t(lambda: __import__('socket').socket(2, 1))]",
    )
    .await;
    assert!(!denied.contains("ALLOWED"), "{denied}");
    assert_eq!(
        ok(
            &second,
            "open('mine.txt', 'w').write('ok'); open('mine.txt').read()"
        )
        .await,
        "'ok'"
    );
    // The spare was moved into a cgroup of its own while it waited; the session adopted that
    // one: the kernel's view and the session's report agree, and it is removed at the end.
    let cgroup_dirs = |pid: u32| -> Vec<std::path::PathBuf> {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .expect("cgroup file")
            .lines()
            .filter_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
                let ctrl = ctrl.split(',').find(|c| *c == "memory" || *c == "pids")?;
                path.contains("capsule-").then(|| {
                    std::path::Path::new("/sys/fs/cgroup")
                        .join(ctrl)
                        .join(&path[1..])
                })
            })
            .collect()
    };
    let dirs = cgroup_dirs(spare);
    let detail = si
        .sandbox
        .iter()
        .find(|l| l.name == "cgroup")
        .map(|l| (l.state.clone(), l.detail.clone()));
    if let Some(("active", detail)) = detail.as_ref().map(|(s, d)| (s.as_str(), d)) {
        assert!(!dirs.is_empty(), "the worker is in no capsule cgroup");
        for d in &dirs {
            let name = d.file_name().expect("name").to_string_lossy().into_owned();
            assert!(detail.contains(&name), "{detail} does not name {name}");
            assert!(d.is_dir());
        }
    }

    // Kill the (next) spare: the following launch forks on demand, then a new spare appears.
    let info = guard(
        "a new spare",
        fork.wait_until(|i| i.spare_pid.is_some_and(|p| p != spare)),
    )
    .await;
    let doomed = info.spare_pid.expect("spare pid");
    // SAFETY: kill(2) on the spare of this test's own fork server.
    unsafe {
        libc::kill(doomed as libc::pid_t, libc::SIGKILL);
    }
    await_exit(doomed).await;
    let third = forked_session(&cfg, &fork).await;
    let ti = third.info().await.expect("info");
    assert_ne!(ti.pid, Some(doomed));
    assert!(confined(&ti), "{:?}", ti.sandbox);
    assert_eq!(ok(&third, "6 * 7").await, "42");
    let info = guard(
        "a spare after the dead one",
        fork.wait_until(|i| {
            i.spare_pid
                .is_some_and(|p| p != doomed && Some(p) != ti.pid)
        }),
    )
    .await;
    assert_eq!(info.failures, 0, "{info:?}");
    assert_eq!(info.forks, 3, "{info:?}");
    assert_eq!(info.templates_started, 1, "{info:?}");
    for s in [first, second, third] {
        s.shutdown().await.expect("shutdown");
    }
    await_exit(spare).await;
    for d in &dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    fork.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_template_warms_sessions_are_spawned() {
    let mut c = fork_config();
    c.spawn_while_warming = true;
    c.min_idle = 1;
    c.max_sessions = 3;
    c.reuse = Reuse::Replace;
    let pool = start(c).await;
    let info = guard("ready", pool.wait_ready()).await.expect("ready");
    // The first creation did not wait for the template: it spawned, and asked for a build.
    assert_eq!(info.created_by_path.get("spawn"), Some(&1), "{info:#?}");
    assert_eq!(info.fork.warming_spawns, 1, "{:?}", info.fork);
    assert_eq!(info.fork.failures, 0, "{:?}", info.fork);
    // The template comes up in the background; the next creation is forked.
    let info = wait(&pool, "the template", |i| i.fork.template_pid.is_some()).await;
    let template = info.fork.template_pid.expect("template");
    let s = pool.acquire(ACQUIRE).await.expect("acquire");
    assert_eq!(ok(&s, "1 + 1").await, "2");
    s.discard();
    let info = wait(&pool, "a forked replacement", |i| {
        i.created_by_path.get("fork") == Some(&1) && i.idle == 1
    })
    .await;
    assert_eq!(info.fork.warming_spawns, 1, "{:?}", info.fork);
    let s = pool.acquire(ACQUIRE).await.expect("acquire");
    assert_eq!(
        ok(&s, "import os; os.getppid()").await,
        template.to_string()
    );
    drop(s);
    pool.stop().await;
}
