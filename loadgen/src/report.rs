//! The result of a run — the `--json` format, defined here once for loadgen and the
//! reports that read it (docs/results-schema.md) — and the human summary printed by
//! `--format text`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Mode;

/// The version of the `--json` result format written by this loadgen. Readers
/// accept older files (every field has a default) and say when a file is
/// newer than they know. 2: schema_version, tool, started_at, host; churn
/// (lifetime_min_s, seed, sessions_per_s); unsent includes the slots of late
/// and failed connects. 1 (no field): before.
pub const SCHEMA_VERSION: u32 = 2;

/// Everything a run measured. Serializes to the `--json` result format
/// (docs/results-schema.md); every field defaults when absent, so older results
/// still read.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LoadReport {
    /// [`SCHEMA_VERSION`] of the writer; 0 in files written before the field.
    pub schema_version: u32,
    pub tool: Tool,
    /// When the run started, UTC, RFC 3339 (`2026-12-01T22:45:00Z`).
    pub started_at: String,
    /// The machine the run was measured on.
    pub host: Host,
    pub scenario: Scenario,
    pub sessions: SessionCounts,
    pub messages: MessageCounts,
    pub throughput: Throughput,
    /// Receive time minus *intended* send time (no coordinated omission), milliseconds.
    pub latency_ms: Latency,
    /// How late the load generator itself sent (actual minus intended send time),
    /// milliseconds: the part of `latency_ms` that is the generator's own scheduling.
    pub send_lag_ms: Latency,
    /// TCP connect plus WebSocket handshake of the sessions that connected, milliseconds.
    pub connect_ms: Latency,
    /// Error kind -> count (`connect_refused`, `handshake_status_503`, `close_1011`, ...).
    pub errors: BTreeMap<String, u64>,
    pub watched: Vec<Watched>,
    pub machine: Machine,
    pub loadgen: LoadgenSelf,
    /// One entry per second of the run.
    pub timeline: Vec<TimelineEntry>,
    /// Things the operator should know (clamped options, file-descriptor limit, ...).
    pub warnings: Vec<String>,
    /// Wall-clock seconds from run start to the end of the drain.
    pub elapsed_s: f64,
    /// True when the run was stopped early (Ctrl-C or the caller's stop future).
    pub stopped_early: bool,
}

/// The program that wrote a result.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Tool {
    pub name: String,
    pub version: String,
}

impl Tool {
    pub fn this() -> Self {
        Self {
            name: env!("CARGO_PKG_NAME").to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// The machine a run was measured on (from /proc and /etc/os-release; a field
/// that cannot be read is empty or 0).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Host {
    pub hostname: String,
    /// Cores the scheduler offers (available parallelism).
    pub cores: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub os: String,
}

/// What was asked for (after clamping: these are the values that ran).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Scenario {
    pub sessions: usize,
    /// Messages per second and session.
    pub rate: f64,
    /// Bytes per message.
    pub size: usize,
    /// How long each session streams; with `lifetime_min_s`, the longest.
    pub duration_s: f64,
    pub mode: Mode,
    pub urls: Vec<String>,
    /// Session starts spread over this long (`sessions / ramp_s` arrivals a second).
    pub ramp_s: f64,
    /// Churn: lifetimes drawn uniformly from `[lifetime_min_s, duration_s]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime_min_s: Option<f64>,
    /// Seed of the lifetimes (with `lifetime_min_s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    pub connect_timeout_s: f64,
    pub drain_timeout_s: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SessionCounts {
    pub target: usize,
    /// Sessions whose WebSocket handshake succeeded.
    pub connected: usize,
    /// Sessions that could not connect (see `errors` for why).
    pub failed: usize,
    /// Connected sessions that ended cleanly (`session.ended` or a 1000 Close in the drain).
    pub completed: usize,
    /// Connected sessions that ended any other way (closed mid-stream, drain timeout, ...).
    pub aborted: usize,
    /// Sessions never attempted because the run was stopped first.
    pub not_started: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MessageCounts {
    /// Data messages (echo) or audio chunks (stt) handed to the socket.
    pub sent: u64,
    /// Distinct data messages (stt: partials) received back on their own session.
    pub received: u64,
    /// `sent - received` once every session has drained.
    pub lost: u64,
    /// Of `lost`, lost in sessions that ended cleanly (`session.ended` received, or a
    /// 1000 Close in the drain): a relay that loses nothing keeps this at 0 even while
    /// sessions on a failed backend lose their in-flight messages.
    pub lost_completed: u64,
    /// Data messages whose sequence number had already been received.
    pub duplicated: u64,
    /// First arrivals with a sequence number below the highest already seen.
    pub out_of_order: u64,
    /// Data messages that belong to another session.
    pub cross_session: u64,
    /// Messages the schedule called for.
    pub scheduled: u64,
    /// Scheduled messages never sent because the socket stayed backpressured until the
    /// session's end (not in `sent`, not in `lost`).
    pub unsent: u64,
    /// stt mode: `final` results received.
    pub finals: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Throughput {
    /// Messages a second the schedule calls for: sessions × rate; with churn
    /// (sessions come and go), the scheduled messages / window_s.
    pub offered_per_s: f64,
    /// received / window_s.
    pub achieved_per_s: f64,
    /// sent / window_s.
    pub sent_per_s: f64,
    /// Seconds the rates are over: the duration (with churn: ramp + longest
    /// lifetime), or the time to an early stop.
    pub window_s: f64,
    /// Sessions connected a second over the arrival window (the ramp; the
    /// duration without one): with churn, the leases a proxy hands out a second.
    #[serde(default)]
    pub sessions_per_s: f64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
    /// Number of values behind these figures.
    pub count: u64,
}

/// One watched process tree (the pid and all its descendants).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Watched {
    pub pid: u32,
    pub name: String,
    /// False when the pid was never seen.
    pub found: bool,
    /// Processes in the tree at the last sample.
    pub processes: usize,
    /// utime + stime over the run, summed over the tree.
    pub cpu_seconds: f64,
    pub cpu_cores_avg: f64,
    /// Average of the sampled VmRSS sums, MiB.
    pub rss_avg_mb: f64,
    /// Highest VmHWM sum seen, MiB (peak over each process's life).
    pub rss_peak_mb: f64,
    pub samples: Vec<WatchSample>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct WatchSample {
    /// Seconds since run start.
    pub t: f64,
    pub cpu_cores: f64,
    pub rss_mb: f64,
}

/// The whole machine's busy CPU (everything but idle and iowait, softirq included).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Machine {
    pub cpu_seconds: f64,
    pub cpu_cores_avg: f64,
    pub samples: Vec<MachineSample>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MachineSample {
    pub t: f64,
    pub cpu_cores: f64,
}

/// The load generator's own cost.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LoadgenSelf {
    /// CPU seconds of this process over the run (/proc/self/stat). In-process callers
    /// (tests) include whatever else runs in their process.
    pub cpu_seconds: f64,
    /// `cpu_seconds` per message sent, µs (each message is one send and one receive).
    pub cpu_us_per_msg: f64,
    /// Sender/receiver tasks the sessions were spread over.
    pub shards: usize,
    /// Soft and hard open-files limits during the run.
    pub fd_soft_limit: u64,
    pub fd_hard_limit: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TimelineEntry {
    /// End of the one-second interval, seconds since run start.
    pub t: f64,
    pub sent: u64,
    pub received: u64,
    /// Sessions that ended other than cleanly in the interval (closed by the server
    /// with a code other than 1000, reset, drain timeout, ...).
    pub aborted: u64,
    /// 0 when nothing was received in the interval.
    pub p99_ms: f64,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.scenario;
        writeln!(
            f,
            "loadgen: {} sessions x {} msg/s x {} B for {}s ({}){}",
            s.sessions,
            s.rate,
            s.size,
            s.duration_s,
            match s.mode {
                Mode::Echo => "echo",
                Mode::Stt => "stt",
            },
            if self.stopped_early {
                ", STOPPED EARLY"
            } else {
                ""
            }
        )?;
        if let Some(min) = s.lifetime_min_s {
            writeln!(
                f,
                "  churn:      lifetimes {min}..{} s (seed {}), {:.1} arrivals/s over {} s",
                s.duration_s,
                s.seed.unwrap_or_default(),
                s.sessions as f64 / s.ramp_s.max(1e-9),
                s.ramp_s
            )?;
        }
        writeln!(f, "  urls:       {}", s.urls.join(" "))?;
        let c = &self.sessions;
        writeln!(
            f,
            "  sessions:   {} connected of {}, {} failed, {} completed, {} aborted{}",
            c.connected,
            c.target,
            c.failed,
            c.completed,
            c.aborted,
            if c.not_started > 0 {
                format!(", {} not started", c.not_started)
            } else {
                String::new()
            }
        )?;
        let m = &self.messages;
        writeln!(
            f,
            "  messages:   sent {} received {} lost {} duplicated {} out-of-order {} cross-session {} unsent {}",
            m.sent, m.received, m.lost, m.duplicated, m.out_of_order, m.cross_session, m.unsent
        )?;
        if s.mode == Mode::Stt {
            writeln!(f, "  finals:     {}", m.finals)?;
        }
        writeln!(
            f,
            "  throughput: offered {:.0}/s achieved {:.0}/s (sent {:.0}/s), sessions {:.1}/s",
            self.throughput.offered_per_s,
            self.throughput.achieved_per_s,
            self.throughput.sent_per_s,
            self.throughput.sessions_per_s
        )?;
        let l = &self.latency_ms;
        writeln!(
            f,
            "  latency ms: p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3} max {:.3} (from intended send time)",
            l.p50, l.p90, l.p99, l.p999, l.max
        )?;
        let g = &self.send_lag_ms;
        writeln!(
            f,
            "  send lag:   p50 {:.3} p99 {:.3} max {:.3} ms (generator's own lateness)",
            g.p50, g.p99, g.max
        )?;
        let c = &self.connect_ms;
        writeln!(
            f,
            "  connect:    p50 {:.3} p99 {:.3} max {:.3} ms (TCP + handshake)",
            c.p50, c.p99, c.max
        )?;
        if self.errors.is_empty() {
            writeln!(f, "  errors:     none")?;
        } else {
            let e: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            writeln!(f, "  errors:     {}", e.join(" "))?;
        }
        for w in &self.watched {
            if w.found {
                writeln!(
                    f,
                    "  watched:    pid {} ({}, {} processes): cpu {:.2} s = {:.3} cores avg, rss avg {:.1} MiB, peak {:.1} MiB",
                    w.pid,
                    w.name,
                    w.processes,
                    w.cpu_seconds,
                    w.cpu_cores_avg,
                    w.rss_avg_mb,
                    w.rss_peak_mb
                )?;
            } else {
                writeln!(f, "  watched:    pid {} not found", w.pid)?;
            }
        }
        writeln!(
            f,
            "  machine:    cpu {:.2} s = {:.3} cores avg (all processes + softirq)",
            self.machine.cpu_seconds, self.machine.cpu_cores_avg
        )?;
        writeln!(
            f,
            "  loadgen:    cpu {:.2} s, {:.2} us/msg, {} shards",
            self.loadgen.cpu_seconds, self.loadgen.cpu_us_per_msg, self.loadgen.shards
        )?;
        for w in &self.warnings {
            writeln!(f, "  warning:    {w}")?;
        }
        Ok(())
    }
}
