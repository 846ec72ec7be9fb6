//! Tasks waiting for a connection to come back to the pool.
//!
//! The release path must stay cheap when nobody waits, so it does not lock:
//! after putting a connection into the idle queue it issues a SeqCst fence and
//! reads `count`. A waiter registers itself (raising `count`), issues a SeqCst
//! fence, then tries the queue once more. By the fence rules at least one side
//! sees the other: either the releaser sees `count > 0` and wakes a waiter, or
//! the waiter's second attempt finds the connection. (loom checks this.)
//!
//! Wake-ups go to one waiter at a time, oldest first. A waiter that was woken but
//! is dropped before it could use the wake-up (its session timed out or was
//! cancelled) passes it on, so a wake-up is never swallowed.

use std::collections::VecDeque;
use std::task::Waker;

use crate::sync::{AtomicUsize, Mutex, Ordering, lock};

/// A registry of parked waiters.
pub(crate) struct Waiters {
    /// Number of entries in `list`. Changed only while `list` is locked; read
    /// without the lock by releasers (after a SeqCst fence).
    count: AtomicUsize,
    list: Mutex<WaitList>,
}

struct WaitList {
    next_key: usize,
    /// Registered waiters, oldest first. A key appears at most once.
    entries: VecDeque<(usize, Waker)>,
}

impl Waiters {
    pub(crate) fn new() -> Self {
        Self {
            count: AtomicUsize::new(0),
            list: Mutex::new(WaitList {
                next_key: 0,
                entries: VecDeque::new(),
            }),
        }
    }

    /// Whether anyone may be waiting. Callers issue a SeqCst fence first.
    pub(crate) fn any(&self) -> bool {
        self.count.load(Ordering::Relaxed) > 0
    }

    /// Register (or refresh the waker of) the waiter holding `key`.
    /// `key` is `None` for a waiter not currently registered.
    pub(crate) fn register(&self, key: &mut Option<usize>, waker: &Waker) {
        let mut list = lock(&self.list);
        if let Some(k) = *key
            && let Some(entry) = list.entries.iter_mut().find(|(ek, _)| *ek == k)
        {
            if !entry.1.will_wake(waker) {
                entry.1 = waker.clone();
            }
            return;
        }
        let k = list.next_key;
        list.next_key = list.next_key.wrapping_add(1);
        list.entries.push_back((k, waker.clone()));
        self.count.store(list.entries.len(), Ordering::Relaxed);
        *key = Some(k);
    }

    /// Remove the waiter holding `key`. Returns false if it was no longer
    /// registered, i.e. it had been woken by `notify_one`.
    pub(crate) fn deregister(&self, key: usize) -> bool {
        let mut list = lock(&self.list);
        let Some(pos) = list.entries.iter().position(|(k, _)| *k == key) else {
            return false;
        };
        list.entries.remove(pos);
        self.count.store(list.entries.len(), Ordering::Relaxed);
        true
    }

    /// Wake the oldest waiter, removing it from the registry.
    pub(crate) fn notify_one(&self) {
        let waker = {
            let mut list = lock(&self.list);
            let first = list.entries.pop_front();
            self.count.store(list.entries.len(), Ordering::Relaxed);
            first
        };
        if let Some((_, w)) = waker {
            w.wake();
        }
    }

    /// Wake every waiter (the pool is draining or closed).
    pub(crate) fn notify_all(&self) {
        let wakers: Vec<(usize, Waker)> = {
            let mut list = lock(&self.list);
            let all = list.entries.drain(..).collect();
            self.count.store(0, Ordering::Relaxed);
            all
        };
        for (_, w) in wakers {
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
