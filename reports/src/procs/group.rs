//! Process groups the reproduction starts and must end, whatever way it ends.
//!
//! Every child is started as the leader of its own process group (so the
//! workers nginx and Gunicorn fork are reached by one `kill(-pgid)`) with a
//! parent-death signal (SIGKILL when `repro` dies, even by SIGKILL), and its
//! group is recorded in a registry *under the same lock as the spawn*, so the
//! Ctrl-C handler never misses a child started while it runs, and no child is
//! started after it began.
//!
//! Three ways out, three mechanisms:
//! - normal exit, error, panic: [`Group`]'s `Drop` (SIGTERM to the group,
//!   SIGKILL after a grace);
//! - Ctrl-C / SIGTERM: [`stop_all_on_interrupt`] ends every registered group;
//! - SIGKILL, OOM kill: the leaders die with `repro` (parent-death signal),
//!   but the workers they forked do not inherit that signal; the
//!   [guardian](super::guardian) — a process of its own that reads the group
//!   ids on a pipe — sees the pipe close and kills the groups.
//!
//! The parent-death signal fires when the *thread* that spawned the child
//! exits, not the process: children must be spawned from a thread that lives
//! as long as `repro` (the main thread; `repro` spawns from nowhere else).

use std::process::{Child, Command, ExitStatus};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::guardian::Guardian;

/// The groups still running, the guardian told about them, and whether the
/// reproduction is shutting down (no new child then).
#[derive(Debug, Default)]
struct Registry {
    groups: Vec<libc::pid_t>,
    guardian: Option<Guardian>,
    closing: bool,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    groups: Vec::new(),
    guardian: None,
    closing: false,
});

fn registry() -> MutexGuard<'static, Registry> {
    match REGISTRY.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Start the guardian (see the module doc). Without one, a SIGKILL of `repro`
/// still takes the group leaders down (parent-death signal), but workers they
/// forked may survive; that is said on stderr and the run goes on.
pub fn start_guardian() {
    let mut reg = registry();
    if reg.guardian.is_some() {
        return;
    }
    match Guardian::start() {
        Ok(g) => reg.guardian = Some(g),
        Err(e) => eprintln!(
            "repro: no guardian process ({e:#}); if repro is killed with SIGKILL, workers of nginx or gunicorn may survive it"
        ),
    }
}

/// Send `sig` to every process of group `pgid`. Returns false when the group
/// has no process left (ESRCH).
pub(super) fn signal_group(pgid: libc::pid_t, sig: libc::c_int) -> bool {
    if pgid <= 1 {
        return false;
    }
    // SAFETY: kill(2) takes no pointers; a negative pid addresses the process
    // group `pgid`, which is one this program created (pgid > 1 checked above,
    // so never "every process" or our own group).
    unsafe { libc::kill(-pgid, sig) == 0 }
}

/// Wait until group `pgid` has no process left, at most until `deadline`.
fn wait_group_gone(pgid: libc::pid_t, deadline: Instant) -> bool {
    loop {
        if !signal_group(pgid, 0) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM to each group, SIGKILL after `grace` to what is left.
pub(super) fn end_groups(groups: &[libc::pid_t], grace: Duration) {
    for &g in groups {
        signal_group(g, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    for &g in groups {
        if !wait_group_gone(g, deadline) {
            signal_group(g, libc::SIGKILL);
        }
    }
}

/// Install the Ctrl-C (SIGINT/SIGTERM) handler: no new child from now on,
/// every group ended (SIGTERM, SIGKILL after 1.5 s), then exit 130.
pub fn stop_all_on_interrupt() -> anyhow::Result<()> {
    ctrlc::set_handler(|| {
        let groups = {
            let mut reg = registry();
            reg.closing = true;
            std::mem::take(&mut reg.groups)
        };
        end_groups(&groups, Duration::from_millis(1500));
        eprintln!(
            "repro: interrupted; stopped {} process groups",
            groups.len()
        );
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")
}

/// Make `cmd` start as the leader of a new process group that gets SIGKILL
/// when the spawning thread dies.
fn isolate(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    // The parent's pid, taken before the fork: if it has died before the
    // child's prctl below, the child was already reparented and the signal
    // would never come.
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: prctl(2) and getppid(2) are system
    // calls that allocate nothing and take no lock; the error is built from
    // errno without allocating (io::Error::last_os_error / from_raw_os_error).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            ) == -1
            {
                return Err(std::io::Error::last_os_error());
            }
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// A child started as the leader of its own process group, ended with its
/// whole group when dropped.
#[derive(Debug)]
pub struct Group {
    pub name: String,
    child: Child,
    pgid: libc::pid_t,
    /// Set once the group is known to be gone (and unregistered).
    ended: bool,
}

impl Group {
    /// Start `cmd` (its stdio as the caller set it up) in a new process group
    /// with a parent-death signal, registered before anything can interrupt.
    ///
    /// Must be called from the main thread (see the module doc).
    pub fn spawn(name: &str, mut cmd: Command) -> anyhow::Result<Self> {
        isolate(&mut cmd);
        // Held across the spawn: the Ctrl-C handler either ran before (then
        // `closing` refuses the child) or runs after the group is registered.
        let mut reg = registry();
        if reg.closing {
            bail!("not starting {name}: repro is shutting down");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let pgid = libc::pid_t::try_from(child.id()).context("child pid out of range")?;
        reg.groups.push(pgid);
        if let Some(g) = reg.guardian.as_mut() {
            g.watch(pgid);
        }
        drop(reg);
        Ok(Self {
            name: name.to_string(),
            child,
            pgid,
            ended: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Wait for the leader to exit by itself, at most `timeout`; what it left
    /// in its group is then killed.
    pub fn wait(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.finish();
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("{} still running after {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The leader's exit status if it has exited (then what it left in its
    /// group is killed), without waiting.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        match self.child.try_wait()? {
            Some(status) => {
                self.finish();
                Ok(Some(status))
            }
            None => Ok(None),
        }
    }

    /// SIGTERM to the group, SIGKILL to whatever of it is left after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if self.ended {
            return;
        }
        let deadline = Instant::now() + grace;
        signal_group(self.pgid, libc::SIGTERM);
        loop {
            // The leader is reaped first: as a zombie it still counts as a
            // member of the group.
            if matches!(self.child.try_wait(), Ok(Some(_)) | Err(_))
                && wait_group_gone(self.pgid, deadline)
            {
                break;
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.finish();
    }

    /// SIGKILL to the whole group at once, without the grace of [`stop`]: a
    /// crash, as the soak's backend faults need (no close frames, no FIN
    /// sent in an orderly shutdown; the kernel resets what was open).
    ///
    /// [`stop`]: Self::stop
    pub fn kill(&mut self) {
        if !self.ended {
            self.finish();
        }
    }

    /// Kill what is left of the group, reap the leader, unregister.
    fn finish(&mut self) {
        signal_group(self.pgid, libc::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut reg = registry();
        reg.groups.retain(|g| *g != self.pgid);
        if let Some(g) = reg.guardian.as_mut() {
            g.forget(self.pgid);
        }
        self.ended = true;
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pids whose parent is `ppid` (from /proc).
    fn children_of(ppid: u32) -> Vec<u32> {
        let procs = loadgen::procfs::all_processes();
        procs
            .iter()
            .filter(|p| p.ppid == ppid)
            .map(|p| p.pid)
            .collect()
    }

    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| Some(s.get(s.rfind(')')? + 2..)?.starts_with('Z')))
            .is_some_and(|zombie| !zombie)
    }

    #[test]
    fn stop_ends_the_leader_and_the_workers_it_forked() {
        // A leader that forks a worker ignoring SIGTERM, then waits: only the
        // SIGKILL to the group after the grace can end the worker.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "(trap '' TERM; sleep 60) & wait"]);
        let mut g = match Group::spawn("forking", cmd) {
            Ok(g) => g,
            Err(e) => panic!("spawn: {e:#}"),
        };
        let leader = g.pid();
        let deadline = Instant::now() + Duration::from_secs(10);
        let worker = loop {
            if let Some(&w) = children_of(leader).first() {
                break w;
            }
            assert!(Instant::now() < deadline, "the worker never started");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(registry().groups.contains(&(leader as libc::pid_t)));
        let started = Instant::now();
        g.stop(Duration::from_millis(300));
        assert!(started.elapsed() < Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(worker) {
            assert!(
                Instant::now() < deadline,
                "worker {worker} survived the group stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(leader));
        assert!(!registry().groups.contains(&(leader as libc::pid_t)));
    }
}
