//! The report: charts, `report.md`, `report.html` (SVGs inline) and
//! `summary.json`, from the results of the systems measured under one load.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::charts::{self, BarChart, LineChart, Series};
use crate::results::{Summary, SystemRun};

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

/// The machine a report was made on.
#[derive(Debug, Clone, Serialize)]
pub struct MachineInfo {
    pub cores: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub os: String,
}

impl MachineInfo {
    pub fn read() -> Self {
        let mut sys = match sysinfo::System::new() {
            Ok(sys) => sys,
            Err(_) => {
                return Self {
                    cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
                    cpu_model: "unknown".into(),
                    memory_gib: 0.0,
                    kernel: "unknown".into(),
                    os: "unknown".into(),
                };
            }
        };
        sys.refresh_memory();
        sys.refresh_cpu_list(sysinfo::CpuRefreshKind::nothing());
        Self {
            cores: sys.cpus().len(),
            cpu_model: sys
                .cpus()
                .first()
                .map(|c| c.brand().trim().to_string())
                .unwrap_or_default(),
            memory_gib: sys.total_memory() as f64 / (1u64 << 30) as f64,
            kernel: sysinfo::System::kernel_version().unwrap_or_default(),
            os: sysinfo::System::long_os_version().unwrap_or_default(),
        }
    }
}

/// What the report says about the run besides the measured figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunNotes {
    pub scenario: String,
    pub command: String,
    /// Systems that were not measured, with why (e.g. nginx not installed).
    pub skipped: Vec<String>,
    pub notes: Vec<String>,
}

#[derive(Serialize)]
struct SummaryFile<'a> {
    machine: &'a MachineInfo,
    notes: &'a RunNotes,
    systems: Vec<Summary>,
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".to_string(), |v| format!("{v:.digits$}"))
}

/// The summary table (Markdown).
pub fn summary_table(summaries: &[Summary]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| system | sessions | offered msg/s | achieved msg/s | lost | p50 ms | p99 ms | p99.9 ms | CPU cores | CPU µs/msg (own) | CPU µs/msg (machine) | RSS avg MB | RSS peak MB | KiB/session |"
    );
    let _ = writeln!(
        t,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for s in summaries {
        let _ = writeln!(
            t,
            "| {}{} | {}/{} | {:.0} | {:.0} | {} | {:.2} | {:.2} | {:.2} | {:.3} | {:.2} | {} | {:.1} | {:.1} | {} |",
            s.system,
            if s.saturated { " (saturated)" } else { "" },
            s.sessions_connected,
            s.sessions_target,
            s.offered_per_s,
            s.achieved_per_s,
            s.lost,
            s.p50_ms,
            s.p99_ms,
            s.p999_ms,
            s.cpu_cores,
            s.cpu_us_per_msg,
            fmt_opt(s.machine_cpu_us_per_msg, 2),
            s.rss_avg_mb,
            s.rss_peak_mb,
            fmt_opt(s.kib_per_session, 1),
        );
    }
    t
}

/// Ratios of every other system to the first (sttproxy), measured in one run.
fn ratios(summaries: &[Summary]) -> String {
    let Some(ours) = summaries.first() else {
        return String::new();
    };
    let mut t = String::new();
    for s in &summaries[1..] {
        let _ = writeln!(
            t,
            "- {} vs {}: CPU per message {:.2}× ({:.2} vs {:.2} µs), average RSS {:.2}× ({:.1} vs {:.1} MB), p99 latency {:.2}× ({:.2} vs {:.2} ms)",
            ours.system,
            s.system,
            ours.cpu_us_per_msg / s.cpu_us_per_msg.max(1e-9),
            ours.cpu_us_per_msg,
            s.cpu_us_per_msg,
            ours.rss_avg_mb / s.rss_avg_mb.max(1e-9),
            ours.rss_avg_mb,
            s.rss_avg_mb,
            ours.p99_ms / s.p99_ms.max(1e-9),
            ours.p99_ms,
            s.p99_ms,
        );
    }
    t
}

fn saturation_notes(runs: &[SystemRun], summaries: &[Summary]) -> String {
    let mut t = String::new();
    for (run, s) in runs.iter().zip(summaries) {
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
            "- **{}** could not hold the offered load: {:.0} of {:.0} msg/s achieved on average (best second: {} msg/s), {} of {} sessions connected, {} messages lost, errors: {:?}.",
            s.system,
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

/// Write every chart and the report files into `dir`. Returns the Markdown.
pub fn write(
    dir: &Path,
    runs: &[SystemRun],
    machine: &MachineInfo,
    notes: &RunNotes,
) -> anyhow::Result<String> {
    charts::register_font()?;
    let summaries: Vec<Summary> = runs.iter().map(SystemRun::summary).collect();
    let watched = |r: &SystemRun, f: fn(&crate::results::WatchSample) -> f64| Series {
        name: r.name.clone(),
        points: r
            .result
            .watched
            .first()
            .map(|w| w.samples.iter().map(|s| (s.t, f(s))).collect())
            .unwrap_or_default(),
    };
    let mut svgs: Vec<(String, String)> = Vec::new();
    let cpu = LineChart {
        title: "Server CPU (cores) over time".into(),
        x_label: "seconds".into(),
        y_label: "cores".into(),
        series: runs.iter().map(|r| watched(r, |s| s.cpu_cores)).collect(),
    };
    svgs.push(("cpu".into(), charts::render(&cpu, dir, "cpu")?));
    let rss = LineChart {
        title: "Server RSS (MB) over time".into(),
        x_label: "seconds".into(),
        y_label: "MB".into(),
        series: runs.iter().map(|r| watched(r, |s| s.rss_mb)).collect(),
    };
    svgs.push(("rss".into(), charts::render(&rss, dir, "rss")?));
    let throughput = LineChart {
        title: "Delivered messages per second".into(),
        x_label: "seconds".into(),
        y_label: "msg/s".into(),
        series: runs
            .iter()
            .map(|r| Series {
                name: r.name.clone(),
                points: r
                    .result
                    .timeline
                    .iter()
                    .map(|e| (e.t, e.received as f64))
                    .collect(),
            })
            .collect(),
    };
    svgs.push((
        "throughput".into(),
        charts::render(&throughput, dir, "throughput")?,
    ));
    let latency = BarChart {
        title: "Latency percentiles (ms, log scale; from intended send time)".into(),
        y_label: "ms".into(),
        categories: ["p50", "p90", "p99", "p99.9", "max"]
            .map(String::from)
            .to_vec(),
        groups: runs
            .iter()
            .map(|r| {
                let l = r.result.latency_ms;
                (
                    r.name.clone(),
                    [l.p50, l.p90, l.p99, l.p999, l.max].map(Some).to_vec(),
                )
            })
            .collect(),
        log_y: true,
    };
    svgs.push(("latency".into(), charts::render(&latency, dir, "latency")?));
    let mut ref_groups: Vec<(String, Vec<Option<f64>>)> = REFERENCES
        .iter()
        .map(|r| {
            (
                r.name.to_string(),
                vec![
                    Some((r.cpu_cores_low + r.cpu_cores_high) / 2.0),
                    r.rss_avg_mb,
                    r.rss_peak_mb,
                ],
            )
        })
        .collect();
    for s in &summaries {
        ref_groups.push((
            format!("{} (this run)", s.system),
            vec![Some(s.cpu_cores), Some(s.rss_avg_mb), Some(s.rss_peak_mb)],
        ));
    }
    let reference = BarChart {
        title: "Against the reference write-up's figures (log scale)".into(),
        y_label: "cores / MB".into(),
        categories: vec![
            "CPU (cores)".into(),
            "RSS average (MB)".into(),
            "RSS peak (MB)".into(),
        ],
        groups: ref_groups,
        log_y: true,
    };
    svgs.push((
        "reference".into(),
        charts::render(&reference, dir, "reference")?,
    ));

    let table = summary_table(&summaries);
    let mut md = String::new();
    let _ = writeln!(md, "# sttproxy reproduction report\n");
    let _ = writeln!(md, "Scenario: {}  ", notes.scenario);
    let _ = writeln!(md, "Command: `{}`\n", notes.command);
    let _ = writeln!(
        md,
        "Machine: {} cores, {}, {:.1} GiB memory, kernel {} ({}).\n",
        machine.cores, machine.cpu_model, machine.memory_gib, machine.kernel, machine.os
    );
    let _ = writeln!(md, "## Summary\n\n{table}");
    let _ = writeln!(
        md,
        "CPU µs/msg (own): the server's CPU time (its whole process tree) per delivered round-trip message. \
         CPU µs/msg (machine): the whole machine's busy CPU per delivered message — backends, load generator \
         and the kernel's loopback TCP work (softirq time no process is charged for) included. \
         KiB/session: (average RSS under load − RSS before the load) / connected sessions. \
         The systems ran one after another under the same load on the same machine; compare them as ratios.\n"
    );
    let r = ratios(&summaries);
    if !r.is_empty() {
        let _ = writeln!(md, "## Ratios (same run)\n\n{r}");
    }
    let sat = saturation_notes(runs, &summaries);
    if !sat.is_empty() {
        let _ = writeln!(md, "## What could not be held\n\n{sat}");
    }
    let _ = writeln!(md, "## Reference figures (quoted, other hardware)\n");
    for r in &REFERENCES {
        let _ = writeln!(md, "- **{}**: {}", r.name, r.what);
    }
    let _ = writeln!(md);
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
    for run in runs {
        if !run.result.warnings.is_empty() {
            let _ = writeln!(
                md,
                "Load generator warnings for {}: {:?}\n",
                run.name, run.result.warnings
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
            systems: summaries,
        })?,
    )?;
    Ok(md)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Just enough Markdown for the report's own text: headings, tables, lists, paragraphs.
fn markdown_to_html(md: &str) -> String {
    let mut out = String::new();
    let mut in_table = false;
    let mut in_list = false;
    for line in md.lines() {
        let bold = |s: &str| {
            let mut r = String::new();
            for (i, part) in escape(s).split("**").enumerate() {
                if i % 2 == 1 {
                    let _ = write!(r, "<b>{part}</b>");
                } else {
                    r.push_str(part);
                }
            }
            r
        };
        if line.starts_with('|') {
            if line.starts_with("|---") {
                continue;
            }
            if !in_table {
                out.push_str("<table>");
                in_table = true;
            }
            out.push_str("<tr>");
            for cell in line.trim_matches('|').split('|') {
                let _ = write!(out, "<td>{}</td>", bold(cell.trim()));
            }
            out.push_str("</tr>");
            continue;
        } else if in_table {
            out.push_str("</table>");
            in_table = false;
        }
        if let Some(item) = line.strip_prefix("- ") {
            if !in_list {
                out.push_str("<ul>");
                in_list = true;
            }
            let _ = write!(out, "<li>{}</li>", bold(item));
            continue;
        } else if in_list {
            out.push_str("</ul>");
            in_list = false;
        }
        if let Some(h) = line.strip_prefix("## ") {
            let _ = write!(out, "<h2>{}</h2>", escape(h));
        } else if let Some(h) = line.strip_prefix("# ") {
            let _ = write!(out, "<h1>{}</h1>", escape(h));
        } else if !line.trim().is_empty() {
            let _ = write!(out, "<p>{}</p>", bold(line.trim_end_matches("  ")));
        }
    }
    if in_table {
        out.push_str("</table>");
    }
    if in_list {
        out.push_str("</ul>");
    }
    out
}
