//! The pool's totals and snapshots under session churn, as operators see them
//! (issue 10): a proxy on two worker threads, 500 clients each running short
//! sessions (about 1.4 s: three binary messages 450 ms apart, then
//! `session.end`) back to back for 60 s, so about 500 sessions are open at
//! any time and over 200 start every second; and a poller of `/pools` (1 ms
//! between requests) and `/metrics` asserting in every sample that no total
//! runs backwards and that `idle ≤ live ≤ max` (and `idle + leased + dialing
//! == live`, `target ≤ max`). The sessions' pace leaves the two workers room
//! to answer the poller: saturated, an admin request waits behind hundreds of
//! ready tasks and the poller would sample a few times a second.
//!
//! Real sockets on 127.0.0.1, ephemeral ports; the client sessions use only
//! the public protocol (binary messages, `{"type":"session.end"}`, close 1000).
//! `POOL_TOTALS_SECS` shortens the run for local iterations (default 60).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use echo_backend::{Config, Mode};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use support::{Harness, Scrape, http_get, session_end, within};

const CLIENTS: usize = 500;
const BACKENDS: usize = 2;
/// Per backend: enough warm connections for every client at once.
const TARGET: usize = 256;
const MAX: usize = 320;
const MIN_SESSIONS_PER_SEC: f64 = 200.0;
/// Between a session's messages: 500 clients / ~1.4 s per session ≈ 350
/// sessions/s when the machine keeps up.
const MESSAGE_GAP: Duration = Duration::from_millis(450);

fn run_for() -> Duration {
    Duration::from_secs(
        std::env::var("POOL_TOTALS_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60),
    )
}

/// One short session: a few binary messages, `session.end`, then everything
/// the proxy sends until its close, which must be 1000.
async fn one_session(url: &str, n: u64) -> Result<(), String> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    for i in 0..3u8 {
        let payload = vec![i; 64 + (n % 64) as usize];
        ws.send(Message::binary(payload))
            .await
            .map_err(|e| format!("send: {e}"))?;
        tokio::time::sleep(MESSAGE_GAP).await;
    }
    ws.send(session_end())
        .await
        .map_err(|e| format!("send session.end: {e}"))?;
    let end = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(f)))) if u16::from(f.code) == 1000 => {
                    // tungstenite answers the close; drain to the end.
                    while let Some(Ok(_)) = ws.next().await {}
                    return Ok(());
                }
                Some(Ok(Message::Close(f))) => return Err(format!("closed with {f:?}")),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("error: {e}")),
                None => return Err("ended without a close frame".into()),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), end)
        .await
        .map_err(|_| "no close within 10 s".to_string())?
}

/// The totals of one backend's pool, in a fixed order.
const TOTALS: [&str; 4] = [
    "acquired_total",
    "released_total",
    "discarded_total",
    "dial_failures_total",
];

/// What the poller saw.
#[derive(Debug, Default)]
struct Samples {
    pools: u64,
    metrics: u64,
}

/// Check one `/pools` document, against the previous one.
fn check_pools(doc: &Value, last: &mut BTreeMap<String, [u64; 4]>) {
    let backends = doc["backends"].as_array().expect("/pools has backends");
    assert_eq!(backends.len(), BACKENDS, "{doc}");
    for b in backends {
        let id = b["id"].as_str().expect("an id").to_string();
        let get = |f: &str| {
            b[f].as_u64()
                .unwrap_or_else(|| panic!("/pools {id}.{f} not a number: {b}"))
        };
        let (idle, live, max) = (get("idle"), get("live"), get("max"));
        assert!(idle <= live, "idle > live in /pools: {b}");
        assert!(live <= max, "live > max in /pools: {b}");
        assert!(get("target") <= max, "target > max in /pools: {b}");
        assert_eq!(
            idle + get("leased") + get("dialing"),
            live,
            "idle + leased + dialing != live in /pools: {b}"
        );
        let now = TOTALS.map(get);
        if let Some(before) = last.get(&id) {
            for (k, name) in TOTALS.iter().enumerate() {
                assert!(
                    now[k] >= before[k],
                    "/pools {id}.{name} ran backwards: {} then {} ({b})",
                    before[k],
                    now[k]
                );
            }
        }
        last.insert(id, now);
    }
}

/// Check one `/metrics` scrape's pool counters against the previous one.
fn check_metrics(scrape: &Scrape, last: &mut BTreeMap<String, f64>) {
    let mut seen = 0;
    for (series, value) in &scrape.series {
        let counter = ["acquired", "released", "discarded", "dial_failures"]
            .iter()
            .any(|c| series.starts_with(&format!("sttproxy_pool_{c}_total{{")));
        if !counter {
            continue;
        }
        seen += 1;
        assert!(
            *value >= 0.0 && *value < 1e15,
            "{series} = {value}: wrapped or negative"
        );
        if let Some(before) = last.get(series) {
            assert!(
                value >= before,
                "{series} ran backwards: {before} then {value}"
            );
        }
        last.insert(series.clone(), *value);
    }
    assert_eq!(
        seen,
        4 * BACKENDS,
        "pool counters missing from /metrics:\n{}",
        scrape.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_totals_never_run_backwards_under_session_churn() {
    // 500 clients, each with a proxy-side socket and a pooled backend
    // connection: a few thousand descriptors.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let run_for = run_for();
    let h = Harness::start(
        BACKENDS,
        Config {
            mode: Mode::Echo,
            ..Config::default()
        },
        |s| {
            for b in &mut s.backends {
                b.target_size = Some(TARGET);
                b.max_size = Some(MAX);
            }
            s.acquire_timeout = Duration::from_secs(5);
        },
    )
    .await;
    within(Duration::from_secs(60), "warm pools", h.wait_warm()).await;

    let stop = Arc::new(AtomicBool::new(false));
    let completed = Arc::new(AtomicU64::new(0));
    let url = h.ws_url();
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (stop, completed, url) = (stop.clone(), completed.clone(), url.clone());
            tokio::spawn(async move {
                let mut n = c as u64;
                let mut failures = Vec::new();
                // Staggered starts: no thundering herd of 500 handshakes.
                tokio::time::sleep(MESSAGE_GAP * 3 / CLIENTS as u32 * c as u32).await;
                while !stop.load(Ordering::Relaxed) {
                    match one_session(&url, n).await {
                        Ok(()) => {
                            completed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures.push(e),
                    }
                    n += CLIENTS as u64;
                }
                failures
            })
        })
        .collect();

    // The poller: `/pools` about every millisecond, `/metrics` every fifth
    // sample, every one checked against the one before.
    let admin = h.admin;
    let mut samples = Samples::default();
    let mut last_pools = BTreeMap::new();
    let mut last_metrics = BTreeMap::new();
    while started.elapsed() < run_for {
        let r = http_get(admin, "/pools").await;
        assert_eq!(r.status, 200, "/pools: {r:?}");
        let doc: Value = serde_json::from_str(&r.body).expect("/pools is JSON");
        check_pools(&doc, &mut last_pools);
        samples.pools += 1;
        if samples.pools % 5 == 0 {
            let r = http_get(admin, "/metrics").await;
            assert_eq!(r.status, 200, "/metrics: {r:?}");
            check_metrics(&Scrape::parse(&r.body), &mut last_metrics);
            samples.metrics += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(
            within(Duration::from_secs(30), "a client's last session", c)
                .await
                .unwrap(),
        );
    }
    let elapsed = started.elapsed();
    let completed = completed.load(Ordering::Relaxed);
    let rate = completed as f64 / elapsed.as_secs_f64();
    eprintln!(
        "pool_totals: {completed} sessions in {elapsed:.1?} ({rate:.0}/s), {} /pools samples, \
         {} /metrics samples, {} failed sessions",
        samples.pools,
        samples.metrics,
        failures.len()
    );

    assert!(
        failures.is_empty(),
        "{} sessions failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        rate >= MIN_SESSIONS_PER_SEC,
        "only {rate:.0} sessions/s (at least {MIN_SESSIONS_PER_SEC} wanted)"
    );
    assert!(
        samples.pools >= 100,
        "the poller sampled too rarely: {samples:?} in {elapsed:?}"
    );

    // Quiescence: nothing leased, and the totals account for every session.
    let pools = h.pools().await;
    let acquired = pools.sum("acquired_total");
    let released = pools.sum("released_total");
    assert!(
        acquired >= completed,
        "acquired_total {acquired} < {completed} sessions"
    );
    assert!(
        released <= acquired,
        "released {released} > acquired {acquired}"
    );
    let mut last = BTreeMap::new();
    check_pools(&pools.0, &mut last);
    assert_eq!(pools.sum("leased"), 0, "{}", pools.0);
    h.stop().await;
}
