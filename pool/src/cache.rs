//! Per-thread parking slots in front of the idle queue.
//!
//! A session that ends on one thread and a session that starts on the same
//! thread would otherwise meet in the shared queue, whose head and tail cache
//! lines (and slots) move between cores on every operation. Each stripe — one
//! per thread, handed out round-robin like the counters' stripes — parks one
//! idle connection on a cache line that thread mostly owns alone, so the common
//! release-then-acquire costs no cross-core traffic. Parked connections are
//! idle connections like the queued ones: acquire falls back to the queue and
//! then to every other stripe, and drain, shrink, prune and health checks reach
//! them too.

use std::ptr;

use crossbeam_utils::CachePadded;

use crate::sync::{AtomicPtr, AtomicUsize, Ordering, stripe_hint};

/// Stripes: as many as threads that commonly run sessions at once.
#[cfg(not(loom))]
pub(crate) const STRIPES: usize = 8;
/// Two under loom, so the model checks stealing from another stripe.
#[cfg(loom)]
pub(crate) const STRIPES: usize = 2;

struct Slot<C> {
    /// A parked idle connection (from `Box::into_raw`), or null. Whoever swaps
    /// a non-null pointer out owns that box.
    conn: AtomicPtr<C>,
    /// Session releases parked here, and session acquires served from here
    /// (totals; on the same line as the slot, which its thread mostly owns).
    puts: AtomicUsize,
    takes: AtomicUsize,
}

/// One parking slot per stripe.
pub(crate) struct StripeCache<C> {
    slots: Box<[CachePadded<Slot<C>>]>,
}

// Safety: the cache moves boxed connections between threads whole, like the
// queue; a box is reachable from exactly one place at a time.
unsafe impl<C: Send> Send for StripeCache<C> {}
// Safety: as above.
unsafe impl<C: Send> Sync for StripeCache<C> {}

impl<C> StripeCache<C> {
    pub(crate) fn new() -> Self {
        Self {
            slots: (0..STRIPES)
                .map(|_| {
                    CachePadded::new(Slot {
                        conn: AtomicPtr::new(ptr::null_mut()),
                        puts: AtomicUsize::new(0),
                        takes: AtomicUsize::new(0),
                    })
                })
                .collect(),
        }
    }

    /// This thread's stripe.
    pub(crate) fn own(&self) -> usize {
        stripe_hint() % STRIPES
    }

    /// Park `conn` on this thread's stripe, or hand it back if the slot is taken.
    /// `session`: counts as a session's release.
    pub(crate) fn put(&self, conn: Box<C>, session: bool) -> Result<(), Box<C>> {
        let slot = &self.slots[self.own()];
        let raw = Box::into_raw(conn);
        match slot
            .conn
            .compare_exchange(ptr::null_mut(), raw, Ordering::Release, Ordering::Relaxed)
        {
            Ok(_) => {
                if session {
                    slot.puts.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
            // Safety: the CAS failed, so `raw` was never published: we still
            // own the box we just turned into it.
            Err(_) => Err(unsafe { Box::from_raw(raw) }),
        }
    }

    /// Take the connection parked on stripe `i`, if any.
    pub(crate) fn take(&self, i: usize) -> Option<Box<C>> {
        let slot = &self.slots[i];
        if slot.conn.load(Ordering::Relaxed).is_null() {
            return None;
        }
        let raw = slot.conn.swap(ptr::null_mut(), Ordering::Acquire);
        if raw.is_null() {
            return None;
        }
        // Safety: our swap moved the non-null pointer out of the slot, so we
        // are its only owner; it came from `Box::into_raw` in `put`, and the
        // Acquire swap saw the Release CAS that published it.
        Some(unsafe { Box::from_raw(raw) })
    }

    /// Count a session acquire served from stripe `i`.
    pub(crate) fn count_take(&self, i: usize) {
        self.slots[i].takes.fetch_add(1, Ordering::Relaxed);
    }

    /// Parked connections now (a scan of `STRIPES` slots: O(1)).
    pub(crate) fn len(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| !s.conn.load(Ordering::Acquire).is_null())
            .count()
    }

    pub(crate) fn puts(&self) -> usize {
        self.slots
            .iter()
            .map(|s| s.puts.load(Ordering::Relaxed))
            .fold(0, usize::wrapping_add)
    }

    pub(crate) fn takes(&self) -> usize {
        self.slots
            .iter()
            .map(|s| s.takes.load(Ordering::Relaxed))
            .fold(0, usize::wrapping_add)
    }
}

impl<C> Drop for StripeCache<C> {
    fn drop(&mut self) {
        for i in 0..STRIPES {
            drop(self.take(i));
        }
    }
}
