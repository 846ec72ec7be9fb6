//! The guardian: a small process that outlives a `repro` killed by SIGKILL and
//! ends the process groups it left behind.
//!
//! The parent-death signal kills the group leaders with `repro`, but not the
//! workers nginx and Gunicorn fork (the signal is not inherited across fork).
//! The guardian is `repro` itself run with `--guardian`, in a group of its own
//! and without a parent-death signal; `repro` writes `+PGID` for each group it
//! starts and `-PGID` for each it has ended on the guardian's stdin. When that
//! pipe closes — `repro` exited, however — the guardian ends the groups still
//! listed (SIGTERM, SIGKILL after a grace) and exits. After a normal exit the
//! list is empty and it exits at once.

use std::collections::BTreeSet;
use std::io::{BufRead, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use super::group::end_groups;

/// The argument that runs `repro` as the guardian (see [`serve`]).
pub const GUARDIAN_ARG: &str = "--guardian";

/// The write end of the guardian's pipe.
#[derive(Debug)]
pub(super) struct Guardian {
    /// Kept so the guardian is not reaped before `repro` exits; never waited
    /// for (it outlives `repro` by design).
    _child: Child,
    stdin: ChildStdin,
}

impl Guardian {
    /// Start the current executable with [`GUARDIAN_ARG`].
    pub(super) fn start() -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe().context("locating the repro executable")?;
        let mut child = Command::new(&exe)
            .arg(GUARDIAN_ARG)
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} {GUARDIAN_ARG}", exe.display()))?;
        let stdin = child.stdin.take().context("guardian stdin")?;
        Ok(Self {
            _child: child,
            stdin,
        })
    }

    pub(super) fn watch(&mut self, pgid: libc::pid_t) {
        // A guardian that died cannot be helped; the other mechanisms remain.
        let _ = writeln!(self.stdin, "+{pgid}");
    }

    pub(super) fn forget(&mut self, pgid: libc::pid_t) {
        let _ = writeln!(self.stdin, "-{pgid}");
    }
}

/// The guardian's main: follow the list on stdin until it closes, then end
/// every group still listed.
pub fn serve() {
    let mut groups = BTreeSet::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let (op, pgid) = line.split_at(line.len().min(1));
        let Ok(pgid) = pgid.parse::<libc::pid_t>() else {
            continue;
        };
        match op {
            "+" => {
                groups.insert(pgid);
            }
            "-" => {
                groups.remove(&pgid);
            }
            _ => {}
        }
    }
    if !groups.is_empty() {
        let groups: Vec<_> = groups.into_iter().collect();
        end_groups(&groups, Duration::from_secs(2));
        eprintln!(
            "repro guardian: repro ended without stopping {} process groups; ended them",
            groups.len()
        );
    }
}
