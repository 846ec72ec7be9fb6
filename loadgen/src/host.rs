//! The machine a run is measured on and the UTC time it started, recorded in
//! every result so a report describes the machine that produced the figures,
//! not the one it is rendered on.

use std::fs;
use std::time::SystemTime;

use crate::report::Host;

/// The machine now: hostname, cores, CPU model, memory, kernel and OS, each
/// empty or 0 when it cannot be read.
pub fn host() -> Host {
    let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    let memory_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_default();
    Host {
        hostname: read("/proc/sys/kernel/hostname").trim().to_string(),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model,
        memory_gib: (memory_kib as f64 / (1u64 << 20) as f64 * 10.0).round() / 10.0,
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        os,
    }
}

/// UTC (year, month, day, hour, minute, second) of `t` (the epoch for times
/// before it), without a date library: Howard Hinnant's civil-from-days.
pub fn utc_parts(t: SystemTime) -> (i64, u64, u64, u64, u64, u64) {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `t` as RFC 3339 UTC with whole seconds, e.g. `2026-12-01T22:45:00Z`.
pub fn utc_rfc3339(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s) = utc_parts(t);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn utc_dates_across_a_leap_day() {
        let at = |s: u64| utc_rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        // 2024-02-29T23:59:59Z and the second after it.
        assert_eq!(at(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(at(1_709_251_200), "2024-03-01T00:00:00Z");
    }

    #[test]
    fn host_reads_this_machine() {
        let h = host();
        assert!(h.cores >= 1);
        assert!(!h.kernel.is_empty(), "{h:?}");
        assert!(h.memory_gib > 0.0, "{h:?}");
    }
}
