//! A pooled WebSocket connection to a backend, and the dialer that opens them.

use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::Uri;
use sttproxy_pool::Connection;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};

use crate::reconcile::Dialer;
use crate::relay::{FrameStream, Peer};

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("invalid backend url {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("connect to {addr} timed out after {after:?}")]
    ConnectTimeout { addr: String, after: Duration },
    #[error("connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("websocket handshake with {url} timed out after {after:?}")]
    HandshakeTimeout { url: String, after: Duration },
    #[error("tls handshake with {url}: {source}")]
    Tls { url: String, source: io::Error },
    #[error("websocket handshake with {url}: {reason}")]
    Handshake { url: String, reason: String },
    #[error("tls settings for {url}: {source}")]
    TlsSettings {
        url: String,
        source: Box<crate::tls::TlsError>,
    },
}

/// A parsed `ws://` or `wss://` backend address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendAddr {
    pub url: String,
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// The request target: path and query.
    pub target: String,
}

impl BackendAddr {
    pub fn parse(url: &str) -> Result<Self, DialError> {
        let bad = |reason: &str| DialError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let uri: Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        let tls = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(bad("scheme must be ws or wss")),
        };
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let target = uri
            .path_and_query()
            .map(|p| p.as_str())
            .filter(|p| !p.is_empty())
            .unwrap_or("/")
            .to_string();
        Ok(Self {
            url: url.to_string(),
            host,
            port,
            tls,
            target,
        })
    }
}

/// Whether the byte stream under a backend connection may still carry a
/// session, decided without blocking: the check behind
/// [`Connection::is_alive`] for [`BackendConn`]. Implemented for the TCP (or
/// TLS) stream the proxy dials; the simulation implements it for its in-memory
/// stream.
pub trait StreamLiveness {
    fn is_alive(&self) -> bool;
}

/// The byte stream of a backend connection: plain TCP, or TLS boxed so that
/// the many plain connections do not carry a TLS session's size.
#[derive(Debug)]
pub enum BackendIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for BackendIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            BackendIo::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendIo::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            BackendIo::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            BackendIo::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            BackendIo::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl BackendIo {
    /// Register the socket with the reactor of the runtime the caller runs
    /// on, in place, and leave the one it was registered with: the socket's
    /// descriptor is duplicated, the copy registered here, and the old
    /// `TcpStream` dropped (which deregisters it over there and closes its
    /// descriptor). The socket itself, its buffers and any TLS state are
    /// untouched. Needs a runtime.
    fn register_here(&mut self) -> io::Result<()> {
        let tcp = match self {
            BackendIo::Plain(s) => s,
            BackendIo::Tls(s) => s.get_mut().0,
        };
        let copy = tcp.as_fd().try_clone_to_owned()?;
        // The copy shares the open file description, so it is non-blocking
        // like the original, as `from_std` requires.
        *tcp = TcpStream::from_std(std::net::TcpStream::from(copy))?;
        Ok(())
    }
}

impl StreamLiveness for BackendIo {
    /// Cheap and non-blocking: a peek at the socket. An idle connection that
    /// reached end-of-stream (the backend closed or crashed) is dead; one with
    /// unread bytes on a plain connection is a protocol fault (nothing may
    /// arrive on an idle connection). Over TLS, unread bytes may be session
    /// tickets, so they are left to the health check.
    fn is_alive(&self) -> bool {
        let (tcp, tls) = match self {
            BackendIo::Plain(s) => (s, false),
            BackendIo::Tls(s) => (s.get_ref().0, true),
        };
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(Waker::noop());
        match tcp.poll_peek(&mut cx, &mut buf) {
            Poll::Pending => true,
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(_)) => tls,
        }
    }
}

/// A backend connection in the pool or leased to one session, over a byte
/// stream `S` (a TCP or TLS stream in the proxy; in-memory in the simulation).
#[derive(Debug)]
pub struct BackendConn<S = BackendIo> {
    pub stream: FrameStream<S>,
    /// Set by a session or health check that saw the connection fail.
    broken: bool,
    /// The session thread whose reactor the socket is registered with; `None`:
    /// the proxy's main runtime (the pool's reconciler dialed it).
    home: Option<usize>,
}

impl<S> BackendConn<S> {
    /// A connection over `io` whose WebSocket handshake is done; `unread`
    /// holds bytes read past the handshake.
    pub fn new(io: S, unread: Vec<u8>) -> Self {
        Self {
            stream: FrameStream::new(io, unread, Peer::Backend),
            broken: false,
            // Dialed by a session (on demand) on its thread: at home there.
            home: crate::session_threads::current(),
        }
    }

    /// Mark the connection unusable (an I/O error or protocol fault was seen).
    pub fn mark_broken(&mut self) {
        self.broken = true;
    }
}

impl BackendConn<BackendIo> {
    /// Called by a session that leased the connection: move the socket's
    /// registration to the session thread the caller runs on, unless it is
    /// registered there already (the thread's last session used it). Then
    /// readiness on it wakes the session from its own thread's event loop,
    /// not through another thread's. If the move fails (out of file
    /// descriptors), the session uses the connection where it is registered:
    /// slower, still correct.
    pub fn settle_here(&mut self) {
        let here = crate::session_threads::current();
        if here.is_none() || here == self.home {
            return;
        }
        match self.stream.get_mut().register_here() {
            Ok(()) => self.home = here,
            Err(e) => tracing::warn!(
                error = %e,
                "cannot move a backend connection to the session's thread; using it from where it is"
            ),
        }
    }
}

impl<S> Connection for BackendConn<S>
where
    S: StreamLiveness + AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Not marked broken, nothing left unread, and the stream's own liveness
    /// check passes.
    fn is_alive(&self) -> bool {
        !self.broken && !self.stream.has_unread() && self.stream.get_ref().is_alive()
    }
}

/// The largest handshake response accepted from a backend.
const MAX_HANDSHAKE_RESPONSE: usize = 16 << 10;

/// The client side of the WebSocket handshake (RFC 6455 §4.1) over `io`.
/// Returns the bytes read past the response.
async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    addr: &BackendAddr,
) -> Result<Vec<u8>, String> {
    let key = generate_key();
    let host = if addr.host.contains(':') {
        format!("[{}]:{}", addr.host, addr.port)
    } else {
        format!("{}:{}", addr.host, addr.port)
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        addr.target
    );
    io.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    io.flush().await.map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 1024];
        let n = io
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the response: {e}"))?;
        if n == 0 {
            return Err("connection closed during the handshake".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        let parsed = response
            .parse(&buf)
            .map_err(|e| format!("malformed response: {e}"))?;
        let httparse::Status::Complete(len) = parsed else {
            if buf.len() > MAX_HANDSHAKE_RESPONSE {
                return Err("response headers too large".into());
            }
            continue;
        };
        if response.code != Some(101) {
            return Err(format!(
                "expected 101 Switching Protocols, got {}",
                response.code.unwrap_or(0)
            ));
        }
        let header = |name: &str| {
            response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .and_then(|h| std::str::from_utf8(h.value).ok())
        };
        let has_token = |name: &str, token: &str| {
            header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        };
        if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
            return Err("response does not upgrade to websocket".into());
        }
        if header("sec-websocket-accept") != Some(derive_accept_key(key.as_bytes()).as_str()) {
            return Err("wrong Sec-WebSocket-Accept".into());
        }
        return Ok(buf.split_off(len));
    }
}

/// Opens WebSocket connections to one backend, with connect and handshake timeouts.
#[derive(Debug, Clone)]
pub struct WsDialer {
    addr: BackendAddr,
    connect_timeout: Duration,
    handshake_timeout: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl WsDialer {
    /// A dialer of `url`; a `wss://` one uses `tls` (the proxy's backend TLS
    /// settings), or the defaults (Mozilla roots, no client certificate).
    pub fn new(
        url: &str,
        connect_timeout: Duration,
        handshake_timeout: Duration,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, DialError> {
        let addr = BackendAddr::parse(url)?;
        let tls = match (addr.tls, tls) {
            (false, _) => None,
            (true, Some(config)) => Some(config),
            (true, None) => Some(
                crate::tls::backend::client_config(&Default::default()).map_err(|source| {
                    DialError::TlsSettings {
                        url: url.to_string(),
                        source: Box::new(source),
                    }
                })?,
            ),
        };
        Ok(Self {
            addr,
            connect_timeout,
            handshake_timeout,
            tls,
        })
    }

    pub fn url(&self) -> &str {
        &self.addr.url
    }

    pub async fn connect(&self) -> Result<BackendConn, DialError> {
        let a = &self.addr;
        let target = format!("{}:{}", a.host, a.port);
        let tcp = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((a.host.as_str(), a.port)),
        )
        .await
        .map_err(|_| DialError::ConnectTimeout {
            addr: target.clone(),
            after: self.connect_timeout,
        })?
        .map_err(|source| DialError::Connect {
            addr: target.clone(),
            source,
        })?;
        // Small relayed messages must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        let handshake = async {
            let mut io =
                match &self.tls {
                    Some(cfg) => {
                        let name = rustls::pki_types::ServerName::try_from(a.host.clone())
                            .map_err(|e| DialError::Tls {
                                url: a.url.clone(),
                                source: io::Error::new(io::ErrorKind::InvalidInput, e),
                            })?;
                        let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                            .connect(name, tcp)
                            .await
                            .map_err(|source| DialError::Tls {
                                url: a.url.clone(),
                                source,
                            })?;
                        BackendIo::Tls(Box::new(tls))
                    }
                    None => BackendIo::Plain(tcp),
                };
            let unread = upgrade(&mut io, a)
                .await
                .map_err(|reason| DialError::Handshake {
                    url: a.url.clone(),
                    reason,
                })?;
            Ok(BackendConn::new(io, unread))
        };
        tokio::time::timeout(self.handshake_timeout, handshake)
            .await
            .map_err(|_| DialError::HandshakeTimeout {
                url: a.url.clone(),
                after: self.handshake_timeout,
            })?
    }
}

impl Dialer for WsDialer {
    type Conn = BackendConn;
    type Error = DialError;

    async fn dial(&self) -> Result<BackendConn, DialError> {
        self.connect().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_backend_urls() {
        let a = BackendAddr::parse("ws://127.0.0.1:9001/v1").unwrap();
        assert_eq!((a.host.as_str(), a.port, a.tls), ("127.0.0.1", 9001, false));
        let a = BackendAddr::parse("wss://gpu-1.example:8443").unwrap();
        assert_eq!((a.port, a.tls), (8443, true));
        let a = BackendAddr::parse("ws://[::1]:9001").unwrap();
        assert_eq!(a.host, "::1");
        assert!(BackendAddr::parse("http://x:1").is_err());
        assert!(BackendAddr::parse("not a url").is_err());
    }

    /// A connection dialed on one runtime and leased by a session on a
    /// session thread works from there once settled, even after the
    /// dialer's runtime is gone (the connection no longer depends on it).
    #[test]
    fn a_settled_connection_works_on_its_session_thread_without_the_dialers_runtime() {
        use std::io::{Read, Write};

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let dialer = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let conn = dialer.block_on(async {
            BackendConn::new(
                BackendIo::Plain(TcpStream::connect(addr).await.unwrap()),
                Vec::new(),
            )
        });
        let (mut backend, _) = listener.accept().unwrap();
        backend
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        drop(dialer);

        let threads = crate::session_threads::SessionThreads::start(1).unwrap();
        let waiter = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let session = threads.placer().next().spawn(async move {
            let mut conn = conn;
            conn.settle_here();
            conn.stream.send_text("hello").await?;
            let frame = conn.stream.recv(1024).await.map_err(io::Error::other)?;
            io::Result::Ok(frame.payload)
        });
        // The session's masked "hello" (2 + 4 + 5 bytes), then the answer.
        let mut sent = [0u8; 11];
        backend.read_exact(&mut sent).unwrap();
        assert_eq!(sent[0], 0x81);
        backend.write_all(&[0x81, 2, b'o', b'k']).unwrap();
        let got = waiter
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), session).await })
            .expect("the session thread answered in time")
            .unwrap();
        assert_eq!(got.unwrap(), b"ok");
    }
}
