//! The upgrade request's bad inputs, each with its exact answer
//! (docs/protocol.md, "Handshake"), over real sockets, while a well-behaved
//! session on the same proxy carries on untouched.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use support::echo;
use support::raw::{Answer, send_request};
use support::{
    Harness, TEST_LIMIT, bounded, connect, end_session, expect_started, metrics, recv_data,
};

/// An upgrade request for `/v1/stream` + `query` with `extra` header lines.
fn upgrade(addr: SocketAddr, query: &str, extra: &str, version: &str, key: &str) -> String {
    format!(
        "GET /v1/stream{query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n\
         Sec-WebSocket-Version: {version}\r\n{extra}\r\n"
    )
}

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Every row of the bad-input table about the request's size and the
/// WebSocket headers gets its status; the session open meanwhile still
/// relays after each; each refusal is counted by reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_upgrade_request_gets_its_status_and_a_live_session_is_unaffected() {
    bounded(TEST_LIMIT, async {
        let h = Harness::start(1, echo(), |_| {}).await;
        h.wait_warm().await;
        let addr = h.listen;
        let mut ws = connect(&h.ws_url()).await;
        let id = expect_started(&mut ws).await;

        let big_value = |n: usize| format!("X-Big: {}\r\n", "a".repeat(n));
        let many: String = (0..70).map(|i| format!("X-H{i}: v\r\n")).collect();
        let rows: Vec<(&str, String, u16, &str)> = vec![
            (
                "a 100 KiB header (past the 16 KiB head)",
                upgrade(addr, "", &big_value(100 << 10), "13", KEY),
                431,
                "header_too_large",
            ),
            (
                "a 10 KiB header (past the 8 KiB per header, within the head)",
                upgrade(addr, "", &big_value(10 << 10), "13", KEY),
                431,
                "header_too_large",
            ),
            (
                "70 headers (past 64)",
                upgrade(addr, "", &many, "13", KEY),
                431,
                "header_too_large",
            ),
            (
                "a 5 KiB query (past the 4 KiB target)",
                upgrade(addr, &format!("?q={}", "x".repeat(5 << 10)), "", "13", KEY),
                414,
                "uri_too_long",
            ),
            (
                // The request line alone fills the head: the server stops
                // reading before the target ends, so this is the head's 431.
                "a 100 KiB query (its request line past the 16 KiB head)",
                upgrade(
                    addr,
                    &format!("?q={}", "x".repeat(100 << 10)),
                    "",
                    "13",
                    KEY,
                ),
                431,
                "header_too_large",
            ),
            (
                "Sec-WebSocket-Version: 8",
                upgrade(addr, "", "", "8", KEY),
                426,
                "bad_version",
            ),
            (
                "a Sec-WebSocket-Key of 12 bytes",
                upgrade(addr, "", "", "13", "AAAAAAAAAAAAAAAA"),
                400,
                "bad_request",
            ),
            (
                "a Sec-WebSocket-Key that is not base64",
                upgrade(addr, "", "", "13", "not base64 at all!!!!!!!"),
                400,
                "bad_request",
            ),
        ];
        for (i, (what, request, status, label)) in rows.iter().enumerate() {
            let before = metrics(h.admin)
                .await
                .count(&format!("sttproxy_refused_total{{outcome=\"{label}\"}}"));
            let Answer {
                status: got, head, ..
            } = send_request(addr, request).await;
            assert_eq!(got, *status, "{what}: {head}");
            if *status == 426 {
                assert!(
                    head.to_ascii_lowercase()
                        .contains("sec-websocket-version: 13"),
                    "{what}: a 426 names the version spoken: {head}"
                );
            }
            let after = metrics(h.admin)
                .await
                .count(&format!("sttproxy_refused_total{{outcome=\"{label}\"}}"));
            assert_eq!(after, before + 1.0, "{what}: refusals counted as {label}");
            let text = format!("still here after row {i}");
            ws.send(Message::text(text.clone())).await.unwrap();
            assert_eq!(recv_data(&mut ws).await, Message::text(text), "{what}");
        }
        // Within every limit: upgraded.
        let ok = upgrade(
            addr,
            &format!("?q={}", "x".repeat(3 << 10)),
            &big_value(7 << 10),
            "13",
            KEY,
        );
        let Answer {
            status: got, head, ..
        } = send_request(addr, &ok).await;
        assert_eq!(got, 101, "a request within every limit: {head}");
        end_session(&mut ws, &id).await;
        h.stop().await;
    })
    .await;
}

/// With an Origin allowlist, origins compare as origins (case, default port
/// and trailing slash do not matter), other origins get 403, and a request
/// without Origin passes unless `allow_missing_origin = false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_compare_as_origins_and_a_missing_origin_follows_the_setting() {
    bounded(TEST_LIMIT, async {
        for allow_missing in [true, false] {
            let h = Harness::start(1, echo(), |s| {
                s.allowed_origins = vec!["https://app.example".into()];
                s.allow_missing_origin = allow_missing;
            })
            .await;
            h.wait_warm().await;
            let addr = h.listen;
            let with =
                |origin: &str| upgrade(addr, "", &format!("Origin: {origin}\r\n"), "13", KEY);
            for (request, status) in [
                (with("HTTPS://App.Example/"), 101),
                (with("https://app.example:443"), 101),
                (with("https://evil.example"), 403),
                (with("http://app.example"), 403),
                (
                    upgrade(addr, "", "", "13", KEY),
                    if allow_missing { 101 } else { 403 },
                ),
            ] {
                let Answer {
                    status: got, head, ..
                } = send_request(addr, &request).await;
                assert_eq!(
                    got, status,
                    "allow_missing_origin = {allow_missing}: {request}\n{head}"
                );
            }
            h.stop().await;
        }
    })
    .await;
}
