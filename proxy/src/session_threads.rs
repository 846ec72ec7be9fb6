//! Session threads (`session_threads = N`, off by default): N event loops for
//! the sessions.
//!
//! Each session thread runs a current-thread tokio runtime of its own (its
//! own epoll instance and timer wheel). The accept loop hands every new client
//! connection to the next thread in turn, and the session runs there to its
//! end: its client socket, its backend connection (re-registered there when
//! leased, [`crate::backend::BackendConn::settle_here`]) and its timer all
//! belong to that thread's loop, so a session never crosses cores and no wake
//! crosses threads on the per-message path.
//!
//! What it is for: with tokio's multi-thread runtime an idle worker is woken
//! to look for work whenever tasks are queued, the workers take turns at one
//! shared epoll instance, and a session's wake-ups may land on either core.
//! What it measured (no lower CPU per message; p99 better at 300 sessions,
//! worse at 3,000 on a machine shared with the load, where a preempted thread
//! holds its sessions and nothing steals them) is in docs/relay.md, "Session
//! threads", and is why it is off by default.
//!
//! Everything else (the accept loops, the admin listener, pool reconcilers,
//! dials, health checks, the database) stays on the runtime that started the
//! proxy.
//!
//! Invariant: a thread's runtime lives until [`SessionThreads`] is dropped,
//! and that happens only after every session has ended (the app drops it last
//! in its shutdown), so I/O registered with a session thread is never polled
//! after its loop is gone while the proxy serves.

use std::cell::Cell;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    /// The index of the session thread this thread is, if it is one.
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The session thread the caller runs on, `None` on any other thread.
pub fn current() -> Option<usize> {
    CURRENT.with(Cell::get)
}

/// The session threads of one proxy, owned by the app; stops and joins them
/// when dropped.
#[derive(Debug)]
pub struct SessionThreads {
    placer: Arc<Placer>,
    threads: Vec<JoinHandle<()>>,
    stop: CancellationToken,
}

/// Where new sessions go: the session threads' runtimes, taken in turn.
/// Shared with the accept loops and the metrics; holding one does not keep
/// the threads running (spawning on a stopped thread drops the task).
#[derive(Debug)]
pub struct Placer {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

impl Placer {
    /// The runtime of the next thread in turn, for a new session.
    pub fn next(&self) -> &Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }

    /// Every thread's runtime (for the task count in the metrics).
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

impl SessionThreads {
    /// Start `count` (≥ 1) session threads, each with its runtime serving.
    /// Each thread builds its runtime itself, so a runtime is only ever
    /// dropped on its own thread (never inside the caller's async context,
    /// where tokio forbids it), even when starting fails half-way.
    pub fn start(count: usize) -> io::Result<Self> {
        let count = count.max(1);
        let stop = CancellationToken::new();
        // Stops and joins the threads started so far on an early return.
        let mut threads = Self {
            placer: Arc::new(Placer {
                handles: Vec::new(),
                next: AtomicUsize::new(0),
            }),
            threads: Vec::with_capacity(count),
            stop: stop.clone(),
        };
        let mut handles = Vec::with_capacity(count);
        for index in 0..count {
            let (started, handle) = std::sync::mpsc::sync_channel(1);
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("sttproxy-session-{index}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = started.send(Err(e));
                            return;
                        }
                    };
                    if started.send(Ok(runtime.handle().clone())).is_err() {
                        return;
                    }
                    CURRENT.with(|c| c.set(Some(index)));
                    runtime.block_on(stop.cancelled());
                })?;
            threads.threads.push(thread);
            handles.push(handle.recv().map_err(|_| {
                io::Error::other("a session thread ended before its runtime started")
            })??);
        }
        threads.placer = Arc::new(Placer {
            handles,
            next: AtomicUsize::new(0),
        });
        Ok(threads)
    }

    /// Where new sessions go.
    pub fn placer(&self) -> Arc<Placer> {
        self.placer.clone()
    }
}

impl Drop for SessionThreads {
    fn drop(&mut self) {
        self.stop.cancel();
        // Not from a session thread (a task holding the app, dropped there):
        // it would wait for itself. The threads end by themselves.
        if current().is_some() {
            return;
        }
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::error!("a session thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_the_threads_in_turn_and_know_where_they_are() {
        let threads = SessionThreads::start(2).unwrap();
        let placer = threads.placer();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            let task = placer.next().spawn(async { current() });
            seen.push(rt.block_on(task).unwrap());
        }
        assert_eq!(seen, [Some(0), Some(1), Some(0), Some(1)]);
        assert_eq!(current(), None);
        drop(threads);
        // Stopped: a task placed now is dropped, not run.
        let task = placer.next().spawn(async { current() });
        assert!(rt.block_on(task).unwrap_err().is_cancelled());
    }
}
