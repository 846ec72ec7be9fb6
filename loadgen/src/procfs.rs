//! Reading `/proc` directly: CPU ticks and RSS of a process tree, the machine's busy CPU,
//! this process's own CPU, and the open-files limit.

use std::collections::HashMap;
use std::fs;

/// Clock ticks per second for the `/proc` tick counters (`getconf CLK_TCK`).
pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value; it has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 { v as f64 } else { 100.0 }
}

/// The open-files limits after trying to raise the soft limit to the hard limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the limits now in force.
pub fn raise_nofile_limit() -> Option<FdLimit> {
    let (_, hard) = rlimit::Resource::NOFILE.get().ok()?;
    let _ = rlimit::increase_nofile_limit(hard);
    let (soft, hard) = rlimit::Resource::NOFILE.get().ok()?;
    Some(FdLimit { soft, hard })
}

/// The fields of `/proc/PID/stat` used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    pub ppid: u32,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    /// Start time in clock ticks since boot: tells a reused pid from the original.
    pub start_time: u64,
}

/// Parses the text of `/proc/PID/stat`. The command name may hold spaces and parentheses,
/// so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text[..open].trim().parse().ok()?;
    let rest: Vec<&str> = text.get(close + 1..)?.split_ascii_whitespace().collect();
    // rest[0] is field 3 (state): field n is rest[n - 3].
    let field = |n: usize| rest.get(n - 3).and_then(|s| s.parse::<u64>().ok());
    let ppid = u32::try_from(field(4)?).ok()?;
    let utime = field(14)?;
    let stime = field(15)?;
    let start_time = field(22)?;
    Some(ProcStat {
        pid,
        ppid,
        cpu_ticks: utime + stime,
        start_time,
    })
}

/// Reads `/proc/PID/stat` (`pid` may be "self").
pub fn read_stat(pid: &str) -> Option<ProcStat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// CPU seconds (user + system) this process has used so far.
pub fn self_cpu_seconds(clk_tck: f64) -> f64 {
    read_stat("self").map_or(0.0, |s| s.cpu_ticks as f64 / clk_tck)
}

/// `VmRSS` and `VmHWM` from the text of `/proc/PID/status`, in KiB.
pub fn parse_status_memory(text: &str) -> (u64, u64) {
    let mut rss = 0;
    let mut hwm = 0;
    for line in text.lines() {
        let kib = |l: &str| {
            l.split_ascii_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        if line.starts_with("VmRSS:") {
            rss = kib(line);
        } else if line.starts_with("VmHWM:") {
            hwm = kib(line);
        }
    }
    (rss, hwm)
}

/// The process name from `/proc/PID/comm`.
pub fn read_comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_owned())
}

/// Busy ticks of the whole machine from the text of `/proc/stat`: every field of the `cpu`
/// line except idle and iowait (guest time is already inside user and nice).
pub fn parse_machine_busy(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    if v.len() < 4 {
        return None;
    }
    Some(get(0) + get(1) + get(2) + get(5) + get(6) + get(7))
}

/// Reads the machine's busy ticks from `/proc/stat`.
pub fn read_machine_busy() -> Option<u64> {
    parse_machine_busy(&fs::read_to_string("/proc/stat").ok()?)
}

/// Every process on the machine: `/proc/*/stat`.
pub fn all_processes() -> Vec<ProcStat> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(256);
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Some(s) = read_stat(name) {
            out.push(s);
        }
    }
    out
}

/// `root` and all its descendants (following ppid links), from a process list.
pub fn tree_of(root: u32, procs: &[ProcStat]) -> Vec<ProcStat> {
    let mut children: HashMap<u32, Vec<usize>> = HashMap::new();
    let mut root_stat = None;
    for (i, p) in procs.iter().enumerate() {
        children.entry(p.ppid).or_default().push(i);
        if p.pid == root {
            root_stat = Some(*p);
        }
    }
    let Some(r) = root_stat else {
        return Vec::new();
    };
    let mut out = vec![r];
    let mut at = 0;
    while at < out.len() {
        let pid = out[at].pid;
        if let Some(kids) = children.get(&pid) {
            for &k in kids {
                // pid 0 is the parent of init and kthreadd: never walk from it.
                if procs[k].pid != pid && procs[k].pid != 0 {
                    out.push(procs[k]);
                }
            }
        }
        at += 1;
        if out.len() > procs.len() {
            break; // a ppid cycle cannot happen, but never loop forever
        }
    }
    out
}

/// Sum of `VmRSS` and of `VmHWM` (KiB) over some pids.
pub fn memory_of(pids: impl Iterator<Item = u32>) -> (u64, u64) {
    let mut rss = 0;
    let mut hwm = 0;
    for pid in pids {
        if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/status")) {
            let (r, h) = parse_status_memory(&text);
            rss += r;
            hwm += h;
        }
    }
    (rss, hwm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_name() {
        let text = "1234 (my (odd) name) R 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 98765 1000000 200 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let s = parse_stat(text).expect("parses");
        assert_eq!(s.pid, 1234);
        assert_eq!(s.ppid, 1);
        assert_eq!(s.cpu_ticks, 300);
        assert_eq!(s.start_time, 98765);
    }

    #[test]
    fn own_stat_and_status() {
        let s = read_stat("self").expect("self stat");
        assert_eq!(s.pid, std::process::id());
        let (rss, hwm) = memory_of(std::iter::once(std::process::id()));
        assert!(rss > 0 && hwm >= rss);
    }

    #[test]
    fn machine_busy() {
        let text = "cpu  10 20 30 400 50 6 7 8 9 10\ncpu0 1 2 3 4 5 6 7 8 9 10\n";
        assert_eq!(parse_machine_busy(text), Some(10 + 20 + 30 + 6 + 7 + 8));
        assert!(read_machine_busy().is_some());
    }

    #[test]
    fn tree_walk() {
        let p = |pid, ppid| ProcStat {
            pid,
            ppid,
            cpu_ticks: 1,
            start_time: 0,
        };
        let procs = [p(1, 0), p(10, 1), p(11, 10), p(12, 10), p(13, 11), p(20, 1)];
        let mut t: Vec<u32> = tree_of(10, &procs).iter().map(|s| s.pid).collect();
        t.sort_unstable();
        assert_eq!(t, vec![10, 11, 12, 13]);
        assert!(tree_of(99, &procs).is_empty());
    }

    #[test]
    fn clk_tck() {
        assert!(clock_ticks_per_second() >= 1.0);
    }
}
