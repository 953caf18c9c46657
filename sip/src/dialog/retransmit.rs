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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialog::test_support::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn ack(cseq: u32) -> Request {
        request(&format!(
            "ACK sip:bob@192.0.2.4 SIP/2.0
Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bKack
Max-Forwards: 70
To: Bob <sip:bob@biloxi.example.com>;tag=a6c85cf
From: \"Alice A.\" <sip:alice@atlanta.example.com>;tag=1928301774
Call-ID: a84b4c76e66710@pc33.atlanta.example.com
CSeq: {cseq} ACK
Content-Length: 0

"
        ))
    }

    /// Runs the timer from `start` until it finishes or `limit` passes, firing exactly at each
    /// `poll_timeout`; returns the instants (offsets from `start`) of each action.
    fn run(
        p: &mut Pending2xx,
        start: Instant,
        limit: Duration,
    ) -> Vec<(Duration, Pending2xxAction)> {
        let mut out = Vec::new();
        while let Some(at) = p.poll_timeout() {
            if at - start > limit {
                break;
            }
            // Too early does nothing.
            if at > start {
                assert_eq!(p.handle_timeout(at - ms(1)), Pending2xxAction::Wait);
            }
            let action = p.handle_timeout(at);
            assert_ne!(action, Pending2xxAction::Wait);
            out.push((at - start, action));
        }
        out
    }

    #[test]
    fn schedule_doubles_from_t1_up_to_t2_and_gives_up_at_64_t1() {
        let start = Instant::now();
        let mut p =
            Pending2xx::new(ok_with_record_route(), start, RetransmitTimers::DEFAULT).unwrap();
        assert_eq!(p.cseq(), 314159);
        let events = run(&mut p, start, Duration::from_secs(60));
        let retransmits: Vec<u64> = events
            .iter()
            .filter(|(_, a)| *a == Pending2xxAction::Retransmit)
            .map(|(t, _)| t.as_millis() as u64)
            .collect();
        // T1, +2T1, +4T1, then every T2 = 4 s.
        assert_eq!(
            retransmits,
            [500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500]
        );
        assert_eq!(events.last(), Some(&(ms(32_000), Pending2xxAction::GiveUp)));
        assert_eq!(p.retransmissions(), 10);
        assert!(p.is_finished() && !p.is_acknowledged());
        assert_eq!(p.poll_timeout(), None);
        assert_eq!(p.handle_timeout(start + ms(40_000)), Pending2xxAction::Wait);
    }

    #[test]
    fn custom_timers() {
        let start = Instant::now();
        let timers = RetransmitTimers {
            t1: ms(100),
            t2: ms(300),
        };
        assert_eq!(timers.ack_wait(), ms(6400));
        let mut p = Pending2xx::new(ok_with_record_route(), start, timers).unwrap();
        let times: Vec<u64> = run(&mut p, start, Duration::from_secs(10))
            .iter()
            .map(|(t, _)| t.as_millis() as u64)
            .take(5)
            .collect();
        assert_eq!(times, [100, 300, 600, 900, 1200]);
        // Absurd values are clamped.
        let clamped = RetransmitTimers {
            t1: Duration::ZERO,
            t2: Duration::from_secs(1_000_000),
        }
        .clamped();
        assert_eq!(clamped.t1, ms(1));
        assert_eq!(clamped.t2, ms(64));
    }

    #[test]
    fn the_ack_stops_the_retransmissions() {
        let start = Instant::now();
        let mut p =
            Pending2xx::new(ok_with_record_route(), start, RetransmitTimers::DEFAULT).unwrap();
        assert_eq!(
            p.handle_timeout(start + ms(500)),
            Pending2xxAction::Retransmit
        );
        assert_eq!(p.poll_timeout(), Some(start + ms(1500)));
        assert!(!p.handle_ack(&ack(314158)), "ACK of another INVITE");
        let mut other_dialog = ack(314159);
        other_dialog.headers.set(
            crate::message::HeaderName::To,
            "Bob <sip:bob@biloxi.example.com>;tag=other",
        );
        assert!(!p.handle_ack(&other_dialog));
        assert!(p.handle_ack(&ack(314159)));
        assert!(p.is_acknowledged() && p.is_finished());
        assert_eq!(p.poll_timeout(), None);
        assert_eq!(p.handle_timeout(start + ms(1500)), Pending2xxAction::Wait);
        assert!(!p.handle_ack(&ack(314159)), "only once");
        assert_eq!(p.retransmissions(), 1);
    }

    #[test]
    fn only_a_2xx_to_an_invite_is_retransmitted() {
        let now = Instant::now();
        let ringing = invite_response(180, "a6c85cf", "");
        assert_eq!(
            Pending2xx::new(ringing, now, RetransmitTimers::DEFAULT),
            Err(DialogError::NotInvite2xx)
        );
        let bye_ok = edit_response(&ok_with_record_route(), "314159 INVITE", "2 BYE");
        assert_eq!(
            Pending2xx::new(bye_ok, now, RetransmitTimers::DEFAULT),
            Err(DialogError::NotInvite2xx)
        );
        let mut no_cseq = ok_with_record_route();
        no_cseq.headers.remove(&crate::message::HeaderName::CSeq);
        assert!(matches!(
            Pending2xx::new(no_cseq, now, RetransmitTimers::DEFAULT),
            Err(DialogError::Header(_))
        ));
    }
}
