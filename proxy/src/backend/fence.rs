//! The fencing protocol on reused backend connections (DESIGN §3).
//!
//! ```text
//! proxy → backend   {"type":"session.start","session":"<id>","params":{...}}
//! backend → proxy   {"type":"session.started","session":"<id>"}      (optional)
//! ... data both ways ...
//! proxy → backend   {"type":"session.end","session":"<id>"}
//! backend → proxy   ... final results ...
//! backend → proxy   {"type":"session.ended","session":"<id>"}
//! ```
//! A connection goes back to the pool only after `session.ended` for its
//! session arrived: nothing of one session can then reach the next.

use serde::Deserialize;
use serde_json::{Map, Value};

/// `session.start` carrying the client's query parameters.
pub fn start_message(session: &str, params: &Map<String, Value>) -> String {
    serde_json::json!({"type": "session.start", "session": session, "params": params}).to_string()
}

/// `session.end` for `session`.
pub fn end_message(session: &str) -> String {
    serde_json::json!({"type": "session.end", "session": session}).to_string()
}

#[derive(Deserialize)]
struct Control<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default, borrow)]
    session: Option<&'a str>,
}

/// Parse a control object cheaply: only short texts that mention `marker` are parsed.
fn control<'a>(text: &'a str, marker: &str) -> Option<Control<'a>> {
    if text.len() > 512 || !text.starts_with('{') || !text.contains(marker) {
        return None;
    }
    serde_json::from_str(text).ok()
}

/// Whether a client's text message is its end-of-stream `{"type":"session.end"}`.
pub fn is_client_end(text: &str) -> bool {
    control(text, "session.end").is_some_and(|c| c.kind == "session.end")
}

/// Whether a backend's text message is `session.ended` for `session`.
pub fn is_ended_for(text: &str, session: &str) -> bool {
    control(text, "session.ended")
        .is_some_and(|c| c.kind == "session.ended" && c.session == Some(session))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_control_messages() {
        assert!(is_client_end(r#"{"type":"session.end"}"#));
        assert!(is_client_end(r#"{ "type" : "session.end", "x": 1 }"#));
        assert!(!is_client_end(r#"{"type":"session.ended"}"#));
        assert!(!is_client_end("session.end"));
        assert!(is_ended_for(
            r#"{"type":"session.ended","session":"a1"}"#,
            "a1"
        ));
        assert!(!is_ended_for(
            r#"{"type":"session.ended","session":"a2"}"#,
            "a1"
        ));
        assert!(!is_ended_for(
            r#"{"type":"partial","session":"a1","text":"session.ended"}"#,
            "a1"
        ));
        let start = start_message("s1", &Map::from_iter([("lang".into(), Value::from("ko"))]));
        let v: Value = serde_json::from_str(&start).unwrap();
        assert_eq!(v["type"], "session.start");
        assert_eq!(v["params"]["lang"], "ko");
        assert_eq!(
            serde_json::from_str::<Value>(&end_message("s1")).unwrap()["session"],
            "s1"
        );
    }
}
