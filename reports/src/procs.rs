//! Child processes of the reproduction: started with their output captured,
//! waited on for their ready line, and always stopped — on success, on error
//! (`Drop`) and on Ctrl-C (a registry the signal handler empties).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Pids of every child still running, for the Ctrl-C handler.
static RUNNING: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn registry() -> std::sync::MutexGuard<'static, Vec<u32>> {
    match RUNNING.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // Safety: kill(2) with a pid we started; no memory is involved.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Install the Ctrl-C (SIGINT/SIGTERM) handler: stop every child, then exit 130.
pub fn stop_children_on_interrupt() -> anyhow::Result<()> {
    ctrlc::set_handler(|| {
        let pids = registry().clone();
        for pid in &pids {
            signal(*pid, libc::SIGTERM);
        }
        std::thread::sleep(Duration::from_millis(1500));
        for pid in &pids {
            signal(*pid, libc::SIGKILL);
        }
        eprintln!("repro: interrupted; stopped {} processes", pids.len());
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")
}

/// A running child process.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    /// Start `cmd` with stdout read line by line (and copied to `<log_dir>/<name>.out`)
    /// and stderr written to `<log_dir>/<name>.err`.
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> anyhow::Result<Self> {
        let err = std::fs::File::create(log_dir.join(format!("{name}.err")))?;
        let mut out_log = std::fs::File::create(log_dir.join(format!("{name}.out")))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err));
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        registry().push(child.id());
        let stdout = child.stdout.take().context("child stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(out_log, "{line}");
                let _ = tx.send(line);
            }
        });
        Ok(Self {
            name: name.to_string(),
            child,
            lines: rx,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait for a stdout line starting with `prefix`; returns the rest of it.
    pub fn ready_line(&mut self, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => {
                    return Ok(line[prefix.len()..].trim().to_string());
                }
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!(
                        "{} printed no {prefix:?} line within {timeout:?}",
                        self.name
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.try_wait().ok().flatten();
                    bail!(
                        "{} exited before it was ready ({status:?}); see its .err log",
                        self.name
                    )
                }
            }
        }
    }

    /// Wait for the child to exit by itself, at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.unregister();
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("{} still running after {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            self.unregister();
            return;
        }
        signal(self.child.id(), libc::SIGTERM);
        if self.wait(grace).is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.unregister();
    }

    fn unregister(&self) {
        let pid = self.child.id();
        registry().retain(|p| *p != pid);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Wait until something accepts TCP connections on `addr`.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on {addr} after {timeout:?}")
}

/// A plain HTTP/1.0 GET; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
