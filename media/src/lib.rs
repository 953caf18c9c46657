//! thalamus-media: the media relay, QUIC media datagrams from a device <-> RTP/RTCP toward
//! the SIP peer.
//!
//! Layers, from the wire up:
//! - [`rtp`], [`rtcp`]: packet parsing and building (sans-IO);
//! - [`dtmf`]: RFC 4733 telephone-events on the device link (sans-IO);
//! - [`stats`]: RFC 3550 sequence, loss and jitter accounting, relay latency histograms;
//! - [`payload`]: payload type translation between the device link and SDP;
//! - [`ports`]: the RTP/RTCP port pair allocator (guards release on drop);
//! - [`relay`]: [`RelayCore`], the per-call state machine (sans-IO, time injected);
//! - [`engine`]: the tokio shell: [`MediaEngine`] hands out [`MediaRelay`]s that own a call's
//!   two UDP sockets and run a [`RelayCore`];
//! - [`config`]: [`MediaConfig`], the `[media]` configuration section;
//! - [`totals`]: node-wide totals an engine and its relays count; [`metrics`]: the Prometheus
//!   collector that renders them ([`MediaCollector`]).
//!
//! What it does not do: no SDP negotiation (`thalamus_sip::sdp`), no call control (the bridge
//! starts and stops relays and turns [`RelayEvent::MediaTimeout`] into a BYE), no QUIC (the
//! bridge adapts the device's link to [`DatagramSink`] and feeds [`DeviceInput`]: this crate
//! cannot name quinn, which `scripts/test` checks), no transcoding, no SRTP, no ICE.
#![forbid(unsafe_code)]

pub mod config;
pub mod dtmf;
pub mod engine;
pub mod metrics;
pub mod payload;
pub mod ports;
pub mod relay;
pub mod rtcp;
pub mod rtp;
pub mod stats;
pub mod totals;

pub use config::{LatchMode, MediaConfig, MediaConfigError, SrtpMode};
pub use engine::{
    DatagramError, DatagramSink, DeviceInput, FeedError, MediaEngine, MediaRelay, RelayError,
    RelaySpec, StatsProbe,
};
pub use metrics::MediaCollector;
pub use payload::PayloadMap;
pub use ports::{PortAllocator, PortPair};
pub use relay::{
    KeyframeMethod, RelayCore, RelayEvent, RelaySettings, RelayStats, RemotePeer, SrtpKeys,
};
pub use totals::EngineTotals;
