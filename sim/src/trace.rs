//! The event trace of a run: the last events (for a violation report that
//! shows what led to it) and a running hash of all of them (two runs of one
//! seed must hash the same).

use std::collections::VecDeque;
use std::fmt;

/// How many events a violation report shows.
pub const KEEP: usize = 50;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEvent {
    /// Virtual milliseconds since the run started.
    pub at_ms: u64,
    pub text: String,
}

impl fmt::Display for TraceEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:>10.3}s  {}", self.at_ms as f64 / 1000.0, self.text)
    }
}

#[derive(Debug)]
pub struct Trace {
    ring: VecDeque<TraceEvent>,
    hash: u64,
    count: u64,
}

impl Default for Trace {
    fn default() -> Self {
        Self {
            ring: VecDeque::with_capacity(KEEP),
            hash: 0xcbf2_9ce4_8422_2325,
            count: 0,
        }
    }
}

impl Trace {
    pub fn record(&mut self, at_ms: u64, text: String) {
        for b in at_ms.to_le_bytes().iter().chain(text.as_bytes()) {
            self.hash = (self.hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.count += 1;
        if self.ring.len() == KEEP {
            self.ring.pop_front();
        }
        self.ring.push_back(TraceEvent { at_ms, text });
    }

    /// The last events, oldest first.
    pub fn last(&self) -> Vec<TraceEvent> {
        self.ring.iter().cloned().collect()
    }

    pub fn hash(&self) -> u64 {
        self.hash
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}
