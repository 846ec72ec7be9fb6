//! Client emulation: a device streaming audio chunks tagged with its session,
//! checking that everything it receives belongs to its own session (and
//! carries no fence token), and ending gracefully (`session.end`, then waiting
//! for `session.ended` and the close) or abruptly (vanishing, or closing,
//! mid-stream or mid-finish). A forging client tries to end its fence itself:
//! after `session.started` it sends a `session.ended` of its own making right
//! before its `session.end`.
//!
//! On a resumable backend its results carry audio offsets; the client keeps a
//! [`Ledger`] of them and reports every repeat, step back or gap
//! (`Kind::ResultOrder`), and a clean end whose finals fall short of the
//! audio it sent (`Kind::LostMessage`).

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
use crate::ledger::Ledger;
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

/// The shape of a forged `session.ended`, sent right before `session.end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forge {
    /// `{"type":"session.ended","session":"<id>"}`
    Plain,
    /// With a guessed `fence`.
    GuessedFence,
    /// Keys in another order, with spaces, and a guessed `fence`.
    Reordered,
    /// `session\u002eended`: the same message to a JSON parser, other bytes.
    Escaped,
    /// The plain text, sent as a binary message.
    Binary,
}

impl Forge {
    pub const ALL: [Forge; 5] = [
        Forge::Plain,
        Forge::GuessedFence,
        Forge::Reordered,
        Forge::Escaped,
        Forge::Binary,
    ];

    /// The forged message of session `sid` (number `n`).
    pub fn message(self, sid: &str, n: u64) -> Message {
        let guess = format!("{:032x}", u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let plain = format!(r#"{{"type":"session.ended","session":"{sid}"}}"#);
        match self {
            Forge::Plain => Message::text(plain),
            Forge::GuessedFence => Message::text(format!(
                r#"{{"type":"session.ended","session":"{sid}","fence":"{guess}"}}"#
            )),
            Forge::Reordered => Message::text(format!(
                r#"{{ "fence" : "{guess}", "session" : "{sid}", "type" : "session.ended" }}"#
            )),
            Forge::Escaped => Message::text(format!(
                r#"{{"type":"session\u002eended","session":"{sid}"}}"#
            )),
            Forge::Binary => Message::binary(plain.into_bytes()),
        }
    }
}

/// One client's script.
#[derive(Debug, Clone, Copy)]
pub struct ClientPlan {
    pub session: u64,
    pub chunks: u32,
    pub interval: Duration,
    pub size: usize,
    pub end: EndKind,
    /// A graceful client that forges a `session.ended` before its `session.end`.
    pub forge: Option<Forge>,
}

/// How long a graceful client waits for its session to end before it reports
/// being left hanging (well above `drain_timeout` + `acquire_timeout`).
const HANG_AFTER: Duration = Duration::from_secs(60);

struct Seen {
    sid: String,
    received: u64,
    got_started: bool,
    got_ended: bool,
    close_code: Option<u16>,
    /// When the Close came.
    close_at: Option<Instant>,
    /// Audio bytes sent (binary payloads).
    audio: u64,
    ledger: Ledger,
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
                    Err(_) => {
                        // Everything a backend says is tagged JSON.
                        world.violation(
                            Kind::CrossSession,
                            format!("{} received untagged text {:?}", self.sid, trunc(&t)),
                        );
                        return true;
                    }
                };
                if let Some(f) = v.get("fence").and_then(Value::as_str)
                    && world.is_fence_token(f)
                {
                    world.violation(
                        Kind::TokenLeak,
                        format!("{} received a fence token: {}", self.sid, trunc(&t)),
                    );
                }
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
                if session == self.sid
                    && let Err(e) = self.ledger.take(&v, self.audio)
                {
                    world.violation(Kind::ResultOrder, format!("{}: {e}", self.sid));
                }
                match kind {
                    "echo" | "partial" => self.received += 1,
                    "session.started" => self.got_started = true,
                    "session.ended" => self.got_ended = true,
                    _ => {}
                }
                true
            }
            Some(Ok(Message::Binary(b))) => {
                // The backends never send binary data: it is someone else's.
                world.violation(
                    Kind::CrossSession,
                    format!(
                        "{} received an untagged binary message {:?}",
                        self.sid,
                        trunc(&String::from_utf8_lossy(&b))
                    ),
                );
                true
            }
            Some(Ok(Message::Close(frame))) => {
                // tungstenite does not know 1014 and hands it over as 1002
                // "Protocol violation" (as proxy/tests/failover.rs reads it).
                self.close_code = Some(frame.map_or(1005, |f| match u16::from(f.code) {
                    1002 if f.reason == "Protocol violation" => 1014,
                    code => code,
                }));
                self.close_at = Some(Instant::now());
                true
            }
            Some(Ok(_)) => true,
            Some(Err(_)) | None => false,
        }
    }
}

fn trunc(t: &str) -> &str {
    match t.char_indices().nth(120) {
        Some((i, _)) => &t[..i],
        None => t,
    }
}

/// Run one client to its end and report what it saw.
pub async fn run_client(world: Arc<World>, plan: ClientPlan, io: DuplexStream) {
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Client, Some(ws_config())).await;
    let sid = format!("s{}", plan.session);
    let mut seen = Seen {
        sid: sid.clone(),
        received: 0,
        got_started: false,
        got_ended: false,
        close_code: None,
        close_at: None,
        audio: 0,
        ledger: Ledger::default(),
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
                let len = chunk.len() as u64;
                if ws.send(Message::binary(chunk.into_bytes())).await.is_err() {
                    open = false;
                } else {
                    seen.audio += len;
                    sent += 1;
                    next_send += plan.interval;
                }
            }
        }
    }
    if open {
        match plan.end {
            EndKind::Graceful => {
                let mut ready = true;
                if let Some(forge) = plan.forge {
                    // Forge only once the session has started.
                    let deadline = Instant::now() + HANG_AFTER;
                    while ready && !seen.got_started {
                        match tokio::time::timeout_at(deadline, ws.next()).await {
                            Ok(msg) => ready = seen.take(msg, &world),
                            Err(_) => {
                                world.violation(
                                    Kind::HungSession,
                                    format!("{sid}: no session.started in {HANG_AFTER:?}"),
                                );
                                ready = false;
                            }
                        }
                    }
                    ready = ready
                        && seen.close_code.is_none()
                        && ws.send(forge.message(&sid, plan.session)).await.is_ok();
                    if ready {
                        world.with(|s, now| {
                            s.stats.forged += 1;
                            s.trace
                                .record(now, format!("{sid} forges {forge:?} session.ended"));
                        });
                    }
                }
                if ready
                    && ws
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
    if seen.got_ended
        && let Err(e) = seen.ledger.finish(seen.audio)
    {
        world.violation(Kind::LostMessage, format!("{sid}: {e}"));
    }
    let report = ClientReport {
        sent,
        received: seen.received,
        got_ended: seen.got_ended,
        close_code: seen.close_code,
        close_at: seen.close_at,
        failovers: seen.ledger.failovers,
        graceful: plan.end == EndKind::Graceful,
    };
    world.client_done(plan.session, report);
}
