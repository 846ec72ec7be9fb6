//! A pooled WebSocket connection to a backend, and the dialer that opens them.

use std::io;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::Uri;
use sttproxy_pool::Connection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::reconcile::Dialer;

/// The WebSocket stream type of a backend connection (plain or TLS).
pub type BackendStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

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
    #[error("websocket handshake with {url}: {source}")]
    Handshake {
        url: String,
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
}

/// A parsed `ws://` or `wss://` backend address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendAddr {
    pub url: String,
    pub host: String,
    pub port: u16,
    pub tls: bool,
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
        Ok(Self {
            url: url.to_string(),
            host,
            port,
            tls,
        })
    }
}

/// WebSocket settings for many mostly idle connections: tungstenite's defaults
/// allocate and touch 128 KiB read and write buffers per connection up front.
/// `max_message_size` bounds what one message may take; frames may be as large,
/// since tungstenite writes each message as one frame.
pub fn ws_config(max_message_size: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(max_message_size.saturating_mul(2).saturating_add(64 << 10))
        .max_message_size(Some(max_message_size))
        .max_frame_size(Some(max_message_size))
}

/// Whether the byte stream under a backend connection may still carry a
/// session, decided without blocking: the check behind
/// [`Connection::is_alive`] for [`BackendConn`]. Implemented for the TCP (or
/// TLS) stream the proxy dials; the simulation implements it for its in-memory
/// stream.
pub trait StreamLiveness {
    fn is_alive(&self) -> bool;
}

impl StreamLiveness for MaybeTlsStream<TcpStream> {
    /// Cheap and non-blocking: a peek at the socket. An idle connection that
    /// reached end-of-stream (the backend closed or crashed) is dead; one with
    /// unread bytes on a plain connection is a protocol fault (nothing may
    /// arrive on an idle connection). Over TLS, unread bytes may be session
    /// tickets, so they are left to the health check.
    fn is_alive(&self) -> bool {
        let (tcp, tls) = match self {
            MaybeTlsStream::Plain(s) => (s, false),
            MaybeTlsStream::Rustls(s) => (s.get_ref().0, true),
            _ => return true,
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
pub struct BackendConn<S = MaybeTlsStream<TcpStream>> {
    pub ws: WebSocketStream<S>,
    /// Set by a session or health check that saw the connection fail.
    broken: bool,
}

impl<S> BackendConn<S> {
    pub fn new(ws: WebSocketStream<S>) -> Self {
        Self { ws, broken: false }
    }

    /// Mark the connection unusable (an I/O error or protocol fault was seen).
    pub fn mark_broken(&mut self) {
        self.broken = true;
    }
}

impl<S> Connection for BackendConn<S>
where
    S: StreamLiveness + AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Not marked broken, and the stream's own liveness check passes.
    fn is_alive(&self) -> bool {
        !self.broken && self.ws.get_ref().is_alive()
    }
}

/// Opens WebSocket connections to one backend, with connect and handshake timeouts.
#[derive(Debug, Clone)]
pub struct WsDialer {
    addr: BackendAddr,
    connect_timeout: Duration,
    handshake_timeout: Duration,
    config: WebSocketConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl WsDialer {
    pub fn new(
        url: &str,
        connect_timeout: Duration,
        handshake_timeout: Duration,
        max_message_size: usize,
    ) -> Result<Self, DialError> {
        let addr = BackendAddr::parse(url)?;
        let tls = addr.tls.then(tls_client_config);
        Ok(Self {
            addr,
            connect_timeout,
            handshake_timeout,
            config: ws_config(max_message_size),
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
        let handshake_err = |source| DialError::Handshake {
            url: a.url.clone(),
            source: Box::new(source),
        };
        let request = a
            .url
            .as_str()
            .into_client_request()
            .map_err(handshake_err)?;
        let connector = match &self.tls {
            Some(cfg) => Connector::Rustls(cfg.clone()),
            None => Connector::Plain,
        };
        let (ws, _response) = tokio::time::timeout(
            self.handshake_timeout,
            tokio_tungstenite::client_async_tls_with_config(
                request,
                tcp,
                Some(self.config),
                Some(connector),
            ),
        )
        .await
        .map_err(|_| DialError::HandshakeTimeout {
            url: a.url.clone(),
            after: self.handshake_timeout,
        })?
        .map_err(handshake_err)?;
        Ok(BackendConn::new(ws))
    }
}

impl Dialer for WsDialer {
    type Conn = BackendConn;
    type Error = DialError;

    async fn dial(&self) -> Result<BackendConn, DialError> {
        self.connect().await
    }
}

/// rustls client settings for `wss://` backends: the ring provider (no aws-lc
/// build) and the Mozilla root store.
fn tls_client_config() -> Arc<rustls::ClientConfig> {
    let roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = match rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(b) => b.with_root_certificates(roots).with_no_client_auth(),
        // The ring provider supports the default versions; fall back to the
        // process default rather than fail a dial.
        Err(_) => rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::from_iter(
                webpki_roots::TLS_SERVER_ROOTS.iter().cloned(),
            ))
            .with_no_client_auth(),
    };
    Arc::new(config)
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
}
