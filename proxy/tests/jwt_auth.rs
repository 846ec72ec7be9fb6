//! JWT bearer tokens at the upgrade, over real sockets on 127.0.0.1: a valid
//! token from each source opens a session (a query token never reaches the
//! backend), each bad token gets 401 with its own refusal outcome while a
//! session on the same proxy keeps echoing, rotated key files are picked up
//! (and a bad one keeps the old keys), and API keys combine with JWTs.
//!
//! Keys: the test-only pairs in tests/keys (see its README); HS256 secrets
//! and JWKS files are written per test under the target's tmp dir.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures_util::SinkExt;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sttproxy::auth::JwtSettings;
use sttproxy::auth::token::TokenSource;
use sttproxy::config::BackendEntry;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use support::echo;
use support::raw::send_request;
use support::raw::{OP_BINARY, OP_TEXT, RawMsg, server_frame};
use support::raw_backend::{BackendConn, RawBackend, control, ended_frame, started_frame};
use support::{
    Harness, STEP, TEST_LIMIT, Ws, bounded, end_session, eventually, expect_started, metrics,
    recv_data, within,
};
use support::{replace_file, temp_dir};

const AUD: &str = "stt-api";
const ISS: &str = "https://issuer.test";
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const SECRET: &[u8] = b"a test-only HS256 secret of 40+ bytes....";

fn keys_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys")
}

fn private_pem(name: &str) -> Vec<u8> {
    std::fs::read(keys_dir().join(format!("{name}.key.pem"))).unwrap()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .try_into()
        .unwrap()
}

/// Claims that pass: our audience and issuer, valid for ten minutes.
fn good_claims() -> Value {
    json!({"sub": "user-1", "aud": AUD, "iss": ISS, "iat": now(), "exp": now() + 600})
}

fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn rsa(name: &str) -> EncodingKey {
    EncodingKey::from_rsa_pem(&private_pem(name)).unwrap()
}

fn ec(name: &str) -> EncodingKey {
    EncodingKey::from_ec_pem(&private_pem(name)).unwrap()
}

fn hmac(secret: &[u8]) -> EncodingKey {
    EncodingKey::from_secret(secret).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// `[jwt]` with the `a` keys (RSA, EC) and an HS256 secret in `dir`, our
/// audience and issuer, every source on.
fn jwt_settings(dir: &Path) -> JwtSettings {
    let secret = dir.join("hs256.secret");
    std::fs::write(&secret, SECRET).unwrap();
    JwtSettings {
        hs256_secret_file: Some(secret),
        rsa_public_key_files: vec![keys_dir().join("rsa_a.pub.pem")],
        ec_public_key_files: vec![keys_dir().join("ec_a.pub.pem")],
        audience: vec![AUD.into()],
        issuer: vec![ISS.into()],
        leeway: Duration::from_secs(5),
        reload_interval: Duration::from_millis(50),
        sources: vec![
            TokenSource::Header,
            TokenSource::Subprotocol,
            TokenSource::Query,
        ],
        ..JwtSettings::default()
    }
}

/// An echo backend and a warm proxy with [`jwt_settings`], and the directory
/// of its secret (the proxy rereads it: keep it as long as the proxy).
async fn start_with_jwt() -> (Harness, tempfile::TempDir) {
    let dir = temp_dir("jwt");
    let h = Harness::start(1, echo(), |s| s.jwt = Some(jwt_settings(dir.path()))).await;
    h.wait_warm().await;
    (h, dir)
}

/// The status an upgrade with `Authorization: Bearer <token>` gets.
async fn bearer_status(addr: SocketAddr, token: &str) -> u16 {
    let auth = format!("Bearer {token}");
    upgrade(addr, "/v1/stream", &[("Authorization", &auth)])
        .await
        .status
}

/// Wait until `sttproxy_jwt_key_reloads_total{outcome}` reads `n`.
async fn reloads_reach(admin: SocketAddr, outcome: &str, n: f64) {
    let series = format!("sttproxy_jwt_key_reloads_total{{outcome=\"{outcome}\"}}");
    let series = series.as_str();
    eventually(STEP, format_args!("{series} = {n}"), || async move {
        metrics(admin).await.count(series) == n
    })
    .await;
}

/// An upgrade request answered: its status, response head and body, and the
/// WebSocket when it was 101.
struct Answer {
    status: u16,
    head: String,
    ws: Option<Ws>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        support::raw::header_in(&self.head, name)
    }
}

/// Send an upgrade request for `target` with `extra` headers, by hand.
async fn upgrade(addr: SocketAddr, target: &str, extra: &[(&str, &str)]) -> Answer {
    let mut request = format!(
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (name, value) in extra {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let raw = send_request(addr, &request).await;
    let ws = if raw.status == 101 {
        Some(
            WebSocketStream::from_partially_read(
                MaybeTlsStream::Plain(raw.stream),
                raw.read_ahead,
                Role::Client,
                None,
            )
            .await,
        )
    } else {
        None
    };
    Answer {
        status: raw.status,
        head: raw.head,
        ws,
    }
}

/// Echo one text through `ws`.
async fn echoes(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text.to_string())).await.unwrap();
    assert_eq!(recv_data(ws).await, Message::text(text.to_string()));
}

/// `sttproxy_refused_total{outcome=…}` now.
async fn refused(admin: SocketAddr, outcome: &str) -> f64 {
    metrics(admin)
        .await
        .count(&format!("sttproxy_refused_total{{outcome=\"{outcome}\"}}"))
}

/// A fenced echo backend that reports every `session.start` it reads.
async fn recording_echo(mut conn: BackendConn, starts: mpsc::UnboundedSender<String>) {
    let mut current: Option<String> = None;
    loop {
        let reply = match conn.next_msg().await {
            Ok(Some(RawMsg::Text(t))) => match control(&t) {
                Some(c) if c.kind == "session.start" => {
                    let id = c.session.unwrap_or_default();
                    let _ = starts.send(t.clone());
                    current = Some(id.clone());
                    started_frame(&id)
                }
                Some(c) if c.kind == "session.end" => {
                    let id = c.session.or_else(|| current.take()).unwrap_or_default();
                    ended_frame(&id, c.fence.as_deref())
                }
                _ => server_frame(OP_TEXT, t.as_bytes()),
            },
            Ok(Some(RawMsg::Binary(b))) => server_frame(OP_BINARY, &b),
            Ok(Some(_) | None) | Err(_) => break,
        };
        if conn.write(&reply).await.is_err() {
            break;
        }
    }
}

/// A session opened with each source works; the subprotocol source is
/// answered with the protocol offered beside the token; the query token is
/// not in the `session.start` the backend reads (the other parameters are).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_from_each_source_opens_a_session() {
    bounded(TEST_LIMIT, async {
        let (tx, mut starts) = mpsc::unbounded_channel();
        let backend = RawBackend::start(move |conn| recording_echo(conn, tx.clone())).await;
        let dir = temp_dir("jwt");
        let h = Harness::start(0, echo(), |s| {
            s.backends = vec![BackendEntry {
                url: backend.url(),
                id: Some("raw".into()),
                target_size: Some(1),
                max_size: Some(4),
                weight: None,
                reuse: None,
                group: None,
            }];
            s.jwt = Some(jwt_settings(dir.path()));
        })
        .await;
        h.wait_warm().await;

        let rs = sign(Algorithm::RS256, &rsa("rsa_a"), None, &good_claims());
        let es = sign(Algorithm::ES256, &ec("ec_a"), None, &good_claims());
        let hs = sign(Algorithm::HS256, &hmac(SECRET), None, &good_claims());
        let header = format!("Bearer {rs}");
        let offered = format!("stt, bearer.{es}");
        let cases = [
            (
                "Authorization: Bearer (RS256)",
                "/v1/stream?lang=en".into(),
                vec![("Authorization", header.as_str())],
                rs.as_str(),
            ),
            (
                "Sec-WebSocket-Protocol: stt, bearer.<token> (ES256)",
                "/v1/stream?lang=en".into(),
                vec![("Sec-WebSocket-Protocol", offered.as_str())],
                es.as_str(),
            ),
            (
                "?access_token=<token> (HS256)",
                format!("/v1/stream?lang=en&access_token={hs}&model=x"),
                vec![],
                hs.as_str(),
            ),
        ];
        for (what, target, extra, token) in cases {
            let mut answer = upgrade(h.listen, &target, &extra).await;
            assert_eq!(answer.status, 101, "{what}: {}", answer.head);
            let protocol = answer.header("sec-websocket-protocol").map(str::to_string);
            if what.starts_with("Sec-WebSocket-Protocol") {
                assert_eq!(protocol.as_deref(), Some("stt"), "{what}: {}", answer.head);
            } else {
                assert_eq!(protocol, None, "{what}: no protocol was offered");
            }
            assert!(
                !answer.head.contains(token),
                "{what}: the 101 carries the token"
            );
            let mut ws = answer.ws.take().unwrap();
            let id = expect_started(&mut ws).await;
            let start = within(STEP, "the backend's session.start", starts.recv())
                .await
                .unwrap();
            let start: Value = serde_json::from_str(&start).unwrap();
            assert_eq!(start["params"]["lang"], "en", "{what}: {start}");
            assert!(
                start["params"].get("access_token").is_none(),
                "{what}: the token parameter reached the backend: {start}"
            );
            assert!(
                !start.to_string().contains(token),
                "{what}: the token reached the backend"
            );
            if what.starts_with('?') {
                assert_eq!(start["params"]["model"], "x", "{start}");
            }
            echoes(&mut ws, &format!("hello via {what}")).await;
            end_session(&mut ws, &id).await;
        }
        h.stop().await;
        drop(backend);
    })
    .await;
}

/// Every bad token gets 401 with `WWW-Authenticate: Bearer
/// error="invalid_token"` and its own refusal outcome (a missing one plain
/// `Bearer` and `unauthorized`); the token is in neither the answer nor
/// /metrics; a session open on the same proxy keeps echoing after each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_token_is_refused_with_its_outcome_and_a_live_session_is_unaffected() {
    bounded(TEST_LIMIT, async {
        let (h, _dir) = start_with_jwt().await;
        let good = sign(Algorithm::ES256, &ec("ec_a"), None, &good_claims());
        let auth = format!("Bearer {good}");
        let mut live = upgrade(h.listen, "/v1/stream", &[("Authorization", &auth)]).await;
        assert_eq!(live.status, 101, "{}", live.head);
        let mut ws = live.ws.take().unwrap();
        let id = expect_started(&mut ws).await;

        let with = |edit: &dyn Fn(&mut Value)| {
            let mut c = good_claims();
            edit(&mut c);
            c
        };
        let rsa_a = rsa("rsa_a");
        let unsigned = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(good_claims().to_string().as_bytes())
        );
        // The RSA public key, as an attacker who read it would use it: as
        // the HMAC secret of an HS256 token.
        let public_pem = std::fs::read(keys_dir().join("rsa_a.pub.pem")).unwrap();
        let confused = sign(Algorithm::HS256, &hmac(&public_pem), None, &good_claims());
        let rows: Vec<(&str, String, &str)> = vec![
            (
                "expired an hour ago",
                sign(
                    Algorithm::RS256,
                    &rsa_a,
                    None,
                    &with(&|c| c["exp"] = json!(now() - 3600)),
                ),
                "jwt_expired",
            ),
            (
                "not valid before an hour from now",
                sign(
                    Algorithm::RS256,
                    &rsa_a,
                    None,
                    &with(&|c| c["nbf"] = json!(now() + 3600)),
                ),
                "jwt_not_yet_valid",
            ),
            (
                "RS256 signed by another key",
                sign(Algorithm::RS256, &rsa("rsa_b"), None, &good_claims()),
                "jwt_bad_signature",
            ),
            (
                "ES256 signed by another key",
                sign(Algorithm::ES256, &ec("ec_b"), None, &good_claims()),
                "jwt_bad_signature",
            ),
            (
                "HS256 signed with another secret",
                sign(
                    Algorithm::HS256,
                    &hmac(b"another secret of more than 32 bytes!!"),
                    None,
                    &good_claims(),
                ),
                "jwt_bad_signature",
            ),
            (
                "HS256 signed with the RSA public key (algorithm confusion)",
                confused.clone(),
                "jwt_bad_signature",
            ),
            (
                "for another audience",
                sign(
                    Algorithm::RS256,
                    &rsa_a,
                    None,
                    &with(&|c| c["aud"] = json!("other-api")),
                ),
                "jwt_wrong_audience",
            ),
            (
                "from another issuer",
                sign(
                    Algorithm::RS256,
                    &rsa_a,
                    None,
                    &with(&|c| c["iss"] = json!("https://evil.test")),
                ),
                "jwt_wrong_issuer",
            ),
            (
                "without exp",
                sign(
                    Algorithm::RS256,
                    &rsa_a,
                    None,
                    &with(&|c| {
                        c.as_object_mut().unwrap().remove("exp");
                    }),
                ),
                "jwt_missing_claim",
            ),
            ("alg: none", unsigned, "jwt_bad_algorithm"),
            (
                "RS384 (not accepted)",
                sign(Algorithm::RS384, &rsa_a, None, &good_claims()),
                "jwt_bad_algorithm",
            ),
            ("not a JWT", "not-a-jwt".into(), "jwt_malformed"),
            (
                "three parts of garbage",
                "eyJhbGc.e30.c2ln".into(),
                "jwt_malformed",
            ),
        ];
        for (i, (what, token, outcome)) in rows.iter().enumerate() {
            let before = refused(h.admin, outcome).await;
            let auth = format!("Bearer {token}");
            let answer = upgrade(h.listen, "/v1/stream", &[("Authorization", &auth)]).await;
            assert_eq!(answer.status, 401, "{what}: {}", answer.head);
            assert_eq!(
                answer.header("www-authenticate"),
                Some("Bearer error=\"invalid_token\""),
                "{what}: {}",
                answer.head
            );
            assert!(
                !answer.head.contains(token.as_str()),
                "{what}: token echoed"
            );
            let after = refused(h.admin, outcome).await;
            assert_eq!(after, before + 1.0, "{what}: counted as {outcome}");
            echoes(&mut ws, &format!("still here after row {i}")).await;
        }
        // No credentials at all: a plain challenge.
        let before = refused(h.admin, "unauthorized").await;
        let answer = upgrade(h.listen, "/v1/stream", &[]).await;
        assert_eq!(answer.status, 401, "{}", answer.head);
        assert_eq!(answer.header("www-authenticate"), Some("Bearer"));
        assert_eq!(refused(h.admin, "unauthorized").await, before + 1.0);
        // A token subprotocol with nothing to answer: 400, said why.
        let lone = format!("bearer.{good}");
        let answer = upgrade(
            h.listen,
            "/v1/stream",
            &[("Sec-WebSocket-Protocol", lone.as_str())],
        )
        .await;
        assert_eq!(answer.status, 400, "{}", answer.head);

        let scrape = metrics(h.admin).await;
        for (_, token, _) in &rows {
            assert!(!scrape.text.contains(token.as_str()), "a token in /metrics");
        }
        echoes(&mut ws, "still here at the end").await;
        end_session(&mut ws, &id).await;
        h.stop().await;
    })
    .await;
}

/// With only an RSA key configured, an HS256 token signed with that RSA
/// public key is refused for its algorithm, before any key is tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hs256_token_is_refused_where_only_rsa_keys_are_configured() {
    bounded(TEST_LIMIT, async {
        let h = Harness::start(1, echo(), |s| {
            s.jwt = Some(JwtSettings {
                rsa_public_key_files: vec![keys_dir().join("rsa_a.pub.pem")],
                ..JwtSettings::default()
            });
        })
        .await;
        h.wait_warm().await;
        let public_pem = std::fs::read(keys_dir().join("rsa_a.pub.pem")).unwrap();
        let confused = sign(Algorithm::HS256, &hmac(&public_pem), None, &good_claims());
        let before = refused(h.admin, "jwt_bad_algorithm").await;
        let auth = format!("Bearer {confused}");
        let answer = upgrade(h.listen, "/v1/stream", &[("Authorization", &auth)]).await;
        assert_eq!(answer.status, 401, "{}", answer.head);
        assert_eq!(refused(h.admin, "jwt_bad_algorithm").await, before + 1.0);
        // No audience or issuer configured: neither is checked.
        let good = sign(
            Algorithm::RS256,
            &rsa("rsa_a"),
            None,
            &json!({"exp": now() + 60, "aud": "anyone"}),
        );
        let auth = format!("Bearer {good}");
        let answer = upgrade(h.listen, "/v1/stream", &[("Authorization", &auth)]).await;
        assert_eq!(answer.status, 101, "{}", answer.head);
        h.stop().await;
    })
    .await;
}

fn jwks(keys: &[(&EncodingKey, Algorithm, &str)]) -> Vec<u8> {
    let keys = keys
        .iter()
        .map(|(key, alg, kid)| {
            let mut jwk = Jwk::from_encoding_key(key, *alg).unwrap();
            jwk.common.key_id = Some((*kid).to_string());
            jwk
        })
        .collect();
    serde_json::to_vec(&JwkSet { keys }).unwrap()
}

/// A JWKS file replaced on disk is picked up (the reload is awaited on its
/// metric); tokens of the removed key are refused as `jwt_unknown_key`; a
/// broken file is counted as an error and the keys before it stay in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_jwks_file_is_picked_up_and_a_bad_one_keeps_the_old_keys() {
    bounded(TEST_LIMIT, async {
        let dir = temp_dir("jwt");
        let path = dir.path().join("jwks.json");
        let (rsa_a, ec_a, ec_b) = (rsa("rsa_a"), ec("ec_a"), ec("ec_b"));
        std::fs::write(
            &path,
            jwks(&[
                (&rsa_a, Algorithm::RS256, "r1"),
                (&ec_a, Algorithm::ES256, "e1"),
            ]),
        )
        .unwrap();
        let h = Harness::start(1, echo(), |s| {
            s.jwt = Some(JwtSettings {
                jwks_file: Some(path.clone()),
                reload_interval: Duration::from_millis(50),
                ..JwtSettings::default()
            });
        })
        .await;
        h.wait_warm().await;
        let claims = json!({"exp": now() + 600});
        let r1 = sign(Algorithm::RS256, &rsa_a, Some("r1"), &claims);
        let e1 = sign(Algorithm::ES256, &ec_a, Some("e1"), &claims);
        let e2 = sign(Algorithm::ES256, &ec_b, Some("e2"), &claims);
        assert_eq!(bearer_status(h.listen, &r1).await, 101);
        assert_eq!(bearer_status(h.listen, &e1).await, 101);
        let before = refused(h.admin, "jwt_unknown_key").await;
        assert_eq!(
            bearer_status(h.listen, &e2).await,
            401,
            "e2 is not published yet"
        );
        assert_eq!(refused(h.admin, "jwt_unknown_key").await, before + 1.0);
        assert_eq!(metrics(h.admin).await.get("sttproxy_jwt_keys"), 2.0);

        // Rotate: e1 out, e2 in.
        replace_file(
            &path,
            &jwks(&[
                (&rsa_a, Algorithm::RS256, "r1"),
                (&ec_b, Algorithm::ES256, "e2"),
            ]),
        );
        let admin = h.admin;
        reloads_reach(admin, "ok", 1.0).await;
        assert_eq!(
            bearer_status(h.listen, &e2).await,
            101,
            "the new key verifies"
        );
        assert_eq!(
            bearer_status(h.listen, &e1).await,
            401,
            "the removed key does not"
        );
        assert_eq!(
            bearer_status(h.listen, &r1).await,
            101,
            "the kept key still does"
        );

        // A broken file: counted, logged, the keys stay.
        replace_file(&path, b"{\"keys\": [ this is not JSON");
        reloads_reach(admin, "error", 1.0).await;
        assert_eq!(
            bearer_status(h.listen, &e2).await,
            101,
            "the previous keys stay in use"
        );
        assert_eq!(metrics(h.admin).await.get("sttproxy_jwt_keys"), 2.0);
        // And a repaired file is taken again.
        replace_file(&path, &jwks(&[(&ec_a, Algorithm::ES256, "e1")]));
        reloads_reach(admin, "ok", 2.0).await;
        assert_eq!(bearer_status(h.listen, &e1).await, 101);
        assert_eq!(bearer_status(h.listen, &e2).await, 401);
        assert_eq!(
            metrics(h.admin)
                .await
                .count("sttproxy_jwt_key_reloads_total{outcome=\"error\"}"),
            1.0,
            "counted once"
        );
        h.stop().await;
    })
    .await;
}

/// A rotated RSA public key file is picked up the same way; a deleted one
/// keeps the key in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_pem_file_is_picked_up() {
    bounded(TEST_LIMIT, async {
        let dir = temp_dir("jwt");
        let path = dir.path().join("rsa.pub.pem");
        std::fs::copy(keys_dir().join("rsa_a.pub.pem"), &path).unwrap();
        let h = Harness::start(1, echo(), |s| {
            s.jwt = Some(JwtSettings {
                rsa_public_key_files: vec![path.clone()],
                reload_interval: Duration::from_millis(50),
                ..JwtSettings::default()
            });
        })
        .await;
        h.wait_warm().await;
        let claims = json!({"exp": now() + 600});
        let a = sign(Algorithm::RS256, &rsa("rsa_a"), None, &claims);
        let b = sign(Algorithm::RS256, &rsa("rsa_b"), None, &claims);
        assert_eq!(bearer_status(h.listen, &a).await, 101);
        assert_eq!(bearer_status(h.listen, &b).await, 401);
        replace_file(
            &path,
            &std::fs::read(keys_dir().join("rsa_b.pub.pem")).unwrap(),
        );
        let admin = h.admin;
        reloads_reach(admin, "ok", 1.0).await;
        assert_eq!(bearer_status(h.listen, &b).await, 101);
        assert_eq!(bearer_status(h.listen, &a).await, 401);
        // The file gone (a botched deploy): counted, the key stays.
        std::fs::remove_file(&path).unwrap();
        reloads_reach(admin, "error", 1.0).await;
        assert_eq!(bearer_status(h.listen, &b).await, 101);
        h.stop().await;
    })
    .await;
}

/// `auth = "either"`: an API key (bearer or x-api-key) or a JWT opens a
/// session; a wrong API key is `unauthorized`, a bad JWT its own outcome.
/// `auth = "jwt"` with the same keys configured elsewhere is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_jwts_combine_in_either_mode() {
    bounded(TEST_LIMIT, async {
        let dir = temp_dir("jwt");
        let h = Harness::start(1, echo(), |s| {
            s.api_keys = vec!["key-1".into()];
            s.auth = Some(sttproxy::auth::AuthMode::Either);
            s.jwt = Some(jwt_settings(dir.path()));
        })
        .await;
        h.wait_warm().await;
        let good = sign(Algorithm::RS256, &rsa("rsa_a"), None, &good_claims());
        let expired = sign(
            Algorithm::RS256,
            &rsa("rsa_a"),
            None,
            &json!({"aud": AUD, "iss": ISS, "exp": now() - 3600}),
        );
        let bearer = |t: &str| format!("Bearer {t}");
        let offered = format!("stt, bearer.{good}");
        let rows = vec![
            (
                "API key as bearer",
                vec![("Authorization", bearer("key-1"))],
                101,
                None,
            ),
            (
                "API key in x-api-key",
                vec![("x-api-key", "key-1".into())],
                101,
                None,
            ),
            (
                "JWT as bearer",
                vec![("Authorization", bearer(&good))],
                101,
                None,
            ),
            (
                "JWT as subprotocol",
                vec![("Sec-WebSocket-Protocol", offered)],
                101,
                None,
            ),
            (
                "x-api-key with a JWT bearer",
                vec![
                    ("x-api-key", "wrong".into()),
                    ("Authorization", bearer(&good)),
                ],
                101,
                None,
            ),
            (
                "a wrong API key",
                vec![("Authorization", bearer("key-2"))],
                401,
                Some("unauthorized"),
            ),
            (
                "an expired JWT",
                vec![("Authorization", bearer(&expired))],
                401,
                Some("jwt_expired"),
            ),
            ("nothing", vec![], 401, Some("unauthorized")),
        ];
        for (what, headers, status, outcome) in rows {
            let before = match outcome {
                Some(o) => refused(h.admin, o).await,
                None => 0.0,
            };
            let extra: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let mut answer = upgrade(h.listen, "/v1/stream", &extra).await;
            assert_eq!(answer.status, status, "{what}: {}", answer.head);
            if let Some(o) = outcome {
                assert_eq!(refused(h.admin, o).await, before + 1.0, "{what}: {o}");
            }
            if let Some(mut ws) = answer.ws.take() {
                let id = expect_started(&mut ws).await;
                echoes(&mut ws, what).await;
                end_session(&mut ws, &id).await;
            }
        }
        h.stop().await;

        // An explicit mode that would ignore configured credentials does not start.
        let mut settings = support::test_settings();
        settings.api_keys = vec!["key-1".into()];
        settings.auth = Some(sttproxy::auth::AuthMode::Jwt);
        settings.jwt = Some(jwt_settings(dir.path()));
        let err = sttproxy::Proxy::start(&settings)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("would ignore the api_keys"), "{err}");
        // Nor does one whose key file is unusable.
        settings.api_keys.clear();
        settings.jwt = Some(JwtSettings {
            rsa_public_key_files: vec![keys_dir().join("ec_a.pub.pem")],
            ..JwtSettings::default()
        });
        let err = sttproxy::Proxy::start(&settings)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("ec_a.pub.pem"), "{err}");
    })
    .await;
}

/// tungstenite's client offering `stt` and the token as subprotocols: it
/// checks the answered protocol is one it offered (as browsers do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tungstenite_accepts_the_subprotocol_answer() {
    bounded(TEST_LIMIT, async {
        let (h, _dir) = start_with_jwt().await;
        let token = sign(Algorithm::ES256, &ec("ec_a"), None, &good_claims());
        let mut request = h.ws_url().into_client_request().unwrap();
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            format!("stt, bearer.{token}").parse().unwrap(),
        );
        let (mut ws, response) = within(
            STEP,
            "tungstenite connecting",
            tokio_tungstenite::connect_async(request),
        )
        .await
        .unwrap();
        assert_eq!(
            response
                .headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok()),
            Some("stt")
        );
        let id = expect_started(&mut ws).await;
        echoes(&mut ws, "through tungstenite").await;
        end_session(&mut ws, &id).await;
        h.stop().await;
    })
    .await;
}

/// Node's `ws` (an independent client that, like browsers, fails a handshake
/// whose answer names no offered protocol) sends the token as a subprotocol
/// and streams; offering only the token protocol fails the handshake with
/// the proxy's 400. Skipped with a printed reason without node/npm, unless
/// `REQUIRE_CLIENTS=1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ws_sends_the_token_as_a_subprotocol() {
    let Some(modules) = support::clients::node_ws_or_skip().await else {
        return;
    };
    bounded(TEST_LIMIT, async {
        let (h, _dir) = start_with_jwt().await;
        let token = sign(Algorithm::ES256, &ec("ec_a"), None, &good_claims());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js/bearer_subprotocol.cjs");
        let mut cmd = Command::new("node");
        cmd.arg(script)
            .arg(h.ws_url())
            .arg(&token)
            .env("NODE_PATH", &modules);
        let out = within(
            Duration::from_secs(20),
            "the Node ws client",
            tokio::task::spawn_blocking(move || cmd.output()),
        )
        .await
        .unwrap()
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "node failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<Value> = stdout
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        eprintln!("node ws: {lines:?}");
        let with = lines.iter().find(|l| l["case"] == "stt+token").unwrap();
        assert_eq!(with["protocol"], "stt", "{with}");
        assert_eq!(with["echoed"], true, "{with}");
        assert_eq!(with["code"], 1000, "{with}");
        let lone = lines.iter().find(|l| l["case"] == "token only").unwrap();
        assert_eq!(lone["opened"], false, "{lone}");
        assert!(
            lone["error"].as_str().unwrap_or("").contains("400"),
            "{lone}"
        );
        h.stop().await;
    })
    .await;
}

/// Headless Chromium sends the token as a subprotocol beside `stt`: the
/// browser accepts the answer `stt`, streams, and sees the proxy's close 1000
/// with `wasClean`; offering only the token protocol fails the handshake.
/// Skipped with a printed reason without Chromium, unless `REQUIRE_CLIENTS=1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_sends_the_token_as_a_subprotocol() {
    let bin = match support::clients::chromium_binary() {
        Ok(bin) => bin,
        Err(reason) => {
            support::clients::skip_or_fail(&format!("Chromium: {reason}"));
            return;
        }
    };
    bounded(Duration::from_secs(90), async {
        let (h, _dir) = start_with_jwt().await;
        let token = sign(Algorithm::ES256, &ec("ec_a"), None, &good_claims());
        let mut browser = support::clients::Chromium::launch(&bin).await;
        let page =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js/bearer_subprotocol_page.js");
        let source = std::fs::read_to_string(page).unwrap();
        let expression = format!(
            "({})({}, {})",
            source.trim().trim_end_matches(';'),
            Value::from(h.ws_url()),
            Value::from(token)
        );
        let value = within(
            Duration::from_secs(30),
            "the Chromium page's sessions",
            browser.evaluate(&expression),
        )
        .await
        .unwrap_or_else(|e| panic!("evaluating in Chromium: {e}"));
        drop(browser);
        let lines: Vec<Value> = serde_json::from_str(value.as_str().unwrap()).unwrap();
        eprintln!("chromium: {lines:?}");
        let with = lines.iter().find(|l| l["case"] == "stt+token").unwrap();
        assert_eq!(with["protocol"], "stt", "{with}");
        assert_eq!(with["echoed"], true, "{with}");
        assert_eq!(with["code"], 1000, "{with}");
        assert_eq!(with["wasClean"], true, "{with}");
        let lone = lines.iter().find(|l| l["case"] == "token only").unwrap();
        assert_eq!(lone["opened"], false, "{lone}");
        assert_eq!(lone["code"], 1006, "{lone}");
        h.stop().await;
    })
    .await;
}

/// Sticky routing keyed by a claim (`[sticky] claim = "sub"`): every session
/// of one `sub` lands on the backend weighted rendezvous hashing gives that
/// value, whatever the token (a fresh one each time); a token without the
/// claim still opens a session, routed as usual and counted `no_key`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_routing_keys_on_the_verified_claim() {
    bounded(TEST_LIMIT, async {
        let dir = temp_dir("jwt-sticky");
        let h = Harness::start(3, echo(), |s| {
            s.jwt = Some(jwt_settings(dir.path()));
            s.sticky = Some(sttproxy::config::StickySettings {
                claim: Some("sub".into()),
                ..Default::default()
            });
        })
        .await;
        h.wait_warm().await;
        let ids = ["b0", "b1", "b2"];
        let served_by = async |claims: &Value| -> &str {
            let before: Vec<u64> = h
                .backends
                .iter()
                .map(|b| b.stats().sessions_started)
                .collect();
            let token = sign(Algorithm::ES256, &ec("ec_a"), None, claims);
            let auth = format!("Bearer {token}");
            let mut answer = upgrade(h.listen, "/v1/stream", &[("Authorization", &auth)]).await;
            assert_eq!(answer.status, 101, "{}", answer.head);
            let ws = answer.ws.as_mut().unwrap();
            let id = expect_started(ws).await;
            let served: Vec<usize> = (0..3)
                .filter(|&i| h.backends[i].stats().sessions_started > before[i])
                .collect();
            assert_eq!(served.len(), 1);
            echoes(ws, "keyed").await;
            end_session(ws, &id).await;
            ids[served[0]]
        };
        let mut used = Vec::new();
        for i in 0..9 {
            let sub = format!("user-{i}");
            let expected = sttproxy::route::rendezvous(
                &ids,
                sttproxy::route::StickyKey::of(sub.as_bytes()),
                |id| *id,
                |_| 1,
            )
            .unwrap();
            for n in 0..2 {
                let mut claims = good_claims();
                claims["sub"] = sub.clone().into();
                claims["iat"] = (now() - n).into();
                assert_eq!(served_by(&claims).await, *expected, "sub {sub}");
            }
            used.push(*expected);
        }
        used.sort();
        used.dedup();
        assert_eq!(used, ids, "9 subjects over 3 backends");
        let mut anonymous = good_claims();
        anonymous.as_object_mut().unwrap().remove("sub");
        served_by(&anonymous).await;
        let m = h.metrics().await;
        assert_eq!(
            m.count(r#"sttproxy_sticky_routes_total{outcome="hit"}"#),
            18.0
        );
        assert_eq!(
            m.count(r#"sttproxy_sticky_routes_total{outcome="no_key"}"#),
            1.0
        );
        h.stop().await;
    })
    .await;
}
