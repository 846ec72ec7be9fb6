//! `report DIR` renders from a results directory laid out as `cargo repro`
//! writes it — `runs.json`, `<system>-r<round>.json` (loadgen's result) and
//! `<system>-r<round>.hlog` (its HdrHistogram interval log, written here with
//! hdrhistogram's own serializer) — and still renders, saying what is missing,
//! when a round's files are not there.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, SystemTime};

use hdrhistogram::Histogram;
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::serialization::interval_log::IntervalLogWriterBuilder;
use reports::report::RunNotes;
use reports::repro::index::{RoundEntry, RunIndex, SCHEMA, SystemEntry, round_file};
use reports::results::MemoryBase;

/// One system of the synthetic run: its latency scale (every latency of its
/// log is a multiple of it), its CPU seconds per round and offered rate.
struct Sys {
    name: &'static str,
    latency_ms: f64,
    cpu_seconds: &'static [f64],
    offered: f64,
    delivered: f64,
}

const SYSTEMS: [Sys; 3] = [
    Sys {
        name: "sttproxy",
        latency_ms: 1.0,
        cpu_seconds: &[2.0, 3.0, 4.0],
        offered: 3000.0,
        delivered: 3000.0,
    },
    Sys {
        name: "nginx",
        latency_ms: 2.0,
        cpu_seconds: &[5.0, 6.0, 9.0],
        offered: 3000.0,
        delivered: 2900.0,
    },
    Sys {
        name: "python",
        latency_ms: 10.0,
        cpu_seconds: &[20.0, 30.0, 25.0],
        offered: 3000.0,
        delivered: 1500.0,
    },
];

const SECONDS: u64 = 10;

/// A loadgen `--json` result with the keys the report reads.
fn result_json(sys: &Sys, cpu_seconds: f64) -> String {
    let received = (sys.delivered * SECONDS as f64) as u64;
    let timeline: Vec<serde_json::Value> = (1..=SECONDS)
        .map(|t| {
            serde_json::json!({"t": t as f64, "sent": sys.offered as u64,
                "received": sys.delivered as u64, "p99_ms": sys.latency_ms * 99.0})
        })
        .collect();
    let samples: Vec<serde_json::Value> = (1..=SECONDS)
        .map(|t| serde_json::json!({"t": t as f64, "cpu_cores": cpu_seconds / SECONDS as f64, "rss_mb": 40.0}))
        .collect();
    serde_json::json!({
        "schema_version": 2,
        "scenario": {"sessions": 30, "rate": 100.0, "size": 1024, "duration_s": SECONDS as f64, "mode": "echo"},
        "sessions": {"target": 30, "connected": 30, "failed": 0, "completed": 30},
        "messages": {"scheduled": received, "sent": received, "received": received, "lost": 0},
        "throughput": {"offered_per_s": sys.offered, "achieved_per_s": sys.delivered,
                       "sent_per_s": sys.offered, "window_s": SECONDS as f64},
        "latency_ms": {"p50": sys.latency_ms * 50.0, "p90": sys.latency_ms * 90.0,
                       "p99": sys.latency_ms * 99.0, "p999": sys.latency_ms * 99.9,
                       "max": sys.latency_ms * 100.0, "count": received},
        "watched": [{"pid": 1, "name": sys.name, "found": true, "processes": 1,
                     "cpu_seconds": cpu_seconds, "cpu_cores_avg": cpu_seconds / SECONDS as f64,
                     "rss_avg_mb": 40.0, "rss_peak_mb": 50.0, "samples": samples}],
        "machine": {"cpu_seconds": cpu_seconds * 2.0, "cpu_cores_avg": 0.5},
        "timeline": timeline,
    })
    .to_string()
}

/// An interval log as loadgen writes it: one histogram a second, µs. Latencies
/// are 1..=100 × the system's scale, uniformly, so its p50 is ≈ 50 × scale.
fn write_hlog(path: &Path, sys: &Sys) {
    let mut out = Vec::new();
    let mut ser = V2DeflateSerializer::new();
    {
        let mut builder = IntervalLogWriterBuilder::new();
        builder
            .add_comment("synthetic, as loadgen writes it")
            .with_start_time(SystemTime::UNIX_EPOCH)
            .with_base_time(SystemTime::UNIX_EPOCH)
            .with_max_value_divisor(1000.0);
        let mut writer = builder.begin_log_with(&mut out, &mut ser).unwrap();
        for second in 0..SECONDS {
            let mut h = Histogram::<u64>::new(3).unwrap();
            for i in 1..=100u64 {
                h.record_n((i as f64 * sys.latency_ms * 1000.0) as u64, 10)
                    .unwrap();
            }
            writer
                .write_histogram(
                    &h,
                    Duration::from_secs(second),
                    Duration::from_secs(1),
                    None,
                )
                .unwrap();
        }
    }
    std::fs::write(path, out).unwrap();
}

/// Write the whole results directory: every system, three rounds, every file.
fn write_run(dir: &Path) {
    let mut entries = Vec::new();
    for sys in &SYSTEMS {
        let mut runs = Vec::new();
        for (i, cpu) in sys.cpu_seconds.iter().enumerate() {
            let round = i + 1;
            std::fs::write(
                dir.join(round_file(sys.name, round, "json")),
                result_json(sys, *cpu),
            )
            .unwrap();
            write_hlog(&dir.join(round_file(sys.name, round, "hlog")), sys);
            runs.push(RoundEntry {
                round,
                position: i,
                json: round_file(sys.name, round, "json"),
                idle_rss_mb: Some(20.0),
                pool: None,
            });
        }
        entries.push(SystemEntry {
            name: sys.name.into(),
            memory: MemoryBase {
                no_backends_mb: Some(10.0),
                warm_pool_mb: Some(20.0),
            },
            runs,
        });
    }
    let index = RunIndex {
        schema: SCHEMA,
        notes: RunNotes {
            scenario: "synthetic".into(),
            command: "cargo repro --rounds 3".into(),
            rounds: 3,
            orders: vec![],
            skipped: vec![],
            notes: vec![],
            missing: vec![],
        },
        systems: entries,
    };
    index.save(dir).unwrap();
}

/// The text elements of an SVG plotters drew, trimmed.
fn texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            let body = t.split_once('>')?.1;
            Some(body.split("</text>").next()?.trim().to_string())
        })
        .collect()
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

#[test]
fn every_chart_is_drawn_from_the_recorded_results_with_every_system() {
    let dir = tempfile::tempdir().unwrap();
    write_run(dir.path());
    reports::repro::rerender(dir.path()).unwrap();

    for chart in [
        "latency_percentiles",
        "throughput",
        "cpu_per_msg",
        "reference",
    ] {
        for ext in ["svg", "png"] {
            let file = dir.path().join(format!("{chart}.{ext}"));
            assert!(file.exists(), "{} was not drawn", file.display());
        }
    }
    let percentiles = read(dir.path(), "latency_percentiles.svg");
    for sys in &SYSTEMS {
        assert!(percentiles.contains(sys.name), "{} has no curve", sys.name);
    }
    let ticks = texts(&percentiles);
    for label in ["50%", "90%", "99%", "99.9%"] {
        assert!(
            ticks.iter().any(|t| t == label),
            "no {label} tick: {ticks:?}"
        );
    }
    let throughput = read(dir.path(), "throughput.svg");
    for sys in &SYSTEMS {
        for series in ["offered", "delivered"] {
            let name = format!("{} {series}", sys.name);
            assert!(throughput.contains(&name), "no series {name}");
        }
    }
    let cpu = read(dir.path(), "cpu_per_msg.svg");
    for sys in &SYSTEMS {
        assert!(cpu.contains(sys.name), "{} has no CPU bar", sys.name);
    }
    // Cores and MB each on their own panel and axis.
    let reference = texts(&read(dir.path(), "reference.svg"));
    for text in ["cores", "MB", "CPU", "Memory", "sttproxy (this run)"] {
        assert!(
            reference.iter().any(|t| t == text),
            "reference chart lacks {text}: {reference:?}"
        );
    }
    assert!(!reference.iter().any(|t| t.contains("cores / MB")));

    let html = read(dir.path(), "report.html");
    assert!(
        html.contains(&percentiles),
        "the SVG is inline in report.html"
    );
    let md = read(dir.path(), "report.md");
    assert!(md.contains("![latency_percentiles](latency_percentiles.png)"));
    assert!(!md.contains("Missing results"), "{md}");
}

/// The curves are the logs' figures: p50 of 1..=100 × scale is 50 × scale.
#[test]
fn latency_curves_carry_each_systems_logged_percentiles() {
    let dir = tempfile::tempdir().unwrap();
    write_run(dir.path());
    let (systems, missing) = RunIndex::load(dir.path()).unwrap().systems(dir.path());
    assert!(missing.is_empty(), "{missing:?}");
    let (curves, missing) = reports::report::latency_curves(dir.path(), &systems);
    assert!(missing.is_empty(), "{missing:?}");
    let names: Vec<&str> = curves.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["sttproxy", "nginx", "python"]);
    for (curve, sys) in curves.iter().zip(&SYSTEMS) {
        let p50 = curve.points.iter().find(|p| (p.0 - 2.0).abs() < 1e-9);
        let p50 = p50.map(|p| p.1).unwrap_or(f64::NAN);
        let want = 50.0 * sys.latency_ms;
        assert!((p50 / want - 1.0).abs() < 0.01, "{}: p50 {p50}", sys.name);
        let max = curve.points.iter().map(|p| p.1).fold(0.0, f64::max);
        assert!((max / (100.0 * sys.latency_ms) - 1.0).abs() < 0.01);
    }
    let throughput = reports::report::throughput_series(&systems);
    let offered = throughput
        .iter()
        .find(|s| s.name == "python offered")
        .unwrap();
    assert!(offered.dashed);
    assert!(offered.points.iter().all(|p| p.1 == 3000.0));
    let delivered = throughput
        .iter()
        .find(|s| s.name == "python delivered")
        .unwrap();
    assert!(delivered.points.iter().all(|p| p.1 == 1500.0));
}

#[test]
fn missing_files_are_reported_and_the_rest_still_renders() {
    let dir = tempfile::tempdir().unwrap();
    write_run(dir.path());
    // nginx's round 2 log and python's round 2 result are gone; sttproxy has
    // no result at all.
    std::fs::remove_file(dir.path().join("nginx-r2.hlog")).unwrap();
    std::fs::remove_file(dir.path().join("python-r2.json")).unwrap();
    for round in 1..=3 {
        std::fs::remove_file(dir.path().join(round_file("sttproxy", round, "json"))).unwrap();
    }
    reports::repro::rerender(dir.path()).unwrap();

    let md = read(dir.path(), "report.md");
    let missing = md
        .split("## Missing results")
        .nth(1)
        .unwrap_or_else(|| panic!("no missing section: {md}"));
    let missing = missing.split("## Summary").next().unwrap_or_default();
    assert!(
        missing.contains("latency log of nginx round 2"),
        "{missing}"
    );
    assert!(missing.contains("result of python round 2"), "{missing}");
    assert!(
        missing.contains("sttproxy: no round's result could be read"),
        "{missing}"
    );
    // nginx keeps a curve from its two other logs; python's two rounds left.
    let percentiles = read(dir.path(), "latency_percentiles.svg");
    assert!(percentiles.contains("nginx") && percentiles.contains("python"));
    assert!(!percentiles.contains("sttproxy"));
    let summary = md.split("## Summary").nth(1).unwrap_or_default();
    assert!(
        summary.contains("| python (saturated in 2 of 2) | 2 |"),
        "{summary}"
    );
}
