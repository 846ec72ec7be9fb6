//! A connection's memory before the upgrade is bounded by the head limit,
//! whatever a client sends (docs/protocol.md, "Handshake"). Alone in its test
//! binary: it reads this process's RSS, which other tests would disturb.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use echo_backend::{Config, Mode};
use futures_util::SinkExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use support::{
    Harness, TEST_LIMIT, bounded, connect, end_session, eventually, expect_started, recv_data,
};

/// Resident memory of this process, KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// Bytes received by sockets bound to `port` on 127.0.0.1 that their owner
/// has not read yet (the `rx_queue` of /proc/net/tcp).
fn unread_at(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let queues = fields.get(4)?;
            (fields.get(1) == Some(&local.as_str())).then_some(*queues)
        })
        .filter_map(|queues| u64::from_str_radix(queues.split_once(':')?.1, 16).ok())
        .sum()
}

/// 100 clients each send 390 KiB of a header that never ends. The proxy
/// reads at most its head limit of each (then answers 431 and closes), so
/// once it has dealt with every byte it was sent its memory has grown by
/// less than 10 MB. (Without the limit hyper buffered ≈400 KiB of each:
/// ≈40 MB here, ≈4 GB at the default 10,000-connection cap.) A session open
/// meanwhile carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_huge_headers_cost_the_proxy_less_than_10_mb() {
    bounded(TEST_LIMIT, async {
        let h = Harness::start(
            1,
            Config {
                mode: Mode::Echo,
                ..Config::default()
            },
            |s| s.handshake_timeout = Duration::from_secs(30),
        )
        .await;
        h.wait_warm().await;
        let mut ws = connect(&h.ws_url()).await;
        let id = expect_started(&mut ws).await;
        let before = rss_kib();

        let addr: SocketAddr = h.listen;
        let head = format!(
            "GET /v1/stream HTTP/1.1\r\nHost: {addr}\r\nX-Slow: {}",
            "a".repeat(390 << 10)
        );
        let mut clients = Vec::new();
        for _ in 0..100 {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            // The proxy may answer and close before all is written: a failed
            // write is that answer arriving, not an error of the test.
            let _ = stream.write_all(head.as_bytes()).await;
            clients.push(stream);
        }
        eventually(
            Duration::from_secs(20),
            "the proxy dealt with every byte sent to it",
            || async { unread_at(addr.port()) == 0 },
        )
        .await;
        let grown_mb = rss_kib().saturating_sub(before) as f64 / 1024.0;
        assert!(
            grown_mb < 10.0,
            "100 unfinished 390 KiB headers grew the proxy by {grown_mb:.1} MB"
        );

        ws.send(Message::text("still here")).await.unwrap();
        assert_eq!(recv_data(&mut ws).await, Message::text("still here"));
        drop(clients);
        end_session(&mut ws, &id).await;
        h.stop().await;
    })
    .await;
}
