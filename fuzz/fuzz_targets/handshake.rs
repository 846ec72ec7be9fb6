//! The handshake checks on whatever a client sends as its request head: the
//! size limits, the `Sec-WebSocket-Key` validation and the Origin policy
//! never panic, and their answers are consistent (a normalized origin is a
//! fixed point; a key that passes decodes to 16 bytes).
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use libfuzzer_sys::fuzz_target;
use sttproxy::handshake::{self, HandshakeLimits, OriginPolicy};

fuzz_target!(|data: &[u8]| {
    let mut raw = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut raw);
    if req.parse(data).is_err() {
        return;
    }
    let uri = req.path.and_then(|p| p.parse::<Uri>().ok());
    let mut headers = HeaderMap::new();
    for h in req.headers.iter() {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) {
            headers.append(name, value);
        }
    }
    let limits = HandshakeLimits::default();
    if let Some(uri) = &uri {
        let verdict = handshake::check_sizes(uri, &headers, &limits);
        let target = uri.path_and_query().map_or(0, |pq| pq.as_str().len());
        if target > limits.uri_bytes {
            assert!(verdict.is_err(), "a target past the limit passed");
        }
    }
    for value in headers.values() {
        if handshake::valid_websocket_key(value) {
            assert_eq!(value.len(), 24);
        }
        if let Ok(text) = value.to_str() {
            let once = handshake::normalize_origin(text);
            assert_eq!(
                handshake::normalize_origin(&once),
                once,
                "normalizing {text:?} twice differs"
            );
            // An origin allowed by name is permitted, however it is spelled.
            let policy = OriginPolicy::new(&[text.to_string()], false);
            assert!(
                policy.permits(Some(value)),
                "{text:?} does not permit itself"
            );
        }
    }
});
