//! A throwaway echo server for measuring the load generator on its own:
//! `cargo run --release -p loadgen --example echo_server -- 127.0.0.1:9100`.
//! Echoes every data message, answers `session.end` with `session.ended`.

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9100".into());
    let listener = TcpListener::bind(&addr).await?;
    println!("echo_server listening on ws://{}", listener.local_addr()?);
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(1 << 20);
    loop {
        let (tcp, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(tcp, Some(config)).await
            else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                let reply = match &msg {
                    Message::Text(t) if t.contains(r#""session.end""#) => {
                        Message::text(r#"{"type":"session.ended"}"#)
                    }
                    Message::Text(_) | Message::Binary(_) => msg,
                    _ => continue,
                };
                if ws.send(reply).await.is_err() {
                    return;
                }
            }
        });
    }
}
