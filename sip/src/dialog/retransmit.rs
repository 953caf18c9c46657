//! Retransmission of a 2xx to an INVITE until its ACK arrives (RFC 3261 section 13.3.1.4, with
//! RFC 6026 which leaves this to the transaction user, not the INVITE server transaction).
//!
//! [`Pending2xx`] is a sans-IO timer: the 2xx is passed again to the transport at T1, then at
//! intervals that double up to T2, until a matching ACK arrives; after 64*T1 without ACK it gives
//! up, and the dialog should then be ended with a BYE (section 13.3.1.4). The caller passes the
//! current `Instant`; nothing here reads a clock or sends anything.

use std::time::{Duration, Instant};

use crate::message::{Method, Request, Response};

use super::error::DialogError;

/// The timer values the 2xx retransmission uses (RFC 3261 section 17.1.1.1 and table 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetransmitTimers {
    /// Round-trip time estimate; first retransmission interval (default 500 ms).
    pub t1: Duration,
    /// Largest retransmission interval (default 4 s).
    pub t2: Duration,
}

impl RetransmitTimers {
    /// RFC 3261 defaults: T1 = 500 ms, T2 = 4 s.
    pub const DEFAULT: RetransmitTimers = RetransmitTimers {
        t1: Duration::from_millis(500),
        t2: Duration::from_secs(4),
    };

    /// Largest accepted T1 (larger values are clamped, so that 64*T1 stays reasonable).
    pub const MAX_T1: Duration = Duration::from_secs(60);

    /// The values actually used: T1 between 1 ms and [`RetransmitTimers::MAX_T1`], T2 at least
    /// T1 and at most 64*T1.
    pub fn clamped(self) -> RetransmitTimers {
        let t1 = self.t1.clamp(Duration::from_millis(1), Self::MAX_T1);
        let t2 = self.t2.clamp(t1, t1 * 64);
        RetransmitTimers { t1, t2 }
    }

    /// How long the 2xx is retransmitted without ACK before giving up: 64*T1.
    pub fn ack_wait(self) -> Duration {
        self.clamped().t1 * 64
    }
}

impl Default for RetransmitTimers {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What [`Pending2xx::handle_timeout`] asks the caller to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending2xxAction {
    /// Nothing now (called early, or already finished).
    Wait,
    /// Pass [`Pending2xx::response`] to the transport again.
    Retransmit,
    /// 64*T1 passed without ACK: stop, and end the dialog with a BYE.
    GiveUp,
}

/// A 2xx to an INVITE being retransmitted until its ACK (RFC 3261 section 13.3.1.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending2xx {
    response: Response,
    cseq: u32,
    t2: Duration,
    interval: Duration,
    next: Instant,
    deadline: Instant,
    retransmissions: u32,
    acknowledged: bool,
    gave_up: bool,
}

impl Pending2xx {
    /// Starts the retransmission of `response`, sent (for the first time) at `now`.
    ///
    /// Fails unless `response` is a 2xx whose CSeq method is INVITE.
    pub fn new(
        response: Response,
        now: Instant,
        timers: RetransmitTimers,
    ) -> Result<Pending2xx, DialogError> {
        let cseq = response.headers.cseq()?;
        if !response.is_success() || cseq.method != Method::Invite {
            return Err(DialogError::NotInvite2xx);
        }
        let timers = timers.clamped();
        Ok(Pending2xx {
            cseq: cseq.seq,
            t2: timers.t2,
            interval: timers.t1,
            next: now + timers.t1,
            deadline: now + timers.ack_wait(),
            retransmissions: 0,
            acknowledged: false,
            gave_up: false,
            response,
        })
    }

    /// The 2xx being retransmitted.
    pub fn response(&self) -> &Response {
        &self.response
    }

    /// The CSeq number of the INVITE (and of the expected ACK).
    pub fn cseq(&self) -> u32 {
        self.cseq
    }

    /// How many times the 2xx was retransmitted so far.
    pub fn retransmissions(&self) -> u32 {
        self.retransmissions
    }

    /// True once the ACK arrived.
    pub fn is_acknowledged(&self) -> bool {
        self.acknowledged
    }

    /// True once the ACK arrived or 64*T1 passed.
    pub fn is_finished(&self) -> bool {
        self.acknowledged || self.gave_up
    }

    /// When [`Pending2xx::handle_timeout`] should be called next; `None` once finished.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.is_finished()).then(|| self.next.min(self.deadline))
    }

    /// Advances the timer to `now`: retransmit when the interval has elapsed (the next interval
    /// doubles, up to T2), give up at 64*T1.
    pub fn handle_timeout(&mut self, now: Instant) -> Pending2xxAction {
        if self.is_finished() {
            return Pending2xxAction::Wait;
        }
        if now >= self.deadline {
            self.gave_up = true;
            return Pending2xxAction::GiveUp;
        }
        if now < self.next {
            return Pending2xxAction::Wait;
        }
        self.retransmissions = self.retransmissions.saturating_add(1);
        self.interval = (self.interval * 2).min(self.t2);
        self.next = now + self.interval;
        Pending2xxAction::Retransmit
    }

    /// True when `ack` acknowledges this 2xx: an ACK with the same Call-ID, tags and CSeq number.
    pub fn ack_matches(&self, ack: &Request) -> bool {
        let headers = &self.response.headers;
        ack.method == Method::Ack
            && ack.headers.cseq().is_ok_and(|c| c.seq == self.cseq)
            && ack.headers.call_id().ok().is_some()
            && ack.headers.call_id().ok() == headers.call_id().ok()
            && ack.headers.from_tag() == headers.from_tag()
            && ack.headers.to_tag() == headers.to_tag()
    }

    /// Stops the retransmission when `ack` matches ([`Pending2xx::ack_matches`]); returns
    /// whether it did.
    pub fn handle_ack(&mut self, ack: &Request) -> bool {
        if self.is_finished() || !self.ack_matches(ack) {
            return false;
        }
        self.acknowledged = true;
        true
    }
}
