//! sttproxy: a production WebSocket proxy for real-time speech-to-text.
//!
//! Each client session leases one pre-established backend connection from a
//! per-backend [`sttproxy_pool::ConnPool`] for its whole life, fenced so that
//! nothing of one session can reach the next. One
//! [`reconcile::ReconcileWorker`] per pool owns every change of pool size.
//!
//! Dependencies flow one way: `session` → `route` → pool; `admin` and
//! `metrics` only read pool snapshots.

pub mod admin;
pub mod app;
pub mod auth;
pub mod backend;
pub mod backends;
pub mod config;
pub mod handshake;
pub mod metrics;
pub mod reconcile;
pub mod relay;
pub mod route;
pub mod server;
pub mod session;
pub mod session_threads;
pub mod tls;
pub mod upgrade;

pub use app::Proxy;
pub use config::Settings;
