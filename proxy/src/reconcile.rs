//! The per-pool reconcile worker: the one task that changes a pool's size.
//!
//! Everyone else only *asks* (the pool's coalescing [`Signal`]): a burst of
//! thousands of requests becomes a few runs, and two runs never overlap because
//! there is one worker. A tick jittered ±10 % is the safety net, so replicas and
//! pools do not all wake in the same millisecond.
//!
//! A run ([`ReconcileWorker::ensure_capacity`]) closes dead idle connections,
//! closes idle connections above target, and dials up to target: each dial holds
//! a slot reserved with the pool's compare-and-swap (so dials in flight can never
//! overshoot `max`), runs outside any lock, at most `max_concurrent_dials` at a
//! time. After a failed dial the worker backs off exponentially, with jitter,
//! before it dials again. Dials run inside the worker task itself, so cancelling
//! the worker cancels them: no task outlives its owner.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use rand::Rng;
use rand::rngs::SmallRng;
use sttproxy_pool::{ConnPool, Connection, Returned, Signal};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Opens new connections to one backend.
pub trait Dialer: Send + Sync + 'static {
    type Conn: Connection;
    type Error: std::fmt::Display + Send + 'static;

    fn dial(&self) -> impl Future<Output = Result<Self::Conn, Self::Error>> + Send;
}

/// Told the outcome of every dial (the backend's health tracker listens).
pub trait DialObserver: Send + Sync + 'static {
    fn dial_result(&self, ok: bool);
}

/// How a reconcile worker paces itself.
#[derive(Debug, Clone)]
pub struct ReconcileConfig {
    /// Safety-net period between runs when nobody asks (jittered ±10 %).
    pub tick: Duration,
    /// Dials in flight at once, per pool.
    pub max_concurrent_dials: usize,
    /// First backoff after a failed dial; doubles per consecutive failure.
    pub backoff_base: Duration,
    /// Ceiling of the backoff.
    pub backoff_max: Duration,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            tick: Duration::from_secs(5),
            max_concurrent_dials: 8,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
        }
    }
}

/// Counters a worker keeps about itself (for metrics and health).
#[derive(Debug, Default)]
pub struct ReconcileStats {
    pub runs: AtomicU64,
    pub dials_ok: AtomicU64,
    pub dials_failed: AtomicU64,
    /// Failed dials since the last successful one.
    pub consecutive_dial_failures: AtomicUsize,
}

/// What one run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RunOutcome {
    pub pruned: usize,
    pub shrunk: usize,
    pub dialed: usize,
    pub dial_failures: usize,
}

/// The reconcile worker of one pool. Run it with [`ReconcileWorker::run`] in a
/// task whose owner holds the cancellation token.
#[derive(Debug)]
pub struct ReconcileWorker<D: Dialer> {
    pool: ConnPool<D::Conn>,
    dialer: Arc<D>,
    config: ReconcileConfig,
    rng: SmallRng,
    stats: Arc<ReconcileStats>,
    /// No dial before this instant (set by backoff after a failure).
    next_dial_at: Option<Instant>,
    observer: Option<Arc<dyn DialObserver>>,
}

impl std::fmt::Debug for dyn DialObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DialObserver")
    }
}

impl<D: Dialer> ReconcileWorker<D> {
    /// `rng` drives the jitter; inject a seeded one for reproducible runs.
    pub fn new(
        pool: ConnPool<D::Conn>,
        dialer: Arc<D>,
        config: ReconcileConfig,
        rng: SmallRng,
    ) -> Self {
        Self {
            pool,
            dialer,
            config,
            rng,
            stats: Arc::new(ReconcileStats::default()),
            next_dial_at: None,
            observer: None,
        }
    }

    /// Report every dial's outcome to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn DialObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn stats(&self) -> Arc<ReconcileStats> {
        self.stats.clone()
    }

    /// Run until `cancel` fires (or the pool is closed): wait for a request,
    /// the tick, or the end of a backoff; then reconcile.
    pub async fn run(mut self, cancel: CancellationToken) {
        let pool = self.pool.clone();
        let signal: &Signal = pool.reconcile_signal();
        // Warm up at once.
        signal.trigger();
        loop {
            let mut wait = jitter(self.config.tick, &mut self.rng);
            if let Some(at) = self.next_dial_at {
                wait = wait.min(at.saturating_duration_since(Instant::now()));
            }
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                () = signal.wait() => {}
                () = tokio::time::sleep(wait) => {}
            }
            let outcome = self.ensure_capacity(&cancel).await;
            tracing::trace!(?outcome, "reconcile run");
            if pool.is_draining() && pool.snapshot().live == 0 {
                return;
            }
        }
    }

    /// One reconcile run. Returns early (dials dropped, their slots given back)
    /// if `cancel` fires.
    pub async fn ensure_capacity(&mut self, cancel: &CancellationToken) -> RunOutcome {
        self.stats.runs.fetch_add(1, Ordering::Relaxed);
        let mut outcome = RunOutcome {
            pruned: self.pool.prune_dead_idle(),
            shrunk: self.pool.shrink_to_target(),
            ..RunOutcome::default()
        };
        if self.pool.is_draining() {
            return outcome;
        }
        if let Some(at) = self.next_dial_at {
            if Instant::now() < at {
                return outcome;
            }
            self.next_dial_at = None;
        }

        let mut inflight = FuturesUnordered::new();
        let mut failed = false;
        loop {
            while !failed
                && inflight.len() < self.config.max_concurrent_dials.max(1)
                && self.pool.deficit() > 0
            {
                let Some(reservation) = self.pool.try_reserve() else {
                    break;
                };
                let dialer = self.dialer.clone();
                // Boxed: a dial's state (a TLS + WebSocket handshake) is several
                // KiB, and FuturesUnordered keeps each task's node allocated until
                // the set is dropped; boxed, the large part is freed as soon as
                // the dial completes, not after the whole warm-up.
                inflight.push(Box::pin(async move { (dialer.dial().await, reservation) }));
            }
            if inflight.is_empty() {
                break;
            }
            let next = tokio::select! {
                biased;
                () = cancel.cancelled() => return outcome,
                next = inflight.next() => next,
            };
            let Some((result, reservation)) = next else {
                break;
            };
            match result {
                Ok(conn) => {
                    if let Some(o) = &self.observer {
                        o.dial_result(true);
                    }
                    if reservation.offer(conn) == Returned::Idle {
                        outcome.dialed += 1;
                    }
                    self.stats.dials_ok.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .consecutive_dial_failures
                        .store(0, Ordering::Relaxed);
                }
                Err(e) => {
                    if let Some(o) = &self.observer {
                        o.dial_result(false);
                    }
                    reservation.unreserve();
                    self.pool.record_dial_failure();
                    outcome.dial_failures += 1;
                    self.stats.dials_failed.fetch_add(1, Ordering::Relaxed);
                    let n = self
                        .stats
                        .consecutive_dial_failures
                        .fetch_add(1, Ordering::Relaxed)
                        + 1;
                    let delay = backoff(
                        self.config.backoff_base,
                        self.config.backoff_max,
                        n,
                        &mut self.rng,
                    );
                    tracing::debug!(error = %e, failures = n, ?delay, "dial failed; backing off");
                    self.next_dial_at = Some(Instant::now() + delay);
                    // Let the dials already in flight finish, start no new ones.
                    failed = true;
                }
            }
        }
        outcome
    }
}

/// `d` ± 10 %, uniformly.
pub fn jitter(d: Duration, rng: &mut impl Rng) -> Duration {
    d.mul_f64(rng.random_range(0.9..=1.1))
}

/// Exponential backoff after `failures` consecutive failures (≥ 1), capped at
/// `max`, with "equal jitter": half fixed, half random, so retries spread out
/// but never come back immediately.
pub fn backoff(base: Duration, max: Duration, failures: usize, rng: &mut impl Rng) -> Duration {
    let exp = u32::try_from(failures.saturating_sub(1).min(30)).unwrap_or(30);
    let full = base.saturating_mul(1u32 << exp).min(max);
    let half = full / 2;
    half + half.mul_f64(rng.random_range(0.0..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use std::sync::atomic::AtomicBool;
    use sttproxy_pool::PoolConfig;

    #[derive(Debug)]
    struct FakeConn {
        alive: Arc<AtomicBool>,
    }

    impl Connection for FakeConn {
        fn is_alive(&self) -> bool {
            self.alive.load(Ordering::SeqCst)
        }
    }

    /// A dialer that fails the first `fail_first` dials, then succeeds; counts
    /// dials in flight and remembers when each dial started.
    #[derive(Default)]
    struct FakeDialer {
        fail_first: usize,
        dials: AtomicUsize,
        inflight: AtomicUsize,
        max_inflight: AtomicUsize,
        delay: Duration,
        started: std::sync::Mutex<Vec<Instant>>,
        conns: std::sync::Mutex<Vec<Arc<AtomicBool>>>,
    }

    impl Dialer for FakeDialer {
        type Conn = FakeConn;
        type Error = &'static str;

        async fn dial(&self) -> Result<FakeConn, &'static str> {
            let n = self.dials.fetch_add(1, Ordering::SeqCst);
            self.started.lock().unwrap().push(Instant::now());
            let now = self.inflight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_inflight.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            self.inflight.fetch_sub(1, Ordering::SeqCst);
            if n < self.fail_first {
                return Err("refused");
            }
            let alive = Arc::new(AtomicBool::new(true));
            self.conns.lock().unwrap().push(alive.clone());
            Ok(FakeConn { alive })
        }
    }

    fn worker(
        target: usize,
        max: usize,
        dialer: FakeDialer,
    ) -> (
        ConnPool<FakeConn>,
        Arc<FakeDialer>,
        ReconcileWorker<FakeDialer>,
    ) {
        let pool = ConnPool::new(PoolConfig::new(target, max));
        let dialer = Arc::new(dialer);
        let config = ReconcileConfig {
            tick: Duration::from_secs(5),
            max_concurrent_dials: 2,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
        };
        let w = ReconcileWorker::new(
            pool.clone(),
            dialer.clone(),
            config,
            SmallRng::seed_from_u64(7),
        );
        (pool, dialer, w)
    }

    /// Advance virtual time in small steps until `cond` holds (bounded).
    async fn eventually(mut cond: impl FnMut() -> bool) {
        for _ in 0..100_000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("condition not reached within 100 s of virtual time");
    }

    #[tokio::test(start_paused = true)]
    async fn warms_up_to_target_with_bounded_concurrency() {
        let (pool, dialer, w) = worker(
            6,
            8,
            FakeDialer {
                delay: Duration::from_millis(50),
                ..FakeDialer::default()
            },
        );
        let cancel = CancellationToken::new();
        let task = tokio::spawn(w.run(cancel.clone()));
        eventually(|| pool.snapshot().idle == 6).await;
        let s = pool.snapshot();
        assert_eq!((s.live, s.idle, s.dialing), (6, 6, 0));
        assert_eq!(dialer.dials.load(Ordering::SeqCst), 6);
        assert_eq!(dialer.max_inflight.load(Ordering::SeqCst), 2);
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn shrinks_and_grows_with_target() {
        let (pool, dialer, w) = worker(4, 8, FakeDialer::default());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(w.run(cancel.clone()));
        eventually(|| pool.snapshot().idle == 4).await;
        pool.set_target(1);
        eventually(|| pool.snapshot().live == 1).await;
        pool.set_target(8);
        eventually(|| pool.snapshot().idle == 8).await;
        assert_eq!(dialer.dials.load(Ordering::SeqCst), 11);
        assert_eq!(pool.snapshot().discarded_total, 3);
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn backs_off_exponentially_after_failures() {
        let (pool, dialer, w) = worker(
            1,
            1,
            FakeDialer {
                fail_first: 4,
                ..FakeDialer::default()
            },
        );
        let cancel = CancellationToken::new();
        let task = tokio::spawn(w.run(cancel.clone()));
        eventually(|| pool.snapshot().idle == 1).await;
        let started = dialer.started.lock().unwrap().clone();
        assert_eq!(started.len(), 5);
        let gaps: Vec<Duration> = started.windows(2).map(|w| w[1] - w[0]).collect();
        // Equal jitter: each gap is within [base·2^k / 2, base·2^k].
        for (k, gap) in gaps.iter().enumerate() {
            let full = Duration::from_millis(100) * (1 << k);
            assert!(
                *gap >= full / 2 && *gap <= full + Duration::from_millis(2),
                "gap {k} = {gap:?}, expected within [{:?}, {full:?}]",
                full / 2
            );
        }
        assert_eq!(pool.snapshot().dial_failures_total, 4);
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn replaces_dead_idle_connections() {
        let (pool, dialer, w) = worker(3, 3, FakeDialer::default());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(w.run(cancel.clone()));
        eventually(|| pool.snapshot().idle == 3).await;
        dialer.conns.lock().unwrap()[0].store(false, Ordering::SeqCst);
        // The tick (5 s ± 10 %) finds and replaces it without anyone asking.
        eventually(|| dialer.dials.load(Ordering::SeqCst) == 4).await;
        eventually(|| pool.snapshot().idle == 3).await;
        assert_eq!(pool.snapshot().discarded_total, 1);
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_triggers_coalesces() {
        let (pool, _dialer, w) = worker(2, 2, FakeDialer::default());
        let stats = w.stats();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(w.run(cancel.clone()));
        eventually(|| pool.snapshot().idle == 2).await;
        let before = stats.runs.load(Ordering::SeqCst);
        for _ in 0..10_000 {
            pool.reconcile_signal().trigger();
        }
        eventually(|| stats.runs.load(Ordering::SeqCst) > before).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        let runs = stats.runs.load(Ordering::SeqCst) - before;
        assert!(runs <= 2, "10,000 triggers made {runs} runs");
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_stops_the_worker_and_its_dials() {
        let (pool, dialer, w) = worker(
            2,
            2,
            FakeDialer {
                delay: Duration::from_secs(3600),
                ..FakeDialer::default()
            },
        );
        let cancel = CancellationToken::new();
        let task = tokio::spawn(w.run(cancel.clone()));
        eventually(|| dialer.inflight.load(Ordering::SeqCst) == 2).await;
        assert_eq!(pool.snapshot().dialing, 2);
        cancel.cancel();
        task.await.unwrap();
        // The dropped dials gave their reserved slots back.
        let s = pool.snapshot();
        assert_eq!((s.live, s.dialing), (0, 0));
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let mut rng = SmallRng::seed_from_u64(1);
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for failures in 1..40 {
            let d = backoff(base, max, failures, &mut rng);
            assert!(d <= max);
            assert!(d >= (base * 2u32.pow(failures.min(5) as u32 - 1)).min(max) / 2);
        }
        for _ in 0..1000 {
            let j = jitter(Duration::from_secs(10), &mut rng);
            assert!(j >= Duration::from_secs(9) && j <= Duration::from_secs(11));
        }
    }
}
