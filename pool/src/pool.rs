//! `ConnPool`: the per-backend pool of pre-established connections.
//!
//! # Accounting
//! `live` counts every connection slot the pool answers for: idle (in the
//! queue), leased (owned by a [`Lease`]) and reserved for a dial in flight (owned
//! by a [`Reservation`]). It changes only when a slot is reserved (a CAS that
//! refuses to pass `max`) or when a connection or reservation ends. Everything
//! else is derived: `idle` is the queue's length, `leased = live - idle - dialing`.
//! Acquire and release therefore touch no shared counter except the queue itself;
//! the monotonic totals are striped per thread (see `counter.rs`).
//!
//! # Invariants (checked by the loom suite, the proptest state machine and `sim`)
//! - A connection is in at most one place at a time: the queue, one `Lease`, or
//!   closed. Ownership enforces it: the queue moves values, a `Lease` owns its
//!   connection, and every exit path of a `Lease` either queues or closes it.
//! - `live <= max` at every instant: `live` only grows through the CAS in
//!   [`ConnPool::try_reserve`].
//! - A connection is closed exactly once (`Connection::close` takes it by value).
//! - At quiescence the snapshot equals the truth: `live == idle + leased + dialing`.

use std::fmt;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::task::{Context, Poll};

use crossbeam_utils::CachePadded;

use crate::cache::{STRIPES, StripeCache};
use crate::counter::StripedCounter;
use crate::queue::ArrayQueue;
use crate::signal::Signal;
use crate::sync::{Arc, AtomicUsize, Ordering, fence};
use crate::waiters::Waiters;

/// What the pool needs to know about a connection. The pool never does I/O.
pub trait Connection: Send + Sized + 'static {
    /// Whether the connection may still carry a session. Must be cheap and must
    /// not block: the pool calls it on acquire and release.
    fn is_alive(&self) -> bool;

    /// Close the connection. The pool calls it exactly once for every
    /// connection it discards; it must not block (spawn or drop instead).
    fn close(self) {
        drop(self);
    }
}

/// Sizes of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Hard bound of the idle queue, fixed for the pool's life. `max` is clamped to it.
    pub capacity: usize,
    /// How many live connections the reconcile worker keeps.
    pub target: usize,
    /// Hard maximum of live connections (idle + leased + dialing).
    pub max: usize,
}

impl PoolConfig {
    /// `target` connections kept, up to `max`, with room for `max`.
    pub fn new(target: usize, max: usize) -> Self {
        let max = max.max(target);
        Self {
            capacity: max,
            target,
            max,
        }
    }
}

const OPEN: usize = 0;
const DRAINING: usize = 1;
const CLOSED: usize = 2;

/// The shared state of one pool. Opaque: reachable only through [`ConnPool`]
/// and leases.
pub struct PoolCore<C> {
    /// Idle connections, each alive when it was queued. Boxed, so a slot is two
    /// words whatever the connection's size: the queue is allocated for its
    /// full capacity up front (a WebSocket connection is ~1.4 KiB inline).
    idle: ArrayQueue<Box<C>>,
    /// More idle connections, parked one per thread stripe by sessions'
    /// releases (see `cache.rs`). Idle = queued + parked.
    parked: StripeCache<C>,
    /// idle + leased + dialing. Invariant: `live <= max` at every instant.
    live: CachePadded<AtomicUsize>,
    /// Reservations not yet offered or given back.
    dialing: AtomicUsize,
    /// Read-mostly settings; `target <= max <= idle.capacity()`.
    target: AtomicUsize,
    max: AtomicUsize,
    /// `OPEN`, or a combination of `DRAINING` and `CLOSED`. Only ever grows.
    state: AtomicUsize,
    /// Pops that did not hand a connection to a session (maintenance
    /// checkouts, pruning, shrinking, draining, dead connections skipped).
    /// `acquired_total` is the queue's total pops minus these, plus
    /// `direct_leases`: the hot path bumps no counter at all.
    maint_pops: StripedCounter,
    /// Pushes that were not a session's release (offers, maintenance returns).
    /// `released_total` is the queue's total pushes minus these.
    maint_pushes: StripedCounter,
    /// Leases made straight from a reservation (dial on demand).
    direct_leases: StripedCounter,
    discarded: StripedCounter,
    dial_failures: StripedCounter,
    waiters: Waiters,
    reconcile: Signal,
}

/// A pool of idle connections to one backend. Cheap to clone (a shared handle).
pub struct ConnPool<C: Connection> {
    shared: Arc<PoolCore<C>>,
}

impl<C: Connection> Clone for ConnPool<C> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

/// An O(1), lock-free view of a pool's counters. Exact at quiescence; under
/// concurrency each field is a value it held during the call.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolSnapshot {
    pub capacity: usize,
    pub target: usize,
    pub max: usize,
    pub live: usize,
    pub idle: usize,
    pub leased: usize,
    pub dialing: usize,
    pub draining: bool,
    pub acquired_total: usize,
    pub released_total: usize,
    pub discarded_total: usize,
    pub dial_failures_total: usize,
}

/// What became of a connection handed back to the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Returned {
    /// Queued as idle, ready for the next session.
    Idle,
    /// Closed: dead, the pool is draining, or the pool was over target.
    Closed,
}

/// Why [`ConnPool::acquire_wait`] gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolDraining;

impl fmt::Display for PoolDraining {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the pool is draining and hands out no connections")
    }
}

impl std::error::Error for PoolDraining {}

impl<C: Connection> ConnPool<C> {
    pub fn new(config: PoolConfig) -> Self {
        let capacity = config.capacity.max(1);
        let max = config.max.min(capacity);
        let target = config.target.min(max);
        Self {
            shared: Arc::new(PoolCore {
                idle: ArrayQueue::new(capacity),
                parked: StripeCache::new(),
                live: CachePadded::new(AtomicUsize::new(0)),
                dialing: AtomicUsize::new(0),
                target: AtomicUsize::new(target),
                max: AtomicUsize::new(max),
                state: AtomicUsize::new(OPEN),
                maint_pops: StripedCounter::new(),
                maint_pushes: StripedCounter::new(),
                direct_leases: StripedCounter::new(),
                discarded: StripedCounter::new(),
                dial_failures: StripedCounter::new(),
                waiters: Waiters::new(),
                reconcile: Signal::new(),
            }),
        }
    }

    /// Take an idle connection, if there is one. Never blocks, never does I/O.
    /// Dead idle connections met on the way are closed.
    pub fn acquire(&self) -> Option<Lease<C>> {
        self.shared.acquire(true).map(|conn| Lease {
            conn: Some(conn),
            pool: self.shared.clone(),
            counted: true,
        })
    }

    /// Like [`ConnPool::acquire`], with a lease that borrows the pool instead of
    /// sharing ownership of it: no reference count is touched, so nothing on
    /// this path writes a cache line that other threads share except the queue.
    /// For callers that keep the pool alive longer than the lease anyway.
    pub fn acquire_ref(&self) -> Option<LeaseRef<'_, C>> {
        self.shared.acquire(true).map(|conn| Lease {
            conn: Some(conn),
            pool: &*self.shared,
            counted: true,
        })
    }

    /// Take an idle connection out for maintenance (a health check), like
    /// [`ConnPool::acquire`] but not counted as a session's lease in the totals.
    pub fn checkout_idle(&self) -> Option<Lease<C>> {
        self.shared.acquire(false).map(|conn| Lease {
            conn: Some(conn),
            pool: self.shared.clone(),
            counted: false,
        })
    }

    /// Wait until a connection is idle and take it. Completes with
    /// `Err(PoolDraining)` once the pool drains. Has no deadline of its own:
    /// wrap it in the caller's timer. Dropping the future is always safe.
    pub fn acquire_wait(&self) -> AcquireWait<C> {
        AcquireWait {
            shared: self.shared.clone(),
            key: None,
        }
    }

    /// Reserve a slot for a connection about to be dialed, unless that would take
    /// `live` past `max` or the pool is draining. A compare-and-swap loop, so
    /// concurrent reservations can never overshoot `max` together.
    pub fn try_reserve(&self) -> Option<Reservation<C>> {
        let s = &*self.shared;
        if s.state.load(Ordering::Acquire) != OPEN {
            return None;
        }
        let mut live = s.live.load(Ordering::Relaxed);
        loop {
            if live >= s.max.load(Ordering::Relaxed) {
                return None;
            }
            match s
                .live
                .compare_exchange_weak(live, live + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(current) => live = current,
            }
        }
        s.dialing.fetch_add(1, Ordering::Relaxed);
        Some(Reservation {
            shared: Some(self.shared.clone()),
        })
    }

    /// Set the number of connections the reconcile worker keeps (clamped to
    /// `max`) and ask it to run.
    pub fn set_target(&self, target: usize) {
        let s = &*self.shared;
        s.target
            .store(target.min(s.max.load(Ordering::Relaxed)), Ordering::Release);
        s.reconcile.trigger();
    }

    /// Set target and max together (`max` clamped to the capacity, `target` to `max`).
    pub fn set_limits(&self, target: usize, max: usize) {
        let s = &*self.shared;
        let max = max.min(s.idle.capacity());
        s.max.store(max, Ordering::Release);
        s.target.store(target.min(max), Ordering::Release);
        s.reconcile.trigger();
    }

    /// Hand out no more connections: idle ones are closed now, leased ones when
    /// their sessions end, reservations when they are offered. Irreversible.
    pub fn drain(&self) {
        self.shared.shut(DRAINING);
    }

    /// Like [`ConnPool::drain`]; also marks the pool closed for good.
    pub fn close(&self) {
        self.shared.shut(DRAINING | CLOSED);
    }

    pub fn is_draining(&self) -> bool {
        self.shared.state.load(Ordering::Acquire) != OPEN
    }

    /// Close idle connections that are no longer alive. Returns how many.
    /// Each idle connection is out of the queue only for the moment it is checked.
    pub fn prune_dead_idle(&self) -> usize {
        let s = &*self.shared;
        let mut closed = 0;
        for _ in 0..s.idle.len() {
            let Some(conn) = s.idle.pop() else { break };
            s.maint_pops.incr();
            if conn.is_alive() {
                if s.put_back(conn, false) == Returned::Closed {
                    closed += 1;
                }
            } else {
                s.close_conn(conn);
                closed += 1;
            }
        }
        for i in 0..STRIPES {
            let Some(conn) = s.parked.take(i) else {
                continue;
            };
            if conn.is_alive() {
                if s.put_back(conn, false) == Returned::Closed {
                    closed += 1;
                }
            } else {
                s.close_conn(conn);
                closed += 1;
            }
        }
        closed
    }

    /// Close idle connections while `live` is above target. Returns how many.
    /// Leased connections above target are closed when they are released.
    pub fn shrink_to_target(&self) -> usize {
        let s = &*self.shared;
        let mut closed = 0;
        while s.live.load(Ordering::Acquire) > s.target.load(Ordering::Acquire) {
            let conn = match s.idle.pop() {
                Some(c) => {
                    s.maint_pops.incr();
                    c
                }
                None => match (0..STRIPES).find_map(|i| s.parked.take(i)) {
                    Some(c) => c,
                    None => break,
                },
            };
            if s.put_back(conn, false) == Returned::Closed {
                closed += 1;
            } else {
                break;
            }
        }
        closed
    }

    /// How many connections the pool is short of its target.
    pub fn deficit(&self) -> usize {
        let s = &*self.shared;
        s.target
            .load(Ordering::Acquire)
            .saturating_sub(s.live.load(Ordering::Acquire))
    }

    /// Count a dial that failed (the caller gives its reservation back).
    pub fn record_dial_failure(&self) {
        self.shared.dial_failures.incr();
    }

    /// The pool's reconcile request flag: whoever changes what the pool should
    /// hold triggers it; the pool's one reconcile worker waits on it.
    pub fn reconcile_signal(&self) -> &Signal {
        &self.shared.reconcile
    }

    /// Live connections (idle + leased + dialing) now: one atomic load.
    pub fn live(&self) -> usize {
        self.shared.live.load(Ordering::Acquire)
    }

    pub fn snapshot(&self) -> PoolSnapshot {
        let s = &*self.shared;
        let live = s.live.load(Ordering::Acquire);
        let dialing = s.dialing.load(Ordering::Acquire);
        let idle = s.idle.len() + s.parked.len();
        PoolSnapshot {
            capacity: s.idle.capacity(),
            target: s.target.load(Ordering::Acquire),
            max: s.max.load(Ordering::Acquire),
            live,
            idle,
            leased: live.saturating_sub(idle).saturating_sub(dialing),
            dialing,
            draining: s.state.load(Ordering::Acquire) != OPEN,
            acquired_total: s
                .idle
                .total_pops()
                .wrapping_sub(s.maint_pops.sum())
                .wrapping_add(s.direct_leases.sum())
                .wrapping_add(s.parked.takes()),
            released_total: s
                .idle
                .total_pushes()
                .wrapping_sub(s.maint_pushes.sum())
                .wrapping_add(s.parked.puts()),
            discarded_total: s.discarded.sum(),
            dial_failures_total: s.dial_failures.sum(),
        }
    }
}

impl<C> fmt::Debug for PoolCore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolCore")
            .field("live", &self.live.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<C: Connection> fmt::Debug for ConnPool<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ConnPool").field(&self.snapshot()).finish()
    }
}

impl<C: Connection> PoolCore<C> {
    /// Pop an alive idle connection. `session`: for a session's lease (counted
    /// by derivation) rather than maintenance (counted in `maint_pops`).
    ///
    /// A session looks at its own stripe's parked connection first, then the
    /// queue, then every other stripe; maintenance looks at the queue first
    /// (so a health round reaches the longest idle connections), then every
    /// stripe. Dead connections met on the way are closed.
    fn acquire(&self, session: bool) -> Option<Box<C>> {
        if self.state.load(Ordering::Acquire) != OPEN {
            return None;
        }
        let own = self.parked.own();
        if session && let Some(conn) = self.take_parked(own, session) {
            return Some(conn);
        }
        while let Some(conn) = self.idle.pop() {
            if conn.is_alive() {
                if !session {
                    self.maint_pops.incr();
                }
                return Some(conn);
            }
            self.maint_pops.incr();
            self.close_conn(conn);
        }
        (0..STRIPES)
            .filter(|&i| !(session && i == own))
            .find_map(|i| self.take_parked(i, session))
    }

    /// An alive connection parked on stripe `i`; a dead one is closed.
    fn take_parked(&self, i: usize, session: bool) -> Option<Box<C>> {
        let conn = self.parked.take(i)?;
        if conn.is_alive() {
            if session {
                self.parked.count_take(i);
            }
            Some(conn)
        } else {
            self.close_conn(conn);
            None
        }
    }

    /// Close a connection that holds a slot, and give the slot up.
    // The box is how connections live in the queue and in leases; it is
    // unboxed here only to hand the connection to `Connection::close`.
    #[allow(clippy::boxed_local)]
    fn close_conn(&self, conn: Box<C>) {
        (*conn).close();
        let before = self.live.fetch_sub(1, Ordering::AcqRel);
        self.discarded.incr();
        if self.state.load(Ordering::Acquire) == OPEN
            && before.saturating_sub(1) < self.target.load(Ordering::Acquire)
        {
            self.reconcile.trigger();
        }
    }

    /// Give the slot of a live connection up if the pool is above target
    /// (deciding atomically with every other releaser, so the pool shrinks to
    /// target and never below it); otherwise keep it.
    /// Returns true if the slot was given up (the caller closes the connection).
    fn give_up_slot_if_over_target(&self) -> bool {
        let mut live = self.live.load(Ordering::Acquire);
        loop {
            if live <= self.target.load(Ordering::Acquire) {
                return false;
            }
            match self.live.compare_exchange_weak(
                live,
                live - 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(current) => live = current,
            }
        }
    }

    /// Queue a connection that holds a slot, or close it if it is dead, the pool
    /// is draining, or the pool is above target.
    /// `session`: a session's release (counted by derivation) rather than an
    /// offer or a maintenance return (counted in `maint_pushes`).
    fn put_back(&self, conn: Box<C>, session: bool) -> Returned {
        if !conn.is_alive() || self.state.load(Ordering::Acquire) != OPEN {
            self.close_conn(conn);
            return Returned::Closed;
        }
        if self.give_up_slot_if_over_target() {
            (*conn).close();
            self.discarded.incr();
            return Returned::Closed;
        }
        // A session's release parks the connection on its thread's stripe when
        // that slot is free; everything else goes to the queue.
        let conn = if session {
            self.parked.put(conn, true).err()
        } else {
            Some(conn)
        };
        if let Some(conn) = conn {
            if let Err(conn) = self.idle.push(conn) {
                // Unreachable while `live <= max <= capacity`; close rather than lose it.
                self.close_conn(conn);
                return Returned::Closed;
            }
            if !session {
                self.maint_pushes.incr();
            }
        }
        // Pairs with the fences in `shut` and `AcquireWait::poll`: either they
        // see the connection we just queued, or we see their flag or
        // registration. (SeqCst loads after the push's SeqCst CAS would do by
        // the C++ fence rules without this fence, but loom does not model those
        // rules, and the loom suite must check the code that runs.)
        fence(Ordering::SeqCst);
        if self.waiters.any() {
            self.waiters.notify_one();
        }
        if self.state.load(Ordering::Relaxed) != OPEN {
            // A drain started while we were queueing: make sure nothing stays idle.
            self.close_idle();
        }
        Returned::Idle
    }

    fn close_idle(&self) {
        while let Some(conn) = self.idle.pop() {
            self.maint_pops.incr();
            self.close_conn(conn);
        }
        for i in 0..STRIPES {
            if let Some(conn) = self.parked.take(i) {
                self.close_conn(conn);
            }
        }
    }

    fn shut(&self, flags: usize) {
        self.state.fetch_or(flags, Ordering::SeqCst);
        // Pairs with the fence in `put_back`.
        fence(Ordering::SeqCst);
        self.close_idle();
        self.waiters.notify_all();
        self.reconcile.trigger();
    }
}

/// A connection leased to one session. Returned with [`Lease::release`] once
/// the session ended cleanly; dropped any other way (panic, cancellation,
/// fencing not completed, [`Lease::discard`]) the connection is closed, so an
/// unclean connection can never go back to the pool.
pub struct Lease<C: Connection, P: PoolRef<C> = Arc<PoolCore<C>>> {
    /// `Some` until the lease ends.
    conn: Option<Box<C>>,
    /// How the lease reaches its pool: shared ownership (the default, for
    /// leases that move into tasks) or a borrow ([`LeaseRef`]).
    pool: P,
    /// False for a maintenance checkout, which the session totals ignore.
    counted: bool,
}

/// A lease that borrows its pool ([`ConnPool::acquire_ref`]).
pub type LeaseRef<'a, C> = Lease<C, &'a PoolCore<C>>;

/// How a lease refers to its pool. Sealed: implemented for `Arc<PoolCore<C>>`
/// and `&PoolCore<C>` only.
pub trait PoolRef<C: Connection>: sealed::Sealed {
    #[doc(hidden)]
    fn core(&self) -> &PoolCore<C>;
}

mod sealed {
    pub trait Sealed {}
    impl<C> Sealed for super::Arc<super::PoolCore<C>> {}
    impl<C> Sealed for &super::PoolCore<C> {}
}

impl<C: Connection> PoolRef<C> for Arc<PoolCore<C>> {
    fn core(&self) -> &PoolCore<C> {
        self
    }
}

impl<C: Connection> PoolRef<C> for &PoolCore<C> {
    fn core(&self) -> &PoolCore<C> {
        self
    }
}

impl<C: Connection, P: PoolRef<C>> Lease<C, P> {
    /// Give the connection back: queued if alive, the pool is open and not above
    /// target; closed otherwise.
    pub fn release(mut self) -> Returned {
        let Some(conn) = self.conn.take() else {
            return Returned::Closed;
        };
        self.pool.core().put_back(conn, self.counted)
    }

    /// Close the connection (it is not fit for another session).
    pub fn discard(mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.core().close_conn(conn);
        }
    }

    /// Whether the pool this lease came from is draining.
    pub fn pool_draining(&self) -> bool {
        self.pool.core().state.load(Ordering::Acquire) != OPEN
    }
}

impl<C: Connection, P: PoolRef<C>> Deref for Lease<C, P> {
    type Target = C;

    fn deref(&self) -> &C {
        match &self.conn {
            Some(c) => c,
            // `conn` is only taken by methods that consume the lease.
            None => unreachable!("a live Lease always holds its connection"),
        }
    }
}

impl<C: Connection, P: PoolRef<C>> DerefMut for Lease<C, P> {
    fn deref_mut(&mut self) -> &mut C {
        match &mut self.conn {
            Some(c) => c,
            None => unreachable!("a live Lease always holds its connection"),
        }
    }
}

impl<C: Connection, P: PoolRef<C>> Drop for Lease<C, P> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.core().close_conn(conn);
        }
    }
}

impl<C: Connection, P: PoolRef<C>> fmt::Debug for Lease<C, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("held", &self.conn.is_some())
            .finish()
    }
}

/// A slot reserved for a connection being dialed. Counted in `live` (and
/// `dialing`) from the moment it exists, so dials in flight cannot overshoot
/// `max`. Dropped without [`Reservation::offer`] or [`Reservation::into_lease`],
/// the slot is given back.
pub struct Reservation<C: Connection> {
    /// `Some` until the reservation ends.
    shared: Option<Arc<PoolCore<C>>>,
}

impl<C: Connection> Reservation<C> {
    /// Put the freshly dialed connection into the pool as idle.
    pub fn offer(mut self, conn: C) -> Returned {
        match self.shared.take() {
            Some(s) => {
                s.dialing.fetch_sub(1, Ordering::AcqRel);
                s.put_back(Box::new(conn), false)
            }
            None => {
                conn.close();
                Returned::Closed
            }
        }
    }

    /// Lease the freshly dialed connection directly (a dial on demand).
    pub fn into_lease(mut self, conn: C) -> Lease<C> {
        let shared = match self.shared.take() {
            Some(s) => s,
            None => unreachable!("a live Reservation always holds its pool"),
        };
        shared.dialing.fetch_sub(1, Ordering::AcqRel);
        shared.direct_leases.incr();
        Lease {
            conn: Some(Box::new(conn)),
            pool: shared,
            counted: true,
        }
    }

    /// Give the slot back (the dial failed or was abandoned).
    pub fn unreserve(mut self) {
        self.give_back();
    }

    fn give_back(&mut self) {
        if let Some(s) = self.shared.take() {
            s.dialing.fetch_sub(1, Ordering::AcqRel);
            s.live.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl<C: Connection> Drop for Reservation<C> {
    fn drop(&mut self) {
        self.give_back();
    }
}

impl<C: Connection> fmt::Debug for Reservation<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("held", &self.shared.is_some())
            .finish()
    }
}

/// Future returned by [`ConnPool::acquire_wait`].
#[must_use = "futures do nothing unless polled"]
pub struct AcquireWait<C: Connection> {
    shared: Arc<PoolCore<C>>,
    /// Our key in the waiter registry while registered (or woken and not yet re-polled).
    key: Option<usize>,
}

impl<C: Connection> AcquireWait<C> {
    fn lease(&self, conn: Box<C>) -> Lease<C> {
        Lease {
            conn: Some(conn),
            pool: self.shared.clone(),
            counted: true,
        }
    }

    fn leave(&mut self) {
        if let Some(key) = self.key.take() {
            self.shared.waiters.deregister(key);
        }
    }
}

impl<C: Connection> Future for AcquireWait<C> {
    type Output = Result<Lease<C>, PoolDraining>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Some(conn) = this.shared.acquire(true) {
            this.leave();
            return Poll::Ready(Ok(this.lease(conn)));
        }
        if this.shared.state.load(Ordering::Acquire) != OPEN {
            this.leave();
            return Poll::Ready(Err(PoolDraining));
        }
        this.shared.waiters.register(&mut this.key, cx.waker());
        // Pairs with the fence in `put_back`: either the releaser sees our
        // registration, or we see its connection now.
        fence(Ordering::SeqCst);
        if let Some(conn) = this.shared.acquire(true) {
            this.leave();
            return Poll::Ready(Ok(this.lease(conn)));
        }
        if this.shared.state.load(Ordering::Acquire) != OPEN {
            this.leave();
            return Poll::Ready(Err(PoolDraining));
        }
        Poll::Pending
    }
}

impl<C: Connection> Drop for AcquireWait<C> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take()
            && !self.shared.waiters.deregister(key)
        {
            // We were woken but leave without taking the connection: pass the
            // wake-up on so it is not lost.
            self.shared.waiters.notify_one();
        }
    }
}

impl<C: Connection> fmt::Debug for AcquireWait<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcquireWait")
            .field("registered", &self.key.is_some())
            .finish()
    }
}
