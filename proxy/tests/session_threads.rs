//! Sessions on session threads (`session_threads`, docs/relay.md#session-threads),
//! end to end over real sockets: the backend connections the pool dialed on
//! the proxy's runtime are leased by sessions on other threads, moved there,
//! released after the fence and leased again by later sessions on either
//! thread; the sessions' tasks are counted in `sttproxy_runtime_tasks`; the
//! proxy shuts down with them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use sttproxy::Proxy;
use sttproxy::config::db::Db;
use support::db::*;
use support::{bounded, eventually, init_tracing, temp_dir};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_on_session_threads_reuse_connections_are_counted_and_shut_down() {
    init_tracing();
    bounded(Duration::from_secs(60), async {
        let dir = temp_dir("session-threads");
        let url = sqlite_url(dir.path(), "backends.db");
        let db = Db::open(&url).await.unwrap();
        let backend = start_echo().await;
        db.add(&spec("gpu", &backend.url(), 2, 4)).await.unwrap();
        let mut settings = settings(&url, Duration::from_millis(200));
        settings.session_threads = Some(2);
        let proxy = Proxy::start(&settings).await.unwrap();
        let (listen, admin) = (proxy.listen_addr(), proxy.admin_addr());
        eventually(Duration::from_secs(10), "the pool is warm", || async move {
            pool(&pools(admin).await, "gpu").is_some_and(|p| field(p, "idle") == 2)
        })
        .await;

        // One after another: every session leases an idle connection (the
        // pool's two were dialed on the proxy's runtime), relays on its
        // thread, fences and releases it.
        for _ in 0..20 {
            short_session(listen).await.unwrap();
        }
        let p = pools(admin).await;
        let p = pool(&p, "gpu").unwrap();
        assert_eq!(field(p, "acquired_total"), 20);
        assert_eq!(
            field(p, "released_total"),
            20,
            "every lease went back clean"
        );
        assert_eq!(field(p, "discarded_total"), 0);
        assert!(field(p, "live") <= 4);

        // Four at once stream for a while: both threads hold sessions; the
        // scrape counts their tasks, which do not run on this runtime.
        let stop = CancellationToken::new();
        let connected = Arc::new(AtomicUsize::new(0));
        let streams: Vec<_> = (0..4)
            .map(|tag| {
                tokio::spawn(stream_session(
                    listen,
                    tag,
                    Duration::from_millis(10),
                    stop.clone(),
                    connected.clone(),
                ))
            })
            .collect();
        eventually(Duration::from_secs(10), "4 sessions stream", || {
            let connected = connected.clone();
            async move { connected.load(std::sync::atomic::Ordering::SeqCst) == 4 }
        })
        .await;
        let here = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        let tasks = metric(admin, "sttproxy_runtime_tasks").await.unwrap();
        // The 4 sessions besides this runtime's tasks (the proxy's own and
        // the clients'), with a margin of one for a task ending meanwhile.
        assert!(
            tasks >= (here + 3) as f64,
            "runtime_tasks {tasks} against {here} tasks on this runtime"
        );
        stop.cancel();
        for s in streams {
            let s = s.await.unwrap().unwrap();
            assert_eq!(s.sent, s.received);
        }

        tokio::time::timeout(Duration::from_secs(20), proxy.shutdown())
            .await
            .expect("shutdown ends with the session threads");
    })
    .await;
}
