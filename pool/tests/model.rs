//! proptest state machine: random operation sequences against the real pool and a
//! plain sequential model of it; every invariant is checked after every step.
#![cfg(not(loom))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use sttproxy_pool::{ConnPool, Connection, Lease, PoolConfig, Reservation, Returned};

struct Conn {
    id: usize,
    alive: Arc<AtomicBool>,
    closed: Arc<Mutex<Vec<usize>>>,
}

impl Connection for Conn {
    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    fn close(self) {
        self.closed.lock().unwrap().push(self.id);
    }
}

#[derive(Debug, Clone)]
enum Op {
    Acquire,
    Release(usize),
    Discard(usize),
    DropLease(usize),
    Reserve,
    Offer(usize),
    IntoLease(usize),
    Unreserve(usize),
    SetTarget(usize),
    MarkDead(usize),
    Prune,
    Shrink,
    Drain,
    /// A health check: take an idle connection out (uncounted) and put it back.
    HealthCheck,
    /// Move the test thread to another stripe (as if the next calls came
    /// from another worker thread).
    SetStripe(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Acquire),
        4 => any::<usize>().prop_map(Op::Release),
        1 => any::<usize>().prop_map(Op::Discard),
        1 => any::<usize>().prop_map(Op::DropLease),
        3 => Just(Op::Reserve),
        3 => any::<usize>().prop_map(Op::Offer),
        1 => any::<usize>().prop_map(Op::IntoLease),
        1 => any::<usize>().prop_map(Op::Unreserve),
        2 => (0usize..8).prop_map(Op::SetTarget),
        1 => any::<usize>().prop_map(Op::MarkDead),
        1 => Just(Op::Prune),
        1 => Just(Op::Shrink),
        1 => Just(Op::HealthCheck),
        1 => (0usize..3).prop_map(Op::SetStripe),
        // Rare, so most sequences spend their time in the open pool.
        1 => (0usize..8).prop_map(|n| if n == 0 { Op::Drain } else { Op::Acquire }),
    ]
}

/// The sequential model: where each connection is, by id.
#[derive(Default)]
struct Model {
    idle: VecDeque<usize>,
    /// The connection on each stripe (pool/src/stripes.rs).
    stripes: [Option<usize>; 8],
    stripe: usize,
    leased: Vec<usize>,
    reserved: usize,
    closed: BTreeSet<usize>,
    target: usize,
    max: usize,
    draining: bool,
    acquired: usize,
    released: usize,
}

impl Model {
    fn idle_count(&self) -> usize {
        self.idle.len() + self.stripes.iter().flatten().count()
    }

    fn live(&self) -> usize {
        self.idle_count() + self.leased.len() + self.reserved
    }

    /// The connection on stripe `i`, if alive; a dead one is closed.
    fn take_from_stripe(&mut self, i: usize, alive: &[Arc<AtomicBool>]) -> Option<usize> {
        let id = self.stripes[i].take()?;
        if alive[id].load(Ordering::SeqCst) {
            Some(id)
        } else {
            self.close(id);
            None
        }
    }

    /// What `acquire` (session) or `checkout_idle` (maintenance) hands out.
    fn acquire(&mut self, session: bool, alive: &[Arc<AtomicBool>]) -> Option<usize> {
        if self.draining {
            return None;
        }
        let own = self.stripe;
        if session && let Some(id) = self.take_from_stripe(own, alive) {
            return Some(id);
        }
        while let Some(id) = self.idle.pop_front() {
            if alive[id].load(Ordering::SeqCst) {
                return Some(id);
            }
            self.close(id);
        }
        // A session looks at every stripe, its own last; maintenance at every
        // stripe in order.
        let order: Vec<usize> = if session {
            (1..=8).map(|k| (own + k) % 8).collect()
        } else {
            (0..8).collect()
        };
        order
            .into_iter()
            .find_map(|i| self.take_from_stripe(i, alive))
    }

    fn close(&mut self, id: usize) {
        assert!(self.closed.insert(id), "model closes {id} twice");
    }

    /// What `put_back` does with a connection that holds a slot. The caller has
    /// already taken `id` out of its place, so `live()` does not count it.
    fn put_back(&mut self, id: usize, alive: bool) -> Returned {
        self.put_back_as(id, alive, false)
    }

    /// `session`: a session's release goes to the thread's stripe if it holds none.
    fn put_back_as(&mut self, id: usize, alive: bool, session: bool) -> Returned {
        if !alive || self.draining || self.live() + 1 > self.target {
            self.close(id);
            Returned::Closed
        } else {
            if session && self.stripes[self.stripe].is_none() {
                self.stripes[self.stripe] = Some(id);
            } else {
                self.idle.push_back(id);
            }
            Returned::Idle
        }
    }
}

struct Harness {
    pool: ConnPool<Conn>,
    model: Model,
    leases: Vec<Lease<Conn>>,
    reservations: Vec<Reservation<Conn>>,
    alive: Vec<Arc<AtomicBool>>,
    closed_log: Arc<Mutex<Vec<usize>>>,
}

impl Harness {
    fn new(target: usize, max: usize) -> Self {
        sttproxy_pool::__private::set_thread_stripe(0);
        Self {
            pool: ConnPool::new(PoolConfig::new(target, max)),
            model: Model {
                target,
                max,
                ..Model::default()
            },
            leases: Vec::new(),
            reservations: Vec::new(),
            alive: Vec::new(),
            closed_log: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn new_conn(&mut self) -> Conn {
        let id = self.alive.len();
        let alive = Arc::new(AtomicBool::new(true));
        self.alive.push(alive.clone());
        Conn {
            id,
            alive,
            closed: self.closed_log.clone(),
        }
    }

    fn apply(&mut self, op: &Op) {
        let m = &mut self.model;
        match *op {
            Op::Acquire => {
                let got = self.pool.acquire();
                let expect = m.acquire(true, &self.alive);
                assert_eq!(got.as_ref().map(|l| l.id), expect, "acquire");
                if let Some(l) = got {
                    m.leased.push(l.id);
                    m.acquired += 1;
                    self.leases.push(l);
                }
            }
            Op::Release(i) | Op::Discard(i) | Op::DropLease(i) => {
                if self.leases.is_empty() {
                    return;
                }
                let lease = self.leases.swap_remove(i % self.leases.len());
                let id = lease.id;
                let pos = m.leased.iter().position(|&x| x == id).unwrap();
                m.leased.swap_remove(pos);
                match op {
                    Op::Release(_) => {
                        let alive = self.alive[id].load(Ordering::SeqCst);
                        let want = m.put_back_as(id, alive, true);
                        if want == Returned::Idle {
                            m.released += 1;
                        }
                        assert_eq!(lease.release(), want, "release of {id}");
                    }
                    Op::Discard(_) => {
                        m.close(id);
                        lease.discard();
                    }
                    _ => {
                        // A session that ended without completing its fencing.
                        m.close(id);
                        drop(lease);
                    }
                }
            }
            Op::Reserve => {
                let got = self.pool.try_reserve();
                let want = !m.draining && m.live() < m.max;
                assert_eq!(got.is_some(), want, "try_reserve");
                if let Some(r) = got {
                    m.reserved += 1;
                    self.reservations.push(r);
                }
            }
            Op::Offer(i) | Op::IntoLease(i) | Op::Unreserve(i) => {
                if self.reservations.is_empty() {
                    return;
                }
                let r = self.reservations.swap_remove(i % self.reservations.len());
                match op {
                    Op::Unreserve(_) => {
                        self.model.reserved -= 1;
                        r.unreserve();
                    }
                    Op::Offer(_) => {
                        let conn = self.new_conn();
                        let id = conn.id;
                        // The slot moves from "reserved" to the connection.
                        self.model.reserved -= 1;
                        let want = self.model.put_back(id, true);
                        assert_eq!(r.offer(conn), want, "offer of {id}");
                    }
                    _ => {
                        let conn = self.new_conn();
                        self.model.reserved -= 1;
                        self.model.leased.push(conn.id);
                        self.model.acquired += 1;
                        self.leases.push(r.into_lease(conn));
                    }
                }
            }
            Op::SetTarget(t) => {
                m.target = t.min(m.max);
                self.pool.set_target(t);
            }
            Op::MarkDead(i) => {
                let candidates: Vec<usize> = m
                    .idle
                    .iter()
                    .chain(m.stripes.iter().flatten())
                    .chain(m.leased.iter())
                    .copied()
                    .collect();
                if let Some(&id) = candidates.get(i % candidates.len().max(1)) {
                    self.alive[id].store(false, Ordering::SeqCst);
                }
            }
            Op::Prune => {
                // An idle sweep: each stripe, then each connection queued
                // when it began; each checked one goes to the back of the queue.
                let queued = m.idle.len();
                let mut want_closed = 0;
                for i in 0..8 {
                    let Some(id) = m.stripes[i].take() else {
                        continue;
                    };
                    let alive = self.alive[id].load(Ordering::SeqCst);
                    if m.put_back(id, alive) == Returned::Closed {
                        want_closed += 1;
                    }
                }
                for _ in 0..queued {
                    let Some(id) = m.idle.pop_front() else { break };
                    let alive = self.alive[id].load(Ordering::SeqCst);
                    if m.put_back(id, alive) == Returned::Closed {
                        want_closed += 1;
                    }
                }
                assert_eq!(self.pool.prune_dead_idle(), want_closed, "prune");
            }
            Op::Shrink => {
                while m.live() > m.target {
                    let id = match m.idle.pop_front() {
                        Some(id) => id,
                        None => match m.stripes.iter_mut().find_map(Option::take) {
                            Some(id) => id,
                            None => break,
                        },
                    };
                    m.close(id);
                }
                self.pool.shrink_to_target();
            }
            Op::SetStripe(k) => {
                m.stripe = k;
                sttproxy_pool::__private::set_thread_stripe(k);
            }
            Op::HealthCheck => {
                let got = self.pool.checkout_idle();
                let expect = m.acquire(false, &self.alive);
                assert_eq!(got.as_ref().map(|l| l.id), expect, "checkout_idle");
                if let Some(l) = got {
                    let alive = self.alive[l.id].load(Ordering::SeqCst);
                    let want = m.put_back(l.id, alive);
                    assert_eq!(l.release(), want, "maintenance return");
                }
            }
            Op::Drain => {
                m.draining = true;
                while let Some(id) = m.idle.pop_front() {
                    m.close(id);
                }
                for i in 0..8 {
                    if let Some(id) = m.stripes[i].take() {
                        m.close(id);
                    }
                }
                self.pool.drain();
            }
        }
    }

    fn check(&self) {
        let m = &self.model;
        let s = self.pool.snapshot();
        assert!(s.live <= s.max, "live {} > max {}", s.live, s.max);
        assert_eq!(s.live, m.live(), "live");
        assert_eq!(s.idle, m.idle_count(), "idle");
        assert_eq!(s.leased, m.leased.len(), "leased");
        assert_eq!(s.dialing, m.reserved, "dialing");
        assert_eq!(s.target, m.target, "target");
        assert_eq!(s.draining, m.draining, "draining");
        assert_eq!(s.acquired_total, m.acquired, "acquired_total");
        assert_eq!(s.released_total, m.released, "released_total");
        assert_eq!(s.discarded_total, m.closed.len(), "discarded_total");
        // Closed exactly once, and exactly the ones the model closed.
        let log = self.closed_log.lock().unwrap();
        let closed: BTreeSet<usize> = log.iter().copied().collect();
        assert_eq!(closed.len(), log.len(), "a connection was closed twice");
        assert_eq!(closed, m.closed, "closed set");
        // Every connection ever made is in exactly one place.
        for id in 0..self.alive.len() {
            let places = usize::from(m.idle.contains(&id))
                + m.stripes.iter().filter(|p| **p == Some(id)).count()
                + m.leased.iter().filter(|&&x| x == id).count()
                + usize::from(m.closed.contains(&id));
            assert_eq!(places, 1, "connection {id} is in {places} places");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn pool_matches_sequential_model(
        target in 0usize..5,
        extra in 0usize..4,
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let mut h = Harness::new(target, target + extra);
        for op in &ops {
            h.apply(op);
            h.check();
        }
        // Whatever is still held ends now: dropped leases close, reservations give back.
        drop(std::mem::take(&mut h.leases));
        drop(std::mem::take(&mut h.reservations));
        let s = h.pool.snapshot();
        prop_assert_eq!(s.live, s.idle);
        prop_assert_eq!(s.dialing, 0);
        // When the pool goes, every connection ever made has been closed
        // exactly once.
        drop(h.pool);
        let mut closed = h.closed_log.lock().unwrap().clone();
        closed.sort_unstable();
        prop_assert_eq!(closed, (0..h.alive.len()).collect::<Vec<_>>());
    }
}
