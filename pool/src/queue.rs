//! A bounded multi-producer multi-consumer queue of idle connections.
//!
//! The algorithm is Dmitry Vyukov's bounded MPMC queue: every slot carries a
//! sequence stamp that says whether it is ready to be written (stamp == the
//! writer's position) or read (stamp == the reader's position + 1). `head` and
//! `tail` are positions made of an index into the buffer plus a lap number in the
//! high bits, so an arbitrary capacity works and a position from an old lap can
//! never be mistaken for a current one.
//!
//! # Invariants
//! - `head <= tail <= head + cap` (as position counts); the values are in the
//!   positions `head..tail`, oldest at `head`.
//! - A position is claimed by exactly one thread: the producer whose CAS moved
//!   `tail` past it, then the consumer whose CAS moved `head` past it. Only the
//!   claimant touches the slot's value until it stamps the slot.
//! - `push` and `pop` are linearizable: a `pop` that starts after a `push`
//!   completed never reports empty while that value (or an older one) is
//!   still in the queue. (Vyukov's original reports empty when the head slot
//!   is claimed by a producer that has not written it yet, even if later
//!   pushes have completed; the pool's no-lost-wake-up argument needs a pop to
//!   see every completed push, so `pop` waits for that producer instead.)
//!
//! # Orderings
//! - `tail`/`head` CAS: SeqCst, so the positions have one total order with the
//!   SeqCst fences of `pop`, `push` and the pool.
//! - A producer's value write happens-before its Release stamp store, which
//!   the consumer's Acquire stamp load reads: the consumer sees the value. The
//!   consumer's Release stamp store (freeing the slot for the next lap) is read
//!   by the next lap's producer's Acquire load, so its read of the old value
//!   happens-before the overwrite.
//!
//! # Progress
//! `push` and `pop` never take a lock and never allocate after construction.
//! `pop` may wait for a producer that has claimed the head slot and not yet
//! stamped it (two stores away); `push` may wait for a consumer in the middle
//! of freeing a slot, which happens only when the queue is full (and a pool's
//! queue has room for every connection it may hold). Either waits by spinning
//! briefly, then yielding the core, since the thread it waits for may have
//! been preempted; it never waits for anything but that thread's next stores.

use crossbeam_utils::CachePadded;
use std::mem::MaybeUninit;

use crate::sync::{AtomicUsize, Ordering, UnsafeCell, fence, snooze, spin_hint};

struct Slot<T> {
    /// Invariant: for the position `p` that maps to this slot in the current lap,
    /// `stamp == p` means the slot is empty and may be written by the producer that
    /// claimed `p`; `stamp == p + 1` means it holds an initialized value that the
    /// consumer that claims `p` may take.
    stamp: AtomicUsize,
    /// Initialized exactly when `stamp` says it holds a value.
    value: UnsafeCell<MaybeUninit<T>>,
}

/// A bounded lock-free MPMC queue.
pub struct ArrayQueue<T> {
    /// Position of the next slot to pop. Only ever advanced by a successful CAS
    /// in `pop`, by the thread that then owns that slot's value.
    head: CachePadded<AtomicUsize>,
    /// Position of the next slot to push. Only ever advanced by a successful CAS
    /// in `push`, by the thread that then owns that slot until it stamps it.
    tail: CachePadded<AtomicUsize>,
    buffer: Box<[Slot<T>]>,
    /// Number of slots; `cap >= 1`.
    cap: usize,
    /// Position distance of one lap: a power of two strictly greater than `cap`,
    /// so the low bits of a position are its index and the high bits its lap.
    one_lap: usize,
}

// Safety: the queue hands each value to exactly one thread (the one whose CAS
// claimed its slot), so it is Send/Sync whenever the values may move between
// threads.
unsafe impl<T: Send> Send for ArrayQueue<T> {}
// Safety: as above; shared access only ever moves whole values in or out.
unsafe impl<T: Send> Sync for ArrayQueue<T> {}

impl<T> ArrayQueue<T> {
    /// A queue that holds at most `cap` values. `cap` of 0 is raised to 1.
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        let one_lap = (cap + 1).next_power_of_two();
        let buffer = (0..cap)
            .map(|i| Slot {
                stamp: AtomicUsize::new(i),
                value: UnsafeCell::new(MaybeUninit::uninit()),
            })
            .collect();
        Self {
            head: CachePadded::new(AtomicUsize::new(0)),
            tail: CachePadded::new(AtomicUsize::new(0)),
            buffer,
            cap,
            one_lap,
        }
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The position after `pos`: the next index in this lap, or index 0 of the next lap.
    fn next_pos(&self, pos: usize) -> usize {
        let index = pos & (self.one_lap - 1);
        let lap = pos & !(self.one_lap - 1);
        if index + 1 < self.cap {
            pos + 1
        } else {
            lap.wrapping_add(self.one_lap)
        }
    }

    /// Push `value`, or hand it back if the queue is full.
    pub fn push(&self, value: T) -> Result<(), T> {
        let mut tail = self.tail.load(Ordering::Relaxed);
        loop {
            let index = tail & (self.one_lap - 1);
            let slot = &self.buffer[index];
            let stamp = slot.stamp.load(Ordering::Acquire);
            if stamp == tail {
                // The slot is free for this lap: try to claim position `tail`.
                match self.tail.compare_exchange_weak(
                    tail,
                    self.next_pos(tail),
                    Ordering::SeqCst,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        // Safety: our CAS claimed position `tail`, and `stamp == tail`
                        // says the slot is empty; no other thread touches the value
                        // until we publish it with the stamp store below.
                        slot.value.with_mut(|p| unsafe { (*p).write(value) });
                        slot.stamp.store(tail.wrapping_add(1), Ordering::Release);
                        return Ok(());
                    }
                    Err(current) => tail = current,
                }
            } else if stamp.wrapping_add(self.one_lap) == tail.wrapping_add(1) {
                // The slot still holds the value pushed one lap ago: full, unless a
                // consumer has moved head on since.
                fence(Ordering::SeqCst);
                let head = self.head.load(Ordering::Relaxed);
                if head.wrapping_add(self.one_lap) == tail {
                    return Err(value);
                }
                // A consumer claimed the slot and is about to free it.
                spin_hint();
                tail = self.tail.load(Ordering::Relaxed);
            } else {
                // Another producer claimed this position and has not stamped it yet,
                // or our view of `tail` is stale.
                spin_hint();
                tail = self.tail.load(Ordering::Relaxed);
            }
        }
    }

    /// Pop the oldest value, or `None` if the queue is empty.
    pub fn pop(&self) -> Option<T> {
        self.pop_where(|_| true)
    }

    /// A mark of everything pushed so far: [`ArrayQueue::pop_before`] with it
    /// pops only values pushed before the mark was taken.
    pub fn mark(&self) -> usize {
        self.position_count(self.tail.load(Ordering::SeqCst))
    }

    /// Pop the oldest value if it was pushed before `mark` was taken, so a
    /// sweep that puts values back behind the mark meets each value at most once.
    pub fn pop_before(&self, mark: usize) -> Option<T> {
        // Position counts grow by one per push; compare them as a distance so
        // the comparison survives wrapping.
        self.pop_where(|head| (mark.wrapping_sub(head) as isize) > 0)
    }

    /// Pop the oldest value if `take(its position count)`.
    fn pop_where(&self, take: impl Fn(usize) -> bool) -> Option<T> {
        let mut head = self.head.load(Ordering::Relaxed);
        let mut step = 0;
        loop {
            let index = head & (self.one_lap - 1);
            let slot = &self.buffer[index];
            let stamp = slot.stamp.load(Ordering::Acquire);
            if stamp == head.wrapping_add(1) {
                if !take(self.position_count(head)) {
                    return None;
                }
                // The slot holds a value for this lap: try to claim position `head`.
                match self.head.compare_exchange_weak(
                    head,
                    self.next_pos(head),
                    Ordering::SeqCst,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        // Safety: our CAS claimed position `head`; the Acquire load of
                        // `stamp == head + 1` saw the producer's Release store after it
                        // wrote the value, and no other consumer can claim `head` now.
                        let value = slot.value.with(|p| unsafe { (*p).assume_init_read() });
                        slot.stamp
                            .store(head.wrapping_add(self.one_lap), Ordering::Release);
                        return Some(value);
                    }
                    Err(current) => head = current,
                }
            } else if stamp == head {
                // The slot is empty for this lap: an empty queue, or a producer
                // has claimed position `head` and not written it yet. Pairs
                // with the SeqCst CAS of `push`: if `tail` has moved past
                // `head`, that push is in flight and later ones may have
                // completed behind it, so wait for it rather than report a
                // false "empty" (issue 10: a waiter woken for a completed push
                // would find nothing and sleep while a connection sat idle).
                fence(Ordering::SeqCst);
                let tail = self.tail.load(Ordering::Relaxed);
                if tail == head {
                    return None;
                }
                snooze(step);
                step = step.saturating_add(1);
                head = self.head.load(Ordering::Relaxed);
            } else {
                // Another consumer took this position, or our view is stale.
                spin_hint();
                head = self.head.load(Ordering::Relaxed);
            }
        }
    }

    /// The number of positions before `pos`: its lap times the capacity plus
    /// its index. Grows by one per push (or pop); wraps after 2^64.
    fn position_count(&self, pos: usize) -> usize {
        (pos / self.one_lap)
            .wrapping_mul(self.cap)
            .wrapping_add(pos & (self.one_lap - 1))
    }

    /// Whether the queue holds no value (same caveats as [`ArrayQueue::len`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of values in the queue. Exact when no push or pop is in flight;
    /// under concurrency, a value that was true at some instant during the call.
    pub fn len(&self) -> usize {
        loop {
            let tail = self.tail.load(Ordering::SeqCst);
            let head = self.head.load(Ordering::SeqCst);
            if self.tail.load(Ordering::SeqCst) == tail {
                let hix = head & (self.one_lap - 1);
                let tix = tail & (self.one_lap - 1);
                return if hix < tix {
                    tix - hix
                } else if hix > tix {
                    self.cap - hix + tix
                } else if tail == head {
                    0
                } else {
                    self.cap
                };
            }
            spin_hint();
        }
    }
}

impl<T> Drop for ArrayQueue<T> {
    fn drop(&mut self) {
        // `&mut self`: no push or pop is in flight, so popping is exact.
        while let Some(value) = self.pop() {
            drop(value);
        }
    }
}

impl<T> std::fmt::Debug for ArrayQueue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArrayQueue")
            .field("capacity", &self.cap)
            .field("len", &self.len())
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn fifo_and_bounded_over_many_laps() {
        for cap in 1..=5 {
            let q = ArrayQueue::new(cap);
            let mut next_in = 0u32;
            let mut next_out = 0u32;
            for round in 0..50 {
                let burst = (round % (cap + 1)) + 1;
                for _ in 0..burst {
                    match q.push(next_in) {
                        Ok(()) => next_in += 1,
                        Err(v) => {
                            assert_eq!(v, next_in);
                            assert_eq!(q.len(), cap, "a push fails only when full");
                        }
                    }
                }
                assert!(q.len() <= cap);
                while let Some(v) = q.pop() {
                    assert_eq!(v, next_out);
                    next_out += 1;
                }
                assert_eq!(q.len(), 0);
            }
            assert_eq!(next_in, next_out);
        }
    }

    #[test]
    fn pop_before_takes_only_what_was_queued_before_the_mark() {
        let q = ArrayQueue::new(3);
        for round in 0..10 {
            q.push(round * 10).unwrap();
            q.push(round * 10 + 1).unwrap();
            let mark = q.mark();
            // What a sweep takes out and puts back lands behind the mark.
            let first = q.pop_before(mark).unwrap();
            q.push(first).unwrap();
            let second = q.pop_before(mark).unwrap();
            q.push(second).unwrap();
            assert_eq!((first, second), (round * 10, round * 10 + 1));
            assert_eq!(q.pop_before(mark), None, "met a value twice");
            assert_eq!(q.len(), 2);
            assert_eq!(
                (q.pop(), q.pop(), q.pop()),
                (Some(first), Some(second), None)
            );
        }
    }

    #[test]
    fn drop_drops_what_is_left() {
        let tracker = std::sync::Arc::new(());
        let q = ArrayQueue::new(4);
        for _ in 0..3 {
            assert!(q.push(tracker.clone()).is_ok());
        }
        assert_eq!(std::sync::Arc::strong_count(&tracker), 4);
        drop(q);
        assert_eq!(std::sync::Arc::strong_count(&tracker), 1);
    }

    #[test]
    fn threads_never_lose_or_duplicate() {
        let q = std::sync::Arc::new(ArrayQueue::new(8));
        let per = 20_000usize;
        let producers: Vec<_> = (0..2)
            .map(|t| {
                let q = q.clone();
                std::thread::spawn(move || {
                    for i in 0..per {
                        let mut v = t * per + i;
                        while let Err(back) = q.push(v) {
                            v = back;
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        let consumers: Vec<_> = (0..2)
            .map(|_| {
                let q = q.clone();
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    while got.len() < per {
                        if let Some(v) = q.pop() {
                            got.push(v);
                        } else {
                            std::thread::yield_now();
                        }
                    }
                    got
                })
            })
            .collect();
        for p in producers {
            p.join().unwrap();
        }
        let mut all: Vec<usize> = consumers
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..2 * per).collect::<Vec<_>>());
    }
}
