//! [`State`]: where one session stands — the client's side, the backend's
//! side and its fence — and the transitions between, kept apart from the
//! byte pumping so each rule sits in one place.
//!
//! Invariants:
//! - The backend connection goes back to the pool only from
//!   [`BackendPhase::FenceDone`], and only if nothing of the session is left
//!   buffered (checked by the relay at release).
//! - Once a close toward the client is requested, no more data reaches it.
//! - Every deadline set here (fence, close) is awaited by the relay's one
//!   timer; no await is unbounded.

use memchr::memmem::Finder;
use tokio::time::{Duration, Instant};

use super::frame::{MAX_CONTROL_PAYLOAD, is_valid_close_code};
use super::replay::Replay;

/// Per-session message counts, added to the shared metrics in batches.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub to_backend: (u64, u64),
    pub to_client: (u64, u64),
}

/// Why the relay dropped a message (the `reason` label of
/// `sttproxy_relay_dropped_messages_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dropped {
    ClientReserved,
    ForeignSession,
    StaleFence,
    TokenEcho,
    /// After a failover: a result the client already has (by its offsets),
    /// or the new backend's `session.started`.
    Replayed,
}

impl Dropped {
    pub const ALL: [Dropped; 5] = [
        Dropped::ClientReserved,
        Dropped::ForeignSession,
        Dropped::StaleFence,
        Dropped::TokenEcho,
        Dropped::Replayed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Dropped::ClientReserved => "client_reserved",
            Dropped::ForeignSession => "foreign_session",
            Dropped::StaleFence => "stale_fence",
            Dropped::TokenEcho => "token_echo",
            Dropped::Replayed => "replayed",
        }
    }
}

/// A ping's answer owed to a peer, sent at its stream's next frame boundary
/// (kept only while that stream is inside a frame: rare, so on the heap).
#[derive(Debug, Clone)]
pub(crate) struct ControlReply {
    pub payload: Box<[u8]>,
}

impl ControlReply {
    pub fn pong(payload: &[u8]) -> Self {
        let len = payload.len().min(MAX_CONTROL_PAYLOAD);
        Self {
            payload: payload[..len].into(),
        }
    }
}

/// A Close to send to the client.
#[derive(Debug, Clone)]
pub(crate) struct CloseRequest {
    /// `None`: a Close without a code (the answer to one without a code).
    pub code: Option<u16>,
    pub reason: &'static str,
    /// Drop data queued for the client (past the frame being written).
    pub drop_queued: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientPhase {
    /// Relaying both ways.
    Open,
    /// The client sent `session.end`: its data is over, results still flow.
    Ended,
    /// A Close is requested or sent; `received`: the client's Close arrived.
    Closing { sent: bool, received: bool },
    /// Finished with the client's socket.
    Gone,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BackendPhase {
    Relaying,
    /// `session.end` with the token is queued; waiting for `session.ended`.
    Fencing,
    /// The fence completed: the connection may go back to the pool.
    FenceDone,
    /// The connection failed or the backend broke the protocol.
    Failed(String),
    /// The connection failed and the session may move to another backend
    /// (docs/failover.md): the relay discards it and starts a takeover.
    Lost(String),
    /// No backend connection: a takeover is being acquired. The client's
    /// data is kept for the replay meanwhile.
    FailingOver,
    /// The lease was released or discarded.
    Resolved,
}

/// How a session's attempt to move to another backend ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failover {
    /// Another backend took the session over.
    Resumed,
    /// The session had its `failover_max` failovers already.
    Limit,
    /// Audio the takeover would need was evicted from the replay buffer.
    Window,
    /// The backend failed in the middle of a frame toward the client: the
    /// client's stream cannot be continued.
    MidFrame,
    /// No healthy resumable backend had a connection.
    NoBackend,
    /// No takeover within `failover_timeout`.
    Timeout,
}

impl Failover {
    pub const ALL: [Failover; 6] = [
        Failover::Resumed,
        Failover::Limit,
        Failover::Window,
        Failover::MidFrame,
        Failover::NoBackend,
        Failover::Timeout,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Failover::Resumed => "resumed",
            Failover::Limit => "limit",
            Failover::Window => "window",
            Failover::MidFrame => "mid_frame",
            Failover::NoBackend => "no_backend",
            Failover::Timeout => "timeout",
        }
    }
}

/// A resumable session's failover record.
#[derive(Debug)]
pub(crate) struct Resume {
    pub replay: Replay,
    /// Failovers so far, and the most allowed.
    pub failovers: u32,
    pub max_failovers: u32,
    /// Attempts by outcome (index: [`Failover`]).
    pub outcomes: [u64; 6],
    /// A takeover must be in place by then, else the client gets 1014.
    pub deadline: Option<Instant>,
}

impl Resume {
    pub fn new(replay: Replay, max_failovers: u32) -> Self {
        Self {
            replay,
            failovers: 0,
            max_failovers,
            outcomes: [0; 6],
            deadline: None,
        }
    }

    /// Whether a result seen now may repeat one the client has: only after a
    /// takeover, whose replay makes the new backend say again what the old
    /// one said.
    pub fn replaying(&self) -> bool {
        self.failovers > 0
    }
}

/// Where one session stands.
#[derive(Debug)]
pub(crate) struct State {
    pub id: String,
    /// This lease's fence token (docs/protocol.md): never shown to the client.
    /// Private, so that it changes only with [`State::set_token`], which keeps
    /// `token_finder` in step.
    token: String,
    /// Whether `token` went to the backend (in `session.end`). Until then no
    /// message can carry it: it is random, and nothing else ever sends it.
    token_sent: bool,
    /// Searches a text for `token`: built once per token, not per message;
    /// boxed, because it is larger than the rest of the state and every open
    /// session's future holds the state.
    token_finder: Box<Finder<'static>>,
    pub fenced: bool,
    pub client: ClientPhase,
    pub backend: BackendPhase,
    pub close_request: Option<CloseRequest>,
    pub counts: Counts,
    pub dropped: [u64; 5],
    /// The first cause of the session's end (the `outcome` label).
    pub outcome: Option<&'static str>,
    /// Bytes arrived from the client since the last tick.
    pub heard: bool,
    /// Bytes came from the backend since the last tick.
    pub backend_heard: bool,
    pub fence_deadline: Option<Instant>,
    pub close_deadline: Option<Instant>,
    /// Set for sessions on resumable backends with failover on.
    pub resume: Option<Box<Resume>>,
    drain_timeout: Duration,
    close_timeout: Duration,
}

impl State {
    pub fn new(
        id: String,
        token: String,
        fenced: bool,
        drain_timeout: Duration,
        close_timeout: Duration,
        resume: Option<Box<Resume>>,
    ) -> Self {
        Self {
            id,
            token_finder: Box::new(Finder::new(token.as_bytes()).into_owned()),
            token_sent: false,
            token,
            fenced,
            client: ClientPhase::Open,
            backend: BackendPhase::Relaying,
            close_request: None,
            counts: Counts::default(),
            dropped: [0; 5],
            outcome: None,
            heard: false,
            backend_heard: false,
            fence_deadline: None,
            close_deadline: None,
            resume,
            drain_timeout,
            close_timeout,
        }
    }

    /// This lease's fence token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// A new lease's fence token (a takeover's): nothing of the old one's
    /// fence carries over.
    pub fn set_token(&mut self, token: String) {
        *self.token_finder = Finder::new(token.as_bytes()).into_owned();
        self.token = token;
        self.token_sent = false;
    }

    /// The `session.end` for the backend, carrying this lease's token: the
    /// one way the token leaves the proxy.
    pub fn end_message(&mut self) -> String {
        self.token_sent = true;
        crate::backend::fence::end_message(&self.id, &self.token)
    }

    /// Whether `text` holds this lease's fence token anywhere. Not searched
    /// for before [`State::end_message`] sent it: until then no text can
    /// hold it (but by a 2^-128 chance), and most of a session's messages
    /// come before.
    pub fn carries_token(&self, text: &[u8]) -> bool {
        self.token_sent && self.token_finder.find(text).is_some()
    }

    /// When a takeover in progress must be in place.
    pub fn failover_deadline(&self) -> Option<Instant> {
        self.resume.as_ref().and_then(|r| r.deadline)
    }

    pub fn set_failover_deadline(&mut self, at: Option<Instant>) {
        if let Some(r) = self.resume.as_deref_mut() {
            r.deadline = at;
        }
    }

    fn outcome(&mut self, outcome: &'static str) {
        self.outcome.get_or_insert(outcome);
    }

    pub fn dropped(&mut self, why: Dropped) {
        self.dropped[why as usize] += 1;
    }

    /// The client may still send data to relay.
    pub fn client_may_send_data(&self) -> bool {
        self.client == ClientPhase::Open
    }

    /// Data from the backend still goes to the client.
    pub fn client_takes_data(&self) -> bool {
        matches!(self.client, ClientPhase::Open | ClientPhase::Ended)
    }

    pub fn fence_pending(&self) -> bool {
        self.backend == BackendPhase::Fencing
    }

    /// Ask for a Close toward the client, unless one is already under way.
    pub fn close_client(
        &mut self,
        code: Option<u16>,
        reason: &'static str,
        drop_queued: bool,
        received: bool,
    ) {
        if !self.client_takes_data() {
            return;
        }
        self.client = ClientPhase::Closing {
            sent: false,
            received,
        };
        self.close_request = Some(CloseRequest {
            code,
            reason,
            drop_queued,
        });
        self.close_deadline = Some(Instant::now() + self.close_timeout);
    }

    /// The client sent `session.end`.
    pub fn client_ended(&mut self) {
        if self.client != ClientPhase::Open {
            return;
        }
        self.client = ClientPhase::Ended;
        if self.fenced {
            // "ended" only once the backend's session.ended is through.
            self.start_fence();
        } else {
            // Not fenced: the end went to the backend as data and the
            // connection is used once.
            self.outcome("ended");
            self.close_client(Some(1000), "session ended", false, false);
        }
    }

    /// `session.end` with the token is (being) queued to the backend.
    pub fn start_fence(&mut self) {
        if self.backend == BackendPhase::Relaying {
            self.backend = BackendPhase::Fencing;
            self.fence_deadline = Some(Instant::now() + self.drain_timeout);
        }
    }

    pub fn fence_completed(&mut self) {
        if self.backend != BackendPhase::Fencing {
            return;
        }
        self.backend = BackendPhase::FenceDone;
        self.fence_deadline = None;
        if self.client == ClientPhase::Ended {
            self.outcome("ended");
            self.close_client(Some(1000), "session ended", false, false);
        }
    }

    /// The backend did not complete the fence in time.
    pub fn fence_timed_out(&mut self) {
        self.fence_deadline = None;
        if self.backend == BackendPhase::Fencing {
            self.outcome("backend_timeout");
            self.backend = BackendPhase::Failed("backend did not end the session in time".into());
            self.close_client(Some(1011), "backend did not end the session", false, false);
        }
    }

    /// The client's Close arrived, with `payload` (code and reason).
    pub fn client_close_received(&mut self, payload: &[u8]) {
        if let ClientPhase::Closing { sent, .. } = self.client {
            self.client = ClientPhase::Closing {
                sent,
                received: true,
            };
            return;
        }
        self.outcome("client_gone");
        let answer = match payload {
            [] => None,
            [a, b, reason @ ..] => {
                let code = u16::from_be_bytes([*a, *b]);
                if !is_valid_close_code(code) {
                    Some(1002)
                } else if std::str::from_utf8(reason).is_err() {
                    Some(1007)
                } else {
                    Some(code)
                }
            }
            [_] => Some(1002),
        };
        self.close_client(answer, "", true, true);
    }

    /// The client broke the protocol: close it with `code`.
    pub fn client_fault(&mut self, code: u16, reason: &'static str) {
        self.outcome("client_fault");
        self.close_client(Some(code), reason, true, false);
    }

    /// The client's stream ended or failed: nothing more can be said to it.
    pub fn client_gone(&mut self) {
        self.outcome("client_gone");
        self.client = ClientPhase::Gone;
        self.close_request = None;
        self.close_deadline = None;
    }

    /// The client answered nothing, not even a ping, within the pong
    /// deadline: its link is presumed dead.
    pub fn client_unresponsive(&mut self) {
        self.outcome("client_timeout");
        self.client_gone();
    }

    pub fn backend_failed(&mut self, why: String) {
        if matches!(
            self.backend,
            BackendPhase::Resolved
                | BackendPhase::Failed(_)
                | BackendPhase::Lost(_)
                | BackendPhase::FailingOver
        ) {
            return;
        }
        let takes_data = self.client_takes_data();
        if let Some(r) = self.resume.as_deref_mut()
            && takes_data
        {
            let refused = if r.failovers >= r.max_failovers {
                Some(Failover::Limit)
            } else if !r.replay.resumable() {
                Some(Failover::Window)
            } else {
                None
            };
            match refused {
                None => {
                    self.backend = BackendPhase::Lost(why);
                    self.fence_deadline = None;
                    return;
                }
                Some(f) => r.outcomes[f as usize] += 1,
            }
        }
        self.fail(why);
    }

    /// A takeover could not be had: the session ends as a backend failure.
    pub fn failover_failed(&mut self, how: Failover, why: String) {
        if let Some(r) = self.resume.as_deref_mut() {
            r.outcomes[how as usize] += 1;
        }
        self.set_failover_deadline(None);
        self.fail(why);
    }

    fn fail(&mut self, why: String) {
        self.outcome("backend_failed");
        self.backend = BackendPhase::Failed(why);
        self.fence_deadline = None;
        self.close_client(Some(1014), "backend connection lost", false, false);
    }

    /// The proxy is shutting down and the grace is over.
    pub fn shutdown(&mut self) {
        self.outcome("shutdown");
        self.close_client(Some(1001), "proxy shutting down", false, false);
        self.set_failover_deadline(None);
        if !matches!(
            self.backend,
            BackendPhase::Resolved | BackendPhase::Failed(_)
        ) {
            self.backend = BackendPhase::Failed("proxy shutting down".into());
        }
    }

    pub fn idle(&mut self) {
        self.outcome("idle");
        self.close_client(Some(1001), "idle timeout", false, false);
    }

    /// The client sent past a rate limit: 1008, its data is over (what it
    /// sent before is relayed and the backend fenced as at any end).
    pub fn rate_limited(&mut self) {
        self.outcome("rate_limited");
        self.close_client(Some(1008), "rate limit exceeded", false, false);
    }

    pub fn slow_client(&mut self) {
        self.outcome("slow_client");
        self.close_client(Some(1008), "client too slow", true, false);
    }

    /// The session is over: the lease is resolved and the client finished.
    pub fn finished(&self) -> bool {
        self.backend == BackendPhase::Resolved && self.client == ClientPhase::Gone
    }
}
