//! The per-call media relay core: device media datagrams <-> RTP/RTCP toward the SIP peer.
//!
//! Sans-IO: [`RelayCore`] is fed device datagrams ([`RelayCore::handle_device_datagram`]), RTP
//! and RTCP packets with their source address ([`RelayCore::handle_rtp`],
//! [`RelayCore::handle_rtcp`]) and timer expiries ([`RelayCore::handle_timeout`]), each with the
//! time it happened, and queues what to do: packets to send to the peer
//! ([`RelayCore::poll_transmit`]), datagrams for the device ([`RelayCore::poll_device_datagram`],
//! a small drop-oldest buffer) and events for the call ([`RelayCore::poll_event`], e.g. media
//! timeout). [`RelayCore::poll_timeout`] says when the next timer is due.
//!
//! What it does:
//! - device -> RTP: our own SSRC, a sequence number that goes up by exactly one per packet sent
//!   whatever the device's numbering does, timestamps offset-mapped from the device's (re-based
//!   when the device's sequence restarts, so the peer sees continuity), marker kept, payload
//!   type translated by the stream's [`PayloadMap`] (telephone-event included);
//! - RTP -> device: header stripped, [`MediaHeader`] built with the call's `call_ref` and stream,
//!   the peer's sequence and timestamp (shifted for continuity when the peer's SSRC changes)
//!   and the translated payload type; payloads larger than a datagram can carry are dropped;
//! - symmetric RTP ([`LatchMode`]): after the first valid packet from the expected peer (or
//!   from anyone), send to its observed source and accept only that source; the SSRC of that
//!   first packet is pinned too: packets with another SSRC are dropped unless that SSRC sends
//!   [`SSRC_PROBATION`] packets in sequence (the peer switched streams, RFC 3550's probation)
//!   or a new SDP arrives, so stray or injected packets cannot splice a stream into the call;
//! - hold: nothing is sent toward a side that does not want media (the peer's direction does
//!   not receive, or its address is `0.0.0.0`; our side's direction does not receive);
//! - media timeout: an event when no valid RTP came from the peer for the configured time,
//!   counted only while both sides are `sendrecv` (any hold suspends it);
//! - RTCP: a compound SR (when we sent since the last report) or RR with one report block about
//!   the peer's stream and an SDES CNAME every interval, a BYE on close; the peer's reports give
//!   its view of our stream (loss, jitter) and the round-trip time;
//! - statistics per direction, drop counters by cause, relay latency histograms.
//!
//! - SRTP and SRTCP toward the peer (RFC 3711) when the stream was keyed with SDES
//!   ([`SrtpKeys`]): every packet out is protected, every packet in is checked (source first,
//!   then authentication and replay) before anything else reads it; failures are dropped and
//!   counted. New keys (a re-INVITE that re-keys) start new contexts; the same keys keep them.
//!
//! What it does not do: no sockets and no clock (see the `engine` module for the tokio shell),
//! no jitter buffer, no transcoding, no DTLS-SRTP, no RTCP feedback beyond key frame requests,
//! no SSRC collision handling; without SRTP, no defence against an attacker on the path (who
//! sees the real SSRC).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use thalamus_proto::media::{max_payload_bytes, MediaDatagram, MediaHeader, StreamId};
use thalamus_proto::v1::MediaStats;
use thalamus_sip::sdp::{Direction, RemoteMedia, RtcpFeedback};

use thalamus_sip::sdp::CryptoSuite;
use webrtc_srtp::context::Context as SrtpContext;
use webrtc_srtp::option::{srtcp_replay_protection, srtp_replay_protection};
use webrtc_srtp::protection_profile::ProtectionProfile;

use crate::config::LatchMode;
use crate::payload::{PayloadMap, PayloadTarget};
use crate::rtcp::{
    self, ntp_middle, ntp_timestamp, parse_compound, round_trip, to_ntp_short, ReportBlock,
    RtcpPacket, SenderInfo,
};
use crate::rtp::{is_rtcp_packet, RtpHeader, RtpPacket};
use crate::stats::{
    arrival_units, units_to_duration, JitterEstimator, LatencyHistogram, LatencySummary,
    SequenceTracker,
};

/// Packets in sequence a new SSRC from the peer must send before it replaces the pinned one
/// (the first ones are dropped).
pub const SSRC_PROBATION: u32 = 3;

/// Most packets waiting in [`RelayCore::poll_transmit`]'s queue; more are dropped and counted.
pub const MAX_PENDING_TRANSMITS: usize = 256;
/// Most events waiting in [`RelayCore::poll_event`]'s queue; more are dropped.
pub const MAX_PENDING_EVENTS: usize = 32;
/// Least time between two key frame requests passed on, each way: more are dropped and
/// counted (a flood of requests from either side costs the other nothing).
pub const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(200);
/// Capacity of the scratch buffer packets are built in (re-used between packets).
const SCRATCH_BYTES: usize = 4 * 1024;
/// A device sequence step outside `-MAX_MISORDER..MAX_DROPOUT` is a restart.
const MAX_DROPOUT: u16 = 3000;
const MAX_MISORDER: u16 = 100;

/// Everything a [`RelayCore`] needs to start. Random values (SSRC, first sequence number and
/// timestamp) are chosen by the caller so the core stays deterministic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelaySettings {
    /// The call this relay serves (`call_ref` of the media header).
    pub call_ref: u32,
    /// The stream of the call this relay serves.
    pub stream_id: StreamId,
    /// Our RTP SSRC toward the peer.
    pub local_ssrc: u32,
    /// First RTP sequence number toward the peer.
    pub initial_sequence: u16,
    /// RTP timestamp toward the peer that the device's first timestamp maps to.
    pub initial_timestamp: u32,
    /// Our RTCP CNAME.
    pub cname: String,
    /// Symmetric RTP mode.
    pub latch: LatchMode,
    /// Media timeout (`None`: off).
    pub media_timeout: Option<Duration>,
    /// RTCP report interval (`None`: no reports).
    pub rtcp_interval: Option<Duration>,
    /// Capacity of the buffer toward the device (at least 1).
    pub send_buffer_frames: usize,
    /// Largest datagram toward the device, header included.
    pub max_datagram_bytes: usize,
    /// Wall-clock time (since the Unix epoch) at the `now` given to [`RelayCore::new`], for
    /// RTCP NTP timestamps.
    pub wallclock_at_start: Duration,
    /// This relay takes RTCP on its RTP port and has no RTCP port (RFC 5761): RTCP goes to the
    /// peer's RTP address when the peer's SDP multiplexes too ([`RemotePeer::rtcp_mux`]).
    /// RTCP arriving on the RTP port is taken as RTCP either way (RFC 5761 section 4).
    pub rtcp_mux: bool,
}

impl RelaySettings {
    /// Settings with fixed defaults (SSRC 1, sequence 0, timestamp 0, latch `peer`, timeout
    /// 30 s, RTCP every 5 s, 16 frames of send buffer, 1200-byte datagrams); callers set the
    /// random fields.
    pub fn new(call_ref: u32, stream_id: StreamId) -> Self {
        RelaySettings {
            call_ref,
            stream_id,
            local_ssrc: 1,
            initial_sequence: 0,
            initial_timestamp: 0,
            cname: "thalamus".to_string(),
            latch: LatchMode::Peer,
            media_timeout: Some(Duration::from_secs(30)),
            rtcp_interval: Some(Duration::from_secs(5)),
            send_buffer_frames: 16,
            max_datagram_bytes: 1_200,
            wallclock_at_start: Duration::ZERO,
            rtcp_mux: false,
        }
    }
}

/// Packets SRTP remembers per SSRC to refuse replays (RFC 3711 section 3.3.2 asks for at least
/// 64).
pub const SRTP_REPLAY_WINDOW: usize = 128;
/// Most SSRCs whose packets failed authentication that the relay tries (each costs the SRTP
/// context some state): packets of further unknown SSRCs are dropped before any key work. SSRCs
/// whose packets authenticated are never refused this way.
pub const SRTP_MAX_PEER_SSRCS: usize = 4;

/// The SDES keys of one SRTP stream: the suite, and the master key and salt each side sends
/// with (ours from our SDP, the peer's from its `a=crypto` under the same tag).
#[derive(Clone, PartialEq, Eq)]
pub struct SrtpKeys {
    /// The negotiated suite.
    pub suite: CryptoSuite,
    /// Our master key and salt (packets we send).
    pub local: Vec<u8>,
    /// The peer's master key and salt (packets we receive).
    pub remote: Vec<u8>,
}

impl std::fmt::Debug for SrtpKeys {
    /// The keys are not printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SrtpKeys")
            .field("suite", &self.suite)
            .finish_non_exhaustive()
    }
}

/// The SRTP state of a stream.
enum Srtp {
    /// Plain RTP.
    Off,
    /// Keyed: one context per direction; the peer's SSRCs whose packets authenticated, and
    /// those whose packets failed (at most [`SRTP_MAX_PEER_SSRCS`]).
    On {
        keys: SrtpKeys,
        outbound: Box<SrtpContext>,
        inbound: Box<SrtpContext>,
        verified: Vec<u32>,
        failed: Vec<u32>,
    },
    /// Keys were given but no context could be made of them: nothing goes out or comes in
    /// (never plain RTP instead).
    Broken,
}

impl std::fmt::Debug for Srtp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Srtp::Off => f.write_str("Off"),
            Srtp::On { keys, .. } => write!(f, "On({:?})", keys.suite),
            Srtp::Broken => f.write_str("Broken"),
        }
    }
}

/// The bytes an SRTP or SRTCP packet of `suite` carries after its clear part: (RTP, RTCP).
/// For RTCP this is the E flag and index word and the tag (RFC 3711 section 3.4, RFC 7714).
fn srtp_overhead(suite: CryptoSuite) -> (usize, usize) {
    match suite {
        CryptoSuite::AesCm128HmacSha1_80 => (10, 4 + 10),
        CryptoSuite::AesCm128HmacSha1_32 => (4, 4 + 10),
        CryptoSuite::AeadAes128Gcm | CryptoSuite::AeadAes256Gcm => (16, 16 + 4),
    }
}

/// Whether an SRTCP packet of `suite` says its payload is encrypted (the E flag, the top bit
/// of the index word: before the tag for AES-CM, last for AEAD). The gateway never negotiates
/// `UNENCRYPTED_SRTCP`, so a packet without it is refused (the library would pass it on
/// unauthenticated).
fn srtcp_encrypted(suite: CryptoSuite, packet: &[u8]) -> bool {
    let at = match suite {
        CryptoSuite::AesCm128HmacSha1_80 | CryptoSuite::AesCm128HmacSha1_32 => {
            packet.len().checked_sub(4 + 10)
        }
        CryptoSuite::AeadAes128Gcm | CryptoSuite::AeadAes256Gcm => packet.len().checked_sub(4),
    };
    at.and_then(|i| packet.get(i))
        .is_some_and(|byte| byte & 0x80 != 0)
}

/// The SRTP profile of a suite.
fn profile(suite: CryptoSuite) -> ProtectionProfile {
    match suite {
        CryptoSuite::AesCm128HmacSha1_80 => ProtectionProfile::Aes128CmHmacSha1_80,
        CryptoSuite::AesCm128HmacSha1_32 => ProtectionProfile::Aes128CmHmacSha1_32,
        CryptoSuite::AeadAes128Gcm => ProtectionProfile::AeadAes128Gcm,
        CryptoSuite::AeadAes256Gcm => ProtectionProfile::AeadAes256Gcm,
    }
}

/// A context of `suite` for `material` (key then salt); the receiving one refuses replays.
fn srtp_context(suite: CryptoSuite, material: &[u8], receiving: bool) -> Option<Box<SrtpContext>> {
    let profile = profile(suite);
    let (key, salt) = material.split_at_checked(profile.key_len())?;
    (salt.len() == profile.salt_len()).then_some(())?;
    let (srtp, srtcp) = if receiving {
        (
            Some(srtp_replay_protection(SRTP_REPLAY_WINDOW)),
            Some(srtcp_replay_protection(SRTP_REPLAY_WINDOW)),
        )
    } else {
        (None, None)
    };
    SrtpContext::new(key, salt, profile, srtp, srtcp)
        .ok()
        .map(Box::new)
}

/// An outbound context set aside when the SRTP state changed (a re-key toward plain RTP, keys
/// that do not pair), with the suite and key it was made from: if that key comes back, its
/// context comes back too, so no two contexts are ever made from one key (a new one would
/// start its counters again and reuse key stream).
struct SpareOutbound {
    suite: CryptoSuite,
    local: Vec<u8>,
    context: Box<SrtpContext>,
}

impl std::fmt::Debug for SpareOutbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpareOutbound")
            .field("suite", &self.suite)
            .finish_non_exhaustive()
    }
}

impl Srtp {
    /// The state for `keys`, keeping what it can of `previous`: a direction whose key and suite
    /// did not change keeps its context (with, for the receiving one, the SSRCs it knows), a
    /// changed one starts a new context. Our previous sending context goes to `spare`, and
    /// comes back from it when its key does.
    fn rekeyed(previous: Srtp, keys: Option<SrtpKeys>, spare: &mut Option<SpareOutbound>) -> Srtp {
        let (old_keys, old_in) = match previous {
            Srtp::On {
                keys,
                outbound,
                inbound,
                verified,
                failed,
            } => {
                *spare = Some(SpareOutbound {
                    suite: keys.suite,
                    local: keys.local.clone(),
                    context: outbound,
                });
                (Some(keys), Some((inbound, verified, failed)))
            }
            Srtp::Off | Srtp::Broken => (None, None),
        };
        let Some(keys) = keys else {
            return Srtp::Off;
        };
        let outbound = match spare.take() {
            Some(kept) if kept.suite == keys.suite && kept.local == keys.local => {
                Some(kept.context)
            }
            other => {
                *spare = other;
                srtp_context(keys.suite, &keys.local, false)
            }
        };
        let same_remote = old_keys
            .as_ref()
            .is_some_and(|k| k.suite == keys.suite && k.remote == keys.remote);
        let inbound = match old_in {
            Some(kept) if same_remote => Some(kept),
            _ => srtp_context(keys.suite, &keys.remote, true).map(|c| (c, Vec::new(), Vec::new())),
        };
        match (outbound, inbound) {
            (Some(outbound), Some((inbound, verified, failed))) => Srtp::On {
                keys,
                outbound,
                inbound,
                verified,
                failed,
            },
            (outbound, _) => {
                if let Some(context) = outbound {
                    *spare = Some(SpareOutbound {
                        suite: keys.suite,
                        local: keys.local.clone(),
                        context,
                    });
                }
                Srtp::Broken
            }
        }
    }

    fn keys(&self) -> Option<&SrtpKeys> {
        match self {
            Srtp::On { keys, .. } => Some(keys),
            Srtp::Off | Srtp::Broken => None,
        }
    }
}

/// The SIP peer of one stream, as SDP describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotePeer {
    /// Where to send RTP (until latched).
    pub rtp: SocketAddr,
    /// Where to send RTCP (until latched) when it is not multiplexed.
    pub rtcp: SocketAddr,
    /// The peer's SDP has `a=rtcp-mux` (RFC 5761): with a relay that multiplexes
    /// ([`RelaySettings::rtcp_mux`]), RTCP goes to [`RemotePeer::rtp`].
    pub rtcp_mux: bool,
    /// The stream's direction as the peer wrote it.
    pub direction: Direction,
    /// Payload type translation.
    pub payloads: PayloadMap,
    /// SRTP keys when the stream is `RTP/SAVP`; `None`: plain RTP.
    pub srtp: Option<SrtpKeys>,
    /// How to ask this peer for a key frame.
    pub keyframe: KeyframeMethod,
}

/// How a relay asks its peer for a key frame (from the peer's `a=rtcp-fb`, RFC 4585 / 5104).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyframeMethod {
    /// A picture loss indication: the peer lists `nack pli`, or lists no feedback at all (a
    /// peer that negotiated nothing is asked the way most implementations understand).
    #[default]
    Pli,
    /// A full intra request: the peer lists `ccm fir` and not `nack pli`.
    Fir,
    /// Not at all: the peer lists feedback, neither of these.
    Never,
}

impl KeyframeMethod {
    /// The method a peer's SDP feedback allows.
    pub fn from_feedback(feedback: RtcpFeedback) -> Self {
        match (feedback.listed, feedback.pli, feedback.fir) {
            (false, _, _) | (true, true, _) => KeyframeMethod::Pli,
            (true, false, true) => KeyframeMethod::Fir,
            (true, false, false) => KeyframeMethod::Never,
        }
    }
}

impl RemotePeer {
    /// The same with SRTP keys (`None`: plain RTP).
    pub fn with_srtp(mut self, srtp: Option<SrtpKeys>) -> Self {
        self.srtp = srtp;
        self
    }

    /// The peer of an SDP stream, with payload types translated by
    /// [`PayloadMap::from_remote_media`].
    pub fn from_remote_media(remote: &RemoteMedia) -> Self {
        RemotePeer {
            rtp: remote.rtp,
            rtcp: remote.rtcp,
            rtcp_mux: remote.rtcp_mux,
            direction: remote.direction,
            payloads: PayloadMap::from_remote_media(remote),
            srtp: None,
            keyframe: KeyframeMethod::from_feedback(remote.feedback),
        }
    }
}

/// Which of the relay's two sockets a packet leaves from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SocketKind {
    /// The RTP socket (even port).
    Rtp,
    /// The RTCP socket (odd port).
    Rtcp,
}

/// A packet to send to the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The socket to send from.
    pub socket: SocketKind,
    /// Where to send it.
    pub destination: SocketAddr,
    /// The packet.
    pub packet: Bytes,
    /// When the device datagram this packet relays arrived (`None` for RTCP).
    pub received_at: Option<Instant>,
}

/// A datagram to send to the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDatagram {
    /// The media datagram (header and payload).
    pub datagram: Bytes,
    /// When the RTP packet it relays arrived.
    pub received_at: Instant,
}

/// Something the call should know about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEvent {
    /// No RTP from the peer for the configured time: the call should end (BYE, and
    /// `CallEvent{ended, media_timeout}` to the device).
    MediaTimeout {
        /// How long the peer has been silent.
        silent_for: Duration,
    },
    /// RTP is now sent to (and only accepted from) this source.
    Latched {
        /// The peer's observed RTP source.
        source: SocketAddr,
    },
    /// The peer asked for a key frame (RTCP PLI or FIR); at most one per
    /// [`KEYFRAME_REQUEST_INTERVAL`].
    KeyframeRequested,
}

/// Which way a relayed packet went (for latency accounting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RelayDirection {
    /// Device datagram -> RTP.
    ToPeer,
    /// RTP -> device datagram.
    ToDevice,
}

/// Packets dropped, by cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DropCounters {
    /// Device datagrams whose media header did not decode.
    pub device_malformed: u64,
    /// Device datagrams for another call.
    pub device_wrong_call: u64,
    /// Device datagrams for another stream of the call.
    pub device_wrong_stream: u64,
    /// Device datagrams with a payload type the peer did not negotiate.
    pub device_unmapped_payload_type: u64,
    /// Device datagrams not sent because the peer is unknown yet or does not want media.
    pub device_not_sendable: u64,
    /// RTP packets that did not parse.
    pub rtp_malformed: u64,
    /// RTP packets from a source other than the peer.
    pub rtp_wrong_source: u64,
    /// RTP packets from the peer's address with an SSRC other than the pinned one.
    pub rtp_wrong_ssrc: u64,
    /// RTP packets with a payload type the device has no mapping for.
    pub rtp_unmapped_payload_type: u64,
    /// RTP packets not delivered because the device side does not want media (hold).
    pub rtp_held: u64,
    /// RTP packets arriving before the peer was known.
    pub rtp_before_peer: u64,
    /// RTP payloads larger than a device datagram can carry.
    pub oversized: u64,
    /// Datagrams dropped from the full send buffer toward the device (oldest first).
    pub device_buffer_overflow: u64,
    /// Datagrams the device link refused (closed, too large for the path).
    pub device_send_failed: u64,
    /// RTCP packets that did not parse.
    pub rtcp_malformed: u64,
    /// RTCP packets from a source other than the peer.
    pub rtcp_wrong_source: u64,
    /// Key frame requests (either way) dropped for coming less than
    /// [`KEYFRAME_REQUEST_INTERVAL`] after the one before.
    pub keyframe_requests_limited: u64,
    /// Key frame requests from the device not sent: the peer's SDP lists RTCP feedback, but
    /// neither PLI nor FIR.
    pub keyframe_requests_not_negotiated: u64,
    /// SRTP or SRTCP packets from the peer that failed authentication (a wrong key, a forged or
    /// damaged packet) or were too short.
    pub srtp_auth_failed: u64,
    /// SRTP or SRTCP packets from the peer already received (replays).
    pub srtp_replayed: u64,
    /// SRTP packets from the peer with an SSRC never authenticated, once
    /// [`SRTP_MAX_PEER_SSRCS`] such SSRCs have failed.
    pub srtp_too_many_ssrcs: u64,
    /// Packets not sent because SRTP could not protect them (or had no usable keys).
    pub srtp_protect_failed: u64,
    /// Packets dropped because the transmit queue was full.
    pub transmit_overflow: u64,
    /// Packets the socket refused to send.
    pub socket_send_failed: u64,
}

/// Packet and byte counts of one direction (bytes are payload bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowCounters {
    /// Packets.
    pub packets: u64,
    /// Payload bytes.
    pub bytes: u64,
}

/// Reception quality of an incoming stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReceptionStats {
    /// Packets and payload bytes received (valid for this call).
    pub flow: FlowCounters,
    /// Packets missing by sequence number (RFC 3550 A.3; duplicates do not make it negative).
    pub lost: u64,
    /// Interarrival jitter (RFC 3550 A.8).
    pub jitter: Duration,
}

/// What the peer reports about our stream (its last RTCP report block about our SSRC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerReport {
    /// Fraction lost in its last interval, in 1/256.
    pub fraction_lost: u8,
    /// Packets it counts as lost since the start.
    pub cumulative_lost: i32,
    /// Jitter it measures on our stream.
    pub jitter: Duration,
    /// Round-trip time from LSR/DLSR, when known.
    pub round_trip: Option<Duration>,
}

/// Per-call statistics, convertible to [`MediaStats`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RelayStats {
    /// The call.
    pub call_ref: u32,
    /// Datagrams from the device (valid for this call and stream), with loss and jitter.
    pub from_device: ReceptionStats,
    /// Datagrams handed to the device link.
    pub to_device: FlowCounters,
    /// RTP from the peer, with loss and jitter.
    pub from_peer: ReceptionStats,
    /// RTP sent to the peer.
    pub to_peer: FlowCounters,
    /// RTCP packets sent.
    pub rtcp_sent: u64,
    /// RTCP packets received and accepted.
    pub rtcp_received: u64,
    /// Key frame requests (PLI) sent to the peer for the device.
    pub keyframe_requests_to_peer: u64,
    /// Key frame requests (PLI, FIR) from the peer passed on to the device.
    pub keyframe_requests_from_peer: u64,
    /// Relay latency device -> peer.
    pub latency_to_peer: LatencySummary,
    /// Relay latency peer -> device.
    pub latency_to_device: LatencySummary,
    /// Relay latency, both directions.
    pub latency: LatencySummary,
    /// The peer's view of our stream, from its RTCP.
    pub peer_report: Option<PeerReport>,
    /// The latched peer RTP source, if any.
    pub latched_source: Option<SocketAddr>,
    /// Drops by cause.
    pub drops: DropCounters,
}

impl From<&RelayStats> for MediaStats {
    /// The SIP leg as the device is told it (docs/protocol.md, `MediaStats`): RTP sent to and
    /// received from the peer, loss and jitter of the peer's media, the median time a device
    /// packet spent inside the gateway on its way to the peer, and the peer's RTCP view. The
    /// stream id is left at 0 (audio); the caller sets it.
    fn from(stats: &RelayStats) -> MediaStats {
        let micros = |d: Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        let report = stats.peer_report.as_ref();
        MediaStats {
            packets_sent: stats.to_peer.packets,
            packets_received: stats.from_peer.flow.packets,
            bytes_sent: stats.to_peer.bytes,
            bytes_received: stats.from_peer.flow.bytes,
            packets_lost: stats.from_peer.lost,
            jitter_us: micros(stats.from_peer.jitter),
            relay_latency_us: micros(stats.latency_to_peer.p50),
            stream_id: 0,
            round_trip_us: report.and_then(|r| r.round_trip).map_or(0, micros),
            peer_reported_lost: report.map_or(0, |r| u64::try_from(r.cumulative_lost).unwrap_or(0)),
        }
    }
}

impl From<RelayStats> for MediaStats {
    fn from(stats: RelayStats) -> MediaStats {
        MediaStats::from(&stats)
    }
}

#[derive(Debug)]
struct PeerState {
    /// Whether the SDP address is `0.0.0.0` (RFC 2543 hold).
    null_address: bool,
    /// The last non-null SDP RTP address (kept through a `0.0.0.0` hold).
    sdp_rtp: SocketAddr,
    /// The last non-null SDP RTCP address.
    sdp_rtcp: SocketAddr,
    direction: Direction,
    payloads: PayloadMap,
    latched_rtp: Option<SocketAddr>,
    latched_rtcp: Option<SocketAddr>,
    /// The SSRC accepted from the peer, pinned by its first valid packet since the last SDP.
    pinned_ssrc: Option<u32>,
    /// Another SSRC on probation: its last sequence number and how many in a row it sent.
    candidate_ssrc: Option<(u32, u16, u32)>,
    keyframe: KeyframeMethod,
}

impl PeerState {
    fn rtp_destination(&self) -> SocketAddr {
        self.latched_rtp.unwrap_or(self.sdp_rtp)
    }

    fn rtcp_destination(&self) -> SocketAddr {
        self.latched_rtcp.unwrap_or(self.sdp_rtcp)
    }

    /// The peer wants our media.
    fn receives(&self) -> bool {
        self.direction.receives() && !self.null_address && !self.sdp_rtp.ip().is_unspecified()
    }
}

#[derive(Debug)]
struct Outbound {
    sequence: u16,
    timestamp_offset: Option<u32>,
    last_device_sequence: Option<u16>,
    last_timestamp: u32,
    last_sent_at: Option<Instant>,
    clock_rate: u32,
    flow: FlowCounters,
    sent_since_report: bool,
}

#[derive(Debug)]
struct Inbound {
    ssrc: u32,
    tracker: SequenceTracker,
    jitter: JitterEstimator,
    clock_rate: u32,
    sequence_offset: u16,
    timestamp_offset: u32,
    force_marker: bool,
}

#[derive(Debug, Default)]
struct DeviceInbound {
    tracker: Option<SequenceTracker>,
    jitter: JitterEstimator,
    clock_rate: u32,
    flow: FlowCounters,
}

/// The last datagram sent toward the device, for continuity across peer SSRC changes.
#[derive(Debug, Clone, Copy)]
struct LastToDevice {
    sequence: u16,
    timestamp: u32,
    at: Instant,
    clock_rate: u32,
}

/// The relay of one stream of one call (see the module documentation).
#[derive(Debug)]
pub struct RelayCore {
    settings: RelaySettings,
    epoch: Instant,
    scratch: BytesMut,
    transmits: VecDeque<Transmit>,
    device_queue: VecDeque<DeviceDatagram>,
    events: VecDeque<RelayEvent>,
    peer: Option<PeerState>,
    local_direction: Direction,
    outbound: Outbound,
    inbound: Option<Inbound>,
    from_peer: FlowCounters,
    retired_lost: u64,
    last_to_device: Option<LastToDevice>,
    device_inbound: DeviceInbound,
    last_sender_report: Option<(u32, Instant)>,
    next_report_at: Option<Instant>,
    silence_since: Instant,
    timeout_reported: bool,
    peer_report: Option<PeerReport>,
    drops: DropCounters,
    to_device: FlowCounters,
    rtcp_sent: u64,
    rtcp_received: u64,
    keyframe_requests: KeyframeRequests,
    srtp: Srtp,
    spare_outbound: Option<SpareOutbound>,
    latency_to_peer: LatencyHistogram,
    latency_to_device: LatencyHistogram,
    closed: bool,
    /// Device datagrams that arrived before the peer was known (the device answered or heard
    /// the answer before the relay got the SDP): relayed once it is, if still recent.
    early_device: EarlyHold<Bytes>,
    /// RTP that arrived before the peer was known (its media beat its answer), with its source:
    /// checked and relayed once it is, if still recent.
    early_peer: EarlyHold<(Bytes, SocketAddr)>,
}

/// Packets held, oldest first, until the relay can act on them: at most `capacity`, each
/// released with whether it is still recent (no older than `max_age`).
#[derive(Debug)]
struct EarlyHold<T> {
    held: VecDeque<(T, Instant)>,
    capacity: usize,
    max_age: Duration,
}

impl<T> EarlyHold<T> {
    fn new(capacity: usize, max_age: Duration) -> Self {
        EarlyHold {
            held: VecDeque::new(),
            capacity,
            max_age,
        }
    }

    /// Whether `capacity` are held.
    fn is_full(&self) -> bool {
        self.held.len() >= self.capacity
    }

    /// Holds `item`, received at `now`; false (not held) when `capacity` are held already.
    fn hold(&mut self, item: T, now: Instant) -> bool {
        if self.is_full() {
            return false;
        }
        self.held.push_back((item, now));
        true
    }

    /// Takes everything held, oldest first: each with when it arrived and whether it is still
    /// recent at `now`.
    fn release(&mut self, now: Instant) -> impl Iterator<Item = (T, Instant, bool)> {
        let max_age = self.max_age;
        std::mem::take(&mut self.held)
            .into_iter()
            .map(move |(item, at)| (item, at, now.saturating_duration_since(at) <= max_age))
    }

    /// Forgets everything held; how much that was.
    fn clear(&mut self) -> usize {
        let n = self.held.len();
        self.held.clear();
        n
    }
}

/// Whether RTP from `source` may be the peer's: its latched source, or before the latch any
/// source (`any`) or one at the address its SDP names.
fn rtp_source_accepted(peer: &PeerState, latch: LatchMode, source: SocketAddr) -> bool {
    match (peer.latched_rtp, latch) {
        (Some(latched), _) => source == latched,
        (None, LatchMode::Any) => true,
        (None, LatchMode::Off | LatchMode::Peer) => source.ip() == peer.sdp_rtp.ip(),
    }
}

/// Key frame requests passed on each way: when the last went, how many did, how many were
/// dropped for coming too soon after the one before.
#[derive(Debug, Default)]
struct KeyframeRequests {
    last_to_peer: Option<Instant>,
    last_from_peer: Option<Instant>,
    to_peer: u64,
    from_peer: u64,
    /// The sequence number of our last FIR (RFC 5104 4.3.1.1).
    fir_sequence: u8,
}

/// Whether a request at `now` is far enough from the `last` one passed on (and if so, it is
/// the last one now).
fn keyframe_request_allowed(last: &mut Option<Instant>, now: Instant) -> bool {
    if last.is_some_and(|at| now.saturating_duration_since(at) < KEYFRAME_REQUEST_INTERVAL) {
        return false;
    }
    *last = Some(now);
    true
}

/// What a report carries after its SR or RR and SDES.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReportTail {
    Nothing,
    Goodbye,
    PictureLoss,
    /// A full intra request with this sequence number.
    FullIntra(u8),
}

/// Most device datagrams held until the peer is known ([`RelayCore::set_peer`]).
pub const EARLY_DEVICE_DATAGRAMS: usize = 8;
/// How old a held device datagram may be when the peer becomes known.
pub const EARLY_DEVICE_MAX_AGE: Duration = Duration::from_millis(500);
/// Most packets from the network held until the peer is known (the peer's first media can
/// beat its answer to us; with SRTP the answer also brings the keys to read it). Strangers can
/// only take these slots, never the packets that come once the peer is known; and only those
/// from the exact address the peer's SDP names are replayed, so a held packet never takes the
/// latch.
pub const EARLY_PEER_PACKETS: usize = 8;
/// How old a held packet from the network may be when the peer becomes known.
pub const EARLY_PEER_MAX_AGE: Duration = Duration::from_millis(500);

impl RelayCore {
    /// A relay with no peer yet: the first device datagrams are held (at most
    /// [`EARLY_DEVICE_DATAGRAMS`], relayed when [`RelayCore::set_peer`] comes within
    /// [`EARLY_DEVICE_MAX_AGE`]), later ones dropped; so are the first RTP packets from the
    /// network ([`EARLY_PEER_PACKETS`], checked as the peer's when it is known).
    pub fn new(settings: RelaySettings, now: Instant) -> Self {
        let outbound = Outbound {
            sequence: settings.initial_sequence,
            timestamp_offset: None,
            last_device_sequence: None,
            last_timestamp: settings.initial_timestamp,
            last_sent_at: None,
            clock_rate: 8_000,
            flow: FlowCounters::default(),
            sent_since_report: false,
        };
        RelayCore {
            settings: RelaySettings {
                send_buffer_frames: settings.send_buffer_frames.max(1),
                ..settings
            },
            epoch: now,
            scratch: BytesMut::with_capacity(SCRATCH_BYTES),
            transmits: VecDeque::new(),
            device_queue: VecDeque::new(),
            events: VecDeque::new(),
            peer: None,
            local_direction: Direction::SendRecv,
            outbound,
            inbound: None,
            from_peer: FlowCounters::default(),
            retired_lost: 0,
            last_to_device: None,
            device_inbound: DeviceInbound::default(),
            last_sender_report: None,
            next_report_at: None,
            silence_since: now,
            timeout_reported: false,
            peer_report: None,
            drops: DropCounters::default(),
            to_device: FlowCounters::default(),
            rtcp_sent: 0,
            rtcp_received: 0,
            keyframe_requests: KeyframeRequests::default(),
            srtp: Srtp::Off,
            spare_outbound: None,
            latency_to_peer: LatencyHistogram::new(),
            latency_to_device: LatencyHistogram::new(),
            closed: false,
            early_device: EarlyHold::new(EARLY_DEVICE_DATAGRAMS, EARLY_DEVICE_MAX_AGE),
            early_peer: EarlyHold::new(EARLY_PEER_PACKETS, EARLY_PEER_MAX_AGE),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &RelaySettings {
        &self.settings
    }

    /// Sets or replaces the peer (SDP answer, re-INVITE, hold/resume from the peer). A new RTP
    /// address drops the latch; the payload map and direction take effect at once. A `0.0.0.0`
    /// address (RFC 2543 hold) stops sending but keeps the previous address and latch, so
    /// media from the peer is still accepted and resuming to the same address keeps the latch.
    pub fn set_peer(&mut self, peer: RemotePeer, now: Instant) {
        let was_armed = self.timeout_armed();
        let null_address = peer.rtp.ip().is_unspecified();
        let previous = self.peer.as_ref();
        // Both sides multiplex (RFC 5761 section 5.1.1): RTCP to the RTP address.
        let peer_rtcp = if self.settings.rtcp_mux && peer.rtcp_mux {
            peer.rtp
        } else {
            peer.rtcp
        };
        let (sdp_rtp, sdp_rtcp) = match previous {
            Some(p) if null_address => (p.sdp_rtp, p.sdp_rtcp),
            _ => (peer.rtp, peer_rtcp),
        };
        let address_changed =
            previous.is_none_or(|p| p.sdp_rtp != sdp_rtp || p.sdp_rtcp != sdp_rtcp);
        let (latched_rtp, latched_rtcp) = match previous {
            Some(p) if !address_changed => (p.latched_rtp, p.latched_rtcp),
            _ => (None, None),
        };
        // New keys start new contexts; the same keys keep them (and their rollover counts).
        if peer.srtp.as_ref() != self.srtp.keys() {
            let previous = std::mem::replace(&mut self.srtp, Srtp::Off);
            self.srtp = Srtp::rekeyed(previous, peer.srtp.clone(), &mut self.spare_outbound);
        }
        self.peer = Some(PeerState {
            null_address,
            sdp_rtp,
            sdp_rtcp,
            direction: peer.direction,
            payloads: peer.payloads,
            latched_rtp,
            latched_rtcp,
            // A new description may bring a new stream (a re-INVITE after a transfer, say):
            // the next valid packet pins the SSRC again.
            pinned_ssrc: None,
            candidate_ssrc: None,
            keyframe: peer.keyframe,
        });
        if self.next_report_at.is_none() {
            self.next_report_at = self.settings.rtcp_interval.map(|i| now + i);
        }
        // A new description after a reported timeout (the 200 after a silent 183, say)
        // restarts the count: the call it describes has not been silent yet.
        if address_changed || !was_armed || self.timeout_reported {
            self.restart_silence(now);
        }
        // What the device sent before the peer was known goes out now, in order.
        let early: Vec<_> = self.early_device.release(now).collect();
        for (datagram, _, recent) in early {
            if recent {
                self.handle_device_datagram(datagram, now);
            } else {
                self.drops.device_not_sendable += 1;
            }
        }
        // And what the peer sent before its answer reached us: only from the address its SDP
        // names (a stranger's held packet must not take the latch), checked as any packet,
        // at the time it arrived (jitter and latency see the wait).
        let early: Vec<_> = self.early_peer.release(now).collect();
        for ((packet, source), at, recent) in early {
            if recent && source == sdp_rtp {
                self.handle_rtp(&packet, source, at);
            } else {
                self.drops.rtp_before_peer += 1;
            }
        }
    }

    /// Sets the peer from an SDP stream (see [`RemotePeer::from_remote_media`]).
    pub fn set_remote_media(&mut self, remote: &RemoteMedia, now: Instant) {
        self.set_peer(RemotePeer::from_remote_media(remote), now);
    }

    /// Sets our side's direction as we wrote it in our SDP (`sendonly`/`inactive` while the
    /// device holds the call).
    pub fn set_local_direction(&mut self, direction: Direction, now: Instant) {
        let was_armed = self.timeout_armed();
        self.local_direction = direction;
        if !was_armed {
            self.restart_silence(now);
        }
    }

    /// Updates the largest datagram toward the device (header included), e.g. from the QUIC
    /// connection's current maximum.
    pub fn set_max_datagram_bytes(&mut self, max_datagram_bytes: usize) {
        self.settings.max_datagram_bytes = max_datagram_bytes;
    }

    fn restart_silence(&mut self, now: Instant) {
        self.silence_since = now;
        self.timeout_reported = false;
    }

    fn timeout_armed(&self) -> bool {
        self.settings.media_timeout.is_some()
            && !self.closed
            && self.local_direction == Direction::SendRecv
            && self
                .peer
                .as_ref()
                .is_some_and(|p| p.direction == Direction::SendRecv && p.receives())
    }

    fn sends_to_peer(&self) -> bool {
        self.local_direction.sends() && self.peer.as_ref().is_some_and(PeerState::receives)
    }

    fn delivers_to_device(&self) -> bool {
        self.local_direction.receives() && self.peer.as_ref().is_some_and(|p| p.direction.sends())
    }

    fn wallclock(&self, now: Instant) -> Duration {
        self.settings.wallclock_at_start + now.saturating_duration_since(self.epoch)
    }

    fn push_transmit(&mut self, mut transmit: Transmit) {
        if self.transmits.len() >= MAX_PENDING_TRANSMITS {
            self.drops.transmit_overflow += 1;
            return;
        }
        let protected = match &mut self.srtp {
            Srtp::Off => Some(transmit.packet),
            Srtp::On { outbound, .. } => match transmit.socket {
                SocketKind::Rtp => outbound.encrypt_rtp(&transmit.packet).ok(),
                SocketKind::Rtcp => outbound.encrypt_rtcp(&transmit.packet).ok(),
            },
            Srtp::Broken => None,
        };
        let Some(packet) = protected else {
            self.drops.srtp_protect_failed += 1;
            return;
        };
        transmit.packet = packet;
        self.transmits.push_back(transmit);
    }

    /// Checks and decrypts an SRTP (or SRTCP) packet from the peer; `None` (counted) when it
    /// fails. Plain RTP streams never come here. Before any key work: a packet too short to
    /// hold its suite's trailer, an SRTCP packet without the E flag, and a packet of an SSRC
    /// never authenticated once [`SRTP_MAX_PEER_SSRCS`] have failed, are refused.
    fn unprotect(&mut self, packet: &[u8], rtcp: bool) -> Option<Bytes> {
        let Srtp::On {
            keys,
            inbound,
            verified,
            failed,
            ..
        } = &mut self.srtp
        else {
            self.drops.srtp_auth_failed += 1;
            return None;
        };
        let (rtp_overhead, rtcp_overhead) = srtp_overhead(keys.suite);
        let (ssrc_at, least) = if rtcp {
            (4, 8 + rtcp_overhead)
        } else {
            (8, 12 + rtp_overhead)
        };
        let ssrc = packet
            .get(ssrc_at..ssrc_at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes);
        let (Some(ssrc), true) = (ssrc, packet.len() >= least) else {
            self.drops.srtp_auth_failed += 1;
            return None;
        };
        if rtcp && !srtcp_encrypted(keys.suite, packet) {
            self.drops.srtp_auth_failed += 1;
            return None;
        }
        let known = verified.contains(&ssrc) || failed.contains(&ssrc);
        if !known && failed.len() >= SRTP_MAX_PEER_SSRCS && verified.is_empty() {
            // Forged packets came before any real one: a fresh context (the library's state
            // for their SSRCs goes with the old one), so they cannot lock the real stream out.
            match srtp_context(keys.suite, &keys.remote, true) {
                Some(fresh) => {
                    *inbound = fresh;
                    failed.clear();
                }
                None => {
                    self.drops.srtp_too_many_ssrcs += 1;
                    return None;
                }
            }
        } else if !known
            && (failed.len() >= SRTP_MAX_PEER_SSRCS || verified.len() >= SRTP_MAX_PEER_SSRCS)
        {
            self.drops.srtp_too_many_ssrcs += 1;
            return None;
        }
        let result = if rtcp {
            inbound.decrypt_rtcp(packet)
        } else {
            inbound.decrypt_rtp(packet)
        };
        match result {
            Ok(clear) => {
                if !verified.contains(&ssrc) && verified.len() < SRTP_MAX_PEER_SSRCS {
                    verified.push(ssrc);
                }
                Some(clear)
            }
            Err(
                webrtc_srtp::Error::SrtpSsrcDuplicated(..)
                | webrtc_srtp::Error::SrtcpSsrcDuplicated(..),
            ) => {
                self.drops.srtp_replayed += 1;
                None
            }
            Err(_) => {
                if !known {
                    failed.push(ssrc);
                }
                self.drops.srtp_auth_failed += 1;
                None
            }
        }
    }

    fn push_event(&mut self, event: RelayEvent) {
        if self.events.len() < MAX_PENDING_EVENTS {
            self.events.push_back(event);
        }
    }

    fn take_scratch(&mut self) -> Bytes {
        self.scratch.split().freeze()
    }

    /// A media datagram from the device, received at `now`.
    pub fn handle_device_datagram(&mut self, datagram: Bytes, now: Instant) {
        if self.peer.is_none() && !self.closed {
            // Held until the peer is known (bounded; see `RelayCore::new`).
            if !self.early_device.hold(datagram, now) {
                self.drops.device_not_sendable += 1;
            }
            return;
        }
        let Ok(MediaDatagram { header, payload }) = MediaDatagram::decode(datagram) else {
            self.drops.device_malformed += 1;
            return;
        };
        if header.call_ref != self.settings.call_ref {
            self.drops.device_wrong_call += 1;
            return;
        }
        if header.stream_id != self.settings.stream_id {
            self.drops.device_wrong_stream += 1;
            return;
        }
        let target = self
            .peer
            .as_ref()
            .and_then(|p| p.payloads.to_remote(header.payload_type));
        self.account_device_arrival(&header, payload.len(), target, now);
        if !self.sends_to_peer() {
            self.drops.device_not_sendable += 1;
            return;
        }
        let Some(target) = target else {
            self.drops.device_unmapped_payload_type += 1;
            return;
        };
        let Some(destination) = self.peer.as_ref().map(PeerState::rtp_destination) else {
            self.drops.device_not_sendable += 1;
            return;
        };
        if !target.is_event {
            self.outbound.clock_rate = target.clock_rate;
        }
        let (timestamp, rebased) = self.map_device_timestamp(&header, now);
        let rtp = RtpHeader {
            marker: header.marker || rebased,
            payload_type: target.payload_type,
            sequence: self.outbound.sequence,
            timestamp,
            ssrc: self.settings.local_ssrc,
        };
        if rtp.encode(&payload, &mut self.scratch).is_err() {
            self.drops.device_unmapped_payload_type += 1;
            return;
        }
        let packet = self.take_scratch();
        self.outbound.sequence = self.outbound.sequence.wrapping_add(1);
        self.outbound.last_timestamp = timestamp;
        self.outbound.last_sent_at = Some(now);
        self.outbound.flow.packets += 1;
        self.outbound.flow.bytes += payload.len() as u64;
        self.outbound.sent_since_report = true;
        self.push_transmit(Transmit {
            socket: SocketKind::Rtp,
            destination,
            packet,
            received_at: Some(now),
        });
    }

    fn account_device_arrival(
        &mut self,
        header: &MediaHeader,
        payload_len: usize,
        target: Option<PayloadTarget>,
        now: Instant,
    ) {
        let elapsed = now.saturating_duration_since(self.epoch);
        let stream = &mut self.device_inbound;
        stream.flow.packets += 1;
        stream.flow.bytes += payload_len as u64;
        stream
            .tracker
            .get_or_insert_with(|| SequenceTracker::new(header.sequence))
            .update(header.sequence);
        if let Some(target) = target.filter(|t| !t.is_event) {
            if target.clock_rate != stream.clock_rate {
                stream.clock_rate = target.clock_rate;
                stream.jitter.restart();
            }
            stream
                .jitter
                .update(arrival_units(elapsed, target.clock_rate), header.timestamp);
        }
    }

    /// The RTP timestamp for a device timestamp, and whether the mapping was re-based because
    /// the device's sequence restarted.
    fn map_device_timestamp(&mut self, header: &MediaHeader, now: Instant) -> (u32, bool) {
        let out = &mut self.outbound;
        let restarted = out.last_device_sequence.is_some_and(|last| {
            let step = header.sequence.wrapping_sub(last);
            (MAX_DROPOUT..=u16::MAX - MAX_MISORDER).contains(&step)
        });
        out.last_device_sequence = Some(header.sequence);
        let offset = match out.timestamp_offset {
            Some(offset) if !restarted => offset,
            Some(_) => {
                let elapsed = out
                    .last_sent_at
                    .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
                let continued = out
                    .last_timestamp
                    .wrapping_add(arrival_units(elapsed, out.clock_rate).max(1));
                continued.wrapping_sub(header.timestamp)
            }
            None => self
                .settings
                .initial_timestamp
                .wrapping_sub(header.timestamp),
        };
        out.timestamp_offset = Some(offset);
        (header.timestamp.wrapping_add(offset), restarted)
    }

    /// Holds an RTP packet that came before the peer was known, or drops and counts it when
    /// [`EARLY_PEER_PACKETS`] are held already.
    fn hold_early_rtp(&mut self, packet: &[u8], source: SocketAddr, now: Instant) {
        // Copied only when there is room: a flood before the peer is known costs no allocation.
        if self.early_peer.is_full()
            || !self
                .early_peer
                .hold((Bytes::copy_from_slice(packet), source), now)
        {
            self.drops.rtp_before_peer += 1;
        }
    }

    /// A packet received on the RTP socket from `source` at `now` (RTCP multiplexed on the RTP
    /// port is recognised and handled as RTCP).
    pub fn handle_rtp(&mut self, packet: &[u8], source: SocketAddr, now: Instant) {
        if is_rtcp_packet(packet) {
            self.handle_rtcp(packet, source, now);
            return;
        }
        let latch = self.settings.latch;
        let clear;
        let packet = if matches!(self.srtp, Srtp::Off) {
            packet
        } else {
            // A stranger's packet costs no key work: the source is checked first.
            match self.peer.as_ref() {
                None => {
                    self.hold_early_rtp(packet, source, now);
                    return;
                }
                Some(peer) if !rtp_source_accepted(peer, latch, source) => {
                    self.drops.rtp_wrong_source += 1;
                    return;
                }
                Some(_) => {}
            }
            let Some(decrypted) = self.unprotect(packet, false) else {
                return;
            };
            clear = decrypted;
            &clear[..]
        };
        let Ok(rtp) = RtpPacket::parse(packet) else {
            self.drops.rtp_malformed += 1;
            return;
        };
        let Some(peer) = self.peer.as_mut() else {
            self.hold_early_rtp(packet, source, now);
            return;
        };
        if !rtp_source_accepted(peer, latch, source) {
            self.drops.rtp_wrong_source += 1;
            return;
        }
        let Some(target) = peer.payloads.to_device(rtp.header.payload_type) else {
            self.drops.rtp_unmapped_payload_type += 1;
            return;
        };
        let (ssrc, sequence) = (rtp.header.ssrc, rtp.header.sequence);
        match peer.pinned_ssrc {
            Some(pinned) if pinned != ssrc => {
                // Another stream: accepted only once it has sent enough packets in sequence.
                let count = match peer.candidate_ssrc {
                    Some((c, last, n)) if c == ssrc && sequence == last.wrapping_add(1) => n + 1,
                    _ => 1,
                };
                if count < SSRC_PROBATION {
                    peer.candidate_ssrc = Some((ssrc, sequence, count));
                    self.drops.rtp_wrong_ssrc += 1;
                    return;
                }
                peer.pinned_ssrc = Some(ssrc);
                peer.candidate_ssrc = None;
            }
            Some(_) => peer.candidate_ssrc = None,
            None => peer.pinned_ssrc = Some(ssrc),
        }
        // A valid packet from the peer.
        if peer.latched_rtp.is_none() && latch != LatchMode::Off {
            peer.latched_rtp = Some(source);
            self.push_event(RelayEvent::Latched { source });
        }
        self.silence_since = now;
        self.timeout_reported = false;
        self.from_peer.packets += 1;
        self.from_peer.bytes += rtp.payload.len() as u64;
        let elapsed = now.saturating_duration_since(self.epoch);
        let inbound = self.inbound_for(
            rtp.header.ssrc,
            rtp.header.sequence,
            rtp.header.timestamp,
            now,
        );
        inbound.tracker.update(rtp.header.sequence);
        if !target.is_event {
            if inbound.clock_rate != target.clock_rate {
                inbound.clock_rate = target.clock_rate;
                inbound.jitter.restart();
            }
            inbound.jitter.update(
                arrival_units(elapsed, target.clock_rate),
                rtp.header.timestamp,
            );
        }
        let marker = rtp.header.marker || inbound.force_marker;
        let sequence = rtp.header.sequence.wrapping_add(inbound.sequence_offset);
        let timestamp = rtp.header.timestamp.wrapping_add(inbound.timestamp_offset);
        if !self.delivers_to_device() {
            self.drops.rtp_held += 1;
            return;
        }
        if rtp.payload.len() > max_payload_bytes(self.settings.max_datagram_bytes) {
            self.drops.oversized += 1;
            return;
        }
        if let Some(inbound) = self.inbound.as_mut() {
            inbound.force_marker = false;
        }
        let header = MediaHeader {
            marker,
            payload_type: target.payload_type,
            sequence,
            timestamp,
            call_ref: self.settings.call_ref,
            stream_id: self.settings.stream_id,
        };
        if header.encode(rtp.payload, &mut self.scratch).is_err() {
            self.drops.rtp_unmapped_payload_type += 1;
            return;
        }
        let datagram = self.take_scratch();
        self.last_to_device = Some(LastToDevice {
            sequence,
            timestamp,
            at: now,
            clock_rate: if target.is_event {
                8_000
            } else {
                target.clock_rate
            },
        });
        if self.device_queue.len() >= self.settings.send_buffer_frames {
            self.device_queue.pop_front();
            self.drops.device_buffer_overflow += 1;
        }
        self.device_queue.push_back(DeviceDatagram {
            datagram,
            received_at: now,
        });
    }

    /// The reception state of the peer's stream `ssrc`, started fresh (with continuity
    /// offsets toward the device) when the SSRC changes.
    fn inbound_for(
        &mut self,
        ssrc: u32,
        sequence: u16,
        timestamp: u32,
        now: Instant,
    ) -> &mut Inbound {
        if self.inbound.as_ref().is_some_and(|s| s.ssrc != ssrc) {
            if let Some(old) = self.inbound.take() {
                self.retired_lost += u64::try_from(old.tracker.lost()).unwrap_or(0);
            }
        }
        let last = self.last_to_device;
        self.inbound.get_or_insert_with(|| {
            let (sequence_offset, timestamp_offset, force_marker) = match last {
                Some(last) => {
                    let elapsed = now.saturating_duration_since(last.at);
                    let continued = last
                        .timestamp
                        .wrapping_add(arrival_units(elapsed, last.clock_rate).max(1));
                    (
                        last.sequence.wrapping_add(1).wrapping_sub(sequence),
                        continued.wrapping_sub(timestamp),
                        true,
                    )
                }
                None => (0, 0, false),
            };
            Inbound {
                ssrc,
                tracker: SequenceTracker::new(sequence),
                jitter: JitterEstimator::new(),
                clock_rate: 0,
                sequence_offset,
                timestamp_offset,
                force_marker,
            }
        })
    }

    /// A packet received on the RTCP socket (or multiplexed on the RTP socket) from `source`
    /// at `now`.
    pub fn handle_rtcp(&mut self, packet: &[u8], source: SocketAddr, now: Instant) {
        let latch = self.settings.latch;
        let Some(peer) = self.peer.as_ref() else {
            self.drops.rtcp_wrong_source += 1;
            return;
        };
        let accepted = match (peer.latched_rtcp, peer.latched_rtp, latch) {
            (Some(latched), _, _) => source == latched,
            (None, Some(rtp), _) => source.ip() == rtp.ip(),
            (None, None, LatchMode::Any) => true,
            (None, None, LatchMode::Off | LatchMode::Peer) => {
                source.ip() == peer.sdp_rtcp.ip() || source.ip() == peer.sdp_rtp.ip()
            }
        };
        if !accepted {
            self.drops.rtcp_wrong_source += 1;
            return;
        }
        let clear;
        let packet = if matches!(self.srtp, Srtp::Off) {
            packet
        } else {
            let Some(decrypted) = self.unprotect(packet, true) else {
                return;
            };
            clear = decrypted;
            &clear[..]
        };
        let arrival = ntp_middle(ntp_timestamp(self.wallclock(now)));
        let local_ssrc = self.settings.local_ssrc;
        let clock_rate = self.outbound.clock_rate;
        let mut valid = false;
        let mut sender_report = None;
        let mut report = None;
        let mut keyframe_request = false;
        for item in parse_compound(packet) {
            if item.as_ref().is_ok_and(rtcp::is_keyframe_request) {
                keyframe_request = true;
                continue;
            }
            let blocks = match item {
                Err(_) => {
                    self.drops.rtcp_malformed += 1;
                    break;
                }
                Ok(RtcpPacket::SenderReport { info, blocks, .. }) => {
                    sender_report = Some(ntp_middle(info.ntp_timestamp));
                    blocks
                }
                Ok(RtcpPacket::ReceiverReport { blocks, .. }) => blocks,
                Ok(_) => continue,
            };
            valid = true;
            for block in blocks.filter(|b| b.ssrc == local_ssrc) {
                report = Some(block);
            }
        }
        // A key frame request may come alone (reduced-size RTCP, RFC 5506).
        if keyframe_request {
            if keyframe_request_allowed(&mut self.keyframe_requests.last_from_peer, now) {
                self.keyframe_requests.from_peer += 1;
                self.push_event(RelayEvent::KeyframeRequested);
            } else {
                self.drops.keyframe_requests_limited += 1;
            }
        }
        if !valid {
            return;
        }
        self.rtcp_received += 1;
        if let Some(middle) = sender_report {
            self.last_sender_report = Some((middle, now));
        }
        if let Some(block) = report {
            let previous_rtt = self.peer_report.and_then(|r| r.round_trip);
            self.peer_report = Some(PeerReport {
                fraction_lost: block.fraction_lost,
                cumulative_lost: block.cumulative_lost,
                jitter: units_to_duration(u64::from(block.jitter), clock_rate),
                round_trip: round_trip(
                    arrival,
                    block.last_sender_report,
                    block.delay_since_last_sender_report,
                )
                .or(previous_rtt),
            });
        }
        if let Some(peer) = self.peer.as_mut() {
            if peer.latched_rtcp.is_none() && latch != LatchMode::Off {
                peer.latched_rtcp = Some(source);
            }
        }
    }

    /// Runs the timers due at `now`: media timeout, RTCP report.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(deadline) = self.timeout_deadline() {
            if now >= deadline {
                self.timeout_reported = true;
                self.push_event(RelayEvent::MediaTimeout {
                    silent_for: now.saturating_duration_since(self.silence_since),
                });
            }
        }
        if let (Some(due), Some(interval)) = (self.next_report_at, self.settings.rtcp_interval) {
            if now >= due && !self.closed {
                self.send_report(now, ReportTail::Nothing);
                self.next_report_at = Some(now + interval);
            }
        }
    }

    fn timeout_deadline(&self) -> Option<Instant> {
        if !self.timeout_armed() || self.timeout_reported {
            return None;
        }
        self.settings
            .media_timeout
            .map(|timeout| self.silence_since + timeout)
    }

    /// When [`RelayCore::handle_timeout`] should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let report = if self.closed {
            None
        } else {
            self.next_report_at
        };
        match (self.timeout_deadline(), report) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The device asks the peer for a key frame: a compound RTCP packet with a PLI about the
    /// peer's stream goes out at once, unless one went less than
    /// [`KEYFRAME_REQUEST_INTERVAL`] ago (then it is dropped and counted).
    pub fn request_keyframe(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        let method = self
            .peer
            .as_ref()
            .map_or(KeyframeMethod::Pli, |p| p.keyframe);
        if method == KeyframeMethod::Never {
            self.drops.keyframe_requests_not_negotiated += 1;
            return;
        }
        if !keyframe_request_allowed(&mut self.keyframe_requests.last_to_peer, now) {
            self.drops.keyframe_requests_limited += 1;
            return;
        }
        self.keyframe_requests.to_peer += 1;
        let tail = match method {
            KeyframeMethod::Fir => {
                let requests = &mut self.keyframe_requests;
                requests.fir_sequence = requests.fir_sequence.wrapping_add(1);
                ReportTail::FullIntra(requests.fir_sequence)
            }
            _ => ReportTail::PictureLoss,
        };
        self.send_report(now, tail);
    }

    fn send_report(&mut self, now: Instant, tail: ReportTail) {
        let Some(destination) = self.peer.as_ref().map(PeerState::rtcp_destination) else {
            return;
        };
        if destination.ip().is_unspecified() {
            return;
        }
        let lsr = self.last_sender_report;
        let block = self.inbound.as_mut().map(|s| ReportBlock {
            ssrc: s.ssrc,
            fraction_lost: s.tracker.take_fraction_lost(),
            cumulative_lost: s.tracker.cumulative_lost(),
            highest_sequence: s.tracker.extended_max(),
            jitter: s.jitter.jitter_units(),
            last_sender_report: lsr.map_or(0, |(middle, _)| middle),
            delay_since_last_sender_report: lsr
                .map_or(0, |(_, at)| to_ntp_short(now.saturating_duration_since(at))),
        });
        let ssrc = self.settings.local_ssrc;
        if self.outbound.sent_since_report {
            let out = &self.outbound;
            let elapsed = out
                .last_sent_at
                .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
            let info = SenderInfo {
                ntp_timestamp: ntp_timestamp(self.wallclock(now)),
                rtp_timestamp: out
                    .last_timestamp
                    .wrapping_add(arrival_units(elapsed, out.clock_rate)),
                packet_count: out.flow.packets as u32,
                octet_count: out.flow.bytes as u32,
            };
            rtcp::write_sender_report(&mut self.scratch, ssrc, &info, block.as_ref());
        } else {
            rtcp::write_receiver_report(&mut self.scratch, ssrc, block.as_ref());
        }
        rtcp::write_sdes_cname(&mut self.scratch, ssrc, &self.settings.cname);
        match tail {
            ReportTail::Nothing => {}
            ReportTail::Goodbye => rtcp::write_bye(&mut self.scratch, ssrc),
            ReportTail::PictureLoss => {
                let media_ssrc = self.inbound.as_ref().map_or(0, |s| s.ssrc);
                rtcp::write_picture_loss(&mut self.scratch, ssrc, media_ssrc);
            }
            ReportTail::FullIntra(sequence) => {
                let media_ssrc = self.inbound.as_ref().map_or(0, |s| s.ssrc);
                rtcp::write_full_intra_request(&mut self.scratch, ssrc, media_ssrc, sequence);
            }
        }
        self.outbound.sent_since_report = false;
        let packet = self.take_scratch();
        self.rtcp_sent += 1;
        self.push_transmit(Transmit {
            socket: SocketKind::Rtcp,
            destination,
            packet,
            received_at: None,
        });
    }

    /// Ends the relay: queues a final report with an RTCP BYE (when a peer is known) and stops
    /// all timers. Later input is still accounted but nothing new is scheduled.
    pub fn close(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        if self.settings.rtcp_interval.is_some() {
            self.send_report(now, ReportTail::Goodbye);
        }
        // Packets held for a peer that never came are dropped now, and counted.
        self.drops.rtp_before_peer += self.early_peer.clear() as u64;
        self.closed = true;
    }

    /// The next packet to send to the peer.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next datagram for the device (oldest first). Counted as sent to the device.
    pub fn poll_device_datagram(&mut self) -> Option<DeviceDatagram> {
        let next = self.device_queue.pop_front()?;
        self.to_device.packets += 1;
        self.to_device.bytes +=
            next.datagram
                .len()
                .saturating_sub(thalamus_proto::media::HEADER_BYTES) as u64;
        Some(next)
    }

    /// Puts back a datagram the device link could not take yet (it goes first again; if the
    /// buffer filled meanwhile, the oldest is dropped).
    pub fn requeue_device_datagram(&mut self, datagram: DeviceDatagram) {
        self.to_device.packets = self.to_device.packets.saturating_sub(1);
        self.to_device.bytes = self.to_device.bytes.saturating_sub(
            datagram
                .datagram
                .len()
                .saturating_sub(thalamus_proto::media::HEADER_BYTES) as u64,
        );
        if self.device_queue.len() >= self.settings.send_buffer_frames {
            self.drops.device_buffer_overflow += 1;
            return;
        }
        self.device_queue.push_front(datagram);
    }

    /// Datagrams waiting for the device.
    pub fn device_queue_len(&self) -> usize {
        self.device_queue.len()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<RelayEvent> {
        self.events.pop_front()
    }

    /// Records that a relayed packet left at `now` (the shell calls this after the send).
    pub fn record_relay_latency(
        &mut self,
        direction: RelayDirection,
        received_at: Instant,
        now: Instant,
    ) {
        let latency = now.saturating_duration_since(received_at);
        match direction {
            RelayDirection::ToPeer => self.latency_to_peer.record(latency),
            RelayDirection::ToDevice => self.latency_to_device.record(latency),
        }
    }

    /// The relay latency histograms so far: (device -> peer, peer -> device).
    pub fn latency_histograms(&self) -> (&LatencyHistogram, &LatencyHistogram) {
        (&self.latency_to_peer, &self.latency_to_device)
    }

    /// Counts a received packet too large for the receive buffer (dropped as oversized).
    pub fn record_oversized_packet(&mut self) {
        self.drops.oversized += 1;
    }

    /// Counts a datagram the device link refused.
    pub fn record_device_send_failed(&mut self) {
        self.drops.device_send_failed += 1;
    }

    /// Counts a packet the socket refused.
    pub fn record_socket_send_failed(&mut self) {
        self.drops.socket_send_failed += 1;
    }

    /// Where RTP goes now: the latched source, else the SDP address (`None` without a peer).
    pub fn rtp_destination(&self) -> Option<SocketAddr> {
        self.peer.as_ref().map(PeerState::rtp_destination)
    }

    /// Where RTCP goes now.
    pub fn rtcp_destination(&self) -> Option<SocketAddr> {
        self.peer.as_ref().map(PeerState::rtcp_destination)
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> RelayStats {
        let from_device = ReceptionStats {
            flow: self.device_inbound.flow,
            lost: self
                .device_inbound
                .tracker
                .as_ref()
                .map_or(0, |t| u64::try_from(t.lost()).unwrap_or(0)),
            jitter: self
                .device_inbound
                .jitter
                .jitter(self.device_inbound.clock_rate),
        };
        let from_peer = ReceptionStats {
            flow: self.from_peer,
            lost: self.retired_lost
                + self
                    .inbound
                    .as_ref()
                    .map_or(0, |s| u64::try_from(s.tracker.lost()).unwrap_or(0)),
            jitter: self
                .inbound
                .as_ref()
                .map_or(Duration::ZERO, |s| s.jitter.jitter(s.clock_rate)),
        };
        let mut all = self.latency_to_peer.clone();
        all.merge(&self.latency_to_device);
        RelayStats {
            call_ref: self.settings.call_ref,
            from_device,
            to_device: self.to_device,
            from_peer,
            to_peer: self.outbound.flow,
            rtcp_sent: self.rtcp_sent,
            rtcp_received: self.rtcp_received,
            keyframe_requests_to_peer: self.keyframe_requests.to_peer,
            keyframe_requests_from_peer: self.keyframe_requests.from_peer,
            latency_to_peer: self.latency_to_peer.summary(),
            latency_to_device: self.latency_to_device.summary(),
            latency: all.summary(),
            peer_report: self.peer_report,
            latched_source: self.peer.as_ref().and_then(|p| p.latched_rtp),
            drops: self.drops,
        }
    }
}

#[cfg(test)]
// `Instant::now()` in tests only gives the virtual clock its origin.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use crate::rtcp::{write_receiver_report, write_sender_report, RtcpPacket};
    use crate::rtp::TelephoneEvent;
    use thalamus_sip::sdp::{Codec, MediaKind};

    const CALL: u32 = 42;
    const SSRC: u32 = 0x5555_0001;
    const PEER_SSRC: u32 = 0x7777_0002;

    fn peer_rtp() -> SocketAddr {
        "192.0.2.5:5004".parse().unwrap()
    }

    fn remote(direction: Direction) -> RemoteMedia {
        RemoteMedia {
            kind: MediaKind::Audio,
            index: 0,
            rtp: peer_rtp(),
            rtcp: "192.0.2.5:5005".parse().unwrap(),
            rtcp_mux: false,
            direction,
            codecs: vec![Codec::opus(96), Codec::pcmu()],
            telephone_event: Some(Codec::telephone_event(97, 48_000)),
            ptime: Some(20),
            crypto: Vec::new(),
            feedback: Default::default(),
        }
    }

    fn settings() -> RelaySettings {
        RelaySettings {
            local_ssrc: SSRC,
            initial_sequence: 65_534,
            initial_timestamp: 1_000,
            media_timeout: Some(Duration::from_secs(30)),
            rtcp_interval: Some(Duration::from_secs(5)),
            send_buffer_frames: 4,
            wallclock_at_start: Duration::from_secs(1_700_000_000),
            ..RelaySettings::new(CALL, StreamId::AUDIO)
        }
    }

    fn started(settings: RelaySettings) -> (RelayCore, Instant) {
        let t0 = Instant::now();
        let mut core = RelayCore::new(settings, t0);
        core.set_remote_media(&remote(Direction::SendRecv), t0);
        (core, t0)
    }

    fn device(pt: u8, sequence: u16, timestamp: u32, marker: bool, payload: &[u8]) -> Bytes {
        MediaHeader {
            marker,
            payload_type: pt,
            sequence,
            timestamp,
            call_ref: CALL,
            stream_id: StreamId::AUDIO,
        }
        .to_bytes(payload)
        .unwrap()
    }

    fn rtp(pt: u8, sequence: u16, timestamp: u32, ssrc: u32, payload: &[u8]) -> Vec<u8> {
        let mut dst = BytesMut::new();
        RtpHeader {
            marker: false,
            payload_type: pt,
            sequence,
            timestamp,
            ssrc,
        }
        .encode(payload, &mut dst)
        .unwrap();
        dst.to_vec()
    }

    fn sent_rtp(core: &mut RelayCore) -> Vec<(SocketAddr, RtpHeader, Vec<u8>)> {
        std::iter::from_fn(|| core.poll_transmit())
            .filter(|t| t.socket == SocketKind::Rtp)
            .map(|t| {
                let p = RtpPacket::parse(&t.packet).unwrap();
                (t.destination, p.header, p.payload.to_vec())
            })
            .collect()
    }

    fn to_device(core: &mut RelayCore) -> Vec<MediaDatagram> {
        std::iter::from_fn(|| core.poll_device_datagram())
            .map(|d| MediaDatagram::decode(d.datagram).unwrap())
            .collect()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn device_to_rtp_maps_payload_type_ssrc_sequence_and_timestamp() {
        let (mut core, t0) = started(settings());
        // The device's sequence jumps (lost datagrams on the QUIC side); ours does not.
        core.handle_device_datagram(device(111, 10, 48_000, true, b"a"), t0);
        core.handle_device_datagram(device(111, 11, 48_960, false, b"b"), t0 + ms(20));
        core.handle_device_datagram(device(111, 15, 52_800, false, b"c"), t0 + ms(100));
        let sent = sent_rtp(&mut core);
        assert_eq!(sent.len(), 3);
        assert!(sent
            .iter()
            .all(|(dest, h, _)| *dest == peer_rtp() && h.ssrc == SSRC && h.payload_type == 96));
        let seqs: Vec<u16> = sent.iter().map(|(_, h, _)| h.sequence).collect();
        assert_eq!(seqs, vec![65_534, 65_535, 0]);
        let stamps: Vec<u32> = sent.iter().map(|(_, h, _)| h.timestamp).collect();
        assert_eq!(stamps, vec![1_000, 1_960, 5_800]);
        assert_eq!(
            sent.iter().map(|(_, h, _)| h.marker).collect::<Vec<_>>(),
            vec![true, false, false]
        );
        assert_eq!(sent[2].2, b"c");
        let stats = core.stats();
        assert_eq!(stats.to_peer.packets, 3);
        assert_eq!(stats.to_peer.bytes, 3);
        assert_eq!(stats.from_device.flow.packets, 3);
        // 10 is on probation; 11..=15 counted with 12, 13, 14 missing.
        assert_eq!(stats.from_device.lost, 3);
    }

    #[test]
    fn telephone_event_passes_through_with_its_payload_type_mapped() {
        let (mut core, t0) = started(settings());
        core.handle_device_datagram(device(111, 1, 960, false, b"voice"), t0);
        let event = TelephoneEvent {
            event: 5,
            end: false,
            volume: 10,
            duration: 960,
        };
        for (i, end) in [false, false, true].into_iter().enumerate() {
            let payload = TelephoneEvent { end, ..event }.to_bytes();
            core.handle_device_datagram(
                device(101, 2 + i as u16, 1_920, i == 0, &payload),
                t0 + ms(20 * (i as u64 + 1)),
            );
        }
        let sent = sent_rtp(&mut core);
        assert_eq!(sent.len(), 4);
        for (_, header, payload) in &sent[1..] {
            assert_eq!(header.payload_type, 97);
            assert_eq!(
                header.timestamp,
                1_000 + 960,
                "one timestamp for the whole event"
            );
            assert_eq!(TelephoneEvent::parse(payload).unwrap().event, 5);
        }
        assert!(sent[1].1.marker);
        assert!(TelephoneEvent::parse(&sent[3].2).unwrap().end);
        // Unnegotiated device payload type (PCMA) is dropped and counted.
        core.handle_device_datagram(device(8, 5, 3_000, false, b"x"), t0 + ms(100));
        assert!(sent_rtp(&mut core).is_empty());
        assert_eq!(core.stats().drops.device_unmapped_payload_type, 1);
    }

    #[test]
    fn device_restart_rebases_timestamps_for_continuity() {
        let (mut core, t0) = started(settings());
        core.handle_device_datagram(device(0, 100, 8_000, false, b"a"), t0);
        core.handle_device_datagram(device(0, 101, 8_160, false, b"b"), t0 + ms(20));
        // The device restarted (new session): sequence and timestamp start over.
        core.handle_device_datagram(device(0, 40_000, 77, false, b"c"), t0 + ms(60));
        core.handle_device_datagram(device(0, 40_001, 237, false, b"d"), t0 + ms(80));
        let sent = sent_rtp(&mut core);
        let stamps: Vec<u32> = sent.iter().map(|(_, h, _)| h.timestamp).collect();
        // PCMU is 8 kHz: 40 ms after the last packet is 320 units.
        assert_eq!(stamps, vec![1_000, 1_160, 1_480, 1_640]);
        assert!(sent[2].1.marker, "a re-based stream starts a talkspurt");
        assert!(!sent[3].1.marker);
        let seqs: Vec<u16> = sent.iter().map(|(_, h, _)| h.sequence).collect();
        assert_eq!(seqs, vec![65_534, 65_535, 0, 1]);
    }

    #[test]
    fn rtp_to_device_builds_the_media_header() {
        let (mut core, t0) = started(settings());
        core.handle_rtp(&rtp(96, 500, 9_600, PEER_SSRC, b"opus"), peer_rtp(), t0);
        core.handle_rtp(
            &rtp(0, 501, 9_760, PEER_SSRC, b"pcmu"),
            peer_rtp(),
            t0 + ms(20),
        );
        let out = to_device(&mut core);
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[0].header,
            MediaHeader {
                marker: false,
                payload_type: 111,
                sequence: 500,
                timestamp: 9_600,
                call_ref: CALL,
                stream_id: StreamId::AUDIO,
            }
        );
        assert_eq!(&out[0].payload[..], b"opus");
        assert_eq!(out[1].header.payload_type, 0);
        assert_eq!(out[1].header.sequence, 501);
        // An unmapped payload type (comfort noise 13) is dropped.
        core.handle_rtp(
            &rtp(13, 502, 9_920, PEER_SSRC, b"cn"),
            peer_rtp(),
            t0 + ms(40),
        );
        assert!(to_device(&mut core).is_empty());
        let stats = core.stats();
        assert_eq!(stats.drops.rtp_unmapped_payload_type, 1);
        assert_eq!(stats.to_device.packets, 2);
        assert_eq!(stats.to_device.bytes, 8);
        assert_eq!(stats.from_peer.flow.packets, 2);
    }

    #[test]
    fn peer_ssrc_change_keeps_device_numbering_continuous() {
        let (mut core, t0) = started(settings());
        core.handle_rtp(&rtp(0, 100, 1_600, PEER_SSRC, b"a"), peer_rtp(), t0);
        core.handle_rtp(
            &rtp(0, 101, 1_760, PEER_SSRC, b"b"),
            peer_rtp(),
            t0 + ms(20),
        );
        // The peer switches to another source (e.g. a media server took over): after its
        // probation (the first two of its packets are dropped) it is followed.
        core.handle_rtp(&rtp(0, 8_998, 499_680, 0x1, b"-"), peer_rtp(), t0 + ms(40));
        core.handle_rtp(&rtp(0, 8_999, 499_840, 0x1, b"-"), peer_rtp(), t0 + ms(40));
        core.handle_rtp(&rtp(0, 9_000, 500_000, 0x1, b"c"), peer_rtp(), t0 + ms(40));
        core.handle_rtp(&rtp(0, 9_001, 500_160, 0x1, b"d"), peer_rtp(), t0 + ms(60));
        assert_eq!(core.stats().drops.rtp_wrong_ssrc, 2);
        let out = to_device(&mut core);
        let seqs: Vec<u16> = out.iter().map(|d| d.header.sequence).collect();
        assert_eq!(seqs, vec![100, 101, 102, 103]);
        let stamps: Vec<u32> = out.iter().map(|d| d.header.timestamp).collect();
        assert_eq!(stamps, vec![1_600, 1_760, 1_920, 2_080]);
        assert!(out[2].header.marker);
        assert!(!out[3].header.marker);
    }

    #[test]
    fn latching_to_the_observed_source_in_peer_mode() {
        let (mut core, t0) = started(settings());
        let nat_port: SocketAddr = "192.0.2.5:62000".parse().unwrap();
        let stranger: SocketAddr = "198.51.100.9:5004".parse().unwrap();
        // Another address is refused, and does not latch.
        core.handle_rtp(&rtp(0, 1, 160, PEER_SSRC, b"x"), stranger, t0);
        assert_eq!(core.stats().drops.rtp_wrong_source, 1);
        assert_eq!(core.rtp_destination(), Some(peer_rtp()));
        // Junk from the peer's address does not latch either.
        core.handle_rtp(&[0x80, 0, 1], nat_port, t0);
        core.handle_rtp(&rtp(13, 1, 160, PEER_SSRC, b"x"), nat_port, t0);
        assert_eq!(core.rtp_destination(), Some(peer_rtp()));
        // The first valid packet from the peer's IP latches its exact port.
        core.handle_rtp(&rtp(0, 2, 320, PEER_SSRC, b"x"), nat_port, t0);
        assert_eq!(core.rtp_destination(), Some(nat_port));
        assert_eq!(
            core.poll_event(),
            Some(RelayEvent::Latched { source: nat_port })
        );
        core.handle_device_datagram(device(0, 1, 0, false, b"y"), t0);
        assert_eq!(sent_rtp(&mut core)[0].0, nat_port);
        // From now on only that source is accepted, even the SDP address itself.
        core.handle_rtp(&rtp(0, 3, 480, PEER_SSRC, b"x"), peer_rtp(), t0);
        assert_eq!(core.stats().drops.rtp_wrong_source, 2);
        assert_eq!(core.stats().latched_source, Some(nat_port));
        // A 0.0.0.0 hold and a resume to the same address keep the latch.
        let mut null = remote(Direction::SendRecv);
        null.rtp = "0.0.0.0:5004".parse().unwrap();
        core.set_remote_media(&null, t0);
        core.set_remote_media(&remote(Direction::SendRecv), t0);
        assert_eq!(core.rtp_destination(), Some(nat_port));
        // A new SDP address (re-INVITE) drops the latch.
        let mut moved = remote(Direction::SendRecv);
        moved.rtp = "192.0.2.77:7000".parse().unwrap();
        core.set_remote_media(&moved, t0);
        assert_eq!(core.rtp_destination(), Some(moved.rtp));
        // The same SDP again keeps a latch.
        core.handle_rtp(
            &rtp(0, 4, 640, PEER_SSRC, b"x"),
            "192.0.2.77:7100".parse().unwrap(),
            t0,
        );
        core.set_remote_media(&moved, t0);
        assert_eq!(
            core.rtp_destination(),
            Some("192.0.2.77:7100".parse().unwrap())
        );
    }

    #[test]
    fn the_first_ssrc_is_pinned_until_the_next_sdp() {
        let (mut core, t0) = started(settings());
        let source: SocketAddr = "192.0.2.5:62000".parse().unwrap();
        core.handle_rtp(&rtp(0, 1, 160, PEER_SSRC, b"a"), source, t0);
        assert_eq!(to_device(&mut core).len(), 1);
        // The same address, another SSRC (stray or injected packets, out of sequence): dropped,
        // however many.
        for seq in [50, 7, 900, 51, 3] {
            core.handle_rtp(&rtp(0, seq, 320, PEER_SSRC ^ 1, b"b"), source, t0);
        }
        assert_eq!(to_device(&mut core).len(), 0);
        assert_eq!(core.stats().drops.rtp_wrong_ssrc, 5);
        core.handle_rtp(&rtp(0, 3, 480, PEER_SSRC, b"c"), source, t0);
        assert_eq!(to_device(&mut core).len(), 1);
        // A new SDP from the peer (same address) accepts a new stream, which is pinned in turn.
        core.set_remote_media(&remote(Direction::SendRecv), t0);
        core.handle_rtp(&rtp(0, 1, 160, PEER_SSRC ^ 1, b"d"), source, t0);
        assert_eq!(to_device(&mut core).len(), 1);
        core.handle_rtp(&rtp(0, 4, 640, PEER_SSRC, b"e"), source, t0);
        assert_eq!(to_device(&mut core).len(), 0);
        assert_eq!(core.stats().drops.rtp_wrong_ssrc, 6);
    }

    #[test]
    fn latching_any_source_and_latching_off() {
        let stranger: SocketAddr = "198.51.100.9:40000".parse().unwrap();
        let (mut core, t0) = started(RelaySettings {
            latch: LatchMode::Any,
            ..settings()
        });
        core.handle_rtp(&rtp(0, 1, 160, PEER_SSRC, b"x"), stranger, t0);
        assert_eq!(core.rtp_destination(), Some(stranger));
        assert_eq!(to_device(&mut core).len(), 1);

        let (mut core, t0) = started(RelaySettings {
            latch: LatchMode::Off,
            ..settings()
        });
        core.handle_rtp(&rtp(0, 1, 160, PEER_SSRC, b"x"), stranger, t0);
        assert_eq!(core.stats().drops.rtp_wrong_source, 1);
        let other_port: SocketAddr = "192.0.2.5:9999".parse().unwrap();
        core.handle_rtp(&rtp(0, 2, 320, PEER_SSRC, b"x"), other_port, t0);
        assert_eq!(to_device(&mut core).len(), 1);
        assert_eq!(core.rtp_destination(), Some(peer_rtp()));
        assert_eq!(core.poll_event(), None);
    }

    fn exchange(core: &mut RelayCore, now: Instant, seq: u16) -> (usize, usize) {
        core.handle_device_datagram(device(0, seq, u32::from(seq) * 160, false, b"d"), now);
        core.handle_rtp(
            &rtp(0, seq, u32::from(seq) * 160, PEER_SSRC, b"p"),
            peer_rtp(),
            now,
        );
        (sent_rtp(core).len(), to_device(core).len())
    }

    #[test]
    fn hold_gates_each_direction() {
        let (mut core, t0) = started(settings());
        assert_eq!(exchange(&mut core, t0, 1), (1, 1));
        // The peer holds us (sendonly): we must not send; its music on hold still reaches us.
        core.set_remote_media(&remote(Direction::SendOnly), t0);
        assert_eq!(exchange(&mut core, t0, 2), (0, 1));
        // The peer is inactive: nothing either way.
        core.set_remote_media(&remote(Direction::Inactive), t0);
        assert_eq!(exchange(&mut core, t0, 3), (0, 0));
        // RFC 2543 hold: address 0.0.0.0.
        let mut null = remote(Direction::SendRecv);
        null.rtp = "0.0.0.0:5004".parse().unwrap();
        core.set_remote_media(&null, t0);
        assert_eq!(exchange(&mut core, t0, 4), (0, 1));
        // Peer recvonly (we hold it and it answered recvonly): no media toward the device.
        core.set_remote_media(&remote(Direction::RecvOnly), t0);
        assert_eq!(exchange(&mut core, t0, 5), (1, 0));
        // The device holds the call (our SDP sendonly): nothing toward the device.
        core.set_remote_media(&remote(Direction::SendRecv), t0);
        core.set_local_direction(Direction::SendOnly, t0);
        assert_eq!(exchange(&mut core, t0, 6), (1, 0));
        core.set_local_direction(Direction::Inactive, t0);
        assert_eq!(exchange(&mut core, t0, 7), (0, 0));
        core.set_local_direction(Direction::SendRecv, t0);
        assert_eq!(exchange(&mut core, t0, 8), (1, 1));
        let drops = core.stats().drops;
        assert_eq!(drops.device_not_sendable, 4);
        assert_eq!(drops.rtp_held, 4);
    }

    #[test]
    fn media_timeout_on_a_fake_clock() {
        let (mut core, t0) = started(RelaySettings {
            rtcp_interval: None,
            ..settings()
        });
        assert_eq!(core.poll_timeout(), Some(t0 + Duration::from_secs(30)));
        core.handle_timeout(t0 + Duration::from_secs(29));
        assert_eq!(core.poll_event(), None);
        // RTP at 10 s pushes the deadline to 40 s.
        core.handle_rtp(
            &rtp(0, 1, 160, PEER_SSRC, b"x"),
            peer_rtp(),
            t0 + Duration::from_secs(10),
        );
        core.poll_event(); // Latched
        assert_eq!(core.poll_timeout(), Some(t0 + Duration::from_secs(40)));
        core.handle_timeout(t0 + Duration::from_secs(30));
        assert_eq!(core.poll_event(), None);
        core.handle_timeout(t0 + Duration::from_secs(40));
        assert_eq!(
            core.poll_event(),
            Some(RelayEvent::MediaTimeout {
                silent_for: Duration::from_secs(30)
            })
        );
        // Reported once.
        assert_eq!(core.poll_timeout(), None);
        core.handle_timeout(t0 + Duration::from_secs(100));
        assert_eq!(core.poll_event(), None);
        // Media resumes: armed again.
        core.handle_rtp(
            &rtp(0, 2, 320, PEER_SSRC, b"x"),
            peer_rtp(),
            t0 + Duration::from_secs(101),
        );
        assert_eq!(core.poll_timeout(), Some(t0 + Duration::from_secs(131)));
    }

    #[test]
    fn a_new_description_after_a_reported_timeout_arms_it_again() {
        let (mut core, t0) = started(RelaySettings {
            rtcp_interval: None,
            ..settings()
        });
        core.handle_timeout(t0 + Duration::from_secs(30));
        assert!(matches!(
            core.poll_event(),
            Some(RelayEvent::MediaTimeout { .. })
        ));
        assert_eq!(core.poll_timeout(), None);
        // The same address again (a 200 after a silent 183): a fresh period from now.
        let answered = t0 + Duration::from_secs(31);
        core.set_remote_media(&remote(Direction::SendRecv), answered);
        assert_eq!(
            core.poll_timeout(),
            Some(answered + Duration::from_secs(30))
        );
    }

    #[test]
    fn media_timeout_is_suspended_while_on_hold() {
        let (mut core, t0) = started(RelaySettings {
            rtcp_interval: None,
            ..settings()
        });
        core.set_remote_media(&remote(Direction::Inactive), t0 + Duration::from_secs(5));
        assert_eq!(core.poll_timeout(), None);
        core.handle_timeout(t0 + Duration::from_secs(600));
        assert_eq!(core.poll_event(), None);
        // Resumed at 600 s: the silence is counted from the resume.
        let resume = t0 + Duration::from_secs(600);
        core.set_remote_media(&remote(Direction::SendRecv), resume);
        assert_eq!(core.poll_timeout(), Some(resume + Duration::from_secs(30)));
        // Our own hold suspends it too.
        core.set_local_direction(Direction::SendOnly, resume);
        assert_eq!(core.poll_timeout(), None);
        core.set_local_direction(Direction::SendRecv, resume + Duration::from_secs(1));
        assert_eq!(core.poll_timeout(), Some(resume + Duration::from_secs(31)));
        // Disabled by configuration.
        let (core, _) = started(RelaySettings {
            rtcp_interval: None,
            media_timeout: None,
            ..settings()
        });
        assert_eq!(core.poll_timeout(), None);
    }

    #[test]
    fn full_send_buffer_drops_the_oldest() {
        let (mut core, t0) = started(settings()); // 4 frames
        for seq in 0..6u16 {
            core.handle_rtp(
                &rtp(0, seq, u32::from(seq) * 160, PEER_SSRC, &[seq as u8]),
                peer_rtp(),
                t0,
            );
        }
        assert_eq!(core.device_queue_len(), 4);
        let out = to_device(&mut core);
        let seqs: Vec<u16> = out.iter().map(|d| d.header.sequence).collect();
        assert_eq!(seqs, vec![2, 3, 4, 5]);
        assert_eq!(core.stats().drops.device_buffer_overflow, 2);
        // A requeued datagram goes first again.
        core.handle_rtp(&rtp(0, 6, 960, PEER_SSRC, b"6"), peer_rtp(), t0);
        core.handle_rtp(&rtp(0, 7, 1_120, PEER_SSRC, b"7"), peer_rtp(), t0);
        let first = core.poll_device_datagram().unwrap();
        core.requeue_device_datagram(first);
        let again: Vec<u16> = to_device(&mut core)
            .iter()
            .map(|d| d.header.sequence)
            .collect();
        assert_eq!(again, vec![6, 7]);
        assert_eq!(core.stats().to_device.packets, 6);
    }

    #[test]
    fn oversized_payloads_are_dropped() {
        let (mut core, t0) = started(RelaySettings {
            max_datagram_bytes: 100,
            ..settings()
        });
        core.handle_rtp(&rtp(0, 1, 160, PEER_SSRC, &[0; 87]), peer_rtp(), t0);
        core.handle_rtp(&rtp(0, 2, 320, PEER_SSRC, &[0; 88]), peer_rtp(), t0);
        let out = to_device(&mut core);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].payload.len(), 87);
        assert_eq!(core.stats().drops.oversized, 1);
        core.set_max_datagram_bytes(10);
        core.handle_rtp(&rtp(0, 3, 480, PEER_SSRC, &[]), peer_rtp(), t0);
        core.handle_rtp(&rtp(0, 4, 640, PEER_SSRC, &[0]), peer_rtp(), t0);
        let out = to_device(&mut core);
        assert_eq!(out.len(), 1, "an empty payload still fits");
        assert_eq!(out[0].header.sequence, 3);
        assert_eq!(core.stats().drops.oversized, 2);
    }

    #[test]
    fn bad_input_is_counted_never_fatal() {
        let (mut core, t0) = started(settings());
        core.handle_device_datagram(Bytes::from_static(b"short"), t0);
        core.handle_device_datagram(Bytes::from_static(&[0x80; 20]), t0); // version 2
        let mut other_call = BytesMut::new();
        MediaHeader {
            call_ref: CALL + 1,
            ..MediaHeader::default()
        }
        .encode(b"x", &mut other_call)
        .unwrap();
        core.handle_device_datagram(other_call.freeze(), t0);
        core.handle_device_datagram(
            MediaHeader {
                call_ref: CALL,
                stream_id: StreamId::VIDEO,
                ..MediaHeader::default()
            }
            .to_bytes(b"x")
            .unwrap(),
            t0,
        );
        core.handle_rtp(b"", peer_rtp(), t0);
        core.handle_rtp(&[0x40; 30], peer_rtp(), t0);
        core.handle_rtcp(&[0x81, 201, 0, 9], peer_rtp(), t0);
        let drops = core.stats().drops;
        assert_eq!(drops.device_malformed, 2);
        assert_eq!(drops.device_wrong_call, 1);
        assert_eq!(drops.device_wrong_stream, 1);
        assert_eq!(drops.rtp_malformed, 2);
        assert_eq!(drops.rtcp_malformed, 1);
        assert!(sent_rtp(&mut core).is_empty());
        // No peer yet: the device's first datagrams and the network's first packets are held
        // (at most 8 each), later ones dropped and counted.
        let mut fresh = RelayCore::new(settings(), t0);
        for seq in 0..9 {
            fresh.handle_device_datagram(device(0, seq, 0, false, b"x"), t0);
            fresh.handle_rtp(&rtp(0, seq + 1, 0, PEER_SSRC, b"x"), peer_rtp(), t0);
        }
        assert_eq!(fresh.stats().drops.device_not_sendable, 1);
        assert_eq!(fresh.stats().drops.rtp_before_peer, 1);
        assert_eq!(fresh.poll_timeout(), None);
        assert!(sent_rtp(&mut fresh).is_empty());
    }

    /// The first frames of a call are not lost: device media that arrives before the relay
    /// knows the peer (the device heard the answer first) goes out once it does, in order, if
    /// still recent.
    #[test]
    fn device_media_before_the_peer_is_known_goes_out_once_it_is() {
        let t0 = Instant::now();
        let mut core = RelayCore::new(settings(), t0);
        core.handle_device_datagram(device(0, 1, 160, false, b"first"), t0);
        core.handle_device_datagram(
            device(0, 2, 320, false, b"second"),
            t0 + Duration::from_millis(20),
        );
        assert!(sent_rtp(&mut core).is_empty());
        core.set_remote_media(&remote(Direction::SendRecv), t0 + Duration::from_millis(30));
        let sent = sent_rtp(&mut core);
        let payloads: Vec<&[u8]> = sent.iter().map(|(_, _, p)| p.as_slice()).collect();
        assert_eq!(payloads, vec![&b"first"[..], &b"second"[..]]);
        assert_eq!(core.stats().drops.device_not_sendable, 0);

        // Held too long (the peer came a second later): dropped and counted, not sent late.
        let mut late = RelayCore::new(settings(), t0);
        late.handle_device_datagram(device(0, 1, 160, false, b"stale"), t0);
        late.set_remote_media(&remote(Direction::SendRecv), t0 + Duration::from_secs(1));
        assert!(sent_rtp(&mut late).is_empty());
        assert_eq!(late.stats().drops.device_not_sendable, 1);
    }

    #[test]
    fn peer_media_before_its_answer_reaches_the_device_once_the_peer_is_known() {
        let t0 = Instant::now();
        let mut core = RelayCore::new(settings(), t0);
        // A stranger's packet came first, then the peer's first two, all before its answer.
        let stranger: SocketAddr = "203.0.113.9:4000".parse().unwrap();
        core.handle_rtp(&rtp(0, 7, 0, 0x5eed, b"forged"), stranger, t0);
        core.handle_rtp(&rtp(0, 1, 160, PEER_SSRC, b"first"), peer_rtp(), t0 + ms(1));
        core.handle_rtp(
            &rtp(0, 2, 320, PEER_SSRC, b"second"),
            peer_rtp(),
            t0 + ms(21),
        );
        assert!(core.poll_device_datagram().is_none());
        // The answer comes: the peer's packets are delivered in order, with the time they
        // arrived; the stranger's is dropped, and took no latch.
        core.set_remote_media(&remote(Direction::SendRecv), t0 + ms(30));
        let delivered: Vec<(Bytes, Instant)> = std::iter::from_fn(|| core.poll_device_datagram())
            .map(|d| {
                (
                    d.datagram.slice(thalamus_proto::media::HEADER_BYTES..),
                    d.received_at,
                )
            })
            .collect();
        assert_eq!(
            delivered,
            vec![
                (Bytes::from_static(b"first"), t0 + ms(1)),
                (Bytes::from_static(b"second"), t0 + ms(21))
            ]
        );
        assert_eq!(core.stats().drops.rtp_before_peer, 1);
        assert_eq!(core.stats().latched_source, Some(peer_rtp()));
        // The peer's next packet is taken as usual.
        core.handle_rtp(
            &rtp(0, 3, 480, PEER_SSRC, b"third"),
            peer_rtp(),
            t0 + ms(41),
        );
        assert!(core.poll_device_datagram().is_some());
        // A relay closed before its peer was known counts what it held.
        let mut never = RelayCore::new(settings(), t0);
        never.handle_rtp(&rtp(0, 1, 160, PEER_SSRC, b"x"), peer_rtp(), t0);
        never.close(t0 + ms(10));
        assert_eq!(never.stats().drops.rtp_before_peer, 1);

        // Held too long: dropped and counted, not delivered late.
        let mut late = RelayCore::new(settings(), t0);
        late.handle_rtp(&rtp(0, 1, 160, PEER_SSRC, b"stale"), peer_rtp(), t0);
        late.set_remote_media(&remote(Direction::SendRecv), t0 + Duration::from_secs(1));
        assert!(late.poll_device_datagram().is_none());
        assert_eq!(late.stats().drops.rtp_before_peer, 1);
    }

    fn rtcp_sent(core: &mut RelayCore) -> Vec<Transmit> {
        std::iter::from_fn(|| core.poll_transmit())
            .filter(|t| t.socket == SocketKind::Rtcp)
            .collect()
    }

    /// RFC 5761: RTCP goes to the peer's RTP address only when both sides multiplex; RTCP
    /// that arrives on the RTP port is taken as RTCP.
    #[test]
    fn multiplexed_rtcp_goes_to_the_rtp_address_only_when_both_sides_multiplex() {
        let destination = |ours: bool, theirs: bool| {
            let t0 = Instant::now();
            let mut core = RelayCore::new(
                RelaySettings {
                    media_timeout: None,
                    rtcp_mux: ours,
                    ..settings()
                },
                t0,
            );
            core.set_remote_media(
                &RemoteMedia {
                    rtcp_mux: theirs,
                    ..remote(Direction::SendRecv)
                },
                t0,
            );
            core.handle_device_datagram(device(0, 1, 160, false, &[1; 160]), t0);
            core.handle_timeout(t0 + Duration::from_secs(5));
            let sent = rtcp_sent(&mut core);
            assert_eq!(sent.len(), 1, "one report");
            sent[0].destination
        };
        assert_eq!(destination(true, true), peer_rtp());
        let separate: SocketAddr = "192.0.2.5:5005".parse().unwrap();
        assert_eq!(destination(true, false), separate);
        assert_eq!(destination(false, true), separate);
        assert_eq!(destination(false, false), separate);

        // A sender report from the peer on the RTP port counts as RTCP, not as bad RTP.
        let (mut core, t0) = started(RelaySettings {
            rtcp_mux: true,
            ..settings()
        });
        let mut report = bytes::BytesMut::new();
        crate::rtcp::write_receiver_report(&mut report, PEER_SSRC, None);
        core.handle_rtp(&report, peer_rtp(), t0);
        let stats = core.stats();
        assert_eq!(stats.drops.rtp_malformed, 0);
        assert_eq!(stats.rtcp_received, 1);
    }

    #[test]
    fn rtcp_reports_every_interval_sr_when_sending_rr_otherwise() {
        let (mut core, t0) = started(RelaySettings {
            media_timeout: None,
            ..settings()
        });
        assert_eq!(core.poll_timeout(), Some(t0 + Duration::from_secs(5)));
        // We sent 2 packets; the peer sent 2 of 3 (seq 11 lost).
        core.handle_device_datagram(device(0, 1, 160, false, &[1; 160]), t0);
        core.handle_device_datagram(device(0, 2, 320, false, &[2; 160]), t0 + ms(20));
        for seq in [10u16, 12, 13] {
            core.handle_rtp(
                &rtp(0, seq, u32::from(seq) * 160, PEER_SSRC, b"x"),
                peer_rtp(),
                t0,
            );
        }
        sent_rtp(&mut core);
        core.handle_timeout(t0 + Duration::from_secs(5));
        let reports = rtcp_sent(&mut core);
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].destination, "192.0.2.5:5005".parse().unwrap());
        let packets: Vec<RtcpPacket<'_>> = parse_compound(&reports[0].packet)
            .map(Result::unwrap)
            .collect();
        assert_eq!(packets.len(), 2);
        match &packets[0] {
            RtcpPacket::SenderReport { ssrc, info, blocks } => {
                assert_eq!(*ssrc, SSRC);
                assert_eq!(info.packet_count, 2);
                assert_eq!(info.octet_count, 320);
                // Last RTP timestamp 1160 at 20 ms; 4.98 s later at 8 kHz: +39840.
                assert_eq!(info.rtp_timestamp, 1_160 + 39_840);
                assert_eq!(
                    info.ntp_timestamp,
                    ntp_timestamp(Duration::from_secs(1_700_000_005))
                );
                let blocks: Vec<ReportBlock> = blocks.clone().collect();
                assert_eq!(blocks.len(), 1);
                assert_eq!(blocks[0].ssrc, PEER_SSRC);
                // 10 on probation; 12 starts a new probation... A.1: 12, 13 => base 13.
                assert_eq!(blocks[0].highest_sequence, 13);
                assert_eq!(blocks[0].last_sender_report, 0);
            }
            other => panic!("expected an SR first, got {other:?}"),
        }
        match &packets[1] {
            RtcpPacket::SourceDescription(chunks) => {
                let chunk = chunks.clone().next().unwrap().unwrap();
                assert_eq!(chunk.ssrc, SSRC);
                assert_eq!(chunk.cname, Some(&b"thalamus"[..]));
            }
            other => panic!("expected SDES, got {other:?}"),
        }
        assert_eq!(core.poll_timeout(), Some(t0 + Duration::from_secs(10)));
        // Nothing sent since: a receiver report.
        core.handle_timeout(t0 + Duration::from_secs(10));
        let reports = rtcp_sent(&mut core);
        assert!(matches!(
            parse_compound(&reports[0].packet).next().unwrap().unwrap(),
            RtcpPacket::ReceiverReport { ssrc: SSRC, .. }
        ));
        assert_eq!(core.stats().rtcp_sent, 2);
    }

    #[test]
    fn rtcp_report_blocks_carry_loss_and_lsr_and_give_round_trip() {
        let (mut core, t0) = started(RelaySettings {
            media_timeout: None,
            ..settings()
        });
        for seq in (100u16..=120).filter(|s| *s != 110) {
            core.handle_rtp(
                &rtp(0, seq, u32::from(seq) * 160, PEER_SSRC, b"x"),
                peer_rtp(),
                t0,
            );
        }
        // The peer's SR, received at t0 + 1 s.
        let peer_ntp = 0x1122_3344_5566_7788;
        let mut sr = BytesMut::new();
        write_sender_report(
            &mut sr,
            PEER_SSRC,
            &SenderInfo {
                ntp_timestamp: peer_ntp,
                ..SenderInfo::default()
            },
            None,
        );
        core.handle_rtcp(
            &sr,
            "192.0.2.5:5005".parse().unwrap(),
            t0 + Duration::from_secs(1),
        );
        core.handle_timeout(t0 + Duration::from_secs(5));
        let reports = rtcp_sent(&mut core);
        let block = match parse_compound(&reports[0].packet).next().unwrap().unwrap() {
            RtcpPacket::ReceiverReport { mut blocks, .. } => blocks.next().unwrap(),
            other => panic!("expected an RR, got {other:?}"),
        };
        assert_eq!(block.ssrc, PEER_SSRC);
        assert_eq!(block.cumulative_lost, 1);
        assert_eq!(block.highest_sequence, 120);
        // 1 lost of 20 expected since the start (101..=120) => 12/256.
        assert_eq!(block.fraction_lost, (256 / 20) as u8);
        assert_eq!(block.last_sender_report, 0x3344_5566);
        assert_eq!(block.delay_since_last_sender_report, 4 * 65_536);

        // The peer reports on us: its LSR is our SR's middle NTP bits, sent at t0 + 5 s (the
        // first report was an RR, so take an SR-equivalent time); it held it 0.25 s and the
        // report arrives at t0 + 5.75 s: RTT 0.5 s.
        let our_sr_at = ntp_middle(ntp_timestamp(Duration::from_secs(1_700_000_005)));
        let mut rr = BytesMut::new();
        write_receiver_report(
            &mut rr,
            PEER_SSRC,
            Some(&ReportBlock {
                ssrc: SSRC,
                fraction_lost: 64,
                cumulative_lost: 3,
                highest_sequence: 99,
                jitter: 80,
                last_sender_report: our_sr_at,
                delay_since_last_sender_report: 65_536 / 4,
            }),
        );
        core.handle_rtcp(&rr, "192.0.2.5:5005".parse().unwrap(), t0 + ms(5_750));
        let report = core.stats().peer_report.unwrap();
        assert_eq!(report.fraction_lost, 64);
        assert_eq!(report.cumulative_lost, 3);
        assert_eq!(report.jitter, ms(10)); // 80 units at 8 kHz
        let rtt = report.round_trip.unwrap();
        assert!(rtt.abs_diff(ms(500)) < ms(1), "{rtt:?}");
        // The device is told the peer's view too.
        let message = MediaStats::from(&core.stats());
        assert_eq!(message.peer_reported_lost, 3);
        assert!(
            message.round_trip_us.abs_diff(500_000) < 1_000,
            "{message:?}"
        );
        assert_eq!(core.stats().rtcp_received, 2);
        // RTCP from a stranger is refused.
        core.handle_rtcp(&rr, "203.0.113.1:5005".parse().unwrap(), t0);
        assert_eq!(core.stats().drops.rtcp_wrong_source, 1);
        // RTCP multiplexed on the RTP port is recognised.
        core.handle_rtp(&rr, "192.0.2.5:5005".parse().unwrap(), t0 + ms(6_000));
        assert_eq!(core.stats().rtcp_received, 3);
    }

    #[test]
    fn keyframe_requests_follow_the_peers_rtcp_feedback() {
        let t0 = Instant::now();
        let peer_with = |feedback: RtcpFeedback| {
            let mut core = RelayCore::new(settings(), t0);
            core.set_remote_media(
                &RemoteMedia {
                    feedback,
                    ..remote(Direction::SendRecv)
                },
                t0,
            );
            core.handle_rtp(
                &rtp(0, 10, 100, 0xfeed, b"x"),
                "192.0.2.5:5004".parse().unwrap(),
                t0,
            );
            while core.poll_transmit().is_some() {}
            core
        };
        let feedback_of = |core: &mut RelayCore| -> Vec<(u8, Vec<u8>)> {
            rtcp_sent(core)
                .iter()
                .flat_map(|t| {
                    parse_compound(&t.packet)
                        .filter_map(|p| match p.unwrap() {
                            RtcpPacket::Other {
                                packet_type: 206,
                                count,
                                body,
                            } => Some((count, body.to_vec())),
                            _ => None,
                        })
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        // A peer that takes FIR only gets FIRs (RFC 5104 4.3.1: media source 0, the stream
        // and a sequence number that goes up per request in the FCI).
        let fir_only = RtcpFeedback {
            listed: true,
            pli: false,
            fir: true,
        };
        let mut core = peer_with(fir_only);
        core.request_keyframe(t0);
        core.request_keyframe(t0 + ms(300));
        let fir = |sequence: u8| {
            let mut body = SSRC.to_be_bytes().to_vec();
            body.extend_from_slice(&[0, 0, 0, 0]);
            body.extend_from_slice(&0xfeed_u32.to_be_bytes());
            body.extend_from_slice(&[sequence, 0, 0, 0]);
            (4, body)
        };
        assert_eq!(feedback_of(&mut core), vec![fir(1), fir(2)]);
        // A peer that lists feedback but neither is not asked, and that is counted.
        let mut core = peer_with(RtcpFeedback {
            listed: true,
            pli: false,
            fir: false,
        });
        core.request_keyframe(t0);
        assert!(feedback_of(&mut core).is_empty());
        assert_eq!(core.stats().drops.keyframe_requests_not_negotiated, 1);
        assert_eq!(core.stats().keyframe_requests_to_peer, 0);
        // PLI when listed (even beside FIR), and for a peer that lists no feedback at all.
        for feedback in [RtcpFeedback::KEY_FRAMES, RtcpFeedback::default()] {
            let mut core = peer_with(feedback);
            core.request_keyframe(t0);
            assert_eq!(
                feedback_of(&mut core)
                    .iter()
                    .map(|(fmt, _)| *fmt)
                    .collect::<Vec<_>>(),
                [1],
                "{feedback:?}"
            );
        }
    }

    #[test]
    fn keyframe_requests_pass_both_ways_at_most_one_per_interval() {
        let (mut core, t0) = started(settings());
        let peer: SocketAddr = "192.0.2.5:5005".parse().unwrap();
        core.handle_rtp(
            &rtp(0, 10, 100, 0xfeed, b"x"),
            "192.0.2.5:5004".parse().unwrap(),
            t0,
        );
        while core.poll_transmit().is_some() {}

        // The device asks: a compound RR + SDES + PLI about the peer's stream goes out at once.
        core.request_keyframe(t0);
        let sent = rtcp_sent(&mut core);
        assert_eq!(sent.len(), 1);
        let pli: Vec<(u8, u8, Vec<u8>)> = parse_compound(&sent[0].packet)
            .filter_map(|p| match p.unwrap() {
                RtcpPacket::Other {
                    packet_type,
                    count,
                    body,
                } => Some((packet_type, count, body.to_vec())),
                _ => None,
            })
            .collect();
        let mut ssrcs = SSRC.to_be_bytes().to_vec();
        ssrcs.extend_from_slice(&0xfeed_u32.to_be_bytes());
        assert_eq!(pli, vec![(206, 1, ssrcs)]);
        // A second request within the interval is dropped; one after it goes.
        core.request_keyframe(t0 + ms(100));
        assert!(rtcp_sent(&mut core).is_empty());
        core.request_keyframe(t0 + ms(250));
        assert_eq!(rtcp_sent(&mut core).len(), 1);

        // The peer asks with a PLI alone (reduced size), then a FIR in a compound: one event
        // per interval; a flood in between is counted, not passed on.
        let mut alone = BytesMut::new();
        rtcp::write_picture_loss(&mut alone, 0xfeed, SSRC);
        core.handle_rtcp(&alone, peer, t0 + ms(300));
        for n in 0..10 {
            core.handle_rtcp(&alone, peer, t0 + ms(310 + n));
        }
        let mut fir = BytesMut::new();
        rtcp::write_receiver_report(&mut fir, 0xfeed, None);
        fir.extend_from_slice(&[0x84, 206, 0, 4, 0, 0, 0xfe, 0xed, 0, 0, 0, 0]);
        fir.extend_from_slice(&SSRC.to_be_bytes());
        fir.extend_from_slice(&[1, 0, 0, 0]);
        core.handle_rtcp(&fir, peer, t0 + ms(600));
        // From a stranger: refused before it is read.
        core.handle_rtcp(&alone, "203.0.113.1:5005".parse().unwrap(), t0 + ms(900));
        let events: Vec<RelayEvent> = std::iter::from_fn(|| core.poll_event())
            .filter(|e| *e == RelayEvent::KeyframeRequested)
            .collect();
        assert_eq!(events.len(), 2);
        let stats = core.stats();
        assert_eq!(
            (
                stats.keyframe_requests_to_peer,
                stats.keyframe_requests_from_peer
            ),
            (2, 2)
        );
        assert_eq!(stats.drops.keyframe_requests_limited, 11);
        assert_eq!(stats.drops.rtcp_wrong_source, 1);
    }

    fn keys(suite: CryptoSuite, local: u8, remote: u8) -> Option<SrtpKeys> {
        let (key, salt) = suite.key_and_salt_len();
        Some(SrtpKeys {
            suite,
            local: vec![local; key + salt],
            remote: vec![remote; key + salt],
        })
    }

    /// A relay whose peer (at 192.0.2.5) uses SRTP with `keys`.
    fn keyed(keys: Option<SrtpKeys>) -> (RelayCore, Instant) {
        let t0 = Instant::now();
        let mut core = RelayCore::new(settings(), t0);
        core.set_peer(
            RemotePeer::from_remote_media(&remote(Direction::SendRecv)).with_srtp(keys),
            t0,
        );
        (core, t0)
    }

    #[test]
    fn srtp_protects_what_goes_out_and_refuses_wrong_keys_and_replays() {
        for suite in [CryptoSuite::AesCm128HmacSha1_80, CryptoSuite::AeadAes128Gcm] {
            // Two relays facing each other: A sends with key 1 and B expects key 1.
            let (mut a, t0) = keyed(keys(suite, 1, 2));
            let (mut b, _) = keyed(keys(suite, 2, 1));
            let peer: SocketAddr = "192.0.2.5:5004".parse().unwrap();
            let secret = b"brain-to-brain samples";
            a.handle_device_datagram(device(0, 1, 160, true, secret), t0);
            a.handle_device_datagram(device(0, 2, 320, false, secret), t0);
            let sent: Vec<Bytes> = std::iter::from_fn(|| a.poll_transmit())
                .filter(|t| t.socket == SocketKind::Rtp)
                .map(|t| t.packet)
                .collect();
            assert_eq!(sent.len(), 2);
            for packet in &sent {
                assert!(
                    !packet.windows(secret.len()).any(|w| w == secret),
                    "{suite:?}: the payload travels encrypted"
                );
            }
            b.handle_rtp(&sent[0], peer, t0);
            b.handle_rtp(&sent[1], peer, t0);
            let got = to_device(&mut b);
            assert_eq!(got.len(), 2, "{suite:?}");
            assert_eq!(&got[0].payload[..], secret);
            // The same packet again: a replay, refused.
            b.handle_rtp(&sent[1], peer, t0);
            assert!(to_device(&mut b).is_empty());
            assert_eq!(b.stats().drops.srtp_replayed, 1);
            // A relay with another key refuses both; so does a plain one sent SRTP... and a
            // keyed one sent plain RTP.
            let (mut wrong, _) = keyed(keys(suite, 2, 9));
            wrong.handle_rtp(&sent[0], peer, t0);
            assert!(to_device(&mut wrong).is_empty());
            assert_eq!(wrong.stats().drops.srtp_auth_failed, 1);
            b.handle_rtp(&rtp(0, 50, 8000, 0xabc, b"clear"), peer, t0);
            assert!(to_device(&mut b).is_empty());
            assert_eq!(b.stats().drops.srtp_auth_failed, 1);
            // RTCP is SRTCP: B takes A's report.
            a.close(t0);
            let report = rtcp_sent(&mut a);
            assert_eq!(report.len(), 1);
            b.handle_rtcp(&report[0].packet, "192.0.2.5:5005".parse().unwrap(), t0);
            assert_eq!(b.stats().rtcp_received, 1, "{suite:?}");
            // A stranger's packet costs no key work.
            b.handle_rtp(&sent[0], "203.0.113.9:4000".parse().unwrap(), t0);
            assert_eq!(b.stats().drops.rtp_wrong_source, 1);
        }
    }

    #[test]
    fn forged_ssrcs_before_the_real_stream_cannot_lock_it_out() {
        let suite = CryptoSuite::AeadAes128Gcm;
        let (mut a, t0) = keyed(keys(suite, 1, 2));
        let (mut b, _) = keyed(keys(suite, 2, 1));
        let peer: SocketAddr = "192.0.2.5:5004".parse().unwrap();
        for ssrc in 0..SRTP_MAX_PEER_SSRCS as u32 + 3 {
            b.handle_rtp(&rtp(0, 1, 0, ssrc, &[7u8; 40]), peer, t0);
        }
        a.handle_device_datagram(device(0, 1, 160, true, b"real"), t0);
        let real = std::iter::from_fn(|| a.poll_transmit())
            .find(|t| t.socket == SocketKind::Rtp)
            .unwrap()
            .packet;
        b.handle_rtp(&real, peer, t0);
        assert_eq!(to_device(&mut b).len(), 1, "{:?}", b.stats().drops);
    }

    #[test]
    fn our_sending_context_survives_a_detour_through_unusable_keys() {
        // A sends SRTCP, its keys turn unusable (a re-offer whose keys do not pair), then come
        // back: its next SRTCP goes on from the same context (a new one would start its index
        // again, and B would take it for a replay).
        let suite = CryptoSuite::AesCm128HmacSha1_80;
        let (mut a, t0) = keyed(keys(suite, 1, 2));
        let (mut b, _) = keyed(keys(suite, 2, 1));
        let rtcp_peer: SocketAddr = "192.0.2.5:5005".parse().unwrap();
        a.request_keyframe(t0);
        for t in rtcp_sent(&mut a) {
            b.handle_rtcp(&t.packet, rtcp_peer, t0);
        }
        let peer =
            |keys| RemotePeer::from_remote_media(&remote(Direction::SendRecv)).with_srtp(keys);
        a.set_peer(
            peer(Some(SrtpKeys {
                suite,
                local: vec![1; 30],
                remote: vec![],
            })),
            t0,
        );
        a.set_peer(peer(keys(suite, 1, 2)), t0);
        a.request_keyframe(t0 + ms(300));
        for t in rtcp_sent(&mut a) {
            b.handle_rtcp(&t.packet, rtcp_peer, t0 + ms(300));
        }
        assert_eq!(b.stats().rtcp_received, 2, "{:?}", b.stats().drops);
    }

    #[test]
    fn srtp_bounds_unknown_ssrcs_refuses_short_and_clear_srtcp_and_rekeys_by_direction() {
        let suite = CryptoSuite::AesCm128HmacSha1_80;
        let (mut a, t0) = keyed(keys(suite, 1, 2));
        let (mut b, _) = keyed(keys(suite, 2, 1));
        let peer: SocketAddr = "192.0.2.5:5004".parse().unwrap();
        let payload = [7u8; 40];
        // The real stream authenticates first.
        a.handle_device_datagram(device(0, 1, 160, true, &payload), t0);
        let real = std::iter::from_fn(|| a.poll_transmit())
            .find(|t| t.socket == SocketKind::Rtp)
            .unwrap()
            .packet;
        b.handle_rtp(&real, peer, t0);
        assert_eq!(to_device(&mut b).len(), 1);
        // Forged packets of ten other SSRCs: four are tried and fail, the rest cost nothing.
        for ssrc in 0..10u32 {
            b.handle_rtp(&rtp(0, 1, 0, ssrc, &payload), peer, t0);
        }
        let drops = b.stats().drops;
        assert_eq!(drops.srtp_auth_failed, SRTP_MAX_PEER_SSRCS as u64);
        assert_eq!(drops.srtp_too_many_ssrcs, 10 - SRTP_MAX_PEER_SSRCS as u64);
        // The stream that authenticated is not locked out.
        a.handle_device_datagram(device(0, 2, 320, false, &payload), t0);
        let next = std::iter::from_fn(|| a.poll_transmit())
            .find(|t| t.socket == SocketKind::Rtp)
            .unwrap()
            .packet;
        b.handle_rtp(&next, peer, t0);
        assert_eq!(to_device(&mut b).len(), 1);

        // SRTCP too short for its trailer (the library would index out of range), and SRTCP
        // whose E flag is clear (the library would pass it on unauthenticated): refused.
        let failed = b.stats().drops.srtp_auth_failed;
        let rtcp_peer: SocketAddr = "192.0.2.5:5005".parse().unwrap();
        for len in 4..22 {
            let mut short = vec![0x80, 201, 0, 1, 0, 0, 0, 9];
            short.resize(len, 0);
            b.handle_rtcp(&short, rtcp_peer, t0);
        }
        let mut clear_flag = vec![0x80, 201, 0, 1, 0, 0, 0, 9];
        clear_flag.extend_from_slice(&[0u8; 30]);
        b.handle_rtcp(&clear_flag, rtcp_peer, t0);
        assert_eq!(b.stats().drops.srtp_auth_failed, failed + 18 + 1);
        assert_eq!(b.stats().rtcp_received, 0);

        // The same keys again keep both contexts; only the peer's new key starts a new
        // receiving context (its SSRC lists with it), ours keeps counting.
        b.set_peer(
            RemotePeer::from_remote_media(&remote(Direction::SendRecv))
                .with_srtp(keys(suite, 2, 1)),
            t0,
        );
        b.handle_rtp(&rtp(0, 1, 0, 77, &payload), peer, t0);
        assert_eq!(b.stats().drops.srtp_too_many_ssrcs, 7);
        b.set_peer(
            RemotePeer::from_remote_media(&remote(Direction::SendRecv))
                .with_srtp(keys(suite, 2, 4)),
            t0,
        );
        b.handle_rtp(&rtp(0, 1, 0, 77, &payload), peer, t0);
        assert_eq!(b.stats().drops.srtp_too_many_ssrcs, 7);
        // Keys of the wrong length: nothing goes out, nothing comes in.
        let (mut broken, t0) = keyed(Some(SrtpKeys {
            suite,
            local: vec![1; 3],
            remote: vec![1; 30],
        }));
        broken.handle_device_datagram(device(0, 1, 160, true, b"x"), t0);
        assert!(sent_rtp(&mut broken).is_empty());
        assert_eq!(broken.stats().drops.srtp_protect_failed, 1);
    }

    #[test]
    fn close_sends_a_bye_and_stops_timers() {
        let (mut core, t0) = started(settings());
        core.close(t0 + ms(100));
        let reports = rtcp_sent(&mut core);
        assert_eq!(reports.len(), 1);
        let kinds: Vec<bool> = parse_compound(&reports[0].packet)
            .map(|p| matches!(p.unwrap(), RtcpPacket::Goodbye { .. }))
            .collect();
        assert_eq!(kinds, vec![false, false, true]);
        assert_eq!(core.poll_timeout(), None);
        core.close(t0 + ms(200));
        assert!(rtcp_sent(&mut core).is_empty());
    }

    #[test]
    fn stats_convert_to_the_protocol_message() {
        let (mut core, t0) = started(settings());
        for seq in [1u16, 2, 3, 5] {
            let at = t0 + ms(20 * u64::from(seq));
            core.handle_device_datagram(device(0, seq, u32::from(seq) * 160, false, &[0; 160]), at);
            if let Some(t) = core.poll_transmit() {
                core.record_relay_latency(
                    RelayDirection::ToPeer,
                    t.received_at.unwrap(),
                    at + Duration::from_micros(100),
                );
            }
        }
        core.handle_rtp(&rtp(0, 1, 160, PEER_SSRC, &[0; 80]), peer_rtp(), t0);
        let d = core.poll_device_datagram().unwrap();
        core.record_relay_latency(
            RelayDirection::ToDevice,
            d.received_at,
            t0 + Duration::from_micros(300),
        );
        let stats = core.stats();
        let message = MediaStats::from(&stats);
        // The SIP leg: four packets of the device went to the peer, one came from it.
        assert_eq!(message.packets_sent, 4);
        assert_eq!(message.bytes_sent, 640);
        assert_eq!(message.packets_received, 1);
        assert_eq!(message.bytes_received, 80);
        assert_eq!(message.packets_lost, 0);
        assert_eq!(message.jitter_us, 0);
        // The median device -> peer time (each 100 us), to the histogram's precision.
        assert!(
            (50..=100).contains(&message.relay_latency_us),
            "{message:?}"
        );
        assert_eq!(
            (
                message.stream_id,
                message.round_trip_us,
                message.peer_reported_lost
            ),
            (0, 0, 0)
        );
        // (4 x 100 us + 300 us) / 5
        assert_eq!(stats.latency.mean, Duration::from_micros(140));
        assert_eq!(stats.latency_to_peer.count, 4);
        assert_eq!(stats.latency_to_device.count, 1);
        assert_eq!(stats.latency.count, 5);
        assert_eq!(MediaStats::from(stats.clone()), message);
    }
}
