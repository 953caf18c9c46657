//! Paces call (or text) starts at a fixed rate over a bounded window, sans-IO: fed `now`,
//! answers how many starts are due and when the next one is. Falling behind (a slow loop)
//! yields a burst that catches up, so the count over the window stays exact. It does not pick
//! devices or place calls.

use std::time::{Duration, Instant};

/// A fixed-rate schedule of `total` starts beginning at `start`.
#[derive(Debug, Clone)]
pub struct Pacer {
    start: Instant,
    per_sec: f64,
    total: u64,
    issued: u64,
}

impl Pacer {
    /// `per_sec` starts per second for `window` (rounded to whole starts); a rate of zero or
    /// below (or not a number) schedules nothing.
    pub fn new(start: Instant, per_sec: f64, window: Duration) -> Self {
        let per_sec = if per_sec.is_finite() && per_sec > 0.0 {
            per_sec
        } else {
            0.0
        };
        let total = (per_sec * window.as_secs_f64()).round();
        Self {
            start,
            per_sec,
            total: if total.is_finite() && total > 0.0 {
                total.min(u64::MAX as f64 / 2.0) as u64
            } else {
                0
            },
            issued: 0,
        }
    }

    /// Starts in the whole schedule.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Starts handed out so far.
    pub fn issued(&self) -> u64 {
        self.issued
    }

    /// Whether every start has been handed out.
    pub fn finished(&self) -> bool {
        self.issued >= self.total
    }

    /// How many starts are due at `now` (the first is due at `start`); marks them handed out.
    pub fn take_due(&mut self, now: Instant) -> u64 {
        if self.finished() || now < self.start {
            return 0;
        }
        let elapsed = now.duration_since(self.start).as_secs_f64();
        let due_total = ((elapsed * self.per_sec).floor() as u64)
            .saturating_add(1)
            .min(self.total);
        let due = due_total.saturating_sub(self.issued);
        self.issued = self.issued.max(due_total);
        due
    }

    /// When the next start is due, or `None` once all are handed out.
    pub fn next_at(&self) -> Option<Instant> {
        if self.finished() {
            return None;
        }
        Some(self.start + Duration::from_secs_f64(self.issued as f64 / self.per_sec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_the_rate_times_the_window_evenly() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0, 10.0, Duration::from_secs(2));
        assert_eq!(p.total(), 20);
        assert_eq!(p.take_due(t0), 1);
        assert_eq!(p.take_due(t0 + Duration::from_millis(50)), 0);
        assert_eq!(p.next_at(), Some(t0 + Duration::from_millis(100)));
        assert_eq!(p.take_due(t0 + Duration::from_millis(100)), 1);
        // A late loop catches up in one burst.
        assert_eq!(p.take_due(t0 + Duration::from_millis(550)), 4);
        assert_eq!(p.issued(), 6);
        // Never past the total, however late.
        assert_eq!(p.take_due(t0 + Duration::from_secs(60)), 14);
        assert!(p.finished());
        assert_eq!(p.next_at(), None);
        assert_eq!(p.take_due(t0 + Duration::from_secs(61)), 0);
    }

    #[test]
    fn zero_negative_and_nan_rates_schedule_nothing() {
        let t0 = Instant::now();
        for rate in [0.0, -5.0, f64::NAN, f64::INFINITY] {
            let mut p = Pacer::new(t0, rate, Duration::from_secs(5));
            assert_eq!(p.total(), 0, "{rate}");
            assert_eq!(p.take_due(t0 + Duration::from_secs(1)), 0);
            assert_eq!(p.next_at(), None);
        }
    }

    #[test]
    fn nothing_is_due_before_the_start() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0 + Duration::from_secs(1), 100.0, Duration::from_secs(1));
        assert_eq!(p.take_due(t0), 0);
        assert_eq!(p.take_due(t0 + Duration::from_secs(1)), 1);
    }
}
