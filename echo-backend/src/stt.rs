//! The stt mode's transcript model of one audio stream: which results the audio received so
//! far calls for, with the audio offsets they cover. Pure bookkeeping, no I/O and no clock:
//! the connection decides when results go out (inference slots, delays, errors).
//!
//! Offsets are milliseconds of audio since the session's start (bytes received divided by
//! [`Stt::bytes_per_ms`], rounded down). An *utterance* runs from one simulated pause to the
//! next; a result covers `audio_start_ms..audio_end_ms`, from the start of its utterance to
//! the audio heard so far (a partial) or to the pause (a final). Finals tile the audio
//! without gaps or overlaps, so a client (or a proxy replaying audio after a failover) can
//! tell results it already has by their offsets.

use rand::Rng;
use rand::rngs::SmallRng;

use crate::Stt;

/// What kind of result a [`Step`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Partial,
    Final,
}

/// One result the audio calls for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Step {
    pub(crate) kind: Kind,
    /// Partials are numbered 0, 1, 2 ... per session; a final carries the number the next
    /// partial will get (the count of partials before it) and uses none up.
    pub(crate) seq: u64,
    /// Index of the utterance (0, 1, 2 ... per session).
    pub(crate) utterance: u64,
    pub(crate) audio_start_ms: u64,
    pub(crate) audio_end_ms: u64,
    /// The audio the result reaches in bytes: all bytes heard for a partial, the pause's
    /// offset for a final (`audio_end_ms` × `bytes_per_ms`). A final acknowledges the audio
    /// before it (`ack_bytes`, docs/failover.md).
    pub(crate) end_bytes: u64,
}

/// One session's audio stream (or the audio received outside any session, `id: None`).
#[derive(Debug)]
pub(crate) struct Stream {
    pub(crate) id: Option<String>,
    /// Audio bytes received.
    bytes: u64,
    /// Binary messages received.
    pub(crate) chunks: u64,
    /// The next partial's number.
    seq: u64,
    utterance: u64,
    utterance_start_ms: u64,
    /// Where the current utterance's pause falls; `None`: no pauses.
    utterance_end_ms: Option<u64>,
    /// Audio offset at which the next partial is due (with [`Stt::partial_every`]).
    next_partial_ms: u64,
    /// The session time limit was reached: further audio yields nothing.
    pub(crate) stopped: bool,
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn draw_utterance(stt: &Stt, rng: &mut SmallRng) -> Option<u64> {
    stt.utterance
        .map(|(min, max)| rng.random_range(millis(min)..=millis(max)))
}

impl Stream {
    pub(crate) fn new(id: Option<String>, stt: &Stt, rng: &mut SmallRng) -> Self {
        Self::resumed(id, 0, stt, rng)
    }

    /// A session taken over from another backend (`resume.from_bytes`): its audio resumes
    /// at `from_bytes`, where a final of the other backend ended, so offsets carry on and
    /// a new utterance starts there.
    pub(crate) fn resumed(
        id: Option<String>,
        from_bytes: u64,
        stt: &Stt,
        rng: &mut SmallRng,
    ) -> Self {
        let start_ms = from_bytes / stt.bytes_per_ms.max(1);
        let next_partial_ms = match stt.partial_every.map(millis) {
            Some(every) if every > 0 => (start_ms / every + 1).saturating_mul(every),
            _ => 0,
        };
        Self {
            id,
            bytes: from_bytes,
            chunks: 0,
            seq: 0,
            utterance: 0,
            utterance_start_ms: start_ms,
            utterance_end_ms: draw_utterance(stt, rng).map(|d| start_ms.saturating_add(d)),
            next_partial_ms,
            stopped: false,
        }
    }

    /// Audio bytes received (while not stopped).
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Audio offset reached.
    pub(crate) fn audio_ms(&self, stt: &Stt) -> u64 {
        self.bytes / stt.bytes_per_ms.max(1)
    }

    /// Takes `len` bytes of audio; returns the results it calls for, in order: a final for
    /// each pause crossed, then the partial if one is due.
    pub(crate) fn audio(&mut self, len: usize, stt: &Stt, rng: &mut SmallRng) -> Vec<Step> {
        self.chunks += 1;
        if self.stopped {
            return Vec::new();
        }
        self.bytes = self
            .bytes
            .saturating_add(u64::try_from(len).unwrap_or(u64::MAX));
        let now_ms = self.audio_ms(stt);
        let mut steps = Vec::new();
        while let Some(end) = self.utterance_end_ms
            && end <= now_ms
        {
            steps.push(self.final_until(end, stt));
            let next = draw_utterance(stt, rng).unwrap_or(u64::MAX);
            self.utterance_end_ms = Some(end.saturating_add(next));
        }
        let due = match stt.partial_every {
            None => true,
            Some(every) => {
                let every = millis(every).max(1);
                if now_ms >= self.next_partial_ms {
                    self.next_partial_ms = (now_ms / every + 1).saturating_mul(every);
                    true
                } else {
                    false
                }
            }
        };
        if due {
            steps.push(Step {
                kind: Kind::Partial,
                seq: self.seq,
                utterance: self.utterance,
                audio_start_ms: self.utterance_start_ms,
                audio_end_ms: now_ms,
                end_bytes: self.bytes,
            });
            self.seq += 1;
        }
        steps
    }

    /// The final of the current utterance up to the audio heard (on `session.end` or at
    /// the time limit).
    pub(crate) fn finish(&mut self, stt: &Stt) -> Step {
        let end = self.audio_ms(stt);
        let mut step = self.final_until(end, stt);
        // The session's last final covers every byte heard.
        step.end_bytes = self.bytes;
        step
    }

    /// Whether the current utterance has audio not covered by a final yet.
    pub(crate) fn has_open_utterance(&self, stt: &Stt) -> bool {
        self.audio_ms(stt) > self.utterance_start_ms
    }

    fn final_until(&mut self, end: u64, stt: &Stt) -> Step {
        let step = Step {
            kind: Kind::Final,
            seq: self.seq,
            utterance: self.utterance,
            audio_start_ms: self.utterance_start_ms,
            audio_end_ms: end,
            end_bytes: end.saturating_mul(stt.bytes_per_ms.max(1)).min(self.bytes),
        };
        self.utterance += 1;
        self.utterance_start_ms = end;
        step
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rand::SeedableRng;

    use super::*;

    fn rng() -> SmallRng {
        SmallRng::seed_from_u64(7)
    }

    #[test]
    fn one_partial_per_message_by_default() {
        let stt = Stt::default();
        let mut rng = rng();
        let mut s = Stream::new(Some("a".into()), &stt, &mut rng);
        for seq in 0..3 {
            let steps = s.audio(320, &stt, &mut rng);
            assert_eq!(
                steps,
                [Step {
                    kind: Kind::Partial,
                    seq,
                    utterance: 0,
                    audio_start_ms: 0,
                    audio_end_ms: (seq + 1) * 10,
                    end_bytes: (seq + 1) * 320,
                }]
            );
        }
        let last = s.finish(&stt);
        assert_eq!(
            (last.kind, last.seq, last.audio_end_ms),
            (Kind::Final, 3, 30)
        );
    }

    #[test]
    fn partials_follow_audio_time_not_messages() {
        let stt = Stt {
            partial_every: Some(Duration::from_millis(100)),
            ..Stt::default()
        };
        let mut rng = rng();
        let mut s = Stream::new(None, &stt, &mut rng);
        // 20 ms messages: a partial every 5th, at 100, 200, 300 ms.
        let mut partials = Vec::new();
        for _ in 0..15 {
            partials.extend(s.audio(640, &stt, &mut rng).iter().map(|p| p.audio_end_ms));
        }
        assert_eq!(partials, [100, 200, 300]);
        // One message of 250 ms crosses two multiples: one partial.
        let steps = s.audio(250 * 32, &stt, &mut rng);
        assert_eq!(steps.len(), 1);
        assert_eq!((steps[0].seq, steps[0].audio_end_ms), (3, 550));
    }

    #[test]
    fn finals_tile_the_audio_at_drawn_pauses() {
        let stt = Stt {
            partial_every: Some(Duration::from_millis(100)),
            utterance: Some((Duration::from_millis(300), Duration::from_millis(700))),
            ..Stt::default()
        };
        let mut rng = rng();
        let mut s = Stream::new(Some("x".into()), &stt, &mut rng);
        let mut finals = Vec::new();
        for _ in 0..250 {
            for step in s.audio(640, &stt, &mut rng) {
                if step.kind == Kind::Final {
                    finals.push(step);
                }
            }
        }
        finals.push(s.finish(&stt));
        assert!(finals.len() >= 8, "{finals:?}");
        let mut at = 0;
        for (i, f) in finals.iter().enumerate() {
            assert_eq!(f.utterance, i as u64);
            assert_eq!(f.audio_start_ms, at);
            let len = f.audio_end_ms - f.audio_start_ms;
            if i + 1 < finals.len() {
                assert!((300..=700).contains(&len), "{f:?}");
            }
            at = f.audio_end_ms;
        }
        assert_eq!(at, 5000);
        // The same seed draws the same pauses.
        let mut rng2 = SmallRng::seed_from_u64(7);
        let mut again = Stream::new(Some("x".into()), &stt, &mut rng2);
        let first_end = (0..250)
            .flat_map(|_| again.audio(640, &stt, &mut rng2))
            .find(|s| s.kind == Kind::Final)
            .map(|s| s.audio_end_ms);
        assert_eq!(first_end, Some(finals[0].audio_end_ms));
    }

    #[test]
    fn a_stopped_stream_yields_nothing() {
        let stt = Stt::default();
        let mut rng = rng();
        let mut s = Stream::new(Some("x".into()), &stt, &mut rng);
        s.audio(32, &stt, &mut rng);
        s.stopped = true;
        assert!(s.audio(32, &stt, &mut rng).is_empty());
        assert_eq!(s.chunks, 2);
    }

    #[test]
    fn a_resumed_stream_carries_the_offsets_on() {
        let stt = Stt {
            utterance: Some((Duration::from_millis(100), Duration::from_millis(100))),
            ..Stt::default()
        };
        let mut rng = rng();
        // Resumed at 2 s of audio (64,000 bytes): a new utterance starts there.
        let mut s = Stream::resumed(Some("a".into()), 64_000, &stt, &mut rng);
        let steps = s.audio(3_200 + 320, &stt, &mut rng);
        let fin = steps[0];
        assert_eq!(
            (
                fin.kind,
                fin.audio_start_ms,
                fin.audio_end_ms,
                fin.end_bytes
            ),
            (Kind::Final, 2_000, 2_100, 67_200)
        );
        let partial = steps[1];
        assert_eq!(
            (partial.kind, partial.audio_start_ms, partial.end_bytes),
            (Kind::Partial, 2_100, 67_520)
        );
        let last = s.finish(&stt);
        assert_eq!((last.audio_start_ms, last.end_bytes), (2_100, 67_520));
    }
}
