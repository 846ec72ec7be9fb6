//! `cargo repro --scenario rolling [--quick]`: two sttproxy replicas behind
//! HAProxy, a backend added live and a rolling upgrade under load — the
//! procedure of docs/operations.md, run end to end with the release binaries.
//!
//! * Two replicas (`sttproxy serve`, each with its own `--upgrade-socket`)
//!   share one backend table: the embedded SQLite default, one file both
//!   open. SQLite has no push, so the replicas poll the table's change
//!   counter every [`SYNC_INTERVAL`] (PostgreSQL would push through
//!   LISTEN/NOTIFY; `proxy/tests/replicas.rs` measures that path).
//! * Three echo backends; two in the table from the start, the third added
//!   with `sttproxy backends add` under load, timed until both replicas'
//!   `/pools` show it.
//! * HAProxy (TCP mode, round robin, `option httpchk GET /readyz` every
//!   200 ms on each replica's admin listener) in front; skipped with a
//!   printed reason when `haproxy` is not installed.
//! * The load ([`load`]): `sessions` streaming sessions and four loops of
//!   short sessions, all through HAProxy.
//! * The rolling upgrade: a new `sttproxy serve` with replica 0's
//!   `upgrade_socket` takes its listeners over and the old process drains;
//!   then the same for replica 1. Each hand-over is timed from the new
//!   process's start to its ready line.
//! * The streaming sessions then end (`session.end`, all within
//!   `shutdown_grace`): the old processes must exit 0 by themselves.
//!
//! Results: `rolling.json`, `rolling.md` (the table, also printed) and
//! `rolling.svg`/`.png` in the report directory. `repro` exits non-zero when
//! a check fails. Bounded: every wait has a limit; every process is stopped
//! and the temporary directory (sockets, HAProxy's configuration) removed.

pub mod chart;
pub mod load;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use super::soak::verdict::Check;
use super::systems::{backends_cli, fresh_sqlite_db};
use super::{cargo_build_release, find_in_path, start_backends, target_dir, timestamp};
use crate::procs::{Proc, free_port, http_get, wait_for_port};
use chart::{RollingChart, Span};

/// How often each replica polls the shared SQLite table for changes.
pub const SYNC_INTERVAL: &str = "250ms";
/// The replicas' `shutdown_grace`: the streaming sessions end well within it.
const SHUTDOWN_GRACE: &str = "30s";

/// The scenario's shape; `--quick` only has fewer sessions.
#[derive(Debug, Clone, Serialize)]
pub struct RollingPlan {
    pub sessions: usize,
    pub ramp_s: f64,
    pub period_ms: u64,
    pub connect_loops: usize,
    /// Load before the backend add, and between the steps.
    pub settle_s: u64,
    pub sync_interval: &'static str,
    pub shutdown_grace: &'static str,
}

impl RollingPlan {
    pub fn new(quick: bool) -> Self {
        Self {
            sessions: if quick { 100 } else { 500 },
            ramp_s: if quick { 1.0 } else { 3.0 },
            period_ms: 250,
            connect_loops: 4,
            settle_s: if quick { 3 } else { 5 },
            sync_interval: SYNC_INTERVAL,
            shutdown_grace: SHUTDOWN_GRACE,
        }
    }
}

/// `sttproxy backends add` of the third backend, under load.
#[derive(Debug, Clone, Serialize)]
struct BackendAdd {
    /// Seconds since the load started.
    t: f64,
    /// The CLI's own run (a process start, opening the database).
    cli_s: f64,
    /// From the CLI's return until both replicas' `/pools` show it.
    reached_both_s: f64,
    /// Per replica, from the CLI's return until its `/pools` showed it.
    per_replica_s: Vec<f64>,
}

/// One replica's hand-over to a new process.
#[derive(Debug, Clone, Serialize)]
struct HandOver {
    replica: usize,
    /// Seconds since the load started: the new process started, and printed
    /// its ready line (it serves the inherited listeners).
    started_t: f64,
    ready_t: f64,
    duration_s: f64,
    /// The new process serves the same client and admin addresses.
    same_addresses: bool,
    /// The old process: how it exited, and when (seconds since the load
    /// started); `None` if it had not exited within the limit.
    old_exit: Option<String>,
    old_exited_t: Option<f64>,
}

#[derive(Debug, Serialize)]
struct RollingResult {
    plan: RollingPlan,
    command: String,
    haproxy: String,
    add: BackendAdd,
    hand_overs: Vec<HandOver>,
    /// When the streaming sessions were told to end.
    sessions_ended_t: f64,
    /// HAProxy's log lines saying a replica went DOWN.
    haproxy_down: Vec<String>,
    load: load::Outcome,
    checks: Vec<Check>,
}

/// A replica's process and addresses.
struct Replica {
    proc: Proc,
    listen: SocketAddr,
    admin: SocketAddr,
}

struct Fleet {
    bin: PathBuf,
    out: PathBuf,
    db: String,
    /// Sockets and HAProxy's files: a short path (a Unix socket's is at
    /// most 80 bytes), removed at the end.
    tmp: PathBuf,
    /// Processes started so far per replica (names the logs).
    generation: [usize; 2],
}

impl Fleet {
    fn upgrade_socket(&self, i: usize) -> PathBuf {
        self.tmp.join(format!("r{i}.sock"))
    }

    /// Start replica `i` (or its successor, which finds the running one on
    /// the upgrade socket); returns once it printed its ready line.
    fn spawn_replica(&mut self, i: usize) -> anyhow::Result<Replica> {
        let mut cmd = Command::new(self.bin.join("sttproxy"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--db", &self.db])
            .args(["--sync-interval", SYNC_INTERVAL])
            .args(["--shutdown-grace", SHUTDOWN_GRACE])
            .arg("--upgrade-socket")
            .arg(self.upgrade_socket(i))
            .env("RUST_LOG", "info");
        let name = format!("sttproxy-r{i}-{}", self.generation[i]);
        self.generation[i] += 1;
        let mut proc = Proc::spawn(&name, cmd, &self.out)?;
        let line = proc.ready_line("sttproxy listening on ", Duration::from_secs(60))?;
        let (client, admin) = line
            .split_once(", admin on http://")
            .with_context(|| format!("unexpected ready line {line:?}"))?;
        Ok(Replica {
            listen: client
                .trim_start_matches("ws://")
                .parse()
                .with_context(|| format!("client address in {line:?}"))?,
            admin: admin
                .trim()
                .parse()
                .with_context(|| format!("admin address in {line:?}"))?,
            proc,
        })
    }

    fn add(&self, id: &str, url: &str, target: usize) -> anyhow::Result<()> {
        let (t, m) = (target.to_string(), (target * 3).to_string());
        backends_cli(
            &self.bin,
            &self.out,
            &self.db,
            &["add", "--id", id, "--url", url, "--target", &t, "--max", &m],
        )
    }
}

/// Whether `admin`'s `/pools` lists backend `id`.
fn has_pool(admin: SocketAddr, id: &str) -> bool {
    let Ok((200, body)) = http_get(admin, "/pools") else {
        return false;
    };
    serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["backends"].as_array().cloned())
        .is_some_and(|pools| pools.iter().any(|p| p["id"] == id))
}

/// Poll `done` every 10 ms until it holds or `limit` passes; whether it held.
fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// HAProxy's configuration: as in `proxy/tests/replicas.rs` and
/// docs/operations.md (TCP mode, `/readyz` checked every 200 ms).
fn haproxy_config(
    front: SocketAddr,
    replicas: &[(SocketAddr, SocketAddr)],
    maxconn: usize,
) -> String {
    let mut cfg = format!(
        "global\n  maxconn {maxconn}\n\
         defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 120s\n  \
         timeout server 120s\n  retries 3\n  option redispatch\n\
         frontend clients\n  bind {front}\n  default_backend replicas\n\
         backend replicas\n  balance roundrobin\n  option httpchk GET /readyz\n  \
         http-check expect status 200\n  default-server inter 200ms fall 2 rise 1\n"
    );
    for (i, (listen, admin)) in replicas.iter().enumerate() {
        let _ = writeln!(cfg, "  server r{i} {listen} check port {}", admin.port());
    }
    cfg
}

/// Run the scenario (building first unless `no_build`); returns the report
/// directory. Without HAProxy it prints why it is skipped and returns the
/// directory with only `rolling.md` saying so.
pub fn run_rolling(
    out: Option<PathBuf>,
    no_build: bool,
    quick: bool,
    command: String,
) -> anyhow::Result<PathBuf> {
    let root = super::workspace_root();
    let out = out.unwrap_or_else(|| {
        root.join("reports/out")
            .join(format!("rolling-{}", timestamp()))
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let Some(haproxy) = find_in_path("haproxy") else {
        let why = "rolling: skipped: haproxy is not installed (Debian: apt-get install haproxy)";
        eprintln!("repro: {why}");
        std::fs::write(
            out.join("rolling.md"),
            format!("# Rolling upgrade\n\n{why}\n"),
        )?;
        return Ok(out);
    };
    if !no_build {
        cargo_build_release(&root)?;
    }
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let tmp = std::env::temp_dir().join(format!("sttproxy-rolling-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = run(
        &target_dir(&root).join("release"),
        &out,
        &tmp,
        &haproxy,
        RollingPlan::new(quick),
        command,
    );
    let _ = std::fs::remove_dir_all(&tmp);
    result.map(|()| out)
}

fn run(
    bin: &Path,
    out: &Path,
    tmp: &Path,
    haproxy: &Path,
    plan: RollingPlan,
    command: String,
) -> anyhow::Result<()> {
    let mut fleet = Fleet {
        bin: bin.to_path_buf(),
        out: out.to_path_buf(),
        db: format!("sqlite://{}", fresh_sqlite_db(out)?.display()),
        tmp: tmp.to_path_buf(),
        generation: [0, 0],
    };
    eprintln!("repro: rolling: 3 echo backends, 2 sttproxy replicas, haproxy ...");
    let (mut backends, urls) = start_backends(bin, out, "echo")?;
    // Two backends carry every session until the third is added.
    let target = plan.sessions.div_ceil(2) + 8;
    fleet.add("b0", &urls[0], target)?;
    fleet.add("b1", &urls[1], target)?;
    let mut replicas = vec![fleet.spawn_replica(0)?, fleet.spawn_replica(1)?];
    for r in &replicas {
        if !wait_until(Duration::from_secs(30), || {
            matches!(http_get(r.admin, "/readyz"), Ok((200, _)))
        }) {
            bail!("replica on {} not ready within 30 s", r.listen);
        }
    }
    let front: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let cfg = haproxy_config(
        front,
        &replicas
            .iter()
            .map(|r| (r.listen, r.admin))
            .collect::<Vec<_>>(),
        (plan.sessions + plan.connect_loops) * 4 + 1000,
    );
    let cfg_path = tmp.join("haproxy.cfg");
    std::fs::write(&cfg_path, &cfg).with_context(|| format!("writing {}", cfg_path.display()))?;
    std::fs::write(out.join("haproxy.cfg"), &cfg)?;
    let mut cmd = Command::new(haproxy);
    cmd.arg("-db").arg("-f").arg(&cfg_path);
    let mut lb = Proc::spawn("haproxy", cmd, out)?;
    wait_for_port(front, Duration::from_secs(10))?;
    let mut last = String::new();
    if !wait_until(Duration::from_secs(10), || match load::probe(front) {
        Ok(()) => true,
        Err(e) => {
            last = e;
            false
        }
    }) {
        bail!("no session through haproxy within 10 s: {last}");
    }
    let haproxy_version = Command::new(haproxy)
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default();

    eprintln!(
        "repro: rolling: {} streaming sessions (a message every {} ms each) and {} connect loops through haproxy ...",
        plan.sessions, plan.period_ms, plan.connect_loops
    );
    let ld = load::Running::start(load::Plan {
        addr: front,
        sessions: plan.sessions,
        ramp: Duration::from_secs_f64(plan.ramp_s),
        period: Duration::from_millis(plan.period_ms),
        connect_loops: plan.connect_loops,
    })?;
    let steps = steps(&mut fleet, &mut replicas, &ld, &plan, &urls[2], target);
    // Whatever happened: the load ends, then every process stops.
    let sessions_ended_t = ld.now();
    ld.end_sessions();
    let (add, mut hand_overs, mut olds) = match steps {
        Ok(s) => s,
        Err(e) => {
            let _ = ld.finish();
            stop_all(&mut replicas, &mut lb, &mut backends, Vec::new());
            return Err(e);
        }
    };
    // The old processes drain: once their sessions ended they exit 0.
    let limit = Instant::now() + Duration::from_secs(40);
    for (h, old) in hand_overs.iter_mut().zip(olds.iter_mut()) {
        let left = limit.saturating_duration_since(Instant::now());
        if let Ok(status) = old.wait(left) {
            h.old_exit = Some(status.to_string());
            h.old_exited_t = Some(ld.now());
        }
    }
    // Connects go on a little on the upgraded replicas alone.
    let connects = ld.connects_ok();
    wait_until(Duration::from_secs(10), || {
        ld.connects_ok() >= connects + 100
    });
    let outcome = ld.finish()?;
    let haproxy_log = std::fs::read_to_string(out.join("haproxy.err")).unwrap_or_default();
    stop_all(&mut replicas, &mut lb, &mut backends, olds);
    let haproxy_down: Vec<String> = haproxy_log
        .lines()
        .filter(|l| l.contains("is DOWN"))
        .map(str::to_string)
        .collect();
    let checks = judge(&plan, &add, &hand_overs, &haproxy_down, &outcome);
    let result = RollingResult {
        plan,
        command,
        haproxy: haproxy_version,
        add,
        hand_overs,
        sessions_ended_t,
        haproxy_down,
        load: outcome,
        checks,
    };
    let path = out.join("rolling.json");
    std::fs::write(&path, serde_json::to_string_pretty(&result)?)
        .with_context(|| format!("writing {}", path.display()))?;
    crate::charts::register_font()?;
    crate::charts::render(&chart_of(&result), out, "rolling")?;
    let md = render(&result);
    std::fs::write(out.join("rolling.md"), &md).context("writing rolling.md")?;
    println!("{md}");
    let failed: Vec<&str> = result
        .checks
        .iter()
        .filter(|c| !c.held)
        .map(|c| c.rule.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "rolling: {} check(s) failed: {}",
            failed.len(),
            failed.join("; ")
        );
    }
    Ok(())
}

/// The steps under load: all sessions connected, the backend add, the two
/// hand-overs. Returns the add, the hand-overs and the old processes
/// (draining); `replicas` then holds the new ones.
fn steps(
    fleet: &mut Fleet,
    replicas: &mut [Replica],
    ld: &load::Running,
    plan: &RollingPlan,
    third_url: &str,
    target: usize,
) -> anyhow::Result<(BackendAdd, Vec<HandOver>, Vec<Proc>)> {
    let all = plan.sessions as u64;
    if !wait_until(Duration::from_secs(60), || ld.connected() >= all) {
        bail!(
            "only {} of {all} streaming sessions connected within 60 s",
            ld.connected()
        );
    }
    let settle = Duration::from_secs(plan.settle_s);
    std::thread::sleep(settle);

    eprintln!("repro: rolling: sttproxy backends add b2 ...");
    let t = ld.now();
    let started = Instant::now();
    fleet.add("b2", third_url, target)?;
    let cli_s = started.elapsed().as_secs_f64();
    let returned = Instant::now();
    let mut per_replica_s = vec![f64::NAN; replicas.len()];
    let reached = wait_until(Duration::from_secs(10), || {
        for (i, r) in replicas.iter().enumerate() {
            if per_replica_s[i].is_nan() && has_pool(r.admin, "b2") {
                per_replica_s[i] = returned.elapsed().as_secs_f64();
            }
        }
        per_replica_s.iter().all(|s| !s.is_nan())
    });
    if !reached {
        bail!("b2 did not reach both replicas within 10 s ({per_replica_s:?} s)");
    }
    let add = BackendAdd {
        t,
        cli_s,
        reached_both_s: per_replica_s.iter().copied().fold(0.0, f64::max),
        per_replica_s,
    };
    std::thread::sleep(settle);

    let mut hand_overs = Vec::new();
    let mut olds = Vec::new();
    for (i, slot) in replicas.iter_mut().enumerate() {
        eprintln!("repro: rolling: replica {i} hands over to a new process ...");
        let started_t = ld.now();
        let next = fleet.spawn_replica(i)?;
        let ready_t = ld.now();
        let same_addresses = (next.listen, next.admin) == (slot.listen, slot.admin);
        let old = std::mem::replace(slot, next);
        hand_overs.push(HandOver {
            replica: i,
            started_t,
            ready_t,
            duration_s: ready_t - started_t,
            same_addresses,
            old_exit: None,
            old_exited_t: None,
        });
        olds.push(old.proc);
        std::thread::sleep(settle);
    }
    Ok((add, hand_overs, olds))
}

fn stop_all(replicas: &mut [Replica], lb: &mut Proc, backends: &mut [Proc], olds: Vec<Proc>) {
    for mut p in olds {
        p.stop(Duration::from_secs(5));
    }
    for r in replicas {
        r.proc.stop(Duration::from_secs(10));
    }
    lb.stop(Duration::from_secs(2));
    for b in backends {
        b.stop(Duration::from_secs(5));
    }
}

fn judge(
    plan: &RollingPlan,
    add: &BackendAdd,
    hand_overs: &[HandOver],
    haproxy_down: &[String],
    o: &load::Outcome,
) -> Vec<Check> {
    vec![
        Check::new(
            "every streaming session ended clean across both hand-overs",
            o.sessions_clean == plan.sessions as u64 && o.sessions_lost == 0,
            format!(
                "{} of {} clean, {} lost; {} echoes checked in order",
                o.sessions_clean, plan.sessions, o.sessions_lost, o.echoes
            ),
        ),
        Check::new(
            "no connect failed",
            o.connects_failed == 0 && o.connects_ok > 0,
            format!("{} ok, {} failed", o.connects_ok, o.connects_failed),
        ),
        Check::new(
            "the added backend reached both replicas within 1 s",
            add.reached_both_s <= 1.0,
            format!(
                "{:.3} s after the CLI returned (the CLI itself {:.3} s); SQLite polled every {SYNC_INTERVAL}",
                add.reached_both_s, add.cli_s
            ),
        ),
        Check::new(
            "each new process took over the same addresses",
            hand_overs.len() == 2 && hand_overs.iter().all(|h| h.same_addresses),
            format!("{} hand-overs", hand_overs.len()),
        ),
        Check::new(
            "each old process drained and exited 0 by itself",
            hand_overs
                .iter()
                .all(|h| h.old_exit.as_deref() == Some("exit status: 0")),
            format!(
                "{:?}",
                hand_overs
                    .iter()
                    .map(|h| h.old_exit.clone())
                    .collect::<Vec<_>>()
            ),
        ),
        Check::new(
            "haproxy never took a replica out",
            haproxy_down.is_empty(),
            format!("{} DOWN lines in its log", haproxy_down.len()),
        ),
    ]
}

fn chart_of(r: &RollingResult) -> RollingChart {
    let mut spans = vec![Span {
        label: "backends add".into(),
        from: r.add.t,
        to: r.add.t + r.add.cli_s + r.add.reached_both_s,
    }];
    spans.extend(r.hand_overs.iter().map(|h| Span {
        label: format!("r{} hand-over", h.replica),
        from: h.started_t,
        to: h.ready_t,
    }));
    spans.push(Span {
        label: "session.end".into(),
        from: r.sessions_ended_t,
        to: r.sessions_ended_t,
    });
    RollingChart {
        title: format!(
            "Rolling upgrade of 2 replicas behind HAProxy, {} streaming sessions",
            r.plan.sessions
        ),
        samples: r.load.samples.clone(),
        spans,
    }
}

fn render(r: &RollingResult) -> String {
    let mut s = String::new();
    let p = &r.plan;
    let o = &r.load;
    let _ = writeln!(s, "# Rolling upgrade behind HAProxy\n\n`{}`\n", r.command);
    let _ = writeln!(
        s,
        "Two sttproxy replicas sharing one SQLite backend table (polled every {}), {} in front \
         (TCP mode, `/readyz` checked every 200 ms), 3 echo backends. Load through HAProxy: {} \
         streaming sessions (a 64-byte message every {} ms each, every echo checked) and {} loops \
         of short sessions (connect, one echo, graceful end). Under it: `sttproxy backends add` \
         of the third backend, then each replica in turn handed over to a new process \
         (`--upgrade-socket`); then the sessions end (`session.end`, within the {} \
         `shutdown_grace`).\n",
        p.sync_interval, r.haproxy, p.sessions, p.period_ms, p.connect_loops, p.shutdown_grace
    );
    let _ = writeln!(s, "| figure | value |\n|---|---|");
    let mut row = |k: &str, v: String| {
        let _ = writeln!(s, "| {k} | {v} |");
    };
    row(
        "streaming sessions clean / lost",
        format!("{} / {}", o.sessions_clean, o.sessions_lost),
    );
    row(
        "connects ok / failed",
        format!("{} / {}", o.connects_ok, o.connects_failed),
    );
    row("`backends add`: the CLI", format!("{:.3} s", r.add.cli_s));
    row(
        "`backends add`: on both replicas after the CLI returned",
        format!(
            "{:.3} s (per replica: {})",
            r.add.reached_both_s,
            r.add
                .per_replica_s
                .iter()
                .map(|v| format!("{v:.3} s"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    for h in &r.hand_overs {
        row(
            &format!(
                "replica {} hand-over (new process start → serving)",
                h.replica
            ),
            format!(
                "{:.3} s at t = {:.1} s; old process {} at t = {}",
                h.duration_s,
                h.started_t,
                h.old_exit.as_deref().unwrap_or("had not exited"),
                h.old_exited_t
                    .map_or_else(|| "-".to_string(), |t| format!("{t:.1} s"))
            ),
        );
    }
    row(
        "streaming sessions told to end",
        format!("t = {:.1} s", r.sessions_ended_t),
    );
    row("haproxy DOWN events", r.haproxy_down.len().to_string());
    let _ = writeln!(s, "\n## Checks\n\n| check | held | detail |\n|---|---|---|");
    for c in &r.checks {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            c.rule,
            if c.held { "yes" } else { "**NO**" },
            c.detail.replace('|', "\\|")
        );
    }
    if !o.errors.is_empty() {
        let _ = writeln!(s, "\nfailures by kind: {:?}", o.errors);
        let _ = writeln!(s, "\nfirst failures: {:?}", o.first_errors);
    }
    let _ = writeln!(s, "\n![sessions and connects](rolling.svg)");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haproxy_checks_each_replicas_admin_listener() {
        let a: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let r0 = (
            "127.0.0.1:8001".parse().unwrap(),
            "127.0.0.1:9001".parse().unwrap(),
        );
        let r1 = (
            "127.0.0.1:8002".parse().unwrap(),
            "127.0.0.1:9002".parse().unwrap(),
        );
        let cfg = haproxy_config(a, &[r0, r1], 3000);
        assert!(cfg.contains("maxconn 3000"));
        assert!(cfg.contains("bind 127.0.0.1:8000"));
        assert!(cfg.contains("option httpchk GET /readyz"));
        assert!(cfg.contains("server r0 127.0.0.1:8001 check port 9001"));
        assert!(cfg.contains("server r1 127.0.0.1:8002 check port 9002"));
    }

    #[test]
    fn quick_is_the_same_scenario_with_fewer_sessions() {
        let (full, quick) = (RollingPlan::new(false), RollingPlan::new(true));
        assert_eq!(full.sessions, 500);
        assert!(quick.sessions < full.sessions);
        assert_eq!(quick.connect_loops, full.connect_loops);
    }
}
