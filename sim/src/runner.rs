//! One run: a scenario, a seed, a pool design. Builds the world, starts the
//! pools (one per backend), warms up, injects the scenario's faults under load,
//! stops them, checks convergence within the stated bound, shuts down and
//! counts what is left.

use std::sync::Arc;
use std::time::Duration;

use sttproxy::backend::health::HealthThresholds;
use sttproxy::backends::Backends;
use sttproxy::config::Settings;
use sttproxy::metrics::Metrics;
use sttproxy::reconcile::ReconcileConfig;
use sttproxy::relay::FailoverSettings;
use sttproxy::session::{SessionContext, SessionSettings};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::{BackendSpec, SimBackend};
use crate::checker::Kind;
use crate::client::{ClientPlan, EndKind, Forge};
use crate::invariants::check_snapshot;
use crate::pools::{Naive, Ours, PoolEnv, PoolKind, PoolParams, PoolUnderTest};
use crate::report::RunReport;
use crate::runtime::{self, Clock, SimRng, seed_for};
use crate::scenario::Scenario;
use crate::sessions::{self, SessionEnv};
use crate::tasks::Tasks;
use crate::truth::PoolTruth;
use crate::world::World;

/// How often the checker compares every pool's snapshot with the truth.
const CHECK_EVERY: Duration = Duration::from_millis(20);
/// How often convergence is polled.
const SETTLE_POLL: Duration = Duration::from_millis(100);
/// How long shutdown may take before what is left counts as leaked.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// The dial timeout of the simulated dialer (as the proxy's `connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// What to run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub scenario: Scenario,
    pub seed: u64,
    pub pool: PoolKind,
    /// Length of the fault phase.
    pub duration: Duration,
}

/// Run one simulation to its end on a fresh current-thread runtime.
pub fn run(spec: &RunSpec) -> std::io::Result<RunReport> {
    let rt = runtime::build()?;
    let wall = std::time::Instant::now();
    let mut report = rt.block_on(async {
        match spec.pool {
            PoolKind::Ours => drive::<Ours>(spec).await,
            PoolKind::Naive => drive::<Naive>(spec).await,
        }
    });
    report.wall_secs = wall.elapsed().as_secs_f64();
    Ok(report)
}

/// The bounds a run states and checks.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// From the end of the faults, by when every pool must hold its target.
    pub settle: Duration,
    /// How long it must then hold (a full health-check round).
    pub stable: Duration,
    /// Longest a session can take.
    pub session: Duration,
}

pub fn bounds(sc: &Scenario, r: &ReconcileConfig, s: &SessionSettings) -> Bounds {
    // A session that fails over may wait up to `failover_timeout` each time.
    let failovers = s
        .failover
        .filter(|_| sc.backend.resume)
        .map_or(Duration::ZERO, |f| f.timeout * f.max_failovers);
    let session = Duration::from_millis(u64::from(sc.load.chunks.1) * sc.load.interval_ms.1)
        + s.acquire_timeout
        + s.drain_timeout
        + failovers
        + Duration::from_secs(2);
    let dial_rounds = sc.max.div_ceil(r.max_concurrent_dials.max(1)) as u32;
    let settle = session
        + r.backoff_max
        + r.tick.mul_f64(1.1)
        + sc.health_interval.mul_f64(1.1)
        + sc.health_timeout
        + CONNECT_TIMEOUT
        + Duration::from_millis(sc.backend.dial_ms.1) * dial_rounds
        + Duration::from_secs(5);
    let stable = sc.health_interval.mul_f64(1.1) + sc.health_timeout + Duration::from_secs(1);
    Bounds {
        settle,
        stable,
        session,
    }
}

async fn drive<P: PoolUnderTest>(spec: &RunSpec) -> RunReport {
    let sc = &spec.scenario;
    let seed = spec.seed;
    let clock = Clock::start();
    let truths = (0..sc.backends)
        .map(|i| PoolTruth::new(format!("p{i}"), sc.max, sc.target))
        .collect();
    let world = World::new(clock, truths);
    let tasks = Tasks::default();
    let reconcile = ReconcileConfig::default();
    // Failover as the proxy configures it by default (docs/failover.md); it
    // applies only to sessions on resumable backends.
    let settings = SessionSettings {
        failover: Settings::default()
            .session_settings()
            .failover
            .map(|f| FailoverSettings {
                timeout: sc.failover_timeout.unwrap_or(f.timeout),
                ..f
            }),
        ..SessionSettings::default()
    };
    let resumable: Vec<bool> = (0..sc.backends)
        .map(|i| sc.backend.resume && i + sc.fenced_backends < sc.backends)
        .collect();
    let b = bounds(sc, &reconcile, &settings);
    let params = PoolParams {
        target: sc.target,
        max: sc.max,
        reconcile,
        health_interval: sc.health_interval,
        health_timeout: sc.health_timeout,
        thresholds: HealthThresholds::default(),
        connect_timeout: CONNECT_TIMEOUT,
    };
    let backends: Vec<Arc<SimBackend>> = (0..sc.backends)
        .map(|i| {
            SimBackend::new(
                i,
                BackendSpec {
                    resume: resumable[i],
                    ..sc.backend.clone()
                },
                world.clone(),
                tasks.clone(),
                seed_for(seed, &format!("backend{i}")),
            )
        })
        .collect();
    let pools: Vec<P> = (0..sc.backends)
        .map(|i| {
            P::start(
                &params,
                PoolEnv {
                    index: i,
                    backend: backends[i].clone(),
                    world: world.clone(),
                    tasks: tasks.clone(),
                    seed: seed_for(seed, &format!("pool{i}")),
                },
            )
        })
        .collect();
    let ctx = SessionContext {
        backends: Backends::default(),
        metrics: Metrics::new(Backends::default()),
        settings: Arc::new(settings.clone()),
        shutdown: CancellationToken::new(),
    };
    let env = Arc::new(SessionEnv {
        pools: pools.clone(),
        ctx,
        world: world.clone(),
        tasks: tasks.clone(),
        rng: SimRng::new(seed_for(seed, "routing")),
        acquire_timeout: settings.acquire_timeout,
        resumable,
    });

    let stop_checks = CancellationToken::new();
    tasks.spawn(
        "checker",
        check_loop(pools.clone(), world.clone(), stop_checks.clone()),
    );

    tokio::time::sleep(sc.warmup).await;

    // The fault phase.
    world
        .faults_on
        .store(true, std::sync::atomic::Ordering::Relaxed);
    world.note(|| "faults on, load starts".into());
    let stop = CancellationToken::new();
    let driver_rng = SimRng::new(seed_for(seed, "driver"));
    tasks.spawn(
        "load",
        load(env.clone(), sc.clone(), driver_rng.clone(), stop.clone()),
    );
    if let Some(every) = sc.storm_ms {
        tasks.spawn(
            "storm",
            storm(
                pools.clone(),
                world.clone(),
                sc.max,
                every,
                driver_rng.fork_sim(),
                stop.clone(),
            ),
        );
    }
    if let Some(c) = sc.crashes {
        for backend in &backends {
            tasks.spawn(
                "crasher",
                crasher(backend.clone(), c, driver_rng.fork_sim(), stop.clone()),
            );
        }
    }
    if let Some(c) = sc.crash_cycle {
        tasks.spawn(
            "crasher",
            crash_cycles(backends.clone(), c, driver_rng.fork_sim(), stop.clone()),
        );
    }
    tokio::time::sleep(spec.duration).await;

    // Faults stop, load stops.
    let faults_end = Instant::now();
    stop.cancel();
    world
        .faults_on
        .store(false, std::sync::atomic::Ordering::Relaxed);
    for backend in &backends {
        backend.restore();
    }
    world.note(|| "faults off, load stopped".into());

    // Every session ends.
    let drained_by = faults_end + b.session + Duration::from_secs(60);
    while tasks.alive_named("session") + tasks.alive_named("client") > 0
        && Instant::now() < drained_by
    {
        tokio::time::sleep(SETTLE_POLL).await;
    }
    let hung = tasks.alive_named("session") + tasks.alive_named("client");
    if hung > 0 {
        world.violation(
            Kind::HungSession,
            format!(
                "{hung} session tasks still running {:?} after the load stopped",
                drained_by - faults_end
            ),
        );
    }

    let settled = settle(&pools, &world, faults_end, b).await;
    let settle_error = world.with(|s, _| {
        s.pools
            .iter()
            .map(|t| (t.live() as i64 - t.target as i64).unsigned_abs())
            .max()
            .unwrap_or(0)
    });

    // Shutdown.
    stop_checks.cancel();
    for p in &pools {
        p.shutdown();
    }
    let grace_end = Instant::now() + SHUTDOWN_GRACE;
    while tasks.alive() > 0 && Instant::now() < grace_end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = tasks.alive_by_name();
    if !left.is_empty() {
        let list: Vec<String> = left.iter().map(|(n, c)| format!("{c} {n}")).collect();
        world.violation(
            Kind::LeakedTask,
            format!(
                "alive {SHUTDOWN_GRACE:?} after shutdown: {}",
                list.join(", ")
            ),
        );
    }
    let runtime_alive = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    if runtime_alive != tasks.alive() {
        world.violation(
            Kind::LeakedTask,
            format!(
                "runtime counts {runtime_alive} alive tasks, the guard {}",
                tasks.alive()
            ),
        );
    }
    world.with(|s, now| {
        for i in 0..s.pools.len() {
            let t = &s.pools[i];
            if !t.open.is_empty() || t.inflight > 0 {
                let detail = format!(
                    "{} after shutdown: {} connections still open, {} dials in flight",
                    t.name,
                    t.open.len(),
                    t.inflight
                );
                s.checker
                    .event(Kind::LostConnection, now, detail, &mut s.trace);
            }
        }
    });

    let virtual_secs = clock.elapsed().as_secs_f64();
    let mut report = RunReport::build(spec, &world, &tasks, settled, b, virtual_secs);
    report.settle_error = settle_error;
    report
}

/// Compare every pool's snapshot with the truth, continuously.
async fn check_loop<P: PoolUnderTest>(pools: Vec<P>, world: Arc<World>, stop: CancellationToken) {
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = tokio::time::sleep(CHECK_EVERY) => {}
        }
        for (i, p) in pools.iter().enumerate() {
            let asked = Instant::now();
            let snap = tokio::select! {
                biased;
                () = stop.cancelled() => return,
                s = p.snapshot() => s,
            };
            let waited = u64::try_from(asked.elapsed().as_millis()).unwrap_or(u64::MAX);
            world.with(|s, now| {
                s.stats.worst_snapshot_ms = s.stats.worst_snapshot_ms.max(waited);
                check_snapshot(s, now, i, &snap, false);
            });
        }
    }
}

/// Wait until every pool holds exactly its target (truth and snapshot agree,
/// nothing in flight) for `b.stable`; returns how long after the faults ended
/// that state began, or `None` (a violation) if it did not within `b.settle`.
async fn settle<P: PoolUnderTest>(
    pools: &[P],
    world: &World,
    faults_end: Instant,
    b: Bounds,
) -> Option<Duration> {
    let deadline = faults_end + b.settle;
    let mut since: Option<Instant> = None;
    loop {
        let mut snaps = Vec::with_capacity(pools.len());
        for p in pools {
            snaps.push(p.snapshot().await);
        }
        let now = Instant::now();
        let ok = world.with(|s, _| {
            s.pools.iter().zip(&snaps).all(|(t, snap)| {
                t.inflight == 0
                    && t.session_held == 0
                    && t.live() == t.target
                    && snap.live == t.target
                    && snap.idle == t.target
            })
        });
        if ok {
            let start = *since.get_or_insert(now);
            if now - start >= b.stable {
                world.with(|s, at| {
                    for (i, snap) in snaps.iter().enumerate() {
                        check_snapshot(s, at, i, snap, true);
                    }
                });
                return Some(start - faults_end);
            }
        } else {
            since = None;
        }
        if now >= deadline {
            let detail = world.with(|s, _| {
                s.pools
                    .iter()
                    .zip(&snaps)
                    .map(|(t, snap)| {
                        format!(
                            "{}: target {}, truth live {} (open {}, dialing {}), snapshot live {} idle {}",
                            t.name,
                            t.target,
                            t.live(),
                            t.open.len(),
                            t.inflight,
                            snap.live,
                            snap.idle
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            });
            world.violation(
                Kind::NotConverged,
                format!(
                    "not at target {:?} after the faults stopped: {detail}",
                    b.settle
                ),
            );
            return None;
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
}

/// Client arrivals: the herd at once, then Poisson arrivals until `stop`.
async fn load<P: PoolUnderTest>(
    env: Arc<SessionEnv<P>>,
    sc: Scenario,
    rng: SimRng,
    stop: CancellationToken,
) {
    let mut next_session: u64 = 1;
    let mut plan = |rng: &SimRng| {
        let l = &sc.load;
        let chunks = rng.between(u64::from(l.chunks.0), u64::from(l.chunks.1)) as u32;
        let cut = rng.between(0, u64::from(chunks)) as u32;
        let roll = rng.between(0, 999_999) as f64 / 1_000_000.0;
        let end = if roll < l.vanish_p {
            EndKind::Vanish(cut)
        } else if roll < l.vanish_p + l.close_p {
            EndKind::Close(cut)
        } else if roll < l.vanish_p + l.close_p + l.vanish_in_finish_p {
            EndKind::VanishInFinish
        } else {
            EndKind::Graceful
        };
        // Drawn only where clients forge: other scenarios' runs stay as they were.
        let forge = if l.forge_p > 0.0 && end == EndKind::Graceful && rng.chance(l.forge_p) {
            Some(Forge::ALL[rng.index(Forge::ALL.len())])
        } else {
            None
        };
        let p = ClientPlan {
            session: next_session,
            chunks,
            interval: rng.millis(l.interval_ms),
            size: l.chunk_bytes,
            end,
            forge,
        };
        next_session += 1;
        p
    };
    for _ in 0..sc.load.herd {
        sessions::start(&env, plan(&rng));
    }
    if sc.load.arrivals_per_s <= 0.0 {
        return;
    }
    let mean = Duration::from_secs_f64(1.0 / sc.load.arrivals_per_s);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = tokio::time::sleep(rng.exp(mean)) => {}
        }
        sessions::start(&env, plan(&rng));
    }
}

/// Live target changes, each to a random size in `0..=max`.
async fn storm<P: PoolUnderTest>(
    pools: Vec<P>,
    world: Arc<World>,
    max: usize,
    every: (u64, u64),
    rng: SimRng,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = tokio::time::sleep(rng.millis(every)) => {}
        }
        let i = rng.index(pools.len());
        let target = rng.between(0, max as u64) as usize;
        world.with(|s, now| {
            s.pools[i].target = target;
            s.trace.record(now, format!("p{i} target -> {target}"));
        });
        pools[i].set_target(target);
    }
}

/// Crash a backend and bring it back, again and again, until `stop`.
async fn crasher(
    backend: Arc<SimBackend>,
    c: crate::scenario::Crashes,
    rng: SimRng,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = tokio::time::sleep(rng.exp(c.up_mean)) => {}
        }
        backend.crash();
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = tokio::time::sleep(rng.exp(c.down_mean)) => {}
        }
        backend.restore();
    }
}

/// Scripted crash cycles (`CrashCycle`) until `stop`; a cycle cut short by
/// `stop` leaves its backends down (the run restores every backend then).
async fn crash_cycles(
    backends: Vec<Arc<SimBackend>>,
    c: crate::scenario::CrashCycle,
    rng: SimRng,
    stop: CancellationToken,
) {
    let pause = |until: Instant| {
        let stop = stop.clone();
        async move {
            tokio::select! {
                biased;
                () = stop.cancelled() => false,
                () = tokio::time::sleep_until(until) => true,
            }
        }
    };
    let n = backends.len();
    for cycle in 0usize.. {
        let start = Instant::now();
        if !pause(start + c.at).await {
            return;
        }
        let first = Instant::now();
        for k in 0..c.crashes.min(n) {
            if k > 0 && !pause(Instant::now() + rng.millis(c.gap_ms)).await {
                return;
            }
            backends[(cycle + k) % n].crash();
        }
        if !pause(first + c.down).await {
            return;
        }
        for b in &backends {
            b.restore();
        }
        if !pause(start + c.period).await {
            return;
        }
    }
}
