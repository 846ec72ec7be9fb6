//! `cargo repro`: build, start 3 echo backends, then measure each system under
//! the same load, one after another — sttproxy, the Python baseline, and nginx
//! when installed — and write the report.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::procs::{Proc, free_port, http_get, wait_for_port};
use crate::report::{self, MachineInfo, RunNotes};
use crate::results::{RunResult, SystemRun};

/// A load scenario of the reproduction.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Scenario {
    pub name: &'static str,
    pub sessions: usize,
    pub rate: f64,
    pub size: usize,
    pub duration_s: u64,
    pub mode: &'static str,
    pub about: &'static str,
}

pub const SCENARIOS: [Scenario; 5] = [
    Scenario {
        name: "reference",
        sessions: 3000,
        rate: 100.0,
        size: 1024,
        duration_s: 60,
        mode: "echo",
        about: "the reference write-up's test: 3,000 sessions, no ramp, 100 msg/s of 1 KiB each, 60 s",
    },
    Scenario {
        name: "quick",
        sessions: 300,
        rate: 100.0,
        size: 1024,
        duration_s: 10,
        mode: "echo",
        about: "a 10-second, 300-session version of the reference test",
    },
    Scenario {
        name: "seed",
        sessions: 3000,
        rate: 10.0,
        size: 1024,
        duration_s: 60,
        mode: "echo",
        about: "3,000 sessions × 10 msg/s × 1 KiB: a load every system here can carry",
    },
    Scenario {
        name: "stt",
        sessions: 1000,
        rate: 50.0,
        size: 640,
        duration_s: 30,
        mode: "stt",
        about: "1,000 sessions streaming 20 ms PCM chunks (50/s) to stt backends that answer partials",
    },
    Scenario {
        name: "idle-3000",
        sessions: 3000,
        rate: 0.2,
        size: 1024,
        duration_s: 30,
        mode: "echo",
        about: "3,000 mostly idle sessions (one message per 5 s): memory per session",
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
    pub out: Option<PathBuf>,
    /// Skip `cargo build` (binaries already built).
    pub no_build: bool,
    pub command: String,
}

/// The runs recorded in `<out>/runs.json`, from which `report` can re-render.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunIndex {
    pub scenario: String,
    pub command: String,
    pub systems: Vec<RunEntry>,
    pub skipped: Vec<String>,
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RunEntry {
    pub name: String,
    pub json: String,
    pub idle_rss_mb: Option<f64>,
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

/// UTC `YYYYMMDD-HHMMSS` without a date library.
fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// RSS (MB) of `pid` and all its descendants now.
fn tree_rss_mb(pid: u32) -> Option<f64> {
    let procs = loadgen::procfs::all_processes();
    let tree = loadgen::procfs::tree_of(pid, &procs);
    if tree.is_empty() {
        return None;
    }
    let (rss_kib, _) = loadgen::procfs::memory_of(tree.iter().map(|p| p.pid));
    Some(rss_kib as f64 / 1024.0)
}

struct Env {
    bin: PathBuf,
    out: PathBuf,
    scenario: Scenario,
    backend_urls: Vec<String>,
    workers: usize,
}

impl Env {
    fn binary(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// Run loadgen against `url`, watching `pid`; returns the parsed result.
    fn load(&self, system: &str, url: &str, pid: u32) -> anyhow::Result<SystemRun> {
        let idle_rss_mb = tree_rss_mb(pid);
        let json = self.out.join(format!("{system}.json"));
        let s = self.scenario;
        let mut cmd = Command::new(self.binary("loadgen"));
        cmd.arg("--url")
            .arg(url)
            .args(["--sessions", &s.sessions.to_string()])
            .args(["--rate", &s.rate.to_string()])
            .args(["--size", &s.size.to_string()])
            .args(["--duration", &format!("{}s", s.duration_s)])
            .args(["--mode", s.mode])
            .args(["--watch-pid", &pid.to_string()])
            .arg("--json")
            .arg(&json)
            .arg("--hist")
            .arg(self.out.join(format!("{system}.hlog")));
        eprintln!(
            "repro: {system}: {} sessions × {} msg/s × {} B for {} s ...",
            s.sessions, s.rate, s.size, s.duration_s
        );
        let mut lg = Proc::spawn(&format!("loadgen-{system}"), cmd, &self.out)?;
        let status = lg.wait(Duration::from_secs(s.duration_s + 120))?;
        if !status.success() {
            bail!("loadgen for {system} failed ({status}); see loadgen-{system}.err");
        }
        Ok(SystemRun {
            name: system.to_string(),
            result: RunResult::load(&json)?,
            idle_rss_mb,
        })
    }

    fn sttproxy(&self) -> anyhow::Result<SystemRun> {
        let per_backend = self.scenario.sessions.div_ceil(self.backend_urls.len()) + 8;
        let mut cmd = Command::new(self.binary("sttproxy"));
        // The embedded SQLite default, in a fresh file per run: the backend
        // table is seeded from the --backend flags on its first start.
        let db = format!("sqlite://{}", self.out.join("sttproxy.db").display());
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--db", &db])
            .args(["--target-size", &per_backend.to_string()])
            .args(["--max-size", &(per_backend * 2).to_string()])
            .env("RUST_LOG", "warn");
        for url in &self.backend_urls {
            cmd.args(["--backend", url]);
        }
        let mut proxy = Proc::spawn("sttproxy", cmd, &self.out)?;
        let line = proxy.ready_line("sttproxy listening on ", Duration::from_secs(30))?;
        // "ws://ADDR, admin on http://ADDR"
        let (client, admin) = line
            .split_once(", admin on http://")
            .context("unexpected ready line")?;
        let admin: std::net::SocketAddr = admin.trim().parse()?;
        wait_warm(admin, self.backend_urls.len(), Duration::from_secs(60))?;
        let url = format!("{client}/v1/stream");
        let run = self.load("sttproxy", &url, proxy.pid());
        proxy.stop(Duration::from_secs(40));
        run
    }

    fn python(&self) -> anyhow::Result<SystemRun> {
        let root = workspace_root();
        let port = free_port()?;
        let bind = format!("127.0.0.1:{port}");
        let per_worker = self
            .scenario
            .sessions
            .div_ceil(self.backend_urls.len() * self.workers)
            + 8;
        let mut cmd = Command::new("bash");
        cmd.arg(root.join("baseline/python/run.sh"))
            .env("STTPROXY_BACKENDS", self.backend_urls.join(","))
            .env("STTPROXY_POOL_SIZE", per_worker.to_string())
            .env("STTPROXY_POOL_MAX", (per_worker * 4).to_string())
            .env("WORKERS", self.workers.to_string())
            .env("BIND", &bind);
        eprintln!("repro: python: starting ...");
        let mut py = Proc::spawn("python", cmd, &self.out)?;
        py.ready_line("baseline listening on", Duration::from_secs(600))?;
        let run = self.load("python", &format!("ws://{bind}/v1/stream"), py.pid());
        py.stop(Duration::from_secs(20));
        run
    }

    fn nginx(&self, nginx: &Path) -> anyhow::Result<SystemRun> {
        let dir = self.out.join("nginx");
        std::fs::create_dir_all(dir.join("tmp"))?;
        let port = free_port()?;
        let upstreams: String = self
            .backend_urls
            .iter()
            .map(|u| format!("    server {};\n", u.trim_start_matches("ws://")))
            .collect();
        let d = dir.display();
        let conf = format!(
            "worker_processes {workers};\nworker_rlimit_nofile 20000;\ndaemon off;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nevents {{ worker_connections 16000; }}\nhttp {{\n  access_log off;\n\
             client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy; fastcgi_temp_path {d}/tmp/fastcgi;\n\
             uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;\n  upstream backends {{\n{upstreams}  }}\n\
             server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://backends;\n\
             proxy_http_version 1.1;\n      proxy_set_header Upgrade $http_upgrade;\n      proxy_set_header Connection \"upgrade\";\n\
             proxy_read_timeout 3600s;\n      proxy_send_timeout 3600s;\n      proxy_buffering off;\n    }}\n  }}\n}}\n",
            workers = self.workers
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let mut cmd = Command::new(nginx);
        cmd.arg("-p").arg(&dir).arg("-c").arg(&conf_path);
        let mut ng = Proc::spawn("nginx", cmd, &self.out)?;
        wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(10))?;
        let run = self.load(
            "nginx",
            &format!("ws://127.0.0.1:{port}/v1/stream"),
            ng.pid(),
        );
        ng.stop(Duration::from_secs(10));
        run
    }
}

/// Wait until every pool is warm (idle connections up to its target).
fn wait_warm(
    admin: std::net::SocketAddr,
    backends: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Ok((200, body)) = http_get(admin, "/pools") {
            let v: serde_json::Value = serde_json::from_str(&body)?;
            let pools = v["backends"].as_array().cloned().unwrap_or_default();
            let warm = pools
                .iter()
                .filter(|p| {
                    p["idle"].as_u64() >= p["target"].as_u64() && p["target"].as_u64() > Some(0)
                })
                .count();
            if warm == backends {
                return Ok(());
            }
        }
        if std::time::Instant::now() >= deadline {
            bail!("sttproxy's pools did not warm up within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Run the whole reproduction; returns the report directory.
pub fn run(opts: &Options) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    // The Python baseline's virtualenv is mostly downloads: prepare it while
    // the Rust binaries build.
    let venv = Command::new("bash")
        .arg(root.join("baseline/python/run.sh"))
        .env("BASELINE_PREPARE_ONLY", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn();
    if !opts.no_build {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        eprintln!("repro: building the release binaries ...");
        let status = Command::new(cargo)
            .current_dir(&root)
            .args([
                "build",
                "--release",
                "-p",
                "echo-backend",
                "-p",
                "sttproxy",
                "-p",
                "loadgen",
            ])
            .status()
            .context("running cargo build")?;
        if !status.success() {
            bail!("cargo build failed ({status})");
        }
    }
    let venv_ready = match venv {
        Ok(mut child) => match child.wait() {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(format!("preparing its virtualenv failed ({status})")),
            Err(e) => Err(format!("preparing its virtualenv: {e}")),
        },
        Err(e) => Err(format!("starting baseline/python/run.sh: {e}")),
    };
    let out = match &opts.out {
        Some(o) => o.clone(),
        None => root.join("reports/out").join(timestamp()),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let fd = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    let mut notes = RunNotes {
        scenario: format!("{} — {}", opts.scenario.name, opts.scenario.about),
        command: opts.command.clone(),
        ..RunNotes::default()
    };
    let s = opts.scenario;
    // Per system: the proxy holds 2 sockets a session, loadgen 1, the backends 1.
    let need = s.sessions as u64 * 2 + 256;
    if fd < need {
        notes.notes.push(format!(
            "file descriptor limit {fd} is below the ≈{need} this scenario needs per process; expect refused sessions"
        ));
    }
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut backends = Vec::new();
    let mut urls = Vec::new();
    for i in 0..3 {
        let mut cmd = Command::new(target_dir(&root).join("release/echo-backend"));
        cmd.args(["--listen", "127.0.0.1:0", "--mode", s.mode]);
        let mut b = Proc::spawn(&format!("echo-backend-{i}"), cmd, &out)?;
        let url = b.ready_line("echo-backend listening on ", Duration::from_secs(10))?;
        urls.push(url);
        backends.push(b);
    }
    let env = Env {
        bin: target_dir(&root).join("release"),
        out: out.clone(),
        scenario: s,
        backend_urls: urls,
        workers,
    };
    let mut runs = Vec::new();
    runs.push(env.sttproxy().context("measuring sttproxy")?);
    match venv_ready
        .map_err(anyhow::Error::msg)
        .and_then(|()| env.python())
    {
        Ok(r) => runs.push(r),
        Err(e) => notes.skipped.push(format!("python baseline: {e:#}")),
    }
    match find_in_path("nginx") {
        Some(nginx) => match env.nginx(&nginx) {
            Ok(r) => runs.push(r),
            Err(e) => notes.skipped.push(format!("nginx: {e:#}")),
        },
        None => notes
            .skipped
            .push("nginx: not installed (apt-get install nginx to measure it too)".into()),
    }
    for mut b in backends {
        b.stop(Duration::from_secs(5));
    }
    notes.notes.push(format!(
        "loopback only; the load generator, 3 echo backends and each system share this machine's {} cores",
        workers
    ));
    let index = RunIndex {
        scenario: notes.scenario.clone(),
        command: notes.command.clone(),
        systems: runs
            .iter()
            .map(|r| RunEntry {
                name: r.name.clone(),
                json: format!("{}.json", r.name),
                idle_rss_mb: r.idle_rss_mb,
            })
            .collect(),
        skipped: notes.skipped.clone(),
        notes: notes.notes.clone(),
    };
    std::fs::write(out.join("runs.json"), serde_json::to_string_pretty(&index)?)?;
    let md = report::write(&out, &runs, &MachineInfo::read(), &notes)?;
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
    let index: RunIndex = serde_json::from_str(
        &std::fs::read_to_string(dir.join("runs.json")).context("reading runs.json")?,
    )?;
    let runs = index
        .systems
        .iter()
        .map(|e| {
            Ok(SystemRun {
                name: e.name.clone(),
                result: RunResult::load(&dir.join(&e.json))?,
                idle_rss_mb: e.idle_rss_mb,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let notes = RunNotes {
        scenario: index.scenario,
        command: index.command,
        skipped: index.skipped,
        notes: index.notes,
    };
    report::write(dir, &runs, &MachineInfo::read(), &notes)?;
    Ok(())
}
