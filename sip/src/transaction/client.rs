//! The two client transaction state machines: INVITE (RFC 3261 section 17.1.1 with the RFC 6026
//! Accepted state) and non-INVITE (section 17.1.2).
//!
//! ```text
//! INVITE:      Calling --1xx--> Proceeding --2xx--> Accepted --M--> Terminated
//!                 |  \--2xx--> Accepted        \--300-699 (ACK)--> Completed --D--> Terminated
//!                 |--300-699 (ACK)--> Completed
//!                 '--B / transport error--> Terminated (TU told)
//! non-INVITE:  Trying --1xx--> Proceeding --final--> Completed --K--> Terminated
//!                 '--final--> Completed;   Trying/Proceeding --F / transport error--> Terminated
//! ```
//!
//! A machine sends through the [`Ctx`] it is given and reports what the layer must do next as a
//! [`Step`]. It does not match messages to transactions, build the CANCEL (the layer does, see
//! [`TransactionLayer::cancel`](super::TransactionLayer::cancel)) or send the ACK of a 2xx (the
//! TU does: that ACK is a transaction of its own).

use std::time::Duration;

use bytes::Bytes;

use super::ctx::{Ctx, Step, TxTimers};
use super::key::TransactionKey;
use super::peer::Peer;
use super::timer::Timer;
use super::types::TransactionEvent;
use super::types::TransactionState;
use crate::message::{Request, Response};

/// Where a CANCEL for an INVITE client transaction stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CancelState {
    /// Not asked for.
    NotRequested,
    /// Asked for before any provisional response: sent when one arrives (RFC 3261 section 9.1).
    Deferred,
    /// Sent in this client transaction.
    Sent(TransactionKey),
}

/// One client transaction, INVITE or not.
#[derive(Debug)]
pub(crate) struct ClientTransaction {
    pub invite: bool,
    pub state: TransactionState,
    pub destination: Peer,
    /// The request as given by the TU (kept to build the ACK and the CANCEL, and for the
    /// dialogs of later forked 2xx).
    pub request: Request,
    /// The request as sent, for retransmissions; emptied once none can follow (an INVITE past
    /// Calling, a non-INVITE request past Proceeding), since the transaction may live on for
    /// up to 32 s (timers M, D, K).
    request_bytes: Bytes,
    /// The ACK of the non-2xx final response, re-sent on every retransmission of that response.
    ack_bytes: Option<Bytes>,
    pub cancel: CancelState,
    /// Current interval of timer A or E.
    interval: Duration,
    pub timers: TxTimers,
}

impl ClientTransaction {
    /// Sends `request` and arms A and B (INVITE) or E and F (non-INVITE); A and E only on an
    /// unreliable transport.
    pub fn start(ctx: &mut Ctx<'_>, request: Request, destination: Peer) -> Self {
        let invite = request.method == crate::message::Method::Invite;
        let request_bytes = request.to_bytes();
        ctx.send(&destination, request_bytes.clone(), false);
        let interval = ctx.config.first_retransmit();
        let mut timers = TxTimers::default();
        let (retransmit, timeout) = if invite {
            (Timer::A, (Timer::B, ctx.config.timer_b()))
        } else {
            (Timer::E, (Timer::F, ctx.config.timer_f()))
        };
        if !destination.is_reliable() {
            timers.retransmit = ctx.arm(retransmit, interval);
        }
        timers.state = ctx.arm(timeout.0, timeout.1);
        Self {
            invite,
            state: if invite {
                TransactionState::Calling
            } else {
                TransactionState::Trying
            },
            destination,
            request,
            request_bytes,
            ack_bytes: None,
            cancel: CancelState::NotRequested,
            interval,
            timers,
        }
    }

    /// How many bytes are kept for retransmitting the request.
    #[cfg(test)]
    pub fn retransmit_bytes(&self) -> usize {
        self.request_bytes.len()
    }

    /// A response matched to this transaction.
    pub fn on_response(&mut self, ctx: &mut Ctx<'_>, response: Response) -> Step {
        if self.invite {
            self.invite_response(ctx, response)
        } else {
            self.non_invite_response(ctx, response)
        }
    }

    fn pass_up(ctx: &mut Ctx<'_>, response: Response) {
        let key = ctx.key;
        ctx.emit(TransactionEvent::Response { key, response });
    }

    fn invite_response(&mut self, ctx: &mut Ctx<'_>, response: Response) -> Step {
        use TransactionState::{Accepted, Calling, Completed, Proceeding};
        let status = response.status;
        match self.state {
            Calling | Proceeding if status < 200 => {
                let was_calling = self.state == Calling;
                self.state = Proceeding;
                if was_calling {
                    // No more retransmissions, and timer B only guards Calling.
                    self.timers.clear();
                    self.request_bytes = Bytes::new();
                }
                Self::pass_up(ctx, response);
                if was_calling && self.cancel == CancelState::Deferred {
                    return Step::SendCancel;
                }
                Step::Continue
            }
            Calling | Proceeding if status < 300 => {
                self.state = Accepted;
                self.timers.clear();
                self.request_bytes = Bytes::new();
                if self.cancel == CancelState::Deferred {
                    self.cancel = CancelState::NotRequested;
                }
                self.timers.state = ctx.arm(Timer::M, ctx.config.timer_m());
                Self::pass_up(ctx, response);
                Step::Continue
            }
            Calling | Proceeding => {
                self.state = Completed;
                self.timers.clear();
                self.request_bytes = Bytes::new();
                if self.cancel == CancelState::Deferred {
                    self.cancel = CancelState::NotRequested;
                }
                // A response without To cannot be acknowledged; the transaction still completes.
                if let Ok(ack) = self.request.ack_for(&response) {
                    let bytes = ack.to_bytes();
                    ctx.send(&self.destination, bytes.clone(), false);
                    self.ack_bytes = Some(bytes);
                }
                Self::pass_up(ctx, response);
                let reliable = self.destination.is_reliable();
                self.linger(ctx, Timer::D, ctx.config.timer_d(reliable))
            }
            Completed if status >= 300 => {
                if let Some(ack) = &self.ack_bytes {
                    ctx.send(&self.destination, ack.clone(), true);
                }
                Step::Continue
            }
            Accepted if (200..300).contains(&status) => {
                Self::pass_up(ctx, response);
                Step::Continue
            }
            // 1xx after a final response, a 2xx after a non-2xx, a non-2xx after a 2xx.
            _ => Step::Continue,
        }
    }

    fn non_invite_response(&mut self, ctx: &mut Ctx<'_>, response: Response) -> Step {
        use TransactionState::{Completed, Proceeding, Trying};
        match self.state {
            Trying | Proceeding if response.status < 200 => {
                self.state = Proceeding;
                Self::pass_up(ctx, response);
                Step::Continue
            }
            Trying | Proceeding => {
                self.state = Completed;
                self.timers.clear();
                self.request_bytes = Bytes::new();
                Self::pass_up(ctx, response);
                let reliable = self.destination.is_reliable();
                self.linger(ctx, Timer::K, ctx.config.timer_k(reliable))
            }
            // Completed: retransmissions of the final response are absorbed.
            _ => Step::Continue,
        }
    }

    /// Arms a wait timer (D, K) or terminates at once when it is zero.
    fn linger(&mut self, ctx: &mut Ctx<'_>, timer: Timer, wait: Duration) -> Step {
        if wait.is_zero() {
            return Step::Terminate;
        }
        self.timers.state = ctx.arm(timer, wait);
        Step::Continue
    }

    /// One of this transaction's timers fired.
    pub fn on_timer(&mut self, ctx: &mut Ctx<'_>, timer: Timer) -> Step {
        use TransactionState::{Calling, Proceeding, Trying};
        match (timer, self.state) {
            (Timer::A, Calling) => {
                ctx.send(&self.destination, self.request_bytes.clone(), true);
                self.interval = self.interval.saturating_mul(2);
                self.timers.retransmit = ctx.arm(Timer::A, self.interval);
                Step::Continue
            }
            (Timer::E, Trying | Proceeding) => {
                ctx.send(&self.destination, self.request_bytes.clone(), true);
                let cap = ctx.config.retransmit_cap();
                self.interval = if self.state == Trying {
                    self.interval.saturating_mul(2).min(cap)
                } else {
                    cap
                };
                self.timers.retransmit = ctx.arm(Timer::E, self.interval);
                Step::Continue
            }
            (Timer::B, Calling)
            | (Timer::F, Trying | Proceeding)
            | (Timer::CancelWait, Proceeding) => {
                let key = ctx.key;
                ctx.emit(TransactionEvent::Timeout { key, timer });
                Step::Terminate
            }
            (Timer::D | Timer::K | Timer::M, _) => Step::Terminate,
            _ => Step::Continue,
        }
    }

    /// The CANCEL of this INVITE was sent: wait 64*T1 for a final response (section 9.1).
    pub fn cancel_sent(&mut self, ctx: &mut Ctx<'_>, cancel: TransactionKey) {
        self.cancel = CancelState::Sent(cancel);
        if self.state == TransactionState::Proceeding {
            self.timers.state = ctx.arm(Timer::CancelWait, ctx.config.t1_x64());
        }
    }

    /// The transport could not send for this transaction: the TU is told and the transaction
    /// ends (figures 5 and 6).
    pub fn on_transport_error(&mut self, ctx: &mut Ctx<'_>) -> Step {
        let key = ctx.key;
        ctx.emit(TransactionEvent::TransportError { key });
        Step::Terminate
    }
}
