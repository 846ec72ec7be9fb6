//! The session's judgement of each direction's messages: what is data, what
//! is the fencing protocol, and what must never cross (docs/protocol.md).
//!
//! The fence is a security boundary. A lease's token is random, sent only to
//! the backend, and only a backend `session.ended` carrying it completes the
//! fence; nothing a client can see or say can complete it, and a message
//! carrying the token never reaches the client.

use std::borrow::Cow;

use std::marker::PhantomData;
use std::sync::LazyLock;

use memchr::memmem::Finder;
use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::frame::{self, OP_BINARY, OP_CLOSE, OP_PING, OP_TEXT};
use super::output::Output;
use super::parser::{Flow, Judge, Treat, Verdict};
use super::replay::Offsets;
use super::state::{ControlReply, Dropped, State};
use super::stream::Peer;
use crate::backend::fence;

/// Backend text up to this size is looked at (control messages must be
/// single-frame text messages no larger than this); larger text streams through.
pub(crate) const CONTROL_MAX: u64 = 4096;

/// The keys of a control message the relay reads, with every string value
/// each was given: a key may be repeated, and JSON parsers differ on which
/// one counts (serde's derive refuses the object, Python, JavaScript and Go
/// take the last), so a decision holds only when the values agree. Borrowed
/// where the JSON has no escapes, owned where it has. Other keys and values
/// that are not strings are ignored.
#[derive(Default)]
struct Control<'a> {
    kinds: Vec<Cow<'a, str>>,
    sessions: Vec<Cow<'a, str>>,
    fences: Vec<Cow<'a, str>>,
    /// `ack_bytes` and `end_bytes` (docs/failover.md), when given once as an
    /// unsigned integer; a repeated or other value reads as absent.
    acks: Vec<Option<u64>>,
    ends: Vec<Option<u64>>,
}

impl Control<'_> {
    /// The one value every occurrence of a key agrees on.
    fn agreed<'s>(values: &'s [Cow<'_, str>]) -> Option<&'s str> {
        let (first, rest) = values.split_first()?;
        rest.iter().all(|v| v == first).then_some(first.as_ref())
    }

    /// `type`, when it has one value.
    fn kind(&self) -> Option<&str> {
        Self::agreed(&self.kinds)
    }

    /// `fence`, when it has one value.
    fn fence(&self) -> Option<&str> {
        Self::agreed(&self.fences)
    }

    /// The audio offsets a resumable backend's result carries.
    fn offsets(&self) -> Offsets {
        let one = |v: &[Option<u64>]| match v {
            [one] => *one,
            _ => None,
        };
        Offsets {
            ack: one(&self.acks),
            end: one(&self.ends),
        }
    }

    /// Whether some reading of `type` is in the `session.` namespace.
    fn reserved(&self) -> bool {
        self.kinds.iter().any(|k| k.starts_with("session."))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Control<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Keys<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Keys<'a> {
            type Value = Control<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Control<'a>, M::Error> {
                let mut c = Control::default();
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    let numbers = match key.as_deref() {
                        Some("ack_bytes") => Some(&mut c.acks),
                        Some("end_bytes") => Some(&mut c.ends),
                        _ => None,
                    };
                    if let Some(numbers) = numbers {
                        numbers.push(map.next_value::<serde_json::Value>()?.as_u64());
                        continue;
                    }
                    let values = match key.as_deref() {
                        Some("type") => &mut c.kinds,
                        Some("session") => &mut c.sessions,
                        Some("fence") => &mut c.fences,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    if let Text(Some(v)) = map.next_value::<Text<'de>>()? {
                        values.push(v);
                    }
                }
                Ok(c)
            }
        }
        d.deserialize_map(Keys(PhantomData))
    }
}

/// A JSON value: its text when it is a string, `None` for anything else.
struct Text<'a>(Option<Cow<'a, str>>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'a>, E> {
                Ok(Text(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E>(self, v: &str) -> Result<Text<'a>, E> {
                Ok(Text(Some(Cow::Owned(v.to_owned()))))
            }
            fn visit_string<E>(self, v: String) -> Result<Text<'a>, E> {
                Ok(Text(Some(Cow::Owned(v))))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Text<'a>, E> {
                Ok(Text(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Text<'a>, E> {
                Ok(Text(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Text<'a>, E> {
                Ok(Text(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Text<'a>, E> {
                Ok(Text(None))
            }
            fn visit_unit<E>(self) -> Result<Text<'a>, E> {
                Ok(Text(None))
            }
            fn visit_seq<S: SeqAccess<'de>>(self, mut s: S) -> Result<Text<'a>, S::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
            fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<Text<'a>, M::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// What a client or backend text is to the relay.
enum Reading<'a> {
    /// Not a JSON object: data.
    Data,
    /// A JSON object, read strictly (RFC 8259).
    Object(Control<'a>),
    /// Opens a JSON object that a strict parser refuses but a lenient one
    /// might read, and might read as a control message: it mentions
    /// `session`, or holds a backslash that could spell it (Python's `json`
    /// takes `NaN` and `Infinity`, JSON5 takes unquoted keys, single quotes
    /// and `\x73` escapes).
    Ambiguous,
}

fn read(text: &[u8]) -> Reading<'_> {
    if !text.trim_ascii_start().starts_with(b"{") {
        return Reading::Data;
    }
    match serde_json::from_slice(text) {
        Ok(control) => Reading::Object(control),
        Err(_) if contains(text, b"session") || text.contains(&b'\\') => Reading::Ambiguous,
        Err(_) => Reading::Data,
    }
}

/// Parse a JSON object's control keys; `None` for anything else (data).
fn control(text: &[u8]) -> Option<Control<'_>> {
    match read(text) {
        Reading::Object(control) => Some(control),
        Reading::Data | Reading::Ambiguous => None,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}

// Needles searched for in every backend text, their searchers built once:
// `memmem::find` builds one per call, which costs more than searching a
// 1 KiB message.

/// `"session`: how a backend text naming a session or a `session.*` type
/// spells the key or the value.
static SESSION_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(br#""session"#));
/// `_bytes"`: the tail of the `ack_bytes` and `end_bytes` keys.
static OFFSET_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"_bytes\""));

/// Where a ping's pong goes: straight into the reverse output when that is
/// between frames, else into the owed-pong slot (sent at the next frame
/// boundary; a newer ping replaces an older unanswered one, RFC 6455 §5.5.3).
pub(crate) struct Pong<'a> {
    pub out: &'a mut Output,
    pub busy: bool,
    pub slot: &'a mut Option<ControlReply>,
    pub to: Peer,
}

impl Pong<'_> {
    fn answer(&mut self, payload: &[u8]) {
        if self.busy {
            *self.slot = Some(ControlReply::pong(payload));
        } else {
            let mut f = Vec::with_capacity(payload.len() + frame::MAX_HEADER);
            frame::push_frame(&mut f, frame::OP_PONG, payload, self.to.mask_for_send());
            self.out.push(&f);
        }
    }
}

/// Judges what the client sends.
pub(crate) struct FromClient<'a> {
    pub state: &'a mut State,
    pub pong: Pong<'a>,
}

impl Judge for FromClient<'_> {
    fn treat(&mut self, first: &frame::Header) -> Treat {
        if !self.state.client_may_send_data() {
            Treat::Skip
        } else if first.opcode == OP_TEXT || self.state.resume.is_some() {
            // A resumable session keeps its audio for a replay: held whole
            // (judged where it lies when it came in one read) and recorded.
            Treat::Hold
        } else {
            Treat::Pass
        }
    }

    fn message(&mut self, opcode: u8, payload: &mut [u8]) -> (Verdict, Flow) {
        if !self.state.client_may_send_data() {
            return (Verdict::Drop, Flow::Continue);
        }
        if opcode == OP_BINARY {
            if let Some(r) = self.state.resume.as_deref_mut() {
                r.replay.record(opcode, payload);
            }
            return (Verdict::Forward, Flow::Continue);
        }
        // SIMD validation (simdutf8): std's is several times slower on the
        // kilobyte texts a client may stream, and this runs on every one.
        if simdutf8::basic::from_utf8(payload).is_err() {
            self.state
                .client_fault(1007, "invalid utf-8 in a text message");
            return (Verdict::Drop, Flow::Stop);
        }
        // Every JSON object is parsed (client text is control, not the audio
        // stream, so this is rare): a key or value spelled with JSON escapes
        // is still recognized.
        let (control, reserved) = match read(payload) {
            Reading::Object(control) => {
                let reserved = control.reserved();
                (Some(control), reserved)
            }
            // The backend's parser may be lenient: what it might read as a
            // control message is treated as one in the namespace.
            Reading::Ambiguous => (None, true),
            Reading::Data => (None, false),
        };
        match control.as_ref().and_then(Control::kind) {
            Some("session.end") if self.state.fenced => {
                let end = self.state.end_message();
                self.state.client_ended();
                (Verdict::Replace(end), Flow::Continue)
            }
            Some("session.end") => {
                // Not fenced: the backend gets the client's end as data.
                self.state.client_ended();
                (Verdict::Forward, Flow::Continue)
            }
            // A `type` in the namespace, whichever reading of a repeated
            // `type` a backend takes.
            _ if reserved => {
                self.state.dropped(Dropped::ClientReserved);
                (Verdict::Drop, Flow::Continue)
            }
            _ => {
                if let Some(r) = self.state.resume.as_deref_mut() {
                    r.replay.record(opcode, payload);
                }
                (Verdict::Forward, Flow::Continue)
            }
        }
    }

    fn control(&mut self, opcode: u8, payload: &[u8]) -> Flow {
        match opcode {
            OP_PING => {
                self.pong.answer(payload);
                Flow::Continue
            }
            OP_CLOSE => {
                self.state.client_close_received(payload);
                Flow::Stop
            }
            _ => Flow::Continue,
        }
    }

    fn counted(&mut self, bytes: u64) {
        self.state.counts.to_backend.0 += 1;
        self.state.counts.to_backend.1 += bytes;
    }

    fn too_big(&mut self) {
        self.state.client_fault(1009, "message too big");
    }
}

/// Judges what the backend sends.
pub(crate) struct FromBackend<'a> {
    pub state: &'a mut State,
    pub pong: Pong<'a>,
}

impl Judge for FromBackend<'_> {
    fn treat(&mut self, first: &frame::Header) -> Treat {
        let small_text = first.opcode == OP_TEXT && first.fin && first.len <= CONTROL_MAX;
        if small_text {
            Treat::Hold
        } else if self.state.client_takes_data() {
            Treat::Pass
        } else {
            Treat::Skip
        }
    }

    fn message(&mut self, _opcode: u8, payload: &mut [u8]) -> (Verdict, Flow) {
        let forward = if self.state.client_takes_data() {
            Verdict::Forward
        } else {
            Verdict::Drop
        };
        let offsets_possible = self.state.resume.is_some() && OFFSET_KEY.find(payload).is_some();
        let session_at = SESSION_KEY.find(payload);
        if !offsets_possible && session_at.is_none() {
            // No control message of ours, but the token may still be in it
            // (a backend reflecting the proxy's `session.end` in its own words).
            return token_echo_or(self.state, payload, forward);
        }
        // The common result: it names this session, nothing else. Reading it
        // as JSON (below) would forward it too, at ≈ 6 instructions a byte.
        if let Some(at) = session_at
            && self.state.resume.is_none()
            && names_this_session_only(payload, at, &self.state.id)
            && !self.state.carries_token(payload)
        {
            return (forward, Flow::Continue);
        }
        self.read_control(payload, forward)
    }

    fn control(&mut self, opcode: u8, payload: &[u8]) -> Flow {
        match opcode {
            OP_PING => {
                self.pong.answer(payload);
                Flow::Continue
            }
            OP_CLOSE => {
                let why = match payload {
                    [a, b, ..] => format!("backend closed ({})", u16::from_be_bytes([*a, *b])),
                    _ => "backend closed".to_string(),
                };
                self.state.backend_failed(why);
                Flow::Stop
            }
            _ => Flow::Continue,
        }
    }

    fn counted(&mut self, bytes: u64) {
        self.state.counts.to_client.0 += 1;
        self.state.counts.to_client.1 += bytes;
    }

    fn too_big(&mut self) {
        self.state
            .backend_failed("backend sent a message larger than max_message_size".into());
    }
}

/// Whether a backend text names this session in the one way a byte check can
/// be sure of, and nothing else the relay looks for: no backslash (so no JSON
/// escape spells a key or value another way, and every `"` opens or closes a
/// string), exactly one `"session` (at `at`), spelled `"session":"<id>"`, and
/// an id that needs no escaping. The strict reading ([`control`]) of such a
/// text finds no other session and no `session.*` type in it, so it could
/// only forward it or drop it for carrying the token, which the caller checks
/// apart. The property test `the_fast_path_agrees_with_the_reading` holds the
/// two to the same verdicts.
fn names_this_session_only(text: &[u8], at: usize, id: &str) -> bool {
    let plain_id = !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let named = text[at..]
        .strip_prefix(br#""session":""#)
        .and_then(|rest| rest.strip_prefix(id.as_bytes()))
        .is_some_and(|rest| rest.starts_with(b"\""));
    plain_id
        && named
        && SESSION_KEY.find(&text[at + 1..]).is_none()
        && memchr::memchr(b'\\', text).is_none()
}

/// A backend text that is no control message: dropped if it carries the
/// fence token (which never reaches the client), else `forward`.
fn token_echo_or(st: &mut State, payload: &[u8], forward: Verdict) -> (Verdict, Flow) {
    if st.carries_token(payload) {
        st.dropped(Dropped::TokenEcho);
        return (Verdict::Drop, Flow::Continue);
    }
    (forward, Flow::Continue)
}

impl FromBackend<'_> {
    /// A backend text read as JSON: a session named that is not this one, the
    /// fence's `session.ended`, the token echoed, a replayed result.
    fn read_control(&mut self, payload: &[u8], forward: Verdict) -> (Verdict, Flow) {
        let st = &mut *self.state;
        let Some(c) = control(payload) else {
            // Not a strict JSON object: data, unless it carries the token.
            return token_echo_or(st, payload, forward);
        };
        if c.sessions.iter().any(|s| *s != st.id) {
            st.dropped(Dropped::ForeignSession);
            return (Verdict::Drop, Flow::Continue);
        }
        if c.kind() == Some("session.ended") {
            if st.fence_pending() && c.fence() == Some(st.token()) {
                let verdict = if st.client_takes_data() {
                    let ended = fence::ended_message(&st.id);
                    st.counts.to_client.0 += 1;
                    st.counts.to_client.1 += ended.len() as u64;
                    Verdict::Replace(ended)
                } else {
                    Verdict::Drop
                };
                // After the verdict: completing the fence closes the client.
                st.fence_completed();
                // Nothing after this frame belongs to the session.
                return (verdict, Flow::Stop);
            }
            st.dropped(Dropped::StaleFence);
            return (Verdict::Drop, Flow::Continue);
        }
        if st.carries_token(payload) {
            st.dropped(Dropped::TokenEcho);
            return (Verdict::Drop, Flow::Continue);
        }
        if let Some(r) = st.resume.as_deref_mut() {
            let offsets = c.offsets();
            // After a takeover the new backend says again what the old one
            // said for the replayed audio: the client gets each result once.
            if r.replaying() && (r.replay.stale(offsets) || c.kind() == Some("session.started")) {
                st.dropped(Dropped::Replayed);
                return (Verdict::Drop, Flow::Continue);
            }
            if matches!(forward, Verdict::Forward) {
                r.replay.delivered(offsets);
            }
        }
        (forward, Flow::Continue)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tokio::time::Duration;

    use super::*;
    use crate::relay::state::{BackendPhase, ClientPhase};

    fn state() -> State {
        State::new(
            "s1".into(),
            "0123456789abcdef0123456789abcdef".into(),
            true,
            Duration::from_secs(1),
            Duration::from_secs(1),
            None,
        )
    }

    fn from_client(st: &mut State, text: &str) -> Verdict {
        let mut out = Output::default();
        let mut slot = None;
        let mut j = FromClient {
            state: st,
            pong: Pong {
                out: &mut out,
                busy: false,
                slot: &mut slot,
                to: Peer::Client,
            },
        };
        j.message(OP_TEXT, &mut text.as_bytes().to_vec()).0
    }

    fn from_backend(st: &mut State, text: &str) -> (Verdict, Flow) {
        let mut out = Output::default();
        let mut slot = None;
        let mut j = FromBackend {
            state: st,
            pong: Pong {
                out: &mut out,
                busy: false,
                slot: &mut slot,
                to: Peer::Backend,
            },
        };
        j.message(OP_TEXT, &mut text.as_bytes().to_vec())
    }

    /// A key repeated in one object: serde's derive refused the object, so
    /// `{"type":"x","type":"session.start"}` went to the backend as data —
    /// where Python, JavaScript and Go read the last `type`. Any reading in
    /// the namespace is now reserved; a `type` that is not a string is no
    /// reading at all.
    #[tokio::test]
    async fn a_repeated_type_is_reserved_if_any_reading_is() {
        for forged in [
            r#"{"type":"x","type":"session.start","session":"s2"}"#,
            r#"{"type":"session.start","type":"x"}"#,
            r#"{"type":1,"type":"session.start"}"#,
            r#"{"type":"session.end","type":"session.ended"}"#,
            r#"{"type":"session.end","type":"partial"}"#,
        ] {
            let mut st = state();
            assert!(
                matches!(from_client(&mut st, forged), Verdict::Drop),
                "{forged}"
            );
            assert_eq!(st.dropped[Dropped::ClientReserved as usize], 1);
            assert_eq!(st.client, ClientPhase::Open, "{forged}");
        }
        for data in [
            r#"{"type":"a","type":"b"}"#,
            r#"{"type":["session.start"],"text":{"type":"session.end"}}"#,
        ] {
            let mut st = state();
            assert!(
                matches!(from_client(&mut st, data), Verdict::Forward),
                "{data}"
            );
        }
        // A backend's session.ended names its session and fence once.
        let mut st = state();
        st.start_fence();
        let (v, _) = from_backend(
            &mut st,
            r#"{"type":"session.ended","session":"s1","session":"s2","fence":"0123456789abcdef0123456789abcdef"}"#,
        );
        assert!(matches!(v, Verdict::Drop));
        assert_eq!(st.backend, BackendPhase::Fencing);
    }

    #[tokio::test]
    async fn reserved_client_text_never_reaches_the_backend_whatever_its_spelling() {
        for forged in [
            r#"{"type":"session.ended","session":"s1"}"#,
            r#"{"session":"s1","type":"session.ended","fence":"guess"}"#,
            // What the proxy tells a client of a takeover, sent back by one.
            r#"{"type":"session.failover","session":"s1","failovers":1}"#,
            r#"{"type":"session\u002eended","session":"s1"}"#,
            r#"{"\u0074ype":"session.start","session":"s2"}"#,
            // Not JSON to a strict parser, a control message to a lenient one.
            r#"{"type":"session.start","x":NaN}"#,
            r#"{type:'session.start'}"#,
            r#"{"type":"\x73ession.start"}"#,
            r#"{"type":"s\u0065ssion.start","x":Infinity}"#,
        ] {
            let mut st = state();
            assert!(
                matches!(from_client(&mut st, forged), Verdict::Drop),
                "{forged}"
            );
            assert_eq!(st.dropped[Dropped::ClientReserved as usize], 1);
            assert_eq!(st.client, ClientPhase::Open);
        }
        let mut st = state();
        assert!(matches!(
            from_client(&mut st, r#"{"type":"partial","text":"session.end"}"#),
            Verdict::Forward
        ));
        // Text that is no JSON object, or a broken one nothing could read as
        // a control message, is data.
        for data in [
            "session.start, said the user",
            r#"[{"type":"session.start"}]"#,
            r#"{"level":NaN}"#,
        ] {
            assert!(
                matches!(from_client(&mut st, data), Verdict::Forward),
                "{data}"
            );
        }
        assert_eq!(st.dropped[Dropped::ClientReserved as usize], 0);
        // An escaped session.end is still the end, and becomes the fenced one.
        let Verdict::Replace(end) = from_client(&mut st, r#"{"type":"session\u002eend"}"#) else {
            panic!("session.end not recognized");
        };
        assert!(end.contains(st.token()));
        assert_eq!(st.backend, BackendPhase::Fencing);
    }

    #[tokio::test]
    async fn only_the_tokens_session_ended_completes_the_fence() {
        let mut st = state();
        // As the client's `session.end` does: the backend gets the token.
        st.end_message();
        st.client_ended();
        for wrong in [
            r#"{"type":"session.ended","session":"s1"}"#,
            r#"{"type":"session.ended","session":"s1","fence":"ffffffffffffffffffffffffffffffff"}"#,
            r#"{"type":"session.ended","session":"s2","fence":"0123456789abcdef0123456789abcdef"}"#,
        ] {
            let (v, flow) = from_backend(&mut st, wrong);
            assert!(matches!(v, Verdict::Drop), "{wrong}");
            assert_eq!(flow, Flow::Continue);
            assert_eq!(st.backend, BackendPhase::Fencing);
        }
        // The token never reaches the client, whatever carries it.
        let (v, _) = from_backend(
            &mut st,
            r#"{"type":"partial","session":"s1","text":"0123456789abcdef0123456789abcdef"}"#,
        );
        assert!(matches!(v, Verdict::Drop));
        let (v, flow) = from_backend(
            &mut st,
            r#"{"type":"session.ended","session":"s1","fence":"0123456789abcdef0123456789abcdef"}"#,
        );
        let Verdict::Replace(shown) = v else {
            panic!("the real session.ended must reach the client");
        };
        assert!(!shown.contains(st.token()));
        assert_eq!(flow, Flow::Stop);
        assert_eq!(st.backend, BackendPhase::FenceDone);
    }

    /// `FromBackend::message` without its fast path: the prefilter, then the
    /// strict reading of every text that mentions `"session`.
    fn from_backend_read(st: &mut State, text: &str) -> (Verdict, Flow) {
        let mut out = Output::default();
        let mut slot = None;
        let forward = if st.client_takes_data() {
            Verdict::Forward
        } else {
            Verdict::Drop
        };
        let offsets_possible = st.resume.is_some() && OFFSET_KEY.find(text.as_bytes()).is_some();
        if !offsets_possible && SESSION_KEY.find(text.as_bytes()).is_none() {
            return token_echo_or(st, text.as_bytes(), forward);
        }
        let mut j = FromBackend {
            state: st,
            pong: Pong {
                out: &mut out,
                busy: false,
                slot: &mut slot,
                to: Peer::Backend,
            },
        };
        j.read_control(text.as_bytes(), forward)
    }

    /// Members of a backend result, the awkward ones included: this session
    /// and others, spelled plainly, with spaces, escaped, nested, as a prefix
    /// of a longer key or inside a value; the fence and its token.
    const MEMBERS: &[&str] = &[
        r#""type":"partial""#,
        r#""type":"session.ended""#,
        r#""type":"session.started""#,
        r#""session":"s1""#,
        r#""session":"s2""#,
        r#""session":"s1x""#,
        r#""session":"s""#,
        r#""session": "s2""#,
        r#""session":1"#,
        r#""session":null"#,
        r#""sessions":"s2""#,
        r#""session_id":"s2""#,
        r#""\u0073ession":"s2""#,
        r#""session":"s\u0032""#,
        r#""meta":{"session":"s2"}"#,
        r#""meta":{"session":"s1"}"#,
        r#""text":"session s2""#,
        r#""text":"a \"session\":\"s2\" b""#,
        r#""fence":"0123456789abcdef0123456789abcdef""#,
        r#""fence":"bad""#,
        r#""text":"0123456789abcdef0123456789abcdef""#,
        r#""seq":4"#,
        r#""text":"zzzzzzzzzzzzzzzz""#,
    ];

    proptest::proptest! {
        // Cheap cases, and the divergent ones need two or three particular
        // members together: many of them.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(8192))]

        /// The fast path for results naming this session gives every text
        /// the verdict, flow and counts the strict reading gives it.
        #[test]
        fn the_fast_path_agrees_with_the_reading(
            picks in proptest::collection::vec(0..MEMBERS.len(), 0..6),
            cut in proptest::option::of(0usize..200),
            lead in proptest::sample::select(vec!["", " ", "x", "["]),
            fence_pending in proptest::bool::ANY,
        ) {
            let body = picks.iter().map(|&i| MEMBERS[i]).collect::<Vec<_>>().join(",");
            let mut text = format!("{lead}{{{body}}}");
            if let Some(cut) = cut {
                text.truncate(cut.min(text.len()));
            }
            let (mut fast, mut read) = (state(), state());
            if fence_pending {
                for st in [&mut fast, &mut read] {
                    st.end_message();
                    st.start_fence();
                }
            }
            let (v1, f1) = from_backend(&mut fast, &text);
            let (v2, f2) = from_backend_read(&mut read, &text);
            proptest::prop_assert_eq!(format!("{v1:?}"), format!("{v2:?}"), "{}", text);
            proptest::prop_assert_eq!(f1, f2, "{}", text);
            proptest::prop_assert_eq!(fast.dropped, read.dropped, "{}", text);
            proptest::prop_assert_eq!(
                (format!("{:?}", fast.client), format!("{:?}", fast.backend)),
                (format!("{:?}", read.client), format!("{:?}", read.backend)),
                "{}", text
            );
        }
    }

    /// The fast path takes what it is meant for, and only that.
    #[test]
    fn the_fast_path_is_taken_for_plain_results_only() {
        let yes = br#"{"type":"partial","session":"s1","text":"hello"}"#;
        let at = SESSION_KEY.find(yes).unwrap();
        assert!(names_this_session_only(yes, at, "s1"));
        for no in [
            &br#"{"type":"partial","session":"s1x","text":"hello"}"#[..],
            br#"{"type":"partial","session":"s1","text":"a\nb"}"#,
            br#"{"type":"session.ended","session":"s1"}"#,
            br#"{"session":"s1","session":"s2"}"#,
            br#"{"session": "s1"}"#,
        ] {
            let at = SESSION_KEY.find(no).unwrap();
            assert!(
                !names_this_session_only(no, at, "s1"),
                "{}",
                String::from_utf8_lossy(no)
            );
        }
        assert!(!names_this_session_only(
            br#"{"session":"a\"b"}"#,
            0,
            "a\"b"
        ));
    }

    /// The fence token never reaches the client in a text the relay reads,
    /// whatever the text is: a JSON object or not, naming a session or not.
    #[test]
    fn a_text_carrying_the_token_is_dropped_whatever_its_shape() {
        let token = state().token().to_string();
        // Before the proxy's `session.end` the backend cannot know the token:
        // not searched for.
        let mut st = state();
        let early = format!(r#"{{"type":"echo","fence":"{token}"}}"#);
        assert!(matches!(from_backend(&mut st, &early).0, Verdict::Forward));
        for text in [
            format!(r#"{{"type":"echo","fence":"{token}"}}"#),
            format!(r#"{{"type":"echo","session":"s1","fence":"{token}"}}"#),
            format!(r#"echo: {{"type":"session.end","session":"s1","fence":"{token}"}}"#),
            format!(r#"{{"session":"s1","fence":"{token}""#),
            token.clone(),
        ] {
            let mut st = state();
            st.end_message();
            let (verdict, flow) = from_backend(&mut st, &text);
            assert!(matches!(verdict, Verdict::Drop), "{text}");
            assert_eq!(flow, Flow::Continue, "{text}");
            assert_eq!(st.dropped[Dropped::TokenEcho as usize], 1, "{text}");
        }
    }
}
