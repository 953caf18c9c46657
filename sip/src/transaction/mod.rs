//! RFC 3261 section 17 transactions (with the RFC 6026 corrections), sans-IO.
//!
//! [`TransactionLayer`] holds every client and server transaction of an endpoint and runs the
//! four state machines of section 17: INVITE client (Calling, Proceeding, Accepted, Completed),
//! non-INVITE client (Trying, Proceeding, Completed), INVITE server (Proceeding, Accepted,
//! Completed, Confirmed) and non-INVITE server (Trying, Proceeding, Completed); Terminated
//! transactions are destroyed at once. All timers (A, B, D to M, plus the 100 Trying wait and the
//! CANCEL wait of section 9.1) derive from [`TimerConfig`]; on reliable transports A, E and G are
//! not armed and D, I, J and K are zero.
//!
//! Driving it (the endpoint's loop):
//!
//! ```
//! use std::time::Instant;
//! use thalamus_sip::transaction::{TransactionLayer, TransactionEvent};
//!
//! let mut layer = TransactionLayer::default();
//! let now = Instant::now();
//! // feed: layer.send_request / handle_response / handle_request / respond / cancel /
//! //       handle_transport_error / handle_timeout(now) ...
//! layer.handle_timeout(now);
//! while let Some(transmit) = layer.poll_transmit() {
//!     // transport.send(transmit.destination, transmit.payload)
//!     let _ = transmit;
//! }
//! while let Some(event) = layer.poll_event() {
//!     // hand to dialogs / the TU
//!     let _ = event;
//! }
//! // sleep until layer.poll_timeout()
//! assert!(layer.poll_timeout().is_none());
//! ```
//!
//! Matching follows section 17.1.3 for responses (top Via branch + CSeq method) and 17.2.3 for
//! requests (branch + sent-by + method, ACK matching INVITE; for branches without the `z9hG4bK`
//! cookie, the RFC 2543 rules on Request-URI, tags, Call-ID, CSeq and top Via). CANCELs are
//! matched to their INVITE ([`TransactionLayer::cancel_target`]) and built for client INVITEs
//! ([`TransactionLayer::cancel`], deferred until a provisional response per section 9.1). The ACK
//! of a non-2xx final response is built and re-sent by the INVITE client transaction itself.
//!
//! This module does not do I/O, read clocks, resolve names, validate messages, manage
//! connections or implement the TU: answering a CANCEL, retransmitting a 2xx until its ACK
//! arrives and sending the ACK of a 2xx are the endpoint's and dialogs' work. Timer C (proxies)
//! is not implemented.

mod admission;
mod client;
mod config;
mod ctx;
mod key;
mod layer;
mod matching;
mod peer;
mod server;
mod timer;
mod types;

#[cfg(test)]
mod tests;

pub use admission::{Admission, AdmissionStats, Refusal, SourceLimiter, SourceLimits};
pub use config::{TimerConfig, TransactionConfig, MIN_RETRANSMIT_INTERVAL};
pub use key::TransactionKey;
pub use layer::{CancelOutcome, LayerAdmissionStats, RequestOutcome, TransactionLayer};
pub use peer::{response_destination, stamp_received, Peer};
pub use timer::Timer;
pub use types::{TransactionError, TransactionEvent, TransactionKind, TransactionState, Transmit};
