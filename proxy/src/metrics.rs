//! Prometheus metrics (prometheus-client, Prometheus text format).
//!
//! Per-message counts are kept in each session and added here in batches, so
//! the relay takes no shared cache line per message. Pool gauges and totals are
//! read from each pool's O(1) snapshot at scrape time.
//!
//! Note: prometheus-client appends `_total` to counter names itself.

use std::fmt;
use std::sync::{Arc, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::backends::Backends;
use crate::config::sync::SyncStatus;
use crate::session_threads::Placer;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    pub limit: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

/// Every metric the proxy keeps, registered in one registry.
#[derive(Debug)]
pub struct Metrics {
    pub sessions: Family<OutcomeLabel, Counter>,
    pub sessions_active: Gauge,
    pub messages: Family<DirectionLabel, Counter>,
    pub bytes: Family<DirectionLabel, Counter>,
    pub acquire: Family<OutcomeLabel, Counter>,
    /// Sessions in sticky groups, by what their key's backend did.
    pub sticky_routes: Family<OutcomeLabel, Counter>,
    pub fencing: Family<OutcomeLabel, Counter>,
    pub refused: Family<OutcomeLabel, Counter>,
    /// Messages the relay dropped instead of forwarding, by reason.
    pub relay_dropped: Family<ReasonLabel, Counter>,
    /// How the proxy's side of client close handshakes ended.
    pub client_closes: Family<OutcomeLabel, Counter>,
    /// Sessions closed for going past a rate limit, by limit.
    pub rate_limited: Family<LimitLabel, Counter>,
    /// JWT key files re-read after a change, by outcome (ok, error).
    pub jwt_key_reloads: Family<OutcomeLabel, Counter>,
    /// JWT verification keys in use.
    pub jwt_keys: Gauge,
    /// TLS handshakes on the client listener, by outcome.
    pub tls_handshakes: Family<OutcomeLabel, Counter>,
    /// Reloads of the client listener's certificate, by outcome.
    pub tls_reloads: Family<OutcomeLabel, Counter>,
    pub acquire_wait_seconds: Histogram,
    pub session_seconds: Histogram,
    /// Attempts to move a session to another backend, by outcome.
    pub failovers: Family<OutcomeLabel, Counter>,
    /// From a backend's failure to the takeover's lease (docs/failover.md).
    pub failover_pause_seconds: Histogram,
    registry: Registry,
    /// The session threads, for `runtime_tasks`.
    session_threads: Arc<OnceLock<Arc<Placer>>>,
}

pub const TO_BACKEND: DirectionLabel = DirectionLabel {
    direction: "client_to_backend",
};
pub const TO_CLIENT: DirectionLabel = DirectionLabel {
    direction: "backend_to_client",
};

impl Metrics {
    /// Metrics of a proxy with fixed backends.
    pub fn new(backends: Backends) -> Arc<Self> {
        Self::build(backends, None)
    }

    /// Metrics of a proxy whose backends come from a database: adds the
    /// configuration sync's freshness, failures and rejected rows.
    pub fn with_config_status(backends: Backends, config: Arc<SyncStatus>) -> Arc<Self> {
        Self::build(backends, Some(config))
    }

    fn build(backends: Backends, config: Option<Arc<SyncStatus>>) -> Arc<Self> {
        let mut registry = Registry::with_prefix("sttproxy");
        let m = Metrics {
            session_threads: Arc::new(OnceLock::new()),
            sessions: Family::default(),
            sessions_active: Gauge::default(),
            messages: Family::default(),
            bytes: Family::default(),
            acquire: Family::default(),
            sticky_routes: Family::default(),
            fencing: Family::default(),
            refused: Family::default(),
            relay_dropped: Family::default(),
            client_closes: Family::default(),
            rate_limited: Family::default(),
            jwt_key_reloads: Family::default(),
            jwt_keys: Gauge::default(),
            tls_handshakes: Family::default(),
            tls_reloads: Family::default(),
            acquire_wait_seconds: Histogram::new(exponential_buckets(0.0001, 4.0, 10)),
            session_seconds: Histogram::new(exponential_buckets(0.1, 4.0, 10)),
            failovers: Family::default(),
            failover_pause_seconds: Histogram::new(exponential_buckets(0.0005, 3.0, 10)),
            registry: Registry::default(),
        };
        registry.register(
            "sessions",
            "Client sessions ended, by outcome",
            m.sessions.clone(),
        );
        registry.register(
            "sessions_active",
            "Client sessions open now",
            m.sessions_active.clone(),
        );
        registry.register(
            "messages",
            "Messages relayed, by direction",
            m.messages.clone(),
        );
        registry.register(
            "bytes",
            "Payload bytes relayed, by direction",
            m.bytes.clone(),
        );
        registry.register(
            "acquire",
            "Backend connection acquisitions, by outcome (idle, dialed, waited, timeout, no_backend)",
            m.acquire.clone(),
        );
        registry.register(
            "sticky_routes",
            "Sessions routed in sticky groups, by outcome (hit: served by the backend its key \
             chooses; unhealthy: that backend was unhealthy or draining, busy: it had no \
             connection within sticky.wait — both fell back to power-of-two-choices; \
             no_key: the session carried no key)",
            m.sticky_routes.clone(),
        );
        registry.register(
            "fencing",
            "Session fences on backend connections, by outcome (clean, dirty: completed but bytes of the session were left over, so the connection was closed; timeout, error, not_fenced)",
            m.fencing.clone(),
        );
        registry.register(
            "refused",
            "Client requests refused before the upgrade, by outcome (JWT refusals as jwt_*: \
             malformed, bad_algorithm, unknown_key, bad_signature, expired, not_yet_valid, \
             wrong_audience, wrong_issuer, missing_claim)",
            m.refused.clone(),
        );
        registry.register(
            "relay_dropped_messages",
            "Messages dropped by the relay, by reason (client_reserved: client text in the \
             reserved session.* namespace; foreign_session: backend message naming another \
             session; stale_fence: session.ended without this lease's fence token; \
             token_echo: backend message carrying the fence token; replayed: after a \
             failover, a result the client already had, or the new backend's session.started)",
            m.relay_dropped.clone(),
        );
        registry.register(
            "client_closes",
            "Close handshakes with clients, by outcome (clean, no_reply: our Close was not \
             answered in time, not_sent: the socket was shut without a Close frame, \
             vanished: the client's stream ended without a close handshake, ping_timeout: \
             the client answered no ping within pong_timeout)",
            m.client_closes.clone(),
        );
        registry.register(
            "rate_limited",
            "Client sessions closed with 1008 for sending past a rate limit, by limit \
             (messages, bytes)",
            m.rate_limited.clone(),
        );
        registry.register(
            "jwt_key_reloads",
            "Changes of the JWT key files, by outcome (ok: the new keys are in use; error: \
             they did not load and the previous keys stay)",
            m.jwt_key_reloads.clone(),
        );
        registry.register(
            "jwt_keys",
            "JWT verification keys in use",
            m.jwt_keys.clone(),
        );
        registry.register(
            "tls_handshakes",
            "TLS handshakes on the client listener, by outcome (ok; failed: not TLS or \
             rejected by rustls, answered with an alert; plain_http: an HTTP request on the \
             TLS port, answered 400; closed: the client left before sending anything; \
             timeout: not done within tls_handshake_timeout; over_capacity: max_concurrent_tls_handshakes already in progress, closed at once)",
            m.tls_handshakes.clone(),
        );
        registry.register(
            "tls_reloads",
            "Reloads of the client listener's certificate and key, by outcome (ok; error: \
             unreadable, unparsable or not matching, the previous certificate kept)",
            m.tls_reloads.clone(),
        );
        registry.register(
            "acquire_wait_seconds",
            "Time a new session waited for a backend connection",
            m.acquire_wait_seconds.clone(),
        );
        registry.register(
            "session_duration_seconds",
            "Client session duration",
            m.session_seconds.clone(),
        );
        registry.register(
            "failovers",
            "Attempts to move a session whose backend failed to another backend, by outcome \
             (resumed; limit: failover_max reached; window: audio the replay needed was \
             evicted; mid_frame: the backend failed inside a frame toward the client; \
             no_backend; timeout: not within failover_timeout)",
            m.failovers.clone(),
        );
        registry.register(
            "failover_pause_seconds",
            "Time from a backend's failure mid-session to the lease on the backend taking \
             the session over",
            m.failover_pause_seconds.clone(),
        );
        m.start_at_zero();
        registry.register_collector(Box::new(PoolCollector { backends }));
        registry.register_collector(Box::new(RuntimeCollector {
            session_threads: m.session_threads.clone(),
        }));
        if let Some(status) = config {
            registry.register_collector(Box::new(ConfigCollector { status }));
        }
        Arc::new(Metrics { registry, ..m })
    }

    /// Every label value of the families whose values are known in advance,
    /// created at zero: a series that appears only on its first count shows
    /// nothing to `rate()` or to an alert on its increase until then (and
    /// its first increase is lost to them). `sessions` and `refused` take
    /// their many outcomes from all over the proxy and are left to appear;
    /// `tls_handshakes` too.
    fn start_at_zero(&self) {
        use crate::relay::{self, rate::Exceeded};
        use crate::route::{ACQUIRE_OUTCOMES, STICKY_OUTCOMES};
        let outcomes = |family: &Family<OutcomeLabel, Counter>, all: &[&'static str]| {
            for &outcome in all {
                drop(family.get_or_create(&OutcomeLabel { outcome }));
            }
        };
        for direction in [TO_BACKEND, TO_CLIENT] {
            drop(self.messages.get_or_create(&direction));
            drop(self.bytes.get_or_create(&direction));
        }
        outcomes(&self.acquire, &ACQUIRE_OUTCOMES);
        outcomes(&self.sticky_routes, &STICKY_OUTCOMES.map(|o| o.as_str()));
        outcomes(&self.fencing, &relay::FENCE_OUTCOMES);
        outcomes(&self.client_closes, &relay::CLIENT_CLOSE_OUTCOMES);
        outcomes(&self.failovers, &relay::failover_outcomes());
        outcomes(&self.jwt_key_reloads, &["ok", "error"]);
        outcomes(&self.tls_reloads, &["ok", "error"]);
        for reason in relay::dropped_reasons() {
            drop(self.relay_dropped.get_or_create(&ReasonLabel { reason }));
        }
        for limit in Exceeded::ALL {
            drop(self.rate_limited.get_or_create(&LimitLabel {
                limit: limit.label(),
            }));
        }
    }

    /// Count the tasks of these session threads too in `runtime_tasks`
    /// (once; later calls are ignored).
    pub fn count_tasks_of(&self, placer: Arc<Placer>) {
        let _ = self.session_threads.set(placer);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// The live task count of the proxy's runtimes (the one serving the scrape
/// and the session threads'), read at scrape time: a task leak (a session or
/// a dial that never ends) shows as a rising line where the sessions gauge
/// stays flat.
#[derive(Debug)]
struct RuntimeCollector {
    session_threads: Arc<OnceLock<Arc<Placer>>>,
}

impl Collector for RuntimeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        // Scrapes are served on the proxy's runtime; elsewhere there is
        // nothing to report.
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return Ok(());
        };
        let sessions: usize = self.session_threads.get().map_or(0, |p| {
            p.handles()
                .iter()
                .map(|h| h.metrics().num_alive_tasks())
                .sum()
        });
        let tasks = handle.metrics().num_alive_tasks() + sessions;
        let metric = encoder.encode_descriptor(
            "runtime_tasks",
            "Tasks alive on the proxy's tokio runtimes",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::try_from(tasks).unwrap_or(i64::MAX)).encode(metric)
    }
}

/// Reads every pool's snapshot at scrape time.
#[derive(Debug)]
struct PoolCollector {
    backends: Backends,
}

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let views: Vec<_> = self.backends.all().iter().map(|b| b.view()).collect();
        type Pick = fn(&crate::backend::pool::PoolView) -> usize;
        let gauges: [(&str, &str, Pick); 7] = [
            ("pool_target", "Connections the pool keeps", |v| v.target),
            ("pool_max", "Hard maximum of live connections", |v| v.max),
            (
                "pool_live",
                "Live connections (idle + leased + dialing)",
                |v| v.live,
            ),
            ("pool_idle", "Idle connections", |v| v.idle),
            ("pool_leased", "Connections leased to sessions", |v| {
                v.leased
            }),
            ("pool_dialing", "Dials in flight", |v| v.dialing),
            (
                "backend_healthy",
                "1 if the backend takes new sessions",
                |v| usize::from(v.healthy),
            ),
        ];
        for (name, help, pick) in gauges {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for v in &views {
                let labels = [("backend", v.id.as_str())];
                let family = metric.encode_family(&labels)?;
                ConstGauge::new(i64::try_from(pick(v)).unwrap_or(i64::MAX)).encode(family)?;
            }
        }
        let counters: [(&str, &str, Pick); 4] = [
            ("pool_acquired", "Connections leased out", |v| {
                v.acquired_total
            }),
            ("pool_released", "Leases returned to the pool", |v| {
                v.released_total
            }),
            ("pool_discarded", "Connections closed", |v| {
                v.discarded_total
            }),
            ("pool_dial_failures", "Dials that failed", |v| {
                v.dial_failures_total
            }),
        ];
        for (name, help, pick) in counters {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for v in &views {
                let labels = [("backend", v.id.as_str())];
                let family = metric.encode_family(&labels)?;
                ConstCounter::new(pick(v) as u64).encode(family)?;
            }
        }
        let retiring = self.backends.retiring().len();
        ConstGauge::new(i64::try_from(retiring).unwrap_or(i64::MAX)).encode(
            encoder.encode_descriptor(
                "pools_retiring",
                "Pools of removed, disabled or replaced backends still draining",
                None,
                MetricType::Gauge,
            )?,
        )?;
        let mut metric = encoder.encode_descriptor(
            "health_check_failures",
            "Idle connections that failed a ping",
            None,
            MetricType::Counter,
        )?;
        for b in self.backends.all().iter() {
            let labels = [("backend", b.id.as_str())];
            let family = metric.encode_family(&labels)?;
            ConstCounter::new(
                b.health
                    .ping_failures
                    .load(std::sync::atomic::Ordering::Relaxed),
            )
            .encode(family)?;
        }
        Ok(())
    }
}

/// Reads the configuration sync's status at scrape time.
#[derive(Debug)]
struct ConfigCollector {
    status: Arc<SyncStatus>,
}

impl Collector for ConfigCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let s = &self.status;
        let to_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        ConstGauge::new(s.age().as_secs_f64()).encode(encoder.encode_descriptor(
            "config_last_sync_age_seconds",
            "Seconds since the backend table was last read successfully (since start if never)",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(i64::from(s.is_stale())).encode(encoder.encode_descriptor(
            "config_stale",
            "1 while the backend table cannot be read and the last good configuration is served",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(s.version()).encode(encoder.encode_descriptor(
            "config_version",
            "Change counter of the backend table as last applied (-1 before the first sync)",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(to_i64(s.rejected_rows())).encode(encoder.encode_descriptor(
            "config_rejected_rows",
            "Backend rows rejected by the last read of the table (invalid values)",
            None,
            MetricType::Gauge,
        )?)?;
        ConstCounter::new(s.rejections_total()).encode(encoder.encode_descriptor(
            "config_row_rejections",
            "Backend rows rejected, summed over every read of the table",
            None,
            MetricType::Counter,
        )?)?;
        ConstCounter::new(s.failures_total()).encode(encoder.encode_descriptor(
            "config_sync_failures",
            "Failed attempts to read the backend table",
            None,
            MetricType::Counter,
        )?)?;
        ConstCounter::new(s.applies_total()).encode(encoder.encode_descriptor(
            "config_applies",
            "Changes of the backend table applied to the pools",
            None,
            MetricType::Counter,
        )?)?;
        if let Some(up) = s.listener_connected() {
            ConstGauge::new(i64::from(up)).encode(encoder.encode_descriptor(
                "db_listener_connected",
                "PostgreSQL: 1 while the LISTEN connection that pushes backend table changes is up \
                 and answered within db_listener_check_interval (0: changes arrive by polling only)",
                None,
                MetricType::Gauge,
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A proxy that has counted nothing yet shows every known series at 0.
    #[test]
    fn known_series_start_at_zero() {
        let text = Metrics::new(Backends::default()).render().unwrap();
        for series in [
            r#"sttproxy_messages_total{direction="client_to_backend"} 0"#,
            r#"sttproxy_bytes_total{direction="backend_to_client"} 0"#,
            r#"sttproxy_acquire_total{outcome="no_backend"} 0"#,
            r#"sttproxy_sticky_routes_total{outcome="no_key"} 0"#,
            r#"sttproxy_fencing_total{outcome="dirty"} 0"#,
            r#"sttproxy_client_closes_total{outcome="ping_timeout"} 0"#,
            r#"sttproxy_failovers_total{outcome="resumed"} 0"#,
            r#"sttproxy_jwt_key_reloads_total{outcome="error"} 0"#,
            r#"sttproxy_tls_reloads_total{outcome="ok"} 0"#,
            r#"sttproxy_relay_dropped_messages_total{reason="token_echo"} 0"#,
            r#"sttproxy_rate_limited_total{limit="bytes"} 0"#,
        ] {
            assert!(
                text.lines().any(|l| l == series),
                "{series} not in:\n{text}"
            );
        }
    }
}
