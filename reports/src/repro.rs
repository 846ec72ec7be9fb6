//! `cargo repro`: build, start 3 echo backends and every system — sttproxy,
//! the Python baseline, and nginx when installed — then measure them under the
//! same load for a number of rounds, the order rotated each round, and write
//! the report (medians, ranges and same-round ratios).

pub mod failover;
pub mod index;
pub mod pool_metrics;
pub mod rolling;
pub mod soak;
mod systems;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use crate::procs::{Group, Proc};
use crate::report::{self, RunNotes};
use crate::results::SystemRounds;
use crate::stats::round_order;
pub use index::{RunIndex, SCHEMA};
use systems::{Env, Running};

/// Finite sessions arriving at a steady rate (the `churn` scenarios): every
/// session is one lease of a backend connection from sttproxy's pool.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Churn {
    /// Sessions starting a second, for `window_s` seconds.
    pub arrivals_per_s: f64,
    pub window_s: u64,
    /// Lifetimes drawn uniformly from `[life_min_s, life_max_s]`.
    pub life_min_s: u64,
    pub life_max_s: u64,
    /// Seed of the lifetimes: every round and system sees the same sessions.
    pub seed: u64,
}

impl Churn {
    fn mean_life_s(&self) -> f64 {
        (self.life_min_s + self.life_max_s) as f64 / 2.0
    }
}

/// A load scenario of the reproduction.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Scenario {
    pub name: &'static str,
    /// Sessions started (with `churn`: over the arrival window, not at once).
    pub sessions: usize,
    pub rate: f64,
    pub size: usize,
    pub duration_s: u64,
    pub mode: &'static str,
    pub about: &'static str,
    pub churn: Option<Churn>,
}

impl Scenario {
    /// Sessions open at once: all of them, or with churn the steady state
    /// (arrivals a second × mean lifetime).
    pub fn concurrent(&self) -> usize {
        self.churn.map_or(self.sessions, |c| {
            (c.arrivals_per_s * c.mean_life_s()).ceil() as usize
        })
    }

    /// Sessions that can be open at once at most (file descriptors).
    pub fn peak_concurrent(&self) -> usize {
        self.churn.map_or(self.sessions, |c| {
            (c.arrivals_per_s * c.life_max_s as f64).ceil() as usize
        })
    }

    /// How long one load takes: the streaming, or with churn the arrival
    /// window plus the longest lifetime.
    pub fn load_s(&self) -> u64 {
        self.churn
            .map_or(self.duration_s, |c| c.window_s + c.life_max_s)
    }
}

pub const SCENARIOS: [Scenario; 7] = [
    Scenario {
        name: "reference",
        sessions: 3000,
        rate: 100.0,
        size: 1024,
        duration_s: 60,
        mode: "echo",
        about: "the reference write-up's test: 3,000 sessions, no ramp, 100 msg/s of 1 KiB each, 60 s",
        churn: None,
    },
    Scenario {
        name: "quick",
        sessions: 300,
        rate: 100.0,
        size: 1024,
        duration_s: 10,
        mode: "echo",
        about: "a 10-second, 300-session version of the reference test",
        churn: None,
    },
    Scenario {
        name: "seed",
        sessions: 3000,
        rate: 10.0,
        size: 1024,
        duration_s: 60,
        mode: "echo",
        about: "3,000 sessions × 10 msg/s × 1 KiB: a load every system here can carry",
        churn: None,
    },
    Scenario {
        name: "stt",
        sessions: 1000,
        rate: 50.0,
        size: 640,
        duration_s: 30,
        mode: "stt",
        about: "1,000 sessions streaming 20 ms PCM chunks (50/s) to GPU-like stt backends (shared inference slots, partials, finals at pauses)",
        churn: None,
    },
    Scenario {
        name: "idle-3000",
        sessions: 3000,
        rate: 0.2,
        size: 1024,
        duration_s: 30,
        mode: "echo",
        about: "3,000 mostly idle sessions (one message per 5 s): memory per session",
        churn: None,
    },
    Scenario {
        name: "churn",
        sessions: 15_000,
        rate: 10.0,
        size: 640,
        duration_s: 30,
        mode: "echo",
        about: "finite sessions: 250 a second for 60 s, each living 3–30 s (uniform, seed 1), 10 msg/s × 640 B: \
                250 leases a second through the pool",
        churn: Some(Churn {
            arrivals_per_s: 250.0,
            window_s: 60,
            life_min_s: 3,
            life_max_s: 30,
            seed: 1,
        }),
    },
    Scenario {
        name: "churn-quick",
        sessions: 5_000,
        rate: 10.0,
        size: 640,
        duration_s: 12,
        mode: "echo",
        about: "a shorter churn: 250 sessions a second for 20 s, each living 3–12 s (uniform, seed 1), \
                10 msg/s × 640 B",
        churn: Some(Churn {
            arrivals_per_s: 250.0,
            window_s: 20,
            life_min_s: 3,
            life_max_s: 12,
            seed: 1,
        }),
    },
];

pub fn scenario(name: &str) -> anyhow::Result<Scenario> {
    SCENARIOS
        .iter()
        .find(|s| s.name == name)
        .copied()
        .with_context(|| {
            let names: Vec<_> = SCENARIOS.iter().map(|s| s.name).collect();
            format!("unknown scenario {name:?}; known: {names:?}")
        })
}

/// What `repro` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub scenario: Scenario,
    /// Rounds of measurement (at least 1): every system once per round.
    pub rounds: usize,
    pub out: Option<PathBuf>,
    /// Skip `cargo build` (binaries already built).
    pub no_build: bool,
    pub command: String,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { root.join(p) })
        .unwrap_or_else(|| root.join("target"))
}

/// UTC `YYYYMMDD-HHMMSS` now: the default report directory's name.
fn timestamp() -> String {
    let (y, mo, d, h, mi, s) = loadgen::host::utc_parts(std::time::SystemTime::now());
    format!("{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}")
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The Python baseline's virtualenv being prepared (mostly downloads; its log
/// in `out/venv.err`), or why its preparation could not start.
type VenvPrep = Result<Proc, String>;

/// Wait for the virtualenv: `Err` says why the baseline is skipped.
fn venv_ready(prep: VenvPrep) -> Result<(), String> {
    let mut child = prep?;
    match child.wait(Duration::from_secs(900)) {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(format!(
            "preparing its virtualenv failed ({status}); see venv.err"
        )),
        Err(e) => Err(format!("preparing its virtualenv: {e:#}")),
    }
}

/// Build the release binaries (unless `no_build`) while the Python baseline's
/// virtualenv is prepared alongside; the preparation is waited for only when
/// the baseline is started (a failure there skips the baseline, not the run).
fn build(root: &Path, out: &Path, no_build: bool) -> anyhow::Result<VenvPrep> {
    let mut venv_cmd = Command::new("bash");
    venv_cmd
        .arg(root.join("baseline/python/run.sh"))
        .env("BASELINE_PREPARE_ONLY", "1");
    let venv = Proc::spawn("venv", venv_cmd, out);
    if !no_build {
        cargo_build_release(root)?;
    }
    Ok(venv.map_err(|e| format!("starting baseline/python/run.sh: {e:#}")))
}

/// echo-backend's settings in the `stt` mode, a GPU-like inference server
/// (docs/protocol.md, "The echo-backend's stt mode"): 1,024 inference slots
/// shared by the process with a FIFO queue (1,000 sessions × 50 chunks/s over
/// 3 backends ≈ 17,000 inferences/s each × 35 ms ≈ 600 busy slots), a partial
/// per 20 ms of audio (one per loadgen chunk, so loadgen's per-chunk
/// accounting holds), finals at pauses every 2–8 s of audio, a 10-minute
/// session limit (not reached), 503 above 4,096 connections and 429 above a
/// 2 s queue (both only when saturated), no errors and no dial delay (plain
/// proxies dial per session and would pay it per session, which is not what
/// the scenario compares). Backend `i` is seeded with `i`.
pub const STT_BACKEND_ARGS: &[&str] = &[
    "--slots",
    "1024",
    "--partial-every-ms",
    "20",
    "--utterance-ms",
    "2000",
    "8000",
    "--session-time-limit-ms",
    "600000",
    "--max-connections",
    "4096",
    "--max-queue-ms",
    "2000",
];

/// The arguments of backend `i` for a scenario `mode` ("echo" or "stt"),
/// listening on `listen` (`127.0.0.1:0`: a port of its choice).
fn backend_args(mode: &str, i: usize, listen: &str) -> Vec<String> {
    let mut args: Vec<String> = ["--listen", listen, "--mode", mode]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
    if mode == "stt" {
        args.extend(STT_BACKEND_ARGS.iter().map(|a| (*a).to_owned()));
        args.extend(["--seed".to_owned(), i.to_string()]);
    }
    args
}

/// Start the 3 echo backends; returns them and their URLs.
fn start_backends(bin: &Path, out: &Path, mode: &str) -> anyhow::Result<(Vec<Proc>, Vec<String>)> {
    let mut backends = Vec::new();
    let mut urls = Vec::new();
    for i in 0..3 {
        let mut cmd = Command::new(bin.join("echo-backend"));
        cmd.args(backend_args(mode, i, "127.0.0.1:0"));
        let mut b = Proc::spawn(&format!("echo-backend-{i}"), cmd, out)?;
        urls.push(b.ready_line("echo-backend listening on ", Duration::from_secs(10))?);
        backends.push(b);
    }
    Ok((backends, urls))
}

/// Start every system, sttproxy first (without it there is nothing to
/// report); a baseline that cannot start is noted as skipped.
fn start_systems(env: &Env, venv: VenvPrep, notes: &mut RunNotes) -> anyhow::Result<Vec<Running>> {
    let mut systems = vec![env.start_sttproxy().context("starting sttproxy")?];
    let target = env.sttproxy_target();
    notes.notes.push(format!(
        "sttproxy started on an empty backend table (a fresh sttproxy.db), then its {} backends were added with \
         `sttproxy backends add` (target {target}, max {} connections each)",
        env.backend_urls.len(),
        target * 2
    ));
    match venv_ready(venv)
        .map_err(anyhow::Error::msg)
        .and_then(|()| env.start_python())
    {
        Ok(r) => systems.push(r),
        Err(e) => notes.skipped.push(format!("python baseline: {e:#}")),
    }
    match find_in_path("nginx") {
        Some(nginx) => match env.start_nginx(&nginx) {
            Ok(r) => systems.push(r),
            Err(e) => notes.skipped.push(format!("nginx: {e:#}")),
        },
        None => notes
            .skipped
            .push("nginx: not installed (apt-get install nginx to measure it too)".into()),
    }
    Ok(systems)
}

/// Measure every system once per round, the order rotated each round (see
/// [`round_order`]). A failed measurement is noted and the rounds go on, so
/// one bad round does not throw away the others.
fn measure_rounds(
    env: &Env,
    systems: &[Running],
    rounds: usize,
    notes: &mut RunNotes,
) -> Vec<SystemRounds> {
    let mut measured: Vec<SystemRounds> = systems
        .iter()
        .map(|s| SystemRounds {
            name: s.name.to_string(),
            runs: Vec::new(),
        })
        .collect();
    for r in 0..rounds {
        let order = round_order(systems.len(), r);
        notes
            .orders
            .push(order.iter().map(|&i| systems[i].name.to_string()).collect());
        for (position, &i) in order.iter().enumerate() {
            match env.load(&systems[i], r + 1, position) {
                Ok(run) => measured[i].runs.push(run),
                Err(e) => {
                    notes
                        .skipped
                        .push(format!("{} in round {}: {e:#}", systems[i].name, r + 1))
                }
            }
        }
    }
    measured
}

/// Run the soak (see [`soak`]): build unless told not to, then sttproxy
/// alone for `duration`; returns the report directory.
pub fn run_soak(
    out: Option<PathBuf>,
    no_build: bool,
    duration: Duration,
    command: String,
) -> anyhow::Result<PathBuf> {
    let (bin, out) = prepare(out, "soak", no_build)?;
    soak::run(&bin, &out, duration, command)
}

/// For a scenario of its own (soak, failover): the report directory (`out`,
/// or `reports/out/<prefix>-<UTC timestamp>`) created, the release binaries
/// built unless `no_build`, the open-files limit raised; returns the
/// binaries' directory and the report directory.
fn prepare(
    out: Option<PathBuf>,
    prefix: &str,
    no_build: bool,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let root = workspace_root();
    let out = out.unwrap_or_else(|| {
        root.join("reports/out")
            .join(format!("{prefix}-{}", timestamp()))
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    if !no_build {
        cargo_build_release(&root)?;
    }
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    Ok((target_dir(&root).join("release"), out))
}

/// Run the failover scenario (see [`failover`]): build unless told not to,
/// then sttproxy and nginx in turn across a backend kill; returns the report
/// directory.
pub fn run_failover(
    out: Option<PathBuf>,
    no_build: bool,
    plan: failover::FailoverPlan,
    command: String,
) -> anyhow::Result<PathBuf> {
    let (bin, out) = prepare(out, "failover", no_build)?;
    failover::run(&bin, &out, plan, command)
}

fn cargo_build_release(root: &Path) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("repro: building the release binaries ...");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root).args([
        "build",
        "--release",
        "-p",
        "echo-backend",
        "-p",
        "sttproxy",
        "-p",
        "loadgen",
    ]);
    let status = Group::spawn("cargo build", cmd)?.wait(Duration::from_secs(3600))?;
    if !status.success() {
        bail!("cargo build failed ({status})");
    }
    Ok(())
}

/// Run the whole reproduction; returns the report directory.
pub fn run(opts: &Options) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let out = match &opts.out {
        Some(o) => o.clone(),
        None => root.join("reports/out").join(timestamp()),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let venv = build(&root, &out, opts.no_build)?;
    let fd = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    let mut notes = RunNotes {
        scenario: format!("{} — {}", opts.scenario.name, opts.scenario.about),
        command: opts.command.clone(),
        rounds: opts.rounds,
        ..RunNotes::default()
    };
    let s = opts.scenario;
    // Per system: the proxy holds 2 sockets a session, loadgen 1, the backends 1.
    let need = s.peak_concurrent() as u64 * 2 + 256;
    if fd < need {
        notes.notes.push(format!(
            "file descriptor limit {fd} is below the ≈{need} this scenario needs per process; expect refused sessions"
        ));
    }
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let bin = target_dir(&root).join("release");
    if s.mode == "stt" {
        notes.notes.push(format!(
            "the backends are echo-backend in stt mode with {} (and --seed 0, 1, 2)",
            STT_BACKEND_ARGS.join(" ")
        ));
    }
    let (backends, urls) = start_backends(&bin, &out, s.mode)?;
    let env = Env {
        bin,
        out: out.clone(),
        scenario: s,
        backend_urls: urls,
        workers,
        backend_reuse: None,
    };
    let systems = start_systems(&env, venv, &mut notes)?;
    let measured = measure_rounds(&env, &systems, opts.rounds, &mut notes);
    let started = systems.len();
    for sys in systems {
        sys.stop();
    }
    for mut b in backends {
        b.stop(Duration::from_secs(5));
    }
    if measured.first().is_none_or(|m| m.runs.is_empty()) {
        bail!(
            "sttproxy was not measured in any round: {}",
            notes.skipped.join("; ")
        );
    }
    notes.notes.push(format!(
        "all {started} systems were started before round 1 and kept running until the last round ended; while one \
         was measured the others sat idle, holding their backend connections"
    ));
    notes.notes.push(format!(
        "loopback only; the load generator, 3 echo backends and the systems share this machine's {workers} cores"
    ));
    RunIndex::new(&notes, &measured).save(&out)?;
    let md = report::write(&out, &measured, &notes)?;
    if let Some(summary) = md.split("## Summary").nth(1) {
        println!(
            "{}",
            summary
                .split("## Reference")
                .next()
                .unwrap_or_default()
                .trim()
        );
    }
    Ok(out)
}

/// Re-render the report of an earlier run from its `runs.json`.
pub fn rerender(dir: &Path) -> anyhow::Result<()> {
    let index = RunIndex::load(dir)?;
    let (systems, missing) = index.systems(dir);
    let mut notes = index.notes;
    notes.missing.extend(missing);
    report::write(dir, &systems, &notes)?;
    Ok(())
}
