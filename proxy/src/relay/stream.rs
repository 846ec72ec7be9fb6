//! [`FrameStream`]: a WebSocket connection after its handshake, kept as the
//! raw byte stream plus whatever was read and not consumed yet.
//!
//! The relay works on the raw streams directly (frames pass through without
//! being rebuilt); the few exchanges outside it — `session.start`, health
//! pings, a close before a session could start — use the simple, allocating
//! helpers here. Nothing here is on the per-message path.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::frame::{self, FrameError, Header, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG};

/// Which peer is at the other end, which decides masking (RFC 6455 §5.3):
/// frames from a client are masked, frames to a client are not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A client device: the proxy is the WebSocket server.
    Client,
    /// A backend: the proxy is the WebSocket client and masks what it sends.
    Backend,
}

impl Peer {
    /// Whether frames *from* this peer must be masked.
    pub fn masks(self) -> bool {
        self == Peer::Client
    }

    /// A mask key for a frame *to* this peer, if it needs one: fresh per frame
    /// from the thread's cryptographically strong generator, as RFC 6455 asks.
    pub fn mask_for_send(self) -> Option<[u8; 4]> {
        (self == Peer::Backend).then(rand::random::<[u8; 4]>)
    }
}

/// One whole frame read by [`FrameStream::recv`], payload unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

/// Why [`FrameStream::recv`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("connection closed")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Frame(#[from] FrameError),
    #[error("frame masking does not match the peer's role")]
    Masking,
    #[error("frame of {0} bytes is larger than allowed")]
    TooLarge(u64),
}

/// A WebSocket connection after its handshake: the byte stream and the bytes
/// read from it but not consumed yet.
#[derive(Debug)]
pub struct FrameStream<S> {
    io: S,
    /// Read and not consumed. Empty at rest (a pooled backend connection with
    /// anything here is not clean); freed when emptied.
    unread: Vec<u8>,
    peer: Peer,
}

impl<S> FrameStream<S> {
    /// Wrap a stream whose handshake is done; `unread` holds bytes the
    /// handshake read past its end.
    pub fn new(io: S, unread: Vec<u8>, peer: Peer) -> Self {
        Self { io, unread, peer }
    }

    pub fn peer(&self) -> Peer {
        self.peer
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }

    /// Whether bytes were read and not consumed.
    pub fn has_unread(&self) -> bool {
        !self.unread.is_empty()
    }

    /// The stream and the unread bytes, for the relay.
    pub(crate) fn parts_mut(&mut self) -> (&mut S, &mut Vec<u8>) {
        (&mut self.io, &mut self.unread)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> FrameStream<S> {
    /// Send one whole frame (masked toward a backend) and flush it.
    pub async fn send(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(payload.len() + frame::MAX_HEADER);
        frame::push_frame(&mut buf, opcode, payload, self.peer.mask_for_send());
        self.io.write_all(&buf).await?;
        self.io.flush().await
    }

    pub async fn send_text(&mut self, text: &str) -> io::Result<()> {
        self.send(frame::OP_TEXT, text.as_bytes()).await
    }

    /// Read one whole frame of at most `max_len` payload bytes.
    pub async fn recv(&mut self, max_len: usize) -> Result<Frame, RecvError> {
        loop {
            if let Some(header) = Header::parse(&self.unread)? {
                if header.mask.is_some() != self.peer.masks() {
                    return Err(RecvError::Masking);
                }
                if header.len > max_len as u64 {
                    return Err(RecvError::TooLarge(header.len));
                }
                let total = header.header_len + header.len as usize;
                if self.unread.len() >= total {
                    let mut payload = self.unread[header.header_len..total].to_vec();
                    if let Some(key) = header.mask {
                        frame::apply_mask(&mut payload, key, 0);
                    }
                    self.unread.drain(..total);
                    if self.unread.is_empty() {
                        self.unread = Vec::new();
                    }
                    return Ok(Frame {
                        fin: header.fin,
                        opcode: header.opcode,
                        payload,
                    });
                }
            }
            // Into the heap buffer, not a stack array: a local buffer held
            // across this await would size every session's future.
            self.unread.reserve(4096);
            let n = self.io.read_buf(&mut self.unread).await?;
            if n == 0 {
                return Err(RecvError::Closed);
            }
        }
    }

    /// Send a ping and wait for its pong: the health check of an idle pooled
    /// connection. Anything but a pong (or a ping, answered) is a fault.
    pub async fn ping(&mut self, payload: &[u8]) -> Result<(), PingFault> {
        self.send(OP_PING, payload).await.map_err(PingFault::Io)?;
        loop {
            let f = self
                .recv(frame::MAX_CONTROL_PAYLOAD)
                .await
                .map_err(PingFault::Recv)?;
            match f.opcode {
                OP_PONG if f.payload == payload => return Ok(()),
                OP_PONG => {}
                OP_PING => self
                    .send(OP_PONG, &f.payload)
                    .await
                    .map_err(PingFault::Io)?,
                OP_CLOSE => return Err(PingFault::Closed),
                _ => return Err(PingFault::UnexpectedData),
            }
        }
    }

    /// Close from our side: send a Close with `code` and `reason`, read until
    /// the peer's Close (discarding anything else) or until the stream ends,
    /// then shut the stream down. The caller bounds it in time.
    pub async fn close(&mut self, code: u16, reason: &str) {
        let payload = frame::close_payload(code, reason);
        if self.send(OP_CLOSE, &payload).await.is_ok() {
            loop {
                match self.recv(1 << 20).await {
                    Ok(f) if f.opcode == OP_CLOSE => break,
                    Ok(_) => {}
                    Err(RecvError::TooLarge(_)) | Err(_) => break,
                }
            }
        }
        let _ = self.io.shutdown().await;
    }
}

/// Why a health ping failed.
#[derive(Debug, thiserror::Error)]
pub enum PingFault {
    #[error("sending the ping: {0}")]
    Io(io::Error),
    #[error("reading the pong: {0}")]
    Recv(RecvError),
    #[error("connection closed")]
    Closed,
    #[error("data arrived on an idle connection")]
    UnexpectedData,
}

/// Whether `opcode` starts or continues a data message.
pub fn is_data(opcode: u8) -> bool {
    matches!(opcode, OP_CONTINUATION | frame::OP_TEXT | frame::OP_BINARY)
}
