//! Monotonic totals that many threads bump and few read.
//!
//! One shared atomic bumped on every acquire and release costs more than the
//! queue operation itself (its cache line bounces between cores). Each thread
//! instead bumps its own cache-padded stripe; a reader sums the stripes. The sum
//! is exact whenever no bump is in flight, and never runs backwards.

use crossbeam_utils::CachePadded;

use crate::sync::{AtomicUsize, Ordering, stripe_hint};

/// Number of stripes: enough that a handful of busy threads rarely share one.
#[cfg(not(loom))]
const STRIPES: usize = 8;
/// Under loom threads use stripe 0 unless a test moves them (see
/// `sync::stripe_hint`); two stripes keep the model small.
#[cfg(loom)]
const STRIPES: usize = 2;

/// A monotonic counter striped across cache-padded cells.
pub(crate) struct StripedCounter {
    cells: Box<[CachePadded<AtomicUsize>]>,
}

impl StripedCounter {
    pub(crate) fn new() -> Self {
        Self {
            cells: (0..STRIPES)
                .map(|_| CachePadded::new(AtomicUsize::new(0)))
                .collect(),
        }
    }

    /// Add `n`. Relaxed: a total orders nothing, it only counts.
    pub(crate) fn add(&self, n: usize) {
        self.cells[stripe_hint() % STRIPES].fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn incr(&self) {
        self.add(1);
    }

    /// The sum over all stripes.
    pub(crate) fn sum(&self) -> usize {
        self.cells
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .fold(0usize, usize::wrapping_add)
    }
}

impl std::fmt::Debug for StripedCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("StripedCounter").field(&self.sum()).finish()
    }
}
