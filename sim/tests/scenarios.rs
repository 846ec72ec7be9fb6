//! Every scenario against our pool on a fixed set of seeds: any violation
//! fails the test and prints its event trace and the command that replays it.
//! Plus: runs are deterministic, and the naive design's failures are caught
//! (the checks are not vacuous).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use sim::checker::Kind;
use sim::pools::PoolKind;
use sim::scenario;
use sim::{RunReport, RunSpec, run};

const SEEDS: [u64; 6] = [1, 2, 3, 4, 5, 6];
/// Fault phase per run (plus warm-up, settling and shutdown).
const DURATION: Duration = Duration::from_secs(300);

fn run_one(name: &str, seed: u64, pool: PoolKind, duration: Duration) -> RunReport {
    let scenario = scenario::find(name).unwrap_or_else(|| panic!("no scenario {name}"));
    run(&RunSpec {
        scenario,
        seed,
        pool,
        duration,
    })
    .expect("runtime")
}

fn ours_holds(name: &str) -> Vec<RunReport> {
    ours_holds_on(name, &SEEDS, DURATION)
}

fn ours_holds_on(name: &str, seeds: &[u64], duration: Duration) -> Vec<RunReport> {
    seeds
        .iter()
        .map(|&seed| {
            let r = run_one(name, seed, PoolKind::Ours, duration);
            assert!(
                r.total_violations() == 0,
                "ours violated an invariant:\n{}",
                r.render(true)
            );
            assert!(r.settled_after.is_some(), "{}", r.render(true));
            assert!(r.stats.sessions_started > 0, "{}", r.render(false));
            r
        })
        .collect()
}

#[test]
fn steady() {
    ours_holds("steady");
}

#[test]
fn dial_faults() {
    ours_holds("dial-faults");
}

#[test]
fn conn_deaths() {
    ours_holds("conn-deaths");
}

#[test]
fn late_pongs() {
    ours_holds("late-pongs");
}

#[test]
fn backend_crash() {
    ours_holds("backend-crash");
}

#[test]
fn config_storm() {
    ours_holds("config-storm");
}

#[test]
fn client_churn() {
    ours_holds("client-churn");
}

#[test]
fn cold_start() {
    ours_holds("cold-start");
}

#[test]
fn chaos() {
    ours_holds("chaos");
}

/// Clients forge `session.ended` (and backends reflect it back); no fence
/// completes but by the backend's real `session.ended`, and nothing crosses.
#[test]
fn forged_fence() {
    for r in ours_holds("forged-fence") {
        assert!(r.stats.forged > 0, "nobody forged:\n{}", r.render(false));
        assert!(
            r.stats.sessions_clean > r.stats.forged,
            "{}",
            r.render(false)
        );
    }
}

/// Backends send frames of ended sessions; no connection carrying one is
/// leased again.
#[test]
fn late_frame() {
    for r in ours_holds("late-frame") {
        assert!(
            r.stats.late_frames > 0,
            "no late frame sent:\n{}",
            r.render(false)
        );
    }
}

/// One backend at a time crashes under sessions: every graceful session on a
/// resumable backend carries on elsewhere (none ends otherwise), and the
/// clients' ledgers find nothing repeated, out of order or lost.
#[test]
fn failover_crash() {
    for r in ours_holds("failover-crash") {
        let st = &r.stats;
        assert!(
            st.resumed_once > 0,
            "nothing failed over:\n{}",
            r.render(false)
        );
        assert_eq!(st.resumable_failed, 0, "{}", r.render(false));
    }
}

/// Two backends crash in turn: sessions moved onto the second move again.
#[test]
fn failover_twice() {
    let runs = ours_holds("failover-twice");
    for r in &runs {
        assert!(r.stats.resumed_once > 0, "{}", r.render(false));
    }
    assert!(
        runs.iter().any(|r| r.stats.resumed_twice > 0),
        "no session failed over twice"
    );
}

/// Every backend down: sessions in flight get 1014, within the deadline
/// (checked per session: `Kind::FailoverDeadline`).
#[test]
fn failover_down() {
    for r in ours_holds("failover-down") {
        let st = &r.stats;
        assert!(
            st.resumable_failed > 0,
            "nobody got 1014:\n{}",
            r.render(false)
        );
        assert!(st.worst_failover_close_ms > 0, "{}", r.render(false));
    }
}

/// Failover under everything (leased connections dying, dial faults, a
/// target storm, two crashes a cycle); the slowest scenario to
/// simulate, so fewer and shorter runs here (`sim sweep` runs it in full).
#[test]
fn failover_chaos() {
    let runs = ours_holds_on("failover-chaos", &SEEDS[..3], Duration::from_secs(120));
    assert!(
        runs.iter().any(|r| r.stats.resumed_once > 0),
        "nothing failed over"
    );
}

/// The failover checks are not vacuous: a backend that resumes its offsets
/// at 0 instead of `from_bytes` makes clients see results that repeat or
/// leave gaps.
#[test]
fn a_broken_resume_is_caught() {
    let mut scenario = scenario::find("failover-crash").unwrap();
    scenario.backend.resume_from_zero = true;
    let r = run(&RunSpec {
        scenario,
        seed: 1,
        pool: PoolKind::Ours,
        duration: Duration::from_secs(120),
    })
    .expect("runtime");
    assert!(
        r.violations.contains_key(&Kind::ResultOrder),
        "a broken resume went unseen:\n{}",
        r.render(false)
    );
}

#[test]
fn every_scenario_is_tested() {
    let tested = [
        "steady",
        "dial-faults",
        "conn-deaths",
        "late-pongs",
        "backend-crash",
        "config-storm",
        "client-churn",
        "cold-start",
        "chaos",
        "forged-fence",
        "late-frame",
        "failover-crash",
        "failover-twice",
        "failover-down",
        "failover-chaos",
    ];
    let all: Vec<&str> = scenario::all().iter().map(|s| s.name).collect();
    assert_eq!(all, tested, "a scenario was added without its test");
}

#[test]
fn a_seed_replays_exactly() {
    for pool in [PoolKind::Ours, PoolKind::Naive] {
        let d = Duration::from_secs(120);
        let a = run_one("chaos", 11, pool, d);
        let b = run_one("chaos", 11, pool, d);
        assert_eq!(
            a.trace_hash, b.trace_hash,
            "{pool:?}: same seed, different runs"
        );
        assert_eq!(a.events, b.events);
        assert_eq!(a.violations, b.violations);
        assert_eq!(a.stats.acquire_waits_ms, b.stats.acquire_waits_ms);
        let c = run_one("chaos", 12, pool, d);
        assert_ne!(
            a.trace_hash, c.trace_hash,
            "{pool:?}: the seed changes nothing"
        );
    }
}

/// The naive design's known failures are found (and reported, not hidden).
#[test]
fn naive_failures_are_caught() {
    let d = Duration::from_secs(120);
    let storm = run_one("config-storm", 1, PoolKind::Naive, d);
    for kind in [Kind::ReleaseContract, Kind::NotConverged] {
        assert!(
            storm.violations.contains_key(&kind),
            "{kind} not seen:\n{}",
            storm.render(false)
        );
    }
    let pongs = run_one("late-pongs", 1, PoolKind::Naive, d);
    for kind in [
        Kind::LeakedTask,
        Kind::LostConnection,
        Kind::CounterMismatch,
    ] {
        assert!(
            pongs.violations.contains_key(&kind),
            "{kind} not seen:\n{}",
            pongs.render(false)
        );
    }
    let deaths = run_one("conn-deaths", 1, PoolKind::Naive, d);
    for kind in [Kind::OverMax, Kind::DeadHandout] {
        assert!(
            deaths.violations.contains_key(&kind),
            "{kind} not seen:\n{}",
            deaths.render(false)
        );
    }
    let dials = run_one("dial-faults", 1, PoolKind::Naive, d);
    let ours = run_one("dial-faults", 1, PoolKind::Ours, d);
    assert!(
        dials.p99_wait_ms() > 10 * ours.p99_wait_ms().max(10),
        "naive p99 acquire wait {} ms vs ours {} ms",
        dials.p99_wait_ms(),
        ours.p99_wait_ms()
    );
}
