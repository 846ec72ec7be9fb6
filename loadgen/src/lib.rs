//! `loadgen`: an open-loop WebSocket load generator for sttproxy.
//!
//! N sessions, each sending R messages per second of S bytes for a duration D, spread
//! round-robin over one or more URLs. Sending is open-loop: every message has a fixed
//! *intended* send time (session start + k/R, each session's grid shifted by k/(R·N) so
//! the sessions do not all send in the same millisecond), and its latency is measured
//! from that intended time, never from when the generator got around to sending it. A
//! server that stalls therefore shows the stall in the latency figures instead of hiding
//! it behind a slowed-down sender (no coordinated omission).
//!
//! A session that falls behind (its socket is backpressured) still sends its late
//! messages, in a burst, as soon as the socket takes them; what is still unsent when the
//! session's time is up is counted as `unsent`, not as sent or lost.
//!
//! See [`proto`] for the message format, [`LoadConfig`] for the knobs and [`LoadReport`]
//! for what comes back (it serializes to the `--json` result; docs/architecture.md).
//!
//! ```no_run
//! # async fn demo() -> Result<(), loadgen::Error> {
//! let mut config = loadgen::LoadConfig::new(vec!["ws://127.0.0.1:8080/v1/stream".into()]);
//! config.sessions = 100;
//! let report = loadgen::run(config, std::future::pending()).await?;
//! println!("{report}");
//! # Ok(()) }
//! ```

pub mod proto;

pub mod host;
pub mod procfs;
mod progress;
mod report;
mod sampler;
mod shard;

use std::collections::BTreeMap;
use std::fs::File;
use std::future::Future;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram;
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::serialization::interval_log::{IntervalLogWriter, IntervalLogWriterBuilder};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub use report::{
    Host, Latency, LoadReport, LoadgenSelf, Machine, MachineSample, MessageCounts, SCHEMA_VERSION,
    Scenario, SessionCounts, Throughput, TimelineEntry, Tool, WatchSample, Watched,
};

use shard::{Event, NewConn, Schedule, ShardParams, Totals};

/// What the sessions send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Text messages of `size` bytes with a header, echoed back by the server.
    #[default]
    Echo,
    /// 640-byte binary PCM chunks at 50/s (whatever `rate` and `size` say); the server
    /// answers each with a JSON `partial` numbered per session from 0.
    Stt,
}

/// The knobs of a run. [`LoadConfig::new`] gives the defaults of the command line.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// WebSocket URLs (`ws://` only); session `i` uses `urls[i % urls.len()]`.
    pub urls: Vec<String>,
    pub sessions: usize,
    /// Messages per second and session (echo mode).
    pub rate: f64,
    /// Bytes per message (echo mode), clamped to `proto::MIN_SIZE..=proto::MAX_SIZE`.
    pub size: usize,
    /// How long each session streams (with `lifetime`: the longest a session streams).
    pub duration: Duration,
    /// Session `i` starts at `ramp * i / sessions`: sessions arrive at a steady
    /// `sessions / ramp` per second.
    pub ramp: Duration,
    /// Finite, varied sessions (churn): each session streams for a length drawn
    /// uniformly from `lifetime..=duration` (repeatably, from `seed`) instead of
    /// `duration`. `None`: every session streams for `duration`.
    pub lifetime: Option<Duration>,
    /// Seed of the lifetimes.
    pub seed: u64,
    pub mode: Mode,
    /// Processes to sample (with all their descendants) once a second.
    pub watch_pids: Vec<u32>,
    /// Where to write an hdrhistogram interval log (one interval per second, latency in µs).
    pub hist_log: Option<PathBuf>,
    /// Bound on TCP connect plus WebSocket handshake.
    pub connect_timeout: Duration,
    /// How long a session waits for `session.ended` (or the server's Close) after
    /// `session.end`.
    pub drain_timeout: Duration,
    /// Report progress on stderr: a live line on a terminal, else one line every
    /// few seconds.
    pub progress: bool,
    /// Sender/receiver tasks; `None` picks from the session count and the cores.
    pub shards: Option<usize>,
    /// How often each shard wakes to send what is due.
    pub tick: Duration,
}

impl LoadConfig {
    /// The command line's defaults: 3000 sessions × 100 msg/s × 1024 B for 60 s, echo mode.
    pub fn new(urls: Vec<String>) -> Self {
        Self {
            urls,
            sessions: 3000,
            rate: 100.0,
            size: 1024,
            duration: Duration::from_secs(60),
            ramp: Duration::ZERO,
            lifetime: None,
            seed: 1,
            mode: Mode::Echo,
            watch_pids: Vec::new(),
            hist_log: None,
            connect_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
            progress: false,
            shards: None,
            tick: Duration::from_millis(1),
        }
    }
}

/// Why a run could not be done at all (what goes wrong with sessions is in the report).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot write the histogram log {path}: {source}")]
    HistLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("histogram: {0}")]
    Histogram(String),
}

/// Sessions open at once at most: all of them without a ramp; with one,
/// those that arrive within the longest a session lives (its streaming plus
/// the drain), since sessions arrive at a steady rate over the ramp.
fn peak_open(sessions: usize, config: &LoadConfig) -> u64 {
    let n = sessions as u64;
    if config.ramp.is_zero() {
        return n;
    }
    let life = (config.duration + config.drain_timeout).as_secs_f64();
    let per_s = n as f64 / config.ramp.as_secs_f64();
    n.min((per_s * life).ceil() as u64 + 1)
}

/// File descriptors the generator needs besides one per session.
const FD_RESERVE: u64 = 16;
/// Drain allowed after an early stop (capped by `drain_timeout`).
const STOP_DRAIN: Duration = Duration::from_secs(1);

struct Plan {
    sessions: usize,
    rate: f64,
    size: usize,
    warnings: Vec<String>,
}

fn plan(config: &LoadConfig) -> Result<Plan, Error> {
    let mut warnings = Vec::new();
    if config.urls.is_empty() {
        return Err(Error::Config("at least one --url is needed".into()));
    }
    for url in &config.urls {
        let req = url
            .as_str()
            .into_client_request()
            .map_err(|e| Error::Config(format!("bad url {url:?}: {e}")))?;
        match req.uri().scheme_str() {
            Some("ws") => {}
            Some("wss") => {
                return Err(Error::Config(format!(
                    "{url}: wss:// is not supported (loadgen speaks plain ws://)"
                )));
            }
            _ => return Err(Error::Config(format!("{url}: not a ws:// URL"))),
        }
        if req.uri().host().is_none() {
            return Err(Error::Config(format!("{url}: no host")));
        }
    }
    if config.sessions == 0 || config.sessions > u32::MAX as usize {
        return Err(Error::Config("--sessions must be at least 1".into()));
    }
    if config.duration.is_zero() {
        return Err(Error::Config("--duration must be more than 0".into()));
    }
    if config
        .lifetime
        .is_some_and(|l| l.is_zero() || l > config.duration)
    {
        return Err(Error::Config(
            "the shortest lifetime must be more than 0 and at most --duration".into(),
        ));
    }
    if config.tick.is_zero() {
        return Err(Error::Config("tick must be more than 0".into()));
    }
    let (rate, size) = match config.mode {
        Mode::Echo => {
            if !(config.rate.is_finite() && config.rate > 0.0 && config.rate <= 1e6) {
                return Err(Error::Config("--rate must be in (0, 1e6]".into()));
            }
            let size = config.size.clamp(proto::MIN_SIZE, proto::MAX_SIZE);
            if size != config.size {
                warnings.push(format!(
                    "--size {} clamped to {size} (the header alone is {} bytes)",
                    config.size,
                    proto::HEADER_LEN
                ));
            }
            (config.rate, size)
        }
        Mode::Stt => {
            let defaults = LoadConfig::new(Vec::new());
            let rate_set = config.rate != defaults.rate && config.rate != proto::STT_RATE;
            let size_set = config.size != defaults.size && config.size != proto::STT_CHUNK_BYTES;
            if rate_set || size_set {
                warnings.push(format!(
                    "stt mode sends {}-byte chunks at {}/s; --rate and --size are ignored",
                    proto::STT_CHUNK_BYTES,
                    proto::STT_RATE
                ));
            }
            (proto::STT_RATE, proto::STT_CHUNK_BYTES)
        }
    };
    Ok(Plan {
        sessions: config.sessions,
        rate,
        size,
        warnings,
    })
}

fn new_hist() -> Result<Histogram<u64>, Error> {
    Histogram::new(3).map_err(|e| Error::Histogram(format!("{e:?}")))
}

fn latency_of(h: &Histogram<u64>) -> Latency {
    if h.is_empty() {
        return Latency::default();
    }
    let ms = |us: u64| sampler::round3(us as f64 / 1000.0);
    Latency {
        p50: ms(h.value_at_quantile(0.5)),
        p90: ms(h.value_at_quantile(0.9)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
        mean: sampler::round3(h.mean() / 1000.0),
        count: h.len(),
    }
}

/// One second of the run, filled by the shards' reports.
struct Second {
    sent: u64,
    received: u64,
    aborted: u64,
    hist: Histogram<u64>,
}

/// Merges the shards' per-second reports into the timeline, the total histogram and the
/// interval log.
struct Collector<'a, 'b> {
    total: Histogram<u64>,
    connect: Histogram<u64>,
    send_lag: Histogram<u64>,
    template: Histogram<u64>,
    pending: BTreeMap<u64, Second>,
    timeline: Vec<TimelineEntry>,
    totals: Totals,
    errors: BTreeMap<String, u64>,
    connected: usize,
    connect_failed: usize,
    not_started: usize,
    /// Per shard: the next second it will report, and whether it is done. Each shard
    /// reports its seconds in order, then `Done`.
    shard_next: Vec<u64>,
    shard_done: Vec<bool>,
    log: Option<IntervalLogWriter<'a, 'b, BufWriter<File>, V2DeflateSerializer>>,
    log_error: Option<String>,
    last_second: Option<(u64, u64, f64)>,
}

impl Collector<'_, '_> {
    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Connected { us } => {
                self.connected += 1;
                let _ = self.connect.record(us.max(1));
            }
            Event::NotStarted => self.not_started += 1,
            Event::ConnectFailed { kind, slots } => {
                self.connect_failed += 1;
                self.totals.scheduled += slots;
                self.totals.unsent += slots;
                *self.errors.entry(kind).or_default() += 1;
            }
            Event::Error { kind } => *self.errors.entry(kind).or_default() += 1,
            Event::Interval {
                shard,
                second,
                sent,
                received,
                aborted,
                hist,
            } => {
                let entry = self.pending.entry(second).or_insert_with(|| Second {
                    sent: 0,
                    received: 0,
                    aborted: 0,
                    hist: self.template.clone(),
                });
                entry.sent += sent;
                entry.received += received;
                entry.aborted += aborted;
                let _ = entry.hist.add(&hist);
                if let Some(next) = self.shard_next.get_mut(shard) {
                    *next = (*next).max(second + 1);
                }
                self.complete_seconds(false);
            }
            Event::Done { shard, summary } => {
                if let Some(done) = self.shard_done.get_mut(shard) {
                    *done = true;
                }
                add_totals(&mut self.totals, &summary.totals);
                let _ = self.send_lag.add(&summary.send_lag);
                self.complete_seconds(false);
            }
        }
    }

    /// Finalizes the seconds every shard has reported or will never report (all of them
    /// when `all`).
    fn complete_seconds(&mut self, all: bool) {
        while let Some(entry) = self.pending.first_entry() {
            let second = *entry.key();
            let reported = self
                .shard_next
                .iter()
                .zip(&self.shard_done)
                .all(|(&next, &done)| done || next > second);
            if !all && !reported {
                break;
            }
            let s = entry.remove();
            let p99 = if s.hist.is_empty() {
                0.0
            } else {
                sampler::round3(s.hist.value_at_quantile(0.99) as f64 / 1000.0)
            };
            self.timeline.push(TimelineEntry {
                t: (second + 1) as f64,
                sent: s.sent,
                received: s.received,
                aborted: s.aborted,
                p99_ms: p99,
            });
            self.last_second = Some((s.sent, s.received, p99));
            let _ = self.total.add(&s.hist);
            if let Some(log) = self.log.as_mut()
                && let Err(e) = log.write_histogram(
                    &s.hist,
                    Duration::from_secs(second),
                    Duration::from_secs(1),
                    None,
                )
            {
                self.log_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

fn add_totals(a: &mut Totals, b: &Totals) {
    a.scheduled += b.scheduled;
    a.sent += b.sent;
    a.received += b.received;
    a.lost += b.lost;
    a.lost_completed += b.lost_completed;
    a.duplicated += b.duplicated;
    a.out_of_order += b.out_of_order;
    a.cross_session += b.cross_session;
    a.unsent += b.unsent;
    a.finals += b.finals;
    a.completed += b.completed;
    a.aborted += b.aborted;
}

/// How a failed connect is counted.
fn connect_error_kind(e: &tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error as WsError;
    match e {
        WsError::Io(io) => io_connect_kind(io),
        WsError::Http(resp) => format!("handshake_status_{}", resp.status().as_u16()),
        _ => "connect_error".to_owned(),
    }
}

fn io_connect_kind(io: &std::io::Error) -> String {
    match io.kind() {
        std::io::ErrorKind::ConnectionRefused => "connect_refused".to_owned(),
        _ if io.raw_os_error() == Some(libc::EMFILE) || io.raw_os_error() == Some(libc::ENFILE) => {
            "connect_too_many_open_files".to_owned()
        }
        _ => "connect_error".to_owned(),
    }
}

fn ws_config(size: usize) -> WebSocketConfig {
    // Small buffers: tungstenite's 128 KiB defaults would cost 256 KiB per session.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(16 * 1024)
        .max_write_buffer_size(4 << 20)
        .max_message_size(Some((2 * size).max(1 << 20)))
        .max_frame_size(Some((2 * size).max(1 << 20)))
}

async fn connect_one(
    url: &str,
    size: usize,
) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, String> {
    let request = url
        .into_client_request()
        .map_err(|_| "connect_error".to_owned())?;
    let host = request.uri().host().unwrap_or("localhost").to_owned();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = request.uri().port_u16().unwrap_or(80);
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| io_connect_kind(&e))?;
    let _ = tcp.set_nodelay(true);
    let (ws, _response) =
        tokio_tungstenite::client_async_with_config(request, tcp, Some(ws_config(size)))
            .await
            .map_err(|e| connect_error_kind(&e))?;
    Ok(ws)
}

fn shard_count(config: &LoadConfig) -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    config
        .shards
        .unwrap_or_else(|| (2 * cores).min(config.sessions.div_ceil(128)))
        .clamp(1, config.sessions.max(1))
}

/// Runs the load and returns what it measured.
///
/// The run stops by itself after `ramp + duration + drain_timeout` (plus a moment to
/// collect the results), or earlier when `stop` completes: then every session ends at
/// once, drains for at most a second, and the partial results come back with
/// `stopped_early` set. Writes the interval log when `config.hist_log` is set.
pub async fn run<F>(config: LoadConfig, stop: F) -> Result<LoadReport, Error>
where
    F: Future<Output = ()> + Send,
{
    let plan = plan(&config)?;
    let mut warnings = plan.warnings;
    let mut errors_extra: BTreeMap<String, u64> = BTreeMap::new();
    let fd = procfs::raise_nofile_limit();
    if let Some(fd) = fd {
        let need = peak_open(plan.sessions, &config) + FD_RESERVE;
        if need > fd.soft {
            let short = need - fd.soft;
            warnings.push(format!(
                "{} sessions need about {need} open files but the limit is {} (hard {}): \
                 about {short} sessions cannot connect",
                plan.sessions, fd.soft, fd.hard
            ));
            errors_extra.insert("fd_limit_exceeded".into(), short);
        }
    }

    let clk_tck = procfs::clock_ticks_per_second();
    let template = new_hist()?;
    let shards = shard_count(&config);
    let start = Instant::now();
    let wall_start = SystemTime::now();
    let cpu0 = procfs::self_cpu_seconds(clk_tck);
    let sampler = sampler::Sampler::new(&config.watch_pids, start, clk_tck);
    let (sampler_stop, sampler_stop_rx) = oneshot::channel();
    let sampler_task = tokio::spawn(sampler.run(sampler_stop_rx));

    let sched = Schedule {
        sessions: plan.sessions,
        period_ns: 1e9 / plan.rate,
        ramp_ns: config.ramp.as_nanos() as u64,
        duration_ns: config.duration.as_nanos() as u64,
        min_life_ns: config.lifetime.unwrap_or(config.duration).as_nanos() as u64,
        seed: config.seed,
    };
    let drain_ns = config.drain_timeout.as_nanos() as u64;
    let stop_drain = STOP_DRAIN.min(config.drain_timeout);
    let stop_flag = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Event>();

    let mut shard_tasks = Vec::with_capacity(shards);
    let mut conn_txs = Vec::with_capacity(shards);
    for id in 0..shards {
        let (tx, rx) = mpsc::unbounded_channel::<NewConn>();
        conn_txs.push(tx);
        let params = ShardParams {
            id,
            mode: config.mode,
            size: plan.size,
            sched,
            start,
            drain_ns,
            stop_drain_ns: stop_drain.as_nanos() as u64,
            tick: config.tick,
            stop: stop_flag.clone(),
            events: ev_tx.clone(),
            hist: template.clone(),
        };
        // A shard does the IO of hundreds of sockets per poll: tokio's per-task budget
        // (128 operations) would make it skip sessions until the next tick.
        shard_tasks.push(tokio::spawn(tokio::task::coop::unconstrained(shard::run(
            params, rx,
        ))));
    }

    let mut connect_tasks = Vec::with_capacity(plan.sessions);
    for i in 0..plan.sessions {
        let index = i as u32;
        let url = config.urls[i % config.urls.len()].clone();
        let conn_tx = conn_txs[i % shards].clone();
        let ev = ev_tx.clone();
        let mut stop_rx = stop_rx.clone();
        let size = plan.size;
        let connect_timeout = config.connect_timeout;
        let planned = start + Duration::from_nanos(sched.planned_start_ns(index));
        let slots = sched.planned_slots(index);
        let end = start + Duration::from_nanos(sched.end_ns(index));
        connect_tasks.push(tokio::spawn(async move {
            let stopped = async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            };
            tokio::pin!(stopped);
            tokio::select! {
                _ = tokio::time::sleep_until(planned.into()) => {}
                _ = &mut stopped => {
                    let _ = ev.send(Event::NotStarted);
                    return;
                }
            }
            let connect_start = tokio::time::Instant::now();
            let deadline = (connect_start + connect_timeout).min(end.into());
            let outcome = tokio::select! {
                r = tokio::time::timeout_at(deadline, connect_one(&url, size)) => r,
                _ = &mut stopped => {
                    let _ = ev.send(Event::NotStarted);
                    return;
                }
            };
            match outcome {
                Ok(Ok(ws)) => {
                    let us = connect_start.elapsed().as_micros() as u64;
                    let _ = ev.send(Event::Connected { us });
                    let _ = conn_tx.send(NewConn { index, ws });
                }
                Ok(Err(kind)) => {
                    let _ = ev.send(Event::ConnectFailed { kind, slots });
                }
                Err(_) => {
                    let _ = ev.send(Event::ConnectFailed {
                        kind: "connect_timeout".into(),
                        slots,
                    });
                }
            }
        }));
    }
    drop(conn_txs);
    drop(ev_tx);

    // The interval log, written as seconds complete.
    let mut log_file = match &config.hist_log {
        Some(path) => Some(BufWriter::new(File::create(path).map_err(|source| {
            Error::HistLog {
                path: path.clone(),
                source,
            }
        })?)),
        None => None,
    };
    let mut serializer = V2DeflateSerializer::new();
    let log = match log_file.as_mut() {
        Some(file) => {
            let mut builder = IntervalLogWriterBuilder::new();
            builder
                .add_comment(&format!(
                    "loadgen: {} sessions x {} msg/s x {} B, {:?} mode; latency in microseconds from intended send time",
                    plan.sessions, plan.rate, plan.size, config.mode
                ))
                .with_start_time(wall_start)
                .with_base_time(wall_start)
                .with_max_value_divisor(1000.0);
            Some(
                builder
                    .begin_log_with(file, &mut serializer)
                    .map_err(|source| Error::HistLog {
                        path: config.hist_log.clone().unwrap_or_default(),
                        source,
                    })?,
            )
        }
        None => None,
    };

    let mut col = Collector {
        total: template.clone(),
        connect: template.clone(),
        send_lag: template.clone(),
        template: template.clone(),
        pending: BTreeMap::new(),
        timeline: Vec::new(),
        totals: Totals::default(),
        errors: BTreeMap::new(),
        connected: 0,
        connect_failed: 0,
        not_started: 0,
        shard_next: vec![0; shards],
        shard_done: vec![false; shards],
        log,
        log_error: None,
        last_second: None,
    };

    let mut progress = progress::Progress::new(config.progress);
    let grace = Duration::from_millis(500);
    let mut hard_deadline = start + config.ramp + config.duration + config.drain_timeout + grace;
    let mut ticker = tokio::time::interval_at(
        (start + Duration::from_secs(1)).into(),
        Duration::from_secs(1),
    );
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut stopped_early = false;
    let mut stopped_at = None;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            ev = ev_rx.recv() => match ev {
                Some(ev) => col.on_event(ev),
                None => break,
            },
            _ = ticker.tick() => {
                if let Some(p) = progress.as_mut() {
                    let (sent, received, p99) = col.last_second.unwrap_or((0, 0, 0.0));
                    let errs: u64 = col.errors.values().sum();
                    p.update(format!(
                        "{:>5.0}s  sessions {}/{}  sent {sent}/s  recv {received}/s  p99 {p99:.1} ms  errors {errs}",
                        start.elapsed().as_secs_f64(),
                        col.connected,
                        plan.sessions,
                    ));
                }
            }
            _ = &mut stop, if !stopped_early => {
                stopped_early = true;
                stopped_at = Some(start.elapsed());
                stop_flag.store(true, std::sync::atomic::Ordering::Relaxed);
                let _ = stop_tx.send(true);
                hard_deadline = hard_deadline.min(Instant::now() + stop_drain + grace);
            }
            _ = tokio::time::sleep_until(hard_deadline.into()) => break,
        }
    }
    // Whatever is still running past the deadline is abandoned.
    for t in shard_tasks.iter().chain(connect_tasks.iter()) {
        t.abort();
    }
    while let Ok(ev) = ev_rx.try_recv() {
        col.on_event(ev);
    }
    col.complete_seconds(true);
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = procfs::self_cpu_seconds(clk_tck) - cpu0;
    let _ = sampler_stop.send(());
    let (watched, machine) = sampler_task.await.unwrap_or_default();
    if let Some(p) = progress {
        p.finish();
    }

    let Collector {
        total,
        connect,
        send_lag,
        timeline,
        totals,
        mut errors,
        connected,
        connect_failed,
        not_started,
        log,
        log_error,
        ..
    } = col;
    drop(log);
    if let Some(file) = log_file.as_mut()
        && let Err(source) = file.flush()
    {
        return Err(Error::HistLog {
            path: config.hist_log.clone().unwrap_or_default(),
            source,
        });
    }
    if let Some(e) = log_error {
        warnings.push(format!("histogram log: {e}"));
    }
    for (k, v) in errors_extra {
        *errors.entry(k).or_default() += v;
    }
    for w in watched.iter().filter(|w| !w.found) {
        warnings.push(format!("watched pid {} was not found", w.pid));
        *errors.entry("watch_pid_not_found".into()).or_default() += 1;
    }
    let unaccounted = plan
        .sessions
        .saturating_sub(connected + connect_failed + not_started);
    let duration_s = config.duration.as_secs_f64();
    // Rates are per second of streaming: the duration, or less when stopped early.
    // With churn the streaming spans the ramp plus the longest lifetime.
    let span_s = if config.lifetime.is_some() {
        config.ramp.as_secs_f64() + duration_s
    } else {
        duration_s
    };
    let window_s = stopped_at.map_or(span_s, |at: Duration| {
        at.as_secs_f64().min(span_s).max(1e-3)
    });
    let arrival_window_s = if config.ramp.is_zero() {
        duration_s
    } else {
        config.ramp.as_secs_f64()
    };
    let offered_per_s = match config.lifetime {
        None => plan.sessions as f64 * plan.rate,
        Some(_) => totals.scheduled as f64 / window_s,
    };
    let cpu_us_per_msg = if totals.sent > 0 {
        cpu * 1e6 / totals.sent as f64
    } else {
        0.0
    };
    Ok(LoadReport {
        schema_version: SCHEMA_VERSION,
        tool: Tool::this(),
        started_at: host::utc_rfc3339(wall_start),
        host: host::host(),
        scenario: Scenario {
            sessions: plan.sessions,
            rate: plan.rate,
            size: plan.size,
            duration_s,
            mode: config.mode,
            urls: config.urls.clone(),
            ramp_s: config.ramp.as_secs_f64(),
            lifetime_min_s: config.lifetime.map(|l| l.as_secs_f64()),
            seed: config.lifetime.map(|_| config.seed),
            connect_timeout_s: config.connect_timeout.as_secs_f64(),
            drain_timeout_s: config.drain_timeout.as_secs_f64(),
        },
        sessions: SessionCounts {
            target: plan.sessions,
            connected,
            failed: connect_failed,
            completed: totals.completed,
            aborted: totals.aborted,
            not_started: not_started + unaccounted,
        },
        messages: MessageCounts {
            sent: totals.sent,
            received: totals.received,
            lost: totals.lost,
            lost_completed: totals.lost_completed,
            duplicated: totals.duplicated,
            out_of_order: totals.out_of_order,
            cross_session: totals.cross_session,
            scheduled: totals.scheduled,
            unsent: totals.unsent,
            finals: totals.finals,
        },
        throughput: Throughput {
            offered_per_s: sampler::round3(offered_per_s),
            achieved_per_s: sampler::round3(totals.received as f64 / window_s),
            sent_per_s: sampler::round3(totals.sent as f64 / window_s),
            window_s: sampler::round3(window_s),
            sessions_per_s: sampler::round3(connected as f64 / arrival_window_s),
        },
        latency_ms: latency_of(&total),
        send_lag_ms: latency_of(&send_lag),
        connect_ms: latency_of(&connect),
        errors,
        watched,
        machine,
        loadgen: LoadgenSelf {
            cpu_seconds: sampler::round3(cpu),
            cpu_us_per_msg: sampler::round3(cpu_us_per_msg),
            shards,
            fd_soft_limit: fd.map_or(0, |f| f.soft),
            fd_hard_limit: fd.map_or(0, |f| f.hard),
        },
        timeline,
        warnings,
        elapsed_s: sampler::round3(elapsed),
        stopped_early,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_open_counts_only_sessions_that_overlap() {
        let mut c = LoadConfig::new(vec!["ws://x".into()]);
        c.duration = Duration::from_secs(50);
        c.drain_timeout = Duration::from_secs(5);
        // No ramp: every session at once.
        assert_eq!(peak_open(57_000, &c), 57_000);
        // 33 a second for 1750 s, each living up to 55 s: ≈1,800 at once.
        c.ramp = Duration::from_secs(1750);
        assert_eq!(peak_open(57_750, &c), 1816);
        // A ramp shorter than a life: all of them again.
        c.ramp = Duration::from_secs(10);
        assert_eq!(peak_open(500, &c), 500);
    }
}
