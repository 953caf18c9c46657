//! Per-source admission of new server transactions: what keeps one address from taking the
//! transaction table (and the work behind it) from everybody else.
//!
//! [`SourceLimiter`] decides, for a request that would create a server transaction, whether its
//! source IP address may have one: a token bucket per address (`rate` new transactions per
//! second, up to `burst` at once) and a share of the live server transactions per address
//! (`max_live`). A source over a limit is answered 503 with Retry-After; a source that keeps
//! sending while refused (its bucket `burst` tokens in debt) is not answered at all, so a flood
//! gets no amplification. Addresses on the exempt list (the trusted carrier, the balancer) are
//! limited only by the table's size. The limiter is sans-IO: it is given `now` and reads no
//! clock. It does not see retransmissions (they match a live transaction first) or ACKs, and it
//! cannot tell a spoofed UDP source from a real one: a distributed or spoofed flood is bounded
//! by the table's total size only.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Limits per source address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceLimits {
    /// New server transactions per second from one address (0: no rate limit).
    pub rate: u32,
    /// New server transactions one address may start at once before `rate` applies.
    pub burst: u32,
    /// Live server transactions from one address (0: no share limit).
    pub max_live: usize,
    /// Addresses tracked at once; beyond it, idle ones are forgotten, and when none is idle a
    /// new address is refused.
    pub max_sources: usize,
}

impl Default for SourceLimits {
    fn default() -> Self {
        Self {
            rate: 50,
            burst: 100,
            max_live: 4_096,
            max_sources: 65_536,
        }
    }
}

/// The limiter's verdict on a new server transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Create it.
    Admit,
    /// Answer 503 with `Retry-After: retry_after` (seconds).
    Refuse {
        /// Which limit.
        reason: Refusal,
        /// Seconds until the source may try again.
        retry_after: u32,
    },
    /// Send nothing: the source keeps flooding while refused.
    Drop,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The source's rate of new transactions.
    Rate,
    /// The source's share of live transactions.
    Share,
    /// Too many sources tracked at once.
    Sources,
}

/// Counters of refusals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdmissionStats {
    /// Refused (503) for the source's rate.
    pub refused_rate: u64,
    /// Refused (503) for the source's share of live transactions.
    pub refused_share: u64,
    /// Refused (503) because too many sources were tracked.
    pub refused_sources: u64,
    /// Dropped without an answer (a source flooding while refused).
    pub dropped: u64,
}

#[derive(Debug)]
struct Source {
    tokens: f64,
    refilled: Instant,
    live: usize,
}

/// Token buckets and live counts per source address.
#[derive(Debug)]
pub struct SourceLimiter {
    limits: SourceLimits,
    exempt: Vec<ipnet::IpNet>,
    sources: HashMap<IpAddr, Source>,
    stats: AdmissionStats,
}

impl SourceLimiter {
    /// A limiter with `limits`, exempting the addresses in `exempt`.
    pub fn new(limits: SourceLimits, exempt: Vec<ipnet::IpNet>) -> Self {
        Self {
            limits,
            exempt,
            sources: HashMap::new(),
            stats: AdmissionStats::default(),
        }
    }

    /// New limits and exempt addresses (a configuration reload). What it tracks stays: the
    /// live transactions of each source still count against its share, and a source that
    /// was refused stays in debt.
    pub fn reconfigure(&mut self, limits: SourceLimits, exempt: Vec<ipnet::IpNet>) {
        self.limits = limits;
        self.exempt = exempt;
    }

    /// Whether `ip` is exempt from the per-source limits.
    pub fn is_exempt(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.exempt.iter().any(|net| net.contains(&ip))
    }

    /// The verdict for a new server transaction from `ip` at `now`. When it is
    /// [`Admission::Admit`], the caller creates the transaction and later calls
    /// [`SourceLimiter::release`] with the same address when it ends.
    pub fn admit(&mut self, now: Instant, ip: IpAddr) -> Admission {
        let ip = canonical(ip);
        if self.is_exempt(ip) {
            return Admission::Admit;
        }
        if !self.sources.contains_key(&ip) && self.sources.len() >= self.limits.max_sources {
            self.forget_idle(now);
            if self.sources.len() >= self.limits.max_sources {
                self.stats.refused_sources += 1;
                return Admission::Refuse {
                    reason: Refusal::Sources,
                    retry_after: 5,
                };
            }
        }
        let limits = self.limits;
        let (rate, burst) = (f64::from(limits.rate), f64::from(limits.burst));
        let source = self.sources.entry(ip).or_insert(Source {
            tokens: burst,
            refilled: now,
            live: 0,
        });
        if limits.rate > 0 {
            let elapsed = now.saturating_duration_since(source.refilled).as_secs_f64();
            source.tokens = (source.tokens + elapsed * rate).min(burst);
            source.refilled = now;
            if source.tokens < 1.0 {
                // Refused requests still cost a token, down to `burst` in debt: a source that
                // keeps sending stays refused, and past the debt it gets no answers at all.
                if source.tokens <= -burst {
                    self.stats.dropped += 1;
                    return Admission::Drop;
                }
                source.tokens -= 1.0;
                self.stats.refused_rate += 1;
                let wait = (1.0 - source.tokens) / rate;
                return Admission::Refuse {
                    reason: Refusal::Rate,
                    retry_after: seconds(wait),
                };
            }
        }
        if limits.max_live > 0 && source.live >= limits.max_live {
            self.stats.refused_share += 1;
            return Admission::Refuse {
                reason: Refusal::Share,
                retry_after: 5,
            };
        }
        source.tokens -= 1.0;
        source.live += 1;
        Admission::Admit
    }

    /// A transaction admitted for `ip` ended.
    pub fn release(&mut self, ip: IpAddr) {
        let ip = canonical(ip);
        if let Some(source) = self.sources.get_mut(&ip) {
            source.live = source.live.saturating_sub(1);
        }
    }

    /// Refusal counters.
    pub fn stats(&self) -> AdmissionStats {
        self.stats
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.sources.len()
    }

    /// Forgets sources with nothing live whose bucket has filled again.
    fn forget_idle(&mut self, now: Instant) {
        let (rate, burst) = (f64::from(self.limits.rate), f64::from(self.limits.burst));
        self.sources.retain(|_, s| {
            let full_after = if rate > 0.0 {
                Duration::try_from_secs_f64(((burst - s.tokens) / rate).max(0.0))
                    .unwrap_or(Duration::MAX)
            } else {
                Duration::ZERO
            };
            s.live > 0 || now.saturating_duration_since(s.refilled) < full_after
        });
    }
}

/// IPv4-mapped IPv6 addresses count as their IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whole seconds, at least 1, at most an hour.
fn seconds(secs: f64) -> u32 {
    if secs.is_finite() {
        secs.ceil().clamp(1.0, 3600.0) as u32
    } else {
        3600
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn limiter(rate: u32, burst: u32, max_live: usize) -> SourceLimiter {
        SourceLimiter::new(
            SourceLimits {
                rate,
                burst,
                max_live,
                max_sources: 4,
            },
            vec!["10.0.0.0/8".parse().unwrap()],
        )
    }

    #[test]
    fn a_burst_then_the_rate_then_silence() {
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let mut l = limiter(10, 5, 0);
        let a = ip("192.0.2.1");
        for _ in 0..5 {
            assert_eq!(l.admit(t0, a), Admission::Admit);
        }
        // Over the burst: refused with a Retry-After, five more times (the debt), then dropped.
        for _ in 0..5 {
            assert!(matches!(
                l.admit(t0, a),
                Admission::Refuse {
                    reason: Refusal::Rate,
                    retry_after: 1
                }
            ));
        }
        assert_eq!(l.admit(t0, a), Admission::Drop);
        assert_eq!(l.admit(t0, a), Admission::Drop);
        // Another address is not affected.
        assert_eq!(l.admit(t0, ip("192.0.2.2")), Admission::Admit);
        // After the debt is paid back (5 tokens at 10/s, + 0.5 s), one more is admitted.
        let later = t0 + Duration::from_millis(1_100);
        assert_eq!(l.admit(later, a), Admission::Admit);
        let s = l.stats();
        assert_eq!((s.refused_rate, s.dropped), (5, 2));
    }

    #[test]
    fn the_share_of_live_transactions_is_per_source() {
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let mut l = limiter(0, 0, 2);
        let a = ip("192.0.2.1");
        assert_eq!(l.admit(t0, a), Admission::Admit);
        assert_eq!(l.admit(t0, a), Admission::Admit);
        assert!(matches!(
            l.admit(t0, a),
            Admission::Refuse {
                reason: Refusal::Share,
                ..
            }
        ));
        assert_eq!(l.admit(t0, ip("192.0.2.2")), Admission::Admit);
        l.release(a);
        assert_eq!(l.admit(t0, a), Admission::Admit);
        assert_eq!(l.stats().refused_share, 1);
    }

    #[test]
    fn reconfigure_keeps_what_each_source_holds() {
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let mut l = limiter(0, 0, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(l.admit(t0, a), Admission::Admit);
        assert_eq!(l.admit(t0, a), Admission::Admit);
        assert!(matches!(l.admit(t0, a), Admission::Refuse { .. }));
        // Exempt now: admitted whatever it holds.
        let all: ipnet::IpNet = "192.0.2.0/24".parse().unwrap();
        let limits = l.limits;
        l.reconfigure(limits, vec![all]);
        assert_eq!(l.admit(t0, a), Admission::Admit);
        // No longer exempt, and a share of 3: its two live transactions still count.
        l.reconfigure(
            SourceLimits {
                max_live: 3,
                ..limits
            },
            Vec::new(),
        );
        assert_eq!(l.admit(t0, a), Admission::Admit);
        assert!(matches!(l.admit(t0, a), Admission::Refuse { .. }));
    }

    #[test]
    fn exempt_sources_are_not_limited_and_mapped_addresses_are_one_source() {
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let mut l = limiter(1, 1, 1);
        for _ in 0..100 {
            assert_eq!(l.admit(t0, ip("10.1.2.3")), Admission::Admit);
        }
        assert_eq!(l.admit(t0, ip("192.0.2.9")), Admission::Admit);
        assert_ne!(l.admit(t0, ip("::ffff:192.0.2.9")), Admission::Admit);
        assert!(l.is_exempt(ip("::ffff:10.0.0.1")));
    }

    #[test]
    fn the_source_table_is_bounded_and_idle_sources_are_forgotten() {
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let mut l = limiter(10, 1, 0);
        for i in 1..=4 {
            assert_eq!(l.admit(t0, ip(&format!("192.0.2.{i}"))), Admission::Admit);
        }
        // Their transactions end; until their buckets refill they are still remembered.
        for i in 1..=4 {
            l.release(ip(&format!("192.0.2.{i}")));
        }
        // Full, and every bucket is still refilling: a fifth address is refused.
        assert!(matches!(
            l.admit(t0, ip("192.0.2.5")),
            Admission::Refuse {
                reason: Refusal::Sources,
                ..
            }
        ));
        // A second later their buckets are full again: they are forgotten, the fifth gets in.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(l.admit(later, ip("192.0.2.5")), Admission::Admit);
        assert_eq!(l.tracked(), 1);
    }
}
