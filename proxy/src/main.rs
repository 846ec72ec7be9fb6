//! `sttproxy`: the proxy's command line.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use sttproxy::config::{BackendEntry, LogFormat, Settings};

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
    Serve(ServeArgs),
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
    /// Sessions' time to finish on SIGTERM/SIGINT before 1001 [default: 30s].
    #[arg(long, value_parser = humantime::parse_duration)]
    shutdown_grace: Option<Duration>,
    /// Ping idle backend connections this often [default: 10s].
    #[arg(long, value_parser = humantime::parse_duration)]
    health_interval: Option<Duration>,
    /// Pong deadline for health pings [default: 2s].
    #[arg(long, value_parser = humantime::parse_duration)]
    health_timeout: Option<Duration>,
    /// Close clients silent this long with 1001 [default: 1m].
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_timeout: Option<Duration>,
    /// Open client connections at most [default: 10000].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Largest message either way, bytes [default: 1048576].
    #[arg(long)]
    max_message_size: Option<usize>,
    /// Log format [default: text].
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
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
        shutdown_grace,
        health_interval,
        health_timeout,
        idle_timeout,
        max_connections,
        max_message_size,
        log_format
    );
    for url in &args.backends {
        s.backends.push(BackendEntry {
            url: url.clone(),
            id: None,
            target_size: args.target_size,
            max_size: args.max_size,
            weight: None,
            reuse: None,
        });
    }
    s.validate()?;
    Ok(s)
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let settings = settings(&args)?;
    init_logs(settings.log_format);
    // Every proxied session holds two sockets: raise the soft limit to the hard one.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(nofile = n, "file descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the file descriptor limit"),
    }
    let proxy = sttproxy::Proxy::start(&settings).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "sttproxy listening on ws://{}, admin on http://{}",
            proxy.listen_addr(),
            proxy.admin_addr()
        )?;
        out.flush()?;
    }
    tracing::info!(backends = settings.backends.len(), "serving");
    shutdown_signal().await?;
    tracing::info!(grace = ?settings.shutdown_grace, "shutting down");
    proxy.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
    }
}
