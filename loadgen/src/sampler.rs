//! Once a second: CPU and memory of each watched process tree, and the whole machine's
//! busy CPU. Runs as one task for the whole run; the first sample is taken when it is
//! created (run start) and the last when it is stopped (run end), so CPU seconds cover
//! exactly the run.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::time::MissedTickBehavior;

use crate::procfs::{self, ProcStat};
use crate::report::{Machine, MachineSample, WatchSample, Watched};

const KIB_PER_MIB: f64 = 1024.0;
/// Shortest interval a sample's rate is computed over.
const MIN_SAMPLE_SECS: f64 = 0.5;

struct Tracker {
    pid: u32,
    name: String,
    /// pid -> (start time, cpu ticks) at the previous sample, for the whole tree.
    known: HashMap<u32, (u64, u64)>,
    cpu_ticks: u64,
    samples: Vec<WatchSample>,
    rss_sum_kib: u64,
    rss_points: u64,
    hwm_peak_kib: u64,
    processes: usize,
    found: bool,
    sampled: bool,
    /// Time of the last sample pushed (or the baseline).
    last_t: f64,
    /// Ticks since `last_t`.
    pending_ticks: u64,
    first_t: f64,
    end_t: f64,
}

impl Tracker {
    fn new(pid: u32) -> Self {
        Self {
            pid,
            name: procfs::read_comm(pid).unwrap_or_default(),
            known: HashMap::new(),
            cpu_ticks: 0,
            samples: Vec::new(),
            rss_sum_kib: 0,
            rss_points: 0,
            hwm_peak_kib: 0,
            processes: 0,
            found: false,
            sampled: false,
            last_t: 0.0,
            pending_ticks: 0,
            first_t: 0.0,
            end_t: 0.0,
        }
    }

    fn sample(&mut self, t: f64, procs: &[ProcStat], clk_tck: f64) {
        let tree = procfs::tree_of(self.pid, procs);
        let first = !self.sampled;
        let mut delta = 0u64;
        let mut now = HashMap::with_capacity(tree.len());
        for p in &tree {
            match self.known.get(&p.pid) {
                Some(&(start, prev)) if start == p.start_time => {
                    delta += p.cpu_ticks.saturating_sub(prev);
                }
                // A process that joined the tree since the last sample: all its CPU is new.
                _ if !first => delta += p.cpu_ticks,
                _ => {}
            }
            now.insert(p.pid, (p.start_time, p.cpu_ticks));
        }
        self.known = now;
        if !tree.is_empty() {
            self.found = true;
            self.processes = tree.len();
        }
        let (rss, hwm) = procfs::memory_of(tree.iter().map(|p| p.pid));
        if !tree.is_empty() {
            self.rss_sum_kib += rss;
            self.rss_points += 1;
            self.hwm_peak_kib = self.hwm_peak_kib.max(hwm).max(rss);
        }
        if first {
            self.first_t = t;
        } else {
            self.cpu_ticks += delta;
            self.pending_ticks += delta;
            let dt = t - self.last_t;
            // The last sample (at run end) may come moments after the previous one: its
            // ticks count in cpu_seconds, but a rate over a few ms would be noise.
            if dt >= MIN_SAMPLE_SECS {
                self.samples.push(WatchSample {
                    t: round3(t),
                    cpu_cores: round3(self.pending_ticks as f64 / clk_tck / dt),
                    rss_mb: round3(rss as f64 / KIB_PER_MIB),
                });
                self.pending_ticks = 0;
                self.last_t = t;
            }
        }
        if first {
            self.last_t = t;
        }
        self.sampled = true;
        self.end_t = t;
    }

    fn finish(self, clk_tck: f64) -> Watched {
        let cpu_seconds = self.cpu_ticks as f64 / clk_tck;
        let span = self.end_t - self.first_t;
        Watched {
            pid: self.pid,
            name: self.name,
            found: self.found,
            processes: self.processes,
            cpu_seconds: round3(cpu_seconds),
            cpu_cores_avg: round3(if span > 0.0 { cpu_seconds / span } else { 0.0 }),
            rss_avg_mb: round3(if self.rss_points > 0 {
                self.rss_sum_kib as f64 / self.rss_points as f64 / KIB_PER_MIB
            } else {
                0.0
            }),
            rss_peak_mb: round3(self.hwm_peak_kib as f64 / KIB_PER_MIB),
            samples: self.samples,
        }
    }
}

/// Samples the watched process trees and the machine.
pub(crate) struct Sampler {
    start: Instant,
    clk_tck: f64,
    trackers: Vec<Tracker>,
    machine_first: Option<(f64, u64)>,
    machine_last: Option<(f64, u64)>,
    machine_end: Option<(f64, u64)>,
    machine_samples: Vec<MachineSample>,
}

impl Sampler {
    /// Creates the sampler and takes the first (baseline) sample.
    pub(crate) fn new(pids: &[u32], start: Instant, clk_tck: f64) -> Self {
        let mut s = Self {
            start,
            clk_tck,
            trackers: pids.iter().map(|&p| Tracker::new(p)).collect(),
            machine_first: None,
            machine_last: None,
            machine_end: None,
            machine_samples: Vec::new(),
        };
        s.sample();
        s
    }

    fn sample(&mut self) {
        let t = self.start.elapsed().as_secs_f64();
        if let Some(busy) = procfs::read_machine_busy() {
            match self.machine_last {
                Some((lt, lb)) if t - lt >= MIN_SAMPLE_SECS => {
                    self.machine_samples.push(MachineSample {
                        t: round3(t),
                        cpu_cores: round3(busy.saturating_sub(lb) as f64 / self.clk_tck / (t - lt)),
                    });
                    self.machine_last = Some((t, busy));
                }
                Some(_) => {}
                None => {
                    self.machine_first = Some((t, busy));
                    self.machine_last = Some((t, busy));
                }
            }
            self.machine_end = Some((t, busy));
        }
        if !self.trackers.is_empty() {
            let procs = procfs::all_processes();
            for tr in &mut self.trackers {
                tr.sample(t, &procs, self.clk_tck);
            }
        }
    }

    /// Samples once a second until `stop` fires, then takes a last sample.
    pub(crate) async fn run(mut self, mut stop: oneshot::Receiver<()>) -> (Vec<Watched>, Machine) {
        let second = Duration::from_secs(1);
        let mut ticker = tokio::time::interval_at((self.start + second).into(), second);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.sample(),
                _ = &mut stop => break,
            }
        }
        self.sample();
        self.finish()
    }

    fn finish(self) -> (Vec<Watched>, Machine) {
        let clk = self.clk_tck;
        let watched = self.trackers.into_iter().map(|t| t.finish(clk)).collect();
        let machine = match (self.machine_first, self.machine_end) {
            (Some((t0, b0)), Some((t1, b1))) => {
                let secs = b1.saturating_sub(b0) as f64 / clk;
                let span = t1 - t0;
                Machine {
                    cpu_seconds: round3(secs),
                    cpu_cores_avg: round3(if span > 0.0 { secs / span } else { 0.0 }),
                    samples: self.machine_samples,
                }
            }
            _ => Machine::default(),
        };
        (watched, machine)
    }
}

pub(crate) fn round3(v: f64) -> f64 {
    if v.is_finite() {
        (v * 1000.0).round() / 1000.0
    } else {
        0.0
    }
}
