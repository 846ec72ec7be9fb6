//! `echo-backend`: STT inference-server emulator (see the library docs and docs/architecture.md).

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, ValueEnum};
use echo_backend::{Admission, Config, Faults, Mode, Stt};
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CliMode {
    /// Echo every data message unchanged.
    Echo,
    /// Binary messages are audio: partials, finals, errors after simulated inference.
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
    /// Simulated inference delay per result, in ms (stt mode).
    #[arg(long, default_value_t = 30)]
    delay_ms: u64,
    /// Uniform random extra delay per result, up to this many ms (stt mode).
    #[arg(long, default_value_t = 10)]
    jitter_ms: u64,
    /// Inference slots shared by all connections; results beyond wait in a FIFO queue and
    /// report the wait as queue_ms (stt mode). Default: unlimited.
    #[arg(long, value_name = "N")]
    slots: Option<usize>,
    /// Audio bytes per ms for the audio offsets (32: 16 kHz, 16-bit, mono PCM).
    #[arg(long, value_name = "N", default_value_t = echo_backend::DEFAULT_BYTES_PER_MS)]
    bytes_per_ms: u64,
    /// A partial every N ms of audio (stt mode). Default: one partial per binary message.
    #[arg(long, value_name = "N")]
    partial_every_ms: Option<u64>,
    /// Simulated pauses: utterance lengths drawn from MIN..=MAX ms, a final at each (stt
    /// mode). Default: a final only on session.end.
    #[arg(long, num_args = 2, value_names = ["MIN", "MAX"])]
    utterance_ms: Option<Vec<u64>>,
    /// Probability (0..=1) that an inference fails: an error event replaces the result and
    /// the session continues (stt mode).
    #[arg(long, value_name = "P", default_value_t = 0.0)]
    error_probability: f64,
    /// After N ms a session is finalized and told so with an error event
    /// (code session_time_limit); later audio is ignored until session.end (stt mode).
    /// Default: no limit.
    #[arg(long, value_name = "N")]
    session_time_limit_ms: Option<u64>,
    /// Answer the handshake with HTTP 503 while N connections are open. Default: no limit.
    #[arg(long, value_name = "N")]
    max_connections: Option<u64>,
    /// Answer the handshake with HTTP 429 while the inference queue is longer than N ms
    /// (stt mode, with --slots). Default: no limit.
    #[arg(long, value_name = "N")]
    max_queue_ms: Option<u64>,
    /// Wait N ms after accepting a TCP connection before reading its handshake (slow dials).
    #[arg(long, value_name = "N", default_value_t = 0)]
    dial_delay_ms: u64,
    /// Seed of the random draws (jitter, utterances, errors). Default: random.
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
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
    /// Test fault (echo mode): leave every N-th data message of each connection unanswered.
    #[arg(long, value_name = "N")]
    drop_every: Option<u64>,
    /// Test fault (echo mode): answer each data message with the previous one received on
    /// any connection (cross-delivery).
    #[arg(long)]
    swap: bool,
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
        stt: Stt {
            slots: args.slots,
            bytes_per_ms: args.bytes_per_ms,
            partial_every: args.partial_every_ms.map(Duration::from_millis),
            utterance: match args.utterance_ms.as_deref() {
                None => None,
                Some(&[min, max]) => Some((Duration::from_millis(min), Duration::from_millis(max))),
                Some(_) => bail!("--utterance-ms takes MIN and MAX"),
            },
            error_probability: args.error_probability,
            session_time_limit: args.session_time_limit_ms.map(Duration::from_millis),
        },
        admission: Admission {
            max_connections: args.max_connections,
            max_queue: args.max_queue_ms.map(Duration::from_millis),
            dial_delay: Duration::from_millis(args.dial_delay_ms),
        },
        seed: args.seed,
        faults: Faults {
            drop_after: args.drop_after,
            refuse: args.refuse,
            pong_delay: Duration::from_millis(args.pong_delay_ms),
            stall_after: args.stall_after,
            drop_every: args.drop_every,
            swap: args.swap,
        },
        max_message_size: args.max_message_size,
    };
    config.validate()?;

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
