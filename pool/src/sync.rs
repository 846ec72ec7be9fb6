//! The one place this crate takes its synchronization primitives from.
//!
//! Normally these are `std`'s; under `--cfg loom` they are loom's, so the loom
//! suite model-checks exactly the code that runs in production. Nothing else in
//! the crate may name `std::sync`, `std::cell::UnsafeCell` or `std::hint` directly.

#[cfg(loom)]
mod imp {
    pub(crate) use loom::cell::UnsafeCell;
    pub(crate) use loom::sync::atomic::{AtomicPtr, AtomicUsize, Ordering, fence};
    pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};

    /// Hint that we are spinning on another thread's progress (a yield point under loom).
    pub(crate) fn spin_hint() {
        loom::hint::spin_loop();
    }

    loom::thread_local! {
        static STRIPE: std::cell::Cell<usize> = std::cell::Cell::new(0);
    }

    /// This thread's stripe (of the counters and the parking slots). Under loom
    /// every thread starts on stripe 0; a test moves a thread with
    /// `set_stripe` to check what crosses stripes.
    pub(crate) fn stripe_hint() -> usize {
        STRIPE.with(|s| s.get())
    }

    pub(crate) fn set_stripe(n: usize) {
        STRIPE.with(|s| s.set(n));
    }
}

#[cfg(not(loom))]
mod imp {
    pub(crate) use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering, fence};
    pub(crate) use std::sync::{Arc, Mutex, MutexGuard};

    /// Hint that we are spinning on another thread's progress.
    pub(crate) fn spin_hint() {
        std::hint::spin_loop();
    }

    /// Which stripe of a [`crate::counter::StripedCounter`] this thread bumps: a
    /// small per-thread number handed out round-robin on first use, so threads that
    /// run concurrently mostly touch different cache lines.
    pub(crate) fn stripe_hint() -> usize {
        STRIPE.with(|s| {
            let mut v = s.get();
            if v == usize::MAX {
                v = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                s.set(v);
            }
            v
        })
    }

    use std::cell::Cell;
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local! {
        static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    }

    /// Put this thread on stripe `n` (tests use it to exercise stealing).
    pub(crate) fn set_stripe(n: usize) {
        STRIPE.with(|s| s.set(n));
    }

    /// `std::cell::UnsafeCell` with loom's closure-based API, so call sites are
    /// identical under both configurations.
    #[derive(Debug)]
    pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

    impl<T> UnsafeCell<T> {
        pub(crate) const fn new(value: T) -> Self {
            Self(std::cell::UnsafeCell::new(value))
        }

        pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
            f(self.0.get())
        }

        pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
            f(self.0.get())
        }
    }
}

pub(crate) use imp::*;

/// Lock a facade mutex, ignoring poisoning: every critical section in this crate
/// leaves its data consistent before anything that could panic, so a poisoned
/// lock still guards valid data.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}
