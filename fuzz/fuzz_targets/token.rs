//! Bearer tokens: where the listener finds one (`Authorization: Bearer`, a
//! `bearer.<token>` subprotocol, the `access_token` query parameter) and
//! whether it verifies, against fixed keys — an HS256 secret and the test
//! RS256 and ES256 keys of `proxy/tests/keys`.
//!
//! Input: a mode byte. Mode even — a raw request: the rest split on NUL into
//! the `Authorization` value, `Sec-WebSocket-Protocol` values (one per line)
//! and the query. Mode odd — a made token: a signer byte (our three keys,
//! a forger's three, `alg: none`, an RSA or EC public key used as an HMAC
//! secret, or our RS256 signature under another `alg`), then NUL-separated
//! header members (JSON, merged over `alg`), the payload bytes and a tamper
//! (position, byte) applied to the finished token.
//!
//! Checked on every input:
//! - nothing panics;
//! - extraction only returns what the input holds: the bearer token is a
//!   part of the header value, the subprotocol token and answer are parts
//!   of offered values, the query token is the value of one `&`-piece;
//! - a token is accepted (by the verifier, or by the listener's check) only
//!   when its header names HS256, RS256 or ES256 and its signature verifies
//!   under OUR key of that algorithm (checked with `jsonwebtoken::crypto`
//!   directly, past the proxy's header reading and key choice): a forger's
//!   signature, `alg: none` and algorithm confusion are always refused;
//! - a refusal's texts never contain the token;
//! - and, so the above is not vacuous, a token we signed with `{}` as
//!   header members and claims valid until 2100 is accepted.
#![no_main]

use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, HeaderValue, header};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use libfuzzer_sys::fuzz_target;
use sttproxy::auth::jwt::{ClaimRules, Verifier};
use sttproxy::auth::keys::KeyStore;
use sttproxy::auth::token::{self, TokenSource};
use sttproxy::auth::{AuthMode, Authenticator, JwtSettings};

const SECRET: &[u8] = b"fuzz-secret-fuzz-secret-fuzz-secret-0123";
const FORGED_SECRET: &[u8] = b"not-our-secret-not-our-secret-not-our-sec";
const PREFIX: &str = "bearer.";
const PARAMETER: &str = "access_token";
/// Claims that hold until 2100.
const VALID_CLAIMS: &[u8] = br#"{"exp":4102444800}"#;

struct Setup {
    auth: Authenticator,
    verifier: Verifier,
    /// Our keys as an independent check of a signature.
    ours: [(Algorithm, DecodingKey); 3],
    /// What signs made tokens: ours, then a forger's.
    signers: [(Algorithm, EncodingKey); 6],
    rsa_pub_pem: Vec<u8>,
    ec_pub_pem: Vec<u8>,
}

fn key_file(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../proxy/tests/keys")
        .join(name)
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(key_file(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("sttproxy-fuzz-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let secret_file = dir.join("hs256.secret");
        std::fs::write(&secret_file, SECRET).expect("secret file");
        let jwt = JwtSettings {
            hs256_secret_file: Some(secret_file),
            rsa_public_key_files: vec![key_file("rsa_a.pub.pem")],
            ec_public_key_files: vec![key_file("ec_a.pub.pem")],
            sources: vec![
                TokenSource::Header,
                TokenSource::Subprotocol,
                TokenSource::Query,
            ],
            ..JwtSettings::default()
        };
        let (auth, _) =
            Authenticator::new(AuthMode::Jwt, Vec::new(), Some(&jwt)).expect("authenticator");
        let store = KeyStore::load(jwt.key_files()).expect("keys").store;
        let verifier = Verifier::new(store, &ClaimRules::default());
        let rsa_pub_pem = read("rsa_a.pub.pem");
        let ec_pub_pem = read("ec_a.pub.pem");
        Setup {
            auth,
            verifier,
            ours: [
                (
                    Algorithm::HS256,
                    DecodingKey::from_secret(SECRET).expect("hs"),
                ),
                (
                    Algorithm::RS256,
                    DecodingKey::from_rsa_pem(&rsa_pub_pem).expect("rsa"),
                ),
                (
                    Algorithm::ES256,
                    DecodingKey::from_ec_pem(&ec_pub_pem).expect("ec"),
                ),
            ],
            signers: [
                (
                    Algorithm::HS256,
                    EncodingKey::from_secret(SECRET).expect("hs"),
                ),
                (
                    Algorithm::RS256,
                    EncodingKey::from_rsa_pem(&read("rsa_a.key.pem")).expect("rsa a"),
                ),
                (
                    Algorithm::ES256,
                    EncodingKey::from_ec_pem(&read("ec_a.key.pem")).expect("ec a"),
                ),
                (
                    Algorithm::HS256,
                    EncodingKey::from_secret(FORGED_SECRET).expect("hs forged"),
                ),
                (
                    Algorithm::RS256,
                    EncodingKey::from_rsa_pem(&read("rsa_b.key.pem")).expect("rsa b"),
                ),
                (
                    Algorithm::ES256,
                    EncodingKey::from_ec_pem(&read("ec_b.key.pem")).expect("ec b"),
                ),
            ],
            rsa_pub_pem,
            ec_pub_pem,
        }
    })
}

/// Whether `token` is ours: three parts, a header whose `alg` is one of the
/// three we verify, and a signature that verifies under our key for it.
fn signed_by_us(s: &Setup, token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    let [head, payload, signature] = parts[..] else {
        return false;
    };
    let Ok(json) = URL_SAFE_NO_PAD.decode(head) else {
        return false;
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&json) else {
        return false;
    };
    let alg = match value.get("alg").and_then(|a| a.as_str()) {
        Some("HS256") => Algorithm::HS256,
        Some("RS256") => Algorithm::RS256,
        Some("ES256") => Algorithm::ES256,
        _ => return false,
    };
    let message = format!("{head}.{payload}");
    s.ours.iter().any(|(a, key)| {
        *a == alg
            && jsonwebtoken::crypto::verify(signature, message.as_bytes(), key, alg)
                .unwrap_or(false)
    })
}

/// A refusal's texts (and its Debug form) do not contain `token`.
fn assert_not_leaked(token: &str, texts: &[String]) {
    // Short tokens may be a word of the fixed texts by chance.
    if token.len() < 12 {
        return;
    }
    for t in texts {
        assert!(!t.contains(token), "the token is in a refusal: {t:?}");
    }
}

fn check_request(s: &Setup, auth_value: &[u8], protocols: &[u8], query: &[u8]) {
    let mut headers = HeaderMap::new();
    let auth_value = HeaderValue::from_bytes(auth_value).ok();
    if let Some(v) = &auth_value {
        headers.insert(header::AUTHORIZATION, v.clone());
    }
    for line in protocols.split(|b| *b == b'\n') {
        if let Ok(v) = HeaderValue::from_bytes(line) {
            headers.append(header::SEC_WEBSOCKET_PROTOCOL, v);
        }
    }
    let query = std::str::from_utf8(query).ok();

    // Extraction returns parts of the input only.
    let mut candidates: Vec<String> = Vec::new();
    if let Some(text) = auth_value.as_ref().and_then(|v| v.to_str().ok()) {
        if let Some(t) = token::bearer(text) {
            assert!(
                !t.is_empty() && text.contains(t),
                "bearer {t:?} not in {text:?}"
            );
            candidates.push(t.to_string());
        }
    }
    let values: Vec<&str> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let offered = token::subprotocols(values.iter().copied(), PREFIX);
    let pieces: Vec<&str> = values
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    if let Some(t) = offered.token {
        assert!(
            pieces.iter().any(|p| p.strip_prefix(PREFIX) == Some(t)),
            "subprotocol token {t:?} not offered"
        );
        candidates.push(t.to_string());
    }
    if let Some(a) = offered.answer {
        assert!(
            pieces.contains(&a) && !a.starts_with(PREFIX),
            "answer {a:?} not offered"
        );
    }
    if let Some(q) = query {
        if let Some(t) = token::query_parameter(q, PARAMETER) {
            assert!(!t.is_empty());
            let from_a_piece = q.split('&').any(|piece| {
                form_urlencoded::parse(piece.as_bytes()).any(|(k, v)| k == PARAMETER && v == t)
            });
            assert!(
                from_a_piece,
                "query token {t:?} is no piece's value in {q:?}"
            );
            candidates.push(t);
        }
    }

    // The listener's decision.
    let verdict = s.auth.check(&headers, query);
    match &verdict {
        Ok(granted) => {
            assert!(
                candidates.iter().any(|t| signed_by_us(s, t)),
                "accepted without a token of ours: {candidates:?}"
            );
            if let Some(p) = &granted.protocol {
                let p = p.to_str().unwrap_or_default();
                assert!(!p.starts_with(PREFIX), "the token subprotocol was answered");
                assert_eq!(Some(p), offered.answer);
            }
        }
        Err(denied) => {
            let texts = [
                format!("{denied:?}"),
                denied.refusal.reason.to_string(),
                denied.refusal.label.to_string(),
            ];
            for t in &candidates {
                assert_not_leaked(t, &texts);
            }
        }
    }
    for t in &candidates {
        check_token(s, t);
    }
}

/// The verifier on one token: accepted only if ours; a refusal never says it.
fn check_token(s: &Setup, token: &str) {
    match s.verifier.verify(token) {
        Ok(()) => assert!(
            signed_by_us(s, token),
            "accepted a token not ours: {token:?}"
        ),
        Err(e) => assert_not_leaked(
            token,
            &[
                format!("{e:?}"),
                e.reason().to_string(),
                e.label().to_string(),
            ],
        ),
    }
}

/// A token made by the signer `signer` names (see the module doc).
fn made_token(s: &Setup, signer: u8, members: &[u8], payload: &[u8]) -> Option<(String, bool)> {
    let (header_alg, key, sign_alg, ours) = match signer % 11 {
        i @ 0..=5 => {
            let (alg, key) = &s.signers[usize::from(i)];
            (alg_name(*alg), Some(key.clone()), *alg, i < 3)
        }
        6 => ("none", None, Algorithm::HS256, false),
        7 => (
            "HS256",
            EncodingKey::from_secret(&s.rsa_pub_pem).ok(),
            Algorithm::HS256,
            false,
        ),
        8 => (
            "HS256",
            EncodingKey::from_secret(&s.ec_pub_pem).ok(),
            Algorithm::HS256,
            false,
        ),
        // Our RS256 signature under an `alg` that is not RS256.
        9 => (
            "ES256",
            Some(s.signers[1].1.clone()),
            Algorithm::RS256,
            false,
        ),
        _ => (
            "HS256",
            Some(s.signers[1].1.clone()),
            Algorithm::RS256,
            false,
        ),
    };
    let mut head = serde_json::json!({ "alg": header_alg, "typ": "JWT" });
    if let Ok(serde_json::Value::Object(extra)) = serde_json::from_slice(members) {
        for (k, v) in extra {
            head[k] = v;
        }
    }
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(head.to_string()),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let signature = match key {
        Some(key) => jsonwebtoken::crypto::sign(message.as_bytes(), &key, sign_alg).ok()?,
        None => String::new(),
    };
    // Only a header still naming the algorithm its key signed with is ours.
    let ours = ours && head.get("alg").and_then(|a| a.as_str()) == Some(header_alg);
    Some((format!("{message}.{signature}"), ours))
}

fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::RS256 => "RS256",
        _ => "ES256",
    }
}

fuzz_target!(|data: &[u8]| {
    let s = setup();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let mut parts = rest.splitn(3, |b| *b == 0);
        let auth = parts.next().unwrap_or_default();
        let protocols = parts.next().unwrap_or_default();
        let query = parts.next().unwrap_or_default();
        check_request(s, auth, protocols, query);
        return;
    }
    let Some((&signer, rest)) = rest.split_first() else {
        return;
    };
    let mut parts = rest.splitn(3, |b| *b == 0);
    let members = parts.next().unwrap_or_default();
    let payload = parts.next().unwrap_or_default();
    let tamper = parts.next().unwrap_or_default();
    let Some((mut token, ours)) = made_token(s, signer, members, payload) else {
        return;
    };
    if let [hi, lo, byte, ..] = tamper {
        let at = usize::from(u16::from_be_bytes([*hi, *lo])) % token.len().max(1);
        let mut bytes = token.into_bytes();
        bytes[at] = *byte;
        token = String::from_utf8_lossy(&bytes).into_owned();
    }
    if !ours && tamper.len() < 3 {
        // Forged, unsigned or confused: refused, whatever the claims say.
        assert!(
            s.verifier.verify(&token).is_err(),
            "accepted a forgery: {token}"
        );
    }
    if ours && tamper.is_empty() && members == b"{}" && payload == VALID_CLAIMS {
        // The other side of the check: what we sign is accepted.
        assert_eq!(s.verifier.verify(&token), Ok(()), "our token refused");
    }
    check_token(s, &token);
    // The same token through the listener, from each source.
    check_request(s, format!("Bearer {token}").as_bytes(), b"", b"");
    check_request(s, b"", format!("stt, {PREFIX}{token}").as_bytes(), b"");
    check_request(s, b"", b"", format!("{PARAMETER}={token}").as_bytes());
});
