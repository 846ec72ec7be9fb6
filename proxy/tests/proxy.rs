//! The proxy end to end over real sockets on 127.0.0.1: echo backends in
//! process, the proxy in process (or the real binary for SIGTERM), every test
//! bounded in time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use echo_backend::{Config, Mode};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use support::echo;
use support::raw::{RawMsg, RawWs};
use support::{
    Harness, ProxyProcess, STEP, TEST_LIMIT, bounded, connect, end_session, eventually,
    expect_close_code, expect_started, http_get, http_request, recv_json, within,
};

fn stt(delay_ms: u64, jitter_ms: u64) -> Config {
    Config {
        mode: Mode::Stt,
        delay: Duration::from_millis(delay_ms),
        jitter: Duration::from_millis(jitter_ms),
        ..Config::default()
    }
}

/// Every backend entry gets these pool sizes.
fn sizes(s: &mut sttproxy::Settings, target: usize, max: usize) {
    for b in &mut s.backends {
        b.target_size = Some(target);
        b.max_size = Some(max);
    }
}

fn text_of(size: usize, seed: usize) -> String {
    (0..size)
        .map(|j| char::from(b'a' + ((j * 7 + seed) % 26) as u8))
        .collect()
}

fn bytes_of(size: usize, seed: usize) -> Vec<u8> {
    (0..size)
        .map(|j| ((j * 31 + seed * 17) % 251) as u8)
        .collect()
}

/// A short description of a message for assertion failures (not 1 MiB of it).
fn describe(m: &Message) -> String {
    let (kind, data): (&str, &[u8]) = match m {
        Message::Text(t) => ("text", t.as_bytes()),
        Message::Binary(b) => ("binary", b),
        other => return format!("{other:?}"),
    };
    format!(
        "{kind} of {} bytes starting {:?}",
        data.len(),
        &data[..data.len().min(16)]
    )
}

fn json_of(m: &RawMsg) -> Value {
    match m {
        RawMsg::Text(t) => {
            serde_json::from_str(t).unwrap_or_else(|e| panic!("not JSON ({e}): {t}"))
        }
        other => panic!("expected a JSON text, got {other:?}"),
    }
}

async fn raw_next(c: &mut RawWs, what: &str) -> RawMsg {
    within(STEP, what, c.next_data())
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"))
        .unwrap_or_else(|| panic!("{what}: the connection ended"))
}

// ---------------------------------------------------------------- (a) relay

/// Through the proxy to 3 echo backends, every message comes back in order,
/// byte for byte, text and binary, from 0 B to exactly 1 MiB (the default
/// max_message_size), plus fragmented messages with a ping between fragments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_text_and_binary_in_order_byte_for_byte() {
    bounded(TEST_LIMIT, async {
        let h = Harness::start(3, echo(), |_| {}).await;
        h.wait_warm().await;
        let ws = connect(&h.ws_url()).await;
        let (mut tx, mut rx) = ws.split();
        let id = {
            let v = within(STEP, "session.started", rx.next())
                .await
                .unwrap()
                .unwrap();
            let v: Value = serde_json::from_str(v.to_text().unwrap()).unwrap();
            assert_eq!(v["type"], "session.started");
            v["session"].as_str().unwrap().to_string()
        };

        let sizes = [0usize, 1, 1024, 64 << 10, 1 << 20];
        let mut expected = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            expected.push(Message::text(text_of(size, i)));
            expected.push(Message::binary(bytes_of(size, i)));
        }
        let whole = expected.len();
        let frag_text = text_of(3000, 99);
        let frag_bin = bytes_of(70_000, 98);
        expected.push(Message::text(frag_text.clone()));
        expected.push(Message::binary(frag_bin.clone()));

        let writer = async {
            for m in &expected[..whole] {
                tx.send(m.clone()).await.expect("send");
            }
            let frame = |data: Bytes, op: Data, fin: bool| {
                Message::Frame(Frame::message(data, OpCode::Data(op), fin))
            };
            let t = Bytes::from(frag_text.clone());
            tx.send(frame(t.slice(..1000), Data::Text, false))
                .await
                .unwrap();
            tx.send(Message::Ping(Bytes::from_static(b"between text fragments")))
                .await
                .unwrap();
            tx.send(frame(t.slice(1000..2000), Data::Continue, false))
                .await
                .unwrap();
            tx.send(frame(t.slice(2000..), Data::Continue, true))
                .await
                .unwrap();
            let b = Bytes::from(frag_bin.clone());
            tx.send(frame(b.slice(..1), Data::Binary, false))
                .await
                .unwrap();
            tx.send(Message::Ping(Bytes::from_static(
                b"between binary fragments",
            )))
            .await
            .unwrap();
            tx.send(frame(b.slice(1..), Data::Continue, true))
                .await
                .unwrap();
        };
        let reader = async {
            let mut got = Vec::new();
            let mut pongs = Vec::new();
            // A pong owed while the proxy is mid-frame toward the client
            // waits for that frame; a newer ping replaces it (RFC 6455
            // §5.5.3, docs/protocol.md): the last ping is always answered.
            let last = Bytes::from_static(b"between binary fragments");
            while got.len() < expected.len() || pongs.last() != Some(&last) {
                match rx.next().await {
                    Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => got.push(m),
                    Some(Ok(Message::Pong(p))) => pongs.push(p),
                    Some(Ok(Message::Ping(_))) => {}
                    other => panic!(
                        "after {} of {} messages: {other:?}",
                        got.len(),
                        expected.len()
                    ),
                }
            }
            (got, pongs)
        };
        let ((), (got, pongs)) = within(Duration::from_secs(15), "relay of every message", async {
            tokio::join!(writer, reader)
        })
        .await;
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert!(
                g == e,
                "message {i}: sent {}, got {}",
                describe(e),
                describe(g)
            );
        }
        let text_ping = Bytes::from_static(b"between text fragments");
        let binary_ping = Bytes::from_static(b"between binary fragments");
        assert!(
            pongs == [text_ping.clone(), binary_ping.clone()] || pongs == [binary_ping],
            "pongs: {pongs:?}"
        );

        let mut ws = tx.reunite(rx).unwrap();
        let results = end_session(&mut ws, &id).await;
        assert!(results.is_empty(), "echo mode has no final: {results:?}");

        let m = h.metrics().await;
        assert_eq!(
            m.get(r#"sttproxy_messages_total{direction="client_to_backend"}"#),
            expected.len() as f64
        );
        // session.started + the echoes + session.ended.
        assert_eq!(
            m.get(r#"sttproxy_messages_total{direction="backend_to_client"}"#),
            expected.len() as f64 + 2.0
        );
        h.stop().await;
    })
    .await;
}

/// One byte over max_message_size closes the client with 1009.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_max_message_size_closes_1009() {
    bounded(TEST_LIMIT, async {
        let h = Harness::start(1, echo(), |_| {}).await;
        h.wait_warm().await;
        let mut ws = connect(&h.ws_url()).await;
        expect_started(&mut ws).await;
        ws.send(Message::binary(vec![7u8; (1 << 20) + 1]))
            .await
            .unwrap();
        assert_eq!(expect_close_code(&mut ws).await, 1009);
        // The backend connection was fenced and went back to the pool.
        eventually(STEP, "the connection back in the pool", || async {
            h.proxy().backends().all()[0].snapshot().idle == 2
        })
        .await;
        assert_eq!(h.total_dials(), 2);
        h.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------- (b) stt

/// stt mode: binary chunks, then session.end; the client gets every partial
/// in order, the final and session.ended, then close 1000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stt_session_gets_partials_final_and_ended_before_close_1000() {
    bounded(TEST_LIMIT, async {
        let h = Harness::start(1, stt(20, 5), |_| {}).await;
        h.wait_warm().await;
        let mut ws = connect(&format!("{}?lang=ko", h.ws_url())).await;
        let id = expect_started(&mut ws).await;
        let chunks = 5u64;
        for i in 0..chunks {
            ws.send(Message::binary(vec![i as u8; 3200])).await.unwrap();
        }
        ws.send(support::session_end()).await.unwrap();
        for seq in 0..chunks {
            let v = recv_json(&mut ws).await;
            assert_eq!(v["type"], "partial", "{v}");
            assert_eq!(v["session"], id.as_str(), "{v}");
            assert_eq!(v["seq"], seq, "{v}");
        }
        let v = recv_json(&mut ws).await;
        assert_eq!(v["type"], "final", "{v}");
        assert_eq!(v["session"], id.as_str());
        assert_eq!(v["text"], "final: 5 chunks, 16000 bytes");
        let v = recv_json(&mut ws).await;
        assert_eq!(
            v,
            serde_json::json!({"type": "session.ended", "session": id})
        );
        assert_eq!(expect_close_code(&mut ws).await, 1000);
        let stats = h.backends[0].stats();
        assert_eq!((stats.sessions_started, stats.sessions_ended), (1, 1));
        assert_eq!(stats.messages_in, chunks);
        h.stop().await;
    })
    .await;
}

/// A GPU-like stt backend (shared slots, partials every 100 ms of audio, finals at pauses, a
/// session time limit) through the proxy: its results reach the client with their offsets,
/// the time-limit notice is an ordinary message, and the session still ends only through
/// the fence — `session.ended`, close 1000, the connection back in the pool for the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_like_stt_backend_time_limit_keeps_the_fence() {
    bounded(TEST_LIMIT, async {
        let mut config = stt(5, 0);
        config.seed = Some(3);
        config.stt = echo_backend::Stt {
            slots: Some(2),
            partial_every: Some(Duration::from_millis(100)),
            utterance: Some((Duration::from_millis(200), Duration::from_millis(400))),
            session_time_limit: Some(Duration::from_millis(800)),
            ..echo_backend::Stt::default()
        };
        let h = Harness::start(1, config, |s| sizes(s, 1, 1)).await;
        h.wait_warm().await;
        let mut ws = connect(&h.ws_url()).await;
        let id = expect_started(&mut ws).await;
        // 1 s of audio in 20 ms chunks, sent at once.
        for _ in 0..50 {
            ws.send(Message::binary(vec![0u8; 640])).await.unwrap();
        }
        let mut got = Vec::new();
        loop {
            let v = recv_json(&mut ws).await;
            assert_eq!(v["session"], id.as_str(), "{v}");
            let done = v["code"] == "session_time_limit";
            got.push(v);
            if done {
                break;
            }
        }
        let partials = got.iter().filter(|v| v["type"] == "partial").count();
        assert_eq!(partials, 10, "{got:?}");
        let finals: Vec<&Value> = got.iter().filter(|v| v["type"] == "final").collect();
        assert!(finals.len() >= 3, "{got:?}");
        assert_eq!(finals.last().unwrap()["audio_end_ms"], 1000);
        assert!(
            got.iter()
                .all(|v| v["queue_ms"].is_u64() || v["type"] == "error")
        );
        // The backend did not end the session on its own: the fence still does.
        let results = end_session(&mut ws, &id).await;
        assert!(results.is_empty(), "{results:?}");
        // The connection went back to the pool and carries the next session.
        let mut ws = connect(&h.ws_url()).await;
        let id = expect_started(&mut ws).await;
        ws.send(Message::binary(vec![0u8; 3200])).await.unwrap();
        let results = end_session(&mut ws, &id).await;
        let kinds: Vec<&Value> = results.iter().map(|v| &v["type"]).collect();
        assert_eq!(kinds, ["partial", "final"], "{results:?}");
        let m = h.metrics().await;
        assert_eq!(m.get(r#"sttproxy_fencing_total{outcome="clean"}"#), 2.0);
        assert_eq!(h.backends[0].stats().dials, 1);
        assert_eq!(h.backends[0].stats().time_limits, 1);
        h.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------- (c) reuse and fencing

/// 200 sequential sessions over pools of exactly 2 connections per backend:
/// no dial after warm-up, no discard, and no message of one session ever
/// reaches another, also when a client vanishes while the stt backend still
/// has results in flight for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_sessions_reuse_connections_and_never_cross() {
    bounded(TEST_LIMIT, async {
        let h = Harness::start(2, stt(20, 5), |s| sizes(s, 2, 2)).await;
        h.wait_warm().await;
        for b in &h.backends {
            assert_eq!(b.stats().dials, 2);
        }
        let url = h.ws_url();
        let mut ids = HashSet::new();
        let (mut graceful, mut abrupt) = (0u64, 0u64);
        for k in 0..200usize {
            let mut ws = connect(&url).await;
            let id = expect_started(&mut ws).await;
            assert!(ids.insert(id.clone()), "session id {id} reused");
            for c in 0..2 {
                ws.send(Message::binary(vec![(k + c) as u8; 640]))
                    .await
                    .unwrap();
            }
            if k % 4 == 3 {
                // Vanish (no close frame) while two partials are in flight.
                drop(ws);
                abrupt += 1;
                continue;
            }
            let results = end_session(&mut ws, &id).await;
            for r in &results {
                assert_eq!(r["session"], id.as_str(), "session {k} ({id}) got {r}");
            }
            let kinds: Vec<_> = results
                .iter()
                .map(|r| (r["type"].as_str().unwrap().to_string(), r["seq"].clone()))
                .collect();
            assert_eq!(
                kinds,
                vec![
                    ("partial".to_string(), Value::from(0)),
                    ("partial".to_string(), Value::from(1)),
                    ("final".to_string(), Value::from(2)),
                ],
                "session {k}"
            );
            graceful += 1;
        }
        // The abrupt sessions' fences complete in the background.
        eventually(STEP, "every fence complete, pools idle", || async {
            let ended: u64 = h.backends.iter().map(|b| b.stats().sessions_ended).sum();
            ended == 200
                && h.proxy()
                    .backends()
                    .all()
                    .iter()
                    .all(|b| b.snapshot().idle == 2)
        })
        .await;
        for b in &h.backends {
            let s = b.stats();
            assert_eq!(s.dials, 2, "a dial after warm-up: {s}");
        }
        let started: u64 = h.backends.iter().map(|b| b.stats().sessions_started).sum();
        assert_eq!(started, 200);

        let pools = h.pools().await;
        assert_eq!(pools.sum("acquired_total"), 200);
        assert_eq!(pools.sum("released_total"), 200);
        assert_eq!(pools.sum("discarded_total"), 0);
        assert_eq!(pools.sum("dial_failures_total"), 0);
        assert_eq!(pools.sum("live"), 4);
        let m = h.metrics().await;
        assert_eq!(m.get(r#"sttproxy_fencing_total{outcome="clean"}"#), 200.0);
        assert_eq!(
            m.get(r#"sttproxy_sessions_total{outcome="ended"}"#),
            graceful as f64
        );
        // How the vanished clients are labelled is checked by
        // `a_vanished_client_is_counted_client_gone`; here only that every
        // session was counted once.
        let counted: f64 = m
            .series
            .iter()
            .filter(|(k, _)| k.starts_with("sttproxy_sessions_total{"))
            .map(|(_, v)| v)
            .sum();
        assert_eq!(counted, 200.0);
        assert_eq!(abrupt, 50);
        assert_eq!(m.get(r#"sttproxy_acquire_total{outcome="idle"}"#), 200.0);
        h.stop().await;
    })
    .await;
}

/// A client that closes, or vanishes without a close frame (TCP FIN), ends
/// its session as `client_gone`: the backend connection is fenced and goes
/// back to the pool. Vanishing is not a protocol fault of the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_client_is_counted_client_gone() {
    bounded(TEST_LIMIT, async {
        let h = Harness::start(1, stt(20, 0), |s| sizes(s, 1, 1)).await;
        h.wait_warm().await;
        // One closes with a close frame, one just goes away; both with a
        // partial in flight.
        for vanish in [false, true] {
            let mut ws = connect(&h.ws_url()).await;
            expect_started(&mut ws).await;
            ws.send(Message::binary(vec![1u8; 640])).await.unwrap();
            if !vanish {
                ws.close(None).await.unwrap();
            }
            drop(ws);
            eventually(
                STEP,
                "the connection fenced and back in the pool",
                || async {
                    h.backends[0].stats().sessions_ended == h.backends[0].stats().sessions_started
                        && h.proxy().backends().all()[0].snapshot().idle == 1
                },
            )
            .await;
        }
        eventually(STEP, "both sessions counted", || async {
            let m = h.metrics().await;
            m.series
                .iter()
                .filter(|(k, _)| k.starts_with("sttproxy_sessions_total{"))
                .map(|(_, v)| v)
                .sum::<f64>()
                == 2.0
        })
        .await;
        let m = h.metrics().await;
        assert_eq!(m.get(r#"sttproxy_fencing_total{outcome="clean"}"#), 2.0);
        assert_eq!(h.total_dials(), 1, "the connection was reused");
        assert_eq!(
            m.count(r#"sttproxy_sessions_total{outcome="client_fault"}"#),
            0.0,
            "a client that went away is not a protocol fault:\n{}",
            m.text
                .lines()
                .filter(|l| l.starts_with("sttproxy_sessions_total"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert_eq!(
            m.get(r#"sttproxy_sessions_total{outcome="client_gone"}"#),
            2.0
        );
        h.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------- (d) backend crash

/// A backend killed mid-session: its clients get 1014 within 1 s, the other
/// backend's clients carry on; the pool refills once the backend accepts
/// again; /pools and /metrics agree with what the test counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_closes_its_clients_1014_and_the_pool_refills() {
    bounded(TEST_LIMIT, async {
        let h = Harness::start(2, echo(), |s| sizes(s, 2, 2)).await;
        h.wait_warm().await;

        // Four sessions fill both pools; note which backend serves which.
        let mut clients = Vec::new();
        for k in 0..4 {
            let before: Vec<u64> = h
                .backends
                .iter()
                .map(|b| b.stats().sessions_started)
                .collect();
            let mut c = RawWs::connect(h.listen, "/v1/stream").await.unwrap();
            let started = json_of(&raw_next(&mut c, "session.started").await);
            assert_eq!(started["type"], "session.started");
            let id = started["session"].as_str().unwrap().to_string();
            let served: Vec<usize> = (0..h.backends.len())
                .filter(|&i| h.backends[i].stats().sessions_started > before[i])
                .collect();
            assert_eq!(served.len(), 1, "session {k} started on {served:?}");
            let msg = format!("hello {k}");
            c.send_text(&msg).await.unwrap();
            assert_eq!(raw_next(&mut c, "echo").await, RawMsg::Text(msg));
            clients.push((c, served[0], id));
        }
        let on = |i: usize| clients.iter().filter(|c| c.1 == i).count();
        assert_eq!((on(0), on(1)), (2, 2), "p2c over pools of max 2");

        // Crash b0; it refuses new connections until told otherwise.
        let victim = &h.backends[0];
        victim.set_refuse(true);
        let killed = Instant::now();
        victim.kill_all();
        let mut survivors = Vec::new();
        for (mut c, backend, id) in clients {
            if backend != 0 {
                survivors.push((c, id));
                continue;
            }
            match raw_next(&mut c, "close after the backend crash").await {
                RawMsg::Close(Some(code), reason) => {
                    assert_eq!(code, 1014, "reason: {reason}");
                    let after = killed.elapsed();
                    assert!(after < Duration::from_secs(1), "1014 only after {after:?}");
                }
                other => panic!("expected close 1014, got {other:?}"),
            }
            assert_eq!(
                within(STEP, "end of stream", c.next_msg()).await.unwrap(),
                None
            );
        }
        // b1's sessions are unaffected and end cleanly.
        for (c, id) in &mut survivors {
            c.send_text("still there").await.unwrap();
            assert_eq!(
                raw_next(c, "echo").await,
                RawMsg::Text("still there".into())
            );
            c.send_text(r#"{"type":"session.end"}"#).await.unwrap();
            let ended = json_of(&raw_next(c, "session.ended").await);
            assert_eq!(ended["type"], "session.ended");
            assert_eq!(ended["session"], id.as_str());
            assert!(matches!(
                raw_next(c, "close").await,
                RawMsg::Close(Some(1000), _)
            ));
        }

        // The reconcile worker tries, fails while refused, succeeds after.
        eventually(STEP, "a refused redial of b0", || async {
            h.pools().await.get("b0", "dial_failures_total") >= 1
        })
        .await;
        victim.set_refuse(false);
        eventually(STEP, "b0 refilled to target and healthy", || async {
            let p = h.pools().await;
            p.get("b0", "live") == 2
                && p.get("b0", "idle") == 2
                && p.backend("b0")["healthy"] == true
        })
        .await;
        eventually(STEP, "all four sessions counted", || async {
            let m = h.metrics().await;
            m.count(r#"sttproxy_sessions_total{outcome="backend_failed"}"#)
                + m.count(r#"sttproxy_sessions_total{outcome="ended"}"#)
                == 4.0
        })
        .await;

        let p = h.pools().await;
        let failures = p.get("b0", "dial_failures_total");
        // b0 accepted: 2 warm-up dials, the refused ones, 2 refill dials.
        assert_eq!(h.backends[0].stats().dials, 4 + failures);
        assert_eq!(h.backends[1].stats().dials, 2);
        for (id, acquired, released, discarded) in [("b0", 2, 0, 2), ("b1", 2, 2, 0)] {
            assert_eq!(p.get(id, "acquired_total"), acquired, "{id}: {}", p.0);
            assert_eq!(p.get(id, "released_total"), released, "{id}: {}", p.0);
            assert_eq!(p.get(id, "discarded_total"), discarded, "{id}: {}", p.0);
            assert_eq!(p.get(id, "live"), 2, "{id}");
            assert_eq!(p.get(id, "leased"), 0, "{id}");
        }
        assert_eq!(p.get("b1", "dial_failures_total"), 0);

        let m = h.metrics().await;
        for id in ["b0", "b1"] {
            for (series, field) in [
                ("sttproxy_pool_acquired_total", "acquired_total"),
                ("sttproxy_pool_released_total", "released_total"),
                ("sttproxy_pool_discarded_total", "discarded_total"),
                ("sttproxy_pool_dial_failures_total", "dial_failures_total"),
                ("sttproxy_pool_live", "live"),
                ("sttproxy_pool_idle", "idle"),
            ] {
                assert_eq!(
                    m.get(&format!(r#"{series}{{backend="{id}"}}"#)),
                    p.get(id, field) as f64,
                    "{series} vs /pools {id}.{field}"
                );
            }
        }
        assert_eq!(
            m.get(r#"sttproxy_sessions_total{outcome="backend_failed"}"#),
            2.0
        );
        assert_eq!(m.get(r#"sttproxy_sessions_total{outcome="ended"}"#), 2.0);
        assert_eq!(m.get(r#"sttproxy_fencing_total{outcome="error"}"#), 2.0);
        assert_eq!(m.get(r#"sttproxy_fencing_total{outcome="clean"}"#), 2.0);
        assert_eq!(m.get(r#"sttproxy_acquire_total{outcome="idle"}"#), 4.0);
        assert_eq!(m.get("sttproxy_sessions_active"), 0.0);
        // 4 greetings + 2 more on b1; back: session.started and the echoes
        // for all, session.ended for b1's two.
        assert_eq!(
            m.get(r#"sttproxy_messages_total{direction="client_to_backend"}"#),
            6.0
        );
        assert_eq!(
            m.get(r#"sttproxy_messages_total{direction="backend_to_client"}"#),
            4.0 + 4.0 + 2.0 * 2.0
        );
        let backend_in: u64 = h.backends.iter().map(|b| b.stats().messages_in).sum();
        assert_eq!(backend_in, 6);
        h.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------- (e) health

/// An idle connection whose backend stops answering pings is discarded within
/// health_interval (+10 % jitter) + health_timeout, and replaced.
/// (tests/tls.rs checks the same over TLS.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_without_pong_is_discarded_and_replaced() {
    bounded(TEST_LIMIT, async {
        let h = Harness::start(1, echo(), |s| {
            sizes(s, 1, 2);
            s.health_interval = Duration::from_millis(300);
            s.health_timeout = Duration::from_millis(200);
        })
        .await;
        h.wait_warm().await;
        support::a_silent_idle_connection_is_discarded_and_replaced(&h).await;
        // The replacement carries a session.
        let mut ws = connect(&h.ws_url()).await;
        let id = expect_started(&mut ws).await;
        end_session(&mut ws, &id).await;
        h.stop().await;
    })
    .await;
}

/// The same with several idle connections: when a backend stops answering
/// pings, every one of its idle connections is discarded within
/// health_interval (+10 %) + health_timeout, not one health_timeout after the
/// other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_silent_idle_connection_is_discarded_within_one_health_round() {
    bounded(TEST_LIMIT, async {
        let h = Harness::start(1, echo(), |s| {
            sizes(s, 4, 8);
            s.health_interval = Duration::from_millis(300);
            s.health_timeout = Duration::from_millis(200);
        })
        .await;
        h.wait_warm().await;
        support::silence_until_discarded(&h, 4, 4).await;
        h.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------- (f) exhaustion

/// Pools exhausted: a new session waits acquire_timeout and gets 1013; one
/// whose wait sees a release within the timeout gets that connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pool_waits_then_1013_or_takes_a_released_connection() {
    bounded(TEST_LIMIT, async {
        let h = Harness::start(1, echo(), |s| {
            sizes(s, 1, 1);
            s.acquire_timeout = Duration::from_millis(500);
        })
        .await;
        h.wait_warm().await;
        let mut holder = connect(&h.ws_url()).await;
        let holder_id = expect_started(&mut holder).await;

        // Nobody releases: 1013 after acquire_timeout.
        let mut waiter = connect(&h.ws_url()).await;
        let waited = Instant::now();
        let frame = support::expect_close(&mut waiter)
            .await
            .expect("a close frame");
        let after = waited.elapsed();
        assert_eq!(u16::from(frame.code), 1013, "{frame:?}");
        assert!(
            after >= Duration::from_millis(450) && after < Duration::from_millis(1500),
            "1013 after {after:?}, acquire_timeout 500ms"
        );

        // The holder ends 150 ms into the next wait: the waiter gets its connection.
        let mut next = connect(&h.ws_url()).await;
        next.send(Message::text("queued while waiting"))
            .await
            .unwrap();
        let release_in = Duration::from_millis(150);
        tokio::time::sleep(release_in).await; // the scenario's timing, not settling
        end_session(&mut holder, &holder_id).await;
        let next_id = expect_started(&mut next).await;
        assert_eq!(
            support::recv_data(&mut next).await,
            Message::text("queued while waiting")
        );
        end_session(&mut next, &next_id).await;

        assert_eq!(h.total_dials(), 1, "no dial beyond max 1");
        eventually(STEP, "all three sessions counted", || async {
            let m = h.metrics().await;
            m.count(r#"sttproxy_sessions_total{outcome="ended"}"#) == 2.0
                && m.count(r#"sttproxy_sessions_total{outcome="no_backend_connection"}"#) == 1.0
        })
        .await;
        let m = h.metrics().await;
        assert_eq!(m.get(r#"sttproxy_acquire_total{outcome="idle"}"#), 1.0);
        assert_eq!(m.get(r#"sttproxy_acquire_total{outcome="timeout"}"#), 1.0);
        assert_eq!(m.get(r#"sttproxy_acquire_total{outcome="waited"}"#), 1.0);
        let p = h.pools().await;
        assert_eq!(p.get("b0", "acquired_total"), 2);
        assert_eq!(p.get("b0", "released_total"), 2);
        h.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------- (g) SIGTERM

/// SIGHUP to the real binary without TLS (a `systemctl reload`): nothing to
/// reload, so it is logged and ignored — an open session streams on, new
/// sessions are served, and SIGTERM still ends the process with status 0.
/// Without a handler, SIGHUP's default action would kill it on the spot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_without_tls_is_ignored() {
    bounded(TEST_LIMIT, async {
        support::init_tracing();
        let backend = echo_backend::spawn("127.0.0.1:0".parse().unwrap(), echo())
            .await
            .unwrap();
        let args: Vec<String> = [
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--target-size",
            "2",
            "--shutdown-grace",
            "1s",
            "--backend",
            &backend.url(),
        ]
        .map(String::from)
        .to_vec();
        let mut proxy = ProxyProcess::spawn(&args).await;
        let url = format!("ws://{}/v1/stream", proxy.listen);
        let mut open = connect(&url).await;
        expect_started(&mut open).await;

        proxy.signal("HUP");
        eventually(STEP, "the SIGHUP logged", || async {
            proxy.stderr_log().contains("SIGHUP ignored")
        })
        .await;
        assert!(
            matches!(proxy.child.try_wait(), Ok(None)),
            "the proxy exited on SIGHUP"
        );
        let msg = Message::text("after the hangup");
        open.send(msg.clone()).await.unwrap();
        assert_eq!(support::recv_data(&mut open).await, msg);
        let mut fresh = connect(&url).await;
        expect_started(&mut fresh).await;
        fresh.send(msg.clone()).await.unwrap();
        assert_eq!(support::recv_data(&mut fresh).await, msg);
        drop((open, fresh));

        proxy.sigterm();
        let status = tokio::task::spawn_blocking(move || proxy.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "exit after SIGTERM: {status}");
        backend.shutdown().await;
    })
    .await;
}

/// With `shutdown_delay`, SIGTERM turns /readyz 503 at once but new clients
/// are still served until the delay is over (a load balancer's time to stop
/// sending them), and only then refused; sessions already open relay on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_delay_serves_new_clients_after_readyz_turned_503() {
    bounded(TEST_LIMIT, async {
        support::init_tracing();
        let backend = echo_backend::spawn("127.0.0.1:0".parse().unwrap(), echo())
            .await
            .unwrap();
        let delay = Duration::from_millis(1500);
        let args: Vec<String> = [
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--shutdown-delay",
            "1500ms",
            "--shutdown-grace",
            "1s",
            "--backend",
            &backend.url(),
        ]
        .map(String::from)
        .to_vec();
        let mut proxy = ProxyProcess::spawn(&args).await;
        let url = format!("ws://{}/v1/stream", proxy.listen);
        eventually(STEP, "readyz 200", || async {
            http_get(proxy.admin, "/readyz").await.status == 200
        })
        .await;
        let mut open = connect(&url).await;
        let open_id = expect_started(&mut open).await;

        proxy.sigterm();
        let signalled = Instant::now();
        eventually(STEP, "readyz 503 after SIGTERM", || async {
            http_get(proxy.admin, "/readyz").await.status == 503
        })
        .await;
        // Still within the delay: a new client is served like any other.
        let mut late = connect(&url).await;
        let late_id = expect_started(&mut late).await;
        assert!(signalled.elapsed() < delay, "the check came too late to mean anything");
        let msg = Message::text("served during the delay");
        late.send(msg.clone()).await.unwrap();
        assert_eq!(support::recv_data(&mut late).await, msg);
        end_session(&mut late, &late_id).await;
        // Then refused: at TCP, or with an HTTP refusal.
        let refused_after = eventually(STEP, "new clients refused", || async {
            support::raw::handshake(proxy.listen, "/v1/stream").await.is_err()
        })
        .await;
        let at = signalled.elapsed();
        assert!(
            at >= delay - Duration::from_millis(100),
            "refused {at:?} after SIGTERM ({refused_after:?} of polling), before the {delay:?} delay"
        );
        // The session open all along still relays and ends cleanly.
        let msg = Message::text("after the delay");
        open.send(msg.clone()).await.unwrap();
        assert_eq!(support::recv_data(&mut open).await, msg);
        end_session(&mut open, &open_id).await;
        let status = support::fleet::exited(&mut proxy, STEP).await;
        assert!(status.success(), "stderr:\n{}", proxy.stderr_log());
        backend.shutdown().await;
    })
    .await;
}

/// The real binary with 50 open sessions gets SIGTERM: /readyz turns 503 at
/// once, new clients are turned away, sessions that end within the grace end
/// with session.ended and 1000, the rest get 1001 when the grace is over, and
/// the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_sessions_and_exits_zero() {
    bounded(TEST_LIMIT, async {
        support::init_tracing();
        let backends = [
            echo_backend::spawn("127.0.0.1:0".parse().unwrap(), echo())
                .await
                .unwrap(),
            echo_backend::spawn("127.0.0.1:0".parse().unwrap(), echo())
                .await
                .unwrap(),
        ];
        let grace = Duration::from_secs(2);
        let mut args: Vec<String> = [
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--target-size",
            "25",
            "--shutdown-grace",
            "2s",
        ]
        .map(String::from)
        .to_vec();
        for b in &backends {
            args.extend(["--backend".to_string(), b.url()]);
        }
        let mut proxy = ProxyProcess::spawn(&args).await;
        let url = format!("ws://{}/v1/stream", proxy.listen);
        eventually(STEP, "readyz 200", || async {
            http_get(proxy.admin, "/readyz").await.status == 200
        })
        .await;

        let mut sessions = Vec::new();
        for k in 0..50 {
            let mut ws = connect(&url).await;
            let id = expect_started(&mut ws).await;
            let msg = Message::text(format!("hello {k}"));
            ws.send(msg.clone()).await.unwrap();
            assert_eq!(support::recv_data(&mut ws).await, msg);
            sessions.push((ws, id));
        }

        proxy.sigterm();
        let signalled = Instant::now();
        let took = eventually(STEP, "readyz 503 after SIGTERM", || async {
            http_get(proxy.admin, "/readyz").await.status == 503
        })
        .await;
        assert!(
            took < Duration::from_secs(1),
            "readyz 503 only after {took:?}"
        );
        // No new sessions: refused at TCP, or an HTTP refusal.
        if let Ok(up) = support::raw::handshake(proxy.listen, "/v1/stream").await {
            panic!("a new session was upgraded during the drain: {}", up.head);
        }

        // Half end within the grace, still relaying until their end.
        let late = sessions.split_off(25);
        for (k, (ws, id)) in sessions.iter_mut().enumerate() {
            let msg = Message::text(format!("during the grace {k}"));
            ws.send(msg.clone()).await.unwrap();
            assert_eq!(support::recv_data(ws).await, msg);
            end_session(ws, id).await;
        }
        assert!(signalled.elapsed() < grace, "the clean half took too long");
        // The other half get 1001 once the grace is over.
        for (mut ws, _) in late {
            assert_eq!(expect_close_code(&mut ws).await, 1001);
            let at = signalled.elapsed();
            assert!(
                at >= grace - Duration::from_millis(100) && at < grace + Duration::from_secs(3),
                "1001 at {at:?} after SIGTERM, grace {grace:?}"
            );
        }
        let status = support::fleet::exited(&mut proxy, STEP).await;
        assert!(
            status.success(),
            "exit status {status}; stderr:\n{}",
            proxy.stderr_log()
        );
        let log = proxy.stderr_log();
        assert!(log.contains("shutting down"), "stderr:\n{log}");
        // Its stderr is a pipe here, as under a service manager: no colour codes.
        assert!(
            !log.contains('\x1b'),
            "ANSI escape codes in a log written to a pipe:\n{log:?}"
        );
        for b in &backends {
            b.shutdown().await;
        }
    })
    .await;
}

// ---------------------------------------------------------------- (h) Python client

/// An independent WebSocket implementation (Python's websockets) runs a whole
/// session through the proxy: echoes, session.end, session.ended, close 1000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websockets_client_runs_a_session() {
    // Creating the venv may download from PyPI the first time: bounded apart.
    let venv = within(
        Duration::from_secs(300),
        "creating the Python venv",
        tokio::task::spawn_blocking(support::clients::python_venv),
    )
    .await
    .expect("venv setup panicked");
    bounded(TEST_LIMIT, async {
        let h = Harness::start(1, echo(), |_| {}).await;
        h.wait_warm().await;
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/client_session.py");
        let url = h.ws_url();
        let out = within(
            Duration::from_secs(20),
            "the Python client",
            tokio::task::spawn_blocking(move || {
                Command::new(venv.join("bin/python"))
                    .arg(script)
                    .arg(url)
                    .output()
                    .expect("running the Python client")
            }),
        )
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "python client failed ({}):\n{stdout}\n{stderr}",
            out.status
        );
        assert!(
            stdout.contains("client_session: ok") && stdout.contains("close=1000"),
            "unexpected output:\n{stdout}\n{stderr}"
        );
        let stats = h.backends[0].stats();
        assert_eq!((stats.sessions_started, stats.sessions_ended), (1, 1));
        assert_eq!(stats.messages_in, 7);
        h.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------- HTTP surface

/// A refused request gets its status and reason at once, and then the proxy
/// closes the connection: it neither waits for another request on it nor
/// keeps its connection slot until handshake_timeout (docs/protocol.md: a
/// refused upgrade is an HTTP status with a short plain-text reason, never a hang).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_is_answered_and_the_connection_closed() {
    bounded(TEST_LIMIT, async {
        let h = Harness::start(1, echo(), |s| {
            s.handshake_timeout = Duration::from_secs(10);
        })
        .await;
        let upgrade_to = |path: &str| {
            format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Version: 13\r\n\r\n",
                h.listen
            )
        };
        let plain_get = format!("GET /v1/stream HTTP/1.1\r\nHost: {}\r\n\r\n", h.listen);
        for (request, status) in [(upgrade_to("/v2/stream"), 404), (plain_get, 426)] {
            let mut r = http_request(h.listen, &request).await;
            assert_eq!(r.status, status, "{}", r.head);
            assert!(
                r.server_closes_within(Duration::from_secs(1)).await,
                "after a {status} the proxy kept the connection open:\n{}",
                r.head
            );
        }
        eventually(STEP, "no client connection left open", || async {
            h.proxy().open_connections() == 0
        })
        .await;
        h.stop().await;
    })
    .await;
}

/// tungstenite's client (what most Rust clients, and our loadgen, use)
/// accepts the proxy's 101. It requires `Connection` to be exactly `Upgrade`,
/// so a 101 that also says `close` fails every such client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tungstenite_clients_accept_the_upgrade_response() {
    bounded(TEST_LIMIT, async {
        let h = Harness::start(1, echo(), |_| {}).await;
        h.wait_warm().await;
        let up = support::raw::handshake(h.listen, "/v1/stream")
            .await
            .expect("upgrade");
        let head = up.head.clone();
        let connection = up.header("connection").map(str::to_string);
        drop(up);
        assert!(
            !connection
                .as_deref()
                .unwrap_or("")
                .to_ascii_lowercase()
                .contains("close"),
            "the 101 tells the client the connection will close: {connection:?}\n{head}"
        );
        let mut ws = match tokio_tungstenite::connect_async(h.ws_url()).await {
            Ok((ws, _)) => ws,
            Err(e) => panic!("tungstenite's client refused the proxy's 101 ({e}):\n{head}"),
        };
        let id = expect_started(&mut ws).await;
        ws.send(Message::text("via tungstenite")).await.unwrap();
        assert_eq!(
            support::recv_data(&mut ws).await,
            Message::text("via tungstenite")
        );
        end_session(&mut ws, &id).await;
        h.stop().await;
    })
    .await;
}

/// Wrong path 404, no upgrade 426, admin endpoints answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_refusals_and_admin_endpoints() {
    bounded(TEST_LIMIT, async {
        let h = Harness::start(1, echo(), |_| {}).await;
        h.wait_warm().await;

        let r = http_get(h.listen, "/wrong").await;
        assert_eq!(r.status, 404, "{r:?}");
        let r = http_get(h.listen, "/v1/stream").await;
        assert_eq!(r.status, 426, "{r:?}");
        assert_eq!(r.header("upgrade"), Some("websocket"), "{r:?}");
        // A WebSocket upgrade on the wrong path is a 404 too.
        let r = http_request(
            h.listen,
            &format!(
                "GET /v2/stream HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                h.listen
            ),
        )
        .await;
        assert_eq!(r.status, 404, "{r:?}");
        // Hang up: whether the proxy closes after a refusal is the business of
        // `a_refused_request_is_answered_and_the_connection_closed`.
        drop(r);

        let r = http_get(h.admin, "/healthz").await;
        assert_eq!(r.status, 200, "{r:?}");
        let r = http_get(h.admin, "/readyz").await;
        assert_eq!(r.status, 200, "{r:?}");
        let r = http_get(h.admin, "/nope").await;
        assert_eq!(r.status, 404, "{r:?}");

        let p = h.pools().await;
        let b = p.backend("b0");
        for key in [
            "id",
            "url",
            "healthy",
            "target",
            "max",
            "live",
            "idle",
            "leased",
            "dialing",
            "acquired_total",
            "released_total",
            "discarded_total",
            "dial_failures_total",
        ] {
            assert!(b.get(key).is_some(), "/pools lacks {key}: {b}");
        }
        assert_eq!(b["url"], h.backends[0].url());
        assert_eq!((p.get("b0", "target"), p.get("b0", "live")), (2, 2));

        let m = h.metrics().await;
        assert_eq!(m.get(r#"sttproxy_refused_total{outcome="not_found"}"#), 2.0);
        assert_eq!(
            m.get(r#"sttproxy_refused_total{outcome="not_websocket"}"#),
            1.0
        );
        assert_eq!(m.get(r#"sttproxy_backend_healthy{backend="b0"}"#), 1.0);
        h.stop().await;
    })
    .await;
}
