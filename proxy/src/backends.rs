//! The set of backend pools the proxy routes to. Replaced as a whole when the
//! configuration changes; a session reads it once, when it starts.

use std::sync::{Arc, RwLock};

use crate::backend::BackendPool;

/// A cheap, shareable handle to the current list of backend pools.
#[derive(Debug, Clone, Default)]
pub struct Backends {
    current: Arc<RwLock<Arc<Vec<Arc<BackendPool>>>>>,
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
}
