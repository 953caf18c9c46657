//! Reception statistics (RFC 3550 appendices A.1, A.3, A.8) and relay latency tracking.
//!
//! - [`SequenceTracker`]: the A.1 source validation and sequence bookkeeping (16-bit wrap into
//!   an extended sequence, probation, large jumps, duplicates and reordering) and the A.3
//!   expected/lost/fraction-lost computations for reception reports.
//! - [`JitterEstimator`]: the A.8 interarrival jitter, fed with arrival times already converted
//!   to timestamp units (see [`arrival_units`]).
//! - [`LatencyHistogram`]: a fixed-size log-linear histogram of durations (about 12% bucket
//!   width above 16 ns, up to about 18 minutes) with count, mean, max and percentiles.
//!
//! Sans-IO and allocation-free after construction. What it does not do: no clock reading (the
//! caller passes times), no RTCP encoding (see `rtcp`), no per-source tables.

use std::time::Duration;

const RTP_SEQ_MOD: u32 = 1 << 16;
const MAX_DROPOUT: u16 = 3000;
const MAX_MISORDER: u16 = 100;
const MIN_SEQUENTIAL: u32 = 2;

/// Sequence tracking for one source, as RFC 3550 appendix A.1 specifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceTracker {
    max_seq: u16,
    cycles: u32,
    base_seq: u32,
    bad_seq: u32,
    probation: u32,
    received: u64,
    expected_prior: u64,
    received_prior: u64,
}

impl SequenceTracker {
    /// A tracker for a source whose first packet has sequence `seq` (the packet is on
    /// probation, as in A.1; feed it with [`SequenceTracker::update`] too).
    pub fn new(seq: u16) -> Self {
        let mut tracker = SequenceTracker {
            max_seq: 0,
            cycles: 0,
            base_seq: 0,
            bad_seq: 0,
            probation: MIN_SEQUENTIAL,
            received: 0,
            expected_prior: 0,
            received_prior: 0,
        };
        tracker.init(seq);
        tracker.max_seq = seq.wrapping_sub(1);
        tracker
    }

    fn init(&mut self, seq: u16) {
        self.base_seq = u32::from(seq);
        self.max_seq = seq;
        self.bad_seq = RTP_SEQ_MOD + 1;
        self.cycles = 0;
        self.received = 0;
        self.received_prior = 0;
        self.expected_prior = 0;
    }

    /// Accounts for a received packet. Returns `false` for packets A.1 does not count: during
    /// probation, and the first packet after a very large jump (a second sequential one
    /// restarts the tracking: the source restarted).
    pub fn update(&mut self, seq: u16) -> bool {
        let udelta = seq.wrapping_sub(self.max_seq);
        if self.probation > 0 {
            if seq == self.max_seq.wrapping_add(1) {
                self.probation -= 1;
                self.max_seq = seq;
                if self.probation == 0 {
                    self.init(seq);
                    self.received += 1;
                    return true;
                }
            } else {
                self.probation = MIN_SEQUENTIAL - 1;
                self.max_seq = seq;
            }
            return false;
        } else if udelta < MAX_DROPOUT {
            // In order, with a permissible gap.
            if seq < self.max_seq {
                self.cycles = self.cycles.wrapping_add(RTP_SEQ_MOD);
            }
            self.max_seq = seq;
        } else if u32::from(udelta) <= RTP_SEQ_MOD - u32::from(MAX_MISORDER) {
            // A very large jump.
            if u32::from(seq) == self.bad_seq {
                self.init(seq);
            } else {
                self.bad_seq = (u32::from(seq) + 1) & (RTP_SEQ_MOD - 1);
                return false;
            }
        }
        // Otherwise a duplicate or reordered packet: counted, max unchanged.
        self.received += 1;
        true
    }

    /// Whether the source is still on probation.
    pub fn in_probation(&self) -> bool {
        self.probation > 0
    }

    /// The extended highest sequence number received (cycles in the high 16 bits).
    pub fn extended_max(&self) -> u32 {
        self.cycles.wrapping_add(u32::from(self.max_seq))
    }

    /// Packets counted as received.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Packets expected: extended highest minus base plus one (0 while on probation).
    pub fn expected(&self) -> u64 {
        if self.probation > 0 {
            return 0;
        }
        u64::from(self.extended_max().wrapping_sub(self.base_seq)) + 1
    }

    /// Expected minus received: negative when duplicates arrived.
    pub fn lost(&self) -> i64 {
        self.expected() as i64 - self.received as i64
    }

    /// [`SequenceTracker::lost`] clamped to the 24-bit signed range of a report block.
    pub fn cumulative_lost(&self) -> i32 {
        self.lost().clamp(-0x80_0000, 0x7f_ffff) as i32
    }

    /// The fraction lost since the previous call, in 1/256 (A.3), and starts a new interval.
    pub fn take_fraction_lost(&mut self) -> u8 {
        let expected = self.expected();
        let expected_interval = expected.saturating_sub(self.expected_prior);
        self.expected_prior = expected;
        let received_interval = self.received.saturating_sub(self.received_prior);
        self.received_prior = self.received;
        let lost_interval = expected_interval.saturating_sub(received_interval);
        if expected_interval == 0 || lost_interval == 0 {
            0
        } else {
            u8::try_from((lost_interval << 8) / expected_interval).unwrap_or(u8::MAX)
        }
    }
}

/// Interarrival jitter, RFC 3550 appendix A.8, in the integer form (scaled by 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JitterEstimator {
    last_transit: Option<u32>,
    jitter_x16: u64,
}

impl JitterEstimator {
    /// A fresh estimator (jitter 0).
    pub fn new() -> Self {
        Self::default()
    }

    /// Accounts for a packet with RTP timestamp `rtp_timestamp` that arrived at
    /// `arrival_units` (arrival time in the same clock, any fixed origin; wraps).
    pub fn update(&mut self, arrival_units: u32, rtp_timestamp: u32) {
        let transit = arrival_units.wrapping_sub(rtp_timestamp);
        if let Some(last) = self.last_transit {
            let d = u64::from((transit.wrapping_sub(last) as i32).unsigned_abs());
            self.jitter_x16 = (self.jitter_x16 + d).saturating_sub((self.jitter_x16 + 8) >> 4);
        }
        self.last_transit = Some(transit);
    }

    /// Forgets the previous transit time (after a source or clock-rate change) but keeps the
    /// estimate.
    pub fn restart(&mut self) {
        self.last_transit = None;
    }

    /// The jitter in timestamp units (the report-block value).
    pub fn jitter_units(&self) -> u32 {
        u32::try_from(self.jitter_x16 >> 4).unwrap_or(u32::MAX)
    }

    /// The jitter as a duration, given the clock rate in Hz (zero for a rate of 0).
    pub fn jitter(&self, clock_rate: u32) -> Duration {
        units_to_duration(u64::from(self.jitter_units()), clock_rate)
    }
}

/// `elapsed` expressed in a `clock_rate` Hz clock, wrapping to 32 bits like RTP timestamps.
pub fn arrival_units(elapsed: Duration, clock_rate: u32) -> u32 {
    (elapsed.as_nanos().wrapping_mul(u128::from(clock_rate)) / 1_000_000_000) as u32
}

/// `units` of a `clock_rate` Hz clock as a duration (zero for a rate of 0).
pub fn units_to_duration(units: u64, clock_rate: u32) -> Duration {
    if clock_rate == 0 {
        return Duration::ZERO;
    }
    let nanos = u128::from(units) * 1_000_000_000 / u128::from(clock_rate);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// Number of buckets of a [`LatencyHistogram`].
pub const LATENCY_BUCKETS: usize = 16 + 36 * 8;

/// A fixed-size log-linear histogram of durations: exact below 16 ns, then 8 buckets per
/// power of two (bucket width at most 1/8 of its lower bound) up to 2^40 ns (about 18
/// minutes; longer values land in the last bucket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencyHistogram {
    buckets: [u32; LATENCY_BUCKETS],
    count: u64,
    sum_nanos: u64,
    max_nanos: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

fn bucket_index(nanos: u64) -> usize {
    if nanos < 16 {
        return nanos as usize;
    }
    let exponent = 63 - nanos.leading_zeros() as usize;
    let sub = ((nanos >> (exponent - 3)) & 7) as usize;
    (16 + (exponent - 4) * 8 + sub).min(LATENCY_BUCKETS - 1)
}

fn bucket_bounds(index: usize) -> (u64, u64) {
    if index < 16 {
        return (index as u64, index as u64 + 1);
    }
    let exponent = (index - 16) / 8 + 4;
    let sub = ((index - 16) % 8) as u64;
    let width = 1u64 << (exponent - 3);
    let low = (8 + sub) << (exponent - 3);
    (low, low + width)
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        LatencyHistogram {
            buckets: [0; LATENCY_BUCKETS],
            count: 0,
            sum_nanos: 0,
            max_nanos: 0,
        }
    }

    /// Records one sample.
    pub fn record(&mut self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        if let Some(bucket) = self.buckets.get_mut(bucket_index(nanos)) {
            *bucket = bucket.saturating_add(1);
        }
        self.count += 1;
        self.sum_nanos = self.sum_nanos.saturating_add(nanos);
        self.max_nanos = self.max_nanos.max(nanos);
    }

    /// Adds all samples of `other`.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *mine = mine.saturating_add(*theirs);
        }
        self.count += other.count;
        self.sum_nanos = self.sum_nanos.saturating_add(other.sum_nanos);
        self.max_nanos = self.max_nanos.max(other.max_nanos);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The mean (zero when empty).
    pub fn mean(&self) -> Duration {
        match self.sum_nanos.checked_div(self.count) {
            Some(mean) => Duration::from_nanos(mean),
            None => Duration::ZERO,
        }
    }

    /// The largest sample.
    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max_nanos)
    }

    /// The `quantile` (0.0-1.0) as the midpoint of the bucket holding it, never above the
    /// maximum sample; zero when empty.
    pub fn percentile(&self, quantile: f64) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        let quantile = quantile.clamp(0.0, 1.0);
        let rank = ((quantile * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (index, &n) in self.buckets.iter().enumerate() {
            seen += u64::from(n);
            if seen >= rank {
                let (low, high) = bucket_bounds(index);
                let mid = low + (high - low - 1) / 2;
                return Duration::from_nanos(mid.min(self.max_nanos));
            }
        }
        self.max()
    }

    /// Count, mean, p50, p99 and max in one value.
    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            count: self.count,
            mean: self.mean(),
            p50: self.percentile(0.50),
            p99: self.percentile(0.99),
            max: self.max(),
        }
    }
}

/// A summary of a [`LatencyHistogram`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LatencySummary {
    /// Number of samples.
    pub count: u64,
    /// Mean.
    pub mean: Duration,
    /// Median (bucket precision).
    pub p50: Duration,
    /// 99th percentile (bucket precision).
    pub p99: Duration,
    /// Largest sample.
    pub max: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(tracker: &mut SequenceTracker, seqs: impl IntoIterator<Item = u16>) {
        for seq in seqs {
            tracker.update(seq);
        }
    }

    #[test]
    fn probation_then_counting() {
        let mut t = SequenceTracker::new(100);
        assert!(!t.update(100));
        assert!(t.in_probation());
        assert!(t.update(101));
        assert!(!t.in_probation());
        feed(&mut t, 102..=110);
        assert_eq!(t.received(), 10);
        assert_eq!(t.expected(), 10);
        assert_eq!(t.lost(), 0);
        assert_eq!(t.extended_max(), 110);
    }

    #[test]
    fn probation_restarts_on_a_gap() {
        let mut t = SequenceTracker::new(10);
        assert!(!t.update(10));
        assert!(!t.update(50)); // not sequential: probation again
        assert!(t.in_probation());
        assert!(t.update(51));
        assert_eq!(t.expected(), 1);
    }

    #[test]
    fn wraparound_extends_the_sequence() {
        let mut t = SequenceTracker::new(65_530);
        feed(&mut t, (65_530..=65_535).chain(0..=9));
        assert_eq!(t.extended_max(), 65_536 + 9);
        assert_eq!(t.expected(), 15);
        assert_eq!(t.received(), 15);
        // A second wrap.
        let mut seq: u16 = 10;
        for _ in 0..65_536 {
            t.update(seq);
            seq = seq.wrapping_add(1);
        }
        assert_eq!(t.extended_max(), 2 * 65_536 + 9);
        assert_eq!(t.lost(), 0);
    }

    #[test]
    fn loss_duplicates_and_reordering() {
        let mut t = SequenceTracker::new(0);
        feed(&mut t, [0, 1, 2, 4, 3, 5, 5, 8, 9]);
        // Counted: 1..=9 except 6 and 7, with 5 twice => received 8, expected 9 (1..=9).
        assert_eq!(t.expected(), 9);
        assert_eq!(t.received(), 8);
        assert_eq!(t.lost(), 1);
        assert_eq!(t.cumulative_lost(), 1);
        // fraction lost over the interval: 1 of 9 -> 28/256.
        assert_eq!(t.take_fraction_lost(), (256u64 / 9) as u8);
        // Next interval: 10 packets, none lost.
        feed(&mut t, 10..20);
        assert_eq!(t.take_fraction_lost(), 0);
        // Next: 10 expected, 5 received.
        feed(&mut t, (20..30).filter(|s| s % 2 == 0));
        t.update(30);
        assert_eq!(t.take_fraction_lost(), (5u64 * 256 / 11) as u8);
    }

    #[test]
    fn duplicates_make_loss_negative() {
        let mut t = SequenceTracker::new(0);
        feed(&mut t, [0, 1, 2, 2, 2]);
        assert_eq!(t.lost(), -2);
        assert_eq!(t.take_fraction_lost(), 0);
    }

    #[test]
    fn large_jump_needs_two_sequential_packets_to_restart() {
        let mut t = SequenceTracker::new(0);
        feed(&mut t, 0..=10);
        assert!(!t.update(40_000));
        assert_eq!(t.extended_max(), 10);
        assert!(t.update(40_001));
        assert_eq!(t.extended_max(), 40_001);
        assert_eq!(t.expected(), 1);
        assert_eq!(t.received(), 1);
    }

    #[test]
    fn jitter_is_zero_for_perfect_pacing() {
        let mut j = JitterEstimator::new();
        for i in 0..100u32 {
            j.update(1_000 + i * 160, i * 160);
        }
        assert_eq!(j.jitter_units(), 0);
    }

    #[test]
    fn jitter_converges_on_alternating_delay() {
        // Every other packet arrives 40 units late: |D| = 40 every packet, so J -> 40.
        let mut j = JitterEstimator::new();
        for i in 0..2_000u32 {
            let late = if i % 2 == 0 { 0 } else { 40 };
            j.update(i * 160 + late, i * 160);
        }
        assert!(
            (38..=40).contains(&j.jitter_units()),
            "{}",
            j.jitter_units()
        );
        assert_eq!(
            j.jitter(8_000),
            units_to_duration(u64::from(j.jitter_units()), 8_000)
        );
    }

    #[test]
    fn jitter_single_step_follows_a8() {
        let mut j = JitterEstimator::new();
        j.update(0, 0);
        j.update(160 + 32, 160); // D = 32 => J = 32/16 = 2
        assert_eq!(j.jitter_units(), 2);
        j.update(320 + 32, 320); // D = 0 => J = 2 - 2/16
        assert_eq!(j.jitter_units(), 1);
    }

    #[test]
    fn jitter_handles_timestamp_wrap() {
        let mut j = JitterEstimator::new();
        let start = u32::MAX - 320;
        for i in 0..10u32 {
            j.update(i.wrapping_mul(160), start.wrapping_add(i * 160));
        }
        assert_eq!(j.jitter_units(), 0);
    }

    #[test]
    fn arrival_unit_conversion() {
        assert_eq!(arrival_units(Duration::from_millis(20), 8_000), 160);
        assert_eq!(arrival_units(Duration::from_millis(20), 48_000), 960);
        assert_eq!(units_to_duration(160, 8_000), Duration::from_millis(20));
        assert_eq!(units_to_duration(160, 0), Duration::ZERO);
    }

    #[test]
    fn histogram_buckets_cover_the_range_monotonically() {
        let mut last = 0;
        for nanos in (0..100_000u64).chain([1 << 30, 1 << 39, (1 << 40) - 1]) {
            let index = bucket_index(nanos);
            assert!(index >= last);
            let (low, high) = bucket_bounds(index);
            assert!(low <= nanos && nanos < high, "{nanos} in {low}..{high}");
            last = index;
        }
        assert_eq!(bucket_index(u64::MAX), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn histogram_percentiles() {
        let mut h = LatencyHistogram::new();
        assert_eq!(h.percentile(0.5), Duration::ZERO);
        for us in 1..=100u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.percentile(0.5).as_nanos() as f64;
        let p99 = h.percentile(0.99).as_nanos() as f64;
        assert!((p50 - 50_000.0).abs() / 50_000.0 < 0.13, "{p50}");
        assert!((p99 - 99_000.0).abs() / 99_000.0 < 0.13, "{p99}");
        assert_eq!(h.count(), 100);
        assert_eq!(h.mean(), Duration::from_nanos(50_500));
        assert_eq!(h.max(), Duration::from_micros(100));
        assert!(h.percentile(1.0) <= h.max());
        let mut other = LatencyHistogram::new();
        other.record(Duration::from_secs(1));
        h.merge(&other);
        assert_eq!(h.count(), 101);
        assert_eq!(h.max(), Duration::from_secs(1));
        let summary = h.summary();
        assert_eq!(summary.count, 101);
        assert!(summary.p99 < Duration::from_millis(1));
    }
}
