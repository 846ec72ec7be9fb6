//! The truth about one pool's connections, kept outside the pool: which
//! connections are open at the backend and who holds each, how many dials are
//! in flight, and the totals the pool's snapshot must agree with. It is fed by
//! the in-memory transport (a connection is open from the moment its dial
//! succeeds until its proxy end is dropped) and by the sessions (who leased
//! what), never by the pool itself.

use std::collections::BTreeMap;

pub type ConnId = u64;

/// Who holds an open connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// The pool's side: idle, being health-checked, or just dialed.
    Pool,
    /// A session, by its number.
    Session(u64),
}

#[derive(Debug)]
pub struct PoolTruth {
    pub name: String,
    /// The pool's hard maximum (fixed for the run).
    pub max: usize,
    /// The target most recently asked of the pool.
    pub target: usize,
    pub open: BTreeMap<ConnId, Holder>,
    /// Dials started and not yet finished (a socket being opened).
    pub inflight: usize,
    pub session_held: usize,
    pub opened: u64,
    pub closed: u64,
    pub dial_failures: u64,
    pub acquired: u64,
    /// Session releases after which the connection stayed open (back in the pool).
    pub released_kept: u64,
    /// Largest `live - max` seen (≤ 0 when the bound always held).
    pub worst_over_max: i64,
    pub peak_live: usize,
}

impl PoolTruth {
    pub fn new(name: String, max: usize, target: usize) -> Self {
        Self {
            name,
            max,
            target,
            open: BTreeMap::new(),
            inflight: 0,
            session_held: 0,
            opened: 0,
            closed: 0,
            dial_failures: 0,
            acquired: 0,
            released_kept: 0,
            worst_over_max: i64::MIN,
            peak_live: 0,
        }
    }

    /// Open connections plus dials in flight: what the pool answers for.
    pub fn live(&self) -> usize {
        self.open.len() + self.inflight
    }

    /// Open connections on the pool's side (not held by a session).
    pub fn pool_side(&self) -> usize {
        self.open.len().saturating_sub(self.session_held)
    }

    /// Update the peaks; returns true if live is above max.
    pub fn note_live(&mut self) -> bool {
        let live = self.live();
        self.peak_live = self.peak_live.max(live);
        let over = i64::try_from(live).unwrap_or(i64::MAX) - i64::try_from(self.max).unwrap_or(0);
        self.worst_over_max = self.worst_over_max.max(over);
        live > self.max
    }
}
