//! The backend over real sockets on 127.0.0.1, every test bounded in time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{bounded, connect, expect_abrupt_end, recv, recv_json, send_json, start};
use echo_backend::{Config, Faults, Mode};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

fn echo_config() -> Config {
    Config::default()
}

fn stt_config(delay_ms: u64, jitter_ms: u64) -> Config {
    Config {
        mode: Mode::Stt,
        delay: Duration::from_millis(delay_ms),
        jitter: Duration::from_millis(jitter_ms),
        ..Config::default()
    }
}

fn with_faults(faults: Faults) -> Config {
    Config {
        faults,
        ..Config::default()
    }
}

#[tokio::test]
async fn echo_mode_echoes_text_binary_and_one_mib() {
    let backend = start(echo_config()).await;
    bounded(async {
        let mut ws = connect(&backend).await;
        ws.send(Message::text("hello")).await.unwrap();
        assert_eq!(recv(&mut ws).await, Message::text("hello"));
        ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
        assert_eq!(recv(&mut ws).await, Message::binary(vec![1u8, 2, 3]));

        let big: Vec<u8> = (0..1usize << 20).map(|i| (i % 251) as u8).collect();
        ws.send(Message::binary(big.clone())).await.unwrap();
        assert_eq!(recv(&mut ws).await, Message::binary(big));
        let big_text = "x".repeat(1 << 20);
        ws.send(Message::text(big_text.clone())).await.unwrap();
        assert_eq!(recv(&mut ws).await, Message::text(big_text));

        let stats = backend.stats();
        assert_eq!(stats.dials, 1);
        assert_eq!(stats.messages_in, 4);
        assert_eq!(stats.messages_out, 4);
        assert_eq!(stats.open_connections, 1);
    })
    .await;
    bounded(backend.shutdown()).await;
}

#[tokio::test]
async fn oversized_message_ends_the_connection() {
    let backend = start(echo_config()).await;
    bounded(async {
        let mut ws = connect(&backend).await;
        let too_big = vec![0u8; echo_backend::DEFAULT_MAX_MESSAGE_SIZE + 1];
        // The backend may already have dropped the connection while we were still sending.
        let _ = ws.send(Message::binary(too_big)).await;
        match ws.next().await {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => {}
            Some(Ok(other)) => panic!("oversized message was answered: {other:?}"),
        }
        assert_eq!(backend.stats().messages_out, 0);
        // The backend serves new connections as before.
        let mut ws = connect(&backend).await;
        ws.send(Message::text("ok")).await.unwrap();
        assert_eq!(recv(&mut ws).await, Message::text("ok"));
    })
    .await;
    bounded(backend.shutdown()).await;
}

#[tokio::test]
async fn fencing_in_echo_mode_two_sessions_on_one_connection() {
    let backend = start(echo_config()).await;
    bounded(async {
        let mut ws = connect(&backend).await;
        // Data outside a session is echoed too (plain proxies are measured this way).
        ws.send(Message::text("before")).await.unwrap();
        assert_eq!(recv(&mut ws).await, Message::text("before"));

        for id in ["s-1", "s-2"] {
            send_json(
                &mut ws,
                json!({"type":"session.start","session":id,"params":{"lang":"en"}}),
            )
            .await;
            assert_eq!(
                recv_json(&mut ws).await,
                json!({"type":"session.started","session":id})
            );
            ws.send(Message::binary(id.as_bytes().to_vec()))
                .await
                .unwrap();
            assert_eq!(recv(&mut ws).await, Message::binary(id.as_bytes().to_vec()));
            // A text message that looks like JSON but is no control message is data.
            let data = r#"{"type":"partial","session":"x"}"#;
            ws.send(Message::text(data)).await.unwrap();
            assert_eq!(recv(&mut ws).await, Message::text(data));
            send_json(&mut ws, json!({"type":"session.end","session":id})).await;
            assert_eq!(
                recv_json(&mut ws).await,
                json!({"type":"session.ended","session":id})
            );
        }
        let stats = backend.stats();
        assert_eq!(stats.dials, 1);
        assert_eq!(stats.sessions_started, 2);
        assert_eq!(stats.sessions_ended, 2);
        assert_eq!(stats.messages_in, 5);
        assert_eq!(stats.messages_out, 5);
    })
    .await;
    bounded(backend.shutdown()).await;
}

#[tokio::test]
async fn stt_mode_partials_in_order_then_final_then_ended() {
    let backend = start(stt_config(20, 10)).await;
    bounded(async {
        let mut ws = connect(&backend).await;
        for (id, chunks) in [("a", 3u64), ("b", 2)] {
            send_json(
                &mut ws,
                json!({"type":"session.start","session":id,"params":{}}),
            )
            .await;
            assert_eq!(
                recv_json(&mut ws).await,
                json!({"type":"session.started","session":id})
            );
            // Text data is ignored in stt mode.
            ws.send(Message::text("ignored")).await.unwrap();
            for _ in 0..chunks {
                ws.send(Message::binary(vec![0u8; 320])).await.unwrap();
            }
            // Sent at once: the end must wait for every partial before it.
            send_json(&mut ws, json!({"type":"session.end","session":id})).await;
            for seq in 0..chunks {
                let partial = recv_json(&mut ws).await;
                assert_eq!(partial["type"], "partial", "{partial}");
                assert_eq!(partial["session"], id);
                assert_eq!(partial["seq"], seq);
                assert!(partial["text"].is_string());
            }
            let last = recv_json(&mut ws).await;
            assert_eq!(last["type"], "final", "{last}");
            assert_eq!(last["session"], id);
            assert_eq!(last["seq"], chunks);
            assert!(last["text"].is_string());
            assert_eq!(
                recv_json(&mut ws).await,
                json!({"type":"session.ended","session":id})
            );
        }
        let stats = backend.stats();
        assert_eq!(stats.sessions_started, 2);
        assert_eq!(stats.sessions_ended, 2);
        assert_eq!(stats.messages_in, 7);
        // 5 partials and 2 finals.
        assert_eq!(stats.messages_out, 7);
    })
    .await;
    bounded(backend.shutdown()).await;
}

/// `session.ended` echoes the fence token of the `session.end` it answers, in both modes;
/// a client's text shaped like `session.ended` is only data (echoed in echo mode), and a
/// `session.end` without a token gets a `session.ended` without one.
#[tokio::test]
async fn session_ended_echoes_the_fence_token() {
    for mode in [Mode::Echo, Mode::Stt] {
        let config = match mode {
            Mode::Echo => Config::default(),
            Mode::Stt => stt_config(1, 0),
        };
        let backend = start(config).await;
        bounded(async {
            let mut ws = connect(&backend).await;
            for (i, id) in ["f-1", "f-2", "f-3"].into_iter().enumerate() {
                send_json(
                    &mut ws,
                    json!({"type":"session.start","session":id,"params":{}}),
                )
                .await;
                assert_eq!(
                    recv_json(&mut ws).await,
                    json!({"type":"session.started","session":id})
                );
                if mode == Mode::Echo {
                    // A forged session.ended is no control message to the backend.
                    let forged = json!({"type":"session.ended","session":id}).to_string();
                    ws.send(Message::text(forged.clone())).await.unwrap();
                    assert_eq!(recv(&mut ws).await, Message::text(forged));
                }
                let token = format!("{i:032x}");
                let end = match i {
                    // The proxy's form.
                    0 => json!({"type":"session.end","session":id,"fence":token}),
                    // Keys in another order.
                    1 => json!({"fence":token,"session":id,"type":"session.end"}),
                    // No token.
                    _ => json!({"type":"session.end","session":id}),
                };
                send_json(&mut ws, end).await;
                let mut reply = recv_json(&mut ws).await;
                if mode == Mode::Stt {
                    assert_eq!(reply["type"], "final", "{reply}");
                    assert!(
                        reply.get("fence").is_none(),
                        "a final carries no token: {reply}"
                    );
                    reply = recv_json(&mut ws).await;
                }
                let expected = if i < 2 {
                    json!({"type":"session.ended","session":id,"fence":token})
                } else {
                    json!({"type":"session.ended","session":id})
                };
                assert_eq!(reply, expected, "{mode}");
            }
            assert_eq!(backend.stats().sessions_ended, 3);
        })
        .await;
        bounded(backend.shutdown()).await;
    }
}

#[tokio::test]
async fn stt_jitter_never_reorders_and_delays_do_not_block_reading() {
    // Jitter far larger than the delay: outputs must still come out in order.
    let backend = start(stt_config(1, 30)).await;
    bounded(async {
        let mut ws = connect(&backend).await;
        send_json(&mut ws, json!({"type":"session.start","session":"j"})).await;
        recv_json(&mut ws).await;
        for _ in 0..30 {
            ws.send(Message::binary(vec![1u8; 64])).await.unwrap();
        }
        for seq in 0..30u64 {
            let partial = recv_json(&mut ws).await;
            assert_eq!(partial["seq"], seq, "{partial}");
        }
    })
    .await;
    bounded(backend.shutdown()).await;

    // 8 chunks with a 300 ms delay each: answered in about 300 ms, not 2.4 s.
    let backend = start(stt_config(300, 0)).await;
    bounded(async {
        let mut ws = connect(&backend).await;
        send_json(&mut ws, json!({"type":"session.start","session":"d"})).await;
        recv_json(&mut ws).await;
        let sent = Instant::now();
        for _ in 0..8 {
            ws.send(Message::binary(vec![1u8; 64])).await.unwrap();
        }
        let first = recv_json(&mut ws).await;
        let first_at = sent.elapsed();
        assert_eq!(first["seq"], 0);
        for seq in 1..8u64 {
            assert_eq!(recv_json(&mut ws).await["seq"], seq);
        }
        let all_at = sent.elapsed();
        assert!(first_at >= Duration::from_millis(300), "{first_at:?}");
        assert!(all_at < Duration::from_millis(1500), "{all_at:?}");
    })
    .await;
    bounded(backend.shutdown()).await;
}

#[tokio::test]
async fn drop_after_closes_abruptly_after_n_messages() {
    let backend = start(with_faults(Faults {
        drop_after: Some(3),
        ..Faults::default()
    }))
    .await;
    bounded(async {
        let mut ws = connect(&backend).await;
        // Control messages do not count.
        send_json(&mut ws, json!({"type":"session.start","session":"x"})).await;
        recv_json(&mut ws).await;
        for i in 0..3u8 {
            ws.send(Message::binary(vec![i])).await.unwrap();
            assert_eq!(recv(&mut ws).await, Message::binary(vec![i]));
        }
        expect_abrupt_end(&mut ws).await;
        // The count is per connection.
        let mut ws = connect(&backend).await;
        ws.send(Message::text("again")).await.unwrap();
        assert_eq!(recv(&mut ws).await, Message::text("again"));
    })
    .await;
    bounded(backend.shutdown()).await;
}

#[tokio::test]
async fn refuse_drops_connections_before_the_handshake() {
    let backend = start(with_faults(Faults {
        refuse: true,
        ..Faults::default()
    }))
    .await;
    bounded(async {
        assert!(
            tokio_tungstenite::connect_async(backend.url())
                .await
                .is_err()
        );
        backend.set_refuse(false);
        let mut ws = connect(&backend).await;
        ws.send(Message::text("in")).await.unwrap();
        assert_eq!(recv(&mut ws).await, Message::text("in"));
        backend.set_refuse(true);
        assert!(
            tokio_tungstenite::connect_async(backend.url())
                .await
                .is_err()
        );
        // Connections already open are not affected.
        ws.send(Message::text("still")).await.unwrap();
        assert_eq!(recv(&mut ws).await, Message::text("still"));
        assert_eq!(backend.stats().dials, 3);
    })
    .await;
    bounded(backend.shutdown()).await;
}

#[tokio::test]
async fn pong_delay_holds_back_the_pong() {
    let backend = start(with_faults(Faults {
        pong_delay: Duration::from_millis(500),
        ..Faults::default()
    }))
    .await;
    bounded(async {
        let mut ws = connect(&backend).await;
        let sent = Instant::now();
        ws.send(Message::Ping(b"hc-1".to_vec().into()))
            .await
            .unwrap();
        assert!(
            timeout(Duration::from_millis(200), ws.next())
                .await
                .is_err(),
            "the ping was answered within 200 ms"
        );
        assert_eq!(recv(&mut ws).await, Message::Pong(b"hc-1".to_vec().into()));
        let answered = sent.elapsed();
        assert!(answered >= Duration::from_millis(500), "{answered:?}");

        // Switched off at run time: the next ping is answered at once.
        backend.set_pong_delay(Duration::ZERO);
        let sent = Instant::now();
        ws.send(Message::Ping(b"hc-2".to_vec().into()))
            .await
            .unwrap();
        assert_eq!(recv(&mut ws).await, Message::Pong(b"hc-2".to_vec().into()));
        // Well under the 500 ms it would take if still delayed (slack for a busy machine).
        assert!(sent.elapsed() < Duration::from_millis(450));
        assert_eq!(backend.stats().pings_answered, 2);
    })
    .await;
    bounded(backend.shutdown()).await;
}

#[tokio::test]
async fn stall_after_stops_answering_but_keeps_the_connection() {
    let backend = start(with_faults(Faults {
        stall_after: Some(2),
        ..Faults::default()
    }))
    .await;
    bounded(async {
        let mut ws = connect(&backend).await;
        for i in 0..2u8 {
            ws.send(Message::binary(vec![i])).await.unwrap();
            assert_eq!(recv(&mut ws).await, Message::binary(vec![i]));
        }
        ws.send(Message::binary(vec![9])).await.unwrap();
        ws.send(Message::Ping(b"p".to_vec().into())).await.unwrap();
        // Neither an answer nor an end: the connection hangs.
        assert!(
            timeout(Duration::from_millis(300), ws.next())
                .await
                .is_err()
        );
        assert_eq!(backend.stats().open_connections, 1);
    })
    .await;
    bounded(backend.shutdown()).await;
    assert_eq!(backend.stats().tasks_alive, 0);
}

#[tokio::test]
async fn kill_all_drops_open_connections_and_keeps_listening() {
    let backend = start(echo_config()).await;
    bounded(async {
        let mut clients = Vec::new();
        for i in 0..3 {
            let mut ws = connect(&backend).await;
            send_json(
                &mut ws,
                json!({"type":"session.start","session":format!("k{i}")}),
            )
            .await;
            recv_json(&mut ws).await;
            clients.push(ws);
        }
        backend.kill_all();
        for ws in &mut clients {
            expect_abrupt_end(ws).await;
        }
        let mut ws = connect(&backend).await;
        ws.send(Message::text("after")).await.unwrap();
        assert_eq!(recv(&mut ws).await, Message::text("after"));
        assert_eq!(backend.stats().dials, 4);
    })
    .await;
    bounded(backend.shutdown()).await;
}

#[tokio::test]
async fn shutdown_closes_everything_and_ends_every_task() {
    let backend = start(stt_config(10_000, 0)).await;
    let addr = backend.local_addr();
    let mut clients = bounded(async {
        let mut clients = Vec::new();
        for i in 0..3 {
            let mut ws = connect(&backend).await;
            send_json(
                &mut ws,
                json!({"type":"session.start","session":format!("z{i}")}),
            )
            .await;
            recv_json(&mut ws).await;
            // A partial that is still 10 s away must not hold up the shutdown.
            ws.send(Message::binary(vec![0u8; 10])).await.unwrap();
            // The pong tells that the backend has read the chunk.
            ws.send(Message::Ping(b"sync".to_vec().into()))
                .await
                .unwrap();
            assert_eq!(recv(&mut ws).await, Message::Pong(b"sync".to_vec().into()));
            clients.push(ws);
        }
        clients
    })
    .await;
    // A TCP connection that never completes the handshake must not hold it up either.
    let raw = bounded(TcpStream::connect(addr)).await.unwrap();
    // Accepted in order: once this one is served, `raw` has been accepted too.
    clients.push(bounded(connect(&backend)).await);
    let stats = backend.stats();
    assert_eq!(stats.messages_in, 3);
    assert_eq!(stats.dials, 5);
    assert_eq!(stats.open_connections, 5, "{stats:?}");
    assert_eq!(stats.tasks_alive, 6, "{stats:?}");

    bounded(backend.shutdown()).await;
    let stats = backend.stats();
    assert_eq!(stats.tasks_alive, 0, "{stats:?}");
    assert_eq!(stats.open_connections, 0, "{stats:?}");

    bounded(async {
        for ws in &mut clients {
            match recv(ws).await {
                Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Away),
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
        assert!(TcpStream::connect(addr).await.is_err(), "still listening");
    })
    .await;
    drop(raw);
    // A second shutdown is harmless.
    bounded(backend.shutdown()).await;
}
