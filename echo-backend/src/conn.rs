//! One backend connection: handshake, then sessions one after another until the peer leaves,
//! the backend shuts down, or a fault ends it.
//!
//! One task per connection owns the WebSocket (no split, no second task: thousands of mostly
//! idle connections stay cheap). Outputs wait in a queue ordered by due time, so a simulated
//! inference delay never blocks reading and never reorders outputs.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
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
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::protocol::{self, Control};
use crate::stt::{Step, Stream};
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
// tungstenite's handshake callback returns its `ErrorResponse` (an `http::Response`) by value.
#[allow(clippy::result_large_err)]
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
    let dial_delay = shared.config.admission.dial_delay;
    if !dial_delay.is_zero() {
        tokio::select! {
            biased;
            () = kill.cancelled() => return,
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(dial_delay) => {}
        }
    }
    let mut admitted = None;
    let handshake = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_tungstenite::accept_hdr_async_with_config(
            stream,
            |_: &Request, response: Response| match admit(shared) {
                Ok(slot) => {
                    admitted = Some(slot);
                    Ok(response)
                }
                Err((status, reason)) => Err(refusal(status, reason)),
            },
            Some(config),
        ),
    );
    let ws = tokio::select! {
        biased;
        () = kill.cancelled() => return,
        () = cancel.cancelled() => return,
        accepted = handshake => match accepted {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => {
                debug!(%peer, "handshake failed or refused: {e}");
                return;
            }
            Err(_) => {
                debug!(%peer, "handshake timed out");
                return;
            }
        },
    };
    // Held until the connection ends: it counts against `max_connections`.
    let _admitted = admitted;
    let mut conn = Conn {
        ws,
        shared,
        rng: SmallRng::seed_from_u64(seed),
        out: VecDeque::new(),
        last_due: Instant::now(),
        data_in: 0,
        session: None,
        loose: None,
        limit_at: None,
    };
    let exit = conn.run(&cancel, &kill).await;
    match exit {
        Exit::Error(e) => debug!(%peer, "connection failed: {e}"),
        other => debug!(%peer, "connection ended: {other:?}"),
    }
    // Dropping the stream closes the TCP connection; the guard then uncounts the task.
}

/// An admitted connection, counted in `Shared::admitted` while it lives.
struct Admitted<'a>(&'a Shared);

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Decides the handshake (docs/protocol.md, "The echo-backend's stt mode"): 503 while
/// `max_connections` connections are open, 429 while the inference queue is longer than
/// `max_queue`.
fn admit(shared: &Shared) -> Result<Admitted<'_>, (StatusCode, String)> {
    let admission = &shared.config.admission;
    let open = shared.admitted.fetch_add(1, Ordering::Relaxed);
    let slot = Admitted(shared);
    if let Some(max) = admission.max_connections
        && open >= max
    {
        bump(&shared.counters.rejected_503);
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            format!("echo-backend at capacity: {max} connections open\n"),
        ));
    }
    if let Some(max) = admission.max_queue {
        let wait = shared.slots.wait(Instant::now());
        if wait > max {
            bump(&shared.counters.rejected_429);
            return Err((
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "echo-backend overloaded: inference queue {} ms (limit {} ms)\n",
                    wait.as_millis(),
                    max.as_millis()
                ),
            ));
        }
    }
    Ok(slot)
}

/// An HTTP refusal of the upgrade: the status, a one-line reason, `Retry-After: 1`.
fn refusal(status: StatusCode, reason: String) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(reason));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
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
    /// The open session (its `id` is always `Some`).
    session: Option<Stream>,
    /// Audio received outside any session (stt mode), e.g. through a plain proxy.
    loose: Option<Stream>,
    /// When the open session reaches its time limit.
    limit_at: Option<Instant>,
}

impl Conn<'_> {
    async fn run(&mut self, cancel: &CancellationToken, kill: &CancellationToken) -> Exit {
        let timer = tokio::time::sleep_until(Instant::now());
        tokio::pin!(timer);
        let limit_timer = tokio::time::sleep_until(Instant::now());
        tokio::pin!(limit_timer);
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
            let limit_at = self.limit_at;
            if let Some(at) = limit_at
                && limit_timer.deadline() != at
            {
                limit_timer.as_mut().reset(at);
            }
            let can_read = self.out.len() < MAX_PENDING;
            let flow = tokio::select! {
                biased;
                () = kill.cancelled() => return Exit::Killed,
                () = cancel.cancelled() => return self.close_gracefully().await,
                () = &mut timer, if next_due.is_some() => Flow::Continue,
                () = &mut limit_timer, if limit_at.is_some() => {
                    self.on_time_limit();
                    Flow::Continue
                }
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
        let flow = self.handle(msg);
        // `stall_all_for`: the whole server is frozen for a while.
        let stall = self.shared.stall_left();
        match flow {
            Flow::Continue if !stall.is_zero() => Flow::Pause(stall),
            Flow::Pause(delay) => Flow::Pause(delay.max(stall)),
            other => other,
        }
    }

    fn handle(&mut self, msg: Message) -> Flow {
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
        let faults = &self.shared.config.faults;
        match self.shared.config.mode {
            Mode::Echo => {
                if faults
                    .drop_every
                    .is_some_and(|n| self.data_in.is_multiple_of(n))
                {
                    bump(&self.shared.counters.dropped_messages);
                } else if faults.swap {
                    if let Some(previous) = self.shared.swap(msg) {
                        self.push(now, previous, OutKind::Data);
                    }
                } else {
                    self.push(now, msg, OutKind::Data);
                }
            }
            Mode::Stt => {
                // Text data in stt mode is ignored.
                if let Message::Binary(chunk) = &msg {
                    self.on_audio(chunk.len(), now);
                }
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

    /// stt mode: `len` bytes of audio for the open session (or for none).
    fn on_audio(&mut self, len: usize, now: Instant) {
        let stt = &self.shared.config.stt;
        let stream = match &mut self.session {
            Some(session) => session,
            None => self
                .loose
                .get_or_insert_with(|| Stream::new(None, stt, &mut self.rng)),
        };
        let steps = stream.audio(len, stt, &mut self.rng);
        let id = stream.id.clone();
        for step in steps {
            self.infer(id.as_deref(), &step, &protocol::text(&step), now);
        }
    }

    /// Runs one inference for `step` on the shared slots and queues its result (or, with
    /// `error_probability`, an `error` event in its place) for when it is done.
    fn infer(&mut self, session: Option<&str>, step: &Step, text: &str, now: Instant) {
        let service = self.inference_delay();
        let reservation = self.shared.slots.reserve(now, service);
        let queue_ms = u64::try_from(reservation.queued.as_millis()).unwrap_or(u64::MAX);
        let p = self.shared.config.stt.error_probability;
        let failed = p > 0.0 && self.rng.random_bool(p);
        let text = if failed {
            bump(&self.shared.counters.inference_errors);
            protocol::inference_failed(session, step, queue_ms)
        } else {
            protocol::result(session, step, queue_ms, text)
        };
        self.push(reservation.done, Message::text(text), OutKind::Data);
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

    /// The open session reached `session_time_limit`: finalize what was heard, tell the
    /// client, ignore the session's later audio. No `session.ended`: only the proxy's
    /// `session.end` ends a session.
    fn on_time_limit(&mut self) {
        self.limit_at = None;
        let now = Instant::now();
        let stt = &self.shared.config.stt;
        let Some(session) = &mut self.session else {
            return;
        };
        let open = session.has_open_utterance(stt);
        let last = session.finish(stt);
        session.stopped = true;
        let audio_ms = session.audio_ms(stt);
        let id = session.id.clone().unwrap_or_default();
        bump(&self.shared.counters.time_limits);
        if open {
            self.infer(Some(&id), &last, &protocol::text(&last), now);
        }
        let limit_ms = stt
            .session_time_limit
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let notice = protocol::time_limit(&id, audio_ms, limit_ms);
        self.push(now, Message::text(notice), OutKind::Data);
    }

    fn on_control(&mut self, control: Control) {
        let now = Instant::now();
        match control {
            Control::Start {
                session,
                resume_from,
            } => {
                if let Some(open) = &self.session {
                    warn!(
                        "session.start for {session:?} while {:?} is open: the proxy did not \
                         fence the connection; replacing the open session",
                        open.id
                    );
                }
                bump(&self.shared.counters.sessions_started);
                if resume_from.is_some() {
                    bump(&self.shared.counters.sessions_resumed);
                }
                let reply = protocol::started(&session);
                let stt = &self.shared.config.stt;
                let from = resume_from.unwrap_or(0);
                self.session = Some(Stream::resumed(Some(session), from, stt, &mut self.rng));
                self.limit_at = match self.shared.config.mode {
                    Mode::Stt => stt.session_time_limit.map(|d| now + d),
                    Mode::Echo => None,
                };
                self.push(now, Message::text(reply), OutKind::Control);
            }
            Control::End { session, fence } => {
                let open = self.session.take();
                self.limit_at = None;
                let open_id = open.as_ref().and_then(|open| open.id.clone());
                let id = match (session, open_id) {
                    (Some(id), Some(open_id)) if id != open_id => {
                        warn!(
                            "session.end for {id:?} while {open_id:?} is open: the proxy mixed \
                             up sessions",
                        );
                        id
                    }
                    (Some(id), _) => id,
                    (None, Some(open_id)) => open_id,
                    (None, None) => String::new(),
                };
                if self.shared.config.mode == Mode::Stt {
                    let stt = &self.shared.config.stt;
                    // The session's stream, or (no session.start: a plain proxy or a
                    // `reuse = "none"` connection) the audio received outside any.
                    let stream = open
                        .filter(|open| open.id.as_deref() == Some(id.as_str()))
                        .or_else(|| self.loose.take());
                    let mut stream =
                        stream.unwrap_or_else(|| Stream::new(None, stt, &mut self.rng));
                    // A session stopped at its time limit has had its final already.
                    if !stream.stopped {
                        let last = stream.finish(stt);
                        let text = protocol::closing_text(stream.chunks, stream.bytes());
                        self.infer(Some(&id), &last, &text, now);
                    }
                }
                // The fence token goes back as it came, after every result of the
                // session: only this reply completes the proxy's fence.
                let ended = protocol::ended(&id, fence.as_ref());
                self.push(now, Message::text(ended), OutKind::Ended);
            }
        }
    }
}
