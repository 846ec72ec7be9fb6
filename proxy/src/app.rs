//! Starting and stopping a whole proxy: listeners, backend pools and their
//! tasks, the backend table's live sync (when a database is configured), and
//! the graceful shutdown (docs/architecture.md). Used by `main` and, in process, by the
//! integration tests.

use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminContext};
use crate::auth::{AuthError, Authenticator, keys};
use crate::backend::BackendPool;
use crate::backends::Backends;
use crate::config::Settings;
use crate::config::db::{Db, DbError, DbKind};
use crate::config::sync::{ConfigSync, SyncStatus};
use crate::handshake::OriginPolicy;
use crate::metrics::Metrics;
use crate::route::KeySource;
use crate::server::{self, ServerContext};
use crate::session::SessionContext;
use crate::session_threads::SessionThreads;
use crate::tls::{self, CertFiles, TlsError, TlsListener};
use crate::upgrade::Inherited;

/// How long a process that took the listeners over from a running proxy
/// waits for a healthy backend before it starts accepting; past it, it gives
/// up and the old process keeps serving.
pub const UPGRADE_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("binding {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The cause is in the message, not chained as a source: anyhow's `{:#}`
    /// at the binary's edge would print it twice.
    #[error("backend table: {0}")]
    Database(DbError),
    #[error("tls: {0}")]
    Tls(Box<TlsError>),
    #[error(
        "no healthy backend within {0:?} of taking the listeners over; the running proxy keeps serving"
    )]
    NotReady(Duration),
    #[error("starting the session threads: {0}")]
    SessionThreads(std::io::Error),
    #[error("backend {id}: {source}")]
    Backend {
        id: String,
        source: crate::backend::DialError,
    },
}

impl From<TlsError> for StartError {
    fn from(e: TlsError) -> Self {
        Self::Tls(Box::new(e))
    }
}

impl From<DbError> for StartError {
    fn from(e: DbError) -> Self {
        Self::Database(e)
    }
}

/// A running proxy. Dropping it does not stop it (except its session
/// threads, with the sessions on them, when `session_threads` is set): call
/// [`Proxy::shutdown`].
#[derive(Debug)]
pub struct Proxy {
    listen_addr: SocketAddr,
    admin_addr: SocketAddr,
    backends: Backends,
    metrics: Arc<Metrics>,
    server: Arc<ServerContext>,
    /// The client listener's TLS side, when it speaks TLS.
    tls: Option<Arc<TlsListener>>,
    /// New upgrades are refused (503).
    draining: Arc<AtomicBool>,
    /// `/readyz` answers 503: set first at shutdown, `shutdown_delay` before
    /// `draining`, so a load balancer stops sending new clients before any is
    /// refused.
    not_ready: Arc<AtomicBool>,
    shutdown_delay: Duration,
    shutdown_grace: Duration,
    /// Stops the client accept loop.
    accept_stop: CancellationToken,
    /// Stops the admin accept loop (a child of `background_stop`).
    admin_accept_stop: CancellationToken,
    /// The client and admin accept loops.
    accept_tasks: Vec<JoinHandle<()>>,
    /// Copies of the client and admin listeners, for a successor process
    /// (`upgrade_socket`); dropped once this process stopped accepting.
    listener_fds: Option<(OwnedFd, OwnedFd)>,
    /// Fires when the grace is over: open sessions close with 1001.
    sessions_stop: CancellationToken,
    /// Stops the backend pools' tasks and the admin listener.
    background_stop: CancellationToken,
    sessions: TaskTracker,
    background: TaskTracker,
    /// The backend table's sync (with a database).
    config: Option<Arc<SyncStatus>>,
    sync_stop: CancellationToken,
    sync_task: Option<JoinHandle<()>>,
    /// Where the sessions run with `session_threads` set
    /// (session_threads.rs); stopped last.
    session_threads: Option<SessionThreads>,
}

impl Proxy {
    /// Bind both listeners, start a pool per backend, start serving.
    pub async fn start(settings: &Settings) -> Result<Self, StartError> {
        Self::start_on(settings, None).await
    }

    /// As [`Proxy::start`], on listeners taken over from a running proxy
    /// (`upgrade_socket`): accepting starts only once a backend is healthy,
    /// within [`UPGRADE_READY_TIMEOUT`], so that a successor that cannot
    /// serve never takes a connection.
    pub async fn start_inherited(
        settings: &Settings,
        inherited: Inherited,
    ) -> Result<Self, StartError> {
        Self::start_on(settings, Some(inherited)).await
    }

    async fn start_on(
        settings: &Settings,
        inherited: Option<Inherited>,
    ) -> Result<Self, StartError> {
        settings.validate()?;
        // The TLS files first: a bad one stops the start before anything runs.
        let client_cert = settings
            .client_tls_files()
            .map(|(cert, key)| CertFiles::load(cert, key))
            .transpose()?;
        let mut tuning = settings.pool_tuning();
        tuning.backend_tls = Some(tls::backend::client_config(&settings.backend_tls_files())?);
        let upgrading = inherited.is_some();
        let (listener, admin_listener) = match inherited {
            None => (
                bind_client_listener(settings.listen).map_err(|source| StartError::Bind {
                    what: "client",
                    addr: settings.listen,
                    source,
                })?,
                TcpListener::bind(settings.admin)
                    .await
                    .map_err(|source| StartError::Bind {
                        what: "admin",
                        addr: settings.admin,
                        source,
                    })?,
            ),
            Some(inherited) => inherited.into_tokio().map_err(|source| StartError::Bind {
                what: "inherited",
                addr: settings.listen,
                source,
            })?,
        };
        let copy = |l: &TcpListener, what, addr| {
            l.as_fd()
                .try_clone_to_owned()
                .map_err(|source| StartError::Bind { what, addr, source })
        };
        let listener_fds = (
            copy(&listener, "client", settings.listen)?,
            copy(&admin_listener, "admin", settings.admin)?,
        );
        let bound = |l: &TcpListener, what, addr| {
            l.local_addr()
                .map_err(|source| StartError::Bind { what, addr, source })
        };
        let listen_addr = bound(&listener, "client", settings.listen)?;
        let admin_addr = bound(&admin_listener, "admin", settings.admin)?;

        let session_threads = settings
            .session_threads
            .map(SessionThreads::start)
            .transpose()
            .map_err(StartError::SessionThreads)?;
        let sessions = TaskTracker::new();
        let background = TaskTracker::new();
        let background_stop = CancellationToken::new();
        let backends = Backends::default();
        let sync_stop = CancellationToken::new();
        let (metrics, config, sync_task) = match &settings.db {
            None => {
                // Fixed backends from the settings.
                let mut pools = Vec::new();
                for (i, spec) in settings.backend_specs().iter().enumerate() {
                    let seed = rand::random::<u64>() ^ i as u64;
                    let pool =
                        BackendPool::start(spec, &tuning, &background, &background_stop, seed)
                            .map_err(|source| StartError::Backend {
                                id: spec.id.clone(),
                                source,
                            })?;
                    pools.push(pool);
                }
                backends.set(pools);
                (Metrics::new(backends.clone()), None, None)
            }
            Some(url) => {
                let db = Db::connect_lazy(url)?;
                let mut sync = ConfigSync::new(
                    db,
                    backends.clone(),
                    tuning,
                    background.clone(),
                    background_stop.clone(),
                    settings.sync_interval,
                    settings.backend_specs(),
                )
                .seeds_must_match(settings.seeds_from_flags)
                .listener_check_interval(settings.db_listener_check_interval);
                if let Err(e) = sync.sync_once().await {
                    if sync.db().kind() == DbKind::Sqlite
                        || matches!(e, DbError::SeedConflict { .. })
                    {
                        // A local file: nothing to wait for.
                        sync.db().close().await;
                        return Err(StartError::Database(e));
                    }
                    // A shared database may come back: serve the settings'
                    // backends meanwhile (none, usually: then /readyz says
                    // 503) and keep retrying.
                    tracing::error!(
                        error = %e,
                        "cannot read the backend table; starting with the settings' backends \
                         and retrying"
                    );
                    sync.apply_fallback(settings.backend_specs());
                }
                let status = sync.status();
                tracing::info!(
                    db = %sync.db().display_url(),
                    backends = backends.all().len(),
                    interval = ?settings.sync_interval,
                    "backends from the database, synced live"
                );
                let task = background.spawn(sync.run(sync_stop.clone()));
                (
                    Metrics::with_config_status(backends.clone(), status.clone()),
                    Some(status),
                    Some(task),
                )
            }
        };
        let routing = settings.routing()?;
        let (auth, key_watch) = Authenticator::new(
            settings.auth_mode()?,
            settings.api_keys.clone(),
            settings.jwt.as_ref(),
        )?;
        let auth = auth.with_key_claim(match routing.sticky.as_ref().map(|s| &s.key) {
            Some(KeySource::Claim(name)) => Some(name.clone()),
            _ => None,
        });
        if let (Some(seen), Some(jwt)) = (key_watch, &settings.jwt) {
            metrics.jwt_keys.set(seen.store.key_count());
            background.spawn(keys::watch(
                seen,
                jwt.reload_interval,
                metrics.clone(),
                background_stop.clone(),
            ));
        }
        let draining = Arc::new(AtomicBool::new(false));
        let not_ready = Arc::new(AtomicBool::new(false));
        let sessions_stop = CancellationToken::new();
        let mut server = ServerContext::new(
            SessionContext {
                backends: backends.clone(),
                metrics: metrics.clone(),
                settings: Arc::new(settings.session_settings()),
                shutdown: sessions_stop.clone(),
            },
            settings.stream_path.clone(),
            settings.handshake_timeout,
            settings.max_connections,
            settings.max_connections_per_ip,
            auth,
            OriginPolicy::new(&settings.allowed_origins, settings.allow_missing_origin),
            settings.handshake_limits(),
            draining.clone(),
        )
        .with_routing(routing);
        if let Some(threads) = &session_threads {
            server = server.with_session_threads(threads.placer());
            metrics.count_tasks_of(threads.placer());
        }
        let server = Arc::new(server);
        let tls = match (client_cert, settings.client_tls_files()) {
            (Some((current, loaded)), Some((cert, key))) => {
                let files = CertFiles::new(cert, key, current.clone(), loaded, metrics.clone());
                background.spawn(files.run(settings.tls_reload_interval, background_stop.clone()));
                Some(Arc::new(TlsListener::new(
                    current,
                    settings.tls_listener_settings(),
                    metrics.clone(),
                )?))
            }
            _ => None,
        };
        if upgrading {
            wait_ready(&backends, UPGRADE_READY_TIMEOUT).await?;
        }
        let accept_stop = CancellationToken::new();
        let admin_accept_stop = background_stop.child_token();
        let accept_tasks = vec![
            background.spawn(server::accept_loop(
                listener,
                server.clone(),
                tls.clone(),
                sessions.clone(),
                accept_stop.clone(),
            )),
            background.spawn(admin::serve(
                admin_listener,
                AdminContext {
                    backends: backends.clone(),
                    metrics: metrics.clone(),
                    draining: not_ready.clone(),
                    config: config.clone(),
                },
                background.clone(),
                admin_accept_stop.clone(),
                background_stop.clone(),
            )),
        ];
        Ok(Self {
            listen_addr,
            admin_addr,
            backends,
            metrics,
            server,
            tls,
            draining,
            not_ready,
            shutdown_delay: settings.shutdown_delay,
            shutdown_grace: settings.shutdown_grace,
            accept_stop,
            admin_accept_stop,
            accept_tasks,
            listener_fds: Some(listener_fds),
            sessions_stop,
            background_stop,
            sessions,
            background,
            config,
            sync_stop,
            sync_task,
            session_threads,
        })
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    /// Whether clients connect with `wss://` (else `ws://`).
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The client listener's TLS side, when it speaks TLS.
    pub fn tls(&self) -> Option<&Arc<TlsListener>> {
        self.tls.as_ref()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn backends(&self) -> &Backends {
        &self.backends
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The backend table's sync status, when backends come from a database.
    pub fn config_status(&self) -> Option<&Arc<SyncStatus>> {
        self.config.as_ref()
    }

    pub fn open_connections(&self) -> usize {
        self.server.open_connections()
    }

    /// The client and admin listeners, to hand to a successor process;
    /// `None` once this process stopped accepting.
    pub fn listener_fds(&self) -> Option<(BorrowedFd<'_>, BorrowedFd<'_>)> {
        self.listener_fds
            .as_ref()
            .map(|(client, admin)| (client.as_fd(), admin.as_fd()))
    }

    /// Stop accepting on both listeners and close this process's copies of
    /// them; when this returns, a successor holding the same sockets is the
    /// only process that accepts on them. Connections accepted before are
    /// served to their end.
    pub async fn stop_accepting(&mut self) {
        self.accept_stop.cancel();
        self.admin_accept_stop.cancel();
        for task in self.accept_tasks.drain(..) {
            let _ = task.await;
        }
        self.listener_fds = None;
    }

    /// Graceful shutdown: report not-ready at once and go on serving new
    /// clients for `shutdown_delay` (the time a load balancer takes to see the
    /// 503 and stop sending any); then stop accepting; give sessions
    /// `shutdown_grace` to finish; then close the rest with 1001; then stop
    /// the pools and the admin listener. Every task has ended when this
    /// returns.
    pub async fn shutdown(self) {
        self.not_ready.store(true, Ordering::Release);
        if !self.shutdown_delay.is_zero() {
            tracing::info!(delay = ?self.shutdown_delay, "readyz reports draining; still accepting new clients until the delay is over");
            tokio::time::sleep(self.shutdown_delay).await;
        }
        self.draining.store(true, Ordering::Release);
        self.drain().await;
    }

    /// The drain after a successor took the listeners over
    /// ([`Proxy::stop_accepting`] first): as [`Proxy::shutdown`], except that
    /// the connections this process accepted and has not upgraded yet are not
    /// refused (the listeners are the successor's now; nothing new arrives
    /// here, and a refusal would be a failed connect for nothing).
    pub async fn drain_after_upgrade(mut self) {
        self.stop_accepting().await;
        self.drain().await;
    }

    async fn drain(mut self) {
        self.accept_stop.cancel();
        // The client listener closes with the accept loop (new connects are
        // refused, not queued for nobody); the admin listener keeps serving
        // `/readyz` (503 draining) until the end.
        self.listener_fds = None;
        // No configuration change applies from now on.
        self.sync_stop.cancel();
        if let Some(task) = self.sync_task {
            let _ = task.await;
        }
        self.sessions.close();
        if tokio::time::timeout(self.shutdown_grace, self.sessions.wait())
            .await
            .is_err()
        {
            tracing::info!(
                open = self.sessions.len(),
                "shutdown grace over; closing the remaining sessions with 1001"
            );
            self.sessions_stop.cancel();
            // Sessions close their clients with a bounded timeout; this ends.
            self.sessions.wait().await;
        }
        for b in self.backends.all().iter() {
            b.shutdown();
        }
        for b in self.backends.retiring() {
            b.shutdown();
        }
        self.background_stop.cancel();
        self.background.close();
        self.background.wait().await;
        // Every session has ended: the threads are idle and stop at once.
        if let Some(threads) = self.session_threads.take() {
            let _ = tokio::task::spawn_blocking(move || drop(threads)).await;
        }
    }
}

/// Until a backend is healthy (polled: health is a pool snapshot, not an
/// event), at most `limit`.
async fn wait_ready(backends: &Backends, limit: Duration) -> Result<(), StartError> {
    let deadline = tokio::time::Instant::now() + limit;
    while !backends.any_healthy() {
        if tokio::time::Instant::now() >= deadline {
            return Err(StartError::NotReady(limit));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The client listener, with a deep accept backlog: thousands of devices
/// reconnect at once after a network blip or a deploy, and with the default
/// backlog the kernel drops their SYNs and they retry seconds later. (The
/// kernel caps it at `net.core.somaxconn`.)
fn bind_client_listener(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    const BACKLOG: u32 = 8192;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}
