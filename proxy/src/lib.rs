//! sttproxy: a production WebSocket proxy for real-time speech-to-text.
//!
//! Each client session leases one pre-established backend connection from a
//! per-backend [`sttproxy_pool::ConnPool`] for its whole life. One
//! [`reconcile::ReconcileWorker`] per pool owns every change of pool size.

pub mod reconcile;
