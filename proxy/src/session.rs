//! One client session's life: admission to a backend connection (routing,
//! with dial on demand boxed out of the session's future), the fence's
//! `session.start`, the relay ([`crate::relay`]), and the session's metrics.
//! The per-message path lives in the relay; see docs/relay.md.

use std::ops::DerefMut;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Map, Value};
use sttproxy_pool::{Connection, Lease};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::{BackendConn, Reuse, fence};
use crate::backends::Backends;
use crate::metrics::{Metrics, OutcomeLabel, ReasonLabel};
use crate::relay::rate::RateLimits;
use crate::relay::{
    self, CLOSE_TIMEOUT, Failover, FailoverSettings, FrameStream, RelayLease, RelaySettings,
    Takeover, TakeoverFuture,
};
use crate::route;

/// Session timeouts.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub acquire_timeout: Duration,
    pub drain_timeout: Duration,
    pub idle_timeout: Duration,
    pub send_timeout: Duration,
    pub max_message_size: usize,
    pub client_ping_interval: Duration,
    pub client_pong_timeout: Duration,
    /// Backend liveness during a session: the pool's `health_interval` and
    /// `health_timeout` (a silent backend is pinged, then given up on).
    pub backend_ping_interval: Duration,
    pub backend_pong_timeout: Duration,
    pub rate: RateLimits,
    /// Sessions on resumable backends move to another when theirs fails
    /// (docs/failover.md); `None`: off.
    pub failover: Option<FailoverSettings>,
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            acquire_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(10),
            max_message_size: 1 << 20,
            client_ping_interval: Duration::from_secs(20),
            client_pong_timeout: Duration::from_secs(10),
            backend_ping_interval: Duration::from_secs(10),
            backend_pong_timeout: Duration::from_secs(2),
            rate: RateLimits::OFF,
            failover: None,
        }
    }
}

/// What every session shares.
#[derive(Debug, Clone)]
pub struct SessionContext {
    pub backends: Backends,
    pub metrics: Arc<Metrics>,
    pub settings: Arc<SessionSettings>,
    /// Fires when the shutdown grace is over: open sessions close with 1001.
    pub shutdown: CancellationToken,
}

/// Close code 1014 (Bad Gateway, IANA registry): the backend failed.
const BAD_GATEWAY: u16 = 1014;
/// Close code 1013 (Try Again Later): no backend connection.
const TRY_AGAIN_LATER: u16 = 1013;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// A session id unique within this process and unlikely to repeat across replicas.
pub fn new_session_id(rng: &mut impl rand::Rng) -> String {
    let n = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    format!("{:08x}{:08x}", rng.random::<u32>(), n as u32)
}

/// What the session needs of the backend connection it holds for its whole
/// life: the pool's [`Lease`] in the proxy. (The simulation wraps the lease, and
/// the handle of the naive pool it compares against, to watch every hand-back.)
pub trait SessionLease<B>: DerefMut<Target = BackendConn<B>> + Send {
    /// The session ended cleanly (its fence completed): back to the pool.
    fn release(self);
    /// The connection is not fit for another session: close it.
    fn discard(self);
}

impl<B> SessionLease<B> for Lease<BackendConn<B>>
where
    BackendConn<B>: Connection,
{
    fn release(self) {
        Lease::release(self);
    }

    fn discard(self) {
        Lease::discard(self);
    }
}

/// The relay takes any session lease.
struct ForRelay<L>(L);

impl<L: std::ops::Deref> std::ops::Deref for ForRelay<L> {
    type Target = L::Target;
    fn deref(&self) -> &L::Target {
        &self.0
    }
}

impl<L: DerefMut> DerefMut for ForRelay<L> {
    fn deref_mut(&mut self) -> &mut L::Target {
        &mut self.0
    }
}

/// The relay's takeovers, for the session's lease type.
struct ForRelayTakeover<L>(Box<dyn Takeover<L>>);

impl<L: Send + 'static> Takeover<ForRelay<L>> for ForRelayTakeover<L> {
    fn next_lease(&mut self) -> TakeoverFuture<ForRelay<L>> {
        let lease = self.0.next_lease();
        Box::pin(async move { lease.await.map(ForRelay) })
    }
}

/// Takeovers by the proxy's routing: another resumable backend, not one the
/// session has used.
struct RouteTakeover {
    backends: Backends,
    /// The session's backend group: a takeover stays in it.
    group: String,
    acquire_timeout: Duration,
    /// The backends the session has had, the current one last.
    used: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Takeover<Lease<BackendConn>> for RouteTakeover {
    fn next_lease(&mut self) -> TakeoverFuture<Lease<BackendConn>> {
        let backends = self.backends.clone();
        let group = self.group.clone();
        let used = self.used.clone();
        let timeout = self.acquire_timeout;
        let lock = |used: &std::sync::Mutex<Vec<String>>| -> Vec<String> {
            match used.lock() {
                Ok(g) => g.clone(),
                Err(p) => p.into_inner().clone(),
            }
        };
        Box::pin(async move {
            let exclude = lock(&used);
            let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::from_os_rng();
            match route::lease_takeover(&backends, &group, &exclude, timeout, &mut rng).await {
                Ok((backend, mut lease, _)) => {
                    lease.settle_here();
                    match used.lock() {
                        Ok(mut g) => g.push(backend.id.clone()),
                        Err(p) => p.into_inner().push(backend.id.clone()),
                    }
                    Some(lease)
                }
                Err(e) => {
                    tracing::info!(error = %e, "no backend to take a session over");
                    None
                }
            }
        })
    }
}

impl<B, L: SessionLease<B>> RelayLease<B> for ForRelay<L> {
    fn release(self) {
        self.0.release();
    }
    fn discard(self) {
        self.0.discard();
    }
}

/// Run one client session to its end. Never returns an error: every way a
/// session can end is answered to the client with a close code.
pub async fn run<S>(
    mut client: FrameStream<S>,
    params: Map<String, Value>,
    target: Box<route::Target>,
    ctx: SessionContext,
    id: String,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    ctx.metrics.sessions_active.inc();
    let started = Instant::now();
    let outcome = run_inner(&mut client, params, &target, &ctx, &id).await;
    ctx.metrics.sessions_active.dec();
    ctx.metrics
        .session_seconds
        .observe(started.elapsed().as_secs_f64());
    ctx.metrics
        .sessions
        .get_or_create(&OutcomeLabel { outcome })
        .inc();
    tracing::debug!(session = %id, outcome, "session ended");
}

async fn run_inner<S>(
    client: &mut FrameStream<S>,
    params: Map<String, Value>,
    target: &route::Target,
    ctx: &SessionContext,
    id: &str,
) -> &'static str
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let m = &ctx.metrics;
    let settings = &ctx.settings;
    let wait_started = Instant::now();
    // Boxed: routing may dial on demand, and that state must not size every
    // session's future for its whole life.
    let leased = Box::pin(async {
        let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::from_os_rng();
        route::lease(&ctx.backends, target, settings.acquire_timeout, &mut rng, m).await
    })
    .await;
    m.acquire_wait_seconds
        .observe(wait_started.elapsed().as_secs_f64());
    let (backend, mut lease, how) = match leased {
        Ok(l) => l,
        Err(e) => {
            m.acquire
                .get_or_create(&OutcomeLabel { outcome: e.label() })
                .inc();
            tracing::info!(session = %id, error = %e, "no backend connection for the session");
            close_client(client, TRY_AGAIN_LATER, &e.to_string()).await;
            return "no_backend_connection";
        }
    };
    m.acquire
        .get_or_create(&OutcomeLabel {
            outcome: how.as_str(),
        })
        .inc();
    tracing::debug!(session = %id, backend = %backend.id, acquired = how.as_str(), "leased a backend connection");
    lease.settle_here();
    // Boxed, only for sessions that may fail over, and built in the call:
    // whatever a session keeps across its awaits sizes every session's future.
    run_leased(
        client,
        lease,
        backend.reuse,
        &params,
        ctx,
        id,
        (backend.reuse == Reuse::Resumable && settings.failover.is_some()).then(|| {
            Box::new(RouteTakeover {
                backends: ctx.backends.clone(),
                group: target.group.clone(),
                acquire_timeout: settings.acquire_timeout,
                used: Arc::new(std::sync::Mutex::new(vec![backend.id.clone()])),
            }) as Box<dyn Takeover<Lease<BackendConn>>>
        }),
    )
    .await
}

/// The part of a session after routing: fence the leased backend connection
/// (`session.start`), relay both ways until both ends are settled, and count
/// what happened. Generic over the client's and the backend's byte streams,
/// so the fault simulation runs this very code in memory. With `takeover`
/// (a resumable backend, failover on), a backend that fails mid-session is
/// replaced by one `takeover` leases. Returns the session's outcome label.
pub async fn run_leased<S, B, L>(
    client: &mut FrameStream<S>,
    mut lease: L,
    reuse: Reuse,
    params: &Map<String, Value>,
    ctx: &SessionContext,
    id: &str,
    takeover: Option<Box<dyn Takeover<L>>>,
) -> &'static str
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    B: AsyncRead + AsyncWrite + Unpin + Send,
    L: SessionLease<B> + 'static,
{
    let m = &ctx.metrics;
    let settings = &ctx.settings;
    let fenced = reuse.fenced();

    if fenced {
        let start = fence::start_message(id, params);
        let sent =
            tokio::time::timeout(settings.send_timeout, lease.stream.send_text(&start)).await;
        if !matches!(sent, Ok(Ok(()))) {
            tracing::info!(session = %id, "backend failed at session.start");
            lease.mark_broken();
            lease.discard();
            fence_done(m, "error");
            close_client(client, BAD_GATEWAY, "backend connection lost").await;
            return "backend_failed";
        }
    }

    let relay_settings = RelaySettings {
        drain_timeout: settings.drain_timeout,
        idle_timeout: settings.idle_timeout,
        send_timeout: settings.send_timeout,
        close_timeout: CLOSE_TIMEOUT,
        max_message_size: settings.max_message_size,
        ping_interval: settings.client_ping_interval,
        pong_timeout: settings.client_pong_timeout,
        rate: settings.rate,
        backend_ping_interval: settings.backend_ping_interval,
        backend_pong_timeout: settings.backend_pong_timeout,
    };
    let end = relay::relay(
        client,
        ForRelay(lease),
        fenced,
        id,
        &relay_settings,
        &ctx.shutdown,
        m,
        takeover
            .zip(settings.failover.as_ref())
            .map(|(takeover, settings)| {
                Failover::new(Box::new(ForRelayTakeover(takeover)), params, settings)
            }),
    )
    .await;
    for (outcome, n) in relay::failover_outcomes().into_iter().zip(end.failovers) {
        if n > 0 {
            m.failovers
                .get_or_create(&OutcomeLabel { outcome })
                .inc_by(n);
        }
    }
    for (reason, n) in end.dropped {
        if n > 0 {
            m.relay_dropped
                .get_or_create(&ReasonLabel { reason })
                .inc_by(n);
        }
    }
    fence_done(m, end.fence);
    m.client_closes
        .get_or_create(&OutcomeLabel {
            outcome: end.client_close,
        })
        .inc();
    end.outcome
}

fn fence_done(m: &Metrics, outcome: &'static str) {
    m.fencing.get_or_create(&OutcomeLabel { outcome }).inc();
}

/// Close a client that never got to the relay, bounded in time.
async fn close_client<S>(client: &mut FrameStream<S>, code: u16, reason: &str)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let _ = tokio::time::timeout(CLOSE_TIMEOUT * 2, client.close(code, reason)).await;
}
