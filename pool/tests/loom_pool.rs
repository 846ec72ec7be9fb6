//! loom model checks of the pool: the code under test is the production code,
//! built on the crate's `sync` facade, which is loom under `--cfg loom`.
//!
//! Run: `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test -p sttproxy-pool --release`
#![cfg(loom)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::sync::{Arc, Mutex};
use loom::thread;
use std::future::Future;

use sttproxy_pool::__private::ArrayQueue;
use sttproxy_pool::{
    ConnPool, Connection, PoolConfig, PoolDraining, Reservation, Returned, Signal,
};

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

/// Offer connection `id` through `r` on a new thread (a dial completing).
fn offer_in_thread(w: &World, r: Reservation<Conn>, id: usize) -> thread::JoinHandle<Returned> {
    let closed = w.closed.clone();
    thread::spawn(move || r.offer(conn(id, Arc::new(AtomicBool::new(false)), &closed)))
}

/// Offer connection `id` through `r` on this thread.
fn offer(w: &World, r: Reservation<Conn>, id: usize) -> Returned {
    r.offer(conn(id, Arc::new(AtomicBool::new(false)), &w.closed))
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
        assert!(q.is_empty());
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

fn futures_noop_waker() -> std::task::Waker {
    std::task::Waker::noop().clone()
}

// 7. A connection on one thread's stripe is found by an acquire on another
//    stripe, and a release to one stripe wakes a waiter on another: a stripe
//    never hides an idle connection.
#[test]
fn a_connection_on_a_stripe_is_found_from_another_stripe() {
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
        // This thread (stripe 0) leaves the connection on its own stripe.
        sttproxy_pool::__private::set_thread_stripe(0);
        hold(&lease);
        assert_eq!(lease.release(), Returned::Idle);
        waiter.join().unwrap();
        let s = w.pool.snapshot();
        assert_eq!((s.live, s.idle, s.leased), (1, 1, 0));
        assert_eq!((s.acquired_total, s.released_total), (2, 2));
    });
}

// 8. Drain racing a release to another stripe: nothing stays idle.
#[test]
fn drain_racing_a_release_to_a_stripe_closes_everything() {
    loom::model(|| {
        let w = world(1, 1, 1);
        let lease = w.pool.acquire().unwrap();
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

// ---------------------------------------------------------------------------
// Issue 10: interleavings the suite above did not reach. Each test names the
// defect it catches; every one failed on the code before the fix.

// Defect 1, the queue half: a pop that starts after a push completed must not
// report empty, even while an earlier push has claimed the head slot and not
// written it yet.
#[test]
fn queue_pop_after_a_completed_push_is_never_empty() {
    loom::model(|| {
        let q = Arc::new(ArrayQueue::new(2));
        let q1 = q.clone();
        let other = thread::spawn(move || q1.push(1).unwrap());
        q.push(2).unwrap();
        let first = q.pop();
        assert!(first.is_some(), "pop after a completed push reported empty");
        other.join().unwrap();
        let second = q.pop();
        let mut got: Vec<i32> = first.into_iter().chain(second).collect();
        got.sort_unstable();
        assert_eq!(got, vec![1, 2]);
    });
}

// Defect 1, the pool half: an acquire that starts after an offer completed
// finds a connection (routing would otherwise dial on demand for nothing).
#[test]
fn acquire_after_a_completed_offer_finds_a_connection() {
    loom::model(|| {
        let w = world(0, 2, 2);
        let r1 = w.pool.try_reserve().unwrap();
        let r2 = w.pool.try_reserve().unwrap();
        let other = offer_in_thread(&w, r1, 1);
        offer(&w, r2, 2);
        let lease = w.pool.acquire();
        assert!(
            lease.is_some(),
            "acquire after a completed offer found no connection"
        );
        other.join().unwrap();
        drop(lease);
    });
}

/// A waker that counts its wake-ups (a loom atomic, so loom sees them).
struct CountingWaker(AtomicUsize);

impl std::task::Wake for CountingWaker {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A task waiting for a connection, polled by hand as an executor would:
/// once when it starts, and again each time it was woken.
struct Waiting {
    fut: std::pin::Pin<Box<sttproxy_pool::AcquireWait<Conn>>>,
    waker: std::task::Waker,
    wakes: std::sync::Arc<CountingWaker>,
    polled_wakes: usize,
    /// The id of the connection it got, or `Err` if the pool drained.
    outcome: Option<Result<usize, PoolDraining>>,
}

impl Waiting {
    fn start(pool: &ConnPool<Conn>) -> Self {
        let wakes = std::sync::Arc::new(CountingWaker(AtomicUsize::new(0)));
        let mut w = Self {
            fut: Box::pin(pool.acquire_wait()),
            waker: std::task::Waker::from(wakes.clone()),
            wakes,
            polled_wakes: 0,
            outcome: None,
        };
        w.poll();
        w
    }

    fn poll(&mut self) {
        let mut cx = std::task::Context::from_waker(&self.waker);
        if let std::task::Poll::Ready(r) = self.fut.as_mut().poll(&mut cx) {
            self.outcome = Some(r.map(|lease| lease.id));
        }
    }

    /// Poll again if woken since the last poll. True if it was.
    fn run_if_woken(&mut self) -> bool {
        let wakes = self.wakes.0.load(Ordering::SeqCst);
        if self.outcome.is_some() || wakes == self.polled_wakes {
            return false;
        }
        self.polled_wakes = wakes;
        self.poll();
        true
    }
}

// Defect 1, the waiter form: waiters W1 then W2 registered, two connections
// offered concurrently (the first offer's producer may be preempted between
// claiming its queue slot and writing it). Every waiter that is woken is
// polled again, as an executor would; both must end up served. Before the
// fix, W1, woken by the second offer, found the queue "empty" (the first
// offer's slot was claimed, not written) and went back to sleep, and the
// first offer's wake-up went to W2: W1 slept while a connection sat idle.
#[test]
fn two_waiters_two_offers_both_served() {
    loom::model(|| {
        let w = world(0, 2, 2);
        let r1 = w.pool.try_reserve().unwrap();
        let r2 = w.pool.try_reserve().unwrap();
        let mut waiters = [Waiting::start(&w.pool), Waiting::start(&w.pool)];
        assert!(waiters.iter().all(|t| t.outcome.is_none()));
        let other = offer_in_thread(&w, r1, 1);
        offer(&w, r2, 2);
        // Run what this offer woke while the other offer may be in flight.
        for t in &mut waiters {
            t.run_if_woken();
        }
        other.join().unwrap();
        // Then run every wake-up until none is left.
        while waiters.iter_mut().any(Waiting::run_if_woken) {}
        let mut ids: Vec<_> = waiters
            .iter()
            .map(|t| t.outcome.and_then(Result::ok))
            .collect();
        ids.sort_unstable();
        assert_eq!(
            ids,
            vec![Some(1), Some(2)],
            "a waiter was left asleep while a connection was idle"
        );
    });
}

/// Every relation a snapshot promises, whenever it is taken.
fn check_snapshot(s: &sttproxy_pool::PoolSnapshot) {
    assert!(s.idle <= s.live, "idle {} > live {}: {s:?}", s.idle, s.live);
    assert!(
        s.leased <= s.live,
        "leased {} > live {}: {s:?}",
        s.leased,
        s.live
    );
    assert!(s.dialing <= s.live, "dialing > live: {s:?}");
    assert_eq!(
        s.idle + s.leased + s.dialing,
        s.live,
        "parts != live: {s:?}"
    );
    assert!(s.live <= s.max, "live {} > max {}: {s:?}", s.live, s.max);
    assert!(
        s.target <= s.max,
        "target {} > max {}: {s:?}",
        s.target,
        s.max
    );
}

/// `later`'s totals are all at least `earlier`'s.
fn check_monotonic(earlier: &sttproxy_pool::PoolSnapshot, later: &sttproxy_pool::PoolSnapshot) {
    let pairs = [
        (
            "acquired_total",
            earlier.acquired_total,
            later.acquired_total,
        ),
        (
            "released_total",
            earlier.released_total,
            later.released_total,
        ),
        (
            "discarded_total",
            earlier.discarded_total,
            later.discarded_total,
        ),
        (
            "dial_failures_total",
            earlier.dial_failures_total,
            later.dial_failures_total,
        ),
    ];
    for (name, a, b) in pairs {
        assert!(a <= b, "{name} ran backwards: {a} then {b}");
    }
}

// Defect 2: during warm-up (an offer, which is not a session's release) no
// snapshot may show a released total other than 0 — in particular not
// 2^64 − 1 from subtracting a maintenance count bumped after the push.
#[test]
fn snapshot_during_an_offer_counts_no_release() {
    loom::model(|| {
        let w = world(0, 1, 1);
        let r = w.pool.try_reserve().unwrap();
        let other = offer_in_thread(&w, r, 1);
        let s = w.pool.snapshot();
        assert_eq!(s.released_total, 0, "an offer counted as a release: {s:?}");
        assert_eq!(s.acquired_total, 0, "{s:?}");
        other.join().unwrap();
    });
}

// Defect 2: totals never run backwards while a maintenance checkout and a
// session churn, and never exceed what happened.
#[test]
fn totals_never_run_backwards_under_maintenance_and_sessions() {
    loom::model(|| {
        let w = world(1, 1, 1);
        let pool = w.pool.clone();
        let maintenance = thread::spawn(move || {
            if let Some(l) = pool.checkout_idle() {
                l.release();
            }
        });
        let pool = w.pool.clone();
        let session = thread::spawn(move || match pool.acquire() {
            Some(l) => usize::from(l.release() == Returned::Idle),
            None => 0,
        });
        let s1 = w.pool.snapshot();
        let s2 = w.pool.snapshot();
        check_monotonic(&s1, &s2);
        for s in [&s1, &s2] {
            assert!(s.acquired_total <= 1 && s.released_total <= 1, "{s:?}");
        }
        maintenance.join().unwrap();
        let released = session.join().unwrap();
        let s3 = w.pool.snapshot();
        check_monotonic(&s2, &s3);
        assert_eq!(s3.released_total, released, "{s3:?}");
        assert_eq!(s3.acquired_total, s3.released_total, "{s3:?}");
    });
}

// Defect 3: a snapshot taken while a connection is offered never shows more
// idle connections than live ones.
#[test]
fn snapshot_during_an_offer_never_shows_idle_above_live() {
    loom::model(|| {
        let w = world(1, 2, 2);
        let r = w.pool.try_reserve().unwrap();
        let other = offer_in_thread(&w, r, 1);
        check_snapshot(&w.pool.snapshot());
        other.join().unwrap();
        check_snapshot(&w.pool.snapshot());
    });
}

// Defect 3: a reservation made and given back shows up as dialing, never as
// a leased connection (nothing is ever leased here).
#[test]
fn snapshot_around_a_reservation_shows_nothing_leased() {
    loom::model(|| {
        let w = world(0, 1, 1);
        let pool = w.pool.clone();
        let other = thread::spawn(move || {
            if let Some(r) = pool.try_reserve() {
                r.unreserve();
            }
        });
        let s = w.pool.snapshot();
        check_snapshot(&s);
        assert_eq!(s.leased, 0, "nothing is leased: {s:?}");
        other.join().unwrap();
    });
}

// Defect 4: set_target racing set_limits never leaves target above max (after
// which the deficit would stay positive forever), and no concurrent snapshot
// shows it above max either.
#[test]
fn set_target_racing_set_limits_keeps_target_within_max() {
    loom::model(|| {
        let w = world(0, 1, 2);
        let pool = w.pool.clone();
        let other = thread::spawn(move || pool.set_target(2));
        let pool = w.pool.clone();
        let observer = thread::spawn(move || check_snapshot(&pool.snapshot()));
        w.pool.set_limits(1, 1);
        other.join().unwrap();
        observer.join().unwrap();
        let s = w.pool.snapshot();
        check_snapshot(&s);
        assert_eq!(s.max, 1);
        assert_eq!(w.pool.deficit(), s.target);
    });
}

// Defect 7: an acquire's steal phase also looks at its own stripe again. Here
// a connection is idle at every instant of the acquire (X is released before
// Y is taken), yet an acquire that skips its own stripe after its first look
// can miss both: it looks at stripe 0 before X arrives there and at stripe 1
// after Y left.
#[test]
fn acquire_rechecks_its_own_stripe_when_stealing() {
    loom::model(|| {
        let w = world(2, 2, 2);
        sttproxy_pool::__private::set_thread_stripe(1);
        let x = w.pool.acquire().unwrap();
        let y = w.pool.acquire().unwrap();
        // Y waits on stripe 1, X is leased.
        assert_eq!(y.release(), Returned::Idle);
        let released = Arc::new(AtomicBool::new(false));
        let flag = released.clone();
        let releaser = thread::spawn(move || {
            sttproxy_pool::__private::set_thread_stripe(0);
            assert_eq!(x.release(), Returned::Idle);
            flag.store(true, Ordering::SeqCst);
        });
        let pool = w.pool.clone();
        let taker = thread::spawn(move || {
            sttproxy_pool::__private::set_thread_stripe(1);
            while !released.load(Ordering::SeqCst) {
                thread::yield_now();
            }
            pool.acquire().map(|l| l.id)
        });
        sttproxy_pool::__private::set_thread_stripe(0);
        let mine = w.pool.acquire();
        assert!(
            mine.is_some(),
            "acquire found nothing while a connection was idle throughout"
        );
        releaser.join().unwrap();
        let theirs = taker.join().unwrap();
        assert!(theirs.is_some());
        assert_ne!(theirs, mine.as_ref().map(|l| l.id));
    });
}

// Coverage: two waiters and two sessions' releases (to the releasing
// threads' stripes, which loom assigns as production does): both waiters are
// served.
#[test]
fn two_waiters_two_releases_both_served() {
    loom::model(|| {
        let w = world(2, 2, 2);
        let a = w.pool.acquire().unwrap();
        let b = w.pool.acquire().unwrap();
        let mut waiters = [Waiting::start(&w.pool), Waiting::start(&w.pool)];
        let other = thread::spawn(move || {
            assert_eq!(a.release(), Returned::Idle);
        });
        assert_eq!(b.release(), Returned::Idle);
        for t in &mut waiters {
            t.run_if_woken();
        }
        other.join().unwrap();
        while waiters.iter_mut().any(Waiting::run_if_woken) {}
        let mut ids: Vec<_> = waiters
            .iter()
            .map(|t| t.outcome.and_then(Result::ok))
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![Some(0), Some(1)]);
        let s = w.pool.snapshot();
        assert_eq!((s.acquired_total, s.released_total), (4, 2));
    });
}

// Coverage: a drain racing a registered waiter ends its wait with
// `PoolDraining` (and closes the idle connection exactly once).
#[test]
fn drain_racing_a_registered_waiter_ends_its_wait() {
    loom::model(|| {
        let w = world(1, 1, 1);
        let lease = w.pool.acquire().unwrap();
        let mut waiter = Waiting::start(&w.pool);
        let pool = w.pool.clone();
        let drainer = thread::spawn(move || pool.drain());
        let returned = lease.release();
        waiter.run_if_woken();
        drainer.join().unwrap();
        while waiter.run_if_woken() {}
        match waiter.outcome {
            // It got the connection before the drain, or the drain ended its wait.
            Some(Ok(0)) => assert_eq!(returned, Returned::Idle),
            Some(Err(PoolDraining)) => {}
            other => panic!("the waiter was left waiting: {other:?}"),
        }
        drop(waiter);
        let s = w.pool.snapshot();
        assert_eq!((s.live, s.idle), (0, 0), "{s:?}");
        assert_eq!(w.closed.lock().unwrap().as_slice(), &[0]);
    });
}

// Coverage: a health sweep (checkout and return of each idle connection)
// racing a session: no connection is held twice, the sweep meets each
// connection at most once, nothing is lost or closed, and every concurrent
// snapshot keeps its promises.
#[test]
fn idle_sweep_racing_a_session() {
    loom::model(|| {
        let w = world(2, 2, 2);
        let pool = w.pool.clone();
        let sweeper = thread::spawn(move || {
            let mut seen = Vec::new();
            for lease in pool.idle_sweep() {
                hold(&lease);
                seen.push(lease.id);
                assert_eq!(lease.release(), Returned::Idle);
            }
            seen
        });
        let pool = w.pool.clone();
        let session = thread::spawn(move || match pool.acquire() {
            Some(lease) => {
                hold(&lease);
                assert_eq!(lease.release(), Returned::Idle);
                1
            }
            None => 0,
        });
        let s1 = w.pool.snapshot();
        check_snapshot(&s1);
        let mut seen = sweeper.join().unwrap();
        let sessions = session.join().unwrap();
        seen.sort_unstable();
        seen.dedup();
        let s2 = w.pool.snapshot();
        check_snapshot(&s2);
        check_monotonic(&s1, &s2);
        assert_eq!((s2.live, s2.idle), (2, 2));
        assert_eq!((s2.acquired_total, s2.released_total), (sessions, sessions));
        assert!(w.closed.lock().unwrap().is_empty());
        assert_eq!(drain_ids(&w.pool), vec![0, 1]);
    });
}

// Coverage: pruning (a sweep that closes dead connections) racing a session
// that releases a dead connection and a checkout for maintenance: each dead
// connection is closed exactly once, the alive one stays.
#[test]
fn prune_racing_a_session_and_a_checkout() {
    loom::model(|| {
        let w = world(2, 2, 2);
        let mut dead = w.pool.acquire().unwrap();
        dead.alive = false;
        let pool = w.pool.clone();
        let pruner = thread::spawn(move || pool.prune_dead_idle());
        let pool = w.pool.clone();
        let session = thread::spawn(move || {
            assert_eq!(dead.release(), Returned::Closed);
            if let Some(l) = pool.checkout_idle() {
                hold(&l);
                assert_eq!(l.release(), Returned::Idle);
            }
        });
        check_snapshot(&w.pool.snapshot());
        pruner.join().unwrap();
        session.join().unwrap();
        let s = w.pool.snapshot();
        check_snapshot(&s);
        assert_eq!((s.live, s.idle, s.discarded_total), (1, 1, 1), "{s:?}");
        assert_eq!(w.closed.lock().unwrap().len(), 1);
        assert_eq!(drain_ids(&w.pool).len(), 1);
    });
}
