//! The relay and its fence under a client and a backend that send whatever
//! the fuzzer makes up: raw bytes, or whole frames (masked from the client)
//! of any opcode and payload — `session.*` messages included — then maybe
//! `session.end` and a Close. The backend answers the proxy's `session.end`
//! with a correct `session.ended` only when the input says so.
//!
//! Checked on every input, on a paused clock (every timeout elapses at once):
//! - the relay ends (no await without a deadline);
//! - the fence token never reaches the client in a message the proxy reads
//!   (a single-frame text of at most 4096 bytes; binary, fragmented and
//!   larger text is relayed unread, docs/protocol.md — a first run found
//!   the check too strict there: a backend that cut a binary frame short
//!   sent its own `session.ended` inside that frame's payload);
//! - the connection goes back to the pool only after the correct fence
//!   reply (nothing the fuzzer can say alone releases it);
//! - what the client receives is a sequence of valid unmasked frames and
//!   nothing follows a Close;
//! - no text message reaching the backend is a `session.*` message other
//!   than `session.end`, as a backend's JSON parser reads it (duplicate keys:
//!   the last wins, as in Python, JavaScript and Go): a client cannot speak
//!   in the namespace of the proxy and the backend.
#![no_main]

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sttproxy::backend::BackendConn;
use sttproxy::backends::Backends;
use sttproxy::metrics::Metrics;
use sttproxy::relay::frame::{self, Header, OP_CLOSE, OP_TEXT};
use sttproxy::relay::rate::RateLimits;
use sttproxy::relay::{FrameStream, Peer, RelayLease, RelaySettings, relay};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const CLIENT_KEY: [u8; 4] = [0x11, 0x22, 0x33, 0x44];
/// The largest backend text the proxy reads (`relay::judge::CONTROL_MAX`).
const CONTROL_MAX: u64 = 4096;

/// What one side sends, in order.
#[derive(Debug, Default)]
struct Script {
    client: Vec<Vec<u8>>,
    backend: Vec<Vec<u8>>,
    fenced: bool,
    answer_fence: bool,
    client_ends: bool,
    client_closes: bool,
}

/// Input: one flag byte, then chunks of `[tag, len, bytes…]`. Tag bit 0:
/// from the client (else the backend); bit 1: a whole frame with opcode
/// `tag >> 4` and the bytes as payload (else the bytes raw); bit 2: clear FIN.
fn parse(data: &[u8]) -> Script {
    let Some((&flags, mut rest)) = data.split_first() else {
        return Script::default();
    };
    let mut s = Script {
        fenced: flags & 1 != 0,
        answer_fence: flags & 2 != 0,
        client_ends: flags & 4 != 0,
        client_closes: flags & 8 != 0,
        ..Script::default()
    };
    while let [tag, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (bytes, next) = tail.split_at(n);
        rest = next;
        let from_client = tag & 1 != 0;
        let chunk = if tag & 2 != 0 {
            let mut f = Vec::new();
            let mask = from_client.then_some(CLIENT_KEY);
            frame::push_frame(&mut f, tag >> 4, bytes, mask);
            if tag & 4 != 0 {
                f[0] &= 0x7f;
            }
            f
        } else {
            bytes.to_vec()
        };
        if from_client {
            s.client.push(chunk);
        } else {
            s.backend.push(chunk);
        }
    }
    s
}

struct Lease {
    conn: BackendConn<DuplexStream>,
    released: Rc<Cell<Option<bool>>>,
}

impl std::ops::Deref for Lease {
    type Target = BackendConn<DuplexStream>;
    fn deref(&self) -> &Self::Target {
        &self.conn
    }
}

impl std::ops::DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.conn
    }
}

impl RelayLease<DuplexStream> for Lease {
    fn release(self) {
        self.released.set(Some(true));
    }
    fn discard(self) {
        self.released.set(Some(false));
    }
}

fn settings() -> RelaySettings {
    let s = Duration::from_secs;
    RelaySettings {
        drain_timeout: s(2),
        idle_timeout: s(30),
        send_timeout: s(5),
        close_timeout: s(1),
        max_message_size: 4096,
        ping_interval: s(10),
        pong_timeout: s(5),
        rate: RateLimits::OFF,
        backend_ping_interval: s(10),
        backend_pong_timeout: s(5),
    }
}

/// Write the chunks, then read everything until the proxy's side ends.
async fn peer(mut io: DuplexStream, chunks: Vec<Vec<u8>>, seen: Rc<RefCell<Vec<u8>>>) {
    let (mut rd, mut wr) = tokio::io::split(&mut io);
    let write = async {
        for c in chunks {
            if wr.write_all(&c).await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
        }
    };
    let read = async {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = rd.read(&mut buf).await {
            seen.borrow_mut().extend_from_slice(&buf[..n]);
        }
    };
    tokio::join!(write, read);
}

/// The whole frames in `wire`, unmasked (the proxy's frames toward a backend
/// are masked; toward a client never). A frame cut short may end the wire: a
/// peer that vanished mid-frame leaves the proxy nothing to finish it with,
/// and it then shuts the socket.
fn frames(wire: &[u8]) -> Result<Vec<(Header, Vec<u8>)>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < wire.len() {
        let h = match Header::parse(&wire[at..]) {
            Ok(Some(h)) => h,
            Ok(None) => break,
            Err(e) => return Err(format!("a bad frame at byte {at}: {e}")),
        };
        let start = at + h.header_len;
        let end = start.saturating_add(usize::try_from(h.len).unwrap_or(usize::MAX));
        if end > wire.len() {
            break;
        }
        let mut payload = wire[start..end].to_vec();
        if let Some(key) = h.mask {
            frame::apply_mask(&mut payload, key, 0);
        }
        out.push((h, payload));
        at = end;
    }
    Ok(out)
}

fuzz_target!(|data: &[u8]| {
    let script = parse(data);
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
    else {
        return;
    };
    let metrics = Metrics::new(Backends::default());
    let released = Rc::new(Cell::new(None));
    let to_client = Rc::new(RefCell::new(Vec::new()));
    let to_backend = Rc::new(RefCell::new(Vec::new()));
    let fence_answered = Rc::new(Cell::new(false));
    let ended = rt.block_on(async {
        let (client_io, proxy_client) = tokio::io::duplex(16 << 10);
        let (proxy_backend, backend_io) = tokio::io::duplex(16 << 10);
        let mut client_chunks = script.client;
        if script.client_ends {
            let mut f = Vec::new();
            frame::push_frame(
                &mut f,
                OP_TEXT,
                br#"{"type":"session.end"}"#,
                Some(CLIENT_KEY),
            );
            client_chunks.push(f);
        }
        if script.client_closes {
            let mut f = Vec::new();
            frame::push_frame(&mut f, OP_CLOSE, &1000u16.to_be_bytes(), Some(CLIENT_KEY));
            client_chunks.push(f);
        }
        let client = peer(client_io, client_chunks, to_client.clone());
        let backend = backend_peer(
            backend_io,
            script.backend,
            script.answer_fence,
            to_backend.clone(),
            fence_answered.clone(),
        );
        let proxy = async {
            let mut side = FrameStream::new(proxy_client, Vec::new(), Peer::Client);
            let lease = Lease {
                conn: BackendConn::new(proxy_backend, Vec::new()),
                released: released.clone(),
            };
            let shutdown = tokio_util::sync::CancellationToken::new();
            let end = relay(
                &mut side,
                lease,
                script.fenced,
                "fuzz",
                &settings(),
                &shutdown,
                &metrics,
                None,
            )
            .await;
            drop(side);
            end
        };
        let all = async { tokio::join!(proxy, client, backend).0 };
        tokio::time::timeout(Duration::from_secs(3600), all).await
    });
    let end = ended.unwrap_or_else(|_| panic!("the relay did not end within an hour"));

    // The token the proxy sent the backend in its session.end, if it did.
    let sent = frames(&to_backend.borrow()).unwrap_or_default();
    let token = sent.iter().find_map(|(h, p)| {
        let v: serde_json::Value = serde_json::from_slice(p)
            .ok()
            .filter(|_| h.opcode == OP_TEXT)?;
        (v["type"] == "session.end").then(|| v["fence"].as_str().map(str::to_string))?
    });
    for text in text_messages(&sent) {
        let Ok(serde_json::Value::Object(m)) = serde_json::from_slice(&text) else {
            continue;
        };
        if let Some(kind) = m.get("type").and_then(|t| t.as_str()) {
            assert!(
                !kind.starts_with("session.") || kind == "session.end",
                "a client's {kind} reached the backend: {:?}",
                String::from_utf8_lossy(&text)
            );
        }
    }
    let received = to_client.borrow();
    let client_frames = frames(&received)
        .unwrap_or_else(|e| panic!("to the client: {e} in {:02x?}", &received[..]));
    if let Some(token) = &token {
        // Only in what the proxy reads: a backend's binary, fragmented or
        // large text is relayed unread (docs/protocol.md, "What the proxy
        // filters"), so a backend that puts the token there sends it itself.
        let read = client_frames
            .iter()
            .filter(|(h, _)| h.opcode == OP_TEXT && h.fin && h.len <= CONTROL_MAX);
        assert!(
            !read
                .clone()
                .any(|(_, p)| p.windows(token.len()).any(|w| w == token.as_bytes())),
            "the fence token reached the client: {:?}",
            read.map(|(_, p)| String::from_utf8_lossy(p))
                .collect::<Vec<_>>()
        );
    }
    if released.get() == Some(true) {
        assert!(
            fence_answered.get(),
            "released without the fence reply: {end:?}"
        );
    }
    let mut closed = false;
    for (h, _) in &client_frames {
        assert!(h.mask.is_none(), "a masked frame toward the client");
        assert!(!closed, "a frame after the Close toward the client");
        closed = h.opcode == OP_CLOSE;
    }
});

/// The whole text messages among `frames`, fragments joined.
fn text_messages(frames: &[(Header, Vec<u8>)]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut current: Option<Vec<u8>> = None;
    for (h, payload) in frames {
        match h.opcode {
            OP_TEXT => current = Some(payload.clone()),
            0 => {
                if let Some(c) = current.as_mut() {
                    c.extend_from_slice(payload);
                }
            }
            _ => {
                if h.opcode < 8 {
                    current = None;
                }
                continue;
            }
        }
        if h.fin {
            out.extend(current.take());
        }
    }
    out
}

/// The backend: its chunks, and the correct `session.ended` once it reads
/// the proxy's `session.end` (when the script says to answer it).
async fn backend_peer(
    mut io: DuplexStream,
    chunks: Vec<Vec<u8>>,
    answer: bool,
    seen: Rc<RefCell<Vec<u8>>>,
    answered: Rc<Cell<bool>>,
) {
    let (mut rd, mut wr) = tokio::io::split(&mut io);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let write = async {
        for c in chunks {
            if wr.write_all(&c).await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
        }
        while let Some(reply) = rx.recv().await {
            if wr.write_all(&reply).await.is_err() {
                return;
            }
            answered.set(true);
        }
    };
    let read = async {
        let mut buf = [0u8; 4096];
        let mut done = !answer;
        while let Ok(n @ 1..) = rd.read(&mut buf).await {
            seen.borrow_mut().extend_from_slice(&buf[..n]);
            if done {
                continue;
            }
            let Ok(sent) = frames(&seen.borrow()) else {
                continue;
            };
            for (_, p) in sent {
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p) else {
                    continue;
                };
                if v["type"] == "session.end" {
                    let reply = serde_json::json!({
                        "type": "session.ended", "session": v["session"], "fence": v["fence"],
                    });
                    let mut f = Vec::new();
                    frame::push_frame(&mut f, OP_TEXT, reply.to_string().as_bytes(), None);
                    let _ = tx.send(f);
                    done = true;
                }
            }
        }
        drop(tx);
    };
    tokio::join!(write, read);
}
