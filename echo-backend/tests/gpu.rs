//! The stt mode's GPU-like behaviour, the handshake admission and the test faults, over real
//! sockets on 127.0.0.1, every test bounded in time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Ws, bounded, connect, recv, recv_json, send_json, start};
use echo_backend::{Admission, Config, Faults, Mode, Stt};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message};

const MS: fn(u64) -> Duration = Duration::from_millis;
/// 20 ms of 16 kHz, 16-bit mono PCM at the default 32 bytes per ms.
const CHUNK_20MS: usize = 640;

fn stt(delay_ms: u64, stt: Stt) -> Config {
    Config {
        mode: Mode::Stt,
        delay: MS(delay_ms),
        jitter: Duration::ZERO,
        stt,
        seed: Some(11),
        ..Config::default()
    }
}

async fn open_session(ws: &mut Ws, id: &str) {
    send_json(ws, json!({"type":"session.start","session":id,"params":{}})).await;
    assert_eq!(
        recv_json(ws).await,
        json!({"type":"session.started","session":id})
    );
}

async fn send_audio(ws: &mut Ws, chunks: usize, len: usize) {
    for _ in 0..chunks {
        ws.feed(Message::binary(vec![0u8; len])).await.unwrap();
    }
    ws.flush().await.unwrap();
}

/// Every message up to and including `session.ended`.
async fn until_ended(ws: &mut Ws) -> Vec<Value> {
    let mut got = Vec::new();
    loop {
        let v = recv_json(ws).await;
        let done = v["type"] == "session.ended";
        got.push(v);
        if done {
            return got;
        }
    }
}

/// Nothing but the pong is pending on `ws` (the backend has read everything sent before).
async fn expect_only_pong(ws: &mut Ws) {
    ws.send(Message::Ping(b"sync".to_vec().into()))
        .await
        .unwrap();
    match recv(ws).await {
        Message::Pong(p) => assert_eq!(&p[..], b"sync"),
        other => panic!("expected only the pong, got {other:?}"),
    }
}

fn of_type<'a>(msgs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    msgs.iter().filter(|m| m["type"] == kind).collect()
}

#[tokio::test]
async fn queue_ms_grows_when_more_sessions_than_slots_stream() {
    // 2 slots, 50 ms per inference, 6 sessions of one chunk each: 3 rounds.
    let backend = start(stt(
        50,
        Stt {
            slots: Some(2),
            ..Stt::default()
        },
    ))
    .await;
    bounded(async {
        let mut clients = Vec::new();
        for i in 0..6 {
            let mut ws = connect(&backend).await;
            open_session(&mut ws, &format!("q{i}")).await;
            clients.push(ws);
        }
        let sent = Instant::now();
        for ws in &mut clients {
            send_audio(ws, 1, CHUNK_20MS).await;
        }
        let mut queued = Vec::new();
        for ws in &mut clients {
            let p = recv_json(ws).await;
            assert_eq!(p["type"], "partial", "{p}");
            queued.push(p["queue_ms"].as_u64().unwrap());
        }
        let all_at = sent.elapsed();
        queued.sort_unstable();
        // Two start at once, two wait about one inference, two about two (less the few ms
        // between the chunks' arrivals).
        assert_eq!(queued[..2], [0, 0], "{queued:?}");
        assert!(queued[2..].iter().all(|&q| q >= 1), "{queued:?}");
        assert!((1..=50).contains(&queued[2]), "{queued:?}");
        assert!((50..=100).contains(&queued[5]), "{queued:?}");
        assert!(all_at >= MS(140), "{all_at:?}");
        assert!(backend.stats().open_connections == 6);
    })
    .await;
    bounded(backend.shutdown()).await;

    // The same load with unlimited slots: nothing waits.
    let backend = start(stt(50, Stt::default())).await;
    bounded(async {
        let mut clients = Vec::new();
        for i in 0..6 {
            let mut ws = connect(&backend).await;
            open_session(&mut ws, &format!("u{i}")).await;
            send_audio(&mut ws, 1, CHUNK_20MS).await;
            clients.push(ws);
        }
        for ws in &mut clients {
            assert_eq!(recv_json(ws).await["queue_ms"], 0);
        }
    })
    .await;
    bounded(backend.shutdown()).await;
}

#[tokio::test]
async fn partials_follow_audio_time_and_the_final_precedes_session_ended() {
    let backend = start(stt(
        2,
        Stt {
            partial_every: Some(MS(100)),
            ..Stt::default()
        },
    ))
    .await;
    bounded(async {
        let mut ws = connect(&backend).await;
        open_session(&mut ws, "p").await;
        // 25 × 20 ms = 500 ms, then one message of 250 ms (crossing 600 and 700).
        send_audio(&mut ws, 25, CHUNK_20MS).await;
        send_audio(&mut ws, 1, 250 * 32).await;
        send_json(
            &mut ws,
            json!({"type":"session.end","session":"p","fence":"f00"}),
        )
        .await;
        let msgs = until_ended(&mut ws).await;
        let partials = of_type(&msgs, "partial");
        let ends: Vec<u64> = partials
            .iter()
            .map(|p| p["audio_end_ms"].as_u64().unwrap())
            .collect();
        assert_eq!(ends, [100, 200, 300, 400, 500, 750], "{msgs:?}");
        for (seq, p) in partials.iter().enumerate() {
            assert_eq!(p["seq"], seq as u64);
            assert_eq!(p["session"], "p");
            assert_eq!(p["audio_start_ms"], 0);
            assert_eq!(p["utterance"], 0);
        }
        let n = msgs.len();
        let last = &msgs[n - 2];
        assert_eq!(last["type"], "final", "{msgs:?}");
        assert_eq!(last["audio_start_ms"], 0);
        assert_eq!(last["audio_end_ms"], 750);
        assert_eq!(last["seq"], 6);
        assert_eq!(last["text"], "final: 26 chunks, 24000 bytes");
        assert_eq!(
            msgs[n - 1],
            json!({"type":"session.ended","session":"p","fence":"f00"})
        );
        expect_only_pong(&mut ws).await;
    })
    .await;
    bounded(backend.shutdown()).await;
}

#[tokio::test]
async fn finals_at_seeded_pauses_tile_the_audio() {
    let config = stt(
        1,
        Stt {
            partial_every: Some(MS(100)),
            utterance: Some((MS(200), MS(400))),
            ..Stt::default()
        },
    );
    let backend = start(config).await;
    bounded(async {
        let mut ws = connect(&backend).await;
        open_session(&mut ws, "u").await;
        // 2 s of audio.
        send_audio(&mut ws, 100, CHUNK_20MS).await;
        send_json(
            &mut ws,
            json!({"type":"session.end","session":"u","fence":"t"}),
        )
        .await;
        let msgs = until_ended(&mut ws).await;
        let finals = of_type(&msgs, "final");
        assert!(finals.len() >= 5, "{msgs:?}");
        let mut at = 0;
        for (i, f) in finals.iter().enumerate() {
            assert_eq!(f["utterance"], i as u64, "{f}");
            assert_eq!(f["audio_start_ms"], at, "{f}");
            let end = f["audio_end_ms"].as_u64().unwrap();
            if i + 1 < finals.len() {
                assert!((200..=400).contains(&(end - at)), "{f}");
            }
            at = end;
        }
        assert_eq!(at, 2000);
        // The closing final comes right before session.ended.
        assert_eq!(msgs[msgs.len() - 2]["type"], "final");
        assert_eq!(msgs[msgs.len() - 1]["fence"], "t");
        // A partial after a pause starts at the pause.
        let partials = of_type(&msgs, "partial");
        assert_eq!(partials.len(), 20);
        assert!(
            partials
                .iter()
                .any(|p| p["audio_start_ms"].as_u64() > Some(0))
        );
        for p in &partials {
            assert!(p["queue_ms"].is_u64());
        }
    })
    .await;
    bounded(backend.shutdown()).await;
}

#[tokio::test]
async fn inference_errors_at_probability_one_and_the_session_continues() {
    let backend = start(stt(
        1,
        Stt {
            error_probability: 1.0,
            ..Stt::default()
        },
    ))
    .await;
    bounded(async {
        let mut ws = connect(&backend).await;
        for id in ["e1", "e2"] {
            open_session(&mut ws, id).await;
            send_audio(&mut ws, 3, CHUNK_20MS).await;
            send_json(
                &mut ws,
                json!({"type":"session.end","session":id,"fence":id}),
            )
            .await;
            let msgs = until_ended(&mut ws).await;
            assert_eq!(msgs.len(), 5, "{msgs:?}");
            for (i, e) in msgs[..4].iter().enumerate() {
                assert_eq!(e["type"], "error", "{e}");
                assert_eq!(e["code"], "inference_failed");
                assert_eq!(e["session"], id);
                assert!(e["message"].is_string());
                assert!(e["queue_ms"].is_u64());
                // Three partials' worth, then the closing final's.
                assert_eq!(e["audio_end_ms"], 20 * (i as u64 + 1).min(3));
            }
            assert_eq!(
                msgs[4],
                json!({"type":"session.ended","session":id,"fence":id})
            );
        }
        let stats = backend.stats();
        assert_eq!(stats.inference_errors, 8);
        assert_eq!(stats.sessions_ended, 2);
    })
    .await;
    bounded(backend.shutdown()).await;
}

#[tokio::test]
async fn session_time_limit_finalizes_and_waits_for_session_end() {
    let backend = start(stt(
        1,
        Stt {
            session_time_limit: Some(MS(300)),
            ..Stt::default()
        },
    ))
    .await;
    bounded(async {
        let mut ws = connect(&backend).await;
        let started = Instant::now();
        open_session(&mut ws, "t").await;
        send_audio(&mut ws, 5, CHUNK_20MS).await;
        for seq in 0..5u64 {
            assert_eq!(recv_json(&mut ws).await["seq"], seq);
        }
        let last = recv_json(&mut ws).await;
        assert_eq!(last["type"], "final", "{last}");
        assert_eq!(last["audio_end_ms"], 100);
        let notice = recv_json(&mut ws).await;
        let at = started.elapsed();
        assert_eq!(notice["type"], "error", "{notice}");
        assert_eq!(notice["code"], "session_time_limit");
        assert_eq!(notice["session"], "t");
        assert_eq!(notice["audio_end_ms"], 100);
        assert!(notice.get("fence").is_none());
        assert!(at >= MS(300), "{at:?}");
        // No session.ended on its own; later audio yields nothing.
        send_audio(&mut ws, 3, CHUNK_20MS).await;
        expect_only_pong(&mut ws).await;
        send_json(
            &mut ws,
            json!({"type":"session.end","session":"t","fence":"ft"}),
        )
        .await;
        assert_eq!(
            recv_json(&mut ws).await,
            json!({"type":"session.ended","session":"t","fence":"ft"})
        );
        // The next session on the connection has its own limit.
        open_session(&mut ws, "t2").await;
        send_audio(&mut ws, 1, CHUNK_20MS).await;
        assert_eq!(recv_json(&mut ws).await["type"], "partial");
        send_json(&mut ws, json!({"type":"session.end","session":"t2"})).await;
        let msgs = until_ended(&mut ws).await;
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert_eq!(backend.stats().time_limits, 1);
    })
    .await;
    bounded(backend.shutdown()).await;
}

/// Sends a WebSocket upgrade request on a raw TCP connection; returns the status line.
async fn raw_upgrade_status(addr: std::net::SocketAddr) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!(
            "GET /v1/stream HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response);
    text.lines().next().unwrap_or_default().to_owned()
}

fn refused_status(result: Result<impl std::fmt::Debug, tungstenite::Error>) -> u16 {
    match result {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn handshake_gets_503_while_max_connections_are_open() {
    let backend = start(Config {
        admission: Admission {
            max_connections: Some(2),
            ..Admission::default()
        },
        ..Config::default()
    })
    .await;
    bounded(async {
        let mut a = connect(&backend).await;
        let _b = connect(&backend).await;
        assert_eq!(
            raw_upgrade_status(backend.local_addr()).await,
            "HTTP/1.1 503 Service Unavailable"
        );
        let refused = tokio_tungstenite::connect_async(backend.url()).await;
        assert_eq!(refused_status(refused), 503);
        // The admitted connections work as before.
        a.send(Message::text("still here")).await.unwrap();
        assert_eq!(recv(&mut a).await, Message::text("still here"));
        assert_eq!(backend.stats().rejected_503, 2);
        // Once one leaves, a new one gets in (the backend notices the close soon).
        a.close(None).await.unwrap();
        drop(a);
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match tokio_tungstenite::connect_async(backend.url()).await {
                Ok(_) => break,
                Err(e) => {
                    assert_eq!(refused_status(Err::<(), _>(e)), 503);
                    assert!(Instant::now() < deadline, "no room after a close");
                    tokio::time::sleep(MS(10)).await;
                }
            }
        }
    })
    .await;
    bounded(backend.shutdown()).await;
}

#[tokio::test]
async fn handshake_gets_429_while_the_inference_queue_is_long() {
    let mut config = stt(
        400,
        Stt {
            slots: Some(1),
            ..Stt::default()
        },
    );
    config.admission.max_queue = Some(MS(200));
    let backend = start(config).await;
    bounded(async {
        let mut ws = connect(&backend).await;
        open_session(&mut ws, "busy").await;
        // Three inferences of 400 ms on one slot: the queue is about 1.2 s long.
        send_audio(&mut ws, 3, CHUNK_20MS).await;
        expect_only_pong(&mut ws).await;
        assert_eq!(
            raw_upgrade_status(backend.local_addr()).await,
            "HTTP/1.1 429 Too Many Requests"
        );
        assert_eq!(backend.stats().rejected_429, 1);
        // When the queue has drained, connections are admitted again.
        for seq in 0..3u64 {
            let p = recv_json(&mut ws).await;
            assert_eq!(p["seq"], seq);
            assert!(p["queue_ms"].as_u64().unwrap() >= 390 * seq, "{p}");
        }
        let _ok = connect(&backend).await;
    })
    .await;
    bounded(backend.shutdown()).await;
}

#[tokio::test]
async fn dial_delay_slows_every_handshake() {
    let backend = start(Config {
        admission: Admission {
            dial_delay: MS(300),
            ..Admission::default()
        },
        ..Config::default()
    })
    .await;
    bounded(async {
        for _ in 0..2 {
            let started = Instant::now();
            let mut ws = connect(&backend).await;
            let took = started.elapsed();
            assert!(took >= MS(300), "{took:?}");
            assert!(took < MS(2000), "{took:?}");
            // Only the dial is slow.
            let sent = Instant::now();
            ws.send(Message::text("x")).await.unwrap();
            assert_eq!(recv(&mut ws).await, Message::text("x"));
            assert!(sent.elapsed() < MS(200));
        }
    })
    .await;
    bounded(backend.shutdown()).await;
}

#[tokio::test]
async fn drop_every_leaves_every_nth_message_unanswered() {
    let backend = start(Config {
        faults: Faults {
            drop_every: Some(3),
            ..Faults::default()
        },
        ..Config::default()
    })
    .await;
    bounded(async {
        let mut ws = connect(&backend).await;
        for i in 1..=7 {
            ws.send(Message::text(i.to_string())).await.unwrap();
        }
        for want in [1, 2, 4, 5, 7] {
            assert_eq!(recv(&mut ws).await, Message::text(want.to_string()));
        }
        expect_only_pong(&mut ws).await;
        assert_eq!(backend.stats().dropped_messages, 2);
    })
    .await;
    bounded(backend.shutdown()).await;
}

#[tokio::test]
async fn swap_answers_with_the_previous_message_of_any_connection() {
    let backend = start(Config {
        faults: Faults {
            swap: true,
            ..Faults::default()
        },
        ..Config::default()
    })
    .await;
    bounded(async {
        let mut a = connect(&backend).await;
        let mut b = connect(&backend).await;
        a.send(Message::text("a1")).await.unwrap();
        expect_only_pong(&mut a).await;
        b.send(Message::text("b1")).await.unwrap();
        assert_eq!(recv(&mut b).await, Message::text("a1"));
        a.send(Message::text("a2")).await.unwrap();
        assert_eq!(recv(&mut a).await, Message::text("b1"));
    })
    .await;
    bounded(backend.shutdown()).await;
}

#[tokio::test]
async fn stall_all_for_freezes_every_connection_for_a_while() {
    let backend = start(Config::default()).await;
    bounded(async {
        let mut ws = connect(&backend).await;
        ws.send(Message::text("before")).await.unwrap();
        assert_eq!(recv(&mut ws).await, Message::text("before"));
        backend.stall_all_for(MS(300));
        let sent = Instant::now();
        ws.send(Message::text("during")).await.unwrap();
        assert_eq!(recv(&mut ws).await, Message::text("during"));
        let took = sent.elapsed();
        assert!(took >= MS(250), "{took:?}");
        // And then it answers at once again.
        let sent = Instant::now();
        ws.send(Message::text("after")).await.unwrap();
        assert_eq!(recv(&mut ws).await, Message::text("after"));
        assert!(sent.elapsed() < MS(200));
    })
    .await;
    bounded(backend.shutdown()).await;
}

#[tokio::test]
async fn invalid_settings_are_refused() {
    for stt_settings in [
        Stt {
            slots: Some(0),
            ..Stt::default()
        },
        Stt {
            error_probability: 1.5,
            ..Stt::default()
        },
        Stt {
            utterance: Some((MS(500), MS(100))),
            ..Stt::default()
        },
        Stt {
            bytes_per_ms: 0,
            ..Stt::default()
        },
    ] {
        let config = stt(1, stt_settings);
        let err = echo_backend::spawn("127.0.0.1:0".parse().unwrap(), config)
            .await
            .unwrap_err();
        assert!(matches!(err, echo_backend::Error::Config(_)), "{err}");
    }
}
