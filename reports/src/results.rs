//! The loadgen `--json` result (docs/architecture.md), read back for reporting, and the
//! figures a report derives from it. Only the keys the report uses are read;
//! unknown keys are ignored so loadgen may add more.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize)]
pub struct RunResult {
    pub scenario: Scenario,
    pub sessions: Sessions,
    pub messages: Messages,
    pub throughput: Throughput,
    pub latency_ms: Latency,
    #[serde(default)]
    pub errors: BTreeMap<String, u64>,
    #[serde(default)]
    pub watched: Vec<Watched>,
    #[serde(default)]
    pub machine: Option<MachineLoad>,
    #[serde(default)]
    pub loadgen: Option<LoadgenSelf>,
    #[serde(default)]
    pub timeline: Vec<TimelineEntry>,
    #[serde(default)]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Scenario {
    pub sessions: usize,
    pub rate: f64,
    pub size: usize,
    pub duration_s: f64,
    pub mode: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Sessions {
    pub target: usize,
    pub connected: usize,
    pub failed: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Messages {
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    #[serde(default)]
    pub duplicated: u64,
    #[serde(default)]
    pub out_of_order: u64,
    #[serde(default)]
    pub cross_session: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Throughput {
    pub offered_per_s: f64,
    pub achieved_per_s: f64,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Watched {
    pub pid: u32,
    #[serde(default)]
    pub name: String,
    pub cpu_seconds: f64,
    pub cpu_cores_avg: f64,
    pub rss_avg_mb: f64,
    pub rss_peak_mb: f64,
    #[serde(default)]
    pub samples: Vec<WatchSample>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct WatchSample {
    pub t: f64,
    pub cpu_cores: f64,
    pub rss_mb: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MachineLoad {
    pub cpu_seconds: f64,
    pub cpu_cores_avg: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LoadgenSelf {
    pub cpu_seconds: f64,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct TimelineEntry {
    pub t: f64,
    pub sent: u64,
    pub received: u64,
    #[serde(default)]
    pub p99_ms: f64,
}

impl RunResult {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("parsing {}: {e}", path.display()))
    }
}

/// One system measured under the same load: its name and its result.
#[derive(Debug, Clone)]
pub struct SystemRun {
    pub name: String,
    pub result: RunResult,
    /// The server's RSS (MB, its whole process tree) before the load started:
    /// what it costs with no session open.
    pub idle_rss_mb: Option<f64>,
}

/// The figures of one system's row in the summary table.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub system: String,
    pub sessions_connected: usize,
    pub sessions_target: usize,
    pub offered_per_s: f64,
    pub achieved_per_s: f64,
    pub lost: u64,
    pub cross_session: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub cpu_cores: f64,
    /// The server's own CPU per delivered (round-trip) message.
    pub cpu_us_per_msg: f64,
    /// The whole machine's busy CPU per delivered message (servers, backends,
    /// load generator and the kernel's loopback work).
    pub machine_cpu_us_per_msg: Option<f64>,
    pub rss_avg_mb: f64,
    pub rss_peak_mb: f64,
    /// (average RSS under load − idle RSS) / connected sessions.
    pub kib_per_session: Option<f64>,
    pub errors: u64,
    /// Achieved below 95 % of offered, or sessions that did not connect.
    pub saturated: bool,
}

impl SystemRun {
    pub fn summary(&self) -> Summary {
        let r = &self.result;
        let server = r.watched.first();
        let delivered = r.messages.received.max(1) as f64;
        let cpu_seconds = server.map_or(0.0, |w| w.cpu_seconds);
        let rss_avg = server.map_or(0.0, |w| w.rss_avg_mb);
        let kib_per_session = match (self.idle_rss_mb, r.sessions.connected) {
            (Some(idle), n) if n > 0 => Some(((rss_avg - idle).max(0.0) * 1024.0) / n as f64),
            _ => None,
        };
        Summary {
            system: self.name.clone(),
            sessions_connected: r.sessions.connected,
            sessions_target: r.sessions.target,
            offered_per_s: r.throughput.offered_per_s,
            achieved_per_s: r.throughput.achieved_per_s,
            lost: r.messages.lost,
            cross_session: r.messages.cross_session,
            p50_ms: r.latency_ms.p50,
            p99_ms: r.latency_ms.p99,
            p999_ms: r.latency_ms.p999,
            max_ms: r.latency_ms.max,
            cpu_cores: server.map_or(0.0, |w| w.cpu_cores_avg),
            cpu_us_per_msg: cpu_seconds * 1e6 / delivered,
            machine_cpu_us_per_msg: r.machine.as_ref().map(|m| m.cpu_seconds * 1e6 / delivered),
            rss_avg_mb: rss_avg,
            rss_peak_mb: server.map_or(0.0, |w| w.rss_peak_mb),
            kib_per_session,
            errors: r.errors.values().sum(),
            saturated: r.throughput.achieved_per_s < 0.95 * r.throughput.offered_per_s
                || r.sessions.connected < r.sessions.target,
        }
    }
}
