//! Backend emulation: an STT inference server in memory. Each connection is a
//! small task speaking the fencing protocol (docs/protocol.md):
//! `session.start` → `session.started`; data → an echo (or an STT partial)
//! after a virtual delay; `session.end` → a final → `session.ended`.
//! Fault knobs (active only while the run's faults are on): dials that fail,
//! hang or are slow; connections that die idle or leased (reset or EOF);
//! late pongs; connections that stall for good; finals that come too late;
//! frames of an ended session sent after its `session.ended` (in the same
//! write, or onto the idle connection later); and the whole backend crashing
//! (every connection dropped, dials refused) and coming back.
//!
//! Why this is not `echo-backend` (the workspace's one backend emulator for real sockets):
//! the simulator runs every task on a virtual clock over in-memory links
//! (`transport::SimStream`) and dials through the proxy's `Dialer` trait, while
//! echo-backend serves real TCP on the tokio clock and owns its accept loop, connection
//! tasks and timers; its sim-only faults (hanging or failing dials, late finals, frames
//! after `session.ended`, a backend-wide crash that refuses dials) are driven by the
//! sim's checker and seeded RNG, which echo-backend has no hook for. Sharing the
//! protocol parsing alone would save a few lines of JSON matching, at the price of a
//! dependency of the simulator on echo-backend's internals, so the two stay separate;
//! docs/protocol.md is the contract both follow.
//!
//! A resumable backend (`BackendSpec::resume`, stt mode) speaks `resume`
//! (docs/failover.md): its partials carry `end_bytes` (client audio bytes heard,
//! binary payloads only), its finals `start_bytes`..`end_bytes` and `ack_bytes`
//! (finals tile the audio), and a `session.start` with
//! `"resume":{"from_bytes":A}` starts its offsets and a new utterance at `A`.
//!
//! In echo mode a backend may reflect the JSON a client sends back to it as
//! text (`BackendSpec::reflect_json`): whatever a client says, shaped like a
//! control message, comes back from the backend's side.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use rand::rngs::SmallRng;
use serde_json::Value;
use sttproxy::backend::BackendConn;
use sttproxy::reconcile::Dialer;
use tokio::io::DuplexStream;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;

use crate::checker::Kind;
use crate::runtime::SimRng;
use crate::tasks::Tasks;
use crate::transport::{self, LinkState, SimStream};
use crate::world::{RunStats, World};

/// What the backend answers to data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Echo every data message.
    Echo,
    /// One partial transcript per audio chunk; a final on `session.end`.
    Stt,
}

/// Fault knobs; each applies only while the run's faults are on.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// A dial is refused.
    pub dial_fail_p: f64,
    /// Extra dial delay, uniform in this range (ms).
    pub dial_delay_ms: (u64, u64),
    /// A dial hangs for good (the dialer's timeout must end it).
    pub dial_hang_p: f64,
    /// An idle connection dies after an exponential time with this mean.
    pub idle_death_mean: Option<Duration>,
    /// A leased connection dies during its session.
    pub leased_death_p: f64,
    /// A pong comes late, delayed uniformly in `pong_delay_ms`.
    pub late_pong_p: f64,
    pub pong_delay_ms: (u64, u64),
    /// On a ping, the connection stops answering anything, for good.
    pub stall_p: f64,
    /// The final of a session comes late, delayed uniformly in `late_final_ms`.
    pub late_final_p: f64,
    pub late_final_ms: (u64, u64),
    /// Right after a session's `session.ended`, in the same write, one more
    /// frame of that session.
    pub late_after_ended_p: f64,
    /// After a session ended, one more frame of it, delayed uniformly in
    /// `late_idle_ms` (onto the idle connection, or whatever came next).
    pub late_idle_p: f64,
    pub late_idle_ms: (u64, u64),
}

/// How one backend behaves.
#[derive(Debug, Clone)]
pub struct BackendSpec {
    pub mode: Mode,
    /// Dial delay without faults (ms).
    pub dial_ms: (u64, u64),
    /// Delay of each result (ms).
    pub result_ms: (u64, u64),
    /// Echo mode: data that parses as a JSON object comes back as that JSON,
    /// re-serialized (keys sorted, escapes undone), as text.
    pub reflect_json: bool,
    /// Stt mode: speaks `resume` (results carry audio offsets; a resumed
    /// session carries on from `from_bytes`). The runner turns it off for the
    /// scenario's fenced backends.
    pub resume: bool,
    /// Deliberately broken, for the checkers' own test: a resumed session's
    /// offsets restart at 0 instead of `from_bytes`.
    pub resume_from_zero: bool,
    pub faults: Faults,
}

/// Resumable stt mode: the chance that a chunk's partial is followed by a
/// final (the utterance ends there; its audio is acknowledged).
const FINAL_P: f64 = 0.3;

/// Why a dial failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialFault {
    Refused,
    Timeout,
}

impl fmt::Display for DialFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DialFault::Refused => "connection refused",
            DialFault::Timeout => "connect timed out",
        })
    }
}

/// One emulated backend.
#[derive(Debug)]
pub struct SimBackend {
    pub index: usize,
    spec: BackendSpec,
    up: AtomicBool,
    /// Cancelled when the backend crashes; replaced when it comes back.
    crash: Mutex<CancellationToken>,
    world: Arc<World>,
    tasks: Tasks,
    rng: SimRng,
    ws: WebSocketConfig,
}

/// WebSocket settings of the emulated peers (backends and clients): small
/// buffers, messages up to 64 KiB.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(64 << 10))
        .max_frame_size(Some(64 << 10))
}

impl SimBackend {
    pub fn new(
        index: usize,
        spec: BackendSpec,
        world: Arc<World>,
        tasks: Tasks,
        seed: u64,
    ) -> Arc<Self> {
        Arc::new(Self {
            index,
            spec,
            up: AtomicBool::new(true),
            crash: Mutex::new(CancellationToken::new()),
            world,
            tasks,
            rng: SimRng::new(seed),
            ws: ws_config(),
        })
    }

    fn crash_token(&self) -> CancellationToken {
        match self.crash.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// The backend process dies: every connection drops, dials are refused.
    pub fn crash(&self) {
        if !self.up.swap(false, Ordering::Relaxed) {
            return;
        }
        self.crash_token().cancel();
        let i = self.index;
        self.world.note(|| format!("b{i} CRASHED"));
    }

    /// The backend is back.
    pub fn restore(&self) {
        {
            let mut g = match self.crash.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if g.is_cancelled() {
                *g = CancellationToken::new();
            }
        }
        if !self.up.swap(true, Ordering::Relaxed) {
            let i = self.index;
            self.world.note(|| format!("b{i} back up"));
        }
    }

    /// Open a connection (no timeout of its own: a hanging dial hangs).
    pub async fn connect(self: &Arc<Self>) -> Result<BackendConn<SimStream>, DialFault> {
        let flight = self.world.dial_started(self.index);
        let faults = self.world.faults();
        let f = &self.spec.faults;
        if !self.is_up() {
            tokio::time::sleep(Duration::from_millis(1)).await;
            flight.failed("refused: backend down");
            return Err(DialFault::Refused);
        }
        if faults && self.rng.chance(f.dial_hang_p) {
            let i = self.index;
            self.world.note(|| format!("b{i} dial hangs"));
            std::future::pending::<()>().await;
        }
        let mut delay = self.rng.millis(self.spec.dial_ms);
        if faults {
            delay += self.rng.millis(f.dial_delay_ms);
        }
        tokio::time::sleep(delay).await;
        if !self.is_up() || (faults && self.rng.chance(f.dial_fail_p)) {
            flight.failed("refused");
            return Err(DialFault::Refused);
        }
        let id = self.world.next_conn_id();
        let (stream, backend_io, link) = transport::link(&self.world, self.index, id);
        flight.succeeded(id);
        let server =
            WebSocketStream::from_raw_socket(backend_io, Role::Server, Some(self.ws)).await;
        let conn = ConnTask {
            backend: self.clone(),
            link,
            crash: self.crash_token(),
            rng: self.rng.fork(),
            session: None,
            queue: VecDeque::new(),
            seq: 0,
            audio: 0,
            utterance_start: 0,
            stalled: false,
            death_at: None,
            hold_until: None,
            late: None,
        };
        self.tasks.spawn("backend-conn", conn.run(server));
        // In memory there is no HTTP handshake: the proxy's end speaks
        // frames at once.
        Ok(BackendConn::new(stream, Vec::new()))
    }
}

/// The production `Dialer` for a simulated backend: `connect` bounded by the
/// connect timeout, as `WsDialer` bounds its TCP connect and handshake.
#[derive(Debug)]
pub struct SimDialer {
    pub backend: Arc<SimBackend>,
    pub timeout: Duration,
    pub world: Arc<World>,
}

impl Dialer for SimDialer {
    type Conn = BackendConn<SimStream>;
    type Error = DialFault;

    async fn dial(&self) -> Result<BackendConn<SimStream>, DialFault> {
        match tokio::time::timeout(self.timeout, self.backend.connect()).await {
            Ok(r) => r,
            Err(_) => {
                self.world.dial_timed_out(self.backend.index);
                Err(DialFault::Timeout)
            }
        }
    }
}

/// Marks the link's backend end gone however the task ends.
struct Gone(Arc<LinkState>);

impl Drop for Gone {
    fn drop(&mut self) {
        self.0.set_backend_gone();
    }
}

/// One backend connection's task.
struct ConnTask {
    backend: Arc<SimBackend>,
    link: Arc<LinkState>,
    crash: CancellationToken,
    rng: SmallRng,
    /// The session being served (between `session.start` and `session.ended`).
    session: Option<String>,
    /// Results to send, due times non-decreasing.
    queue: VecDeque<(Instant, String, bool)>,
    seq: u64,
    /// Resumable stt mode: client audio bytes heard (from `from_bytes` on a
    /// resumed session), and where the open utterance starts.
    audio: u64,
    utterance_start: u64,
    stalled: bool,
    death_at: Option<Instant>,
    /// Reading (and so the automatic pong) is held until then.
    hold_until: Option<Instant>,
    /// A frame of an ended session to send then.
    late: Option<(Instant, String)>,
}

fn text_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

impl ConnTask {
    fn faults(&self) -> bool {
        self.backend.world.faults()
    }

    fn millis(&mut self, (lo, hi): (u64, u64)) -> Duration {
        if hi <= lo {
            return Duration::from_millis(lo);
        }
        Duration::from_millis(self.rng.random_range(lo..=hi))
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.random_bool(p.min(1.0))
    }

    fn schedule_idle_death(&mut self) {
        self.death_at = None;
        if !self.faults() {
            return;
        }
        if let Some(mean) = self.backend.spec.faults.idle_death_mean {
            let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
            self.death_at = Some(Instant::now() + mean.mul_f64(-u.ln()));
        }
    }

    fn enqueue(&mut self, delay: Duration, text: String, ends: bool) {
        let due = Instant::now() + delay;
        let due = self.queue.back().map_or(due, |(last, _, _)| due.max(*last));
        self.queue.push_back((due, text, ends));
    }

    /// Count an event of this connection in the run's figures and trace it.
    fn tally(&self, bump: fn(&mut RunStats), what: String) {
        let (pool, id) = (self.link.pool, self.link.id);
        self.backend.world.with(|s, now| {
            bump(&mut s.stats);
            s.trace.record(now, format!("p{pool} c{id} {what}"));
        });
    }

    fn unfenced(&self, what: String) {
        let (pool, id) = (self.link.pool, self.link.id);
        self.backend
            .world
            .violation(Kind::Unfenced, format!("p{pool} c{id}: {what}"));
    }

    async fn run(mut self, mut ws: WebSocketStream<DuplexStream>) {
        let _gone = Gone(self.link.clone());
        self.schedule_idle_death();
        let crash = self.crash.clone();
        let link = self.link.clone();
        loop {
            let next_due = if self.stalled {
                None
            } else {
                self.queue.front().map(|(t, _, _)| *t)
            };
            let reading = !self.stalled && self.hold_until.is_none();
            tokio::select! {
                biased;
                () = crash.cancelled() => {
                    self.link.mark_faulted();
                    return;
                }
                () = link.wait_proxy_gone() => return,
                () = sleep_until_opt(self.death_at) => {
                    self.death_at = None;
                    if self.faults() {
                        self.link.mark_faulted();
                        let (pool, id, leased) = (self.link.pool, self.link.id, self.session.is_some());
                        if self.rng.random_bool(0.5) {
                            self.backend.world.note(|| format!("p{pool} c{id} reset by backend (leased={leased})"));
                            self.link.reset();
                        } else {
                            self.backend.world.note(|| format!("p{pool} c{id} closed by backend (leased={leased})"));
                        }
                        return;
                    }
                }
                () = sleep_until_opt(self.hold_until) => self.hold_until = None,
                () = sleep_until_opt(self.late.as_ref().map(|(t, _)| *t)) => {
                    if let Some((_, text)) = self.late.take()
                        && self.faults()
                    {
                        if self.session.is_none() {
                            // Nobody has started a session here since: the
                            // frame waits on the idle connection.
                            self.link.set_stale(true);
                        }
                        self.tally(
                            |st| st.late_frames += 1,
                            "late frame after the session ended".into(),
                        );
                        if ws.send(Message::text(text)).await.is_err() {
                            return;
                        }
                    }
                }
                () = sleep_until_opt(next_due) => {
                    if let Some((_, text, ends)) = self.queue.pop_front() {
                        let sent = if ends {
                            self.send_ended(&mut ws, text).await
                        } else {
                            ws.send(Message::text(text)).await
                        };
                        if sent.is_err() {
                            return;
                        }
                        if ends {
                            self.session = None;
                            self.schedule_idle_death();
                        }
                    }
                }
                msg = ws.next(), if reading => {
                    match msg {
                        Some(Ok(m)) => self.on_message(m),
                        Some(Err(_)) | None => return,
                    }
                }
            }
        }
    }

    /// Send a session's `session.ended`; with the late-frame faults, one more
    /// frame of the session follows in the same write, or later.
    async fn send_ended(
        &mut self,
        ws: &mut WebSocketStream<DuplexStream>,
        ended: String,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        // The backend's real end of the session, from the proxy's view too:
        // nothing can read it before it is written.
        self.link.set_in_session(false);
        let old = self.session.clone().unwrap_or_default();
        let late = serde_json::json!({"type": "echo", "session": old, "data": old}).to_string();
        let f = self.backend.spec.faults.clone();
        if self.faults() && self.chance(f.late_after_ended_p) {
            self.link.set_stale(true);
            self.tally(
                |st| st.late_frames += 1,
                format!("{old}: session.ended and a late frame in one write"),
            );
            // The write buffer is off: each frame is written as it is fed,
            // and the proxy cannot run in between.
            ws.feed(Message::text(ended)).await?;
            ws.feed(Message::text(late)).await?;
            return ws.flush().await;
        }
        ws.send(Message::text(ended)).await?;
        if self.faults() && self.chance(f.late_idle_p) {
            let d = self.millis(f.late_idle_ms);
            self.late = Some((Instant::now() + d, late));
        }
        Ok(())
    }

    fn on_message(&mut self, m: Message) {
        match m {
            Message::Text(t) => {
                let control = if t.starts_with('{') {
                    serde_json::from_str::<Value>(&t).ok()
                } else {
                    None
                };
                let kind = control
                    .as_ref()
                    .and_then(|v| text_field(v, "type"))
                    .unwrap_or("");
                let sid = control
                    .as_ref()
                    .and_then(|v| text_field(v, "session"))
                    .map(str::to_string);
                let fence = control
                    .as_ref()
                    .and_then(|v| text_field(v, "fence"))
                    .map(str::to_string);
                let resume = control
                    .as_ref()
                    .and_then(|v| v.get("resume"))
                    .map(|r| r.get("from_bytes").and_then(Value::as_u64).unwrap_or(0));
                match (kind, sid) {
                    ("session.start", Some(sid)) => self.on_start(sid, resume),
                    ("session.end", Some(sid)) => self.on_end(&sid, fence),
                    _ => self.on_data(t.as_bytes(), false),
                }
            }
            Message::Binary(b) => self.on_data(&b, true),
            Message::Ping(_) => {
                if !self.faults() {
                    return;
                }
                let f = self.backend.spec.faults.clone();
                if self.chance(f.stall_p) {
                    self.stalled = true;
                    self.link.mark_faulted();
                    let (pool, id) = (self.link.pool, self.link.id);
                    self.backend
                        .world
                        .note(|| format!("p{pool} c{id} stalls for good"));
                } else if self.chance(f.late_pong_p) {
                    // tungstenite sends the queued pong on the next read: hold reading.
                    let d = self.millis(f.pong_delay_ms);
                    self.hold_until = Some(Instant::now() + d);
                }
            }
            _ => {}
        }
    }

    fn resumable(&self) -> bool {
        self.backend.spec.mode == Mode::Stt && self.backend.spec.resume
    }

    fn on_start(&mut self, sid: String, resume: Option<u64>) {
        if let Some(prev) = &self.session {
            self.unfenced(format!(
                "session.start for {sid} while {prev} has not ended"
            ));
        }
        if let Some(from) = resume {
            let (pool, id) = (self.link.pool, self.link.id);
            if !self.resumable() {
                self.backend.world.violation(
                    Kind::BadTakeover,
                    format!("p{pool} c{id}: {sid} resumed (from byte {from}) on a backend that does not speak resume"),
                );
            }
            self.backend
                .world
                .note(|| format!("p{pool} c{id} takes {sid} over from byte {from}"));
        }
        let from = if self.backend.spec.resume_from_zero {
            0
        } else {
            resume.unwrap_or(0)
        };
        self.audio = from;
        self.utterance_start = from;
        self.death_at = None;
        if self.faults() && self.chance(self.backend.spec.faults.leased_death_p) {
            let d = self.millis((0, 8000));
            self.death_at = Some(Instant::now() + d);
        }
        self.seq = 0;
        // A lease of this connection has begun (and was checked): what was
        // written onto it before is that session's to read now.
        self.link.set_in_session(true);
        self.link.set_stale(false);
        let msg = serde_json::json!({"type": "session.started", "session": sid}).to_string();
        self.enqueue(Duration::ZERO, msg, false);
        self.session = Some(sid);
    }

    fn on_end(&mut self, sid: &str, fence: Option<String>) {
        let Some(cur) = self.session.clone() else {
            self.unfenced(format!("session.end for {sid} with no session"));
            return;
        };
        if cur != sid {
            self.unfenced(format!("session.end for {sid} while serving {cur}"));
        }
        let mut delay = self.millis(self.backend.spec.result_ms);
        let f = self.backend.spec.faults.clone();
        if self.faults() && self.chance(f.late_final_p) {
            delay += self.millis(f.late_final_ms);
            self.link.mark_faulted();
        }
        if self.resumable() {
            // The last final covers the open utterance, if it has audio.
            if let Some(fin) = self.final_result(&cur) {
                self.enqueue(delay, fin, false);
            }
        } else {
            let fin = serde_json::json!({"type": "final", "session": cur, "partials": self.seq})
                .to_string();
            self.enqueue(delay, fin, false);
        }
        if let Some(token) = &fence {
            self.backend.world.fence_token(token);
        }
        let ended = serde_json::json!({"type": "session.ended", "session": cur, "fence": fence})
            .to_string();
        self.enqueue(Duration::ZERO, ended, true);
    }

    /// Resumable stt mode: the final of the open utterance (up to the audio
    /// heard), which acknowledges it; `None` if it has no audio.
    fn final_result(&mut self, cur: &str) -> Option<String> {
        if self.audio <= self.utterance_start {
            return None;
        }
        let start = std::mem::replace(&mut self.utterance_start, self.audio);
        Some(
            serde_json::json!({
                "type": "final",
                "session": cur,
                "start_bytes": start,
                "end_bytes": self.audio,
                "ack_bytes": self.audio,
            })
            .to_string(),
        )
    }

    fn on_data(&mut self, data: &[u8], binary: bool) {
        let Some(cur) = self.session.clone() else {
            self.unfenced("data on a connection with no session".into());
            return;
        };
        if self.resumable() {
            // Only binary messages are audio; a partial for each, and a final
            // now and then.
            if !binary {
                return;
            }
            self.seq += 1;
            self.audio += data.len() as u64;
            let delay = self.millis(self.backend.spec.result_ms);
            let partial = serde_json::json!({
                "type": "partial",
                "session": cur,
                "seq": self.seq,
                "end_bytes": self.audio,
            })
            .to_string();
            self.enqueue(delay, partial, false);
            if self.chance(FINAL_P)
                && let Some(fin) = self.final_result(&cur)
            {
                self.enqueue(Duration::ZERO, fin, false);
            }
            return;
        }
        self.seq += 1;
        let delay = self.millis(self.backend.spec.result_ms);
        let reflected = if self.backend.spec.reflect_json && data.first() == Some(&b'{') {
            serde_json::from_slice::<Value>(data)
                .ok()
                .filter(Value::is_object)
        } else {
            None
        };
        if let Some(v) = &reflected
            && text_field(v, "type").is_some_and(|t| t.starts_with("session."))
        {
            self.tally(
                |st| st.reserved_at_backend += 1,
                format!("{cur}: client text of the session.* namespace reached the backend"),
            );
        }
        let msg = match (self.backend.spec.mode, reflected) {
            (Mode::Echo, Some(v)) => v.to_string(),
            (Mode::Echo, None) => {
                let tag = String::from_utf8_lossy(&data[..data.len().min(24)]);
                let tag = tag.split('|').next().unwrap_or("");
                serde_json::json!({"type": "echo", "session": cur, "data": tag}).to_string()
            }
            (Mode::Stt, _) => {
                serde_json::json!({"type": "partial", "session": cur, "seq": self.seq}).to_string()
            }
        };
        self.enqueue(delay, msg, false);
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
