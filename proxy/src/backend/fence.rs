//! The fencing protocol on reused backend connections (docs/protocol.md).
//!
//! ```text
//! proxy → backend   {"type":"session.start","session":"<id>","params":{...}}
//! backend → proxy   {"type":"session.started","session":"<id>"}      (optional)
//! ... data both ways ...
//! proxy → backend   {"type":"session.end","session":"<id>","fence":"<token>"}
//! backend → proxy   ... final results ...
//! backend → proxy   {"type":"session.ended","session":"<id>","fence":"<token>"}
//! ```
//! The token is fresh per lease and never shown to the client, so only the
//! backend can complete the fence (docs/protocol.md). A connection goes back
//! to the pool only after that `session.ended` arrived and nothing of the
//! session is left buffered: nothing of one session can reach the next.
//! The relay (`crate::relay`) recognizes these messages; this module writes them.

use serde_json::{Map, Value};

/// `session.start` carrying the client's query parameters.
pub fn start_message(session: &str, params: &Map<String, Value>) -> String {
    serde_json::json!({"type": "session.start", "session": session, "params": params}).to_string()
}

/// `session.start` of a session taken over from a failed backend (failover,
/// docs/failover.md): the client's query parameters, and `resume` with the
/// audio offset (bytes) the replay starts at and how many failovers the
/// session has had.
pub fn resume_message(
    session: &str,
    params: &Map<String, Value>,
    from_bytes: u64,
    failovers: u32,
) -> String {
    serde_json::json!({
        "type": "session.start",
        "session": session,
        "params": params,
        "resume": {"from_bytes": from_bytes, "failovers": failovers},
    })
    .to_string()
}

/// `session.failover`, the notice a client gets when its session moved to
/// another backend (unless `failover_notice = false`).
pub fn failover_notice(session: &str, from_bytes: u64, failovers: u32) -> String {
    serde_json::json!({
        "type": "session.failover",
        "session": session,
        "resume_from_bytes": from_bytes,
        "failovers": failovers,
    })
    .to_string()
}

/// `session.end` for `session`, carrying the lease's fence `token`.
pub fn end_message(session: &str, token: &str) -> String {
    serde_json::json!({"type": "session.end", "session": session, "fence": token}).to_string()
}

/// The `session.ended` the client is shown: the backend's, without the token.
pub fn ended_message(session: &str) -> String {
    serde_json::json!({"type": "session.ended", "session": session}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_carry_what_the_protocol_says() {
        let start = start_message("s1", &Map::from_iter([("lang".into(), Value::from("ko"))]));
        let v: Value = serde_json::from_str(&start).unwrap();
        assert_eq!(v["type"], "session.start");
        assert_eq!(v["params"]["lang"], "ko");
        let end: Value = serde_json::from_str(&end_message("s1", "t0k")).unwrap();
        assert_eq!(
            (end["session"].as_str(), end["fence"].as_str()),
            (Some("s1"), Some("t0k"))
        );
        let ended: Value = serde_json::from_str(&ended_message("s1")).unwrap();
        assert_eq!(ended["type"], "session.ended");
        assert!(
            ended.get("fence").is_none(),
            "the client never sees a token"
        );
    }
}
