//! The close handshake (RFC 6455 §5.5.1, §7) as clients nobody here wrote
//! see it: Node's `ws`, headless Chromium and Python's `websockets`, each
//! against the in-process proxy and an echo backend. A protocol detail is
//! right when they agree.
//!
//! Per client, 20 sessions each of: a client-initiated close with 1000 and
//! with 4001 (the proxy must answer with a Close echoing the code: the client
//! reports that code and `wasClean`), and a graceful end (`session.end`, then
//! the proxy's close 1000, answered by the client, then TCP closed: code 1000
//! and `wasClean`).
//!
//! Node and Chromium are set up on first use (npm installs the pinned `ws`
//! under the target directory); where one is missing the test is skipped with
//! a printed reason, unless `REQUIRE_CLIENTS=1` (CI).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use support::clients::{Chromium, chromium_binary, node_ws_or_skip, python_venv, skip_or_fail};
use support::echo;
use support::{Harness, STEP, bounded, within};

const SESSIONS: usize = 20;
/// Sessions of one client (60), each at most a few seconds if it hangs.
const CLIENT_LIMIT: Duration = Duration::from_secs(240);

fn script(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(name)
}

/// One session as a client reported it.
#[derive(Debug)]
struct Outcome {
    mode: String,
    code: i64,
    clean: bool,
    detail: String,
}

fn outcomes(values: &[Value]) -> Vec<Outcome> {
    values
        .iter()
        .map(|v| Outcome {
            mode: v["mode"].as_str().unwrap_or("?").to_string(),
            code: v["code"].as_i64().unwrap_or(-2),
            clean: v["wasClean"].as_bool().unwrap_or(false),
            detail: [&v["error"], &v["reason"]]
                .iter()
                .filter_map(|d| d.as_str())
                .filter(|d| !d.is_empty())
                .collect::<Vec<_>>()
                .join("; "),
        })
        .collect()
}

/// Print what `client` reported per mode, then fail unless every session got
/// the expected code with `wasClean`.
fn judge(client: &str, all: &[Outcome]) {
    let mut report = Vec::new();
    let mut bad = 0;
    for mode in ["1000", "4001", "end"] {
        let of_mode: Vec<_> = all.iter().filter(|o| o.mode == mode).collect();
        let expected = if mode == "end" {
            1000
        } else {
            mode.parse().unwrap()
        };
        let mut codes = BTreeMap::<(i64, bool), usize>::new();
        let mut details = BTreeMap::<&str, usize>::new();
        for o in &of_mode {
            *codes.entry((o.code, o.clean)).or_default() += 1;
            if !o.detail.is_empty() {
                *details.entry(o.detail.as_str()).or_default() += 1;
            }
        }
        let ok = of_mode
            .iter()
            .filter(|o| o.code == expected && o.clean)
            .count();
        bad += of_mode.len() - ok;
        if of_mode.len() != SESSIONS {
            bad += 1;
        }
        let what = match mode {
            "end" => "graceful end (session.end, proxy closes)".to_string(),
            code => format!("client closes with {code}"),
        };
        report.push(format!(
            "{client}: {what}: {ok}/{} clean with code {expected}; (code, wasClean): {codes:?}{}",
            of_mode.len(),
            if details.is_empty() {
                String::new()
            } else {
                format!("; errors/reasons: {details:?}")
            }
        ));
    }
    let report = report.join("\n");
    eprintln!("{report}");
    assert_eq!(bad, 0, "not every close was clean:\n{report}");
}

/// Run `cmd` (a client script over `SESSIONS` sessions) and parse its JSON lines.
async fn run_script(what: &str, mut cmd: Command) -> Vec<Value> {
    let shown = format!("{cmd:?}");
    let out = within(
        CLIENT_LIMIT,
        format_args!("the {what} client"),
        tokio::task::spawn_blocking(move || cmd.output()),
    )
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{what}: {e}: {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ws_close_handshake_is_clean_both_ways() {
    let Some(modules) = node_ws_or_skip().await else {
        return;
    };
    bounded(CLIENT_LIMIT + Duration::from_secs(30), async {
        let h = Harness::start(1, echo(), |_| {}).await;
        h.wait_warm().await;
        let mut cmd = Command::new("node");
        cmd.arg(script("js/close_handshake.cjs"))
            .arg(h.ws_url())
            .arg(SESSIONS.to_string())
            .env("NODE_PATH", &modules);
        let lines = run_script("Node ws", cmd).await;
        judge("node ws", &outcomes(&lines));
        h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_close_handshake_is_clean_both_ways() {
    let bin = match chromium_binary() {
        Ok(bin) => bin,
        Err(reason) => {
            skip_or_fail(&format!("Chromium: {reason}"));
            return;
        }
    };
    bounded(CLIENT_LIMIT + Duration::from_secs(60), async {
        let h = Harness::start(1, echo(), |_| {}).await;
        h.wait_warm().await;
        let mut browser = Chromium::launch(&bin).await;
        let source = std::fs::read_to_string(script("js/close_handshake_page.js")).unwrap();
        let expression = format!(
            "({})({}, {SESSIONS})",
            source.trim().trim_end_matches(';'),
            Value::from(h.ws_url())
        );
        let value = within(
            CLIENT_LIMIT,
            "the Chromium page's sessions",
            browser.evaluate(&expression),
        )
        .await
        .unwrap_or_else(|e| panic!("evaluating in Chromium: {e}"));
        let text = value.as_str().expect("the page returns a JSON string");
        let lines: Vec<Value> = serde_json::from_str(text).unwrap();
        drop(browser);
        judge("chromium", &outcomes(&lines));
        h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websockets_close_handshake_is_clean_both_ways() {
    // Creating the venv may download from PyPI the first time: bounded apart.
    let venv = within(
        Duration::from_secs(300),
        "creating the Python venv",
        tokio::task::spawn_blocking(python_venv),
    )
    .await
    .expect("venv setup panicked");
    bounded(CLIENT_LIMIT + Duration::from_secs(30), async {
        let h = Harness::start(1, echo(), |_| {}).await;
        h.wait_warm().await;
        let mut cmd = Command::new(venv.join("bin/python"));
        cmd.arg(script("py/close_handshake.py"))
            .arg(h.ws_url())
            .arg(SESSIONS.to_string());
        let lines = run_script("Python websockets", cmd).await;
        judge("python websockets", &outcomes(&lines));
        h.stop().await;
    })
    .await;
}

/// Chromium over `wss://`: it trusts a test CA (imported into the NSS
/// database of a throwaway `HOME` with `certutil`), streams, ends with
/// `session.end` and sees close 1000 with `wasClean`; the proxy's certificate
/// is replaced on disk mid-run, and a connection made after that is served
/// the new certificate (its subject as DevTools reports it) while the session
/// opened before carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_over_wss_trusts_a_test_ca_and_survives_a_certificate_swap() {
    use support::temp_dir;
    use support::tls::{TestCa, served_cert};

    let bin = match chromium_binary() {
        Ok(bin) => bin,
        Err(reason) => {
            skip_or_fail(&format!("Chromium: {reason}"));
            return;
        }
    };
    if Command::new("certutil").arg("-H").output().is_err() {
        skip_or_fail("certutil (libnss3-tools) is not installed");
        return;
    }
    bounded(Duration::from_secs(120), async {
        let ca = TestCa::new("sttproxy browser test CA");
        let dir = temp_dir("wss-browser");
        let (cert, key, ca_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"), dir.path().join("ca.pem"));
        ca.write(&ca_file);
        let first = ca.leaf(&["localhost"], 1);
        first.write(&cert, &key);

        // The browser's trust store: an NSS database under a HOME of its own.
        let home = dir.path().join("home");
        let nssdb = home.join(".pki/nssdb");
        std::fs::create_dir_all(&nssdb).unwrap();
        let db = format!("sql:{}", nssdb.display());
        for args in [
            vec!["-d", &db, "-N", "--empty-password"],
            vec!["-d", &db, "-A", "-t", "C,,", "-n", "sttproxy-test-ca", "-i", ca_file.to_str().unwrap()],
        ] {
            let out = Command::new("certutil").args(&args).output().unwrap();
            assert!(out.status.success(), "certutil {args:?}: {out:?}");
        }

        let h = Harness::start(1, echo(), |s| {
            s.tls_cert = Some(cert.clone());
            s.tls_key = Some(key.clone());
            s.tls_reload_interval = Duration::from_millis(50);
        })
        .await;
        h.wait_warm().await;
        let port = h.listen.port();
        let url = Value::from(format!("wss://localhost:{port}/v1/stream"));

        let mut browser = Chromium::launch_with_home(&bin, Some(&home)).await;
        browser.command("Network.enable", serde_json::json!({})).await.unwrap();
        let source = std::fs::read_to_string(script("js/wss_session_page.js")).unwrap();
        assert_eq!(browser.evaluate(&source).await.unwrap(), "installed");

        // The certificate a new browser connection is served: DevTools'
        // security details of a plain HTTPS request to the proxy (it answers
        // 404 and closes the connection, so each probe is a new one).
        async fn probe_subject(browser: &mut Chromium, port: u16, n: u32) -> String {
            let url = format!("https://localhost:{port}/probe-{n}");
            let fetched = browser
                .evaluate(&format!(
                    "fetch({}, {{mode: 'no-cors', cache: 'no-store'}}).then(() => 'ok', (e) => 'failed: ' + e)",
                    Value::from(url.clone())
                ))
                .await
                .unwrap();
            assert_eq!(fetched, "ok", "fetching {url}");
            let event = within(STEP, "the probe's Network.responseReceived", browser.wait_event(|v| {
                v["method"] == "Network.responseReceived" && v["params"]["response"]["url"] == url.as_str()
            }))
            .await
            .unwrap();
            let details = &event["params"]["response"]["securityDetails"];
            details["subjectName"].as_str().unwrap_or_else(|| panic!("no security details: {event}")).to_string()
        }

        let opened = within(
            STEP,
            "the first browser session",
            browser.evaluate(&format!(
                "stt.open({url}).then((s) => {{ stt.sessions.a = s; return stt.echo(s, 10); }})"
            )),
        )
        .await;
        assert_eq!(opened, Ok(Value::from(10)), "session opened before the swap");
        assert_eq!(probe_subject(&mut browser, port, 1).await, "test leaf 1");

        let second = ca.leaf(&["localhost"], 2);
        second.write(&cert, &key);
        let client = ca.client_config();
        support::eventually(STEP, "the new certificate served", || async {
            served_cert(h.listen, &client).await == second.der
        })
        .await;
        assert_eq!(
            probe_subject(&mut browser, port, 2).await,
            "test leaf 2",
            "a connection made after the swap gets the new certificate"
        );

        let new_session = within(
            STEP,
            "a browser session after the swap",
            browser.evaluate(&format!(
                "stt.open({url}).then(async (s) => {{ await stt.echo(s, 10); return stt.end(s); }})"
            )),
        )
        .await
        .unwrap();
        let old_session = within(
            STEP,
            "the session opened before the swap",
            browser.evaluate("stt.echo(stt.sessions.a, 10).then(() => stt.end(stt.sessions.a))"),
        )
        .await
        .unwrap();
        eprintln!("chromium over wss: new session {new_session}, old session {old_session}");
        for (what, v) in [("new", &new_session), ("old", &old_session)] {
            assert_eq!(v["code"], 1000, "{what} session: {v}");
            assert_eq!(v["wasClean"], true, "{what} session: {v}");
            assert_eq!(v["ended"], true, "{what} session: session.ended before the close: {v}");
        }
        drop(browser);
        h.stop().await;
    })
    .await;
}
