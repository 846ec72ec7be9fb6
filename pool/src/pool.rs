//! `ConnPool`: the per-backend pool of pre-established connections.
//!
//! # Where a connection is
//! An idle connection is in the queue (`queue.rs`) or on a stripe
//! (`stripes.rs`): a session's release leaves it on its thread's stripe when
//! that holds none, everything else goes to the queue. A session's acquire
//! looks at its own stripe, then the queue, then every stripe (its own last,
//! so one released on its thread meanwhile is found too). `checkout_idle`
//! looks at the queue first, so it reaches the longest idle connections; an
//! `IdleSweep` takes each stripe's connection, then the queued ones up to the
//! queue's mark taken when it began.
//!
//! # Accounting
//! `slots` packs two counts into one atomic word: `live`, every connection
//! slot the pool answers for (idle, leased, in hand while being returned, and
//! reserved for a dial in flight), and `dialing`, the reservations not yet
//! offered or given back. One word, so a reservation raises both at once and
//! a snapshot reads both at one instant. `live` changes only when a slot is
//! reserved (a CAS that refuses to pass `max`) or a connection or reservation
//! ends. `limits` packs `target` and `max` the same way, so they are always
//! read and changed together. `idle` is counted (the queue's length plus the
//! stripes that hold one); `leased` is derived: `live - dialing - idle`, so a
//! connection in hand (being released, or offered after its dial) counts as
//! leased until it is idle.
//! Acquire and release touch no shared counter: the session totals are
//! bumped on the thread's own stripe, and a total is a sum of monotonic
//! cells, never a difference, so it never runs backwards.
//!
//! # Invariants (checked by the loom suite, the proptest state machine, the
//! stress test and `sim`)
//! - A connection is in at most one place at a time: the queue, one stripe,
//!   one `Lease`, or closed. Ownership enforces it: the queue and the stripes
//!   move boxes, a `Lease` owns its connection, and every exit path of a
//!   `Lease` either puts it back or closes it.
//! - A connection is closed exactly once (`Connection::close` takes it by
//!   value); those still idle when the pool goes are closed by its `Drop`.
//! - `dialing + idle <= live` at every instant (a slot is counted in `live`
//!   before its connection appears anywhere, and leaves `live` after it left).
//! - `target <= max <= capacity` in every value of `limits`.
//! - `live` never grows past `max`: it grows only through the CAS in
//!   [`ConnPool::try_reserve`]. So `live <= max` at every instant, except after
//!   `max` is lowered below `live`: then `live` only falls, as the excess
//!   closes on release or by shrinking (`target <= max`), until it is back
//!   under `max`.
//! - Every total only grows.
//!
//! # Orderings
//! - `slots`: AcqRel read-modify-writes; the reservation CAS is the only
//!   increment of `live`, so concurrent reservations cannot overshoot `max`.
//! - `state`: set once to `DRAINING` with a SeqCst swap followed by a SeqCst
//!   fence; releasers read it after their own SeqCst fence, so either the
//!   drain's sweep finds what a releaser put back, or the releaser sees the
//!   flag and sweeps itself.
//! - Releasers and waiters order themselves with SeqCst fences (`waiters.rs`).
//! - `limits`: changed only by read-modify-writes (`set_target`'s CAS keeps
//!   the `max` it read, `set_limits` swaps both), so no change can undo
//!   another's `max`.
//! - Totals and `limits` reads are Relaxed or Acquire: they order nothing
//!   beyond their own value.

use std::fmt;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::task::{Context, Poll};

use crossbeam_utils::CachePadded;

use crate::counter::StripedCounter;
use crate::queue::ArrayQueue;
use crate::signal::Signal;
use crate::stripes::Stripes;
use crate::sync::{Arc, AtomicUsize, Ordering, STRIPES, fence, stripe};
use crate::waiters::{Ticket, Waiters};

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

/// Two counts in one atomic word: the low half and the high half.
const HALF: u32 = usize::BITS / 2;
/// The largest count a half holds; the capacity is clamped to it.
const HALF_MAX: usize = (1 << HALF) - 1;
/// `slots`: one more live slot.
const LIVE: usize = 1;
/// `slots`: one more reservation (always added together with `LIVE`).
const DIALING: usize = 1 << HALF;

fn pack(low: usize, high: usize) -> usize {
    low | (high << HALF)
}

fn low(word: usize) -> usize {
    word & HALF_MAX
}

fn high(word: usize) -> usize {
    word >> HALF
}

const OPEN: usize = 0;
const DRAINING: usize = 1;

/// Who a connection is taken for or given back by: the session totals count
/// only sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// A client session's lease (counted in `acquired_total`/`released_total`).
    Session,
    /// The pool's own business: offers, health checks, pruning, shrinking.
    Maintenance,
}

/// The shared state of one pool. Opaque: reachable only through [`ConnPool`]
/// and leases.
pub struct PoolCore<C: Connection> {
    /// Idle connections, each alive when it was queued. Boxed, so a slot is two
    /// words whatever the connection's size: the queue is allocated for its
    /// full capacity up front (a WebSocket connection is ~1.4 KiB inline).
    queue: ArrayQueue<Box<C>>,
    /// More idle connections, at most one per thread stripe, and the session
    /// totals (see `stripes.rs`). Idle = queued + on stripes.
    stripes: Stripes<C>,
    /// `live` (low half) and `dialing` (high half); see the module docs.
    slots: CachePadded<AtomicUsize>,
    /// `target` (low half) and `max` (high half). Read-mostly.
    limits: AtomicUsize,
    /// `OPEN`, then `DRAINING` for good.
    state: AtomicUsize,
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

/// An O(1), lock-free view of a pool's counters. Exact at quiescence.
///
/// Under concurrency: `live` and `dialing` are read together at one instant,
/// as are `target` and `max`; `idle` is counted by a scan during the call and
/// capped at `live - dialing` (the scan may see a connection that moves
/// between the queue and a stripe twice); `leased = live - dialing - idle`.
/// So every snapshot has `idle + leased + dialing == live` and
/// `target <= max`, and `live <= max` unless `max` was lowered below `live`
/// (see [`ConnPool::set_limits`]). Each total is a sum of monotonic cells: a
/// snapshot taken after another never shows a smaller total.
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
    /// Idle, ready for the next session.
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
        let capacity = config.capacity.clamp(1, HALF_MAX);
        let max = config.max.min(capacity);
        let target = config.target.min(max);
        Self {
            shared: Arc::new(PoolCore {
                queue: ArrayQueue::new(capacity),
                stripes: Stripes::new(),
                slots: CachePadded::new(AtomicUsize::new(0)),
                limits: AtomicUsize::new(pack(target, max)),
                state: AtomicUsize::new(OPEN),
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
        self.shared
            .acquire(Purpose::Session)
            .map(|conn| Lease::new(conn, self.shared.clone(), Purpose::Session))
    }

    /// Like [`ConnPool::acquire`], with a lease that borrows the pool instead of
    /// sharing ownership of it: no reference count is touched, so nothing on
    /// this path writes a cache line that other threads share except the queue.
    /// For callers that keep the pool alive longer than the lease anyway.
    pub fn acquire_ref(&self) -> Option<LeaseRef<'_, C>> {
        self.shared
            .acquire(Purpose::Session)
            .map(|conn| Lease::new(conn, &*self.shared, Purpose::Session))
    }

    /// Take one idle connection out for maintenance, like [`ConnPool::acquire`]
    /// but not counted as a session's lease, and looking at the queue first.
    /// To visit every idle connection once, use [`ConnPool::idle_sweep`].
    pub fn checkout_idle(&self) -> Option<Lease<C>> {
        self.shared
            .acquire(Purpose::Maintenance)
            .map(|conn| Lease::new(conn, self.shared.clone(), Purpose::Maintenance))
    }

    /// Visit each connection idle now once, for maintenance (a health round):
    /// the sweep hands out each stripe's connection, then each connection
    /// queued before the sweep began, as leases the totals ignore; dead ones
    /// it meets are closed instead. A lease
    /// released during the sweep goes to the back of the queue, behind the
    /// sweep's mark, so the sweep never meets it again; connections sessions
    /// take meanwhile are in use and need no visit.
    pub fn idle_sweep(&self) -> IdleSweep<C> {
        IdleSweep {
            shared: self.shared.clone(),
            mark: self.shared.queue.mark(),
            next_stripe: 0,
            dead_closed: 0,
        }
    }

    /// Wait until a connection is idle and take it. Completes with
    /// `Err(PoolDraining)` once the pool drains. Has no deadline of its own:
    /// wrap it in the caller's timer. Dropping the future is always safe.
    pub fn acquire_wait(&self) -> AcquireWait<C> {
        AcquireWait {
            shared: self.shared.clone(),
            ticket: None,
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
        let mut slots = s.slots.load(Ordering::Relaxed);
        loop {
            if low(slots) >= high(s.limits.load(Ordering::Acquire)) {
                return None;
            }
            match s.slots.compare_exchange_weak(
                slots,
                slots + LIVE + DIALING,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(current) => slots = current,
            }
        }
        Some(Reservation {
            shared: Some(self.shared.clone()),
        })
    }

    /// Set the number of connections the reconcile worker keeps (clamped to
    /// `max`, as it is at that instant) and ask it to run.
    pub fn set_target(&self, target: usize) {
        let s = &*self.shared;
        // A CAS, not a load of `max` and a store of `target`: a `set_limits`
        // between the two would leave `target` above the new `max`, and the
        // deficit positive for ever.
        let mut limits = s.limits.load(Ordering::Acquire);
        loop {
            let max = high(limits);
            match s.limits.compare_exchange_weak(
                limits,
                pack(target.min(max), max),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(current) => limits = current,
            }
        }
        s.reconcile.trigger();
    }

    /// Set target and max together (`max` clamped to the capacity, `target` to
    /// `max`). Lowering `max` below `live` refuses every reservation until
    /// `live` is back under it; the excess closes as it is released (it is
    /// above target) or by [`ConnPool::shrink_to_target`].
    pub fn set_limits(&self, target: usize, max: usize) {
        let s = &*self.shared;
        let max = max.min(s.queue.capacity());
        // A swap rather than a store: a read-modify-write, so it is ordered
        // against `set_target`'s CAS exactly as in C++ (loom models a plain
        // store racing a CAS less precisely, and must check this code).
        s.limits.swap(pack(target.min(max), max), Ordering::AcqRel);
        s.reconcile.trigger();
    }

    /// Hand out no more connections: idle ones are closed now, leased ones when
    /// their sessions end, reservations when they are offered. Irreversible.
    pub fn drain(&self) {
        self.shared.shut();
    }

    /// The same as [`ConnPool::drain`] (the pool has one end state); for
    /// callers that stop a pool for good rather than retire it.
    pub fn close(&self) {
        self.shared.shut();
    }

    pub fn is_draining(&self) -> bool {
        self.shared.state.load(Ordering::Acquire) != OPEN
    }

    /// Close idle connections that are no longer alive. Returns how many.
    /// Each connection idle now is checked once, and is out of the pool only
    /// for the moment it is checked.
    pub fn prune_dead_idle(&self) -> usize {
        // The sweep closes the dead ones it meets; putting an alive one back
        // may close it too, if the pool is above target.
        let mut sweep = self.idle_sweep();
        let mut closed = 0;
        for lease in sweep.by_ref() {
            if lease.release() == Returned::Closed {
                closed += 1;
            }
        }
        closed + sweep.dead_closed
    }

    /// Close idle connections while `live` is above target. Returns how many.
    /// Leased connections above target are closed when they are released.
    pub fn shrink_to_target(&self) -> usize {
        let s = &*self.shared;
        let mut closed = 0;
        while low(s.slots.load(Ordering::Acquire)) > low(s.limits.load(Ordering::Acquire)) {
            let Some(conn) = s.take_any_idle() else { break };
            if s.put_back(conn, Purpose::Maintenance) == Returned::Closed {
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
        low(s.limits.load(Ordering::Acquire)).saturating_sub(low(s.slots.load(Ordering::Acquire)))
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
        low(self.shared.slots.load(Ordering::Acquire))
    }

    /// See [`PoolSnapshot`] for what each field promises under concurrency.
    pub fn snapshot(&self) -> PoolSnapshot {
        let s = &*self.shared;
        let seen_idle = s.queue.len() + s.stripes.held();
        // `slots` before `limits`: if `max` is raised meanwhile, the `live`
        // we read is still within the `max` we read after it.
        let slots = s.slots.load(Ordering::Acquire);
        let limits = s.limits.load(Ordering::Acquire);
        let (live, dialing) = (low(slots), high(slots));
        let idle = seen_idle.min(live.saturating_sub(dialing));
        PoolSnapshot {
            capacity: s.queue.capacity(),
            target: low(limits),
            max: high(limits),
            live,
            idle,
            leased: live.saturating_sub(dialing).saturating_sub(idle),
            dialing,
            draining: s.state.load(Ordering::Acquire) != OPEN,
            acquired_total: s.stripes.acquired(),
            released_total: s.stripes.released(),
            discarded_total: s.discarded.sum(),
            dial_failures_total: s.dial_failures.sum(),
        }
    }
}

impl<C: Connection> fmt::Debug for PoolCore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolCore")
            .field("live", &low(self.slots.load(Ordering::Relaxed)))
            .finish_non_exhaustive()
    }
}

impl<C: Connection> fmt::Debug for ConnPool<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ConnPool").field(&self.snapshot()).finish()
    }
}

impl<C: Connection> PoolCore<C> {
    /// Take an alive idle connection for `purpose`; dead ones met on the way
    /// are closed. See the module docs for where each purpose looks.
    fn acquire(&self, purpose: Purpose) -> Option<Box<C>> {
        if self.state.load(Ordering::Acquire) != OPEN {
            return None;
        }
        match purpose {
            Purpose::Session => {
                let own = stripe();
                let conn = self
                    .take_from_stripe(own)
                    .or_else(|| self.take_from_queue())
                    // Every stripe, its own last: a connection released on
                    // this thread since the first look is found too.
                    .or_else(|| {
                        (1..=STRIPES).find_map(|k| self.take_from_stripe((own + k) % STRIPES))
                    })?;
                self.stripes.count_acquired(own);
                Some(conn)
            }
            Purpose::Maintenance => self
                .take_from_queue()
                .or_else(|| (0..STRIPES).find_map(|i| self.take_from_stripe(i))),
        }
    }

    /// An alive connection from the queue; dead ones are closed.
    fn take_from_queue(&self) -> Option<Box<C>> {
        while let Some(conn) = self.queue.pop() {
            if conn.is_alive() {
                return Some(conn);
            }
            self.close_conn(conn);
        }
        None
    }

    /// An alive connection from stripe `i`; a dead one is closed.
    fn take_from_stripe(&self, i: usize) -> Option<Box<C>> {
        let conn = self.stripes.take(i)?;
        if conn.is_alive() {
            Some(conn)
        } else {
            self.close_conn(conn);
            None
        }
    }

    /// Any idle connection, alive or not (for shrinking and draining).
    fn take_any_idle(&self) -> Option<Box<C>> {
        self.queue
            .pop()
            .or_else(|| (0..STRIPES).find_map(|i| self.stripes.take(i)))
    }

    /// Close a connection that holds a slot, and give the slot up.
    // The box is how connections live in the queue and in leases; it is
    // unboxed here only to hand the connection to `Connection::close`.
    #[allow(clippy::boxed_local)]
    fn close_conn(&self, conn: Box<C>) {
        (*conn).close();
        let before = low(self.slots.fetch_sub(LIVE, Ordering::AcqRel));
        self.discarded.incr();
        if self.state.load(Ordering::Acquire) == OPEN
            && before.saturating_sub(1) < low(self.limits.load(Ordering::Acquire))
        {
            self.reconcile.trigger();
        }
    }

    /// Give the slot of a live connection up if the pool is above target
    /// (deciding atomically with every other releaser, so the pool shrinks to
    /// target and never below it); otherwise keep it.
    /// Returns true if the slot was given up (the caller closes the connection).
    fn give_up_slot_if_over_target(&self) -> bool {
        let mut slots = self.slots.load(Ordering::Acquire);
        loop {
            if low(slots) <= low(self.limits.load(Ordering::Acquire)) {
                return false;
            }
            match self.slots.compare_exchange_weak(
                slots,
                slots - LIVE,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(current) => slots = current,
            }
        }
    }

    /// Make a connection that holds a slot idle, or close it if it is dead, the
    /// pool is draining, or the pool is above target. A session's release
    /// leaves it on the thread's stripe when that holds none; everything else
    /// goes to the queue.
    fn put_back(&self, conn: Box<C>, purpose: Purpose) -> Returned {
        if !conn.is_alive() || self.state.load(Ordering::Acquire) != OPEN {
            self.close_conn(conn);
            return Returned::Closed;
        }
        if self.give_up_slot_if_over_target() {
            (*conn).close();
            self.discarded.incr();
            return Returned::Closed;
        }
        let to_queue = match purpose {
            Purpose::Session => self.stripes.put(stripe(), conn).err(),
            Purpose::Maintenance => Some(conn),
        };
        if let Some(conn) = to_queue
            && let Err(conn) = self.queue.push(conn)
        {
            // Unreachable while `live <= capacity`; close rather than lose it.
            self.close_conn(conn);
            return Returned::Closed;
        }
        if purpose == Purpose::Session {
            self.stripes.count_released(stripe());
        }
        // Pairs with the fences in `shut` and `AcquireWait::poll`: either they
        // see the connection we just put back, or we see their flag or
        // registration. (SeqCst loads after the push's SeqCst CAS would do by
        // the C++ fence rules without this fence, but loom does not model those
        // rules, and the loom suite must check the code that runs.)
        fence(Ordering::SeqCst);
        if self.waiters.any() {
            self.waiters.notify_one();
        }
        if self.state.load(Ordering::Relaxed) != OPEN {
            // A drain started while we were putting it back: make sure
            // nothing stays idle.
            self.close_idle();
        }
        Returned::Idle
    }

    fn close_idle(&self) {
        while let Some(conn) = self.take_any_idle() {
            self.close_conn(conn);
        }
    }

    fn shut(&self) {
        self.state.swap(DRAINING, Ordering::SeqCst);
        // Pairs with the fence in `put_back`.
        fence(Ordering::SeqCst);
        self.close_idle();
        self.waiters.notify_all();
        self.reconcile.trigger();
    }
}

impl<C: Connection> Drop for PoolCore<C> {
    /// The last handle is gone (no lease, reservation or waiter is left):
    /// close what is still idle, so every connection is closed exactly once.
    fn drop(&mut self) {
        while let Some(conn) = self.take_any_idle() {
            (*conn).close();
        }
    }
}

/// Each connection idle when the sweep began, once ([`ConnPool::idle_sweep`]).
#[must_use = "iterators do nothing unless advanced"]
pub struct IdleSweep<C: Connection> {
    shared: Arc<PoolCore<C>>,
    /// The queue's mark when the sweep began.
    mark: usize,
    /// The next stripe to look at; `STRIPES` once all were.
    next_stripe: usize,
    /// Dead connections the sweep met and closed.
    dead_closed: usize,
}

impl<C: Connection> Iterator for IdleSweep<C> {
    type Item = Lease<C>;

    fn next(&mut self) -> Option<Lease<C>> {
        if self.shared.state.load(Ordering::Acquire) != OPEN {
            return None;
        }
        while self.next_stripe < STRIPES {
            let i = self.next_stripe;
            self.next_stripe += 1;
            if let Some(conn) = self.shared.stripes.take(i)
                && let Some(lease) = self.lease_if_alive(conn)
            {
                return Some(lease);
            }
        }
        while let Some(conn) = self.shared.queue.pop_before(self.mark) {
            if let Some(lease) = self.lease_if_alive(conn) {
                return Some(lease);
            }
        }
        None
    }
}

impl<C: Connection> IdleSweep<C> {
    /// A maintenance lease of `conn` if it is alive; a dead one is closed
    /// (not handed out: a health check would count it as a failed ping).
    fn lease_if_alive(&mut self, conn: Box<C>) -> Option<Lease<C>> {
        if conn.is_alive() {
            return Some(Lease::new(conn, self.shared.clone(), Purpose::Maintenance));
        }
        self.shared.close_conn(conn);
        self.dead_closed += 1;
        None
    }
}

impl<C: Connection> fmt::Debug for IdleSweep<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdleSweep")
            .field("next_stripe", &self.next_stripe)
            .finish_non_exhaustive()
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
    /// A session's lease, or a maintenance checkout (which the totals ignore).
    purpose: Purpose,
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
    use super::{Arc, Connection, PoolCore};

    pub trait Sealed {}
    impl<C: Connection> Sealed for Arc<PoolCore<C>> {}
    impl<C: Connection> Sealed for &PoolCore<C> {}
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
    fn new(conn: Box<C>, pool: P, purpose: Purpose) -> Self {
        Self {
            conn: Some(conn),
            pool,
            purpose,
        }
    }

    /// Give the connection back: queued if alive, the pool is open and not above
    /// target; closed otherwise.
    pub fn release(mut self) -> Returned {
        let Some(conn) = self.conn.take() else {
            return Returned::Closed;
        };
        self.pool.core().put_back(conn, self.purpose)
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
                // The slot stays live; it is no longer a reservation.
                s.slots.fetch_sub(DIALING, Ordering::AcqRel);
                s.put_back(Box::new(conn), Purpose::Maintenance)
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
        shared.slots.fetch_sub(DIALING, Ordering::AcqRel);
        shared.stripes.count_acquired(stripe());
        Lease::new(Box::new(conn), shared, Purpose::Session)
    }

    /// Give the slot back (the dial failed or was abandoned).
    pub fn unreserve(mut self) {
        self.give_back();
    }

    fn give_back(&mut self) {
        if let Some(s) = self.shared.take() {
            // Both at once: no snapshot sees the slot without its reservation.
            s.slots.fetch_sub(LIVE + DIALING, Ordering::AcqRel);
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
    /// Our place in line, from the first registration to the end of the wait
    /// (kept while woken, so a lost race does not send us to the back).
    ticket: Option<Ticket>,
}

impl<C: Connection> AcquireWait<C> {
    fn lease(&self, conn: Box<C>) -> Lease<C> {
        Lease::new(conn, self.shared.clone(), Purpose::Session)
    }

    fn leave(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.shared.waiters.deregister(ticket);
        }
    }
}

impl<C: Connection> Future for AcquireWait<C> {
    type Output = Result<Lease<C>, PoolDraining>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Some(conn) = this.shared.acquire(Purpose::Session) {
            this.leave();
            return Poll::Ready(Ok(this.lease(conn)));
        }
        if this.shared.state.load(Ordering::Acquire) != OPEN {
            this.leave();
            return Poll::Ready(Err(PoolDraining));
        }
        this.shared.waiters.register(&mut this.ticket, cx.waker());
        // Pairs with the fence in `put_back`: either the releaser sees our
        // registration, or we see its connection now.
        fence(Ordering::SeqCst);
        if let Some(conn) = this.shared.acquire(Purpose::Session) {
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
        if let Some(ticket) = self.ticket.take()
            && !self.shared.waiters.deregister(ticket)
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
            .field("waiting", &self.ticket.is_some())
            .finish()
    }
}
