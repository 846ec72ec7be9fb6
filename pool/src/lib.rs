//! `sttproxy-pool`: the lock-free pool of reusable backend connections at the
//! heart of sttproxy.
//!
//! The crate knows nothing of sockets or runtimes. It is generic over a small
//! [`Connection`] trait, and every atomic, `Arc`, `Mutex` and cell it uses comes
//! from one facade (`sync`), which is `std` normally and loom under `--cfg loom`.
//! So the proxy, the tests, the loom model checks and the fault simulation all
//! drive the same code.
//!
//! - [`ConnPool`]: a bounded lock-free queue of idle connections with a
//!   per-thread stripe in front of it, RAII [`Lease`]s, CAS slot
//!   [`Reservation`]s for dials, O(1) [`PoolSnapshot`]s, [`IdleSweep`]s for
//!   health rounds.
//! - [`Signal`]: the coalescing request flag a pool's single reconcile worker waits on.

mod counter;
mod pool;
mod queue;
mod signal;
mod stripes;
mod sync;
mod waiters;

pub use pool::{
    AcquireWait, ConnPool, Connection, IdleSweep, Lease, LeaseRef, PoolConfig, PoolCore,
    PoolDraining, PoolRef, PoolSnapshot, Reservation, Returned,
};
pub use signal::{Signal, SignalWait};

/// The idle queue, exposed only so the loom suite and benchmarks can exercise
/// it directly. Not part of the stable API.
#[doc(hidden)]
pub mod __private {
    pub use crate::queue::ArrayQueue;

    /// Put the calling thread on stripe `n` (tests only:
    /// proptest and loom use it to exercise acquires that steal from another
    /// thread's stripe).
    pub fn set_thread_stripe(n: usize) {
        crate::sync::set_stripe(n);
    }
}
