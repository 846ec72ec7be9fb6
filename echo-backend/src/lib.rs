//! `echo-backend`: an emulator of a real-time speech-to-text inference server.
//!
//! It speaks the fenced-session protocol of docs/protocol.md on WebSocket connections that are
//! reused for many sessions one after another, and it can inject the faults the proxy must
//! survive (dropped connections, refused dials, late pongs, stalls, a crash of every open
//! connection). It is the one backend of the workspace's tests and measurements: the proxy's
//! integration tests, loadgen's tests and `cargo repro` all start it.
//!
//! * [`Mode::Echo`]: every data message (text or binary) is sent back unchanged at once,
//!   whether or not a session was started, so plain proxies can be measured with it too.
//! * [`Mode::Stt`]: binary messages are audio; results (`partial`, `final`, `error`) come
//!   back after simulated inference, which can behave like a GPU server (see [`Stt`]): a
//!   shared number of inference slots with a FIFO queue (each result says how long it
//!   waited, `queue_ms`), partials every N ms of audio, finals at simulated pauses and on
//!   `session.end`, random inference errors, a session time limit. `session.end` yields
//!   `session.ended` after every earlier result. Outputs on one connection never overtake
//!   each other.
//!
//! In both modes `session.ended` echoes the `fence` token of the `session.end` it answers
//! (and has none if that had none): the proxy completes its fence only on that token, and
//! the backend never sends `session.ended` on its own.
//!
//! Admission ([`Admission`]): a saturated backend answers the WebSocket handshake with
//! HTTP 503 (too many connections) or 429 (inference queue too long), and every handshake
//! can be delayed (a slow dial).
//!
//! ```no_run
//! # async fn demo() -> Result<(), echo_backend::Error> {
//! let backend = echo_backend::spawn("127.0.0.1:0".parse().unwrap(), Default::default()).await?;
//! println!("{}", backend.url());
//! backend.shutdown().await;
//! # Ok(()) }
//! ```

mod conn;
mod inference;
mod protocol;
mod stt;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::RngCore;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// What the backend does with data messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Echo every data message (text or binary) unchanged, at once.
    #[default]
    Echo,
    /// Binary messages are audio and yield delayed results (`partial`, `final`, `error`, see
    /// [`Stt`]); a `final` on `session.end`. Text data messages are ignored.
    Stt,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Echo => "echo",
            Mode::Stt => "stt",
        })
    }
}

/// Fault injection. The defaults inject nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Close the TCP connection abruptly (no close frame) once this many data messages were
    /// received on it. The last one is still answered in echo mode.
    pub drop_after: Option<u64>,
    /// Refuse every connection: accept the TCP stream and drop it before the handshake.
    /// Switchable at run time with [`EchoBackend::set_refuse`].
    pub refuse: bool,
    /// Answer a ping only after this delay. The connection neither reads nor writes in the
    /// meantime (tungstenite sends its automatic pong on the next read or write), like a
    /// backend too busy to answer. Switchable with [`EchoBackend::set_pong_delay`].
    pub pong_delay: Duration,
    /// Once this many data messages were received on a connection, stop reading and writing
    /// on it but keep it open (a hung backend).
    pub stall_after: Option<u64>,
    /// Test fault, echo mode: do not answer every n-th data message of each connection
    /// (counted in [`Stats::dropped_messages`]), so a checker must report them lost.
    pub drop_every: Option<u64>,
    /// Test fault, echo mode: answer each data message with the previous data message the
    /// backend received, from whichever connection it came (the first gets no answer): a
    /// deliberate cross-delivery between sessions for a checker to catch.
    pub swap: bool,
}

/// The stt mode's simulated inference (ignored in echo mode).
///
/// The defaults answer one `partial` per binary message, without pauses, errors, time limit
/// or capacity limit, after [`Config::delay`] plus jitter. The GPU-like behaviour is switched
/// on field by field; `echo-backend --help` documents the same settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Stt {
    /// Inference slots shared by every connection of the backend process: each result (or
    /// error) occupies one slot for its inference delay; a result that finds every slot busy
    /// waits in a FIFO queue, and reports the wait as `queue_ms`. `None`: unlimited (no
    /// queue); at most [`MAX_SLOTS`]. Work of a connection that goes away is not cancelled
    /// (it already holds its slot), as on a server that finishes a batch it started.
    pub slots: Option<usize>,
    /// Audio bytes per millisecond: offsets (`audio_start_ms`, `audio_end_ms`) are bytes
    /// received divided by this. 32 = 16 kHz, 16-bit, mono PCM.
    pub bytes_per_ms: u64,
    /// A `partial` each time the session's audio crosses a multiple of this (a big message
    /// crossing several yields one). `None`: one `partial` per binary message.
    pub partial_every: Option<Duration>,
    /// Simulated pauses: utterance lengths are drawn uniformly from `min..=max` (by the
    /// connection's seeded RNG); when the audio crosses the end of an utterance a `final` for
    /// it is sent. `None`: a `final` only on `session.end`.
    pub utterance: Option<(Duration, Duration)>,
    /// Probability in `0.0..=1.0` that an inference fails: the result it would have given is
    /// replaced by an `error` event (`code: "inference_failed"`); the session continues.
    pub error_probability: f64,
    /// Time after `session.start` when the backend stops transcribing the session: it
    /// finalizes the current utterance and sends an `error` event with
    /// `code: "session_time_limit"`; later audio of the session is ignored until
    /// `session.end`, which is answered with `session.ended` as always. `None`: no limit.
    pub session_time_limit: Option<Duration>,
}

/// Most inference slots accepted (each is a few bytes of bookkeeping).
pub const MAX_SLOTS: usize = 1_000_000;

/// Default audio bytes per millisecond (16 kHz, 16-bit, mono PCM).
pub const DEFAULT_BYTES_PER_MS: u64 = 32;

impl Default for Stt {
    fn default() -> Self {
        Self {
            slots: None,
            bytes_per_ms: DEFAULT_BYTES_PER_MS,
            partial_every: None,
            utterance: None,
            error_probability: 0.0,
            session_time_limit: None,
        }
    }
}

/// How the WebSocket handshake is answered. The defaults admit every connection at once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Admission {
    /// Answer the handshake with HTTP 503 while this many WebSocket connections are open
    /// (counted in [`Stats::rejected_503`]).
    pub max_connections: Option<u64>,
    /// stt mode: answer the handshake with HTTP 429 while a new result would wait longer
    /// than this for an inference slot (counted in [`Stats::rejected_429`]). Needs
    /// [`Stt::slots`].
    pub max_queue: Option<Duration>,
    /// Wait this long after accepting the TCP connection before reading the handshake (a
    /// slow dial).
    pub dial_delay: Duration,
}

/// Backend configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Echo or speech-to-text emulation.
    pub mode: Mode,
    /// Simulated inference delay per result (stt mode only).
    pub delay: Duration,
    /// Uniform random extra delay in `0..=jitter` per result (stt mode only).
    pub jitter: Duration,
    /// The stt mode's inference model.
    pub stt: Stt,
    /// Handshake limits and delay.
    pub admission: Admission,
    /// Faults to inject.
    pub faults: Faults,
    /// Largest incoming message and frame accepted, in bytes.
    pub max_message_size: usize,
    /// Seed of the random draws (jitter, utterance lengths, errors); each connection gets its
    /// own stream derived from it. `None`: a fresh seed from the OS.
    pub seed: Option<u64>,
}

/// Default simulated inference delay.
pub const DEFAULT_DELAY: Duration = Duration::from_millis(30);
/// Default jitter on top of the inference delay.
pub const DEFAULT_JITTER: Duration = Duration::from_millis(10);
/// Default largest message: 1 MiB plus headroom for framing of a 1 MiB payload by a peer.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = (1 << 20) + (64 << 10);

impl Default for Config {
    fn default() -> Self {
        Self {
            mode: Mode::Echo,
            delay: DEFAULT_DELAY,
            jitter: DEFAULT_JITTER,
            stt: Stt::default(),
            admission: Admission::default(),
            faults: Faults::default(),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            seed: None,
        }
    }
}

/// Errors of [`spawn`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listening socket could not be created, bound or put into listening state.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A setting is out of range.
    #[error("invalid configuration: {0}")]
    Config(&'static str),
}

impl Config {
    /// Checks the ranges [`spawn`] relies on.
    pub fn validate(&self) -> Result<(), Error> {
        if self.max_message_size == 0 {
            return Err(Error::Config("max_message_size must be positive"));
        }
        let stt = &self.stt;
        if stt.slots.is_some_and(|n| n == 0 || n > MAX_SLOTS) {
            return Err(Error::Config(
                "stt.slots must be in 1..=1000000 (None: unlimited)",
            ));
        }
        if stt.bytes_per_ms == 0 {
            return Err(Error::Config("stt.bytes_per_ms must be positive"));
        }
        if !(0.0..=1.0).contains(&stt.error_probability) {
            return Err(Error::Config("stt.error_probability must be in 0.0..=1.0"));
        }
        if stt.partial_every.is_some_and(|d| d.as_millis() == 0) {
            return Err(Error::Config("stt.partial_every must be at least 1 ms"));
        }
        if let Some((min, max)) = stt.utterance
            && (min.as_millis() == 0 || min > max)
        {
            return Err(Error::Config(
                "stt.utterance must be (min, max) with 1 ms <= min <= max",
            ));
        }
        if self.faults.drop_every == Some(0) {
            return Err(Error::Config("faults.drop_every must be positive"));
        }
        Ok(())
    }
}

/// A snapshot of the backend's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Stats {
    /// TCP connections accepted (dials), including refused and dropped ones.
    pub dials: u64,
    /// `session.start` messages handled.
    pub sessions_started: u64,
    /// Of those, sessions taken over from another backend (`resume`).
    pub sessions_resumed: u64,
    /// `session.ended` replies sent.
    pub sessions_ended: u64,
    /// Data messages received (control messages excluded).
    pub messages_in: u64,
    /// Data messages sent: echoes, partials and finals.
    pub messages_out: u64,
    /// Pings received and answered (possibly late, see [`Faults::pong_delay`]).
    pub pings_answered: u64,
    /// Data messages deliberately left unanswered ([`Faults::drop_every`]).
    pub dropped_messages: u64,
    /// Handshakes answered with 503 ([`Admission::max_connections`]).
    pub rejected_503: u64,
    /// Handshakes answered with 429 ([`Admission::max_queue`]).
    pub rejected_429: u64,
    /// `error` events sent for failed inferences ([`Stt::error_probability`]).
    pub inference_errors: u64,
    /// Sessions stopped by [`Stt::session_time_limit`].
    pub time_limits: u64,
    /// Connections open now (handshake in progress or done).
    pub open_connections: u64,
    /// Tasks spawned by the backend that are still alive (the accept loop and one per
    /// connection). Zero after [`EchoBackend::shutdown`].
    pub tasks_alive: u64,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dials={} sessions_started={} sessions_resumed={} sessions_ended={} messages_in={} \
             messages_out={} pings_answered={} dropped_messages={} rejected_503={} \
             rejected_429={} inference_errors={} time_limits={}",
            self.dials,
            self.sessions_started,
            self.sessions_resumed,
            self.sessions_ended,
            self.messages_in,
            self.messages_out,
            self.pings_answered,
            self.dropped_messages,
            self.rejected_503,
            self.rejected_429,
            self.inference_errors,
            self.time_limits
        )
    }
}

#[derive(Debug, Default)]
struct Counters {
    dials: AtomicU64,
    sessions_started: AtomicU64,
    sessions_resumed: AtomicU64,
    sessions_ended: AtomicU64,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    pings_answered: AtomicU64,
    dropped_messages: AtomicU64,
    rejected_503: AtomicU64,
    rejected_429: AtomicU64,
    inference_errors: AtomicU64,
    time_limits: AtomicU64,
    open_connections: AtomicU64,
    tasks_alive: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            dials: get(&self.dials),
            sessions_started: get(&self.sessions_started),
            sessions_resumed: get(&self.sessions_resumed),
            sessions_ended: get(&self.sessions_ended),
            messages_in: get(&self.messages_in),
            messages_out: get(&self.messages_out),
            pings_answered: get(&self.pings_answered),
            dropped_messages: get(&self.dropped_messages),
            rejected_503: get(&self.rejected_503),
            rejected_429: get(&self.rejected_429),
            inference_errors: get(&self.inference_errors),
            time_limits: get(&self.time_limits),
            open_connections: get(&self.open_connections),
            tasks_alive: get(&self.tasks_alive),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Counted as a live task (and, for a connection, as an open connection) from its creation,
/// before the task is spawned, until it is dropped with the task's future, even if the task
/// never ran.
#[derive(Debug)]
struct TaskGuard {
    shared: Arc<Shared>,
    connection: bool,
}

impl TaskGuard {
    fn new(shared: &Arc<Shared>, connection: bool) -> Self {
        shared.counters.tasks_alive.fetch_add(1, Ordering::Relaxed);
        if connection {
            shared
                .counters
                .open_connections
                .fetch_add(1, Ordering::Relaxed);
        }
        Self {
            shared: Arc::clone(shared),
            connection,
        }
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        let counters = &self.shared.counters;
        if self.connection {
            counters.open_connections.fetch_sub(1, Ordering::Relaxed);
        }
        counters.tasks_alive.fetch_sub(1, Ordering::Relaxed);
    }
}

/// State shared by the handle, the accept loop and the connections.
#[derive(Debug)]
struct Shared {
    config: Config,
    refuse: AtomicBool,
    pong_delay_us: AtomicU64,
    /// Cancelled by [`EchoBackend::kill_all`], then replaced by a fresh token.
    kill: Mutex<CancellationToken>,
    counters: Counters,
    seed: u64,
    /// The stt mode's shared inference slots.
    slots: inference::Slots,
    /// WebSocket connections admitted and still open ([`Admission::max_connections`]).
    admitted: AtomicU64,
    /// [`Faults::swap`]: the last data message received, from any connection.
    swap_slot: Mutex<Option<tokio_tungstenite::tungstenite::Message>>,
    /// [`EchoBackend::stall_all_for`]: no connection reads or writes before `stall_base`
    /// plus this many µs (0: no stall). An atomic, not a lock: every message reads it.
    stalled_until_us: AtomicU64,
    stall_base: tokio::time::Instant,
}

impl Shared {
    fn pong_delay(&self) -> Duration {
        Duration::from_micros(self.pong_delay_us.load(Ordering::Relaxed))
    }

    fn kill_token(&self) -> CancellationToken {
        self.kill
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How long a connection must still stall ([`EchoBackend::stall_all_for`]).
    fn stall_left(&self) -> Duration {
        let until_us = self.stalled_until_us.load(Ordering::Relaxed);
        if until_us == 0 {
            return Duration::ZERO;
        }
        (self.stall_base + Duration::from_micros(until_us))
            .saturating_duration_since(tokio::time::Instant::now())
    }

    /// [`Faults::swap`]: stores `msg`, returns the message stored before.
    fn swap(
        &self,
        msg: tokio_tungstenite::tungstenite::Message,
    ) -> Option<tokio_tungstenite::tungstenite::Message> {
        self.swap_slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(msg)
    }
}

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A running backend. Dropping it stops it too, but without waiting: prefer
/// [`shutdown`](Self::shutdown).
#[derive(Debug)]
pub struct EchoBackend {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    accept_task: Mutex<Option<JoinHandle<()>>>,
}

/// Listen backlog: pools dial hundreds of connections at once.
const BACKLOG: u32 = 4096;

/// Binds `listen` (port 0 allowed) and serves in background tasks on the current tokio
/// runtime until [`EchoBackend::shutdown`] or the handle is dropped.
pub async fn spawn(listen: SocketAddr, config: Config) -> Result<EchoBackend, Error> {
    config.validate()?;
    let listener = bind(listen).map_err(|source| Error::Listen {
        addr: listen,
        source,
    })?;
    let local_addr = listener.local_addr().map_err(|source| Error::Listen {
        addr: listen,
        source,
    })?;
    let cancel = CancellationToken::new();
    let shared = Arc::new(Shared {
        refuse: AtomicBool::new(config.faults.refuse),
        pong_delay_us: AtomicU64::new(duration_us(config.faults.pong_delay)),
        kill: Mutex::new(CancellationToken::new()),
        counters: Counters::default(),
        seed: config
            .seed
            .unwrap_or_else(|| SmallRng::from_os_rng().next_u64()),
        slots: inference::Slots::new(config.stt.slots),
        admitted: AtomicU64::new(0),
        swap_slot: Mutex::new(None),
        stalled_until_us: AtomicU64::new(0),
        stall_base: tokio::time::Instant::now(),
        config,
    });
    let guard = TaskGuard::new(&shared, false);
    let accept_task = tokio::spawn(accept_loop(listener, guard, cancel.clone()));
    Ok(EchoBackend {
        local_addr,
        shared,
        cancel,
        accept_task: Mutex::new(Some(accept_task)),
    })
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

impl EchoBackend {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `ws://ADDR` for the bound address.
    pub fn url(&self) -> String {
        format!("ws://{}", self.local_addr)
    }

    /// The configuration it was started with (run-time toggles not included).
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }

    /// Refuse (or accept again) new connections: a refused one is accepted and dropped
    /// before the WebSocket handshake. Open connections are not affected.
    pub fn set_refuse(&self, refuse: bool) {
        self.shared.refuse.store(refuse, Ordering::Relaxed);
    }

    /// Delay answering pings on every connection from the next ping on; zero answers at once.
    pub fn set_pong_delay(&self, delay: Duration) {
        self.shared
            .pong_delay_us
            .store(duration_us(delay), Ordering::Relaxed);
    }

    /// Test fault: every connection stops reading and writing (pongs included) for `d` from
    /// now, as if the whole server froze; each notices at its next incoming message and
    /// resumes at the same instant. Outputs already due wait too.
    pub fn stall_all_for(&self, d: Duration) {
        let shared = &self.shared;
        let until = (tokio::time::Instant::now() + d).duration_since(shared.stall_base);
        // At least 1 µs: 0 means no stall.
        shared
            .stalled_until_us
            .store(duration_us(until).max(1), Ordering::Relaxed);
    }

    /// Drop every open connection abruptly, without a close frame, as if the server had
    /// crashed. The listener stays up and later connections are served normally.
    pub fn kill_all(&self) {
        let old = {
            let mut kill = self
                .shared
                .kill
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            std::mem::replace(&mut *kill, CancellationToken::new())
        };
        old.cancel();
    }

    /// Stops accepting, closes every connection (close code 1001, bounded by a short
    /// timeout) and waits until every task the backend spawned has ended.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        let task = self
            .accept_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task
            && let Err(e) = task.await
        {
            warn!("echo-backend accept task failed: {e}");
        }
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

async fn accept_loop(listener: TcpListener, guard: TaskGuard, cancel: CancellationToken) {
    let shared = guard.shared();

    let mut connections = JoinSet::new();
    let mut next_id: u64 = 0;
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done && e.is_panic() {
                    warn!("echo-backend connection task panicked: {e}");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    bump(&shared.counters.dials);
                    if shared.refuse.load(Ordering::Relaxed) {
                        debug!(%peer, "refusing connection");
                        drop(stream);
                        continue;
                    }
                    next_id = next_id.wrapping_add(1);
                    let kill = shared.kill_token();
                    let seed = shared.seed ^ next_id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                    connections.spawn(conn::serve(
                        stream,
                        peer,
                        TaskGuard::new(shared, true),
                        cancel.clone(),
                        kill,
                        seed,
                    ));
                }
                Err(e) => {
                    warn!("echo-backend accept failed: {e}");
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => {}
                    }
                }
            },
        }
    }
    drop(listener);
    // Every connection watches `cancel` and ends within its close timeout.
    while let Some(done) = connections.join_next().await {
        if let Err(e) = done
            && e.is_panic()
        {
            warn!("echo-backend connection task panicked: {e}");
        }
    }
}
