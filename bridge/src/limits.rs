//! Per-device rate limits ([`DeviceRates`]): token buckets keyed by device id, for the texts a
//! device receives from SIP and the texts it sends. One flood of MESSAGEs at a device, or one
//! device sending texts in a loop, is refused early instead of filling the device's session
//! queue or the SIP stack.
//!
//! The buckets are given `now` (no clock read here). The map holds at most `max_keys` devices;
//! past that, devices whose buckets have filled again are forgotten, and if none has, the
//! request is refused. It does not count calls (the call table does) or sources (the SIP
//! transaction layer does).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A rate: `per_sec` a second, `burst` at once (`per_sec` 0: unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Sustained rate per second (0: no limit).
    pub per_sec: u32,
    /// Most at once.
    pub burst: u32,
}

impl Rate {
    /// No limit.
    pub const UNLIMITED: Rate = Rate {
        per_sec: 0,
        burst: 0,
    };
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

/// Token buckets per device.
#[derive(Debug)]
pub struct DeviceRates {
    rate: Rate,
    max_keys: usize,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl DeviceRates {
    /// Buckets of `rate` for at most `max_keys` devices at once.
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        Self {
            rate,
            max_keys,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `device` at `now`: `Ok`, or `Err(seconds)` until one is available.
    pub fn take(&self, now: Instant, device: &str) -> Result<(), u32> {
        if self.rate.per_sec == 0 {
            return Ok(());
        }
        let rate = f64::from(self.rate.per_sec);
        let burst = f64::from(self.rate.burst.max(1));
        let Ok(mut buckets) = self.buckets.lock() else {
            return Err(1);
        };
        if !buckets.contains_key(device) && buckets.len() >= self.max_keys {
            buckets.retain(|_, b| {
                let full_after = Duration::try_from_secs_f64(((burst - b.tokens) / rate).max(0.0))
                    .unwrap_or(Duration::MAX);
                now.saturating_duration_since(b.refilled) < full_after
            });
            if buckets.len() >= self.max_keys {
                return Err(1);
            }
        }
        let bucket = buckets.entry(device.to_string()).or_insert(Bucket {
            tokens: burst,
            refilled: now,
        });
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = ((1.0 - bucket.tokens) / rate).ceil();
            Err(if wait.is_finite() {
                wait.clamp(1.0, 3600.0) as u32
            } else {
                3600
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_per_device() {
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let r = DeviceRates::new(
            Rate {
                per_sec: 2,
                burst: 3,
            },
            16,
        );
        for _ in 0..3 {
            assert_eq!(r.take(t0, "a"), Ok(()));
        }
        assert_eq!(r.take(t0, "a"), Err(1));
        assert_eq!(r.take(t0, "b"), Ok(()));
        assert_eq!(r.take(t0 + Duration::from_millis(500), "a"), Ok(()));
        assert!(r.take(t0 + Duration::from_millis(500), "a").is_err());
    }

    #[test]
    fn unlimited_and_bounded_keys() {
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let r = DeviceRates::new(Rate::UNLIMITED, 1);
        for _ in 0..100 {
            assert_eq!(r.take(t0, "a"), Ok(()));
        }
        let r = DeviceRates::new(
            Rate {
                per_sec: 1,
                burst: 1,
            },
            1,
        );
        assert_eq!(r.take(t0, "a"), Ok(()));
        // "a" is still refilling: no room for "b" yet; a second later "a" is forgotten.
        assert!(r.take(t0, "b").is_err());
        assert_eq!(r.take(t0 + Duration::from_secs(1), "b"), Ok(()));
    }
}
