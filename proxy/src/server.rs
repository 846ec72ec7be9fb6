//! The client listener: HTTP/1.1 (hyper) until the upgrade, then the session.
//!
//! Each accepted connection is one task (owned by the sessions' `TaskTracker`):
//! hyper reads the request under `handshake_timeout`; a valid upgrade is
//! answered 101 with the derived accept key; everything else gets a status and
//! a short plain-text reason. After the 101 the raw `TcpStream` is taken back
//! out of hyper (with any bytes it already read), so the session relays on the
//! socket itself, not through a boxed IO.
//!
//! With TLS the connection task first completes the TLS handshake
//! ([`TlsListener::handshake`]), then runs the same HTTP phase and session
//! over the TLS stream: both are generic over the stream, so the plain path is
//! compiled for `TcpStream` exactly as without TLS.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::handshake::{self, HandshakeLimits, OriginPolicy, Refusal};
use crate::metrics::OutcomeLabel;
use crate::relay::{FrameStream, Peer};
use crate::route::{Routing, Target};
use crate::session::{self, SessionContext};
use crate::session_threads::Placer;
use crate::tls::TlsListener;

/// What the client listener needs.
#[derive(Debug)]
pub struct ServerContext {
    pub session: SessionContext,
    pub stream_path: String,
    pub handshake_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub auth: Authenticator,
    pub origins: OriginPolicy,
    pub limits: HandshakeLimits,
    /// How a request maps to its backend group and sticky key.
    pub routing: Routing,
    /// Set at shutdown: new upgrades get 503.
    pub draining: Arc<AtomicBool>,
    /// Where connections run: the next session thread in turn; `None`: on the
    /// accept loop's runtime.
    pub session_threads: Option<Arc<Placer>>,
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl ServerContext {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        session: SessionContext,
        stream_path: String,
        handshake_timeout: Duration,
        max_connections: usize,
        max_connections_per_ip: usize,
        auth: Authenticator,
        origins: OriginPolicy,
        limits: HandshakeLimits,
        draining: Arc<AtomicBool>,
    ) -> Self {
        Self {
            session,
            stream_path,
            handshake_timeout,
            max_connections,
            max_connections_per_ip,
            auth,
            origins,
            limits,
            routing: Routing::default(),
            draining,
            session_threads: None,
            open: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        }
    }

    /// Route sessions by `routing` (default: every session in the group
    /// `default`, none sticky).
    pub fn with_routing(mut self, routing: Routing) -> Self {
        self.routing = routing;
        self
    }

    /// Run each connection on the next of `threads` in turn.
    pub fn with_session_threads(mut self, threads: Arc<Placer>) -> Self {
        self.session_threads = Some(threads);
        self
    }

    /// Client connections open now (upgraded or not).
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// Counts one open client connection against the limits while it lives.
struct Admission {
    ctx: Arc<ServerContext>,
    ip: IpAddr,
}

impl Admission {
    /// `Err(status, reason)` when a limit is reached.
    fn try_new(ctx: &Arc<ServerContext>, ip: IpAddr) -> Result<Self, (StatusCode, &'static str)> {
        let open = ctx.open.fetch_add(1, Ordering::AcqRel) + 1;
        let admission = Self {
            ctx: ctx.clone(),
            ip,
        };
        {
            let mut per_ip = match ctx.per_ip.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            *per_ip.entry(ip).or_insert(0) += 1;
            if ctx.max_connections_per_ip > 0 && per_ip[&ip] > ctx.max_connections_per_ip {
                return Err((
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many connections from this address",
                ));
            }
        }
        if open > ctx.max_connections {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "proxy at its connection limit",
            ));
        }
        Ok(admission)
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.ctx.open.fetch_sub(1, Ordering::AcqRel);
        let mut per_ip = match self.ctx.per_ip.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// Accept client connections until `stop` fires; each runs on `tracker`,
/// through `tls` first when the listener speaks TLS.
pub async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<ServerContext>,
    tls: Option<Arc<TlsListener>>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly
                    // instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let Some(threads) = ctx.session_threads.clone() else {
            match &tls {
                None => tracker.spawn(handle_connection(stream, peer, ctx.clone())),
                Some(tls) => tracker.spawn(handle_tls_connection(
                    stream,
                    peer,
                    ctx.clone(),
                    tls.clone(),
                )),
            };
            continue;
        };
        // To a session thread: the socket leaves this runtime's reactor and
        // joins that thread's (session_threads.rs).
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, %peer, "cannot hand a connection to a session thread");
                continue;
            }
        };
        let ctx = ctx.clone();
        let thread = threads.next();
        // One future type per listener kind, as above: a plain session's task
        // does not carry the TLS path's size.
        match &tls {
            None => tracker.spawn_on(
                registered_here(stream, peer, move |s| handle_connection(s, peer, ctx)),
                thread,
            ),
            Some(tls) => {
                let tls = tls.clone();
                tracker.spawn_on(
                    registered_here(stream, peer, move |s| {
                        handle_tls_connection(s, peer, ctx, tls)
                    }),
                    thread,
                )
            }
        };
    }
}

/// On a session thread: register `stream` with this thread's reactor, then
/// `serve` it.
async fn registered_here<F, Fut>(stream: std::net::TcpStream, peer: SocketAddr, serve: F)
where
    F: FnOnce(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    match TcpStream::from_std(stream) {
        Ok(s) => serve(s).await,
        Err(e) => {
            tracing::warn!(error = %e, %peer, "cannot register a connection on its session thread")
        }
    }
}

/// A client connection on the TLS listener: the TLS handshake (boxed, so its
/// state is freed when it completes), then as [`handle_connection`].
async fn handle_tls_connection(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<ServerContext>,
    tls: Arc<TlsListener>,
) {
    let Some(stream) = Box::pin(tls.handshake(stream, peer)).await else {
        return;
    };
    drop(tls);
    handle_connection(stream, peer, ctx).await;
}

type Pending = Arc<Mutex<Option<(hyper::upgrade::OnUpgrade, Map<String, Value>, Target)>>>;

/// One client connection: the HTTP phase, then (if upgraded) the session, in
/// this one task. The HTTP phase is boxed so its state (hyper's connection,
/// several KiB) is freed when the upgrade completes, instead of sizing the
/// task's allocation for the whole life of the session.
async fn handle_connection<S>(stream: S, peer: SocketAddr, ctx: Arc<ServerContext>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some((ws, params, target, admission)) = Box::pin(http_phase(stream, peer, &ctx)).await
    else {
        return;
    };
    let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::from_os_rng();
    let id = session::new_session_id(&mut rng);
    tracing::debug!(%peer, session = %id, "session upgraded");
    session::run(ws, params, target, ctx.session.clone(), id).await;
    drop(admission);
}

/// Read the request, answer it, and hand back the upgraded WebSocket.
async fn http_phase<S>(
    stream: S,
    peer: SocketAddr,
    ctx: &Arc<ServerContext>,
) -> Option<(FrameStream<S>, Map<String, Value>, Box<Target>, Admission)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let admission = Admission::try_new(ctx, peer.ip());
    let pending: Pending = Arc::new(Mutex::new(None));
    let service = {
        let ctx = Arc::clone(ctx);
        let pending = pending.clone();
        let refusal = admission.as_ref().err().copied();
        service_fn(move |req| {
            let response = respond(req, &ctx, refusal, &pending);
            async move { Ok::<_, Infallible>(response) }
        })
    };
    // Keep-alive stays on: without it hyper appends `close` to the 101's
    // `Connection: Upgrade`, which strict clients (tungstenite) reject. The
    // connection's whole HTTP phase is bounded by `handshake_timeout` below.
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.handshake_timeout)
        // The head's size and header count: beyond them hyper answers 431
        // (414 for a target past its own maximum) without reading on.
        .max_buf_size(ctx.limits.head_bytes.max(HandshakeLimits::MIN_HEAD_BYTES))
        .max_headers(ctx.limits.headers)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let Ok(admission) = admission else {
        if let Ok(Err(e)) = tokio::time::timeout(ctx.handshake_timeout, conn).await {
            count_parse_refusal(ctx, &e);
        }
        return None;
    };
    match tokio::time::timeout(ctx.handshake_timeout, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            count_parse_refusal(ctx, &e);
            tracing::debug!(%peer, error = %e, "client connection ended before the upgrade");
            return None;
        }
        Err(_) => {
            tracing::debug!(%peer, "client handshake timed out");
            return None;
        }
    }
    let taken = match pending.lock() {
        Ok(mut g) => g.take(),
        Err(p) => p.into_inner().take(),
    };
    let (on_upgrade, params, target) = taken?;
    let upgraded = match on_upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "upgrade failed");
            return None;
        }
    };
    let parts = match upgraded.downcast::<TokioIo<S>>() {
        Ok(parts) => parts,
        Err(_) => {
            tracing::error!("upgraded connection is not the accepted stream");
            return None;
        }
    };
    let ws = FrameStream::new(parts.io.into_inner(), parts.read_buf.to_vec(), Peer::Client);
    // Boxed: the session keeps it for its whole life (its group, for a
    // failover), and every session's future would otherwise carry its size.
    Some((ws, params, Box::new(target), admission))
}

/// Requests hyper refused itself (a head past the limits, a malformed
/// request line) are counted with the others.
fn count_parse_refusal(ctx: &ServerContext, e: &hyper::Error) {
    let outcome = if e.is_parse_too_large() {
        "header_too_large"
    } else if e.is_parse() {
        "bad_request"
    } else {
        return;
    };
    ctx.session
        .metrics
        .refused
        .get_or_create(&OutcomeLabel { outcome })
        .inc();
}

fn text_response(status: StatusCode, reason: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{reason}\n"))));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // A refused connection is closed after the answer instead of waiting for
    // another request (and holding its admission slot) until the handshake timeout.
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

fn refuse(ctx: &ServerContext, status: StatusCode, reason: &'static str) -> Response<Full<Bytes>> {
    let label = match status.as_u16() {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        426 => "not_websocket",
        429 => "per_ip_limit",
        _ => "unavailable",
    };
    refuse_as(
        ctx,
        Refusal {
            status,
            label,
            reason,
        },
    )
}

/// Answer `r.status` with its reason, counted under `r.label`.
fn refuse_as(ctx: &ServerContext, r: Refusal) -> Response<Full<Bytes>> {
    ctx.session
        .metrics
        .refused
        .get_or_create(&OutcomeLabel { outcome: r.label })
        .inc();
    text_response(r.status, r.reason)
}

fn header_has_token(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

fn respond(
    mut req: Request<Incoming>,
    ctx: &ServerContext,
    refusal: Option<(StatusCode, &'static str)>,
    pending: &Pending,
) -> Response<Full<Bytes>> {
    if let Err(r) = handshake::check_sizes(req.uri(), req.headers(), &ctx.limits) {
        return refuse_as(ctx, r);
    }
    if req.uri().path() != ctx.stream_path {
        return refuse(ctx, StatusCode::NOT_FOUND, "not found");
    }
    if req.method() != http::Method::GET {
        return refuse(
            ctx,
            StatusCode::BAD_REQUEST,
            "a websocket upgrade must be a GET",
        );
    }
    if !header_has_token(&req, header::UPGRADE, "websocket") {
        let mut r = refuse(
            ctx,
            StatusCode::UPGRADE_REQUIRED,
            "websocket upgrade required",
        );
        r.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        return r;
    }
    if !header_has_token(&req, header::CONNECTION, "upgrade") {
        return refuse(ctx, StatusCode::BAD_REQUEST, "missing Connection: upgrade");
    }
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        // RFC 6455 §4.4: 426 with the versions this server speaks.
        let mut r = refuse_as(
            ctx,
            Refusal {
                status: StatusCode::UPGRADE_REQUIRED,
                label: "bad_version",
                reason: "unsupported websocket version",
            },
        );
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return r;
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return refuse(ctx, StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
    };
    if !handshake::valid_websocket_key(&key) {
        return refuse(ctx, StatusCode::BAD_REQUEST, "invalid Sec-WebSocket-Key");
    }
    let granted = match ctx.auth.check(req.headers(), req.uri().query()) {
        Ok(granted) => granted,
        Err(denied) => {
            let mut r = refuse_as(ctx, denied.refusal);
            if let Some(challenge) = denied.challenge {
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(challenge),
                );
            }
            return r;
        }
    };
    if !ctx.origins.permits(req.headers().get(header::ORIGIN)) {
        return refuse(ctx, StatusCode::FORBIDDEN, "origin not allowed");
    }
    if let Some((status, reason)) = refusal {
        return refuse(ctx, status, reason);
    }
    if ctx.draining.load(Ordering::Acquire) {
        return refuse(
            ctx,
            StatusCode::SERVICE_UNAVAILABLE,
            "proxy is shutting down",
        );
    }
    let params: Map<String, Value> = req
        .uri()
        .query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                // A token is for the proxy, never for a backend.
                .filter(|(k, _)| !ctx.auth.is_token_parameter(k))
                .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
                .collect()
        })
        .unwrap_or_default();
    let target = ctx
        .routing
        .target(&params, req.headers(), granted.key_claim.as_deref());
    let on_upgrade = hyper::upgrade::on(&mut req);
    match pending.lock() {
        Ok(mut g) => *g = Some((on_upgrade, params, target)),
        Err(p) => *p.into_inner() = Some((on_upgrade, params, target)),
    }
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(protocol) = granted.protocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, C, Fut, F: Fn(A, B, C) -> Fut>(_: F) -> usize {
        std::mem::size_of::<Fut>()
    }

    fn future_size4<A, B, C, D, Fut, F: Fn(A, B, C, D) -> Fut>(_: F) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// Every open session holds its connection task's future for its whole
    /// life: a buffer or a large state kept across an await in it costs its
    /// size times the number of sessions. (A 4 KiB stack buffer in a close
    /// path once doubled it.) Debug builds lay futures out larger than
    /// release builds, so the bound holds in both.
    #[test]
    fn a_sessions_task_stays_small() {
        let size = future_size(handle_connection::<TcpStream>);
        assert!(size <= 2560, "a client connection's future is {size} bytes");
        // Over TLS: the stream is boxed, the handshake too.
        let size = future_size4(handle_tls_connection);
        assert!(
            size <= 2560,
            "a TLS client connection's future is {size} bytes"
        );
    }
}
