//! The admin listener: `/metrics` (Prometheus text), `/healthz` (alive),
//! `/readyz` (at least one healthy backend and not draining; its body also says
//! whether the backend configuration is current or stale), `/pools` (JSON).
//! It only reads pool snapshots; it never reaches into pool internals.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backends::Backends;
use crate::config::sync::SyncStatus;
use crate::metrics::Metrics;

/// What the admin endpoints read.
#[derive(Debug, Clone)]
pub struct AdminContext {
    pub backends: Backends,
    pub metrics: Arc<Metrics>,
    pub draining: Arc<AtomicBool>,
    /// The backend table's sync, when backends come from a database.
    pub config: Option<Arc<SyncStatus>>,
}

/// Accept admin connections until `accept_stop` fires (a successor process
/// took the listener over, or shutdown); serve each until it ends or `stop`
/// fires.
pub async fn serve(
    listener: TcpListener,
    ctx: AdminContext,
    tracker: TaskTracker,
    accept_stop: CancellationToken,
    stop: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            biased;
            () = accept_stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let ctx = ctx.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            let service = service_fn(move |req| {
                let response = route(&req, &ctx);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn route(req: &Request<Incoming>, ctx: &AdminContext) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    match req.uri().path() {
        "/healthz" => response(StatusCode::OK, TEXT, "ok\n".into()),
        "/readyz" => {
            // A stale configuration does not make the proxy unready: it serves
            // the last good one while its backends are healthy, and says so.
            let config = ctx
                .config
                .as_ref()
                .map(|c| format!("{}\n", c.describe()))
                .unwrap_or_default();
            if ctx.draining.load(Ordering::Acquire) {
                response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    format!("draining\n{config}"),
                )
            } else if !ctx.backends.any_healthy() {
                response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    format!("no healthy backend\n{config}"),
                )
            } else {
                response(StatusCode::OK, TEXT, format!("ready\n{config}"))
            }
        }
        "/metrics" => match ctx.metrics.render() {
            Ok(body) => response(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                body,
            ),
            Err(_) => response(
                StatusCode::INTERNAL_SERVER_ERROR,
                TEXT,
                "metrics encoding failed\n".into(),
            ),
        },
        "/pools" => {
            let views: Vec<_> = ctx.backends.all().iter().map(|b| b.view()).collect();
            let retiring: Vec<_> = ctx.backends.retiring().iter().map(|b| b.view()).collect();
            response(
                StatusCode::OK,
                "application/json",
                json!({ "backends": views, "retiring": retiring }).to_string(),
            )
        }
        _ => response(StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
    }
}
