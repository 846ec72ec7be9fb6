//! The pool's stripes: one cache-padded cell per thread stripe (see
//! `sync.rs`) in front of the idle queue.
//!
//! A session that ends on one thread and a session that starts on the same
//! thread would otherwise meet in the shared queue, whose head and tail cache
//! lines (and slots) move between cores on every operation. Each stripe holds
//! at most one idle connection on a cache line its thread mostly owns alone,
//! so the common release-then-acquire on one thread costs no cross-core
//! traffic. A connection on a stripe is an idle connection like a queued one:
//! an acquire falls back to the queue and then to every stripe, and drain,
//! shrink, prune and health sweeps reach them too.
//!
//! The stripe's cell also carries the pool's session totals (acquired,
//! released): a thread bumps its own stripe's, on the line it already writes,
//! so no shared counter sits on the acquire/release path, and a total is a sum
//! of monotonic cells, which never runs backwards.
//!
//! # Invariants
//! - A stripe's `conn` is null or a pointer from `Box::into_raw` that no one
//!   else holds: it is published by a CAS from null and taken by a swap to
//!   null, so exactly one thread ever turns it back into a box.
//! - `acquired` and `released` only grow.
//!
//! # Orderings
//! - `put`'s CAS is Release and `take`'s swap Acquire: the taker sees the
//!   connection as the putter left it. `take`'s swap is also Release, and its
//!   first look an Acquire load: an acquire that finds a stripe emptied by
//!   another acquire then sees everything that acquire had seen, so a
//!   connection that arrived on another stripe before that (say, released
//!   before the other thread started) is not missed by a scan that looks
//!   there next (loom: `acquire_rechecks_its_own_stripe_when_stealing`).
//! - The totals are Relaxed: they order nothing, they only count. A later
//!   read of a cell never returns less than an earlier one (coherence), so a
//!   sum taken after another is never smaller.
//! - The pool's no-lost-wake-up argument needs a stripe's `conn` write and
//!   the waiter count to be ordered by SeqCst fences on both sides; the loads
//!   here may be Relaxed because those fences order them (see `waiters.rs`).

use std::ptr;

use crossbeam_utils::CachePadded;

use crate::sync::{AtomicPtr, AtomicUsize, Ordering, STRIPES};

struct Stripe<C> {
    /// An idle connection (from `Box::into_raw`), or null.
    conn: AtomicPtr<C>,
    /// Session acquires made by threads on this stripe.
    acquired: AtomicUsize,
    /// Session releases made by threads on this stripe that left the
    /// connection idle.
    released: AtomicUsize,
}

/// The pool's stripes, indexed by `sync::stripe()`.
pub(crate) struct Stripes<C> {
    cells: Box<[CachePadded<Stripe<C>>]>,
}

// Safety: the stripes move boxed connections between threads whole, like the
// queue; a box is reachable from exactly one place at a time.
unsafe impl<C: Send> Send for Stripes<C> {}
// Safety: as above.
unsafe impl<C: Send> Sync for Stripes<C> {}

impl<C> Stripes<C> {
    pub(crate) fn new() -> Self {
        Self {
            cells: (0..STRIPES)
                .map(|_| {
                    CachePadded::new(Stripe {
                        conn: AtomicPtr::new(ptr::null_mut()),
                        acquired: AtomicUsize::new(0),
                        released: AtomicUsize::new(0),
                    })
                })
                .collect(),
        }
    }

    /// Hold `conn` on stripe `i`, or hand it back if that stripe holds one.
    pub(crate) fn put(&self, i: usize, conn: Box<C>) -> Result<(), Box<C>> {
        let cell = &self.cells[i];
        let raw = Box::into_raw(conn);
        match cell
            .conn
            .compare_exchange(ptr::null_mut(), raw, Ordering::Release, Ordering::Relaxed)
        {
            Ok(_) => Ok(()),
            // Safety: the CAS failed, so `raw` was never published: we still
            // own the box we just turned into it.
            Err(_) => Err(unsafe { Box::from_raw(raw) }),
        }
    }

    /// Take the connection on stripe `i`, if any.
    pub(crate) fn take(&self, i: usize) -> Option<Box<C>> {
        let cell = &self.cells[i];
        // A load first: an empty stripe costs no write to its line.
        if cell.conn.load(Ordering::Acquire).is_null() {
            return None;
        }
        let raw = cell.conn.swap(ptr::null_mut(), Ordering::AcqRel);
        if raw.is_null() {
            return None;
        }
        // Safety: our swap moved the non-null pointer out of the stripe, so we
        // are its only owner; it came from `Box::into_raw` in `put`, and the
        // swap (Acquire) saw the Release CAS that published it.
        Some(unsafe { Box::from_raw(raw) })
    }

    /// Count a session acquire by a thread on stripe `i`.
    pub(crate) fn count_acquired(&self, i: usize) {
        self.cells[i].acquired.fetch_add(1, Ordering::Relaxed);
    }

    /// Count a session release (left idle) by a thread on stripe `i`.
    pub(crate) fn count_released(&self, i: usize) {
        self.cells[i].released.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections on stripes now (a scan of `STRIPES` cells: O(1)).
    pub(crate) fn held(&self) -> usize {
        self.cells
            .iter()
            .filter(|c| !c.conn.load(Ordering::Acquire).is_null())
            .count()
    }

    /// Session acquires so far: a sum of monotonic cells.
    pub(crate) fn acquired(&self) -> usize {
        self.cells
            .iter()
            .map(|c| c.acquired.load(Ordering::Relaxed))
            .fold(0, usize::wrapping_add)
    }

    /// Session releases that left the connection idle so far.
    pub(crate) fn released(&self) -> usize {
        self.cells
            .iter()
            .map(|c| c.released.load(Ordering::Relaxed))
            .fold(0, usize::wrapping_add)
    }
}

impl<C> Drop for Stripes<C> {
    fn drop(&mut self) {
        // The pool closes what is left before its stripes go (`PoolCore`'s
        // `Drop`); free anything still here rather than leak it.
        for i in 0..STRIPES {
            drop(self.take(i));
        }
    }
}
