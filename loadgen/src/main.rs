//! `loadgen`: the command line around the library (see docs/architecture.md).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    Echo,
    Stt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Json,
}

/// Open-loop WebSocket load generator: latency from the intended send time, hdrhistogram
/// percentiles, CPU and RSS of the watched processes, JSON results.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version)]
struct Args {
    /// WebSocket URL (ws://); repeat to spread sessions round-robin over several.
    #[arg(long = "url", required = true)]
    urls: Vec<String>,
    /// Concurrent sessions.
    #[arg(long, default_value_t = 3000)]
    sessions: usize,
    /// Messages per second and session (echo mode; stt mode always sends 50/s).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Bytes per message, at least 48 (echo mode; stt mode always sends 640).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// How long each session streams.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, conflicts_with = "lifetime")]
    duration: Duration,
    /// Churn: each session streams for a length drawn uniformly from MIN..MAX
    /// (e.g. 3s..30s; repeatable with --seed) instead of --duration. With
    /// --ramp, sessions arrive at a steady --sessions / --ramp a second.
    #[arg(long, value_name = "MIN..MAX", value_parser = parse_lifetime)]
    lifetime: Option<(Duration, Duration)>,
    /// Seed of the --lifetime draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Spread the session starts over this long.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    ramp: Duration,
    /// echo: text messages echoed back; stt: 20 ms PCM chunks, JSON partials back.
    #[arg(long, value_enum, default_value_t = ModeArg::Echo)]
    mode: ModeArg,
    /// Sample this process and its descendants (CPU, RSS) every second; repeatable.
    #[arg(long = "watch-pid")]
    watch_pids: Vec<u32>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write an hdrhistogram interval log (one interval per second, µs) to this file.
    #[arg(long)]
    hist: Option<PathBuf>,
    /// What to print on stdout at the end.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Bound on TCP connect plus WebSocket handshake.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// How long each session waits for `session.ended` after `session.end`.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Runtime worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Sender/receiver shards (default: from sessions and cores).
    #[arg(long, hide = true)]
    shards: Option<usize>,
    /// Sender tick.
    #[arg(long, hide = true, default_value = "1ms", value_parser = humantime::parse_duration)]
    tick: Duration,
}

/// `MIN..MAX` of two durations, MIN ≤ MAX.
fn parse_lifetime(text: &str) -> Result<(Duration, Duration), String> {
    let (min, max) = text
        .split_once("..")
        .ok_or_else(|| format!("{text:?} is not MIN..MAX (e.g. 3s..30s)"))?;
    let min = humantime::parse_duration(min.trim()).map_err(|e| format!("{min:?}: {e}"))?;
    let max = humantime::parse_duration(max.trim()).map_err(|e| format!("{max:?}: {e}"))?;
    if min.is_zero() || min > max {
        return Err(format!("{text:?}: need 0 < MIN <= MAX"));
    }
    Ok((min, max))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();

    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = args.threads {
        builder.worker_threads(n.max(1));
    }
    let runtime = builder.build().context("starting the tokio runtime")?;

    let mut config = loadgen::LoadConfig::new(args.urls.clone());
    config.sessions = args.sessions;
    config.rate = args.rate;
    config.size = args.size;
    config.duration = args.duration;
    if let Some((min, max)) = args.lifetime {
        config.lifetime = Some(min);
        config.duration = max;
    }
    config.seed = args.seed;
    config.ramp = args.ramp;
    config.mode = match args.mode {
        ModeArg::Echo => loadgen::Mode::Echo,
        ModeArg::Stt => loadgen::Mode::Stt,
    };
    config.watch_pids = args.watch_pids.clone();
    config.hist_log = args.hist.clone();
    config.connect_timeout = args.connect_timeout;
    config.drain_timeout = args.drain_timeout;
    config.progress = true;
    config.shards = args.shards;
    config.tick = args.tick;

    let report = runtime.block_on(loadgen::run(config, async {
        let _ = tokio::signal::ctrl_c().await;
    }))?;

    let json = serde_json::to_string_pretty(&report).context("serializing the results")?;
    if let Some(path) = &args.json {
        std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    match args.format {
        Format::Json => println!("{json}"),
        Format::Text => print!("{report}"),
    }
    runtime.shutdown_timeout(Duration::from_millis(100));
    if report.sessions.connected == 0 {
        anyhow::bail!("no session could connect");
    }
    Ok(())
}
