//! A control for measuring the relay (docs/relay.md#measurements): the least
//! a proxy on tokio can do per message. Each accepted connection gets a TCP
//! connection to the next backend in turn and `tokio::io::copy_bidirectional`
//! between the two: no WebSocket parsing (the handshake and every frame pass
//! as bytes, as through nginx), no pool, no fence, no timers, no metrics.
//! What it costs per message against nginx is the floor any tokio-based
//! relay starts from.
//!
//! `cargo run --release -p reports --example tokio_copy -- LISTEN BACKEND...`
//! (e.g. `127.0.0.1:19300 127.0.0.1:9001 127.0.0.1:9002`); it serves until
//! killed. Not a proxy to deploy: it drops a connection whose backend cannot
//! be reached, and nothing bounds a session.

use std::net::SocketAddr;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args
        .next()
        .context("usage: tokio_copy LISTEN BACKEND...")?
        .parse()
        .context("LISTEN")?;
    let backends = args
        .map(|a| {
            a.parse::<SocketAddr>()
                .with_context(|| format!("BACKEND {a:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!backends.is_empty(), "usage: tokio_copy LISTEN BACKEND...");
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    println!("tokio_copy listening on {}", listener.local_addr()?);
    for backend in backends.iter().cycle() {
        let (mut client, _) = listener.accept().await.context("accept")?;
        let backend = *backend;
        tokio::spawn(async move {
            let Ok(mut upstream) = TcpStream::connect(backend).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
    }
    Ok(())
}
