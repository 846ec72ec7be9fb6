//! The set of backend pools the proxy routes to. Replaced as a whole when the
//! configuration changes; a session reads it once, when it starts.
//!
//! Pools that left the set (removed, disabled or replaced backends) are kept
//! in a retiring list while they drain, so that shutdown can stop them and
//! `/pools` can show them, until their tasks have ended.

use std::sync::{Arc, Mutex, RwLock};

use crate::backend::BackendPool;

/// A cheap, shareable handle to the current list of backend pools.
#[derive(Debug, Clone, Default)]
pub struct Backends {
    current: Arc<RwLock<Arc<Vec<Arc<BackendPool>>>>>,
    retiring: Arc<Mutex<Vec<Arc<BackendPool>>>>,
}

impl Backends {
    /// The current list (a snapshot: later changes do not affect it).
    pub fn all(&self) -> Arc<Vec<Arc<BackendPool>>> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replace the list.
    pub fn set(&self, pools: Vec<Arc<BackendPool>>) {
        let new = Arc::new(pools);
        match self.current.write() {
            Ok(mut g) => *g = new,
            Err(p) => *p.into_inner() = new,
        }
    }

    pub fn any_healthy(&self) -> bool {
        self.all()
            .iter()
            .any(|b| b.is_healthy() && !b.pool.is_draining())
    }

    fn retiring_list(&self) -> std::sync::MutexGuard<'_, Vec<Arc<BackendPool>>> {
        match self.retiring.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Drain `pool` (it must no longer be in the routed list): no new leases,
    /// idle connections close now, leased ones when their sessions end.
    pub fn retire(&self, pool: Arc<BackendPool>) {
        pool.retire();
        self.retiring_list().push(pool);
    }

    /// Pools draining after they left the routed list, whose tasks still run.
    pub fn retiring(&self) -> Vec<Arc<BackendPool>> {
        self.retiring_list().clone()
    }

    pub fn has_retiring(&self) -> bool {
        !self.retiring_list().is_empty()
    }

    /// Forget retiring pools whose tasks ended, and wake the reconcile worker
    /// of those with no connection left, so that it sees it and ends at once
    /// (rather than at its next tick). Returns how many still retire.
    pub fn reap_retired(&self) -> usize {
        let mut list = self.retiring_list();
        list.retain(|p| {
            if p.is_stopped() {
                return false;
            }
            if p.is_drained() {
                p.pool.reconcile_signal().trigger();
            }
            true
        });
        list.len()
    }
}
