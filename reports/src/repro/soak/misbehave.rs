//! The soak's misbehaving clients: one session in 50 is one of these instead
//! of a well-behaved load-generator session. Each kind is something real
//! clients do, and each must cost the proxy nothing beyond its own session:
//!
//! * [`Kind::SlowReader`] streams 16 KiB messages at 20 a second (echoed
//!   back) and never reads, through a 4 KiB receive buffer, until the proxy
//!   gives up on it (close 1008 once `send_timeout` passes with nothing
//!   taken, the socket shut if even that cannot be written) rather than
//!   buffer for it.
//! * [`Kind::Oversized`] sends one message past the proxy's
//!   `max_message_size`: close 1009.
//! * [`Kind::Abrupt`] streams and reads normally for half its life, then
//!   vanishes without a Close: every other one with a FIN, the others with a
//!   reset (`SO_LINGER` 0).
//!
//! They run on a current-thread tokio runtime of their own, on a thread of
//! their own: `repro`'s main thread must stay free to start and kill
//! processes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::net::TcpSocket;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

/// What a misbehaving client does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    SlowReader,
    Oversized,
    Abrupt,
}

const KINDS: [Kind; 3] = [Kind::SlowReader, Kind::Oversized, Kind::Abrupt];

/// How the misbehaving clients arrive.
#[derive(Debug, Clone)]
pub struct Plan {
    /// `ws://127.0.0.1:PORT/v1/stream` of the proxy.
    pub url: String,
    pub addr: SocketAddr,
    /// One new client every this long, for `window`.
    pub every: Duration,
    pub window: Duration,
    /// Lifetimes drawn uniformly from this range (seeded).
    pub life: (Duration, Duration),
    /// The proxy's `max_message_size`: an oversized message is this + 1 KiB.
    pub max_message_size: usize,
    /// After its life, how long a client may take to see its session end;
    /// beyond, it is counted as `stuck`.
    pub end_bound: Duration,
    pub seed: u64,
}

/// Per kind: how each client's session ended (`close_<code>`, `reset`,
/// `eof`, `dropped_fin`, `dropped_rst`, `connect_failed`, `stuck`, ...).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcomes {
    pub started: u64,
    pub by_kind: BTreeMap<Kind, BTreeMap<String, u64>>,
}

impl Outcomes {
    fn add(&mut self, kind: Kind, outcome: String) {
        *self
            .by_kind
            .entry(kind)
            .or_default()
            .entry(outcome)
            .or_default() += 1;
    }

    /// Clients of `kind` whose outcome is not one of `allowed`.
    pub fn other_than(&self, kind: Kind, allowed: &[&str]) -> BTreeMap<String, u64> {
        self.by_kind
            .get(&kind)
            .map(|m| {
                m.iter()
                    .filter(|(o, _)| !allowed.contains(&o.as_str()))
                    .map(|(o, n)| (o.clone(), *n))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Run the misbehaving clients to the end of the plan (blocking: call it on
/// a thread of its own).
pub fn run(plan: Plan) -> anyhow::Result<Outcomes> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(run_async(plan)))
}

async fn run_async(plan: Plan) -> Outcomes {
    let mut rng = SmallRng::seed_from_u64(plan.seed);
    let mut outcomes = Outcomes::default();
    let mut clients = JoinSet::new();
    let start = Instant::now();
    let mut n: u64 = 0;
    while start.elapsed() < plan.window {
        let kind = KINDS[(n % KINDS.len() as u64) as usize];
        let life = rng.random_range(plan.life.0..=plan.life.1);
        let p = plan.clone();
        clients.spawn(async move {
            let bound = life + p.end_bound;
            let outcome = match timeout(bound, one(&p, kind, life, n)).await {
                Ok(o) => o,
                Err(_) => "stuck".to_string(),
            };
            (kind, outcome)
        });
        n += 1;
        outcomes.started += 1;
        sleep(plan.every).await;
        while let Some(Ok((kind, outcome))) = clients.try_join_next() {
            outcomes.add(kind, outcome);
        }
    }
    while let Some(done) = clients.join_next().await {
        match done {
            Ok((kind, outcome)) => outcomes.add(kind, outcome),
            Err(e) => tracing::warn!("misbehaving client task failed: {e}"),
        }
    }
    outcomes
}

type Ws = WebSocketStream<tokio::net::TcpStream>;

async fn connect(p: &Plan, recv_buffer: Option<u32>) -> Result<Ws, String> {
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    if let Some(b) = recv_buffer {
        socket
            .set_recv_buffer_size(b)
            .map_err(|e| format!("SO_RCVBUF: {e}"))?;
    }
    let stream = socket
        .connect(p.addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    // The client may send more than the proxy accepts (that is the point of
    // `Oversized`); it must not refuse its own message first.
    let config = WebSocketConfig::default()
        .max_message_size(Some(p.max_message_size * 2))
        .max_frame_size(Some(p.max_message_size * 2));
    let (ws, _) = client_async_with_config(p.url.as_str(), stream, Some(config))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    Ok(ws)
}

async fn one(p: &Plan, kind: Kind, life: Duration, n: u64) -> String {
    let result = match kind {
        Kind::SlowReader => slow_reader(p).await,
        Kind::Oversized => oversized(p).await,
        Kind::Abrupt => abrupt(p, life, n.is_multiple_of(2)).await,
    };
    result.unwrap_or_else(|e| {
        if e.starts_with("connect") || e.starts_with("handshake") || e.starts_with("socket") {
            "connect_failed".to_string()
        } else {
            e
        }
    })
}

/// Reads until the session's end: `close_<code>`, `eof` or `reset`.
async fn read_to_end(ws: &mut Ws) -> String {
    loop {
        match ws.next().await {
            Some(Ok(Message::Close(frame))) => {
                return format!("close_{}", frame.map_or(1005, |f| u16::from(f.code)));
            }
            Some(Ok(_)) => {}
            Some(Err(_)) => return "reset".to_string(),
            None => return "eof".to_string(),
        }
    }
}

/// Sends and never reads, whatever its life: only the proxy giving up on it
/// (a send failing) ends it; within its life plus `end_bound`, or it is
/// `stuck`. A send that stalls means the proxy stopped reading it too
/// (backpressure all the way round through the echo backend): it keeps
/// trying, as a stubborn client would.
async fn slow_reader(p: &Plan) -> Result<String, String> {
    let mut ws = connect(p, Some(4096)).await?;
    let chunk = Bytes::from(vec![0x5a_u8; 16 << 10]);
    loop {
        match timeout(
            Duration::from_secs(1),
            ws.send(Message::Binary(chunk.clone())),
        )
        .await
        {
            Ok(Ok(())) => sleep(Duration::from_millis(50)).await,
            Ok(Err(_)) => break,
            Err(_) => {}
        }
    }
    Ok(read_to_end(&mut ws).await)
}

async fn oversized(p: &Plan) -> Result<String, String> {
    let mut ws = connect(p, None).await?;
    for _ in 0..2 {
        ws.send(Message::Binary(Bytes::from(vec![1_u8; 640])))
            .await
            .map_err(|e| format!("send: {e}"))?;
    }
    let big = Bytes::from(vec![2_u8; p.max_message_size + 1024]);
    // The proxy may close before it has read all of it: a failed send is
    // expected, and what counts is the Close it sent.
    let _ = ws.send(Message::Binary(big)).await;
    Ok(read_to_end(&mut ws).await)
}

async fn abrupt(p: &Plan, life: Duration, reset: bool) -> Result<String, String> {
    let mut ws = connect(p, None).await?;
    let until = Instant::now() + life / 2;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let chunk = Bytes::from(vec![3_u8; 640]);
    while Instant::now() < until {
        tokio::select! {
            _ = tick.tick() => {
                if ws.send(Message::Binary(chunk.clone())).await.is_err() {
                    return Ok(read_to_end(&mut ws).await);
                }
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Close(frame))) => {
                    return Ok(format!("close_{}", frame.map_or(1005, |f| u16::from(f.code))));
                }
                Some(Ok(_)) => {}
                Some(Err(_)) => return Ok("reset".to_string()),
                None => return Ok("eof".to_string()),
            },
        }
    }
    let stream = ws.into_inner();
    if reset {
        stream
            .set_zero_linger()
            .map_err(|e| format!("SO_LINGER: {e}"))?;
        drop(stream);
        Ok("dropped_rst".to_string())
    } else {
        drop(stream);
        Ok("dropped_fin".to_string())
    }
}
