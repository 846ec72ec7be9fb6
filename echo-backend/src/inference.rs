//! The stt mode's shared inference capacity: N slots and a FIFO queue, per backend process.
//!
//! A GPU server runs a bounded number of inferences at once; more requests wait. The slots
//! are kept as the instants at which each becomes free, and a request *reserves* the slot
//! that frees first at the moment it is made: it starts then (or at once if the slot is
//! already free) and occupies the slot for its inference delay. Reservations are made in
//! arrival order under one short lock, so the queue is FIFO across all connections, and no
//! task waits for anything: the connection schedules the result at its finish instant in
//! its own ordered output queue. The price is that a reservation cannot be taken back —
//! which matches a server that finishes the work it has started.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// One inference's place in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Reservation {
    /// Time waited for a free slot.
    pub(crate) queued: Duration,
    /// When the result is ready.
    pub(crate) done: Instant,
}

/// The shared slots; `None` inside means unlimited capacity (never a queue).
#[derive(Debug)]
pub(crate) struct Slots(Option<Mutex<BinaryHeap<Reverse<Instant>>>>);

impl Slots {
    /// `n` slots, all free; `None`: unlimited.
    pub(crate) fn new(n: Option<usize>) -> Self {
        Self(n.map(|n| {
            let now = Instant::now();
            Mutex::new((0..n).map(|_| Reverse(now)).collect())
        }))
    }

    /// Reserves the first slot to become free, from `now`, for `service`.
    pub(crate) fn reserve(&self, now: Instant, service: Duration) -> Reservation {
        let Some(heap) = &self.0 else {
            return Reservation {
                queued: Duration::ZERO,
                done: now + service,
            };
        };
        let mut heap = heap.lock().unwrap_or_else(PoisonError::into_inner);
        let free_at = heap.peek().map_or(now, |Reverse(at)| *at);
        let start = free_at.max(now);
        let done = start + service;
        // The heap is never empty (n >= 1 is validated), so this replaces the earliest slot.
        heap.pop();
        heap.push(Reverse(done));
        Reservation {
            queued: start - now,
            done,
        }
    }

    /// How long a request made `now` would wait for a slot (zero when unlimited).
    pub(crate) fn wait(&self, now: Instant) -> Duration {
        let Some(heap) = &self.0 else {
            return Duration::ZERO;
        };
        let heap = heap.lock().unwrap_or_else(PoisonError::into_inner);
        heap.peek().map_or(Duration::ZERO, |Reverse(at)| {
            at.saturating_duration_since(now)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_queues() {
        let slots = Slots::new(None);
        let now = Instant::now();
        for _ in 0..100 {
            let r = slots.reserve(now, Duration::from_millis(10));
            assert_eq!(r.queued, Duration::ZERO);
            assert_eq!(r.done, now + Duration::from_millis(10));
        }
        assert_eq!(slots.wait(now), Duration::ZERO);
    }

    #[test]
    fn two_slots_queue_in_arrival_order() {
        let slots = Slots::new(Some(2));
        let now = Instant::now();
        let ms = Duration::from_millis;
        let waits: Vec<Duration> = (0..6).map(|_| slots.reserve(now, ms(10)).queued).collect();
        assert_eq!(waits, [ms(0), ms(0), ms(10), ms(10), ms(20), ms(20)]);
        assert_eq!(slots.wait(now), ms(30));
        // Later, with both slots free again, nothing waits.
        let later = now + ms(100);
        assert_eq!(slots.reserve(later, ms(10)).queued, Duration::ZERO);
        assert_eq!(slots.wait(later), Duration::ZERO);
    }
}
