//! Client emulation: a device streaming audio chunks tagged with its session,
//! checking that everything it receives belongs to its own session, and ending
//! gracefully (`session.end`, then waiting for `session.ended` and the close)
//! or abruptly (vanishing, or closing, mid-stream or mid-finish).

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::DuplexStream;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::backend::ws_config;
use crate::checker::Kind;
use crate::world::{ClientReport, World};

/// How a client ends its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndKind {
    /// `{"type":"session.end"}`, then read everything until the proxy closes.
    Graceful,
    /// Vanish (drop the connection) after this many chunks.
    Vanish(u32),
    /// Send a Close after this many chunks.
    Close(u32),
    /// Send `session.end` and vanish at once, while results are still coming.
    VanishInFinish,
}

/// One client's script.
#[derive(Debug, Clone, Copy)]
pub struct ClientPlan {
    pub session: u64,
    pub chunks: u32,
    pub interval: Duration,
    pub size: usize,
    pub end: EndKind,
}

/// How long a graceful client waits for its session to end before it reports
/// being left hanging (well above `drain_timeout` + `acquire_timeout`).
const HANG_AFTER: Duration = Duration::from_secs(60);

struct Seen {
    sid: String,
    received: u64,
    got_ended: bool,
    close_code: Option<u16>,
}

impl Seen {
    /// Check one message from the proxy. Returns false once the stream ended.
    fn take(
        &mut self,
        msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
        world: &World,
    ) -> bool {
        match msg {
            Some(Ok(Message::Text(t))) => {
                let v: Value = match serde_json::from_str(&t) {
                    Ok(v) => v,
                    Err(_) => return true,
                };
                let session = v.get("session").and_then(Value::as_str).unwrap_or("");
                let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
                let data = v.get("data").and_then(Value::as_str);
                if session != self.sid || data.is_some_and(|d| d != self.sid) {
                    world.violation(
                        Kind::CrossSession,
                        format!(
                            "{} received {kind} of session {session:?} (data {data:?})",
                            self.sid
                        ),
                    );
                }
                match kind {
                    "echo" | "partial" => self.received += 1,
                    "session.ended" => self.got_ended = true,
                    _ => {}
                }
                true
            }
            Some(Ok(Message::Close(frame))) => {
                self.close_code = Some(frame.map_or(1005, |f| u16::from(f.code)));
                true
            }
            Some(Ok(_)) => true,
            Some(Err(_)) | None => false,
        }
    }
}

/// Run one client to its end and report what it saw.
pub async fn run_client(world: Arc<World>, plan: ClientPlan, io: DuplexStream) {
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Client, Some(ws_config())).await;
    let sid = format!("s{}", plan.session);
    let mut seen = Seen {
        sid: sid.clone(),
        received: 0,
        got_ended: false,
        close_code: None,
    };
    let stop_at = match plan.end {
        EndKind::Graceful | EndKind::VanishInFinish => plan.chunks,
        EndKind::Vanish(n) | EndKind::Close(n) => n.min(plan.chunks),
    };
    let mut sent: u64 = 0;
    let mut next_send = Instant::now() + plan.interval;
    let mut open = true;
    let mut pad = format!("{sid}|");
    pad.extend(std::iter::repeat_n(
        'x',
        plan.size.saturating_sub(pad.len()),
    ));
    while open && sent < u64::from(stop_at) {
        tokio::select! {
            biased;
            msg = ws.next() => open = seen.take(msg, &world),
            () = tokio::time::sleep_until(next_send) => {
                let chunk = format!("{sid}|{sent}|{pad}");
                if ws.send(Message::binary(chunk.into_bytes())).await.is_err() {
                    open = false;
                } else {
                    sent += 1;
                    next_send += plan.interval;
                }
            }
        }
    }
    if open {
        match plan.end {
            EndKind::Graceful => {
                if ws
                    .send(Message::text(r#"{"type":"session.end"}"#))
                    .await
                    .is_ok()
                {
                    let deadline = Instant::now() + HANG_AFTER;
                    loop {
                        match tokio::time::timeout_at(deadline, ws.next()).await {
                            Ok(msg) => {
                                if !seen.take(msg, &world) {
                                    break;
                                }
                            }
                            Err(_) => {
                                world.violation(
                                    Kind::HungSession,
                                    format!("{sid}: no end {HANG_AFTER:?} after session.end"),
                                );
                                break;
                            }
                        }
                    }
                }
            }
            EndKind::VanishInFinish => {
                let _ = ws.send(Message::text(r#"{"type":"session.end"}"#)).await;
            }
            EndKind::Close(_) => {
                let _ = ws.close(None).await;
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    while seen.take(ws.next().await, &world) {}
                })
                .await;
            }
            EndKind::Vanish(_) => {}
        }
    }
    drop(ws);
    let report = ClientReport {
        sent,
        received: seen.received,
        got_ended: seen.got_ended,
        close_code: seen.close_code,
        graceful: plan.end == EndKind::Graceful,
    };
    world.client_done(plan.session, report);
}
