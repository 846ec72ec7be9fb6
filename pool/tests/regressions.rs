//! Deterministic regression tests of issue 10's defects that need no
//! interleaving to show (the interleavings are in `loom_pool.rs`).
#![cfg(not(loom))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use sttproxy_pool::__private::set_thread_stripe;
use sttproxy_pool::{ConnPool, Connection, PoolConfig, Returned};

struct Conn {
    id: usize,
    closed: Arc<Mutex<Vec<usize>>>,
}

impl Connection for Conn {
    fn is_alive(&self) -> bool {
        true
    }

    fn close(self) {
        self.closed.lock().unwrap().push(self.id);
    }
}

/// A pool of `n` idle connections (ids `0..n`) and the log of closed ids.
fn filled(n: usize) -> (ConnPool<Conn>, Arc<Mutex<Vec<usize>>>) {
    let pool = ConnPool::new(PoolConfig::new(n, n));
    let closed = Arc::new(Mutex::new(Vec::new()));
    for id in 0..n {
        let conn = Conn {
            id,
            closed: closed.clone(),
        };
        assert_eq!(pool.try_reserve().unwrap().offer(conn), Returned::Idle);
    }
    (pool, closed)
}

fn sorted(log: &Mutex<Vec<usize>>) -> Vec<usize> {
    let mut v = log.lock().unwrap().clone();
    v.sort_unstable();
    v
}

// Defect 5: idle connections are closed (not just dropped) when the last
// handle to the pool goes, those in the queue and those on a stripe alike.
#[test]
fn dropping_the_pool_closes_every_idle_connection_once() {
    let (pool, closed) = filled(3);
    set_thread_stripe(0);
    // One connection waits on this thread's stripe, two in the queue.
    let lease = pool.acquire().unwrap();
    assert_eq!(lease.release(), Returned::Idle);
    assert_eq!(pool.snapshot().idle, 3);
    drop(pool);
    assert_eq!(sorted(&closed), vec![0, 1, 2]);
}

// Defect 5: a lease that outlives every pool handle returns its connection
// to a pool nobody can reach; when the lease goes, the pool goes, and every
// idle connection is closed.
#[test]
fn a_lease_outliving_the_pool_handle_leaves_nothing_unclosed() {
    let (pool, closed) = filled(2);
    let lease = pool.acquire().unwrap();
    drop(pool);
    assert!(
        closed.lock().unwrap().is_empty(),
        "the lease keeps the pool"
    );
    lease.release();
    assert_eq!(sorted(&closed), vec![0, 1]);
}

/// A waker that counts its wake-ups.
struct Counting(AtomicUsize);

impl Wake for Counting {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn counting_waker() -> (Waker, Arc<Counting>) {
    let c = Arc::new(Counting(AtomicUsize::new(0)));
    (Waker::from(c.clone()), c)
}

fn poll<F: Future + Unpin>(f: &mut F, waker: &Waker) -> Poll<F::Output> {
    Pin::new(f).poll(&mut Context::from_waker(waker))
}

// Defect 7: a woken waiter that loses the connection to a session that did
// not wait keeps its place: the next release wakes it again, not the waiter
// that registered after it.
#[test]
fn a_woken_waiter_that_loses_the_race_stays_oldest() {
    let (pool, _closed) = filled(1);
    let lease = pool.acquire().unwrap();
    let (k1, c1) = counting_waker();
    let (k2, c2) = counting_waker();
    let mut w1 = Box::pin(pool.acquire_wait());
    let mut w2 = Box::pin(pool.acquire_wait());
    assert!(poll(&mut w1, &k1).is_pending());
    assert!(poll(&mut w2, &k2).is_pending());

    lease.release();
    assert_eq!(
        (c1.0.load(Ordering::SeqCst), c2.0.load(Ordering::SeqCst)),
        (1, 0)
    );
    // A session that did not wait takes the connection before W1 runs.
    let thief = pool.acquire().unwrap();
    assert!(poll(&mut w1, &k1).is_pending(), "W1 lost the race");

    thief.release();
    assert_eq!(
        (c1.0.load(Ordering::SeqCst), c2.0.load(Ordering::SeqCst)),
        (2, 0),
        "the release woke the younger waiter"
    );
    match poll(&mut w1, &k1) {
        Poll::Ready(Ok(l)) => assert_eq!(l.id, 0),
        other => panic!("W1 not served: {:?}", other.map(|r| r.map(|l| l.id))),
    }
    drop(w2);
}

// Defect 4: lowering max below live never lets live grow again, and the
// excess closes as it comes back: live falls to max and stays within it.
#[test]
fn lowering_max_below_live_sheds_the_excess() {
    let (pool, closed) = filled(3);
    let leases: Vec<_> = (0..3).map(|_| pool.acquire().unwrap()).collect();
    pool.set_limits(1, 1);
    let s = pool.snapshot();
    assert_eq!((s.target, s.max, s.live, s.leased), (1, 1, 3, 3));
    assert!(pool.try_reserve().is_none());
    let returned: Vec<Returned> = leases.into_iter().map(|l| l.release()).collect();
    assert_eq!(
        returned,
        vec![Returned::Closed, Returned::Closed, Returned::Idle]
    );
    let s = pool.snapshot();
    assert_eq!((s.live, s.idle), (1, 1));
    assert_eq!(closed.lock().unwrap().len(), 2);
    assert_eq!(pool.deficit(), 0);
}
