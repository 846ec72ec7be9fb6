//! `echo-backend`: an emulator of a real-time speech-to-text inference server.
//!
//! It speaks the fenced-session protocol of docs/protocol.md on WebSocket connections that are
//! reused for many sessions one after another, and it can inject the faults the proxy must
//! survive (dropped connections, refused dials, late pongs, stalls, a crash of every open
//! connection).
//!
//! * [`Mode::Echo`]: every data message (text or binary) is sent back unchanged at once,
//!   whether or not a session was started, so plain proxies can be measured with it too.
//! * [`Mode::Stt`]: every binary message (an audio chunk) yields a `partial` result after a
//!   simulated inference delay; `session.end` yields a `final` and then `session.ended`, after
//!   every earlier result. Outputs on one connection never overtake each other.
//!
//! In both modes `session.ended` echoes the `fence` token of the `session.end` it answers
//! (and has none if that had none): the proxy completes its fence only on that token.
//!
//! ```no_run
//! # async fn demo() -> Result<(), echo_backend::Error> {
//! let backend = echo_backend::spawn("127.0.0.1:0".parse().unwrap(), Default::default()).await?;
//! println!("{}", backend.url());
//! backend.shutdown().await;
//! # Ok(()) }
//! ```

mod conn;
mod protocol;

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
    /// Per binary message a delayed `partial` result; a `final` on `session.end`. Text data
    /// messages are ignored.
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
}

/// Backend configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Echo or speech-to-text emulation.
    pub mode: Mode,
    /// Simulated inference delay per audio chunk (stt mode only).
    pub delay: Duration,
    /// Uniform random extra delay in `0..=jitter` per audio chunk (stt mode only).
    pub jitter: Duration,
    /// Faults to inject.
    pub faults: Faults,
    /// Largest incoming message and frame accepted, in bytes.
    pub max_message_size: usize,
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
            faults: Faults::default(),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
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
}

/// A snapshot of the backend's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Stats {
    /// TCP connections accepted (dials), including refused and dropped ones.
    pub dials: u64,
    /// `session.start` messages handled.
    pub sessions_started: u64,
    /// `session.ended` replies sent.
    pub sessions_ended: u64,
    /// Data messages received (control messages excluded).
    pub messages_in: u64,
    /// Data messages sent: echoes, partials and finals.
    pub messages_out: u64,
    /// Pings received and answered (possibly late, see [`Faults::pong_delay`]).
    pub pings_answered: u64,
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
            "dials={} sessions_started={} sessions_ended={} messages_in={} messages_out={} \
             pings_answered={}",
            self.dials,
            self.sessions_started,
            self.sessions_ended,
            self.messages_in,
            self.messages_out,
            self.pings_answered
        )
    }
}

#[derive(Debug, Default)]
struct Counters {
    dials: AtomicU64,
    sessions_started: AtomicU64,
    sessions_ended: AtomicU64,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    pings_answered: AtomicU64,
    open_connections: AtomicU64,
    tasks_alive: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            dials: get(&self.dials),
            sessions_started: get(&self.sessions_started),
            sessions_ended: get(&self.sessions_ended),
            messages_in: get(&self.messages_in),
            messages_out: get(&self.messages_out),
            pings_answered: get(&self.pings_answered),
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
        seed: SmallRng::from_os_rng().next_u64(),
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
