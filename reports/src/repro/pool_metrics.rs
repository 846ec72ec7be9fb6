//! sttproxy's pool during one round, from two scrapes of its `/metrics`
//! (before and after the load): leases, how many were served by an
//! already-open connection, connections opened, and the acquire-wait
//! percentiles.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::procs::http_get;

/// Every sample of one Prometheus text exposition: `name{labels}` → value.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (key, value) = l.rsplit_once(' ')?;
                Some((key.trim().to_string(), value.trim().parse().ok()?))
            })
            .collect();
        Self { samples }
    }

    pub fn fetch(admin: SocketAddr) -> anyhow::Result<Self> {
        let (status, body) = http_get(admin, "/metrics").context("scraping sttproxy /metrics")?;
        if status != 200 {
            bail!("sttproxy /metrics answered {status}");
        }
        Ok(Self::parse(&body))
    }

    /// `name`'s value, summed over all its label sets (0 when absent).
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(k, _)| k.as_str() == name || k.starts_with(&format!("{name}{{")))
            .map(|(_, v)| v)
            .sum()
    }

    fn get(&self, key: &str) -> f64 {
        self.samples.get(key).copied().unwrap_or(0.0)
    }

    /// The sample `key` exactly as exposed (`name` or `name{labels}`); 0
    /// when absent.
    pub fn value(&self, key: &str) -> f64 {
        self.get(key)
    }

    /// `name`'s samples by the value of its one label `label`.
    pub fn labelled(&self, name: &str, label: &str) -> Vec<(String, f64)> {
        let prefix = format!("{name}{{{label}=\"");
        self.samples
            .iter()
            .filter_map(|(k, v)| {
                let value = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
                Some((value.to_string(), *v))
            })
            .collect()
    }

    /// The cumulative buckets of histogram `name`: (upper bound, count), by bound.
    fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let prefix = format!("{name}_bucket{{le=\"");
        let mut b: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter_map(|(k, v)| {
                let le = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((bound, *v))
            })
            .collect();
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        b
    }
}

/// Acquire-wait percentiles, milliseconds, interpolated linearly inside the
/// histogram's buckets (as Prometheus' `histogram_quantile` does); a value in
/// the last, unbounded bucket is reported as that bucket's lower bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct WaitPercentiles {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    /// Waits observed (the buckets' bounds are 0.1 ms × 4^k: a percentile is
    /// known only to within its bucket).
    pub count: u64,
}

/// The pool's work during one round (differences of two scrapes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolRound {
    /// Sessions that got a backend connection.
    pub leases: u64,
    /// Of those, served by an already-open connection: idle in the pool, or
    /// released by another session while this one waited.
    pub from_open: u64,
    /// Of those, served by a connection dialed for the session.
    pub dialed: u64,
    /// Sessions that got no connection (timeout, no backend).
    pub failed: u64,
    /// Backend connections opened during the round (refill and on demand).
    pub opened: u64,
    /// Seconds between the two scrapes.
    pub window_s: f64,
    pub wait: WaitPercentiles,
}

impl PoolRound {
    pub fn between(before: &Scrape, after: &Scrape, window_s: f64) -> Self {
        let d = |key: &str| (after.get(key) - before.get(key)).max(0.0) as u64;
        let outcome = |o: &str| d(&format!("sttproxy_acquire_total{{outcome=\"{o}\"}}"));
        let (idle, waited, dialed) = (outcome("idle"), outcome("waited"), outcome("dialed"));
        // A connection ever opened is live now or was discarded since.
        let opened_total =
            |s: &Scrape| s.sum("sttproxy_pool_live") + s.sum("sttproxy_pool_discarded_total");
        let opened = (opened_total(after) - opened_total(before)).max(0.0) as u64;
        let b0 = before.buckets("sttproxy_acquire_wait_seconds");
        let b1 = after.buckets("sttproxy_acquire_wait_seconds");
        let delta: Vec<(f64, f64)> = b1
            .iter()
            .map(|&(le, n)| {
                let old = b0.iter().find(|(l, _)| *l == le).map_or(0.0, |(_, v)| *v);
                (le, (n - old).max(0.0))
            })
            .collect();
        let count = delta.last().map_or(0.0, |(_, n)| *n) as u64;
        Self {
            leases: idle + waited + dialed,
            from_open: idle + waited,
            dialed,
            failed: outcome("timeout") + outcome("no_backend"),
            opened,
            window_s,
            wait: WaitPercentiles {
                p50_ms: quantile(&delta, 0.5) * 1e3,
                p90_ms: quantile(&delta, 0.9) * 1e3,
                p99_ms: quantile(&delta, 0.99) * 1e3,
                count,
            },
        }
    }

    /// Leases served by an already-open connection / all leases.
    pub fn reuse_share(&self) -> Option<f64> {
        (self.leases > 0).then(|| self.from_open as f64 / self.leases as f64)
    }

    pub fn leases_per_s(&self) -> f64 {
        if self.window_s > 0.0 {
            self.leases as f64 / self.window_s
        } else {
            0.0
        }
    }
}

/// `q` of cumulative buckets (upper bound, count), linear inside a bucket.
fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let Some(&(_, total)) = buckets.last() else {
        return 0.0;
    };
    if total <= 0.0 {
        return 0.0;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, n) in buckets {
        if n >= rank {
            if le.is_infinite() {
                return lower.0;
            }
            let width = n - lower.1;
            let frac = if width > 0.0 {
                (rank - lower.1) / width
            } else {
                1.0
            };
            return lower.0 + (le - lower.0) * frac;
        }
        lower = (le, n);
    }
    lower.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# HELP x\n\
        sttproxy_acquire_total{outcome=\"idle\"} 10\n\
        sttproxy_pool_live{backend=\"a\"} 20\n\
        sttproxy_pool_live{backend=\"b\"} 20\n\
        sttproxy_pool_discarded_total{backend=\"a\"} 0\n\
        sttproxy_acquire_wait_seconds_bucket{le=\"0.0001\"} 10\n\
        sttproxy_acquire_wait_seconds_bucket{le=\"0.0004\"} 10\n\
        sttproxy_acquire_wait_seconds_bucket{le=\"+Inf\"} 10\n";

    const AFTER: &str = "sttproxy_acquire_total{outcome=\"idle\"} 890\n\
        sttproxy_acquire_total{outcome=\"waited\"} 20\n\
        sttproxy_acquire_total{outcome=\"dialed\"} 100\n\
        sttproxy_acquire_total{outcome=\"timeout\"} 3\n\
        sttproxy_pool_live{backend=\"a\"} 60\n\
        sttproxy_pool_live{backend=\"b\"} 30\n\
        sttproxy_pool_discarded_total{backend=\"a\"} 10\n\
        sttproxy_acquire_wait_seconds_bucket{le=\"0.0001\"} 510\n\
        sttproxy_acquire_wait_seconds_bucket{le=\"0.0004\"} 1000\n\
        sttproxy_acquire_wait_seconds_bucket{le=\"+Inf\"} 1010\n";

    #[test]
    fn a_round_is_the_difference_of_two_scrapes() {
        let p = PoolRound::between(&Scrape::parse(BEFORE), &Scrape::parse(AFTER), 4.0);
        assert_eq!(p.leases, 1000);
        assert_eq!(p.from_open, 900);
        assert_eq!(p.dialed, 100);
        assert_eq!(p.failed, 3);
        // (90 live + 10 discarded) − (40 + 0).
        assert_eq!(p.opened, 60);
        assert_eq!(p.reuse_share(), Some(0.9));
        assert_eq!(p.leases_per_s(), 250.0);
        assert_eq!(p.wait.count, 1000);
        // Rank 500 of 1000 is in the first bucket (500 values): its top, 0.1 ms.
        assert!((p.wait.p50_ms - 0.1).abs() < 1e-9);
        // Rank 900: 400 into the second bucket's 490, between 0.1 and 0.4 ms.
        assert!((p.wait.p90_ms - (0.1 + 0.3 * 400.0 / 490.0)).abs() < 1e-9);
        // Rank 990 is the top of the second bucket.
        assert!((p.wait.p99_ms - 0.4).abs() < 1e-9);
    }

    #[test]
    fn no_lease_has_no_reuse_share() {
        let s = Scrape::parse(BEFORE);
        let p = PoolRound::between(&s, &s, 1.0);
        assert_eq!(p.leases, 0);
        assert_eq!(p.reuse_share(), None);
        assert_eq!(p.wait, WaitPercentiles::default());
    }
}
