//! Mid-session failover (docs/failover.md) over real sockets: echo backends in
//! stt mode, marked `reuse = "resumable"`, one of them killed while sessions
//! stream audio through the proxy.
//!
//! What a client must see: its session carries on (a `session.failover`
//! notice, no close), its finals tile its audio from 0 to the end without a
//! gap or an overlap (nothing repeated, nothing lost), its partials never go
//! back, and nothing of another session. With no backend to move to, 1014
//! at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use echo_backend::{Config, Mode, Stt};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use sttproxy::backend::Reuse;
use sttproxy::config::Settings;
use support::clients::node_ws_or_skip;
use support::{Harness, Ws, connect, eventually, expect_started, session_end, within};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Audio per message: 100 ms of 16 kHz 16-bit mono.
const CHUNK: usize = 3200;
const CHUNK_MS: u64 = 100;

fn stt_backend() -> Config {
    Config {
        mode: Mode::Stt,
        delay: Duration::from_millis(5),
        jitter: Duration::from_millis(5),
        stt: Stt {
            utterance: Some((Duration::from_millis(300), Duration::from_millis(700))),
            ..Stt::default()
        },
        seed: Some(7),
        ..Config::default()
    }
}

fn resumable(target: usize, max: usize) -> impl FnOnce(&mut Settings) {
    move |s: &mut Settings| {
        for b in &mut s.backends {
            b.reuse = Some(Reuse::Resumable);
            b.target_size = Some(target);
            b.max_size = Some(max);
        }
        s.failover_timeout = Duration::from_secs(3);
        s.acquire_timeout = Duration::from_secs(2);
    }
}

/// What one client saw.
#[derive(Debug, Default)]
struct Seen {
    id: String,
    failovers: usize,
    /// Longest time between two results (the notice aside).
    longest_gap: Duration,
    /// The pause the failover made: from the last result before the notice
    /// to the first after it.
    pause: Option<Duration>,
    close: Option<u16>,
    ended: bool,
}

/// Stream `chunks` messages of audio at real time, signal `ready` after the
/// fifth result, end the session, and check everything received.
async fn stream_session(url: String, chunks: u64, ready: Arc<(AtomicUsize, Notify)>) -> Seen {
    let mut ws: Ws = connect(&url).await;
    let id = expect_started(&mut ws).await;
    let (mut tx, mut rx) = ws.split();
    let writer = async move {
        let mut tick = tokio::time::interval(Duration::from_millis(CHUNK_MS));
        for _ in 0..chunks {
            tick.tick().await;
            if tx.send(Message::binary(vec![0x11; CHUNK])).await.is_err() {
                return tx;
            }
        }
        let _ = tx.send(session_end()).await;
        tx
    };
    let reader = async {
        let mut seen = Seen {
            id: id.clone(),
            ..Seen::default()
        };
        let mut finals_end_ms = 0u64;
        let mut partial_end = 0u64;
        let mut last_final_bytes = 0u64;
        let mut results = 0;
        let mut last_at: Option<Instant> = None;
        let mut notice_after: Option<Instant> = None;
        while let Some(msg) = rx.next().await {
            let text = match msg {
                Ok(Message::Text(t)) => t,
                Ok(Message::Close(f)) => {
                    // tungstenite 0.30 does not know 1014 and hands it over as
                    // 1002 "Protocol violation" (docs/protocol.md, tungstenite-rs#502).
                    seen.close = f.map(|f| match u16::from(f.code) {
                        1002 if f.reason == "Protocol violation" => 1014,
                        code => code,
                    });
                    break;
                }
                Ok(Message::Binary(b)) => panic!("{id}: binary from an stt backend: {b:?}"),
                Ok(_) => continue,
                Err(e) => panic!("{id}: {e}"),
            };
            let v: Value = serde_json::from_str(text.as_str()).expect("results are JSON");
            assert_eq!(v["session"], id, "a message of another session: {v}");
            match v["type"].as_str() {
                Some("session.failover") => {
                    seen.failovers += 1;
                    notice_after = last_at;
                    continue;
                }
                Some("session.ended") => seen.ended = true,
                Some("partial") => {
                    let end = v["end_bytes"].as_u64().expect("end_bytes");
                    assert!(end > partial_end, "{id}: partial went back: {v}");
                    partial_end = end;
                }
                Some("final") => {
                    let (start, end) = (
                        v["audio_start_ms"].as_u64().expect("start"),
                        v["audio_end_ms"].as_u64().expect("end"),
                    );
                    assert_eq!(
                        start, finals_end_ms,
                        "{id}: finals must tile the audio (a gap or a repeat): {v}"
                    );
                    finals_end_ms = end;
                    last_final_bytes = v["end_bytes"].as_u64().expect("end_bytes");
                }
                _ => panic!("{id}: unexpected message {v}"),
            }
            let now = Instant::now();
            if let Some(before) = notice_after.take() {
                seen.pause = Some(now - before);
            }
            if let Some(at) = last_at {
                seen.longest_gap = seen.longest_gap.max(now - at);
            }
            last_at = Some(now);
            results += 1;
            if results == 5 {
                ready.0.fetch_add(1, Ordering::SeqCst);
                ready.1.notify_one();
            }
        }
        if seen.ended {
            assert_eq!(
                finals_end_ms,
                chunks * CHUNK_MS,
                "{id}: the finals end where the audio ends"
            );
            assert_eq!(last_final_bytes, chunks * CHUNK as u64, "{id}");
        }
        seen
    };
    let (_, seen) = tokio::join!(writer, reader);
    seen
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// `/metrics` once every session has ended (their counts are added as each
/// session's task finishes, a moment after its client saw the close).
async fn settled_metrics(h: &Harness) -> support::Scrape {
    let admin = h.admin;
    eventually(
        Duration::from_secs(5),
        "every session ended",
        || async move {
            support::metrics(admin)
                .await
                .get("sttproxy_sessions_active")
                == 0.0
        },
    )
    .await;
    h.metrics().await
}

/// Once the pools are warm, start `n` sessions of `chunks` messages each and
/// wait until every one has had its first results.
async fn start_streaming(h: &Harness, n: usize, chunks: u64) -> Vec<tokio::task::JoinHandle<Seen>> {
    h.wait_warm().await;
    let ready = Arc::new((AtomicUsize::new(0), Notify::new()));
    let tasks = (0..n)
        .map(|_| tokio::spawn(stream_session(h.ws_url(), chunks, ready.clone())))
        .collect();
    within(Duration::from_secs(20), "every session streaming", async {
        while ready.0.load(Ordering::SeqCst) < n {
            ready.1.notified().await;
        }
    })
    .await;
    tasks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_of_a_killed_backend_carry_on_elsewhere() {
    const SESSIONS: usize = 100;
    const CHUNKS: u64 = 40;
    let h = Harness::start(3, stt_backend(), resumable(40, 120)).await;
    let tasks = start_streaming(&h, SESSIONS, CHUNKS).await;
    let on_b0 = h.backends[0].stats().sessions_started;
    h.backends[0].kill_all();
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(
            within(Duration::from_secs(30), "a session", t)
                .await
                .expect("session task"),
        );
    }
    let moved: Vec<&Seen> = seen.iter().filter(|s| s.failovers > 0).collect();
    for s in &seen {
        assert!(s.ended, "{}: no session.ended ({:?})", s.id, s.close);
        assert_eq!(s.close, Some(1000), "{}", s.id);
        assert!(s.failovers <= 1, "{}: {} failovers", s.id, s.failovers);
    }
    let resumed: u64 = h.backends[1..]
        .iter()
        .map(|b| b.stats().sessions_resumed)
        .sum();
    assert_eq!(
        resumed,
        moved.len() as u64,
        "takeovers the other backends saw"
    );
    assert_eq!(h.backends[0].stats().sessions_resumed, 0);
    assert_eq!(
        moved.len() as u64,
        on_b0,
        "every session the killed backend held moved, and no other"
    );
    assert!(!moved.is_empty());
    let m = settled_metrics(&h).await;
    assert_eq!(
        m.get(r#"sttproxy_failovers_total{outcome="resumed"}"#),
        moved.len() as f64
    );
    let mut pauses: Vec<Duration> = moved.iter().filter_map(|s| s.pause).collect();
    pauses.sort();
    let mut gaps: Vec<Duration> = moved.iter().map(|s| s.longest_gap).collect();
    gaps.sort();
    let mut calm: Vec<Duration> = seen
        .iter()
        .filter(|s| s.failovers == 0)
        .map(|s| s.longest_gap)
        .collect();
    calm.sort();
    println!(
        "failover: {} of {SESSIONS} sessions moved; pause across the failover (last result \
         before the notice to the first after) p50 {:?} p99 {:?}; longest gap between results \
         in a moved session p50 {:?} p99 {:?} max {:?}; in the others p50 {:?} p99 {:?} \
         (results every {CHUNK_MS} ms)",
        moved.len(),
        percentile(&pauses, 0.5),
        percentile(&pauses, 0.99),
        percentile(&gaps, 0.5),
        percentile(&gaps, 0.99),
        gaps.last().copied().unwrap_or_default(),
        percentile(&calm, 0.5),
        percentile(&calm, 0.99),
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_backend_down_sessions_get_1014_at_once() {
    const SESSIONS: usize = 10;
    let failover_timeout = Duration::from_secs(3);
    let h = Harness::start(2, stt_backend(), |s| {
        resumable(6, 20)(s);
        s.failover_timeout = failover_timeout;
    })
    .await;
    let tasks = start_streaming(&h, SESSIONS, 600).await;
    let down = Instant::now();
    for b in &h.backends {
        b.shutdown().await;
    }
    for t in tasks {
        let s = within(Duration::from_secs(10), "a session", t)
            .await
            .expect("session task");
        assert_eq!(s.close, Some(1014), "{}", s.id);
        assert!(!s.ended);
    }
    let took = down.elapsed();
    // Not at the deadline: the other backend refuses the takeover's dial, so
    // there is nothing to wait for.
    assert!(
        took < failover_timeout,
        "1014 after {took:?}, failover_timeout {failover_timeout:?}"
    );
    println!("every backend down: {SESSIONS} sessions closed 1014 within {took:?}");
    let m = settled_metrics(&h).await;
    assert_eq!(
        m.get(r#"sttproxy_sessions_total{outcome="backend_failed"}"#),
        SESSIONS as f64
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_does_not_resume_never_gets_a_replayed_session() {
    const SESSIONS: usize = 12;
    let h = Harness::start(2, stt_backend(), |s| {
        resumable(8, 20)(s);
        // b1 fences but does not speak `resume`.
        s.backends[1].reuse = Some(Reuse::Fenced);
    })
    .await;
    let tasks = start_streaming(&h, SESSIONS, 30).await;
    let on_b0 = h.backends[0].stats().sessions_started as usize;
    h.backends[0].kill_all();
    let mut lost = 0;
    for t in tasks {
        let s = within(Duration::from_secs(30), "a session", t)
            .await
            .expect("session task");
        assert_eq!(s.failovers, 0, "{}", s.id);
        match s.close {
            Some(1014) => lost += 1,
            Some(1000) => assert!(s.ended),
            other => panic!("{}: close {other:?}", s.id),
        }
    }
    assert_eq!(lost, on_b0, "the killed backend's sessions end with 1014");
    assert_eq!(h.backends[1].stats().sessions_resumed, 0);
    let m = settled_metrics(&h).await;
    assert_eq!(
        m.get(r#"sttproxy_failovers_total{outcome="no_backend"}"#),
        on_b0 as f64
    );
    h.stop().await;
}

/// A backend that goes silent without closing anything (a frozen host: no
/// FIN, no reset, its socket open): the proxy pings it once nothing has come
/// for `health_interval`, gives up `health_timeout` later, and the session
/// moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_of_a_silent_backend_are_pinged_and_move() {
    const SESSIONS: usize = 12;
    const CHUNKS: u64 = 50;
    let h = Harness::start(2, stt_backend(), |s| {
        resumable(8, 20)(s);
        s.health_interval = Duration::from_millis(600);
        s.health_timeout = Duration::from_millis(300);
    })
    .await;
    let tasks = start_streaming(&h, SESSIONS, CHUNKS).await;
    let on_b0 = h.backends[0].stats().sessions_started;
    let frozen = Instant::now();
    h.backends[0].stall_all_for(Duration::from_secs(60));
    let mut moved = Vec::new();
    for t in tasks {
        let s = within(Duration::from_secs(30), "a session", t)
            .await
            .expect("session task");
        assert!(s.ended, "{}: close {:?}", s.id, s.close);
        assert_eq!(s.close, Some(1000), "{}", s.id);
        if s.failovers > 0 {
            moved.push(s.pause.unwrap_or_default());
        }
    }
    assert_eq!(
        moved.len() as u64,
        on_b0,
        "every session of the frozen backend moved"
    );
    assert!(!moved.is_empty());
    moved.sort();
    println!(
        "silent backend: {} of {SESSIONS} sessions moved; pause across the failover p50 {:?} max {:?} \
         (health_interval 600 ms, health_timeout 300 ms); {:?} after the freeze",
        moved.len(),
        percentile(&moved, 0.5),
        moved.last().copied().unwrap_or_default(),
        frozen.elapsed(),
    );
    h.stop().await;
}

/// The failover as a client nobody here wrote sees it: Node's `ws` streams
/// resumable sessions while the backend holding the most of them is killed.
/// Each moved session gets one `session.failover` text and carries on; every
/// session's finals tile its audio, nothing of another session arrives, and
/// every session ends with `session.ended` and a clean close 1000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ws_sessions_carry_on_through_a_failover() {
    const SESSIONS: usize = 8;
    const CHUNKS: u64 = 40;
    let Some(modules) = node_ws_or_skip().await else {
        return;
    };
    let h = Harness::start(2, stt_backend(), resumable(12, 40)).await;
    h.wait_warm().await;
    let mut child = std::process::Command::new("node")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js/failover_session.cjs"))
        .arg(h.ws_url())
        .arg(SESSIONS.to_string())
        .arg(CHUNKS.to_string())
        .env("NODE_PATH", &modules)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting node");
    let stdout = child.stdout.take().expect("node's stdout");
    // The client's lines as they come (the kill waits for its signal), then
    // how it exited.
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let client = tokio::task::spawn_blocking(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
        child.wait_with_output()
    });
    within(
        Duration::from_secs(30),
        "every Node session streaming",
        async {
            let mut streaming = 0;
            while streaming < SESSIONS {
                let line = lines
                    .recv()
                    .await
                    .expect("node ended before its sessions streamed");
                if line.starts_with(r#"{"streaming""#) {
                    streaming += 1;
                }
            }
        },
    )
    .await;
    let started: Vec<u64> = h
        .backends
        .iter()
        .map(|b| b.stats().sessions_started)
        .collect();
    let victim = usize::from(started[1] > started[0]);
    h.backends[victim].kill_all();
    let out = within(Duration::from_secs(90), "the Node client", client)
        .await
        .unwrap()
        .expect("node's exit");
    assert!(
        out.status.success(),
        "node failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut seen = Vec::new();
    while let Ok(line) = lines.try_recv() {
        if line.starts_with(r#"{"session""#) {
            seen.push(serde_json::from_str::<Value>(&line).expect("a JSON line"));
        }
    }
    assert_eq!(seen.len(), SESSIONS, "one line per session: {seen:?}");
    let mut moved = 0;
    for s in &seen {
        assert_eq!(
            (&s["code"], &s["wasClean"], &s["ended"], &s["error"]),
            (
                &Value::from(1000),
                &Value::from(true),
                &Value::from(true),
                &Value::Null
            ),
            "{s}"
        );
        assert_eq!(s["foreign"], 0, "a message of another session: {s}");
        assert_eq!(s["tiled"], true, "finals with a gap or a repeat: {s}");
        assert_eq!(s["finals_end_ms"], CHUNKS * CHUNK_MS, "{s}");
        let failovers = s["failovers"].as_u64().expect("failovers");
        assert!(failovers <= 1, "{s}");
        moved += failovers;
    }
    assert!(started[victim] > 0);
    assert_eq!(
        moved, started[victim],
        "every session of the killed backend moved, and no other"
    );
    assert_eq!(h.backends[1 - victim].stats().sessions_resumed, moved);
    println!(
        "node ws: {moved} of {SESSIONS} sessions moved off the killed backend, each with one \
         session.failover; every session ended clean with 1000"
    );
    h.stop().await;
}
