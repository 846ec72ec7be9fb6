//! The session relay's promises (issue 9), black-box over real sockets on
//! 127.0.0.1: nothing of one session ever reaches another over a reused
//! backend connection (a fence nobody but the proxy and the backend can
//! complete, no reuse of a connection with anything of the session left on
//! it), the RFC 6455 close handshake both ways, and every wait bounded (a
//! backend that stops reading, a client that never reads).
//!
//! The protocol these tests hold the proxy to (docs/protocol.md): the proxy's
//! `session.end` carries a fresh random fence token per lease, which the
//! client never sees; only a `session.ended` echoing it completes the fence;
//! client text in the `session.*` namespace other than `session.end` is
//! dropped; a connection with anything of the session left on it, or with
//! anything arriving while idle, is closed, never reused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sttproxy::config::BackendEntry;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use support::echo;
use support::raw::{
    OP_BINARY, OP_CLOSE, OP_TEXT, RawMsg, RawWs, client_frame, close_code, read_frame_from,
    server_frame,
};
use support::raw_backend::{
    BackendConn, RawBackend, control, ended_frame, final_frame, started_frame,
};
use support::{
    Harness, STEP, TEST_LIMIT, Ws, bounded, connect, end_session, eventually, expect_close_code,
    within,
};

/// Every backend entry gets these pool sizes.
fn sizes(s: &mut sttproxy::Settings, target: usize, max: usize) {
    for b in &mut s.backends {
        b.target_size = Some(target);
        b.max_size = Some(max);
    }
}

/// The proxy's only backend: `url`, pool target 1, max 1.
fn only_backend(s: &mut sttproxy::Settings, url: String) {
    s.backends = vec![BackendEntry {
        url,
        id: Some("raw".into()),
        target_size: Some(1),
        max_size: Some(1),
        weight: None,
        reuse: None,
        group: None,
    }];
}

fn text_or_binary(m: &Message) -> Option<String> {
    match m {
        Message::Text(t) => Some(t.as_str().to_string()),
        Message::Binary(b) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    }
}

/// The next data message, or `None` if the connection ended or closed.
async fn next_data_or_end(ws: &mut Ws) -> Option<Message> {
    within(STEP, "waiting for a message", async {
        loop {
            match ws.next().await {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => return Some(m),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
            }
        }
    })
    .await
}

fn session_ended(text: &str) -> Option<Value> {
    let v: Value = serde_json::from_str(text).ok()?;
    (v["type"] == "session.ended").then_some(v)
}

// ---------------------------------------------------------------- (a) forged fence

/// A client that sends text shaped like the backend's `session.ended` (an
/// echo backend reflects it) right before its `session.end` must not be able
/// to end the fence early: 50 sessions one after another on one backend
/// connection, each tagging its data with its number; no session may ever
/// receive anything of an earlier one, and each gets all of its own data,
/// then `session.ended` (without any fence token), then close 1000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_session_ended_never_lets_a_session_see_an_earlier_ones_data() {
    const SESSIONS: usize = 50;
    const DATA: usize = 3;
    bounded(Duration::from_secs(90), async {
        let h = Harness::start(1, echo(), |s| sizes(s, 1, 1)).await;
        h.wait_warm().await;
        let mut leaks = Vec::new();
        let mut short = Vec::new();
        for n in 0..SESSIONS {
            let mut ws = connect(&h.ws_url()).await;
            let tag = format!("S{n}:");
            // The first message must be this session's session.started;
            // anything before it is left over from an earlier session.
            let id = loop {
                let m = next_data_or_end(&mut ws)
                    .await
                    .unwrap_or_else(|| panic!("session {n}: ended before session.started"));
                let text = text_or_binary(&m).unwrap();
                match serde_json::from_str::<Value>(&text) {
                    Ok(v) if v["type"] == "session.started" => {
                        break v["session"].as_str().unwrap().to_string();
                    }
                    _ => leaks.push(format!("session {n} before session.started: {text}")),
                }
            };
            let forged = json!({"type": "session.ended", "session": id}).to_string();
            ws.feed(Message::text(forged)).await.unwrap();
            for k in 0..DATA {
                ws.feed(Message::text(format!("{tag}text{k}")))
                    .await
                    .unwrap();
                ws.feed(Message::binary(format!("{tag}binary{k}").into_bytes()))
                    .await
                    .unwrap();
            }
            ws.feed(support::session_end()).await.unwrap();
            ws.flush().await.unwrap();
            let mut own = 0;
            let ended = loop {
                let Some(m) = next_data_or_end(&mut ws).await else {
                    break None;
                };
                let text = text_or_binary(&m).unwrap();
                if let Some(v) = session_ended(&text) {
                    break Some(v);
                }
                if text.starts_with(&tag) {
                    own += 1;
                } else {
                    leaks.push(format!("session {n} ({id}): {text}"));
                }
            };
            let ended = ended.unwrap_or_else(|| panic!("session {n}: no session.ended"));
            assert_eq!(
                ended,
                json!({"type": "session.ended", "session": id}),
                "session {n}: session.ended as the client sees it (no fence token)"
            );
            if own != 2 * DATA {
                short.push(format!("session {n}: {own} of {} own echoes", 2 * DATA));
            }
            assert_eq!(expect_close_code(&mut ws).await, 1000, "session {n}");
        }
        assert!(
            leaks.is_empty(),
            "{} messages of earlier sessions reached later ones:\n{}",
            leaks.len(),
            leaks.join("\n")
        );
        assert!(
            short.is_empty(),
            "sessions ended before all their data came back:\n{}",
            short.join("\n")
        );
        // Connections are still reused (a relay that never reuses would pass the above).
        assert!(
            h.total_dials() < 10,
            "{} dials for {SESSIONS} clean sessions",
            h.total_dials()
        );
        h.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------- raw backends

/// What the scripted backend reports to the test.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Started { conn: u64, session: String },
    Ended { conn: u64, session: String },
    LateSent { conn: u64, session: String },
    Closed { conn: u64 },
}

/// When the scripted backend sends its frame of the old session.
#[derive(Clone)]
enum Late {
    /// Right after `session.ended`, in the same write.
    InSameWrite,
    /// Onto the idle connection, when the test says so.
    OnSignal(Arc<Notify>),
}

fn late_frame(session: &str) -> Vec<u8> {
    server_frame(OP_BINARY, format!("LATE:{session}").as_bytes())
}

/// A fenced echo backend that, at the end of a session, sends a `final`, the
/// correct `session.ended` (echoing the fence token), and then (`late`) one
/// more frame of that session: `LATE:<id>`, binary, so that only discarding
/// the connection keeps it from the next session.
async fn fenced_echo_with_late_frame(
    mut conn: BackendConn,
    late: Late,
    events: mpsc::UnboundedSender<Event>,
) {
    let index = conn.index;
    let mut current: Option<String> = None;
    let mut pending_late: Option<String> = None;
    loop {
        let msg = match (&late, &pending_late) {
            (Late::OnSignal(signal), Some(old)) => {
                tokio::select! {
                    biased;
                    () = signal.notified() => {
                        if conn.write(&late_frame(old)).await.is_err() {
                            break;
                        }
                        let _ = events.send(Event::LateSent { conn: index, session: old.clone() });
                        pending_late = None;
                        continue;
                    }
                    m = conn.next_msg() => m,
                }
            }
            _ => conn.next_msg().await,
        };
        let reply = match msg {
            Ok(Some(RawMsg::Text(t))) => match control(&t) {
                Some(c) if c.kind == "session.start" => {
                    let id = c.session.unwrap_or_default();
                    let _ = events.send(Event::Started {
                        conn: index,
                        session: id.clone(),
                    });
                    current = Some(id.clone());
                    started_frame(&id)
                }
                Some(c) if c.kind == "session.end" => {
                    let id = c.session.or_else(|| current.take()).unwrap_or_default();
                    current = None;
                    let mut out = final_frame(&id);
                    out.extend(ended_frame(&id, c.fence.as_deref()));
                    match late {
                        Late::InSameWrite => out.extend(late_frame(&id)),
                        Late::OnSignal(_) => pending_late = Some(id.clone()),
                    }
                    let _ = events.send(Event::Ended {
                        conn: index,
                        session: id,
                    });
                    out
                }
                _ => server_frame(OP_TEXT, t.as_bytes()),
            },
            Ok(Some(RawMsg::Binary(b))) => server_frame(OP_BINARY, &b),
            Ok(Some(_)) | Ok(None) | Err(_) => break,
        };
        if conn.write(&reply).await.is_err() {
            break;
        }
    }
    let _ = events.send(Event::Closed { conn: index });
}

/// Wait for the next event that `want` accepts; earlier ones are kept in `seen`.
async fn wait_event(
    rx: &mut mpsc::UnboundedReceiver<Event>,
    seen: &mut Vec<Event>,
    what: &str,
    want: impl Fn(&Event) -> bool,
) -> Event {
    if let Some(e) = seen.iter().find(|e| want(e)) {
        return e.clone();
    }
    within(STEP, what, async {
        loop {
            let e = rx.recv().await.expect("the raw backend is gone");
            seen.push(e.clone());
            if want(&e) {
                return e;
            }
        }
    })
    .await
}

/// One whole session through the proxy with a tungstenite client; returns its
/// id and every message it received (as text), session.ended included.
async fn run_session(h: &Harness, data: &str) -> (String, Vec<String>) {
    let mut ws = connect(&h.ws_url()).await;
    let mut got = Vec::new();
    let id = loop {
        let m = next_data_or_end(&mut ws)
            .await
            .unwrap_or_else(|| panic!("ended before session.started; got {got:?}"));
        let text = text_or_binary(&m).unwrap();
        if let Ok(v) = serde_json::from_str::<Value>(&text)
            && v["type"] == "session.started"
        {
            break v["session"].as_str().unwrap().to_string();
        }
        got.push(text);
    };
    ws.send(Message::binary(data.as_bytes().to_vec()))
        .await
        .unwrap();
    ws.send(support::session_end()).await.unwrap();
    loop {
        let m = next_data_or_end(&mut ws)
            .await
            .unwrap_or_else(|| panic!("session {id} ended before session.ended; got {got:?}"));
        let text = text_or_binary(&m).unwrap();
        got.push(text.clone());
        if session_ended(&text).is_some() {
            break;
        }
    }
    assert_eq!(expect_close_code(&mut ws).await, 1000, "session {id}");
    (id, got)
}

/// A backend that sends `final` + the correct `session.ended` + one more frame
/// of the old session in one write: the connection has something of the
/// session left on it at release, so it must be closed, not reused, and the
/// next session must never see that frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_a_frame_after_session_ended_in_the_same_write_never_reaches_the_next_session() {
    bounded(TEST_LIMIT, async {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let backend = RawBackend::start(move |conn| {
            fenced_echo_with_late_frame(conn, Late::InSameWrite, tx.clone())
        })
        .await;
        let h = Harness::start(0, echo(), |s| only_backend(s, backend.url())).await;
        h.wait_warm().await;
        let mut seen = Vec::new();

        let (first, got) = run_session(&h, "first-data").await;
        assert!(
            got.iter().any(|t| t == "first-data"),
            "the first session's echo: {got:?}"
        );
        wait_event(
            &mut rx,
            &mut seen,
            "the first session's end",
            |e| matches!(e, Event::Ended { session, .. } if *session == first),
        )
        .await;

        let (second, got) = run_session(&h, "second-data").await;
        let leaked: Vec<_> = got.iter().filter(|t| t.contains("LATE:")).collect();
        assert!(
            leaked.is_empty(),
            "session {second} received the frame the backend sent after {first}'s \
             session.ended: {leaked:?} (all: {got:?})"
        );
        let started = wait_event(
            &mut rx,
            &mut seen,
            "the second session's start",
            |e| matches!(e, Event::Started { session, .. } if *session == second),
        )
        .await;
        assert_eq!(
            started,
            Event::Started {
                conn: 2,
                session: second.clone()
            },
            "the second session must run on a new connection (events: {seen:?})"
        );
        wait_event(&mut rx, &mut seen, "the first connection closed", |e| {
            *e == Event::Closed { conn: 1 }
        })
        .await;
        assert!(backend.dials() >= 2, "dials: {}", backend.dials());
        h.stop().await;
    })
    .await;
}

/// A backend that sends a frame of the old session onto the connection once
/// it is idle in the pool (after the fence completed): the connection must be
/// discarded, and the next session must never see the frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_frame_on_an_idle_connection_never_reaches_the_next_session() {
    bounded(TEST_LIMIT, async {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let signal = Arc::new(Notify::new());
        let late = Late::OnSignal(signal.clone());
        let backend = RawBackend::start(move |conn| {
            fenced_echo_with_late_frame(conn, late.clone(), tx.clone())
        })
        .await;
        let h = Harness::start(0, echo(), |s| only_backend(s, backend.url())).await;
        h.wait_warm().await;
        let mut seen = Vec::new();

        let (first, _) = run_session(&h, "first-data").await;
        // The fence completed cleanly: the connection is back in the pool.
        let backends = h.proxy().backends().clone();
        eventually(STEP, "the connection idle in the pool again", || {
            let all = backends.all();
            async move { all.iter().all(|b| b.snapshot().idle == 1) }
        })
        .await;
        signal.notify_one();
        wait_event(
            &mut rx,
            &mut seen,
            "the late frame written",
            |e| matches!(e, Event::LateSent { session, .. } if *session == first),
        )
        .await;

        let (second, got) = run_session(&h, "second-data").await;
        let leaked: Vec<_> = got.iter().filter(|t| t.contains("LATE:")).collect();
        assert!(
            leaked.is_empty(),
            "session {second} received the frame sent onto the idle connection after \
             {first}: {leaked:?} (all: {got:?})"
        );
        let started = wait_event(
            &mut rx,
            &mut seen,
            "the second session's start",
            |e| matches!(e, Event::Started { session, .. } if *session == second),
        )
        .await;
        assert_ne!(
            started,
            Event::Started {
                conn: 1,
                session: second.clone()
            },
            "the second session ran on the connection that had data on it while idle \
             (events: {seen:?})"
        );
        wait_event(&mut rx, &mut seen, "the first connection closed", |e| {
            *e == Event::Closed { conn: 1 }
        })
        .await;
        h.stop().await;
    })
    .await;
}

/// A raw client whose session started (`session.started` read).
async fn raw_session(h: &Harness) -> RawWs {
    let mut c = RawWs::connect(h.listen, "/v1/stream").await.unwrap();
    let first = within(STEP, "session.started", c.next_data())
        .await
        .unwrap();
    assert!(
        matches!(&first, Some(RawMsg::Text(t)) if t.contains("session.started")),
        "{first:?}"
    );
    c
}

/// Write masked binary frames of `size` bytes until a write fails; returns
/// when that happened, how much was written, and the error.
fn spawn_flood(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    size: usize,
) -> tokio::task::JoinHandle<(Instant, u64, std::io::Error)> {
    tokio::spawn(async move {
        let frame = client_frame(true, OP_BINARY, &vec![0xa5; size]);
        let mut sent = 0u64;
        loop {
            if let Err(e) = wr.write_all(&frame).await {
                return (Instant::now(), sent, e);
            }
            sent += size as u64;
        }
    })
}

// ---------------------------------------------------------------- close handshake

/// A client's Close is answered with a Close echoing its code (RFC 6455
/// §5.5.1), and then the proxy closes the TCP connection: end of stream, not
/// a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_a_clients_close_is_answered_with_a_close_echoing_its_code() {
    bounded(TEST_LIMIT, async {
        let h = Harness::start(1, echo(), |_| {}).await;
        h.wait_warm().await;
        for code in [4000u16, 1000, 4000, 1000] {
            let mut c = raw_session(&h).await;
            c.send_binary(b"some audio").await.unwrap();
            c.send_close(code).await.unwrap();
            let reply = within(STEP, "the proxy's close reply", async {
                loop {
                    match c.read_frame().await {
                        Ok(Some(f)) if f.opcode == OP_CLOSE => return Ok(f),
                        // The echo of the audio may still come before it.
                        Ok(Some(_)) => {}
                        Ok(None) => return Err("end of stream without a close frame".to_string()),
                        Err(e) => return Err(format!("{e} without a close frame")),
                    }
                }
            })
            .await
            .unwrap_or_else(|e| panic!("client close {code}: {e}"));
            assert_eq!(
                close_code(&reply.payload),
                Some(code),
                "the close reply must echo the client's code"
            );
            let after = within(STEP, "end of stream after the close", c.read_frame()).await;
            assert!(
                matches!(after, Ok(None)),
                "after the close reply: {after:?} (expected a clean end of stream)"
            );
        }
        h.stop().await;
    })
    .await;
}

/// After a graceful end (session.end, session.ended, close 1000 from the
/// proxy) a client that answers the proxy's Close 50 ms late still closes
/// cleanly: it reads the whole close frame, the proxy has not closed TCP yet
/// when the reply goes out, the reply is written without error, and then the
/// proxy's end of stream comes (no reset).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_a_client_answering_the_proxys_close_50ms_late_closes_cleanly() {
    bounded(TEST_LIMIT, async {
        let h = Harness::start(1, echo(), |_| {}).await;
        h.wait_warm().await;
        for round in 0..5 {
            let mut c = raw_session(&h).await;
            c.send_text(r#"{"type":"session.end"}"#).await.unwrap();
            // Read frames as they are (the raw client would echo a close at once).
            let close = within(STEP, "session.ended and the close frame", async {
                let mut ended = false;
                loop {
                    let f = c
                        .read_frame()
                        .await
                        .unwrap_or_else(|e| panic!("round {round}: {e}"))
                        .unwrap_or_else(|| panic!("round {round}: end of stream, no close"));
                    match f.opcode {
                        OP_TEXT => {
                            ended |= session_ended(&String::from_utf8_lossy(&f.payload)).is_some()
                        }
                        OP_CLOSE => {
                            assert!(ended, "round {round}: close before session.ended");
                            return f;
                        }
                        _ => {}
                    }
                }
            })
            .await;
            assert_eq!(close_code(&close.payload), Some(1000), "round {round}");
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut byte = [0u8; 1];
            match c.tcp().try_read(&mut byte) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Ok(0) => panic!(
                    "round {round}: the proxy closed TCP within 50 ms of its Close, before \
                     the client's Close reply"
                ),
                Ok(_) => panic!("round {round}: data after the close frame"),
                Err(e) => panic!("round {round}: the connection failed before the reply: {e}"),
            }
            c.send_close(1000)
                .await
                .unwrap_or_else(|e| panic!("round {round}: writing the close reply: {e}"));
            let end = within(STEP, "the proxy's end of stream", c.read_frame()).await;
            assert!(
                matches!(end, Ok(None)),
                "round {round}: after the reply: {end:?} (expected end of stream, no reset)"
            );
            let err = c.tcp().take_error().unwrap();
            assert!(err.is_none(), "round {round}: socket error {err:?} (reset)");
        }
        h.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------- bounded waits

/// A backend that stops reading mid-session while the client keeps sending
/// large binary messages: the session ends (1014 or 1011 to the client)
/// within send_timeout + drain_timeout of the backend's last read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_a_backend_that_stops_reading_ends_the_session_in_time() {
    const SEND_TIMEOUT: Duration = Duration::from_secs(1);
    const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
    const SLACK: Duration = Duration::from_millis(750);
    bounded(TEST_LIMIT, async {
        let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
        let backend = RawBackend::start(move |mut conn| {
            let tx = tx.clone();
            async move {
                // Start the session, take 1 MiB of data, then stop reading
                // (the socket stays open).
                let mut taken = 0usize;
                loop {
                    match conn.next_msg().await {
                        Ok(Some(RawMsg::Text(t))) => {
                            if let Some(c) = control(&t)
                                && c.kind == "session.start"
                            {
                                let id = c.session.unwrap_or_default();
                                if conn.write(&started_frame(&id)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Ok(Some(RawMsg::Binary(b))) => {
                            taken += b.len();
                            if taken >= 1 << 20 {
                                break;
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => return,
                    }
                }
                let _ = tx.send(Instant::now());
                let _held = conn.into_stream();
                std::future::pending::<()>().await;
            }
        })
        .await;
        let h = Harness::start(0, echo(), |s| {
            only_backend(s, backend.url());
            s.send_timeout = SEND_TIMEOUT;
            s.drain_timeout = DRAIN_TIMEOUT;
        })
        .await;
        h.wait_warm().await;
        let (stream, mut buf) = raw_session(&h).await.into_parts();
        let (mut rd, wr) = stream.into_split();
        let writer = spawn_flood(wr, 256 << 10);
        let stopped = within(STEP, "the backend stops reading", rx.recv())
            .await
            .unwrap();
        let limit = SEND_TIMEOUT + DRAIN_TIMEOUT + SLACK;
        let code = within(
            limit,
            format_args!(
                "the session's end after the backend stopped reading \
                 (send_timeout {SEND_TIMEOUT:?} + drain_timeout {DRAIN_TIMEOUT:?} + {SLACK:?})"
            ),
            async {
                loop {
                    match read_frame_from(&mut rd, &mut buf, false).await {
                        Ok(Some(f)) if f.opcode == OP_CLOSE => return close_code(&f.payload),
                        Ok(Some(_)) => {}
                        Ok(None) => panic!("end of stream without a close frame"),
                        Err(e) => panic!("{e} without a close frame"),
                    }
                }
            },
        )
        .await;
        let took = stopped.elapsed();
        writer.abort();
        assert!(
            matches!(code, Some(1011 | 1014)),
            "close code {code:?} after {took:?}, expected 1014 or 1011"
        );
        eprintln!("backend stopped reading: client closed with {code:?} after {took:?}");
        h.stop().await;
    })
    .await;
}

/// A client that never reads while the backend floods it (an echo backend
/// echoing all it sends) gets close 1008 or its socket closed within
/// send_timeout (+ the close deadline of about 1 s, + slack), while another
/// session on the same proxy keeps its round trips well under send_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_a_client_that_never_reads_is_closed_in_time_and_others_keep_their_latency() {
    const SEND_TIMEOUT: Duration = Duration::from_secs(1);
    const CLOSE_DEADLINE: Duration = Duration::from_secs(1);
    const SLACK: Duration = Duration::from_millis(600);
    bounded(TEST_LIMIT, async {
        let h = Harness::start(1, echo(), |s| {
            s.send_timeout = SEND_TIMEOUT;
            s.drain_timeout = Duration::from_secs(1);
        })
        .await;
        h.wait_warm().await;

        // The other session: round trips until told to stop.
        let stop = Arc::new(Notify::new());
        let mut good = connect(&h.ws_url()).await;
        let good_id = support::expect_started(&mut good).await;
        let good_task = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut rtts = Vec::new();
                let stopped = stop.notified();
                tokio::pin!(stopped);
                for i in 0u64.. {
                    let sent = Instant::now();
                    let payload = format!("rtt-{i}");
                    good.send(Message::text(payload.clone())).await.unwrap();
                    let m = support::recv_data(&mut good).await;
                    assert_eq!(m, Message::text(payload));
                    rtts.push(sent.elapsed());
                    tokio::select! {
                        biased;
                        () = &mut stopped, if rtts.len() >= 100 => break,
                        () = tokio::time::sleep(Duration::from_millis(2)) => {}
                    }
                }
                (good, rtts)
            })
        };

        // The slow client: a small receive buffer, sends a lot, never reads.
        let slow = RawWs::connect_with_rcvbuf(h.listen, "/v1/stream", 64 << 10)
            .await
            .unwrap();
        let (stream, mut buf) = slow.into_parts();
        let (mut rd, wr) = stream.into_split();
        // session.started arrives before the flood; leave it unread too.
        let flood_started = Instant::now();
        let writer = spawn_flood(wr, 64 << 10);
        let limit = SEND_TIMEOUT + CLOSE_DEADLINE + SLACK;
        let (closed_at, sent, err) = within(
            limit,
            format_args!(
                "the proxy closing a client that never reads (send_timeout {SEND_TIMEOUT:?} \
                 + close deadline {CLOSE_DEADLINE:?} + {SLACK:?})"
            ),
            writer,
        )
        .await
        .unwrap();
        let took = closed_at - flood_started;
        // What the slow client had not read: data, maybe a close frame (1008), the end.
        let (mut frames, mut close) = (0u64, None);
        let end = within(STEP, "reading what the slow client left unread", async {
            loop {
                match read_frame_from(&mut rd, &mut buf, false).await {
                    Ok(Some(f)) if f.opcode == OP_CLOSE => close = Some(close_code(&f.payload)),
                    Ok(Some(_)) => frames += 1,
                    Ok(None) => return "end of stream".to_string(),
                    Err(e) => return e.to_string(),
                }
            }
        })
        .await;
        if let Some(code) = close {
            assert_eq!(code, Some(1008), "the slow client's close code");
        }
        eprintln!(
            "slow client: closed after {took:?} ({sent} bytes sent, write error {err}), \
             then {frames} unread frames, close frame {close:?}, then {end}"
        );

        stop.notify_one();
        let (mut good, mut rtts) = within(STEP, "the other session's round trips", good_task)
            .await
            .unwrap();
        rtts.sort();
        let p99 = rtts[(rtts.len() * 99).div_ceil(100) - 1];
        let max = rtts[rtts.len() - 1];
        eprintln!(
            "other session: {} round trips, p99 {p99:?}, max {max:?}",
            rtts.len()
        );
        assert!(
            p99 < SEND_TIMEOUT / 4,
            "the other session's p99 round trip {p99:?} (max {max:?}, {} samples) is not \
             well under send_timeout {SEND_TIMEOUT:?}",
            rtts.len()
        );
        end_session(&mut good, &good_id).await;
        h.stop().await;
    })
    .await;
}
