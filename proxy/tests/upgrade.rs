//! Zero-downtime binary upgrade (`upgrade_socket`), with the real binary as
//! child processes: a new `sttproxy` takes the listeners over from a running
//! one while 200 sessions stream and a connect loop runs; no connect fails,
//! every session ends clean. And the failure paths: a successor that goes
//! away before serving leaves the old process serving, a stale socket file
//! does not stop a start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use support::db::SessionGroup;
use support::db::{metric, short_session, start_echo};
use support::fleet::{ConnectLoop, exited, more_connects};
use support::{ProxyProcess, bounded, eventually, init_tracing, temp_dir};
use tokio::time::Instant;

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
        let sessions = SessionGroup::start(listen, 0, SESSIONS, Duration::from_millis(100));
        sessions.wait_connected(Duration::from_secs(30)).await;
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
        let ended = sessions.finish_counted().await;
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
             {} clean, {} failed, {} echoes; connect loop: {ok} ok, {refused} failed",
            ended.clean,
            ended.failed.len(),
            ended.echoes
        );
        assert!(ended.failed.is_empty(), "sessions failed: {:?}", ended.failed);
        assert_eq!(ended.clean, SESSIONS);
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
        // A path naming something else than a socket is never replaced.
        let not_a_socket = dir.path().join("settings.toml");
        std::fs::write(&not_a_socket, "keep me").unwrap();
        let args = serve_args(&backend.url(), &not_a_socket);
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_sttproxy"))
                .args(&args)
                .env("STTPROXY_DB", "sqlite::memory:")
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started on a regular file: {stderr}");
        assert!(stderr.contains("is not a socket"), "{stderr}");
        assert_eq!(std::fs::read_to_string(&not_a_socket).unwrap(), "keep me");

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
