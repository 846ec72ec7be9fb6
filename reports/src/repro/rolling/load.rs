//! The rolling scenario's own load, through the load balancer: streaming
//! sessions that must survive both hand-overs, and loops of short sessions
//! that count every failed connect. Sampled every [`SAMPLE_EVERY`] so the
//! chart shows the sessions open and the connects a second across the
//! hand-overs.
//!
//! It runs on a tokio runtime of its own, on a thread of its own:
//! `repro`'s main thread must stay free to start processes and time them.
//! loadgen is not used: its results say how sessions ended, not how many
//! were open at a given moment nor when a connect failed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// How often the counters are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// Bound on a TCP connect plus the WebSocket handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on `session.ended` and the Close after `session.end`.
const END_TIMEOUT: Duration = Duration::from_secs(10);
/// Error texts kept (the counts by kind are complete).
const KEEP_ERRORS: usize = 20;

/// What the load does.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    #[serde(skip)]
    pub addr: SocketAddr,
    /// Streaming sessions, started evenly over `ramp`.
    pub sessions: usize,
    pub ramp: Duration,
    /// One 64-byte binary message per session this often, echoed back.
    pub period: Duration,
    /// Loops of short sessions (connect, one echo, graceful end), back to back.
    pub connect_loops: usize,
}

/// The counters, at one moment.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sample {
    /// Seconds since the load started.
    pub t: f64,
    /// Streaming sessions connected and not yet ended.
    pub open: u64,
    /// Short sessions so far: ended clean, failed.
    pub connects_ok: u64,
    pub connects_failed: u64,
    /// Streaming sessions ended other than clean so far.
    pub lost: u64,
}

/// How the load ended.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcome {
    pub sessions: usize,
    /// Ended with `session.ended` and close 1000, every echo back in order.
    pub sessions_clean: u64,
    pub sessions_lost: u64,
    /// Echoes the streaming sessions received (all checked in order).
    pub echoes: u64,
    pub connects_ok: u64,
    pub connects_failed: u64,
    /// Failures by kind (`session: connect`, `connect: closed 1001`, ...).
    pub errors: BTreeMap<String, u64>,
    /// The first few failures in full.
    pub first_errors: Vec<String>,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Default)]
struct Counters {
    open: AtomicU64,
    connected: AtomicU64,
    clean: AtomicU64,
    lost: AtomicU64,
    echoes: AtomicU64,
    connects_ok: AtomicU64,
    connects_failed: AtomicU64,
    errors: Mutex<(BTreeMap<String, u64>, Vec<String>)>,
}

impl Counters {
    fn failure(&self, what: &str, e: &Failure) {
        let mut g = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        *g.0.entry(format!("{what}: {}", e.kind)).or_default() += 1;
        if g.1.len() < KEEP_ERRORS {
            g.1.push(format!("{what}: {}", e.detail));
        }
    }

    fn sample(&self, t: f64) -> Sample {
        Sample {
            t,
            open: self.open.load(Ordering::SeqCst),
            connects_ok: self.connects_ok.load(Ordering::SeqCst),
            connects_failed: self.connects_failed.load(Ordering::SeqCst),
            lost: self.lost.load(Ordering::SeqCst),
        }
    }
}

/// Why a session failed: a short kind (counted) and the full text (kept).
#[derive(Debug)]
struct Failure {
    kind: String,
    detail: String,
}

fn fail(kind: &str, detail: impl std::fmt::Display) -> Failure {
    Failure {
        kind: kind.to_string(),
        detail: format!("{kind}: {detail}"),
    }
}

/// The load, running.
#[derive(Debug)]
pub struct Running {
    counters: Arc<Counters>,
    end_sessions: watch::Sender<bool>,
    stop_connects: watch::Sender<bool>,
    thread: std::thread::JoinHandle<anyhow::Result<Vec<Sample>>>,
    plan: Plan,
    /// When the load started: every time the scenario records is from here.
    pub t0: Instant,
}

impl Running {
    /// Start the load on a thread of its own.
    pub fn start(plan: Plan) -> anyhow::Result<Self> {
        let counters = Arc::new(Counters::default());
        let (end_sessions, end_rx) = watch::channel(false);
        let (stop_connects, stop_rx) = watch::channel(false);
        let t0 = Instant::now();
        let (c, p) = (counters.clone(), plan.clone());
        let thread = std::thread::Builder::new()
            .name("rolling-load".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                Ok(rt.block_on(run(p, c, end_rx, stop_rx, t0)))
            })?;
        Ok(Self {
            counters,
            end_sessions,
            stop_connects,
            thread,
            plan,
            t0,
        })
    }

    pub fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// Streaming sessions that got their first echo.
    pub fn connected(&self) -> u64 {
        self.counters.connected.load(Ordering::SeqCst)
    }

    /// Streaming sessions over (clean or not).
    pub fn ended(&self) -> u64 {
        self.counters.clean.load(Ordering::SeqCst) + self.counters.lost.load(Ordering::SeqCst)
    }

    pub fn connects_ok(&self) -> u64 {
        self.counters.connects_ok.load(Ordering::SeqCst)
    }

    /// Every streaming session sends `session.end` now.
    pub fn end_sessions(&self) {
        let _ = self.end_sessions.send(true);
    }

    /// Stop the connect loops (and end the sessions, if not yet), wait for
    /// everything to finish; the outcome.
    pub fn finish(self) -> anyhow::Result<Outcome> {
        let _ = self.end_sessions.send(true);
        let _ = self.stop_connects.send(true);
        let samples = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("the load's thread panicked"))??;
        let c = &self.counters;
        let (errors, first_errors) =
            std::mem::take(&mut *c.errors.lock().unwrap_or_else(|p| p.into_inner()));
        Ok(Outcome {
            sessions: self.plan.sessions,
            sessions_clean: c.clean.load(Ordering::SeqCst),
            sessions_lost: c.lost.load(Ordering::SeqCst),
            echoes: c.echoes.load(Ordering::SeqCst),
            connects_ok: c.connects_ok.load(Ordering::SeqCst),
            connects_failed: c.connects_failed.load(Ordering::SeqCst),
            errors,
            first_errors,
            samples,
        })
    }
}

async fn run(
    plan: Plan,
    c: Arc<Counters>,
    end: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
    t0: Instant,
) -> Vec<Sample> {
    let mut tasks = JoinSet::new();
    // The sampler ends with the connect loops (the last thing to stop).
    let sampler = {
        let (c, mut stop) = (c.clone(), stop.clone());
        tokio::spawn(async move {
            let mut samples = vec![c.sample(0.0)];
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => samples.push(c.sample(t0.elapsed().as_secs_f64())),
                    () = signalled(&mut stop) => break,
                }
            }
            samples.push(c.sample(t0.elapsed().as_secs_f64()));
            samples
        })
    };
    for _ in 0..plan.connect_loops {
        let (c, stop, addr) = (c.clone(), stop.clone(), plan.addr);
        tasks.spawn(async move {
            while !*stop.borrow() {
                match short_session(addr).await {
                    Ok(()) => c.connects_ok.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        c.failure("connect", &e);
                        c.connects_failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
        });
    }
    let gap = plan.ramp.checked_div(plan.sessions.max(1) as u32);
    for tag in 0..plan.sessions {
        let (c, end, addr, period) = (c.clone(), end.clone(), plan.addr, plan.period);
        let delay = gap.unwrap_or_default() * tag as u32;
        tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            match stream_session(addr, tag as u32, period, end, &c).await {
                Ok(()) => c.clean.fetch_add(1, Ordering::SeqCst),
                Err(e) => {
                    c.failure("session", &e);
                    c.lost.fetch_add(1, Ordering::SeqCst)
                }
            };
        });
    }
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            tracing::warn!("a load task failed: {e}");
        }
    }
    sampler.await.unwrap_or_default()
}

/// Until `rx` says true (or its sender is gone). The guard `wait_for`
/// returns is dropped here: it must not live across an await.
async fn signalled(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn connect(addr: SocketAddr) -> Result<Ws, Failure> {
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| fail("tcp connect", e))?;
        let _ = stream.set_nodelay(true);
        let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/v1/stream"), stream)
            .await
            .map_err(|e| fail("handshake", e))?;
        Ok(ws)
    };
    timeout(CONNECT_TIMEOUT, attempt)
        .await
        .map_err(|_| fail("connect timeout", format!("{CONNECT_TIMEOUT:?}")))?
}

/// 64 bytes: the session's tag, the message's sequence number, padding.
fn payload(tag: u32, seq: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(64);
    p.extend_from_slice(&tag.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.resize(64, 0xA5);
    p
}

/// An echo must be this session's next one.
fn check(data: &[u8], tag: u32, expected: u64) -> Result<(), Failure> {
    let got = data
        .get(..12)
        .map(|h| (&h[..4], &h[4..12]))
        .and_then(|(t, s)| {
            Some((
                u32::from_be_bytes(t.try_into().ok()?),
                u64::from_be_bytes(s.try_into().ok()?),
            ))
        });
    match got {
        Some((t, s)) if t == tag && s == expected => Ok(()),
        other => Err(fail(
            "echo out of order or foreign",
            format!("got {other:?}, expected ({tag}, {expected})"),
        )),
    }
}

/// Send `session.end`, then read to `session.ended` and close 1000; echoes
/// still in flight are checked. Returns the echoes read.
async fn graceful_end(ws: &mut Ws, tag: u32, mut received: u64) -> Result<u64, Failure> {
    ws.send(Message::text(r#"{"type":"session.end"}"#))
        .await
        .map_err(|e| fail("send session.end", e))?;
    let mut ended = false;
    let finish = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(data))) => {
                    check(&data, tag, received)?;
                    received += 1;
                }
                Some(Ok(Message::Text(t))) if t.contains("session.ended") => ended = true,
                Some(Ok(
                    Message::Text(_) | Message::Ping(_) | Message::Pong(_) | Message::Frame(_),
                )) => {}
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map_or(1005, |f| u16::from(f.code));
                    if code != u16::from(CloseCode::Normal) {
                        return Err(fail(&format!("closed {code}"), "after session.end"));
                    }
                    return Ok(received);
                }
                None => return Err(fail("eof", "no close frame after session.end")),
                Some(Err(e)) => return Err(fail("read after session.end", e)),
            }
        }
    };
    let received = timeout(END_TIMEOUT, finish)
        .await
        .map_err(|_| fail("no close after session.end", format!("{END_TIMEOUT:?}")))??;
    if !ended {
        return Err(fail("no session.ended", "close 1000 without session.ended"));
    }
    Ok(received)
}

/// A streaming session: one message every `period` until `end`, every echo
/// checked, then a graceful end. Counted open from its first echo (it then
/// holds a backend connection) to its end.
async fn stream_session(
    addr: SocketAddr,
    tag: u32,
    period: Duration,
    mut end: watch::Receiver<bool>,
    c: &Counters,
) -> Result<(), Failure> {
    let mut ws = connect(addr).await?;
    let (mut sent, mut received) = (0u64, 0u64);
    let mut tick = tokio::time::interval(period);
    let streamed = async {
        loop {
            tokio::select! {
                () = signalled(&mut end) => return Ok(()),
                _ = tick.tick() => {
                    ws.send(Message::binary(payload(tag, sent)))
                        .await
                        .map_err(|e| fail("send", e))?;
                    sent += 1;
                }
                msg = ws.next() => match msg {
                    Some(Ok(Message::Binary(data))) => {
                        check(&data, tag, received)?;
                        received += 1;
                        if received == 1 {
                            c.connected.fetch_add(1, Ordering::SeqCst);
                            c.open.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Ok(Message::Close(frame))) => {
                        let code = frame.map_or(1005, |f| u16::from(f.code));
                        return Err(fail(&format!("closed {code}"), "while streaming"));
                    }
                    None => return Err(fail("eof", "while streaming")),
                    Some(Err(e)) => return Err(fail("read", e)),
                },
            }
        }
    };
    let streamed = streamed.await;
    // Counted open at its first echo, while streaming.
    let was_open = received > 0;
    let result = match streamed {
        Ok(()) => graceful_end(&mut ws, tag, received)
            .await
            .map(|all| received = all),
        Err(e) => Err(e),
    };
    if was_open {
        c.open.fetch_sub(1, Ordering::SeqCst);
    }
    c.echoes.fetch_add(received, Ordering::Relaxed);
    result
}

/// Connect, one echo, graceful end.
async fn short_session(addr: SocketAddr) -> Result<(), Failure> {
    let mut ws = connect(addr).await?;
    let tag = u32::MAX;
    ws.send(Message::binary(payload(tag, 0)))
        .await
        .map_err(|e| fail("send", e))?;
    let first = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(data))) => return check(&data, tag, 0),
                Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map_or(1005, |f| u16::from(f.code));
                    return Err(fail(&format!("closed {code}"), "before the echo"));
                }
                Some(Ok(Message::Frame(_))) => {}
                None => return Err(fail("eof", "before the echo")),
                Some(Err(e)) => return Err(fail("read", e)),
            }
        }
    };
    timeout(END_TIMEOUT, first)
        .await
        .map_err(|_| fail("no echo", format!("{END_TIMEOUT:?}")))??;
    graceful_end(&mut ws, tag, 1).await.map(|_| ())
}

/// One short session, blocking: whether the load balancer carries sessions
/// yet (used before the load starts).
pub fn probe(addr: SocketAddr) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(short_session(addr)).map_err(|e| e.detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_echo_is_checked_for_its_session_and_sequence() {
        let p = payload(7, 3);
        assert_eq!(p.len(), 64);
        assert!(check(&p, 7, 3).is_ok());
        assert!(check(&p, 7, 4).is_err(), "a skipped echo");
        assert!(check(&p, 8, 3).is_err(), "another session's echo");
        assert!(check(&p[..8], 7, 3).is_err(), "a short echo");
    }
}
