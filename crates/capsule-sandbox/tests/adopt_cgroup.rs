//! A cgroup made ahead of time for a process that already exists (the pool's fork server moves
//! its spare into one), adopted by the worker's `Prepared`: it is the one reported, its limits
//! are the policy's, and cleanup kills what is inside and removes it.

mod common;

use std::process::{Command, Stdio};

use capsule_sandbox::{prepare, Policy, PreparedCgroup};
use common::*;

/// The tests count this process's cgroup directories: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn an_adopted_cgroup_replaces_the_prepared_one_and_is_cleaned_up() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new();
    let policy = Policy::standard();
    let mut prepared =
        prepare(&policy, &spec("/usr/bin/python3", &scratch.path())).expect("prepare");
    if !require_layer(&prepared, "cgroup") {
        return;
    }
    let own = prepared.layer("cgroup").expect("cgroup").detail.clone();
    let Some(mut ahead) = PreparedCgroup::create(&policy).expect("create") else {
        eprintln!("SKIP: the policy gives workers no cgroup here");
        return;
    };
    // A stand-in for the spare: a process that waits until it is killed.
    let mut child = Command::new("/usr/bin/python3")
        .args(["-I", "-S", "-c", "import sys; sys.stdin.read()"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    ahead.join(pid).expect("join");
    assert_eq!(ahead.pid(), Some(pid));
    let dirs: Vec<std::path::PathBuf> = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
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
        .collect();
    assert!(!dirs.is_empty(), "the process is in no capsule cgroup");

    prepared.adopt_cgroup(ahead, pid);
    let detail = prepared.layer("cgroup").expect("cgroup").detail.clone();
    assert_ne!(detail, own, "the report still names the prepared cgroup");
    for d in &dirs {
        let name = d.file_name().expect("name").to_string_lossy().into_owned();
        assert!(detail.contains(&name), "{detail} does not name {name}");
    }
    // The prepared cgroup is gone; the adopted one has the policy's limits.
    for word in own
        .split_whitespace()
        .filter(|w| w.starts_with("/sys/fs/cgroup"))
    {
        assert!(
            !std::path::Path::new(word.trim_end_matches(',')).exists(),
            "{word} left behind"
        );
    }
    if let (Some(limit), Some(mem)) = (
        policy.limits.memory,
        dirs.iter().find(|d| d.starts_with("/sys/fs/cgroup/memory")),
    ) {
        let set: u64 = std::fs::read_to_string(mem.join("memory.limit_in_bytes"))
            .expect("limit")
            .trim()
            .parse()
            .expect("number");
        assert_eq!(set, limit);
    }
    assert_eq!(prepared.limit_events().oom_kills, 0);

    // Cleanup kills what is left inside and removes the directories.
    prepared.cleanup();
    let status = child.wait().expect("wait");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    for d in &dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }
}

#[test]
fn a_deferred_cgroup_is_made_at_the_join_or_never_when_adopted() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new();
    let policy = Policy::standard();
    let mut spec = spec("/usr/bin/python3", &scratch.path());
    spec.defer_cgroup = true;
    let count = || {
        ["/sys/fs/cgroup/memory", "/sys/fs/cgroup/pids"]
            .iter()
            .map(|root| {
                let mine = format!("capsule-{}-", std::process::id());
                walk_count(std::path::Path::new(root), &mine)
            })
            .sum::<usize>()
    };
    let before = count();
    let mut deferred = prepare(&policy, &spec).expect("prepare");
    if !require_layer(&deferred, "cgroup") {
        return;
    }
    assert!(deferred.has_cgroups_to_join());
    assert_eq!(count(), before, "a deferred cgroup was made in prepare()");
    // Joined: made then, with the policy's limits, and reported.
    let mut child = Command::new("/usr/bin/python3")
        .args(["-I", "-S", "-c", "import sys; sys.stdin.read()"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn");
    deferred.join_cgroups(child.id()).expect("join");
    assert!(count() > before);
    let detail = deferred.layer("cgroup").expect("cgroup").detail.clone();
    assert!(detail.contains("capsule-"), "{detail}");
    deferred.cleanup();
    let _ = child.wait();
    assert_eq!(count(), before, "cleanup left a directory");

    // Adopted instead: none of its own is ever made.
    let mut deferred = prepare(&policy, &spec).expect("prepare");
    let Some(mut ahead) = PreparedCgroup::create(&policy).expect("create") else {
        return;
    };
    let mut child = Command::new("/usr/bin/python3")
        .args(["-I", "-S", "-c", "import sys; sys.stdin.read()"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn");
    ahead.join(child.id()).expect("join");
    let with_ahead = count();
    deferred.adopt_cgroup(ahead, child.id());
    assert!(!deferred.has_cgroups_to_join());
    assert_eq!(count(), with_ahead, "adoption made or removed a directory");
    let detail = deferred.layer("cgroup").expect("cgroup").detail.clone();
    assert!(detail.contains("capsule-"), "{detail}");
    deferred.cleanup();
    let _ = child.wait();
    assert_eq!(count(), before);
}

/// Directories under `root` (any depth up to 3) whose name starts with `prefix`.
fn walk_count(root: &std::path::Path, prefix: &str) -> usize {
    fn walk(d: &std::path::Path, prefix: &str, depth: u32) -> usize {
        let Ok(rd) = std::fs::read_dir(d) else {
            return 0;
        };
        rd.flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(prefix) {
                    1
                } else if depth > 0 {
                    walk(&e.path(), prefix, depth - 1)
                } else {
                    0
                }
            })
            .sum()
    }
    walk(root, prefix, 3)
}
