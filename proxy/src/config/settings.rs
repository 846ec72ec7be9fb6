//! Static settings: a TOML file, every key optional with a production default
//! (see `proxy/sttproxy.example.toml`), overridden by command-line flags.
//! The backends themselves live in the database (see [`super::db`]); the
//! file's `[[backends]]` only seed an empty database on its first start.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::{AuthMode, JwtSettings};
use crate::backend::health::HealthThresholds;
use crate::backend::{BackendSpec, PoolTuning, Reuse};
use crate::handshake::HandshakeLimits;
use crate::reconcile::ReconcileConfig;
use crate::relay::FailoverSettings;
use crate::relay::rate::RateLimits;
use crate::relay::replay::ReplayLimits;
use crate::route::{KeySource, Routing, StickyRouting};
use crate::session::SessionSettings;
use crate::tls::TlsListenerSettings;
use crate::tls::backend::BackendTlsFiles;

/// Durations in the file are human strings: "250ms", "5s", "2m".
pub(crate) mod human_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// Every setting of `sttproxy serve`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Client listener.
    pub listen: SocketAddr,
    /// Admin listener (/metrics /healthz /readyz /pools); keep it private.
    pub admin: SocketAddr,
    /// Path clients upgrade on.
    pub stream_path: String,
    /// Open client connections at most (beyond: HTTP 503 before the upgrade).
    pub max_connections: usize,
    /// Open client connections per IP address at most, 0 = no limit (beyond: HTTP 429).
    pub max_connections_per_ip: usize,
    /// Threads that run sessions, each with its own event loop
    /// (docs/relay.md, "Session threads"); unset: sessions run on the
    /// proxy's multi-thread runtime.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_threads: Option<usize>,
    /// API keys accepted in `Authorization: Bearer <key>` or `x-api-key`.
    pub api_keys: Vec<String>,
    /// What a client must present: `none`, `api_key`, `jwt` or `either`.
    /// Unset: derived from what is configured (`api_keys` → `api_key`,
    /// `[jwt]` → `jwt`, both → `either`, neither → `none`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthMode>,
    /// JWT bearer tokens (see [`JwtSettings`]); absent = no JWT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtSettings>,
    /// Allowed `Origin` values; empty = any origin. Compared as origins
    /// (scheme and host case-insensitive, default port and trailing slash
    /// ignored).
    pub allowed_origins: Vec<String>,
    /// With `allowed_origins` set: whether a request without `Origin` (native
    /// apps, servers; browsers always send it) may upgrade.
    pub allow_missing_origin: bool,
    /// The upgrade request's head (request line and headers) in bytes at
    /// most; beyond: HTTP 431. Bounds a connection's memory before the
    /// upgrade. At least 8192.
    pub max_request_head_bytes: usize,
    /// One request header (name and value) in bytes at most; beyond: HTTP 431.
    pub max_header_bytes: usize,
    /// Request headers at most; beyond: HTTP 431.
    pub max_headers: usize,
    /// The request target (path and query) in bytes at most; beyond: HTTP 414.
    pub max_uri_bytes: usize,
    /// The client listener's certificate chain (PEM, leaf first). With
    /// `tls_key` the listener speaks TLS only (`wss://`); both or neither.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of `tls_cert` (PEM: PKCS#8, PKCS#1 or SEC1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// A client's TLS handshake must complete within this (then the HTTP
    /// request gets `handshake_timeout`).
    #[serde(with = "human_duration")]
    pub tls_handshake_timeout: Duration,
    /// TLS handshakes in progress at most; beyond, a new connection is closed at once.
    pub max_concurrent_tls_handshakes: usize,
    /// How often `tls_cert` and `tls_key` are read for a change (SIGHUP
    /// reloads at once). A changed pair is served to new connections; open
    /// sessions keep theirs.
    #[serde(with = "human_duration")]
    pub tls_reload_interval: Duration,
    /// CA certificates (PEM) trusted for `wss://` backends besides the
    /// Mozilla roots: a private CA.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_tls_ca: Option<PathBuf>,
    /// A client certificate chain (PEM) shown to `wss://` backends that ask
    /// for one (mutual TLS); with `backend_tls_client_key`, both or neither.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_tls_client_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_tls_client_key: Option<PathBuf>,
    /// The client's HTTP request must arrive within this.
    #[serde(with = "human_duration")]
    pub handshake_timeout: Duration,
    /// A new session waits this long for a backend connection, then gets 1013.
    #[serde(with = "human_duration")]
    pub acquire_timeout: Duration,
    /// How long a backend gets to answer `session.end` with `session.ended`.
    #[serde(with = "human_duration")]
    pub drain_timeout: Duration,
    /// A client silent this long is closed with 1001.
    #[serde(with = "human_duration")]
    pub idle_timeout: Duration,
    /// A client that cannot take a message within this is closed with 1008.
    #[serde(with = "human_duration")]
    pub send_timeout: Duration,
    /// Nothing at all from a client this long: the proxy sends it a Ping.
    #[serde(with = "human_duration")]
    pub client_ping_interval: Duration,
    /// Still nothing from it (not even the Pong) this long after: its link is
    /// presumed dead and its socket shut.
    #[serde(with = "human_duration")]
    pub client_pong_timeout: Duration,
    /// Data messages a client may send per second (0: no limit); past it
    /// the session closes with 1008 (docs/configuration.md, "Rate limits").
    pub max_client_messages_per_second: u32,
    /// Payload bytes a client may send per second (0: no limit), as above.
    pub max_client_bytes_per_second: u32,
    /// How far ahead of those rates a client may run, as time at the rate
    /// (at least 1s: the limits are charged once per session tick).
    #[serde(with = "human_duration")]
    pub rate_limit_burst: Duration,
    /// On SIGTERM/SIGINT `/readyz` turns 503 at once, but new clients are
    /// still served this long (a load balancer's time to notice); then the
    /// listener closes.
    #[serde(with = "human_duration")]
    pub shutdown_delay: Duration,
    /// On SIGTERM/SIGINT sessions get this long to finish, then close with 1001.
    #[serde(with = "human_duration")]
    pub shutdown_grace: Duration,
    /// Failovers per session on `reuse = "resumable"` backends (0: off): a
    /// session whose backend fails moves to another (docs/failover.md).
    pub failover_max: u32,
    /// From a backend's failure to the takeover's lease; then 1014.
    #[serde(with = "human_duration")]
    pub failover_timeout: Duration,
    /// Client data kept per resumable session for a replay (bytes) ...
    pub replay_max_bytes: usize,
    /// ... and at most this old; what is evicted unacknowledged makes the
    /// session unable to fail over until the backend acknowledges past it.
    #[serde(with = "human_duration")]
    pub replay_max_age: Duration,
    /// Send the client a `session.failover` notice when its session moves.
    pub failover_notice: bool,
    /// Largest message either way (bytes); larger client messages close with 1009.
    pub max_message_size: usize,
    /// Idle backend connections are pinged this often (jittered ±10 %).
    #[serde(with = "human_duration")]
    pub health_interval: Duration,
    /// A ping must be answered within this.
    #[serde(with = "human_duration")]
    pub health_timeout: Duration,
    /// Consecutive failed dials/pings before a backend is taken out of rotation.
    pub unhealthy_after: u32,
    /// Consecutive successes before it is taken back.
    pub healthy_after: u32,
    /// Safety-net period of each pool's reconcile worker (jittered ±10 %).
    #[serde(with = "human_duration")]
    pub reconcile_interval: Duration,
    /// Dials in flight at once per pool.
    pub max_concurrent_dials: usize,
    #[serde(with = "human_duration")]
    pub backend_connect_timeout: Duration,
    #[serde(with = "human_duration")]
    pub backend_handshake_timeout: Duration,
    /// Pool sizes for backends given without their own.
    pub default_target_size: usize,
    pub default_max_size: usize,
    /// Backends. With a database (`db`) they only seed an empty backend table
    /// on its first start; without one they are the proxy's fixed backends.
    pub backends: Vec<BackendEntry>,
    /// The backend table: `sqlite://PATH`, `sqlite::memory:` or
    /// `postgres://USER@HOST/DB`. `None` (the library default) means no
    /// database: the backends above, fixed. `sttproxy serve` defaults to
    /// `sqlite://<dir of the settings file, or the current dir>/sttproxy.db`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub db: Option<String>,
    /// How often the backend table is polled for changes (jittered ±10 %),
    /// the safety net under PostgreSQL's LISTEN/NOTIFY.
    #[serde(with = "human_duration")]
    pub sync_interval: Duration,
    /// PostgreSQL: the LISTEN connection that pushes changes must show a sign
    /// of life this often (a check query after half of it without a
    /// notification); a silent one is reconnected, and meanwhile changes
    /// arrive by polling only (`sttproxy_db_listener_connected` 0).
    #[serde(with = "human_duration")]
    pub db_listener_check_interval: Duration,
    /// The query parameter by which a client names the backend group of
    /// its session (docs/pool.md, "Groups and sticky routing"); it is still
    /// passed to the backend with the others. Unset, or a request without
    /// it: the group `default`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_parameter: Option<String>,
    /// Sticky routing (see [`StickySettings`]); absent = none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sticky: Option<StickySettings>,
    /// `text` (human) or `json` logs.
    pub log_format: LogFormat,
    /// A Unix socket (mode 0600) through which a new `sttproxy` process takes
    /// the listening sockets over from this one for a zero-downtime binary
    /// upgrade (docs/operations.md). A process started with it first looks
    /// for a running proxy there; unset: no hand-over.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upgrade_socket: Option<PathBuf>,
    /// The seed backends were named on the command line (`serve --backend`):
    /// a table populated before with other backends is then an error at
    /// start, not a warning — explicit flags are never silently ignored.
    #[serde(skip)]
    pub seeds_from_flags: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[sticky]`: in these groups a session with a key is routed to the backend
/// its key chooses by weighted rendezvous hashing, for backends that keep
/// per-user context; it falls back to power-of-two-choices when that backend
/// is unhealthy, draining, or has no connection within `wait`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StickySettings {
    /// The sticky groups.
    pub groups: Vec<String>,
    /// The key is this claim of the verified JWT (needs `[jwt]`)...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
    /// ...or this request header (one of the two).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// How long a session waits for a connection of its key's backend before
    /// it falls back (within `acquire_timeout`).
    #[serde(with = "human_duration")]
    pub wait: Duration,
}

impl Default for StickySettings {
    fn default() -> Self {
        Self {
            groups: vec![crate::route::DEFAULT_GROUP.to_string()],
            claim: None,
            header: None,
            wait: Duration::from_millis(500),
        }
    }
}

/// A backend in the settings file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendEntry {
    pub url: String,
    pub id: Option<String>,
    pub target_size: Option<usize>,
    pub max_size: Option<usize>,
    pub weight: Option<u32>,
    pub reuse: Option<Reuse>,
    /// Its group; unset: `default`.
    pub group: Option<String>,
}

/// The most session threads a proxy may be told to run.
const MAX_SESSION_THREADS: usize = 1024;

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin: SocketAddr::from(([127, 0, 0, 1], 9090)),
            stream_path: "/v1/stream".into(),
            max_connections: 10_000,
            max_connections_per_ip: 0,
            session_threads: None,
            api_keys: Vec::new(),
            auth: None,
            jwt: None,
            allowed_origins: Vec::new(),
            allow_missing_origin: true,
            max_request_head_bytes: HandshakeLimits::default().head_bytes,
            max_header_bytes: HandshakeLimits::default().header_bytes,
            max_headers: HandshakeLimits::default().headers,
            max_uri_bytes: HandshakeLimits::default().uri_bytes,
            tls_cert: None,
            tls_key: None,
            tls_handshake_timeout: Duration::from_secs(10),
            max_concurrent_tls_handshakes: 1024,
            tls_reload_interval: Duration::from_secs(10),
            backend_tls_ca: None,
            backend_tls_client_cert: None,
            backend_tls_client_key: None,
            handshake_timeout: Duration::from_secs(10),
            acquire_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(10),
            client_ping_interval: Duration::from_secs(20),
            client_pong_timeout: Duration::from_secs(10),
            max_client_messages_per_second: 0,
            max_client_bytes_per_second: 0,
            rate_limit_burst: Duration::from_secs(2),
            shutdown_delay: Duration::ZERO,
            shutdown_grace: Duration::from_secs(30),
            failover_max: 2,
            failover_timeout: Duration::from_secs(5),
            replay_max_bytes: 1 << 20,
            replay_max_age: Duration::from_secs(30),
            failover_notice: true,
            max_message_size: 1 << 20,
            health_interval: Duration::from_secs(10),
            health_timeout: Duration::from_secs(2),
            unhealthy_after: 3,
            healthy_after: 2,
            reconcile_interval: Duration::from_secs(5),
            max_concurrent_dials: 8,
            backend_connect_timeout: Duration::from_secs(3),
            backend_handshake_timeout: Duration::from_secs(5),
            default_target_size: 16,
            default_max_size: 1024,
            backends: Vec::new(),
            db: None,
            sync_interval: Duration::from_secs(5),
            db_listener_check_interval: Duration::from_secs(10),
            group_parameter: None,
            sticky: None,
            upgrade_socket: None,
            log_format: LogFormat::Text,
            seeds_from_flags: false,
        }
    }
}

/// Why the settings could not be used. Each message holds its cause, which is
/// not also chained as `source()` (a chain printer would repeat it).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("parsing {path}: {error}")]
    Parse {
        path: String,
        error: Box<toml::de::Error>,
    },
    #[error("backend {id}: {reason}")]
    Backend { id: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

impl Settings {
    /// The backend table of `sttproxy serve` and of `sttproxy backends`, so
    /// that both always name the same one: `flag` (`--db`, or `STTPROXY_DB`
    /// through clap), else the settings file's `db`, else
    /// `sqlite://<dir of the settings file, or the current dir>/sttproxy.db`.
    /// `file` is the settings file as loaded from `config`.
    pub fn db_url(
        flag: Option<&str>,
        config: Option<&Path>,
        file: Option<&Settings>,
    ) -> Result<String, ConfigError> {
        if let Some(url) = flag.or_else(|| file.and_then(|s| s.db.as_deref())) {
            return Ok(url.to_string());
        }
        let dir = config
            .and_then(Path::parent)
            .filter(|d| !d.as_os_str().is_empty());
        let dir = match dir {
            Some(dir) => std::path::absolute(dir),
            None => std::env::current_dir(),
        }
        .map_err(|error| ConfigError::Read {
            path: dir.map_or_else(|| ".".into(), |d| d.display().to_string()),
            error,
        })?;
        Ok(super::db::DbUrl::sqlite_file(&dir.join("sttproxy.db")))
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.display().to_string(),
            error,
        })?;
        toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.display().to_string(),
            error: Box::new(error),
        })
    }

    /// Every duration setting with its smallest sane value: zero would spin
    /// or panic (a zero interval); the largest is a day for all (more is a typo).
    fn durations(&self) -> [(&'static str, Duration, Duration); 21] {
        let ms = Duration::from_millis;
        [
            ("handshake_timeout", self.handshake_timeout, ms(10)),
            ("tls_handshake_timeout", self.tls_handshake_timeout, ms(10)),
            ("tls_reload_interval", self.tls_reload_interval, ms(10)),
            ("acquire_timeout", self.acquire_timeout, ms(1)),
            ("drain_timeout", self.drain_timeout, ms(10)),
            ("idle_timeout", self.idle_timeout, ms(100)),
            ("send_timeout", self.send_timeout, ms(10)),
            ("client_ping_interval", self.client_ping_interval, ms(10)),
            ("client_pong_timeout", self.client_pong_timeout, ms(10)),
            ("rate_limit_burst", self.rate_limit_burst, ms(1000)),
            ("shutdown_delay", self.shutdown_delay, ms(0)),
            ("shutdown_grace", self.shutdown_grace, ms(0)),
            ("failover_timeout", self.failover_timeout, ms(10)),
            ("replay_max_age", self.replay_max_age, ms(1000)),
            ("health_interval", self.health_interval, ms(10)),
            ("health_timeout", self.health_timeout, ms(1)),
            ("reconcile_interval", self.reconcile_interval, ms(10)),
            (
                "backend_connect_timeout",
                self.backend_connect_timeout,
                ms(1),
            ),
            (
                "backend_handshake_timeout",
                self.backend_handshake_timeout,
                ms(1),
            ),
            ("sync_interval", self.sync_interval, ms(50)),
            (
                "db_listener_check_interval",
                self.db_listener_check_interval,
                ms(100),
            ),
        ]
    }

    /// Check what cannot work before anything starts; every error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let day = Duration::from_secs(86_400);
        for (key, value, min) in self.durations() {
            if value < min || value > day {
                return Err(ConfigError::Invalid(format!(
                    "{key} = {} is out of range ({} to 1day)",
                    humantime::format_duration(value),
                    humantime::format_duration(min),
                )));
            }
        }
        if self.max_message_size > 64 << 20 {
            return Err(ConfigError::Invalid(
                "max_message_size must be at most 64 MiB".into(),
            ));
        }
        if self
            .session_threads
            .is_some_and(|n| !(1..=MAX_SESSION_THREADS).contains(&n))
        {
            return Err(ConfigError::Invalid(format!(
                "session_threads must be between 1 and {MAX_SESSION_THREADS}"
            )));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "max_connections must be at least 1".into(),
            ));
        }
        if self.replay_max_bytes < 1024 || self.replay_max_bytes > 64 << 20 {
            return Err(ConfigError::Invalid(
                "replay_max_bytes must be between 1024 and 64 MiB".into(),
            ));
        }
        if self.failover_max > 16 {
            return Err(ConfigError::Invalid(
                "failover_max must be at most 16".into(),
            ));
        }
        if self.max_concurrent_dials == 0 {
            return Err(ConfigError::Invalid(
                "max_concurrent_dials must be at least 1".into(),
            ));
        }
        if self.unhealthy_after == 0 || self.healthy_after == 0 {
            return Err(ConfigError::Invalid(
                "unhealthy_after and healthy_after must be at least 1".into(),
            ));
        }
        if !self.stream_path.starts_with('/') {
            return Err(ConfigError::Invalid("stream_path must start with /".into()));
        }
        self.validate_handshake_limits()?;
        self.auth_mode()?;
        if let Some(jwt) = &self.jwt {
            jwt.validate().map_err(ConfigError::Invalid)?;
        }
        self.validate_tls()?;
        self.routing()?;
        if self.max_message_size < 1024 {
            return Err(ConfigError::Invalid(
                "max_message_size must be at least 1024".into(),
            ));
        }
        if let Some(url) = &self.db {
            super::db::DbUrl::parse(url).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        if let Some(path) = &self.upgrade_socket {
            crate::upgrade::check_path(path).map_err(ConfigError::Invalid)?;
        }
        for spec in self.backend_specs() {
            spec.validate().map_err(|reason| ConfigError::Backend {
                id: spec.id.clone(),
                reason,
            })?;
        }
        Ok(())
    }

    /// Certificate and key come in pairs; the handshake cap is at least one.
    fn validate_tls(&self) -> Result<(), ConfigError> {
        let pairs = [
            ("tls_cert", &self.tls_cert, "tls_key", &self.tls_key),
            (
                "backend_tls_client_cert",
                &self.backend_tls_client_cert,
                "backend_tls_client_key",
                &self.backend_tls_client_key,
            ),
        ];
        for (a, a_set, b, b_set) in pairs {
            if a_set.is_some() != b_set.is_some() {
                return Err(ConfigError::Invalid(format!(
                    "{a} and {b} go together: set both or neither"
                )));
            }
        }
        if self.max_concurrent_tls_handshakes == 0 {
            return Err(ConfigError::Invalid(
                "max_concurrent_tls_handshakes must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The client listener's certificate and key files, when it speaks TLS.
    pub fn client_tls_files(&self) -> Option<(&Path, &Path)> {
        Some((self.tls_cert.as_deref()?, self.tls_key.as_deref()?))
    }

    pub fn tls_listener_settings(&self) -> TlsListenerSettings {
        TlsListenerSettings {
            handshake_timeout: self.tls_handshake_timeout,
            max_concurrent_handshakes: self.max_concurrent_tls_handshakes,
        }
    }

    pub fn backend_tls_files(&self) -> BackendTlsFiles {
        BackendTlsFiles {
            ca_file: self.backend_tls_ca.clone(),
            client_cert: self.backend_tls_client_cert.clone(),
            client_key: self.backend_tls_client_key.clone(),
        }
    }

    /// Every handshake size limit with its sane range.
    fn validate_handshake_limits(&self) -> Result<(), ConfigError> {
        let head = self.max_request_head_bytes;
        let checks = [
            (
                "max_request_head_bytes",
                head,
                HandshakeLimits::MIN_HEAD_BYTES,
                1 << 20,
            ),
            ("max_header_bytes", self.max_header_bytes, 256, head),
            ("max_headers", self.max_headers, 8, 1000),
            ("max_uri_bytes", self.max_uri_bytes, 64, head),
        ];
        for (key, value, min, max) in checks {
            if !(min..=max).contains(&value) {
                return Err(ConfigError::Invalid(format!(
                    "{key} = {value} is out of range ({min} to {max})"
                )));
            }
        }
        Ok(())
    }

    /// The listener's authentication mode (see [`Settings::auth`]).
    pub fn auth_mode(&self) -> Result<AuthMode, ConfigError> {
        AuthMode::resolve(self.auth, !self.api_keys.is_empty(), self.jwt.is_some())
            .map_err(ConfigError::Invalid)
    }

    pub fn handshake_limits(&self) -> HandshakeLimits {
        HandshakeLimits {
            head_bytes: self.max_request_head_bytes,
            header_bytes: self.max_header_bytes,
            headers: self.max_headers,
            uri_bytes: self.max_uri_bytes,
        }
    }

    /// The backends as specs, sizes defaulted.
    pub fn backend_specs(&self) -> Vec<BackendSpec> {
        self.backends
            .iter()
            .map(|b| {
                let mut spec = BackendSpec::from_url(
                    &b.url,
                    b.target_size.unwrap_or(self.default_target_size),
                    b.max_size.unwrap_or(self.default_max_size),
                );
                if let Some(max) = b.max_size {
                    spec.max_size = max;
                }
                if let Some(id) = &b.id {
                    spec.id = id.clone();
                }
                if let Some(w) = b.weight {
                    spec.weight = w;
                }
                if let Some(r) = b.reuse {
                    spec.reuse = r;
                }
                if let Some(g) = &b.group {
                    spec.group = g.clone();
                }
                spec
            })
            .collect()
    }

    /// How requests map to backend groups and sticky keys; every error names the key.
    pub fn routing(&self) -> Result<Routing, ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if let Some(p) = &self.group_parameter {
            if p.is_empty() {
                return invalid("group_parameter is empty".into());
            }
            if self.jwt.as_ref().is_some_and(|j| &j.query_parameter == p) {
                return invalid(format!(
                    "group_parameter {p:?} is the JWT query parameter, never read as a group"
                ));
            }
        }
        let Some(s) = &self.sticky else {
            return Ok(Routing {
                group_parameter: self.group_parameter.clone(),
                sticky: None,
            });
        };
        let key = match (&s.claim, &s.header) {
            (Some(claim), None) => {
                if claim.is_empty() {
                    return invalid("sticky.claim is empty".into());
                }
                let jwt_on = matches!(self.auth_mode()?, AuthMode::Jwt | AuthMode::Either);
                if !jwt_on || self.jwt.is_none() {
                    return invalid(
                        "sticky.claim needs JWT authentication ([jwt], auth = jwt or either)"
                            .into(),
                    );
                }
                KeySource::Claim(claim.clone())
            }
            (None, Some(header)) => match http::HeaderName::from_bytes(header.as_bytes()) {
                Ok(name) => KeySource::Header(name),
                Err(_) => return invalid(format!("sticky.header {header:?} is not a header name")),
            },
            _ => return invalid("[sticky] needs one of claim or header".into()),
        };
        if s.groups.is_empty() {
            return invalid("sticky.groups is empty".into());
        }
        for g in &s.groups {
            crate::backend::validate_group(g)
                .map_err(|e| ConfigError::Invalid(format!("sticky.groups: {e}")))?;
        }
        if s.wait > self.acquire_timeout {
            return invalid(format!(
                "sticky.wait = {} is longer than acquire_timeout = {}",
                humantime::format_duration(s.wait),
                humantime::format_duration(self.acquire_timeout),
            ));
        }
        Ok(Routing {
            group_parameter: self.group_parameter.clone(),
            sticky: Some(StickyRouting {
                groups: s.groups.clone(),
                key,
                wait: s.wait,
            }),
        })
    }

    pub fn session_settings(&self) -> SessionSettings {
        SessionSettings {
            acquire_timeout: self.acquire_timeout,
            drain_timeout: self.drain_timeout,
            idle_timeout: self.idle_timeout,
            send_timeout: self.send_timeout,
            max_message_size: self.max_message_size,
            client_ping_interval: self.client_ping_interval,
            client_pong_timeout: self.client_pong_timeout,
            backend_ping_interval: self.health_interval,
            backend_pong_timeout: self.health_timeout,
            rate: RateLimits {
                messages_per_second: NonZeroU32::new(self.max_client_messages_per_second),
                bytes_per_second: NonZeroU32::new(self.max_client_bytes_per_second),
                burst: self.rate_limit_burst,
            },
            failover: (self.failover_max > 0).then_some(FailoverSettings {
                max_failovers: self.failover_max,
                timeout: self.failover_timeout,
                replay: ReplayLimits {
                    max_bytes: self.replay_max_bytes,
                    max_age: self.replay_max_age,
                },
                notice: self.failover_notice,
            }),
        }
    }

    pub fn pool_tuning(&self) -> PoolTuning {
        PoolTuning {
            reconcile: ReconcileConfig {
                tick: self.reconcile_interval,
                max_concurrent_dials: self.max_concurrent_dials,
                ..ReconcileConfig::default()
            },
            health_interval: self.health_interval,
            health_timeout: self.health_timeout,
            thresholds: HealthThresholds {
                unhealthy_after: self.unhealthy_after.max(1),
                healthy_after: self.healthy_after.max(1),
            },
            connect_timeout: self.backend_connect_timeout,
            handshake_timeout: self.backend_handshake_timeout,
            max_message_size: self.max_message_size,
            capacity_headroom: self.default_max_size.max(4096),
            // Read from files at start (`Proxy::start`), not here.
            backend_tls: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_file_parses_and_matches_the_defaults() {
        let text = include_str!("../../sttproxy.example.toml");
        let parsed: Settings = toml::from_str(text).unwrap();
        let defaults = Settings::default();
        assert_eq!(parsed.listen, defaults.listen);
        assert_eq!(parsed.acquire_timeout, defaults.acquire_timeout);
        assert_eq!(parsed.health_interval, defaults.health_interval);
        assert_eq!(parsed.sync_interval, defaults.sync_interval);
        assert_eq!(parsed.db, None);
        assert_eq!(parsed.backends.len(), 3);
        assert_eq!(parsed.group_parameter, None);
        assert_eq!(parsed.sticky, None);
        // The commented-out [sticky] example, uncommented with one key source, holds.
        let sticky = text
            .lines()
            .skip_while(|l| !l.starts_with("# [sticky]"))
            .take_while(|l| l.starts_with("# "))
            .map(|l| l.trim_start_matches("# "))
            .filter(|l| !l.starts_with("claim"))
            .collect::<Vec<_>>()
            .join("\n");
        let with_sticky: Settings = toml::from_str(&sticky).unwrap();
        assert_eq!(
            with_sticky.sticky.as_ref().unwrap().header.as_deref(),
            Some("x-user-id")
        );
        with_sticky.validate().unwrap();
        parsed.validate().unwrap();
    }

    #[test]
    fn upgrade_socket_parses_and_a_path_too_long_for_a_unix_socket_is_rejected() {
        let s: Settings =
            toml::from_str(r#"upgrade_socket = "/run/sttproxy/upgrade.sock""#).unwrap();
        assert_eq!(
            s.upgrade_socket.as_deref(),
            Some(Path::new("/run/sttproxy/upgrade.sock"))
        );
        s.validate().unwrap();
        let long = Settings {
            upgrade_socket: Some(PathBuf::from(format!("/run/{}/u.sock", "d".repeat(100)))),
            ..Settings::default()
        };
        let err = long.validate().unwrap_err().to_string();
        assert!(err.contains("upgrade_socket"), "{err}");
    }

    #[test]
    fn rejects_a_backend_with_max_below_target() {
        let s: Settings = toml::from_str(
            r#"
            [[backends]]
            url = "ws://127.0.0.1:9001"
            target_size = 8
            max_size = 4
            "#,
        )
        .unwrap();
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("max_size 4 < target_size 8")
        );
    }

    #[test]
    fn zero_or_absurd_durations_are_rejected_naming_the_key() {
        for key in [
            "idle_timeout",
            "send_timeout",
            "drain_timeout",
            "health_interval",
        ] {
            let zero: Settings = toml::from_str(&format!("{key} = \"0s\"")).unwrap();
            let err = zero.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
            let huge: Settings = toml::from_str(&format!("{key} = \"400days\"")).unwrap();
            let err = huge.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        assert!(Settings::default().validate().is_ok());
    }

    #[test]
    fn handshake_limits_out_of_range_are_rejected_naming_the_key() {
        for (key, value) in [
            // hyper panics below 8192 bytes of read buffer.
            ("max_request_head_bytes", 4096),
            ("max_request_head_bytes", 2 << 20),
            ("max_header_bytes", 0),
            // More than the whole head could hold.
            ("max_header_bytes", 32 << 10),
            ("max_headers", 0),
            ("max_uri_bytes", 10),
            ("max_uri_bytes", 32 << 10),
        ] {
            let s: Settings = toml::from_str(&format!("{key} = {value}")).unwrap();
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{key} = {value}: {err}");
        }
    }

    #[test]
    fn session_threads_out_of_range_are_rejected() {
        for value in [0, 1025] {
            let s: Settings = toml::from_str(&format!("session_threads = {value}")).unwrap();
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains("session_threads"), "{value}: {err}");
        }
        let s: Settings = toml::from_str("session_threads = 3").unwrap();
        s.validate().unwrap();
        assert_eq!(s.session_threads, Some(3));
    }

    #[test]
    fn tls_files_come_in_pairs_and_the_handshake_cap_is_positive() {
        for (text, key) in [
            (r#"tls_cert = "c.pem""#, "tls_cert"),
            (r#"tls_key = "k.pem""#, "tls_key"),
            (
                r#"backend_tls_client_cert = "c.pem""#,
                "backend_tls_client_key",
            ),
            (
                r#"backend_tls_client_key = "k.pem""#,
                "backend_tls_client_cert",
            ),
            (
                "max_concurrent_tls_handshakes = 0",
                "max_concurrent_tls_handshakes",
            ),
            (r#"tls_handshake_timeout = "0s""#, "tls_handshake_timeout"),
        ] {
            let s: Settings = toml::from_str(text).unwrap();
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
        let both: Settings = toml::from_str("tls_cert = \"c.pem\"\ntls_key = \"k.pem\"").unwrap();
        both.validate().unwrap();
        assert!(both.client_tls_files().is_some());
        assert!(Settings::default().client_tls_files().is_none());
    }

    #[test]
    fn sticky_settings_are_checked_naming_the_key() {
        for (text, says) in [
            ("[sticky]\n", "one of claim or header"),
            (
                "[sticky]\nclaim = \"sub\"\nheader = \"x-user\"\n",
                "one of claim or header",
            ),
            ("[sticky]\nclaim = \"sub\"\n", "sticky.claim needs JWT"),
            ("[sticky]\nheader = \"x user\"\n", "sticky.header"),
            (
                "[sticky]\nheader = \"x-user\"\ngroups = []\n",
                "sticky.groups",
            ),
            (
                "[sticky]\nheader = \"x-user\"\ngroups = [\"a b\"]\n",
                "sticky.groups",
            ),
            (
                "acquire_timeout = \"1s\"\n[sticky]\nheader = \"x-user\"\nwait = \"2s\"\n",
                "sticky.wait",
            ),
            ("group_parameter = \"\"\n", "group_parameter"),
        ] {
            let s: Settings = toml::from_str(text).unwrap();
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains(says), "{text}: {err}");
        }
        let s: Settings =
            toml::from_str("[[backends]]\nurl = \"ws://127.0.0.1:1\"\ngroup = \"x y\"\n").unwrap();
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("group \"x y\""), "{err}");
    }

    #[test]
    fn a_request_maps_to_its_group_and_key() {
        let s: Settings = toml::from_str(
            "group_parameter = \"model\"\n[sticky]\nheader = \"x-user\"\ngroups = [\"large\"]\n",
        )
        .unwrap();
        let routing = s.routing().unwrap();
        let params = |q: &str| -> serde_json::Map<String, serde_json::Value> {
            form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned().into()))
                .collect()
        };
        let mut headers = http::HeaderMap::new();
        headers.insert("x-user", http::HeaderValue::from_static("alice"));
        let t = routing.target(&params("lang=en"), &headers, None);
        assert_eq!((t.group.as_str(), t.sticky), ("default", None));
        let t = routing.target(&params("model=large"), &headers, None);
        assert_eq!(t.group, "large");
        let sticky = t.sticky.unwrap();
        assert_eq!(sticky.key, Some(crate::route::StickyKey::of(b"alice")));
        assert_eq!(sticky.wait, StickySettings::default().wait);
        let t = routing.target(&params("model=large"), &http::HeaderMap::new(), None);
        assert_eq!(t.sticky.unwrap().key, None);
        // A claim is not the header's source.
        let t = routing.target(&params("model=large"), &http::HeaderMap::new(), Some("bob"));
        assert_eq!(t.sticky.unwrap().key, None);
    }
}
