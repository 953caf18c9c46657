//! Limits repeated authentication failures, per key: a source address, or a device id.
//!
//! The first `free_failures` failures in a window cost nothing; each one after that doubles an
//! added delay up to a cap, applied before the next attempt is checked; past `max_failures` the
//! key is locked until its window ends ([`AuthThrottle::locked`]): attempts are refused
//! without checking the credential. A success clears the key. Memory is bounded: past
//! `max_tracked` keys, stale entries are dropped and, if still full, new keys are not tracked.
//! Time is passed in; this module reads no clock.

use std::hash::Hash;
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
    /// Failures per window after which the key is locked until the window ends.
    pub max_failures: u32,
    /// Most addresses tracked at once.
    pub max_tracked: usize,
}

#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    window_start: Instant,
}

/// Failure counts per key (a source address by default).
#[derive(Debug)]
pub struct AuthThrottle<K: Hash + Eq = IpAddr> {
    config: ThrottleConfig,
    records: DashMap<K, Record>,
}

impl<K: Hash + Eq + Clone> AuthThrottle<K> {
    /// A throttle with `config`.
    pub fn new(config: ThrottleConfig) -> Self {
        Self {
            config,
            records: DashMap::new(),
        }
    }

    /// Whether `key` failed more than `max_failures` times in its window (at `now`): its
    /// attempts are refused without checking the credential until the window ends.
    pub fn locked(&self, key: &K, now: Instant) -> bool {
        self.records.get(key).is_some_and(|r| {
            now.saturating_duration_since(r.window_start) <= self.config.window
                && r.failures > self.config.max_failures
        })
    }

    /// The delay to apply before checking an attempt from `ip` at `now`.
    pub fn delay_for(&self, ip: &K, now: Instant) -> Duration {
        let Some(rec) = self.records.get(ip).map(|r| *r) else {
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

    /// Records a failure of `ip` at `now`.
    pub fn record_failure(&self, ip: K, now: Instant) {
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
    pub fn record_success(&self, ip: &K) {
        self.records.remove(ip);
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
            max_failures: 20,
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
        assert_eq!(t.delay_for(&ip, t0), Duration::ZERO);
        t.record_failure(ip, t0);
        assert_eq!(t.delay_for(&ip, t0), Duration::from_millis(100));
        t.record_failure(ip, t0);
        assert_eq!(t.delay_for(&ip, t0), Duration::from_millis(200));
        for _ in 0..10 {
            t.record_failure(ip, t0);
        }
        assert_eq!(t.delay_for(&ip, t0), Duration::from_millis(1000));
        // Other addresses are not affected.
        assert_eq!(
            t.delay_for(&"10.0.0.2".parse().unwrap(), t0),
            Duration::ZERO
        );
        // The window expires.
        assert_eq!(
            t.delay_for(&ip, t0 + Duration::from_secs(61)),
            Duration::ZERO
        );
        t.record_success(&ip);
        assert_eq!(t.delay_for(&ip, t0), Duration::ZERO);
    }

    #[test]
    fn past_max_failures_a_key_is_locked_for_its_window() {
        let t = throttle(10);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..20 {
            t.record_failure(ip, t0);
        }
        assert!(!t.locked(&ip, t0));
        t.record_failure(ip, t0);
        assert!(t.locked(&ip, t0));
        assert!(t.locked(&ip, t0 + Duration::from_secs(59)));
        assert!(
            !t.locked(&ip, t0 + Duration::from_secs(61)),
            "the window ends"
        );
        // Keys of another type: device ids.
        let devices: AuthThrottle<String> = AuthThrottle::new(ThrottleConfig {
            max_failures: 1,
            ..t.config
        });
        devices.record_failure("d1".into(), t0);
        devices.record_failure("d1".into(), t0);
        assert!(devices.locked(&"d1".to_string(), t0));
        assert!(!devices.locked(&"d2".to_string(), t0));
        devices.record_success(&"d1".to_string());
        assert!(!devices.locked(&"d1".to_string(), t0));
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
