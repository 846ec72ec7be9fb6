//! For the `db_*` integration tests: a SQLite file's URL, a fresh
//! PostgreSQL database per test (skipped where none answers, unless
//! `REQUIRE_POSTGRES=1`), echo backends, a proxy in process, a streaming
//! WebSocket client that checks every echo, the admin listener's `/pools` and
//! `/metrics` as JSON and numbers, and a TCP forwarder to cut a database off.
//! Tracing, bounded polling and raw HTTP are the shared ones of `support`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use sqlx::Connection;
use sttproxy::backend::{BackendSpec, Reuse};
use sttproxy::config::Settings;
use sttproxy::config::db::DbUrl;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

use super::{eventually, http_get};

/// Where CI's PostgreSQL is when `DATABASE_URL` is not set.
pub const PG_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/test";

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn unique() -> u64 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// `sqlite://` URL of the database file `file` in `dir`.
pub fn sqlite_url(dir: &Path, file: &str) -> String {
    DbUrl::sqlite_file(&dir.join(file))
}

/// A PostgreSQL database made for one test; [`PgTestDb::drop_db`] removes it.
#[derive(Debug)]
pub struct PgTestDb {
    pub url: String,
    pub name: String,
    admin_url: String,
}

fn pg_admin_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| PG_DEFAULT.to_string())
}

/// `url` with its database name replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// `url` with its host and port replaced by `addr`.
pub fn with_host(url: &str, addr: SocketAddr) -> String {
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[authority_start..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let userinfo = authority
        .rfind('@')
        .map(|at| &authority[..=at])
        .unwrap_or("");
    format!(
        "{}{userinfo}{addr}{}",
        &url[..authority_start],
        &rest[authority_end..]
    )
}

/// The address of the PostgreSQL server in `url` (host:port, port 5432 by default).
pub fn pg_addr(url: &str) -> SocketAddr {
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[authority_start..];
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let host_port = authority
        .rfind('@')
        .map_or(authority, |at| &authority[at + 1..]);
    let host_port = if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:5432")
    };
    let host_port = host_port.replace("localhost", "127.0.0.1");
    host_port.parse().unwrap()
}

/// A fresh database for `test` on the PostgreSQL at `DATABASE_URL`, or `None`
/// (with the reason printed) where no PostgreSQL answers. With
/// `REQUIRE_POSTGRES=1` a missing PostgreSQL fails the test instead.
pub async fn pg_db(test: &str) -> Option<PgTestDb> {
    let admin_url = pg_admin_url();
    let connected = tokio::time::timeout(
        Duration::from_secs(5),
        sqlx::PgConnection::connect(&admin_url),
    )
    .await;
    let mut conn = match connected {
        Ok(Ok(c)) => c,
        other => {
            let why = match other {
                Ok(Err(e)) => e.to_string(),
                _ => "no answer within 5s".to_string(),
            };
            if std::env::var("REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
                panic!("REQUIRE_POSTGRES=1 but PostgreSQL at {admin_url} is not usable: {why}");
            }
            eprintln!(
                "skipping {test}: no PostgreSQL at {admin_url} ({why}); set DATABASE_URL, \
                 or REQUIRE_POSTGRES=1 to make this a failure"
            );
            return None;
        }
    };
    sweep_stale_databases(&mut conn).await;
    let name = test_database_name(test, unix_now());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut conn)
        .await
        .unwrap();
    let _ = conn.close().await;
    Some(PgTestDb {
        url: with_database(&admin_url, &name),
        name,
        admin_url,
    })
}

/// Every test database's name starts with this; [`sweep_stale_databases`]
/// looks at no other name.
const TEST_DB_PREFIX: &str = "sttproxy_test_";

/// A test database older than this was left behind by a test process that
/// died: every test here is bounded far below it.
const STALE_AFTER_SECS: u64 = 3 * 3600;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `sttproxy_test_<created, unix seconds>_<random>_<test>`: unique across
/// processes, containers and machines sharing one PostgreSQL server (a PID is
/// not: another PID namespace may use the same one), and dated so that a
/// sweep can tell an abandoned database from one a test elsewhere is using.
fn test_database_name(test: &str, created: u64) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(unique());
    hasher.write_u32(std::process::id());
    let random = hasher.finish() as u32;
    format!(
        "{TEST_DB_PREFIX}{created}_{random:08x}_{}",
        test.chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(24)
            .collect::<String>()
    )
    .to_lowercase()
}

/// When the test database `name` was created, if it is one of ours.
fn test_database_created(name: &str) -> Option<u64> {
    name.strip_prefix(TEST_DB_PREFIX)?
        .split('_')
        .next()?
        .parse()
        .ok()
}

/// Drop test databases left behind by test processes that died before their
/// `drop_db`. Only age tells: the server may be shared with test runs this
/// process cannot see (other containers, other machines), so whether some
/// PID is alive here says nothing about a database's owner.
async fn sweep_stale_databases(conn: &mut sqlx::PgConnection) {
    let Ok(names) = sqlx::query_scalar::<_, String>(
        "SELECT datname FROM pg_database WHERE datname LIKE 'sttproxy\\_test\\_%'",
    )
    .fetch_all(&mut *conn)
    .await
    else {
        return;
    };
    let now = unix_now();
    for name in names {
        let stale = test_database_created(&name)
            .is_some_and(|created| now.saturating_sub(created) > STALE_AFTER_SECS);
        if stale {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
            )))
            .execute(&mut *conn)
            .await;
        }
    }
}

impl PgTestDb {
    pub async fn drop_db(self) {
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.admin_url).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            )))
            .execute(&mut conn)
            .await;
            let _ = conn.close().await;
        }
    }
}

/// Proxy settings for tests: ephemeral ports on 127.0.0.1, the backend table
/// at `db`, polled every `sync_interval`.
pub fn settings(db: &str, sync_interval: Duration) -> Settings {
    Settings {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin: SocketAddr::from(([127, 0, 0, 1], 0)),
        acquire_timeout: Duration::from_secs(5),
        drain_timeout: Duration::from_secs(5),
        shutdown_grace: Duration::from_secs(5),
        reconcile_interval: Duration::from_secs(1),
        backend_connect_timeout: Duration::from_secs(2),
        backend_handshake_timeout: Duration::from_secs(2),
        db: Some(db.to_string()),
        sync_interval,
        ..Settings::default()
    }
}

/// A backend spec for an echo backend.
pub fn spec(id: &str, url: &str, target: usize, max: usize) -> BackendSpec {
    BackendSpec {
        id: id.to_string(),
        url: url.to_string(),
        target_size: target,
        max_size: max,
        weight: 1,
        enabled: true,
        reuse: Reuse::Fenced,
        group: "default".to_string(),
    }
}

pub async fn start_echo() -> echo_backend::EchoBackend {
    echo_backend::spawn(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        echo_backend::Config::default(),
    )
    .await
    .unwrap()
}

/// `GET /pools`, parsed.
pub async fn pools(admin: SocketAddr) -> Value {
    let r = http_get(admin, "/pools").await;
    assert_eq!(r.status, 200, "/pools: {}", r.body);
    serde_json::from_str(&r.body).unwrap()
}

/// The `/pools` entry of backend `id` among the routed backends.
pub fn pool<'a>(pools: &'a Value, id: &str) -> Option<&'a Value> {
    pools["backends"].as_array()?.iter().find(|b| b["id"] == id)
}

/// A number field of a `/pools` entry.
pub fn field(pool: &Value, name: &str) -> u64 {
    pool[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {pool}"))
}

/// The ids of the routed backends.
pub fn ids(pools: &Value) -> Vec<String> {
    pools["backends"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| b["id"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The value of an unlabelled metric in `/metrics`.
pub async fn metric(admin: SocketAddr, name: &str) -> Option<f64> {
    let body = http_get(admin, "/metrics").await.body;
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// One streaming client session's result.
#[derive(Debug, Clone, Copy, Default)]
pub struct Streamed {
    pub sent: u64,
    pub received: u64,
}

/// A client session that streams one small binary message every `period`
/// until `stop` fires, then ends gracefully (`session.end`, then
/// `session.ended` and close 1000). Every echo must come back, in order, and
/// nothing may end the session early. `connected` is bumped once the first
/// echo came back (the session holds a backend connection).
pub async fn stream_session(
    listen: SocketAddr,
    tag: u32,
    period: Duration,
    stop: CancellationToken,
    connected: Arc<AtomicUsize>,
) -> Result<Streamed, String> {
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(format!("ws://{listen}/v1/stream")),
    )
    .await
    .map_err(|_| format!("session {tag}: connect timed out"))?
    .map_err(|e| format!("session {tag}: connect: {e}"))?;
    let (mut tx, mut rx) = ws.split();
    let mut sent: u64 = 0;
    let mut received: u64 = 0;
    let mut ticker = tokio::time::interval(period);
    let payload = |seq: u64| {
        let mut p = Vec::with_capacity(64);
        p.extend_from_slice(&tag.to_be_bytes());
        p.extend_from_slice(&seq.to_be_bytes());
        p.resize(64, 0xA5);
        p
    };
    let check = |data: &[u8], expected: u64| -> Result<(), String> {
        let got_tag = u32::from_be_bytes(data[..4].try_into().map_err(|_| "short echo")?);
        let got_seq = u64::from_be_bytes(data[4..12].try_into().map_err(|_| "short echo")?);
        if got_tag != tag || got_seq != expected {
            return Err(format!(
                "session {tag}: echo out of order or foreign: got ({got_tag}, {got_seq}), expected ({tag}, {expected})"
            ));
        }
        Ok(())
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {
                tx.send(Message::binary(payload(sent)))
                    .await
                    .map_err(|e| format!("session {tag}: send: {e}"))?;
                sent += 1;
            }
            msg = rx.next() => match msg {
                Some(Ok(Message::Binary(data))) => {
                    check(&data, received)?;
                    received += 1;
                    if received == 1 {
                        connected.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Some(Ok(Message::Text(t))) if t.contains("session.started") => {}
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                other => return Err(format!("session {tag}: ended early: {other:?}")),
            }
        }
    }
    tx.send(Message::text(r#"{"type":"session.end"}"#))
        .await
        .map_err(|e| format!("session {tag}: send session.end: {e}"))?;
    let mut ended = false;
    let finish = async {
        loop {
            match rx.next().await {
                Some(Ok(Message::Binary(data))) => {
                    check(&data, received)?;
                    received += 1;
                }
                Some(Ok(Message::Text(t))) if t.contains("session.ended") => ended = true,
                Some(Ok(
                    Message::Text(_) | Message::Ping(_) | Message::Pong(_) | Message::Frame(_),
                )) => {}
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map(|f| f.code);
                    if code != Some(CloseCode::Normal) {
                        return Err(format!("session {tag}: closed with {code:?}"));
                    }
                    return Ok(());
                }
                None => return Err(format!("session {tag}: no close frame")),
                Some(Err(e)) => return Err(format!("session {tag}: {e}")),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), finish)
        .await
        .map_err(|_| format!("session {tag}: no close within 10s of session.end"))??;
    if !ended {
        return Err(format!("session {tag}: no session.ended"));
    }
    if received != sent {
        return Err(format!("session {tag}: sent {sent}, received {received}"));
    }
    Ok(Streamed { sent, received })
}

/// One short session: a message, its echo, a graceful end.
pub async fn short_session(listen: SocketAddr) -> Result<(), String> {
    let stop = CancellationToken::new();
    let connected = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn(stream_session(
        listen,
        u32::MAX,
        Duration::from_millis(5),
        stop.clone(),
        connected.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(5);
    while connected.load(Ordering::SeqCst) == 0 && Instant::now() < deadline && !task.is_finished()
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    stop.cancel();
    task.await.map_err(|e| e.to_string())?.map(|_| ())
}

/// How a [`SessionGroup`] ended.
#[derive(Debug, Default)]
pub struct Ended {
    pub clean: usize,
    pub echoes: u64,
    pub failed: Vec<String>,
}

/// Streaming sessions started together and stopped together.
pub struct SessionGroup {
    pub stop: CancellationToken,
    pub connected: Arc<AtomicUsize>,
    tasks: JoinSet<Result<Streamed, String>>,
    pub n: usize,
}

impl SessionGroup {
    pub fn start(listen: SocketAddr, first_tag: u32, n: usize, period: Duration) -> Self {
        let stop = CancellationToken::new();
        let connected = Arc::new(AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        for i in 0..n {
            tasks.spawn(stream_session(
                listen,
                first_tag + i as u32,
                period,
                stop.clone(),
                connected.clone(),
            ));
        }
        Self {
            stop,
            connected,
            tasks,
            n,
        }
    }

    /// Wait until every session got its first echo.
    pub async fn wait_connected(&self, limit: Duration) {
        let c = self.connected.clone();
        let n = self.n;
        eventually(limit, "every session streaming", || {
            let c = c.clone();
            async move { c.load(Ordering::SeqCst) == n }
        })
        .await;
    }

    /// End every session gracefully and count how each ended (rather than
    /// panicking at the first failure), for a test that reports figures.
    pub async fn finish_counted(mut self) -> Ended {
        self.stop.cancel();
        let mut out = Ended::default();
        while let Some(r) = self.tasks.join_next().await {
            match r.unwrap() {
                Ok(s) => {
                    out.clean += 1;
                    out.echoes += s.received;
                }
                Err(e) => out.failed.push(e),
            }
        }
        out
    }

    /// End every session gracefully; each must have lost nothing.
    pub async fn finish(mut self) -> Vec<Streamed> {
        self.stop.cancel();
        let mut out = Vec::new();
        while let Some(r) = self.tasks.join_next().await {
            match r.unwrap() {
                Ok(s) => out.push(s),
                Err(e) => panic!("{e}"),
            }
        }
        out
    }
}

/// A TCP forwarder to `target`: stopping it cuts every forwarded connection
/// (the database seems gone to whoever uses it); it can start again on the
/// same port. Pausing it stops forwarding without closing anything: every
/// connection, open or new, goes half-open (bytes are accepted by the kernel
/// and never answered, no FIN, no RST) until it resumes.
pub struct Forwarder {
    pub addr: SocketAddr,
    target: SocketAddr,
    tasks: Option<JoinSet<()>>,
    stop: CancellationToken,
    paused: tokio::sync::watch::Sender<bool>,
}

impl Forwarder {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut f = Self {
            addr,
            target,
            tasks: None,
            stop: CancellationToken::new(),
            paused: tokio::sync::watch::Sender::new(false),
        };
        f.serve(listener);
        f
    }

    fn serve(&mut self, listener: TcpListener) {
        let stop = CancellationToken::new();
        self.stop = stop.clone();
        let target = self.target;
        let paused = self.paused.clone();
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    accepted = listener.accept() => {
                        let Ok((inbound, _)) = accepted else { continue };
                        let paused = paused.subscribe();
                        conns.spawn(async move {
                            if let Ok(outbound) = TcpStream::connect(target).await {
                                let (in_read, in_write) = inbound.into_split();
                                let (out_read, out_write) = outbound.into_split();
                                tokio::join!(
                                    pump(in_read, out_write, paused.clone()),
                                    pump(out_read, in_write, paused),
                                );
                            }
                        });
                    }
                }
            }
            // Dropping the set aborts every forwarded connection.
            conns.abort_all();
            while conns.join_next().await.is_some() {}
        });
        self.tasks = Some(tasks);
    }

    /// Stop listening and cut every connection.
    pub async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(mut tasks) = self.tasks.take() {
            while tasks.join_next().await.is_some() {}
        }
    }

    /// Listen again on the same port.
    pub async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    /// Stop forwarding, closing nothing (see [`Forwarder`]).
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    /// Forward again, what was held first.
    pub fn resume(&self) {
        self.paused.send_replace(false);
    }
}

/// Copy `from` to `to` while not paused; bytes read just before a pause are
/// held until it ends. Ends when either side fails or closes.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut paused: tokio::sync::watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // Read nothing more once paused (a read is cancel-safe).
            _ = paused.wait_for(|p| *p) => continue,
        };
        if paused.wait_for(|p| !*p).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
