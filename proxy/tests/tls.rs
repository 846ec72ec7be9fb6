//! TLS on both legs, over real sockets on 127.0.0.1: `wss://` client
//! sessions, the listener's certificate replaced live (by polling and on
//! SIGHUP) without dropping open sessions, a bad replacement refused and
//! counted, handshake garbage answered and counted, the handshake cap, and
//! `wss://` backends behind a private CA with a client certificate, whose
//! idle connections are still health-checked.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use sttproxy::config::Settings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use support::echo;
use support::tls::{Leaf, TestCa, TlsFront, connect_wss, served_cert};
use support::{
    Harness, STEP, TEST_LIMIT, Ws, a_silent_idle_connection_is_discarded_and_replaced, bounded,
    end_session, eventually, expect_started, recv_data,
};
use support::{replace_file, temp_dir};

/// A proxy whose client listener speaks TLS with a certificate of a test CA,
/// in front of one echo backend.
struct TlsProxy {
    h: Harness,
    ca: TestCa,
    client: Arc<rustls::ClientConfig>,
    first: Leaf,
    cert: PathBuf,
    key: PathBuf,
    _dir: tempfile::TempDir,
}

impl TlsProxy {
    async fn start(tweak: impl FnOnce(&mut Settings)) -> Self {
        let ca = TestCa::new("sttproxy test CA");
        let dir = temp_dir("tls");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let first = ca.leaf(&["localhost", "127.0.0.1"], 1);
        first.write(&cert, &key);
        let h = Harness::start(1, echo(), |s| {
            s.tls_cert = Some(cert.clone());
            s.tls_key = Some(key.clone());
            s.tls_reload_interval = Duration::from_millis(50);
            tweak(s);
        })
        .await;
        h.wait_warm().await;
        Self {
            h,
            client: ca.client_config(),
            ca,
            first,
            cert,
            key,
            _dir: dir,
        }
    }

    async fn connect(&self) -> (Ws, rustls::pki_types::CertificateDer<'static>) {
        connect_wss(self.h.listen, &self.client).await
    }

    async fn served(&self) -> rustls::pki_types::CertificateDer<'static> {
        served_cert(self.h.listen, &self.client).await
    }

    async fn count(&self, series: &str) -> f64 {
        self.h.metrics().await.count(series)
    }
}

const RELOAD_OK: &str = r#"sttproxy_tls_reloads_total{outcome="ok"}"#;
const RELOAD_ERROR: &str = r#"sttproxy_tls_reloads_total{outcome="error"}"#;

fn handshakes(outcome: &str) -> String {
    format!(r#"sttproxy_tls_handshakes_total{{outcome="{outcome}"}}"#)
}

/// Send a text and a binary message and expect both echoed unchanged.
async fn echo_round(ws: &mut Ws, i: usize) {
    let text = Message::text(format!("message {i} over TLS"));
    let binary = Message::binary(vec![i as u8; 1000 + i]);
    ws.send(text.clone()).await.unwrap();
    ws.send(binary.clone()).await.unwrap();
    assert_eq!(recv_data(ws).await, text);
    assert_eq!(recv_data(ws).await, binary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wss_session_streams_and_ends_with_close_1000() {
    bounded(TEST_LIMIT, async {
        let p = TlsProxy::start(|_| {}).await;
        let (mut ws, leaf) = p.connect().await;
        assert_eq!(leaf, p.first.der, "the configured certificate is served");
        let id = expect_started(&mut ws).await;
        for i in 0..20 {
            echo_round(&mut ws, i).await;
        }
        // A message larger than a TLS record (16 KiB) arrives whole.
        let big = Message::binary(vec![7u8; 300 << 10]);
        ws.send(big.clone()).await.unwrap();
        assert_eq!(recv_data(&mut ws).await, big);
        end_session(&mut ws, &id).await;
        assert!(p.count(&handshakes("ok")).await >= 1.0);
        p.h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_certificate_is_served_to_new_connections_while_open_sessions_stream() {
    bounded(TEST_LIMIT, async {
        let p = TlsProxy::start(|_| {}).await;
        let (mut old, leaf) = p.connect().await;
        assert_eq!(leaf, p.first.der);
        let old_id = expect_started(&mut old).await;
        echo_round(&mut old, 0).await;

        let second = p.ca.leaf(&["localhost", "127.0.0.1"], 2);
        second.write(&p.cert, &p.key);
        eventually(STEP, "the new pair loaded", || async {
            p.count(RELOAD_OK).await >= 1.0
        })
        .await;
        // The very next connection gets it, though this client holds
        // resumption tickets from the session above: resuming would keep the
        // old certificate's identity, so the reload forgets them.
        assert_eq!(
            p.served().await,
            second.der,
            "the first connection after the reload"
        );

        // The session opened before the swap carries on over its TLS session.
        for i in 1..20 {
            echo_round(&mut old, i).await;
        }
        let (mut new, leaf) = p.connect().await;
        assert_eq!(leaf, second.der, "a new session gets the new certificate");
        let new_id = expect_started(&mut new).await;
        echo_round(&mut new, 0).await;
        echo_round(&mut old, 99).await;
        end_session(&mut old, &old_id).await;
        end_session(&mut new, &new_id).await;
        p.h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_replacement_keeps_the_old_certificate_and_is_counted() {
    bounded(TEST_LIMIT, async {
        let p = TlsProxy::start(|_| {}).await;
        let (mut ws, _) = p.connect().await;
        let id = expect_started(&mut ws).await;

        // Not PEM at all.
        replace_file(&p.cert, b"not a certificate\n");
        eventually(STEP, "the unparsable certificate counted", || async {
            p.count(RELOAD_ERROR).await >= 1.0
        })
        .await;
        assert_eq!(p.served().await, p.first.der, "the old certificate stays");

        // A valid certificate with another certificate's key.
        let third = p.ca.leaf(&["localhost"], 3);
        let fourth = p.ca.leaf(&["localhost"], 4);
        replace_file(&p.key, fourth.key_pem.as_bytes());
        replace_file(&p.cert, third.cert_pem.as_bytes());
        eventually(STEP, "the mismatched pair counted", || async {
            p.count(RELOAD_ERROR).await >= 2.0
        })
        .await;
        assert_eq!(p.served().await, p.first.der, "the old certificate stays");
        assert_eq!(p.count(RELOAD_OK).await, 0.0, "nothing was loaded");
        echo_round(&mut ws, 1).await;

        // A good pair again is loaded.
        fourth.write(&p.cert, &p.key);
        eventually(STEP, "the good pair served", || async {
            p.served().await == fourth.der
        })
        .await;
        echo_round(&mut ws, 2).await;
        end_session(&mut ws, &id).await;
        p.h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_at_once() {
    bounded(TEST_LIMIT, async {
        // No polling to speak of: only the signal can reload within the test.
        let p = TlsProxy::start(|s| s.tls_reload_interval = Duration::from_secs(86_400)).await;
        let second = p.ca.leaf(&["localhost", "127.0.0.1"], 2);
        second.write(&p.cert, &p.key);
        assert_eq!(p.served().await, p.first.der, "no reload before the signal");
        let status = std::process::Command::new("kill")
            .args(["-HUP", &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        eventually(STEP, "the certificate reloaded on SIGHUP", || async {
            p.served().await == second.der
        })
        .await;
        p.h.stop().await;
    })
    .await;
}

/// Read until the peer closes (or `limit`); what it sent, and whether it closed.
async fn read_to_close(tcp: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let closed = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (got, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_garbage_is_answered_closed_and_counted_while_a_good_session_streams() {
    bounded(TEST_LIMIT, async {
        let timeout = Duration::from_millis(500);
        let p = TlsProxy::start(|s| s.tls_handshake_timeout = timeout).await;
        let (mut ws, _) = p.connect().await;
        let id = expect_started(&mut ws).await;

        // Random bytes: not a TLS record. rustls answers with an alert
        // record (content type 21) and the connection is closed.
        let mut tcp = TcpStream::connect(p.h.listen).await.unwrap();
        let mut junk: Vec<u8> = (0..200).map(|_| rand::random::<u8>()).collect();
        junk[0] = 0x01;
        tcp.write_all(&junk).await.unwrap();
        let (answer, closed) = read_to_close(&mut tcp, STEP).await;
        assert!(closed, "random bytes: connection left open");
        assert_eq!(
            answer.first(),
            Some(&21),
            "random bytes: a TLS alert, got {answer:?}"
        );
        echo_round(&mut ws, 1).await;

        // A plaintext WebSocket upgrade on the TLS port: 400 with the reason.
        let mut tcp = TcpStream::connect(p.h.listen).await.unwrap();
        tcp.write_all(
            b"GET /v1/stream HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
              Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
        let (answer, closed) = read_to_close(&mut tcp, STEP).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(closed, "plain HTTP: connection left open");
        assert!(answer.starts_with("HTTP/1.1 400 "), "plain HTTP: {answer}");
        assert!(answer.contains("TLS"), "plain HTTP: {answer}");
        echo_round(&mut ws, 2).await;

        // A client that connects and sends nothing: closed at the TLS
        // handshake timeout, not before.
        let mut tcp = TcpStream::connect(p.h.listen).await.unwrap();
        let started = tokio::time::Instant::now();
        let (answer, closed) = read_to_close(&mut tcp, STEP).await;
        let took = started.elapsed();
        assert!(closed && answer.is_empty(), "silent client: {answer:?}");
        assert!(
            took >= timeout - Duration::from_millis(50) && took <= timeout + Duration::from_secs(1),
            "silent client closed after {took:?}, timeout {timeout:?}"
        );

        // A ClientHello cut short, then silence: the same timeout.
        let mut tcp = TcpStream::connect(p.h.listen).await.unwrap();
        tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .unwrap();
        let (_, closed) = read_to_close(&mut tcp, timeout + Duration::from_secs(1)).await;
        assert!(closed, "a partial ClientHello: connection left open");

        echo_round(&mut ws, 3).await;
        let m = p.h.metrics().await;
        assert!(m.count(&handshakes("failed")) >= 1.0, "{}", m.text);
        assert!(m.count(&handshakes("plain_http")) >= 1.0, "{}", m.text);
        assert!(m.count(&handshakes("timeout")) >= 2.0, "{}", m.text);
        assert!(m.count(&handshakes("ok")) >= 1.0, "{}", m.text);
        end_session(&mut ws, &id).await;
        p.h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_beyond_the_cap_are_closed_at_once_and_counted() {
    bounded(TEST_LIMIT, async {
        let p = TlsProxy::start(|s| {
            s.max_concurrent_tls_handshakes = 2;
            s.tls_handshake_timeout = Duration::from_secs(10);
        })
        .await;
        // Two silent connections hold both handshake slots.
        let holders = [
            TcpStream::connect(p.h.listen).await.unwrap(),
            TcpStream::connect(p.h.listen).await.unwrap(),
        ];
        // A third is closed at once. A probe whose task ran before a
        // holder's took that holder's slot (and the holder was closed): it
        // is kept open so that the slots fill up, not handed on probe to probe.
        let kept = std::sync::Mutex::new(Vec::new());
        eventually(
            STEP,
            "a connection beyond the cap closed at once",
            || async {
                let mut tcp = TcpStream::connect(p.h.listen).await.unwrap();
                let (_, closed) = read_to_close(&mut tcp, Duration::from_millis(200)).await;
                if !closed {
                    kept.lock().unwrap().push(tcp);
                }
                closed
            },
        )
        .await;
        assert!(p.count(&handshakes("over_capacity")).await >= 1.0);
        // Their slots come back when they leave.
        drop(holders);
        drop(kept);
        let (mut ws, _) = eventually_connect(&p).await;
        let id = expect_started(&mut ws).await;
        echo_round(&mut ws, 0).await;
        end_session(&mut ws, &id).await;
        p.h.stop().await;
    })
    .await;
}

/// A `wss://` session once a handshake slot is free again.
async fn eventually_connect(p: &TlsProxy) -> (Ws, rustls::pki_types::CertificateDer<'static>) {
    let started = tokio::time::Instant::now();
    loop {
        let attempt = support::tls::tls_connect(p.h.listen, p.client.clone()).await;
        if attempt.is_ok() {
            return p.connect().await;
        }
        assert!(
            started.elapsed() < STEP,
            "no handshake slot came back: {attempt:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- wss:// backends

/// A TLS front for the echo backend with a certificate of `ca`, asking for a
/// client certificate of `client_ca` when given.
async fn backend_front(ca: &TestCa, client_ca: Option<&TestCa>) -> TlsFront {
    let leaf = ca.leaf(&["localhost", "127.0.0.1"], 10);
    let builder = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap();
    let builder = match client_ca {
        Some(client_ca) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(client_ca.roots()),
                Arc::new(rustls::crypto::ring::default_provider()),
            )
            .build()
            .unwrap(),
        ),
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(vec![leaf.der.clone()], leaf.key_der())
        .unwrap();
    TlsFront::start(Arc::new(config)).await
}

/// A proxy whose one backend is the echo backend behind `front`.
async fn behind(front: &TlsFront, tweak: impl FnOnce(&mut Settings)) -> Harness {
    Harness::start(1, echo(), |s| {
        front.relay_to(&s.backends[0].url);
        s.backends[0].url = front.url();
        tweak(s);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_relay_over_wss_backends_of_a_private_ca_with_a_client_certificate() {
    bounded(TEST_LIMIT, async {
        let backend_ca = TestCa::new("backend CA");
        let client_ca = TestCa::new("proxy client CA");
        let dir = temp_dir("tls-backend");
        let ca_file = dir.path().join("backend-ca.pem");
        backend_ca.write(&ca_file);
        let (client_cert, client_key) =
            (dir.path().join("client.pem"), dir.path().join("client.key"));
        client_ca
            .leaf(&["sttproxy"], 20)
            .write(&client_cert, &client_key);
        let front = backend_front(&backend_ca, Some(&client_ca)).await;

        let h = behind(&front, |s| {
            s.backend_tls_ca = Some(ca_file.clone());
            s.backend_tls_client_cert = Some(client_cert.clone());
            s.backend_tls_client_key = Some(client_key.clone());
        })
        .await;
        h.wait_warm().await;
        for round in 0..3 {
            let mut ws = support::connect(&h.ws_url()).await;
            let id = expect_started(&mut ws).await;
            for i in 0..10 {
                echo_round(&mut ws, round * 10 + i).await;
            }
            end_session(&mut ws, &id).await;
        }
        // Fenced sessions reused the TLS connections.
        assert_eq!(h.pools().await.get("b0", "dial_failures_total"), 0);
        h.stop().await;

        // Without the client certificate the backend refuses every dial.
        let h = behind(&front, |s| s.backend_tls_ca = Some(ca_file.clone())).await;
        eventually(STEP, "dials without a client certificate fail", || async {
            h.pools().await.get("b0", "dial_failures_total") >= 1
        })
        .await;
        // (`live` counts dials in flight: these retry.)
        assert_eq!(h.pools().await.get("b0", "idle"), 0);
        h.stop().await;

        // Without the private CA the backend is not trusted.
        let h = behind(&front, |s| {
            s.backend_tls_client_cert = Some(client_cert.clone());
            s.backend_tls_client_key = Some(client_key.clone());
        })
        .await;
        eventually(STEP, "dials to an untrusted backend fail", || async {
            h.pools().await.get("b0", "dial_failures_total") >= 1
        })
        .await;
        // (`live` counts dials in flight: these retry.)
        assert_eq!(h.pools().await.get("b0", "idle"), 0);
        h.stop().await;
    })
    .await;
}

/// As `idle_connection_without_pong_is_discarded_and_replaced` (tests/proxy.rs),
/// over TLS: the health ping and its deadline work through the TLS stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_wss_backend_connection_without_pong_is_discarded_and_replaced() {
    bounded(TEST_LIMIT, async {
        let ca = TestCa::new("backend CA");
        let dir = temp_dir("tls-health");
        let ca_file = dir.path().join("ca.pem");
        ca.write(&ca_file);
        let front = backend_front(&ca, None).await;
        let h = behind(&front, |s| {
            s.backend_tls_ca = Some(ca_file.clone());
            s.backends[0].target_size = Some(1);
            s.backends[0].max_size = Some(2);
            s.health_interval = Duration::from_millis(300);
            s.health_timeout = Duration::from_millis(200);
        })
        .await;
        h.wait_warm().await;
        a_silent_idle_connection_is_discarded_and_replaced(&h).await;
        // The replacement carries a session.
        let mut ws = support::connect(&h.ws_url()).await;
        let id = expect_started(&mut ws).await;
        echo_round(&mut ws, 0).await;
        end_session(&mut ws, &id).await;
        h.stop().await;
    })
    .await;
}

/// With no previous certificate to keep, an unusable pair stops the start,
/// and the error names the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_certificate_at_start_is_an_error_naming_the_file() {
    bounded(TEST_LIMIT, async {
        let ca = TestCa::new("sttproxy test CA");
        let dir = temp_dir("tls-start");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let leaf = ca.leaf(&["localhost"], 1);
        let other = ca.leaf(&["localhost"], 2);
        let start = |cert: PathBuf, key: PathBuf| async move {
            let mut s = support::test_settings();
            s.tls_cert = Some(cert);
            s.tls_key = Some(key);
            sttproxy::Proxy::start(&s).await
        };
        replace_file(&cert, leaf.cert_pem.as_bytes());
        replace_file(&key, other.key_pem.as_bytes());
        let err = start(cert.clone(), key.clone())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("cert.pem") && err.contains("key.pem"), "{err}");
        assert!(err.contains("is not the key of"), "{err}");
        eprintln!("a mismatched pair at start: {err}");
        let missing = dir.path().join("missing.pem");
        let err = start(missing.clone(), key.clone())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.pem"), "{err}");
        replace_file(
            &key,
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let err = start(cert.clone(), key.clone())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("key.pem") && err.contains("no private key"),
            "{err}"
        );
    })
    .await;
}
