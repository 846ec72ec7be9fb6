//! The one place this crate takes its synchronization primitives from.
//!
//! Normally these are `std`'s; under `--cfg loom` they are loom's, so the loom
//! suite model-checks exactly the code that runs in production. Nothing else in
//! the crate may name `std::sync`, `std::cell::UnsafeCell`, `std::hint` or
//! `std::thread` directly.
//!
//! # Stripes
//! A *stripe* is a per-thread index in `0..STRIPES`: each thread takes the
//! next one round-robin on first use and keeps it. Every per-thread structure
//! of the crate (the pool's stripes in `stripes.rs`, the counters in
//! `counter.rs`) is an array of `STRIPES` cache-padded cells indexed by it, so
//! threads that run at the same time mostly write different cache lines.
//! Under loom the choice is the same code on loom's atomics, so the model
//! explores every order in which threads take their stripes (with two stripes,
//! threads share or do not share one); a test may pin a thread with
//! [`set_stripe`].

#[cfg(loom)]
mod imp {
    pub(crate) use loom::cell::UnsafeCell;
    pub(crate) use loom::sync::atomic::{AtomicPtr, AtomicUsize, Ordering, fence};
    pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};

    /// Hint that we are spinning on another thread's progress (a yield point under loom).
    pub(crate) fn spin_hint() {
        loom::hint::spin_loop();
    }

    /// Wait a little for another thread's progress; under loom, one yield.
    pub(crate) fn snooze(_step: u32) {
        loom::thread::yield_now();
    }

    /// Stripes under loom: two, so models check what crosses stripes.
    pub(crate) const STRIPES: usize = 2;

    loom::lazy_static! {
        static ref NEXT: AtomicUsize = AtomicUsize::new(0);
    }

    loom::thread_local! {
        pub(super) static STRIPE: std::cell::Cell<usize> = std::cell::Cell::new(usize::MAX);
    }

    /// The next stripe number to hand out: loom's atomic, so loom explores
    /// the orders in which threads take theirs.
    pub(super) fn next_stripe() -> usize {
        NEXT.fetch_add(1, Ordering::Relaxed)
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

    /// Wait a little for another thread's progress: spin 2^step times for the
    /// first steps, then give the core away (the thread we wait for may have
    /// been preempted on it).
    pub(crate) fn snooze(step: u32) {
        if step < 6 {
            for _ in 0..1u32 << step {
                std::hint::spin_loop();
            }
        } else {
            std::thread::yield_now();
        }
    }

    /// Stripes: as many as threads that commonly run sessions at once.
    pub(crate) const STRIPES: usize = 8;

    use std::cell::Cell;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        pub(super) static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    }

    /// The next stripe number to hand out.
    pub(super) fn next_stripe() -> usize {
        NEXT.fetch_add(1, Ordering::Relaxed)
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

/// This thread's stripe: a small per-thread number handed out round-robin on
/// first use (the same code under loom, on loom's atomics).
pub(crate) fn stripe() -> usize {
    imp::STRIPE.with(|s| {
        let mut v = s.get();
        if v == usize::MAX {
            v = imp::next_stripe() % STRIPES;
            s.set(v);
        }
        v
    })
}

/// Put this thread on stripe `n` (tests use it to exercise stealing).
pub(crate) fn set_stripe(n: usize) {
    imp::STRIPE.with(|s| s.set(n % STRIPES));
}

/// Lock a facade mutex, ignoring poisoning: every critical section in this crate
/// leaves its data consistent before anything that could panic, so a poisoned
/// lock still guards valid data.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}
