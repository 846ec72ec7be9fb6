//! The report: charts, `report.md`, `report.html` (SVGs inline) and
//! `summary.json`, from the rounds of the systems measured under one load:
//! medians and ranges over the rounds, and same-round ratios.

use std::fmt::Write as _;
use std::path::Path;

use loadgen::Host;
use serde::{Deserialize, Serialize};

use crate::charts::{self, Bar, BarChart, LineChart, Panels, PercentileChart, Series};
use crate::hlog;
use crate::repro::index::round_file;
use crate::results::{Figure, Summary, SystemRounds, SystemRun, SystemSummary, WatchSample};
use crate::stats::{self, Spread};

/// Figures the reference write-up published (a Go rewrite of a Python proxy).
/// Quoted for comparison; measured on other hardware (12 cores).
#[derive(Debug, Clone, Copy)]
pub struct Reference {
    pub name: &'static str,
    pub what: &'static str,
    pub cpu_cores_low: f64,
    pub cpu_cores_high: f64,
    pub rss_avg_mb: Option<f64>,
    pub rss_peak_mb: Option<f64>,
}

pub const REFERENCES: [Reference; 2] = [
    Reference {
        name: "Go (reference write-up)",
        what: "3,000 sessions × 100 msg/s × 1 KiB (≈300k msg/s) to 3 echo servers; 4–5 % of 12 cores; ≈60 MB average, ≈150 MB peak",
        cpu_cores_low: 0.48,
        cpu_cores_high: 0.60,
        rss_avg_mb: Some(60.0),
        rss_peak_mb: Some(150.0),
    },
    Reference {
        name: "Python (reference write-up, production)",
        what: "FastAPI + asyncio + websockets under Gunicorn in production: 12 cores × 40–50 %, ≈25 GB",
        cpu_cores_low: 4.8,
        cpu_cores_high: 6.0,
        rss_avg_mb: Some(25_000.0),
        rss_peak_mb: None,
    },
];

/// The machine the results were measured on, as loadgen recorded it in each
/// result (not the machine the report is rendered on): that of the first
/// result that has one.
pub fn recorded_machine(systems: &[SystemRounds]) -> Option<Host> {
    systems
        .iter()
        .flat_map(|s| &s.runs)
        .map(|r| &r.result.host)
        .find(|h| h.cores > 0)
        .cloned()
}

/// The report's machine line.
fn machine_line(machine: Option<&Host>) -> String {
    match machine {
        Some(m) => format!(
            "Machine (recorded by loadgen): {} cores, {}, {:.1} GiB memory, kernel {} ({}), host {}.",
            m.cores, m.cpu_model, m.memory_gib, m.kernel, m.os, m.hostname
        ),
        None => "Machine: not recorded (results written before loadgen recorded its host).".into(),
    }
}

/// What the report says about the run besides the measured figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunNotes {
    pub scenario: String,
    pub command: String,
    /// Rounds asked for (a system that failed a round has fewer).
    pub rounds: usize,
    /// Per round, the systems in the order they were measured.
    pub orders: Vec<Vec<String>>,
    /// Systems that were not measured, with why (e.g. nginx not installed).
    pub skipped: Vec<String>,
    pub notes: Vec<String>,
    /// Results that should be there and are not (a round's JSON or latency
    /// log missing or unreadable), found when the report was rendered. The
    /// report says so instead of failing or silently leaving a gap.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
}

#[derive(Serialize)]
struct SummaryFile<'a> {
    machine: Option<&'a Host>,
    notes: &'a RunNotes,
    systems: &'a [SystemSummary],
    ratios: &'a [Ratio],
}

/// A figure of one system compared with another's, round by round.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub ours: String,
    pub theirs: String,
    pub figure: &'static str,
    /// `(round, ours / theirs)` for every round both were measured in.
    pub per_round: Vec<(usize, f64)>,
    pub spread: Spread,
}

/// The figures compared as same-round ratios. The two memory figures are
/// compared only where both systems have the same kind (nginx has no warm
/// pool, the Python baseline no figure without one), so no ratio mixes them.
const RATIO_FIGURES: [(&str, Figure); 4] = [
    ("CPU µs per delivered message (own)", |s| {
        Some(s.cpu_us_per_msg)
    }),
    ("p99 latency", |s| Some(s.p99_ms)),
    ("KiB/session incl. backend connections", |s| {
        s.kib_per_session_incl_backends
    }),
    ("KiB/session above warm pool", |s| {
        s.kib_per_session_above_warm_pool
    }),
];

/// Same-round ratios of the first system (sttproxy) to each other one: each
/// round's ratio, then their median and range. Within a round both ran on the
/// same state of the machine, so its drift between rounds stays out.
pub fn ratios(summaries: &[SystemSummary]) -> Vec<Ratio> {
    let Some((ours, others)) = summaries.split_first() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for theirs in others {
        for (figure, f) in RATIO_FIGURES {
            let per_round = stats::same_round_ratios(&ours.by_round(f), &theirs.by_round(f));
            if let Some(spread) = Spread::of(per_round.iter().map(|r| r.1)) {
                out.push(Ratio {
                    ours: ours.system.clone(),
                    theirs: theirs.system.clone(),
                    figure,
                    per_round,
                    spread,
                });
            }
        }
    }
    out
}

/// A spread as `median (min–max)`, or `–` where there is no figure.
fn fmt_spread(s: Option<Spread>, digits: usize) -> String {
    s.map_or_else(|| "–".to_string(), |s| s.display(digits))
}

/// A spread's median only, or `–`.
fn fmt_median(s: Option<Spread>, digits: usize) -> String {
    s.map_or_else(|| "–".to_string(), |s| format!("{:.digits$}", s.median))
}

/// The summary table (Markdown): medians over the rounds, with the range for
/// the figures the comparison rests on.
pub fn summary_table(summaries: &[SystemSummary]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| system | rounds | sessions | offered msg/s | achieved msg/s | lost | unsent | p50 ms | p99 ms | p99.9 ms | send lag p99 ms | CPU cores | CPU µs/msg (own) | CPU µs/msg (machine) | RSS avg MB | RSS peak MB | KiB/session incl. backend conns | KiB/session above warm pool |"
    );
    let _ = writeln!(
        t,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for s in summaries {
        let saturated = match s.saturated_rounds {
            0 => String::new(),
            n => format!(" (saturated in {n} of {})", s.rounds),
        };
        let _ = writeln!(
            t,
            "| {}{saturated} | {} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.system,
            s.rounds,
            fmt_median(s.sessions_connected, 0),
            s.sessions_target,
            fmt_median(s.offered_per_s, 0),
            fmt_spread(s.achieved_per_s, 0),
            fmt_median(s.lost, 0),
            fmt_median(s.unsent, 0),
            fmt_median(s.p50_ms, 2),
            fmt_spread(s.p99_ms, 2),
            fmt_median(s.p999_ms, 2),
            fmt_median(s.send_lag_p99_ms, 2),
            fmt_median(s.cpu_cores, 3),
            fmt_spread(s.cpu_us_per_msg, 2),
            fmt_median(s.machine_cpu_us_per_msg, 2),
            fmt_median(s.rss_avg_mb, 1),
            fmt_median(s.rss_peak_mb, 1),
            fmt_spread(s.kib_per_session_incl_backends, 1),
            fmt_spread(s.kib_per_session_above_warm_pool, 1),
        );
    }
    t
}

/// A ratio with two decimals, or three below 0.1 (so a small ratio does not
/// print as 0.00).
fn fmt_ratio(v: f64) -> String {
    if v.abs() < 0.1 {
        format!("{v:.3}")
    } else {
        format!("{v:.2}")
    }
}

/// The ratios as a Markdown list, each with its rounds.
fn ratio_lines(ratios: &[Ratio], rounds: usize) -> String {
    let mut t = String::new();
    for r in ratios {
        let per_round: Vec<String> = r
            .per_round
            .iter()
            .map(|(round, v)| format!("r{round} {}×", fmt_ratio(*v)))
            .collect();
        let of = if r.spread.n == rounds {
            String::new()
        } else {
            format!("; {} of {rounds} rounds", r.spread.n)
        };
        let _ = writeln!(
            t,
            "- {}/{}, {}: **{}×** ({}–{}×{of}; {})",
            r.ours,
            r.theirs,
            r.figure,
            fmt_ratio(r.spread.median),
            fmt_ratio(r.spread.min),
            fmt_ratio(r.spread.max),
            per_round.join(", ")
        );
    }
    t
}

/// Every round's headline figures, so a reader can see what the medians and
/// ranges were made of.
fn rounds_table(summaries: &[SystemSummary]) -> String {
    let mut rows: Vec<&Summary> = summaries.iter().flat_map(|s| &s.per_round).collect();
    rows.sort_by_key(|s| (s.round, s.position));
    let mut t = String::from(
        "| round | position | system | achieved msg/s | p99 ms | CPU µs/msg (own) | KiB/session incl. backend conns | KiB/session above warm pool |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    let opt = |v: Option<f64>| v.map_or_else(|| "–".to_string(), |v| format!("{v:.1}"));
    for s in rows {
        let _ = writeln!(
            t,
            "| {} | {} | {}{} | {:.0} | {:.2} | {:.2} | {} | {} |",
            s.round,
            s.position + 1,
            s.system,
            if s.saturated { " (saturated)" } else { "" },
            s.achieved_per_s,
            s.p99_ms,
            s.cpu_us_per_msg,
            opt(s.kib_per_session_incl_backends),
            opt(s.kib_per_session_above_warm_pool),
        );
    }
    t
}

/// Sessions a second per system and, for sttproxy, what its pool did: leases
/// a second, the share served by an already-open connection, connections
/// opened per lease and the acquire wait. Empty when no round has pool figures.
fn pool_table(summaries: &[SystemSummary]) -> String {
    if summaries.iter().all(|s| s.pool_leases_per_s.is_none()) {
        return String::new();
    }
    let mut t = String::from(
        "| system | sessions/s (loadgen) | leases/s (pool) | reuse share | connections opened per lease | acquire wait p50 ms | acquire wait p99 ms |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for s in summaries {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} |",
            s.system,
            fmt_spread(s.sessions_per_s, 1),
            fmt_spread(s.pool_leases_per_s, 1),
            fmt_spread(s.pool_reuse_share, 3),
            fmt_spread(s.pool_opened_per_lease, 3),
            fmt_spread(s.acquire_wait_p50_ms, 3),
            fmt_spread(s.acquire_wait_p99_ms, 3),
        );
    }
    t
}

const POOL_NOTE: &str = "Leases/s: sttproxy's leases (`sttproxy_acquire_total`) over the arrival window, \
     from /metrics scraped before and after each round. Reuse share: leases served by an already-open \
     connection (idle in the pool, or released by another session while waiting) / all leases; connections \
     opened per lease: backend connections opened during the round (Δ live + Δ discarded) / leases. Acquire wait: \
     from the `sttproxy_acquire_wait_seconds` histogram (bounds 0.1 ms × 4ᵏ), interpolated inside a bucket.";

/// The memory bases each system's per-session figures are computed from.
fn memory_lines(summaries: &[SystemSummary]) -> String {
    let mut t = String::new();
    for s in summaries {
        let mut parts = Vec::new();
        if let Some(b) = s.memory.no_backends_mb {
            parts.push(format!("{b:.1} MB holding no backend connection"));
        }
        if let Some(w) = s.memory.warm_pool_mb {
            parts.push(format!("{w:.1} MB idle with its warm pool open"));
        }
        if !parts.is_empty() {
            let _ = writeln!(t, "- {}: {}", s.system, parts.join("; "));
        }
    }
    t
}

fn saturation_notes(systems: &[SystemRounds]) -> String {
    let mut t = String::new();
    for run in systems.iter().flat_map(|s| &s.runs) {
        let s = run.summary();
        if !s.saturated {
            continue;
        }
        let peak = run
            .result
            .timeline
            .iter()
            .map(|e| e.received)
            .max()
            .unwrap_or(0);
        let _ = writeln!(
            t,
            "- **{}** (round {}) could not hold the offered load: {:.0} of {:.0} msg/s achieved on average (best second: {} msg/s), {} of {} sessions connected, {} messages lost, errors: {:?}.",
            s.system,
            s.round,
            s.achieved_per_s,
            s.offered_per_s,
            peak,
            s.sessions_connected,
            s.sessions_target,
            s.lost,
            run.result.errors
        );
    }
    t
}

/// A time series of the median round's run of each system.
fn over_time(
    systems: &[SystemRounds],
    title: &str,
    y_label: &str,
    points: fn(&SystemRun) -> Vec<(f64, f64)>,
) -> LineChart {
    LineChart {
        title: format!("{title} (each system's median round by CPU µs/msg)"),
        x_label: "seconds".into(),
        y_label: y_label.into(),
        series: systems
            .iter()
            .filter_map(|s| Some(Series::line(s.name.clone(), points(s.median_run()?))))
            .collect(),
    }
}

/// The server's samples of one watched figure.
fn watched(run: &SystemRun, f: fn(&WatchSample) -> f64) -> Vec<(f64, f64)> {
    run.result
        .watched
        .first()
        .map(|w| w.samples.iter().map(|s| (s.t, f(s))).collect())
        .unwrap_or_default()
}

/// A bar per system and category at the median over rounds, whiskers min–max.
fn spread_bars(
    summaries: &[SystemSummary],
    figures: &[fn(&SystemSummary) -> Option<Spread>],
) -> Vec<(String, Vec<Option<Bar>>)> {
    summaries
        .iter()
        .map(|s| {
            let bars = figures
                .iter()
                .map(|f| f(s).as_ref().map(Bar::spread))
                .collect();
            (s.system.clone(), bars)
        })
        .collect()
}

/// Delivered messages a second of each system's median round (solid), and
/// the rate it was offered (dashed, same colour): a system that could not
/// keep up shows as a solid line below its dashed one.
pub fn throughput_series(systems: &[SystemRounds]) -> Vec<Series> {
    let mut out = Vec::new();
    for s in systems {
        let Some(run) = s.median_run() else {
            continue;
        };
        let delivered: Vec<(f64, f64)> = run
            .result
            .timeline
            .iter()
            .map(|e| (e.t, e.received as f64))
            .collect();
        let offered = run.result.throughput.offered_per_s;
        let end = delivered
            .last()
            .map_or(run.result.throughput.window_s, |p| p.0);
        out.push(Series::line(format!("{} delivered", s.name), delivered));
        if offered > 0.0 && end > 0.0 {
            out.push(Series::dashed(
                format!("{} offered", s.name),
                vec![(0.0, offered), (end, offered)],
            ));
        }
    }
    out
}

fn throughput_chart(systems: &[SystemRounds]) -> LineChart {
    LineChart {
        title: "Offered (dashed) and delivered messages per second (median round by CPU µs/msg)"
            .into(),
        x_label: "seconds".into(),
        y_label: "msg/s".into(),
        series: throughput_series(systems),
    }
}

/// One latency-by-percentile curve per system, from the interval logs
/// (`<system>-r<round>.hlog` in `dir`) of all its rounds merged; and what could
/// not be read, one line per log. A system none of whose logs could be read
/// has no curve.
pub fn latency_curves(dir: &Path, systems: &[SystemRounds]) -> (Vec<Series>, Vec<String>) {
    let mut curves = Vec::new();
    let mut missing = Vec::new();
    for s in systems {
        let mut merged: Option<hdrhistogram::Histogram<u64>> = None;
        for run in &s.runs {
            let file = round_file(&s.name, run.round, "hlog");
            match hlog::load(&dir.join(&file)) {
                Ok(h) => match merged.as_mut() {
                    None => merged = Some(h),
                    Some(m) => {
                        if let Err(e) = m.add(&h) {
                            missing.push(format!("{file}: cannot be merged: {e:?}"));
                        }
                    }
                },
                Err(e) => missing.push(format!(
                    "latency log of {} round {}: {e}; the percentile curve leaves it out",
                    s.name, run.round
                )),
            }
        }
        let points = merged.as_ref().map(hlog::curve).unwrap_or_default();
        if !points.is_empty() {
            curves.push(Series::line(s.name.clone(), points));
        }
    }
    (curves, missing)
}

/// Our medians beside the reference write-up's quoted figures, a panel per
/// unit (cores; MB), each with its own log axis: one shared axis for cores and
/// MB would put 0.5 cores next to 60 MB as if they were comparable.
pub fn reference_chart(summaries: &[SystemSummary]) -> Panels {
    let mut cpu: Vec<(String, Vec<Option<Bar>>)> = REFERENCES
        .iter()
        .map(|r| {
            (
                r.name.to_string(),
                vec![Some(Bar::point((r.cpu_cores_low + r.cpu_cores_high) / 2.0))],
            )
        })
        .collect();
    let mut mem: Vec<(String, Vec<Option<Bar>>)> = REFERENCES
        .iter()
        .map(|r| {
            (
                r.name.to_string(),
                vec![r.rss_avg_mb.map(Bar::point), r.rss_peak_mb.map(Bar::point)],
            )
        })
        .collect();
    for (name, bars) in spread_bars(summaries, &[|s| s.cpu_cores]) {
        cpu.push((format!("{name} (this run)"), bars));
    }
    for (name, bars) in spread_bars(summaries, &[|s| s.rss_avg_mb, |s| s.rss_peak_mb]) {
        mem.push((format!("{name} (this run)"), bars));
    }
    Panels {
        title: "Against the reference write-up's quoted figures (log scales; ours: median, whiskers min–max)"
            .into(),
        panels: vec![
            BarChart {
                title: "CPU".into(),
                y_label: "cores".into(),
                categories: vec!["CPU (cores)".into()],
                groups: cpu,
                log_y: true,
            },
            BarChart {
                title: "Memory".into(),
                y_label: "MB".into(),
                categories: vec!["RSS average".into(), "RSS peak".into()],
                groups: mem,
                log_y: true,
            },
        ],
    }
}

/// Draw every chart into `dir`; returns (name, SVG text) in report order.
fn charts(
    dir: &Path,
    systems: &[SystemRounds],
    summaries: &[SystemSummary],
    rounds: usize,
    curves: Vec<Series>,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut svgs: Vec<(String, String)> = Vec::new();
    let cpu_per_msg = BarChart {
        title: format!("CPU µs per delivered message: median of {rounds} rounds, whiskers min–max"),
        y_label: "µs".into(),
        categories: vec!["own process tree".into(), "whole machine".into()],
        groups: spread_bars(
            summaries,
            &[|s| s.cpu_us_per_msg, |s| s.machine_cpu_us_per_msg],
        ),
        log_y: false,
    };
    let cpu = over_time(systems, "Server CPU (cores) over time", "cores", |r| {
        watched(r, |s| s.cpu_cores)
    });
    let rss = over_time(systems, "Server RSS (MB) over time", "MB", |r| {
        watched(r, |s| s.rss_mb)
    });
    let throughput = throughput_chart(systems);
    let percentile_curve = PercentileChart {
        title: "Latency by percentile (ms, from intended send; every round's log merged)".into(),
        series: curves,
    };
    // Seconds with nothing received have no p99 (loadgen writes 0): left out.
    let p99_over_time = over_time(systems, "p99 latency per second (ms)", "ms", |r| {
        r.result
            .timeline
            .iter()
            .filter(|e| e.received > 0)
            .map(|e| (e.t, e.p99_ms))
            .collect()
    });
    let percentiles: [fn(&crate::results::Latency) -> f64; 5] =
        [|l| l.p50, |l| l.p90, |l| l.p99, |l| l.p999, |l| l.max];
    let latency = BarChart {
        title: format!(
            "Latency (ms, log; from intended send): median of {rounds} rounds, whiskers min–max"
        ),
        y_label: "ms".into(),
        categories: ["p50", "p90", "p99", "p99.9", "max"]
            .map(String::from)
            .to_vec(),
        groups: systems
            .iter()
            .map(|s| {
                let bars = percentiles
                    .iter()
                    .map(|p| {
                        Spread::of(s.runs.iter().map(|r| p(&r.result.latency_ms)))
                            .as_ref()
                            .map(Bar::spread)
                    })
                    .collect();
                (s.name.clone(), bars)
            })
            .collect(),
        log_y: true,
    };
    let memory = BarChart {
        title: format!("KiB per session: median of {rounds} rounds, whiskers min–max"),
        y_label: "KiB".into(),
        categories: vec!["incl. backend connections".into(), "above warm pool".into()],
        groups: spread_bars(
            summaries,
            &[
                |s| s.kib_per_session_incl_backends,
                |s| s.kib_per_session_above_warm_pool,
            ],
        ),
        log_y: false,
    };
    let reference = reference_chart(summaries);
    svgs.push((
        "cpu_per_msg".into(),
        charts::render(&cpu_per_msg, dir, "cpu_per_msg")?,
    ));
    svgs.push(("cpu".into(), charts::render(&cpu, dir, "cpu")?));
    svgs.push(("rss".into(), charts::render(&rss, dir, "rss")?));
    svgs.push((
        "throughput".into(),
        charts::render(&throughput, dir, "throughput")?,
    ));
    svgs.push(("latency".into(), charts::render(&latency, dir, "latency")?));
    svgs.push((
        "latency_percentiles".into(),
        charts::render(&percentile_curve, dir, "latency_percentiles")?,
    ));
    svgs.push((
        "p99_over_time".into(),
        charts::render(&p99_over_time, dir, "p99_over_time")?,
    ));
    svgs.push(("memory".into(), charts::render(&memory, dir, "memory")?));
    svgs.push((
        "reference".into(),
        charts::render(&reference, dir, "reference")?,
    ));
    Ok(svgs)
}

/// What the columns mean; the memory columns exactly, since two different
/// bases make two different figures.
const COLUMN_NOTE: &str = "Each cell is the median over the rounds; where a range follows in parentheses it is the \
     min–max over the rounds. Lost: sent but never received back; unsent: scheduled but never sent (slots before \
     a late connect, every slot of a session that could not connect, or a backpressured socket); neither is in the \
     latency percentiles, which are from each message's intended send time. Send lag p99: how late the load \
     generator itself sent, the part of the latency that is not the server's. CPU µs/msg (own): the server's CPU time (its whole process tree) per delivered \
     round-trip message. CPU µs/msg (machine): the whole machine's busy CPU per delivered message — backends, \
     load generator, the other (idle) systems and the kernel's loopback TCP work (softirq time no process is \
     charged for) included. KiB/session incl. backend conns: (average RSS under load − RSS holding no backend \
     connection) / connected sessions, so it includes the sessions' share of the backend connections: for \
     sttproxy the base is its RSS when started on an empty backend table, before its 3 backends were added \
     (its whole warm pool is counted in); for nginx the base is its idle RSS (it opens one backend connection \
     per session, so its figure includes them); the Python baseline opens its pools at start, so it has no such \
     figure. KiB/session above warm pool: (average RSS under load − idle RSS with the warm pool open) / \
     connected sessions, for sttproxy and the Python baseline; nginx has no pool. Both bases are measured once, \
     after start and before round 1 (process tree, once the RSS settled).";

/// Write every chart and the report files into `dir`. Returns the Markdown.
pub fn write(dir: &Path, systems: &[SystemRounds], notes: &RunNotes) -> anyhow::Result<String> {
    let machine = recorded_machine(systems);
    let machine = machine.as_ref();
    charts::register_font()?;
    let summaries: Vec<SystemSummary> = systems.iter().filter_map(SystemSummary::of).collect();
    let ratios = ratios(&summaries);
    let (curves, missing_logs) = latency_curves(dir, systems);
    let svgs = charts(dir, systems, &summaries, notes.rounds, curves)?;
    let mut missing = notes.missing.clone();
    missing.extend(missing_logs);
    for s in systems.iter().filter(|s| s.runs.is_empty()) {
        missing.push(format!(
            "{}: no round's result could be read; it is in no table or chart",
            s.name
        ));
    }

    let mut md = String::new();
    let _ = writeln!(md, "# sttproxy reproduction report\n");
    let _ = writeln!(md, "Scenario: {}  ", notes.scenario);
    let _ = writeln!(md, "Command: `{}`  ", notes.command);
    let orders: Vec<String> = notes
        .orders
        .iter()
        .enumerate()
        .map(|(r, o)| format!("r{} {}", r + 1, o.join(" → ")))
        .collect();
    let _ = writeln!(
        md,
        "Rounds: {}; in each, every system was measured once under the same load, in an order rotated from round \
         to round ({}).\n",
        notes.rounds,
        orders.join("; ")
    );
    let _ = writeln!(md, "{}\n", machine_line(machine));
    if !missing.is_empty() {
        let _ = writeln!(
            md,
            "## Missing results\n\nThe report is drawn from what could be read; these are left out:\n"
        );
        for m in &missing {
            let _ = writeln!(md, "- {m}");
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(md, "## Summary\n\n{}", summary_table(&summaries));
    let _ = writeln!(md, "{COLUMN_NOTE}\n");
    let mem = memory_lines(&summaries);
    if !mem.is_empty() {
        let _ = writeln!(md, "Memory bases (RSS before round 1):\n\n{mem}");
    }
    if !ratios.is_empty() {
        let _ = writeln!(
            md,
            "## Ratios (same round, median of {})\n\nEach round's ratio of the two systems measured in it, then the median and (min–max) of those ratios.\n\n{}",
            notes.rounds,
            ratio_lines(&ratios, notes.rounds)
        );
    }
    let pool = pool_table(&summaries);
    if !pool.is_empty() {
        let _ = writeln!(md, "## Sessions and the pool\n\n{pool}\n{POOL_NOTE}\n");
    }
    let sat = saturation_notes(systems);
    if !sat.is_empty() {
        let _ = writeln!(md, "## What could not be held\n\n{sat}");
    }
    let _ = writeln!(md, "## Reference figures (quoted, other hardware)\n");
    for r in &REFERENCES {
        let _ = writeln!(md, "- **{}**: {}", r.name, r.what);
    }
    let _ = writeln!(md);
    let _ = writeln!(md, "## Rounds\n\n{}", rounds_table(&summaries));
    if !notes.skipped.is_empty() || !notes.notes.is_empty() {
        let _ = writeln!(md, "## Notes\n");
        for s in &notes.skipped {
            let _ = writeln!(md, "- skipped: {s}");
        }
        for n in &notes.notes {
            let _ = writeln!(md, "- {n}");
        }
        let _ = writeln!(md);
    }
    for run in systems.iter().flat_map(|s| &s.runs) {
        if !run.result.warnings.is_empty() {
            let _ = writeln!(
                md,
                "Load generator warnings for {} (round {}): {:?}\n",
                run.name, run.round, run.result.warnings
            );
        }
    }
    let _ = writeln!(md, "## Charts\n");
    for (name, _) in &svgs {
        let _ = writeln!(md, "![{name}]({name}.png)\n");
    }
    std::fs::write(dir.join("report.md"), &md)?;

    let mut html = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>sttproxy reproduction report</title>\
         <style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}\
         td,th{border:1px solid #ccc;padding:4px 6px;font-size:13px}</style></head><body>",
    );
    html.push_str(&markdown_to_html(
        md.split("## Charts").next().unwrap_or_default(),
    ));
    html.push_str("<h2>Charts</h2>");
    for (_, svg) in &svgs {
        html.push_str(svg);
    }
    html.push_str("</body></html>\n");
    std::fs::write(dir.join("report.html"), html)?;
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(&SummaryFile {
            machine,
            notes,
            systems: &summaries,
            ratios: &ratios,
        })?,
    )?;
    Ok(md)
}

/// The report's Markdown as HTML (CommonMark plus tables), by pulldown-cmark:
/// code spans, emphasis and escaping as any Markdown reader shows them. Raw
/// HTML in the text (a log line, an error message) is shown as text, never
/// interpreted.
fn markdown_to_html(md: &str) -> String {
    use pulldown_cmark::Event;
    let parser =
        pulldown_cmark::Parser::new_ext(md, pulldown_cmark::Options::ENABLE_TABLES).map(|event| {
            match event {
                Event::Html(raw) | Event::InlineHtml(raw) => Event::Text(raw),
                other => other,
            }
        });
    let mut out = String::new();
    pulldown_cmark::html::push_html(&mut out, parser);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_renders_code_tables_and_escapes() {
        let html = markdown_to_html(
            "Command: `cargo repro --quick`  \nMachine: a <b> & c\n\n| a | b |\n|---|---|\n| **1** | 2 |\n",
        );
        assert!(html.contains("<code>cargo repro --quick</code>"), "{html}");
        assert!(html.contains("a &lt;b&gt; &amp; c"), "{html}");
        assert!(html.contains("<table>"), "{html}");
        assert!(html.contains("<strong>1</strong>"), "{html}");
        assert!(!html.contains('`'), "{html}");
    }
    use crate::results::MemoryBase;
    use crate::results::testing::{result, run};

    /// `name` measured in `rounds` rounds, with `cpu_seconds[r]` of CPU in
    /// round r + 1 (300,000 messages delivered each).
    fn system(name: &str, memory: MemoryBase, cpu_seconds: &[f64]) -> SystemSummary {
        let rounds = SystemRounds {
            name: name.into(),
            runs: cpu_seconds
                .iter()
                .enumerate()
                .map(|(r, &cpu)| run(name, r + 1, result(300, 300_000, cpu, 40.0), memory))
                .collect(),
        };
        match SystemSummary::of(&rounds) {
            Some(s) => s,
            None => panic!("{name} has rounds"),
        }
    }

    #[test]
    fn ratios_are_taken_within_each_round_and_only_between_like_memory_figures() {
        let ours = system(
            "sttproxy",
            MemoryBase {
                no_backends_mb: Some(10.0),
                warm_pool_mb: Some(20.0),
            },
            &[2.0, 4.0, 3.0],
        );
        let nginx = system(
            "nginx",
            MemoryBase {
                no_backends_mb: Some(30.0),
                warm_pool_mb: None,
            },
            &[4.0, 4.0, 2.0],
        );
        let all = ratios(&[ours, nginx]);
        let figures: Vec<&str> = all.iter().map(|r| r.figure).collect();
        assert_eq!(
            figures,
            [
                "CPU µs per delivered message (own)",
                "p99 latency",
                "KiB/session incl. backend connections"
            ]
        );
        let cpu = &all[0];
        let per_round: Vec<(usize, String)> = cpu
            .per_round
            .iter()
            .map(|(r, v)| (*r, format!("{v:.2}")))
            .collect();
        assert_eq!(
            per_round,
            [(1, "0.50".into()), (2, "1.00".into()), (3, "1.50".into())]
        );
        assert_eq!(format!("{:.2}", cpu.spread.median), "1.00");
        // (40 − 10) vs (40 − 30) MB above each one's base, over the same sessions.
        assert_eq!(format!("{:.2}", all[2].spread.median), "3.00");
        assert!(
            ratio_lines(&all, 3).contains("**1.00×** (0.50–1.50×; r1 0.50×, r2 1.00×, r3 1.50×)")
        );
    }
}
