//! Instructions per relayed message: a deterministic regression guard for the
//! relay's hot path (issue 9), counted by callgrind through gungraun.
//!
//! One fenced session runs through `sttproxy::relay::relay` over in-memory
//! streams (`tokio::io::duplex`) on a current-thread runtime with a paused
//! clock (no clock reads, no timer ever fires: the count does not depend on
//! how fast valgrind runs). The peers are byte pumps, not WebSocket stacks:
//! the client writes pre-encoded masked 1 KiB frames, the backend unmasked
//! ones, and both count what they receive without parsing it. The session
//! ends as a real one does: `session.end`, the fence with the backend, Close
//! both ways, the lease released.
//!
//! Two shapes of traffic, because they take different paths:
//! - `messages::binary`: binary frames, [`BINARY_BATCH`] per write (several
//!   frames per read, as a busy proxy sees them): the pass-through path.
//! - `messages::text`: text frames, one per write and one write per turn of
//!   the runtime: a wake-up and a read per message. The client's text is
//!   data (not JSON, like `loadgen`'s): validated as UTF-8 and re-masked. The
//!   backend's is a result as an STT backend sends it, naming the session
//!   (docs/protocol.md): searched, read as JSON and checked against the
//!   lease. What a session at a few messages per second costs.
//!
//! `messages::setup` relays nothing (the session's start and end). For each
//! shape, instructions per relayed message (one 1 KiB frame in either
//! direction) = (shape − setup) / (2 × MESSAGES). The runtime, the streams
//! and the frames are built in the benchmark's setup function, which
//! callgrind does not count.
//!
//! `scripts/check-instructions` runs this, prints both figures and fails when
//! either is more than 10 % above its number in
//! `proxy/benches/relay_instructions.baseline`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::Cell;
use std::future::poll_fn;
use std::hint::black_box;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use gungraun::{library_benchmark, library_benchmark_group, main};
use sttproxy::backend::BackendConn;
use sttproxy::backends::Backends;
use sttproxy::metrics::{Metrics, TO_BACKEND, TO_CLIENT};
use sttproxy::relay::frame::{self, Header, OP_BINARY, OP_CLOSE, OP_TEXT};
use sttproxy::relay::{FrameStream, Peer, RelayEnd, RelayLease, RelaySettings, relay};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::runtime::Runtime;

/// Messages relayed each way in `messages::relay`.
const MESSAGES: usize = 1000;
/// Payload bytes of one message.
const PAYLOAD: usize = 1024;
/// Frames per write of a peer in `messages::binary`.
const BINARY_BATCH: usize = 4;
/// Capacity of each in-memory stream, each way (a socket buffer's order).
const PIPE: usize = 64 << 10;
/// The client's mask key (any fixed key: the cost of masking does not depend on it).
const CLIENT_KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Everything a run needs, built outside the measured function.
struct Bench {
    rt: Runtime,
    metrics: Arc<Metrics>,
    messages: usize,
    /// Frames per write of either peer.
    batch: usize,
    client: DuplexStream,
    proxy_client: DuplexStream,
    proxy_backend: DuplexStream,
    backend: DuplexStream,
    /// `batch` masked frames, as the client sends them.
    client_batch: Vec<u8>,
    /// `batch` unmasked frames, as the backend sends them.
    backend_batch: Vec<u8>,
}

/// What `setup` relays: frames of `opcode`, `batch` per write.
#[derive(Clone, Copy, Debug)]
struct Shape {
    opcode: u8,
    batch: usize,
}

const BINARY: Shape = Shape {
    opcode: OP_BINARY,
    batch: BINARY_BATCH,
};
const TEXT: Shape = Shape {
    opcode: OP_TEXT,
    batch: 1,
};

/// The session id the relay runs under.
const SESSION: &str = "bench";

/// [`PAYLOAD`] bytes of what `from` sends as `opcode`: binary data; the
/// client's text, data that is not JSON; the backend's text, a result naming
/// the session, its `text` padded.
fn payload(opcode: u8, from: Peer) -> Vec<u8> {
    if opcode != OP_TEXT {
        return vec![0x5a; PAYLOAD];
    }
    let (head, tail) = match from {
        Peer::Client => ("LG1 text data ".to_string(), String::new()),
        Peer::Backend => (
            format!(
                r#"{{"type":"partial","session":"{SESSION}","seq":4,"utterance":1,"audio_start_ms":2480,"audio_end_ms":2600,"text":""#
            ),
            r#""}"#.to_string(),
        ),
    };
    let mut p = head.into_bytes();
    p.resize(PAYLOAD - tail.len(), b'z');
    p.extend_from_slice(tail.as_bytes());
    p
}

fn setup(messages: usize, shape: Shape) -> Bench {
    let Shape { opcode, batch } = shape;
    assert_eq!(messages % batch, 0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let (client, proxy_client) = tokio::io::duplex(PIPE);
    let (proxy_backend, backend) = tokio::io::duplex(PIPE);
    let from_client = payload(opcode, Peer::Client);
    let from_backend = payload(opcode, Peer::Backend);
    let mut client_batch = Vec::new();
    let mut backend_batch = Vec::new();
    for _ in 0..batch {
        frame::push_frame(&mut client_batch, opcode, &from_client, Some(CLIENT_KEY));
        frame::push_frame(&mut backend_batch, opcode, &from_backend, None);
    }
    Bench {
        rt,
        metrics: Metrics::new(Backends::default()),
        messages,
        batch,
        client,
        proxy_client,
        proxy_backend,
        backend,
        client_batch,
        backend_batch,
    }
}

/// Bytes of one message as the relay emits it toward `to`.
fn wire_len(to: Peer) -> usize {
    let header = 4 + if to == Peer::Backend { 4 } else { 0 };
    header + PAYLOAD
}

/// Write `batch` `rounds` times, one batch per poll, while reading whatever
/// arrives until `expect` bytes did; returns the bytes read past `expect`.
async fn exchange(io: &mut DuplexStream, batch: &[u8], rounds: usize, expect: usize) -> Vec<u8> {
    let (mut sent, mut at, mut got) = (0, 0, 0);
    let mut buf = vec![0u8; 16 << 10];
    let mut past = Vec::new();
    poll_fn(|cx| {
        let mut wrote = false;
        while sent < rounds && !wrote {
            match Pin::new(&mut *io).poll_write(cx, &batch[at..]) {
                Poll::Ready(Ok(n)) => {
                    at += n;
                    if at == batch.len() {
                        (sent, at, wrote) = (sent + 1, 0, true);
                    }
                }
                Poll::Ready(Err(e)) => panic!("peer write: {e}"),
                Poll::Pending => break,
            }
        }
        while got < expect {
            let mut rb = ReadBuf::new(&mut buf);
            match Pin::new(&mut *io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => panic!("peer: stream ended"),
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    let data = n.min(expect - got);
                    past.extend_from_slice(&rb.filled()[data..]);
                    got += n;
                }
                Poll::Ready(Err(e)) => panic!("peer read: {e}"),
                Poll::Pending => break,
            }
        }
        if sent == rounds && got >= expect {
            Poll::Ready(())
        } else {
            if wrote {
                // One batch per turn: let the relay read it.
                cx.waker().wake_by_ref();
            }
            Poll::Pending
        }
    })
    .await;
    past
}

/// The next whole frame (opcode, unmasked payload) from `pending` and `io`.
async fn next_frame(io: &mut DuplexStream, pending: &mut Vec<u8>) -> (u8, Vec<u8>) {
    loop {
        if let Some(h) = Header::parse(pending).unwrap() {
            let end = h.header_len + h.len as usize;
            if pending.len() >= end {
                let mut payload = pending[h.header_len..end].to_vec();
                if let Some(key) = h.mask {
                    frame::apply_mask(&mut payload, key, 0);
                }
                pending.drain(..end);
                return (h.opcode, payload);
            }
        }
        let mut chunk = [0u8; 4096];
        let n = io.read(&mut chunk).await.unwrap();
        assert!(n > 0, "peer: stream ended mid-frame");
        pending.extend_from_slice(&chunk[..n]);
    }
}

fn encode(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = Vec::new();
    frame::push_frame(&mut f, opcode, payload, mask);
    f
}

/// The client: its messages, then `session.end`; it reads every result, the
/// `session.ended`, answers the Close and reads until the proxy shuts.
async fn client(
    mut io: DuplexStream,
    batch: Vec<u8>,
    messages: usize,
    rounds: usize,
) -> DuplexStream {
    let expect = messages * wire_len(Peer::Client);
    let mut pending = exchange(&mut io, &batch, rounds, expect).await;
    let end = encode(OP_TEXT, br#"{"type":"session.end"}"#, Some(CLIENT_KEY));
    io.write_all(&end).await.unwrap();
    let (op, text) = next_frame(&mut io, &mut pending).await;
    assert_eq!(op, OP_TEXT);
    let ended: serde_json::Value = serde_json::from_slice(&text).unwrap();
    assert_eq!(ended["type"], "session.ended");
    let (op, close) = next_frame(&mut io, &mut pending).await;
    assert_eq!(
        (op, close.get(..2)),
        (OP_CLOSE, Some(&1000u16.to_be_bytes()[..]))
    );
    io.write_all(&encode(OP_CLOSE, &close[..2], Some(CLIENT_KEY)))
        .await
        .unwrap();
    let mut rest = Vec::new();
    io.read_to_end(&mut rest).await.unwrap();
    io
}

/// The backend: its results while reading the client's messages, then the
/// proxy's `session.end`, answered with `session.ended` and its fence token.
async fn backend(
    mut io: DuplexStream,
    batch: Vec<u8>,
    messages: usize,
    rounds: usize,
) -> DuplexStream {
    let expect = messages * wire_len(Peer::Backend);
    let mut pending = exchange(&mut io, &batch, rounds, expect).await;
    let (op, end) = next_frame(&mut io, &mut pending).await;
    assert_eq!(op, OP_TEXT);
    let end: serde_json::Value = serde_json::from_slice(&end).unwrap();
    assert_eq!(end["type"], "session.end");
    let ended = serde_json::json!({"type": "session.ended", "session": end["session"], "fence": end["fence"]});
    io.write_all(&encode(OP_TEXT, ended.to_string().as_bytes(), None))
        .await
        .unwrap();
    io
}

/// A lease that records whether the connection went back to the pool.
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
    let long = Duration::from_secs(3600);
    RelaySettings {
        drain_timeout: long,
        idle_timeout: long,
        send_timeout: long,
        close_timeout: long,
        max_message_size: 1 << 20,
        ping_interval: long,
        pong_timeout: long,
        rate: sttproxy::relay::rate::RateLimits::OFF,
        backend_ping_interval: long,
        backend_pong_timeout: long,
    }
}

/// What a run leaves, dropped after the measured function returns.
type Leftovers = (Runtime, Arc<Metrics>, RelayEnd, DuplexStream, DuplexStream);

/// One session: `b.messages` messages relayed each way, then the session's end.
fn session(b: Bench) -> Leftovers {
    let Bench {
        rt,
        metrics,
        messages,
        batch,
        client: client_io,
        proxy_client,
        proxy_backend,
        backend: backend_io,
        client_batch,
        backend_batch,
    } = b;
    let released = Rc::new(Cell::new(None));
    let (end, client_io, backend_io) = rt.block_on(async {
        let rounds = messages / batch;
        let c = tokio::spawn(client(client_io, client_batch, messages, rounds));
        let s = tokio::spawn(backend(backend_io, backend_batch, messages, rounds));
        let mut proxy_side = FrameStream::new(proxy_client, Vec::new(), Peer::Client);
        let lease = Lease {
            conn: BackendConn::new(proxy_backend, Vec::new()),
            released: released.clone(),
        };
        let shutdown = tokio_util::sync::CancellationToken::new();
        let end = relay(
            &mut proxy_side,
            lease,
            true,
            SESSION,
            &settings(),
            &shutdown,
            &metrics,
            None,
        )
        .await;
        (end, c.await.unwrap(), s.await.unwrap())
    });
    assert_eq!(
        released.get(),
        Some(true),
        "the lease went back to the pool"
    );
    assert_eq!(
        (end.outcome, end.fence, end.client_close),
        ("ended", "clean", "clean")
    );
    let relayed = |d| metrics.messages.get_or_create(d).get();
    // Each way: the messages, and maybe the session's end (however counted).
    assert!(
        relayed(&TO_BACKEND) >= messages as u64,
        "client messages relayed"
    );
    assert!(
        relayed(&TO_CLIENT) >= messages as u64,
        "backend messages relayed"
    );
    (rt, metrics, end, client_io, backend_io)
}

#[library_benchmark]
#[bench::setup(args = (0, BINARY), setup = setup)]
#[bench::binary(args = (MESSAGES, BINARY), setup = setup)]
#[bench::text(args = (MESSAGES, TEXT), setup = setup)]
fn messages(b: Bench) -> Leftovers {
    // Returned, not dropped: the runtime's teardown is not counted.
    black_box(session(b))
}

library_benchmark_group!(name = relay_instructions; benchmarks = messages);

main!(library_benchmark_groups = relay_instructions);
