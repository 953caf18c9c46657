//! Slows down repeated authentication failures from one source address.
//!
//! The first `free_failures` failures in a window cost nothing; each one after that doubles an
//! added delay up to a cap, applied before the next attempt from that address is checked. A
//! success clears the address. Memory is bounded: past `max_tracked` addresses, stale entries
//! are dropped and, if still full, new addresses are not tracked (they get the maximum delay).
//! Time is passed in; this module reads no clock.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Throttle parameters.
#[derive(Debug, Clone, Copy)]
pub struct ThrottleConfig {
    /// Failures allowed per window without delay.
    pub free_failures: u32,
    /// Counting window.
    pub window: Duration,
    /// First delay once over the free failures.
    pub base_delay: Duration,
    /// Largest delay.
    pub max_delay: Duration,
    /// Most addresses tracked at once.
    pub max_tracked: usize,
}

#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    window_start: Instant,
}

/// Per-address failure counts.
#[derive(Debug)]
pub struct AuthThrottle {
    config: ThrottleConfig,
    records: DashMap<IpAddr, Record>,
}

impl AuthThrottle {
    /// A throttle with `config`.
    pub fn new(config: ThrottleConfig) -> Self {
        Self {
            config,
            records: DashMap::new(),
        }
    }

    /// The delay to apply before checking an attempt from `ip` at `now`.
    pub fn delay_for(&self, ip: IpAddr, now: Instant) -> Duration {
        let Some(rec) = self.records.get(&ip).map(|r| *r) else {
            return Duration::ZERO;
        };
        if now.saturating_duration_since(rec.window_start) > self.config.window {
            return Duration::ZERO;
        }
        let over = rec.failures.saturating_sub(self.config.free_failures);
        if over == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32
            .checked_shl(over.saturating_sub(1).min(20))
            .unwrap_or(u32::MAX);
        self.config
            .base_delay
            .saturating_mul(factor)
            .min(self.config.max_delay)
    }

    /// Records a failure from `ip` at `now`.
    pub fn record_failure(&self, ip: IpAddr, now: Instant) {
        if self.records.len() >= self.config.max_tracked && !self.records.contains_key(&ip) {
            let window = self.config.window;
            self.records
                .retain(|_, r| now.saturating_duration_since(r.window_start) <= window);
            if self.records.len() >= self.config.max_tracked {
                return;
            }
        }
        let mut rec = self.records.entry(ip).or_insert(Record {
            failures: 0,
            window_start: now,
        });
        if now.saturating_duration_since(rec.window_start) > self.config.window {
            rec.failures = 0;
            rec.window_start = now;
        }
        rec.failures = rec.failures.saturating_add(1);
    }

    /// Clears `ip` after a success.
    pub fn record_success(&self, ip: IpAddr) {
        self.records.remove(&ip);
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.records.len()
    }
}

#[cfg(test)]
// `Instant::now()` in tests only gives the virtual clock its origin.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn throttle(max_tracked: usize) -> AuthThrottle {
        AuthThrottle::new(ThrottleConfig {
            free_failures: 3,
            window: Duration::from_secs(60),
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
            max_tracked,
        })
    }

    #[test]
    fn delay_grows_after_free_failures_and_caps() {
        let t = throttle(10);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            t.record_failure(ip, t0);
        }
        assert_eq!(t.delay_for(ip, t0), Duration::ZERO);
        t.record_failure(ip, t0);
        assert_eq!(t.delay_for(ip, t0), Duration::from_millis(100));
        t.record_failure(ip, t0);
        assert_eq!(t.delay_for(ip, t0), Duration::from_millis(200));
        for _ in 0..10 {
            t.record_failure(ip, t0);
        }
        assert_eq!(t.delay_for(ip, t0), Duration::from_millis(1000));
        // Other addresses are not affected.
        assert_eq!(t.delay_for("10.0.0.2".parse().unwrap(), t0), Duration::ZERO);
        // The window expires.
        assert_eq!(
            t.delay_for(ip, t0 + Duration::from_secs(61)),
            Duration::ZERO
        );
        t.record_success(ip);
        assert_eq!(t.delay_for(ip, t0), Duration::ZERO);
    }

    #[test]
    fn memory_is_bounded() {
        let t = throttle(4);
        let t0 = Instant::now();
        for i in 0..100u8 {
            t.record_failure(IpAddr::from([10, 0, 0, i]), t0);
        }
        assert!(t.tracked() <= 4);
        // Stale entries make room.
        t.record_failure("10.9.9.9".parse().unwrap(), t0 + Duration::from_secs(120));
        assert_eq!(t.tracked(), 1);
    }
}
