//! thalamus-device: the device side of MBFP, for device makers (issue 22).
//!
//! * [`session`]: [`session::DeviceSession`], the sans-IO session core: login, resume with the
//!   freshest token, redirects to the owner node, keepalive and idle detection, reconnection
//!   with backoff across entry points, request ids and call refs, the device's calls. Fed
//!   frames, connection events and `now`; gives actions, frames to send and events.
//! * [`media`]: [`media::MediaSender`] numbers one stream's datagrams; [`media::JitterBuffer`]
//!   puts received ones back in order. Sans-IO.
//! * [`client`]: a driver of the session on tokio and quinn ([`client::Client`]): connects,
//!   carries frames and datagrams, reconnects; events arrive on a channel.
//! * [`connection`] (one MBFP connection over QUIC: the control stream, framing, the `Hello`
//!   exchange) and [`quic`] (the client's TLS: ALPN `mbfp/1`, a pinned certificate or the
//!   WebPKI roots). The simulator (`thalamus-sim`) uses both for every device it runs.
//!
//! It depends on the protocol crate, quinn and rustls, never on the gateway's crates.
#![forbid(unsafe_code)]

pub mod client;
pub mod connection;
pub mod media;
pub mod quic;
pub mod session;

pub use client::{Client, ClientConfig, ClientError, ClientEvents};

pub use session::{Action, CommandError, DeviceSession, Event, SessionConfig};
