//! The fencing protocol's control messages (docs/protocol.md) and the stt mode's results.
//!
//! The proxy's `session.end` carries a fence token (`"fence"`) that only the proxy and the
//! backend know; `session.ended` echoes it back unchanged, and only that reply completes the
//! proxy's fence. A `session.end` without a token (an older proxy, a test) gets a
//! `session.ended` without one.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::stt::{Kind, Step};

/// The proxy's control messages start with these bytes (the fast path).
const CONTROL_PREFIX: &[u8] = br#"{"type":"session."#;
/// Any control message contains this, whatever the order of its keys.
const CONTROL_MARKER: &str = r#""session."#;

/// A control message from the proxy.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Control {
    Start {
        session: String,
        /// `resume.from_bytes`: the session was taken over from another
        /// backend, and its audio resumes at this offset.
        resume_from: Option<u64>,
    },
    End {
        session: Option<String>,
        /// The proxy's fence token, echoed back in `session.ended` as it was given.
        fence: Option<Value>,
    },
}

#[derive(Deserialize)]
struct RawControl<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    fence: Option<Value>,
    #[serde(default)]
    resume: Option<RawResume>,
}

#[derive(Deserialize)]
struct RawResume {
    from_bytes: u64,
}

/// Recognizes a control message: a text message that parses as a JSON object whose `type`
/// is `session.start` or `session.end`. Everything else is data.
///
/// Cheap for data: only text that starts with `{"type":"session.` (the proxy's form), or a
/// JSON object with `"session.` in it (keys in another order), is parsed at all.
pub(crate) fn parse_control(text: &str) -> Option<Control> {
    let candidate = text.as_bytes().starts_with(CONTROL_PREFIX)
        || (text.trim_start().starts_with('{') && text.contains(CONTROL_MARKER));
    if !candidate {
        return None;
    }
    let raw: RawControl<'_> = serde_json::from_str(text).ok()?;
    match raw.kind.as_ref() {
        "session.start" => Some(Control::Start {
            session: raw.session.unwrap_or_default(),
            resume_from: raw.resume.map(|r| r.from_bytes),
        }),
        "session.end" => Some(Control::End {
            session: raw.session,
            fence: raw.fence,
        }),
        _ => None,
    }
}

#[derive(Serialize)]
struct Reply<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    session: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fence: Option<&'a Value>,
}

fn render(reply: &Reply<'_>) -> String {
    // Serializing a struct of strings and integers into a String cannot fail; fall back to
    // an empty object rather than panic if it ever did.
    serde_json::to_string(reply).unwrap_or_else(|_| String::from("{}"))
}

/// `{"type":"session.started","session":ID}`
pub(crate) fn started(session: &str) -> String {
    render(&Reply {
        kind: "session.started",
        session: Some(session),
        fence: None,
    })
}

/// `{"type":"session.ended","session":ID,"fence":TOKEN}`: the fence token of the
/// `session.end` it answers, echoed as it was given; no `fence` key if it had none.
pub(crate) fn ended(session: &str, fence: Option<&Value>) -> String {
    render(&Reply {
        kind: "session.ended",
        session: Some(session),
        fence,
    })
}

/// A result or error event of the stt mode (docs/protocol.md, "The echo-backend's stt
/// mode"). Keys absent from an event are left out.
#[derive(Serialize)]
struct Event<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    session: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    utterance: Option<u64>,
    audio_start_ms: u64,
    audio_end_ms: u64,
    /// The audio this result reaches, in bytes (the proxy's failover offsets).
    #[serde(skip_serializing_if = "Option::is_none")]
    end_bytes: Option<u64>,
    /// Every result for the audio before this byte has been sent (finals).
    #[serde(skip_serializing_if = "Option::is_none")]
    ack_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    queue_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
}

fn render_event(event: &Event<'_>) -> String {
    // As in `render`: cannot fail for these field types.
    serde_json::to_string(event).unwrap_or_else(|_| String::from("{}"))
}

/// The text of a result: `partial N: D ms` (D: audio in the partial), `utterance U: A-B ms`
/// for a final at a pause.
pub(crate) fn text(step: &Step) -> String {
    match step.kind {
        Kind::Partial => format!(
            "partial {}: {} ms",
            step.seq,
            step.audio_end_ms - step.audio_start_ms
        ),
        Kind::Final => format!(
            "utterance {}: {}-{} ms",
            step.utterance, step.audio_start_ms, step.audio_end_ms
        ),
    }
}

/// The text of the final sent on `session.end`: `final: C chunks, B bytes` (the session's
/// audio messages and bytes).
pub(crate) fn closing_text(chunks: u64, bytes: u64) -> String {
    format!("final: {chunks} chunks, {bytes} bytes")
}

/// `{"type":"partial"|"final","session":ID,"seq":N,"utterance":U,"audio_start_ms":A,
/// "audio_end_ms":B,"queue_ms":Q,"text":...}`; `session` is null outside a session.
pub(crate) fn result(session: Option<&str>, step: &Step, queue_ms: u64, text: &str) -> String {
    let kind = match step.kind {
        Kind::Partial => "partial",
        Kind::Final => "final",
    };
    render_event(&Event {
        kind,
        session,
        code: None,
        seq: Some(step.seq),
        utterance: Some(step.utterance),
        audio_start_ms: step.audio_start_ms,
        audio_end_ms: step.audio_end_ms,
        end_bytes: Some(step.end_bytes),
        ack_bytes: (step.kind == Kind::Final).then_some(step.end_bytes),
        queue_ms: Some(queue_ms),
        text: Some(text),
        message: None,
    })
}

/// `{"type":"error","session":ID,"code":"inference_failed","seq":N,"utterance":U,
/// "audio_start_ms":A,"audio_end_ms":B,"queue_ms":Q,"message":...}`: in place of the result
/// `step` would have been.
pub(crate) fn inference_failed(session: Option<&str>, step: &Step, queue_ms: u64) -> String {
    let what = match step.kind {
        Kind::Partial => "partial",
        Kind::Final => "final",
    };
    let message = format!("simulated inference failure: {what} lost");
    render_event(&Event {
        kind: "error",
        session,
        code: Some("inference_failed"),
        seq: Some(step.seq),
        utterance: Some(step.utterance),
        audio_start_ms: step.audio_start_ms,
        audio_end_ms: step.audio_end_ms,
        end_bytes: Some(step.end_bytes),
        ack_bytes: (step.kind == Kind::Final).then_some(step.end_bytes),
        queue_ms: Some(queue_ms),
        text: None,
        message: Some(&message),
    })
}

/// `{"type":"error","session":ID,"code":"session_time_limit","audio_start_ms":B,
/// "audio_end_ms":B,"message":...}`: the session reached its time limit at audio offset B.
pub(crate) fn time_limit(session: &str, audio_ms: u64, limit_ms: u64) -> String {
    let message = format!(
        "session time limit of {limit_ms} ms reached: later audio is ignored; send session.end"
    );
    render_event(&Event {
        kind: "error",
        session: Some(session),
        code: Some("session_time_limit"),
        seq: None,
        utterance: None,
        audio_start_ms: audio_ms,
        audio_end_ms: audio_ms,
        end_bytes: None,
        ack_bytes: None,
        queue_ms: None,
        text: None,
        message: Some(&message),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_control_messages() {
        assert_eq!(
            parse_control(r#"{"type":"session.start","session":"a1","params":{"lang":"de"}}"#),
            Some(Control::Start {
                session: "a1".into(),
                resume_from: None,
            })
        );
        assert_eq!(
            parse_control(r#"{"type":"session.end","session":"a\"1"}"#),
            Some(Control::End {
                session: Some("a\"1".into()),
                fence: None,
            })
        );
        assert_eq!(
            parse_control(r#"{"type":"session.end"}"#),
            Some(Control::End {
                session: None,
                fence: None
            })
        );
        // The proxy's fence token, in either key order.
        assert_eq!(
            parse_control(
                r#"{"type":"session.end","session":"a1","fence":"0123456789abcdef0123456789abcdef"}"#
            ),
            Some(Control::End {
                session: Some("a1".into()),
                fence: Some(Value::from("0123456789abcdef0123456789abcdef")),
            })
        );
        assert_eq!(
            parse_control(r#"{"fence":"f","session":"a1","type":"session.end"}"#),
            Some(Control::End {
                session: Some("a1".into()),
                fence: Some(Value::from("f")),
            })
        );
        // Keys in another order, whitespace: still JSON control objects.
        assert_eq!(
            parse_control(r#" { "params":{}, "session":"b", "type" : "session.start" }"#),
            Some(Control::Start {
                session: "b".into(),
                resume_from: None,
            })
        );
    }

    #[test]
    fn everything_else_is_data() {
        for text in [
            "",
            "hello",
            r#"{"type":"partial","session":"a"}"#,
            r#"{"type":"session.bogus","session":"a"}"#,
            r#"{"type":"session.start","session":"#,
            r#"["session.start"]"#,
            r#"{"type":"session.start","session":1}"#,
        ] {
            assert_eq!(parse_control(text), None, "{text}");
        }
    }

    #[test]
    fn replies_are_json() {
        let step = Step {
            kind: Kind::Partial,
            seq: 3,
            utterance: 1,
            audio_start_ms: 500,
            audio_end_ms: 620,
            end_bytes: 19_850,
        };
        let v: serde_json::Value =
            serde_json::from_str(&result(Some("s\"x"), &step, 7, &text(&step))).unwrap();
        assert_eq!(v["type"], "partial");
        assert_eq!(v["session"], "s\"x");
        assert_eq!(v["seq"], 3);
        assert_eq!(v["utterance"], 1);
        assert_eq!(v["audio_start_ms"], 500);
        assert_eq!(v["audio_end_ms"], 620);
        assert_eq!(v["end_bytes"], 19_850);
        assert!(
            v.get("ack_bytes").is_none(),
            "a partial acknowledges nothing"
        );
        assert_eq!(v["queue_ms"], 7);
        assert!(v["text"].is_string());
        let v: serde_json::Value = serde_json::from_str(&result(None, &step, 0, "t")).unwrap();
        assert!(v["session"].is_null());
        let fin = Step {
            kind: Kind::Final,
            ..step
        };
        let v: serde_json::Value =
            serde_json::from_str(&result(Some("x"), &fin, 0, &closing_text(2, 20))).unwrap();
        assert_eq!(v["type"], "final");
        assert_eq!(v["ack_bytes"], 19_850, "a final acknowledges its audio");
        assert_eq!(v["seq"], 3);
        assert_eq!(v["text"], "final: 2 chunks, 20 bytes");
        let v: serde_json::Value =
            serde_json::from_str(&inference_failed(Some("x"), &fin, 2)).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["code"], "inference_failed");
        assert_eq!(v["audio_end_ms"], 620);
        assert!(v["message"].is_string());
        let v: serde_json::Value = serde_json::from_str(&time_limit("x", 900, 1000)).unwrap();
        assert_eq!(v["code"], "session_time_limit");
        assert_eq!(v["audio_end_ms"], 900);
        assert!(v.get("fence").is_none());
        assert_eq!(started("x"), r#"{"type":"session.started","session":"x"}"#);
        assert_eq!(
            ended("x", None),
            r#"{"type":"session.ended","session":"x"}"#
        );
        let token = Value::from("0123456789abcdef0123456789abcdef");
        assert_eq!(
            ended("x", Some(&token)),
            r#"{"type":"session.ended","session":"x","fence":"0123456789abcdef0123456789abcdef"}"#
        );
        // A token is echoed as it was given, whatever its JSON type.
        let v: serde_json::Value =
            serde_json::from_str(&ended("x", Some(&Value::from(7)))).unwrap();
        assert_eq!(v["fence"], 7);
    }
}
