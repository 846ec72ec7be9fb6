//! The proxy side of a simulated session: route to a pool (idle connection
//! first, then a dial on demand, then a bounded wait for a release, as
//! `route::lease` does), then hand the client and the lease to the production
//! session code, `sttproxy::session::run_leased`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::select_all;
use serde_json::{Map, Value};
use sttproxy::backend::Reuse;
use sttproxy::relay::{FrameStream, Peer};
use sttproxy::session::{SessionContext, run_leased};
use tokio::io::DuplexStream;
use tokio::time::Instant;

use crate::client::{ClientPlan, run_client};
use crate::pools::{PoolUnderTest, SimLease};
use crate::runtime::SimRng;
use crate::tasks::Tasks;
use crate::world::World;

/// What every session of a run shares.
#[derive(Debug)]
pub struct SessionEnv<P: PoolUnderTest> {
    pub pools: Vec<P>,
    pub ctx: SessionContext,
    pub world: Arc<World>,
    pub tasks: Tasks,
    pub rng: SimRng,
    pub acquire_timeout: Duration,
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
    let got = lease(&env, started + env.acquire_timeout).await;
    let waited = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    env.world.with(|s, _| s.stats.acquire_waits_ms.push(waited));
    let Some((index, raw)) = got else {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            client.close(1013, "no backend connection"),
        )
        .await;
        env.world
            .session_done(session, "no_backend_connection", false);
        return;
    };
    let lease = SimLease::new(
        raw,
        env.pools[index].clone(),
        env.world.clone(),
        index,
        session,
    );
    let link = lease.stream.get_ref().link().clone();
    let mut params = Map::new();
    params.insert("lang".into(), Value::from("ko"));
    let outcome = run_leased(
        &mut client,
        lease,
        Reuse::Fenced,
        &params,
        &env.ctx,
        &sid,
        None,
    )
    .await;
    env.world.session_done(session, outcome, link.faulted());
}

/// Idle connection in any healthy pool, else a dial on demand, else wait for
/// a release until `deadline`.
async fn lease<P: PoolUnderTest>(
    env: &SessionEnv<P>,
    deadline: Instant,
) -> Option<(usize, P::Raw)> {
    let mut order: Vec<usize> = (0..env.pools.len())
        .filter(|&i| env.pools[i].healthy())
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
