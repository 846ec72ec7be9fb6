//! `BackendPool`: one backend's connection pool together with the tasks that
//! keep it (its reconcile worker and its health checks), which it owns.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::Serialize;
use sttproxy_pool::{ConnPool, PoolConfig, PoolSnapshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::conn::{BackendConn, DialError, WsDialer};
use super::health::{Health, HealthThresholds, run_health_checks};
use super::{BackendSpec, Reuse};
use crate::reconcile::{ReconcileConfig, ReconcileStats, ReconcileWorker};

/// Settings shared by every backend pool.
#[derive(Debug, Clone)]
pub struct PoolTuning {
    pub reconcile: ReconcileConfig,
    pub health_interval: Duration,
    pub health_timeout: Duration,
    pub thresholds: HealthThresholds,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub max_message_size: usize,
    /// Idle queue capacity per pool: `max_size` may later grow up to this
    /// without replacing the pool.
    pub capacity_headroom: usize,
    /// TLS client settings toward `wss://` backends; `None`: the defaults
    /// (Mozilla roots, no client certificate).
    pub backend_tls: Option<Arc<rustls::ClientConfig>>,
}

impl Default for PoolTuning {
    fn default() -> Self {
        Self {
            reconcile: ReconcileConfig::default(),
            health_interval: Duration::from_secs(10),
            health_timeout: Duration::from_secs(2),
            thresholds: HealthThresholds::default(),
            connect_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(5),
            max_message_size: 1 << 20,
            capacity_headroom: 4096,
            backend_tls: None,
        }
    }
}

/// One backend: its pool, health and the tasks that keep them.
#[derive(Debug)]
pub struct BackendPool {
    pub id: String,
    pub url: String,
    pub reuse: Reuse,
    /// The group it serves; a change replaces the pool.
    pub group: String,
    weight: AtomicU32,
    pub pool: ConnPool<BackendConn>,
    pub health: Arc<Health>,
    pub dialer: Arc<WsDialer>,
    pub reconcile_stats: Arc<ReconcileStats>,
    /// Stops this backend's tasks; a child of the proxy's backend token.
    cancel: CancellationToken,
}

/// The `/pools` view of one backend (docs/pool.md).
#[derive(Debug, Clone, Serialize)]
pub struct PoolView {
    pub id: String,
    pub url: String,
    pub group: String,
    pub healthy: bool,
    pub draining: bool,
    pub target: usize,
    pub max: usize,
    pub live: usize,
    pub idle: usize,
    pub leased: usize,
    pub dialing: usize,
    pub acquired_total: usize,
    pub released_total: usize,
    pub discarded_total: usize,
    pub dial_failures_total: usize,
}

impl BackendPool {
    /// Create the pool and start its reconcile worker and health checks on
    /// `tracker`; they stop when `parent` is cancelled or the backend is retired.
    pub fn start(
        spec: &BackendSpec,
        tuning: &PoolTuning,
        tracker: &TaskTracker,
        parent: &CancellationToken,
        seed: u64,
    ) -> Result<Arc<Self>, DialError> {
        let dialer = Arc::new(WsDialer::new(
            &spec.url,
            tuning.connect_timeout,
            tuning.handshake_timeout,
            tuning.backend_tls.clone(),
        )?);
        let pool = ConnPool::new(PoolConfig {
            capacity: spec.max_size.max(tuning.capacity_headroom),
            target: spec.target_size,
            max: spec.max_size,
        });
        let trigger_pool = pool.clone();
        let id = spec.id.clone();
        let health = Arc::new(Health::new(
            tuning.thresholds,
            Box::new(move |healthy| {
                tracing::warn!(backend = %id, healthy, "backend health changed");
                trigger_pool.reconcile_signal().trigger();
            }),
        ));
        let worker = ReconcileWorker::new(
            pool.clone(),
            dialer.clone(),
            tuning.reconcile.clone(),
            SmallRng::seed_from_u64(seed),
        )
        .with_observer(health.clone());
        let reconcile_stats = worker.stats();
        let cancel = parent.child_token();
        let this = Arc::new(Self {
            id: spec.id.clone(),
            url: spec.url.clone(),
            reuse: spec.reuse,
            group: spec.group.clone(),
            weight: AtomicU32::new(spec.weight.max(1)),
            pool: pool.clone(),
            health: health.clone(),
            dialer,
            reconcile_stats,
            cancel: cancel.clone(),
        });
        let worker_cancel = cancel.clone();
        tracker.spawn(async move {
            worker.run(worker_cancel.clone()).await;
            // The worker returns when cancelled, or when a retired pool has no
            // connection left: either way this backend's tasks are done.
            worker_cancel.cancel();
        });
        tracker.spawn(run_health_checks(
            pool,
            health,
            tuning.health_interval,
            tuning.health_timeout,
            SmallRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15),
            cancel,
            spec.id.clone(),
        ));
        Ok(this)
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Apply new sizes and weight (a live configuration change).
    pub fn resize(&self, target: usize, max: usize, weight: u32) {
        self.weight.store(weight.max(1), Ordering::Relaxed);
        self.pool.set_limits(target, max);
    }

    /// Retire: no new leases, idle connections close now, leased ones when their
    /// sessions end; the tasks stop once nothing is live (the reconcile worker
    /// ends after a run that finds the drained pool empty, and cancels the
    /// health checks as it goes; [`crate::backends::Backends::reap_retired`]
    /// wakes it as soon as the last connection closed).
    pub fn retire(&self) {
        self.pool.drain();
    }

    /// Retired, and no connection is left (idle, leased or being dialed).
    pub fn is_drained(&self) -> bool {
        self.pool.is_draining() && self.pool.live() == 0
    }

    /// Stop the backend's tasks now and close its pool.
    pub fn shutdown(&self) {
        self.pool.close();
        self.cancel.cancel();
    }

    pub fn is_stopped(&self) -> bool {
        self.cancel.is_cancelled()
    }

    pub fn is_healthy(&self) -> bool {
        self.health.is_healthy()
    }

    pub fn snapshot(&self) -> PoolSnapshot {
        self.pool.snapshot()
    }

    pub fn view(&self) -> PoolView {
        let s = self.pool.snapshot();
        PoolView {
            id: self.id.clone(),
            url: self.url.clone(),
            group: self.group.clone(),
            healthy: self.is_healthy(),
            draining: s.draining,
            target: s.target,
            max: s.max,
            live: s.live,
            idle: s.idle,
            leased: s.leased,
            dialing: s.dialing,
            acquired_total: s.acquired_total,
            released_total: s.released_total,
            discarded_total: s.discarded_total,
            dial_failures_total: s.dial_failures_total,
        }
    }
}
