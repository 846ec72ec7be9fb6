//! A minimal WebSocket client written by hand (RFC 6455), for what
//! tungstenite's client will not show: it maps close code 1014 to
//! `CloseCode::Bad` and fails the read with a protocol error, so a
//! tungstenite client cannot observe the proxy's 1014 (Bad Gateway).
//!
//! It sends masked frames, reads unmasked server frames, reassembles
//! fragmented messages, answers pings and echoes a close frame.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A message as the raw client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawMsg {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// The close code (first two payload bytes) if any, and the reason.
    Close(Option<u16>, String),
}

/// One frame from the server.
#[derive(Debug)]
pub struct RawFrame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

#[derive(Debug)]
pub struct RawWs {
    stream: TcpStream,
    /// Bytes read but not yet parsed.
    buf: Vec<u8>,
    /// A fragmented message being reassembled: its opcode and data so far.
    partial: Option<(u8, Vec<u8>)>,
    close_sent: bool,
}

fn protocol_error(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl RawWs {
    /// Connect and upgrade `target` (path and query); fails unless the server
    /// answers 101 with the right `Sec-WebSocket-Accept`.
    pub async fn connect(addr: SocketAddr, target: &str) -> io::Result<Self> {
        let upgraded = handshake(addr, target).await?;
        Ok(Self {
            stream: upgraded.stream,
            buf: upgraded.read_ahead,
            partial: None,
            close_sent: false,
        })
    }

    /// Send one masked frame.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) -> io::Result<()> {
        let len = payload.len();
        let mut frame = Vec::with_capacity(len + 14);
        frame.push((u8::from(fin) << 7) | opcode);
        if len < 126 {
            frame.push(0x80 | len as u8);
        } else if let Ok(len16) = u16::try_from(len) {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&len16.to_be_bytes());
        } else {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
        let mask: [u8; 4] = rand::random();
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        if opcode == OP_CLOSE {
            self.close_sent = true;
        }
        self.stream.write_all(&frame).await
    }

    pub async fn send_text(&mut self, text: &str) -> io::Result<()> {
        self.send_frame(true, OP_TEXT, text.as_bytes()).await
    }

    pub async fn send_binary(&mut self, data: &[u8]) -> io::Result<()> {
        self.send_frame(true, OP_BINARY, data).await
    }

    pub async fn send_close(&mut self, code: u16) -> io::Result<()> {
        self.send_frame(true, OP_CLOSE, &code.to_be_bytes()).await
    }

    /// Make sure `n` bytes are buffered; false if the stream ended first.
    async fn fill(&mut self, n: usize) -> io::Result<bool> {
        while self.buf.len() < n {
            let mut chunk = vec![0u8; (n - self.buf.len()).clamp(4096, 1 << 20)];
            let read = self.stream.read(&mut chunk).await?;
            if read == 0 {
                return Ok(false);
            }
            self.buf.extend_from_slice(&chunk[..read]);
        }
        Ok(true)
    }

    /// The next frame; `None` when the server closed the TCP stream cleanly
    /// between frames.
    pub async fn read_frame(&mut self) -> io::Result<Option<RawFrame>> {
        if !self.fill(2).await? {
            return if self.buf.is_empty() {
                Ok(None)
            } else {
                Err(protocol_error("stream ended inside a frame header"))
            };
        }
        let (b0, b1) = (self.buf[0], self.buf[1]);
        if b1 & 0x80 != 0 {
            return Err(protocol_error("a server frame must not be masked"));
        }
        if b0 & 0x70 != 0 {
            return Err(protocol_error("reserved bits set"));
        }
        let (len, header) = match b1 & 0x7f {
            126 => {
                if !self.fill(4).await? {
                    return Err(protocol_error("stream ended inside a frame header"));
                }
                (
                    usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]])),
                    4,
                )
            }
            127 => {
                if !self.fill(10).await? {
                    return Err(protocol_error("stream ended inside a frame header"));
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.buf[2..10]);
                let len = usize::try_from(u64::from_be_bytes(b))
                    .map_err(|_| protocol_error("frame too long"))?;
                (len, 10)
            }
            n => (usize::from(n), 2),
        };
        if !self.fill(header + len).await? {
            return Err(protocol_error("stream ended inside a frame"));
        }
        let payload = self.buf[header..header + len].to_vec();
        self.buf.drain(..header + len);
        Ok(Some(RawFrame {
            fin: b0 & 0x80 != 0,
            opcode: b0 & 0x0f,
            payload,
        }))
    }

    /// The next message (fragments reassembled). Pings are answered and
    /// returned; a close frame is echoed and returned. `None` at the end of
    /// the stream.
    pub async fn next_msg(&mut self) -> io::Result<Option<RawMsg>> {
        loop {
            let Some(frame) = self.read_frame().await? else {
                return Ok(None);
            };
            match frame.opcode {
                OP_CLOSE => {
                    let code = (frame.payload.len() >= 2)
                        .then(|| u16::from_be_bytes([frame.payload[0], frame.payload[1]]));
                    let reason = frame
                        .payload
                        .get(2..)
                        .map(|r| String::from_utf8_lossy(r).into_owned())
                        .unwrap_or_default();
                    if !self.close_sent {
                        // Echo the code, as RFC 6455 §5.5.1 asks; the server
                        // may already have gone.
                        let echo = frame.payload.get(..2).unwrap_or(&[]).to_vec();
                        let _ = self.send_frame(true, OP_CLOSE, &echo).await;
                    }
                    return Ok(Some(RawMsg::Close(code, reason)));
                }
                OP_PING => {
                    self.send_frame(true, OP_PONG, &frame.payload).await?;
                    return Ok(Some(RawMsg::Ping(frame.payload)));
                }
                OP_PONG => return Ok(Some(RawMsg::Pong(frame.payload))),
                OP_TEXT | OP_BINARY => {
                    if self.partial.is_some() {
                        return Err(protocol_error("new message inside a fragmented one"));
                    }
                    if frame.fin {
                        return finish(frame.opcode, frame.payload).map(Some);
                    }
                    self.partial = Some((frame.opcode, frame.payload));
                }
                OP_CONT => {
                    let Some((_, data)) = self.partial.as_mut() else {
                        return Err(protocol_error("continuation without a message"));
                    };
                    data.extend_from_slice(&frame.payload);
                    if frame.fin {
                        let (op, data) = self.partial.take().unwrap_or_default();
                        return finish(op, data).map(Some);
                    }
                }
                other => return Err(protocol_error(format!("unknown opcode {other:#x}"))),
            }
        }
    }

    /// The next text or binary message or close; pings and pongs are skipped.
    pub async fn next_data(&mut self) -> io::Result<Option<RawMsg>> {
        loop {
            match self.next_msg().await? {
                Some(RawMsg::Ping(_) | RawMsg::Pong(_)) => {}
                other => return Ok(other),
            }
        }
    }
}

/// A connection the server upgraded, with the 101 response's head and any
/// bytes read past it (the server may send right after the 101).
#[derive(Debug)]
pub struct Upgraded {
    pub stream: TcpStream,
    pub head: String,
    pub read_ahead: Vec<u8>,
}

impl Upgraded {
    /// The value of response header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// The client side of the opening handshake, by hand: send the upgrade
/// request for `target`, read the response head, require 101, `Upgrade:
/// websocket` and the right `Sec-WebSocket-Accept`. `Connection` must contain
/// the `Upgrade` token (RFC 6455 §4.1), and nothing more is checked: see
/// `tungstenite_clients_accept_the_upgrade_response` for the stricter check
/// tungstenite's own client makes.
pub async fn handshake(addr: SocketAddr, target: &str) -> io::Result<Upgraded> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed during the handshake after {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let upgraded = Upgraded {
        stream,
        head: String::from_utf8_lossy(&buf[..head_end]).into_owned(),
        read_ahead: buf[head_end..].to_vec(),
    };
    let head = &upgraded.head;
    if !head.starts_with("HTTP/1.1 101") {
        return Err(protocol_error(format!("upgrade refused: {head:?}")));
    }
    if !upgraded
        .header("upgrade")
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
    {
        return Err(protocol_error(format!("no Upgrade: websocket: {head:?}")));
    }
    if !upgraded.header("connection").is_some_and(|v| {
        v.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    }) {
        return Err(protocol_error(format!("no Connection: Upgrade: {head:?}")));
    }
    if upgraded.header("sec-websocket-accept") != Some(derive_accept_key(key.as_bytes()).as_str()) {
        return Err(protocol_error(format!(
            "bad Sec-WebSocket-Accept: {head:?}"
        )));
    }
    Ok(upgraded)
}

fn finish(opcode: u8, data: Vec<u8>) -> io::Result<RawMsg> {
    if opcode == OP_TEXT {
        String::from_utf8(data)
            .map(RawMsg::Text)
            .map_err(|_| protocol_error("invalid UTF-8 in a text message"))
    } else {
        Ok(RawMsg::Binary(data))
    }
}
