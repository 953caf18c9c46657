//! The two server transaction state machines: INVITE (RFC 3261 section 17.2.1 with the RFC 6026
//! Accepted state) and non-INVITE (section 17.2.2).
//!
//! ```text
//! INVITE:      Proceeding --2xx from TU--> Accepted --L--> Terminated
//!                  '--300-699 from TU--> Completed --ACK--> Confirmed --I--> Terminated
//!                                           '--H (no ACK) / transport error--> Terminated
//! non-INVITE:  Trying --1xx--> Proceeding --final--> Completed --J--> Terminated
//!                 '--final--> Completed
//! ```
//!
//! The INVITE machine sends 100 Trying itself when the TU has not responded within
//! [`TransactionConfig::trying_delay`](super::TransactionConfig::trying_delay) (timer
//! [`Timer::Trying`]), or at once when a retransmission of the INVITE arrives first. In Accepted
//! it absorbs INVITE retransmissions, passes the ACKs that match it to the TU, sends the 2xx
//! retransmissions the TU hands it, and survives transport errors (RFC 6026 figure 7).
//! Retransmitting a 2xx until its ACK arrives is the TU's job (RFC 3261 section 13.3.1.4), not
//! this module's.

use std::time::Duration;

use bytes::Bytes;

use super::ctx::{Ctx, Step, TxTimers};
use super::peer::Peer;
use super::timer::Timer;
use super::types::TransactionState;
use super::types::{TransactionError, TransactionEvent};
use crate::message::{Request, Response};

/// The To tags an RFC 2543 server transaction is matched with (section 17.2.3).
#[derive(Debug, Clone, Default)]
pub(crate) struct LegacyTags {
    /// To tag of the request that created the transaction (matches its retransmissions and the
    /// CANCEL).
    pub request: Option<Box<str>>,
    /// To tag of the final response sent (matches the ACK).
    pub response: Option<Box<str>>,
}

/// What became of an ACK matched to an INVITE server transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckDisposition {
    /// Absorbed by the transaction (ACK of a non-2xx, or stray).
    Absorbed(Step),
    /// To be passed to the TU (Accepted state).
    PassUp,
}

/// One server transaction, INVITE or not.
#[derive(Debug)]
pub(crate) struct ServerTransaction {
    pub invite: bool,
    pub state: TransactionState,
    /// Where responses go (section 18.2.2).
    pub destination: Peer,
    provisional: Option<Bytes>,
    final_response: Option<Bytes>,
    /// The 100 Trying to send if the TU stays silent.
    trying: Option<Response>,
    pub legacy: Option<LegacyTags>,
    /// Current interval of timer G.
    interval: Duration,
    pub timers: TxTimers,
}

impl ServerTransaction {
    /// A transaction for a new `request` (not an ACK) whose responses go to `destination`.
    pub fn start(
        ctx: &mut Ctx<'_>,
        request: &Request,
        destination: Peer,
        trying_delay: Duration,
        legacy: Option<LegacyTags>,
    ) -> Self {
        let invite = request.method == crate::message::Method::Invite;
        let mut tx = Self {
            invite,
            state: if invite {
                TransactionState::Proceeding
            } else {
                TransactionState::Trying
            },
            destination,
            provisional: None,
            final_response: None,
            trying: None,
            legacy,
            interval: ctx.config.first_retransmit(),
            timers: TxTimers::default(),
        };
        if invite {
            let trying = Response::from_request(request, 100, None);
            if trying_delay.is_zero() {
                tx.send_provisional(ctx, trying.to_bytes());
            } else {
                tx.trying = Some(trying);
                tx.timers.retransmit = ctx.arm(Timer::Trying, trying_delay);
            }
        }
        tx
    }

    fn send_provisional(&mut self, ctx: &mut Ctx<'_>, bytes: Bytes) {
        ctx.send(&self.destination, bytes.clone(), false);
        self.provisional = Some(bytes);
    }

    /// Sends the 100 Trying now if it is still owed.
    fn send_owed_trying(&mut self, ctx: &mut Ctx<'_>) -> bool {
        match self.trying.take() {
            Some(trying) if self.provisional.is_none() => {
                self.timers.retransmit = None;
                self.send_provisional(ctx, trying.to_bytes());
                true
            }
            _ => false,
        }
    }

    /// A retransmission of the request arrived.
    pub fn on_retransmission(&mut self, ctx: &mut Ctx<'_>) {
        use TransactionState::{Completed, Proceeding};
        match self.state {
            Proceeding => {
                if self.send_owed_trying(ctx) {
                    return;
                }
                if let Some(p) = &self.provisional {
                    ctx.send(&self.destination, p.clone(), true);
                }
            }
            Completed => {
                if let Some(f) = &self.final_response {
                    ctx.send(&self.destination, f.clone(), true);
                }
            }
            // Trying (non-INVITE): discarded; Confirmed and Accepted: absorbed.
            _ => {}
        }
    }

    /// An ACK matched this INVITE transaction.
    pub fn on_ack(&mut self, ctx: &mut Ctx<'_>) -> AckDisposition {
        match self.state {
            TransactionState::Completed => {
                self.state = TransactionState::Confirmed;
                self.timers.clear();
                let wait = ctx.config.timer_i(self.destination.is_reliable());
                if wait.is_zero() {
                    return AckDisposition::Absorbed(Step::Terminate);
                }
                self.timers.state = ctx.arm(Timer::I, wait);
                AckDisposition::Absorbed(Step::Continue)
            }
            TransactionState::Accepted => AckDisposition::PassUp,
            // Confirmed: retransmitted ACK; Proceeding: an ACK before any final response.
            _ => AckDisposition::Absorbed(Step::Continue),
        }
    }

    /// The TU hands a response (status already checked to be 100..=699).
    pub fn respond(
        &mut self,
        ctx: &mut Ctx<'_>,
        response: Response,
    ) -> Result<Step, TransactionError> {
        use TransactionState::{Accepted, Completed, Proceeding, Trying};
        let status = response.status;
        let refuse = |state| Err(TransactionError::ResponseNotAllowed { status, state });
        match (self.invite, self.state) {
            (true, Proceeding) if status < 200 => {
                self.trying = None;
                self.timers.retransmit = None;
                self.send_provisional(ctx, response.to_bytes());
                Ok(Step::Continue)
            }
            (true, Proceeding) => {
                self.trying = None;
                self.timers.clear();
                self.record_response_tag(&response);
                let bytes = response.to_bytes();
                ctx.send(&self.destination, bytes.clone(), false);
                if status < 300 {
                    self.state = Accepted;
                    self.timers.state = ctx.arm(Timer::L, ctx.config.timer_l());
                } else {
                    self.state = Completed;
                    self.final_response = Some(bytes);
                    if !self.destination.is_reliable() {
                        self.interval = ctx.config.first_retransmit();
                        self.timers.retransmit = ctx.arm(Timer::G, self.interval);
                    }
                    self.timers.state = ctx.arm(Timer::H, ctx.config.timer_h());
                }
                Ok(Step::Continue)
            }
            (true, Accepted) if (200..300).contains(&status) => {
                ctx.send(&self.destination, response.to_bytes(), false);
                Ok(Step::Continue)
            }
            (false, Trying | Proceeding) if status < 200 => {
                self.state = Proceeding;
                self.send_provisional(ctx, response.to_bytes());
                Ok(Step::Continue)
            }
            (false, Trying | Proceeding) => {
                self.state = Completed;
                let bytes = response.to_bytes();
                ctx.send(&self.destination, bytes.clone(), false);
                self.final_response = Some(bytes);
                let wait = ctx.config.timer_j(self.destination.is_reliable());
                if wait.is_zero() {
                    return Ok(Step::Terminate);
                }
                self.timers.state = ctx.arm(Timer::J, wait);
                Ok(Step::Continue)
            }
            (_, state) => refuse(state),
        }
    }

    fn record_response_tag(&mut self, response: &Response) {
        if let Some(legacy) = &mut self.legacy {
            legacy.response = response.headers.to_tag().map(Box::from);
        }
    }

    /// One of this transaction's timers fired.
    pub fn on_timer(&mut self, ctx: &mut Ctx<'_>, timer: Timer) -> Step {
        use TransactionState::{Completed, Proceeding};
        match (timer, self.state) {
            (Timer::Trying, Proceeding) => {
                self.send_owed_trying(ctx);
                Step::Continue
            }
            (Timer::G, Completed) => {
                if let Some(f) = &self.final_response {
                    ctx.send(&self.destination, f.clone(), true);
                }
                self.interval = self
                    .interval
                    .saturating_mul(2)
                    .min(ctx.config.retransmit_cap());
                self.timers.retransmit = ctx.arm(Timer::G, self.interval);
                Step::Continue
            }
            (Timer::H, Completed) => {
                let key = ctx.key;
                ctx.emit(TransactionEvent::Timeout { key, timer });
                Step::Terminate
            }
            (Timer::I | Timer::J | Timer::L, _) => Step::Terminate,
            _ => Step::Continue,
        }
    }

    /// The transport could not send a response: the TU is told; the transaction ends except in
    /// Accepted, where the TU's 2xx retransmissions may still get through (RFC 6026).
    pub fn on_transport_error(&mut self, ctx: &mut Ctx<'_>) -> Step {
        let key = ctx.key;
        ctx.emit(TransactionEvent::TransportError { key });
        if self.state == TransactionState::Accepted {
            Step::Continue
        } else {
            Step::Terminate
        }
    }
}
