//! The per-message path of a session: both directions pumped in one task,
//! frame by frame, without one waiting on the other (docs/relay.md).
//!
//! - Each direction reads what its source has ready into a per-thread scratch
//!   buffer, processes the frames in place ([`parser`]) and writes the result
//!   to its destination at once; whatever the destination does not take is
//!   queued ([`output`]), bounded by [`QUEUE_LIMIT`]: past it the source is
//!   not read (TCP pushes back), while the other direction carries on.
//! - One write per read, not per message; no per-message timer, clock read,
//!   allocation or shared-line atomic. One timer per session serves the idle,
//!   stall, fence and close deadlines ([`state`]), checked on its ticks.
//! - The fence ([`judge`]) and the close handshake are decided on whole
//!   frames; every await is bounded by a deadline.

pub mod frame;
mod judge;
mod output;
mod parser;
pub mod rate;
pub mod replay;
mod state;
pub mod stream;

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::io;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Duration, Instant, Sleep};

pub use stream::{Frame, FrameStream, Peer, PingFault, RecvError};

use self::judge::{FromBackend, FromClient, Pong};
use self::output::Output;
use self::parser::{Fault, Parser, Processed};
use self::rate::{RateLimits, SessionRate};
use self::replay::{Replay, ReplayLimits};
use self::state::{
    BackendPhase, ClientPhase, ControlReply, Failover as FailoverOutcome, Resume, State,
};
use crate::backend::BackendConn;
use crate::metrics::{LimitLabel, Metrics, TO_BACKEND, TO_CLIENT};

/// Bytes queued toward one peer past which its source is no longer read.
pub const QUEUE_LIMIT: usize = 64 << 10;

/// The per-thread read buffer: reads land here and are processed in place,
/// so an idle session holds no read buffer of its own.
const SCRATCH: usize = 16 << 10;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
}

/// How long the proxy waits for a client's Close after sending its own.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// The relay's timeouts and limits.
#[derive(Debug, Clone, Copy)]
pub struct RelaySettings {
    pub drain_timeout: Duration,
    pub idle_timeout: Duration,
    pub send_timeout: Duration,
    pub close_timeout: Duration,
    pub max_message_size: usize,
    /// Nothing at all from the client this long: the proxy pings it.
    pub ping_interval: Duration,
    /// Still nothing (not even the pong) this long after the ping: the
    /// client's link is presumed dead and its socket shut.
    pub pong_timeout: Duration,
    /// What the client may send per second ([`rate`]).
    pub rate: RateLimits,
    /// Nothing at all from the backend this long: the proxy pings it; still
    /// nothing `backend_pong_timeout` later: the backend is presumed dead (a
    /// crashed host sends no FIN) and the session fails over or gets 1014.
    pub backend_ping_interval: Duration,
    pub backend_pong_timeout: Duration,
}

impl RelaySettings {
    /// How often the session's timer checks idleness, liveness and stalls: a
    /// quarter of the shortest of those timeouts, between 10 ms and 1 s.
    fn tick(&self) -> Duration {
        let shortest = [self.send_timeout, self.ping_interval, self.pong_timeout]
            .into_iter()
            .fold(self.idle_timeout, Duration::min);
        (shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }
}

/// What the relay leaves behind, for the session's metrics and logs.
#[derive(Debug)]
pub struct RelayEnd {
    pub outcome: &'static str,
    /// How the fence ended: one of [`FENCE_OUTCOMES`].
    pub fence: &'static str,
    /// How the client close handshake ended: one of [`CLIENT_CLOSE_OUTCOMES`].
    pub client_close: &'static str,
    pub dropped: [(&'static str, u64); 5],
    /// Failover attempts by outcome (docs/failover.md): index
    /// [`failover_outcomes`]'s labels.
    pub failovers: [u64; 6],
}

/// The labels of [`RelayEnd::failovers`], in order.
pub fn failover_outcomes() -> [&'static str; 6] {
    FailoverOutcome::ALL.map(FailoverOutcome::label)
}

/// Every value of [`RelayEnd::fence`] (`sttproxy_fencing_total{outcome}`).
pub const FENCE_OUTCOMES: [&str; 5] = ["clean", "dirty", "timeout", "error", "not_fenced"];

/// Every value of [`RelayEnd::client_close`]
/// (`sttproxy_client_closes_total{outcome}`).
pub const CLIENT_CLOSE_OUTCOMES: [&str; 5] =
    ["clean", "no_reply", "not_sent", "vanished", "ping_timeout"];

/// The labels of [`RelayEnd::dropped`], in order.
pub fn dropped_reasons() -> [&'static str; 5] {
    state::Dropped::ALL.map(state::Dropped::label)
}

/// A backend connection on another backend, for a session whose backend
/// failed; `None` when no healthy resumable backend has one within the
/// acquire timeout. Boxed: it is rare, and must not size every session.
pub type TakeoverFuture<L> = Pin<Box<dyn Future<Output = Option<L>> + Send>>;

/// Where a resumable session gets its next backend connection: the session
/// layer's routing, restricted to other resumable backends.
pub trait Takeover<L>: Send {
    fn next_lease(&mut self) -> TakeoverFuture<L>;
}

/// What a failover needs to know.
#[derive(Debug, Clone, Copy)]
pub struct FailoverSettings {
    /// Takeovers per session; then 1014 as without failover.
    pub max_failovers: u32,
    /// From the failure to the new backend's lease.
    pub timeout: Duration,
    pub replay: ReplayLimits,
    /// Tell the client (`session.failover`).
    pub notice: bool,
}

/// Failover for one session: on a resumable backend, with failover on.
/// Boxed by the caller: it is rare, and every session's future would
/// otherwise carry its size.
pub struct Failover<'a, L> {
    takeover: Box<dyn Takeover<L> + 'a>,
    /// The client's query parameters, for the new backend's `session.start`.
    params: &'a serde_json::Map<String, serde_json::Value>,
    settings: &'a FailoverSettings,
    /// The takeover being acquired, with when the backend failed.
    acquiring: Option<(TakeoverFuture<L>, Instant)>,
}

impl<'a, L> Failover<'a, L> {
    pub fn new(
        takeover: Box<dyn Takeover<L> + 'a>,
        params: &'a serde_json::Map<String, serde_json::Value>,
        settings: &'a FailoverSettings,
    ) -> Box<Self> {
        Box::new(Self {
            takeover,
            params,
            settings,
            acquiring: None,
        })
    }
}

impl<L> std::fmt::Debug for Failover<'_, L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Failover")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The lease as the relay needs it (see [`crate::session::SessionLease`]).
pub trait RelayLease<B>: std::ops::DerefMut<Target = BackendConn<B>> {
    fn release(self);
    fn discard(self);
}

/// A fresh fence token: 128 random bits, hex.
pub fn new_fence_token() -> String {
    let bits: u128 = rand::random();
    format!("{bits:032x}")
}

/// Relay one session until both its ends are settled: the client closed
/// (handshake done, or given up on within [`CLOSE_TIMEOUT`]) and the backend
/// connection released (fence completed, nothing left over) or discarded.
/// With `failover`, a backend that fails mid-session is replaced by another
/// (docs/failover.md).
#[allow(clippy::too_many_arguments)]
pub async fn relay<'a, C, B, L>(
    client: &'a mut FrameStream<C>,
    lease: L,
    fenced: bool,
    id: &str,
    settings: &'a RelaySettings,
    shutdown: &'a tokio_util::sync::CancellationToken,
    metrics: &'a Metrics,
    failover: Option<Box<Failover<'a, L>>>,
) -> RelayEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
    L: RelayLease<B>,
{
    let mut r = Relay {
        client,
        lease: Some(lease),
        to_backend: Parser::new(Peer::Client, Peer::Backend, settings.max_message_size),
        to_client: Parser::new(Peer::Backend, Peer::Client, settings.max_message_size),
        out_backend: Output::default(),
        out_client: Output::default(),
        reply_client: None,
        reply_backend: None,
        state: State::new(
            id.to_string(),
            new_fence_token(),
            fenced,
            settings.drain_timeout,
            settings.close_timeout,
            // Built in place: a local would stay in the future across its
            // await (debug builds keep moved-from locals' slots).
            failover.as_ref().filter(|_| fenced).map(|f| {
                Box::new(Resume::new(
                    Replay::new(f.settings.replay),
                    f.settings.max_failovers,
                ))
            }),
        ),
        failover,
        dirty: false,
        fence: "error",
        client_close: None,
        settings,
        tick: settings.tick(),
        last_heard: Instant::now(),
        backend_quiet_since: Instant::now(),
        backend_pinged: false,
        last_data: Instant::now(),
        ping_sent: None,
        stalled_client: None,
        stalled_backend: None,
        rate: SessionRate::new(&settings.rate),
        shutdown,
        metrics,
        backend_pending: false,
        client_pending: false,
        _backend: PhantomData,
    };
    let timer = tokio::time::sleep(r.tick);
    tokio::pin!(timer);
    poll_fn(|cx| r.poll(cx, timer.as_mut())).await;
    r.flush_counts();
    let st = &r.state;
    let end = RelayEnd {
        outcome: st.outcome.unwrap_or("ended"),
        fence: r.fence,
        client_close: r.client_close.unwrap_or("clean"),
        dropped: state::Dropped::ALL.map(|d| (d.label(), st.dropped[d as usize])),
        failovers: st.resume.as_ref().map_or([0; 6], |r| r.outcomes),
    };
    // The metrics start these families at zero from the lists: a value
    // missing there would appear only on its first count.
    debug_assert!(FENCE_OUTCOMES.contains(&end.fence), "{}", end.fence);
    debug_assert!(
        CLIENT_CLOSE_OUTCOMES.contains(&end.client_close),
        "{}",
        end.client_close
    );
    end
}

struct Relay<'a, C, B, L> {
    client: &'a mut FrameStream<C>,
    lease: Option<L>,
    /// Frames from the client, toward the backend.
    to_backend: Parser,
    /// Frames from the backend, toward the client.
    to_client: Parser,
    out_backend: Output,
    out_client: Output,
    /// Pongs owed to each peer.
    reply_client: Option<ControlReply>,
    reply_backend: Option<ControlReply>,
    state: State,
    failover: Option<Box<Failover<'a, L>>>,
    /// Bytes of the backend stream were left over after the fence.
    dirty: bool,
    fence: &'static str,
    /// How the client close handshake ended, once known otherwise than clean.
    client_close: Option<&'static str>,
    /// Shared by every session (a copy would size every session's future).
    settings: &'a RelaySettings,
    tick: Duration,
    /// When the last bytes of any kind came from the client (liveness).
    last_heard: Instant,
    /// When the last data message came from the client (idleness).
    last_data: Instant,
    /// When the proxy's ping went out, while its answer is awaited.
    ping_sent: Option<Instant>,
    /// Backend liveness: since when nothing came from the backend — or, once
    /// `backend_pinged`, since the proxy's ping went out (one instant for
    /// both keeps every session's future smaller).
    backend_quiet_since: Instant,
    backend_pinged: bool,
    stalled_client: Option<Instant>,
    stalled_backend: Option<Instant>,
    /// The session's rate-limit buckets, when limits are set.
    rate: Option<Box<SessionRate>>,
    shutdown: &'a tokio_util::sync::CancellationToken,
    /// Message counts are added here on each tick and at the end, not per
    /// message (the counters' cache lines are shared by every session).
    metrics: &'a Metrics,
    /// Within one `poll`: the backend's / the client's read came back
    /// pending. A pending read has registered the task's waker, so reading
    /// it again in the same poll could only come back pending again (at the
    /// price of a readiness check and a waker registration): each source is
    /// read until it is pending once per wake-up, not once per turn.
    backend_pending: bool,
    client_pending: bool,
    _backend: PhantomData<fn() -> B>,
}

/// What one pump step saw.
#[derive(Default)]
struct Step {
    /// Bytes were read from the source.
    read: bool,
    /// The source ended or failed (with the error, if any).
    source_done: Option<Option<io::Error>>,
    write_failed: Option<io::Error>,
    fault: Option<Fault>,
    /// Bytes after a frame that stopped processing.
    leftover: bool,
    /// The source's read came back pending: its waker is registered, so it is
    /// not read again until the task is woken (see `Relay::poll`).
    pending: bool,
}

/// Move bytes one way: send an owed pong, flush, read what the source has
/// ready, process it and write it.
#[allow(clippy::too_many_arguments)]
fn pump<R, W, J>(
    cx: &mut Context<'_>,
    src: Option<(&mut R, &mut Vec<u8>)>,
    dst: &mut W,
    parser: &mut Parser,
    out: &mut Output,
    reply: &mut Option<ControlReply>,
    dst_peer: Peer,
    limit: usize,
    judge: &mut J,
) -> Step
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    J: parser::Judge,
{
    let mut step = Step::default();
    if !parser.mid_frame()
        && let Some(r) = reply.take()
    {
        let mut frame = Vec::with_capacity(r.payload.len() + frame::MAX_HEADER);
        frame::push_frame(
            &mut frame,
            frame::OP_PONG,
            &r.payload,
            dst_peer.mask_for_send(),
        );
        out.push(&frame);
    }
    if let Poll::Ready(Err(e)) = out.flush(dst, cx) {
        step.write_failed = Some(e);
        return step;
    }
    let Some((src, unread)) = src else {
        return step;
    };
    if out.queued() > limit {
        return step;
    }
    SCRATCH_BUF.with_borrow_mut(|scratch| {
        let n = if !unread.is_empty() {
            // Bytes read before the relay started (after the handshake).
            let n = unread.len().min(scratch.len());
            scratch[..n].copy_from_slice(&unread[..n]);
            unread.drain(..n);
            if unread.is_empty() {
                *unread = Vec::new();
            }
            n
        } else {
            let mut rb = ReadBuf::new(scratch);
            match Pin::new(src).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    step.source_done = Some(None);
                    return;
                }
                Poll::Ready(Ok(())) => rb.filled().len(),
                Poll::Ready(Err(e)) => {
                    step.source_done = Some(Some(e));
                    return;
                }
                Poll::Pending => {
                    step.pending = true;
                    return;
                }
            }
        };
        step.read = true;
        let buf = &mut scratch[..n];
        let Processed { fresh, unprocessed } = parser.process(buf, out, judge);
        step.fault = parser.take_fault();
        step.leftover = unprocessed > 0;
        if let Poll::Ready(Err(e)) = out.write(dst, cx, &buf[..fresh]) {
            step.write_failed = Some(e);
        }
    });
    step
}

impl<C, B, L> Relay<'_, C, B, L>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
    L: RelayLease<B>,
{
    fn poll(&mut self, cx: &mut Context<'_>, mut timer: Pin<&mut Sleep>) -> Poll<()> {
        self.backend_pending = false;
        self.client_pending = false;
        // The timer is polled on the first turn and after each reset: once
        // polled pending, its waker is registered until its deadline moves.
        let mut poll_timer = true;
        // Bounded work per poll; past it, yield to the other sessions.
        for _ in 0..64 {
            while poll_timer && timer.as_mut().poll(cx).is_ready() {
                let now = Instant::now();
                self.on_tick(now);
                timer.as_mut().reset(self.next_wake(now + self.tick));
            }
            poll_timer = false;
            let mut progressed = self.pump_to_client(cx);
            progressed |= self.pump_to_backend(cx);
            progressed |= self.advance(cx);
            if self.state.finished() {
                return Poll::Ready(());
            }
            // A deadline set by an event may come before the next tick.
            let wake = self.next_wake(timer.deadline());
            if wake < timer.deadline() {
                timer.as_mut().reset(wake);
                poll_timer = true;
                continue;
            }
            if !progressed {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// `at`, or a deadline before it.
    fn next_wake(&self, at: Instant) -> Instant {
        [
            self.state.fence_deadline,
            self.state.close_deadline,
            self.state.failover_deadline(),
        ]
        .into_iter()
        .flatten()
        .fold(at, Instant::min)
    }

    fn pump_to_client(&mut self, cx: &mut Context<'_>) -> bool {
        let may_read = matches!(
            self.state.backend,
            BackendPhase::Relaying | BackendPhase::Fencing
        );
        let backend_busy = !self.to_backend.output_at_rest() || self.lease.is_none();
        let src = match (&mut self.lease, may_read && !self.backend_pending) {
            (Some(lease), true) => Some(lease.stream.parts_mut()),
            _ => None,
        };
        let mut judge = FromBackend {
            state: &mut self.state,
            pong: Pong {
                busy: backend_busy,
                out: &mut self.out_backend,
                slot: &mut self.reply_backend,
                to: Peer::Backend,
            },
        };
        let client_open = judge.state.client != ClientPhase::Gone;
        if !client_open && src.is_none() {
            return false;
        }
        // Past a Close to the client nothing more is written to it but the
        // rest of a frame in flight: the backend is read for its fence
        // whatever the client's queue holds.
        let limit = if judge.state.client_takes_data() || self.to_client.mid_frame() {
            QUEUE_LIMIT
        } else {
            usize::MAX
        };
        if matches!(judge.state.client, ClientPhase::Closing { sent: true, .. }) {
            self.reply_client = None;
        }
        let step = if client_open {
            let (client_io, _) = self.client.parts_mut();
            pump(
                cx,
                src,
                client_io,
                &mut self.to_client,
                &mut self.out_client,
                &mut self.reply_client,
                Peer::Client,
                limit,
                &mut judge,
            )
        } else {
            let mut discard = Output::default();
            pump(
                cx,
                src,
                &mut Sink,
                &mut self.to_client,
                &mut discard,
                &mut None,
                Peer::Client,
                usize::MAX,
                &mut judge,
            )
        };
        if step.leftover {
            self.dirty = true;
        }
        self.backend_pending |= step.pending;
        if step.read {
            self.state.backend_heard = true;
        }
        if let Some(err) = step.source_done {
            let why = match err {
                Some(e) => format!("backend connection lost: {e}"),
                None => "backend connection lost".to_string(),
            };
            self.state.backend_failed(why);
        }
        if let Some(f) = step.fault {
            self.state
                .backend_failed(format!("backend broke the protocol: {f}"));
        }
        if step.write_failed.is_some() {
            self.client_vanished();
        }
        step.read
    }

    fn pump_to_backend(&mut self, cx: &mut Context<'_>) -> bool {
        let may_read = matches!(
            self.state.client,
            ClientPhase::Open
                | ClientPhase::Ended
                | ClientPhase::Closing {
                    received: false,
                    ..
                }
        );
        let (client_io, client_unread) = self.client.parts_mut();
        let src = (may_read && !self.client_pending).then_some((client_io, client_unread));
        let closing = matches!(self.state.client, ClientPhase::Closing { sent: true, .. });
        let mut judge = FromClient {
            state: &mut self.state,
            pong: Pong {
                busy: self.to_client.mid_frame() || closing,
                out: &mut self.out_client,
                slot: &mut self.reply_client,
                to: Peer::Client,
            },
        };
        let step = match self.lease.as_mut() {
            Some(lease) => {
                let (backend_io, _) = lease.stream.parts_mut();
                pump(
                    cx,
                    src,
                    backend_io,
                    &mut self.to_backend,
                    &mut self.out_backend,
                    &mut self.reply_backend,
                    Peer::Backend,
                    QUEUE_LIMIT,
                    &mut judge,
                )
            }
            // The backend is settled: the client is read for its Close only.
            None if src.is_some() => {
                let mut discard = Output::default();
                pump(
                    cx,
                    src,
                    &mut Sink,
                    &mut self.to_backend,
                    &mut discard,
                    &mut None,
                    Peer::Backend,
                    usize::MAX,
                    &mut judge,
                )
            }
            None => return false,
        };
        self.client_pending |= step.pending;
        if step.read {
            self.state.heard = true;
        }
        if step.source_done.is_some() {
            if let ClientPhase::Closing { sent: true, .. } = self.state.client {
                // The client closed its side after (or instead of) its Close.
                self.state.client = ClientPhase::Closing {
                    sent: true,
                    received: true,
                };
            } else {
                self.client_vanished();
            }
        }
        if step.fault.is_some() {
            self.state.client_fault(1002, "websocket protocol error");
        }
        if let Some(e) = step.write_failed {
            self.state
                .backend_failed(format!("backend connection lost: {e}"));
        }
        step.read
    }

    /// Liveness: any bytes from the client (data, control, a pong) within
    /// `ping_interval`, else a Ping; then any bytes within `pong_timeout`,
    /// else the link is presumed dead (a dead NAT or a pulled cable sends no
    /// FIN) and the client's socket is shut, counted as `ping_timeout`.
    fn check_liveness(&mut self, now: Instant) {
        if std::mem::take(&mut self.state.heard) {
            self.last_heard = now;
            self.ping_sent = None;
        }
        if !self.state.client_takes_data() {
            return;
        }
        match self.ping_sent {
            Some(at) if now.duration_since(at) >= self.settings.pong_timeout => {
                tracing::debug!(session = %self.state.id, "client answered no ping: link presumed dead");
                self.client_close = Some("ping_timeout");
                self.state.client_unresponsive();
                self.out_client = Output::default();
            }
            // A control frame may go between frames only, as a pong does.
            None if now.duration_since(self.last_heard) >= self.settings.ping_interval
                && !self.to_client.mid_frame() =>
            {
                let mut ping = Vec::with_capacity(2);
                frame::push_frame(&mut ping, frame::OP_PING, &[], None);
                self.out_client.push(&ping);
                self.ping_sent = Some(now);
            }
            _ => {}
        }
    }

    /// Backend liveness: any bytes from the backend within
    /// `backend_ping_interval`, else a Ping (between frames); then any bytes
    /// within `backend_pong_timeout`, else the connection is failed — which
    /// on a resumable backend is a failover. A new connection starts fresh.
    fn check_backend_liveness(&mut self, now: Instant) {
        let heard = std::mem::take(&mut self.state.backend_heard);
        let live = self.lease.is_some()
            && matches!(
                self.state.backend,
                BackendPhase::Relaying | BackendPhase::Fencing
            );
        if heard || !live {
            self.backend_quiet_since = now;
            self.backend_pinged = false;
            return;
        }
        let quiet = now.duration_since(self.backend_quiet_since);
        if self.backend_pinged {
            if quiet >= self.settings.backend_pong_timeout {
                self.backend_pinged = false;
                self.state.backend_failed("backend answered no ping".into());
            }
        } else if quiet >= self.settings.backend_ping_interval && !self.to_backend.mid_frame() {
            let mut ping = Vec::with_capacity(frame::MAX_HEADER);
            frame::push_frame(
                &mut ping,
                frame::OP_PING,
                &[],
                Peer::Backend.mask_for_send(),
            );
            self.out_backend.push(&ping);
            self.backend_pinged = true;
            self.backend_quiet_since = now;
        }
    }

    /// The client's stream ended or failed without a close handshake.
    fn client_vanished(&mut self) {
        self.client_close.get_or_insert("vanished");
        self.state.client_gone();
        self.out_client = Output::default();
    }

    /// Settle what the state asks for: fence or resolve the backend
    /// connection, send the client its Close, finish the client's socket.
    fn advance(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progressed = self.advance_backend(cx);
        if let Some(req) = self.state.close_request.take() {
            let mid = self.to_client.mid_frame();
            let source_streaming = self.lease.is_some()
                && matches!(
                    self.state.backend,
                    BackendPhase::Relaying | BackendPhase::Fencing
                );
            if mid && !req.drop_queued && source_streaming {
                // Data first: wait for the frame in flight to complete.
                self.state.close_request = Some(req);
                return progressed;
            }
            progressed = true;
            let room = if req.drop_queued || mid {
                self.out_client.drop_after_current_frame()
            } else {
                true
            };
            let received = matches!(
                self.state.client,
                ClientPhase::Closing { received: true, .. }
            );
            self.state.client = ClientPhase::Closing {
                sent: true,
                received: !room || received,
            };
            self.to_client.silence();
            if room {
                // The client gets close_timeout to answer once our Close is
                // out; data kept queued ahead of it gets send_timeout more
                // (not after a stall: that client had its send_timeout).
                let ahead = if self.out_client.is_empty() || req.drop_queued {
                    Duration::ZERO
                } else {
                    self.settings.send_timeout
                };
                self.state.close_deadline =
                    Some(Instant::now() + ahead + self.settings.close_timeout);
                let payload = match req.code {
                    Some(code) => frame::close_payload(code, req.reason),
                    None => Vec::new(),
                };
                let mut f = Vec::new();
                frame::push_frame(&mut f, frame::OP_CLOSE, &payload, None);
                self.out_client.push(&f);
            } else {
                // Even the Close cannot be written past the frame in flight.
                tracing::info!(session = %self.state.id, "client socket shut without a close frame");
                self.client_close = Some("not_sent");
                self.out_client = Output::default();
            }
        }
        if let ClientPhase::Closing {
            sent: true,
            received: true,
        } = self.state.client
        {
            // The handshake is done (or given up on): flush, then shut our side.
            let (io, _) = self.client.parts_mut();
            let flushed = self.out_client.flush(io, cx).is_ready();
            if flushed && Pin::new(&mut *io).poll_shutdown(cx).is_ready() {
                self.state.client = ClientPhase::Gone;
                self.state.close_deadline = None;
                self.out_client = Output::default();
                progressed = true;
            }
        }
        progressed
    }

    fn advance_backend(&mut self, cx: &mut Context<'_>) -> bool {
        match &self.state.backend {
            BackendPhase::Lost(_) => return self.begin_failover(),
            BackendPhase::FailingOver => return self.poll_takeover(cx),
            _ => {}
        }
        if self.lease.is_none() {
            if let BackendPhase::Failed(why) = &self.state.backend {
                // A takeover that failed, or was cut short: no connection left.
                tracing::debug!(session = %self.state.id, reason = %why, "failover ended without a backend");
                self.stop_takeover();
                self.state.set_failover_deadline(None);
                self.state.backend = BackendPhase::Resolved;
                return true;
            }
            return false;
        }
        match &self.state.backend {
            BackendPhase::Failed(why) => {
                tracing::debug!(session = %self.state.id, reason = %why, "backend connection not reusable");
                self.fence = if self.state.outcome == Some("backend_timeout") {
                    "timeout"
                } else {
                    "error"
                };
                self.resolve(false, true);
                true
            }
            BackendPhase::FenceDone => {
                let clean = self.backend_clean();
                self.fence = if clean { "clean" } else { "dirty" };
                self.resolve(clean, false);
                true
            }
            BackendPhase::Relaying if !self.state.client_may_send_data() => {
                if !self.state.fenced {
                    // Used once: closed after the client's last bytes are out.
                    if !self.out_backend.is_empty() {
                        return false;
                    }
                    self.fence = "not_fenced";
                    self.resolve(false, false);
                } else if !self.to_backend.output_at_rest() {
                    // The client left inside a message: the backend's stream
                    // cannot be fenced.
                    self.fence = "error";
                    self.resolve(false, false);
                } else {
                    let end = self.state.end_message();
                    let mut frame = Vec::new();
                    frame::push_frame(
                        &mut frame,
                        frame::OP_TEXT,
                        end.as_bytes(),
                        Peer::Backend.mask_for_send(),
                    );
                    self.out_backend.push(&frame);
                    self.state.start_fence();
                }
                true
            }
            _ => false,
        }
    }

    /// The backend connection failed and the session may move: discard the
    /// connection and start acquiring a takeover, unless the client's stream
    /// cannot be continued (a frame toward it was cut short).
    fn begin_failover(&mut self) -> bool {
        let BackendPhase::Lost(why) =
            std::mem::replace(&mut self.state.backend, BackendPhase::FailingOver)
        else {
            return false;
        };
        if self.to_client.mid_frame() {
            self.state.backend = BackendPhase::Relaying;
            self.state.failover_failed(FailoverOutcome::MidFrame, why);
            return true;
        }
        let Some(f) = self.failover.as_mut() else {
            // Unreachable: `resume` is set only with failover settings.
            self.state.backend = BackendPhase::Relaying;
            self.state.failover_failed(FailoverOutcome::NoBackend, why);
            return true;
        };
        tracing::info!(session = %self.state.id, reason = %why, "backend lost mid-session: failing over");
        if let Some(mut lease) = self.lease.take() {
            lease.mark_broken();
            lease.discard();
        }
        let now = Instant::now();
        f.acquiring = Some((f.takeover.next_lease(), now));
        self.state
            .set_failover_deadline(Some(now + f.settings.timeout));
        // Nothing of the old connection carries over.
        self.out_backend = Output::default();
        self.reply_backend = None;
        self.stalled_backend = None;
        self.dirty = false;
        self.to_client = Parser::new(Peer::Backend, Peer::Client, self.settings.max_message_size);
        true
    }

    /// Poll the takeover being acquired; install it when it comes.
    fn poll_takeover(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.state.client_takes_data() {
            // The client left (or is being closed): nobody to resume for.
            self.stop_takeover();
            self.state.set_failover_deadline(None);
            self.state.backend = BackendPhase::Resolved;
            return true;
        }
        let Some((fut, _)) = self.failover.as_mut().and_then(|f| f.acquiring.as_mut()) else {
            self.state
                .failover_failed(FailoverOutcome::NoBackend, "failover lost its way".into());
            return true;
        };
        let lease = match fut.as_mut().poll(cx) {
            Poll::Pending => return false,
            Poll::Ready(lease) => lease,
        };
        let since = self
            .failover
            .as_mut()
            .and_then(|f| f.acquiring.take())
            .map(|(_, since)| since);
        match lease {
            None => self.state.failover_failed(
                FailoverOutcome::NoBackend,
                "no other backend could take the session over".into(),
            ),
            Some(lease) => self.install(lease, since),
        }
        true
    }

    /// Drop the takeover being acquired, if any.
    fn stop_takeover(&mut self) {
        if let Some(f) = self.failover.as_mut() {
            f.acquiring = None;
        }
    }

    /// A new backend connection takes the session over: `session.start` with
    /// `resume`, the replay, and `session.end` if the client already ended.
    fn install(&mut self, lease: L, since: Option<Instant>) {
        let (Some(f), Some(r)) = (self.failover.as_deref(), self.state.resume.as_deref_mut())
        else {
            return;
        };
        r.failovers += 1;
        r.outcomes[FailoverOutcome::Resumed as usize] += 1;
        let from = r.replay.resume_from();
        let failovers = r.failovers;
        let id = &self.state.id;
        let mut frames = Vec::new();
        let start = crate::backend::fence::resume_message(id, f.params, from, failovers);
        frame::push_frame(
            &mut frames,
            frame::OP_TEXT,
            start.as_bytes(),
            Peer::Backend.mask_for_send(),
        );
        for (opcode, payload) in r.replay.replay() {
            frame::push_frame(&mut frames, opcode, &payload, Peer::Backend.mask_for_send());
        }
        // A fresh token: nothing of the old lease's fence carries over.
        self.state.set_token(new_fence_token());
        self.state.backend = BackendPhase::Relaying;
        if self.state.client == ClientPhase::Ended {
            let end = self.state.end_message();
            frame::push_frame(
                &mut frames,
                frame::OP_TEXT,
                end.as_bytes(),
                Peer::Backend.mask_for_send(),
            );
            self.state.start_fence();
        }
        self.out_backend.push(&frames);
        if f.settings.notice {
            let notice = crate::backend::fence::failover_notice(&self.state.id, from, failovers);
            let mut frame = Vec::with_capacity(notice.len() + frame::MAX_HEADER);
            frame::push_frame(&mut frame, frame::OP_TEXT, notice.as_bytes(), None);
            self.out_client.push(&frame);
            self.state.counts.to_client.0 += 1;
            self.state.counts.to_client.1 += notice.len() as u64;
        }
        self.state.set_failover_deadline(None);
        if let Some(since) = since {
            self.metrics
                .failover_pause_seconds
                .observe(since.elapsed().as_secs_f64());
        }
        tracing::info!(session = %self.state.id, from_bytes = from, failovers, "session taken over by another backend");
        self.lease = Some(lease);
        // A new connection: its read has not been tried in this poll.
        self.backend_pending = false;
    }

    /// Nothing of the session is left at any layer of the backend stream.
    fn backend_clean(&self) -> bool {
        let Some(lease) = self.lease.as_ref() else {
            return false;
        };
        !self.dirty
            && !lease.stream.has_unread()
            && self.out_backend.is_empty()
            && self.reply_backend.is_none()
            && self.to_client.at_rest()
            && self.to_backend.output_at_rest()
    }

    fn resolve(&mut self, release: bool, broken: bool) {
        if let Some(mut lease) = self.lease.take() {
            if release {
                lease.release();
            } else {
                if broken {
                    lease.mark_broken();
                }
                lease.discard();
            }
        }
        self.state.backend = BackendPhase::Resolved;
        self.state.fence_deadline = None;
        self.out_backend = Output::default();
    }

    fn flush_counts(&mut self) {
        let c = std::mem::take(&mut self.state.counts);
        let m = self.metrics;
        if c.to_backend.0 > 0 {
            m.messages.get_or_create(&TO_BACKEND).inc_by(c.to_backend.0);
            m.bytes.get_or_create(&TO_BACKEND).inc_by(c.to_backend.1);
        }
        if c.to_client.0 > 0 {
            m.messages.get_or_create(&TO_CLIENT).inc_by(c.to_client.0);
            m.bytes.get_or_create(&TO_CLIENT).inc_by(c.to_client.1);
        }
    }

    fn on_tick(&mut self, now: Instant) {
        // Messages relayed since the last tick (before the counts are flushed).
        let (messages, bytes) = self.state.counts.to_backend;
        let data_heard = messages > 0;
        self.flush_counts();
        let st = &mut self.state;
        if let Some(rate) = &self.rate
            && let Err(exceeded) = rate.charge(messages, bytes)
            && st.client_takes_data()
        {
            tracing::info!(session = %st.id, limit = exceeded.label(), "client past its rate limit");
            self.metrics
                .rate_limited
                .get_or_create(&LimitLabel {
                    limit: exceeded.label(),
                })
                .inc();
            st.rate_limited();
        }
        if self.shutdown.is_cancelled() && st.client_takes_data() {
            st.shutdown();
        }
        // Idleness: no data message from the client for idle_timeout (a
        // client that only pings is idle: it streams nothing).
        if data_heard {
            self.last_data = now;
        } else if st.client == ClientPhase::Open
            && now.duration_since(self.last_data) >= self.settings.idle_timeout
        {
            st.idle();
        }
        self.check_liveness(now);
        self.check_backend_liveness(now);
        let st = &mut self.state;
        // Stalls: bytes queued and none taken for send_timeout.
        let send_timeout = self.settings.send_timeout;
        let prev = now.checked_sub(self.tick).unwrap_or(now);
        let stalled = |out: &mut Output, since: &mut Option<Instant>| -> bool {
            if out.is_empty() || std::mem::take(&mut out.progressed) {
                *since = None;
                return false;
            }
            now.duration_since(*since.get_or_insert(prev)) >= send_timeout
        };
        if stalled(&mut self.out_client, &mut self.stalled_client) && st.client_takes_data() {
            st.slow_client();
        }
        if stalled(&mut self.out_backend, &mut self.stalled_backend) {
            st.backend_failed("backend too slow to take data".into());
        }
        if st.fence_deadline.is_some_and(|d| d <= now) {
            st.fence_timed_out();
        }
        if let Some(r) = st.resume.as_deref_mut() {
            r.replay.tick(now);
        }
        if st.failover_deadline().is_some_and(|d| d <= now) {
            st.failover_failed(
                FailoverOutcome::Timeout,
                "no backend took the session over within failover_timeout".into(),
            );
            if let Some(f) = self.failover.as_mut() {
                f.acquiring = None;
            }
        }
        if st.close_deadline.is_some_and(|d| d <= now) {
            st.close_deadline = None;
            if let ClientPhase::Closing { .. } = st.client {
                self.client_close
                    .get_or_insert(if self.out_client.is_empty() {
                        "no_reply"
                    } else {
                        "not_sent"
                    });
                st.client = ClientPhase::Closing {
                    sent: true,
                    received: true,
                };
                // A Close still waiting for a frame in flight is given up on
                // too: the fresh queue below knows no frame in flight, so a
                // Close sent through it later would land inside that frame.
                st.close_request = None;
                // Whatever is still queued is given up on: the socket is shut.
                self.out_client = Output::default();
                self.to_client.silence();
            }
        }
    }
}

/// A writer that takes everything: where output goes when its peer is gone.
struct Sink;

impl AsyncWrite for Sink {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{DuplexStream, duplex};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;

    use super::*;

    /// A lease that reports how it ended.
    struct TestLease {
        conn: BackendConn<DuplexStream>,
        ended: tokio::sync::oneshot::Sender<(bool, BackendConn<DuplexStream>)>,
    }

    impl std::ops::Deref for TestLease {
        type Target = BackendConn<DuplexStream>;
        fn deref(&self) -> &Self::Target {
            &self.conn
        }
    }
    impl std::ops::DerefMut for TestLease {
        fn deref_mut(&mut self) -> &mut Self::Target {
            &mut self.conn
        }
    }
    impl RelayLease<DuplexStream> for TestLease {
        fn release(self) {
            let _ = self.ended.send((true, self.conn));
        }
        fn discard(self) {
            let _ = self.ended.send((false, self.conn));
        }
    }

    fn settings() -> RelaySettings {
        RelaySettings {
            drain_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(30),
            send_timeout: Duration::from_secs(5),
            close_timeout: Duration::from_secs(1),
            max_message_size: 2 << 20,
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(10),
            rate: RateLimits::OFF,
            backend_ping_interval: Duration::from_secs(20),
            backend_pong_timeout: Duration::from_secs(10),
        }
    }

    /// An echo backend that speaks the fence.
    async fn echo_backend(mut ws: WebSocketStream<DuplexStream>) {
        while let Some(Ok(m)) = ws.next().await {
            match m {
                Message::Text(t) if t.contains("\"session.end\"") => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    let ended = serde_json::json!({"type":"session.ended","session":v["session"],"fence":v["fence"]});
                    ws.send(Message::text(ended.to_string())).await.unwrap();
                }
                m @ (Message::Text(_) | Message::Binary(_)) => ws.send(m).await.unwrap(),
                _ => {}
            }
        }
    }

    /// Found by the `relay` fuzz target: a backend stops in the middle of a
    /// frame, the client goes idle, the idle Close waits for the frame in
    /// flight, the close deadline gives up on it — and the Close was then
    /// written anyway, inside the unfinished frame, breaking the client's
    /// framing. The client must get the cut-short frame and nothing after it.
    #[tokio::test(start_paused = true)]
    async fn a_close_given_up_on_is_never_written_into_a_frame_in_flight() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client_io, proxy_client_io) = duplex(1 << 16);
        let (proxy_backend_io, mut backend_io) = duplex(1 << 16);
        let mut cut_short = Vec::new();
        frame::push_frame(&mut cut_short, frame::OP_BINARY, &[9; 9], None);
        cut_short.pop();
        backend_io.write_all(&cut_short).await.unwrap();
        let (tx, _rx) = tokio::sync::oneshot::channel();
        let lease = TestLease {
            conn: BackendConn::new(proxy_backend_io, Vec::new()),
            ended: tx,
        };
        let relay = async move {
            let mut proxy_side = FrameStream::new(proxy_client_io, Vec::new(), Peer::Client);
            let shutdown = tokio_util::sync::CancellationToken::new();
            let metrics = Metrics::new(crate::backends::Backends::default());
            relay(
                &mut proxy_side,
                lease,
                true,
                "s1",
                &settings(),
                &shutdown,
                &metrics,
                None,
            )
            .await
        };
        // The backend stays connected and silent; the client reads to the end.
        let mut received = Vec::new();
        let read = client_io.read_to_end(&mut received);
        let (end, read) = tokio::time::timeout(Duration::from_secs(600), async {
            tokio::join!(relay, read)
        })
        .await
        .expect("the relay ends");
        read.unwrap();
        drop(backend_io);
        assert_eq!(received, cut_short, "after the cut-short frame: {end:?}");
    }

    #[tokio::test]
    async fn relays_a_session_and_returns_to_base_size_after_a_large_message() {
        let (client_io, proxy_client_io) = duplex(1 << 16);
        let (proxy_backend_io, backend_io) = duplex(1 << 16);
        let backend = WebSocketStream::from_raw_socket(backend_io, Role::Server, None).await;
        tokio::spawn(echo_backend(backend));
        let mut client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let lease = TestLease {
            conn: BackendConn::new(proxy_backend_io, Vec::new()),
            ended: tx,
        };
        let mut proxy_side = FrameStream::new(proxy_client_io, Vec::new(), Peer::Client);
        let shutdown = tokio_util::sync::CancellationToken::new();
        let relay_task = tokio::spawn(async move {
            let metrics = Metrics::new(crate::backends::Backends::default());
            relay(
                &mut proxy_side,
                lease,
                true,
                "s1",
                &settings(),
                &shutdown,
                &metrics,
                None,
            )
            .await
        });
        let big = vec![7u8; 1 << 20];
        client.send(Message::binary(big.clone())).await.unwrap();
        client.send(Message::text("hello")).await.unwrap();
        assert_eq!(client.next().await.unwrap().unwrap(), Message::binary(big));
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::text("hello")
        );
        client
            .send(Message::text(r#"{"type":"session.end"}"#))
            .await
            .unwrap();
        let ended = client.next().await.unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_str(ended.to_text().unwrap())
            .unwrap_or_else(|e| panic!("{e}: {ended:?}"));
        assert_eq!(v["type"], "session.ended");
        assert!(v.get("fence").is_none());
        match client.next().await.unwrap().unwrap() {
            Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1000),
            other => panic!("expected close 1000, got {other:?}"),
        }
        let end = relay_task.await.unwrap();
        assert_eq!((end.outcome, end.fence), ("ended", "clean"));
        let (released, conn) = rx.await.unwrap();
        assert!(released);
        assert!(!conn.stream.has_unread());
    }
}
