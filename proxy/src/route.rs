//! Which backend serves a new session, and how its connection is obtained
//! (docs/pool.md): power-of-two-choices over healthy pools, weighted by idle
//! connections; any idle connection elsewhere; a dial on demand where a pool is
//! below its max; else a bounded wait for a release. Never an unbounded wait.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::select_all;
use rand::Rng;
use sttproxy_pool::Lease;
use tokio::time::Instant;

use crate::backend::{BackendConn, BackendPool};
use crate::backends::Backends;

/// How a session got its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    Idle,
    Dialed,
    Waited,
}

impl Acquired {
    pub fn as_str(self) -> &'static str {
        match self {
            Acquired::Idle => "idle",
            Acquired::Dialed => "dialed",
            Acquired::Waited => "waited",
        }
    }
}

/// Why a session got no connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoConnection {
    #[error("no healthy backend")]
    NoBackend,
    #[error("no backend connection became free within {0:?}")]
    Timeout(Duration),
}

/// Order the healthy, open pools for a new session: the first is the
/// power-of-two-choices pick, the rest are fallbacks by idle connections.
pub fn candidates(all: &[Arc<BackendPool>], rng: &mut impl Rng) -> Vec<Arc<BackendPool>> {
    let mut healthy: Vec<Arc<BackendPool>> = all
        .iter()
        .filter(|b| b.is_healthy() && !b.pool.is_draining())
        .cloned()
        .collect();
    if healthy.len() <= 1 {
        return healthy;
    }
    let a = pick_weighted(&healthy, rng);
    let mut b = pick_weighted(&healthy, rng);
    if a == b {
        b = (a + 1 + rng.random_range(0..healthy.len() - 1)) % healthy.len();
    }
    let first = if score(&healthy[a]) >= score(&healthy[b]) {
        a
    } else {
        b
    };
    let chosen = healthy.swap_remove(first);
    healthy.sort_by(|x, y| score(y).total_cmp(&score(x)));
    healthy.insert(0, chosen);
    healthy
}

/// Idle connections per unit of weight share, favouring the heavier backend on ties.
fn score(b: &BackendPool) -> f64 {
    let s = b.snapshot();
    (s.idle as f64 + 1.0) * f64::from(b.weight()) / (s.leased as f64 + 1.0)
}

fn pick_weighted(pools: &[Arc<BackendPool>], rng: &mut impl Rng) -> usize {
    let total: u64 = pools.iter().map(|b| u64::from(b.weight())).sum();
    let mut x = rng.random_range(0..total.max(1));
    for (i, b) in pools.iter().enumerate() {
        let w = u64::from(b.weight());
        if x < w {
            return i;
        }
        x -= w;
    }
    pools.len() - 1
}

/// Get a backend connection for a new session within `acquire_timeout`.
pub async fn lease(
    backends: &Backends,
    acquire_timeout: Duration,
    rng: &mut impl Rng,
) -> Result<(Arc<BackendPool>, Lease<BackendConn>, Acquired), NoConnection> {
    lease_among(&backends.all(), acquire_timeout, rng).await
}

/// Get a connection for a session taken over after its backend failed
/// (docs/failover.md): only resumable backends, none of those in `exclude`
/// (the ones the session already lost).
pub async fn lease_takeover(
    backends: &Backends,
    exclude: &[String],
    acquire_timeout: Duration,
    rng: &mut impl Rng,
) -> Result<(Arc<BackendPool>, Lease<BackendConn>, Acquired), NoConnection> {
    let pools: Vec<Arc<BackendPool>> = backends
        .all()
        .iter()
        .filter(|b| b.reuse == crate::backend::Reuse::Resumable && !exclude.contains(&b.id))
        .cloned()
        .collect();
    lease_among(&pools, acquire_timeout, rng).await
}

/// Get a connection from one of `all` within `acquire_timeout`.
async fn lease_among(
    all: &[Arc<BackendPool>],
    acquire_timeout: Duration,
    rng: &mut impl Rng,
) -> Result<(Arc<BackendPool>, Lease<BackendConn>, Acquired), NoConnection> {
    let deadline = Instant::now() + acquire_timeout;
    let pools = candidates(all, rng);
    if pools.is_empty() {
        return Err(NoConnection::NoBackend);
    }
    for b in &pools {
        if let Some(lease) = b.pool.acquire() {
            return Ok((b.clone(), lease, Acquired::Idle));
        }
    }
    // Every pool is empty: dial on demand where a pool is below its max.
    for b in &pools {
        let Some(reservation) = b.pool.try_reserve() else {
            continue;
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, b.dialer.connect()).await {
            Ok(Ok(conn)) => {
                b.health.record(true);
                return Ok((b.clone(), reservation.into_lease(conn), Acquired::Dialed));
            }
            Ok(Err(e)) => {
                tracing::info!(backend = %b.id, error = %e, "dial on demand failed");
                b.pool.record_dial_failure();
                b.health.record(false);
                reservation.unreserve();
            }
            Err(_) => {
                reservation.unreserve();
                return Err(NoConnection::Timeout(acquire_timeout));
            }
        }
    }
    // Wait for a release in any candidate pool.
    let waits = pools.iter().map(|b| b.pool.acquire_wait()).collect();
    wait_for_release(pools, waits, deadline, acquire_timeout).await
}

/// Wait until one of `pools` releases a connection; pools that start draining
/// drop out of the wait.
async fn wait_for_release(
    mut pools: Vec<Arc<BackendPool>>,
    mut waits: Vec<sttproxy_pool::AcquireWait<BackendConn>>,
    deadline: Instant,
    acquire_timeout: Duration,
) -> Result<(Arc<BackendPool>, Lease<BackendConn>, Acquired), NoConnection> {
    while !waits.is_empty() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, select_all(waits)).await {
            Err(_) => return Err(NoConnection::Timeout(acquire_timeout)),
            Ok((Ok(lease), index, _)) => {
                return Ok((pools[index].clone(), lease, Acquired::Waited));
            }
            Ok((Err(_), index, rest)) => {
                pools.remove(index);
                waits = rest;
            }
        }
    }
    Err(NoConnection::NoBackend)
}
