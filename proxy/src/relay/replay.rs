//! [`Replay`]: what a resumable session keeps so that another backend can
//! take it over mid-session (docs/failover.md): the client's data messages
//! the backend has not acknowledged yet, and what the client has been given.
//!
//! Offsets are bytes of the client's audio: the payload bytes of its binary
//! messages since the session started. A backend acknowledges audio with
//! `ack_bytes` (every result for the audio before it has been sent) and tags
//! a result with `end_bytes` (the audio it reaches); see docs/protocol.md.
//!
//! Invariants:
//! - The entries are the client's forwarded data messages in order, each
//!   with the audio offset at which it was sent; binary entries tile the
//!   audio from `entries[0]`'s offset to `audio`, without gaps.
//! - `lost` is the end of the last audio evicted unacknowledged (by the byte
//!   or time bound): a takeover is possible only while `lost <= acked`,
//!   i.e. nothing the new backend needs was given up.
//! - Memory: `bytes` holds at most `max_bytes` (plus one message); its
//!   allocation is freed when it empties.

use std::collections::VecDeque;

use tokio::time::{Duration, Instant};

use super::frame::{OP_BINARY, OP_TEXT};

/// One client data message kept for replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    /// Audio offset at which the message was sent (its first byte's offset
    /// for audio; for text, the audio sent before it).
    at: u64,
    len: usize,
    text: bool,
    /// Order of arrival, for eviction by age.
    seq: u64,
}

/// The bounds of a session's replay buffer.
#[derive(Debug, Clone, Copy)]
pub struct ReplayLimits {
    pub max_bytes: usize,
    pub max_age: Duration,
}

/// A resumable session's replay buffer and delivery record.
#[derive(Debug)]
pub(crate) struct Replay {
    limits: ReplayLimits,
    entries: VecDeque<Entry>,
    /// The entries' payloads, back to back.
    bytes: VecDeque<u8>,
    /// Audio bytes the client has sent.
    audio: u64,
    /// The highest `ack_bytes` passed to the client.
    pub acked: u64,
    /// The highest `end_bytes` passed to the client.
    pub delivered_end: u64,
    /// End of audio evicted before it was acknowledged.
    lost: u64,
    next_seq: u64,
    /// `(when, next_seq then)`, one per tick, for eviction by age.
    marks: VecDeque<(Instant, u64)>,
}

/// What a backend result says of the audio, read by the relay's judge.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Offsets {
    pub ack: Option<u64>,
    pub end: Option<u64>,
}

impl Offsets {
    pub fn any(&self) -> bool {
        self.ack.is_some() || self.end.is_some()
    }
}

impl Replay {
    pub fn new(limits: ReplayLimits) -> Self {
        Self {
            limits,
            entries: VecDeque::new(),
            bytes: VecDeque::new(),
            audio: 0,
            acked: 0,
            delivered_end: 0,
            lost: 0,
            next_seq: 0,
            marks: VecDeque::new(),
        }
    }

    /// Keep a data message the client sent (payload unmasked).
    pub fn record(&mut self, opcode: u8, payload: &[u8]) {
        let text = opcode == OP_TEXT;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.push_back(Entry {
            at: self.audio,
            len: payload.len(),
            text,
            seq,
        });
        self.bytes.extend(payload);
        if !text {
            self.audio += payload.len() as u64;
        }
        while self.bytes.len() > self.limits.max_bytes && self.entries.len() > 1 {
            self.evict_front();
        }
    }

    /// Whether a result with these offsets tells the client nothing new: it
    /// advances neither the acknowledged audio nor the audio results reach.
    /// Results without offsets are never stale.
    pub fn stale(&self, o: Offsets) -> bool {
        o.any()
            && o.ack.is_none_or(|a| a <= self.acked)
            && o.end.is_none_or(|e| e <= self.delivered_end)
    }

    /// A result with these offsets went to the client: the audio before its
    /// `ack_bytes` is forgotten. Offsets past the audio the client has sent
    /// are the backend's error (or a lie): they count as the audio sent, so
    /// they can neither free audio not yet sent nor make every later result
    /// look stale after a takeover.
    pub fn delivered(&mut self, o: Offsets) {
        if let Some(end) = o.end {
            self.delivered_end = self.delivered_end.max(end.min(self.audio));
        }
        if let Some(ack) = o.ack {
            let ack = ack.min(self.audio);
            if ack > self.acked {
                self.acked = ack;
                self.delivered_end = self.delivered_end.max(ack);
                self.forget_before(ack);
            }
        }
    }

    /// Drop entries the backend needs no more: audio wholly before `ack`,
    /// text sent before it.
    fn forget_before(&mut self, ack: u64) {
        while let Some(e) = self.entries.front() {
            let done = if e.text {
                e.at < ack
            } else {
                e.at + e.len as u64 <= ack
            };
            if !done {
                break;
            }
            self.bytes.drain(..e.len);
            self.entries.pop_front();
        }
        if self.entries.is_empty() {
            self.bytes = VecDeque::new();
        }
    }

    fn evict_front(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.bytes.drain(..e.len);
            // A takeover needs audio from `acked` on, and text sent at or
            // after it: either evicted leaves it impossible until the
            // backend acknowledges past it.
            let needed_until = if e.text {
                e.at + 1
            } else {
                e.at + e.len as u64
            };
            self.lost = self.lost.max(needed_until);
        }
    }

    /// Once per tick: evict what is older than `max_age`.
    pub fn tick(&mut self, now: Instant) {
        self.marks.push_back((now, self.next_seq));
        let Some(horizon) = now.checked_sub(self.limits.max_age) else {
            return;
        };
        let mut keep_from = None;
        while let Some(&(at, seq)) = self.marks.front() {
            if at > horizon {
                break;
            }
            keep_from = Some(seq);
            self.marks.pop_front();
        }
        if let Some(seq) = keep_from {
            while self.entries.front().is_some_and(|e| e.seq < seq) {
                self.evict_front();
            }
            if self.entries.is_empty() {
                self.bytes = VecDeque::new();
            }
        }
    }

    /// Whether another backend can take the session over: nothing it would
    /// need has been evicted.
    pub fn resumable(&self) -> bool {
        self.lost <= self.acked
    }

    /// The audio offset a takeover resumes from.
    pub fn resume_from(&self) -> u64 {
        self.acked
    }

    /// The messages a new backend must be sent, in order, from the
    /// acknowledged offset: `(opcode, payload)`; the first audio message is
    /// cut at the offset when it straddles it.
    pub fn replay(&self) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::with_capacity(self.entries.len());
        let mut pos = 0;
        for e in &self.entries {
            let range = pos..pos + e.len;
            pos += e.len;
            if e.text {
                out.push((OP_TEXT, self.bytes.range(range).copied().collect()));
                continue;
            }
            let skip = self.acked.saturating_sub(e.at).min(e.len as u64) as usize;
            if skip == e.len {
                continue;
            }
            let payload = self.bytes.range(range.start + skip..range.end).copied();
            out.push((OP_BINARY, payload.collect()));
        }
        out
    }

    /// Bytes held (for the memory bound's tests).
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.bytes.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    fn limits(max_bytes: usize) -> ReplayLimits {
        ReplayLimits {
            max_bytes,
            max_age: Duration::from_secs(30),
        }
    }

    fn audio(replayed: &[(u8, Vec<u8>)]) -> Vec<u8> {
        replayed
            .iter()
            .filter(|(op, _)| *op == OP_BINARY)
            .flat_map(|(_, p)| p.iter().copied())
            .collect()
    }

    #[test]
    fn replays_from_the_acknowledged_byte_cutting_the_first_message() {
        let mut r = Replay::new(limits(1 << 20));
        r.record(OP_TEXT, b"{\"config\":1}");
        r.record(OP_BINARY, &[1; 100]);
        r.record(OP_BINARY, &[2; 100]);
        r.record(OP_TEXT, b"mark");
        r.record(OP_BINARY, &[3; 100]);
        r.delivered(Offsets {
            ack: Some(150),
            end: Some(150),
        });
        let replay = r.replay();
        assert_eq!(r.resume_from(), 150);
        assert_eq!(replay.len(), 3, "{replay:?}");
        assert_eq!(replay[0], (OP_BINARY, vec![2; 50]));
        assert_eq!(replay[1], (OP_TEXT, b"mark".to_vec()));
        assert_eq!(replay[2], (OP_BINARY, vec![3; 100]));
        assert!(r.resumable());
        // An acknowledgement past everything frees the buffer.
        r.delivered(Offsets {
            ack: Some(300),
            end: None,
        });
        assert_eq!(r.held(), 0);
        assert!(r.replay().is_empty());
    }

    #[test]
    fn offsets_past_the_audio_sent_count_as_the_audio_sent() {
        let mut r = Replay::new(limits(1 << 20));
        r.record(OP_BINARY, &[1; 100]);
        // A backend claiming results for audio it was never sent.
        r.delivered(Offsets {
            ack: Some(10_000),
            end: Some(u64::MAX),
        });
        assert_eq!((r.acked, r.delivered_end), (100, 100));
        assert!(r.replay().is_empty());
        // Audio sent after the lie is still kept for a takeover, and a new
        // backend's results for it are not stale.
        r.record(OP_BINARY, &[2; 100]);
        assert_eq!(r.resume_from(), 100);
        assert_eq!(r.replay(), vec![(OP_BINARY, vec![2; 100])]);
        assert!(!r.stale(Offsets {
            ack: None,
            end: Some(150),
        }));
        assert!(r.stale(Offsets {
            ack: Some(100),
            end: Some(100),
        }));
    }

    #[test]
    fn stale_results_advance_nothing() {
        let mut r = Replay::new(limits(1 << 20));
        r.record(OP_BINARY, &[0; 1000]);
        r.delivered(Offsets {
            ack: None,
            end: Some(600),
        });
        r.delivered(Offsets {
            ack: Some(400),
            end: Some(400),
        });
        let partial = |end| Offsets {
            ack: None,
            end: Some(end),
        };
        let fin = |ack| Offsets {
            ack: Some(ack),
            end: Some(ack),
        };
        assert!(r.stale(partial(600)));
        assert!(r.stale(partial(500)));
        assert!(!r.stale(partial(601)));
        assert!(r.stale(fin(400)));
        // A final before the delivered partials' end is news: it commits.
        assert!(!r.stale(fin(500)));
        assert!(!r.stale(Offsets::default()));
    }

    #[test]
    fn evicting_unacknowledged_audio_makes_the_session_unresumable() {
        let mut r = Replay::new(limits(250));
        for i in 0..3u8 {
            r.record(OP_BINARY, &[i; 100]);
        }
        assert!(!r.resumable());
        assert!(r.held() <= 250);
        // Acknowledged past what was evicted: resumable again.
        r.delivered(Offsets {
            ack: Some(100),
            end: None,
        });
        assert!(r.resumable());
    }

    #[test]
    fn evicts_by_age_on_ticks() {
        let mut r = Replay::new(ReplayLimits {
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(10),
        });
        let t0 = Instant::now();
        r.record(OP_BINARY, &[1; 10]);
        r.tick(t0);
        r.record(OP_BINARY, &[2; 10]);
        r.tick(t0 + Duration::from_secs(5));
        r.tick(t0 + Duration::from_secs(10));
        // The first message (before the t0 mark) is gone, the second stays.
        assert_eq!(r.held(), 10);
        assert!(!r.resumable());
        assert_eq!(audio(&r.replay()), vec![2; 10]);
    }

    proptest! {
        /// Whatever the messages and acknowledgements, the replay is exactly
        /// the audio from the acknowledged offset to the end.
        #[test]
        fn replay_is_the_audio_after_the_ack(
            sizes in proptest::collection::vec(1usize..300, 1..40),
            acks in proptest::collection::vec(0u64..12_000, 0..10),
        ) {
            let mut r = Replay::new(limits(1 << 20));
            let mut all = Vec::new();
            for (i, n) in sizes.iter().enumerate() {
                let payload: Vec<u8> = (0..*n).map(|j| (i * 7 + j) as u8).collect();
                all.extend_from_slice(&payload);
                r.record(OP_BINARY, &payload);
            }
            for a in acks {
                r.delivered(Offsets { ack: Some(a), end: None });
            }
            let from = r.resume_from() as usize;
            prop_assert!(from <= all.len());
            prop_assert_eq!(audio(&r.replay()), all[from..].to_vec());
        }
    }
}
