//! `echo-backend`: STT inference-server emulator (see the library docs and docs/architecture.md).

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, ValueEnum};
use echo_backend::{Config, Faults, Mode};
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CliMode {
    /// Echo every data message unchanged.
    Echo,
    /// A delayed partial per binary chunk, a final on session.end.
    Stt,
}

/// STT inference-server emulator for sttproxy: echo and stt modes, fenced sessions, faults.
#[derive(Debug, Parser)]
#[command(name = "echo-backend", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// What to do with data messages.
    #[arg(long, value_enum, default_value_t = CliMode::Echo)]
    mode: CliMode,
    /// Simulated inference delay per audio chunk, in ms (stt mode).
    #[arg(long, default_value_t = 30)]
    delay_ms: u64,
    /// Uniform random extra delay per audio chunk, up to this many ms (stt mode).
    #[arg(long, default_value_t = 10)]
    jitter_ms: u64,
    /// Fault: close each connection abruptly after it received N data messages.
    #[arg(long, value_name = "N")]
    drop_after: Option<u64>,
    /// Fault: refuse every connection (accept, then drop before the handshake).
    #[arg(long)]
    refuse: bool,
    /// Fault: answer pings only after N ms (the connection pauses meanwhile).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pong_delay_ms: u64,
    /// Fault: after N data messages on a connection, stop reading and writing on it.
    #[arg(long, value_name = "N")]
    stall_after: Option<u64>,
    /// Exit (cleanly, status 0) after S seconds; fractions allowed.
    #[arg(long, value_name = "S")]
    exit_after_secs: Option<f64>,
    /// Largest message accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = echo_backend::DEFAULT_MAX_MESSAGE_SIZE)]
    max_message_size: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    raise_fd_limit();

    let exit_after = args
        .exit_after_secs
        .map(|s| Duration::try_from_secs_f64(s).with_context(|| format!("--exit-after-secs {s}")))
        .transpose()?;
    let config = Config {
        mode: match args.mode {
            CliMode::Echo => Mode::Echo,
            CliMode::Stt => Mode::Stt,
        },
        delay: Duration::from_millis(args.delay_ms),
        jitter: Duration::from_millis(args.jitter_ms),
        faults: Faults {
            drop_after: args.drop_after,
            refuse: args.refuse,
            pong_delay: Duration::from_millis(args.pong_delay_ms),
            stall_after: args.stall_after,
        },
        max_message_size: args.max_message_size,
    };
    if config.max_message_size == 0 {
        bail!("--max-message-size must be positive");
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(run(args.listen, config, exit_after))
}

async fn run(listen: SocketAddr, config: Config, exit_after: Option<Duration>) -> Result<()> {
    let backend = echo_backend::spawn(listen, config).await?;
    {
        // A harness reading this line may have gone away: never fail because of stdout.
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(
            stdout,
            "echo-backend listening on ws://{}",
            backend.local_addr()
        );
        let _ = stdout.flush();
    }

    let exit_after = async {
        match exit_after {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        signal = terminate_signal() => signal?,
        () = exit_after => {}
    }

    backend.shutdown().await;
    eprintln!("echo-backend stats: {}", backend.stats());
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn terminate_signal() -> Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        tokio::select! {
            ctrl_c = tokio::signal::ctrl_c() => ctrl_c.context("cannot watch SIGINT")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("cannot watch Ctrl-C")?;
    Ok(())
}

/// Raises the soft limit on open files to the hard limit (each connection needs one).
fn raise_fd_limit() {
    #[cfg(unix)]
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!("open files limit: {limit}"),
        Err(e) => tracing::warn!("cannot raise the open files limit: {e}"),
    }
}
