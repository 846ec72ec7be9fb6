//! Acceptance: `--watch-pid` on a process that burns CPU reports the CPU seconds an
//! independent reading of /proc/<pid>/stat before and after the run gives, within 5 %.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};

/// utime + stime of `pid`, in seconds, read straight from /proc.
fn cpu_seconds_of(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &text[text.rfind(')').unwrap() + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields[11].parse().unwrap();
    let stime: u64 = fields[12].parse().unwrap();
    let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    let clk: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    (utime + stime) as f64 / clk
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_cpu_matches_proc_stat() {
    let child = Child(
        Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let server = common::start(common::Behaviour::Echo).await;
    let mut config = common::config(&server.url, 5, 3);
    config.watch_pids = vec![pid];

    let before = cpu_seconds_of(pid);
    let report = common::run(config).await;
    let after = cpu_seconds_of(pid);
    drop(child);

    let independent = after - before;
    let watched = &report.watched[0];
    println!(
        "independent {independent:.3} s, loadgen {:.3} s, {:.3} cores avg, {} samples",
        watched.cpu_seconds,
        watched.cpu_cores_avg,
        watched.samples.len()
    );
    assert_eq!(watched.pid, pid);
    assert_eq!(watched.name, "sh");
    assert!(watched.found);
    assert!(independent > 1.0, "the child burned {independent} s");
    assert!(
        (watched.cpu_seconds - independent).abs() <= independent * 0.05,
        "watched {} s vs /proc {independent} s",
        watched.cpu_seconds
    );
    assert!(watched.samples.len() >= 3, "{:?}", watched.samples);
    assert!(watched.rss_avg_mb > 0.0);
    assert!(watched.rss_peak_mb >= watched.rss_avg_mb);
    // The whole machine was at least as busy as the one process.
    assert!(report.machine.cpu_seconds >= watched.cpu_seconds * 0.9);
}
