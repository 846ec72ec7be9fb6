//! Two `sttproxy` replicas (the real binary) sharing one PostgreSQL backend
//! table, behind HAProxy in TCP mode health-checking `/readyz`: a backend
//! added with `sttproxy backends add` reaches both within 1 s, and a rolling
//! upgrade of the replicas under 500 streaming sessions and a connect loop
//! loses no session and fails no connect.
//!
//! Skipped with a printed reason without PostgreSQL (unless
//! `REQUIRE_POSTGRES=1`) or without `haproxy` (unless `REQUIRE_CLIENTS=1`,
//! as `.ci/run` sets after installing it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::clients::skip_or_fail;
use support::db::SessionGroup;
use support::db::{pg_db, pool, pools, start_echo};
use support::fleet::{ConnectLoop, exited, more_connects};
use support::{ProxyProcess, bounded, collect_lines, eventually, init_tracing, temp_dir};
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_sttproxy");
const SESSIONS: usize = 500;

/// `haproxy` on the PATH or in /usr/sbin (Debian's package puts it there).
fn haproxy() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("haproxy"))
        .find(|p| p.is_file())
}

/// HAProxy as a child process (foreground), killed on drop.
struct Haproxy {
    child: Child,
    addr: SocketAddr,
    /// Its stderr (alerts and server state changes), collected.
    log: std::sync::Arc<std::sync::Mutex<String>>,
    /// Its runtime API.
    stats: PathBuf,
}

impl Haproxy {
    /// TCP mode (WebSockets pass through), round robin over the replicas,
    /// each health-checked on its admin listener's `/readyz` every 200 ms;
    /// a refused connect is retried on the other replica.
    fn start(bin: &Path, dir: &Path, replicas: &[(SocketAddr, SocketAddr)]) -> Self {
        // A free port for the frontend (HAProxy's configuration names it).
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let stats = dir.join("haproxy.sock");
        let mut cfg = format!(
            "global\n  maxconn 4000\n  stats socket {} mode 600 level admin\n\
             defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 120s\n  \
             timeout server 120s\n  retries 3\n  option redispatch\n\
             frontend clients\n  bind {addr}\n  default_backend replicas\n\
             backend replicas\n  balance roundrobin\n  option httpchk GET /readyz\n  \
             http-check expect status 200\n  default-server inter 200ms fall 2 rise 1\n",
            stats.display()
        );
        for (i, (listen, admin)) in replicas.iter().enumerate() {
            cfg.push_str(&format!(
                "  server r{i} {listen} check port {}\n",
                admin.port()
            ));
        }
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let child = Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting haproxy");
        let mut child = child;
        let stderr = child.stderr.take().expect("piped stderr");
        let log = collect_lines(stderr);
        Self {
            child,
            addr,
            log,
            stats,
        }
    }

    /// One command on HAProxy's runtime API (the stats socket); its answer.
    fn command(&self, cmd: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.stats).unwrap();
        s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    }

    fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn replica_args(db: &str, socket: &Path) -> Vec<String> {
    [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--db",
        db,
        "--shutdown-grace",
        "30s",
        "--upgrade-socket",
        &socket.display().to_string(),
    ]
    .map(String::from)
    .to_vec()
}

async fn backends_add(db: &str, url: &str, id: &str) {
    let args = [
        "backends", "add", "--db", db, "--url", url, "--id", id, "--target", "8",
    ]
    .map(String::from);
    let out = tokio::task::spawn_blocking(move || Command::new(BIN).args(args).output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "backends add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_behind_haproxy_sync_and_roll_without_losing_a_session() {
    init_tracing();
    let Some(bin) = haproxy() else {
        skip_or_fail("haproxy is not installed (Debian: apt-get install haproxy)");
        return;
    };
    let Some(db) = pg_db("replicas").await else {
        return;
    };
    bounded(Duration::from_secs(240), async {
        let b1 = start_echo().await;
        let b2 = start_echo().await;
        backends_add(&db.url, &b1.url(), "b1").await;
        let dir = temp_dir("replicas");
        let sockets = [dir.path().join("r0.sock"), dir.path().join("r1.sock")];
        let args = |i: usize| replica_args(&db.url, &sockets[i]);
        let mut old = vec![
            ProxyProcess::spawn(&args(0)).await,
            ProxyProcess::spawn(&args(1)).await,
        ];
        let replicas: Vec<_> = old.iter().map(|p| (p.listen, p.admin)).collect();
        let lb = Haproxy::start(&bin, dir.path(), &replicas);
        // Through the load balancer once it listens and both replicas are ready.
        eventually(
            Duration::from_secs(10),
            "a session through haproxy",
            || async { support::db::short_session(lb.addr).await.is_ok() },
        )
        .await;

        // A backend added with the CLI reaches both replicas (LISTEN/NOTIFY).
        let added = Instant::now();
        backends_add(&db.url, &b2.url(), "b2").await;
        let cli_done = added.elapsed();
        let admins: Vec<_> = replicas.iter().map(|r| r.1).collect();
        let reached = eventually(Duration::from_secs(5), "b2 on both replicas", || {
            let admins = admins.clone();
            async move {
                for a in admins {
                    if pool(&pools(a).await, "b2").is_none() {
                        return false;
                    }
                }
                true
            }
        })
        .await;
        eprintln!(
            "replicas: `backends add` took {cli_done:?} (a process start and a database \
             connection); b2 on both replicas {reached:?} after it returned"
        );
        assert!(
            reached <= Duration::from_secs(1),
            "b2 reached both replicas only after {reached:?}"
        );

        // 500 streaming sessions and a connect loop through HAProxy.
        let sessions = SessionGroup::start(lb.addr, 0, SESSIONS, Duration::from_millis(250));
        sessions.wait_connected(Duration::from_secs(60)).await;
        let connects = ConnectLoop::start(lb.addr, 4);
        more_connects(&connects, 100, "100 connects before the rolling upgrade").await;

        // The rolling upgrade: each replica in turn hands its listeners to a
        // new process, and its old process drains its sessions.
        let mut new = Vec::new();
        for (i, p) in old.iter().enumerate() {
            let started = Instant::now();
            let next = ProxyProcess::spawn(&args(i)).await;
            assert_eq!((next.listen, next.admin), (p.listen, p.admin));
            eprintln!("replicas: r{i} upgraded in {:?}", started.elapsed());
            new.push(next);
            more_connects(&connects, 200, "200 connects after a replica's upgrade").await;
        }
        for p in &mut old {
            assert!(
                p.child.try_wait().unwrap().is_none(),
                "an old replica must relay its sessions until they end"
            );
        }
        let ended = sessions.finish_counted().await;
        for p in &mut old {
            let status = exited(p, Duration::from_secs(10)).await;
            assert!(status.success(), "an old replica exited with {status}");
        }
        more_connects(
            &connects,
            100,
            "100 connects on the upgraded replicas alone",
        )
        .await;
        let (ok, refused, errors) = connects.finish().await;
        eprintln!(
            "replicas: rolling upgrade under {SESSIONS} sessions: {} clean, {} lost, {} echoes; \
             connect loop: {ok} ok, {refused} failed",
            ended.clean,
            ended.failed.len(),
            ended.echoes
        );
        assert!(ended.failed.is_empty(), "sessions lost: {:?}", ended.failed);
        assert_eq!(ended.clean, SESSIONS);
        assert_eq!(refused, 0, "connects failed: {errors:?}");
        // The health checks never saw a replica unready: its admin listener
        // was handed over with the client listener.
        let log = lb.log();
        assert!(
            !log.contains("is DOWN"),
            "haproxy took a replica out during the rolling upgrade:\n{log}"
        );
        drop(lb);
        drop(new);
    })
    .await;
    db.drop_db().await;
}

/// The restart path without `upgrade_socket`: the replica is set to DRAIN
/// on HAProxy first (no new connections to it, open ones stay), then gets
/// SIGTERM (`/readyz` 503: HAProxy's check marks it DOWN) while its
/// sessions finish; once it exited, it is started again on its ports, set
/// READY, and HAProxy's check brings it back. (SIGTERM alone, without the
/// DRAIN first, fails a few connects: those HAProxy sent before its check
/// noticed, see docs/operations.md.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_replica_leaves_the_load_balancer_and_comes_back() {
    restart_a_replica(Leave::DrainFirst).await;
}

/// The same restart with SIGTERM alone, the replica started with
/// `--shutdown-delay 1s` (more than HAProxy's `inter` × `fall`, 400 ms): its
/// /readyz turns 503 at once while it still serves new clients, so HAProxy
/// takes it out before it refuses any.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_shutdown_delay_alone_fails_no_connect() {
    restart_a_replica(Leave::ShutdownDelay).await;
}

/// How the restarted replica leaves the load balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leave {
    /// Set to DRAIN on HAProxy's runtime API, then SIGTERM.
    DrainFirst,
    /// SIGTERM only; the replica has a `shutdown_delay`.
    ShutdownDelay,
}

async fn restart_a_replica(leave: Leave) {
    init_tracing();
    let Some(bin) = haproxy() else {
        skip_or_fail("haproxy is not installed (Debian: apt-get install haproxy)");
        return;
    };
    let db_name = match leave {
        Leave::DrainFirst => "replicas_drain",
        Leave::ShutdownDelay => "replicas_delay",
    };
    let Some(db) = pg_db(db_name).await else {
        return;
    };
    bounded(Duration::from_secs(240), async {
        let b1 = start_echo().await;
        backends_add(&db.url, &b1.url(), "b1").await;
        let dir = temp_dir(&format!("replicas-{leave:?}"));
        let no_socket = |i: usize, listen: &str, admin: &str| {
            let mut a = replica_args(&db.url, &dir.path().join(format!("r{i}.sock")));
            let n = a.len();
            a.truncate(n - 2); // without --upgrade-socket
            a[2] = listen.to_string();
            a[4] = admin.to_string();
            if leave == Leave::ShutdownDelay {
                a.extend(["--shutdown-delay".to_string(), "1s".to_string()]);
            }
            a
        };
        let r0 = ProxyProcess::spawn(&no_socket(0, "127.0.0.1:0", "127.0.0.1:0")).await;
        let r1 = ProxyProcess::spawn(&no_socket(1, "127.0.0.1:0", "127.0.0.1:0")).await;
        let lb = Haproxy::start(
            &bin,
            dir.path(),
            &[(r0.listen, r0.admin), (r1.listen, r1.admin)],
        );
        eventually(
            Duration::from_secs(10),
            "a session through haproxy",
            || async { support::db::short_session(lb.addr).await.is_ok() },
        )
        .await;
        let sessions = SessionGroup::start(lb.addr, 0, SESSIONS, Duration::from_millis(250));
        sessions.wait_connected(Duration::from_secs(60)).await;
        let connects = ConnectLoop::start(lb.addr, 4);
        more_connects(&connects, 100, "100 connects before the drain").await;

        let mut r0 = r0;
        if leave == Leave::DrainFirst {
            let answer = lb.command("set server replicas/r0 state drain");
            assert!(answer.trim().is_empty(), "haproxy: {answer}");
        }
        r0.sigterm();
        let log = lb.log.clone();
        let out = eventually(Duration::from_secs(5), "haproxy takes r0 out", || {
            let log = log.clone();
            async move { log.lock().unwrap().contains("r0 is DOWN") }
        })
        .await;
        more_connects(&connects, 200, "200 connects while r0 drains").await;
        assert!(
            r0.child.try_wait().unwrap().is_none(),
            "r0 relays its sessions"
        );
        let ended = sessions.finish_counted().await;
        let status = exited(&mut r0, Duration::from_secs(10)).await;
        assert!(status.success(), "r0 exited with {status}");
        let (listen, admin) = (r0.listen.to_string(), r0.admin.to_string());
        let r0 = ProxyProcess::spawn(&no_socket(0, &listen, &admin)).await;
        if leave == Leave::DrainFirst {
            let answer = lb.command("set server replicas/r0 state ready");
            assert!(answer.trim().is_empty(), "haproxy: {answer}");
        }
        let back = eventually(Duration::from_secs(5), "haproxy brings r0 back", || {
            let log = log.clone();
            async move { log.lock().unwrap().contains("r0 is UP") }
        })
        .await;
        more_connects(&connects, 100, "100 connects with r0 back").await;
        let (ok, refused, errors) = connects.finish().await;
        eprintln!(
            "replicas (restart r0, {leave:?}): out of haproxy {out:?} after SIGTERM, back {back:?} \
             after its restart; {SESSIONS} sessions: {} clean, {} lost; connect loop: {ok} ok, \
             {refused} failed",
            ended.clean,
            ended.failed.len()
        );
        assert!(ended.failed.is_empty(), "sessions lost: {:?}", ended.failed);
        assert_eq!(refused, 0, "connects failed: {errors:?}");
        drop((r0, r1, lb));
    })
    .await;
    db.drop_db().await;
}
