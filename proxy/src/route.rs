//! Which backend serves a new session, and how its connection is obtained
//! (docs/pool.md): power-of-two-choices over the healthy pools of the
//! session's group, weighted by idle connections; any idle connection
//! elsewhere in the group; a dial on demand where a pool is below its max;
//! else a bounded wait for a release. Never an unbounded wait.
//!
//! In a sticky group a session with a key first tries the one backend its key
//! chooses by weighted rendezvous hashing ([`rendezvous`]), for at most the
//! sticky wait; when that backend is unhealthy, draining or busy past the
//! wait, the session falls back to power-of-two-choices over the others.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::select_all;
use rand::Rng;
use sttproxy_pool::Lease;
use tokio::time::Instant;

use crate::backend::{BackendConn, BackendPool};
use crate::backends::Backends;
use crate::metrics::{Metrics, OutcomeLabel};

/// The group of backends a session is routed in, when it names none.
pub const DEFAULT_GROUP: &str = "default";

/// Where a new session is to be routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Only backends of this group serve it.
    pub group: String,
    /// Set when the group is sticky.
    pub sticky: Option<StickyTarget>,
}

impl Default for Target {
    fn default() -> Self {
        Self {
            group: DEFAULT_GROUP.to_string(),
            sticky: None,
        }
    }
}

/// How a request is mapped to its [`Target`] (settings `group_parameter`
/// and `[sticky]`, docs/configuration.md).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    /// The query parameter naming a session's group; `None`, or a request
    /// without it: [`DEFAULT_GROUP`].
    pub group_parameter: Option<String>,
    pub sticky: Option<StickyRouting>,
}

/// Which groups are sticky, and where a session's key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StickyRouting {
    pub groups: Vec<String>,
    pub key: KeySource,
    pub wait: Duration,
}

/// Where a session's sticky key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A claim of the verified JWT (read by the authenticator).
    Claim(String),
    /// A request header (trusted as the client sends it: for a header set by
    /// an authenticating gateway in front of the proxy).
    Header(http::HeaderName),
}

impl Routing {
    /// The target of a request with query `params`, `headers` and the
    /// verified token's key claim `claim`.
    pub fn target(
        &self,
        params: &serde_json::Map<String, serde_json::Value>,
        headers: &http::HeaderMap,
        claim: Option<&str>,
    ) -> Target {
        let group = self
            .group_parameter
            .as_deref()
            .and_then(|p| params.get(p))
            .and_then(serde_json::Value::as_str)
            .unwrap_or(DEFAULT_GROUP)
            .to_string();
        let sticky = self
            .sticky
            .as_ref()
            .filter(|s| s.groups.contains(&group))
            .map(|s| StickyTarget {
                key: match &s.key {
                    KeySource::Claim(_) => claim.map(str::as_bytes),
                    KeySource::Header(name) => headers.get(name).map(http::HeaderValue::as_bytes),
                }
                .filter(|k| !k.is_empty())
                .map(StickyKey::of),
                wait: s.wait,
            });
        Target { group, sticky }
    }
}

/// A session in a sticky group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StickyTarget {
    /// The session's key; `None` (the request carried none): routed as in any group.
    pub key: Option<StickyKey>,
    /// How long the session waits for a connection of its chosen backend
    /// before it falls back (bounded by the acquire timeout).
    pub wait: Duration,
}

/// A client key, hashed as soon as it is read: the raw value (a user id) is
/// never kept, logged or compared. The hash is fixed (FNV-1a, then a 64-bit
/// finalizer), not the process-seeded one of `std`, so that every replica and
/// every restart maps a key to the same backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StickyKey(u64);

impl StickyKey {
    pub fn of(key: &[u8]) -> Self {
        Self(fmix64(fnv1a(key)))
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// MurmurHash3's 64-bit finalizer: every input bit flips about half the output bits.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The weighted rendezvous score of `key` on the backend `id` of `weight`:
/// `weight / -ln(u)` with `u` uniform in (0, 1) from the pair's hash. The
/// highest score wins, and backend `i` wins a share `w_i / Σw` of the keys
/// (the scores are exponential variates of rates `w_i / ...`, whose minimum
/// — here the maximum of the reciprocals — falls on `i` with that chance).
fn score_of(key: StickyKey, id: &str, weight: u32) -> f64 {
    let h = fmix64(key.0 ^ fmix64(fnv1a(id.as_bytes())));
    // 53 random bits, centred in their interval: never 0 nor 1.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    f64::from(weight.max(1)) / -u.ln()
}

/// The item `key` chooses among `items` by weighted rendezvous (highest
/// random weight) hashing. Depends only on the set of (id, weight) pairs, not
/// on their order; adding a backend moves to it only the keys it wins,
/// removing one moves only the keys it had, and changing a weight moves keys
/// only to or from that backend. Ties (a 2^-53 chance) go to the smaller id.
pub fn rendezvous<T>(
    items: &[T],
    key: StickyKey,
    id: impl Fn(&T) -> &str,
    weight: impl Fn(&T) -> u32,
) -> Option<&T> {
    items
        .iter()
        .map(|t| (score_of(key, id(t), weight(t)), t))
        .max_by(|(sa, a), (sb, b)| sa.total_cmp(sb).then_with(|| id(b).cmp(id(a))))
        .map(|(_, t)| t)
}

/// What a sticky lookup did, for `sttproxy_sticky_routes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StickyOutcome {
    /// The key's backend served the session.
    Hit,
    /// The key's backend was unhealthy or draining: fell back.
    Unhealthy,
    /// The key's backend had no connection within the sticky wait: fell back.
    Busy,
    /// The session carried no key: routed as in any group.
    NoKey,
}

impl StickyOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            StickyOutcome::Hit => "hit",
            StickyOutcome::Unhealthy => "unhealthy",
            StickyOutcome::Busy => "busy",
            StickyOutcome::NoKey => "no_key",
        }
    }
}

/// How a session got its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    Idle,
    Dialed,
    Waited,
}

impl Acquired {
    pub fn as_str(self) -> &'static str {
        match self {
            Acquired::Idle => "idle",
            Acquired::Dialed => "dialed",
            Acquired::Waited => "waited",
        }
    }
}

/// Why a session got no connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoConnection {
    #[error("no healthy backend")]
    NoBackend,
    #[error("no backend connection became free within {0:?}")]
    Timeout(Duration),
}

impl NoConnection {
    /// Its `sttproxy_acquire_total{outcome}` label.
    pub fn label(self) -> &'static str {
        match self {
            NoConnection::NoBackend => "no_backend",
            NoConnection::Timeout(_) => "timeout",
        }
    }
}

/// Every `sttproxy_acquire_total{outcome}` label: how a session got its
/// connection ([`Acquired`]) or why it got none ([`NoConnection`]).
pub const ACQUIRE_OUTCOMES: [&str; 5] = ["idle", "dialed", "waited", "no_backend", "timeout"];

/// Every `sttproxy_sticky_routes_total{outcome}` label.
pub const STICKY_OUTCOMES: [StickyOutcome; 4] = [
    StickyOutcome::Hit,
    StickyOutcome::Unhealthy,
    StickyOutcome::Busy,
    StickyOutcome::NoKey,
];

/// Order the healthy, open pools for a new session: the first is the
/// power-of-two-choices pick, the rest are fallbacks by idle connections.
pub fn candidates(all: &[Arc<BackendPool>], rng: &mut impl Rng) -> Vec<Arc<BackendPool>> {
    let mut healthy: Vec<Arc<BackendPool>> = all.iter().filter(|b| usable(b)).cloned().collect();
    if healthy.len() <= 1 {
        return healthy;
    }
    let a = pick_weighted(&healthy, rng);
    let mut b = pick_weighted(&healthy, rng);
    if a == b {
        b = (a + 1 + rng.random_range(0..healthy.len() - 1)) % healthy.len();
    }
    let first = if score(&healthy[a]) >= score(&healthy[b]) {
        a
    } else {
        b
    };
    let chosen = healthy.swap_remove(first);
    healthy.sort_by(|x, y| score(y).total_cmp(&score(x)));
    healthy.insert(0, chosen);
    healthy
}

/// Idle connections per unit of weight share, favouring the heavier backend on ties.
fn score(b: &BackendPool) -> f64 {
    let s = b.snapshot();
    (s.idle as f64 + 1.0) * f64::from(b.weight()) / (s.leased as f64 + 1.0)
}

fn pick_weighted(pools: &[Arc<BackendPool>], rng: &mut impl Rng) -> usize {
    let total: u64 = pools.iter().map(|b| u64::from(b.weight())).sum();
    let mut x = rng.random_range(0..total.max(1));
    for (i, b) in pools.iter().enumerate() {
        let w = u64::from(b.weight());
        if x < w {
            return i;
        }
        x -= w;
    }
    pools.len() - 1
}

type Leased = (Arc<BackendPool>, Lease<BackendConn>, Acquired);

fn usable(b: &BackendPool) -> bool {
    b.is_healthy() && !b.pool.is_draining()
}

/// Get a backend connection for a new session routed to `target` within
/// `acquire_timeout`.
pub async fn lease(
    backends: &Backends,
    target: &Target,
    acquire_timeout: Duration,
    rng: &mut impl Rng,
    metrics: &Metrics,
) -> Result<Leased, NoConnection> {
    let deadline = Instant::now() + acquire_timeout;
    let mut group: Vec<Arc<BackendPool>> = backends
        .all()
        .iter()
        .filter(|b| b.group == target.group)
        .cloned()
        .collect();
    if let Some(sticky) = target.sticky {
        let outcome = match sticky.key {
            None => Some(StickyOutcome::NoKey),
            Some(key) => match rendezvous(&group, key, |b| &b.id, |b| b.weight()).cloned() {
                // No backend in the group: not a sticky matter (`acquire{no_backend}`).
                None => None,
                Some(chosen) => {
                    let outcome = if usable(&chosen) {
                        let until = deadline.min(Instant::now() + sticky.wait);
                        match lease_on(&chosen, until).await {
                            Some((lease, how)) => {
                                count(metrics, StickyOutcome::Hit);
                                return Ok((chosen, lease, how));
                            }
                            None => StickyOutcome::Busy,
                        }
                    } else {
                        StickyOutcome::Unhealthy
                    };
                    group.retain(|b| !Arc::ptr_eq(b, &chosen));
                    Some(outcome)
                }
            },
        };
        if let Some(outcome) = outcome {
            count(metrics, outcome);
        }
    }
    lease_p2c(
        &group,
        deadline,
        acquire_timeout,
        rng,
        FailedDial::StillWait,
    )
    .await
}

fn count(metrics: &Metrics, outcome: StickyOutcome) {
    metrics
        .sticky_routes
        .get_or_create(&OutcomeLabel {
            outcome: outcome.as_str(),
        })
        .inc();
}

/// A connection of `b` by `until`: idle, dialed on demand (where `b` is
/// below its max), or released (where it is at its max).
async fn lease_on(b: &Arc<BackendPool>, until: Instant) -> Option<(Lease<BackendConn>, Acquired)> {
    if let Some(lease) = b.pool.acquire() {
        return Some((lease, Acquired::Idle));
    }
    match dial(b, until).await {
        Dial::Leased(lease) => return Some((lease, Acquired::Dialed)),
        // A failed dial says the backend is failing: fall back now rather
        // than wait for a release there.
        Dial::TimedOut | Dial::Failed => return None,
        Dial::Full => {}
    }
    let remaining = until.saturating_duration_since(Instant::now());
    match tokio::time::timeout(remaining, b.pool.acquire_wait()).await {
        Ok(Ok(lease)) => Some((lease, Acquired::Waited)),
        Ok(Err(_)) | Err(_) => None,
    }
}

enum Dial {
    Leased(Lease<BackendConn>),
    /// The pool is at its max: nothing to dial.
    Full,
    Failed,
    TimedOut,
}

/// Dial on demand where `b` is below its max, by `until`.
async fn dial(b: &Arc<BackendPool>, until: Instant) -> Dial {
    let Some(reservation) = b.pool.try_reserve() else {
        return Dial::Full;
    };
    let remaining = until.saturating_duration_since(Instant::now());
    match tokio::time::timeout(remaining, b.dialer.connect()).await {
        Ok(Ok(conn)) => {
            b.health.record(true);
            Dial::Leased(reservation.into_lease(conn))
        }
        Ok(Err(e)) => {
            tracing::info!(backend = %b.id, error = %e, "dial on demand failed");
            b.pool.record_dial_failure();
            b.health.record(false);
            reservation.unreserve();
            Dial::Failed
        }
        Err(_) => {
            reservation.unreserve();
            Dial::TimedOut
        }
    }
}

/// Get a connection for a session taken over after its backend failed
/// (docs/failover.md): only resumable backends of the session's `group`, none
/// of those in `exclude` (the ones the session already had), by
/// power-of-two-choices (a takeover is not sticky: the key's backend is the
/// one that failed, or was not chosen for it).
pub async fn lease_takeover(
    backends: &Backends,
    group: &str,
    exclude: &[String],
    acquire_timeout: Duration,
    rng: &mut impl Rng,
) -> Result<Leased, NoConnection> {
    let deadline = Instant::now() + acquire_timeout;
    let pools: Vec<Arc<BackendPool>> = backends
        .all()
        .iter()
        .filter(|b| {
            b.group == group
                && b.reuse == crate::backend::Reuse::Resumable
                && !exclude.contains(&b.id)
        })
        .cloned()
        .collect();
    // A backend that just refused a dial is taken as down: with none left to
    // wait for, the client gets 1014 at once rather than at the deadline.
    lease_p2c(&pools, deadline, acquire_timeout, rng, FailedDial::GiveUp).await
}

/// Power-of-two-choices over the healthy pools of `group`.
/// Whether a pool whose dial on demand just failed is still waited on for a
/// release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailedDial {
    /// Yes: a new session may wait for a session on it to end (its health
    /// check decides whether it is down).
    StillWait,
    /// No: a takeover after a failure needs a live backend now.
    GiveUp,
}

async fn lease_p2c(
    group: &[Arc<BackendPool>],
    deadline: Instant,
    acquire_timeout: Duration,
    rng: &mut impl Rng,
    failed_dial: FailedDial,
) -> Result<Leased, NoConnection> {
    let pools = candidates(group, rng);
    if pools.is_empty() {
        return Err(NoConnection::NoBackend);
    }
    for b in &pools {
        if let Some(lease) = b.pool.acquire() {
            return Ok((b.clone(), lease, Acquired::Idle));
        }
    }
    // Every pool is empty: dial on demand where a pool is below its max.
    let mut failed = Vec::new();
    for (i, b) in pools.iter().enumerate() {
        match dial(b, deadline).await {
            Dial::Leased(lease) => return Ok((b.clone(), lease, Acquired::Dialed)),
            Dial::TimedOut => return Err(NoConnection::Timeout(acquire_timeout)),
            Dial::Failed => failed.push(i),
            Dial::Full => {}
        }
    }
    let pools: Vec<Arc<BackendPool>> = match failed_dial {
        FailedDial::StillWait => pools,
        FailedDial::GiveUp => pools
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !failed.contains(i))
            .map(|(_, b)| b)
            .collect(),
    };
    if pools.is_empty() {
        return Err(NoConnection::NoBackend);
    }
    // Wait for a release in any candidate pool.
    let waits = pools.iter().map(|b| b.pool.acquire_wait()).collect();
    wait_for_release(pools, waits, deadline, acquire_timeout).await
}

/// Wait until one of `pools` releases a connection; pools that start draining
/// drop out of the wait.
async fn wait_for_release(
    mut pools: Vec<Arc<BackendPool>>,
    mut waits: Vec<sttproxy_pool::AcquireWait<BackendConn>>,
    deadline: Instant,
    acquire_timeout: Duration,
) -> Result<Leased, NoConnection> {
    while !waits.is_empty() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, select_all(waits)).await {
            Err(_) => return Err(NoConnection::Timeout(acquire_timeout)),
            Ok((Ok(lease), index, _)) => {
                return Ok((pools[index].clone(), lease, Acquired::Waited));
            }
            Ok((Err(_), index, rest)) => {
                pools.remove(index);
                waits = rest;
            }
        }
    }
    Err(NoConnection::NoBackend)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The metrics start `sttproxy_acquire_total` at zero from
    /// [`ACQUIRE_OUTCOMES`]: every label the code counts must be in it.
    #[test]
    fn every_acquire_outcome_is_listed() {
        let counted = [Acquired::Idle, Acquired::Dialed, Acquired::Waited]
            .map(Acquired::as_str)
            .into_iter()
            .chain([
                NoConnection::NoBackend.label(),
                NoConnection::Timeout(Duration::ZERO).label(),
            ]);
        for label in counted {
            assert!(ACQUIRE_OUTCOMES.contains(&label), "{label}");
        }
    }

    type Backend = (String, u32);

    fn pick(set: &[Backend], key: StickyKey) -> Option<&str> {
        rendezvous(set, key, |b| &b.0, |b| b.1).map(|b| b.0.as_str())
    }

    fn backends(weights: &[u32]) -> Vec<Backend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| (format!("stt-{i}.internal:9000"), w))
            .collect()
    }

    /// Keys as a service would have them: user ids.
    fn user(i: u32) -> StickyKey {
        StickyKey::of(format!("user-{i}").as_bytes())
    }

    #[test]
    fn the_key_hash_is_fixed_across_processes() {
        // FNV-1a's published test vectors: the hash is the fixed one, not a
        // seeded one, so replicas agree on every key.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(StickyKey::of(b"user-7"), StickyKey::of(b"user-7"));
        assert_ne!(StickyKey::of(b"user-7"), StickyKey::of(b"user-8"));
    }

    #[test]
    fn an_empty_set_chooses_nothing() {
        assert_eq!(pick(&[], user(1)), None);
    }

    /// Each backend gets its weight's share of the keys: within 5 standard
    /// deviations of the binomial share over `n` keys.
    #[test]
    fn keys_spread_by_weight() {
        for weights in [
            &[1, 1, 1][..],
            &[1, 2, 3, 4],
            &[5, 1],
            &[1, 1, 1, 1, 1, 1, 1, 10],
        ] {
            let set = backends(weights);
            let n = 40_000u32;
            let mut counts = vec![0u32; set.len()];
            for i in 0..n {
                let chosen = pick(&set, user(i)).unwrap();
                counts[set.iter().position(|b| b.0 == chosen).unwrap()] += 1;
            }
            let total: u32 = weights.iter().sum();
            for (i, &w) in weights.iter().enumerate() {
                let p = f64::from(w) / f64::from(total);
                let share = f64::from(counts[i]) / f64::from(n);
                let sigma = (p * (1.0 - p) / f64::from(n)).sqrt();
                assert!(
                    (share - p).abs() < 5.0 * sigma,
                    "weights {weights:?}: backend {i} got {share:.4}, expected {p:.4} ± {:.4}",
                    5.0 * sigma
                );
            }
        }
    }

    /// A backend added to 9 takes about a tenth of the keys, all of them from
    /// the others (the rest stay), where a modulo hash would move most keys.
    #[test]
    fn adding_a_backend_moves_only_its_share() {
        let before = backends(&[1; 9]);
        let after = backends(&[1; 10]);
        let n = 20_000u32;
        let moved = (0..n)
            .filter(|&i| pick(&before, user(i)) != pick(&after, user(i)))
            .count();
        for i in 0..n {
            let (b, a) = (pick(&before, user(i)), pick(&after, user(i)));
            assert!(
                a == b || a == Some(after[9].0.as_str()),
                "key {i}: {b:?} → {a:?}"
            );
        }
        let share = moved as f64 / f64::from(n);
        let sigma = (0.1f64 * 0.9 / f64::from(n)).sqrt();
        assert!((share - 0.1).abs() < 5.0 * sigma, "moved {share:.4}");
    }

    fn weighted_set() -> impl Strategy<Value = Vec<Backend>> {
        proptest::collection::btree_map("[a-z0-9.:-]{1,24}", 1u32..=16, 1..12)
            .prop_map(|m| m.into_iter().collect())
    }

    proptest! {
        /// The choice depends on the set, not on its order, and is a member.
        #[test]
        fn the_choice_is_stable(set in weighted_set(), key in any::<u64>(), rot in 0usize..12) {
            let key = StickyKey(key);
            let chosen = pick(&set, key).map(str::to_string);
            prop_assert!(chosen.is_some());
            let mut other = set.clone();
            other.rotate_left(rot % set.len());
            other.reverse();
            prop_assert_eq!(pick(&other, key).map(str::to_string), chosen);
        }

        /// Removing a backend moves only the keys it had (and so adding one
        /// moves only the keys it wins).
        #[test]
        fn removing_a_backend_moves_only_its_keys(
            set in weighted_set(),
            gone in 0usize..12,
            keys in proptest::collection::vec(any::<u64>(), 1..200),
        ) {
            prop_assume!(set.len() > 1);
            let gone = gone % set.len();
            let mut fewer = set.clone();
            let removed = fewer.remove(gone);
            for k in keys.into_iter().map(StickyKey) {
                let before = pick(&set, k).unwrap();
                let after = pick(&fewer, k).unwrap();
                if before != removed.0 {
                    prop_assert_eq!(before, after);
                }
            }
        }

        /// Raising one backend's weight moves keys only to it; lowering it
        /// only away from it.
        #[test]
        fn a_weight_change_moves_keys_only_to_or_from_that_backend(
            set in weighted_set(),
            which in 0usize..12,
            new_weight in 1u32..=32,
            keys in proptest::collection::vec(any::<u64>(), 1..200),
        ) {
            let which = which % set.len();
            let mut changed = set.clone();
            let old_weight = changed[which].1;
            changed[which].1 = new_weight;
            let id = set[which].0.as_str();
            for k in keys.into_iter().map(StickyKey) {
                let before = pick(&set, k).unwrap();
                let after = pick(&changed, k).unwrap();
                if before != after {
                    if new_weight > old_weight {
                        prop_assert_eq!(after, id);
                    } else {
                        prop_assert_eq!(before, id);
                    }
                }
            }
        }
    }
}
