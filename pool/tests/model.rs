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
        // Rare, so most sequences spend their time in the open pool.
        1 => (0usize..8).prop_map(|n| if n == 0 { Op::Drain } else { Op::Acquire }),
    ]
}

/// The sequential model: where each connection is, by id.
#[derive(Default)]
struct Model {
    idle: VecDeque<usize>,
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
    fn live(&self) -> usize {
        self.idle.len() + self.leased.len() + self.reserved
    }

    fn close(&mut self, id: usize) {
        assert!(self.closed.insert(id), "model closes {id} twice");
    }

    /// What `put_back` does with a connection that holds a slot. The caller has
    /// already taken `id` out of its place, so `live()` does not count it.
    fn put_back(&mut self, id: usize, alive: bool) -> Returned {
        if !alive || self.draining || self.live() + 1 > self.target {
            self.close(id);
            Returned::Closed
        } else {
            self.idle.push_back(id);
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
                let mut expect = None;
                if !m.draining {
                    while let Some(id) = m.idle.pop_front() {
                        if self.alive[id].load(Ordering::SeqCst) {
                            expect = Some(id);
                            break;
                        }
                        m.close(id);
                    }
                }
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
                        let want = m.put_back(id, alive);
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
                let candidates: Vec<usize> =
                    m.idle.iter().chain(m.leased.iter()).copied().collect();
                if let Some(&id) = candidates.get(i % candidates.len().max(1)) {
                    self.alive[id].store(false, Ordering::SeqCst);
                }
            }
            Op::Prune => {
                let n = m.idle.len();
                for _ in 0..n {
                    let Some(id) = m.idle.pop_front() else { break };
                    if self.alive[id].load(Ordering::SeqCst) {
                        m.put_back(id, true);
                    } else {
                        m.close(id);
                    }
                }
                self.pool.prune_dead_idle();
            }
            Op::Shrink => {
                while m.live() > m.target {
                    let Some(id) = m.idle.pop_front() else { break };
                    m.close(id);
                }
                self.pool.shrink_to_target();
            }
            Op::HealthCheck => {
                let got = self.pool.checkout_idle();
                let mut expect = None;
                if !m.draining {
                    while let Some(id) = m.idle.pop_front() {
                        if self.alive[id].load(Ordering::SeqCst) {
                            expect = Some(id);
                            break;
                        }
                        m.close(id);
                    }
                }
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
                self.pool.drain();
            }
        }
    }

    fn check(&self) {
        let m = &self.model;
        let s = self.pool.snapshot();
        assert!(s.live <= s.max, "live {} > max {}", s.live, s.max);
        assert_eq!(s.live, m.live(), "live");
        assert_eq!(s.idle, m.idle.len(), "idle");
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
    }
}
