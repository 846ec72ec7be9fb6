//! A backend written by hand: a TCP listener that does the server side of
//! the WebSocket opening handshake itself (RFC 6455 §4.2) and then lets a test
//! script every byte it sends, so a test can do what no well-behaved backend
//! does: several frames in one write, a frame on an idle connection, a socket
//! that is no longer read.
//!
//! Each accepted connection runs the test's handler in its own task; the
//! backend counts dials and aborts every task when dropped.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::listen::{Served, serve};
use super::raw::{
    OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, RawFrame, RawMsg, close_code,
    read_frame_from, read_head, server_frame,
};

/// A running hand-written backend.
#[derive(Debug)]
pub struct RawBackend {
    /// Dropped with the backend: ends the accept loop and every connection.
    served: Served,
    dials: Arc<AtomicU64>,
}

impl RawBackend {
    /// Listen on 127.0.0.1 (ephemeral port); every accepted connection is
    /// upgraded and handed to `handler` in a task of its own.
    pub async fn start<F, Fut>(handler: F) -> Self
    where
        F: Fn(BackendConn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let dials = Arc::new(AtomicU64::new(0));
        let counter = dials.clone();
        let handler = Arc::new(handler);
        let served = serve(move |stream| {
            let index = counter.fetch_add(1, Ordering::SeqCst) + 1;
            let handler = handler.clone();
            async move {
                match BackendConn::accept(stream, index).await {
                    Ok(conn) => handler(conn).await,
                    Err(e) => eprintln!("raw backend: handshake of dial {index} failed: {e}"),
                }
            }
        })
        .await;
        Self { served, dials }
    }

    /// `ws://ADDR`.
    pub fn url(&self) -> String {
        format!("ws://{}", self.served.addr)
    }

    /// TCP connections accepted so far.
    pub fn dials(&self) -> u64 {
        self.dials.load(Ordering::SeqCst)
    }
}

/// One upgraded connection, server side.
#[derive(Debug)]
pub struct BackendConn {
    /// Which dial this is: 1 for the first connection accepted, and so on.
    pub index: u64,
    stream: TcpStream,
    buf: Vec<u8>,
}

impl BackendConn {
    /// The server side of the opening handshake, by hand.
    async fn accept(mut stream: TcpStream, index: u64) -> io::Result<Self> {
        stream.set_nodelay(true)?;
        let (buf, head_end) = read_head(&mut stream).await?;
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let key = head
            .lines()
            .skip(1)
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("sec-websocket-key")
                    .then(|| v.trim().to_string())
            })
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, format!("no key in {head:?}"))
            })?;
        let response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            derive_accept_key(key.as_bytes())
        );
        stream.write_all(response.as_bytes()).await?;
        Ok(Self {
            index,
            stream,
            buf: buf[head_end..].to_vec(),
        })
    }

    /// The next frame from the proxy (unmasked); `None` at a clean end of stream.
    pub async fn read_frame(&mut self) -> io::Result<Option<RawFrame>> {
        read_frame_from(&mut self.stream, &mut self.buf, true).await
    }

    /// The next text, binary or close message (fragments reassembled). Pings
    /// are answered with pongs and skipped, pongs skipped; a close is answered
    /// with a close echoing its code. `None` at the end of the stream.
    pub async fn next_msg(&mut self) -> io::Result<Option<RawMsg>> {
        let mut partial: Option<(u8, Vec<u8>)> = None;
        loop {
            let Some(frame) = self.read_frame().await? else {
                return Ok(None);
            };
            match frame.opcode {
                OP_PING => self.write(&server_frame(OP_PONG, &frame.payload)).await?,
                OP_PONG => {}
                OP_CLOSE => {
                    let code = close_code(&frame.payload);
                    let echo = frame.payload.get(..2).unwrap_or(&[]).to_vec();
                    let _ = self.write(&server_frame(OP_CLOSE, &echo)).await;
                    return Ok(Some(RawMsg::Close(code, String::new())));
                }
                OP_TEXT | OP_BINARY | OP_CONT => {
                    let (opcode, mut data) = match (frame.opcode, partial.take()) {
                        (OP_CONT, Some(p)) => p,
                        (OP_CONT, None) => return Err(bad("continuation without a message")),
                        (_, Some(_)) => return Err(bad("new message inside a fragmented one")),
                        (op, None) => (op, Vec::new()),
                    };
                    data.extend_from_slice(&frame.payload);
                    if !frame.fin {
                        partial = Some((opcode, data));
                        continue;
                    }
                    return Ok(Some(if opcode == OP_TEXT {
                        RawMsg::Text(String::from_utf8(data).map_err(|_| bad("invalid UTF-8"))?)
                    } else {
                        RawMsg::Binary(data)
                    }));
                }
                other => return Err(bad(&format!("unknown opcode {other:#x}"))),
            }
        }
    }

    /// Write `bytes` (one or more whole frames, see [`server_frame`]) in one
    /// `write_all`.
    pub async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }

    pub async fn send_text(&mut self, text: &str) -> io::Result<()> {
        self.write(&server_frame(OP_TEXT, text.as_bytes())).await
    }

    /// Read and discard everything until the proxy closes the connection
    /// (close frame, end of stream or error). Returns the close code if a
    /// close frame came.
    pub async fn until_closed(&mut self) -> Option<u16> {
        loop {
            match self.next_msg().await {
                Ok(Some(RawMsg::Close(code, _))) => return code,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// The TCP stream, e.g. to hold the connection open without reading it.
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// A control message of the fencing protocol, as the backend reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    pub kind: String,
    pub session: Option<String>,
    pub fence: Option<String>,
}

/// `Some` for a JSON object whose `type` starts with `session.`.
pub fn control(text: &str) -> Option<Control> {
    let v: Value = serde_json::from_str(text).ok()?;
    let kind = v.get("type")?.as_str()?;
    kind.starts_with("session.").then(|| Control {
        kind: kind.to_string(),
        session: v.get("session").and_then(Value::as_str).map(str::to_string),
        fence: v.get("fence").and_then(Value::as_str).map(str::to_string),
    })
}

/// `{"type":"session.started","session":ID}` as a frame.
pub fn started_frame(session: &str) -> Vec<u8> {
    let text = serde_json::json!({"type": "session.started", "session": session}).to_string();
    server_frame(OP_TEXT, text.as_bytes())
}

/// `{"type":"session.ended","session":ID,"fence":TOKEN}` as a frame (no
/// `fence` key when `fence` is `None`).
pub fn ended_frame(session: &str, fence: Option<&str>) -> Vec<u8> {
    let mut v = serde_json::json!({"type": "session.ended", "session": session});
    if let Some(fence) = fence {
        v["fence"] = Value::from(fence);
    }
    server_frame(OP_TEXT, v.to_string().as_bytes())
}

/// A final result of `session` as a frame.
pub fn final_frame(session: &str) -> Vec<u8> {
    let text =
        serde_json::json!({"type": "final", "session": session, "text": "final"}).to_string();
    server_frame(OP_TEXT, text.as_bytes())
}
