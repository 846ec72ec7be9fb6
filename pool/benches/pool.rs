//! acquire+release throughput: our pool vs the reference write-up's naive design
//! (one Mutex over a Vec with in-use flags, scanned from the start) vs
//! `deadpool::unmanaged::Pool`; the same when every connection is released on
//! another thread than the one that acquired it (`cross_thread`, the worst
//! case of our per-thread stripes); and the cost of a snapshot while two
//! threads churn.
//!
//! `cargo bench -p sttproxy-pool --bench pool`
//!
//! Every measurement is aggregate wall time per acquire+release pair: `iters`
//! pairs are split evenly across the threads, so a lower figure means more pairs
//! per second for the whole pool.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations
)]

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use sttproxy_pool::__private::ArrayQueue;
use sttproxy_pool::{ConnPool, Connection, Lease, LeaseRef, PoolConfig};

/// Stand-in for a backend connection: a little state, like a real handle.
struct Conn {
    id: usize,
    alive: AtomicBool,
}

impl Connection for Conn {
    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }
}

fn conn(id: usize) -> Conn {
    Conn {
        id,
        alive: AtomicBool::new(true),
    }
}

/// The pool designs under test, behind one small interface.
trait BenchPool: Send + Sync + 'static {
    type Held<'a>: Send
    where
        Self: 'a;
    fn acquire(&self) -> Option<Self::Held<'_>>;
    fn release<'a>(&'a self, held: Self::Held<'a>);
}

/// Ours, with leases that share ownership of the pool (`acquire`): what a
/// session that moves its lease into a task uses. Each lease clones the pool's
/// `Arc`, so this pays two reference-count updates per pair.
struct Ours(ConnPool<Conn>);

impl BenchPool for Ours {
    type Held<'a> = Lease<Conn>;
    fn acquire(&self) -> Option<Lease<Conn>> {
        self.0.acquire()
    }
    fn release(&self, held: Lease<Conn>) {
        held.release();
    }
}

/// Ours, with leases that borrow the pool (`acquire_ref`): no reference count.
struct OursRef(ConnPool<Conn>);

impl BenchPool for OursRef {
    type Held<'a> = LeaseRef<'a, Conn>;
    fn acquire(&self) -> Option<LeaseRef<'_, Conn>> {
        self.0.acquire_ref()
    }
    fn release<'a>(&'a self, held: LeaseRef<'a, Conn>) {
        held.release();
    }
}

/// The reference write-up's first design: one mutex over every connection,
/// in-use flags, a linear scan from the start on every acquire, stats by scan.
struct Naive {
    slots: Mutex<Vec<NaiveSlot>>,
}

struct NaiveSlot {
    conn: Conn,
    in_use: bool,
}

impl Naive {
    fn new(n: usize) -> Self {
        Self {
            slots: Mutex::new(
                (0..n)
                    .map(|i| NaiveSlot {
                        conn: conn(i),
                        in_use: false,
                    })
                    .collect(),
            ),
        }
    }

    fn stats(&self) -> (usize, usize) {
        let slots = self.slots.lock().unwrap();
        let in_use = slots.iter().filter(|s| s.in_use).count();
        (slots.len(), in_use)
    }
}

impl BenchPool for Naive {
    type Held<'a> = usize;
    fn acquire(&self) -> Option<usize> {
        let mut slots = self.slots.lock().unwrap();
        for (i, s) in slots.iter_mut().enumerate() {
            if !s.in_use && s.conn.is_alive() {
                s.in_use = true;
                return Some(i);
            }
        }
        None
    }
    fn release(&self, i: usize) {
        let mut slots = self.slots.lock().unwrap();
        slots[i].in_use = false;
        black_box(slots[i].conn.id);
    }
}

struct Deadpool(deadpool::unmanaged::Pool<Conn>);

impl BenchPool for Deadpool {
    type Held<'a> = deadpool::unmanaged::Object<Conn>;
    fn acquire(&self) -> Option<Self::Held<'_>> {
        self.0.try_get().ok()
    }
    fn release<'a>(&'a self, held: Self::Held<'a>) {
        drop(held);
    }
}

/// A pool in one of the two states, plus the connections held outside the
/// measured threads (the long sessions).
struct Setup<P: BenchPool> {
    pool: Arc<P>,
    _held: Box<dyn std::any::Any>,
}

fn filled(total: usize, leased: usize) -> (ConnPool<Conn>, Vec<Lease<Conn>>) {
    let pool = ConnPool::new(PoolConfig::new(total, total));
    for i in 0..total {
        pool.try_reserve().unwrap().offer(conn(i));
    }
    let held = (0..leased).map(|_| pool.acquire().unwrap()).collect();
    (pool, held)
}

fn ours(total: usize, leased: usize) -> Setup<Ours> {
    let (pool, held) = filled(total, leased);
    Setup {
        pool: Arc::new(Ours(pool)),
        _held: Box::new(held),
    }
}

fn ours_ref(total: usize, leased: usize) -> Setup<OursRef> {
    let (pool, held) = filled(total, leased);
    Setup {
        pool: Arc::new(OursRef(pool)),
        _held: Box::new(held),
    }
}

fn naive(total: usize, leased: usize) -> Setup<Naive> {
    let pool = Naive::new(total);
    let held: Vec<usize> = (0..leased).map(|_| pool.acquire().unwrap()).collect();
    Setup {
        pool: Arc::new(pool),
        _held: Box::new(held),
    }
}

fn deadpool(total: usize, leased: usize) -> Setup<Deadpool> {
    let pool = deadpool::unmanaged::Pool::from((0..total).map(conn).collect::<Vec<_>>());
    let held: Vec<_> = (0..leased).map(|_| pool.try_get().unwrap()).collect();
    Setup {
        pool: Arc::new(Deadpool(pool)),
        _held: Box::new(held),
    }
}

/// Run `iters` acquire+release pairs split over `threads` threads; wall time.
fn churn<P: BenchPool>(pool: &Arc<P>, threads: usize, iters: u64) -> Duration {
    let per = iters.div_ceil(threads as u64);
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let pool = pool.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let mut done = 0;
                while done < per {
                    if let Some(h) = pool.acquire() {
                        pool.release(black_box(h));
                        done += 1;
                    } else {
                        std::hint::spin_loop();
                    }
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for h in handles {
        h.join().unwrap();
    }
    start.elapsed()
}

/// Run `iters` pairs where one thread only acquires and hands each lease
/// over (through a bounded lock-free queue) to a second thread that only
/// releases: every release is on another thread than its acquire. Wall time.
fn churn_cross<P: BenchPool>(pool: &P, iters: u64) -> Duration {
    let handoff = ArrayQueue::new(64);
    let barrier = Barrier::new(3);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            barrier.wait();
            let mut done = 0;
            let mut idle = Idle::default();
            while done < iters {
                match pool.acquire() {
                    Some(mut h) => {
                        while let Err(back) = handoff.push(h) {
                            h = back;
                            idle.wait();
                        }
                        done += 1;
                        idle = Idle::default();
                    }
                    None => idle.wait(),
                }
            }
        });
        scope.spawn(|| {
            barrier.wait();
            let mut done = 0;
            let mut idle = Idle::default();
            while done < iters {
                match handoff.pop() {
                    Some(h) => {
                        pool.release(black_box(h));
                        done += 1;
                        idle = Idle::default();
                    }
                    None => idle.wait(),
                }
            }
        });
        barrier.wait();
        // The scope joins both threads before it returns.
        Instant::now()
    })
    .elapsed()
}

/// Waiting for the other thread of `churn_cross`: spin a little, then yield,
/// so a descheduled partner (a busy machine) gets the core back instead of
/// the waiter burning its time slice.
#[derive(Default)]
struct Idle(u32);

impl Idle {
    fn wait(&mut self) {
        if self.0 < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
        self.0 += 1;
    }
}

/// How the measured threads use the pool.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// This many threads, each releasing what it acquired.
    SameThread(usize),
    /// Two threads: one acquires, the other releases.
    CrossThread,
}

fn measure<P: BenchPool>(pool: &Arc<P>, shape: Shape, iters: u64) -> Duration {
    match shape {
        Shape::SameThread(threads) => churn(pool, threads, iters),
        Shape::CrossThread => churn_cross(&**pool, iters),
    }
}

/// Every pool design in one state, measured in one shape.
fn bench_designs(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    (total, leased): (usize, usize),
    shape: Shape,
    threads: usize,
) {
    let s = ours_ref(total, leased);
    group.bench_function(BenchmarkId::new("ours-ref", threads), |b| {
        b.iter_custom(|iters| measure(&s.pool, shape, iters))
    });
    let s = ours(total, leased);
    group.bench_function(BenchmarkId::new("ours-owned", threads), |b| {
        b.iter_custom(|iters| measure(&s.pool, shape, iters))
    });
    let s = deadpool(total, leased);
    group.bench_function(BenchmarkId::new("deadpool", threads), |b| {
        b.iter_custom(|iters| measure(&s.pool, shape, iters))
    });
    let s = naive(total, leased);
    group.bench_function(BenchmarkId::new("naive", threads), |b| {
        b.iter_custom(|iters| measure(&s.pool, shape, iters))
    });
}

/// (name, total connections, leased for the whole run)
const STATES: [(&str, usize, usize); 2] = [("16-idle", 16, 0), ("1024-90pct-leased", 1024, 922)];

fn acquire_release(c: &mut Criterion) {
    for (state, total, leased) in STATES {
        let mut group = c.benchmark_group(format!("acquire_release/{state}"));
        group.measurement_time(Duration::from_secs(3));
        group.warm_up_time(Duration::from_millis(500));
        group.sample_size(20);
        for threads in [1usize, 2, 8] {
            bench_designs(
                &mut group,
                (total, leased),
                Shape::SameThread(threads),
                threads,
            );
        }
        group.finish();
    }
}

/// Every release on another thread than its acquire (two threads).
fn cross_thread(c: &mut Criterion) {
    for (state, total, leased) in STATES {
        let mut group = c.benchmark_group(format!("cross_thread/{state}"));
        group.measurement_time(Duration::from_secs(3));
        group.warm_up_time(Duration::from_millis(500));
        group.sample_size(20);
        bench_designs(&mut group, (total, leased), Shape::CrossThread, 2);
        group.finish();
    }
}

/// Cost of one snapshot while two threads churn the pool (90 % leased).
fn snapshot_under_churn(c: &mut Criterion) {
    let mut group = c.benchmark_group("snapshot_under_churn");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_millis(500));
    group.sample_size(20);

    fn with_churn<P: BenchPool>(pool: &Arc<P>, f: impl FnOnce()) {
        let stop = Arc::new(AtomicBool::new(false));
        let churners: Vec<_> = (0..2)
            .map(|_| {
                let pool = pool.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(h) = pool.acquire() {
                            pool.release(h);
                        }
                    }
                })
            })
            .collect();
        f();
        stop.store(true, Ordering::Relaxed);
        for h in churners {
            h.join().unwrap();
        }
    }

    // Two sizes: an O(1) snapshot costs the same at both, an O(n) scan does not.
    for total in [16usize, 1024] {
        let leased = total * 9 / 10;
        let s = ours(total, leased);
        with_churn(&s.pool, || {
            group.bench_function(BenchmarkId::new("ours", total), |b| {
                b.iter(|| black_box(s.pool.0.snapshot()))
            });
        });
        let s = naive(total, leased);
        with_churn(&s.pool, || {
            group.bench_function(BenchmarkId::new("naive", total), |b| {
                b.iter(|| black_box(s.pool.stats()))
            });
        });
    }
    group.finish();
}

criterion_group!(benches, acquire_release, cross_thread, snapshot_under_churn);
criterion_main!(benches);
