//! The backend table on PostgreSQL (a fresh database per test on the server
//! at `DATABASE_URL`): changes reach proxies through LISTEN/NOTIFY within a
//! second, several proxies converge, an outage keeps the last good
//! configuration, bad rows are rejected. Skipped (with a printed reason) where
//! no PostgreSQL answers, unless `REQUIRE_POSTGRES=1`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use sttproxy::Proxy;
use sttproxy::config::BackendEntry;
use sttproxy::config::db::{BackendPatch, Db};
use support::db::*;
use support::{HttpResponse, bounded, eventually, http_get, init_tracing};
use tokio::time::Instant;

/// Long enough that only NOTIFY can explain a change applied within a second.
const SLOW_POLL: Duration = Duration::from_secs(30);

/// A new row takes new sessions within 1 s; a removed row's sessions finish,
/// then its connections close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_new_row_within_a_second_and_removed_row_drains() {
    init_tracing();
    let Some(pg) = pg_db("new_row").await else {
        return;
    };
    bounded(Duration::from_secs(60), async {
        let db = Db::open(&pg.url).await.unwrap();
        let a = start_echo().await;
        let b = start_echo().await;
        db.add(&spec("a", &a.url(), 2, 16)).await.unwrap();
        let proxy = Proxy::start(&settings(&pg.url, SLOW_POLL)).await.unwrap();
        let admin = proxy.admin_addr();
        assert_eq!(ids(&pools(admin).await), ["a"]);
        let on_a = SessionGroup::start(proxy.listen_addr(), 0, 4, Duration::from_millis(50));
        on_a.wait_connected(Duration::from_secs(10)).await;
        // Let the LISTEN connection settle.
        eventually(Duration::from_secs(5), "listening", || async {
            proxy
                .config_status()
                .is_some_and(|s| s.applies_total() >= 1)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;

        let added = Instant::now();
        db.add(&spec("b", &b.url(), 2, 16)).await.unwrap();
        while b.stats().sessions_started == 0 {
            assert!(
                added.elapsed() < Duration::from_secs(1),
                "no session reached the new backend within 1 s"
            );
            short_session(proxy.listen_addr()).await.unwrap();
        }
        eprintln!(
            "new PostgreSQL row took sessions after {:?}",
            added.elapsed()
        );

        let removed = Instant::now();
        db.remove("a").await.unwrap();
        let took = eventually(Duration::from_secs(1), "a removed within 1 s", || async {
            ids(&pools(admin).await) == ["b"]
        })
        .await;
        eprintln!("removed PostgreSQL row left the routed set after {took:?}");
        assert!(removed.elapsed() < Duration::from_secs(2));
        assert_eq!(a.stats().open_connections, 4, "a's leased connections stay");
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

        proxy.shutdown().await;
        db.close().await;
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
    pg.drop_db().await;
}

/// Two proxies on one database both apply a change within 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_two_proxies_converge_within_a_second() {
    init_tracing();
    let Some(pg) = pg_db("two_proxies").await else {
        return;
    };
    bounded(Duration::from_secs(60), async {
        let db = Db::open(&pg.url).await.unwrap();
        let a = start_echo().await;
        let b = start_echo().await;
        db.add(&spec("a", &a.url(), 1, 8)).await.unwrap();
        let p1 = Proxy::start(&settings(&pg.url, SLOW_POLL)).await.unwrap();
        let p2 = Proxy::start(&settings(&pg.url, SLOW_POLL)).await.unwrap();
        let admins = [p1.admin_addr(), p2.admin_addr()];
        tokio::time::sleep(Duration::from_millis(500)).await;

        let changed = Instant::now();
        db.update(
            "a",
            &BackendPatch {
                target_size: Some(3),
                ..BackendPatch::default()
            },
        )
        .await
        .unwrap();
        db.add(&spec("b", &b.url(), 2, 8)).await.unwrap();
        for admin in admins {
            eventually(
                Duration::from_secs(1),
                "both proxies converge within 1 s",
                || async {
                    let p = pools(admin).await;
                    pool(&p, "a").is_some_and(|a| field(a, "target") == 3 && field(a, "idle") == 3)
                        && pool(&p, "b").is_some_and(|b| field(b, "idle") == 2)
                },
            )
            .await;
        }
        eprintln!("two proxies converged after {:?}", changed.elapsed());
        assert!(changed.elapsed() < Duration::from_millis(1500));
        // Each proxy holds its own pools: 2 × 3 to a, 2 × 2 to b.
        assert_eq!(a.stats().open_connections, 6);
        assert_eq!(b.stats().open_connections, 4);

        p1.shutdown().await;
        p2.shutdown().await;
        db.close().await;
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
    pg.drop_db().await;
}

/// The database goes away (its TCP path is cut): sessions keep flowing on the
/// last good configuration, /readyz stays 200 but says the config is stale,
/// /metrics counts the failures; once it is back, the pending changes apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_outage_keeps_the_last_good_configuration() {
    init_tracing();
    let Some(pg) = pg_db("outage").await else {
        return;
    };
    bounded(Duration::from_secs(90), async {
        let direct = Db::open(&pg.url).await.unwrap();
        let a = start_echo().await;
        let b = start_echo().await;
        direct.add(&spec("a", &a.url(), 2, 16)).await.unwrap();
        let mut forwarder = Forwarder::start(pg_addr(&pg.url)).await;
        let via_forwarder = with_host(&pg.url, forwarder.addr);
        let proxy = Proxy::start(&settings(&via_forwarder, Duration::from_millis(500)))
            .await
            .unwrap();
        let admin = proxy.admin_addr();
        assert_eq!(ids(&pools(admin).await), ["a"]);
        let streaming = SessionGroup::start(proxy.listen_addr(), 0, 4, Duration::from_millis(50));
        streaming.wait_connected(Duration::from_secs(10)).await;

        // Cut the database off.
        forwarder.stop().await;
        eventually(
            Duration::from_secs(20),
            "/readyz says the config is stale",
            || async {
                let HttpResponse { status, body, .. } = http_get(admin, "/readyz").await;
                status == 200 && body.contains("config stale")
            },
        )
        .await;
        assert!(
            metric(admin, "sttproxy_config_sync_failures_total")
                .await
                .unwrap()
                >= 1.0
        );
        assert_eq!(metric(admin, "sttproxy_config_stale").await, Some(1.0));

        // Changes made meanwhile cannot reach the proxy...
        direct
            .update(
                "a",
                &BackendPatch {
                    target_size: Some(4),
                    ..BackendPatch::default()
                },
            )
            .await
            .unwrap();
        direct.add(&spec("b", &b.url(), 1, 4)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let p = pools(admin).await;
        assert_eq!(ids(&p), ["a"]);
        assert_eq!(field(pool(&p, "a").unwrap(), "target"), 2);
        // ... while sessions keep flowing, old and new.
        for _ in 0..3 {
            short_session(proxy.listen_addr()).await.unwrap();
        }
        let age = metric(admin, "sttproxy_config_last_sync_age_seconds")
            .await
            .unwrap();
        assert!(age >= 2.0, "age {age}");

        // The database is back: the pending changes apply.
        forwarder.restart().await;
        let took = eventually(
            Duration::from_secs(15),
            "pending changes applied",
            || async {
                let p = pools(admin).await;
                pool(&p, "a").is_some_and(|a| field(a, "target") == 4) && pool(&p, "b").is_some()
            },
        )
        .await;
        eprintln!("pending changes applied {took:?} after the database came back");
        eventually(
            Duration::from_secs(5),
            "/readyz says the config is current",
            || async {
                let HttpResponse { status, body, .. } = http_get(admin, "/readyz").await;
                status == 200 && body.contains("config current")
            },
        )
        .await;
        assert_eq!(metric(admin, "sttproxy_config_stale").await, Some(0.0));
        let done = streaming.finish().await;
        assert!(done.iter().all(|s| s.sent > 20 && s.sent == s.received));

        proxy.shutdown().await;
        forwarder.stop().await;
        direct.close().await;
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
    pg.drop_db().await;
}

/// A row with max_size < target_size is rejected (counted in
/// sttproxy_config_rejected_rows); the other rows apply; fixing it applies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_bad_row_is_rejected_and_the_rest_applies() {
    init_tracing();
    let Some(pg) = pg_db("bad_row").await else {
        return;
    };
    bounded(Duration::from_secs(30), async {
        let db = Db::open(&pg.url).await.unwrap();
        let a = start_echo().await;
        db.add(&spec("good", &a.url(), 1, 4)).await.unwrap();
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&pg.url).await.unwrap();
        sqlx::query(
            "INSERT INTO backends (id, url, target_size, max_size, reuse) VALUES \
             ('bad', $1, 8, 2, 'fenced'), ('worse', $1, 1, 1, 'sometimes'), ('neg', $1, -1, 4, 'none')",
        )
        .bind(a.url())
        .execute(&mut conn)
        .await
        .unwrap();
        let proxy = Proxy::start(&settings(&pg.url, SLOW_POLL)).await.unwrap();
        let admin = proxy.admin_addr();
        assert_eq!(ids(&pools(admin).await), ["good"]);
        assert_eq!(metric(admin, "sttproxy_config_rejected_rows").await, Some(3.0));

        db.update("bad", &BackendPatch { max_size: Some(8), ..BackendPatch::default() })
            .await
            .unwrap();
        eventually(Duration::from_secs(1), "the fixed row applies", || async {
            ids(&pools(admin).await) == ["bad", "good"]
        })
        .await;
        assert_eq!(metric(admin, "sttproxy_config_rejected_rows").await, Some(2.0));

        // A running backend whose row turns bad keeps its last good configuration.
        sqlx::query("UPDATE backends SET max_size = 0 WHERE id = 'good'")
            .execute(&mut conn)
            .await
            .unwrap();
        eventually(Duration::from_secs(1), "the bad edit is seen", || async {
            metric(admin, "sttproxy_config_rejected_rows").await == Some(3.0)
        })
        .await;
        let p = pools(admin).await;
        assert_eq!(field(pool(&p, "good").unwrap(), "max"), 4);

        proxy.shutdown().await;
        db.close().await;
        let _ = sqlx::Connection::close(conn).await;
        a.shutdown().await;
    })
    .await;
    pg.drop_db().await;
}

/// Two proxies starting at once on an empty database seed it once, without
/// an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_concurrent_first_starts_seed_once() {
    init_tracing();
    let Some(pg) = pg_db("seed_once").await else {
        return;
    };
    bounded(Duration::from_secs(30), async {
        let a = start_echo().await;
        let mut s = settings(&pg.url, SLOW_POLL);
        s.backends = vec![BackendEntry {
            url: a.url(),
            id: Some("a".into()),
            target_size: Some(1),
            max_size: Some(2),
            weight: None,
            reuse: None,
            group: None,
        }];
        let (p1, p2) = tokio::join!(Proxy::start(&s), Proxy::start(&s));
        let (p1, p2) = (p1.unwrap(), p2.unwrap());
        for p in [&p1, &p2] {
            eventually(
                Duration::from_secs(5),
                "both proxies route to the seed",
                || async { ids(&pools(p.admin_addr()).await) == ["a"] },
            )
            .await;
        }
        let db = Db::open(&pg.url).await.unwrap();
        assert_eq!(db.rows().await.unwrap().len(), 1);
        p1.shutdown().await;
        p2.shutdown().await;
        db.close().await;
        a.shutdown().await;
    })
    .await;
    pg.drop_db().await;
}

/// Started while its database is unreachable, a proxy serves the settings'
/// backends, says the config is stale, and switches to the table (seeding it
/// on this first start) once the database answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_start_while_the_database_is_down() {
    init_tracing();
    let Some(pg) = pg_db("start_down").await else {
        return;
    };
    bounded(Duration::from_secs(60), async {
        let a = start_echo().await;
        let b = start_echo().await;
        let mut forwarder = Forwarder::start(pg_addr(&pg.url)).await;
        forwarder.stop().await;
        let mut s = settings(
            &with_host(&pg.url, forwarder.addr),
            Duration::from_millis(500),
        );
        s.backends = vec![BackendEntry {
            url: a.url(),
            id: Some("a".into()),
            target_size: Some(1),
            max_size: Some(4),
            weight: None,
            reuse: None,
            group: None,
        }];
        let proxy = Proxy::start(&s).await.unwrap();
        let admin = proxy.admin_addr();
        assert_eq!(ids(&pools(admin).await), ["a"]);
        let HttpResponse { status, body, .. } = http_get(admin, "/readyz").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("config stale: never synced"), "{body}");
        short_session(proxy.listen_addr()).await.unwrap();

        forwarder.restart().await;
        eventually(
            Duration::from_secs(15),
            "synced once the database answers",
            || async {
                http_get(admin, "/readyz")
                    .await
                    .body
                    .contains("config current")
            },
        )
        .await;
        // The table was seeded on this first start; edits now apply.
        let db = Db::open(&pg.url).await.unwrap();
        assert_eq!(db.rows().await.unwrap().len(), 1);
        db.add(&spec("b", &b.url(), 1, 4)).await.unwrap();
        eventually(Duration::from_secs(2), "b added", || async {
            ids(&pools(admin).await) == ["a", "b"]
        })
        .await;

        proxy.shutdown().await;
        forwarder.stop().await;
        db.close().await;
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
    pg.drop_db().await;
}

/// A LISTEN connection that goes silent without closing — half-open: the
/// forwarder between the proxy and PostgreSQL stops forwarding and keeps both
/// sockets open, so no read or write ever fails — is declared lost within
/// `db_listener_check_interval` (`sttproxy_db_listener_connected` 0, /readyz
/// says so). Once traffic flows again the listener reconnects, catches up
/// with the change made while it was away, and pushes changes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_half_open_listen_connection_is_detected_and_replaced() {
    init_tracing();
    let Some(pg) = pg_db("halfopen").await else {
        return;
    };
    bounded(Duration::from_secs(60), async {
        let direct = Db::open(&pg.url).await.unwrap();
        let a = start_echo().await;
        let forwarder = Forwarder::start(pg_addr(&pg.url)).await;
        let via_forwarder = with_host(&pg.url, forwarder.addr);
        let check = Duration::from_millis(1000);
        let mut s = settings(&via_forwarder, SLOW_POLL);
        s.db_listener_check_interval = check;
        let proxy = Proxy::start(&s).await.unwrap();
        let admin = proxy.admin_addr();
        let gauge = || async move { metric(admin, "sttproxy_db_listener_connected").await };
        eventually(Duration::from_secs(5), "listener connected", || async {
            gauge().await == Some(1.0)
        })
        .await;
        // Pushed: applied within a second while polling is every 30 s.
        direct.add(&spec("a", &a.url(), 1, 2)).await.unwrap();
        eventually(Duration::from_secs(1), "a pushed", || async {
            ids(&pools(admin).await) == ["a"]
        })
        .await;

        forwarder.pause();
        let paused_at = Instant::now();
        let took = eventually(
            check + Duration::from_millis(500),
            "the silent LISTEN connection found",
            || async { gauge().await == Some(0.0) },
        )
        .await;
        eprintln!(
            "half-open LISTEN connection found {took:?} after the pause (check interval {check:?})"
        );
        assert!(
            paused_at.elapsed() >= check / 2,
            "found before any check could fail"
        );
        let HttpResponse { status, body, .. } = http_get(admin, "/readyz").await;
        assert!(
            status == 200 && body.contains("push (LISTEN) down"),
            "{status} {body}"
        );

        // Made while the listener is away: nothing can push it.
        direct.add(&spec("b", &a.url(), 1, 2)).await.unwrap();
        forwarder.resume();
        let took = eventually(
            Duration::from_secs(15),
            "listener back and the missed change caught up",
            || async { gauge().await == Some(1.0) && ids(&pools(admin).await) == ["a", "b"] },
        )
        .await;
        eprintln!("listener back and caught up {took:?} after the resume");
        // The catch-up sync is done (it applied b): c can only arrive by push.
        direct.add(&spec("c", &a.url(), 1, 2)).await.unwrap();
        eventually(Duration::from_secs(1), "c pushed", || async {
            ids(&pools(admin).await) == ["a", "b", "c"]
        })
        .await;
        let HttpResponse { body, .. } = http_get(admin, "/readyz").await;
        assert!(!body.contains("push (LISTEN) down"), "{body}");

        proxy.shutdown().await;
        direct.close().await;
        a.shutdown().await;
    })
    .await;
    pg.drop_db().await;
}

/// The PostgreSQL connection's TLS follows the URL's `sslmode` (sqlx with
/// rustls on ring, roots from webpki-roots). Seen from the server:
/// `pg_stat_ssl` of the connections the proxy's pool opened. Adapts to the
/// server: with `ssl = on`, require and prefer encrypt, disable does not, and
/// verify-full refuses the server's certificate unless a root for it is given
/// (`sslrootcert`); with `ssl = off`, require fails clearly and prefer falls
/// back to plain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_sslmode_is_honoured() {
    use sqlx::Connection;
    init_tracing();
    let Some(pg) = pg_db("sslmode").await else {
        return;
    };
    bounded(Duration::from_secs(60), async {
        let mut observer = sqlx::PgConnection::connect(&pg.url).await.unwrap();
        let server_ssl: String = sqlx::query_scalar("SHOW ssl")
            .fetch_one(&mut observer)
            .await
            .unwrap();
        let server_ssl = server_ssl == "on";
        let cert_file: String = sqlx::query_scalar("SHOW ssl_cert_file")
            .fetch_one(&mut observer)
            .await
            .unwrap();
        eprintln!("server ssl = {server_ssl}");
        let url = |mode: &str| {
            let sep = if pg.url.contains('?') { '&' } else { '?' };
            format!("{}{sep}sslmode={mode}", pg.url)
        };
        // The ssl flag of the proxy's connections opened since `before`.
        let ours = "SELECT s.pid, s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                    WHERE a.application_name = 'sttproxy' AND a.datname = current_database()";
        let mut seen: std::collections::BTreeSet<i32> = std::collections::BTreeSet::new();
        let mut ssl_of = async |mode: &str| -> Result<bool, String> {
            let db = Db::open(&url(mode)).await.map_err(|e| e.to_string())?;
            db.rows().await.map_err(|e| e.to_string())?;
            let rows: Vec<(i32, bool)> =
                sqlx::query_as(ours).fetch_all(&mut observer).await.unwrap();
            db.close().await;
            let new: Vec<bool> = rows
                .into_iter()
                .filter(|(pid, _)| seen.insert(*pid))
                .map(|(_, ssl)| ssl)
                .collect();
            assert!(!new.is_empty(), "no connection of sslmode={mode} seen");
            assert!(new.iter().all(|s| *s == new[0]), "{new:?}");
            Ok(new[0])
        };
        assert_eq!(ssl_of("disable").await, Ok(false));
        assert_eq!(ssl_of("prefer").await, Ok(server_ssl));
        if server_ssl {
            assert_eq!(ssl_of("require").await, Ok(true));
            // No root for the server's certificate among webpki-roots.
            let err = ssl_of("verify-full").await.unwrap_err();
            assert!(err.contains("certificate"), "{err}");
            assert!(
                !err.contains("certificate: certificate"),
                "cause repeated: {err}"
            );
            // Its own certificate given as the root (`sslrootcert`), where this
            // process can read the server's certificate file (a local server).
            if std::fs::metadata(&cert_file).is_ok() {
                let mode = format!("verify-ca&sslrootcert={cert_file}");
                let got = ssl_of(&mode).await;
                eprintln!("sslmode={mode}: {got:?}");
                assert_eq!(got, Ok(true));
            } else {
                eprintln!("sslrootcert not tried: {cert_file} is not readable here");
            }
        } else {
            let err = ssl_of("require").await.unwrap_err();
            assert!(
                err.to_lowercase().contains("tls") || err.contains("ssl"),
                "{err}"
            );
        }
        let _ = observer.close().await;
    })
    .await;
    pg.drop_db().await;
}
