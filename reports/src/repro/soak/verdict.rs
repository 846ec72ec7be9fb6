//! The soak's judgement: pure functions over what the run recorded (the load
//! generator's result, the proxy's samples and metrics, the fault log, the
//! misbehaving clients' outcomes), so each rule is unit-tested on its own.

use std::collections::BTreeMap;

use serde::Serialize;

/// One sample of the proxy, taken every few seconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    /// Seconds since the load started.
    pub t: f64,
    pub rss_mb: f64,
    /// `sttproxy_runtime_tasks`.
    pub tasks: f64,
    /// `sttproxy_sessions_active`.
    pub sessions: f64,
}

/// Least-squares slope of `y` over `x` (per unit of `x`); `None` with fewer
/// than two distinct `x`.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx <= f64::EPSILON {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    Some(sxy / sxx)
}

/// Slopes per minute of RSS and of the task count over the steady part of the
/// run: samples from `from_s` (after the warm-up) to `to_s` (before the
/// arrivals stop and the sessions drain away).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Slopes {
    pub samples: usize,
    pub rss_mb_per_min: Option<f64>,
    pub tasks_per_min: Option<f64>,
    /// Of the sessions: the task count follows it, so a task slope means
    /// something only beside this one.
    pub sessions_per_min: Option<f64>,
    pub mean_rss_mb: f64,
    pub mean_tasks: f64,
}

pub fn slopes(samples: &[Sample], from_s: f64, to_s: f64) -> Slopes {
    let steady: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.t >= from_s && s.t <= to_s)
        .collect();
    let per_min = |f: fn(&Sample) -> f64| {
        let pts: Vec<(f64, f64)> = steady.iter().map(|s| (s.t / 60.0, f(s))).collect();
        slope(&pts)
    };
    let n = steady.len().max(1) as f64;
    Slopes {
        samples: steady.len(),
        rss_mb_per_min: per_min(|s| s.rss_mb),
        tasks_per_min: per_min(|s| s.tasks),
        sessions_per_min: per_min(|s| s.sessions),
        mean_rss_mb: steady.iter().map(|s| s.rss_mb).sum::<f64>() / n,
        mean_tasks: steady.iter().map(|s| s.tasks).sum::<f64>() / n,
    }
}

/// A rule of the soak and whether the run kept it.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub rule: String,
    pub held: bool,
    pub detail: String,
}

impl Check {
    pub fn new(rule: impl Into<String>, held: bool, detail: impl Into<String>) -> Self {
        Self {
            rule: rule.into(),
            held,
            detail: detail.into(),
        }
    }
}

/// The rules as a Markdown table (after a blank line).
pub fn rules_table(checks: &[Check]) -> String {
    let mut s = String::from("| rule | held | detail |\n|---|---|---|\n");
    for c in checks {
        s.push_str(&format!(
            "| {} | {} | {} |\n",
            c.rule,
            if c.held { "yes" } else { "**NO**" },
            c.detail.replace('|', "\\|")
        ));
    }
    s
}

/// An error naming the rules that failed (`what` says whose), or `Ok`.
pub fn fail_on(what: &str, checks: &[Check]) -> anyhow::Result<()> {
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.held)
        .map(|c| c.rule.as_str())
        .collect();
    if !failed.is_empty() {
        anyhow::bail!(
            "{what}: {} rule(s) failed: {}",
            failed.len(),
            failed.join("; ")
        );
    }
    Ok(())
}

/// Seconds of the load generator's timeline (each entry covers `(t-1, t]`)
/// with aborted sessions that no backend kill explains: an abort is
/// explained when its second overlaps `[kill - before, kill + after]` of a
/// kill. Returns (second, aborted) of the unexplained ones.
pub fn unexplained_aborts(
    timeline: &[(f64, u64)],
    kills_s: &[f64],
    before: f64,
    after: f64,
) -> Vec<(f64, u64)> {
    timeline
        .iter()
        .filter(|&&(_, aborted)| aborted > 0)
        .filter(|&&(t, _)| {
            !kills_s
                .iter()
                .any(|&k| t >= k - before && t - 1.0 <= k + after)
        })
        .copied()
        .collect()
}

/// Abort kinds a backend kill is expected to cause: the proxy closes the
/// session with 1014, which loadgen's tungstenite reports as
/// `close_1002_unallowed_code` (see loadgen's `close_kind`); the connection
/// then ends after that Close (`closed_during_stream`, or tungstenite's
/// `protocol_error` for what follows its substituted Close).
pub const KILL_KINDS: [&str; 4] = [
    "close_1014",
    "close_1002_unallowed_code",
    "closed_during_stream",
    "protocol_error",
];

/// The Close kinds a backend kill causes (one per aborted session).
pub const KILL_CLOSES: [&str; 2] = ["close_1014", "close_1002_unallowed_code"];

/// Abort kinds (the load generator's `errors`) other than those a backend
/// kill is expected to cause ([`KILL_KINDS`]).
pub fn unexpected_kinds(errors: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    errors
        .iter()
        .filter(|(kind, _)| !KILL_KINDS.contains(&kind.as_str()))
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_rules_are_named_and_the_table_escapes_pipes() {
        let checks = [
            Check::new("a held", true, "x | y"),
            Check::new("b failed", false, "z"),
            Check::new("c failed", false, ""),
        ];
        let table = rules_table(&checks);
        assert!(table.contains("| a held | yes | x \\| y |\n"), "{table}");
        assert!(table.contains("| b failed | **NO** | z |\n"), "{table}");
        let err = fail_on("soak", &checks).unwrap_err().to_string();
        assert_eq!(err, "soak: 2 rule(s) failed: b failed; c failed");
        assert!(fail_on("soak", &checks[..1]).is_ok());
    }

    #[test]
    fn slope_of_a_line_is_its_gradient_and_of_a_flat_series_zero() {
        let line: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 + 2.0 * i as f64)).collect();
        assert!((slope(&line).unwrap_or(f64::NAN) - 2.0).abs() < 1e-9);
        let flat: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 7.0)).collect();
        assert_eq!(slope(&flat), Some(0.0));
        assert_eq!(slope(&[(1.0, 1.0)]), None);
        assert_eq!(slope(&[(1.0, 1.0), (1.0, 5.0)]), None);
    }

    #[test]
    fn slopes_use_only_the_steady_window_and_are_per_minute() {
        // RSS climbs 1 MB a second during the warm-up, then stays flat;
        // tasks grow 1 a second throughout.
        let samples: Vec<Sample> = (0..=120)
            .step_by(5)
            .map(|t| Sample {
                t: t as f64,
                rss_mb: 10.0 + (t.min(30)) as f64,
                tasks: 100.0 + t as f64,
                sessions: 50.0,
            })
            .collect();
        let s = slopes(&samples, 30.0, 120.0);
        assert_eq!(s.samples, 19);
        assert!(s.rss_mb_per_min.is_some_and(|v| v.abs() < 1e-9));
        assert!(s.tasks_per_min.is_some_and(|v| (v - 60.0).abs() < 1e-6));
        assert_eq!(s.sessions_per_min, Some(0.0));
        assert!((s.mean_rss_mb - 40.0).abs() < 1e-9);
    }

    #[test]
    fn aborts_near_a_kill_are_explained_and_others_are_not() {
        let timeline = vec![(59.0, 0), (60.0, 3), (61.0, 12), (62.0, 1), (90.0, 2)];
        // A kill at 60.4 s: seconds (59, 60] … (62, 63] lie in [59.4, 63.4].
        let left = unexplained_aborts(&timeline, &[60.4], 1.0, 3.0);
        assert_eq!(left, vec![(90.0, 2)]);
        // No kill at all: every abort is unexplained.
        assert_eq!(unexplained_aborts(&timeline, &[], 1.0, 3.0).len(), 4);
    }

    #[test]
    fn only_a_kills_close_is_an_expected_abort_kind() {
        let errors: BTreeMap<String, u64> = [
            ("close_1014".to_string(), 40),
            ("close_1002_unallowed_code".to_string(), 40),
            ("closed_during_stream".to_string(), 80),
            ("close_1002".to_string(), 3),
            ("close_1011".to_string(), 4),
            ("drain_timeout".to_string(), 1),
            ("connect_refused".to_string(), 2),
        ]
        .into_iter()
        .collect();
        let u = unexpected_kinds(&errors);
        assert_eq!(
            u.keys().map(String::as_str).collect::<Vec<_>>(),
            [
                "close_1002",
                "close_1011",
                "connect_refused",
                "drain_timeout"
            ]
        );
    }
}
