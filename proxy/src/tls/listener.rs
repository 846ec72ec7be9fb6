//! TLS handshakes on the client listener: bounded in time and in number.
//!
//! Each accepted connection's handshake runs in its own connection task
//! (the accept loop never waits on one). At most `max_concurrent_handshakes`
//! run at once: beyond, a new connection is closed at once, which bounds the
//! CPU and memory a flood of ClientHellos (or of idle sockets) can take. A
//! handshake not done within `handshake_timeout` is dropped. A plaintext HTTP
//! request on the TLS port is answered 400 in plaintext, so that the mistake
//! is visible to whoever made it; anything else that is not TLS gets rustls'
//! alert. Every outcome is counted in `sttproxy_tls_handshakes_total`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::{CurrentCert, TlsError};
use crate::metrics::{Metrics, OutcomeLabel};

/// The limits of the handshake phase.
#[derive(Debug, Clone, Copy)]
pub struct TlsListenerSettings {
    pub handshake_timeout: Duration,
    pub max_concurrent_handshakes: usize,
}

/// The client listener's TLS side.
#[derive(Debug)]
pub struct TlsListener {
    config: Arc<rustls::ServerConfig>,
    current: Arc<CurrentCert>,
    handshake_timeout: Duration,
    permits: Semaphore,
    metrics: Arc<Metrics>,
}

/// The most of a plaintext request read before it is answered (so the
/// answer is not lost to a reset for unread bytes).
const PLAIN_HTTP_READ: usize = 16 << 10;

impl TlsListener {
    /// TLS 1.2 and 1.3 (ring), ALPN `http/1.1`, no client certificates, the
    /// certificate from `current`.
    pub fn new(
        current: Arc<CurrentCert>,
        settings: TlsListenerSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(super::provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.session_storage = current.sessions();
        Ok(Self {
            config: Arc::new(config),
            current,
            handshake_timeout: settings.handshake_timeout,
            permits: Semaphore::new(settings.max_concurrent_handshakes),
            metrics,
        })
    }

    /// The certificate served to new handshakes now.
    pub fn current(&self) -> &Arc<CurrentCert> {
        &self.current
    }

    /// The TLS handshake of one accepted connection; `None` when it did not
    /// complete (counted, and the socket closed by dropping it).
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
    ) -> Option<Box<TlsStream<TcpStream>>> {
        let Ok(_permit) = self.permits.try_acquire() else {
            self.count("over_capacity");
            tracing::debug!(%peer, "TLS handshakes at their limit; connection closed");
            return None;
        };
        let outcome = match tokio::time::timeout(self.handshake_timeout, self.accept(tcp)).await {
            Ok(Ok(tls)) => {
                self.count("ok");
                return Some(tls);
            }
            Ok(Err(outcome)) => outcome,
            Err(_) => "timeout",
        };
        tracing::debug!(%peer, outcome, "TLS handshake did not complete");
        self.count(outcome);
        None
    }

    /// The handshake itself; the error is the outcome label.
    async fn accept(&self, mut tcp: TcpStream) -> Result<Box<TlsStream<TcpStream>>, &'static str> {
        // A TLS connection starts with a handshake record (0x16); a
        // plaintext HTTP request with a method's first (upper-case) letter.
        let mut first = [0u8; 1];
        match tcp.peek(&mut first).await {
            Ok(0) | Err(_) => return Err("closed"),
            Ok(_) => {}
        }
        if first[0].is_ascii_uppercase() {
            answer_plain_http(&mut tcp).await;
            return Err("plain_http");
        }
        match TlsAcceptor::from(self.config.clone()).accept(tcp).await {
            // Boxed: a session holds its stream for its whole life, and the
            // TLS state would otherwise size every TLS session's task.
            Ok(tls) => Ok(Box::new(tls)),
            Err(e) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                Err("failed")
            }
        }
    }

    fn count(&self, outcome: &'static str) {
        self.metrics
            .tls_handshakes
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }
}

/// Read the request head (bounded) and answer 400 with the reason.
async fn answer_plain_http(tcp: &mut TcpStream) {
    let mut head = Vec::with_capacity(1024);
    while head.len() < PLAIN_HTTP_READ && memchr::memmem::find(&head, b"\r\n\r\n").is_none() {
        head.reserve(1024);
        match tcp.read_buf(&mut head).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
    let body = "this port speaks TLS: use https:// or wss://\n";
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.write_all(response.as_bytes()).await;
    let _ = tcp.shutdown().await;
}
