//! The checks that compare what a pool says (its snapshot) and what sessions
//! saw with the truth. Event-level checks (a double lease, a message of another
//! session, live above max) are made where the event happens (`world`,
//! `client`, `backend`); these are the ones made at check points.

use std::time::Duration;

use tokio::time::Instant;

use crate::checker::Kind;
use crate::pools::SimSnapshot;
use crate::world::{ClientReport, World, WorldState};

/// Compare a pool's snapshot with the truth. `quiet`: nothing is in flight
/// (no session, no dial, no health check), so idle must equal the open
/// connections exactly.
pub fn check_snapshot(s: &mut WorldState, now: u64, pool: usize, snap: &SimSnapshot, quiet: bool) {
    let t = &s.pools[pool];
    let name = t.name.clone();
    let live_true = t.live();
    let pool_side = t.pool_side();
    let fields: [(&str, u64, u64); 5] = [
        ("live", snap.live as u64, live_true as u64),
        ("acquired_total", snap.acquired, t.acquired),
        ("released_total", snap.released, t.released_kept),
        ("discarded_total", snap.discarded, t.closed),
        ("dial_failures_total", snap.dial_failures, t.dial_failures),
    ];
    for (field, said, truth) in fields {
        s.checker.condition(
            Kind::CounterMismatch,
            &format!("{name} {field}"),
            said != truth,
            now,
            || format!("snapshot says {said}, truth is {truth}"),
            &mut s.trace,
        );
    }
    // Every idle connection the pool reports must exist on the pool's side
    // (else the snapshot lies); at a quiet point every open connection not
    // held by a session must be idle (else one is lost).
    let idle = snap.idle;
    s.checker.condition(
        Kind::CounterMismatch,
        &format!("{name} idle"),
        idle > pool_side,
        now,
        || {
            format!(
                "snapshot idle {idle}, but only {pool_side} open connections on the pool's side"
            )
        },
        &mut s.trace,
    );
    s.checker.condition(
        Kind::LostConnection,
        &format!("{name} lost"),
        quiet && idle < pool_side,
        now,
        || format!("{pool_side} open connections on the pool's side, {idle} of them idle"),
        &mut s.trace,
    );
}

/// Judge a session once both its client and its proxy side have ended.
pub fn judge_session(s: &mut WorldState, now: u64, session: u64) {
    let Some(r) = s.sessions.get(&session) else {
        return;
    };
    let (Some(outcome), Some(client)) = (r.outcome, r.client.clone()) else {
        return;
    };
    let faulted = r.faulted;
    let failover_bound = r.failover_bound;
    let last_fault = r.last_fault;
    s.sessions.remove(&session);
    s.stats.failovers += u64::from(client.failovers);
    let ClientReport {
        sent,
        received,
        got_ended,
        graceful,
        close_code,
        close_at,
        failovers,
    } = client;
    match outcome {
        "ended" => {
            s.stats.sessions_clean += 1;
            match failovers {
                0 => {}
                1 => s.stats.resumed_once += 1,
                _ => s.stats.resumed_twice += 1,
            }
            if !got_ended || received != sent {
                s.checker.event(
                    Kind::LostMessage,
                    now,
                    format!("s{session} ended cleanly but got {received} of {sent} results (ended={got_ended})"),
                    &mut s.trace,
                );
            }
        }
        "no_backend_connection" => s.stats.sessions_rejected += 1,
        other => {
            s.stats.sessions_failed += 1;
            if let Some(bound) = failover_bound {
                if graceful {
                    s.stats.resumable_failed += 1;
                }
                // A resumable session that could not carry on gets 1014 within
                // the failover deadline of its last backend failure.
                if let (Some(1014), Some(closed), Some(failed)) = (close_code, close_at, last_fault)
                {
                    let took = closed.saturating_duration_since(failed);
                    let ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
                    s.stats.worst_failover_close_ms = s.stats.worst_failover_close_ms.max(ms);
                    if took > bound {
                        s.checker.event(
                            Kind::FailoverDeadline,
                            now,
                            format!("s{session}: 1014 {took:?} after its backend failed (bound {bound:?})"),
                            &mut s.trace,
                        );
                    }
                }
            }
            if graceful && !faulted {
                s.checker.event(
                    Kind::LostMessage,
                    now,
                    format!("s{session} on a healthy path ended as {other} ({received} of {sent} results)"),
                    &mut s.trace,
                );
            }
        }
    }
}

impl World {
    /// The client of `session` ended.
    pub fn client_done(&self, session: u64, report: ClientReport) {
        self.with(|s, now| {
            s.sessions.entry(session).or_default().client = Some(report);
            judge_session(s, now, session);
        });
    }

    /// The proxy side of `session` ended with `outcome`.
    pub fn session_done(&self, session: u64, end: ProxyEnd) {
        self.with(|s, now| {
            s.trace
                .record(now, format!("s{session} ended: {}", end.outcome));
            let r = s.sessions.entry(session).or_default();
            r.outcome = Some(end.outcome);
            r.faulted = end.faulted;
            r.last_fault = end.last_fault;
            r.failover_bound = end.failover_bound;
            judge_session(s, now, session);
        });
    }
}

/// How the proxy side of a session ended.
#[derive(Debug, Clone, Copy)]
pub struct ProxyEnd {
    pub outcome: &'static str,
    /// A fault was injected on one of its backend connections.
    pub faulted: bool,
    /// When the last of its backend connections failed.
    pub last_fault: Option<Instant>,
    /// For a session that may fail over: how long after its last backend
    /// failure a 1014 may come at the latest.
    pub failover_bound: Option<Duration>,
}

impl ProxyEnd {
    /// A session that got no further than routing, or may not fail over.
    pub fn plain(outcome: &'static str, faulted: bool) -> Self {
        Self {
            outcome,
            faulted,
            last_fault: None,
            failover_bound: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Clock;
    use crate::truth::PoolTruth;
    use crate::world::ClientReport;

    fn world() -> std::sync::Arc<World> {
        World::new(Clock::start(), vec![PoolTruth::new("p0".into(), 4, 2)])
    }

    fn count(w: &World, kind: Kind) -> u64 {
        w.with(|s, _| s.checker.counts().get(&kind).copied().unwrap_or(0))
    }

    /// A 1014 past `failover_timeout` + one tick after the backend failed is
    /// a violation; one within it is not.
    #[tokio::test(start_paused = true)]
    async fn a_late_1014_is_caught() {
        let w = world();
        let bound = Duration::from_secs(6);
        let failed = Instant::now();
        for (session, after) in [(1, 5), (2, 7)] {
            let close_at = failed + Duration::from_secs(after);
            w.client_done(
                session,
                ClientReport {
                    close_code: Some(1014),
                    close_at: Some(close_at),
                    graceful: true,
                    ..ClientReport::default()
                },
            );
            w.session_done(
                session,
                ProxyEnd {
                    outcome: "backend_failed",
                    faulted: true,
                    last_fault: Some(failed),
                    failover_bound: Some(bound),
                },
            );
        }
        assert_eq!(count(&w, Kind::FailoverDeadline), 1);
        w.with(|s, _| {
            assert_eq!(s.stats.resumable_failed, 2);
            assert_eq!(s.stats.worst_failover_close_ms, 7000);
        });
    }

    /// A session leased from a pool it already had: a takeover went back.
    #[tokio::test(start_paused = true)]
    async fn a_takeover_to_a_used_backend_is_caught() {
        let w = world();
        w.dial_started(0).succeeded(5);
        w.leased(0, 5, 1, false);
        w.returned(0, 5, 1, "discarded");
        assert_eq!(count(&w, Kind::BadTakeover), 0);
        w.leased(0, 5, 1, false);
        assert_eq!(count(&w, Kind::BadTakeover), 1);
    }
}
