//! A coalescing, awaitable request flag: how anyone asks the single reconcile
//! worker of a pool to run.
//!
//! `trigger()` may be called from any thread any number of times; it never
//! blocks on the worker. At most one request is pending: a burst of triggers
//! while the worker is busy becomes exactly one more run. The worker consumes the
//! request when `wait()` completes, *before* it runs, so a trigger that lands
//! during a run is always followed by another run (no lost wake-up).
//!
//! Built on the crate's `sync` facade (not tokio's `Notify`) so that loom checks
//! it together with the pool.
//!
//! # Invariants
//! - `state` is `PENDING` exactly while a request has not been consumed.
//! - At most one waker is stored: the single consumer's, while it waits.
//!
//! # Orderings
//! - Every transition of `state` is a swap (AcqRel): a read-modify-write
//!   always reads the latest value in the flag's modification order, so the
//!   order of swaps alone decides who sees whose request, and a consumer that
//!   takes a request sees what the triggering thread did before triggering.
//! - The waker is stored under the mutex *before* the consumer's second swap,
//!   and a trigger takes it under the mutex *after* its swap: whichever swap
//!   comes second sees the other side (the argument is at `SignalWait::poll`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::sync::{AtomicUsize, Mutex, Ordering, lock};

const IDLE: usize = 0;
const PENDING: usize = 1;

/// A coalescing reconcile request flag with one waiting consumer.
pub struct Signal {
    /// `PENDING` while a request has not been consumed by `wait()`.
    /// Every transition is a swap (a read-modify-write), so the flag's
    /// modification order alone decides who sees whose request.
    state: AtomicUsize,
    /// The waker of the consumer currently waiting in `wait()`, if any.
    waker: Mutex<Option<Waker>>,
}

impl Signal {
    pub fn new() -> Self {
        Self {
            state: AtomicUsize::new(IDLE),
            waker: Mutex::new(None),
        }
    }

    /// Request a run. Always a swap: a plain load could read a stale `PENDING`
    /// that the worker has already consumed, and the request would be lost.
    pub fn trigger(&self) {
        if self.state.swap(PENDING, Ordering::AcqRel) == IDLE {
            let waker = lock(&self.waker).take();
            if let Some(w) = waker {
                w.wake();
            }
        }
    }

    /// Consume a pending request without waiting. True if there was one.
    pub fn try_take(&self) -> bool {
        self.state.swap(IDLE, Ordering::AcqRel) == PENDING
    }

    /// Wait until a request is pending, and consume it. Meant for a single
    /// consumer (the pool's reconcile worker); a second concurrent waiter would
    /// replace the first one's waker.
    pub fn wait(&self) -> SignalWait<'_> {
        SignalWait { signal: self }
    }
}

impl Default for Signal {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signal")
            .field("pending", &(self.state.load(Ordering::Relaxed) == PENDING))
            .finish()
    }
}

/// Future returned by [`Signal::wait`].
#[derive(Debug)]
#[must_use = "futures do nothing unless polled"]
pub struct SignalWait<'a> {
    signal: &'a Signal,
}

impl Future for SignalWait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let signal = self.signal;
        if signal.try_take() {
            return Poll::Ready(());
        }
        *lock(&signal.waker) = Some(cx.waker().clone());
        // A trigger whose swap came before ours saw IDLE→PENDING and will find
        // the waker we just stored (our store happens-before our swap, which it
        // reads from); a trigger whose swap came after ours is seen right here.
        if signal.try_take() {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}
