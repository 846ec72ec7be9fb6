//! `kill -9` of a running `repro` leaves no process of its tree behind: the
//! group leaders die by their parent-death signal, the workers they forked and
//! anything else in their groups by the guardian (see `reports::procs`).
//!
//! `repro` runs the release binaries (echo-backend, sttproxy, loadgen); the
//! test skips with a printed reason when they are not built, and fails
//! instead under `CI=true`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What /proc says about one process.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    comm: String,
    ppid: u32,
    pgrp: i32,
    state: char,
    start_time: u64,
}

fn read(pid: u32) -> Option<Seen> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = text.get(close + 2..)?.split_whitespace().collect();
    Some(Seen {
        comm,
        state: rest.first()?.chars().next()?,
        ppid: rest.get(1)?.parse().ok()?,
        pgrp: rest.get(2)?.parse().ok()?,
        start_time: rest.get(19)?.parse().ok()?,
    })
}

fn all() -> BTreeMap<u32, Seen> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return BTreeMap::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, read(pid)?)))
        .collect()
}

/// Descendants of `root` now (not `root` itself).
fn descendants(root: u32, procs: &BTreeMap<u32, Seen>) -> Vec<u32> {
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (&pid, s) in procs {
            if s.ppid == p && !out.contains(&pid) {
                out.push(pid);
                frontier.push(pid);
            }
        }
    }
    out
}

/// Processes still alive (zombies count as gone: the container's init may
/// not reap orphans) that are one of `seen` (same pid and start time) or sit
/// in one of the process groups `seen` had.
///
/// The test's own group is left out: a child seen between its fork and its
/// `setpgid` was still in it.
fn survivors(seen: &BTreeMap<u32, Seen>) -> Vec<(u32, Seen)> {
    let own = read(std::process::id()).map_or(0, |s| s.pgrp);
    let groups: Vec<i32> = seen
        .values()
        .map(|s| s.pgrp)
        .filter(|&g| g != own)
        .collect();
    all()
        .into_iter()
        .filter(|(_, s)| s.state != 'Z')
        .filter(|(pid, s)| {
            seen.get(pid).is_some_and(|o| o.start_time == s.start_time)
                || (groups.contains(&s.pgrp) && s.pgrp > 1)
        })
        .collect()
}

#[test]
fn sigkill_of_repro_leaves_no_child_behind() {
    let repro = PathBuf::from(env!("CARGO_BIN_EXE_repro"));
    // target/<profile>/repro → target
    let Some(target) = repro.parent().and_then(|p| p.parent()).map(PathBuf::from) else {
        panic!("no target directory above {}", repro.display());
    };
    let release = target.join("release");
    let missing: Vec<_> = ["echo-backend", "sttproxy", "loadgen"]
        .into_iter()
        .filter(|b| !release.join(b).is_file())
        .collect();
    if !missing.is_empty() {
        let why = format!(
            "skipped: {missing:?} not built in {} (cargo build --release -p echo-backend -p sttproxy -p loadgen)",
            release.display()
        );
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{why}; required under CI=true");
        }
        eprintln!("{why}");
        return;
    }
    let out = std::env::temp_dir().join(format!("repro-kill-{}", std::process::id()));
    let mut child = match Command::new(&repro)
        .args(["--quick", "--rounds", "1", "--no-build", "--out"])
        .arg(&out)
        .env("CARGO_TARGET_DIR", &target)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!("starting {}: {e}", repro.display()),
    };
    let root = child.id();

    // Wait (bounded) until the 3 echo backends and sttproxy run (the
    // virtualenv's preparation, a process tree of its own, started before
    // them), then for loadgen — which starts only once the virtualenv is ready
    // and the baseline started — for at most 30 s more.
    let mut seen: BTreeMap<u32, Seen> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut core_seen_at: Option<Instant> = None;
    loop {
        let procs = all();
        for pid in descendants(root, &procs) {
            if let Some(s) = procs.get(&pid) {
                seen.entry(pid).or_insert_with(|| s.clone());
            }
        }
        let count = |name: &str| seen.values().filter(|s| s.comm == name).count();
        if core_seen_at.is_none() && count("sttproxy") >= 1 && count("echo-backend") >= 3 {
            core_seen_at = Some(Instant::now());
        }
        if count("loadgen") >= 1
            || core_seen_at.is_some_and(|t| t.elapsed() > Duration::from_secs(30))
        {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "repro exited ({status}) before its children were seen: {seen:?}; see {}",
                out.display()
            );
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("repro's children did not all start within 90 s: {seen:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    eprintln!(
        "killing repro with its tree of {} processes: {:?}",
        seen.len(),
        seen.values().map(|s| s.comm.as_str()).collect::<Vec<_>>()
    );
    if let Err(e) = child.kill() {
        panic!("kill -9 repro: {e}");
    }
    let _ = child.wait();

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = survivors(&seen);
        if left.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            panic!("10 s after kill -9 of repro these processes of its tree remain: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_dir_all(&out);
}
