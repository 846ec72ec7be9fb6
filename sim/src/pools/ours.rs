//! Ours: the production `ConnPool`, driven by the production
//! `ReconcileWorker` (through the `Dialer` trait) and the production health
//! checks (`run_health_checks`, generic over the transport), with the
//! production `Health` tracker observing dials and pings.

use std::sync::Arc;

use rand::SeedableRng;
use rand::rngs::SmallRng;
use sttproxy::backend::BackendConn;
use sttproxy::backend::health::{Health, run_health_checks};
use sttproxy::reconcile::{Dialer, ReconcileWorker};
use sttproxy_pool::{ConnPool, Connection, Lease, PoolConfig, Returned};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{PoolEnv, PoolParams, PoolUnderTest, SimSnapshot};
use crate::backend::SimDialer;
use crate::runtime::seed_for;
use crate::transport::SimStream;
use crate::truth::ConnId;
use crate::world::{ReleaseFacts, World};

type Conn = BackendConn<SimStream>;

#[derive(Debug, Clone)]
pub struct Ours {
    pool: ConnPool<Conn>,
    health: Arc<Health>,
    dialer: Arc<SimDialer>,
    world: Arc<World>,
    index: usize,
    cancel: CancellationToken,
}

impl PoolUnderTest for Ours {
    type Raw = Lease<Conn>;

    fn start(params: &PoolParams, env: PoolEnv) -> Self {
        let pool: ConnPool<Conn> = ConnPool::new(PoolConfig {
            capacity: params.max,
            target: params.target,
            max: params.max,
        });
        let trigger = pool.clone();
        let world = env.world.clone();
        let index = env.index;
        let health = Arc::new(Health::new(
            params.thresholds,
            Box::new(move |healthy| {
                world.note(|| {
                    format!(
                        "p{index} health -> {}",
                        if healthy { "healthy" } else { "UNHEALTHY" }
                    )
                });
                trigger.reconcile_signal().trigger();
            }),
        ));
        let dialer = Arc::new(SimDialer {
            backend: env.backend.clone(),
            timeout: params.connect_timeout,
            world: env.world.clone(),
        });
        let worker = ReconcileWorker::new(
            pool.clone(),
            dialer.clone(),
            params.reconcile.clone(),
            SmallRng::seed_from_u64(seed_for(env.seed, "reconcile")),
        )
        .with_observer(health.clone());
        let cancel = CancellationToken::new();
        env.tasks
            .spawn("reconcile-worker", worker.run(cancel.clone()));
        env.tasks.spawn(
            "health-checks",
            run_health_checks(
                pool.clone(),
                health.clone(),
                params.health_interval,
                params.health_timeout,
                SmallRng::seed_from_u64(seed_for(env.seed, "health")),
                cancel.clone(),
                format!("b{index}"),
            ),
        );
        Self {
            pool,
            health,
            dialer,
            world: env.world,
            index,
            cancel,
        }
    }

    async fn acquire(&self) -> Option<Lease<Conn>> {
        self.pool.acquire()
    }

    /// As `route::lease` does: reserve a slot (the CAS bounds it by max), dial,
    /// lease the new connection directly.
    async fn dial_on_demand(&self, deadline: Instant) -> Option<Lease<Conn>> {
        let reservation = self.pool.try_reserve()?;
        match tokio::time::timeout_at(deadline, self.dialer.dial()).await {
            Ok(Ok(conn)) => {
                self.health.record(true);
                Some(reservation.into_lease(conn))
            }
            Ok(Err(_)) => {
                self.pool.record_dial_failure();
                self.health.record(false);
                reservation.unreserve();
                None
            }
            Err(_) => {
                reservation.unreserve();
                None
            }
        }
    }

    async fn acquire_wait(&self) -> Option<Lease<Conn>> {
        self.pool.acquire_wait().await.ok()
    }

    fn release(&self, raw: Lease<Conn>, conn: ConnId) {
        let alive = raw.is_alive();
        let draining = raw.pool_draining();
        let target = self.pool.snapshot().target;
        let live_before = self.world.live(self.index);
        let kept = raw.release() == Returned::Idle;
        self.world.release_done(&ReleaseFacts {
            pool: self.index,
            conn,
            alive,
            draining,
            live_before,
            target,
            kept,
        });
    }

    fn discard(&self, raw: Lease<Conn>) {
        raw.discard();
    }

    fn conn(raw: &Lease<Conn>) -> &Conn {
        raw
    }

    fn conn_mut(raw: &mut Lease<Conn>) -> &mut Conn {
        raw
    }

    fn set_target(&self, target: usize) {
        self.pool.set_target(target);
    }

    fn reconcile(&self) {
        self.pool.reconcile_signal().trigger();
    }

    async fn snapshot(&self) -> SimSnapshot {
        let s = self.pool.snapshot();
        SimSnapshot {
            target: s.target,
            max: s.max,
            live: s.live,
            idle: s.idle,
            leased: s.leased,
            dialing: s.dialing,
            acquired: s.acquired_total as u64,
            released: s.released_total as u64,
            discarded: s.discarded_total as u64,
            dial_failures: s.dial_failures_total as u64,
        }
    }

    fn healthy(&self) -> bool {
        self.health.is_healthy() && !self.pool.is_draining()
    }

    /// As `BackendPool::shutdown`: close the pool, stop its tasks.
    fn shutdown(&self) {
        self.pool.close();
        self.cancel.cancel();
    }
}
