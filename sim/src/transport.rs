//! In-memory transport: a backend connection is a `tokio::io::duplex` pair.
//! The proxy's end is a [`SimStream`]: it carries a fault flag (a reset makes
//! every read and write fail and the liveness check say dead), implements the
//! production liveness check (a non-blocking peek, as the TCP stream does), and
//! tells the truth when it is dropped (the connection is closed).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use sttproxy::backend::conn::StreamLiveness;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::sync::Notify;

use crate::truth::ConnId;
use crate::world::World;

/// Bytes buffered each way in a link.
const LINK_BUFFER: usize = 64 << 10;

/// What both ends of a link share.
#[derive(Debug)]
pub struct LinkState {
    pub pool: usize,
    pub id: ConnId,
    /// Reset by the backend: reads and writes fail, the liveness check says dead.
    reset: AtomicBool,
    /// The backend's end is gone (crashed, died, or closed).
    backend_gone: AtomicBool,
    /// The proxy's end was dropped.
    proxy_gone: AtomicBool,
    proxy_gone_notify: Notify,
    /// A fault was injected on this connection, last at this time.
    faulted: AtomicBool,
    faulted_at: Mutex<Option<tokio::time::Instant>>,
    /// The backend is inside a session: from reading its `session.start`
    /// until it sends the session's real `session.ended`.
    in_session: AtomicBool,
    /// The backend wrote bytes of an ended session that no session read: past
    /// its `session.ended` (in the same write), or onto the idle connection.
    /// Whoever leases the connection after this could receive them.
    stale: AtomicBool,
}

impl LinkState {
    pub fn reset(&self) {
        self.mark_faulted();
        self.reset.store(true, Ordering::Relaxed);
    }

    pub fn is_reset(&self) -> bool {
        self.reset.load(Ordering::Relaxed)
    }

    pub fn set_backend_gone(&self) {
        self.backend_gone.store(true, Ordering::Relaxed);
    }

    /// The backend can no longer serve it (gone or reset).
    pub fn backend_dead(&self) -> bool {
        self.backend_gone.load(Ordering::Relaxed) || self.is_reset()
    }

    pub fn mark_faulted(&self) {
        self.faulted.store(true, Ordering::Relaxed);
        let mut at = match self.faulted_at.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *at = Some(tokio::time::Instant::now());
    }

    pub fn faulted(&self) -> bool {
        self.faulted.load(Ordering::Relaxed)
    }

    /// When a fault was last injected on this connection.
    pub fn faulted_at(&self) -> Option<tokio::time::Instant> {
        match self.faulted_at.lock() {
            Ok(g) => *g,
            Err(p) => *p.into_inner(),
        }
    }

    pub fn set_in_session(&self, on: bool) {
        self.in_session.store(on, Ordering::Relaxed);
    }

    /// The backend has not ended the session it serves.
    pub fn in_session(&self) -> bool {
        self.in_session.load(Ordering::Relaxed)
    }

    pub fn set_stale(&self, on: bool) {
        self.stale.store(on, Ordering::Relaxed);
    }

    /// Bytes of an ended session were written onto the connection.
    pub fn stale(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }

    pub fn proxy_gone(&self) -> bool {
        self.proxy_gone.load(Ordering::Relaxed)
    }

    /// Completes once the proxy's end is dropped.
    pub async fn wait_proxy_gone(&self) {
        loop {
            if self.proxy_gone() {
                return;
            }
            self.proxy_gone_notify.notified().await;
        }
    }
}

#[derive(Debug)]
struct PeekIo {
    inner: DuplexStream,
    /// A byte read by the liveness check, served before the stream's next bytes.
    peeked: Option<u8>,
}

/// The proxy's end of an in-memory backend connection.
#[derive(Debug)]
pub struct SimStream {
    /// A lock only because the liveness check takes `&self` (as `TcpStream::poll_peek` does).
    io: Mutex<PeekIo>,
    link: Arc<LinkState>,
    world: Arc<World>,
}

/// Open a link for pool `pool`: the proxy's end, the backend's end, and their shared state.
pub fn link(
    world: &Arc<World>,
    pool: usize,
    id: ConnId,
) -> (SimStream, DuplexStream, Arc<LinkState>) {
    let (proxy_io, backend_io) = tokio::io::duplex(LINK_BUFFER);
    let link = Arc::new(LinkState {
        pool,
        id,
        reset: AtomicBool::new(false),
        backend_gone: AtomicBool::new(false),
        proxy_gone: AtomicBool::new(false),
        proxy_gone_notify: Notify::new(),
        faulted: AtomicBool::new(false),
        faulted_at: Mutex::new(None),
        in_session: AtomicBool::new(false),
        stale: AtomicBool::new(false),
    });
    let stream = SimStream {
        io: Mutex::new(PeekIo {
            inner: proxy_io,
            peeked: None,
        }),
        link: link.clone(),
        world: world.clone(),
    };
    (stream, backend_io, link)
}

impl SimStream {
    pub fn id(&self) -> ConnId {
        self.link.id
    }

    pub fn link(&self) -> &Arc<LinkState> {
        &self.link
    }

    fn io(&self) -> MutexGuard<'_, PeekIo> {
        match self.io.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

fn reset_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        "connection reset by the backend",
    )
}

impl StreamLiveness for SimStream {
    /// The production rule: dead if reset or at end-of-stream; unread bytes on
    /// an idle connection are a protocol fault (dead too).
    fn is_alive(&self) -> bool {
        if self.link.is_reset() {
            return false;
        }
        let mut io = self.io();
        if io.peeked.is_some() {
            return false;
        }
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(&mut io.inner).poll_read(&mut cx, &mut buf) {
            Poll::Pending => true,
            Poll::Ready(Ok(())) if buf.filled().is_empty() => false,
            Poll::Ready(Ok(())) => {
                io.peeked = Some(byte[0]);
                false
            }
            Poll::Ready(Err(_)) => false,
        }
    }
}

impl AsyncRead for SimStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.link.is_reset() {
            return Poll::Ready(Err(reset_error()));
        }
        let mut io = self.io();
        if let Some(b) = io.peeked.take() {
            if buf.remaining() == 0 {
                io.peeked = Some(b);
                return Poll::Ready(Ok(()));
            }
            buf.put_slice(&[b]);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut io.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.link.is_reset() {
            return Poll::Ready(Err(reset_error()));
        }
        Pin::new(&mut self.io().inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.link.is_reset() {
            return Poll::Ready(Err(reset_error()));
        }
        Pin::new(&mut self.io().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io().inner).poll_shutdown(cx)
    }
}

impl Drop for SimStream {
    fn drop(&mut self) {
        self.link.proxy_gone.store(true, Ordering::Relaxed);
        self.link.proxy_gone_notify.notify_one();
        self.world.closed(self.link.pool, self.link.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Clock;
    use crate::truth::PoolTruth;
    use tokio::io::AsyncWriteExt;

    fn world() -> Arc<World> {
        World::new(Clock::start(), vec![PoolTruth::new("p0".into(), 4, 2)])
    }

    #[tokio::test(start_paused = true)]
    async fn liveness_is_the_production_peek() {
        let w = world();
        // Quiet: alive. Unread bytes on an idle connection: dead, and the
        // peeked byte is still delivered to a reader.
        let (mut s, mut b, _) = link(&w, 0, 1);
        assert!(s.is_alive());
        b.write_all(b"x").await.unwrap();
        assert!(!s.is_alive());
        let mut byte = [0u8; 1];
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut byte)
            .await
            .unwrap();
        assert_eq!(&byte, b"x");
        // End of stream: dead.
        drop(b);
        assert!(!s.is_alive());
        // Reset: dead, and I/O fails.
        let (mut s, _b, l) = link(&w, 0, 2);
        l.reset();
        assert!(!s.is_alive());
        assert!(s.write_all(b"y").await.is_err());
        assert!(l.faulted());
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_proxy_end_closes_the_connection() {
        let w = world();
        let flight = w.dial_started(0);
        let (s, _b, l) = link(&w, 0, 7);
        flight.succeeded(7);
        assert_eq!(w.with(|st, _| st.pools[0].open.len()), 1);
        drop(s);
        assert!(l.proxy_gone());
        w.with(|st, _| {
            assert!(st.pools[0].open.is_empty());
            assert_eq!(st.pools[0].closed, 1);
            assert_eq!(st.checker.total(), 0);
        });
    }
}
