//! Client liveness and idleness (docs/protocol.md, "During a session"): the
//! proxy pings a client it hears nothing from and gives up on one that does
//! not answer — a dead NAT or a pulled cable sends no FIN — while a client
//! that only pings, streaming nothing, is idle. Raw-frame clients over real
//! sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use tokio::time::Instant;

use support::echo;
use support::raw::{RawMsg, RawWs};
use support::{Harness, TEST_LIMIT, bounded, eventually, metrics, within};

async fn started(ws: &mut RawWs) {
    match ws.next_data().await.unwrap() {
        Some(RawMsg::Text(t)) if t.contains("session.started") => {}
        other => panic!("expected session.started, got {other:?}"),
    }
}

/// A client that neither reads nor writes after its upgrade is pinged after
/// `client_ping_interval`, given up on `client_pong_timeout` later (counted
/// `ping_timeout`, session outcome `client_timeout`) and its backend
/// connection fenced and kept; a client that answers pings stays, however
/// long it says nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_behind_a_dead_link_is_detected_within_the_ping_deadline() {
    bounded(TEST_LIMIT, async {
        let interval = Duration::from_millis(300);
        let timeout = Duration::from_millis(300);
        let h = Harness::start(1, echo(), |s| {
            s.client_ping_interval = interval;
            s.client_pong_timeout = timeout;
            s.idle_timeout = Duration::from_secs(30);
        })
        .await;
        h.wait_warm().await;
        let mut live = RawWs::connect(h.listen, "/v1/stream").await.unwrap();
        started(&mut live).await;
        let mut dead = RawWs::connect(h.listen, "/v1/stream").await.unwrap();
        let since = Instant::now();

        let mut pings = 0;
        let detected = eventually(
            Duration::from_secs(10),
            "the silent client given up on",
            || async {
                metrics(h.admin)
                    .await
                    .count("sttproxy_client_closes_total{outcome=\"ping_timeout\"}")
                    == 1.0
            },
        );
        // The live client reads meanwhile, answering every ping.
        let answering = async {
            loop {
                match live.next_msg().await.unwrap() {
                    Some(RawMsg::Ping(_)) => pings += 1,
                    other => panic!("the live client got {other:?}"),
                }
            }
        };
        tokio::select! {
            _ = detected => {}
            () = answering => {}
        }
        let took = since.elapsed();
        // Ping after `interval`, give up `timeout` later; the session's timer
        // ticks every quarter of the shortest timeout; a second of slack.
        let bound = interval + timeout + Duration::from_secs(1);
        assert!(
            took < bound,
            "a dead link detected after {took:?} (bound {bound:?})"
        );
        assert!(
            took >= interval + timeout,
            "given up on after {took:?}, before its ping deadline"
        );
        assert!(pings >= 1, "the live client was never pinged");

        // The silent client's session ended as a timeout, its backend
        // connection fenced (session.ended came back) rather than dropped.
        let m = metrics(h.admin).await;
        assert_eq!(
            m.count("sttproxy_sessions_total{outcome=\"client_timeout\"}"),
            1.0
        );
        eventually(support::STEP, "the backend ended the session", || async {
            h.backends[0].stats().sessions_ended >= 1
        })
        .await;
        // The proxy shut the silent client's socket: it reads the Ping, then
        // the end of the stream.
        within(support::STEP, "the silent client's socket shut", async {
            while let Ok(Some(_)) = dead.read_frame().await {}
        })
        .await;

        // The live one is still served.
        live.send_text("still here").await.unwrap();
        assert_eq!(
            live.next_data().await.unwrap(),
            Some(RawMsg::Text("still here".into()))
        );
        h.stop().await;
    })
    .await;
}

/// Idleness counts data messages: a client that pings but streams nothing
/// is closed with 1001 after `idle_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_only_pings_is_closed_idle() {
    bounded(TEST_LIMIT, async {
        let idle = Duration::from_millis(500);
        let h = Harness::start(1, echo(), |s| s.idle_timeout = idle).await;
        h.wait_warm().await;
        let mut ws = RawWs::connect(h.listen, "/v1/stream").await.unwrap();
        started(&mut ws).await;
        let since = Instant::now();
        let mut every = tokio::time::interval(Duration::from_millis(100));
        let close = loop {
            tokio::select! {
                _ = every.tick() => ws.send_frame(true, 0x9, b"still here?").await.unwrap(),
                msg = ws.next_msg() => match msg.unwrap() {
                    Some(RawMsg::Pong(_)) => {}
                    other => break other,
                },
            }
            assert!(
                since.elapsed() < idle + Duration::from_secs(3),
                "a client that only pings was never closed idle"
            );
        };
        assert!(
            matches!(close, Some(RawMsg::Close(Some(1001), _))),
            "expected close 1001, got {close:?}"
        );
        h.stop().await;
    })
    .await;
}
