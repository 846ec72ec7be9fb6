//! Child processes of the reproduction: started with their output captured,
//! waited on for their ready line, and always stopped with their whole process
//! group — on success, on error and panic (`Drop`), on Ctrl-C and, through the
//! guardian, when `repro` itself is killed (see [`group`]).

mod group;
pub mod guardian;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub use group::{Group, start_guardian, stop_all_on_interrupt};

/// A running child process with its stdout read line by line.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    group: Group,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    /// Start `cmd` in its own process group (see [`Group::spawn`]) with stdout
    /// read line by line (and copied to `<log_dir>/<name>.out`) and stderr
    /// written to `<log_dir>/<name>.err`.
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> anyhow::Result<Self> {
        let err_path = log_dir.join(format!("{name}.err"));
        let err = std::fs::File::create(&err_path)
            .with_context(|| format!("creating {}", err_path.display()))?;
        let out_path = log_dir.join(format!("{name}.out"));
        let mut out_log = std::fs::File::create(&out_path)
            .with_context(|| format!("creating {}", out_path.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err));
        let mut group = Group::spawn(name, cmd)?;
        let stdout = group.child_mut().stdout.take().context("child stdout")?;
        let (tx, rx) = mpsc::channel();
        // Ends when the child's stdout closes (the child exited or was killed).
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(out_log, "{line}");
                let _ = tx.send(line);
            }
        });
        Ok(Self {
            name: name.to_string(),
            group,
            lines: rx,
        })
    }

    pub fn pid(&self) -> u32 {
        self.group.pid()
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
                    let status = self.group.child_mut().try_wait().ok().flatten();
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
        self.group.wait(timeout)
    }

    /// SIGTERM to its group, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        self.group.stop(grace);
    }

    /// Whether the child has exited, without waiting; once it has, what it
    /// left in its group is killed.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        self.group.try_wait()
    }

    /// SIGKILL to its group at once (see [`Group::kill`]).
    pub fn kill(&mut self) {
        self.group.kill();
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
