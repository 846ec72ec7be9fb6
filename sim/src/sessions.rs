//! The proxy side of a simulated session: route to a pool (idle connection
//! first, then a dial on demand, then a bounded wait for a release, as
//! `route::lease` does), then hand the client and the lease to the production
//! session code, `sttproxy::session::run_leased`.
//!
//! A session on a resumable backend (with failover on) also gets a
//! [`SimTakeover`]: when its backend fails, the relay leases from the other
//! resumable pools the session has not used yet, as the proxy's
//! `RouteTakeover` does through `route::lease_takeover`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::select_all;
use serde_json::{Map, Value};
use sttproxy::backend::Reuse;
use sttproxy::relay::{FrameStream, Peer, Takeover, TakeoverFuture};
use sttproxy::session::{SessionContext, run_leased};
use tokio::io::DuplexStream;
use tokio::time::Instant;

use crate::client::{ClientPlan, run_client};
use crate::invariants::ProxyEnd;
use crate::pools::{PoolUnderTest, SimLease};
use crate::runtime::SimRng;
use crate::tasks::Tasks;
use crate::transport::LinkState;
use crate::world::World;

/// The longest relay tick (`RelaySettings::tick` is clamped to 1 s): the
/// relay checks the failover deadline on its ticks.
const MAX_RELAY_TICK: Duration = Duration::from_secs(1);

/// What every session of a run shares.
#[derive(Debug)]
pub struct SessionEnv<P: PoolUnderTest> {
    pub pools: Vec<P>,
    pub ctx: SessionContext,
    pub world: Arc<World>,
    pub tasks: Tasks,
    pub rng: SimRng,
    pub acquire_timeout: Duration,
    /// Which pools' backends speak `resume` (`Reuse::Resumable`).
    pub resumable: Vec<bool>,
}

impl<P: PoolUnderTest> SessionEnv<P> {
    /// `session` holds `raw` of pool `index` from now on: its lease, and its
    /// link with when the session got it.
    fn hold(
        &self,
        index: usize,
        raw: P::Raw,
        session: u64,
    ) -> (SimLease<P>, (Arc<LinkState>, Instant)) {
        let lease = SimLease::new(
            raw,
            self.pools[index].clone(),
            self.world.clone(),
            index,
            session,
        );
        let link = lease.stream.get_ref().link().clone();
        (lease, (link, Instant::now()))
    }
}

/// Start a client and its proxy session (two counted tasks).
pub fn start<P: PoolUnderTest>(env: &Arc<SessionEnv<P>>, plan: ClientPlan) {
    let (client_io, proxy_io) = tokio::io::duplex(64 << 10);
    env.world.with(|s, now| {
        s.stats.sessions_started += 1;
        s.trace
            .record(now, format!("s{} arrives ({:?})", plan.session, plan.end));
    });
    env.tasks
        .spawn("client", run_client(env.world.clone(), plan, client_io));
    env.tasks
        .spawn("session", run_session(env.clone(), plan.session, proxy_io));
}

async fn run_session<P: PoolUnderTest>(env: Arc<SessionEnv<P>>, session: u64, io: DuplexStream) {
    let mut client = FrameStream::new(io, Vec::new(), Peer::Client);
    let sid = format!("s{session}");
    let started = Instant::now();
    let got = lease(&env, started + env.acquire_timeout, |_| true).await;
    let waited = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    env.world.with(|s, _| s.stats.acquire_waits_ms.push(waited));
    let Some((index, raw)) = got else {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            client.close(1013, "no backend connection"),
        )
        .await;
        env.world
            .session_done(session, ProxyEnd::plain("no_backend_connection", false));
        return;
    };
    let (lease, link) = env.hold(index, raw, session);
    let links = Arc::new(Mutex::new(vec![link]));
    let mut params = Map::new();
    params.insert("lang".into(), Value::from("ko"));
    let failover = env.ctx.settings.failover.filter(|_| env.resumable[index]);
    let takeover = failover.map(|_| {
        Box::new(SimTakeover {
            env: env.clone(),
            session,
            used: Arc::new(Mutex::new(vec![index])),
            links: links.clone(),
        }) as Box<dyn Takeover<SimLease<P>>>
    });
    let reuse = if takeover.is_some() {
        Reuse::Resumable
    } else {
        Reuse::Fenced
    };
    let outcome = run_leased(&mut client, lease, reuse, &params, &env.ctx, &sid, takeover).await;
    let links = lock(&links).clone();
    env.world.session_done(
        session,
        ProxyEnd {
            outcome,
            faulted: links.iter().any(|(l, _)| l.faulted()),
            // A connection fails for the session at the earliest when the
            // session gets it (a dead one handed out fails at once).
            last_fault: links
                .iter()
                .filter_map(|(l, leased)| l.faulted_at().map(|f| f.max(*leased)))
                .max(),
            failover_bound: failover.map(|f| f.timeout + MAX_RELAY_TICK),
        },
    );
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// The backend connections a session has had, each with when it got it.
type Links = Arc<Mutex<Vec<(Arc<LinkState>, Instant)>>>;

/// Takeovers by the simulation's routing: another resumable pool, not one the
/// session has used (as `RouteTakeover` excludes the backends it had).
struct SimTakeover<P: PoolUnderTest> {
    env: Arc<SessionEnv<P>>,
    session: u64,
    /// The pools the session has had, the current one last.
    used: Arc<Mutex<Vec<usize>>>,
    /// Every backend connection the session has had, with when it got it
    /// (to read their faults).
    links: Links,
}

impl<P: PoolUnderTest> Takeover<SimLease<P>> for SimTakeover<P> {
    fn next_lease(&mut self) -> TakeoverFuture<SimLease<P>> {
        let env = self.env.clone();
        let session = self.session;
        let used = self.used.clone();
        let links = self.links.clone();
        Box::pin(async move {
            let exclude = lock(&used).clone();
            let deadline = Instant::now() + env.acquire_timeout;
            let candidate = |i: usize| env.resumable[i] && !exclude.contains(&i);
            let Some((index, raw)) = lease(&env, deadline, candidate).await else {
                env.world
                    .note(|| format!("s{session}: no backend to take it over"));
                return None;
            };
            lock(&used).push(index);
            let (lease, link) = env.hold(index, raw, session);
            lock(&links).push(link);
            Some(lease)
        })
    }
}

/// Idle connection in any healthy pool `allowed`, else a dial on demand, else
/// wait for a release until `deadline`.
async fn lease<P: PoolUnderTest>(
    env: &SessionEnv<P>,
    deadline: Instant,
    allowed: impl Fn(usize) -> bool,
) -> Option<(usize, P::Raw)> {
    let mut order: Vec<usize> = (0..env.pools.len())
        .filter(|&i| allowed(i) && env.pools[i].healthy())
        .collect();
    if order.is_empty() {
        return None;
    }
    let first = env.rng.index(order.len());
    order.rotate_left(first);
    for &i in &order {
        if let Some(raw) = env.pools[i].acquire().await {
            return Some((i, raw));
        }
    }
    for &i in &order {
        if Instant::now() >= deadline {
            return None;
        }
        if let Some(raw) = env.pools[i].dial_on_demand(deadline).await {
            return Some((i, raw));
        }
    }
    let waits = order.iter().map(|&i| {
        let p = env.pools[i].clone();
        Box::pin(async move { (i, p.acquire_wait().await) })
    });
    match tokio::time::timeout_at(deadline, select_all(waits)).await {
        Ok(((i, Some(raw)), _, _)) => Some((i, raw)),
        _ => None,
    }
}
