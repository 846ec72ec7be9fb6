//! The session's judgement of each direction's messages: what is data, what
//! is the fencing protocol, and what must never cross (docs/protocol.md).
//!
//! The fence is a security boundary. A lease's token is random, sent only to
//! the backend, and only a backend `session.ended` carrying it completes the
//! fence; nothing a client can see or say can complete it, and a message
//! carrying the token never reaches the client.

use serde::Deserialize;

use super::frame::{self, OP_CLOSE, OP_PING, OP_TEXT};
use super::output::Output;
use super::parser::{Flow, Judge, Treat, Verdict};
use super::stream::Peer;
use super::state::{ControlReply, Dropped, State};
use crate::backend::fence;

/// Backend text up to this size is looked at (control messages must be
/// single-frame text messages no larger than this); larger text streams through.
pub(crate) const CONTROL_MAX: u64 = 4096;

/// The keys of a control message the relay reads; others are ignored.
#[derive(Deserialize)]
struct Control<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<&'a str>,
    #[serde(borrow, default)]
    session: Option<&'a str>,
    #[serde(borrow, default)]
    fence: Option<&'a str>,
}

/// Parse a JSON object's control keys; `None` for anything else (data).
fn control(text: &[u8]) -> Option<Control<'_>> {
    if !text.trim_ascii_start().starts_with(b"{") {
        return None;
    }
    serde_json::from_slice(text).ok()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}

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
        } else if first.opcode == OP_TEXT {
            Treat::Hold
        } else {
            Treat::Pass
        }
    }

    fn message(&mut self, _opcode: u8, payload: &mut [u8]) -> (Verdict, Flow) {
        if !self.state.client_may_send_data() {
            return (Verdict::Drop, Flow::Continue);
        }
        if std::str::from_utf8(payload).is_err() {
            self.state.client_fault(1007, "invalid utf-8 in a text message");
            return (Verdict::Drop, Flow::Stop);
        }
        if !contains(payload, br#""session."#) {
            return (Verdict::Forward, Flow::Continue);
        }
        match control(payload).and_then(|c| c.kind) {
            Some("session.end") if self.state.fenced => {
                let end = fence::end_message(&self.state.id, &self.state.token);
                self.state.client_ended();
                (Verdict::Replace(end), Flow::Continue)
            }
            Some("session.end") => {
                // Not fenced: the backend gets the client's end as data.
                self.state.client_ended();
                (Verdict::Forward, Flow::Continue)
            }
            Some(kind) if kind.starts_with("session.") => {
                self.state.dropped(Dropped::ClientReserved);
                (Verdict::Drop, Flow::Continue)
            }
            _ => (Verdict::Forward, Flow::Continue),
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
        if !contains(payload, br#""session"#) {
            return (forward, Flow::Continue);
        }
        let st = &mut *self.state;
        let Some(c) = control(payload) else {
            return (forward, Flow::Continue);
        };
        if c.session.is_some_and(|s| s != st.id) {
            st.dropped(Dropped::ForeignSession);
            return (Verdict::Drop, Flow::Continue);
        }
        if c.kind == Some("session.ended") {
            if st.fence_pending() && c.fence == Some(st.token.as_str()) {
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
        if contains(payload, st.token.as_bytes()) {
            st.dropped(Dropped::TokenEcho);
            return (Verdict::Drop, Flow::Continue);
        }
        (forward, Flow::Continue)
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
