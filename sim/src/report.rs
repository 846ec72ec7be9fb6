//! What a run found, and the side-by-side table of many runs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::checker::{Kind, Violation};
use crate::pools::PoolKind;
use crate::runner::{Bounds, RunSpec};
use crate::tasks::Tasks;
use crate::world::{RunStats, World};

#[derive(Debug, Clone)]
pub struct RunReport {
    pub scenario: String,
    pub pool: PoolKind,
    pub seed: u64,
    pub duration: Duration,
    pub virtual_secs: f64,
    pub wall_secs: f64,
    pub violations: BTreeMap<Kind, u64>,
    pub first: Vec<Violation>,
    /// Largest `live - max` over the run and every pool (0 if never above).
    pub worst_over_max: u64,
    /// Largest |live - target| when the settle check ended (0 if settled).
    pub settle_error: u64,
    /// When every pool held its target, after the faults ended.
    pub settled_after: Option<Duration>,
    pub bounds: Bounds,
    pub stats: RunStats,
    pub tasks_spawned: u64,
    pub tasks_peak: usize,
    pub trace_hash: u64,
    pub events: u64,
}

/// The `q` quantile of `v` (sorted in place), 0 if empty.
pub fn quantile(v: &mut [u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    let idx = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[idx.min(v.len() - 1)]
}

impl RunReport {
    pub fn build(
        spec: &RunSpec,
        world: &World,
        tasks: &Tasks,
        settled_after: Option<Duration>,
        bounds: Bounds,
        virtual_secs: f64,
    ) -> Self {
        world.with(|s, _| {
            let worst = s
                .pools
                .iter()
                .map(|t| t.worst_over_max.max(0))
                .max()
                .unwrap_or(0);
            Self {
                scenario: spec.scenario.name.to_string(),
                pool: spec.pool,
                seed: spec.seed,
                duration: spec.duration,
                virtual_secs,
                wall_secs: 0.0,
                violations: s.checker.counts().clone(),
                first: s.checker.first(),
                worst_over_max: u64::try_from(worst).unwrap_or(0),
                settle_error: 0,
                settled_after,
                bounds,
                stats: s.stats.clone(),
                tasks_spawned: tasks.spawned(),
                tasks_peak: tasks.peak(),
                trace_hash: s.trace.hash(),
                events: s.trace.count(),
            }
        })
    }

    pub fn total_violations(&self) -> u64 {
        self.violations.values().sum()
    }

    pub fn p99_wait_ms(&self) -> u64 {
        let mut v = self.stats.acquire_waits_ms.clone();
        quantile(&mut v, 0.99)
    }

    /// The command that replays this run.
    pub fn replay(&self) -> String {
        format!(
            "sim run --scenario {} --seed {} --duration {} --pool {}",
            self.scenario,
            self.seed,
            humantime::format_duration(self.duration),
            self.pool.as_str()
        )
    }

    /// A human-readable account of the run.
    pub fn render(&self, with_traces: bool) -> String {
        let mut o = String::new();
        let st = &self.stats;
        let _ = writeln!(
            o,
            "[{}] {} seed {}: {:.0} s simulated in {:.2} s ({:.1} sim-h per wall-s)",
            self.pool.as_str(),
            self.scenario,
            self.seed,
            self.virtual_secs,
            self.wall_secs,
            self.virtual_secs / 3600.0 / self.wall_secs.max(1e-9)
        );
        let _ = writeln!(
            o,
            "  sessions: {} started, {} clean, {} failed, {} refused; acquire wait p99 {} ms, max {} ms; slowest stats call {} ms",
            st.sessions_started,
            st.sessions_clean,
            st.sessions_failed,
            st.sessions_rejected,
            self.p99_wait_ms(),
            st.acquire_waits_ms.iter().max().copied().unwrap_or(0),
            st.worst_snapshot_ms
        );
        if st.forged > 0 || st.reserved_at_backend > 0 {
            let _ = writeln!(
                o,
                "  forged session.ended sent by clients: {}; client data shaped like session.* control messages that reached a backend: {}",
                st.forged, st.reserved_at_backend
            );
        }
        if st.late_frames > 0 {
            let _ = writeln!(
                o,
                "  late frames sent by backends after session.ended: {}",
                st.late_frames
            );
        }
        if st.failovers > 0 || st.resumable_failed > 0 {
            let _ = writeln!(
                o,
                "  failover: {} notices; {} sessions ended clean after one failover, {} after two or more; {} graceful resumable sessions did not (latest 1014 {} ms after the backend failed)",
                st.failovers,
                st.resumed_once,
                st.resumed_twice,
                st.resumable_failed,
                st.worst_failover_close_ms
            );
        }
        let settled = match self.settled_after {
            Some(d) => format!(
                "settled at target {:.1} s after the faults stopped",
                d.as_secs_f64()
            ),
            None => "DID NOT settle at target".to_string(),
        };
        let _ = writeln!(
            o,
            "  {settled} (bound {:.1} s, held {:.1} s); worst live - max {}; tasks spawned {}, peak {}; {} events, trace hash {:016x}",
            self.bounds.settle.as_secs_f64(),
            self.bounds.stable.as_secs_f64(),
            self.worst_over_max,
            self.tasks_spawned,
            self.tasks_peak,
            self.events,
            self.trace_hash
        );
        if self.violations.is_empty() {
            let _ = writeln!(o, "  no violations");
        } else {
            let list: Vec<String> = self
                .violations
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            let _ = writeln!(o, "  VIOLATIONS: {}", list.join(", "));
            for v in &self.first {
                let _ = writeln!(
                    o,
                    "  first {} at {:.3} s: {}",
                    v.kind,
                    v.at_ms as f64 / 1000.0,
                    v.detail
                );
                if with_traces {
                    let _ = writeln!(o, "    last {} events:", v.trace.len());
                    for e in &v.trace {
                        let _ = writeln!(o, "    {e}");
                    }
                }
            }
            let _ = writeln!(o, "  replay: {}", self.replay());
        }
        o
    }
}

/// One row of the side-by-side table: every seed of a scenario on one pool.
#[derive(Debug, Default)]
pub struct Row {
    pub runs: u64,
    pub runs_violating: u64,
    pub violations: BTreeMap<Kind, u64>,
    pub worst_over_max: u64,
    pub worst_settle_error: u64,
    pub not_settled: u64,
    pub waits: Vec<u64>,
    pub virtual_secs: f64,
    pub wall_secs: f64,
    pub violating_seeds: Vec<u64>,
}

impl Row {
    pub fn add(&mut self, r: &RunReport) {
        self.runs += 1;
        if r.total_violations() > 0 {
            self.runs_violating += 1;
            self.violating_seeds.push(r.seed);
        }
        for (k, n) in &r.violations {
            *self.violations.entry(*k).or_insert(0) += n;
        }
        self.worst_over_max = self.worst_over_max.max(r.worst_over_max);
        self.worst_settle_error = self.worst_settle_error.max(r.settle_error);
        if r.settled_after.is_none() {
            self.not_settled += 1;
        }
        self.waits.extend_from_slice(&r.stats.acquire_waits_ms);
        self.virtual_secs += r.virtual_secs;
        self.wall_secs += r.wall_secs;
    }
}

/// The table: one line per (scenario, pool).
pub fn table(rows: &BTreeMap<(String, PoolKind), Row>, order: &[String]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "| scenario | pool | runs | runs with violations | violations (episodes, by kind) | worst overshoot (live − max) | runs not settled (worst abs(live − target)) | p99 acquire wait | sim-h / wall-s |"
    );
    let _ = writeln!(o, "|---|---|---:|---:|---|---:|---:|---:|---:|");
    for name in order {
        for kind in [PoolKind::Naive, PoolKind::Ours] {
            let Some(row) = rows.get(&(name.clone(), kind)) else {
                continue;
            };
            let total: u64 = row.violations.values().sum();
            let kinds = if row.violations.is_empty() {
                "0".to_string()
            } else {
                let list: Vec<String> = row
                    .violations
                    .iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect();
                format!("{total}: {}", list.join(", "))
            };
            let mut waits = row.waits.clone();
            let _ = writeln!(
                o,
                "| {name} | {} | {} | {} | {kinds} | {} | {} ({}) | {} ms | {:.2} |",
                kind.as_str(),
                row.runs,
                row.runs_violating,
                row.worst_over_max,
                row.not_settled,
                row.worst_settle_error,
                quantile(&mut waits, 0.99),
                row.virtual_secs / 3600.0 / row.wall_secs.max(1e-9)
            );
        }
    }
    o
}
