//! Per-session rate limits (docs/configuration.md, "Rate limits"): a client
//! sending past its message or byte rate is closed with 1008 and counted,
//! while a client within the same limits on the same proxy streams on, and
//! the flooding session's backend connection is fenced and kept.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use sttproxy::Settings;
use tokio_tungstenite::tungstenite::Message;

use support::echo;
use support::{
    Harness, TEST_LIMIT, Ws, bounded, connect, end_session, eventually, expect_started, metrics,
    within,
};

/// A warm proxy with rate limits (a 1 s burst, a short tick: the limits are
/// charged on it, plus what `limits` sets) and two sessions started on it:
/// the one that keeps within them (with its id) and the one that will not.
async fn two_clients(limits: impl FnOnce(&mut Settings)) -> (Harness, Ws, String, Ws) {
    let h = Harness::start(1, echo(), |s| {
        s.rate_limit_burst = Duration::from_secs(1);
        s.client_ping_interval = Duration::from_millis(800);
        limits(s);
    })
    .await;
    h.wait_warm().await;
    let url = h.ws_url();
    let mut good = connect(&url).await;
    let good_id = expect_started(&mut good).await;
    let mut bad = connect(&url).await;
    expect_started(&mut bad).await;
    (h, good, good_id, bad)
}

/// Sessions closed for their rate so far: (by messages, by bytes).
async fn rate_limited(h: &Harness) -> (f64, f64) {
    let m = metrics(h.admin).await;
    (
        m.count(r#"sttproxy_rate_limited_total{limit="messages"}"#),
        m.count(r#"sttproxy_rate_limited_total{limit="bytes"}"#),
    )
}

/// Send `n` messages of `size` bytes, one every `every`, reading the echo of
/// each: a well-behaved client that keeps pace with its own rate.
async fn stream_paced(ws: &mut Ws, n: usize, size: usize, every: Duration) {
    let mut tick = tokio::time::interval(every);
    for i in 0..n {
        tick.tick().await;
        ws.send(Message::binary(vec![i as u8; size])).await.unwrap();
        match support::recv_data(ws).await {
            Message::Binary(b) => assert_eq!(b.len(), size, "echo of message {i}"),
            other => panic!("expected the echo of message {i}, got {other:?}"),
        }
    }
}

/// Send `size`-byte messages as fast as the proxy takes them until it
/// closes the session; the close code and reason it gave.
async fn flood_until_closed(ws: &mut Ws, size: usize) -> (u16, String) {
    within(
        Duration::from_secs(20),
        "the flooding client cut off",
        async {
            let (mut tx, mut rx) = ws.split();
            let payload = vec![7u8; size];
            let send = async {
                // The proxy stops reading once it closes; a failed send ends this.
                while tx.send(Message::binary(payload.clone())).await.is_ok() {}
                std::future::pending::<()>().await;
            };
            let recv = async {
                while let Some(msg) = rx.next().await {
                    if let Ok(Message::Close(Some(f))) = msg {
                        return (u16::from(f.code), f.reason.to_string());
                    }
                }
                panic!("the connection ended without a close frame");
            };
            tokio::select! {
                () = send => unreachable!(),
                closed = recv => closed,
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_its_message_rate_gets_1008_and_one_within_it_streams_on() {
    bounded(TEST_LIMIT, async {
        let (h, mut good, good_id, mut flood) = two_clients(|s| {
            s.max_client_messages_per_second = 50;
        })
        .await;

        // The well-behaved client streams at 25 messages/s (half its limit)
        // while the other floods.
        let good_run = stream_paced(&mut good, 75, 64, Duration::from_millis(40));
        let (closed, ()) = tokio::join!(flood_until_closed(&mut flood, 16), good_run);
        assert_eq!(closed, (1008, "rate limit exceeded".to_string()));

        // The good session is still open and ends cleanly.
        stream_paced(&mut good, 5, 64, Duration::from_millis(40)).await;
        end_session(&mut good, &good_id).await;

        assert_eq!(rate_limited(&h).await, (1.0, 0.0));
        eventually(Duration::from_secs(5), "both sessions counted", || async {
            let m = metrics(h.admin).await;
            m.count(r#"sttproxy_sessions_total{outcome="rate_limited"}"#) == 1.0
                && m.count(r#"sttproxy_fencing_total{outcome="clean"}"#) == 2.0
        })
        .await;
        // The flooding session's connection went back to the pool (fenced):
        // no connection was discarded.
        assert_eq!(h.pools().await.sum("discarded_total"), 0);
        // The runtime's task count is exported (the soak reads its slope).
        assert!(metrics(h.admin).await.get("sttproxy_runtime_tasks") >= 1.0);
        h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_its_byte_rate_gets_1008() {
    bounded(TEST_LIMIT, async {
        let (h, mut good, good_id, mut heavy) = two_clients(|s| {
            s.max_client_messages_per_second = 1_000;
            s.max_client_bytes_per_second = 20_000;
        })
        .await;

        // 4 KiB every 100 ms (40 KB/s, twice the limit) against 1 KiB every
        // 100 ms (10 KB/s, half of it); few messages, far below 1,000/s.
        let heavy_run = async {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                if heavy.send(Message::binary(vec![1u8; 4096])).await.is_err() {
                    break;
                }
                let closed = tokio::time::timeout(Duration::from_millis(1), async {
                    loop {
                        match heavy.next().await {
                            Some(Ok(Message::Close(Some(f)))) => {
                                return Some((u16::from(f.code), f.reason.to_string()));
                            }
                            Some(Ok(_)) => {}
                            _ => return None,
                        }
                    }
                })
                .await;
                if let Ok(closed) = closed {
                    return closed;
                }
            }
            None
        };
        let (closed, ()) = tokio::join!(
            within(
                Duration::from_secs(20),
                "the heavy client cut off",
                heavy_run
            ),
            stream_paced(&mut good, 40, 1024, Duration::from_millis(100)),
        );
        assert_eq!(closed, Some((1008, "rate limit exceeded".to_string())));
        end_session(&mut good, &good_id).await;
        assert_eq!(rate_limited(&h).await, (0.0, 1.0));
        h.stop().await;
    })
    .await;
}
