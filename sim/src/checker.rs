//! Violations: what was broken, when, and the events that led to it.
//!
//! A condition checked again and again (a counter that disagrees with the
//! truth) counts once per *episode*: from the moment it is first seen until it
//! holds again. Events that are wrong in themselves (a connection leased twice,
//! a message delivered to the wrong session) count each time.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::trace::{Trace, TraceEvent};

/// The invariants a run checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Live connections (open + dials in flight) above the pool's max.
    OverMax,
    /// A connection leased to a session while another session held it.
    DoubleLease,
    /// The pool handed a session a connection its backend had already closed.
    DeadHandout,
    /// A connection open at the backend that is neither idle in the pool,
    /// leased, nor closed; or one still open after shutdown.
    LostConnection,
    /// A snapshot counter that disagrees with the truth.
    CounterMismatch,
    /// A release that kept a connection above target, or closed a healthy one
    /// at or below target.
    ReleaseContract,
    /// A client received a message of another session.
    CrossSession,
    /// A message lost on a healthy path, or a healthy session that did not end cleanly.
    LostMessage,
    /// A session reused a backend connection without fencing it.
    Unfenced,
    /// A connection went back to the pool before its backend sent the real
    /// `session.ended` (the fence was completed by something else).
    ForgedFence,
    /// A connection was leased after its backend wrote bytes of an ended
    /// session onto it (past `session.ended`, or while it was idle).
    LateFrame,
    /// A client received a fence token.
    TokenLeak,
    /// After the faults stopped, the pool did not reach its target in time.
    NotConverged,
    /// A task still alive after shutdown.
    LeakedTask,
    /// A client left waiting: its session did not end in time.
    HungSession,
    /// A client of a resumable session got a result twice, out of order, or
    /// past the audio it sent: partials' `end_bytes` must strictly increase,
    /// finals must tile the audio from 0 without a gap or an overlap, a
    /// `session.failover` must resume where the client's finals end.
    ResultOrder,
    /// A takeover went where it must not: to a backend that does not speak
    /// `resume`, or to a backend the session already had.
    BadTakeover,
    /// A resumable session closed with 1014 later than `failover_timeout`
    /// plus one relay tick after its backend failed.
    FailoverDeadline,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::OverMax => "over_max",
            Kind::DoubleLease => "double_lease",
            Kind::DeadHandout => "dead_handout",
            Kind::LostConnection => "lost_connection",
            Kind::CounterMismatch => "counter_mismatch",
            Kind::ReleaseContract => "release_contract",
            Kind::CrossSession => "cross_session",
            Kind::LostMessage => "lost_message",
            Kind::Unfenced => "unfenced",
            Kind::ForgedFence => "forged_fence",
            Kind::LateFrame => "late_frame",
            Kind::TokenLeak => "token_leak",
            Kind::NotConverged => "not_converged",
            Kind::LeakedTask => "leaked_task",
            Kind::HungSession => "hung_session",
            Kind::ResultOrder => "result_order",
            Kind::BadTakeover => "bad_takeover",
            Kind::FailoverDeadline => "failover_deadline",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The first violation of a kind, with the events before it.
#[derive(Debug, Clone)]
pub struct Violation {
    pub kind: Kind,
    pub at_ms: u64,
    pub detail: String,
    pub trace: Vec<TraceEvent>,
}

#[derive(Debug, Default)]
pub struct Checker {
    counts: BTreeMap<Kind, u64>,
    /// Conditions currently violated: (kind, subject).
    active: BTreeSet<(Kind, String)>,
    first: BTreeMap<Kind, Violation>,
}

impl Checker {
    /// Report a violating event.
    pub fn event(&mut self, kind: Kind, at_ms: u64, detail: String, trace: &mut Trace) {
        *self.counts.entry(kind).or_insert(0) += 1;
        trace.record(at_ms, format!("VIOLATION {kind}: {detail}"));
        self.first.entry(kind).or_insert_with(|| Violation {
            kind,
            at_ms,
            detail,
            trace: trace.last(),
        });
    }

    /// Report whether a condition about `subject` holds now; counts an episode
    /// each time it turns from holding to violated.
    pub fn condition(
        &mut self,
        kind: Kind,
        subject: &str,
        violated: bool,
        at_ms: u64,
        detail: impl FnOnce() -> String,
        trace: &mut Trace,
    ) {
        let key = (kind, subject.to_string());
        if violated {
            if self.active.insert(key) {
                self.event(kind, at_ms, format!("{subject}: {}", detail()), trace);
            }
        } else if self.active.contains(&key) {
            self.active.remove(&key);
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    pub fn counts(&self) -> &BTreeMap<Kind, u64> {
        &self.counts
    }

    /// The first violation of each kind, earliest first.
    pub fn first(&self) -> Vec<Violation> {
        let mut v: Vec<Violation> = self.first.values().cloned().collect();
        v.sort_by_key(|x| x.at_ms);
        v
    }
}
