//! Where a bearer token is found in an upgrade request, as pure functions
//! over header values and the query (docs/configuration.md, "JWT").
//!
//! Browsers cannot set `Authorization` on a WebSocket, so besides the header
//! a token may come as a `Sec-WebSocket-Protocol` value (`bearer.<token>`,
//! offered next to a real protocol such as `stt` that the proxy answers with)
//! or, where a client can do neither, as a query parameter (which then ends in
//! access logs: opt-in).

use serde::{Deserialize, Serialize};

/// A place a bearer token may be taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenSource {
    /// `Authorization: Bearer <token>`.
    Header,
    /// A `Sec-WebSocket-Protocol` value `<prefix><token>`.
    Subprotocol,
    /// A query parameter (removed from what the backend's `session.start` gets).
    Query,
}

/// The credentials of an `Authorization` value in the `Bearer` scheme (the
/// scheme is case-insensitive, RFC 7235 §2.1); `None` for another scheme or
/// an empty token.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim();
    (!token.is_empty()).then_some(token)
}

/// What a client offered in `Sec-WebSocket-Protocol`, split into a token and
/// the protocol to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offered<'a> {
    /// The first offered `<prefix><token>` value, without the prefix.
    pub token: Option<&'a str>,
    /// The first offered value that does not carry a token: what the 101
    /// answers, since a browser fails a handshake whose answer names no
    /// protocol when it offered some, and the token must not be echoed.
    pub answer: Option<&'a str>,
}

/// Split the offered protocols (each header value a comma-separated list,
/// RFC 6455 §4.1) into the token carried under `prefix` and the answer.
pub fn subprotocols<'a>(values: impl IntoIterator<Item = &'a str>, prefix: &str) -> Offered<'a> {
    let mut offered = Offered::default();
    for protocol in values
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        match protocol.strip_prefix(prefix) {
            Some(token) if !prefix.is_empty() => {
                if offered.token.is_none() && !token.is_empty() {
                    offered.token = Some(token);
                }
            }
            _ => {
                if offered.answer.is_none() {
                    offered.answer = Some(protocol);
                }
            }
        }
    }
    offered
}

/// The first value of query parameter `name`, percent-decoded.
pub fn query_parameter(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bearer_takes_the_token_of_the_bearer_scheme_only() {
        assert_eq!(bearer("Bearer abc.def.ghi"), Some("abc.def.ghi"));
        assert_eq!(bearer("bearer   abc "), Some("abc"));
        assert_eq!(bearer("BEARER abc"), Some("abc"));
        assert_eq!(bearer("Basic dXNlcjpwYXNz"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("Bearerabc"), None);
    }

    #[test]
    fn the_answer_is_the_first_protocol_that_carries_no_token() {
        let o = subprotocols(["stt, bearer.a.b.c"], "bearer.");
        assert_eq!(o.token, Some("a.b.c"));
        assert_eq!(o.answer, Some("stt"));
        let o = subprotocols(["bearer.t1", "v2.stt , stt", "bearer.t2"], "bearer.");
        assert_eq!(o.token, Some("t1"));
        assert_eq!(o.answer, Some("v2.stt"));
        let o = subprotocols(["bearer.t"], "bearer.");
        assert_eq!((o.token, o.answer), (Some("t"), None));
        let o = subprotocols(["stt"], "bearer.");
        assert_eq!((o.token, o.answer), (None, Some("stt")));
        // An empty token is no token (and not an answer either).
        let o = subprotocols(["bearer., stt"], "bearer.");
        assert_eq!((o.token, o.answer), (None, Some("stt")));
        assert_eq!(subprotocols([] as [&str; 0], "bearer."), Offered::default());
    }

    #[test]
    fn a_query_token_is_percent_decoded_and_the_first_wins() {
        assert_eq!(
            query_parameter(
                "lang=en&access_token=a%2Eb.c&access_token=x",
                "access_token"
            ),
            Some("a.b.c".into())
        );
        assert_eq!(query_parameter("lang=en", "access_token"), None);
        assert_eq!(query_parameter("access_token=", "access_token"), None);
    }

    proptest! {
        /// Whatever a client offers, the token is what followed the prefix
        /// of an offered value, the answer is an offered value without the
        /// prefix, and neither is ever empty.
        #[test]
        fn subprotocols_only_return_offered_parts(
            values in proptest::collection::vec("[ -~]{0,40}", 0..4),
            prefix in "[a-z.]{0,8}",
        ) {
            let o = subprotocols(values.iter().map(String::as_str), &prefix);
            let offered: Vec<&str> = values
                .iter()
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .collect();
            if let Some(t) = o.token {
                prop_assert!(!t.is_empty());
                prop_assert!(!prefix.is_empty());
                prop_assert!(offered.iter().any(|p| p.strip_prefix(prefix.as_str()) == Some(t)));
            }
            if let Some(a) = o.answer {
                prop_assert!(!a.is_empty());
                prop_assert!(offered.contains(&a));
                prop_assert!(prefix.is_empty() || !a.starts_with(prefix.as_str()));
            }
        }

        #[test]
        fn bearer_never_returns_an_empty_or_padded_token(value in "[ -~]{0,60}") {
            if let Some(t) = bearer(&value) {
                prop_assert!(!t.is_empty());
                prop_assert_eq!(t, t.trim());
                prop_assert!(value.to_ascii_lowercase().trim_start().starts_with("bearer "));
                // What follows the scheme, nothing else.
                prop_assert!(value.trim_end().ends_with(t));
            }
        }

        /// A token written after the scheme is found whole, whatever the
        /// scheme's case and the spaces around it.
        #[test]
        fn bearer_finds_the_token_it_was_given(
            scheme in "[bB][eE][aA][rR][eE][rR]",
            pad in "[ ]{0,3}",
            gap in "[ ]{1,3}",
            token in "[!-~]([ -~]{0,30}[!-~])?",
        ) {
            let value = format!("{pad}{scheme}{gap}{token}{pad}");
            prop_assert_eq!(bearer(&value), Some(token.as_str()));
        }

        /// The query token is the first `name` parameter's value, decoded,
        /// and only when that value is not empty; never something the query
        /// does not hold.
        #[test]
        fn the_query_token_is_the_first_named_value(
            pairs in proptest::collection::vec(
                (prop_oneof!["access_token", "lang", "[a-z_]{0,6}"], "[ -~]{0,12}"),
                0..5,
            ),
        ) {
            let query = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(&pairs)
                .finish();
            let first = pairs.iter().find(|(k, _)| k == "access_token");
            let expected = first.map(|(_, v)| v.clone()).filter(|v| !v.is_empty());
            prop_assert_eq!(query_parameter(&query, "access_token"), expected);
        }
    }
}
