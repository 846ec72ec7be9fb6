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

    /// A client on a connection [`handshake`] (or [`handshake_on`]) upgraded.
    pub fn from_upgraded(upgraded: Upgraded) -> Self {
        Self {
            stream: upgraded.stream,
            buf: upgraded.read_ahead,
            partial: None,
            close_sent: false,
        }
    }

    /// Connect like [`RawWs::connect`] with the socket's receive buffer set
    /// to `rcvbuf` bytes before connecting (the kernel may round it), so a
    /// client that stops reading fills up quickly.
    pub async fn connect_with_rcvbuf(
        addr: SocketAddr,
        target: &str,
        rcvbuf: u32,
    ) -> io::Result<Self> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(rcvbuf)?;
        let stream = socket.connect(addr).await?;
        Ok(Self::from_upgraded(
            handshake_on(stream, addr, target).await?,
        ))
    }

    /// The TCP stream (for socket-level checks: `try_read`, `take_error`).
    pub fn tcp(&self) -> &TcpStream {
        &self.stream
    }

    /// Bytes read off the socket and not parsed yet.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The TCP stream and the bytes read but not parsed yet, to split the
    /// connection into a reading and a writing half.
    pub fn into_parts(self) -> (TcpStream, Vec<u8>) {
        (self.stream, self.buf)
    }

    /// Send one masked frame.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) -> io::Result<()> {
        let frame = client_frame(fin, opcode, payload);
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

    /// The next frame; `None` when the server closed the TCP stream cleanly
    /// between frames.
    pub async fn read_frame(&mut self) -> io::Result<Option<RawFrame>> {
        read_frame_from(&mut self.stream, &mut self.buf, false).await
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
        header_in(&self.head, name)
    }
}

/// The value of header `name` (case-insensitive) in an HTTP head, if present.
pub fn header_in<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The status code of an HTTP response head; a head without one fails the
/// test (the server answered something that is not HTTP).
pub fn status_of(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"))
}

/// A request sent by hand and the head of its answer, with the connection
/// and whatever arrived past the head (after a 101, the start of the
/// WebSocket stream).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub stream: TcpStream,
    pub read_ahead: Vec<u8>,
}

impl Answer {
    /// The value of response header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        header_in(&self.head, name)
    }
}

/// Send `request` verbatim on a new connection to `addr` and read the
/// answer's head, all within [`super::STEP`].
pub async fn send_request(addr: SocketAddr, request: &str) -> Answer {
    super::within(super::STEP, format_args!("an answer from {addr}"), async {
        let mut stream = TcpStream::connect(addr).await.expect("connecting");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("writing the request");
        let (buf, end) = read_head(&mut stream).await.expect("reading the head");
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        Answer {
            status: status_of(&head),
            head,
            stream,
            read_ahead: buf[end..].to_vec(),
        }
    })
    .await
}

/// The client side of the opening handshake, by hand: send the upgrade
/// request for `target`, read the response head, require 101, `Upgrade:
/// websocket` and the right `Sec-WebSocket-Accept`. `Connection` must contain
/// the `Upgrade` token (RFC 6455 §4.1), and nothing more is checked: see
/// `tungstenite_clients_accept_the_upgrade_response` for the stricter check
/// tungstenite's own client makes.
pub async fn handshake(addr: SocketAddr, target: &str) -> io::Result<Upgraded> {
    handshake_on(TcpStream::connect(addr).await?, addr, target).await
}

/// [`handshake`] on a stream already connected to `addr` (e.g. one whose
/// socket options were set before connecting).
pub async fn handshake_on(
    mut stream: TcpStream,
    addr: SocketAddr,
    target: &str,
) -> io::Result<Upgraded> {
    stream.set_nodelay(true)?;
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let (buf, head_end) = read_head(&mut stream).await?;
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

/// The close code in a close frame's payload, if it has one.
pub fn close_code(payload: &[u8]) -> Option<u16> {
    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
}

/// One frame as a client sends it: masked with a random key.
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    encode_frame(fin, opcode, payload, Some(rand::random()))
}

/// One frame as a server sends it: unmasked.
pub fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    encode_frame(true, opcode, payload, None)
}

/// One frame on the wire, masked with `mask` if given.
pub fn encode_frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let len = payload.len();
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut frame = Vec::with_capacity(len + 14);
    frame.push((u8::from(fin) << 7) | opcode);
    if len < 126 {
        frame.push(mask_bit | len as u8);
    } else if let Ok(len16) = u16::try_from(len) {
        frame.push(mask_bit | 126);
        frame.extend_from_slice(&len16.to_be_bytes());
    } else {
        frame.push(mask_bit | 127);
        frame.extend_from_slice(&(len as u64).to_be_bytes());
    }
    match mask {
        Some(mask) => {
            frame.extend_from_slice(&mask);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        }
        None => frame.extend_from_slice(payload),
    }
    frame
}

/// Parse the frame at the front of `buf`: `None` while it is incomplete, else
/// the frame (unmasked) and how many bytes it took. `masked` says which side
/// sent it: client frames must be masked, server frames must not.
pub fn parse_frame(buf: &[u8], masked: bool) -> io::Result<Option<(RawFrame, usize)>> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if (b1 & 0x80 != 0) != masked {
        return Err(protocol_error(if masked {
            "a client frame must be masked"
        } else {
            "a server frame must not be masked"
        }));
    }
    if b0 & 0x70 != 0 {
        return Err(protocol_error("reserved bits set"));
    }
    let (len, mut header) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (usize::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut n = [0u8; 8];
                n.copy_from_slice(b);
                let len = usize::try_from(u64::from_be_bytes(n))
                    .map_err(|_| protocol_error("frame too long"))?;
                (len, 10)
            }
            None => return Ok(None),
        },
        n => (usize::from(n), 2),
    };
    let mask = if masked {
        let Some(key) = buf.get(header..header + 4) else {
            return Ok(None);
        };
        header += 4;
        Some([key[0], key[1], key[2], key[3]])
    } else {
        None
    };
    let Some(data) = buf.get(header..header + len) else {
        return Ok(None);
    };
    let payload = match mask {
        Some(mask) => data
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect(),
        None => data.to_vec(),
    };
    let frame = RawFrame {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0f,
        payload,
    };
    Ok(Some((frame, header + len)))
}

/// The next frame off `stream`, with `buf` holding bytes read but not parsed
/// yet; `None` when the stream ended cleanly between frames. `masked` as in
/// [`parse_frame`]. Works on either half of a split stream.
pub async fn read_frame_from<R: tokio::io::AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut Vec<u8>,
    masked: bool,
) -> io::Result<Option<RawFrame>> {
    loop {
        if let Some((frame, used)) = parse_frame(buf, masked)? {
            buf.drain(..used);
            return Ok(Some(frame));
        }
        let mut chunk = vec![0u8; 64 << 10];
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(protocol_error("stream ended inside a frame"))
            };
        }
        buf.extend_from_slice(&chunk[..read]);
    }
}

/// Read an HTTP head off `stream`: every byte read so far (the head and
/// whatever followed it) and where the head ends.
pub async fn read_head(stream: &mut TcpStream) -> io::Result<(Vec<u8>, usize)> {
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
    Ok((buf, head_end))
}
