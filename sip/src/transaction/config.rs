//! Timer values (RFC 3261 section 17 and table 4, RFC 6026 timers L and M) and the limits of a
//! [`TransactionLayer`](super::TransactionLayer).
//!
//! Every timer is derived from T1, T2 and T4 here, in one place, including the reliable-transport
//! rules (no request or response retransmissions, zero wait timers D, I, J and K). This module
//! keeps no state and reads no clock.

use std::time::Duration;

/// The three base timer values of RFC 3261 section 17 (table 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerConfig {
    /// RTT estimate: first retransmission interval; 500 ms by default.
    pub t1: Duration,
    /// Longest retransmission interval of non-INVITE requests and INVITE responses; 4 s by
    /// default.
    pub t2: Duration,
    /// Longest time a message stays in the network; 5 s by default.
    pub t4: Duration,
}

impl Default for TimerConfig {
    fn default() -> Self {
        Self {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        }
    }
}

/// The shortest retransmission interval the layer uses whatever the configuration says, so that a
/// zero T1 or T2 cannot make [`TransactionLayer::handle_timeout`](super::TransactionLayer::handle_timeout)
/// spin.
pub const MIN_RETRANSMIT_INTERVAL: Duration = Duration::from_millis(1);

impl TimerConfig {
    /// 64*T1: timers B, F, H, L and M, the unreliable-transport timer J, and the wait for a
    /// final response after a CANCEL (RFC 3261 section 9.1).
    pub fn t1_x64(&self) -> Duration {
        self.t1.saturating_mul(64)
    }

    /// The first interval of timers A, E and G: T1 (at least [`MIN_RETRANSMIT_INTERVAL`]).
    pub fn first_retransmit(&self) -> Duration {
        self.t1.max(MIN_RETRANSMIT_INTERVAL)
    }

    /// The cap of timers E and G: T2 (at least [`MIN_RETRANSMIT_INTERVAL`]).
    pub fn retransmit_cap(&self) -> Duration {
        self.t2.max(MIN_RETRANSMIT_INTERVAL)
    }

    /// Timer B (INVITE client timeout, section 17.1.1.2): 64*T1.
    pub fn timer_b(&self) -> Duration {
        self.t1_x64()
    }

    /// Timer D (INVITE client wait for response retransmissions): zero on a reliable transport;
    /// otherwise at least 32 s (the RFC's "> 32 s"), and 64*T1 when that is longer so that it
    /// always covers the server's timer H.
    pub fn timer_d(&self, reliable: bool) -> Duration {
        if reliable {
            Duration::ZERO
        } else {
            Duration::from_secs(32).max(self.t1_x64())
        }
    }

    /// Timer F (non-INVITE client timeout, section 17.1.2.2): 64*T1.
    pub fn timer_f(&self) -> Duration {
        self.t1_x64()
    }

    /// Timer H (INVITE server wait for ACK, section 17.2.1): 64*T1.
    pub fn timer_h(&self) -> Duration {
        self.t1_x64()
    }

    /// Timer I (INVITE server wait for ACK retransmissions): T4, zero on a reliable transport.
    pub fn timer_i(&self, reliable: bool) -> Duration {
        if reliable {
            Duration::ZERO
        } else {
            self.t4
        }
    }

    /// Timer J (non-INVITE server wait for request retransmissions, section 17.2.2): 64*T1, zero
    /// on a reliable transport.
    pub fn timer_j(&self, reliable: bool) -> Duration {
        if reliable {
            Duration::ZERO
        } else {
            self.t1_x64()
        }
    }

    /// Timer K (non-INVITE client wait for response retransmissions): T4, zero on a reliable
    /// transport.
    pub fn timer_k(&self, reliable: bool) -> Duration {
        if reliable {
            Duration::ZERO
        } else {
            self.t4
        }
    }

    /// Timer L (RFC 6026: INVITE server in Accepted, absorbing INVITE retransmissions): 64*T1.
    pub fn timer_l(&self) -> Duration {
        self.t1_x64()
    }

    /// Timer M (RFC 6026: INVITE client in Accepted, passing 2xx retransmissions up): 64*T1.
    pub fn timer_m(&self) -> Duration {
        self.t1_x64()
    }
}

/// Configuration of a [`TransactionLayer`](super::TransactionLayer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransactionConfig {
    /// T1, T2 and T4.
    pub timers: TimerConfig,
    /// Most live transactions (client and server together). A new client request over the limit
    /// is refused with [`TransactionError::TooManyTransactions`](super::TransactionError);
    /// a new server request over the limit is answered 503 statelessly by the layer. CANCELs
    /// the layer sends for its own INVITEs are not refused (there is at most one per INVITE).
    /// Default 131,072: completed transactions stay 64 x T1 (32 s) to absorb
    /// retransmissions, so a node taking R calls per second holds about 64 x R (an INVITE and
    /// a BYE per call), 2,000 calls per second at this default. Requests inside a dialog may
    /// go an eighth over it (see `TransactionLayer::handle_request`).
    pub max_transactions: usize,
    /// How long an INVITE server transaction waits for the TU's first response before it sends
    /// 100 Trying itself (RFC 3261 section 17.2.1: it MUST send one unless the TU answers within
    /// 200 ms). Default 200 ms; zero sends 100 Trying at once when the INVITE arrives.
    pub trying_delay: Duration,
    /// Limits on the server transactions one source address may start and hold
    /// ([`SourceLimiter`](super::SourceLimiter)); exempt addresses are given to
    /// [`TransactionLayer::set_exempt_sources`](super::TransactionLayer::set_exempt_sources).
    pub per_source: super::SourceLimits,
}

impl Default for TransactionConfig {
    fn default() -> Self {
        Self {
            timers: TimerConfig::default(),
            max_transactions: 131_072,
            trying_delay: Duration::from_millis(200),
            per_source: super::SourceLimits::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_rfc_values() {
        let t = TimerConfig::default();
        assert_eq!(t.t1, Duration::from_millis(500));
        assert_eq!(t.t2, Duration::from_secs(4));
        assert_eq!(t.t4, Duration::from_secs(5));
        assert_eq!(t.timer_b(), Duration::from_secs(32));
        assert_eq!(t.timer_f(), Duration::from_secs(32));
        assert_eq!(t.timer_h(), Duration::from_secs(32));
        assert_eq!(t.timer_l(), Duration::from_secs(32));
        assert_eq!(t.timer_m(), Duration::from_secs(32));
        assert_eq!(
            TransactionConfig::default().trying_delay,
            Duration::from_millis(200)
        );
    }

    #[test]
    fn reliable_transports_zero_the_wait_timers() {
        let t = TimerConfig::default();
        assert_eq!(t.timer_d(false), Duration::from_secs(32));
        assert_eq!(t.timer_d(true), Duration::ZERO);
        assert_eq!(t.timer_i(false), Duration::from_secs(5));
        assert_eq!(t.timer_i(true), Duration::ZERO);
        assert_eq!(t.timer_j(false), Duration::from_secs(32));
        assert_eq!(t.timer_j(true), Duration::ZERO);
        assert_eq!(t.timer_k(false), Duration::from_secs(5));
        assert_eq!(t.timer_k(true), Duration::ZERO);
    }

    #[test]
    fn timer_d_follows_a_larger_t1_and_extremes_do_not_overflow() {
        let t = TimerConfig {
            t1: Duration::from_secs(1),
            ..TimerConfig::default()
        };
        assert_eq!(t.timer_d(false), Duration::from_secs(64));
        let huge = TimerConfig {
            t1: Duration::MAX,
            t2: Duration::ZERO,
            t4: Duration::MAX,
        };
        assert_eq!(huge.timer_b(), Duration::MAX);
        assert_eq!(huge.retransmit_cap(), MIN_RETRANSMIT_INTERVAL);
        let zero = TimerConfig {
            t1: Duration::ZERO,
            t2: Duration::ZERO,
            t4: Duration::ZERO,
        };
        assert_eq!(zero.first_retransmit(), MIN_RETRANSMIT_INTERVAL);
    }
}
