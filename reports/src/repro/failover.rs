//! `cargo repro --scenario failover [--quick]`: sessions across a backend
//! kill, for sttproxy (its backends `resumable`, docs/failover.md) and for
//! nginx in front of the same kind of backends (no failover: a killed
//! backend ends its sessions).
//!
//! Each system in turn gets 3 fresh stt echo backends on fixed ports and the
//! same bounded load from [`client`]: `sessions` sessions streaming 20 ms
//! PCM chunks at real time for `duration_s`, then `session.end`. At
//! `kill_at_s` backend 0 is SIGKILLed (as the soak does) and restarted on its
//! port `restart_after_s` later. Per second: sessions open, sessions
//! receiving results, sessions ended abnormally, `session.failover` notices;
//! per session: whether it failed over and carried on, the pause its client
//! saw (last result before the notice to the first after). Results:
//! `failover.json`, `failover.md` and the chart `failover-sessions.{png,svg}`
//! in the report directory; `repro` exits non-zero when sttproxy broke one
//! of its rules (see [`checks`]).

pub mod client;
pub mod tally;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use super::pool_metrics::Scrape;
use super::soak::verdict::{self, Check};
use super::systems::{Env, Running};
use super::{Scenario, backend_args, find_in_path};
use crate::charts::{self, LineChart, Series};
use crate::procs::{Proc, free_port};
use tally::{Second, Summary};

/// The scenario's shape: `full` by default, `quick` with `--quick`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FailoverPlan {
    pub sessions: usize,
    /// Session starts spread over this long.
    pub ramp_s: u64,
    /// Each session streams this long.
    pub duration_s: u64,
    /// Backend 0 is SIGKILLed this long after the load started ...
    pub kill_at_s: u64,
    /// ... and restarted on its port this long after the kill.
    pub restart_after_s: u64,
    pub chunk_ms: u64,
    /// How long a session waits for `session.ended` after `session.end`.
    pub drain_s: u64,
}

impl FailoverPlan {
    pub fn full() -> Self {
        Self {
            sessions: 300,
            ramp_s: 3,
            duration_s: 60,
            kill_at_s: 20,
            restart_after_s: 10,
            chunk_ms: 20,
            drain_s: 5,
        }
    }

    pub fn quick() -> Self {
        Self {
            sessions: 100,
            ramp_s: 2,
            duration_s: 20,
            kill_at_s: 8,
            restart_after_s: 5,
            ..Self::full()
        }
    }

    /// Seconds the timeline covers: every session's streaming and drain.
    fn seconds(&self) -> usize {
        (self.ramp_s + self.duration_s + self.drain_s + 2) as usize
    }

    /// The [`Scenario`] the systems are configured for (pool targets, nginx).
    fn scenario(&self) -> Scenario {
        Scenario {
            name: "failover",
            sessions: self.sessions,
            rate: 1000.0 / self.chunk_ms as f64,
            size: loadgen::proto::STT_CHUNK_BYTES,
            duration_s: self.duration_s,
            mode: "stt",
            about: "sessions across a backend kill",
            churn: None,
        }
    }
}

/// The kill (and restart) as it happened, seconds since the load started.
#[derive(Debug, Clone, Serialize)]
pub struct Kill {
    pub t: f64,
    pub port: u16,
    pub restarted_t: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct SystemResult {
    pub name: String,
    pub summary: Summary,
    pub timeline: Vec<Second>,
    pub kill: Kill,
    /// sttproxy's `sttproxy_failovers_total` by outcome after the run.
    pub proxy_failovers: Option<Vec<(String, f64)>>,
}

#[derive(Debug, Serialize)]
pub struct FailoverResult {
    pub plan: FailoverPlan,
    pub command: String,
    pub systems: Vec<SystemResult>,
    pub skipped: Vec<String>,
    pub checks: Vec<Check>,
}

/// Three stt echo backends on fixed ports, so that a killed one comes back
/// on its port.
struct Backends {
    bin: PathBuf,
    out: PathBuf,
    system: &'static str,
    ports: Vec<u16>,
    procs: Vec<Option<Proc>>,
}

impl Backends {
    fn start(bin: &Path, out: &Path, system: &'static str) -> anyhow::Result<Self> {
        let mut b = Self {
            bin: bin.to_path_buf(),
            out: out.to_path_buf(),
            system,
            ports: Vec::new(),
            procs: Vec::new(),
        };
        for i in 0..3 {
            b.ports.push(free_port()?);
            b.procs.push(None);
            b.spawn(i, "")?;
        }
        Ok(b)
    }

    fn spawn(&mut self, i: usize, suffix: &str) -> anyhow::Result<()> {
        let mut cmd = Command::new(self.bin.join("echo-backend"));
        cmd.args(backend_args(
            "stt",
            i,
            &format!("127.0.0.1:{}", self.ports[i]),
        ));
        let name = format!("echo-backend-{}-{i}{suffix}", self.system);
        let mut p = Proc::spawn(&name, cmd, &self.out)?;
        p.ready_line("echo-backend listening on ", Duration::from_secs(10))?;
        self.procs[i] = Some(p);
        Ok(())
    }

    fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("ws://127.0.0.1:{p}"))
            .collect()
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.procs[i].take() {
            p.kill();
        }
    }

    fn stop(mut self) {
        for mut p in self.procs.iter_mut().filter_map(Option::take) {
            p.stop(Duration::from_secs(5));
        }
    }
}

/// Run the scenario for every system; returns the report directory, or an
/// error naming sttproxy's broken rules (after writing the report).
pub fn run(bin: &Path, out: &Path, plan: FailoverPlan, command: String) -> anyhow::Result<PathBuf> {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut systems = Vec::new();
    let mut skipped = Vec::new();
    systems.push(measure(bin, out, plan, workers, None).context("sttproxy")?);
    match find_in_path("nginx") {
        Some(nginx) => match measure(bin, out, plan, workers, Some(&nginx)) {
            Ok(r) => systems.push(r),
            Err(e) => skipped.push(format!("nginx: {e:#}")),
        },
        None => {
            skipped.push("nginx: not installed (apt-get install nginx to measure it too)".into())
        }
    }
    let checks = checks(&plan, &systems[0]);
    let result = FailoverResult {
        plan,
        command,
        systems,
        skipped,
        checks,
    };
    let path = out.join("failover.json");
    std::fs::write(&path, serde_json::to_string_pretty(&result)?)
        .with_context(|| format!("writing {}", path.display()))?;
    charts::register_font()?;
    charts::render(&chart(&result), out, "failover-sessions")?;
    let md = render(&result);
    std::fs::write(out.join("failover.md"), &md).context("writing failover.md")?;
    println!("{md}");
    verdict::fail_on("failover", &result.checks)?;
    Ok(out.to_path_buf())
}

/// One system: fresh backends, the system, the load with the kill and the
/// restart; everything stopped before it returns.
fn measure(
    bin: &Path,
    out: &Path,
    plan: FailoverPlan,
    workers: usize,
    nginx: Option<&Path>,
) -> anyhow::Result<SystemResult> {
    let name = if nginx.is_some() { "nginx" } else { "sttproxy" };
    let mut backends = Backends::start(bin, out, name)?;
    let env = Env {
        bin: bin.to_path_buf(),
        out: out.to_path_buf(),
        scenario: plan.scenario(),
        backend_urls: backends.urls(),
        workers,
        backend_reuse: Some("resumable"),
    };
    let sys = match nginx {
        Some(path) => env.start_nginx(path),
        None => env.start_sttproxy(),
    };
    let sys = match sys {
        Ok(s) => s,
        Err(e) => {
            backends.stop();
            return Err(e);
        }
    };
    let result = drive(&sys, &mut backends, plan);
    let proxy_failovers = sys
        .admin()
        .and_then(|admin| Scrape::fetch(admin).ok())
        .map(|s| s.labelled("sttproxy_failovers_total", "outcome"));
    sys.stop();
    backends.stop();
    let (logs, kill) = result?;
    Ok(SystemResult {
        name: name.to_string(),
        summary: tally::summarize(&logs),
        timeline: tally::timeline(&logs, plan.seconds()),
        kill,
        proxy_failovers,
    })
}

/// The load on `sys`, with backend 0 killed and restarted on schedule.
fn drive(
    sys: &Running,
    backends: &mut Backends,
    plan: FailoverPlan,
) -> anyhow::Result<(Vec<tally::SessionLog>, Kill)> {
    let load = client::Load {
        url: sys.url.clone(),
        sessions: plan.sessions,
        ramp: Duration::from_secs(plan.ramp_s),
        duration: Duration::from_secs(plan.duration_s),
        chunk_every: Duration::from_millis(plan.chunk_ms),
        drain: Duration::from_secs(plan.drain_s),
        connect_timeout: Duration::from_secs(10),
    };
    eprintln!(
        "repro: failover: {}: {} sessions streaming {} ms chunks for {} s; backend 0 killed at {} s, restarted {} s later ...",
        sys.name,
        plan.sessions,
        plan.chunk_ms,
        plan.duration_s,
        plan.kill_at_s,
        plan.restart_after_s
    );
    let t0 = Instant::now();
    let clients = std::thread::Builder::new()
        .name("failover-clients".into())
        .spawn(move || client::run(load, t0))
        .context("starting the clients' thread")?;
    std::thread::sleep(
        (t0 + Duration::from_secs(plan.kill_at_s)).saturating_duration_since(Instant::now()),
    );
    backends.kill(0);
    let mut kill = Kill {
        t: t0.elapsed().as_secs_f64(),
        port: backends.ports[0],
        restarted_t: None,
    };
    let restart_at = t0 + Duration::from_secs(plan.kill_at_s + plan.restart_after_s);
    std::thread::sleep(restart_at.saturating_duration_since(Instant::now()));
    match backends.spawn(0, "-restarted") {
        Ok(()) => kill.restarted_t = Some(t0.elapsed().as_secs_f64()),
        Err(e) => eprintln!("repro: failover: restarting backend 0: {e:#}"),
    }
    // Bounded: every session has its own deadline (client::run_async).
    let logs = clients
        .join()
        .map_err(|_| anyhow::anyhow!("the clients' thread panicked"))??;
    Ok((logs, kill))
}

/// What sttproxy must show: every session either carried on or was never on
/// the killed backend (none ended), the killed backend's sessions did fail
/// over, no result repeated, none of another session.
fn checks(plan: &FailoverPlan, sttproxy: &SystemResult) -> Vec<Check> {
    let s = &sttproxy.summary;
    vec![
        Check::new(
            "every sttproxy session connected and completed cleanly",
            s.connected == plan.sessions as u64 && s.completed == plan.sessions as u64,
            format!(
                "{} started, {} connected, {} completed; ended: {:?}",
                s.started, s.connected, s.completed, s.ended_by
            ),
        ),
        Check::new(
            "the killed backend's sessions failed over and carried on",
            s.failed_over > 0 && s.failed_over_completed == s.failed_over,
            format!(
                "{} sessions got session.failover ({} notices), {} of them completed",
                s.failed_over, s.failover_notices, s.failed_over_completed
            ),
        ),
        Check::new(
            "no result repeated, none of another session",
            s.repeated == 0 && s.cross_session == 0,
            format!(
                "repeated {}, another session's {}",
                s.repeated, s.cross_session
            ),
        ),
    ]
}

fn chart(r: &FailoverResult) -> LineChart {
    let mut series: Vec<Series> = r
        .systems
        .iter()
        .map(|s| {
            Series::line(
                &s.name,
                s.timeline.iter().map(|p| (p.t, p.open as f64)).collect(),
            )
        })
        .collect();
    let top = r.plan.sessions as f64;
    if let Some(k) = r.systems.first().map(|s| &s.kill) {
        series.push(Series::dashed(
            format!("backend 0 SIGKILLed ({:.0} s)", k.t),
            vec![(k.t, 0.0), (k.t, top)],
        ));
        if let Some(t) = k.restarted_t {
            series.push(Series::dashed(
                format!("backend 0 restarted ({t:.0} s)"),
                vec![(t, 0.0), (t, top)],
            ));
        }
    }
    LineChart {
        title: format!(
            "Sessions open across a backend kill ({} sessions, 3 stt backends)",
            r.plan.sessions
        ),
        x_label: "seconds since the load started".into(),
        y_label: "sessions open".into(),
        series,
    }
}

fn render(r: &FailoverResult) -> String {
    let p = &r.plan;
    let mut s = String::new();
    let _ = writeln!(s, "# Failover\n\n`{}`\n", r.command);
    let _ = writeln!(
        s,
        "{} sessions (starts spread over {} s) streaming {} ms PCM chunks at real time for {} s each, over 3 \
         stt echo backends; backend 0 SIGKILLed {} s after the load started and restarted on its port {} s \
         later. sttproxy's backends are `resumable`; nginx has no failover.\n",
        p.sessions, p.ramp_s, p.chunk_ms, p.duration_s, p.kill_at_s, p.restart_after_s
    );
    let _ = writeln!(
        s,
        "| system | completed | ended abnormally | failed over | …and completed | pause p50 / p99 / max (ms) | \
         repeated | another session's |\n|---|---|---|---|---|---|---|---|"
    );
    for sys in &r.systems {
        let m = &sys.summary;
        let pause = m.pause_ms.map_or_else(
            || "—".to_string(),
            |p| format!("{:.0} / {:.0} / {:.0} (n={})", p.p50, p.p99, p.max, p.n),
        );
        let ended = if m.ended_by.is_empty() {
            "0".to_string()
        } else {
            format!("{} ({:?})", m.aborted + m.connect_failed, m.ended_by)
        };
        let _ = writeln!(
            s,
            "| {} | {} of {} | {} | {} | {} | {} | {} | {} |",
            sys.name,
            m.completed,
            m.started,
            ended,
            m.failed_over,
            m.failed_over_completed,
            pause,
            m.repeated,
            m.cross_session
        );
    }
    let _ = writeln!(
        s,
        "\n## Around the kill\n\n| system | t (s) | open | receiving | ended | failovers |\n|---|---|---|---|---|---|"
    );
    for sys in &r.systems {
        let k = sys.kill.t;
        for sec in sys
            .timeline
            .iter()
            .filter(|x| x.t >= k - 1.0 && x.t <= k + 4.0)
        {
            let _ = writeln!(
                s,
                "| {} | {:.0} | {} | {} | {} | {} |",
                sys.name, sec.t, sec.open, sec.receiving, sec.ended, sec.failovers
            );
        }
    }
    if let Some(f) = r.systems.iter().find_map(|x| x.proxy_failovers.as_ref()) {
        let _ = writeln!(s, "\nsttproxy_failovers_total by outcome: {f:?}");
    }
    let _ = write!(
        s,
        "\n## Rules (sttproxy)\n\n{}",
        verdict::rules_table(&r.checks)
    );
    for sk in &r.skipped {
        let _ = writeln!(s, "\nskipped: {sk}");
    }
    let _ = writeln!(
        s,
        "\nChart: failover-sessions.png (sessions open per second)."
    );
    s
}
