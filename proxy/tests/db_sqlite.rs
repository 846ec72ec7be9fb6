//! The backend table on SQLite (a temporary file), applied live to a proxy in
//! this process: resizing under load, new and removed rows, seeding.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use sttproxy::Proxy;
use sttproxy::config::BackendEntry;
use sttproxy::config::db::{BackendPatch, Db};
use support::db::*;
use support::{HttpResponse, bounded, eventually, http_get, init_tracing, temp_dir};
use tokio::time::Instant;

/// Resize a backend 4 → 16 → 2 while 100 sessions stream: no session dropped,
/// no message lost, the pool converges to each target (seen through /pools),
/// `live` never exceeds `max` in any sample, and the pool is resized in place
/// (never replaced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_under_load_converges_and_loses_nothing() {
    init_tracing();
    bounded(Duration::from_secs(90), async {
        let dir = temp_dir("resize");
        let url = sqlite_url(dir.path(), "backends.db");
        let db = Db::open(&url).await.unwrap();
        let backend = start_echo().await;
        db.add(&spec("gpu", &backend.url(), 4, 128)).await.unwrap();

        let proxy = Proxy::start(&settings(&url, Duration::from_millis(200)))
            .await
            .unwrap();
        let admin = proxy.admin_addr();
        let original = proxy.backends().all()[0].clone();

        // A sampler reads every pool's counters every millisecond.
        let violations = Arc::new(AtomicUsize::new(0));
        let samples = Arc::new(AtomicUsize::new(0));
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = {
            let backends = proxy.backends().clone();
            let (violations, samples, sampling) =
                (violations.clone(), samples.clone(), sampling.clone());
            tokio::spawn(async move {
                while sampling.load(Ordering::Relaxed) {
                    for b in backends.all().iter() {
                        let s = b.snapshot();
                        if s.live > s.max {
                            violations.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    samples.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };
        // Every phase below is sampled at least once: a phase ends only
        // after the sampler has taken a sample past its convergence, however
        // slowly a loaded machine runs the sampler's 1 ms sleeps.
        let sampled = |samples: Arc<AtomicUsize>| async move {
            let seen = samples.load(Ordering::Relaxed);
            eventually(Duration::from_secs(10), "the sampler took a sample", || {
                let samples = samples.clone();
                async move { samples.load(Ordering::Relaxed) > seen }
            })
            .await;
        };
        // Converged: the row's sizes are applied, and the pool holds exactly
        // max(target, leased) connections with nothing being dialed.
        let converged = |target: u64, max: u64, leased: u64| {
            move || async move {
                let p = pools(admin).await;
                let Some(g) = pool(&p, "gpu") else {
                    return false;
                };
                assert!(field(g, "live") <= field(g, "max"), "live above max: {g}");
                field(g, "target") == target
                    && field(g, "max") == max
                    && field(g, "leased") == leased
                    && field(g, "live") == target.max(leased)
                    && field(g, "dialing") == 0
            }
        };
        eventually(
            Duration::from_secs(10),
            "warm at target 4",
            converged(4, 128, 0),
        )
        .await;
        sampled(samples.clone()).await;

        // 100 sessions: 90 that end midway, 10 that stream to the end.
        let period = Duration::from_millis(100);
        let most = SessionGroup::start(proxy.listen_addr(), 0, 90, period);
        let rest = SessionGroup::start(proxy.listen_addr(), 1000, 10, period);
        most.wait_connected(Duration::from_secs(20)).await;
        rest.wait_connected(Duration::from_secs(20)).await;
        eventually(
            Duration::from_secs(10),
            "100 leased at target 4",
            converged(4, 128, 100),
        )
        .await;
        sampled(samples.clone()).await;

        // 4 → 16 while 100 stream: nothing to dial (100 live ≥ 16)...
        db.update(
            "gpu",
            &BackendPatch {
                target_size: Some(16),
                ..BackendPatch::default()
            },
        )
        .await
        .unwrap();
        eventually(
            Duration::from_secs(10),
            "target 16 with 100 leased",
            converged(16, 128, 100),
        )
        .await;
        sampled(samples.clone()).await;
        // ... and once 90 of them end, the pool keeps 16: 10 leased, 6 idle.
        let ended = most.finish().await;
        assert_eq!(ended.len(), 90);
        eventually(
            Duration::from_secs(10),
            "16 live with 10 leased",
            converged(16, 128, 10),
        )
        .await;
        sampled(samples.clone()).await;
        let p = pools(admin).await;
        assert_eq!(field(pool(&p, "gpu").unwrap(), "idle"), 6);

        // 16 → 2 (and max 128 → 32) while 10 stream: idle ones close at once.
        db.update(
            "gpu",
            &BackendPatch {
                target_size: Some(2),
                max_size: Some(32),
                ..BackendPatch::default()
            },
        )
        .await
        .unwrap();
        eventually(
            Duration::from_secs(10),
            "target 2 with 10 leased",
            converged(2, 32, 10),
        )
        .await;
        sampled(samples.clone()).await;
        let ended = rest.finish().await;
        assert_eq!(ended.len(), 10);
        eventually(
            Duration::from_secs(10),
            "2 live, idle, after the sessions",
            converged(2, 32, 0),
        )
        .await;
        sampled(samples.clone()).await;

        sampling.store(false, Ordering::Relaxed);
        sampler.await.unwrap();
        assert_eq!(violations.load(Ordering::Relaxed), 0, "live exceeded max");
        // Resized in place: still the very pool it started with.
        assert!(Arc::ptr_eq(&proxy.backends().all()[0], &original));
        assert!(proxy.backends().retiring().is_empty());
        eventually(
            Duration::from_secs(5),
            "the backend holds 2 connections",
            || async { backend.stats().open_connections == 2 },
        )
        .await;

        proxy.shutdown().await;
        backend.shutdown().await;
        db.close().await;
    })
    .await;
}

/// A new row receives sessions within `sync_interval` (+10 % jitter); a
/// removed row's sessions finish undisturbed, then its connections close and
/// its pool's tasks end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_rows_take_sessions_and_removed_rows_drain() {
    init_tracing();
    bounded(Duration::from_secs(60), async {
        let dir = temp_dir("addremove");
        let url = sqlite_url(dir.path(), "backends.db");
        let db = Db::open(&url).await.unwrap();
        let a = start_echo().await;
        let b = start_echo().await;
        db.add(&spec("a", &a.url(), 2, 16)).await.unwrap();
        let interval = Duration::from_secs(1);
        let proxy = Proxy::start(&settings(&url, interval)).await.unwrap();
        let admin = proxy.admin_addr();
        assert_eq!(ids(&pools(admin).await), ["a"]);

        // Five sessions stream on "a" (the only backend).
        let on_a = SessionGroup::start(proxy.listen_addr(), 0, 5, Duration::from_millis(50));
        on_a.wait_connected(Duration::from_secs(10)).await;

        // Add "b": new sessions reach it within the interval.
        let added = Instant::now();
        db.add(&spec("b", &b.url(), 2, 16)).await.unwrap();
        while b.stats().sessions_started == 0 {
            assert!(
                added.elapsed() < interval.mul_f64(1.1) + Duration::from_millis(700),
                "no session reached the new backend within the sync interval"
            );
            short_session(proxy.listen_addr()).await.unwrap();
        }
        let took = added.elapsed();
        eprintln!("new SQLite row took sessions after {took:?} (sync_interval {interval:?})");

        // Remove "a" while its five sessions stream.
        let removed = Instant::now();
        db.remove("a").await.unwrap();
        eventually(interval * 3, "a leaves the routed set", || async {
            ids(&pools(admin).await) == ["b"]
        })
        .await;
        eprintln!(
            "removed SQLite row left the routed set after {:?}",
            removed.elapsed()
        );
        // It drains: no idle connection, the five leased ones stay.
        let retiring = pools(admin).await["retiring"].clone();
        assert_eq!(retiring[0]["id"], "a", "{retiring}");
        assert_eq!(retiring[0]["draining"], true);
        eventually(
            Duration::from_secs(5),
            "a keeps only its 5 leased connections",
            || async { a.stats().open_connections == 5 },
        )
        .await;
        // New sessions all go to "b".
        let before = a.stats().sessions_started;
        for _ in 0..5 {
            short_session(proxy.listen_addr()).await.unwrap();
        }
        assert_eq!(a.stats().sessions_started, before);
        // The five finish cleanly; then a's connections close and its tasks end.
        let done = on_a.finish().await;
        assert!(done.iter().all(|s| s.sent > 0 && s.sent == s.received));
        eventually(Duration::from_secs(5), "a's connections closed", || async {
            a.stats().open_connections == 0
        })
        .await;
        eventually(Duration::from_secs(5), "a's pool tasks ended", || async {
            proxy.backends().retiring().is_empty()
        })
        .await;
        assert_eq!(pools(admin).await["retiring"], serde_json::json!([]));

        proxy.shutdown().await;
        a.shutdown().await;
        b.shutdown().await;
        db.close().await;
    })
    .await;
}

/// The settings' backends seed an empty table on its first start, and never
/// overwrite it afterwards; a disabled row gets no pool, and enabling it
/// starts one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_backends_seed_an_empty_table_once() {
    init_tracing();
    bounded(Duration::from_secs(30), async {
        let dir = temp_dir("seed");
        let url = sqlite_url(dir.path(), "backends.db");
        let a = start_echo().await;
        let b = start_echo().await;
        let entry = |id: &str, url: String| BackendEntry {
            url,
            id: Some(id.to_string()),
            target_size: Some(1),
            max_size: Some(4),
            weight: None,
            reuse: None,
            group: None,
        };
        let mut s = settings(&url, Duration::from_millis(200));
        s.backends = vec![entry("a", a.url())];
        let proxy = Proxy::start(&s).await.unwrap();
        assert_eq!(ids(&pools(proxy.admin_addr()).await), ["a"]);
        proxy.shutdown().await;

        // Second start with other seeds: the table stays as it is.
        s.backends = vec![entry("b", b.url())];
        let proxy = Proxy::start(&s).await.unwrap();
        assert_eq!(ids(&pools(proxy.admin_addr()).await), ["a"]);
        let db = Db::open(&url).await.unwrap();
        let rows: Vec<_> = db
            .rows()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.unwrap().id)
            .collect();
        assert_eq!(rows, ["a"]);

        // Disabled: drained and gone; enabled again: a new pool.
        db.set_enabled("a", false).await.unwrap();
        let admin = proxy.admin_addr();
        eventually(Duration::from_secs(5), "a disabled", || async {
            ids(&pools(admin).await).is_empty()
        })
        .await;
        let HttpResponse { status, body, .. } = http_get(admin, "/readyz").await;
        assert_eq!(status, 503, "{body}");
        db.set_enabled("a", true).await.unwrap();
        eventually(Duration::from_secs(5), "a enabled and warm", || async {
            pool(&pools(admin).await, "a").is_some_and(|p| field(p, "idle") == 1)
        })
        .await;
        let HttpResponse { status, body, .. } = http_get(admin, "/readyz").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("config current"), "{body}");

        proxy.shutdown().await;
        db.close().await;
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
}

/// A url change replaces the pool (a new one starts, the old one drains), and
/// so does a max above the pool's fixed idle-queue capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_change_and_max_above_capacity_replace_the_pool() {
    init_tracing();
    bounded(Duration::from_secs(30), async {
        let dir = temp_dir("replace");
        let url = sqlite_url(dir.path(), "backends.db");
        let db = Db::open(&url).await.unwrap();
        let a = start_echo().await;
        let b = start_echo().await;
        db.add(&spec("x", &a.url(), 2, 8)).await.unwrap();
        let proxy = Proxy::start(&settings(&url, Duration::from_millis(200)))
            .await
            .unwrap();
        let first = proxy.backends().all()[0].clone();
        let capacity = first.snapshot().capacity;

        db.update(
            "x",
            &BackendPatch {
                url: Some(b.url()),
                ..BackendPatch::default()
            },
        )
        .await
        .unwrap();
        let backends = proxy.backends().clone();
        let b_url = b.url();
        eventually(Duration::from_secs(5), "x moved to b", || {
            let all = backends.all();
            let b_url = b_url.clone();
            async move { all.len() == 1 && all[0].url == b_url }
        })
        .await;
        let second = proxy.backends().all()[0].clone();
        assert!(!Arc::ptr_eq(&first, &second));
        eventually(Duration::from_secs(5), "a's connections closed", || async {
            a.stats().open_connections == 0
        })
        .await;
        eventually(Duration::from_secs(5), "b warm", || async {
            b.stats().open_connections == 2
        })
        .await;

        db.update(
            "x",
            &BackendPatch {
                max_size: Some(capacity + 1),
                ..BackendPatch::default()
            },
        )
        .await
        .unwrap();
        eventually(Duration::from_secs(5), "x replaced for its new max", || {
            let all = backends.all();
            async move { all.len() == 1 && all[0].snapshot().max == capacity + 1 }
        })
        .await;
        assert!(!Arc::ptr_eq(&proxy.backends().all()[0], &second));
        eventually(
            Duration::from_secs(5),
            "replaced pools' tasks ended",
            || async { proxy.backends().retiring().is_empty() },
        )
        .await;

        proxy.shutdown().await;
        db.close().await;
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
}

/// A running backend whose row turns bad keeps its last good configuration;
/// disabled while still bad, it leaves the routed set and drains (a disabled
/// row asks for nothing, whatever its values).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_row_then_disabled_leaves_the_routed_set() {
    init_tracing();
    bounded(Duration::from_secs(30), async {
        use sqlx::Connection;
        let dir = temp_dir("baddisabled");
        let url = sqlite_url(dir.path(), "backends.db");
        let a = start_echo().await;
        let db = Db::open(&url).await.unwrap();
        db.add(&spec("a", &a.url(), 1, 2)).await.unwrap();
        db.add(&spec("b", &a.url(), 1, 2)).await.unwrap();
        let proxy = Proxy::start(&settings(&url, Duration::from_millis(100)))
            .await
            .unwrap();
        let admin = proxy.admin_addr();
        assert_eq!(ids(&pools(admin).await), ["a", "b"]);

        let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query("UPDATE backends SET max_size = 0 WHERE id = 'a'")
            .execute(&mut c)
            .await
            .unwrap();
        eventually(Duration::from_secs(5), "a's bad row rejected", || async {
            metric(admin, "sttproxy_config_rejected_rows").await == Some(1.0)
        })
        .await;
        assert_eq!(
            ids(&pools(admin).await),
            ["a", "b"],
            "a keeps its last good configuration"
        );

        sqlx::query("UPDATE backends SET enabled = 0 WHERE id = 'a'")
            .execute(&mut c)
            .await
            .unwrap();
        eventually(
            Duration::from_secs(5),
            "a disabled leaves the routed set",
            || async { ids(&pools(admin).await) == ["b"] },
        )
        .await;
        assert_eq!(
            metric(admin, "sttproxy_config_rejected_rows").await,
            Some(0.0)
        );
        short_session(proxy.listen_addr()).await.unwrap();
        c.close().await.unwrap();
        proxy.shutdown().await;
        db.close().await;
        a.shutdown().await;
    })
    .await;
}
