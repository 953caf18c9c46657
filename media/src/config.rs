//! Media relay configuration (`[media]`): where RTP is bound and advertised, the port range,
//! timers, latching, buffer sizes and SRTP toward SIP peers. Serde with unknown keys denied and defaults for every key;
//! [`MediaConfig::validate`] names the key at fault. This module only reads and checks
//! configuration; it opens no sockets.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the relay sends RTP, and which sources it accepts (symmetric RTP, RFC 4961 / "comedia").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LatchMode {
    /// Always send to the address in the peer's SDP; accept packets from the SDP's IP address
    /// (any port).
    Off,
    /// Accept packets from the SDP's IP address; after the first valid one, send to its exact
    /// source address and port and accept only that source. The default: safe on an open
    /// network (a stranger cannot take a call's media).
    #[default]
    Peer,
    /// Accept the first valid packet from any source (the peer is behind a NAT and its SDP
    /// address is private), then send to that source and accept only it. Unsafe where anyone
    /// can reach the relay's ports: whoever sends first (guessing the port) takes the call's
    /// media in both directions. Use it only on a private network or behind an SBC.
    Any,
}

/// SRTP with SDES keys (RFC 4568) toward SIP peers. Media over QUIC to devices is protected by
/// QUIC whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SrtpMode {
    /// Plain RTP only; an `RTP/SAVP` offer is refused.
    Off,
    /// Calls the gateway places offer plain RTP; a peer's `RTP/SAVP` offer is taken with SRTP.
    #[default]
    Accept,
    /// Every stream is SRTP: offers are `RTP/SAVP` with the gateway's keys, plain offers are
    /// refused (488). Use it where the SIP leg is signalled over TLS, or the keys travel in clear.
    Require,
}

impl SrtpMode {
    /// The SDP negotiation policy it stands for.
    pub fn policy(self) -> thalamus_sip::sdp::SrtpPolicy {
        use thalamus_sip::sdp::SrtpPolicy;
        match self {
            SrtpMode::Off => SrtpPolicy::Off,
            SrtpMode::Accept => SrtpPolicy::Accept,
            SrtpMode::Require => SrtpPolicy::Require,
        }
    }
}

/// Why a media configuration is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("media config key `{key}`: {message}")]
pub struct MediaConfigError {
    /// Dotted key, e.g. `media.rtp_port_min`.
    pub key: &'static str,
    /// What is wrong with it.
    pub message: String,
}

/// The `[media]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MediaConfig {
    /// Address the RTP/RTCP sockets bind to.
    pub address: IpAddr,
    /// Address written into SDP when it differs from `address` (NAT, or `address` is a
    /// wildcard). When unset and `address` is a wildcard, the caller supplies one (for example
    /// the SIP advertised address).
    pub advertised_address: Option<IpAddr>,
    /// Lowest port of the RTP range (RTP uses even ports, RTCP the next odd one).
    pub rtp_port_min: u16,
    /// Highest port of the RTP range.
    pub rtp_port_max: u16,
    /// No RTP from the peer for this long ends the call (milliseconds; 0 disables). Suspended
    /// while either side holds.
    pub media_timeout_ms: u32,
    /// RTCP report interval (milliseconds; 0 disables RTCP reports).
    pub rtcp_interval_ms: u32,
    /// Symmetric RTP mode.
    pub latch: LatchMode,
    /// Datagrams queued toward a device that is not keeping up; the oldest are dropped.
    pub send_buffer_frames: u32,
    /// No longer used: device datagrams are relayed on their session's task, with no queue
    /// in between (issue 17). Still accepted and checked (1-4096) so configurations that set
    /// it keep loading.
    pub input_queue_frames: u32,
    /// SRTP toward SIP peers: `off`, `accept` (default) or `require`.
    pub srtp: SrtpMode,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            advertised_address: None,
            rtp_port_min: 40_000,
            rtp_port_max: 49_999,
            media_timeout_ms: 30_000,
            rtcp_interval_ms: 5_000,
            latch: LatchMode::Peer,
            send_buffer_frames: 16,
            input_queue_frames: 128,
            srtp: SrtpMode::Accept,
        }
    }
}

/// Most frames a send buffer or input queue may be configured with.
pub const MAX_QUEUE_FRAMES: u32 = 4_096;

impl MediaConfig {
    /// Checks the values; the error names the first key at fault.
    pub fn validate(&self) -> Result<(), MediaConfigError> {
        let bad = |key, message: &str| {
            Err(MediaConfigError {
                key,
                message: message.to_string(),
            })
        };
        if self.rtp_port_min == 0 {
            return bad("media.rtp_port_min", "must be above 0");
        }
        if u32::from(self.rtp_port_min).div_ceil(2) * 2 + 1 > u32::from(self.rtp_port_max) {
            return bad(
                "media.rtp_port_max",
                "the range must hold at least one even RTP port and the next one",
            );
        }
        if self.advertised_address.is_some_and(|a| a.is_unspecified()) {
            return bad("media.advertised_address", "must not be a wildcard address");
        }
        if self.rtcp_interval_ms != 0 && self.rtcp_interval_ms < 100 {
            return bad("media.rtcp_interval_ms", "must be 0 (off) or at least 100");
        }
        if !(1..=MAX_QUEUE_FRAMES).contains(&self.send_buffer_frames) {
            return bad("media.send_buffer_frames", "must be 1-4096");
        }
        if !(1..=MAX_QUEUE_FRAMES).contains(&self.input_queue_frames) {
            return bad("media.input_queue_frames", "must be 1-4096");
        }
        Ok(())
    }

    /// The address for SDP: `advertised_address`, else `address` unless it is a wildcard.
    pub fn sdp_address(&self) -> Option<IpAddr> {
        self.advertised_address
            .or((!self.address.is_unspecified()).then_some(self.address))
    }

    /// The media timeout, `None` when disabled.
    pub fn media_timeout(&self) -> Option<Duration> {
        (self.media_timeout_ms > 0).then(|| Duration::from_millis(u64::from(self.media_timeout_ms)))
    }

    /// The RTCP interval, `None` when disabled.
    pub fn rtcp_interval(&self) -> Option<Duration> {
        (self.rtcp_interval_ms > 0).then(|| Duration::from_millis(u64::from(self.rtcp_interval_ms)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let config = MediaConfig::default();
        config.validate().unwrap();
        assert_eq!(config.sdp_address(), None);
        assert_eq!(config.media_timeout(), Some(Duration::from_secs(30)));
        assert_eq!(config.rtcp_interval(), Some(Duration::from_secs(5)));
    }

    #[test]
    fn parses_toml_and_denies_unknown_keys() {
        let config: MediaConfig = toml::from_str(
            r#"
            address = "127.0.0.1"
            advertised_address = "203.0.113.7"
            rtp_port_min = 30000
            rtp_port_max = 30099
            media_timeout_ms = 0
            latch = "any"
            "#,
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.latch, LatchMode::Any);
        assert_eq!(config.media_timeout(), None);
        assert_eq!(config.sdp_address(), Some("203.0.113.7".parse().unwrap()));
        assert_eq!(config.send_buffer_frames, 16);
        assert!(toml::from_str::<MediaConfig>("rtp_port = 1").is_err());
        assert!(toml::from_str::<MediaConfig>("latch = \"sometimes\"").is_err());
    }

    #[test]
    fn bad_values_name_their_key() {
        let check = |config: MediaConfig, key: &str| {
            assert_eq!(config.validate().unwrap_err().key, key);
        };
        let base = MediaConfig::default;
        check(
            MediaConfig {
                rtp_port_min: 0,
                ..base()
            },
            "media.rtp_port_min",
        );
        check(
            MediaConfig {
                rtp_port_min: 40_001,
                rtp_port_max: 40_002,
                ..base()
            },
            "media.rtp_port_max",
        );
        check(
            MediaConfig {
                advertised_address: Some("0.0.0.0".parse().unwrap()),
                ..base()
            },
            "media.advertised_address",
        );
        check(
            MediaConfig {
                rtcp_interval_ms: 10,
                ..base()
            },
            "media.rtcp_interval_ms",
        );
        check(
            MediaConfig {
                send_buffer_frames: 0,
                ..base()
            },
            "media.send_buffer_frames",
        );
        check(
            MediaConfig {
                input_queue_frames: 100_000,
                ..base()
            },
            "media.input_queue_frames",
        );
        let ok = MediaConfig {
            address: "192.0.2.1".parse().unwrap(),
            rtp_port_min: 40_001,
            rtp_port_max: 40_003,
            ..base()
        };
        ok.validate().unwrap();
        assert_eq!(ok.sdp_address(), Some("192.0.2.1".parse().unwrap()));
    }
}
