//! Backend groups and sticky routing over real sockets (docs/pool.md,
//! "Groups and sticky routing"): three echo backends, sessions keyed by a
//! request header. Which backend served a session is read off the echo
//! backends' `sessions_started` counters (sessions run one at a time), and
//! compared with what weighted rendezvous hashing predicts for the key.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use futures_util::SinkExt;
use sttproxy::config::db::Db;
use sttproxy::config::{Settings, StickySettings};

use sttproxy::route::{StickyKey, rendezvous};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use support::db::sqlite_url;
use support::raw::{RawMsg, RawWs};
use support::{
    Harness, STEP, TEST_LIMIT, Ws, bounded, echo, end_session, eventually, expect_started,
    recv_data, temp_dir, within,
};

const KEY_HEADER: &str = "x-user-id";

fn keyed_by_header(s: &mut Settings) {
    s.sticky = Some(StickySettings {
        header: Some(KEY_HEADER.into()),
        ..StickySettings::default()
    });
    // Health is judged quickly, so a dead backend leaves the rotation in time.
    s.health_interval = Duration::from_millis(100);
    s.reconcile_interval = Duration::from_millis(100);
}

/// The backend id that rendezvous hashing gives `key` among
/// `ids`, all of weight 1.
fn predicted(key: &str, ids: &[&str]) -> String {
    rendezvous(ids, StickyKey::of(key.as_bytes()), |id| *id, |_| 1)
        .unwrap()
        .to_string()
}

/// Open a session with `key` in the key header (if any) and `query` on the
/// stream path.
async fn connect_keyed(h: &Harness, key: Option<&str>, query: &str) -> Ws {
    let mut request = format!("{}{query}", h.ws_url())
        .into_client_request()
        .unwrap();
    if let Some(k) = key {
        request.headers_mut().insert(KEY_HEADER, k.parse().unwrap());
    }
    let (ws, _) = within(
        STEP,
        "connecting",
        tokio_tungstenite::connect_async(request),
    )
    .await
    .unwrap();
    ws
}

/// Run one whole session (with `key` in the key header, if any, and `query`
/// on the stream path): started, one echo, ended cleanly. Returns the id
/// (`b0`, `b1`, …) of the backend that served it.
async fn session(h: &Harness, key: Option<&str>, query: &str) -> String {
    let before: Vec<u64> = h
        .backends
        .iter()
        .map(|b| b.stats().sessions_started)
        .collect();
    let mut ws = connect_keyed(h, key, query).await;
    let id = expect_started(&mut ws).await;
    let served: Vec<usize> = (0..h.backends.len())
        .filter(|&i| h.backends[i].stats().sessions_started > before[i])
        .collect();
    assert_eq!(served.len(), 1, "key {key:?}: started on {served:?}");
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(recv_data(&mut ws).await, Message::text("hello"));
    end_session(&mut ws, &id).await;
    format!("b{}", served[0])
}

async fn sticky_count(h: &Harness, outcome: &str) -> f64 {
    h.metrics().await.count(&format!(
        "sttproxy_sticky_routes_total{{outcome=\"{outcome}\"}}"
    ))
}

/// Same key → same backend, the one rendezvous hashing predicts; keys spread
/// over all three; sessions without a key are routed as usual. The key's
/// backend down → its sessions fall back to the others and work, and come
/// back when it recovers. The key's backend disabled → its keys (and only
/// those) move to the backend rendezvous hashing gives among the two left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_stick_to_their_keys_backend_and_fall_back_when_it_is_gone() {
    bounded(TEST_LIMIT * 2, async {
        let dir = temp_dir("sticky");
        let url = sqlite_url(dir.path(), "sticky.db");
        let h = Harness::start(3, echo(), |s| {
            keyed_by_header(s);
            s.db = Some(url.clone());
            s.sync_interval = Duration::from_millis(100);
        })
        .await;
        h.wait_warm().await;
        let all = ["b0", "b1", "b2"];
        let keys: Vec<String> = (0..12).map(|i| format!("user-{i}")).collect();

        let mut home = Vec::new();
        for key in &keys {
            let first = session(&h, Some(key), "").await;
            assert_eq!(first, predicted(key, &all), "key {key}");
            for _ in 0..2 {
                assert_eq!(session(&h, Some(key), "").await, first, "key {key}");
            }
            home.push(first);
        }
        let mut used = home.clone();
        used.sort();
        used.dedup();
        assert_eq!(used, all, "12 keys over 3 backends: {home:?}");
        assert_eq!(sticky_count(&h, "hit").await, 36.0);

        // No key: routed by power-of-two-choices, and counted.
        for _ in 0..3 {
            session(&h, None, "").await;
        }
        assert_eq!(sticky_count(&h, "no_key").await, 3.0);

        // The first key's backend goes down (refuses connections, its
        // connections die) and is judged unhealthy.
        let key = keys[0].as_str();
        let victim_id = home[0].clone();
        let victim = &h.backends[all.iter().position(|b| *b == victim_id).unwrap()];
        victim.set_refuse(true);
        victim.kill_all();
        eventually(STEP * 2, format_args!("{victim_id} unhealthy"), || async {
            h.pools().await.backend(&victim_id)["healthy"] == false
        })
        .await;
        let before = victim.stats().sessions_started;
        for _ in 0..3 {
            let served = session(&h, Some(key), "").await;
            assert_ne!(served, victim_id, "key {key} fell back");
        }
        assert_eq!(victim.stats().sessions_started, before);
        assert_eq!(sticky_count(&h, "unhealthy").await, 3.0);

        // Back up: the key comes home.
        victim.set_refuse(false);
        eventually(
            STEP * 2,
            format_args!("{victim_id} healthy and warm"),
            || async {
                let p = h.pools().await;
                p.backend(&victim_id)["healthy"] == true && p.get(&victim_id, "idle") == 2
            },
        )
        .await;
        assert_eq!(session(&h, Some(key), "").await, victim_id);

        // Disabled: it leaves the routed set; its keys move to the backend
        // rendezvous hashing gives among the other two, the others stay.
        let db = Db::open(&url).await.unwrap();
        db.set_enabled(&victim_id, false).await.unwrap();
        db.close().await;
        let backends = h.proxy().backends().clone();
        eventually(
            STEP,
            format_args!("{victim_id} out of the routed set"),
            || {
                let n = backends.all().len();
                async move { n == 2 }
            },
        )
        .await;
        let left: Vec<&str> = all.iter().copied().filter(|b| *b != victim_id).collect();
        let hits = sticky_count(&h, "hit").await;
        for (key, was) in keys.iter().zip(&home) {
            let now = session(&h, Some(key), "").await;
            if *was == victim_id {
                assert_eq!(now, predicted(key, &left), "key {key} moved");
            } else {
                assert_eq!(&now, was, "key {key} stayed");
            }
        }
        assert_eq!(sticky_count(&h, "hit").await, hits + keys.len() as f64);
        h.stop().await;
    })
    .await;
}

/// `group_parameter`: sessions go to the group they name, `default` when they
/// name none; a group without a backend gets 1013. The sticky key applies
/// only in the sticky groups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_routed_within_the_group_they_name() {
    bounded(TEST_LIMIT, async {
        let h = Harness::start(3, echo(), |s| {
            keyed_by_header(s);
            s.group_parameter = Some("group".into());
            s.backends[2].group = Some("diarize".into());
        })
        .await;
        h.wait_warm().await;
        for i in 0..6 {
            let key = format!("user-{i}");
            let served = session(&h, Some(&key), "").await;
            assert_eq!(served, predicted(&key, &["b0", "b1"]), "key {key}");
            assert_eq!(session(&h, Some(&key), "?group=diarize").await, "b2");
            let keyless = session(&h, None, "?group=default&lang=en").await;
            assert_ne!(keyless, "b2", "a keyless default-group session");
        }
        // Only the default group is sticky: diarize sessions are not counted.
        assert_eq!(sticky_count(&h, "hit").await, 6.0);
        assert_eq!(sticky_count(&h, "no_key").await, 6.0);
        let mut c = RawWs::connect(h.listen, "/v1/stream?group=nope")
            .await
            .unwrap();
        match within(STEP, "close", c.next_msg()).await.unwrap() {
            Some(RawMsg::Close(Some(code), reason)) => {
                assert_eq!(code, 1013, "{reason}");
            }
            other => panic!("expected close 1013, got {other:?}"),
        }
        h.stop().await;
    })
    .await;
}

/// The key's backend healthy but with no connection free (its one connection
/// held by a session of the same key): the next session of that key waits
/// `sticky.wait` for it, then falls back to another backend, counted `busy`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_backend_is_waited_for_then_fallen_back_from() {
    bounded(TEST_LIMIT, async {
        let wait = Duration::from_millis(300);
        let h = Harness::start(3, echo(), |s| {
            keyed_by_header(s);
            if let Some(sticky) = &mut s.sticky {
                sticky.wait = wait;
            }
            for b in &mut s.backends {
                b.target_size = Some(1);
                b.max_size = Some(1);
            }
        })
        .await;
        h.wait_warm().await;
        let key = "user-1";
        let home = predicted(key, &["b0", "b1", "b2"]);
        let mut holder = connect_keyed(&h, Some(key), "").await;
        let holder_id = expect_started(&mut holder).await;
        assert_eq!(h.pools().await.get(&home, "leased"), 1);

        let started = tokio::time::Instant::now();
        let served = session(&h, Some(key), "").await;
        assert_ne!(served, home);
        assert!(
            started.elapsed() >= wait,
            "fell back after {:?}",
            started.elapsed()
        );
        assert_eq!(sticky_count(&h, "busy").await, 1.0);

        end_session(&mut holder, &holder_id).await;
        eventually(
            STEP,
            format_args!("{home}'s connection back in its pool"),
            || async { h.pools().await.get(&home, "idle") == 1 },
        )
        .await;
        assert_eq!(session(&h, Some(key), "").await, home);
        assert_eq!(sticky_count(&h, "hit").await, 2.0);
        h.stop().await;
    })
    .await;
}
