//! What a client's upgrade request must satisfy before any session state
//! exists for it: size limits on the request head, a well-formed
//! `Sec-WebSocket-Key`, and the `Origin` policy (docs/protocol.md,
//! "Handshake"). Kept apart from the listener so each rule is a small pure
//! function with its own tests.
//!
//! The request head is bounded twice: hyper stops reading a head larger than
//! [`HandshakeLimits::head_bytes`] or with more than
//! [`HandshakeLimits::headers`] headers and answers 431 itself (memory per
//! connection in the HTTP phase is bounded by that buffer, whatever a slow
//! client sends); what fits is then checked here per header (431) and per
//! request target (414).

use base64::Engine as _;
use http::{HeaderMap, HeaderValue, StatusCode, Uri};

/// Size limits of a client's upgrade request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Request line plus all headers, in bytes (hyper's read buffer).
    pub head_bytes: usize,
    /// One header's name plus value, in bytes.
    pub header_bytes: usize,
    /// Number of headers.
    pub headers: usize,
    /// The request target (path and query), in bytes. The query's parameters
    /// are copied into the backend's `session.start`, so this bounds it too.
    pub uri_bytes: usize,
}

impl HandshakeLimits {
    /// hyper refuses a smaller read buffer (it panics below this).
    pub const MIN_HEAD_BYTES: usize = 8192;
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        Self {
            head_bytes: 16 << 10,
            header_bytes: 8 << 10,
            headers: 64,
            uri_bytes: 4 << 10,
        }
    }
}

/// A request refused by a check: its status, the metric's reason label and
/// the text the client reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub label: &'static str,
    pub reason: &'static str,
}

/// The per-header and request-target limits (what hyper already bounded as
/// a whole).
pub fn check_sizes(
    uri: &Uri,
    headers: &HeaderMap,
    limits: &HandshakeLimits,
) -> Result<(), Refusal> {
    let target = uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    if target > limits.uri_bytes {
        return Err(Refusal {
            status: StatusCode::URI_TOO_LONG,
            label: "uri_too_long",
            reason: "request target too long",
        });
    }
    if headers.len() > limits.headers {
        return Err(too_large("too many headers"));
    }
    if headers
        .iter()
        .any(|(name, value)| name.as_str().len() + value.len() > limits.header_bytes)
    {
        return Err(too_large("request header too large"));
    }
    Ok(())
}

fn too_large(reason: &'static str) -> Refusal {
    Refusal {
        status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        label: "header_too_large",
        reason,
    }
}

/// RFC 6455 §4.1: the key is the base64 encoding of 16 bytes (24 characters,
/// canonical padding).
pub fn valid_websocket_key(key: &HeaderValue) -> bool {
    let bytes = key.as_bytes();
    let mut decoded = [0u8; 18];
    bytes.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode_slice(bytes, &mut decoded)
            .is_ok_and(|n| n == 16)
}

/// Which `Origin` values may upgrade.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    /// Allowed origins, normalized ([`normalize_origin`]); empty = any.
    allowed: Vec<String>,
    /// Whether a request without `Origin` (native apps, servers: only
    /// browsers are bound to send it) passes an allowlist.
    allow_missing: bool,
}

impl OriginPolicy {
    pub fn new(allowed: &[String], allow_missing: bool) -> Self {
        Self {
            allowed: allowed.iter().map(|o| normalize_origin(o)).collect(),
            allow_missing,
        }
    }

    /// Whether a request with this `Origin` header (if any) may upgrade.
    pub fn permits(&self, origin: Option<&HeaderValue>) -> bool {
        if self.allowed.is_empty() {
            return true;
        }
        match origin {
            None => self.allow_missing,
            Some(value) => value.to_str().is_ok_and(|o| {
                let o = normalize_origin(o);
                self.allowed.contains(&o)
            }),
        }
    }
}

/// An origin as RFC 6454 serializes it: scheme and host in lower case, no
/// default port, no trailing slash. `HTTPS://App.example:443/` and
/// `https://app.example` are the same origin.
///
/// Applied until nothing changes, so that normalizing twice is normalizing
/// once (found by fuzzing: `"x /"` lost its slash, then its space, on two
/// passes): an allowlist entry and a request's origin meet in one form.
pub fn normalize_origin(origin: &str) -> String {
    let mut o = origin.to_ascii_lowercase();
    loop {
        let before = o.len();
        o = o
            .trim_start()
            .trim_end_matches(|c: char| c == '/' || c.is_whitespace())
            .to_string();
        for (scheme, port) in [("https://", ":443"), ("http://", ":80")] {
            if o.starts_with(scheme) && o.ends_with(port) {
                o.truncate(o.len() - port.len());
            }
        }
        // Every pass that changes something shortens it: this ends.
        if o.len() == before {
            return o;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, String)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn sizes_within_the_limits_pass_and_each_limit_has_its_answer() {
        let limits = HandshakeLimits {
            head_bytes: 16 << 10,
            header_bytes: 100,
            headers: 3,
            uri_bytes: 50,
        };
        let ok_uri: Uri = "/v1/stream?lang=en".parse().unwrap();
        let ok = headers(&[("host", "a".into()), ("x-one", "b".repeat(90))]);
        assert_eq!(check_sizes(&ok_uri, &ok, &limits), Ok(()));

        let long_uri: Uri = format!("/v1/stream?q={}", "x".repeat(40)).parse().unwrap();
        assert_eq!(
            check_sizes(&long_uri, &ok, &limits).map_err(|r| r.status),
            Err(StatusCode::URI_TOO_LONG)
        );
        // name (5) + value (96) = 101 > 100
        let big = headers(&[("x-one", "b".repeat(96))]);
        assert_eq!(
            check_sizes(&ok_uri, &big, &limits).map_err(|r| (r.status, r.label)),
            Err((
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "header_too_large"
            ))
        );
        let many = headers(&[
            ("a", "1".into()),
            ("b", "1".into()),
            ("c", "1".into()),
            ("d", "1".into()),
        ]);
        assert_eq!(
            check_sizes(&ok_uri, &many, &limits).map_err(|r| r.reason),
            Err("too many headers")
        );
    }

    #[test]
    fn a_key_is_sixteen_bytes_of_base64() {
        let key = |s: &str| HeaderValue::from_str(s).unwrap();
        // RFC 6455's example key.
        assert!(valid_websocket_key(&key("dGhlIHNhbXBsZSBub25jZQ==")));
        for bad in [
            "",
            "dGhlIHNhbXBsZSBub25jZQ",     // unpadded
            "dGhlIHNhbXBsZSBub25jZQ=",    // half padded
            "dGhlIHNhbXBsZSBub25jZR==",   // non-zero trailing bits
            "dGhlIHNhbXBsZSBub25jZ!==",   // not base64
            "dGhlIHNhbXBsZSBub25jZXM=",   // 17 bytes
            "dGhlIHNhbXBsZSBub25jZQ====", // padded twice
            "x",
        ] {
            assert!(!valid_websocket_key(&key(bad)), "{bad:?} accepted");
        }
    }

    /// Fuzzing findings (fuzz/fuzz_targets/handshake.rs): each took two
    /// passes to reach its normal form.
    #[test]
    fn normalizing_an_origin_twice_is_normalizing_it_once() {
        for found in [
            "%:%%:F /",
            "https://a:443/:443",
            "https://a :443",
            "http://x:80:80",
        ] {
            let once = normalize_origin(found);
            assert_eq!(normalize_origin(&once), once, "{found:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn origin_normalization_is_idempotent(o in "[ -~\\t]{0,40}") {
            let once = normalize_origin(&o);
            proptest::prop_assert_eq!(normalize_origin(&once), once);
        }
    }

    #[test]
    fn origins_compare_as_rfc_6454_serializes_them() {
        let policy = OriginPolicy::new(&["https://app.example".into()], false);
        for same in [
            "https://app.example",
            "HTTPS://App.Example/",
            "https://app.example:443",
        ] {
            assert!(
                policy.permits(Some(&HeaderValue::from_static(same))),
                "{same}"
            );
        }
        for other in [
            "http://app.example",
            "https://app.example:8443",
            "https://evil.example",
            "https://app.example.evil.example",
            "null",
        ] {
            assert!(
                !policy.permits(Some(&HeaderValue::from_static(other))),
                "{other}"
            );
        }
        assert!(!policy.permits(None));
        assert!(OriginPolicy::new(&["https://app.example".into()], true).permits(None));
        assert!(OriginPolicy::new(&[], false).permits(None));
    }
}
