//! The accept loop of the hand-written servers (`raw_backend`, the `wss://`
//! front in `tls`): a listener on 127.0.0.1 (ephemeral port) whose task runs
//! each accepted connection in a task of its own, owned by a `JoinSet`, so
//! dropping the [`Served`] handle aborts the loop and with it every
//! connection.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// A running accept loop; dropped, it ends and takes its connections along.
#[derive(Debug)]
pub struct Served {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Listen on 127.0.0.1 and hand every accepted connection to `handler`.
/// `handler` is called in the accept loop itself (so it may count or number
/// the connection in accept order); the future it returns runs in its own
/// task.
pub async fn serve<F, Fut>(handler: F) -> Served
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("binding a loopback listener");
    let addr = listener.local_addr().expect("the listener's address");
    let task = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    connections.spawn(handler(stream));
                }
            }
        }
    });
    Served { addr, task }
}
