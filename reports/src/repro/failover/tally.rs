//! What the failover scenario's clients saw, counted: one [`SessionLog`] per
//! session (filled by [`super::client`]), turned into a per-second
//! [`timeline`] and a [`Summary`] per system. Pure functions over the logs, so
//! the counting is tested without sockets.

use std::collections::BTreeMap;

use serde::Serialize;

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It streamed to the end, sent `session.end` and got `session.ended`.
    Completed,
    /// It ended otherwise: `close_<code>` (a 1002 "Protocol violation" from
    /// tungstenite counted as `close_1014`, see docs/protocol.md),
    /// `reset_without_close`, `io_<kind>`, `eof`, `drain_timeout`, ...
    Aborted(String),
    /// It never got a WebSocket session.
    ConnectFailed(String),
}

/// One session, as its client saw it. Times are seconds since the load
/// started.
#[derive(Debug, Clone)]
pub struct SessionLog {
    pub connected_at: Option<f64>,
    pub ended_at: f64,
    pub outcome: Outcome,
    /// Results (partials and finals) received in each second of the run:
    /// index `k` is `[k, k + 1)`.
    pub results_per_s: Vec<u32>,
    /// When each `session.failover` notice arrived.
    pub failovers: Vec<f64>,
    /// Per notice followed by a result: milliseconds from the last result
    /// before the notice to the first one after it.
    pub pauses_ms: Vec<f64>,
    /// Results that did not move on: a partial whose `end_bytes` did not
    /// exceed the previous partial's, a final whose audio did not start
    /// where the previous final's ended.
    pub repeated: u64,
    /// Messages naming another session than the one this client started.
    pub cross_session: u64,
}

impl SessionLog {
    pub fn new(ended_at: f64, outcome: Outcome) -> Self {
        Self {
            connected_at: None,
            ended_at,
            outcome,
            results_per_s: Vec::new(),
            failovers: Vec::new(),
            pauses_ms: Vec::new(),
            repeated: 0,
            cross_session: 0,
        }
    }

    /// Count a result received at `t`.
    pub fn result_at(&mut self, t: f64) {
        let k = t.max(0.0) as usize;
        if self.results_per_s.len() <= k {
            self.results_per_s.resize(k + 1, 0);
        }
        self.results_per_s[k] += 1;
    }

    fn aborted(&self) -> bool {
        matches!(self.outcome, Outcome::Aborted(_))
    }
}

/// One second of the run, `[t - 1, t)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Second {
    /// End of the second, seconds since the load started.
    pub t: f64,
    /// Sessions connected and not ended at `t`.
    pub open: u64,
    /// Sessions that received at least one result in the second.
    pub receiving: u64,
    /// Sessions that ended abnormally in the second.
    pub ended: u64,
    /// `session.failover` notices received in the second.
    pub failovers: u64,
}

/// The per-second timeline over `seconds` seconds.
pub fn timeline(logs: &[SessionLog], seconds: usize) -> Vec<Second> {
    let in_second = |t: f64, k: usize| t >= k as f64 && t < (k + 1) as f64;
    (0..seconds)
        .map(|k| {
            let end = (k + 1) as f64;
            let count =
                |f: &dyn Fn(&SessionLog) -> bool| logs.iter().filter(|l| f(l)).count() as u64;
            Second {
                t: end,
                open: count(&|l| l.connected_at.is_some_and(|c| c <= end) && l.ended_at > end),
                receiving: count(&|l| l.results_per_s.get(k).is_some_and(|n| *n > 0)),
                ended: count(&|l| l.aborted() && in_second(l.ended_at, k)),
                failovers: logs
                    .iter()
                    .flat_map(|l| &l.failovers)
                    .filter(|t| in_second(**t, k))
                    .count() as u64,
            }
        })
        .collect()
}

/// Percentiles of the failover pauses, milliseconds (nearest rank).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Pause {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Pause {
    pub fn of(mut values: Vec<f64>) -> Option<Self> {
        values.retain(|v| v.is_finite());
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let rank =
            |p: f64| values[((p * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
        Some(Self {
            n: values.len(),
            p50: rank(0.50),
            p99: rank(0.99),
            max: values[values.len() - 1],
        })
    }
}

/// One system's sessions, summed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub started: u64,
    pub connected: u64,
    pub completed: u64,
    pub aborted: u64,
    pub connect_failed: u64,
    /// Aborted and failed sessions by how they ended.
    pub ended_by: BTreeMap<String, u64>,
    /// Sessions that received at least one `session.failover`.
    pub failed_over: u64,
    /// ... and of those, the ones that then completed cleanly.
    pub failed_over_completed: u64,
    pub failover_notices: u64,
    /// From the last result before a notice to the first after it.
    pub pause_ms: Option<Pause>,
    pub repeated: u64,
    pub cross_session: u64,
}

pub fn summarize(logs: &[SessionLog]) -> Summary {
    let mut ended_by = BTreeMap::new();
    for l in logs {
        if let Outcome::Aborted(kind) | Outcome::ConnectFailed(kind) = &l.outcome {
            *ended_by.entry(kind.clone()).or_default() += 1;
        }
    }
    let count = |f: &dyn Fn(&SessionLog) -> bool| logs.iter().filter(|l| f(l)).count() as u64;
    Summary {
        started: logs.len() as u64,
        connected: count(&|l| l.connected_at.is_some()),
        completed: count(&|l| l.outcome == Outcome::Completed),
        aborted: count(&|l| l.aborted()),
        connect_failed: count(&|l| matches!(l.outcome, Outcome::ConnectFailed(_))),
        ended_by,
        failed_over: count(&|l| !l.failovers.is_empty()),
        failed_over_completed: count(&|l| {
            !l.failovers.is_empty() && l.outcome == Outcome::Completed
        }),
        failover_notices: logs.iter().map(|l| l.failovers.len() as u64).sum(),
        pause_ms: Pause::of(
            logs.iter()
                .flat_map(|l| l.pauses_ms.iter().copied())
                .collect(),
        ),
        repeated: logs.iter().map(|l| l.repeated).sum(),
        cross_session: logs.iter().map(|l| l.cross_session).sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(connected: f64, ended: f64, outcome: Outcome) -> SessionLog {
        let mut l = SessionLog::new(ended, outcome);
        l.connected_at = Some(connected);
        l
    }

    #[test]
    fn the_timeline_counts_open_receiving_ended_and_notices_per_second() {
        let mut survivor = session(0.2, 5.5, Outcome::Completed);
        for t in [0.5, 1.5, 2.1, 3.9, 4.2] {
            survivor.result_at(t);
        }
        survivor.failovers.push(2.05);
        let mut killed = session(0.3, 2.4, Outcome::Aborted("close_1014".into()));
        killed.result_at(0.9);
        killed.result_at(1.1);
        let never = SessionLog::new(0.1, Outcome::ConnectFailed("connect_failed".into()));
        let t = timeline(&[survivor, killed, never], 6);
        assert_eq!(t.len(), 6);
        let open: Vec<u64> = t.iter().map(|s| s.open).collect();
        assert_eq!(open, [2, 2, 1, 1, 1, 0]);
        let receiving: Vec<u64> = t.iter().map(|s| s.receiving).collect();
        assert_eq!(receiving, [2, 2, 1, 1, 1, 0]);
        let ended: Vec<u64> = t.iter().map(|s| s.ended).collect();
        assert_eq!(ended, [0, 0, 1, 0, 0, 0]);
        let failovers: Vec<u64> = t.iter().map(|s| s.failovers).collect();
        assert_eq!(failovers, [0, 0, 1, 0, 0, 0]);
        assert_eq!(t[2].t, 3.0);
    }

    #[test]
    fn the_summary_tells_survivors_from_the_ended() {
        let mut a = session(0.0, 10.0, Outcome::Completed);
        a.failovers.push(4.0);
        a.pauses_ms.push(120.0);
        let mut b = session(0.0, 10.0, Outcome::Completed);
        b.failovers.push(4.1);
        b.pauses_ms.push(80.0);
        b.repeated = 1;
        let c = session(0.0, 10.0, Outcome::Completed);
        let d = session(0.0, 4.0, Outcome::Aborted("reset_without_close".into()));
        let mut e = session(0.0, 4.0, Outcome::Aborted("close_1014".into()));
        e.failovers.push(3.9);
        e.cross_session = 2;
        let s = summarize(&[a, b, c, d, e]);
        assert_eq!(
            (s.started, s.connected, s.completed, s.aborted),
            (5, 5, 3, 2)
        );
        assert_eq!(
            (s.failed_over, s.failed_over_completed, s.failover_notices),
            (3, 2, 3)
        );
        assert_eq!(s.ended_by.get("close_1014"), Some(&1));
        assert_eq!(s.ended_by.get("reset_without_close"), Some(&1));
        assert_eq!((s.repeated, s.cross_session), (1, 2));
        let p = s.pause_ms.unwrap();
        assert_eq!((p.n, p.p50, p.p99, p.max), (2, 80.0, 120.0, 120.0));
    }

    #[test]
    fn pause_percentiles_are_nearest_rank() {
        assert_eq!(Pause::of(vec![]), None);
        let p = Pause::of((1..=100).rev().map(f64::from).collect()).unwrap();
        assert_eq!((p.n, p.p50, p.p99, p.max), (100, 50.0, 99.0, 100.0));
        let one = Pause::of(vec![7.0, f64::NAN]).unwrap();
        assert_eq!((one.n, one.p50, one.p99), (1, 7.0, 7.0));
    }
}
