//! A shard: one task that owns a slice of the sessions, both directions.
//!
//! Sending: the shard wakes on one shared ticker (every `tick`, 1 ms by default) and, for
//! each of its sessions, sends every message whose intended time has come. No timer per
//! session, no task per session, no lock: a session's socket is written with the shard's
//! own task context, and one flush per session and tick. A backpressured socket (flush
//! pending) is skipped until a later tick, when its late messages go out in a burst; their
//! latency is still measured from the intended time.
//!
//! Receiving: each session's read half is a stream in one `SelectAll` owned by the same
//! task, so only sessions that have data are polled. Latencies go into the shard's own
//! histogram, which is handed to the collector once a second.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::stream::{AbortHandle, Abortable, SelectAll, SplitSink, SplitStream};
use futures_util::{SinkExt, Stream, StreamExt};
use hdrhistogram::Histogram;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

use crate::Mode;
use crate::proto::{self, Header};

pub(crate) type Ws = WebSocketStream<TcpStream>;

const NS_PER_S: u64 = 1_000_000_000;
/// Reader events handled per poll before the shard yields to the runtime.
const READ_BUDGET: usize = 256;
/// Messages sent per poll before the shard yields (visiting 32 idle sessions costs 1).
const SEND_BUDGET: usize = 256;
/// How long a session that has ended waits for the server to complete the Close.
const CLOSE_WAIT_NS: u64 = NS_PER_S;
/// Most messages one session sends in one sweep (a backlog goes out over several).
const BURST: u64 = 64;

/// When each session's messages are due. All times are ns since run start.
///
/// Session `i` of `n` starts at `ramp * i / n` (a steady arrival rate of `n / ramp`)
/// and streams for its lifetime: `duration`, or — with `min_life_ns < duration_ns` —
/// a length drawn uniformly from `[min_life, duration]` by a hash of `(seed, i)`, so a
/// run is repeatable. Its messages sit on a grid of period `1 / rate` shifted by
/// `period * i / n`, so the sessions' sends are spread evenly over each period
/// instead of bunching in the same millisecond.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Schedule {
    pub sessions: usize,
    pub period_ns: f64,
    pub ramp_ns: u64,
    /// The longest lifetime (every session's, when lifetimes are fixed).
    pub duration_ns: u64,
    /// The shortest lifetime; equal to `duration_ns` for fixed lifetimes.
    pub min_life_ns: u64,
    pub seed: u64,
}

/// SplitMix64: a fixed, well-mixed hash of one word (no dependency, no state).
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Schedule {
    pub(crate) fn planned_start_ns(&self, i: u32) -> u64 {
        (self.ramp_ns as f64 * f64::from(i) / self.sessions as f64) as u64
    }

    /// How long session `i` streams.
    pub(crate) fn lifetime_ns(&self, i: u32) -> u64 {
        let span = self.duration_ns.saturating_sub(self.min_life_ns);
        if span == 0 {
            return self.duration_ns;
        }
        let unit = (splitmix64(self.seed ^ u64::from(i)) >> 11) as f64 / (1u64 << 53) as f64;
        self.min_life_ns + (unit * span as f64) as u64
    }

    pub(crate) fn end_ns(&self, i: u32) -> u64 {
        self.planned_start_ns(i) + self.lifetime_ns(i)
    }

    /// Most slots any session can have.
    pub(crate) fn capacity(&self) -> u64 {
        (self.duration_ns as f64 / self.period_ns).ceil() as u64 + 1
    }

    /// The session's grid from `not_before` on: (time of slot 0, number of slots).
    pub(crate) fn slots(&self, i: u32, not_before_ns: u64) -> (f64, u64) {
        let start = not_before_ns.max(self.planned_start_ns(i)) as f64;
        let phase = self.period_ns * f64::from(i) / self.sessions as f64;
        let m0 = ((start - phase) / self.period_ns).ceil().max(0.0);
        let base = phase + m0 * self.period_ns;
        let end = self.end_ns(i) as f64;
        let total = if end > base {
            ((end - base) / self.period_ns).ceil() as u64
        } else {
            0
        };
        (base, total.min(self.capacity()))
    }

    /// Slots the schedule gives session `i` from its planned start.
    pub(crate) fn planned_slots(&self, i: u32) -> u64 {
        self.slots(i, 0).1
    }
}

/// What shards and connect tasks tell the collector.
#[derive(Debug)]
pub(crate) enum Event {
    /// A session connected; how long connect plus handshake took, µs.
    Connected {
        us: u64,
    },
    NotStarted,
    ConnectFailed {
        kind: String,
        /// The session's planned slots, all unsent.
        slots: u64,
    },
    Error {
        kind: String,
    },
    Interval {
        shard: usize,
        second: u64,
        sent: u64,
        received: u64,
        /// Sessions that ended other than cleanly in this second.
        aborted: u64,
        hist: Histogram<u64>,
    },
    Done {
        shard: usize,
        summary: Box<ShardSummary>,
    },
}

/// Counts a shard adds up over its sessions.
#[derive(Debug, Default, Clone)]
pub(crate) struct Totals {
    pub scheduled: u64,
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    /// Of `lost`, lost in sessions that ended cleanly.
    pub lost_completed: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub cross_session: u64,
    pub unsent: u64,
    pub finals: u64,
    pub completed: usize,
    pub aborted: usize,
}

#[derive(Debug)]
pub(crate) struct ShardSummary {
    pub totals: Totals,
    pub send_lag: Histogram<u64>,
}

/// A connected session handed to its shard.
#[derive(Debug)]
pub(crate) struct NewConn {
    pub index: u32,
    pub ws: Ws,
}

/// Everything a shard needs that is not a session.
#[derive(Debug)]
pub(crate) struct ShardParams {
    pub id: usize,
    pub mode: Mode,
    pub size: usize,
    pub sched: Schedule,
    pub start: Instant,
    pub drain_ns: u64,
    /// Drain allowed after an early stop.
    pub stop_drain_ns: u64,
    pub tick: Duration,
    pub stop: Arc<AtomicBool>,
    pub events: mpsc::UnboundedSender<Event>,
    /// An empty histogram to clone (auto-resizing, 3 significant figures, µs).
    pub hist: Histogram<u64>,
}

enum ReadEvent {
    Msg(Result<Message, WsError>),
    End,
}

/// A session's read half, tagged with its slot, ending with one `End` event.
struct Reader {
    slot: usize,
    inner: Option<Abortable<SplitStream<Ws>>>,
}

impl Stream for Reader {
    type Item = (usize, ReadEvent);

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        let slot = self.slot;
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match inner.poll_next_unpin(cx) {
            Poll::Ready(Some(m)) => Poll::Ready(Some((slot, ReadEvent::Msg(m)))),
            Poll::Ready(None) => {
                self.inner = None;
                Poll::Ready(Some((slot, ReadEvent::End)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Sending data on schedule.
    Streaming,
    /// Past the end: `session.end` still to be sent.
    Ending,
    /// `session.end` sent: waiting for `session.ended` or the server's Close.
    Draining,
    /// Our Close sent: waiting for the connection to close.
    Closing,
}

enum Step {
    Continue,
    /// The session is over: `Ok` when it ended cleanly, else the error kind.
    Finished(Result<(), &'static str>),
}

struct Session {
    index: u32,
    sink: SplitSink<Ws, Message>,
    abort: AbortHandle,
    base_ns: f64,
    period_ns: f64,
    total: u64,
    end_ns: u64,
    drain_deadline_ns: u64,
    next_seq: u64,
    blocked: bool,
    phase: Phase,
    /// One bit per slot: received once.
    seen: Vec<u64>,
    highest: Option<u64>,
    received: u64,
    duplicated: u64,
    out_of_order: u64,
    cross_session: u64,
    finals: u64,
    unsent: u64,
    /// Slots due before the session connected (late connect): in the schedule,
    /// counted as unsent.
    missed: u64,
    got_ended: bool,
    close_code: Option<u16>,
    stt_id: Option<serde_json::Value>,
}

impl Session {
    fn intended(&self, seq: u64) -> u64 {
        (self.base_ns + seq as f64 * self.period_ns) as u64
    }

    /// Slots whose intended time is at or before `now`.
    fn due_by(&self, now_ns: u64) -> u64 {
        let now = now_ns as f64;
        if now < self.base_ns {
            0
        } else {
            (((now - self.base_ns) / self.period_ns).floor() as u64 + 1).min(self.total)
        }
    }

    /// Sends what is due. `Err` carries the error kind of a dead socket.
    fn pump(
        &mut self,
        now_ns: u64,
        out: &mut Outgoing,
        stats: &mut Stats,
        cx: &mut Context<'_>,
    ) -> Result<(), String> {
        if self.blocked {
            match self.sink.poll_flush_unpin(cx) {
                Poll::Ready(Ok(())) => self.blocked = false,
                Poll::Ready(Err(e)) => return Err(ws_error_kind(&e)),
                Poll::Pending => return Ok(()),
            }
        }
        let mut wrote = false;
        let limit = (self.next_seq + BURST).min(self.total);
        while self.next_seq < limit {
            let t = self.intended(self.next_seq);
            if t > now_ns {
                break;
            }
            match self.sink.poll_ready_unpin(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Err(ws_error_kind(&e)),
                Poll::Pending => {
                    self.blocked = true;
                    break;
                }
            }
            let msg = out.message(self.index, self.next_seq, t);
            self.sink
                .start_send_unpin(msg)
                .map_err(|e| ws_error_kind(&e))?;
            record(&mut stats.lag, (now_ns - t) / 1_000);
            stats.interval_sent += 1;
            self.next_seq += 1;
            wrote = true;
        }
        if wrote && !self.blocked {
            match self.sink.poll_flush_unpin(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Err(ws_error_kind(&e)),
                Poll::Pending => self.blocked = true,
            }
        }
        Ok(())
    }

    /// Sends one control message (session.end or Close); `Ok(false)` while backpressured.
    fn send_control(&mut self, msg: Message, cx: &mut Context<'_>) -> Result<bool, String> {
        if self.blocked {
            match self.sink.poll_flush_unpin(cx) {
                Poll::Ready(Ok(())) => self.blocked = false,
                Poll::Ready(Err(e)) => return Err(ws_error_kind(&e)),
                Poll::Pending => return Ok(false),
            }
        }
        match self.sink.poll_ready_unpin(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Err(ws_error_kind(&e)),
            Poll::Pending => {
                self.blocked = true;
                return Ok(false);
            }
        }
        self.sink
            .start_send_unpin(msg)
            .map_err(|e| ws_error_kind(&e))?;
        match self.sink.poll_flush_unpin(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Err(ws_error_kind(&e)),
            Poll::Pending => self.blocked = true,
        }
        Ok(true)
    }

    fn step(
        &mut self,
        now_ns: u64,
        drain_ns: u64,
        hard_deadline_ns: u64,
        out: &mut Outgoing,
        stats: &mut Stats,
        cx: &mut Context<'_>,
    ) -> Result<Step, String> {
        if self.phase == Phase::Streaming {
            self.pump(now_ns, out, stats, cx)?;
            if now_ns < self.end_ns {
                return Ok(Step::Continue);
            }
            self.unsent = self.total - self.next_seq;
            self.phase = Phase::Ending;
            self.drain_deadline_ns = (now_ns + drain_ns).min(hard_deadline_ns);
        }
        if self.phase == Phase::Ending {
            if self.send_control(
                Message::Text(Utf8Bytes::from_static(proto::SESSION_END)),
                cx,
            )? {
                self.phase = Phase::Draining;
            } else if now_ns >= self.drain_deadline_ns {
                return Ok(Step::Finished(Err("drain_timeout")));
            } else {
                return Ok(Step::Continue);
            }
        }
        if self.phase == Phase::Draining {
            if self.got_ended {
                let close = Message::Close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: Utf8Bytes::from_static(""),
                }));
                // A failed or blocked Close is no error: the session already ended.
                match self.send_control(close, cx) {
                    Ok(true) => {
                        self.phase = Phase::Closing;
                        self.drain_deadline_ns = self.drain_deadline_ns.min(now_ns + CLOSE_WAIT_NS);
                    }
                    Ok(false) => {}
                    Err(_) => return Ok(Step::Finished(Ok(()))),
                }
            } else if now_ns >= self.drain_deadline_ns {
                return Ok(Step::Finished(Err("drain_timeout")));
            }
        }
        if self.phase == Phase::Closing || (self.phase == Phase::Draining && self.got_ended) {
            if self.blocked {
                let _ = self.sink.poll_flush_unpin(cx);
            }
            if now_ns >= self.drain_deadline_ns {
                return Ok(Step::Finished(Ok(())));
            }
        }
        Ok(Step::Continue)
    }

    /// Records a data message for this session; returns the latency in µs when it counts.
    fn on_data(&mut self, seq: u64, now_ns: u64) -> Result<Option<u64>, &'static str> {
        if seq >= self.next_seq {
            return Err("bad_seq");
        }
        let word = (seq / 64) as usize;
        let bit = 1u64 << (seq % 64);
        let Some(w) = self.seen.get_mut(word) else {
            return Err("bad_seq");
        };
        if *w & bit != 0 {
            self.duplicated += 1;
            return Ok(None);
        }
        *w |= bit;
        match self.highest {
            Some(h) if seq < h => self.out_of_order += 1,
            _ => self.highest = Some(seq),
        }
        self.received += 1;
        Ok(Some(now_ns.saturating_sub(self.intended(seq)) / 1_000))
    }
}

/// Builds outgoing data messages without allocating: text messages are copied from a
/// template into one reused buffer whose space comes back once the socket has taken the
/// frame; stt chunks are one shared buffer.
struct Outgoing {
    mode: Mode,
    template: Vec<u8>,
    buf: BytesMut,
    chunk: Bytes,
}

impl Outgoing {
    fn new(mode: Mode, size: usize) -> Self {
        let template = proto::template(size);
        Self {
            mode,
            buf: BytesMut::with_capacity(template.len() * 64),
            template,
            chunk: proto::stt_chunk(),
        }
    }

    fn message(&mut self, session: u32, seq: u64, intended_ns: u64) -> Message {
        match self.mode {
            Mode::Stt => Message::Binary(self.chunk.clone()),
            Mode::Echo => {
                self.buf.reserve(self.template.len());
                self.buf.extend_from_slice(&self.template);
                proto::write_header(
                    &mut self.buf,
                    Header {
                        session,
                        seq,
                        intended_ns,
                    },
                );
                let bytes = self.buf.split().freeze();
                // The template and the digits are ASCII, so this is always valid UTF-8.
                match Utf8Bytes::try_from(bytes.clone()) {
                    Ok(text) => Message::Text(text),
                    Err(_) => Message::Binary(bytes),
                }
            }
        }
    }
}

struct Stats {
    second: u64,
    interval_sent: u64,
    interval_received: u64,
    interval_aborted: u64,
    hist: Histogram<u64>,
    lag: Histogram<u64>,
    totals: Totals,
}

struct Shard {
    id: usize,
    mode: Mode,
    size: usize,
    sched: Schedule,
    start: Instant,
    drain_ns: u64,
    stop_drain_ns: u64,
    hard_deadline_ns: u64,
    stop: Arc<AtomicBool>,
    stopping: bool,
    expired: bool,
    events: mpsc::UnboundedSender<Event>,
    template_hist: Histogram<u64>,
    conn_rx: mpsc::UnboundedReceiver<NewConn>,
    conn_closed: bool,
    ticker: tokio::time::Interval,
    /// Where the running send sweep is; `None` between sweeps.
    sweep_at: Option<usize>,
    sessions: Vec<Option<Session>>,
    live: usize,
    readers: SelectAll<Reader>,
    out: Outgoing,
    stats: Stats,
}

/// Runs one shard until all its sessions are over (or the run's hard deadline).
pub(crate) async fn run(p: ShardParams, conn_rx: mpsc::UnboundedReceiver<NewConn>) {
    let mut ticker = tokio::time::interval(p.tick);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let hard_deadline_ns = p.sched.ramp_ns + p.sched.duration_ns + p.drain_ns;
    let mut shard = Shard {
        id: p.id,
        mode: p.mode,
        size: proto::template(p.size).len(),
        sched: p.sched,
        start: p.start,
        drain_ns: p.drain_ns,
        stop_drain_ns: p.stop_drain_ns,
        hard_deadline_ns,
        stop: p.stop,
        stopping: false,
        expired: false,
        events: p.events,
        conn_rx,
        conn_closed: false,
        ticker,
        sweep_at: None,
        sessions: Vec::new(),
        live: 0,
        readers: SelectAll::new(),
        out: Outgoing::new(p.mode, p.size),
        stats: Stats {
            second: 0,
            interval_sent: 0,
            interval_received: 0,
            interval_aborted: 0,
            hist: p.hist.clone(),
            lag: p.hist.clone(),
            totals: Totals::default(),
        },
        template_hist: p.hist,
    };
    std::future::poll_fn(|cx| shard.poll_run(cx)).await;
    shard.finish();
}

impl Shard {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn error(&self, kind: impl Into<String>) {
        let _ = self.events.send(Event::Error { kind: kind.into() });
    }

    /// One poll: new connections, then reading and the send sweep, each within its own
    /// budget so that neither starves the other nor the runtime's other tasks.
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while !self.conn_closed {
            match self.conn_rx.poll_recv(cx) {
                Poll::Ready(Some(c)) => self.add(c),
                Poll::Ready(None) => self.conn_closed = true,
                Poll::Pending => break,
            }
        }
        let mut exhausted = false;
        let mut budget = READ_BUDGET;
        while !self.readers.is_empty() {
            match self.readers.poll_next_unpin(cx) {
                Poll::Ready(Some((slot, ev))) => {
                    self.on_read(slot, ev);
                    budget -= 1;
                    if budget == 0 {
                        exhausted = true;
                        break;
                    }
                }
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
        let mut ticked = false;
        while self.ticker.poll_tick(cx).is_ready() {
            ticked = true;
        }
        if ticked {
            self.on_tick();
        }
        if self.sweep_at.is_some() && !self.sweep(cx) {
            exhausted = true;
        }
        if self.expired || (self.conn_closed && self.live == 0) {
            return Poll::Ready(());
        }
        if exhausted {
            // More to do: yield to the runtime and come straight back.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    fn add(&mut self, c: NewConn) {
        let now = self.now_ns();
        let (base_ns, total) = self.sched.slots(c.index, now);
        // Slots due before the session connected: kept in the schedule, never sent.
        let missed = self.sched.planned_slots(c.index).saturating_sub(total);
        let mut end_ns = self.sched.end_ns(c.index);
        let mut drain_ns = self.drain_ns;
        if self.stopping {
            end_ns = end_ns.min(now);
            drain_ns = self.stop_drain_ns;
        }
        let (sink, stream) = c.ws.split();
        let (abort, reg) = AbortHandle::new_pair();
        let slot = self.sessions.len();
        let mut s = Session {
            index: c.index,
            sink,
            abort,
            base_ns,
            period_ns: self.sched.period_ns,
            total,
            end_ns,
            drain_deadline_ns: (end_ns + drain_ns).min(self.hard_deadline_ns),
            next_seq: 0,
            blocked: false,
            phase: Phase::Streaming,
            seen: vec![0; total.div_ceil(64) as usize],
            highest: None,
            received: 0,
            duplicated: 0,
            out_of_order: 0,
            cross_session: 0,
            finals: 0,
            unsent: 0,
            missed,
            got_ended: false,
            close_code: None,
            stt_id: None,
        };
        if self.stopping {
            s.total = s.due_by(now);
        }
        self.sessions.push(Some(s));
        self.readers.push(Reader {
            slot,
            inner: Some(Abortable::new(stream, reg)),
        });
        self.live += 1;
    }

    /// Every tick: the stop flag, the deadline, the per-second report, and a send sweep
    /// over all sessions (continuing the previous one if it has not finished).
    fn on_tick(&mut self) {
        let now = self.now_ns();
        if !self.stopping && self.stop.load(Ordering::Relaxed) {
            self.stopping = true;
            let deadline = (now + self.stop_drain_ns).min(self.hard_deadline_ns);
            for s in self.sessions.iter_mut().flatten() {
                if s.phase == Phase::Streaming {
                    s.total = s.due_by(now);
                    s.end_ns = s.end_ns.min(now);
                }
                s.drain_deadline_ns = s.drain_deadline_ns.min(deadline);
            }
        }
        if now >= self.hard_deadline_ns {
            self.expired = true;
        }
        while now >= (self.stats.second + 1) * NS_PER_S {
            self.report_interval();
        }
        if self.sweep_at.is_none() {
            self.sweep_at = Some(0);
        }
    }

    /// Steps sessions from the sweep cursor on, within the send budget. Returns true when
    /// the sweep reached the last session.
    fn sweep(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(mut slot) = self.sweep_at else {
            return true;
        };
        let drain_ns = if self.stopping {
            self.stop_drain_ns
        } else {
            self.drain_ns
        };
        let mut budget = SEND_BUDGET;
        let mut now = self.now_ns();
        while slot < self.sessions.len() {
            if budget == 0 {
                self.sweep_at = Some(slot);
                return false;
            }
            if slot % 32 == 0 {
                budget -= 1;
            }
            let Some(s) = self.sessions[slot].as_mut() else {
                slot += 1;
                continue;
            };
            let sent_before = s.next_seq;
            let step = s.step(
                now,
                drain_ns,
                self.hard_deadline_ns,
                &mut self.out,
                &mut self.stats,
                cx,
            );
            let sent = (s.next_seq - sent_before) as usize;
            if sent > 0 {
                budget = budget.saturating_sub(sent);
                now = self.now_ns();
            }
            match step {
                Ok(Step::Continue) => {}
                Ok(Step::Finished(Ok(()))) => self.finalize(slot, None),
                Ok(Step::Finished(Err(kind))) => self.finalize(slot, Some(kind.to_owned())),
                Err(kind) => self.finalize(slot, Some(kind)),
            }
            slot += 1;
        }
        self.sweep_at = None;
        true
    }

    fn report_interval(&mut self) {
        let hist = std::mem::replace(&mut self.stats.hist, self.template_hist.clone());
        let _ = self.events.send(Event::Interval {
            shard: self.id,
            second: self.stats.second,
            sent: std::mem::take(&mut self.stats.interval_sent),
            received: std::mem::take(&mut self.stats.interval_received),
            aborted: std::mem::take(&mut self.stats.interval_aborted),
            hist,
        });
        self.stats.second += 1;
    }

    fn on_read(&mut self, slot: usize, ev: ReadEvent) {
        let msg = match ev {
            ReadEvent::End => {
                self.on_end(slot);
                return;
            }
            ReadEvent::Msg(Err(e)) => {
                let closing = self
                    .sessions
                    .get(slot)
                    .and_then(Option::as_ref)
                    .is_some_and(|s| s.phase == Phase::Closing || s.got_ended);
                if !closing {
                    self.error(ws_error_kind(&e));
                }
                return;
            }
            ReadEvent::Msg(Ok(m)) => m,
        };
        let now = self.now_ns();
        let mode = self.mode;
        let size = self.size;
        let Some(s) = self.sessions.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let mut error: Option<&'static str> = None;
        match msg {
            Message::Text(text) => match mode {
                Mode::Echo => {
                    if proto::is_data(text.as_bytes()) {
                        error = echo_data(s, text.as_bytes(), size, now, &mut self.stats);
                    } else if text.contains(proto::SESSION_ENDED) {
                        s.got_ended = true;
                    }
                }
                Mode::Stt => {
                    error = stt_event(s, &text, now, &mut self.stats);
                }
            },
            Message::Binary(b) => {
                if mode == Mode::Echo && proto::is_data(&b) {
                    error = echo_data(s, &b, size, now, &mut self.stats);
                }
            }
            Message::Close(frame) => {
                let kind = close_kind(frame.as_ref());
                let code = frame.map_or(1005, |f| u16::from(f.code));
                s.close_code = Some(code);
                if code != 1000 {
                    let _ = self.events.send(Event::Error { kind });
                }
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
        if let Some(kind) = error {
            self.error(kind);
        }
    }

    /// The connection is gone (closed by the server, reset, or aborted by us).
    fn on_end(&mut self, slot: usize) {
        let Some(s) = self.sessions.get(slot).and_then(Option::as_ref) else {
            return;
        };
        let outcome = match s.phase {
            Phase::Streaming => Some("closed_during_stream"),
            Phase::Closing => None,
            Phase::Ending | Phase::Draining => {
                if s.got_ended || s.close_code == Some(1000) {
                    None
                } else if s.close_code.is_some() {
                    // close_<code> was already counted when the Close arrived.
                    Some("")
                } else {
                    Some("closed_without_session_ended")
                }
            }
        };
        self.finalize(slot, outcome.map(str::to_owned));
    }

    /// Adds a finished session's counts to the totals. `Some(kind)`: it did not end
    /// cleanly (an empty kind was already counted).
    fn finalize(&mut self, slot: usize, outcome: Option<String>) {
        let Some(s) = self.sessions.get_mut(slot).and_then(Option::take) else {
            return;
        };
        s.abort.abort();
        self.live -= 1;
        if outcome.is_some() {
            tracing::debug!(
                session = s.index,
                phase = ?s.phase,
                blocked = s.blocked,
                sent = s.next_seq,
                total = s.total,
                received = s.received,
                got_ended = s.got_ended,
                close_code = ?s.close_code,
                outcome = ?outcome,
                "session aborted"
            );
        }
        let t = &mut self.stats.totals;
        let sent = s.next_seq;
        let unsent = if s.phase == Phase::Streaming {
            s.total - s.next_seq
        } else {
            s.unsent
        };
        t.scheduled += s.total + s.missed;
        t.sent += sent;
        t.received += s.received;
        t.lost += sent.saturating_sub(s.received);
        t.duplicated += s.duplicated;
        t.out_of_order += s.out_of_order;
        t.cross_session += s.cross_session;
        t.unsent += unsent + s.missed;
        t.finals += s.finals;
        match outcome {
            None => {
                t.completed += 1;
                t.lost_completed += sent.saturating_sub(s.received);
            }
            Some(kind) => {
                t.aborted += 1;
                self.stats.interval_aborted += 1;
                if !kind.is_empty() {
                    self.error(kind);
                }
            }
        }
    }

    /// Ends whatever is still running and sends the last interval and the summary.
    fn finish(mut self) {
        for slot in 0..self.sessions.len() {
            let outcome = match self.sessions[slot].as_ref() {
                None => continue,
                Some(s) if s.phase == Phase::Closing => None,
                Some(s) if s.phase == Phase::Draining && s.got_ended => None,
                Some(s) if s.phase == Phase::Streaming => Some("stopped_streaming"),
                Some(_) => Some("drain_timeout"),
            };
            self.finalize(slot, outcome.map(str::to_owned));
        }
        self.report_interval();
        let _ = self.events.send(Event::Done {
            shard: self.id,
            summary: Box::new(ShardSummary {
                totals: std::mem::take(&mut self.stats.totals),
                send_lag: std::mem::replace(&mut self.stats.lag, self.template_hist.clone()),
            }),
        });
    }
}

/// The `errors` kind of a Close from the server: `close_<code>`, except for
/// a code tungstenite does not allow. tungstenite hands the application such
/// a Close as 1002 with the reason "Protocol violation" (and answers it with
/// that), and 1014 "Bad Gateway" is one of them although IANA registered it
/// (tungstenite-rs issue 502; Chromium, Node's ws and Python's websockets
/// accept it). sttproxy ends a session whose backend failed with 1014, so that
/// Close is counted as `close_1002_unallowed_code`: a code outside
/// tungstenite's list, most likely 1014.
fn close_kind(frame: Option<&CloseFrame>) -> String {
    match frame {
        None => "close_1005".to_owned(),
        Some(f) if f.code == CloseCode::Protocol && f.reason.as_str() == TUNGSTENITE_SUBSTITUTE => {
            "close_1002_unallowed_code".to_owned()
        }
        Some(f) => format!("close_{}", u16::from(f.code)),
    }
}

/// The reason tungstenite puts in the 1002 Close it substitutes for a Close
/// whose code it does not allow.
const TUNGSTENITE_SUBSTITUTE: &str = "Protocol violation";

fn echo_data(
    s: &mut Session,
    bytes: &[u8],
    size: usize,
    now: u64,
    stats: &mut Stats,
) -> Option<&'static str> {
    let h = match proto::parse_header(bytes) {
        Ok(h) => h,
        Err(_) => return Some("bad_message"),
    };
    if h.session != s.index {
        s.cross_session += 1;
        return None;
    }
    if h.seq < s.next_seq && h.intended_ns != s.intended(h.seq) {
        return Some("bad_message");
    }
    match s.on_data(h.seq, now) {
        Ok(Some(latency_us)) => {
            record(&mut stats.hist, latency_us);
            stats.interval_received += 1;
            if bytes.len() != size {
                return Some("bad_length");
            }
            None
        }
        Ok(None) => None,
        Err(kind) => Some(kind),
    }
}

fn stt_event(s: &mut Session, text: &str, now: u64, stats: &mut Stats) -> Option<&'static str> {
    let Some(ev) = proto::parse_stt_event(text) else {
        if text.contains(proto::SESSION_ENDED) {
            s.got_ended = true;
        }
        return None;
    };
    match ev.kind.as_ref() {
        "partial" => {
            if let (Some(known), Some(got)) = (&s.stt_id, &ev.session) {
                if known != got {
                    s.cross_session += 1;
                    return None;
                }
            } else if s.stt_id.is_none() {
                s.stt_id = ev.session;
            }
            let Some(seq) = ev.seq else {
                return Some("bad_message");
            };
            match s.on_data(seq, now) {
                Ok(Some(latency_us)) => {
                    record(&mut stats.hist, latency_us);
                    stats.interval_received += 1;
                    None
                }
                Ok(None) => None,
                Err(kind) => Some(kind),
            }
        }
        "final" => {
            s.finals += 1;
            None
        }
        "session.started" => {
            if s.stt_id.is_none() {
                s.stt_id = ev.session;
            }
            None
        }
        "session.ended" => {
            s.got_ended = true;
            None
        }
        _ => None,
    }
}

/// Largest value recorded, µs (one hour); larger ones are recorded as this.
const MAX_RECORD_US: u64 = 3_600_000_000;

/// Records into an auto-resizing histogram (`saturating_record` would clamp to the
/// histogram's current range instead of growing it).
fn record(h: &mut Histogram<u64>, us: u64) {
    let _ = h.record(us.min(MAX_RECORD_US));
}

/// A short, stable name for a WebSocket error (a key of `errors`).
pub(crate) fn ws_error_kind(e: &WsError) -> String {
    match e {
        WsError::Io(io) => format!("io_{}", snake(&format!("{:?}", io.kind()))),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            "reset_without_close".to_owned()
        }
        WsError::Protocol(_) => "protocol_error".to_owned(),
        WsError::Capacity(_) => "message_too_large".to_owned(),
        WsError::ConnectionClosed | WsError::AlreadyClosed => "connection_closed".to_owned(),
        WsError::WriteBufferFull(_) => "write_buffer_full".to_owned(),
        WsError::Utf8(_) => "invalid_utf8".to_owned(),
        _ => "ws_error".to_owned(),
    }
}

/// `ConnectionReset` -> `connection_reset`.
pub(crate) fn snake(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(sessions: usize, rate: f64, ramp_s: u64, duration_s: u64) -> Schedule {
        Schedule {
            sessions,
            period_ns: 1e9 / rate,
            ramp_ns: ramp_s * NS_PER_S,
            duration_ns: duration_s * NS_PER_S,
            min_life_ns: duration_s * NS_PER_S,
            seed: 0,
        }
    }

    #[test]
    fn phases_are_spread_over_one_period() {
        let s = sched(4, 100.0, 0, 1);
        let firsts: Vec<f64> = (0..4).map(|i| s.slots(i, 0).0).collect();
        assert_eq!(firsts, vec![0.0, 2.5e6, 5e6, 7.5e6]);
        for i in 0..4 {
            assert_eq!(s.slots(i, 0).1, 100, "session {i}");
        }
    }

    #[test]
    fn late_connection_keeps_the_grid() {
        let s = sched(4, 100.0, 0, 1);
        // Connected at 12.3 ms: session 1's grid is 2.5 + 10k ms, next slot 12.5 ms,
        // last slot 992.5 ms.
        let (base, total) = s.slots(1, 12_300_000);
        assert!((base - 12.5e6).abs() < 1.0);
        assert_eq!(total, 99);
        assert_eq!(s.slots(1, 2 * NS_PER_S).1, 0);
    }

    #[test]
    fn ramp_staggers_starts() {
        let s = sched(10, 10.0, 10, 5);
        assert_eq!(s.planned_start_ns(5), 5 * NS_PER_S);
        assert_eq!(s.end_ns(5), 10 * NS_PER_S);
        assert!(s.slots(5, 0).0 >= 5e9);
        assert_eq!(s.slots(5, 0).1, 50);
        assert!(s.slots(9, 0).1 <= s.capacity());
    }

    #[test]
    fn lifetimes_are_uniform_in_their_range_and_repeatable() {
        let mut s = sched(10_000, 10.0, 40, 30);
        s.min_life_ns = 3 * NS_PER_S;
        s.seed = 7;
        let lives: Vec<u64> = (0..10_000).map(|i| s.lifetime_ns(i)).collect();
        assert!(
            lives
                .iter()
                .all(|&l| (3 * NS_PER_S..=30 * NS_PER_S).contains(&l))
        );
        let mean = lives.iter().sum::<u64>() as f64 / lives.len() as f64 / 1e9;
        assert!((mean - 16.5).abs() < 0.5, "mean lifetime {mean} s");
        let short = lives.iter().filter(|&&l| l < 6 * NS_PER_S).count();
        assert!((900..1300).contains(&short), "{short} of 10000 below 6 s");
        assert_eq!(s.lifetime_ns(42), lives[42]);
        assert_eq!(s.end_ns(42), s.planned_start_ns(42) + lives[42]);
        assert!(s.planned_slots(42) <= s.capacity());
        s.seed = 8;
        assert_ne!(s.lifetime_ns(42), lives[42]);
    }

    #[test]
    fn a_late_connection_misses_its_early_slots() {
        let s = sched(4, 100.0, 0, 1);
        let (_, total) = s.slots(1, 500_000_000);
        assert_eq!(s.planned_slots(1), 100);
        assert_eq!(s.planned_slots(1) - total, 50);
    }

    #[test]
    fn a_close_tungstenite_substituted_is_told_apart() {
        use tokio_tungstenite::tungstenite::Utf8Bytes;
        let frame = |code: u16, reason: &'static str| CloseFrame {
            code: CloseCode::from(code),
            reason: Utf8Bytes::from_static(reason),
        };
        assert_eq!(close_kind(None), "close_1005");
        assert_eq!(close_kind(Some(&frame(1011, "x"))), "close_1011");
        assert_eq!(
            close_kind(Some(&frame(1002, "websocket protocol error"))),
            "close_1002"
        );
        assert_eq!(
            close_kind(Some(&frame(1002, "Protocol violation"))),
            "close_1002_unallowed_code"
        );
    }

    #[test]
    fn a_1014_close_reaches_a_tungstenite_client_as_the_substitute() {
        // Pins the tungstenite behaviour `close_kind` works around: when
        // tungstenite accepts 1014 (its issue 502), this fails, and
        // `close_kind` and the soak's rule can count 1014 directly.
        assert!(!CloseCode::from(1014).is_allowed());
    }

    #[test]
    fn snake_names() {
        assert_eq!(snake("ConnectionReset"), "connection_reset");
        assert_eq!(snake("Other"), "other");
    }
}
