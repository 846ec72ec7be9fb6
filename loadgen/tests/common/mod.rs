//! Tiny WebSocket servers for the tests, on 127.0.0.1:0, written with tokio-tungstenite.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// What the server does with data messages.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    /// Echo every message.
    Echo,
    /// Echo, but read and answer nothing from `at` to `at + len` after the server started.
    StallOnce { at: Duration, len: Duration },
    /// Echo all but every `n`th data message of each connection.
    DropEvery(u64),
    /// Answer each data message with the previous data message the server received, from
    /// whichever connection it came.
    Swap,
    /// stt backend: a JSON partial per binary chunk, numbered per connection from 0.
    Stt,
}

#[derive(Debug)]
pub struct Server {
    pub url: String,
    /// Data messages deliberately not answered.
    pub dropped: Arc<AtomicU64>,
    /// Connections accepted.
    pub accepted: Arc<AtomicU64>,
}

pub async fn start(behaviour: Behaviour) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dropped = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let swap_slot: Arc<Mutex<Option<Message>>> = Arc::new(Mutex::new(None));
    let started = Instant::now();
    {
        let dropped = dropped.clone();
        let accepted = accepted.clone();
        tokio::spawn(async move {
            let mut conn_no = 0u64;
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                conn_no += 1;
                accepted.fetch_add(1, Ordering::Relaxed);
                let dropped = dropped.clone();
                let swap_slot = swap_slot.clone();
                let id = conn_no;
                tokio::spawn(async move {
                    let _ = serve(tcp, behaviour, started, id, dropped, swap_slot).await;
                });
            }
        });
    }
    Server {
        url: format!("ws://{addr}/v1/stream"),
        dropped,
        accepted,
    }
}

async fn serve(
    tcp: tokio::net::TcpStream,
    behaviour: Behaviour,
    started: Instant,
    id: u64,
    dropped: Arc<AtomicU64>,
    swap_slot: Arc<Mutex<Option<Message>>>,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let _ = tcp.set_nodelay(true);
    let mut ws = tokio_tungstenite::accept_async(tcp).await?;
    // Not a data message: the load generator must ignore it.
    ws.send(Message::text(format!(
        r#"{{"type":"session.started","session":"s{id}"}}"#
    )))
    .await?;
    let mut data_no = 0u64;
    let mut chunk_no = 0u64;
    while let Some(msg) = ws.next().await {
        let msg = msg?;
        match &msg {
            Message::Text(t) if t.contains(r#""session.end""#) => {
                if matches!(behaviour, Behaviour::Stt) {
                    ws.send(Message::text(format!(
                        r#"{{"type":"final","session":"s{id}","text":"done"}}"#
                    )))
                    .await?;
                }
                ws.send(Message::text(format!(
                    r#"{{"type":"session.ended","session":"s{id}"}}"#
                )))
                .await?;
            }
            Message::Text(t) if t.starts_with("LG1 ") => {
                data_no += 1;
                match behaviour {
                    Behaviour::Echo | Behaviour::Stt => ws.send(msg).await?,
                    Behaviour::StallOnce { at, len } => {
                        let from = started + at;
                        let until = from + len;
                        let now = Instant::now();
                        if now >= from && now < until {
                            tokio::time::sleep_until(until).await;
                        }
                        ws.send(msg).await?;
                    }
                    Behaviour::DropEvery(n) => {
                        if data_no.is_multiple_of(n) {
                            dropped.fetch_add(1, Ordering::Relaxed);
                        } else {
                            ws.send(msg).await?;
                        }
                    }
                    Behaviour::Swap => {
                        let previous = swap_slot.lock().unwrap().replace(msg);
                        if let Some(p) = previous {
                            ws.send(p).await?;
                        }
                    }
                }
            }
            Message::Binary(_) if matches!(behaviour, Behaviour::Stt) => {
                ws.send(Message::text(format!(
                    r#"{{"type":"partial","session":"s{id}","seq":{chunk_no},"text":"la"}}"#
                )))
                .await?;
                chunk_no += 1;
            }
            Message::Close(_) => {}
            _ => {}
        }
    }
    Ok(())
}

/// A TCP server that answers every upgrade request with an HTTP status.
pub async fn start_refusing(status: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tcp.read(&mut buf).await;
                let body = "go away";
                let _ = tcp
                    .write_all(
                        format!(
                            "HTTP/1.1 {status} Nope\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    format!("ws://{addr}/v1/stream")
}

/// A small, fast configuration: `sessions` × 50 msg/s × 1 KiB for `secs` seconds.
pub fn config(url: &str, sessions: usize, secs: u64) -> loadgen::LoadConfig {
    let mut c = loadgen::LoadConfig::new(vec![url.to_owned()]);
    c.sessions = sessions;
    c.rate = 50.0;
    c.size = 1024;
    c.duration = Duration::from_secs(secs);
    c.drain_timeout = Duration::from_secs(2);
    c.connect_timeout = Duration::from_secs(2);
    c
}

/// Runs the load with an overall bound.
pub async fn run(config: loadgen::LoadConfig) -> loadgen::LoadReport {
    tokio::time::timeout(
        Duration::from_secs(60),
        loadgen::run(config, std::future::pending()),
    )
    .await
    .expect("the run is bounded")
    .expect("the run succeeds")
}
