//! The systems under test: each started once for the whole measurement, its
//! memory bases recorded before any load, then measured by loadgen once per
//! round.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::index::round_file;
use super::pool_metrics::{PoolRound, Scrape};
use super::{Scenario, workspace_root};
use crate::procs::{Proc, free_port, http_get, wait_for_port};
use crate::results::{MemoryBase, SystemRun, load_result};

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

/// RSS (MB, process tree) of `pid` once it has settled: two samples 500 ms
/// apart within 1 % of each other, or the last sample after 10 s.
///
/// A base taken while a process is still allocating (a worker still filling
/// its pool, a runtime still spawning threads) would be too low and inflate
/// every per-session figure computed above it.
fn settled_rss_mb(pid: u32) -> Option<f64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = tree_rss_mb(pid)?;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = tree_rss_mb(pid)?;
        if (now - last).abs() <= 0.01 * last.max(1.0) || Instant::now() >= deadline {
            return Some(now);
        }
        last = now;
    }
}

/// The SQLite file of sttproxy's backend table in `dir`, with the file of an
/// earlier run and its `-wal`/`-shm` removed.
///
/// The table outlives the proxy: a rerun into the same directory would find
/// the previous run's backends (with their ports, long gone) and keep them, so
/// each start gets an empty table.
pub(super) fn fresh_sqlite_db(dir: &Path) -> anyhow::Result<PathBuf> {
    let db = dir.join("sttproxy.db");
    for suffix in ["", "-wal", "-shm"] {
        let mut name = db.clone().into_os_string();
        name.push(suffix);
        let path = PathBuf::from(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    Ok(db)
}

/// Wait until every pool is warm (idle connections up to its target).
fn wait_warm(admin: SocketAddr, backends: usize, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
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
        if Instant::now() >= deadline {
            bail!("sttproxy's pools did not warm up within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A system started for the whole measurement.
/// `sttproxy backends ARGS --db DB` (the binary in `bin`), its output in
/// `out/sttproxy-backends.{out,err}`; an error carries what it printed.
pub(super) fn backends_cli(bin: &Path, out: &Path, db: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = Command::new(bin.join("sttproxy"));
    cmd.arg("backends").args(args).args(["--db", db]);
    let log = "sttproxy-backends";
    let status = Proc::spawn(log, cmd, out)?.wait(Duration::from_secs(30))?;
    if !status.success() {
        let err = std::fs::read_to_string(out.join(format!("{log}.err"))).unwrap_or_default();
        bail!(
            "sttproxy backends {} failed ({status}): {}",
            args.join(" "),
            err.trim()
        );
    }
    Ok(())
}

#[derive(Debug)]
pub(super) struct Running {
    pub name: &'static str,
    /// The WebSocket URL loadgen connects to.
    pub url: String,
    proc: Proc,
    /// How long it may take to stop gracefully before it is killed.
    grace: Duration,
    pub memory: MemoryBase,
    /// sttproxy's admin listener: its pools are waited warm before each round,
    /// so no round starts on a pool still refilling from the previous one.
    admin: Option<SocketAddr>,
}

impl Running {
    /// sttproxy's admin listener (`None` for the other systems).
    pub fn admin(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// Stop it (SIGTERM, then SIGKILL after its grace).
    pub fn stop(mut self) {
        self.proc.stop(self.grace);
    }
}

/// What every system is started and measured with.
#[derive(Debug)]
pub(super) struct Env {
    pub bin: PathBuf,
    pub out: PathBuf,
    pub scenario: Scenario,
    pub backend_urls: Vec<String>,
    pub workers: usize,
    /// `--reuse` of every backend added to sttproxy (`resumable` in the
    /// failover scenario); `None`: the default (`fenced`).
    pub backend_reuse: Option<&'static str>,
}

impl Env {
    fn binary(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// sttproxy's pool target per backend: its share of the sessions open at
    /// once (with churn, the steady state), plus a few spare connections.
    pub fn sttproxy_target(&self) -> usize {
        self.scenario.concurrent().div_ceil(self.backend_urls.len()) + 8
    }

    /// Measure `sys` once: loadgen for the scenario's duration, its result in
    /// `<system>-r<round>.json` and `.hlog`.
    pub fn load(&self, sys: &Running, round: usize, position: usize) -> anyhow::Result<SystemRun> {
        if let Some(admin) = sys.admin {
            wait_warm(admin, self.backend_urls.len(), Duration::from_secs(60))?;
        }
        let pid = sys.proc.pid();
        let idle_rss_mb = tree_rss_mb(pid);
        let name = sys.name;
        let json = self.out.join(round_file(name, round, "json"));
        let s = self.scenario;
        let mut cmd = Command::new(self.binary("loadgen"));
        cmd.arg("--url")
            .arg(&sys.url)
            .args(["--sessions", &s.sessions.to_string()])
            .args(["--rate", &s.rate.to_string()])
            .args(["--size", &s.size.to_string()])
            .args(["--mode", s.mode])
            .args(["--watch-pid", &pid.to_string()])
            .arg("--json")
            .arg(&json)
            .arg("--hist")
            .arg(self.out.join(round_file(name, round, "hlog")));
        match s.churn {
            None => {
                cmd.args(["--duration", &format!("{}s", s.duration_s)]);
                eprintln!(
                    "repro: round {round}: {name}: {} sessions × {} msg/s × {} B for {} s ...",
                    s.sessions, s.rate, s.size, s.duration_s
                );
            }
            Some(c) => {
                cmd.args(["--ramp", &format!("{}s", c.window_s)])
                    .args([
                        "--lifetime",
                        &format!("{}s..{}s", c.life_min_s, c.life_max_s),
                    ])
                    .args(["--seed", &c.seed.to_string()]);
                eprintln!(
                    "repro: round {round}: {name}: {} sessions a second for {} s, each {}–{} s × {} msg/s × {} B ...",
                    c.arrivals_per_s, c.window_s, c.life_min_s, c.life_max_s, s.rate, s.size
                );
            }
        }
        let before = match sys.admin {
            Some(admin) => Some((Scrape::fetch(admin)?, Instant::now())),
            None => None,
        };
        let log = format!("loadgen-{name}-r{round}");
        let mut lg = Proc::spawn(&log, cmd, &self.out)?;
        let status = lg.wait(Duration::from_secs(s.load_s() + 120))?;
        if !status.success() {
            bail!("loadgen failed ({status}); see {log}.err");
        }
        // The pool's work over the arrival window (with churn) or the run.
        let pool = match (sys.admin, before) {
            (Some(admin), Some((before, t0))) => {
                let after = Scrape::fetch(admin)?;
                let window_s = s
                    .churn
                    .map_or(t0.elapsed().as_secs_f64(), |c| c.window_s as f64);
                Some(PoolRound::between(&before, &after, window_s))
            }
            _ => None,
        };
        Ok(SystemRun {
            name: name.to_string(),
            round,
            position,
            result: load_result(&json)?,
            idle_rss_mb,
            memory: sys.memory,
            pool,
        })
    }

    /// Start sttproxy on a fresh, empty backend table, record its RSS (the base
    /// holding no backend connection), add the backends with `sttproxy
    /// backends add` (the proxy follows the table live), wait for the pools to
    /// be warm and record its RSS again (the warm-pool base).
    pub fn start_sttproxy(&self) -> anyhow::Result<Running> {
        let db = format!("sqlite://{}", fresh_sqlite_db(&self.out)?.display());
        let mut cmd = Command::new(self.binary("sttproxy"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--db", &db])
            .env("RUST_LOG", "warn");
        eprintln!("repro: sttproxy: starting ...");
        let mut proxy = Proc::spawn("sttproxy", cmd, &self.out)?;
        let line = proxy.ready_line("sttproxy listening on ", Duration::from_secs(30))?;
        // "ws://ADDR, admin on http://ADDR"
        let (client, admin) = line
            .split_once(", admin on http://")
            .with_context(|| format!("unexpected ready line {line:?}"))?;
        let admin: SocketAddr = admin
            .trim()
            .parse()
            .with_context(|| format!("admin address in {line:?}"))?;
        let no_backends_mb = settled_rss_mb(proxy.pid());
        for url in &self.backend_urls {
            self.add_backend(&db, url)?;
        }
        wait_warm(admin, self.backend_urls.len(), Duration::from_secs(60))?;
        let warm_pool_mb = settled_rss_mb(proxy.pid());
        Ok(Running {
            name: "sttproxy",
            url: format!("{client}/v1/stream"),
            proc: proxy,
            grace: Duration::from_secs(40),
            memory: MemoryBase {
                no_backends_mb,
                warm_pool_mb,
            },
            admin: Some(admin),
        })
    }

    /// `sttproxy backends add` one backend to the table in `db`.
    fn add_backend(&self, db: &str, url: &str) -> anyhow::Result<()> {
        let target = self.sttproxy_target();
        let (target, max) = (target.to_string(), (target * 2).to_string());
        let mut args = vec!["add", "--url", url, "--target", &target, "--max", &max];
        if let Some(reuse) = self.backend_reuse {
            args.extend(["--reuse", reuse]);
        }
        backends_cli(&self.bin, &self.out, db, &args)
    }

    /// Start the Python baseline; its idle RSS once ready is its warm-pool base
    /// (it opens its pools before it serves).
    pub fn start_python(&self) -> anyhow::Result<Running> {
        let root = workspace_root();
        let port = free_port()?;
        let bind = format!("127.0.0.1:{port}");
        let per_worker = self
            .scenario
            .concurrent()
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
        let warm_pool_mb = settled_rss_mb(py.pid());
        Ok(Running {
            name: "python",
            url: format!("ws://{bind}/v1/stream"),
            proc: py,
            grace: Duration::from_secs(20),
            memory: MemoryBase {
                no_backends_mb: None,
                warm_pool_mb,
            },
            admin: None,
        })
    }

    /// Start nginx as a WebSocket reverse proxy to the backends; its idle RSS
    /// is its base holding no backend connection (it opens one per session).
    pub fn start_nginx(&self, nginx: &Path) -> anyhow::Result<Running> {
        let dir = self.out.join("nginx");
        std::fs::create_dir_all(dir.join("tmp"))
            .with_context(|| format!("creating {}", dir.display()))?;
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
        std::fs::write(&conf_path, conf)
            .with_context(|| format!("writing {}", conf_path.display()))?;
        let mut cmd = Command::new(nginx);
        cmd.arg("-p").arg(&dir).arg("-c").arg(&conf_path);
        eprintln!("repro: nginx: starting ...");
        let ng = Proc::spawn("nginx", cmd, &self.out)?;
        wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(10))?;
        let no_backends_mb = settled_rss_mb(ng.pid());
        Ok(Running {
            name: "nginx",
            url: format!("ws://127.0.0.1:{port}/v1/stream"),
            proc: ng,
            grace: Duration::from_secs(10),
            memory: MemoryBase {
                no_backends_mb,
                warm_pool_mb: None,
            },
            admin: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_sqlite_db_removes_an_earlier_runs_files_and_only_those() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        for name in [
            "sttproxy.db",
            "sttproxy.db-wal",
            "sttproxy.db-shm",
            "keep.json",
        ] {
            if let Err(e) = std::fs::write(dir.join(name), "old") {
                panic!("writing {name}: {e}");
            }
        }
        let db = match fresh_sqlite_db(&dir) {
            Ok(db) => db,
            Err(e) => panic!("fresh_sqlite_db: {e:#}"),
        };
        assert_eq!(db, dir.join("sttproxy.db"));
        for name in ["sttproxy.db", "sttproxy.db-wal", "sttproxy.db-shm"] {
            assert!(!dir.join(name).exists(), "{name} is left over");
        }
        assert!(dir.join("keep.json").exists());
        // Nothing to remove is no error either.
        assert!(fresh_sqlite_db(&dir).is_ok());
    }
}
