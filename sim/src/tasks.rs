//! The task-count guard: every task the simulation spawns (its own, and those
//! the naive pool spawns) is counted while alive, by name, so a run can prove
//! that nothing outlives shutdown. The production code under test spawns no
//! task of its own: the reconcile worker's dials and the health checks run in
//! the tasks the simulation starts for them.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::task::JoinHandle;

#[derive(Debug, Default)]
struct Book {
    alive: BTreeMap<&'static str, usize>,
    total_alive: usize,
    peak: usize,
    spawned: u64,
}

/// Counts the tasks of one run.
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    book: Arc<Mutex<Book>>,
}

/// Lives inside a spawned future; counts the task down when the future is
/// dropped (it finished, or the runtime dropped it).
#[derive(Debug)]
struct Guard {
    tasks: Tasks,
    name: &'static str,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut b = self.tasks.lock();
        if let Some(n) = b.alive.get_mut(self.name) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                b.alive.remove(self.name);
            }
        }
        b.total_alive = b.total_alive.saturating_sub(1);
    }
}

impl Tasks {
    fn lock(&self) -> MutexGuard<'_, Book> {
        match self.book.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Spawn a counted task.
    pub fn spawn<T, F>(&self, name: &'static str, fut: F) -> JoinHandle<T>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        {
            let mut b = self.lock();
            *b.alive.entry(name).or_insert(0) += 1;
            b.total_alive += 1;
            b.peak = b.peak.max(b.total_alive);
            b.spawned += 1;
        }
        let guard = Guard {
            tasks: self.clone(),
            name,
        };
        tokio::spawn(async move {
            let _guard = guard;
            fut.await
        })
    }

    pub fn alive(&self) -> usize {
        self.lock().total_alive
    }

    /// Alive tasks called `name`.
    pub fn alive_named(&self, name: &str) -> usize {
        self.lock().alive.get(name).copied().unwrap_or(0)
    }

    /// Alive tasks by name.
    pub fn alive_by_name(&self) -> Vec<(&'static str, usize)> {
        self.lock().alive.iter().map(|(k, v)| (*k, *v)).collect()
    }

    pub fn peak(&self) -> usize {
        self.lock().peak
    }

    pub fn spawned(&self) -> u64 {
        self.lock().spawned
    }
}
