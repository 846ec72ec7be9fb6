//! The load generator against echo-backend on 127.0.0.1, with test faults where the load
//! generator must notice something.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::Behaviour;

fn assert_close(got: f64, want: f64, tolerance: f64, what: &str) {
    assert!(
        (got - want).abs() <= want * tolerance,
        "{what}: got {got}, want {want} ± {:.0} %",
        tolerance * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_echo_returns_every_message() {
    let server = common::start(Behaviour::Echo).await;
    let report = common::run(common::config(&server.url, 20, 2)).await;
    println!("{report}");
    let m = &report.messages;
    assert_eq!(report.sessions.connected, 20);
    assert_eq!(report.sessions.failed, 0);
    assert_eq!(
        report.sessions.completed, 20,
        "every session drained cleanly"
    );
    assert!(report.errors.is_empty(), "errors: {:?}", report.errors);
    assert_eq!(m.lost, 0);
    assert_eq!(m.cross_session, 0);
    assert_eq!(m.duplicated, 0);
    assert_eq!(m.received, m.sent);
    // The schedule runs from each session's planned start: 20 sessions × 50/s
    // × 2 s. The slots due in the few ms a session took to connect are kept in
    // it as unsent, never silently dropped.
    assert_eq!(m.scheduled, 2000);
    assert_eq!(m.sent + m.unsent, m.scheduled);
    assert_close(m.sent as f64, 2000.0, 0.05, "sent");
    assert_close(
        report.throughput.achieved_per_s,
        report.throughput.offered_per_s,
        0.05,
        "achieved vs offered",
    );
    assert_eq!(report.throughput.offered_per_s, 1000.0);
    assert_eq!(report.latency_ms.count, m.received);
    assert!(report.latency_ms.p50 > 0.0 && report.latency_ms.p50 < 100.0);
    // The session.ended JSON the backend answers session.end with is not data.
    assert_eq!(m.received, m.sent);
    let timeline_received: u64 = report.timeline.iter().map(|t| t.received).sum();
    let timeline_sent: u64 = report.timeline.iter().map(|t| t.sent).sum();
    assert_eq!(timeline_received, m.received);
    assert_eq!(timeline_sent, m.sent);
    assert!(report.timeline.len() >= 2);
}

/// The no-coordinated-omission check: a 500 ms stall of the server shows in the latency
/// percentiles because latency is measured from the intended send time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stall_shows_in_latency() {
    let server = common::start(Behaviour::Stall).await;
    // One second into the run, the whole backend freezes for 500 ms.
    let (report, ()) = tokio::join!(common::run(common::config(&server.url, 20, 2)), async {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        server.backend.stall_all_for(Duration::from_millis(500));
    });
    println!("{report}");
    assert_eq!(report.messages.lost, 0);
    assert!(
        report.latency_ms.max >= 400.0,
        "max {} ms",
        report.latency_ms.max
    );
    assert!(
        report.latency_ms.p99 >= 400.0,
        "p99 {} ms must include the 500 ms stall",
        report.latency_ms.p99
    );
    // The sender kept its schedule during the stall.
    assert_close(report.messages.sent as f64, 2000.0, 0.05, "sent");
    assert!(report.send_lag_ms.p99 < 200.0, "{:?}", report.send_lag_ms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_messages_are_lost() {
    let server = common::start(Behaviour::DropEvery(10)).await;
    let report = common::run(common::config(&server.url, 20, 2)).await;
    println!("{report}");
    let dropped = server.dropped();
    assert!(dropped >= 180, "the server dropped {dropped}");
    assert_eq!(report.messages.lost, dropped);
    assert_eq!(report.messages.received + dropped, report.messages.sent);
    assert_eq!(report.messages.cross_session, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_messages_are_cross_session() {
    let server = common::start(Behaviour::Swap).await;
    let report = common::run(common::config(&server.url, 20, 2)).await;
    println!("{report}");
    let m = &report.messages;
    assert!(m.cross_session > 0, "{m:?}");
    // A message answered on the wrong connection never comes back on its own.
    assert!(m.lost >= m.cross_session, "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stt_mode_counts_partials_and_finals() {
    let server = common::start(Behaviour::Stt).await;
    let mut config = common::config(&server.url, 10, 2);
    config.mode = loadgen::Mode::Stt;
    let report = common::run(config).await;
    println!("{report}");
    let m = &report.messages;
    assert_eq!(report.scenario.rate, 50.0);
    assert_eq!(report.scenario.size, 640);
    assert_close(m.sent as f64, 1000.0, 0.05, "chunks sent");
    assert_eq!(m.received, m.sent);
    assert_eq!(m.lost, 0);
    assert_eq!(m.cross_session, 0);
    assert_eq!(m.finals, 10);
    assert_eq!(report.sessions.completed, 10);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_are_counted_by_kind() {
    // Nothing listens on a port that was just released.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = format!("ws://{}/", listener.local_addr().unwrap());
    drop(listener);
    let refusing = common::start(Behaviour::Refuse503).await;
    let mut config = common::config(&closed, 4, 1);
    config.urls.push(refusing.url.clone());
    let report = common::run(config).await;
    println!("{report}");
    assert_eq!(report.sessions.connected, 0);
    assert_eq!(report.sessions.failed, 4);
    assert_eq!(report.errors.get("connect_refused"), Some(&2));
    assert_eq!(report.errors.get("handshake_status_503"), Some(&2));
    // Their slots stay in the schedule, all unsent: 4 × 50/s × 1 s.
    assert_eq!(report.messages.scheduled, 200);
    assert_eq!(report.messages.unsent, 200);
    assert_eq!(report.messages.sent, 0);
    assert_eq!(refusing.backend.stats().rejected_503, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_sessions_arrive_steadily_and_live_their_drawn_lifetimes() {
    let server = common::start(Behaviour::Echo).await;
    // 60 sessions arriving over 3 s (20/s), each living 0.5..1.5 s.
    let mut config = common::config(&server.url, 60, 1);
    config.ramp = Duration::from_secs(3);
    config.duration = Duration::from_millis(1500);
    config.lifetime = Some(Duration::from_millis(500));
    config.seed = 3;
    let started = Instant::now();
    let report = common::run(config.clone()).await;
    println!("{report}");
    assert_eq!(report.sessions.connected, 60);
    assert_eq!(report.sessions.completed, 60);
    assert_eq!(report.messages.lost, 0);
    assert_eq!(
        report.messages.sent + report.messages.unsent,
        report.messages.scheduled
    );
    // Mean lifetime ≈ 1 s: ≈ 60 × 50 = 3000 slots, far from the 60 × 75 of
    // every session living 1.5 s and the 60 × 25 of every one living 0.5 s.
    assert_close(report.messages.scheduled as f64, 3000.0, 0.15, "scheduled");
    assert_close(report.throughput.sessions_per_s, 20.0, 0.01, "sessions/s");
    assert_eq!(report.scenario.lifetime_min_s, Some(0.5));
    // Ramp 3 s + the last session's ≤ 1.5 s + its drain: not 3 s + 1.5 s for all.
    assert!(started.elapsed() < Duration::from_secs(8));
    // The same seed draws the same lifetimes: the same schedule.
    let again = common::run(config).await;
    assert_eq!(again.messages.scheduled, report.messages.scheduled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_the_run_early_with_partial_results() {
    let server = common::start(Behaviour::Echo).await;
    let config = common::config(&server.url, 10, 30);
    let started = Instant::now();
    let report = tokio::time::timeout(
        Duration::from_secs(20),
        loadgen::run(config, tokio::time::sleep(Duration::from_secs(1))),
    )
    .await
    .unwrap()
    .unwrap();
    println!("{report}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(report.stopped_early);
    assert!(report.messages.sent > 300, "{:?}", report.messages);
    assert_eq!(report.messages.lost, 0);
    assert_eq!(report.sessions.completed, 10);
}

/// Every key of the result schema (docs/architecture.md) is in the JSON, and the interval log
/// holds one histogram per second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_has_every_schema_key_and_hist_log_parses() {
    let server = common::start(Behaviour::Echo).await;
    let dir = tempfile::tempdir().unwrap();
    let hist_path = dir.path().join("loadgen.hlog");
    let mut config = common::config(&server.url, 5, 2);
    config.watch_pids = vec![std::process::id()];
    config.hist_log = Some(hist_path.clone());
    let report = common::run(config).await;
    let v = serde_json::to_value(&report).unwrap();
    let schema: &[(&str, &[&str])] = &[
        (
            "scenario",
            &["sessions", "rate", "size", "duration_s", "mode", "urls"],
        ),
        ("sessions", &["target", "connected", "failed"]),
        (
            "messages",
            &[
                "sent",
                "received",
                "lost",
                "duplicated",
                "out_of_order",
                "cross_session",
            ],
        ),
        ("throughput", &["offered_per_s", "achieved_per_s"]),
        ("latency_ms", &["p50", "p90", "p99", "p999", "max"]),
        ("loadgen", &["cpu_seconds", "cpu_us_per_msg"]),
        ("machine", &["cpu_seconds", "cpu_cores_avg", "samples"]),
    ];
    for (object, keys) in schema {
        for key in *keys {
            assert!(v[object].get(key).is_some(), "missing {object}.{key}: {v}");
        }
    }
    assert!(v["errors"].is_object());
    assert_eq!(v["scenario"]["mode"], "echo");
    let watched = v["watched"].as_array().unwrap();
    assert_eq!(watched.len(), 1);
    for key in [
        "pid",
        "name",
        "cpu_seconds",
        "cpu_cores_avg",
        "rss_avg_mb",
        "rss_peak_mb",
        "samples",
    ] {
        assert!(watched[0].get(key).is_some(), "missing watched.{key}");
    }
    let sample = &watched[0]["samples"][0];
    for key in ["t", "cpu_cores", "rss_mb"] {
        assert!(sample.get(key).is_some(), "missing watched.samples.{key}");
    }
    assert!(watched[0]["rss_avg_mb"].as_f64().unwrap() > 0.0);
    let machine_sample = &v["machine"]["samples"][0];
    for key in ["t", "cpu_cores"] {
        assert!(
            machine_sample.get(key).is_some(),
            "missing machine.samples.{key}"
        );
    }
    let timeline = v["timeline"].as_array().unwrap();
    assert!(timeline.len() >= 2);
    for key in ["t", "sent", "received", "p99_ms"] {
        assert!(timeline[0].get(key).is_some(), "missing timeline.{key}");
    }

    let log = std::fs::read(&hist_path).unwrap();
    let mut intervals = 0;
    let mut count = 0;
    let mut deserializer = hdrhistogram::serialization::Deserializer::new();
    for item in hdrhistogram::serialization::interval_log::IntervalLogIterator::new(&log) {
        if let hdrhistogram::serialization::interval_log::LogEntry::Interval(h) = item.unwrap() {
            intervals += 1;
            let bytes = base64_decode(h.encoded_histogram());
            let hist: hdrhistogram::Histogram<u64> =
                deserializer.deserialize(&mut bytes.as_slice()).unwrap();
            count += hist.len();
        }
    }
    assert!(intervals >= 2, "{intervals} intervals");
    assert_eq!(count, report.messages.received);
}

/// Standard base64 without padding checks (the log's histograms are base64 text).
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => 0,
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c) << (18 - 6 * i);
        }
        out.push((n >> 16) as u8);
        if chunk.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(n as u8);
        }
    }
    out
}
