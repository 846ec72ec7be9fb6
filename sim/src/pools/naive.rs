//! The naive design of the reference write-up, rebuilt as written: one mutex
//! (an async one, held across dials and pings, as the Go code held its lock
//! across network I/O) over a `Vec` of entries with in-use / healthy flags;
//! acquire and stats are O(n) scans under it; release flips the flag back and
//! checks nothing (not the target, not the connection); the pool size is a
//! counter kept apart from the `Vec` (the adjuster trusts it; the broken-
//! connection path and the health check's clean-up both decrement it); the
//! adjuster dials under the lock up to the target and stops at the first
//! failure; dials and pings run in spawned tasks whose handles are awaited
//! with a timeout and never cancelled. Its failures are expected: the
//! simulation reports them beside ours.

use std::sync::Arc;
use std::time::Duration;

use sttproxy::backend::BackendConn;
use sttproxy::reconcile::jitter;
use sttproxy_pool::Connection;
use tokio::sync::{Mutex, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{PoolEnv, PoolParams, PoolUnderTest, SimSnapshot};
use crate::backend::SimBackend;
use crate::runtime::{SimRng, seed_for};
use crate::tasks::Tasks;
use crate::transport::SimStream;
use crate::truth::ConnId;
use crate::world::{ReleaseFacts, World};

type Conn = BackendConn<SimStream>;

/// How often a waiting session retries a pool that had nothing.
const RETRY_EVERY: Duration = Duration::from_millis(50);

#[derive(Debug)]
struct Entry {
    id: ConnId,
    /// `None` while a session or a ping holds it, or once closed.
    conn: Option<Conn>,
    in_use: bool,
    healthy: bool,
}

#[derive(Debug, Default)]
struct State {
    conns: Vec<Entry>,
    /// The pool size as the adjuster believes it.
    count: usize,
    target: usize,
    max: usize,
    acquired: u64,
    released: u64,
    discarded: u64,
    dial_failures: u64,
    closed: bool,
}

/// A connection checked out of the naive pool.
#[derive(Debug)]
pub struct NaiveHandle {
    id: ConnId,
    conn: Conn,
}

#[derive(Debug, Clone)]
pub struct Naive {
    state: Arc<Mutex<State>>,
    backend: Arc<SimBackend>,
    world: Arc<World>,
    tasks: Tasks,
    index: usize,
    cancel: CancellationToken,
    kick: Arc<Notify>,
    params: Arc<PoolParams>,
    rng: SimRng,
}

impl Naive {
    /// The write-up's `AdjustPool`, with its lock held across every dial.
    async fn adjust(&self) {
        let mut s = self.state.lock().await;
        if s.closed {
            return;
        }
        let need = s.target.min(s.max).saturating_sub(s.count);
        for _ in 0..need {
            let backend = self.backend.clone();
            let dial = self
                .tasks
                .spawn("naive-dial", async move { backend.connect().await });
            match tokio::time::timeout(self.params.connect_timeout, dial).await {
                Ok(Ok(Ok(conn))) => {
                    let id = conn.stream.get_ref().id();
                    s.conns.push(Entry {
                        id,
                        conn: Some(conn),
                        in_use: false,
                        healthy: true,
                    });
                    s.count += 1;
                }
                // A failed dial ends the adjustment; a timed-out one is left running.
                Ok(_) | Err(_) => {
                    s.dial_failures += 1;
                    return;
                }
            }
        }
    }

    /// The write-up's `HealthCheck`: under the lock, drop the entries marked
    /// unhealthy, then ping every idle connection and wait for each answer.
    async fn health_check(&self) {
        let mut s = self.state.lock().await;
        let before = s.conns.len();
        s.conns.retain(|e| e.in_use || e.healthy);
        let removed = before - s.conns.len();
        s.count = s.count.saturating_sub(removed);
        for i in 0..s.conns.len() {
            if s.conns[i].in_use {
                continue;
            }
            let Some(conn) = s.conns[i].conn.take() else {
                continue;
            };
            let ping = self.tasks.spawn("naive-ping", ping(conn));
            match tokio::time::timeout(self.params.health_timeout, ping).await {
                Ok(Ok(Some(conn))) => {
                    s.conns[i].conn = Some(conn);
                    s.conns[i].healthy = true;
                }
                // Failed (the connection is gone) or timed out (the ping task
                // still holds it, waiting).
                Ok(_) | Err(_) => {
                    s.conns[i].healthy = false;
                    s.discarded += 1;
                }
            }
        }
    }
}

/// Ping and wait for the pong, without a deadline of its own.
async fn ping(mut conn: Conn) -> Option<Conn> {
    conn.stream.ping(b"ping").await.ok()?;
    Some(conn)
}

impl PoolUnderTest for Naive {
    type Raw = NaiveHandle;

    fn start(params: &PoolParams, env: PoolEnv) -> Self {
        let this = Self {
            state: Arc::new(Mutex::new(State {
                target: params.target,
                max: params.max,
                ..State::default()
            })),
            backend: env.backend,
            world: env.world,
            tasks: env.tasks.clone(),
            index: env.index,
            cancel: CancellationToken::new(),
            kick: Arc::new(Notify::new()),
            params: Arc::new(params.clone()),
            rng: SimRng::new(seed_for(env.seed, "naive")),
        };
        let adjuster = this.clone();
        env.tasks.spawn("naive-adjuster", async move {
            let tick = adjuster.params.reconcile.tick;
            adjuster.kick.notify_one();
            loop {
                let wait = jitter(tick, &mut adjuster.rng.fork());
                tokio::select! {
                    biased;
                    () = adjuster.cancel.cancelled() => return,
                    () = adjuster.kick.notified() => {}
                    () = tokio::time::sleep(wait) => {}
                }
                tokio::select! {
                    biased;
                    () = adjuster.cancel.cancelled() => return,
                    () = adjuster.adjust() => {}
                }
            }
        });
        let checker = this.clone();
        env.tasks.spawn("naive-health", async move {
            let interval = checker.params.health_interval;
            loop {
                let wait = jitter(interval, &mut checker.rng.fork());
                tokio::select! {
                    biased;
                    () = checker.cancel.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                tokio::select! {
                    biased;
                    () = checker.cancel.cancelled() => return,
                    () = checker.health_check() => {}
                }
            }
        });
        this
    }

    /// Lock, scan for a free healthy entry, flag it in use. No liveness check.
    async fn acquire(&self) -> Option<NaiveHandle> {
        let mut guard = self.state.lock().await;
        let s = &mut *guard;
        if s.closed {
            return None;
        }
        for e in s.conns.iter_mut() {
            if !e.in_use
                && e.healthy
                && let Some(conn) = e.conn.take()
            {
                e.in_use = true;
                s.acquired += 1;
                return Some(NaiveHandle { id: e.id, conn });
            }
        }
        None
    }

    /// The naive design has no dial on demand.
    async fn dial_on_demand(&self, _deadline: Instant) -> Option<NaiveHandle> {
        None
    }

    /// Retry until something is free (the caller bounds the wait).
    async fn acquire_wait(&self) -> Option<NaiveHandle> {
        loop {
            if let Some(h) = self.acquire().await {
                return Some(h);
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }

    /// Flip the flag back, under the lock (so in a task: the caller cannot
    /// wait). Checks neither the target nor the connection.
    fn release(&self, raw: NaiveHandle, conn: ConnId) {
        let this = self.clone();
        self.tasks.spawn("naive-release", async move {
            let alive = raw.conn.is_alive();
            let mut guard = this.state.lock().await;
            let s = &mut *guard;
            let live_before = this.world.live(this.index);
            let target = s.target;
            let kept = match s.conns.iter_mut().find(|e| e.id == raw.id) {
                Some(e) => {
                    e.conn = Some(raw.conn);
                    e.in_use = false;
                    s.released += 1;
                    true
                }
                None => {
                    drop(raw.conn);
                    false
                }
            };
            this.world.release_done(&ReleaseFacts {
                pool: this.index,
                conn,
                alive,
                draining: s.closed,
                live_before,
                target,
                kept,
            });
        });
    }

    /// Mark the entry unhealthy, close the connection, count the pool down.
    fn discard(&self, raw: NaiveHandle) {
        let this = self.clone();
        self.tasks.spawn("naive-discard", async move {
            let mut guard = this.state.lock().await;
            let s = &mut *guard;
            if let Some(e) = s.conns.iter_mut().find(|e| e.id == raw.id) {
                e.healthy = false;
                e.in_use = false;
            }
            drop(raw.conn);
            s.count = s.count.saturating_sub(1);
            s.discarded += 1;
            this.kick.notify_one();
        });
    }

    fn conn(raw: &NaiveHandle) -> &Conn {
        &raw.conn
    }

    fn conn_mut(raw: &mut NaiveHandle) -> &mut Conn {
        &mut raw.conn
    }

    /// The config goroutine: lock, store, ask the adjuster to run.
    fn set_target(&self, target: usize) {
        let this = self.clone();
        self.tasks.spawn("naive-config", async move {
            let mut s = this.state.lock().await;
            s.target = target.min(s.max);
            drop(s);
            this.kick.notify_one();
        });
    }

    fn reconcile(&self) {
        self.kick.notify_one();
    }

    /// The write-up's `GetPoolStats`: an O(n) scan under the lock.
    async fn snapshot(&self) -> SimSnapshot {
        let s = self.state.lock().await;
        let leased = s.conns.iter().filter(|e| e.in_use).count();
        SimSnapshot {
            target: s.target,
            max: s.max,
            live: s.conns.len(),
            idle: s.conns.len() - leased,
            leased,
            dialing: 0,
            acquired: s.acquired,
            released: s.released,
            discarded: s.discarded,
            dial_failures: s.dial_failures,
        }
    }

    fn healthy(&self) -> bool {
        true
    }

    fn shutdown(&self) {
        self.cancel.cancel();
        let this = self.clone();
        self.tasks.spawn("naive-close", async move {
            let mut s = this.state.lock().await;
            s.closed = true;
            s.conns.clear();
            s.count = 0;
        });
    }
}
