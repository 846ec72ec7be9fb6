//! Per-session rate limits on what a client sends: data messages per second
//! and bytes per second, each a GCRA bucket (the `governor` crate) that
//! holds `rate × burst` cells.
//!
//! The buckets are charged on the session's timer tick (at most a second
//! apart) with what the client sent since the last tick, not per message:
//! the per-message path stays free of clock reads (docs/relay.md). A tick's
//! cells count as arriving together, which is why the burst is never below
//! one second of the rate (checked where the settings are validated): a
//! client within its rate never trips a bucket only because the cells of a
//! whole tick are charged at once. A flood is caught at the next tick; until
//! then it is bounded by the relay's queue limit and TCP's push back.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// The limits one session is held to (`None`: that limit is off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    pub messages_per_second: Option<NonZeroU32>,
    pub bytes_per_second: Option<NonZeroU32>,
    /// How far ahead of its rate a client may run, as time at that rate.
    pub burst: Duration,
}

impl RateLimits {
    pub const OFF: RateLimits = RateLimits {
        messages_per_second: None,
        bytes_per_second: None,
        burst: Duration::from_secs(1),
    };

    pub fn any(&self) -> bool {
        self.messages_per_second.is_some() || self.bytes_per_second.is_some()
    }
}

/// Which limit a client went past (the `limit` label of
/// `sttproxy_rate_limited_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    Messages,
    Bytes,
}

impl Exceeded {
    pub const ALL: [Exceeded; 2] = [Exceeded::Messages, Exceeded::Bytes];

    pub fn label(self) -> &'static str {
        match self {
            Exceeded::Messages => "messages",
            Exceeded::Bytes => "bytes",
        }
    }
}

type Bucket<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// One session's buckets.
#[derive(Debug)]
pub struct SessionRate<C: Clock = DefaultClock> {
    messages: Option<Bucket<C>>,
    bytes: Option<Bucket<C>>,
}

impl SessionRate<DefaultClock> {
    /// The buckets for `limits`, or `None` when no limit is set (a session
    /// then carries nothing for them).
    pub fn new(limits: &RateLimits) -> Option<Box<Self>> {
        Self::with_clock(limits, &DefaultClock::default())
    }
}

impl<C: Clock + Clone> SessionRate<C> {
    pub fn with_clock(limits: &RateLimits, clock: &C) -> Option<Box<Self>> {
        if !limits.any() {
            return None;
        }
        let bucket = |rate: Option<NonZeroU32>| {
            rate.map(|r| RateLimiter::direct_with_clock(quota(r, limits.burst), clock.clone()))
        };
        Some(Box::new(Self {
            messages: bucket(limits.messages_per_second),
            bytes: bucket(limits.bytes_per_second),
        }))
    }

    /// Charge what the client sent since the last call; the first limit it
    /// went past, if any.
    pub fn charge(&self, messages: u64, bytes: u64) -> Result<(), Exceeded> {
        if !conforms(self.messages.as_ref(), messages) {
            return Err(Exceeded::Messages);
        }
        if !conforms(self.bytes.as_ref(), bytes) {
            return Err(Exceeded::Bytes);
        }
        Ok(())
    }
}

/// `rate` cells a second, `rate × burst` of them at once (at least `rate`).
fn quota(rate: NonZeroU32, burst: Duration) -> Quota {
    let cells = (f64::from(rate.get()) * burst.as_secs_f64()).min(f64::from(u32::MAX)) as u32;
    let burst = NonZeroU32::new(cells.max(rate.get())).unwrap_or(rate);
    Quota::per_second(rate).allow_burst(burst)
}

fn conforms<C: Clock>(bucket: Option<&Bucket<C>>, cells: u64) -> bool {
    let (Some(bucket), Some(n)) = (
        bucket,
        NonZeroU32::new(cells.min(u64::from(u32::MAX)) as u32),
    ) else {
        return true;
    };
    // More than the bucket can ever hold in one charge is past the limit too.
    matches!(bucket.check_n(n), Ok(Ok(())))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use governor::clock::FakeRelativeClock;
    use proptest::prelude::*;

    use super::*;

    fn limits(messages: u32, bytes: u32, burst_ms: u64) -> RateLimits {
        RateLimits {
            messages_per_second: NonZeroU32::new(messages),
            bytes_per_second: NonZeroU32::new(bytes),
            burst: Duration::from_millis(burst_ms),
        }
    }

    #[test]
    fn no_limit_no_buckets() {
        assert!(SessionRate::new(&RateLimits::OFF).is_none());
    }

    #[test]
    fn a_client_past_its_message_rate_is_caught_and_one_within_it_is_not() {
        let clock = FakeRelativeClock::default();
        let rate = SessionRate::with_clock(&limits(50, 0, 1000), &clock).unwrap();
        // 50 messages every second for ten seconds, charged once a second.
        for _ in 0..10 {
            clock.advance(Duration::from_secs(1));
            assert_eq!(rate.charge(50, 50_000), Ok(()));
        }
        // Then 60 in one second: past the rate once the burst is spent.
        clock.advance(Duration::from_secs(1));
        assert_eq!(rate.charge(60, 60), Err(Exceeded::Messages));
    }

    #[test]
    fn the_byte_limit_is_its_own() {
        let clock = FakeRelativeClock::default();
        let rate = SessionRate::with_clock(&limits(0, 32_000, 2000), &clock).unwrap();
        clock.advance(Duration::from_millis(250));
        // A burst of two seconds' worth is allowed, then the rate.
        assert_eq!(rate.charge(1_000_000, 64_000), Ok(()));
        clock.advance(Duration::from_millis(250));
        assert_eq!(rate.charge(1, 9_000), Err(Exceeded::Bytes));
    }

    #[test]
    fn a_burst_shorter_than_a_second_still_holds_a_second() {
        let clock = FakeRelativeClock::default();
        let rate = SessionRate::with_clock(&limits(100, 0, 10), &clock).unwrap();
        clock.advance(Duration::from_secs(1));
        assert_eq!(rate.charge(100, 0), Ok(()));
    }

    proptest! {
        /// Whatever the tick pattern, a client that never sends more than its
        /// rate over any tick is never cut off.
        #[test]
        fn within_the_rate_is_never_cut_off(
            rate in 1u32..5_000,
            burst_ms in 1_000u64..5_000,
            ticks in proptest::collection::vec((10u64..1_000, 0.0f64..=1.0), 1..200),
        ) {
            let clock = FakeRelativeClock::default();
            let r = SessionRate::with_clock(&limits(rate, 0, burst_ms), &clock).unwrap();
            for (ms, share) in ticks {
                clock.advance(Duration::from_millis(ms));
                let allowed = (f64::from(rate) * ms as f64 / 1000.0 * share).floor() as u64;
                prop_assert_eq!(r.charge(allowed, 0), Ok(()));
            }
        }

        /// A client sending twice its rate for long enough is always caught.
        #[test]
        fn twice_the_rate_is_caught(rate in 1u32..5_000, burst_ms in 1_000u64..5_000) {
            let clock = FakeRelativeClock::default();
            let r = SessionRate::with_clock(&limits(rate, 0, burst_ms), &clock).unwrap();
            let mut caught = false;
            // Long enough to spend any burst: burst / (2 - 1) seconds, and more.
            for _ in 0..(burst_ms / 1000 + 3) * 4 {
                clock.advance(Duration::from_millis(250));
                if r.charge(u64::from(rate) / 2 + 1, 0).is_err() {
                    caught = true;
                    break;
                }
            }
            prop_assert!(caught);
        }
    }
}
