//! The deployment files in `deploy/` against the proxy they deploy (issue 13):
//! a proxy on 127.0.0.1 (backend table `sqlite::memory:`, so the table-sync
//! metrics exist too) runs a session through an echo backend, drops a
//! reserved client message, refuses an upgrade and rate-limits a client, and
//! a second one with TLS answers a plain HTTP request and reloads its
//! certificate, so that every labelled family is in `/metrics` (a family
//! appears once counted); then
//!
//! - every `sttproxy_*` name in the Grafana dashboard (queries, template
//!   variables, descriptions) must be a series of its `/metrics` scrape:
//!   a sample name, or a name its `# TYPE` lines imply (`_total` of a
//!   counter; `_bucket`, `_sum`, `_count` of a histogram);
//! - the probe paths of the Kubernetes Deployment answer 200 on its admin
//!   listener, and the admin port of the pods' settings is the one probed;
//! - the stop timing of the systemd unit (`TimeoutStopSec`) and of the
//!   Deployment (`terminationGracePeriodSeconds`, which includes the preStop
//!   sleep) leaves the proxy's `shutdown_grace` (the default, and the one of
//!   each shipped settings file) plus a margin;
//! - both shipped settings files load and validate.
//!
//! The files are read as text (no YAML parser): the few numbers checked are
//! single `key: value` / `Key=value` lines.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::SinkExt;
use serde_json::Value;
use sttproxy::config::Settings;
use tokio_tungstenite::tungstenite::Message;

use support::tls::TestCa;
use support::{
    Harness, STEP, TEST_LIMIT, bounded, connect, echo, end_session, eventually, expect_started,
    http_get, http_request, recv_data, temp_dir,
};

/// Beyond `shutdown_grace`: sessions notice the deadline within 1 s, then
/// the pools close.
const STOP_MARGIN: Duration = Duration::from_secs(2);

fn deploy_file(rel: &str) -> (PathBuf, String) {
    let path = support::workspace_dir().join("deploy").join(rel);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    (path, text)
}

/// Every name a Prometheus query may use against this scrape.
fn exported_names(scrape: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            match kind {
                "counter" => {
                    names.insert(format!("{}_total", name.trim_end_matches("_total")));
                }
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {
                    names.insert(name.to_string());
                }
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// Every `sttproxy_[a-z0-9_]+` identifier in `text`.
fn metric_names_in(text: &str, out: &mut BTreeSet<String>) {
    let bytes = text.as_bytes();
    let ident = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
    let mut i = 0;
    while let Some(found) = text[i..].find("sttproxy_") {
        let start = i + found;
        let mut end = start + "sttproxy_".len();
        while end < bytes.len() && ident(bytes[end]) {
            end += 1;
        }
        // A name, not the tail of a longer identifier (`my_sttproxy_x`).
        let boundary = start == 0 || !(ident(bytes[start - 1]) || bytes[start - 1] == b':');
        if boundary && end > start + "sttproxy_".len() {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
}

/// Every string in the dashboard, with how many of them are PromQL `expr`s.
fn dashboard_strings(v: &Value, strings: &mut Vec<String>, exprs: &mut usize) {
    match v {
        Value::String(s) => strings.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| dashboard_strings(x, strings, exprs)),
        Value::Object(o) => {
            for (k, x) in o {
                if k == "expr" && x.is_string() {
                    *exprs += 1;
                }
                dashboard_strings(x, strings, exprs);
            }
        }
        _ => {}
    }
}

/// The metric names the dashboard uses that the scrape does not export.
fn unknown_names(dashboard: &Value, exported: &BTreeSet<String>) -> (usize, Vec<String>) {
    let (mut strings, mut exprs) = (Vec::new(), 0);
    dashboard_strings(dashboard, &mut strings, &mut exprs);
    let mut used = BTreeSet::new();
    for s in &strings {
        metric_names_in(s, &mut used);
    }
    assert!(
        used.len() >= 20,
        "the dashboard names only {} metrics: {used:?}",
        used.len()
    );
    (
        exprs,
        used.into_iter().filter(|n| !exported.contains(n)).collect(),
    )
}

/// The value of the first line `KEY<sep>VALUE` (leading spaces ignored) after
/// the first line containing `after` (or from the start); comment lines
/// (`#`) are skipped.
fn value_of<'a>(text: &'a str, after: Option<&str>, key: &str, sep: char) -> &'a str {
    let mut lines = text.lines().filter(|l| !l.trim_start().starts_with('#'));
    if let Some(anchor) = after {
        lines
            .by_ref()
            .find(|l| l.contains(anchor))
            .unwrap_or_else(|| panic!("no line with {anchor:?}"));
    }
    lines
        .find_map(|l| {
            l.trim_start()
                .strip_prefix(key)?
                .trim_start()
                .strip_prefix(sep)
        })
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key}{sep} line"))
}

fn settings_file(rel: &str) -> Settings {
    let (path, _) = deploy_file(rel);
    let s = Settings::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    s.validate()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    s
}

/// The names of a proxy with TLS, after a plain HTTP request on its TLS
/// port (`tls_handshakes`) and a replaced certificate (`tls_reloads`).
async fn tls_names() -> BTreeSet<String> {
    let ca = TestCa::new("deploy files CA");
    let dir = temp_dir("deploy-tls");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    ca.leaf(&["localhost", "127.0.0.1"], 1).write(&cert, &key);
    let h = Harness::start(1, echo(), |s| {
        s.tls_cert = Some(cert.clone());
        s.tls_key = Some(key.clone());
        s.tls_reload_interval = Duration::from_millis(50);
    })
    .await;
    let plain = http_get(h.listen, "/v1/stream").await;
    assert_eq!(plain.status, 400, "plain HTTP on the TLS port: {plain:?}");
    ca.leaf(&["localhost", "127.0.0.1"], 2).write(&cert, &key);
    eventually(STEP, "the replaced certificate reloaded", || async {
        h.metrics()
            .await
            .count(r#"sttproxy_tls_reloads_total{outcome="ok"}"#)
            >= 1.0
    })
    .await;
    let scrape = http_get(h.admin, "/metrics").await;
    assert_eq!(scrape.status, 200);
    h.stop().await;
    exported_names(&scrape.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_files_match_the_running_proxy() {
    bounded(TEST_LIMIT, async {
        let h = Harness::start(1, echo(), |s| {
            s.db = Some("sqlite::memory:".into());
            s.max_client_messages_per_second = 5;
            s.rate_limit_burst = Duration::from_secs(1);
        })
        .await;
        h.wait_warm().await;

        // A labelled family appears in /metrics once counted: one session
        // (outcome, direction, backend), a client text in the reserved
        // namespace (relay_dropped), a refused upgrade, a client past its
        // message rate; and, on a second proxy with TLS, a plain HTTP request
        // on its TLS port and a certificate reload.
        let mut ws = connect(&h.ws_url()).await;
        let id = expect_started(&mut ws).await;
        ws.send(Message::text(r#"{"type":"session.bogus"}"#))
            .await
            .unwrap();
        ws.send(Message::binary(vec![1u8; 320])).await.unwrap();
        assert_eq!(recv_data(&mut ws).await, Message::binary(vec![1u8; 320]));
        end_session(&mut ws, &id).await;
        let refused = http_request(
            h.listen,
            &format!(
                "GET /v1/stream HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Version: 12\r\n\r\n",
                h.listen
            ),
        )
        .await;
        assert_eq!(refused.status, 426, "{refused:?}");
        let mut flood = connect(&h.ws_url()).await;
        expect_started(&mut flood).await;
        for _ in 0..40 {
            if flood.send(Message::binary(vec![2u8; 16])).await.is_err() {
                break;
            }
        }
        eventually(STEP, "a session closed for its message rate", || async {
            h.metrics()
                .await
                .count(r#"sttproxy_rate_limited_total{limit="messages"}"#)
                >= 1.0
        })
        .await;
        drop(flood);
        let scrape = http_get(h.admin, "/metrics").await;
        assert_eq!(scrape.status, 200);
        let mut exported = exported_names(&scrape.body);
        exported.extend(tls_names().await);
        for expected in [
            "sttproxy_sessions_total",
            "sttproxy_acquire_wait_seconds_bucket",
            "sttproxy_pool_live",
            "sttproxy_config_stale",
        ] {
            assert!(
                exported.contains(expected),
                "{expected} not found in the scrape:\n{}",
                scrape.body
            );
        }

        // The dashboard names only exported metrics...
        let (path, text) = deploy_file("grafana/sttproxy-dashboard.json");
        let dashboard: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
        let (exprs, unknown) = unknown_names(&dashboard, &exported);
        assert!(exprs >= 30, "only {exprs} queries in the dashboard");
        assert!(
            unknown.is_empty(),
            "the dashboard names metrics /metrics does not export: {unknown:?}\nexported: {exported:?}"
        );
        // ...and this check would see one that is not.
        let broken: Value = serde_json::from_str(&text.replacen(
            "sttproxy_sessions_active",
            "sttproxy_sessions_open",
            1,
        ))
        .unwrap();
        assert_eq!(
            unknown_names(&broken, &exported).1,
            ["sttproxy_sessions_open"]
        );

        // The Deployment probes paths the admin listener serves, on its port.
        let (_, deployment) = deploy_file("kubernetes/deployment.yaml");
        let pods = settings_file("kubernetes/sttproxy.toml");
        let admin_port: u16 = value_of(&deployment, Some("name: admin"), "containerPort", ':')
            .parse()
            .unwrap();
        assert_eq!(pods.admin.port(), admin_port, "admin port of the pods");
        assert!(
            !pods.admin.ip().is_loopback(),
            "the kubelet probes the pod IP: the pods' admin listener must not be loopback"
        );
        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
            assert_eq!(value_of(&deployment, Some(probe), "path", ':'), path);
            assert_eq!(value_of(&deployment, Some(probe), "port", ':'), "admin");
            let r = http_get(h.admin, path).await;
            assert_eq!(r.status, 200, "{probe} {path} on a ready proxy: {r:?}");
        }

        // Stop timing: systemd.
        // What a stop takes at most: shutdown_delay (still serving), then
        // shutdown_grace (draining).
        let stop_time = |s: &Settings| s.shutdown_delay + s.shutdown_grace;
        let default_grace = stop_time(&Settings::default());
        let host = settings_file("systemd/sttproxy.toml");
        let (_, unit) = deploy_file("systemd/sttproxy.service");
        let stop = humantime::parse_duration(value_of(&unit, None, "TimeoutStopSec", '='))
            .expect("TimeoutStopSec as a duration");
        assert_eq!(value_of(&unit, None, "KillSignal", '='), "SIGTERM");
        for grace in [default_grace, stop_time(&host)] {
            assert!(
                stop >= grace + STOP_MARGIN,
                "TimeoutStopSec {stop:?} < shutdown_delay + shutdown_grace {grace:?} + {STOP_MARGIN:?}"
            );
        }

        // Stop timing: Kubernetes (the grace period includes preStop).
        let period = Duration::from_secs(
            value_of(&deployment, None, "terminationGracePeriodSeconds", ':')
                .parse()
                .unwrap(),
        );
        let pre_stop = Duration::from_secs(
            value_of(&deployment, Some("preStop:"), "seconds", ':')
                .parse()
                .unwrap(),
        );
        assert!(pre_stop > Duration::ZERO, "preStop sleep");
        for grace in [default_grace, stop_time(&pods)] {
            assert!(
                period >= pre_stop + grace + STOP_MARGIN,
                "terminationGracePeriodSeconds {period:?} < preStop {pre_stop:?} + \
                 shutdown_delay + shutdown_grace {grace:?} + {STOP_MARGIN:?}"
            );
        }

        h.stop().await;
    })
    .await;
}
