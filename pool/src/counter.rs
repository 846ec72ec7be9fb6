//! Monotonic totals that many threads bump and few read.
//!
//! One shared atomic bumped on every operation costs more than the operation
//! itself (its cache line bounces between cores). Each thread instead bumps
//! the cell of its own stripe (see `sync.rs`); a reader sums the cells.
//!
//! # Invariants and orderings
//! Every cell only grows, and the sum is never a difference, so it never
//! runs backwards: Relaxed suffices (a total orders nothing, it only counts;
//! coherence makes a later read of a cell at least an earlier one). The sum is
//! exact whenever no bump is in flight.

use crossbeam_utils::CachePadded;

use crate::sync::{AtomicUsize, Ordering, STRIPES, stripe};

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

    pub(crate) fn incr(&self) {
        self.cells[stripe()].fetch_add(1, Ordering::Relaxed);
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
