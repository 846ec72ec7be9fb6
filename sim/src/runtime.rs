//! The virtual clock and the seeded randomness every run is made of.
//!
//! A run is one current-thread tokio runtime with its clock paused: whenever
//! every task waits, time jumps to the next timer, so hours pass in seconds and
//! the order of events depends on nothing but the seed. Every random choice is
//! drawn from generators derived from that seed.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

/// A current-thread runtime with paused, auto-advancing time.
pub fn build() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
}

/// A seed for the named stream of randomness of a run (splitmix64 over the
/// run's seed and the name), so adding a stream does not shift the others.
pub fn seed_for(seed: u64, stream: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in stream.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = seed ^ h;
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A seeded generator shared by the tasks of one component. The runtime has one
/// thread, so the lock is never contended; it only makes the type `Send + Sync`.
#[derive(Debug, Clone)]
pub struct SimRng(Arc<Mutex<SmallRng>>);

impl SimRng {
    pub fn new(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(SmallRng::seed_from_u64(seed))))
    }

    fn lock(&self) -> MutexGuard<'_, SmallRng> {
        match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// A new independent generator drawn from this one.
    pub fn fork(&self) -> SmallRng {
        SmallRng::seed_from_u64(self.lock().random())
    }

    /// A new independent shared generator drawn from this one.
    pub fn fork_sim(&self) -> SimRng {
        SimRng::new(self.lock().random())
    }

    /// True with probability `p`.
    pub fn chance(&self, p: f64) -> bool {
        p > 0.0 && self.lock().random_bool(p.min(1.0))
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        self.lock().random_range(lo..=hi)
    }

    /// A duration uniform in `lo..=hi` milliseconds.
    pub fn millis(&self, (lo, hi): (u64, u64)) -> Duration {
        Duration::from_millis(self.between(lo, hi))
    }

    /// An exponentially distributed duration with the given mean.
    pub fn exp(&self, mean: Duration) -> Duration {
        let u: f64 = self.lock().random_range(f64::EPSILON..1.0);
        mean.mul_f64(-u.ln()).min(Duration::from_secs(86_400))
    }

    /// Pick an index in `0..n` (n > 0).
    pub fn index(&self, n: usize) -> usize {
        if n <= 1 {
            return 0;
        }
        self.lock().random_range(0..n)
    }
}

/// Virtual time since the run started.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    /// Start counting now (call inside the runtime).
    pub fn start() -> Self {
        Self {
            start: Instant::now(),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn ms(&self) -> u64 {
        u64::try_from(self.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}
