//! TLS on both legs: the client listener's certificate (PEM files, reloaded
//! live without dropping sessions) and its handshakes, and the client
//! settings the proxy uses toward `wss://` backends. rustls with the ring
//! provider throughout.

pub mod backend;
pub mod cert;
pub mod listener;
pub mod reload;

use std::sync::Arc;

pub use listener::{TlsListener, TlsListenerSettings};
pub use reload::{CertFiles, CurrentCert};

/// Why TLS material or settings could not be used. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not valid PEM: {reason}")]
    Pem { path: String, reason: String },
    #[error("{path}: no certificate in the file")]
    NoCertificate { path: String },
    #[error("{path}: no private key in the file")]
    NoKey { path: String },
    #[error("key {key} is not the key of certificate {cert}")]
    KeyMismatch { cert: String, key: String },
    #[error("certificate {cert} with key {key}: {source}")]
    Key {
        cert: String,
        key: String,
        source: rustls::Error,
    },
    #[error("{path}: not a usable CA certificate: {source}")]
    Ca { path: String, source: rustls::Error },
    #[error("TLS settings: {0}")]
    Config(rustls::Error),
}

/// The one crypto provider: ring (no aws-lc build).
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
