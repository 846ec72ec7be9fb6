//! The `echo-backend` binary: the listening line, serving, and a clean exit with counts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

const LIMIT: Duration = Duration::from_secs(10);

struct Running {
    child: Child,
    addr: SocketAddr,
    stderr: thread::JoinHandle<String>,
}

/// Starts the binary and waits (bounded) for its listening line.
fn start(args: &[&str]) -> Running {
    let mut child = Command::new(env!("CARGO_BIN_EXE_echo-backend"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (line_tx, line_rx) = mpsc::channel();
    thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next();
        let _ = line_tx.send(first);
        // Any further stdout output is a bug: collect it to fail below.
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        assert!(rest.is_empty(), "unexpected stdout: {rest:?}");
    });
    let stderr = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let line = match line_rx.recv_timeout(LIMIT) {
        Ok(Some(Ok(line))) => line,
        other => {
            let _ = child.kill();
            panic!("no listening line: {other:?}");
        }
    };
    let addr = line
        .strip_prefix("echo-backend listening on ws://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    Running {
        child,
        addr,
        stderr,
    }
}

/// Waits (bounded) for the process to exit; returns its status and stderr.
fn wait(running: Running) -> (ExitStatus, String) {
    let Running {
        mut child, stderr, ..
    } = running;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        let status = child.wait();
        let _ = tx.send(());
        (status, child)
    });
    if rx.recv_timeout(LIMIT).is_err() {
        // Ours, by id: do not leave it running.
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        panic!("echo-backend did not exit");
    }
    let (status, _child) = waiter.join().unwrap();
    (status.unwrap(), stderr.join().unwrap())
}

async fn echo_once(addr: SocketAddr) {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}"))
        .await
        .unwrap();
    ws.send(Message::text("ping?")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("ping?"));
}

#[tokio::test]
async fn sigterm_exits_zero_with_counts() {
    let running = start(&["--listen", "127.0.0.1:0"]);
    assert_ne!(running.addr.port(), 0);
    timeout(LIMIT, echo_once(running.addr)).await.unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &running.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let (status, stderr) = wait(running);
    assert!(status.success(), "{status:?}, stderr: {stderr}");
    let counts = stderr
        .lines()
        .find(|l| l.starts_with("echo-backend stats:"))
        .unwrap_or_else(|| panic!("no stats line in {stderr:?}"));
    assert!(counts.contains("dials=1 "), "{counts}");
    assert!(counts.contains("messages_in=1 "), "{counts}");
    assert!(counts.contains("messages_out=1 "), "{counts}");
}

#[tokio::test]
async fn exit_after_secs_in_stt_mode() {
    let running = start(&[
        "--listen",
        "127.0.0.1:0",
        "--mode",
        "stt",
        "--delay-ms",
        "5",
        "--jitter-ms",
        "0",
        "--exit-after-secs",
        "1",
    ]);
    timeout(LIMIT, async {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}", running.addr))
            .await
            .unwrap();
        ws.send(Message::text(
            r#"{"type":"session.start","session":"cli","params":{}}"#,
        ))
        .await
        .unwrap();
        let started = ws.next().await.unwrap().unwrap();
        assert_eq!(
            started,
            Message::text(r#"{"type":"session.started","session":"cli"}"#)
        );
        ws.send(Message::binary(vec![0u8; 100])).await.unwrap();
        let partial = ws.next().await.unwrap().unwrap().into_text().unwrap();
        assert!(partial.starts_with(r#"{"type":"partial","session":"cli","seq":0"#));
    })
    .await
    .unwrap();
    let (status, stderr) = wait(running);
    assert!(status.success(), "{status:?}, stderr: {stderr}");
    assert!(stderr.contains("sessions_started=1 "), "{stderr}");
}

/// The GPU-like stt flags (the set `cargo repro` passes, reports/src/repro.rs
/// `STT_BACKEND_ARGS`, plus a seed) are accepted and shape the results.
#[tokio::test]
async fn gpu_like_stt_flags() {
    let running = start(&[
        "--listen",
        "127.0.0.1:0",
        "--mode",
        "stt",
        "--slots",
        "1024",
        "--partial-every-ms",
        "20",
        "--utterance-ms",
        "2000",
        "8000",
        "--session-time-limit-ms",
        "600000",
        "--max-connections",
        "4096",
        "--max-queue-ms",
        "2000",
        "--seed",
        "1",
        "--dial-delay-ms",
        "1",
        "--error-probability",
        "0",
        "--bytes-per-ms",
        "32",
    ]);
    timeout(LIMIT, async {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}", running.addr))
            .await
            .unwrap();
        ws.send(Message::text(
            r#"{"type":"session.start","session":"g","params":{}}"#,
        ))
        .await
        .unwrap();
        ws.next().await.unwrap().unwrap();
        for _ in 0..3 {
            ws.send(Message::binary(vec![0u8; 640])).await.unwrap();
        }
        ws.send(Message::text(
            r#"{"type":"session.end","session":"g","fence":"x"}"#,
        ))
        .await
        .unwrap();
        let mut got = Vec::new();
        for _ in 0..5 {
            let text = ws.next().await.unwrap().unwrap().into_text().unwrap();
            got.push(serde_json::from_str::<serde_json::Value>(&text).unwrap());
        }
        for (seq, p) in got[..3].iter().enumerate() {
            assert_eq!(p["type"], "partial", "{p}");
            assert_eq!(p["seq"], seq);
            assert_eq!(p["audio_end_ms"], 20 * (seq + 1));
            assert_eq!(p["queue_ms"], 0);
        }
        assert_eq!(got[3]["type"], "final");
        assert_eq!(got[4]["type"], "session.ended");
        assert_eq!(got[4]["fence"], "x");
    })
    .await
    .unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &running.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let (status, stderr) = wait(running);
    assert!(status.success(), "{status:?}, stderr: {stderr}");
}

#[test]
fn out_of_range_stt_settings_fail() {
    for args in [
        &["--error-probability", "1.5"][..],
        &["--utterance-ms", "900", "100"],
        &["--utterance-ms", "900"],
        &["--slots", "0"],
    ] {
        let status = Command::new(env!("CARGO_BIN_EXE_echo-backend"))
            .args(["--listen", "127.0.0.1:0", "--mode", "stt"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(!status.success(), "{args:?}");
    }
}

#[test]
fn bad_arguments_fail() {
    let status = Command::new(env!("CARGO_BIN_EXE_echo-backend"))
        .args(["--mode", "bogus"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success());
}
