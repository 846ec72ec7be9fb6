//! The checks that compare what a pool says (its snapshot) and what sessions
//! saw with the truth. Event-level checks (a double lease, a message of another
//! session, live above max) are made where the event happens (`world`,
//! `client`, `backend`); these are the ones made at check points.

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
    s.sessions.remove(&session);
    let ClientReport {
        sent,
        received,
        got_ended,
        graceful,
        ..
    } = client;
    match outcome {
        "ended" => {
            s.stats.sessions_clean += 1;
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
    pub fn session_done(&self, session: u64, outcome: &'static str, faulted: bool) {
        self.with(|s, now| {
            s.trace.record(now, format!("s{session} ended: {outcome}"));
            let r = s.sessions.entry(session).or_default();
            r.outcome = Some(outcome);
            r.faulted = faulted;
            judge_session(s, now, session);
        });
    }
}
