//! One client session: lease a backend connection, fence it, relay both ways
//! in this one task, end cleanly, and hand the connection back only if the
//! fence completed (DESIGN §3).
//!
//! Backpressure: the relay awaits each send before it reads the next message
//! from that side, so a slow client slows the backend's reads (TCP pushes back
//! to the backend) and memory per session stays bounded by the WebSocket
//! buffers. A client that cannot take a message within `send_timeout` is closed
//! with 1008.

use std::ops::DerefMut;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Map, Value};
use sttproxy_pool::{Connection, Lease};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backend::{BackendConn, Reuse, fence};
use crate::backends::Backends;
use crate::metrics::{Metrics, OutcomeLabel, TO_BACKEND, TO_CLIENT};
use crate::route::{self, NoConnection};

/// Session timeouts.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub acquire_timeout: Duration,
    pub drain_timeout: Duration,
    pub idle_timeout: Duration,
    pub send_timeout: Duration,
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            acquire_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(10),
        }
    }
}

/// What every session shares.
#[derive(Debug, Clone)]
pub struct SessionContext {
    pub backends: Backends,
    pub metrics: Arc<Metrics>,
    pub settings: Arc<SessionSettings>,
    /// Fires when the shutdown grace is over: open sessions close with 1001.
    pub shutdown: CancellationToken,
}

/// Close code 1014 (Bad Gateway, IANA registry): the backend failed.
/// tungstenite has no name for it (it calls it `Bad`, and its own client side
/// rejects it; browsers and other clients accept it).
const BAD_GATEWAY: CloseCode = CloseCode::Bad(1014);

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// A session id unique within this process and unlikely to repeat across replicas.
pub fn new_session_id(rng: &mut impl rand::Rng) -> String {
    let n = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    format!("{:08x}{:08x}", rng.random::<u32>(), n as u32)
}

/// What the session needs of the backend connection it holds for its whole
/// life: the pool's [`Lease`] in the proxy. (The simulation wraps the lease, and
/// the handle of the naive pool it compares against, to watch every hand-back.)
pub trait SessionLease<B>: DerefMut<Target = BackendConn<B>> + Send {
    /// The session ended cleanly (its fence completed): back to the pool.
    fn release(self);
    /// The connection is not fit for another session: close it.
    fn discard(self);
}

impl<B> SessionLease<B> for Lease<BackendConn<B>>
where
    BackendConn<B>: Connection,
{
    fn release(self) {
        Lease::release(self);
    }

    fn discard(self) {
        Lease::discard(self);
    }
}

/// Why the relay loop stopped.
#[derive(Debug)]
enum Stop {
    /// The client sent `{"type":"session.end"}` (already passed on when fenced).
    ClientEnded,
    /// The client closed or vanished.
    ClientGone,
    /// The client broke the protocol: close it with this code.
    ClientFault(CloseCode, &'static str),
    /// The client did not take a message in time.
    SlowClient,
    /// Nothing from the client within `idle_timeout`.
    Idle,
    /// The backend closed or failed.
    BackendGone(String),
    /// The proxy is shutting down and the grace is over.
    Shutdown,
}

/// Per-session message counts, added to the shared metrics in batches.
#[derive(Default)]
struct Counts {
    to_backend: (u64, u64),
    to_client: (u64, u64),
}

impl Counts {
    const FLUSH_EVERY: u64 = 256;

    fn flush(&mut self, m: &Metrics) {
        let (n, b) = std::mem::take(&mut self.to_backend);
        m.messages.get_or_create(&TO_BACKEND).inc_by(n);
        m.bytes.get_or_create(&TO_BACKEND).inc_by(b);
        let (n, b) = std::mem::take(&mut self.to_client);
        m.messages.get_or_create(&TO_CLIENT).inc_by(n);
        m.bytes.get_or_create(&TO_CLIENT).inc_by(b);
    }

    fn add(pair: &mut (u64, u64), bytes: usize) -> bool {
        pair.0 += 1;
        pair.1 += bytes as u64;
        pair.0.is_multiple_of(Self::FLUSH_EVERY)
    }
}

fn payload_len(m: &Message) -> usize {
    match m {
        Message::Text(t) => t.len(),
        Message::Binary(b) => b.len(),
        _ => 0,
    }
}

/// Run one client session to its end. Never returns an error: every way a
/// session can end is answered to the client with a close code.
pub async fn run<S>(
    client: WebSocketStream<S>,
    params: Map<String, Value>,
    ctx: SessionContext,
    id: String,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let span = tracing::info_span!("session", id = %id);
    async move {
        ctx.metrics.sessions_active.inc();
        let started = Instant::now();
        let outcome = run_inner(client, params, &ctx, &id).await;
        ctx.metrics.sessions_active.dec();
        ctx.metrics
            .session_seconds
            .observe(started.elapsed().as_secs_f64());
        ctx.metrics
            .sessions
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        tracing::debug!(outcome, "session ended");
    }
    .instrument(span)
    .await
}

async fn run_inner<S>(
    mut client: WebSocketStream<S>,
    params: Map<String, Value>,
    ctx: &SessionContext,
    id: &str,
) -> &'static str
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let m = &ctx.metrics;
    let settings = &ctx.settings;
    let wait_started = Instant::now();
    let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::from_os_rng();
    let leased = route::lease(&ctx.backends, settings.acquire_timeout, &mut rng).await;
    m.acquire_wait_seconds
        .observe(wait_started.elapsed().as_secs_f64());
    let (backend, lease, how) = match leased {
        Ok(l) => l,
        Err(e) => {
            let outcome = match e {
                NoConnection::NoBackend => "no_backend",
                NoConnection::Timeout(_) => "timeout",
            };
            m.acquire.get_or_create(&OutcomeLabel { outcome }).inc();
            tracing::info!(error = %e, "no backend connection for the session");
            close_client(&mut client, CloseCode::Again, &e.to_string()).await;
            return "no_backend_connection";
        }
    };
    m.acquire
        .get_or_create(&OutcomeLabel {
            outcome: how.as_str(),
        })
        .inc();
    tracing::debug!(backend = %backend.id, acquired = how.as_str(), "leased a backend connection");
    run_leased(client, lease, backend.reuse, &params, ctx, id).await
}

/// The part of a session after routing: fence the leased backend connection
/// (`session.start`), relay both ways, end the session, and hand the
/// connection back only if its fence completed. Generic over the client's and
/// the backend's byte streams, so the fault simulation runs this very code in
/// memory. Returns the session's outcome label.
pub async fn run_leased<S, B, L>(
    mut client: WebSocketStream<S>,
    mut lease: L,
    reuse: Reuse,
    params: &Map<String, Value>,
    ctx: &SessionContext,
    id: &str,
) -> &'static str
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    B: AsyncRead + AsyncWrite + Unpin + Send,
    L: SessionLease<B>,
{
    let m = &ctx.metrics;
    let settings = &ctx.settings;
    let fenced = reuse == Reuse::Fenced;

    if fenced {
        let start = fence::start_message(id, params);
        if let Err(e) = lease.ws.send(Message::text(start)).await {
            tracing::info!(error = %e, "backend failed at session.start");
            lease.mark_broken();
            lease.discard();
            close_client(&mut client, BAD_GATEWAY, "backend connection lost").await;
            return "backend_failed";
        }
    }

    let mut counts = Counts::default();
    let stop = relay(&mut client, &mut lease, ctx, fenced, &mut counts).await;
    counts.flush(m);

    match stop {
        Stop::ClientEnded if fenced => {
            // Pass every final result on, then session.ended, then close 1000.
            match finish(
                &mut client,
                &mut lease,
                id,
                settings.drain_timeout,
                &mut counts,
            )
            .await
            {
                Finish::Clean => {
                    counts.flush(m);
                    close_client(&mut client, CloseCode::Normal, "session ended").await;
                    fence_done(m, "clean");
                    lease.release();
                    "ended"
                }
                Finish::ClientGone => {
                    counts.flush(m);
                    // The client left while results were still coming: keep
                    // fencing the backend without it.
                    end_unfinished(lease, id, settings.drain_timeout, m, true, true).await;
                    "client_gone"
                }
                Finish::Timeout => {
                    counts.flush(m);
                    fence_done(m, "timeout");
                    lease.discard();
                    close_client(
                        &mut client,
                        CloseCode::Error,
                        "backend did not end the session",
                    )
                    .await;
                    "backend_timeout"
                }
                Finish::BackendGone(reason) => {
                    counts.flush(m);
                    fence_done(m, "error");
                    lease.mark_broken();
                    lease.discard();
                    close_client(&mut client, BAD_GATEWAY, &reason).await;
                    "backend_failed"
                }
            }
        }
        Stop::ClientEnded => {
            // Not fenced: the backend got the client's end message as data and
            // its connection is used once.
            close_client(&mut client, CloseCode::Normal, "session ended").await;
            fence_done(m, "not_fenced");
            lease.discard();
            "ended"
        }
        Stop::BackendGone(reason) => {
            tracing::info!(%reason, "backend connection lost mid-session");
            lease.mark_broken();
            lease.discard();
            fence_done(m, "error");
            close_client(&mut client, BAD_GATEWAY, &reason).await;
            "backend_failed"
        }
        Stop::ClientGone => {
            // Complete the client's closing handshake, briefly.
            let _ = tokio::time::timeout(Duration::from_secs(1), client.close(None)).await;
            end_unfinished(lease, id, settings.drain_timeout, m, fenced, false).await;
            "client_gone"
        }
        Stop::ClientFault(code, reason) => {
            close_client(&mut client, code, reason).await;
            end_unfinished(lease, id, settings.drain_timeout, m, fenced, false).await;
            "client_fault"
        }
        Stop::SlowClient => {
            close_client(&mut client, CloseCode::Policy, "client too slow").await;
            end_unfinished(lease, id, settings.drain_timeout, m, fenced, false).await;
            "slow_client"
        }
        Stop::Idle => {
            close_client(&mut client, CloseCode::Away, "idle timeout").await;
            end_unfinished(lease, id, settings.drain_timeout, m, fenced, false).await;
            "idle"
        }
        Stop::Shutdown => {
            close_client(&mut client, CloseCode::Away, "proxy shutting down").await;
            // The proxy is going away: do not hold the exit up for a fence.
            lease.discard();
            "shutdown"
        }
    }
}

fn fence_done(m: &Metrics, outcome: &'static str) {
    m.fencing.get_or_create(&OutcomeLabel { outcome }).inc();
}

/// Relay both ways until one side ends the session.
async fn relay<S, B, L>(
    client: &mut WebSocketStream<S>,
    lease: &mut L,
    ctx: &SessionContext,
    fenced: bool,
    counts: &mut Counts,
) -> Stop
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    B: AsyncRead + AsyncWrite + Unpin + Send,
    L: SessionLease<B>,
{
    let settings = &ctx.settings;
    let mut last_heard = Instant::now();
    let mut idle_check = tokio::time::interval(settings.idle_timeout / 4);
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    idle_check.reset();
    loop {
        tokio::select! {
            biased;
            () = ctx.shutdown.cancelled() => return Stop::Shutdown,
            msg = lease.ws.next() => {
                let msg = match msg {
                    Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => m,
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Ok(Message::Close(frame))) => {
                        let why = frame.map(|f| format!("backend closed ({})", f.code)).unwrap_or_else(|| "backend closed".into());
                        return Stop::BackendGone(why);
                    }
                    None => return Stop::BackendGone("backend connection lost".into()),
                    Some(Err(e)) => return Stop::BackendGone(format!("backend connection lost: {e}")),
                };
                let len = payload_len(&msg);
                match tokio::time::timeout(settings.send_timeout, client.send(msg)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Stop::ClientGone,
                    Err(_) => return Stop::SlowClient,
                }
                if Counts::add(&mut counts.to_client, len) {
                    counts.flush(&ctx.metrics);
                }
            }
            msg = client.next() => {
                last_heard = Instant::now();
                let msg = match msg {
                    Some(Ok(Message::Text(t))) => {
                        if fence::is_client_end(&t) {
                            if fenced {
                                // `finish` passes it on as the backend's session.end.
                                return Stop::ClientEnded;
                            }
                            // Not fenced: pass it on as data, then stop.
                            let _ = lease.ws.send(Message::Text(t)).await;
                            return Stop::ClientEnded;
                        }
                        Message::Text(t)
                    }
                    Some(Ok(m @ Message::Binary(_))) => m,
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Ok(Message::Close(_))) | None => return Stop::ClientGone,
                    Some(Err(e)) => return client_error(e),
                };
                let len = payload_len(&msg);
                match tokio::time::timeout(settings.send_timeout, lease.ws.send(msg)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Stop::BackendGone(format!("backend connection lost: {e}")),
                    Err(_) => return Stop::BackendGone("backend too slow to take data".into()),
                }
                if Counts::add(&mut counts.to_backend, len) {
                    counts.flush(&ctx.metrics);
                }
            }
            _ = idle_check.tick() => {
                if last_heard.elapsed() >= settings.idle_timeout {
                    return Stop::Idle;
                }
            }
        }
    }
}

fn client_error(e: WsError) -> Stop {
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { .. })
        | WsError::Capacity(CapacityError::TooManyHeaders) => {
            Stop::ClientFault(CloseCode::Size, "message too big")
        }
        WsError::Utf8(_) => {
            Stop::ClientFault(CloseCode::Invalid, "invalid utf-8 in a text message")
        }
        // A client that vanished (TCP closed without a close frame) is gone,
        // not at fault: mobile clients lose their network all the time.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => Stop::ClientGone,
        WsError::Protocol(_) => Stop::ClientFault(CloseCode::Protocol, "websocket protocol error"),
        _ => Stop::ClientGone,
    }
}

enum Finish {
    Clean,
    ClientGone,
    Timeout,
    BackendGone(String),
}

/// After the client's `session.end`: tell the backend, then relay its final
/// results to the client until `session.ended` for this session (forwarded too).
async fn finish<S, B, L>(
    client: &mut WebSocketStream<S>,
    lease: &mut L,
    id: &str,
    drain_timeout: Duration,
    counts: &mut Counts,
) -> Finish
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    B: AsyncRead + AsyncWrite + Unpin + Send,
    L: SessionLease<B>,
{
    if let Err(e) = lease.ws.send(Message::text(fence::end_message(id))).await {
        return Finish::BackendGone(format!("backend connection lost: {e}"));
    }
    let deadline = Instant::now() + drain_timeout;
    loop {
        let next = tokio::select! {
            biased;
            () = tokio::time::sleep_until(deadline) => return Finish::Timeout,
            msg = lease.ws.next() => msg,
            // Anything the client sends now is past its end of stream; only a
            // close matters.
            msg = client.next() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Finish::ClientGone,
                _ => continue,
            },
        };
        let msg = match next {
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => m,
            Some(Ok(_)) => continue,
            None | Some(Err(_)) => return Finish::BackendGone("backend connection lost".into()),
        };
        let ended = matches!(&msg, Message::Text(t) if fence::is_ended_for(t, id));
        let len = payload_len(&msg);
        match tokio::time::timeout_at(deadline, client.send(msg)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Finish::ClientGone,
            Err(_) => return Finish::Timeout,
        }
        counts.to_client.0 += 1;
        counts.to_client.1 += len as u64;
        if ended {
            return Finish::Clean;
        }
    }
}

/// The client is gone or was closed: fence the backend connection without it
/// (send `session.end`, discard results until `session.ended`), then return it
/// to the pool; close it if the fence does not complete within `drain_timeout`.
/// A connection that is not fenced (`reuse = "none"`) is closed.
async fn end_unfinished<B, L>(
    mut lease: L,
    id: &str,
    drain_timeout: Duration,
    m: &Metrics,
    fenced: bool,
    end_sent: bool,
) where
    B: AsyncRead + AsyncWrite + Unpin + Send,
    L: SessionLease<B>,
{
    if !fenced {
        fence_done(m, "not_fenced");
        lease.discard();
        return;
    }
    let fence = async {
        if !end_sent {
            lease
                .ws
                .send(Message::text(fence::end_message(id)))
                .await
                .map_err(|_| ())?;
        }
        loop {
            match lease.ws.next().await {
                Some(Ok(Message::Text(t))) if fence::is_ended_for(&t, id) => return Ok(()),
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return Err(()),
            }
        }
    };
    let result = tokio::time::timeout(drain_timeout, fence).await;
    match result {
        Ok(Ok(())) => {
            fence_done(m, "clean");
            lease.release();
        }
        Ok(Err(())) => {
            fence_done(m, "error");
            lease.discard();
        }
        Err(_) => {
            fence_done(m, "timeout");
            lease.discard();
        }
    }
}

async fn close_client<S>(client: &mut WebSocketStream<S>, code: CloseCode, reason: &str)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    // Close reasons are limited to 123 bytes.
    let mut reason = reason.to_string();
    if reason.len() > 120 {
        let mut cut = 120;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), client.close(Some(frame))).await;
}
