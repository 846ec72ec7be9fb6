//! The shared state of one run: the virtual clock, the trace, the truth about
//! every pool, the session records and the checker. One lock around all of it;
//! the runtime has one thread, so it is never contended. Never call into a pool
//! while holding it: a pool may close (drop) a connection, which reports here.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;

use crate::checker::{Checker, Kind};
use crate::runtime::Clock;
use crate::trace::Trace;
use crate::truth::{ConnId, Holder, PoolTruth};

/// What a client saw of its session.
#[derive(Debug, Clone, Default)]
pub struct ClientReport {
    pub sent: u64,
    pub received: u64,
    pub got_ended: bool,
    pub close_code: Option<u16>,
    /// When the Close came.
    pub close_at: Option<Instant>,
    /// `session.failover` notices it got.
    pub failovers: u32,
    /// The client meant to end gracefully (and did not vanish).
    pub graceful: bool,
}

/// One session, as the simulation saw it.
#[derive(Debug, Clone, Default)]
pub struct SessionRecord {
    pub pool: Option<usize>,
    pub conn: Option<ConnId>,
    /// A fault was injected on its backend connection (or its backend crashed).
    pub faulted: bool,
    pub outcome: Option<&'static str>,
    pub client: Option<ClientReport>,
    /// Every pool it leased from, in order (a takeover adds one).
    pub used: Vec<usize>,
    /// It may fail over (a resumable backend, failover on): how long after
    /// its last backend failure a 1014 may come at the latest.
    pub failover_bound: Option<std::time::Duration>,
    /// When the last of its backend connections failed.
    pub last_fault: Option<Instant>,
}

/// Figures of a run beyond the violations.
#[derive(Debug, Default, Clone)]
pub struct RunStats {
    /// Virtual milliseconds each session waited for a backend connection.
    pub acquire_waits_ms: Vec<u64>,
    pub sessions_started: u64,
    pub sessions_rejected: u64,
    pub sessions_clean: u64,
    pub sessions_failed: u64,
    /// Longest a snapshot (the pool's stats call) took, virtual ms.
    pub worst_snapshot_ms: u64,
    /// Client data shaped like a `session.*` control message that reached a
    /// backend (the proxy forwarded it as data).
    pub reserved_at_backend: u64,
    /// Clients that sent a forged `session.ended`.
    pub forged: u64,
    /// Frames of an ended session that backends sent after its `session.ended`.
    pub late_frames: u64,
    /// `session.failover` notices clients got.
    pub failovers: u64,
    /// Sessions that ended cleanly after failing over once / twice or more.
    pub resumed_once: u64,
    pub resumed_twice: u64,
    /// Graceful sessions on a resumable backend that did not end cleanly.
    pub resumable_failed: u64,
    /// Longest time from a resumable session's last backend failure to its
    /// 1014, virtual ms.
    pub worst_failover_close_ms: u64,
}

#[derive(Debug)]
pub struct WorldState {
    pub trace: Trace,
    pub checker: Checker,
    pub pools: Vec<PoolTruth>,
    pub sessions: BTreeMap<u64, SessionRecord>,
    pub stats: RunStats,
    /// Every fence token a backend was sent: none may reach a client.
    pub tokens: BTreeSet<String>,
}

#[derive(Debug)]
pub struct World {
    state: Mutex<WorldState>,
    pub clock: Clock,
    /// Faults are injected only while this is set.
    pub faults_on: AtomicBool,
    next_conn: AtomicU64,
}

impl World {
    pub fn new(clock: Clock, pools: Vec<PoolTruth>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(WorldState {
                trace: Trace::default(),
                checker: Checker::default(),
                pools,
                sessions: BTreeMap::new(),
                stats: RunStats::default(),
                tokens: BTreeSet::new(),
            }),
            clock,
            faults_on: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, WorldState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Run `f` on the state, with the current virtual time in ms.
    pub fn with<R>(&self, f: impl FnOnce(&mut WorldState, u64) -> R) -> R {
        let now = self.clock.ms();
        f(&mut self.lock(), now)
    }

    pub fn faults(&self) -> bool {
        self.faults_on.load(Ordering::Relaxed)
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Add an event to the trace.
    pub fn note(&self, text: impl FnOnce() -> String) {
        self.with(|s, now| s.trace.record(now, text()));
    }

    /// Report a violating event.
    pub fn violation(&self, kind: Kind, detail: String) {
        self.with(|s, now| s.checker.event(kind, now, detail, &mut s.trace));
    }

    /// A backend was sent this fence token.
    pub fn fence_token(&self, token: &str) {
        self.with(|s, _| {
            s.tokens.insert(token.to_string());
        });
    }

    /// Whether `token` is a fence token a backend was sent.
    pub fn is_fence_token(&self, token: &str) -> bool {
        self.with(|s, _| s.tokens.contains(token))
    }

    // ---- the truth about connections -------------------------------------

    /// A dial started; the returned flight must end with `succeeded` or `failed`
    /// (dropped otherwise: the dial was abandoned).
    pub fn dial_started(self: &Arc<Self>, pool: usize) -> DialFlight {
        self.with(|s, now| {
            let t = &mut s.pools[pool];
            t.inflight += 1;
            let (open, inflight) = (t.open.len(), t.inflight);
            s.trace.record(
                now,
                format!("p{pool} dial starts (open {open}, dialing {inflight})"),
            );
            bound_check(s, pool, now);
        });
        DialFlight {
            world: self.clone(),
            pool,
            done: false,
        }
    }

    /// A dial that the pool's dialer gave up on (its timeout).
    pub fn dial_timed_out(&self, pool: usize) {
        self.with(|s, now| {
            s.pools[pool].dial_failures += 1;
            s.trace.record(now, format!("p{pool} dial timed out"));
        });
    }

    /// The proxy's end of a connection was dropped: the connection is closed.
    pub fn closed(&self, pool: usize, conn: ConnId) {
        self.with(|s, now| {
            let t = &mut s.pools[pool];
            match t.open.remove(&conn) {
                Some(holder) => {
                    t.closed += 1;
                    if let Holder::Session(_) = holder {
                        t.session_held = t.session_held.saturating_sub(1);
                    }
                    s.trace.record(now, format!("p{pool} c{conn} closed"));
                }
                None => s.checker.event(
                    Kind::LostConnection,
                    now,
                    format!("p{pool} c{conn} closed but was not open"),
                    &mut s.trace,
                ),
            }
            bound_check(s, pool, now);
        });
    }

    /// A session took `conn` from pool `pool`.
    pub fn leased(&self, pool: usize, conn: ConnId, session: u64, backend_gone: bool) {
        self.with(|s, now| {
            let t = &mut s.pools[pool];
            t.acquired += 1;
            let before = t.open.get(&conn).copied();
            match before {
                Some(Holder::Pool) => {
                    t.open.insert(conn, Holder::Session(session));
                    t.session_held += 1;
                    s.trace
                        .record(now, format!("p{pool} c{conn} leased to s{session}"));
                }
                Some(Holder::Session(other)) => s.checker.event(
                    Kind::DoubleLease,
                    now,
                    format!("p{pool} c{conn} leased to s{session} while s{other} holds it"),
                    &mut s.trace,
                ),
                None => s.checker.event(
                    Kind::DeadHandout,
                    now,
                    format!("p{pool} c{conn} leased to s{session} but already closed"),
                    &mut s.trace,
                ),
            }
            if backend_gone {
                s.checker.event(
                    Kind::DeadHandout,
                    now,
                    format!("p{pool} c{conn} leased to s{session} after its backend closed it"),
                    &mut s.trace,
                );
            }
            let r = s.sessions.entry(session).or_default();
            let again = r.used.contains(&pool);
            r.used.push(pool);
            r.pool = Some(pool);
            r.conn = Some(conn);
            if again {
                s.checker.event(
                    Kind::BadTakeover,
                    now,
                    format!(
                        "s{session} leased from p{pool} again (a takeover to a backend it had)"
                    ),
                    &mut s.trace,
                );
            }
        });
    }

    /// A session handed `conn` back (released or discarded).
    pub fn returned(&self, pool: usize, conn: ConnId, session: u64, how: &str) {
        self.with(|s, now| {
            let t = &mut s.pools[pool];
            if let Some(h) = t.open.get_mut(&conn)
                && *h == Holder::Session(session)
            {
                *h = Holder::Pool;
                t.session_held = t.session_held.saturating_sub(1);
            }
            s.trace
                .record(now, format!("p{pool} c{conn} {how} by s{session}"));
        });
    }

    /// The outcome of a session's release, judged against the pool's release
    /// contract (docs/pool.md): kept if and only if alive, the pool open and
    /// not above target.
    pub fn release_done(&self, r: &ReleaseFacts) {
        self.with(|s, now| {
            let pool = r.pool;
            let still_open = s.pools[pool].open.contains_key(&r.conn);
            if r.kept {
                s.pools[pool].released_kept += 1;
            }
            if r.kept != still_open {
                s.checker.event(
                    Kind::LostConnection,
                    now,
                    format!(
                        "p{pool} c{}: release reported kept={} but the connection is {}",
                        r.conn,
                        r.kept,
                        if still_open { "open" } else { "closed" }
                    ),
                    &mut s.trace,
                );
            }
            let should_keep = r.alive && !r.draining && r.live_before <= r.target;
            if r.kept != should_keep {
                let why = if r.kept && r.live_before > r.target {
                    format!(
                        "kept c{} although live {} > target {}",
                        r.conn, r.live_before, r.target
                    )
                } else if r.kept {
                    format!("kept c{} although it is dead or the pool drains", r.conn)
                } else {
                    format!(
                        "closed healthy c{} at live {} <= target {}",
                        r.conn, r.live_before, r.target
                    )
                };
                s.checker.event(
                    Kind::ReleaseContract,
                    now,
                    format!("p{pool}: {why}"),
                    &mut s.trace,
                );
            }
        });
    }

    /// Truth: live connections of a pool now.
    pub fn live(&self, pool: usize) -> usize {
        self.with(|s, _| s.pools[pool].live())
    }
}

/// What a session's release found and did.
#[derive(Debug, Clone, Copy)]
pub struct ReleaseFacts {
    pub pool: usize,
    pub conn: ConnId,
    /// The connection passed its liveness check just before.
    pub alive: bool,
    pub draining: bool,
    /// Truth: live connections just before the release.
    pub live_before: usize,
    pub target: usize,
    /// The pool kept the connection as idle.
    pub kept: bool,
}

fn bound_check(s: &mut WorldState, pool: usize, now: u64) {
    let t = &mut s.pools[pool];
    let over = t.note_live();
    let (live, max) = (t.live(), t.max);
    let name = t.name.clone();
    s.checker.condition(
        Kind::OverMax,
        &name,
        over,
        now,
        || format!("live {live} (open + dialing) > max {max}"),
        &mut s.trace,
    );
}

/// A dial in flight, counted in the pool's truth until it ends.
#[derive(Debug)]
pub struct DialFlight {
    world: Arc<World>,
    pool: usize,
    done: bool,
}

impl DialFlight {
    /// The dial produced connection `conn` (now open).
    pub fn succeeded(mut self, conn: ConnId) {
        self.done = true;
        let pool = self.pool;
        self.world.with(|s, now| {
            let t = &mut s.pools[pool];
            t.inflight = t.inflight.saturating_sub(1);
            t.open.insert(conn, Holder::Pool);
            t.opened += 1;
            s.trace.record(now, format!("p{pool} c{conn} dialed"));
            bound_check(s, pool, now);
        });
    }

    /// The dial failed.
    pub fn failed(mut self, why: &str) {
        self.done = true;
        let pool = self.pool;
        self.world.with(|s, now| {
            let t = &mut s.pools[pool];
            t.inflight = t.inflight.saturating_sub(1);
            t.dial_failures += 1;
            s.trace.record(now, format!("p{pool} dial failed: {why}"));
        });
    }
}

impl Drop for DialFlight {
    fn drop(&mut self) {
        if !self.done {
            let pool = self.pool;
            self.world.with(|s, now| {
                let t = &mut s.pools[pool];
                t.inflight = t.inflight.saturating_sub(1);
                s.trace.record(now, format!("p{pool} dial abandoned"));
            });
        }
    }
}
