//! `sttproxy`: the proxy's command line.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use sttproxy::backend::{BackendSpec, Reuse};
use sttproxy::config::db::{BackendPatch, Db, RowRead, full_message, redact};
use sttproxy::config::{BackendEntry, LogFormat, Settings};
use sttproxy::upgrade::{self, UpgradeSocket};

#[derive(Parser, Debug)]
#[command(
    name = "sttproxy",
    version,
    about = "WebSocket proxy for real-time speech-to-text with pooled backend connections"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy.
    #[command(after_long_help = concat!(
        "Every setting, with its default, as the settings file (--config) spells it:\n\n",
        include_str!("../sttproxy.example.toml")
    ))]
    Serve(Box<ServeArgs>),
    /// Manage the backend table (SQLite or PostgreSQL); running proxies apply
    /// changes live.
    #[command(subcommand)]
    Backends(BackendsCommand),
}

/// Default sizes of `backends add` (those of `sttproxy serve`).
const DEFAULT_TARGET: usize = 16;
const DEFAULT_MAX: usize = 1024;

/// Which backend table a `backends` command edits: the one `sttproxy serve`
/// uses given the same --db / STTPROXY_DB / --config, in the same working
/// directory ([`Settings::db_url`] decides for both).
#[derive(Args, Debug)]
struct DbArg {
    /// Backend table: sqlite://PATH or postgres://USER@HOST/DATABASE (created
    /// and migrated if needed) [default: as `sttproxy serve`: the settings
    /// file's `db`, else sqlite://<dir of --config, or the current dir>/sttproxy.db].
    #[arg(long, env = "STTPROXY_DB", value_name = "URL")]
    db: Option<String>,
    /// The settings file the proxy runs with: its `db` names the table, and
    /// the default table file sits beside it.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum BackendsCommand {
    /// List the backends.
    List {
        #[command(flatten)]
        db: DbArg,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ListFormat::Text)]
        format: ListFormat,
    },
    /// Add a backend.
    Add {
        #[command(flatten)]
        db: DbArg,
        /// Backend WebSocket URL (ws:// or wss://).
        #[arg(long, value_name = "WS_URL")]
        url: String,
        /// Unique id [default: the URL's host:port/path].
        #[arg(long)]
        id: Option<String>,
        /// Connections the pool keeps ready.
        #[arg(long, value_name = "N", default_value_t = DEFAULT_TARGET)]
        target: usize,
        /// Hard maximum of connections [default: 1024, or --target if larger].
        #[arg(long, value_name = "N")]
        max: Option<usize>,
        /// Routing weight relative to the other backends.
        #[arg(long, value_name = "W", default_value_t = 1)]
        weight: u32,
        /// fenced: sessions fenced with session.start/session.end, connections
        /// reused; resumable: fenced, and the backend speaks `resume`, so its
        /// sessions fail over to other resumable backends (docs/failover.md);
        /// none: each pre-warmed connection carries one session.
        #[arg(long, value_enum, default_value_t = Reuse::Fenced)]
        reuse: Reuse,
        /// The group it serves: sessions are routed only among the backends
        /// of their group (docs/pool.md, "Groups and sticky routing").
        #[arg(long, value_name = "NAME", default_value = sttproxy::route::DEFAULT_GROUP)]
        group: String,
    },
    /// Change a backend's values (the others stay).
    Set {
        #[command(flatten)]
        db: DbArg,
        /// The backend's id.
        id: String,
        #[arg(long, value_name = "WS_URL")]
        url: Option<String>,
        #[arg(long, value_name = "N")]
        target: Option<usize>,
        #[arg(long, value_name = "N")]
        max: Option<usize>,
        #[arg(long, value_name = "W")]
        weight: Option<u32>,
        #[arg(long, value_enum)]
        reuse: Option<Reuse>,
        #[arg(long, value_name = "NAME")]
        group: Option<String>,
    },
    /// Remove a backend: its pool drains (sessions finish, then its connections close).
    Remove {
        #[command(flatten)]
        db: DbArg,
        id: String,
    },
    /// Enable a backend.
    Enable {
        #[command(flatten)]
        db: DbArg,
        id: String,
    },
    /// Disable a backend: like remove, but the row stays.
    Disable {
        #[command(flatten)]
        db: DbArg,
        id: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ListFormat {
    Text,
    Json,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Settings file (TOML); flags override it. See the example below (--help).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Client listener [default: 0.0.0.0:8080]; port 0 picks a free port.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Admin listener (/metrics /healthz /readyz /pools) [default: 127.0.0.1:9090].
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Backend WebSocket URL (ws:// or wss://); repeat for several. Added to the file's backends.
    #[arg(long = "backend", value_name = "URL")]
    backends: Vec<String>,
    /// Pool target size for --backend URLs [default: 16].
    #[arg(long)]
    target_size: Option<usize>,
    /// Pool max size for --backend URLs [default: 1024].
    #[arg(long)]
    max_size: Option<usize>,
    /// Path clients upgrade on [default: /v1/stream].
    #[arg(long)]
    stream_path: Option<String>,
    /// Wait this long for a backend connection, then close 1013 [default: 5s].
    #[arg(long, value_parser = humantime::parse_duration)]
    acquire_timeout: Option<Duration>,
    /// Backend's time to answer session.end [default: 5s].
    #[arg(long, value_parser = humantime::parse_duration)]
    drain_timeout: Option<Duration>,
    /// On SIGTERM/SIGINT, /readyz turns 503 at once but new clients are still
    /// served this long, so a load balancer stops sending them before any is
    /// refused [default: 0s].
    #[arg(long, value_parser = humantime::parse_duration)]
    shutdown_delay: Option<Duration>,
    /// Sessions' time to finish on SIGTERM/SIGINT before 1001 [default: 30s].
    #[arg(long, value_parser = humantime::parse_duration)]
    shutdown_grace: Option<Duration>,
    /// Ping idle backend connections this often, and a session's backend
    /// after this long without a byte from it [default: 10s].
    #[arg(long, value_parser = humantime::parse_duration)]
    health_interval: Option<Duration>,
    /// Pong deadline for those pings; a session's backend that misses it has
    /// failed [default: 2s].
    #[arg(long, value_parser = humantime::parse_duration)]
    health_timeout: Option<Duration>,
    /// Close clients silent this long with 1001 [default: 1m].
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_timeout: Option<Duration>,
    /// Open client connections at most [default: 10000].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Run sessions on N threads, each with its own event loop, instead of the
    /// shared runtime [default: off].
    #[arg(long)]
    session_threads: Option<usize>,
    /// Largest message either way, bytes [default: 1048576].
    #[arg(long)]
    max_message_size: Option<usize>,
    /// Log format [default: text].
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Backend table: sqlite://PATH, sqlite::memory: (a throwaway table seeded
    /// from --backend on every start) or postgres://USER@HOST/DATABASE
    /// [default: sqlite://<dir of --config, or the current dir>/sttproxy.db].
    /// --backend and [[backends]] seed it only when it is empty on its first start.
    #[arg(long, env = "STTPROXY_DB", value_name = "URL")]
    db: Option<String>,
    /// Poll the backend table this often, jittered ±10 % [default: 5s].
    #[arg(long, value_parser = humantime::parse_duration)]
    sync_interval: Option<Duration>,
    /// Serve clients over TLS (wss://) with this certificate chain (PEM);
    /// needs --tls-key. Reloaded when the file changes and on SIGHUP.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A client's TLS handshake must complete within this [default: 10s].
    #[arg(long, value_parser = humantime::parse_duration)]
    tls_handshake_timeout: Option<Duration>,
    /// TLS handshakes in progress at most; beyond, connections are closed [default: 1024].
    #[arg(long, value_name = "N")]
    max_concurrent_tls_handshakes: Option<usize>,
    /// Extra CA certificates (PEM) trusted for wss:// backends.
    #[arg(long, value_name = "PEM")]
    backend_tls_ca: Option<PathBuf>,
    /// Unix socket for zero-downtime upgrades: a process started with the
    /// same path takes the listeners over from the one running there, which
    /// then drains and exits (docs/operations.md).
    #[arg(long, value_name = "PATH")]
    upgrade_socket: Option<PathBuf>,
}

fn settings(args: &ServeArgs) -> anyhow::Result<Settings> {
    let mut s = match &args.config {
        Some(path) => Settings::load(path)?,
        None => Settings::default(),
    };
    macro_rules! set {
        ($($field:ident),*) => { $( if let Some(v) = args.$field.clone() { s.$field = v; } )* };
    }
    set!(
        listen,
        admin,
        stream_path,
        acquire_timeout,
        drain_timeout,
        shutdown_delay,
        shutdown_grace,
        health_interval,
        health_timeout,
        idle_timeout,
        max_connections,
        max_message_size,
        log_format,
        sync_interval,
        tls_handshake_timeout,
        max_concurrent_tls_handshakes
    );
    if args.session_threads.is_some() {
        s.session_threads = args.session_threads;
    }
    s.db = Some(Settings::db_url(
        args.db.as_deref(),
        args.config.as_deref(),
        Some(&s),
    )?);
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        s.tls_cert = Some(cert.clone());
        s.tls_key = Some(key.clone());
    }
    if let Some(ca) = &args.backend_tls_ca {
        s.backend_tls_ca = Some(ca.clone());
    }
    if let Some(path) = &args.upgrade_socket {
        s.upgrade_socket = Some(path.clone());
    }
    s.seeds_from_flags = !args.backends.is_empty();
    for url in &args.backends {
        s.backends.push(BackendEntry {
            url: url.clone(),
            id: None,
            target_size: args.target_size,
            max_size: args.max_size,
            weight: None,
            reuse: None,
            group: None,
        });
    }
    s.validate()?;
    Ok(s)
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: escape codes in a file or a log
    // collector's pipe are noise (and NO_COLOR turns it off anywhere).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The signals `serve` handles, registered before the proxy starts so that
/// none arriving early takes its default action (for SIGHUP: killing the
/// process, which a `systemctl reload` on a proxy without TLS would do).
struct Signals {
    term: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            hangup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    /// Until SIGTERM or SIGINT. SIGHUP reloads the TLS certificate (the
    /// listener's own handler does that); without TLS there is nothing to
    /// reload, and it is logged and otherwise ignored.
    async fn shutdown(&mut self, tls: bool) -> anyhow::Result<()> {
        loop {
            tokio::select! {
                _ = self.term.recv() => return Ok(()),
                r = tokio::signal::ctrl_c() => return r.context("waiting for SIGINT"),
                _ = self.hangup.recv() => {
                    if tls {
                        tracing::info!("SIGHUP: reloading the TLS certificate");
                    } else {
                        tracing::info!("SIGHUP ignored: without tls_cert there is nothing to reload");
                    }
                }
            }
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let settings = settings(&args)?;
    init_logs(settings.log_format);
    // Every proxied session holds two sockets: raise the soft limit to the hard one.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(nofile = n, "file descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the file descriptor limit"),
    }
    let mut signals = Signals::install()?;
    // A proxy already running on the upgrade socket hands its listeners over.
    let predecessor = match &settings.upgrade_socket {
        Some(path) => upgrade::take_over(path).await?,
        None => None,
    };
    let (mut proxy, predecessor) = match predecessor {
        None => (sttproxy::Proxy::start(&settings).await?, None),
        Some((predecessor, inherited)) => {
            tracing::info!(
                socket = %predecessor_path(&settings),
                "upgrade: took the listeners over from the running proxy"
            );
            // On an error the connection to the old process closes with this
            // one: it keeps serving.
            let proxy = sttproxy::Proxy::start_inherited(&settings, inherited).await?;
            (proxy, Some(predecessor))
        }
    };
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "sttproxy listening on {}://{}, admin on http://{}",
            if proxy.is_tls() { "wss" } else { "ws" },
            proxy.listen_addr(),
            proxy.admin_addr()
        )?;
        out.flush()?;
    }
    tracing::info!(backends = proxy.backends().all().len(), "serving");
    let took_over = predecessor.is_some();
    if let Some(predecessor) = predecessor {
        match predecessor.confirm().await {
            Ok(()) => tracing::info!("upgrade: the old process stopped accepting"),
            Err(e) => tracing::warn!(error = %e, "upgrade: no word from the old process"),
        }
    }
    let upgrade_socket = match settings.upgrade_socket.as_deref().map(UpgradeSocket::bind) {
        None => None,
        Some(Ok(socket)) => Some(socket),
        // The old process has stopped accepting: exiting now would close
        // the listeners. Serve on, without the next upgrade.
        Some(Err(e)) if took_over => {
            tracing::error!(error = %e, "upgrade: serving without an upgrade socket");
            None
        }
        Some(Err(e)) => return Err(e.into()),
    };
    let successor = {
        let successor = async {
            match (&upgrade_socket, proxy.listener_fds()) {
                (Some(socket), Some((client, admin))) => socket.successor(client, admin).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            r = signals.shutdown(proxy.is_tls()) => { r?; None }
            s = successor => Some(s),
        }
    };
    match successor {
        None => {
            drop(upgrade_socket);
            tracing::info!(delay = ?settings.shutdown_delay, grace = ?settings.shutdown_grace, "shutting down");
            proxy.shutdown().await;
        }
        Some(successor) => {
            proxy.stop_accepting().await;
            // Before the last word: the successor binds the path after it.
            drop(upgrade_socket);
            successor.done().await;
            tracing::info!(
                grace = ?settings.shutdown_grace,
                open = proxy.open_connections(),
                "upgrade: a new process serves the listeners; draining"
            );
            proxy.drain_after_upgrade().await;
        }
    }
    tracing::info!("stopped");
    Ok(())
}

fn predecessor_path(settings: &Settings) -> String {
    settings
        .upgrade_socket
        .as_deref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain on one line, whatever RUST_BACKTRACE says;
            // each cause once (many errors both print and chain theirs).
            eprintln!("error: {}", full_message(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(*args)),
        Command::Backends(cmd) => runtime.block_on(backends(cmd)),
    }
}

/// Open the table `db` names (see [`DbArg`]). When the user named none, says
/// on stderr which one it is: the default depends on the working directory.
async fn open(db: &DbArg) -> anyhow::Result<Db> {
    let file = db.config.as_deref().map(Settings::load).transpose()?;
    let url = Settings::db_url(db.db.as_deref(), db.config.as_deref(), file.as_ref())?;
    if db.db.is_none() {
        let from = if file.as_ref().is_some_and(|f| f.db.is_some()) {
            "the settings file's `db`"
        } else {
            "the default of `sttproxy serve` here"
        };
        eprintln!(
            "backend table {} ({from}; --db or STTPROXY_DB names another)",
            redact(&url)
        );
    }
    Ok(Db::open(&url).await?)
}

async fn backends(cmd: BackendsCommand) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match cmd {
        BackendsCommand::List { db, format } => {
            let db = open(&db).await?;
            let rows = db.rows().await?;
            db.close().await;
            match format {
                ListFormat::Json => {
                    writeln!(out, "{}", list_json(&rows))?;
                }
                ListFormat::Text => write_table(&mut out, &rows)?,
            }
        }
        BackendsCommand::Add {
            db,
            url,
            id,
            target,
            max,
            weight,
            reuse,
            group,
        } => {
            let mut spec =
                BackendSpec::from_url(&url, target, max.unwrap_or(DEFAULT_MAX.max(target)));
            if let Some(max) = max {
                spec.max_size = max;
            }
            if let Some(id) = id {
                spec.id = id;
            }
            spec.weight = weight;
            spec.reuse = reuse;
            spec.group = group;
            let db = open(&db).await?;
            let added = db.add(&spec).await;
            db.close().await;
            added?;
            writeln!(out, "added backend {}: {}", spec.id, describe(&spec))?;
        }
        BackendsCommand::Set {
            db,
            id,
            url,
            target,
            max,
            weight,
            reuse,
            group,
        } => {
            let patch = BackendPatch {
                url,
                target_size: target,
                max_size: max,
                weight,
                reuse,
                group,
            };
            if patch.is_empty() {
                anyhow::bail!(
                    "nothing to change: give at least one of --url, --target, --max, --weight, --reuse, --group"
                );
            }
            let db = open(&db).await?;
            let updated = db.update(&id, &patch).await;
            db.close().await;
            let spec = updated?;
            writeln!(out, "updated backend {id}: {}", describe(&spec))?;
        }
        BackendsCommand::Remove { db, id } => {
            let db = open(&db).await?;
            let r = db.remove(&id).await;
            db.close().await;
            r?;
            writeln!(out, "removed backend {id}")?;
        }
        BackendsCommand::Enable { db, id } => {
            let db = open(&db).await?;
            let r = db.set_enabled(&id, true).await;
            db.close().await;
            r?;
            writeln!(out, "enabled backend {id}")?;
        }
        BackendsCommand::Disable { db, id } => {
            let db = open(&db).await?;
            let r = db.set_enabled(&id, false).await;
            db.close().await;
            r?;
            writeln!(out, "disabled backend {id}")?;
        }
    }
    out.flush()?;
    Ok(())
}

fn describe(spec: &BackendSpec) -> String {
    format!(
        "url {}, target {}, max {}, weight {}, reuse {}, group {}{}",
        redact(&spec.url),
        spec.target_size,
        spec.max_size,
        spec.weight,
        spec.reuse,
        spec.group,
        if spec.enabled { "" } else { ", disabled" }
    )
}

/// `{"backends":[{id, url, target_size, max_size, weight, enabled, reuse,
/// group, updated_at, error}]}`; `error` says why the proxy rejects a row (null if it
/// does not).
fn list_json(rows: &[RowRead]) -> serde_json::Value {
    let items: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| match r {
            Ok(row) => {
                let mut v = serde_json::to_value(row).unwrap_or_default();
                if let Some(obj) = v.as_object_mut() {
                    // A URL's password is for the proxy, not for whoever lists.
                    obj.insert("url".into(), redact(&row.url).into());
                    obj.insert(
                        "error".into(),
                        row.to_spec()
                            .err()
                            .map_or(serde_json::Value::Null, Into::into),
                    );
                }
                v
            }
            Err(u) => serde_json::json!({ "id": u.id, "error": u.reason }),
        })
        .collect();
    serde_json::json!({ "backends": items })
}

fn write_table(out: &mut impl Write, rows: &[RowRead]) -> anyhow::Result<()> {
    let header = [
        "ID", "URL", "TARGET", "MAX", "WEIGHT", "ENABLED", "REUSE", "GROUP", "UPDATED",
    ]
    .map(String::from);
    let mut lines: Vec<(Vec<String>, Option<String>)> = vec![(header.to_vec(), None)];
    for r in rows {
        match r {
            Ok(row) => lines.push((
                vec![
                    row.id.clone(),
                    redact(&row.url),
                    row.target_size.to_string(),
                    row.max_size.to_string(),
                    row.weight.to_string(),
                    if row.enabled { "yes" } else { "no" }.to_string(),
                    row.reuse.clone(),
                    row.group_name.clone(),
                    row.updated_at.clone(),
                ],
                row.to_spec().err(),
            )),
            Err(u) => lines.push((vec![u.id.clone()], Some(u.reason.clone()))),
        }
    }
    let mut widths = [0usize; 9];
    for (cells, _) in &lines {
        for (w, c) in widths.iter_mut().zip(cells) {
            *w = (*w).max(c.chars().count());
        }
    }
    for (cells, error) in &lines {
        let mut line = String::new();
        for (i, (w, c)) in widths.iter().zip(cells).enumerate() {
            if i + 1 == cells.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  "));
            }
        }
        if let Some(e) = error {
            line.push_str(&format!("  REJECTED: {e}"));
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    if rows.is_empty() {
        writeln!(out, "(no backends)")?;
    }
    Ok(())
}
