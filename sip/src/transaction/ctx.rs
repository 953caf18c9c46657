//! What one transaction's state machine works with while it handles an input ([`Ctx`]: its
//! key, the time, the timers it may arm, the queues it may push transmissions and events to),
//! what it asks the layer to do next ([`Step`]), and its armed timers ([`TxTimers`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::config::TimerConfig;
use super::key::TransactionKey;
use super::peer::Peer;
use super::timer::{Armed, Timer, TimerQueue};
use super::types::{TransactionEvent, Transmit};

/// What a state machine asks the layer to do after handling an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Nothing more.
    Continue,
    /// Destroy the transaction (it reached Terminated).
    Terminate,
    /// Send the deferred CANCEL of this INVITE client transaction.
    SendCancel,
}

/// The (at most two) armed timers of a transaction.
#[derive(Debug, Default)]
pub(crate) struct TxTimers {
    /// A, E, G, or the 100 Trying wait.
    pub retransmit: Option<Armed>,
    /// B, D, F, H, I, J, K, L, M or CancelWait.
    pub state: Option<Armed>,
}

impl TxTimers {
    pub fn clear(&mut self) {
        self.retransmit = None;
        self.state = None;
    }

    pub(super) fn holds(&self, seq: u64) -> bool {
        self.retransmit.is_some_and(|a| a.seq == seq) || self.state.is_some_and(|a| a.seq == seq)
    }

    pub(super) fn take(&mut self, seq: u64) -> Option<Timer> {
        if self.retransmit.is_some_and(|a| a.seq == seq) {
            return self.retransmit.take().map(|a| a.timer);
        }
        if self.state.is_some_and(|a| a.seq == seq) {
            return self.state.take().map(|a| a.timer);
        }
        None
    }
}

/// What a state machine may touch while it handles one input.
pub(crate) struct Ctx<'a> {
    pub key: TransactionKey,
    pub now: Instant,
    pub config: &'a TimerConfig,
    pub(super) queue: &'a mut TimerQueue,
    pub(super) transmits: &'a mut VecDeque<Transmit>,
    pub(super) events: &'a mut VecDeque<TransactionEvent>,
}

impl Ctx<'_> {
    /// Arms `timer` to fire `after` from now; `None` (never fires) if that instant is not
    /// representable.
    pub fn arm(&mut self, timer: Timer, after: Duration) -> Option<Armed> {
        let at = self.now.checked_add(after)?;
        Some(self.queue.arm(self.key, timer, at))
    }

    /// Queues a transmission for this transaction.
    pub fn send(&mut self, destination: &Peer, payload: Bytes, retransmission: bool) {
        self.transmits.push_back(Transmit {
            key: Some(self.key),
            destination: *destination,
            payload,
            retransmission,
        });
    }

    /// Queues an event for the TU.
    pub fn emit(&mut self, event: TransactionEvent) {
        self.events.push_back(event);
    }
}
