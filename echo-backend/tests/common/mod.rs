//! Helpers of the backend's socket tests: a backend on 127.0.0.1:0, a client, bounded waits.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::time::Duration;

use echo_backend::{Config, EchoBackend};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub const LIMIT: Duration = Duration::from_secs(5);

pub async fn bounded<F: Future>(f: F) -> F::Output {
    timeout(LIMIT, f).await.expect("test timed out")
}

pub async fn start(config: Config) -> EchoBackend {
    echo_backend::spawn("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap()
}

pub async fn connect(backend: &EchoBackend) -> Ws {
    tokio_tungstenite::connect_async(backend.url())
        .await
        .unwrap()
        .0
}

pub async fn recv(ws: &mut Ws) -> Message {
    ws.next()
        .await
        .expect("connection ended")
        .expect("ws error")
}

pub async fn recv_json(ws: &mut Ws) -> Value {
    match recv(ws).await {
        Message::Text(text) => serde_json::from_str(text.as_str()).unwrap(),
        other => panic!("expected a JSON text message, got {other:?}"),
    }
}

pub async fn send_json(ws: &mut Ws, value: Value) {
    ws.send(Message::text(value.to_string())).await.unwrap();
}

/// The connection must end without a close frame (dropped TCP connection).
pub async fn expect_abrupt_end(ws: &mut Ws) {
    loop {
        match ws.next().await {
            None | Some(Err(_)) => return,
            Some(Ok(Message::Close(frame))) => panic!("expected no close frame, got {frame:?}"),
            Some(Ok(Message::Pong(_))) => {}
            Some(Ok(other)) => panic!("expected the connection to end, got {other:?}"),
        }
    }
}
