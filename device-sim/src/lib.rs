//! thalamus-sim: simulated devices and SIP buddies for tests, demos and load runs.
//!
//! `quic` sets up the client side of QUIC/TLS (certificate pinning), `device` is one MBFP
//! connection, `events` renders what the gateway sends, and `connect` is the long-running
//! single-device command; `swarm` holds many devices at once. On the SIP side, `buddy`
//! is a user agent that plays the remote party and `sipcall` places calls at a rate. `load`
//! drives many devices placing or answering calls at a rate, on devices made by `provision`;
//! `media` is the echo probe and media counters of `call` and `listen`.
#![forbid(unsafe_code)]

pub mod buddy;
pub mod calls;
pub mod connect;
pub mod device;
pub mod events;
pub mod load;
pub mod media;
pub mod provision;
pub mod quic;
pub mod sipcall;
pub mod swarm;
