//! The fencing protocol's control messages (docs/protocol.md) and the stt results.
//!
//! The proxy's `session.end` carries a fence token (`"fence"`) that only the proxy and the
//! backend know; `session.ended` echoes it back unchanged, and only that reply completes the
//! proxy's fence. A `session.end` without a token (an older proxy, a test) gets a
//! `session.ended` without one.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The proxy's control messages start with these bytes (the fast path).
const CONTROL_PREFIX: &[u8] = br#"{"type":"session."#;
/// Any control message contains this, whatever the order of its keys.
const CONTROL_MARKER: &str = r#""session."#;

/// A control message from the proxy.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Control {
    Start {
        session: String,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
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
        seq: None,
        text: None,
    })
}

/// `{"type":"session.ended","session":ID,"fence":TOKEN}`: the fence token of the
/// `session.end` it answers, echoed as it was given; no `fence` key if it had none.
pub(crate) fn ended(session: &str, fence: Option<&Value>) -> String {
    render(&Reply {
        kind: "session.ended",
        session: Some(session),
        fence,
        seq: None,
        text: None,
    })
}

/// `{"type":"partial","session":ID,"seq":N,"text":...}`; `session` is null outside a session.
pub(crate) fn partial(session: Option<&str>, seq: u64, chunk_len: usize) -> String {
    let text = format!("partial {seq}: {chunk_len} bytes");
    render(&Reply {
        kind: "partial",
        session,
        fence: None,
        seq: Some(seq),
        text: Some(&text),
    })
}

/// `{"type":"final","session":ID,"seq":N,"text":...}`
pub(crate) fn final_result(session: &str, seq: u64, chunks: u64, bytes: u64) -> String {
    let text = format!("final: {chunks} chunks, {bytes} bytes");
    render(&Reply {
        kind: "final",
        session: Some(session),
        fence: None,
        seq: Some(seq),
        text: Some(&text),
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
                session: "a1".into()
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
                session: "b".into()
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
        let v: serde_json::Value = serde_json::from_str(&partial(Some("s\"x"), 3, 10)).unwrap();
        assert_eq!(v["type"], "partial");
        assert_eq!(v["session"], "s\"x");
        assert_eq!(v["seq"], 3);
        let v: serde_json::Value = serde_json::from_str(&partial(None, 0, 1)).unwrap();
        assert!(v["session"].is_null());
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
        let v: serde_json::Value = serde_json::from_str(&final_result("x", 2, 2, 20)).unwrap();
        assert_eq!(v["type"], "final");
        assert_eq!(v["seq"], 2);
    }
}
