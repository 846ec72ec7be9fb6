//! Acceptance (issue 4): the proxy's CPU seconds as the load generator reports
//! them (`--watch-pid`) agree with an independent reading of /proc/<pid>/stat
//! taken before and after the run, within 5 %.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::ProxyProcess;

/// utime + stime of `pid` in seconds, straight from /proc.
fn cpu_seconds_of(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = text[text.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .collect();
    // fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .unwrap();
    let clk: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    ticks as f64 / clk
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_reading_of_the_proxy_cpu_matches_proc_stat() {
    let backend = echo_backend::spawn(
        "127.0.0.1:0".parse().unwrap(),
        echo_backend::Config::default(),
    )
    .await
    .unwrap();
    let proxy = ProxyProcess::spawn(&[
        "serve".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--admin".into(),
        "127.0.0.1:0".into(),
        "--backend".into(),
        backend.url(),
        "--target-size".into(),
        "200".into(),
    ])
    .await;
    let pid = proxy.pid();
    // Let the pool warm up before the first reading, so both readings bracket
    // the same work: the run itself.
    support::eventually(Duration::from_secs(10), "pool warm", || async {
        support::pools(proxy.admin).await.sum("idle") >= 200
    })
    .await;

    let mut config = loadgen::LoadConfig::new(vec![format!("ws://{}/v1/stream", proxy.listen)]);
    config.sessions = 150;
    config.rate = 100.0;
    config.duration = Duration::from_secs(4);
    config.watch_pids = vec![pid];

    let before = cpu_seconds_of(pid);
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        loadgen::run(config, std::future::pending::<()>()),
    )
    .await
    .expect("the run ends by itself")
    .expect("the run starts");
    let after = cpu_seconds_of(pid);

    let independent = after - before;
    let watched = &report.watched[0];
    println!(
        "proxy CPU: /proc {independent:.3} s, loadgen {:.3} s ({} samples); {} messages",
        watched.cpu_seconds,
        watched.samples.len(),
        report.messages.received
    );
    assert_eq!(watched.pid, pid);
    assert_eq!(report.messages.lost, 0);
    assert!(independent > 0.3, "the proxy only used {independent} s");
    assert!(
        (watched.cpu_seconds - independent).abs() <= independent * 0.05,
        "loadgen {} s vs /proc {independent} s",
        watched.cpu_seconds
    );
    backend.shutdown().await;
}
