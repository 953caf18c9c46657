//! What the transaction layer says: a transaction's state and kind, the messages it asks the
//! transport to send ([`Transmit`]), the events it gives its user ([`TransactionEvent`]) and why
//! it refuses an operation ([`TransactionError`]). Data only.

use bytes::Bytes;

use super::key::TransactionKey;
use super::peer::Peer;
use super::timer::Timer;
use crate::message::{HeaderError, Method, Request, Response};

/// The state of a live transaction (figures 5 to 8 of RFC 3261, with RFC 6026's Accepted). A
/// transaction that reached Terminated is gone: [`TransactionLayer::state`](super::TransactionLayer::state) returns `None` and a
/// [`TransactionEvent::Terminated`] was queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransactionState {
    /// INVITE client: request sent, no response yet.
    Calling,
    /// Non-INVITE client: request sent, no response yet; non-INVITE server: request passed to
    /// the TU, nothing sent yet.
    Trying,
    /// A provisional response was received (client) or the request awaits a final response
    /// (server).
    Proceeding,
    /// A final response (non-2xx for INVITE) was received or sent; waiting out retransmissions.
    Completed,
    /// INVITE server: the ACK of the non-2xx final response arrived.
    Confirmed,
    /// INVITE (RFC 6026): a 2xx was received (client) or sent (server).
    Accepted,
}

/// Which of the four state machines a transaction runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransactionKind {
    /// INVITE client transaction (section 17.1.1).
    InviteClient,
    /// Non-INVITE client transaction (section 17.1.2).
    NonInviteClient,
    /// INVITE server transaction (section 17.2.1).
    InviteServer,
    /// Non-INVITE server transaction (section 17.2.2).
    NonInviteServer,
}

/// A message for the transport to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The transaction that sends it; `None` for stateless sends (503 over the limit,
    /// [`TransactionLayer::send_stateless`](super::TransactionLayer::send_stateless)).
    pub key: Option<TransactionKey>,
    /// Where to send it.
    pub destination: Peer,
    /// The serialized message (shared, not copied, between retransmissions).
    pub payload: Bytes,
    /// True when this repeats an earlier transmission (timer A, E or G, or an answer to a
    /// retransmitted message).
    pub retransmission: bool,
}

/// What the transaction layer tells the transaction user (the endpoint, dialogs, the core).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransactionEvent {
    /// A new request (not ACK, not CANCEL) created server transaction `key`: answer it with
    /// [`TransactionLayer::respond`](super::TransactionLayer::respond).
    Request {
        /// The new server transaction.
        key: TransactionKey,
        /// The request.
        request: Request,
        /// Where it came from.
        source: Peer,
    },
    /// A CANCEL created server transaction `key`. `invite` is the INVITE server transaction it
    /// refers to (RFC 3261 sections 9.2 and 17.2.3), if any: the TU answers the CANCEL 200 (481
    /// when `invite` is `None`) and, if the INVITE has no final response yet, the INVITE 487.
    Cancel {
        /// The CANCEL's own server transaction.
        key: TransactionKey,
        /// The CANCEL.
        request: Request,
        /// Where it came from.
        source: Peer,
        /// The INVITE server transaction being cancelled.
        invite: Option<TransactionKey>,
    },
    /// An ACK for the TU: either matched to an INVITE server transaction in Accepted (`key`) or
    /// matched to none (the ACK of a 2xx has its own branch, so this is the usual case; the
    /// dialog layer takes it).
    Ack {
        /// The Accepted INVITE server transaction it matched, if any.
        key: Option<TransactionKey>,
        /// The ACK.
        request: Request,
        /// Where it came from.
        source: Peer,
    },
    /// A response for client transaction `key`: every provisional, the final response, and in
    /// Accepted every further 2xx (retransmissions and forks).
    Response {
        /// The client transaction.
        key: TransactionKey,
        /// The response.
        response: Response,
    },
    /// A response that matched no client transaction (RFC 3261 section 18.1.2, RFC 6026
    /// section 7.2): typically a 2xx retransmission after timer M; the core or a proxy decides.
    StrayResponse {
        /// The response.
        response: Response,
    },
    /// The CANCEL of INVITE client transaction `invite` was sent as client transaction `cancel`
    /// (at once by [`TransactionLayer::cancel`](super::TransactionLayer::cancel), or when the first provisional response arrived).
    CancelSent {
        /// The INVITE client transaction.
        invite: TransactionKey,
        /// The CANCEL client transaction.
        cancel: TransactionKey,
    },
    /// A timer gave up: B or F (no final response: the TU acts as on a 408), H (no ACK for a
    /// non-2xx final response), or [`Timer::CancelWait`] (no final response 64*T1 after a
    /// CANCEL). `Terminated` follows.
    Timeout {
        /// The transaction.
        key: TransactionKey,
        /// The timer that fired.
        timer: Timer,
    },
    /// The transport reported an error for this transaction
    /// ([`TransactionLayer::handle_transport_error`](super::TransactionLayer::handle_transport_error)). `Terminated` follows, except for an
    /// INVITE server transaction in Accepted.
    TransportError {
        /// The transaction.
        key: TransactionKey,
    },
    /// The transaction reached Terminated and was destroyed; its key is dead.
    Terminated {
        /// The transaction.
        key: TransactionKey,
    },
}

/// Why the layer refused an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransactionError {
    /// A header the operation needs is missing or malformed.
    #[error("{0}")]
    Header(#[from] HeaderError),
    /// A request sent in a client transaction needs an RFC 3261 branch (`z9hG4bK...`) in its
    /// top Via; the endpoint adds the Via.
    #[error("the request's top Via has no RFC 3261 branch")]
    MissingBranch,
    /// ACK is not sent in a client transaction: the ACK of a non-2xx is sent by its INVITE
    /// transaction, the ACK of a 2xx with [`TransactionLayer::send_stateless`](super::TransactionLayer::send_stateless).
    #[error("ACK is not sent in a client transaction")]
    AckNotAllowed,
    /// The CSeq method differs from the request method.
    #[error("CSeq method {cseq} differs from the request method {method}")]
    CSeqMethodMismatch {
        /// Request method.
        method: Method,
        /// CSeq method.
        cseq: Method,
    },
    /// A live transaction already has this identifier (same branch and method; for RFC 2543
    /// requests, same Request-URI, tags, Call-ID, CSeq and top Via).
    #[error("a transaction with this identifier exists")]
    Duplicate,
    /// [`TransactionConfig::max_transactions`](super::TransactionConfig::max_transactions) reached.
    #[error("too many transactions (limit {0})")]
    TooManyTransactions(usize),
    /// The key names no live transaction.
    #[error("no such transaction")]
    UnknownTransaction,
    /// The operation needs an INVITE client transaction.
    #[error("not an INVITE client transaction")]
    NotInviteClient,
    /// The operation needs a server transaction.
    #[error("not a server transaction")]
    NotServer,
    /// A response status outside 100..=699.
    #[error("invalid status code {0}")]
    InvalidStatus(u16),
    /// The state machine does not take this response now (a second final response, or a
    /// non-2xx after a 2xx to INVITE).
    #[error("a {status} response is not allowed in state {state:?}")]
    ResponseNotAllowed {
        /// The response status.
        status: u16,
        /// The transaction state.
        state: TransactionState,
    },
    /// The INVITE already has a final response: there is nothing left to cancel.
    #[error("the INVITE already has a final response")]
    CancelTooLate,
}
