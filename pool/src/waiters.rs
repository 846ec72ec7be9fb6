//! Tasks waiting for a connection to come back to the pool.
//!
//! The release path must stay cheap when nobody waits, so it does not lock:
//! after putting a connection where an acquire looks (the queue or a stripe)
//! it issues a SeqCst fence and reads `count`. A waiter registers itself
//! (raising `count`), issues a SeqCst fence, then tries to acquire once more.
//! By the fence rules at least one side sees the other: either the releaser
//! sees `count > 0` and wakes a waiter, or the waiter's second attempt finds
//! the connection. That second attempt must see every completed release: the
//! queue's `pop` never reports empty while a completed push is in it (see
//! `queue.rs`), and an acquire looks at every stripe, its own last. (loom
//! checks this, with two waiters and two releases racing.)
//!
//! Wake-ups go to one waiter at a time, oldest first. A waiter keeps its
//! ticket (its place in line) for its whole wait: woken, it leaves the line;
//! if it then loses the connection to a session that did not wait, it comes
//! back to its old place, not the back. A waiter that was woken but is dropped
//! before it could use the wake-up (its session timed out or was cancelled)
//! passes it on, so a wake-up is never swallowed.
//!
//! # Invariants
//! - `count == entries.len()` whenever `list` is unlocked.
//! - A ticket appears at most once in `entries`; tickets are handed out in
//!   registration order, so the smallest ticket is the oldest waiter.
//!
//! # Orderings
//! - `count` is written only under the lock (Relaxed: the lock orders the
//!   writers) and read without it by releasers after their SeqCst fence; the
//!   waiter's registration (its `count` store) is followed by its own SeqCst
//!   fence. The two fences are what make the argument above hold.
//! - Wakers are taken out under the lock and woken after it is released.

use std::collections::BTreeMap;
use std::task::Waker;

use crate::sync::{AtomicUsize, Mutex, Ordering, lock};

/// A waiter's place in line: smaller is older.
pub(crate) type Ticket = usize;

/// A registry of waiting tasks.
pub(crate) struct Waiters {
    /// Number of entries in `list`. Changed only while `list` is locked; read
    /// without the lock by releasers (after a SeqCst fence).
    count: AtomicUsize,
    list: Mutex<WaitList>,
}

struct WaitList {
    next_ticket: Ticket,
    /// Registered waiters by ticket, oldest first: O(log n) to register,
    /// refresh, leave or wake the oldest.
    entries: BTreeMap<Ticket, Waker>,
}

impl Waiters {
    pub(crate) fn new() -> Self {
        Self {
            count: AtomicUsize::new(0),
            list: Mutex::new(WaitList {
                next_ticket: 0,
                entries: BTreeMap::new(),
            }),
        }
    }

    /// Whether anyone may be waiting. Callers issue a SeqCst fence first.
    pub(crate) fn any(&self) -> bool {
        self.count.load(Ordering::Relaxed) > 0
    }

    /// Register the waiter holding `ticket` (`None`: a new waiter, which gets
    /// the next ticket), or refresh its waker. A waiter that was woken and
    /// registers again goes back to its old place in line.
    pub(crate) fn register(&self, ticket: &mut Option<Ticket>, waker: &Waker) {
        let mut list = lock(&self.list);
        let t = match *ticket {
            Some(t) => t,
            None => {
                let t = list.next_ticket;
                list.next_ticket = list.next_ticket.wrapping_add(1);
                *ticket = Some(t);
                t
            }
        };
        match list.entries.get_mut(&t) {
            Some(w) => {
                if !w.will_wake(waker) {
                    *w = waker.clone();
                }
            }
            None => {
                list.entries.insert(t, waker.clone());
                self.count.store(list.entries.len(), Ordering::Relaxed);
            }
        }
    }

    /// Remove the waiter holding `ticket`. Returns false if it was not
    /// registered, i.e. it had been woken by `notify_one`.
    pub(crate) fn deregister(&self, ticket: Ticket) -> bool {
        let mut list = lock(&self.list);
        let removed = list.entries.remove(&ticket).is_some();
        self.count.store(list.entries.len(), Ordering::Relaxed);
        removed
    }

    /// Wake the oldest waiter, removing it from the line.
    pub(crate) fn notify_one(&self) {
        let first = {
            let mut list = lock(&self.list);
            let first = list.entries.pop_first();
            self.count.store(list.entries.len(), Ordering::Relaxed);
            first
        };
        if let Some((_, w)) = first {
            w.wake();
        }
    }

    /// Wake every waiter (the pool is draining).
    pub(crate) fn notify_all(&self) {
        let all = {
            let mut list = lock(&self.list);
            let all = std::mem::take(&mut list.entries);
            self.count.store(0, Ordering::Relaxed);
            all
        };
        for w in all.into_values() {
            w.wake();
        }
    }
}

impl std::fmt::Debug for Waiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiters")
            .field("count", &self.count.load(Ordering::Relaxed))
            .finish()
    }
}
