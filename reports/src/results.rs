//! The loadgen `--json` result (docs/architecture.md), read back for reporting, and the
//! figures a report derives from it. Only the keys the report uses are read;
//! unknown keys are ignored so loadgen may add more.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::repro::pool_metrics::PoolRound;
use crate::stats::{self, Spread};

/// One loadgen result: the type loadgen writes, read back (one definition of
/// the format; docs/results-schema.md).
pub use loadgen::LoadReport as RunResult;
pub use loadgen::{Latency, WatchSample};

/// Read a loadgen `--json` result. Older results read (missing fields take
/// their defaults); a result newer than this build's loadgen is an error, not a
/// silently half-read file.
pub fn load_result(path: &Path) -> anyhow::Result<RunResult> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let r: RunResult = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("parsing {}: {e}", path.display()))?;
    if r.schema_version > loadgen::SCHEMA_VERSION {
        anyhow::bail!(
            "{} has result schema {} but this build reads up to {}; rebuild the reports",
            path.display(),
            r.schema_version,
            loadgen::SCHEMA_VERSION
        );
    }
    Ok(r)
}

/// A system's RSS before any load, measured once after it started (its whole
/// process tree, once the RSS has settled). The two bases make two different
/// "memory per session" figures; which a system has depends on how it holds
/// its backend connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryBase {
    /// RSS (MB) holding no backend connection: sttproxy started on an empty
    /// backend table (before its backends were added); nginx idle (it opens a
    /// backend connection per session). Above this base, a session's figure
    /// includes its share of the backend connections.
    #[serde(default)]
    pub no_backends_mb: Option<f64>,
    /// RSS (MB) idle with the warm pool of backend connections open: sttproxy
    /// once its pools reached their target; the Python baseline once ready.
    #[serde(default)]
    pub warm_pool_mb: Option<f64>,
}

/// One round of one system under the load: its name, which round, and the
/// loadgen result.
#[derive(Debug, Clone)]
pub struct SystemRun {
    pub name: String,
    /// The round, from 1.
    pub round: usize,
    /// Where in its round the system was measured (0 = first).
    pub position: usize,
    pub result: RunResult,
    /// The server's RSS (MB, process tree) right before this round's load
    /// (after earlier rounds it includes memory the allocator kept).
    pub idle_rss_mb: Option<f64>,
    pub memory: MemoryBase,
    /// sttproxy's pool during this round, from its `/metrics` (other systems
    /// have no such figures).
    pub pool: Option<PoolRound>,
}

/// Every round of one system, in round order.
#[derive(Debug, Clone)]
pub struct SystemRounds {
    pub name: String,
    pub runs: Vec<SystemRun>,
}

impl SystemRounds {
    /// The round at the median of the CPU per delivered message: the one run
    /// that charts drawing a single run per system (time series) show.
    pub fn median_run(&self) -> Option<&SystemRun> {
        let cpu: Vec<f64> = self
            .runs
            .iter()
            .map(|r| r.summary().cpu_us_per_msg)
            .collect();
        self.runs.get(stats::median_index(&cpu)?)
    }
}

/// The figures of one round of one system.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub system: String,
    pub round: usize,
    pub position: usize,
    pub sessions_connected: usize,
    pub sessions_target: usize,
    pub offered_per_s: f64,
    pub achieved_per_s: f64,
    pub lost: u64,
    /// Scheduled messages never sent (late or failed connects, backpressure).
    pub unsent: u64,
    pub cross_session: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// p99 of the generator's own lateness: the part of the latency that is
    /// not the server's.
    pub send_lag_p99_ms: f64,
    pub cpu_cores: f64,
    /// The server's own CPU per delivered (round-trip) message.
    pub cpu_us_per_msg: f64,
    /// The whole machine's busy CPU per delivered message (servers, backends,
    /// load generator and the kernel's loopback work).
    pub machine_cpu_us_per_msg: Option<f64>,
    pub rss_avg_mb: f64,
    pub rss_peak_mb: f64,
    /// (average RSS under load − RSS holding no backend connection) / connected
    /// sessions: includes the sessions' share of backend connections.
    pub kib_per_session_incl_backends: Option<f64>,
    /// (average RSS under load − idle RSS with the warm pool open) / connected
    /// sessions: what a session costs on top of an already warm pool.
    pub kib_per_session_above_warm_pool: Option<f64>,
    pub errors: u64,
    /// Achieved below 95 % of offered, or sessions that did not connect.
    pub saturated: bool,
    /// Sessions connected a second (with churn: leases a second).
    pub sessions_per_s: f64,
    /// sttproxy's pool in this round (see [`PoolRound`]).
    pub pool_leases_per_s: Option<f64>,
    pub pool_reuse_share: Option<f64>,
    /// Backend connections opened per lease.
    pub pool_opened_per_lease: Option<f64>,
    pub acquire_wait_p50_ms: Option<f64>,
    pub acquire_wait_p99_ms: Option<f64>,
}

/// KiB per connected session of the RSS above `base_mb`; `None` without a base
/// or without a connected session. Clamped at 0: a base above the average
/// (memory returned to the system during the load) is no negative cost.
fn kib_per_session(rss_avg_mb: f64, base_mb: Option<f64>, connected: usize) -> Option<f64> {
    let base = base_mb?;
    (connected > 0).then(|| (rss_avg_mb - base).max(0.0) * 1024.0 / connected as f64)
}

impl SystemRun {
    pub fn summary(&self) -> Summary {
        let r = &self.result;
        let server = r.watched.first();
        let delivered = r.messages.received.max(1) as f64;
        let cpu_seconds = server.map_or(0.0, |w| w.cpu_seconds);
        let rss_avg = server.map_or(0.0, |w| w.rss_avg_mb);
        let connected = r.sessions.connected;
        Summary {
            system: self.name.clone(),
            round: self.round,
            position: self.position,
            sessions_connected: connected,
            sessions_target: r.sessions.target,
            offered_per_s: r.throughput.offered_per_s,
            achieved_per_s: r.throughput.achieved_per_s,
            lost: r.messages.lost,
            unsent: r.messages.unsent,
            cross_session: r.messages.cross_session,
            p50_ms: r.latency_ms.p50,
            p99_ms: r.latency_ms.p99,
            p999_ms: r.latency_ms.p999,
            max_ms: r.latency_ms.max,
            send_lag_p99_ms: r.send_lag_ms.p99,
            cpu_cores: server.map_or(0.0, |w| w.cpu_cores_avg),
            cpu_us_per_msg: cpu_seconds * 1e6 / delivered,
            machine_cpu_us_per_msg: (r.machine.cpu_seconds > 0.0)
                .then(|| r.machine.cpu_seconds * 1e6 / delivered),
            rss_avg_mb: rss_avg,
            rss_peak_mb: server.map_or(0.0, |w| w.rss_peak_mb),
            kib_per_session_incl_backends: kib_per_session(
                rss_avg,
                self.memory.no_backends_mb,
                connected,
            ),
            kib_per_session_above_warm_pool: kib_per_session(
                rss_avg,
                self.memory.warm_pool_mb,
                connected,
            ),
            errors: r.errors.values().sum(),
            saturated: r.throughput.achieved_per_s < 0.95 * r.throughput.offered_per_s
                || connected < r.sessions.target,
            sessions_per_s: r.throughput.sessions_per_s,
            pool_leases_per_s: self.pool.map(|p| p.leases_per_s()),
            pool_reuse_share: self.pool.and_then(|p| p.reuse_share()),
            pool_opened_per_lease: self
                .pool
                .filter(|p| p.leases > 0)
                .map(|p| p.opened as f64 / p.leases as f64),
            acquire_wait_p50_ms: self.pool.map(|p| p.wait.p50_ms),
            acquire_wait_p99_ms: self.pool.map(|p| p.wait.p99_ms),
        }
    }
}

/// One figure of a round's summary, where the round has it.
pub type Figure = fn(&Summary) -> Option<f64>;

/// One system's row of the summary table: each figure's median and range over
/// the rounds (`None` where no round produced it).
#[derive(Debug, Clone, Serialize)]
pub struct SystemSummary {
    pub system: String,
    pub rounds: usize,
    /// Rounds in which the system could not hold the offered load.
    pub saturated_rounds: usize,
    pub sessions_target: usize,
    pub sessions_connected: Option<Spread>,
    pub offered_per_s: Option<Spread>,
    pub achieved_per_s: Option<Spread>,
    pub lost: Option<Spread>,
    pub unsent: Option<Spread>,
    pub p50_ms: Option<Spread>,
    pub p99_ms: Option<Spread>,
    pub p999_ms: Option<Spread>,
    pub send_lag_p99_ms: Option<Spread>,
    pub cpu_cores: Option<Spread>,
    pub cpu_us_per_msg: Option<Spread>,
    pub machine_cpu_us_per_msg: Option<Spread>,
    pub rss_avg_mb: Option<Spread>,
    pub rss_peak_mb: Option<Spread>,
    pub kib_per_session_incl_backends: Option<Spread>,
    pub kib_per_session_above_warm_pool: Option<Spread>,
    pub memory: MemoryBase,
    pub sessions_per_s: Option<Spread>,
    pub pool_leases_per_s: Option<Spread>,
    pub pool_reuse_share: Option<Spread>,
    pub pool_opened_per_lease: Option<Spread>,
    pub acquire_wait_p50_ms: Option<Spread>,
    pub acquire_wait_p99_ms: Option<Spread>,
    /// Every round's figures, in round order.
    pub per_round: Vec<Summary>,
}

impl SystemSummary {
    /// Aggregate the rounds of one system; `None` when it has no round.
    pub fn of(rounds: &SystemRounds) -> Option<Self> {
        let first = rounds.runs.first()?;
        let per_round: Vec<Summary> = rounds.runs.iter().map(SystemRun::summary).collect();
        let spread = |f: fn(&Summary) -> f64| Spread::of(per_round.iter().map(f));
        let spread_opt =
            |f: fn(&Summary) -> Option<f64>| Spread::of(per_round.iter().filter_map(f));
        Some(Self {
            system: rounds.name.clone(),
            rounds: per_round.len(),
            saturated_rounds: per_round.iter().filter(|s| s.saturated).count(),
            sessions_target: first.result.sessions.target,
            sessions_connected: spread(|s| s.sessions_connected as f64),
            offered_per_s: spread(|s| s.offered_per_s),
            achieved_per_s: spread(|s| s.achieved_per_s),
            lost: spread(|s| s.lost as f64),
            unsent: spread(|s| s.unsent as f64),
            p50_ms: spread(|s| s.p50_ms),
            p99_ms: spread(|s| s.p99_ms),
            p999_ms: spread(|s| s.p999_ms),
            send_lag_p99_ms: spread(|s| s.send_lag_p99_ms),
            cpu_cores: spread(|s| s.cpu_cores),
            cpu_us_per_msg: spread(|s| s.cpu_us_per_msg),
            machine_cpu_us_per_msg: spread_opt(|s| s.machine_cpu_us_per_msg),
            rss_avg_mb: spread(|s| s.rss_avg_mb),
            rss_peak_mb: spread(|s| s.rss_peak_mb),
            kib_per_session_incl_backends: spread_opt(|s| s.kib_per_session_incl_backends),
            kib_per_session_above_warm_pool: spread_opt(|s| s.kib_per_session_above_warm_pool),
            memory: first.memory,
            sessions_per_s: spread(|s| s.sessions_per_s),
            pool_leases_per_s: spread_opt(|s| s.pool_leases_per_s),
            pool_reuse_share: spread_opt(|s| s.pool_reuse_share),
            pool_opened_per_lease: spread_opt(|s| s.pool_opened_per_lease),
            acquire_wait_p50_ms: spread_opt(|s| s.acquire_wait_p50_ms),
            acquire_wait_p99_ms: spread_opt(|s| s.acquire_wait_p99_ms),
            per_round,
        })
    }

    /// `(round, value)` of one figure over this system's rounds, for
    /// same-round ratios.
    pub fn by_round(&self, f: Figure) -> Vec<(usize, f64)> {
        self.per_round
            .iter()
            .filter_map(|s| Some((s.round, f(s)?)))
            .collect()
    }
}

/// Results to test the figures derived from them with.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A loadgen result with the figures the summary reads.
    pub(crate) fn result(
        connected: usize,
        received: u64,
        cpu_seconds: f64,
        rss_avg_mb: f64,
    ) -> RunResult {
        let json = serde_json::json!({
            "scenario": {"sessions": 300, "rate": 100.0, "size": 1024, "duration_s": 10.0, "mode": "echo"},
            "sessions": {"target": 300, "connected": connected, "failed": 300 - connected},
            "messages": {"sent": received, "received": received, "lost": 0},
            "throughput": {"offered_per_s": 30000.0, "achieved_per_s": received as f64 / 10.0},
            "latency_ms": {"p50": 1.0, "p90": 2.0, "p99": 3.0, "p999": 4.0, "max": 5.0},
            "watched": [{"pid": 1, "cpu_seconds": cpu_seconds, "cpu_cores_avg": cpu_seconds / 10.0,
                         "rss_avg_mb": rss_avg_mb, "rss_peak_mb": rss_avg_mb + 1.0}],
        });
        match serde_json::from_value(json) {
            Ok(r) => r,
            Err(e) => panic!("test result does not parse: {e}"),
        }
    }

    /// One round of system `name`.
    pub(crate) fn run(
        name: &str,
        round: usize,
        result: RunResult,
        memory: MemoryBase,
    ) -> SystemRun {
        SystemRun {
            name: name.into(),
            round,
            position: 0,
            result,
            idle_rss_mb: None,
            memory,
            pool: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{result, run};
    use super::*;

    #[test]
    fn kib_per_session_needs_a_base_and_a_session_and_is_never_negative() {
        assert_eq!(kib_per_session(10.0, None, 100), None);
        assert_eq!(kib_per_session(10.0, Some(5.0), 0), None);
        assert_eq!(kib_per_session(10.0, Some(5.0), 512), Some(10.0));
        assert_eq!(kib_per_session(4.0, Some(5.0), 10), Some(0.0));
    }

    #[test]
    fn both_memory_figures_use_their_own_base() {
        let memory = MemoryBase {
            no_backends_mb: Some(10.0),
            warm_pool_mb: Some(20.0),
        };
        let s = run("sttproxy", 1, result(256, 300_000, 3.0, 30.0), memory).summary();
        // (30 − 10) MB × 1024 / 256 sessions and (30 − 20) MB × 1024 / 256.
        assert_eq!(s.kib_per_session_incl_backends, Some(80.0));
        assert_eq!(s.kib_per_session_above_warm_pool, Some(40.0));
        assert!((s.cpu_us_per_msg - 10.0).abs() < 1e-9);
    }

    #[test]
    fn system_summary_takes_medians_and_ranges_over_rounds() {
        let memory = MemoryBase {
            no_backends_mb: None,
            warm_pool_mb: Some(20.0),
        };
        let rounds = SystemRounds {
            name: "python".into(),
            runs: vec![
                run("python", 1, result(300, 300_000, 9.0, 50.0), memory),
                run("python", 2, result(300, 300_000, 3.0, 50.0), memory),
                run("python", 3, result(300, 300_000, 6.0, 50.0), memory),
            ],
        };
        let Some(s) = SystemSummary::of(&rounds) else {
            panic!("three rounds make a summary");
        };
        let cpu = s.cpu_us_per_msg.map(|c| (c.median, c.min, c.max, c.n));
        let approx = |v: Option<(f64, f64, f64, usize)>| {
            v.map(|(a, b, c, n)| ((a * 1e6).round(), (b * 1e6).round(), (c * 1e6).round(), n))
        };
        assert_eq!(approx(cpu), approx(Some((20.0, 10.0, 30.0, 3))));
        assert_eq!(s.kib_per_session_incl_backends, None);
        assert!(s.kib_per_session_above_warm_pool.is_some());
        assert_eq!(s.by_round(|x| Some(x.round as f64)).len(), 3);
        // The median round by CPU per message is round 3 (6 s of CPU).
        assert_eq!(rounds.median_run().map(|r| r.round), Some(3));
        assert_eq!(
            SystemSummary::of(&SystemRounds {
                name: "x".into(),
                runs: vec![]
            })
            .map(|s| s.rounds),
            None
        );
    }
}
