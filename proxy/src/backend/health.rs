//! Backend health: a backend flips unhealthy only after N consecutive failures
//! (dials or pings) and healthy again only after M consecutive successes, so
//! one lost ping does not shuffle traffic around. Every flip asks the pool's
//! reconcile worker to run.
//!
//! Idle connections are pinged every `health_interval` (jittered) and must
//! answer with a pong within `health_timeout`. A round visits each idle
//! connection once, those waiting on a thread's stripe included; a check
//! takes its connection out of the pool (so it holds nothing `acquire` needs
//! beyond that connection) and puts it back only if it answered.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use rand::rngs::SmallRng;
use sttproxy_pool::{ConnPool, Connection, Lease};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::conn::BackendConn;
use crate::reconcile::{DialObserver, jitter};

/// How many consecutive results flip a backend's health.
#[derive(Debug, Clone, Copy)]
pub struct HealthThresholds {
    pub unhealthy_after: u32,
    pub healthy_after: u32,
}

impl Default for HealthThresholds {
    fn default() -> Self {
        Self {
            unhealthy_after: 3,
            healthy_after: 2,
        }
    }
}

/// The health of one backend.
pub struct Health {
    healthy: AtomicBool,
    /// (consecutive failures, consecutive successes). A mutex: results are
    /// rare (dials, pings), never per message.
    streak: Mutex<(u32, u32)>,
    thresholds: HealthThresholds,
    pub ping_failures: AtomicU64,
    pub pings_ok: AtomicU64,
    /// Called on every flip (the pool's reconcile trigger).
    on_flip: Box<dyn Fn(bool) + Send + Sync>,
}

impl Health {
    /// A new backend starts healthy: it has not failed yet.
    pub fn new(thresholds: HealthThresholds, on_flip: Box<dyn Fn(bool) + Send + Sync>) -> Self {
        Self {
            healthy: AtomicBool::new(true),
            streak: Mutex::new((0, 0)),
            thresholds,
            ping_failures: AtomicU64::new(0),
            pings_ok: AtomicU64::new(0),
            on_flip,
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Record one result; flips health when a streak reaches its threshold.
    pub fn record(&self, ok: bool) {
        let flip = {
            let mut streak = match self.streak.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if ok {
                *streak = (0, streak.1.saturating_add(1));
            } else {
                *streak = (streak.0.saturating_add(1), 0);
            }
            let healthy = self.healthy.load(Ordering::Acquire);
            if healthy && streak.0 >= self.thresholds.unhealthy_after {
                self.healthy.store(false, Ordering::Release);
                Some(false)
            } else if !healthy && streak.1 >= self.thresholds.healthy_after {
                self.healthy.store(true, Ordering::Release);
                Some(true)
            } else {
                None
            }
        };
        if let Some(now_healthy) = flip {
            (self.on_flip)(now_healthy);
        }
    }
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("healthy", &self.is_healthy())
            .finish_non_exhaustive()
    }
}

impl DialObserver for Health {
    fn dial_result(&self, ok: bool) {
        self.record(ok);
    }
}

/// Why a ping check failed.
#[derive(Debug, thiserror::Error)]
pub enum PingError {
    #[error("no pong within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Failed(#[from] crate::relay::PingFault),
}

/// Ping one connection and wait for the matching pong.
pub async fn ping<S>(
    conn: &mut BackendConn<S>,
    payload: u64,
    timeout: Duration,
) -> Result<(), PingError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio::time::timeout(timeout, conn.stream.ping(&payload.to_be_bytes()))
        .await
        .map_err(|_| PingError::Timeout(timeout))??;
    Ok(())
}

/// Idle connections pinged at once by one pool's health check.
const CONCURRENT_PINGS: usize = 32;

/// Ping every idle connection of `pool` every `interval` (jittered ±10 %).
pub async fn run_health_checks<S>(
    pool: ConnPool<BackendConn<S>>,
    health: std::sync::Arc<Health>,
    interval: Duration,
    timeout: Duration,
    mut rng: SmallRng,
    cancel: CancellationToken,
    backend_id: String,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    BackendConn<S>: Connection,
{
    let mut seq: u64 = 0;
    let health = &health;
    let backend_id = backend_id.as_str();
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(jitter(interval, &mut rng)) => {}
        }
        let round = check_round(&pool, &cancel, |mut lease: Lease<BackendConn<S>>| {
            seq = seq.wrapping_add(1);
            let payload = seq;
            async move {
                match ping(&mut lease, payload, timeout).await {
                    Ok(()) => {
                        health.pings_ok.fetch_add(1, Ordering::Relaxed);
                        health.record(true);
                        lease.release();
                    }
                    Err(e) => {
                        tracing::info!(backend = %backend_id, error = %e, "idle connection failed its health check");
                        health.ping_failures.fetch_add(1, Ordering::Relaxed);
                        health.record(false);
                        lease.mark_broken();
                        lease.discard();
                    }
                }
            }
        });
        if round.await == Round::Cancelled {
            return;
        }
    }
}

/// How a health round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    Done,
    Cancelled,
}

/// One health round: hand each connection idle when the round begins to
/// `check` once ([`ConnPool::idle_sweep`]: those on thread stripes, then
/// those queued; checked ones go back behind the sweep's mark, so none is met
/// twice), several at a time: one at a time, a silent backend's k-th
/// connection would only be found after k × timeout. At most
/// `CONCURRENT_PINGS` idle connections are out of the pool at once, each for
/// one round trip (or the ping timeout when the backend is silent). `check`
/// pings its lease and releases or discards it.
async fn check_round<C, F, Fut>(
    pool: &ConnPool<C>,
    cancel: &CancellationToken,
    mut check: F,
) -> Round
where
    C: Connection,
    F: FnMut(Lease<C>) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut sweep = pool.idle_sweep().fuse();
    let mut pings = FuturesUnordered::new();
    loop {
        while pings.len() < CONCURRENT_PINGS {
            let Some(lease) = sweep.next() else { break };
            pings.push(check(lease));
        }
        let next = tokio::select! {
            biased;
            () = cancel.cancelled() => return Round::Cancelled,
            next = pings.next() => next,
        };
        if next.is_none() {
            return Round::Done;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::{Arc, Mutex};

    use sttproxy_pool::__private::set_thread_stripe;
    use sttproxy_pool::{ConnPool, Connection, PoolConfig, Returned};
    use tokio_util::sync::CancellationToken;

    use super::{CONCURRENT_PINGS, Round, check_round};

    struct Fake {
        id: usize,
    }

    impl Connection for Fake {
        fn is_alive(&self) -> bool {
            true
        }
    }

    // Issue 10, defect 6: with more idle connections queued than are pinged
    // at once, a round must still reach each idle connection exactly once,
    // those waiting on a thread's stripe included (before, it pinged queued
    // ones twice and the stripes never).
    #[tokio::test]
    async fn a_round_checks_every_idle_connection_once_stripes_included() {
        let n = CONCURRENT_PINGS + 10;
        let pool = ConnPool::new(PoolConfig::new(n, n));
        for id in 0..n {
            assert_eq!(
                pool.try_reserve().unwrap().offer(Fake { id }),
                Returned::Idle
            );
        }
        // Sessions that ended on two threads left a connection on each
        // thread's stripe; the rest wait in the queue.
        for stripe in [0, 1] {
            set_thread_stripe(stripe);
            assert_eq!(pool.acquire().unwrap().release(), Returned::Idle);
        }
        assert_eq!(pool.snapshot().idle, n);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let round = check_round(&pool, &CancellationToken::new(), |lease| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(lease.id);
                tokio::task::yield_now().await;
                lease.release();
            }
        })
        .await;
        assert_eq!(round, Round::Done);
        let mut seen = seen.lock().unwrap().clone();
        seen.sort_unstable();
        assert_eq!(
            seen,
            (0..n).collect::<Vec<_>>(),
            "each idle connection checked once"
        );
        assert_eq!(pool.snapshot().idle, n);
    }
}
