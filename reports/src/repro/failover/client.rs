//! The failover scenario's clients: `sessions` WebSocket sessions streaming
//! 20 ms PCM chunks at real time for `duration`, then `session.end`, each
//! logging what it saw (results per second, `session.failover` notices, the
//! pause across each, how it ended) into a [`SessionLog`].
//!
//! Not loadgen: loadgen counts stt results by their `seq`, which a backend
//! numbers per connection and starts again from 0 after a failover
//! (docs/failover.md), so every session that carried on would show as
//! duplicated results; and it neither reads the notice nor keeps per-session
//! times. 300 sessions × 50 chunks a second is a small load for one tokio
//! runtime; this one runs on a thread of its own, so that `repro`'s main
//! thread stays free to kill and restart backends.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, sleep_until, timeout};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, error::ProtocolError};

use super::tally::{Outcome, SessionLog};

/// What the clients do.
#[derive(Debug, Clone)]
pub struct Load {
    pub url: String,
    pub sessions: usize,
    /// Session starts spread evenly over this long.
    pub ramp: Duration,
    /// Each session streams this long from its start.
    pub duration: Duration,
    /// Audio chunk: 20 ms of 16 kHz 16-bit mono.
    pub chunk_every: Duration,
    /// After `session.end`, how long a session waits for `session.ended`.
    pub drain: Duration,
    pub connect_timeout: Duration,
}

/// Run the load to its end (blocking: call it on a thread of its own).
/// `t0` is the instant the run's clock counts from (the kills are timed
/// against it too).
pub fn run(load: Load, t0: std::time::Instant) -> anyhow::Result<Vec<SessionLog>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let logs = rt.block_on(run_async(load, Instant::from_std(t0)));
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(logs)
}

async fn run_async(load: Load, t0: Instant) -> Vec<SessionLog> {
    let chunk = loadgen::proto::stt_chunk();
    let mut clients = JoinSet::new();
    let step = load.ramp.div_f64(load.sessions.max(1) as f64);
    for i in 0..load.sessions {
        let (load, chunk) = (load.clone(), chunk.clone());
        let start = t0 + step.mul_f64(i as f64);
        // A bound on the whole session: nothing here can outlive the run.
        let bound =
            start + load.connect_timeout + load.duration + load.drain + Duration::from_secs(5);
        clients.spawn(async move {
            sleep_until(start).await;
            match tokio::time::timeout_at(bound, session(&load, chunk, t0)).await {
                Ok(log) => log,
                Err(_) => SessionLog::new(secs(t0), Outcome::Aborted("stuck".into())),
            }
        });
    }
    let mut logs = Vec::with_capacity(load.sessions);
    while let Some(done) = clients.join_next().await {
        match done {
            Ok(log) => logs.push(log),
            Err(e) => logs.push(SessionLog::new(
                secs(t0),
                Outcome::Aborted(format!("task_failed: {e}")),
            )),
        }
    }
    logs
}

fn secs(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64()
}

/// What the client knows of its session's results so far.
#[derive(Debug, Default)]
struct Results {
    /// From `session.started` (sttproxy) or the first result naming one.
    id: Option<String>,
    last_partial_end: u64,
    finals_end_ms: u64,
    last_result: Option<Instant>,
    /// Set by a notice: the last result before it.
    notice_after: Option<Instant>,
}

/// One session from connect to end.
async fn session(load: &Load, chunk: Bytes, t0: Instant) -> SessionLog {
    let ws = match timeout(
        load.connect_timeout,
        tokio_tungstenite::connect_async(load.url.as_str()),
    )
    .await
    {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => {
            return SessionLog::new(
                secs(t0),
                Outcome::ConnectFailed(format!("connect_failed: {}", error_kind(&e))),
            );
        }
        Err(_) => {
            return SessionLog::new(secs(t0), Outcome::ConnectFailed("connect_timeout".into()));
        }
    };
    let mut log = SessionLog::new(0.0, Outcome::Completed);
    log.connected_at = Some(secs(t0));
    let (mut tx, mut rx) = ws.split();
    let mut tick = tokio::time::interval(load.chunk_every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let stream_end = Instant::now() + load.duration;
    let mut drain_end: Option<Instant> = None;
    let mut results = Results::default();
    let outcome = loop {
        tokio::select! {
            _ = tick.tick(), if drain_end.is_none() => {
                let msg = if Instant::now() >= stream_end {
                    drain_end = Some(Instant::now() + load.drain);
                    Message::text(loadgen::proto::SESSION_END)
                } else {
                    Message::Binary(chunk.clone())
                };
                if let Err(e) = tx.send(msg).await {
                    // The connection is going: its Close (if any) says why.
                    break read_end(&mut rx, error_kind(&e)).await;
                }
            }
            _ = sleep_until(drain_end.unwrap_or(stream_end)), if drain_end.is_some() => {
                break Outcome::Aborted("drain_timeout".into());
            }
            msg = rx.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    if on_text(&mut log, &mut results, text.as_str(), t0) {
                        break Outcome::Completed;
                    }
                }
                Some(Ok(Message::Close(frame))) => break Outcome::Aborted(close_kind(frame.as_ref())),
                Some(Ok(_)) => {}
                Some(Err(e)) => break Outcome::Aborted(error_kind(&e)),
                None => break Outcome::Aborted("eof".into()),
            },
        }
    };
    if outcome == Outcome::Completed {
        // A clean goodbye; its answer does not change the outcome.
        let _ = timeout(Duration::from_secs(1), tx.send(Message::Close(None))).await;
    }
    log.ended_at = secs(t0);
    log.outcome = outcome;
    log
}

/// After a failed send: up to 2 s for the Close that explains it.
async fn read_end<S>(rx: &mut S, send_error: String) -> Outcome
where
    S: futures_util::Stream<Item = Result<Message, WsError>> + Unpin,
{
    let read = async {
        loop {
            match rx.next().await {
                Some(Ok(Message::Close(frame))) => return close_kind(frame.as_ref()),
                Some(Ok(_)) => {}
                Some(Err(e)) => return error_kind(&e),
                None => return send_error,
            }
        }
    };
    Outcome::Aborted(
        timeout(Duration::from_secs(2), read)
            .await
            .unwrap_or_else(|_| "send_failed".into()),
    )
}

/// Handle one text message; true when it is `session.ended` (the session
/// is over, cleanly).
fn on_text(log: &mut SessionLog, r: &mut Results, text: &str, t0: Instant) -> bool {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return false;
    };
    if let Some(named) = v["session"].as_str().filter(|s| !s.is_empty()) {
        match &r.id {
            Some(id) if id != named => {
                log.cross_session += 1;
                return false;
            }
            Some(_) => {}
            None => r.id = Some(named.to_owned()),
        }
    }
    match v["type"].as_str() {
        Some("session.failover") => {
            log.failovers.push(secs(t0));
            r.notice_after = r.last_result;
            false
        }
        Some("session.ended") => true,
        Some(kind @ ("partial" | "final")) => {
            if !moves_on(r, kind, &v) {
                log.repeated += 1;
            }
            let now = Instant::now();
            if let Some(before) = r.notice_after.take() {
                log.pauses_ms.push((now - before).as_secs_f64() * 1e3);
            }
            r.last_result = Some(now);
            log.result_at(secs(t0));
            false
        }
        _ => false,
    }
}

/// Whether a result moves on from what the client had: a partial's
/// `end_bytes` past the previous partial's, a final starting where the
/// previous final ended (finals tile the audio, docs/protocol.md).
fn moves_on(r: &mut Results, kind: &str, v: &Value) -> bool {
    if kind == "partial" {
        let end = v["end_bytes"].as_u64().unwrap_or(0);
        let ok = end > r.last_partial_end;
        r.last_partial_end = r.last_partial_end.max(end);
        ok
    } else {
        let (start, end) = (
            v["audio_start_ms"].as_u64(),
            v["audio_end_ms"].as_u64().unwrap_or(0),
        );
        let ok = start == Some(r.finals_end_ms);
        r.finals_end_ms = r.finals_end_ms.max(end);
        ok
    }
}

/// `close_<code>`; tungstenite hands a 1014 over as 1002 "Protocol
/// violation" (docs/protocol.md), counted as the 1014 it was.
fn close_kind(frame: Option<&tokio_tungstenite::tungstenite::protocol::CloseFrame>) -> String {
    match frame {
        None => "close_1005".into(),
        Some(f) if f.code == CloseCode::Protocol && f.reason.as_str() == "Protocol violation" => {
            "close_1014".into()
        }
        Some(f) => format!("close_{}", u16::from(f.code)),
    }
}

fn error_kind(e: &WsError) -> String {
    match e {
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            "reset_without_close".into()
        }
        WsError::Io(io) => format!("io_{:?}", io.kind()).to_lowercase(),
        WsError::ConnectionClosed | WsError::AlreadyClosed => "connection_closed".into(),
        WsError::Protocol(_) => "protocol_error".into(),
        _ => "ws_error".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(log: &mut SessionLog, r: &mut Results, json: &str) -> bool {
        on_text(log, r, json, Instant::now())
    }

    #[test]
    fn a_notice_measures_the_pause_and_repeats_are_counted() {
        let mut log = SessionLog::new(0.0, Outcome::Completed);
        let mut r = Results::default();
        assert!(!text(
            &mut log,
            &mut r,
            r#"{"type":"session.started","session":"s1"}"#
        ));
        text(
            &mut log,
            &mut r,
            r#"{"type":"partial","session":"s1","end_bytes":640}"#,
        );
        text(
            &mut log,
            &mut r,
            r#"{"type":"final","session":"s1","audio_start_ms":0,"audio_end_ms":40,"end_bytes":1280}"#,
        );
        text(
            &mut log,
            &mut r,
            r#"{"type":"session.failover","session":"s1","resume_from_bytes":1280,"failovers":1}"#,
        );
        assert_eq!(log.failovers.len(), 1);
        assert!(log.pauses_ms.is_empty(), "no result after the notice yet");
        text(
            &mut log,
            &mut r,
            r#"{"type":"partial","session":"s1","end_bytes":1920}"#,
        );
        assert_eq!(log.pauses_ms.len(), 1);
        // A partial that says again what the client had, a final that does not tile.
        text(
            &mut log,
            &mut r,
            r#"{"type":"partial","session":"s1","end_bytes":1920}"#,
        );
        text(
            &mut log,
            &mut r,
            r#"{"type":"final","session":"s1","audio_start_ms":0,"audio_end_ms":80}"#,
        );
        assert_eq!(log.repeated, 2);
        text(
            &mut log,
            &mut r,
            r#"{"type":"partial","session":"s2","end_bytes":9999}"#,
        );
        assert_eq!(log.cross_session, 1);
        assert_eq!(log.results_per_s.iter().sum::<u32>(), 5);
        assert!(text(
            &mut log,
            &mut r,
            r#"{"type":"session.ended","session":"s1"}"#
        ));
    }

    #[test]
    fn results_without_a_session_id_are_no_cross_delivery() {
        // Through nginx the backend sees no session.start and names none.
        let mut log = SessionLog::new(0.0, Outcome::Completed);
        let mut r = Results::default();
        text(&mut log, &mut r, r#"{"type":"partial","end_bytes":640}"#);
        text(
            &mut log,
            &mut r,
            r#"{"type":"partial","session":null,"end_bytes":1280}"#,
        );
        assert_eq!((log.cross_session, log.repeated), (0, 0));
    }
}
