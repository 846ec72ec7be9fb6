//! For the upgrade and replica tests: loops of short sessions counting every
//! failed connect, and waiting for a child process to exit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::db::short_session;
use super::{ProxyProcess, eventually};

/// Loops of short sessions (connect, one echo, graceful end) until `stop`:
/// every one that fails is counted and its error kept.
pub struct ConnectLoop {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl ConnectLoop {
    pub fn start(listen: SocketAddr, loops: usize) -> Self {
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for _ in 0..loops {
            let (ok, failed, errors, stop) =
                (ok.clone(), failed.clone(), errors.clone(), stop.clone());
            tasks.spawn(async move {
                while !stop.is_cancelled() {
                    match short_session(listen).await {
                        Ok(()) => ok.fetch_add(1, Ordering::SeqCst),
                        Err(e) => {
                            errors.lock().unwrap().push(e);
                            failed.fetch_add(1, Ordering::SeqCst)
                        }
                    };
                }
            });
        }
        Self {
            ok,
            failed,
            errors,
            stop,
            tasks,
        }
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    pub async fn finish(mut self) -> (u64, u64, Vec<String>) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        let errors = std::mem::take(&mut *self.errors.lock().unwrap());
        (self.ok(), self.failed.load(Ordering::SeqCst), errors)
    }
}

/// Wait (bounded) until `connects` more short sessions succeeded.
pub async fn more_connects(loop_: &ConnectLoop, connects: u64, what: &str) {
    let from = loop_.ok();
    let ok = loop_.ok.clone();
    eventually(Duration::from_secs(20), what, || {
        let ok = ok.clone();
        async move { ok.load(Ordering::SeqCst) >= from + connects }
    })
    .await;
}

/// Wait (bounded) for the child to exit; its status.
pub async fn exited(p: &mut ProxyProcess, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            started.elapsed() < limit,
            "the proxy did not exit within {limit:?}; stderr:\n{}",
            p.stderr_log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
