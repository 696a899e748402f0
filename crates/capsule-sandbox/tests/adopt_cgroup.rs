//! A cgroup made ahead of time for a process that already exists (the pool's fork server moves
//! its spare into one), adopted by the worker's `Prepared`: it is the one reported, its limits
//! are the policy's, and cleanup kills what is inside and removes it.

mod common;

use std::process::{Command, Stdio};

use capsule_sandbox::{prepare, Policy, PreparedCgroup};
use common::*;

#[test]
fn an_adopted_cgroup_replaces_the_prepared_one_and_is_cleaned_up() {
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
