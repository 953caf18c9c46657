//! The transaction timers ([`Timer`]) and the queue that holds every armed timer of a layer: one
//! binary heap of `(deadline, sequence, transaction)` with lazy deletion.
//!
//! A transaction keeps at most two armed timers (a retransmission timer and a state timer), each
//! with the sequence number of its heap entry. Re-arming or cancelling a timer only changes the
//! transaction's record; the stale heap entry is skipped when it reaches the top (its sequence
//! number no longer matches), and the heap is compacted when stale entries outnumber live ones.
//! This module does not decide what a timer does when it fires.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use super::key::TransactionKey;

/// A transaction timer (RFC 3261 section 17, RFC 6026), as reported by
/// [`TransactionEvent::Timeout`](super::TransactionEvent::Timeout).
///
/// Timer C (the proxy's INVITE guard) is not implemented: this layer serves user agents, whose
/// TU bounds the ringing time itself and then CANCELs (the CANCEL starts [`Timer::CancelWait`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// INVITE client: request retransmission (unreliable transports), T1 doubling.
    A,
    /// INVITE client: timeout in Calling, 64*T1.
    B,
    /// INVITE client: wait in Completed for response retransmissions.
    D,
    /// Non-INVITE client: request retransmission (unreliable transports), T1 doubling up to T2.
    E,
    /// Non-INVITE client: timeout, 64*T1.
    F,
    /// INVITE server: final non-2xx response retransmission (unreliable), T1 doubling up to T2.
    G,
    /// INVITE server: wait for the ACK of a non-2xx final response, 64*T1.
    H,
    /// INVITE server: wait in Confirmed for ACK retransmissions.
    I,
    /// Non-INVITE server: wait in Completed for request retransmissions.
    J,
    /// Non-INVITE client: wait in Completed for response retransmissions.
    K,
    /// INVITE server (RFC 6026): wait in Accepted, absorbing INVITE retransmissions, 64*T1.
    L,
    /// INVITE client (RFC 6026): wait in Accepted for more 2xx responses, 64*T1.
    M,
    /// INVITE server: the wait for the TU's first response after which the transaction sends
    /// 100 Trying itself (RFC 3261 section 17.2.1, see
    /// [`TransactionConfig::trying_delay`](super::TransactionConfig::trying_delay)).
    Trying,
    /// INVITE client: 64*T1 after a CANCEL was sent without a final response to the INVITE,
    /// the INVITE transaction gives up (RFC 3261 section 9.1).
    CancelWait,
}

/// One armed timer of a transaction: its kind, deadline and heap sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Armed {
    pub timer: Timer,
    pub at: Instant,
    pub seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    at: Instant,
    seq: u64,
    key: TransactionKey,
}

/// Armed timers of every transaction, earliest first.
#[derive(Debug, Default)]
pub(crate) struct TimerQueue {
    heap: BinaryHeap<Reverse<Entry>>,
    next_seq: u64,
}

impl TimerQueue {
    /// Arms `timer` for `key` at `at`; the caller stores the returned record in the transaction.
    pub fn arm(&mut self, key: TransactionKey, timer: Timer, at: Instant) -> Armed {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.heap.push(Reverse(Entry { at, seq, key }));
        Armed { timer, at, seq }
    }

    /// The earliest entry (possibly stale).
    pub fn peek(&self) -> Option<(Instant, u64, TransactionKey)> {
        self.heap.peek().map(|Reverse(e)| (e.at, e.seq, e.key))
    }

    /// Removes the earliest entry.
    pub fn pop(&mut self) {
        self.heap.pop();
    }

    /// Number of entries, stale ones included.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Drops every entry for which `live` is false.
    pub fn retain(&mut self, mut live: impl FnMut(TransactionKey, u64) -> bool) {
        self.heap.retain(|Reverse(e)| live(e.key, e.seq));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn earliest_first_and_arming_order_breaks_ties() {
        let t0 = Instant::now();
        let mut q = TimerQueue::default();
        let k1 = TransactionKey::from_parts(1, 0);
        let k2 = TransactionKey::from_parts(2, 0);
        let late = q.arm(k1, Timer::B, t0 + Duration::from_secs(32));
        let early = q.arm(k2, Timer::A, t0 + Duration::from_millis(500));
        let tie = q.arm(k1, Timer::E, t0 + Duration::from_millis(500));
        assert_eq!(q.peek(), Some((early.at, early.seq, k2)));
        q.pop();
        assert_eq!(q.peek(), Some((tie.at, tie.seq, k1)));
        q.pop();
        assert_eq!(q.peek(), Some((late.at, late.seq, k1)));
        q.retain(|_, seq| seq != late.seq);
        assert_eq!(q.len(), 0);
        assert_eq!(q.peek(), None);
    }
}
