//! The pools under test, behind one trait: ours (the production `ConnPool`
//! with the real `ReconcileWorker` and health checks) and the naive design of
//! the reference write-up. Sessions hold a [`SimLease`], which the real session
//! relay drives through `sttproxy::session::SessionLease` and which reports
//! every lease and hand-back to the truth.

pub mod naive;
pub mod ours;

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use sttproxy::backend::BackendConn;
use sttproxy::backend::health::HealthThresholds;
use sttproxy::reconcile::ReconcileConfig;
use sttproxy::session::SessionLease;
use tokio::time::Instant;

use crate::backend::SimBackend;
use crate::checker::Kind;
use crate::tasks::Tasks;
use crate::transport::SimStream;
use crate::truth::ConnId;
use crate::world::World;

pub use naive::Naive;
pub use ours::Ours;

/// Which pool design a run drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum PoolKind {
    Naive,
    Ours,
}

impl PoolKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolKind::Naive => "naive",
            PoolKind::Ours => "ours",
        }
    }
}

/// A pool's counters as its own stats call reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimSnapshot {
    pub target: usize,
    pub max: usize,
    pub live: usize,
    pub idle: usize,
    pub leased: usize,
    pub dialing: usize,
    pub acquired: u64,
    pub released: u64,
    pub discarded: u64,
    pub dial_failures: u64,
}

/// How a pool is sized and paced (the production knobs).
#[derive(Debug, Clone)]
pub struct PoolParams {
    pub target: usize,
    pub max: usize,
    pub reconcile: ReconcileConfig,
    pub health_interval: Duration,
    pub health_timeout: Duration,
    pub thresholds: HealthThresholds,
    pub connect_timeout: Duration,
}

/// What a pool's maintenance needs from the run.
#[derive(Debug, Clone)]
pub struct PoolEnv {
    pub index: usize,
    pub backend: Arc<SimBackend>,
    pub world: Arc<World>,
    pub tasks: Tasks,
    pub seed: u64,
}

/// A pool design under test. One instance per backend.
pub trait PoolUnderTest: Clone + Send + Sync + std::fmt::Debug + 'static {
    /// What a session holds while it uses a connection.
    type Raw: Send + std::fmt::Debug + 'static;

    /// Create the pool and start its maintenance tasks (counted in `env.tasks`).
    fn start(params: &PoolParams, env: PoolEnv) -> Self;

    /// Take an idle connection, if any (ours never waits; the naive pool
    /// first waits for its lock).
    fn acquire(&self) -> impl Future<Output = Option<Self::Raw>> + Send;

    /// Dial a connection for a session now, if the pool allows it.
    fn dial_on_demand(&self, deadline: Instant) -> impl Future<Output = Option<Self::Raw>> + Send;

    /// Wait for a connection to come back (no deadline of its own).
    fn acquire_wait(&self) -> impl Future<Output = Option<Self::Raw>> + Send;

    /// Hand a connection back after a clean session; the pool reports the
    /// outcome to the truth (`World::release_done`).
    fn release(&self, raw: Self::Raw, conn: ConnId);

    /// Close a connection that is not fit for reuse.
    fn discard(&self, raw: Self::Raw);

    /// The connection a session holds.
    fn conn(raw: &Self::Raw) -> &BackendConn<SimStream>;
    fn conn_mut(raw: &mut Self::Raw) -> &mut BackendConn<SimStream>;

    /// A live configuration change.
    fn set_target(&self, target: usize);

    /// Ask for a reconcile run.
    fn reconcile(&self);

    /// The pool's stats call.
    fn snapshot(&self) -> impl Future<Output = SimSnapshot> + Send;

    /// Whether new sessions may be routed here.
    fn healthy(&self) -> bool;

    /// Stop the maintenance tasks and close every connection the pool holds.
    fn shutdown(&self);
}

/// A session's hold on a connection of pool `P`.
#[derive(Debug)]
pub struct SimLease<P: PoolUnderTest> {
    raw: Option<P::Raw>,
    pool: P,
    world: Arc<World>,
    index: usize,
    conn: ConnId,
    session: u64,
}

impl<P: PoolUnderTest> SimLease<P> {
    /// Record that session `session` got `raw` from pool `index`.
    pub fn new(raw: P::Raw, pool: P, world: Arc<World>, index: usize, session: u64) -> Self {
        let stream = P::conn(&raw).stream.get_ref();
        let conn = stream.id();
        world.leased(index, conn, session, stream.link().backend_dead());
        if stream.link().stale() {
            world.violation(
                Kind::LateFrame,
                format!("p{index} c{conn} leased to s{session} after its backend wrote a frame of an ended session onto it"),
            );
        }
        Self {
            raw: Some(raw),
            pool,
            world,
            index,
            conn,
            session,
        }
    }

    pub fn conn_id(&self) -> ConnId {
        self.conn
    }
}

impl<P: PoolUnderTest> Deref for SimLease<P> {
    type Target = BackendConn<SimStream>;

    fn deref(&self) -> &Self::Target {
        match &self.raw {
            Some(r) => P::conn(r),
            None => unreachable!("a SimLease holds its connection until consumed"),
        }
    }
}

impl<P: PoolUnderTest> DerefMut for SimLease<P> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match &mut self.raw {
            Some(r) => P::conn_mut(r),
            None => unreachable!("a SimLease holds its connection until consumed"),
        }
    }
}

impl<P: PoolUnderTest> SessionLease<SimStream> for SimLease<P> {
    fn release(mut self) {
        if let Some(raw) = self.raw.take() {
            if P::conn(&raw).stream.get_ref().link().in_session() {
                self.world.violation(
                    Kind::ForgedFence,
                    format!(
                        "p{} c{} released by s{} before its backend sent the session's session.ended",
                        self.index, self.conn, self.session
                    ),
                );
            }
            self.world
                .returned(self.index, self.conn, self.session, "released");
            self.pool.release(raw, self.conn);
        }
    }

    fn discard(mut self) {
        if let Some(raw) = self.raw.take() {
            self.world
                .returned(self.index, self.conn, self.session, "discarded");
            self.pool.discard(raw);
        }
    }
}

impl<P: PoolUnderTest> Drop for SimLease<P> {
    fn drop(&mut self) {
        if let Some(raw) = self.raw.take() {
            self.world
                .returned(self.index, self.conn, self.session, "dropped (no release)");
            drop(raw);
        }
    }
}
