//! loom model checks of the pool: the code under test is the production code,
//! built on the crate's `sync` facade, which is loom under `--cfg loom`.
//!
//! Run: `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test -p sttproxy-pool --release`
#![cfg(loom)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::sync::{Arc, Mutex};
use loom::thread;

use sttproxy_pool::__private::ArrayQueue;
use sttproxy_pool::{ConnPool, Connection, PoolConfig, Returned, Signal};

/// A connection that records, in a shared log, that it was closed, and that
/// flags (to catch double leasing) while some thread holds it.
struct Conn {
    id: usize,
    alive: bool,
    in_use: Arc<AtomicBool>,
    closed: Arc<Mutex<Vec<usize>>>,
}

impl Connection for Conn {
    fn is_alive(&self) -> bool {
        self.alive
    }

    fn close(self) {
        self.closed.lock().unwrap().push(self.id);
    }
}

struct World {
    pool: ConnPool<Conn>,
    closed: Arc<Mutex<Vec<usize>>>,
    in_use: Vec<Arc<AtomicBool>>,
}

/// A pool filled with `n` idle connections through the reservation path.
fn world(n: usize, target: usize, max: usize) -> World {
    let pool = ConnPool::new(PoolConfig {
        capacity: max,
        target,
        max,
    });
    let closed = Arc::new(Mutex::new(Vec::new()));
    let mut in_use = Vec::new();
    for id in 0..n {
        let flag = Arc::new(AtomicBool::new(false));
        in_use.push(flag.clone());
        let r = pool
            .try_reserve()
            .expect("room for the initial connections");
        assert_eq!(r.offer(conn(id, flag, &closed)), Returned::Idle);
    }
    World {
        pool,
        closed,
        in_use,
    }
}

fn conn(id: usize, in_use: Arc<AtomicBool>, closed: &Arc<Mutex<Vec<usize>>>) -> Conn {
    Conn {
        id,
        alive: true,
        in_use,
        closed: closed.clone(),
    }
}

/// The ids of the idle connections (sorted): each is taken out and put back.
/// Only at quiescence.
fn drain_ids(pool: &ConnPool<Conn>) -> Vec<usize> {
    let mut leases = Vec::new();
    while let Some(l) = pool.acquire() {
        leases.push(l);
    }
    let mut ids: Vec<usize> = leases.iter().map(|l| l.id).collect();
    for l in leases {
        l.release();
    }
    ids.sort_unstable();
    ids
}

/// Hold a lease as its session would: flag it in use, check nobody else had it.
fn hold(lease: &sttproxy_pool::Lease<Conn>) {
    assert!(
        !lease.in_use.swap(true, Ordering::SeqCst),
        "connection {} leased twice at once",
        lease.id
    );
    lease.in_use.store(false, Ordering::SeqCst);
}

// 1. The queue never loses, duplicates or invents an item, and respects capacity,
//    including wrap-around.
#[test]
fn queue_concurrent_push_pop_capacity_two() {
    loom::model(|| {
        let q = Arc::new(ArrayQueue::new(2));
        // Pre-fill and drain once so positions wrap into the next lap.
        q.push(100).unwrap();
        assert_eq!(q.pop(), Some(100));
        let producers: Vec<_> = [1, 2, 3]
            .into_iter()
            .map(|v| {
                let q = q.clone();
                thread::spawn(move || q.push(v).is_ok().then_some(v))
            })
            .collect();
        let popped_early = q.pop();
        let mut pushed: Vec<i32> = producers
            .into_iter()
            .filter_map(|t| t.join().unwrap())
            .collect();
        assert!(
            pushed.len() >= 2,
            "with one pop, at least 2 of 3 pushes fit"
        );
        let mut popped: Vec<i32> = popped_early.into_iter().collect();
        while let Some(v) = q.pop() {
            popped.push(v);
        }
        pushed.sort_unstable();
        popped.sort_unstable();
        assert_eq!(pushed, popped, "every pushed item is popped exactly once");
        assert!(q.len() == 0);
    });
}

#[test]
fn queue_capacity_one_wraps_around() {
    loom::model(|| {
        let q = Arc::new(ArrayQueue::new(1));
        let q1 = q.clone();
        let producer = thread::spawn(move || {
            let mut ok = Vec::new();
            for v in [1, 2] {
                if q1.push(v).is_ok() {
                    ok.push(v);
                }
            }
            ok
        });
        let q2 = q.clone();
        let consumer = thread::spawn(move || q2.pop());
        let mut pushed = producer.join().unwrap();
        let mut popped: Vec<i32> = consumer.join().unwrap().into_iter().collect();
        assert!(q.len() <= 1);
        while let Some(v) = q.pop() {
            popped.push(v);
        }
        pushed.sort_unstable();
        popped.sort_unstable();
        assert_eq!(pushed, popped);
    });
}

// 2. Two threads acquiring and releasing over 1–2 connections never hold the same
//    connection at once, and end with every connection idle exactly once.
#[test]
fn acquire_release_exclusive() {
    for n in [1, 2] {
        loom::model(move || {
            let w = world(n, n, n);
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    let pool = w.pool.clone();
                    thread::spawn(move || {
                        if let Some(lease) = pool.acquire() {
                            hold(&lease);
                            assert_eq!(lease.release(), Returned::Idle);
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            let s = w.pool.snapshot();
            assert_eq!((s.live, s.idle, s.leased), (n, n, 0));
            assert_eq!(s.acquired_total, s.released_total);
            assert_eq!(drain_ids(&w.pool), (0..n).collect::<Vec<_>>());
            assert!(w.closed.lock().unwrap().is_empty());
            drop(w.in_use);
        });
    }
}

// 3. Reserve/offer racing release and discard: `live` never exceeds max, and the
//    counters equal the truth at the end.
#[test]
fn reserve_offer_vs_release_vs_discard_never_overshoot() {
    loom::model(|| {
        // max 2, one connection live and leased, so one slot is free.
        let w = world(1, 1, 2);
        let lease = w.pool.acquire().unwrap();
        let max = 2;

        let reservers: Vec<_> = (0..2)
            .map(|i| {
                let pool = w.pool.clone();
                let closed = w.closed.clone();
                thread::spawn(move || {
                    if let Some(r) = pool.try_reserve() {
                        let live = pool.live();
                        assert!(live <= max, "live {live} > max {max}");
                        r.offer(conn(10 + i, Arc::new(AtomicBool::new(false)), &closed));
                        true
                    } else {
                        false
                    }
                })
            })
            .collect();
        let pool = w.pool.clone();
        let releaser = thread::spawn(move || {
            lease.discard();
            let live = pool.live();
            assert!(live <= max, "live {live} > max {max}");
        });
        releaser.join().unwrap();
        let reserved: usize = reservers
            .into_iter()
            .map(|t| usize::from(t.join().unwrap()))
            .sum();
        assert!(reserved >= 1, "the discard freed a slot or one was free");
        let s = w.pool.snapshot();
        let closed = w.closed.lock().unwrap().len();
        assert!(s.live <= max);
        assert_eq!(s.dialing, 0);
        assert_eq!(s.leased, 0);
        assert_eq!(s.live, s.idle);
        // Truth: 1 initial + offered connections, minus those closed.
        assert_eq!(s.live, 1 + reserved - closed);
        assert_eq!(s.discarded_total, closed);
    });
}

// 4a. Shrinking racing a release: the pool ends at target, and a connection
//     released into an over-target pool is closed and counted once.
#[test]
fn shrink_racing_release_ends_at_target() {
    loom::model(|| {
        let w = world(2, 2, 2);
        let lease = w.pool.acquire().unwrap();
        let pool = w.pool.clone();
        let shrinker = thread::spawn(move || {
            pool.set_target(1);
            pool.shrink_to_target();
        });
        let returned = lease.release();
        shrinker.join().unwrap();
        w.pool.shrink_to_target();
        let s = w.pool.snapshot();
        let closed = w.closed.lock().unwrap().clone();
        assert_eq!(s.live, 1, "converged to target");
        assert_eq!(s.idle, 1);
        assert_eq!(closed.len(), 1, "exactly one connection closed");
        assert_eq!(s.discarded_total, 1, "counted once");
        assert_eq!(
            s.released_total,
            usize::from(returned == Returned::Idle),
            "released counts only connections queued"
        );
    });
}

// 4b. Drain racing a release: nothing stays idle in a draining pool; every
//     connection is closed exactly once.
#[test]
fn drain_racing_release_closes_everything_once() {
    loom::model(|| {
        let w = world(2, 2, 2);
        let lease = w.pool.acquire().unwrap();
        let pool = w.pool.clone();
        let drainer = thread::spawn(move || pool.drain());
        lease.release();
        drainer.join().unwrap();
        let s = w.pool.snapshot();
        let mut closed = w.closed.lock().unwrap().clone();
        closed.sort_unstable();
        assert_eq!(closed, vec![0, 1], "each connection closed exactly once");
        assert_eq!((s.live, s.idle), (0, 0));
        assert_eq!(s.discarded_total, 2);
    });
}

// 4c. close() racing a Lease drop ends with nothing live.
#[test]
fn close_racing_lease_drop_ends_with_nothing_live() {
    loom::model(|| {
        let w = world(1, 1, 1);
        let lease = w.pool.acquire().unwrap();
        let pool = w.pool.clone();
        let closer = thread::spawn(move || pool.close());
        drop(lease);
        closer.join().unwrap();
        let s = w.pool.snapshot();
        assert_eq!((s.live, s.idle, s.leased), (0, 0, 0));
        assert_eq!(w.closed.lock().unwrap().as_slice(), &[0]);
        assert!(
            w.pool.try_reserve().is_none(),
            "a closed pool reserves nothing"
        );
    });
}

// 5. The Signal: concurrent triggers never let the worker run twice at once, and
//    a trigger during a run is always followed by another run. A lost wake-up
//    leaves the worker blocked forever, which loom reports as a deadlock.
#[test]
fn signal_coalesces_and_never_loses_a_trigger() {
    loom::model(|| {
        let signal = Arc::new(Signal::new());
        let requested = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicUsize::new(0));

        let triggers: Vec<_> = (0..2)
            .map(|_| {
                let signal = signal.clone();
                let requested = requested.clone();
                thread::spawn(move || {
                    requested.fetch_add(1, Ordering::SeqCst);
                    signal.trigger();
                })
            })
            .collect();

        // The worker: each run observes the requests made before it.
        let mut runs = 0;
        loop {
            loom::future::block_on(signal.wait());
            assert_eq!(
                running.fetch_add(1, Ordering::SeqCst),
                0,
                "two runs at once"
            );
            runs += 1;
            let seen = requested.load(Ordering::SeqCst);
            running.fetch_sub(1, Ordering::SeqCst);
            if seen == 2 {
                break;
            }
        }
        assert!(runs <= 2, "coalesced: at most one run per trigger");
        for t in triggers {
            t.join().unwrap();
        }
    });
}

// 6. A release wakes a task waiting for a connection: no lost wake-up.
#[test]
fn release_wakes_waiter() {
    loom::model(|| {
        let w = world(1, 1, 1);
        let lease = w.pool.acquire().unwrap();
        let pool = w.pool.clone();
        let waiter = thread::spawn(move || {
            let lease = loom::future::block_on(pool.acquire_wait()).expect("pool is open");
            hold(&lease);
            lease.release();
        });
        hold(&lease);
        assert_eq!(lease.release(), Returned::Idle);
        waiter.join().unwrap();
        let s = w.pool.snapshot();
        assert_eq!((s.live, s.idle), (1, 1));
        assert_eq!(s.acquired_total, 2);
    });
}

// 6b. A woken waiter that gives up passes the wake-up on to the next waiter.
#[test]
fn abandoned_wakeup_is_passed_on() {
    loom::model(|| {
        let w = world(1, 1, 1);
        let lease = w.pool.acquire().unwrap();
        let pool = w.pool.clone();
        let patient = thread::spawn(move || {
            let lease = loom::future::block_on(pool.acquire_wait()).expect("pool is open");
            lease.release();
        });
        // An impatient waiter polls once, then gives up (its session timed out).
        let mut impatient = Box::pin(w.pool.acquire_wait());
        let waker = futures_noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let first = impatient.as_mut().poll(&mut cx);
        lease.release();
        drop(first);
        drop(impatient);
        patient.join().unwrap();
    });
}

use std::future::Future;

fn futures_noop_waker() -> std::task::Waker {
    std::task::Waker::noop().clone()
}

// 7. A connection parked on one thread's stripe is found by an acquire on
//    another stripe, and a release parked on one stripe wakes a waiter on
//    another: parking never hides an idle connection.
#[test]
fn parked_connection_is_found_from_another_stripe() {
    loom::model(|| {
        let w = world(1, 1, 1);
        let lease = w.pool.acquire().unwrap();
        let pool = w.pool.clone();
        let waiter = thread::spawn(move || {
            sttproxy_pool::__private::set_thread_stripe(1);
            let lease = loom::future::block_on(pool.acquire_wait()).expect("pool is open");
            hold(&lease);
            lease.release();
        });
        // This thread (stripe 0) parks the connection on its own stripe.
        hold(&lease);
        assert_eq!(lease.release(), Returned::Idle);
        waiter.join().unwrap();
        let s = w.pool.snapshot();
        assert_eq!((s.live, s.idle, s.leased), (1, 1, 0));
        assert_eq!((s.acquired_total, s.released_total), (2, 2));
    });
}

// 8. Drain racing a release that parks on another stripe: nothing stays idle.
#[test]
fn drain_racing_a_parking_release_closes_everything() {
    loom::model(|| {
        let w = world(1, 1, 1);
        let lease = w.pool.acquire().unwrap();
        let pool = w.pool.clone();
        let releaser = thread::spawn(move || {
            sttproxy_pool::__private::set_thread_stripe(1);
            lease.release();
        });
        pool_drain_and_check(&w.pool);
        releaser.join().unwrap();
        let s = w.pool.snapshot();
        assert_eq!((s.live, s.idle), (0, 0));
        assert_eq!(w.closed.lock().unwrap().as_slice(), &[0]);
    });
}

fn pool_drain_and_check(pool: &ConnPool<Conn>) {
    pool.drain();
    assert!(pool.acquire().is_none());
}
