//! One backend connection: handshake, then sessions one after another until the peer leaves,
//! the backend shuts down, or a fault ends it.
//!
//! One task per connection owns the WebSocket (no split, no second task: thousands of mostly
//! idle connections stay cheap). Outputs wait in a queue ordered by due time, so a simulated
//! inference delay never blocks reading and never reorders outputs.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::protocol::{self, Control};
use crate::{Mode, Shared, TaskGuard, bump};

/// A peer that has not completed the WebSocket handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a shutdown waits for the close frame to be written.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Read buffer per connection: a few KiB for many mostly idle connections (tungstenite's
/// default, 128 KiB, is allocated and zeroed up front).
const READ_BUFFER_SIZE: usize = 4 << 10;
/// Outputs waiting for their due time; reading pauses while the queue is this long.
const MAX_PENDING: usize = 1024;

/// tungstenite settings for many mostly idle connections.
pub(crate) fn ws_config(max_message_size: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_SIZE)
        // Write every message at once: no write buffer kept around per connection.
        .write_buffer_size(0)
        // Room for one queued frame of the largest size plus a pong or close frame.
        .max_write_buffer_size(max_message_size.saturating_mul(2).saturating_add(64 << 10))
        .max_message_size(Some(max_message_size))
        .max_frame_size(Some(max_message_size))
}

/// Serves one accepted TCP connection until it ends.
pub(crate) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    guard: TaskGuard,
    cancel: CancellationToken,
    kill: CancellationToken,
    seed: u64,
) {
    let shared = guard.shared();
    if let Err(e) = stream.set_nodelay(true) {
        debug!(%peer, "set_nodelay failed: {e}");
    }
    let config = ws_config(shared.config.max_message_size);
    let handshake = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_tungstenite::accept_async_with_config(stream, Some(config)),
    );
    let ws = tokio::select! {
        biased;
        () = kill.cancelled() => return,
        () = cancel.cancelled() => return,
        accepted = handshake => match accepted {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => {
                debug!(%peer, "handshake failed: {e}");
                return;
            }
            Err(_) => {
                debug!(%peer, "handshake timed out");
                return;
            }
        },
    };
    let mut conn = Conn {
        ws,
        shared,
        rng: SmallRng::seed_from_u64(seed),
        out: VecDeque::new(),
        last_due: Instant::now(),
        data_in: 0,
        session: None,
        unsessioned_seq: 0,
    };
    let exit = conn.run(&cancel, &kill).await;
    match exit {
        Exit::Error(e) => debug!(%peer, "connection failed: {e}"),
        other => debug!(%peer, "connection ended: {other:?}"),
    }
    // Dropping the stream closes the TCP connection; the guard then uncounts the task.
}

#[derive(Debug)]
enum Exit {
    /// The peer closed (close handshake or EOF).
    PeerClosed,
    /// The backend shut down; a close frame was sent.
    Shutdown,
    /// `kill_all`: dropped without a close frame.
    Killed,
    /// `drop_after` reached: dropped without a close frame.
    Dropped,
    /// `stall_after` reached, then the backend shut down or killed it.
    Stalled,
    /// A WebSocket or I/O error.
    Error(WsError),
}

/// What to do after a received message.
enum Flow {
    Continue,
    /// Neither read nor write for this long (delays the automatic pong).
    Pause(Duration),
    /// Drop the connection abruptly (after writing what is due).
    Drop,
    /// Stop reading and writing, keep the connection open (after writing what is due).
    Stall,
}

/// What an output counts as once written.
#[derive(Clone, Copy)]
enum OutKind {
    Data,
    Control,
    Ended,
}

struct Pending {
    due: Instant,
    msg: Message,
    kind: OutKind,
}

struct Session {
    id: String,
    /// Next result's sequence number.
    seq: u64,
    chunks: u64,
    bytes: u64,
}

struct Conn<'a> {
    ws: WebSocketStream<TcpStream>,
    shared: &'a Shared,
    rng: SmallRng,
    /// Outputs in due-time order (due times never decrease).
    out: VecDeque<Pending>,
    /// Due time of the last queued output.
    last_due: Instant,
    /// Data messages received on this connection.
    data_in: u64,
    session: Option<Session>,
    /// Sequence numbers of partials for audio received outside any session (stt mode).
    unsessioned_seq: u64,
}

impl Conn<'_> {
    async fn run(&mut self, cancel: &CancellationToken, kill: &CancellationToken) -> Exit {
        let timer = tokio::time::sleep_until(Instant::now());
        tokio::pin!(timer);
        loop {
            if self.out.front().is_some_and(|p| p.due <= Instant::now()) {
                tokio::select! {
                    biased;
                    () = kill.cancelled() => return Exit::Killed,
                    () = cancel.cancelled() => return self.close_gracefully().await,
                    written = self.write_due() => {
                        if let Err(e) = written {
                            return Exit::Error(e);
                        }
                    }
                }
            }
            let next_due = self.out.front().map(|p| p.due);
            if let Some(due) = next_due
                && timer.deadline() != due
            {
                timer.as_mut().reset(due);
            }
            let can_read = self.out.len() < MAX_PENDING;
            let flow = tokio::select! {
                biased;
                () = kill.cancelled() => return Exit::Killed,
                () = cancel.cancelled() => return self.close_gracefully().await,
                () = &mut timer, if next_due.is_some() => Flow::Continue,
                msg = self.ws.next(), if can_read => match msg {
                    None => return Exit::PeerClosed,
                    Some(Err(e)) => return Exit::Error(e),
                    Some(Ok(msg)) => self.on_message(msg),
                },
            };
            match flow {
                Flow::Continue => {}
                Flow::Pause(delay) => {
                    tokio::select! {
                        biased;
                        () = kill.cancelled() => return Exit::Killed,
                        () = cancel.cancelled() => return self.close_gracefully().await,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                Flow::Drop | Flow::Stall => {
                    tokio::select! {
                        biased;
                        () = kill.cancelled() => return Exit::Killed,
                        () = cancel.cancelled() => return self.close_gracefully().await,
                        written = self.write_due() => {
                            if let Err(e) = written {
                                return Exit::Error(e);
                            }
                        }
                    }
                    if matches!(flow, Flow::Drop) {
                        return Exit::Dropped;
                    }
                    tokio::select! {
                        () = kill.cancelled() => {}
                        () = cancel.cancelled() => {}
                    }
                    return Exit::Stalled;
                }
            }
        }
    }

    /// Writes every queued output that is due, then flushes.
    async fn write_due(&mut self) -> Result<(), WsError> {
        let now = Instant::now();
        let mut wrote = false;
        while self.out.front().is_some_and(|p| p.due <= now) {
            let Some(pending) = self.out.pop_front() else {
                break;
            };
            self.ws.feed(pending.msg).await?;
            let counters = &self.shared.counters;
            match pending.kind {
                OutKind::Data => bump(&counters.messages_out),
                OutKind::Ended => bump(&counters.sessions_ended),
                OutKind::Control => {}
            }
            wrote = true;
        }
        if wrote {
            self.ws.flush().await?;
        }
        Ok(())
    }

    /// Sends a close frame (1001, going away), bounded by [`CLOSE_TIMEOUT`].
    async fn close_gracefully(&mut self) -> Exit {
        let frame = CloseFrame {
            code: CloseCode::Away,
            reason: "echo-backend shutting down".into(),
        };
        match tokio::time::timeout(CLOSE_TIMEOUT, self.ws.close(Some(frame))).await {
            Ok(Ok(())) | Err(_) => Exit::Shutdown,
            Ok(Err(e)) => Exit::Error(e),
        }
    }

    /// Queues an output; it goes out at `due` or after every output queued before, whichever
    /// is later.
    fn push(&mut self, due: Instant, msg: Message, kind: OutKind) {
        let due = due.max(self.last_due);
        self.last_due = due;
        self.out.push_back(Pending { due, msg, kind });
    }

    fn on_message(&mut self, msg: Message) -> Flow {
        match msg {
            Message::Text(text) => {
                if let Some(control) = protocol::parse_control(text.as_str()) {
                    self.on_control(control);
                    return Flow::Continue;
                }
                self.on_data(Message::Text(text))
            }
            Message::Binary(_) => self.on_data(msg),
            Message::Ping(_) => {
                // tungstenite queued the pong; it goes out with the next read or write.
                bump(&self.shared.counters.pings_answered);
                let delay = self.shared.pong_delay();
                if delay.is_zero() {
                    Flow::Continue
                } else {
                    Flow::Pause(delay)
                }
            }
            // tungstenite answers a close itself; the next read then reports the end.
            Message::Pong(_) | Message::Close(_) | Message::Frame(_) => Flow::Continue,
        }
    }

    fn on_data(&mut self, msg: Message) -> Flow {
        bump(&self.shared.counters.messages_in);
        self.data_in += 1;
        let now = Instant::now();
        match self.shared.config.mode {
            Mode::Echo => self.push(now, msg, OutKind::Data),
            Mode::Stt => {
                if let Message::Binary(chunk) = &msg {
                    let len = chunk.len();
                    let text = match &mut self.session {
                        Some(session) => {
                            let seq = session.seq;
                            session.seq += 1;
                            session.chunks += 1;
                            session.bytes += len as u64;
                            protocol::partial(Some(&session.id), seq, len)
                        }
                        None => {
                            let seq = self.unsessioned_seq;
                            self.unsessioned_seq += 1;
                            protocol::partial(None, seq, len)
                        }
                    };
                    let due = now + self.inference_delay();
                    self.push(due, Message::text(text), OutKind::Data);
                }
                // Text data in stt mode is ignored.
            }
        }
        let faults = &self.shared.config.faults;
        if faults.drop_after.is_some_and(|n| self.data_in >= n) {
            Flow::Drop
        } else if faults.stall_after.is_some_and(|n| self.data_in >= n) {
            Flow::Stall
        } else {
            Flow::Continue
        }
    }

    fn inference_delay(&mut self) -> Duration {
        let config = &self.shared.config;
        let jitter_us = u64::try_from(config.jitter.as_micros()).unwrap_or(u64::MAX);
        let jitter = if jitter_us == 0 {
            Duration::ZERO
        } else {
            Duration::from_micros(self.rng.random_range(0..=jitter_us))
        };
        config.delay.saturating_add(jitter)
    }

    fn on_control(&mut self, control: Control) {
        let now = Instant::now();
        match control {
            Control::Start { session } => {
                if let Some(open) = &self.session {
                    warn!(
                        "session.start for {session:?} while {:?} is open: the proxy did not \
                         fence the connection; replacing the open session",
                        open.id
                    );
                }
                bump(&self.shared.counters.sessions_started);
                let reply = protocol::started(&session);
                self.session = Some(Session {
                    id: session,
                    seq: 0,
                    chunks: 0,
                    bytes: 0,
                });
                self.push(now, Message::text(reply), OutKind::Control);
            }
            Control::End { session, fence } => {
                let open = self.session.take();
                let id = match (session, &open) {
                    (Some(id), Some(open)) if id != open.id => {
                        warn!(
                            "session.end for {id:?} while {:?} is open: the proxy mixed up \
                             sessions",
                            open.id
                        );
                        id
                    }
                    (Some(id), _) => id,
                    (None, Some(open)) => open.id.clone(),
                    (None, None) => String::new(),
                };
                if self.shared.config.mode == Mode::Stt {
                    let (seq, chunks, bytes) = open
                        .as_ref()
                        .filter(|open| open.id == id)
                        .map_or((0, 0, 0), |open| (open.seq, open.chunks, open.bytes));
                    let text = protocol::final_result(&id, seq, chunks, bytes);
                    self.push(now, Message::text(text), OutKind::Data);
                }
                // The fence token goes back as it came: only this reply completes the
                // proxy's fence.
                let ended = protocol::ended(&id, fence.as_ref());
                self.push(now, Message::text(ended), OutKind::Ended);
            }
        }
    }
}
