//! Zero-downtime binary upgrade (`upgrade_socket`), with the real binary as
//! child processes: a new `sttproxy` takes the listeners over from a running
//! one while 200 sessions stream and a connect loop runs; no connect fails,
//! every session ends clean. And the failure paths: a successor that goes
//! away before serving leaves the old process serving, a stale socket file
//! does not stop a start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use support::db::{metric, short_session, start_echo, stream_session};
use support::{ProxyProcess, bounded, eventually, init_tracing, temp_dir};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const SESSIONS: usize = 200;
const GRACE: &str = "20s";

fn serve_args(backend: &str, socket: &Path) -> Vec<String> {
    [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--target-size",
        "16",
        "--shutdown-grace",
        GRACE,
        "--upgrade-socket",
        &socket.display().to_string(),
        "--backend",
        backend,
    ]
    .map(String::from)
    .to_vec()
}

/// Loops of short sessions (connect, one echo, graceful end) until `stop`:
/// every one that fails is counted and its error kept.
struct ConnectLoop {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl ConnectLoop {
    fn start(listen: SocketAddr, loops: usize) -> Self {
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for _ in 0..loops {
            let (ok, failed, errors, stop) =
                (ok.clone(), failed.clone(), errors.clone(), stop.clone());
            tasks.spawn(async move {
                while !stop.is_cancelled() {
                    match short_session(listen).await {
                        Ok(()) => ok.fetch_add(1, Ordering::SeqCst),
                        Err(e) => {
                            errors.lock().unwrap().push(e);
                            failed.fetch_add(1, Ordering::SeqCst)
                        }
                    };
                }
            });
        }
        Self {
            ok,
            failed,
            errors,
            stop,
            tasks,
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    async fn finish(mut self) -> (u64, u64, Vec<String>) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        let errors = std::mem::take(&mut *self.errors.lock().unwrap());
        (self.ok(), self.failed.load(Ordering::SeqCst), errors)
    }
}

/// Wait (bounded) until `connects` more short sessions succeeded.
async fn more_connects(loop_: &ConnectLoop, connects: u64, what: &str) {
    let from = loop_.ok();
    let ok = loop_.ok.clone();
    eventually(Duration::from_secs(20), what, || {
        let ok = ok.clone();
        async move { ok.load(Ordering::SeqCst) >= from + connects }
    })
    .await;
}

/// Wait (bounded) for the child to exit; its status.
async fn exited(p: &mut ProxyProcess, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            started.elapsed() < limit,
            "the old proxy did not exit within {limit:?}; stderr:\n{}",
            p.stderr_log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_under_200_sessions_and_a_connect_loop_loses_nothing() {
    init_tracing();
    bounded(Duration::from_secs(120), async {
        let backend = start_echo().await;
        let dir = temp_dir("upgrade");
        let socket = dir.path().join("upgrade.sock");
        let args = serve_args(&backend.url(), &socket);
        let mut old = ProxyProcess::spawn(&args).await;
        let listen = old.listen;

        // 200 streaming sessions, each a message every 100 ms, every echo checked.
        let stop = CancellationToken::new();
        let connected = Arc::new(AtomicUsize::new(0));
        let mut sessions = JoinSet::new();
        for tag in 0..SESSIONS {
            sessions.spawn(stream_session(
                listen,
                tag as u32,
                Duration::from_millis(100),
                stop.clone(),
                connected.clone(),
            ));
        }
        let c = connected.clone();
        eventually(Duration::from_secs(30), "200 sessions streaming", || {
            let c = c.clone();
            async move { c.load(Ordering::SeqCst) == SESSIONS }
        })
        .await;
        let connects = ConnectLoop::start(listen, 4);
        more_connects(&connects, 100, "100 connects before the upgrade").await;

        // The upgrade: a second process with the same settings.
        let upgraded_at = Instant::now();
        let new = ProxyProcess::spawn(&args).await;
        assert_eq!(new.listen, listen, "the new process serves the same listener");
        assert_eq!(new.admin, old.admin, "and the same admin listener");
        let took_over = upgraded_at.elapsed();
        // The old process relays its sessions while new connects go to the new one.
        more_connects(&connects, 300, "300 connects after the upgrade").await;
        assert!(
            old.child.try_wait().unwrap().is_none(),
            "the old process must keep relaying its open sessions"
        );

        // Every session ends now, well within the grace: each must end clean
        // (session.ended, 1000, every echo back).
        stop.cancel();
        let (mut clean, mut failed, mut echoes) = (0usize, Vec::new(), 0u64);
        while let Some(r) = sessions.join_next().await {
            match r.unwrap() {
                Ok(s) => {
                    clean += 1;
                    echoes += s.received;
                }
                Err(e) => failed.push(e),
            }
        }
        // With its sessions gone the old process exits at once, not at the grace.
        let status = exited(&mut old, Duration::from_secs(10)).await;
        assert!(status.success(), "the old process exited with {status}");
        let log = old.stderr_log();
        assert!(
            log.contains("a new process serves the listeners"),
            "the old process says it handed over:\n{log}"
        );
        // The new process alone now: connects still succeed, and it is the
        // one that served them (the admin listener is its alone too).
        let alone_from = connects.ok();
        more_connects(&connects, 100, "100 connects after the old process exited").await;
        let (ok, refused, errors) = connects.finish().await;
        let served = metric(new.admin, r#"sttproxy_sessions_total{outcome="ended"}"#)
            .await
            .unwrap_or(0.0);
        assert!(
            served >= (ok - alone_from) as f64,
            "the new process ended {served} sessions, fewer than the {} connects since the old one exited",
            ok - alone_from
        );
        eprintln!(
            "upgrade: new process serving {took_over:?} after its start; streaming sessions: \
             {clean} clean, {} failed, {echoes} echoes; connect loop: {ok} ok, {refused} failed",
            failed.len()
        );
        assert!(failed.is_empty(), "sessions failed: {failed:?}");
        assert_eq!(clean, SESSIONS);
        assert_eq!(refused, 0, "connects failed: {errors:?}");
        drop(new);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_goes_away_leaves_the_old_proxy_serving() {
    init_tracing();
    bounded(Duration::from_secs(60), async {
        let backend = start_echo().await;
        let dir = temp_dir("upgrade-fail");
        let socket = dir.path().join("upgrade.sock");
        // A stale socket file (its process is gone): the start goes on.
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        assert!(socket.exists());
        let args = serve_args(&backend.url(), &socket);
        let old = ProxyProcess::spawn(&args).await;
        short_session(old.listen).await.unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "the upgrade socket is the owner's only"
        );

        // A would-be successor takes the offer (its descriptors are dropped
        // unread) and goes away without saying it serves.
        {
            use std::io::Read;
            let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut byte = [0u8; 1];
            s.read_exact(&mut byte).unwrap();
            assert_eq!(byte[0], b'L', "the offer");
        }
        let log_has = |what: &'static str| {
            let log = old.stderr_log();
            async move { log.contains(what) }
        };
        eventually(
            Duration::from_secs(5),
            "the old process notes the failed attempt",
            || log_has("upgrade attempt failed; this process keeps serving"),
        )
        .await;
        // Still serving, and still offering: a real successor then takes over.
        for _ in 0..20 {
            short_session(old.listen).await.unwrap();
        }
        let new = ProxyProcess::spawn(&args).await;
        assert_eq!(new.listen, old.listen);
        for _ in 0..20 {
            short_session(new.listen).await.unwrap();
        }
        drop(old);
        drop(new);
    })
    .await;
}
