//! Shared helpers of the proxy's integration tests, in one place: echo
//! backends and an in-process proxy on ephemeral ports, bounded polling,
//! temporary directories (tempfile), admin scraping over plain HTTP,
//! WebSocket client helpers, and a raw client for close codes that
//! tungstenite's client refuses to report (1014). `db` adds what the `db_*`
//! tests need (databases, a forwarder); `tls`, `raw_backend` and `clients`
//! what theirs do.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod clients;
pub mod db;
pub mod fleet;
pub mod listen;
pub mod raw;
pub mod raw_backend;
pub mod tls;

use std::collections::BTreeMap;
use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use echo_backend::{Config, EchoBackend};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use sttproxy::Proxy;
use sttproxy::config::{BackendEntry, Settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A tungstenite client connection to the proxy.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Upper bound for one test, whatever happens.
pub const TEST_LIMIT: Duration = Duration::from_secs(30);
/// Upper bound for one expected event (a message, a close, a state change).
pub const STEP: Duration = Duration::from_secs(5);

/// Logs for tests: `RUST_LOG` honoured (default `warn`), written through the
/// test harness's capture.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Run a whole test body within `limit`.
pub async fn bounded<F: Future>(limit: Duration, f: F) -> F::Output {
    match tokio::time::timeout(limit, f).await {
        Ok(out) => out,
        Err(_) => panic!("test did not finish within {limit:?}"),
    }
}

/// Await `f` for at most `limit`; panic naming `what` if it takes longer.
pub async fn within<F: Future>(limit: Duration, what: impl Display, f: F) -> F::Output {
    match tokio::time::timeout(limit, f).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Poll `cond` every 10 ms until it holds; panic naming `what` once `limit`
/// has passed. Returns how long it took.
pub async fn eventually<F, Fut>(limit: Duration, what: impl Display, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    let deadline = started + limit;
    loop {
        if cond().await {
            return started.elapsed();
        }
        if Instant::now() >= deadline {
            panic!("not reached within {limit:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An echo backend's configuration: every message back as it came.
pub fn echo() -> Config {
    Config {
        mode: echo_backend::Mode::Echo,
        ..Config::default()
    }
}

/// A fresh directory for one test's files, removed when dropped (also when
/// the test panics).
pub fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("sttproxy-{tag}-"))
        .tempdir()
        .expect("creating a temporary directory")
}

/// Replace `path` with `bytes` atomically (write a sibling, rename it over),
/// as a deploy does: a reader sees the old file or the new one, never half.
pub fn replace_file(path: &std::path::Path, bytes: &[u8]) {
    let tmp = path.with_extension(format!("tmp{}", rand::random::<u32>()));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Proxy settings for tests: ephemeral ports on 127.0.0.1, short timeouts,
/// small pools (target 2, max 4 unless a backend says otherwise).
///
/// `STTPROXY_TEST_SESSION_THREADS=N` runs the sessions on N session threads
/// (docs/relay.md#session-threads): .ci/run runs the hostile-peer and TLS
/// tests a second time so, with 2.
pub fn test_settings() -> Settings {
    let session_threads = std::env::var("STTPROXY_TEST_SESSION_THREADS")
        .ok()
        .map(|v| {
            v.parse::<usize>()
                .expect("STTPROXY_TEST_SESSION_THREADS: a number of threads")
        });
    Settings {
        session_threads,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin: SocketAddr::from(([127, 0, 0, 1], 0)),
        handshake_timeout: Duration::from_secs(5),
        acquire_timeout: Duration::from_secs(2),
        drain_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(30),
        send_timeout: Duration::from_secs(5),
        shutdown_grace: Duration::from_secs(2),
        health_interval: Duration::from_secs(5),
        health_timeout: Duration::from_secs(1),
        reconcile_interval: Duration::from_secs(1),
        backend_connect_timeout: Duration::from_secs(2),
        backend_handshake_timeout: Duration::from_secs(2),
        default_target_size: 2,
        default_max_size: 4,
        ..Settings::default()
    }
}

/// Echo backends and a proxy in front of them, all in this process.
pub struct Harness {
    pub proxy: Option<Proxy>,
    pub backends: Vec<EchoBackend>,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

impl Harness {
    /// Start `n` echo backends with `config` (backend ids `b0`, `b1`, …) and a
    /// proxy with [`test_settings`] changed by `tweak` (which may also change
    /// the backend entries).
    pub async fn start(n: usize, config: Config, tweak: impl FnOnce(&mut Settings)) -> Self {
        init_tracing();
        let mut backends = Vec::with_capacity(n);
        for _ in 0..n {
            backends.push(
                echo_backend::spawn(SocketAddr::from(([127, 0, 0, 1], 0)), config.clone())
                    .await
                    .expect("starting an echo backend"),
            );
        }
        let mut settings = test_settings();
        settings.backends = backends
            .iter()
            .enumerate()
            .map(|(i, b)| BackendEntry {
                url: b.url(),
                id: Some(format!("b{i}")),
                target_size: None,
                max_size: None,
                weight: None,
                reuse: None,
                group: None,
            })
            .collect();
        tweak(&mut settings);
        let proxy = Proxy::start(&settings).await.expect("starting the proxy");
        Self {
            listen: proxy.listen_addr(),
            admin: proxy.admin_addr(),
            proxy: Some(proxy),
            backends,
        }
    }

    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("proxy already stopped")
    }

    /// `ws://ADDR/v1/stream`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/stream", self.listen)
    }

    /// Wait until every pool holds `target` idle connections.
    pub async fn wait_warm(&self) {
        let backends = self.proxy().backends().clone();
        eventually(STEP, "every pool warm (idle == target)", || {
            let all = backends.all();
            async move {
                all.iter().all(|b| {
                    let s = b.snapshot();
                    s.idle == s.target && s.live == s.target
                })
            }
        })
        .await;
    }

    /// Sum of the dials every echo backend accepted.
    pub fn total_dials(&self) -> u64 {
        self.backends.iter().map(|b| b.stats().dials).sum()
    }

    /// `GET /pools`, parsed.
    pub async fn pools(&self) -> Pools {
        pools(self.admin).await
    }

    /// `GET /metrics`, parsed.
    pub async fn metrics(&self) -> Scrape {
        metrics(self.admin).await
    }

    /// Graceful proxy shutdown, then the backends.
    pub async fn stop(mut self) {
        if let Some(proxy) = self.proxy.take() {
            within(STEP, "proxy shutdown", proxy.shutdown()).await;
        }
        for b in &self.backends {
            within(STEP, "echo backend shutdown", b.shutdown()).await;
        }
    }
}

// ---------------------------------------------------------------- HTTP

/// A response read off a raw HTTP/1.1 exchange.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
    /// The connection, after the response (the server may keep it open).
    pub stream: TcpStream,
}

impl HttpResponse {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        raw::header_in(&self.head, name)
    }

    /// Whether the server closes the connection within `limit` after this
    /// response (nothing more arrives, then end of stream).
    pub async fn server_closes_within(&mut self, limit: Duration) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(limit, self.stream.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }
}

/// Send `request` verbatim and read one response: its head, then a body of
/// `Content-Length` bytes (or up to the end of the stream without one).
pub async fn http_request(addr: SocketAddr, request: &str) -> HttpResponse {
    within(STEP, format_args!("HTTP exchange with {addr}"), async {
        let mut stream = TcpStream::connect(addr).await.expect("HTTP connect");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("HTTP write");
        let mut raw = Vec::new();
        let mut chunk = [0u8; 8192];
        let mut head_end = None;
        loop {
            if head_end.is_none() {
                head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
            }
            if let Some(end) = head_end {
                let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
                let length = head.lines().find_map(|l| {
                    l.strip_prefix("content-length:")
                        .and_then(|v| v.trim().parse::<usize>().ok())
                });
                if length.is_some_and(|len| raw.len() >= end + len) {
                    break;
                }
            }
            let n = stream.read(&mut chunk).await.expect("HTTP read");
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&chunk[..n]);
        }
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("malformed HTTP response: {text:?}"));
        HttpResponse {
            status: raw::status_of(head),
            head: head.to_string(),
            body: body.to_string(),
            stream,
        }
    })
    .await
}

/// `GET path` with `Connection: close`.
pub async fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    http_request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// The `/pools` document.
#[derive(Debug, Clone)]
pub struct Pools(pub Value);

impl Pools {
    /// The entry of backend `id`.
    pub fn backend(&self, id: &str) -> &Value {
        self.0["backends"]
            .as_array()
            .expect("/pools has a backends array")
            .iter()
            .find(|b| b["id"] == id)
            .unwrap_or_else(|| panic!("no backend {id} in /pools: {}", self.0))
    }

    /// Field `field` of backend `id` as a number.
    pub fn get(&self, id: &str, field: &str) -> u64 {
        self.backend(id)[field]
            .as_u64()
            .unwrap_or_else(|| panic!("/pools {id}.{field} is not a number: {}", self.0))
    }

    /// Field `field` summed over every backend.
    pub fn sum(&self, field: &str) -> u64 {
        self.0["backends"]
            .as_array()
            .expect("/pools has a backends array")
            .iter()
            .map(|b| b[field].as_u64().expect("a number"))
            .sum()
    }
}

pub async fn pools(admin: SocketAddr) -> Pools {
    let r = http_get(admin, "/pools").await;
    assert_eq!(r.status, 200, "/pools: {r:?}");
    Pools(serde_json::from_str(&r.body).expect("/pools is JSON"))
}

/// A `/metrics` scrape: series (name with its labels, as printed) → value.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub series: BTreeMap<String, f64>,
    pub text: String,
}

impl Scrape {
    pub fn parse(text: &str) -> Self {
        let series = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_string(), value.parse().ok()?))
            })
            .collect();
        Self {
            series,
            text: text.to_string(),
        }
    }

    /// The value of a series that must be present, e.g.
    /// `sttproxy_pool_live{backend="b0"}`.
    pub fn get(&self, series: &str) -> f64 {
        *self
            .series
            .get(series)
            .unwrap_or_else(|| panic!("no series {series} in /metrics:\n{}", self.text))
    }

    /// The value of a labelled counter that only appears once counted (0 if absent).
    pub fn count(&self, series: &str) -> f64 {
        self.series.get(series).copied().unwrap_or(0.0)
    }
}

pub async fn metrics(admin: SocketAddr) -> Scrape {
    let r = http_get(admin, "/metrics").await;
    assert_eq!(r.status, 200, "/metrics: {r:?}");
    Scrape::parse(&r.body)
}

// ---------------------------------------------------------------- WebSocket (tungstenite)

/// A tungstenite client session on `url` (`ws://ADDR/PATH?QUERY`).
///
/// The opening handshake is done by [`raw::handshake`] (the RFC 6455 §4.1
/// checks), not by tungstenite's client, which is stricter about
/// `Connection`: that strictness is tested once, by
/// `tungstenite_clients_accept_the_upgrade_response`, so a regression there
/// fails that test alone. Everything after the 101 is tungstenite's.
pub async fn connect(url: &str) -> Ws {
    within(STEP, format!("connecting to {url}"), async {
        let rest = url
            .strip_prefix("ws://")
            .unwrap_or_else(|| panic!("not a ws:// url: {url}"));
        let (authority, target) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr: SocketAddr = authority
            .parse()
            .unwrap_or_else(|e| panic!("{url}: address {authority}: {e}"));
        let upgraded = raw::handshake(addr, target)
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
        WebSocketStream::from_partially_read(
            MaybeTlsStream::Plain(upgraded.stream),
            upgraded.read_ahead,
            Role::Client,
            None,
        )
        .await
    })
    .await
}

/// The next text or binary message; pings and pongs are skipped.
pub async fn recv_data(ws: &mut Ws) -> Message {
    within(STEP, "waiting for a data message", async {
        loop {
            match ws.next().await {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => return m,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(f))) => panic!("expected data, got close {f:?}"),
                Some(Err(e)) => panic!("expected data, got error {e}"),
                None => panic!("expected data, the connection ended"),
            }
        }
    })
    .await
}

/// The next message, which must be a JSON text.
pub async fn recv_json(ws: &mut Ws) -> Value {
    match recv_data(ws).await {
        Message::Text(t) => serde_json::from_str(t.as_str())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", t.as_str())),
        Message::Binary(b) => panic!("expected JSON text, got {} binary bytes", b.len()),
        _ => unreachable!(),
    }
}

/// The backend's `session.started`, relayed by the proxy; returns the session id.
pub async fn expect_started(ws: &mut Ws) -> String {
    let v = recv_json(ws).await;
    assert_eq!(v["type"], "session.started", "first message: {v}");
    v["session"]
        .as_str()
        .expect("session.started carries the session id")
        .to_string()
}

/// Read until the close frame; data before it is an error. Returns the frame
/// and checks that the connection ends after it.
pub async fn expect_close(ws: &mut Ws) -> Option<CloseFrame> {
    within(STEP, "waiting for a close frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(f))) => {
                    // tungstenite answers the close; then the stream ends.
                    if let Some(Ok(m)) = ws.next().await {
                        panic!("message after the close frame: {m:?}");
                    }
                    return f;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(m)) => panic!("expected a close frame, got {m:?}"),
                Some(Err(e)) => panic!("expected a close frame, got error {e}"),
                None => panic!("expected a close frame, the connection ended without one"),
            }
        }
    })
    .await
}

/// The close code of the next close frame (panics if there is none).
pub async fn expect_close_code(ws: &mut Ws) -> u16 {
    let frame = expect_close(ws).await.expect("a close frame with a code");
    frame.code.into()
}

pub fn session_end() -> Message {
    Message::text(r#"{"type":"session.end"}"#)
}

/// End a session gracefully: `session.end`, then (after any remaining
/// results, returned) `session.ended` for `id`, then close 1000.
pub async fn end_session(ws: &mut Ws, id: &str) -> Vec<Value> {
    ws.send(session_end()).await.expect("sending session.end");
    let mut results = Vec::new();
    loop {
        let v = recv_json(ws).await;
        if v["type"] == "session.ended" {
            assert_eq!(v["session"], id, "session.ended for another session: {v}");
            break;
        }
        results.push(v);
    }
    assert_eq!(
        expect_close_code(ws).await,
        1000,
        "close code after session.ended"
    );
    results
}

// ---------------------------------------------------------------- paths

/// Cargo's target directory (the one the test binary was built into).
pub fn target_dir() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_sttproxy"));
    bin.parent()
        .and_then(|p| p.parent())
        .expect("the binary lives in target/<profile>/")
        .to_path_buf()
}

/// The workspace root.
pub fn workspace_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("proxy/ is inside the workspace")
        .to_path_buf()
}

// ---------------------------------------------------------------- the binary

/// A child's output (stderr, say), collected line by line on a thread of
/// its own so that the child never blocks on a full pipe.
pub fn collect_lines(
    out: impl std::io::Read + Send + 'static,
) -> std::sync::Arc<std::sync::Mutex<String>> {
    use std::io::BufRead;
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let collected = log.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let mut log = collected.lock().unwrap_or_else(|p| p.into_inner());
            log.push_str(&line);
            log.push('\n');
        }
    });
    log
}

/// The real `sttproxy` binary as a child process; killed on drop if still running.
pub struct ProxyProcess {
    pub child: std::process::Child,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    /// The child's working directory, removed on drop.
    cwd: PathBuf,
}

impl ProxyProcess {
    /// Spawn `sttproxy ARGS` and wait for its "listening" line.
    pub async fn spawn(args: &[String]) -> Self {
        use std::io::BufRead;
        use std::process::{Command, Stdio};

        // Its own working directory, and a throwaway in-memory backend table
        // seeded from --backend on every start: a run never reads the backend
        // table of an earlier run, nor leaves a database in the source tree.
        let cwd = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "sttproxy-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&cwd).expect("creating the child's directory");
        let mut child = Command::new(env!("CARGO_BIN_EXE_sttproxy"))
            .args(args)
            .current_dir(&cwd)
            .env("STTPROXY_DB", "sqlite::memory:")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the sttproxy binary");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = collect_lines(stderr);
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let mut process = Self {
            child,
            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
            stderr: log,
            cwd,
        };
        let line = match tokio::time::timeout(Duration::from_secs(10), rx).await {
            Ok(Ok(Some(Ok(line)))) => line,
            other => panic!(
                "sttproxy printed no listening line ({other:?}); stderr:\n{}",
                process.stderr_log()
            ),
        };
        let (listen, admin) = line
            .strip_prefix("sttproxy listening on ws://")
            .and_then(|rest| rest.split_once(", admin on http://"))
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"));
        process.listen = listen.parse().expect("listen address");
        process.admin = admin.parse().expect("admin address");
        process
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the child wrote to stderr so far.
    pub fn stderr_log(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Send SIGTERM (with kill(1), so the tests need no unsafe code).
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Send signal `name` (`TERM`, `HUP`, ...) with kill(1).
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(
            status.success(),
            "kill -{name} {} failed: {status}",
            self.pid()
        );
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- sttproxy stderr ---\n{}", self.stderr_log());
        }
        let _ = std::fs::remove_dir_all(&self.cwd);
    }
}

/// Once `answered` health pings of backend `b0` were answered, stop its pongs
/// until `n` of its idle connections are discarded, then answer again (so
/// replacements stay). The discards must all come within one health round:
/// health_interval 300 ms (+10 % jitter) + health_timeout 200 ms, plus slack
/// for a loaded machine; idle connections pinged one after the other would
/// take a health_timeout each.
pub async fn silence_until_discarded(h: &Harness, answered: u64, n: u64) {
    let b = &h.backends[0];
    eventually(
        STEP,
        format_args!("{answered} health pings answered"),
        || async { b.stats().pings_answered >= answered },
    )
    .await;
    b.set_pong_delay(Duration::from_secs(5));
    let took = eventually(
        STEP,
        format_args!("{n} silent idle connections discarded"),
        || async { h.pools().await.get("b0", "discarded_total") >= n },
    )
    .await;
    b.set_pong_delay(Duration::ZERO);
    let bound = Duration::from_millis(330 + 200);
    let slack = Duration::from_millis(250);
    assert!(
        took <= bound + slack,
        "{n} silent idle connections discarded after {took:?}, bound {bound:?} (+{slack:?} slack)"
    );
}

/// The health check's promise, on a harness with one backend `b0` (target 1,
/// health_interval 300 ms, health_timeout 200 ms), warm: once its backend
/// stops answering pings, the idle connection is discarded within
/// health_interval (+10 % jitter) + health_timeout and a replacement dialed.
pub async fn a_silent_idle_connection_is_discarded_and_replaced(h: &Harness) {
    let b = &h.backends[0];
    eventually(STEP, "a first health ping answered", || async {
        b.stats().pings_answered >= 1
    })
    .await;
    assert_eq!(b.stats().dials, 1);
    silence_until_discarded(h, 1, 1).await;
    eventually(
        STEP,
        "a replacement dialed, live back at target",
        || async {
            let p = h.pools().await;
            b.stats().dials >= 2 && p.get("b0", "live") == 1 && p.get("b0", "idle") == 1
        },
    )
    .await;
    let m = h.metrics().await;
    assert!(m.get(r#"sttproxy_health_check_failures_total{backend="b0"}"#) >= 1.0);
}
