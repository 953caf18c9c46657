//! thalamus-sip: an RFC 3261 SIP stack built for clustering.
//!
//! The core is sans-IO: the message parser and serializer, the transaction and dialog state
//! machines, digest authentication and SDP take bytes and timestamps and return actions. The
//! thin tokio layer (`transport`) moves bytes between those cores and UDP/TCP sockets. Dialogs
//! export to and import from a plain versioned record so another node can continue them.
//!
//! This crate knows nothing about devices, MBFP or the gateway.
#![forbid(unsafe_code)]

pub mod dialog;
pub mod digest;
pub mod endpoint;
pub mod message;
pub mod peer;
pub mod resolve;
pub mod rng;
pub mod sdp;
pub mod session_timer;
pub mod transaction;
pub mod transport;
pub mod ua;
