//! What a client of a resumable session checks of its results
//! (docs/failover.md): results carry offsets in bytes of the client's audio,
//! and whatever the proxy does across a failover, the client must see each
//! result once and in order.
//!
//! - a partial's `end_bytes` strictly increases (a repeat or a step back is a
//!   violation) and never passes the audio sent;
//! - finals tile the audio: each starts (`start_bytes`) where the previous
//!   ended, covers some audio, acknowledges its end (`ack_bytes`), and never
//!   passes the audio sent;
//! - a `session.failover` resumes (`resume_from_bytes`) where the client's
//!   finals end (the proxy resumes at the last acknowledged offset), and
//!   counts the session's failovers one by one;
//! - at a clean end, the finals reach the end of the audio sent (nothing lost).
//!
//! Results without offsets (a fenced backend's) are not its business.

use serde_json::Value;

/// One client's record of the offsets it has been given.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ledger {
    /// `end_bytes` of the last partial.
    pub partial_end: u64,
    /// The finals tile `0..finals_end`.
    pub finals_end: u64,
    /// `session.failover` notices seen.
    pub failovers: u32,
    /// Some result carried offsets (the session is on a resumable backend).
    pub offsets_seen: bool,
}

fn field(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

impl Ledger {
    /// Check one message of the client's own session, `sent` audio bytes
    /// after the session started; `Err` says what is wrong with it.
    pub fn take(&mut self, v: &Value, sent: u64) -> Result<(), String> {
        let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
        if kind == "session.failover" {
            let from = field(v, "resume_from_bytes");
            let n = field(v, "failovers");
            self.failovers += 1;
            if from != Some(self.finals_end) {
                return Err(format!(
                    "failover resumes from byte {from:?}, the finals given reach {}",
                    self.finals_end
                ));
            }
            if n != Some(u64::from(self.failovers)) {
                return Err(format!(
                    "failover notice counts {n:?}, this is failover {}",
                    self.failovers
                ));
            }
            return Ok(());
        }
        let Some(end) = field(v, "end_bytes") else {
            return Ok(());
        };
        self.offsets_seen = true;
        if end > sent {
            return Err(format!("{kind} reaches byte {end}, only {sent} sent"));
        }
        match kind {
            "partial" => {
                if end <= self.partial_end {
                    return Err(format!(
                        "partial ends at byte {end}, a partial before ended at {} (repeated or out of order)",
                        self.partial_end
                    ));
                }
                self.partial_end = end;
            }
            "final" => {
                let start = field(v, "start_bytes").unwrap_or(u64::MAX);
                if start != self.finals_end {
                    let what = if start < self.finals_end {
                        "overlaps (repeats)"
                    } else {
                        "leaves a gap after"
                    };
                    return Err(format!(
                        "final {start}..{end} {what} the finals given, which reach {}",
                        self.finals_end
                    ));
                }
                if end <= start {
                    return Err(format!("final {start}..{end} covers no audio"));
                }
                if field(v, "ack_bytes") != Some(end) {
                    return Err(format!(
                        "final {start}..{end} acknowledges {:?}",
                        field(v, "ack_bytes")
                    ));
                }
                self.finals_end = end;
            }
            _ => {}
        }
        Ok(())
    }

    /// At a clean end of a session that sent `sent` audio bytes: the finals
    /// cover all of it.
    pub fn finish(&self, sent: u64) -> Result<(), String> {
        if self.offsets_seen && self.finals_end != sent {
            return Err(format!(
                "ended cleanly with finals up to byte {} of {sent}",
                self.finals_end
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    fn partial(end: u64) -> Value {
        json!({"type": "partial", "session": "s1", "end_bytes": end})
    }

    fn fin(start: u64, end: u64) -> Value {
        json!({"type": "final", "session": "s1", "start_bytes": start, "end_bytes": end, "ack_bytes": end})
    }

    fn notice(from: u64, n: u32) -> Value {
        json!({"type": "session.failover", "session": "s1", "resume_from_bytes": from, "failovers": n})
    }

    /// A failover as the proxy must show it: partials go on increasing,
    /// finals go on tiling, the notice resumes at the finals' end.
    #[test]
    fn a_clean_failover_passes() {
        let mut l = Ledger::default();
        for v in [
            partial(100),
            partial(200),
            fin(0, 200),
            partial(300),
            notice(200, 1),
            fin(200, 300),
            partial(400),
            fin(300, 400),
        ] {
            l.take(&v, 400).unwrap();
        }
        l.finish(400).unwrap();
        assert_eq!(l.failovers, 1);
    }

    #[test]
    fn a_repeated_partial_is_caught() {
        let mut l = Ledger::default();
        l.take(&partial(100), 300).unwrap();
        l.take(&partial(200), 300).unwrap();
        let e = l.take(&partial(200), 300).unwrap_err();
        assert!(e.contains("repeated"), "{e}");
        assert!(l.take(&partial(150), 300).is_err(), "a step back");
    }

    #[test]
    fn a_repeated_or_overlapping_final_is_caught() {
        let mut l = Ledger::default();
        l.take(&fin(0, 200), 400).unwrap();
        let e = l.take(&fin(0, 200), 400).unwrap_err();
        assert!(e.contains("overlaps"), "{e}");
        assert!(l.take(&fin(100, 300), 400).is_err());
        let e = l.take(&fin(300, 400), 400).unwrap_err();
        assert!(e.contains("gap"), "{e}");
        assert!(l.take(&fin(200, 200), 400).is_err(), "an empty final");
    }

    #[test]
    fn results_past_the_audio_sent_or_a_wrong_resume_are_caught() {
        let mut l = Ledger::default();
        assert!(l.take(&partial(500), 400).is_err());
        let mut l = Ledger::default();
        l.take(&fin(0, 200), 400).unwrap();
        assert!(
            l.take(&notice(100, 1), 400).is_err(),
            "resumes before the finals' end"
        );
        assert!(
            l.take(&notice(200, 1), 400).is_err(),
            "counted twice as failover 1"
        );
    }

    #[test]
    fn a_clean_end_short_of_the_audio_is_caught() {
        let mut l = Ledger::default();
        l.take(&fin(0, 200), 400).unwrap();
        assert!(l.finish(400).is_err());
        // Without offsets (a fenced backend), nothing to say.
        let mut l = Ledger::default();
        l.take(&json!({"type": "partial", "session": "s1", "seq": 1}), 400)
            .unwrap();
        l.finish(400).unwrap();
    }
}
