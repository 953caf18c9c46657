//! thalamus-sim: simulated devices and SIP buddies for tests, demos and load runs.
//!
//! `quic` (QUIC/TLS client set-up, certificate pinning) and `device` (one MBFP connection) are
//! the device SDK's (`thalamus-device`), `events` renders what the gateway sends, and `connect` is the long-running
//! single-device command; `swarm` holds many devices at once. On the SIP side, `buddy`
//! is a user agent that plays the remote party and `sipcall` places calls at a rate. `load`
//! drives many devices (SDK clients) placing or answering calls at a rate, on devices made by
//! `provision`;
//! `media` is the echo probe and media counters of `call` and `listen`.
#![forbid(unsafe_code)]

pub mod buddy;
pub mod calls;
pub mod connect;
pub mod events;
pub mod load;
pub mod media;
pub mod provision;
pub mod signal;
pub mod sipcall;
pub mod streams;

/// One MBFP connection (`thalamus_device::connection`): the simulator's devices are devices of
/// the device SDK.
pub use thalamus_device::connection as device;
/// QUIC client set-up (`thalamus_device::quic`).
pub use thalamus_device::quic;
pub mod swarm;
pub mod video;
pub mod webtransport;
