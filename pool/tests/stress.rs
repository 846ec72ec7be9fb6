//! A concurrent stress test of the real pool: a few threads run random
//! operations (sessions, dials, maintenance, resizing), and a checker thread
//! takes snapshots all the while, asserting in every one the relations a
//! snapshot promises and that no total ever runs backwards. At the end, at
//! quiescence, the totals must equal what the threads counted, and every
//! connection must have been closed exactly once when the pool goes.
//!
//! Bounded in time: `POOL_STRESS_MS` (default 1,500 ms) of churn.
#![cfg(not(loom))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use sttproxy_pool::{ConnPool, Connection, Lease, PoolConfig, PoolSnapshot, Reservation, Returned};

const WORKERS: usize = 3;
const MAX: usize = 6;

struct Conn {
    id: usize,
    alive: AtomicBool,
    in_use: Arc<AtomicBool>,
    shared: Arc<Shared>,
}

impl Connection for Conn {
    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    fn close(self) {
        self.shared.closed.lock().unwrap().push(self.id);
    }
}

#[derive(Default)]
struct Shared {
    next_id: AtomicUsize,
    closed: Mutex<Vec<usize>>,
    /// Session acquires started (an upper bound for `acquired_total`).
    acquires_started: AtomicUsize,
    /// Session releases started (an upper bound for `released_total`).
    releases_started: AtomicUsize,
    /// Dial failures recorded (exact).
    dial_failures: AtomicUsize,
    stop: AtomicBool,
}

/// Tiny xorshift: enough randomness, no dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Take a lease as a session does: nobody else may hold its connection.
fn hold(lease: &Lease<Conn>) {
    assert!(
        !lease.in_use.swap(true, Ordering::SeqCst),
        "connection {} leased twice at once",
        lease.id
    );
}

fn unhold(lease: &Lease<Conn>) {
    lease.in_use.store(false, Ordering::SeqCst);
}

fn new_conn(shared: &Arc<Shared>) -> Conn {
    Conn {
        id: shared.next_id.fetch_add(1, Ordering::Relaxed),
        alive: AtomicBool::new(true),
        in_use: Arc::new(AtomicBool::new(false)),
        shared: shared.clone(),
    }
}

/// What one worker counted.
#[derive(Default, Debug)]
struct Counts {
    acquired: usize,
    released: usize,
}

fn worker(pool: ConnPool<Conn>, shared: Arc<Shared>, seed: u64, start: Arc<Barrier>) -> Counts {
    let mut rng = Rng(seed);
    let mut counts = Counts::default();
    let mut leases: Vec<Lease<Conn>> = Vec::new();
    let mut reservations: Vec<Reservation<Conn>> = Vec::new();
    start.wait();
    while !shared.stop.load(Ordering::Relaxed) {
        match rng.below(21) {
            0..=5 if leases.len() < 3 => {
                shared.acquires_started.fetch_add(1, Ordering::SeqCst);
                if let Some(l) = pool.acquire() {
                    hold(&l);
                    counts.acquired += 1;
                    leases.push(l);
                }
            }
            0..=9 if !leases.is_empty() => {
                let l = leases.swap_remove(rng.below(leases.len()));
                unhold(&l);
                match rng.below(10) {
                    0 => l.discard(),
                    1 => drop(l),
                    2 => {
                        l.alive.store(false, Ordering::Relaxed);
                        shared.releases_started.fetch_add(1, Ordering::SeqCst);
                        assert_eq!(l.release(), Returned::Closed, "a dead connection came back");
                    }
                    _ => {
                        shared.releases_started.fetch_add(1, Ordering::SeqCst);
                        if l.release() == Returned::Idle {
                            counts.released += 1;
                        }
                    }
                }
            }
            10 | 11 if reservations.len() < 2 => {
                if let Some(r) = pool.try_reserve() {
                    reservations.push(r);
                }
            }
            10..=12 if !reservations.is_empty() => {
                let r = reservations.swap_remove(rng.below(reservations.len()));
                match rng.below(6) {
                    0 => {
                        pool.record_dial_failure();
                        shared.dial_failures.fetch_add(1, Ordering::SeqCst);
                        r.unreserve();
                    }
                    1 if leases.len() < 3 => {
                        shared.acquires_started.fetch_add(1, Ordering::SeqCst);
                        let l = r.into_lease(new_conn(&shared));
                        hold(&l);
                        counts.acquired += 1;
                        leases.push(l);
                    }
                    _ => {
                        r.offer(new_conn(&shared));
                    }
                }
            }
            13 => {
                // A health check: out of the pool for a moment, then back.
                if let Some(l) = pool.checkout_idle() {
                    hold(&l);
                    unhold(&l);
                    l.release();
                }
            }
            14 => {
                pool.prune_dead_idle();
            }
            18 => {
                // A health round: each idle connection out and back once.
                for l in pool.idle_sweep() {
                    hold(&l);
                    unhold(&l);
                    l.release();
                }
            }
            15 => {
                pool.shrink_to_target();
            }
            16 => pool.set_target(rng.below(MAX + 1)),
            17 => pool.set_limits(rng.below(MAX + 1), MAX),
            _ => std::thread::yield_now(),
        }
    }
    for l in leases {
        unhold(&l);
        shared.releases_started.fetch_add(1, Ordering::SeqCst);
        if l.release() == Returned::Idle {
            counts.released += 1;
        }
    }
    drop(reservations);
    counts
}

fn check_relations(s: &PoolSnapshot) {
    assert!(s.idle <= s.live, "idle > live: {s:?}");
    assert!(s.leased <= s.live, "leased > live: {s:?}");
    assert_eq!(
        s.idle + s.leased + s.dialing,
        s.live,
        "parts != live: {s:?}"
    );
    assert!(s.live <= s.max, "live > max: {s:?}");
    assert!(s.target <= s.max, "target > max: {s:?}");
    assert_eq!(s.max, MAX, "{s:?}");
}

fn check_monotonic(a: &PoolSnapshot, b: &PoolSnapshot) {
    assert!(
        a.acquired_total <= b.acquired_total,
        "acquired ran backwards: {a:?} then {b:?}"
    );
    assert!(
        a.released_total <= b.released_total,
        "released ran backwards: {a:?} then {b:?}"
    );
    assert!(
        a.discarded_total <= b.discarded_total,
        "discarded ran backwards: {a:?} then {b:?}"
    );
    assert!(
        a.dial_failures_total <= b.dial_failures_total,
        "dial failures ran backwards: {a:?} then {b:?}"
    );
}

#[test]
fn random_concurrent_operations_keep_every_invariant() {
    let churn = Duration::from_millis(
        std::env::var("POOL_STRESS_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_500),
    );
    let shared = Arc::new(Shared::default());
    let pool = ConnPool::new(PoolConfig {
        capacity: MAX,
        target: 4,
        max: MAX,
    });
    for _ in 0..4 {
        pool.try_reserve().unwrap().offer(new_conn(&shared));
    }
    let start = Arc::new(Barrier::new(WORKERS + 2));
    let workers: Vec<_> = (0..WORKERS)
        .map(|i| {
            let (pool, shared, start) = (pool.clone(), shared.clone(), start.clone());
            std::thread::spawn(move || worker(pool, shared, 0x9e37_79b9 + i as u64 * 7919, start))
        })
        .collect();
    let checker = {
        let (pool, shared, start) = (pool.clone(), shared.clone(), start.clone());
        std::thread::spawn(move || {
            start.wait();
            let mut last = pool.snapshot();
            let mut samples = 1usize;
            while !shared.stop.load(Ordering::Relaxed) {
                let s = pool.snapshot();
                check_relations(&s);
                check_monotonic(&last, &s);
                // Totals count only what has happened: never beyond what was started.
                let acq = shared.acquires_started.load(Ordering::SeqCst);
                let rel = shared.releases_started.load(Ordering::SeqCst);
                assert!(
                    s.acquired_total <= acq,
                    "acquired {} > started {acq}: {s:?}",
                    s.acquired_total
                );
                assert!(
                    s.released_total <= rel,
                    "released {} > started {rel}: {s:?}",
                    s.released_total
                );
                last = s;
                samples += 1;
            }
            samples
        })
    };
    start.wait();
    std::thread::sleep(churn);
    shared.stop.store(true, Ordering::Relaxed);
    let counts: Vec<Counts> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    let samples = checker.join().unwrap();
    assert!(samples > 100, "the checker took only {samples} snapshots");

    // Quiescence: the snapshot is the truth.
    let s = pool.snapshot();
    check_relations(&s);
    assert_eq!((s.leased, s.dialing), (0, 0), "{s:?}");
    let acquired: usize = counts.iter().map(|c| c.acquired).sum();
    let released: usize = counts.iter().map(|c| c.released).sum();
    assert_eq!(s.acquired_total, acquired, "{s:?} {counts:?}");
    assert_eq!(s.released_total, released, "{s:?} {counts:?}");
    assert_eq!(
        s.dial_failures_total,
        shared.dial_failures.load(Ordering::SeqCst)
    );
    let closed_so_far = shared.closed.lock().unwrap().len();
    assert_eq!(s.discarded_total, closed_so_far, "{s:?}");
    let made = shared.next_id.load(Ordering::SeqCst);
    assert_eq!(
        s.live,
        made - closed_so_far,
        "live is what was made minus what was closed"
    );

    // Every connection ever made is closed exactly once when the pool goes.
    drop(pool);
    let mut closed = shared.closed.lock().unwrap().clone();
    closed.sort_unstable();
    assert_eq!(
        closed,
        (0..made).collect::<Vec<_>>(),
        "each connection closed exactly once"
    );
    eprintln!(
        "stress: {samples} snapshots, {acquired} session acquires, {released} releases, {made} connections over {churn:?}"
    );
}
