//! The client listener's certificate, replaced live when its files change.
//!
//! Handshakes read [`CurrentCert`] (an `Arc` clone under a read lock, never
//! held across an await); one task owned by the proxy ([`CertFiles::run`])
//! polls the two files and reloads on SIGHUP. A replacement applies to
//! handshakes from then on: sessions already open keep the TLS session they
//! negotiated, so nothing is dropped. A pair that cannot be used (unreadable,
//! unparsable, key not matching the certificate) leaves the current one in
//! place, is logged with the reason and counted in
//! `sttproxy_tls_reloads_total{outcome="error"}`.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::{
    ClientHello, ResolvesServerCert, ServerSessionMemoryCache, StoresServerSessions,
};
use rustls::sign::CertifiedKey;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

use super::{TlsError, cert};
use crate::metrics::{Metrics, OutcomeLabel};

/// The certificate chain and key every new handshake is served, and the
/// sessions clients may resume.
#[derive(Debug)]
pub struct CurrentCert {
    key: RwLock<Arc<CertifiedKey>>,
    sessions: Arc<SessionCache>,
}

impl CurrentCert {
    pub fn new(key: CertifiedKey) -> Self {
        Self {
            key: RwLock::new(Arc::new(key)),
            sessions: Arc::new(SessionCache::new()),
        }
    }

    /// The resumable sessions, for the listener's `ServerConfig`.
    pub fn sessions(&self) -> Arc<SessionCache> {
        self.sessions.clone()
    }

    /// The pair served now.
    pub fn get(&self) -> Arc<CertifiedKey> {
        match self.key.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Serve `key` from now on. The resumable sessions are forgotten with
    /// the old certificate: a resumed TLS session keeps the identity of the
    /// handshake that made it, so without this a client could go on
    /// "seeing" a replaced certificate on new connections.
    fn replace(&self, key: CertifiedKey) {
        let key = Arc::new(key);
        match self.key.write() {
            Ok(mut g) => *g = key,
            Err(p) => *p.into_inner() = key,
        }
        self.sessions.clear();
    }
}

/// rustls' in-memory session cache (stateful TLS 1.2/1.3 resumption), which
/// [`CurrentCert`] empties when the certificate changes.
#[derive(Debug)]
pub struct SessionCache {
    inner: RwLock<Arc<ServerSessionMemoryCache>>,
}

impl SessionCache {
    /// Sessions remembered at most (rustls evicts the oldest beyond).
    const SIZE: usize = 4096;

    fn new() -> Self {
        Self {
            inner: RwLock::new(ServerSessionMemoryCache::new(Self::SIZE)),
        }
    }

    fn get_cache(&self) -> Arc<ServerSessionMemoryCache> {
        match self.inner.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn clear(&self) {
        let fresh = ServerSessionMemoryCache::new(Self::SIZE);
        match self.inner.write() {
            Ok(mut g) => *g = fresh,
            Err(p) => *p.into_inner() = fresh,
        }
    }
}

impl StoresServerSessions for SessionCache {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.get_cache().put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.get_cache().get(key)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.get_cache().take(key)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// The certificate and key files of the client listener, what was last read
/// from them, and the [`CurrentCert`] they feed.
#[derive(Debug)]
pub struct CertFiles {
    cert_path: PathBuf,
    key_path: PathBuf,
    /// A digest of what the last attempt read (bytes or read error): a poll
    /// that reads the same does nothing, so a bad pair is logged and counted
    /// once, not at every tick. (A digest, not the bytes: no second copy of
    /// the key in memory, none in `Debug`.)
    last_read: u64,
    provider: Arc<CryptoProvider>,
    current: Arc<CurrentCert>,
    metrics: Arc<Metrics>,
    /// Registered when the watcher is made, not when its task first runs: a
    /// SIGHUP sent as soon as the proxy has started must reload, not
    /// terminate the process (the default action).
    hangup: Option<Signal>,
}

/// What one read of both files gave.
struct Read {
    digest: u64,
    pair: Result<(Vec<u8>, Vec<u8>), TlsError>,
}

impl CertFiles {
    /// Read and check the pair for the first time: an error here stops the
    /// proxy from starting (there is no previous certificate to keep).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<(Arc<CurrentCert>, u64), TlsError> {
        let provider = super::provider();
        let read = read_pair(cert_path, key_path);
        let (cert_pem, key_pem) = read.pair?;
        let key = cert::certified_key(cert_path, &cert_pem, key_path, &key_pem, &provider)?;
        Ok((Arc::new(CurrentCert::new(key)), read.digest))
    }

    /// The watcher of a pair [`CertFiles::load`] gave. Must be called in a
    /// Tokio runtime (it registers for SIGHUP).
    pub fn new(
        cert_path: &Path,
        key_path: &Path,
        current: Arc<CurrentCert>,
        loaded_digest: u64,
        metrics: Arc<Metrics>,
    ) -> Self {
        let hangup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler; the certificate reloads by polling only");
                None
            }
        };
        Self {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            last_read: loaded_digest,
            provider: super::provider(),
            current,
            metrics,
            hangup,
        }
    }

    /// Read both files and, when they changed since the last attempt (or
    /// `force`), load the pair and serve it. `None`: nothing changed.
    pub fn reload(&mut self, force: bool) -> Option<Result<(), TlsError>> {
        let read = read_pair(&self.cert_path, &self.key_path);
        if read.digest == self.last_read && !force {
            return None;
        }
        self.last_read = read.digest;
        let loaded = read.pair.and_then(|(cert_pem, key_pem)| {
            cert::certified_key(
                &self.cert_path,
                &cert_pem,
                &self.key_path,
                &key_pem,
                &self.provider,
            )
        });
        let outcome = match loaded {
            Ok(key) => {
                self.current.replace(key);
                tracing::info!(cert = %self.cert_path.display(), "TLS certificate reloaded");
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS certificate not reloaded; serving the previous one");
                Err(e)
            }
        };
        let label = if outcome.is_ok() { "ok" } else { "error" };
        self.metrics
            .tls_reloads
            .get_or_create(&OutcomeLabel { outcome: label })
            .inc();
        Some(outcome)
    }

    /// Poll the files every `interval` and reload on SIGHUP, until `stop`.
    /// (The files are a few KiB: reading them on the runtime costs less than
    /// handing the read to a blocking thread.)
    pub async fn run(mut self, interval: Duration, stop: CancellationToken) {
        let mut hangup = self.hangup.take();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; the pair was just loaded.
        tick.tick().await;
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                () = next_hangup(&mut hangup) => {
                    tracing::info!("SIGHUP: reloading the TLS certificate");
                    self.reload(true);
                }
                _ = tick.tick() => {
                    self.reload(false);
                }
            }
        }
    }
}

/// The next SIGHUP; never, once the signal stream is gone.
async fn next_hangup(hangup: &mut Option<Signal>) {
    match hangup {
        Some(s) => {
            if s.recv().await.is_none() {
                *hangup = None;
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

fn read_pair(cert_path: &Path, key_path: &Path) -> Read {
    let pair = cert::read_file(cert_path).and_then(|c| Ok((c, cert::read_file(key_path)?)));
    let mut h = DefaultHasher::new();
    match &pair {
        Ok((c, k)) => (0u8, c, k).hash(&mut h),
        Err(e) => (1u8, e.to_string()).hash(&mut h),
    }
    Read {
        digest: h.finish(),
        pair,
    }
}
