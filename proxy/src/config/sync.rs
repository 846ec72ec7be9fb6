//! Live sync: the backend table applied to the running pools, without a restart
//! and without dropping a session.
//!
//! One task ([`ConfigSync::run`]) owns the set of running pools. It polls every
//! `sync_interval` (jittered ±10 %): the poll reads only the table's change
//! counter (bumped by triggers), and reads the rows only when it moved. On
//! PostgreSQL a second task LISTENs on [`db::NOTIFY_CHANNEL`] (a trigger
//! notifies it) and wakes the sync at once. A LISTEN connection only receives,
//! so a half-open one (a NAT or firewall that dropped it, a partition) would
//! wait forever: the listener must give a sign of life — a notification, or
//! the answer to a check query it sends after half of
//! `db_listener_check_interval` of silence — within each interval, or it is
//! declared lost (`sttproxy_db_listener_connected` 0), dropped and
//! reconnected with backoff. Meanwhile changes arrive by the polling alone. It
//! asks for a full check after every (re)connect, since notifications sent
//! while it was away are lost.
//!
//! A change is applied as a diff, only through each pool's target and its
//! reconcile worker:
//! - new row → a new [`BackendPool`], warmed to its target by its worker;
//! - target / max / weight changed → [`BackendPool::resize`] (the pool's idle
//!   queue capacity is fixed: a max above it replaces the pool instead);
//! - url, reuse or group changed → replace: a new pool starts, the old one retires;
//! - disabled or removed → retire: no new leases, idle connections close,
//!   leased ones close when their sessions end, then the pool's tasks end.
//!
//! A row that cannot be used is rejected (logged with its reason, counted in
//! `sttproxy_config_rejected_rows`); a running backend whose row turned bad
//! keeps its last good configuration, unless the row is disabled (a disabled
//! row asks for nothing, whatever its values). A pool that cannot start leaves
//! the table's version unapplied: the next poll reads the rows again and
//! retries. A database outage keeps the last good
//! configuration; the sync retries with backoff and reports the staleness
//! (`/readyz` body, `sttproxy_config_last_sync_age_seconds`,
//! `sttproxy_config_sync_failures_total`).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::SmallRng;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::db::{self, Db, DbError, DbKind, RowRead, SeedOutcome};
use crate::backend::{BackendPool, BackendSpec, DialError, PoolTuning};
use crate::backends::Backends;
use crate::reconcile::{backoff, jitter};

/// A database operation taking longer than this counts as a failure.
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// First retry delay after a failed sync; doubles up to `sync_interval`.
const RETRY_BASE: Duration = Duration::from_millis(250);
/// While pools are retiring, check this often whether their tasks ended.
const REAP_EVERY: Duration = Duration::from_millis(500);

/// How the configuration sync is doing; read by `/readyz` and `/metrics`.
#[derive(Debug)]
pub struct SyncStatus {
    kind: DbKind,
    interval: Duration,
    started: Instant,
    last_ok: Mutex<Option<Instant>>,
    last_error: Mutex<Option<String>>,
    version: AtomicI64,
    consecutive_failures: AtomicU64,
    failures_total: AtomicU64,
    rejected_rows: AtomicU64,
    rejections_total: AtomicU64,
    applies_total: AtomicU64,
    /// PostgreSQL: the LISTEN connection is up and answered within its check
    /// interval.
    listener_connected: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl SyncStatus {
    pub fn new(kind: DbKind, interval: Duration) -> Self {
        Self {
            kind,
            interval,
            started: Instant::now(),
            last_ok: Mutex::new(None),
            last_error: Mutex::new(None),
            version: AtomicI64::new(-1),
            consecutive_failures: AtomicU64::new(0),
            failures_total: AtomicU64::new(0),
            rejected_rows: AtomicU64::new(0),
            rejections_total: AtomicU64::new(0),
            applies_total: AtomicU64::new(0),
            listener_connected: AtomicBool::new(false),
        }
    }

    pub fn kind(&self) -> DbKind {
        self.kind
    }

    fn record_ok(&self, version: i64) {
        *lock(&self.last_ok) = Some(Instant::now());
        *lock(&self.last_error) = None;
        self.version.store(version, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    fn record_failure(&self, error: String) {
        *lock(&self.last_error) = Some(error);
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        self.failures_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Time since the configuration was last confirmed current (since the
    /// start if it never was).
    pub fn age(&self) -> Duration {
        let since = lock(&self.last_ok).unwrap_or(self.started);
        since.elapsed()
    }

    /// Whether the configuration was ever read from the database.
    pub fn ever_synced(&self) -> bool {
        lock(&self.last_ok).is_some()
    }

    /// The table's change counter as last applied (-1 before the first sync).
    pub fn version(&self) -> i64 {
        self.version.load(Ordering::Relaxed)
    }

    pub fn failures_total(&self) -> u64 {
        self.failures_total.load(Ordering::Relaxed)
    }

    pub fn consecutive_failures(&self) -> u64 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Rows rejected by the last read of the table.
    pub fn rejected_rows(&self) -> u64 {
        self.rejected_rows.load(Ordering::Relaxed)
    }

    pub fn rejections_total(&self) -> u64 {
        self.rejections_total.load(Ordering::Relaxed)
    }

    /// Changes of the table applied to the pools.
    pub fn applies_total(&self) -> u64 {
        self.applies_total.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    /// PostgreSQL: whether changes are pushed (LISTEN connection up and
    /// answering); `None` on SQLite, which has no push.
    pub fn listener_connected(&self) -> Option<bool> {
        (self.kind == DbKind::Postgres).then(|| self.listener_connected.load(Ordering::Relaxed))
    }

    fn set_listener_connected(&self, up: bool) {
        self.listener_connected.store(up, Ordering::Relaxed);
    }

    /// Stale: the last attempt failed, or nothing confirmed the configuration
    /// for three intervals (a watchdog over the sync task itself).
    pub fn is_stale(&self) -> bool {
        !self.ever_synced()
            || self.consecutive_failures() > 0
            || self.age() > (self.interval * 3).max(OP_TIMEOUT)
    }

    /// One line for `/readyz`: the configuration's freshness.
    pub fn describe(&self) -> String {
        let age = self.age().as_secs_f64();
        if self.is_stale() {
            let what = if self.ever_synced() {
                format!("last good sync {age:.1}s ago")
            } else {
                format!("never synced ({age:.1}s since start)")
            };
            let error = self
                .last_error()
                .map(|e| {
                    format!(
                        ", {} failed attempts, last error: {e}",
                        self.consecutive_failures()
                    )
                })
                .unwrap_or_default();
            format!(
                "config stale: {what}{error}; serving the last good configuration ({} backend table)",
                self.kind
            )
        } else {
            let push = match self.listener_connected() {
                Some(false) => format!(
                    "; push (LISTEN) down, changes arrive by polling every {}",
                    humantime::format_duration(self.interval)
                ),
                _ => String::new(),
            };
            format!(
                "config current: version {}, synced {age:.1}s ago from {}{push}",
                self.version(),
                self.kind
            )
        }
    }
}

/// A running backend and the row it was started from.
#[derive(Debug)]
struct Running {
    spec: BackendSpec,
    pool: Arc<BackendPool>,
}

/// What one backend needs after a change of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Start(BackendSpec),
    Resize(BackendSpec),
    /// Start a new pool for the spec, then retire the old one.
    Replace {
        spec: BackendSpec,
        why: &'static str,
    },
    Retire {
        id: String,
        why: &'static str,
    },
}

/// The diff between what runs (`current`: id → spec and idle-queue capacity)
/// and what the table asks for (`wanted`: the valid, enabled rows).
/// `keep`: ids whose rows were rejected: a running backend keeps its last good
/// configuration rather than being retired over a typo.
pub fn plan(
    current: &BTreeMap<String, (BackendSpec, usize)>,
    wanted: &BTreeMap<String, BackendSpec>,
    keep: &BTreeSet<String>,
) -> Vec<Action> {
    let mut actions = Vec::new();
    for (id, spec) in wanted {
        match current.get(id) {
            None => actions.push(Action::Start(spec.clone())),
            Some((old, capacity)) => {
                if old.url != spec.url {
                    actions.push(Action::Replace {
                        spec: spec.clone(),
                        why: "url changed",
                    });
                } else if old.reuse != spec.reuse {
                    actions.push(Action::Replace {
                        spec: spec.clone(),
                        why: "reuse changed",
                    });
                } else if old.group != spec.group {
                    // Sessions of the old group keep the connections they
                    // hold; new ones of the new group get fresh ones.
                    actions.push(Action::Replace {
                        spec: spec.clone(),
                        why: "group changed",
                    });
                } else if spec.max_size > *capacity {
                    actions.push(Action::Replace {
                        spec: spec.clone(),
                        why: "max_size above the pool's capacity",
                    });
                } else if (old.target_size, old.max_size, old.weight)
                    != (spec.target_size, spec.max_size, spec.weight)
                {
                    actions.push(Action::Resize(spec.clone()));
                }
            }
        }
    }
    for id in current.keys() {
        if !wanted.contains_key(id) && !keep.contains(id) {
            actions.push(Action::Retire {
                id: id.clone(),
                why: "removed or disabled",
            });
        }
    }
    actions
}

/// Sorts rows into usable specs (enabled ones only) and rejections.
///
/// A disabled row is neither, whatever its other values: a rejection keeps a
/// running backend on its last good configuration, and a backend its operator
/// disabled must leave the routed set even if its row is also broken.
pub fn sort_rows(rows: Vec<RowRead>) -> (BTreeMap<String, BackendSpec>, Vec<(String, String)>) {
    let mut wanted = BTreeMap::new();
    let mut rejected = Vec::new();
    for row in rows {
        match row {
            Ok(row) if !row.enabled => {}
            Ok(row) => match row.to_spec() {
                Ok(spec) => {
                    wanted.insert(spec.id.clone(), spec);
                }
                Err(reason) => rejected.push((row.id, reason)),
            },
            Err(unreadable) if unreadable.enabled == Some(false) => {}
            Err(unreadable) => rejected.push((unreadable.id, unreadable.reason)),
        }
    }
    (wanted, rejected)
}

/// How a pool is started (a seam for the sync's own tests: a start that fails).
type StartPool = fn(
    &BackendSpec,
    &PoolTuning,
    &TaskTracker,
    &CancellationToken,
    u64,
) -> Result<Arc<BackendPool>, DialError>;

/// The task that keeps the pools in line with the backend table.
#[derive(Debug)]
pub struct ConfigSync {
    db: Db,
    backends: Backends,
    tuning: PoolTuning,
    tracker: TaskTracker,
    /// Parent of every pool's cancellation token.
    pools_stop: CancellationToken,
    status: Arc<SyncStatus>,
    interval: Duration,
    seeds: Vec<BackendSpec>,
    /// A populated table whose URLs differ from the seeds' is an error.
    seeds_must_match: bool,
    current: BTreeMap<String, Running>,
    /// Migrations ran and seeds were considered.
    initialised: bool,
    /// The table's version whose every row is applied. Left as it was when a
    /// pool could not start, so that the next poll retries.
    applied_version: Option<i64>,
    /// PostgreSQL: the LISTEN connection must show life this often.
    listener_check: Duration,
    start: StartPool,
    rng: SmallRng,
}

impl ConfigSync {
    /// `seeds`: the settings' backends, inserted only into an empty table on its
    /// first start. Pools start on `tracker`, under `pools_stop`.
    pub fn new(
        db: Db,
        backends: Backends,
        tuning: PoolTuning,
        tracker: TaskTracker,
        pools_stop: CancellationToken,
        interval: Duration,
        seeds: Vec<BackendSpec>,
    ) -> Self {
        let status = Arc::new(SyncStatus::new(db.kind(), interval));
        Self {
            db,
            backends,
            tuning,
            tracker,
            pools_stop,
            status,
            interval,
            seeds,
            seeds_must_match: false,
            current: BTreeMap::new(),
            initialised: false,
            applied_version: None,
            listener_check: Duration::from_secs(10),
            start: BackendPool::start,
            rng: SmallRng::from_os_rng(),
        }
    }

    /// PostgreSQL: a LISTEN connection silent this long (no notification,
    /// no answer to a check query) is declared lost and reconnected.
    pub fn listener_check_interval(mut self, interval: Duration) -> Self {
        self.listener_check = interval;
        self
    }

    /// The seeds were named explicitly (`serve --backend`): a table populated
    /// before with other backends fails the first sync
    /// ([`DbError::SeedConflict`]) instead of being served with a warning.
    pub fn seeds_must_match(mut self, must: bool) -> Self {
        self.seeds_must_match = must;
        self
    }

    pub fn status(&self) -> Arc<SyncStatus> {
        self.status.clone()
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Start with fixed backends (used while the database cannot be read at
    /// start-up); the first successful sync replaces them with the table.
    pub fn apply_fallback(&mut self, specs: Vec<BackendSpec>) {
        let wanted = specs
            .into_iter()
            .filter(|s| s.enabled)
            .map(|s| (s.id.clone(), s))
            .collect();
        self.apply(wanted, &[]);
    }

    /// The table holds exactly the seeds' backend URLs (in any order), or
    /// [`DbError::SeedConflict`] naming both (credentials left out).
    async fn check_seeds_match(&self) -> Result<(), DbError> {
        let rows = timed(self.db.rows()).await?;
        let mut table: Vec<String> = rows
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|r| super::db::redact(&r.url))
            .collect();
        let mut flags: Vec<String> = self
            .seeds
            .iter()
            .map(|s| super::db::redact(&s.url))
            .collect();
        // The file's [[backends]] and --backend together, each URL once.
        table.sort();
        flags.sort();
        table.dedup();
        flags.dedup();
        if table == flags && rows.iter().all(Result::is_ok) {
            return Ok(());
        }
        Err(DbError::SeedConflict {
            db: self.db.display_url().to_string(),
            table: table.join(", "),
            flags: flags.join(", "),
        })
    }

    /// One sync: migrate and seed if not done yet, check the change counter,
    /// read and apply the rows if it moved. Failures are recorded in the status.
    pub async fn sync_once(&mut self) -> Result<(), DbError> {
        let result = self.try_sync().await;
        match &result {
            Ok(version) => self.status.record_ok(*version),
            Err(e) => {
                self.status.record_failure(e.to_string());
            }
        }
        result.map(|_| ())
    }

    async fn try_sync(&mut self) -> Result<i64, DbError> {
        if !self.initialised {
            timed(self.db.migrate()).await?;
            match timed(self.db.seed(&self.seeds)).await? {
                SeedOutcome::Seeded(n) => {
                    tracing::info!(rows = n, db = %self.db.display_url(), "seeded the empty backend table from the settings");
                }
                SeedOutcome::NotEmpty(_) | SeedOutcome::AlreadySeeded
                    if self.seeds_must_match && !self.seeds.is_empty() =>
                {
                    self.check_seeds_match().await?;
                }
                SeedOutcome::NotEmpty(_) | SeedOutcome::AlreadySeeded if !self.seeds.is_empty() => {
                    tracing::warn!(
                        ignored = self.seeds.len(),
                        db = %self.db.display_url(),
                        "the backend table was populated before: the settings' backends \
                         ([[backends]], --backend) only seed an empty table on its first start; \
                         manage backends with `sttproxy backends`"
                    );
                }
                _ => {}
            }
            self.initialised = true;
        }
        let version = timed(self.db.version()).await?;
        if self.applied_version == Some(version) {
            return Ok(version);
        }
        let rows = timed(self.db.rows()).await?;
        let (wanted, rejected) = sort_rows(rows);
        let failed_starts = self.apply(wanted, &rejected);
        self.status.applies_total.fetch_add(1, Ordering::Relaxed);
        if failed_starts == 0 {
            self.applied_version = Some(version);
            tracing::debug!(version, "backend table applied");
        } else {
            tracing::debug!(
                version,
                failed_starts,
                "backend table applied but for pools that could not start; the next poll retries"
            );
        }
        Ok(version)
    }

    /// Apply the wanted set to the pools as a diff. Returns how many pools
    /// could not start (their rows are counted as rejected).
    fn apply(
        &mut self,
        wanted: BTreeMap<String, BackendSpec>,
        rejected: &[(String, String)],
    ) -> usize {
        let mut keep = BTreeSet::new();
        for (id, reason) in rejected {
            let running = self.current.contains_key(id);
            tracing::warn!(
                backend = %id,
                %reason,
                running,
                "rejected backend row{}",
                if running { "; the backend keeps its last good configuration" } else { "" }
            );
            keep.insert(id.clone());
        }
        let n = rejected.len() as u64;
        self.status.rejected_rows.store(n, Ordering::Relaxed);
        self.status.rejections_total.fetch_add(n, Ordering::Relaxed);

        let current: BTreeMap<String, (BackendSpec, usize)> = self
            .current
            .iter()
            .map(|(id, r)| (id.clone(), (r.spec.clone(), r.pool.snapshot().capacity)))
            .collect();
        let actions = plan(&current, &wanted, &keep);
        if actions.is_empty() {
            return 0;
        }
        let mut failed_starts = 0;
        let mut retired = Vec::new();
        for action in actions {
            match action {
                Action::Start(spec) => {
                    let Some(pool) = self.start_pool(&spec) else {
                        failed_starts += 1;
                        continue;
                    };
                    tracing::info!(
                        backend = %spec.id, url = %db::redact(&spec.url), target = spec.target_size,
                        max = spec.max_size, weight = spec.weight, reuse = %spec.reuse,
                        group = %spec.group,
                        "backend added"
                    );
                    self.current.insert(spec.id.clone(), Running { spec, pool });
                }
                Action::Resize(spec) => {
                    if let Some(r) = self.current.get_mut(&spec.id) {
                        tracing::info!(
                            backend = %spec.id,
                            target = spec.target_size, max = spec.max_size, weight = spec.weight,
                            old_target = r.spec.target_size, old_max = r.spec.max_size,
                            old_weight = r.spec.weight,
                            "backend resized"
                        );
                        r.pool.resize(spec.target_size, spec.max_size, spec.weight);
                        r.spec = spec;
                    }
                }
                Action::Replace { spec, why } => {
                    // Start the new pool first: if it cannot start, the old one stays.
                    let Some(pool) = self.start_pool(&spec) else {
                        failed_starts += 1;
                        continue;
                    };
                    tracing::info!(backend = %spec.id, url = %db::redact(&spec.url), why, "backend replaced by a new pool; the old one drains");
                    if let Some(old) = self.current.insert(spec.id.clone(), Running { spec, pool })
                    {
                        retired.push(old.pool);
                    }
                }
                Action::Retire { id, why } => {
                    if let Some(old) = self.current.remove(&id) {
                        tracing::info!(backend = %id, why, leased = old.pool.snapshot().leased, "backend retired: draining");
                        retired.push(old.pool);
                    }
                }
            }
        }
        // Route to the new set first, then drain what left it.
        self.backends
            .set(self.current.values().map(|r| r.pool.clone()).collect());
        for pool in retired {
            self.backends.retire(pool);
        }
        failed_starts
    }

    fn start_pool(&mut self, spec: &BackendSpec) -> Option<Arc<BackendPool>> {
        let seed = rand::random::<u64>();
        match (self.start)(spec, &self.tuning, &self.tracker, &self.pools_stop, seed) {
            Ok(pool) => Some(pool),
            Err(e) => {
                tracing::warn!(backend = %spec.id, error = %e, "rejected backend row: its pool cannot start; retried at the next poll");
                self.status.rejected_rows.fetch_add(1, Ordering::Relaxed);
                self.status.rejections_total.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Run until `stop` fires: sync on every (jittered) interval, at once when
    /// `nudge` is notified (PostgreSQL NOTIFY), with backoff after failures.
    /// Also ends the tasks of retired pools once they are drained. Closes the
    /// database pool before returning.
    pub async fn run(mut self, stop: CancellationToken) {
        let nudge = Arc::new(Notify::new());
        let listener_stop = stop.child_token();
        let listener = (self.db.kind() == DbKind::Postgres).then(|| {
            self.tracker.spawn(listen(
                self.db.clone(),
                self.status.clone(),
                self.listener_check,
                nudge.clone(),
                listener_stop.clone(),
            ))
        });
        let mut next_sync = Instant::now() + jitter(self.interval, &mut self.rng);
        loop {
            let reap_at = if self.backends.has_retiring() {
                Instant::now() + REAP_EVERY
            } else {
                Instant::now() + Duration::from_secs(3600)
            };
            let sync_now = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                () = nudge.notified() => true,
                () = tokio::time::sleep_until(next_sync) => true,
                () = tokio::time::sleep_until(reap_at) => false,
            };
            if sync_now {
                let outcome = tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    r = self.sync_once() => r,
                };
                next_sync = match outcome {
                    Ok(()) => Instant::now() + jitter(self.interval, &mut self.rng),
                    Err(e) => {
                        let n = usize::try_from(self.status.consecutive_failures())
                            .unwrap_or(usize::MAX);
                        let delay =
                            backoff(RETRY_BASE, self.interval.max(RETRY_BASE), n, &mut self.rng);
                        tracing::warn!(
                            error = %e, failures = n, retry_in = ?delay,
                            "backend table sync failed; keeping the last good configuration"
                        );
                        Instant::now() + delay
                    }
                };
            }
            self.backends.reap_retired();
        }
        listener_stop.cancel();
        if let Some(handle) = listener {
            let _ = handle.await;
        }
        // Bounded: closing waits for connections in use, and a query stuck on
        // a half-open connection would hold the shutdown.
        if tokio::time::timeout(OP_TIMEOUT, self.db.close())
            .await
            .is_err()
        {
            tracing::warn!(db = %self.db.display_url(), "the database pool did not close within {OP_TIMEOUT:?}");
        }
    }
}

/// An operation on the database, bounded by [`OP_TIMEOUT`].
async fn timed<T>(op: impl Future<Output = Result<T, DbError>>) -> Result<T, DbError> {
    match tokio::time::timeout(OP_TIMEOUT, op).await {
        Ok(r) => r,
        Err(_) => Err(DbError::Timeout(OP_TIMEOUT)),
    }
}

/// PostgreSQL: LISTEN on the table's channel and nudge the sync on every
/// notification. The connection is watched ([`watch`]); after it is lost or
/// found silent, it is dropped and a new one made, with backoff. Nudges after
/// every (re)connect: notifications sent while it was away are lost, and the
/// sync's counter check catches up. `status` shows whether it is up.
async fn listen(
    db: Db,
    status: Arc<SyncStatus>,
    check: Duration,
    nudge: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut rng = SmallRng::from_os_rng();
    let mut failures = 0usize;
    loop {
        // A pool of its own per connection (see `Db::pg_listener_pool`).
        let Some(pool) = db.pg_listener_pool() else {
            return;
        };
        let connect = async {
            let mut l = PgListener::connect_with(&pool).await?;
            // A lost connection is reported (`Ok(None)`), not silently
            // replaced: the loop below reconnects with backoff and says so.
            l.eager_reconnect(false);
            l.listen(db::NOTIFY_CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let connected = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            r = tokio::time::timeout(OP_TIMEOUT, connect) => r,
        };
        let lost = match connected {
            Ok(Ok(mut listener)) => {
                status.set_listener_connected(true);
                if failures > 0 {
                    tracing::info!(
                        channel = db::NOTIFY_CHANNEL,
                        "listening for backend table changes again"
                    );
                }
                failures = 0;
                nudge.notify_one();
                let lost = watch(&mut listener, check, &nudge, &stop).await;
                status.set_listener_connected(false);
                match lost {
                    Some(why) => why,
                    None => return,
                }
            }
            Ok(Err(e)) => format!("connecting: {}", db::full_message(&e)),
            Err(_) => format!("connecting: no answer within {OP_TIMEOUT:?}"),
        };
        failures += 1;
        let delay = backoff(RETRY_BASE, Duration::from_secs(5), failures, &mut rng);
        tracing::warn!(
            why = %lost, failures, retry_in = ?delay,
            "LISTEN connection for backend table changes lost; changes arrive by polling until it is back"
        );
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// What woke [`watch`].
enum Woken {
    Stop,
    Received(Result<Option<sqlx::postgres::PgNotification>, sqlx::Error>),
    CheckDue,
}

/// Receive notifications on `listener` (nudging the sync for each) until it
/// is lost (returns why) or `stop` fires (returns `None`).
///
/// Invariant: the connection shows a sign of life at least every `check`.
/// After `check / 2` without a notification a check query (`SELECT 1`) goes
/// through the LISTEN connection itself, and must be answered by the end of
/// the interval; otherwise the connection is declared lost. So a half-open
/// connection is found within `check` of its last sign of life. Notifications
/// that arrive during the query are buffered by sqlx and received next.
async fn watch(
    listener: &mut PgListener,
    check: Duration,
    nudge: &Notify,
    stop: &CancellationToken,
) -> Option<String> {
    let mut alive_at = Instant::now();
    loop {
        let woken = tokio::select! {
            biased;
            () = stop.cancelled() => Woken::Stop,
            r = listener.try_recv() => Woken::Received(r),
            () = tokio::time::sleep_until(alive_at + check / 2) => Woken::CheckDue,
        };
        match woken {
            Woken::Stop => return None,
            Woken::Received(Ok(Some(_))) => {
                alive_at = Instant::now();
                nudge.notify_one();
            }
            Woken::Received(Ok(None)) => return Some("the connection dropped".into()),
            Woken::Received(Err(e)) => return Some(db::full_message(&e)),
            Woken::CheckDue => {
                let deadline = alive_at + check;
                let answered = tokio::select! {
                    biased;
                    () = stop.cancelled() => return None,
                    r = tokio::time::timeout_at(deadline, sqlx::query("SELECT 1").execute(&mut *listener)) => r,
                };
                match answered {
                    Ok(Ok(_)) => alive_at = Instant::now(),
                    Ok(Err(e)) => return Some(format!("check query: {}", db::full_message(&e))),
                    Err(_) => {
                        return Some(format!(
                            "no sign of life within {} (db_listener_check_interval): no answer to a check query",
                            humantime::format_duration(check)
                        ));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Reuse;

    fn spec(id: &str, target: usize, max: usize) -> BackendSpec {
        BackendSpec {
            id: id.into(),
            url: format!("ws://127.0.0.1:1/{id}"),
            target_size: target,
            max_size: max,
            weight: 1,
            enabled: true,
            reuse: Reuse::Fenced,
            group: crate::route::DEFAULT_GROUP.into(),
        }
    }

    fn map(specs: &[BackendSpec]) -> BTreeMap<String, BackendSpec> {
        specs.iter().map(|s| (s.id.clone(), s.clone())).collect()
    }

    fn running(specs: &[BackendSpec], capacity: usize) -> BTreeMap<String, (BackendSpec, usize)> {
        specs
            .iter()
            .map(|s| (s.id.clone(), (s.clone(), capacity)))
            .collect()
    }

    #[test]
    fn plans_a_diff() {
        let a = spec("a", 4, 8);
        let b = spec("b", 4, 8);
        let c = spec("c", 4, 8);
        let current = running(&[a.clone(), b.clone(), c.clone()], 16);
        let mut a2 = a.clone();
        a2.target_size = 8;
        let mut b2 = b.clone();
        b2.url = "ws://127.0.0.1:2/b".into();
        let d = spec("d", 1, 1);
        let actions = plan(
            &current,
            &map(&[a2.clone(), b2.clone(), d.clone()]),
            &BTreeSet::new(),
        );
        assert_eq!(
            actions,
            vec![
                Action::Resize(a2),
                Action::Replace {
                    spec: b2,
                    why: "url changed"
                },
                Action::Start(d),
                Action::Retire {
                    id: "c".into(),
                    why: "removed or disabled"
                },
            ]
        );
    }

    #[test]
    fn unchanged_rows_do_nothing_and_rejected_rows_keep_their_pool() {
        let a = spec("a", 4, 8);
        let current = running(std::slice::from_ref(&a), 16);
        assert!(plan(&current, &map(std::slice::from_ref(&a)), &BTreeSet::new()).is_empty());
        let keep = BTreeSet::from(["a".to_string()]);
        assert!(plan(&current, &BTreeMap::new(), &keep).is_empty());
    }

    #[test]
    fn a_max_above_the_capacity_a_new_reuse_or_group_replaces_the_pool() {
        let a = spec("a", 4, 8);
        let current = running(std::slice::from_ref(&a), 16);
        let mut big = a.clone();
        big.max_size = 17;
        assert!(matches!(
            plan(&current, &map(&[big]), &BTreeSet::new())[..],
            [Action::Replace {
                why: "max_size above the pool's capacity",
                ..
            }]
        ));
        let mut none = a.clone();
        none.reuse = Reuse::None;
        assert!(matches!(
            plan(&current, &map(&[none]), &BTreeSet::new())[..],
            [Action::Replace {
                why: "reuse changed",
                ..
            }]
        ));
        let mut moved = a.clone();
        moved.group = "diarize".into();
        assert!(matches!(
            plan(&current, &map(&[moved]), &BTreeSet::new())[..],
            [Action::Replace {
                why: "group changed",
                ..
            }]
        ));
        let mut fits = a;
        fits.max_size = 16;
        fits.weight = 3;
        assert!(matches!(
            plan(&current, &map(&[fits]), &BTreeSet::new())[..],
            [Action::Resize(_)]
        ));
    }

    /// Fails its first call, then starts pools as usual.
    fn start_failing_once(
        spec: &BackendSpec,
        tuning: &PoolTuning,
        tracker: &TaskTracker,
        parent: &CancellationToken,
        seed: u64,
    ) -> Result<Arc<BackendPool>, DialError> {
        static CALLS: AtomicU64 = AtomicU64::new(0);
        if CALLS.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(DialError::BadUrl {
                url: spec.url.clone(),
                reason: "a start failure made by the test".into(),
            });
        }
        BackendPool::start(spec, tuning, tracker, parent, seed)
    }

    /// A pool that cannot start does not mark the table's version applied:
    /// the next poll, with no edit in between, retries it.
    #[tokio::test]
    async fn a_pool_that_failed_to_start_is_retried_without_an_edit() {
        let db = Db::open("sqlite::memory:").await.unwrap();
        db.add(&spec("a", 1, 2)).await.unwrap();
        let backends = Backends::default();
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let mut sync = ConfigSync::new(
            db.clone(),
            backends.clone(),
            crate::config::Settings::default().pool_tuning(),
            tracker.clone(),
            stop.clone(),
            Duration::from_secs(1),
            Vec::new(),
        );
        sync.start = start_failing_once;
        let routed = || {
            backends
                .all()
                .iter()
                .map(|p| p.id.clone())
                .collect::<Vec<_>>()
        };

        sync.sync_once().await.unwrap();
        assert!(routed().is_empty());
        assert_eq!(sync.status().rejected_rows(), 1);
        let version = sync.status().version();

        sync.sync_once().await.unwrap();
        assert_eq!(sync.status().version(), version, "no edit in between");
        assert_eq!(routed(), ["a"]);
        assert_eq!(sync.status().rejected_rows(), 0);

        stop.cancel();
        tracker.close();
        tracker.wait().await;
        db.close().await;
    }

    #[test]
    fn a_disabled_row_is_neither_wanted_nor_rejected_whatever_its_values() {
        let bad_and_off = db::BackendRow {
            id: "off".into(),
            url: "ws://127.0.0.1:9001".into(),
            target_size: 3,
            max_size: 0,
            weight: 1,
            enabled: false,
            reuse: "fenced".into(),
            group_name: "default".into(),
            updated_at: String::new(),
        };
        let unreadable_and_off = db::UnreadableRow {
            id: "worse".into(),
            reason: "mismatched types".into(),
            enabled: Some(false),
        };
        let (wanted, rejected) = sort_rows(vec![Ok(bad_and_off), Err(unreadable_and_off)]);
        assert!(wanted.is_empty() && rejected.is_empty(), "{rejected:?}");
    }

    #[test]
    fn rows_are_sorted_into_wanted_and_rejected() {
        let ok = db::BackendRow {
            id: "ok".into(),
            url: "ws://127.0.0.1:9001".into(),
            target_size: 1,
            max_size: 2,
            weight: 1,
            enabled: true,
            reuse: "fenced".into(),
            group_name: "default".into(),
            updated_at: String::new(),
        };
        let off = db::BackendRow {
            id: "off".into(),
            enabled: false,
            ..ok.clone()
        };
        let bad = db::BackendRow {
            id: "bad".into(),
            max_size: 0,
            target_size: 3,
            ..ok.clone()
        };
        let unreadable = db::UnreadableRow {
            id: "worse".into(),
            reason: "mismatched types".into(),
            enabled: None,
        };
        let (wanted, rejected) = sort_rows(vec![Ok(ok), Ok(off), Ok(bad), Err(unreadable)]);
        assert_eq!(wanted.keys().collect::<Vec<_>>(), ["ok"]);
        assert_eq!(rejected.len(), 2);
        assert!(rejected[0].1.contains("max_size 0 < target_size 3"));
        assert_eq!(rejected[1].0, "worse");
    }
}
