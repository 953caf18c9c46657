//! The codec model: what an RTP payload format is (name, clock rate, channels, payload type,
//! format parameters), the static payload types of RFC 3551, constructors for the codecs a
//! SIP gateway usually meets, and matching of codecs between offer and answer. It does not
//! encode or decode media.

use super::attribute::{fmtp_param, RtpMap};
use std::fmt;

/// An RTP payload format as negotiated in SDP.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Codec {
    /// The encoding name, e.g. `PCMU`, `opus`, `telephone-event` (compared ignoring case).
    pub name: String,
    /// The RTP clock rate in Hz.
    pub clock_rate: u32,
    /// The channel count (1 for mono audio and for video).
    pub channels: u16,
    /// The RTP payload type: 0..=95 static, 96..=127 dynamic.
    pub payload_type: u8,
    /// The format parameters (`a=fmtp` value), if any.
    pub fmtp: Option<String>,
}

/// RFC 3551 static payload types: (payload type, name, clock rate, channels).
const STATIC_PAYLOAD_TYPES: &[(u8, &str, u32, u16)] = &[
    (0, "PCMU", 8000, 1),
    (3, "GSM", 8000, 1),
    (4, "G723", 8000, 1),
    (5, "DVI4", 8000, 1),
    (6, "DVI4", 16000, 1),
    (7, "LPC", 8000, 1),
    (8, "PCMA", 8000, 1),
    (9, "G722", 8000, 1),
    (10, "L16", 44100, 2),
    (11, "L16", 44100, 1),
    (12, "QCELP", 8000, 1),
    (13, "CN", 8000, 1),
    (14, "MPA", 90000, 1),
    (15, "G728", 8000, 1),
    (16, "DVI4", 11025, 1),
    (17, "DVI4", 22050, 1),
    (18, "G729", 8000, 1),
    (25, "CelB", 90000, 1),
    (26, "JPEG", 90000, 1),
    (28, "nv", 90000, 1),
    (31, "H261", 90000, 1),
    (32, "MPV", 90000, 1),
    (33, "MP2T", 90000, 1),
    (34, "H263", 90000, 1),
];

/// The first dynamic payload type.
pub const FIRST_DYNAMIC_PAYLOAD_TYPE: u8 = 96;

impl Codec {
    /// A codec without format parameters.
    pub fn new(name: impl Into<String>, clock_rate: u32, channels: u16, payload_type: u8) -> Self {
        Codec {
            name: name.into(),
            clock_rate,
            channels,
            payload_type,
            fmtp: None,
        }
    }

    /// The same codec with format parameters.
    pub fn with_fmtp(mut self, fmtp: impl Into<String>) -> Self {
        self.fmtp = Some(fmtp.into());
        self
    }

    /// The same codec with another payload type.
    pub fn with_payload_type(mut self, payload_type: u8) -> Self {
        self.payload_type = payload_type;
        self
    }

    /// G.711 mu-law, static payload type 0.
    pub fn pcmu() -> Self {
        Codec::new("PCMU", 8000, 1, 0)
    }

    /// G.711 A-law, static payload type 8.
    pub fn pcma() -> Self {
        Codec::new("PCMA", 8000, 1, 8)
    }

    /// G.722, static payload type 9 (its RTP clock rate is 8000 for historical reasons).
    pub fn g722() -> Self {
        Codec::new("G722", 8000, 1, 9)
    }

    /// Opus (RFC 7587): always `opus/48000/2` on the wire.
    pub fn opus(payload_type: u8) -> Self {
        Codec::new("opus", 48000, 2, payload_type)
    }

    /// DTMF events (RFC 4733) at the given clock rate, events 0-16.
    pub fn telephone_event(payload_type: u8, clock_rate: u32) -> Self {
        Codec::new("telephone-event", clock_rate, 1, payload_type).with_fmtp("0-16")
    }

    /// H.264 video (RFC 6184) with the given format parameters, e.g.
    /// `profile-level-id=42e01f;packetization-mode=1`.
    pub fn h264(payload_type: u8, fmtp: impl Into<String>) -> Self {
        Codec::new("H264", 90000, 1, payload_type).with_fmtp(fmtp)
    }

    /// VP8 video (RFC 7741).
    pub fn vp8(payload_type: u8) -> Self {
        Codec::new("VP8", 90000, 1, payload_type)
    }

    /// A well-known codec by encoding name (ignoring case), with this crate's default payload
    /// types for the dynamic ones: `PCMU` 0, `PCMA` 8, `G722` 9, `opus` 111,
    /// `telephone-event` 101 (8000 Hz), `H264` 102 (`profile-level-id=42e01f;
    /// packetization-mode=1`), `VP8` 100. `None` for other names.
    pub fn well_known(name: &str) -> Option<Codec> {
        let codec = match name.to_ascii_lowercase().as_str() {
            "pcmu" => Codec::pcmu(),
            "pcma" => Codec::pcma(),
            "g722" => Codec::g722(),
            "opus" => Codec::opus(111),
            "telephone-event" => Codec::telephone_event(101, 8000),
            "h264" => Codec::h264(102, "profile-level-id=42e01f;packetization-mode=1"),
            "vp8" => Codec::vp8(100),
            _ => return None,
        };
        Some(codec)
    }

    /// The codec a static payload type stands for without an `rtpmap` (RFC 3551).
    pub fn from_static_payload_type(payload_type: u8) -> Option<Codec> {
        STATIC_PAYLOAD_TYPES
            .iter()
            .find(|(pt, ..)| *pt == payload_type)
            .map(|&(pt, name, rate, channels)| Codec::new(name, rate, channels, pt))
    }

    /// The codec an `rtpmap` describes (channels default to 1).
    pub fn from_rtpmap(rtpmap: &RtpMap) -> Codec {
        Codec::new(
            rtpmap.encoding.clone(),
            rtpmap.clock_rate,
            rtpmap.channels.unwrap_or(1),
            rtpmap.payload_type,
        )
    }

    /// The `rtpmap` for this codec (channels written only when not 1).
    pub fn rtpmap(&self) -> RtpMap {
        RtpMap {
            payload_type: self.payload_type,
            encoding: self.name.clone(),
            clock_rate: self.clock_rate,
            channels: (self.channels != 1).then_some(self.channels),
        }
    }

    /// Whether the payload type is in the dynamic range.
    pub fn is_dynamic(&self) -> bool {
        self.payload_type >= FIRST_DYNAMIC_PAYLOAD_TYPE
    }

    /// Whether this is the RFC 4733 telephone-event format.
    pub fn is_telephone_event(&self) -> bool {
        self.name.eq_ignore_ascii_case("telephone-event")
    }

    /// Whether this is comfort noise (`CN`), which carries no media of its own.
    pub fn is_comfort_noise(&self) -> bool {
        self.name.eq_ignore_ascii_case("CN")
    }

    /// Whether both describe the same payload format, regardless of payload type: same name
    /// (ignoring case), clock rate and channel count, and for H.264 the same
    /// packetization-mode (RFC 6184 section 8.2.2).
    pub fn same_format(&self, other: &Codec) -> bool {
        if !self.name.eq_ignore_ascii_case(&other.name)
            || self.clock_rate != other.clock_rate
            || self.channels != other.channels
        {
            return false;
        }
        if self.name.eq_ignore_ascii_case("H264") {
            let mode = |c: &Codec| {
                c.fmtp
                    .as_deref()
                    .and_then(|f| fmtp_param(f, "packetization-mode"))
                    .unwrap_or("0")
                    .to_string()
            };
            return mode(self) == mode(other);
        }
        true
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.name, self.clock_rate)?;
        if self.channels != 1 {
            write!(f, "/{}", self.channels)?;
        }
        write!(f, " (pt {})", self.payload_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_known_codecs() {
        assert_eq!(Codec::pcmu().payload_type, 0);
        assert_eq!(Codec::pcma().payload_type, 8);
        assert_eq!(Codec::g722().payload_type, 9);
        assert_eq!(Codec::g722().clock_rate, 8000);
        assert_eq!(Codec::opus(111).rtpmap().to_string(), "111 opus/48000/2");
        assert_eq!(
            Codec::telephone_event(101, 8000).rtpmap().to_string(),
            "101 telephone-event/8000"
        );
        assert_eq!(Codec::vp8(100).rtpmap().to_string(), "100 VP8/90000");
        assert!(Codec::opus(111).is_dynamic());
        assert!(!Codec::pcma().is_dynamic());
    }

    #[test]
    fn well_known_names_resolve() {
        assert_eq!(Codec::well_known("pcmu"), Some(Codec::pcmu()));
        assert_eq!(Codec::well_known("OPUS"), Some(Codec::opus(111)));
        assert_eq!(
            Codec::well_known("telephone-event").map(|c| (c.payload_type, c.clock_rate)),
            Some((101, 8000))
        );
        assert_eq!(Codec::well_known("H264").map(|c| c.payload_type), Some(102));
        assert_eq!(Codec::well_known("vp8").map(|c| c.payload_type), Some(100));
        assert_eq!(Codec::well_known("g729"), None);
        let names = [
            "PCMU",
            "PCMA",
            "G722",
            "opus",
            "telephone-event",
            "H264",
            "VP8",
        ];
        let codecs: Vec<Codec> = names.iter().filter_map(|n| Codec::well_known(n)).collect();
        assert_eq!(codecs.len(), names.len());
        for (i, c) in codecs.iter().enumerate() {
            assert!(codecs[i + 1..]
                .iter()
                .all(|o| o.payload_type != c.payload_type));
        }
    }

    #[test]
    fn static_table_resolves() {
        assert_eq!(Codec::from_static_payload_type(0), Some(Codec::pcmu()));
        assert_eq!(Codec::from_static_payload_type(8), Some(Codec::pcma()));
        assert_eq!(Codec::from_static_payload_type(9), Some(Codec::g722()));
        assert_eq!(
            Codec::from_static_payload_type(18).map(|c| c.name),
            Some("G729".to_string())
        );
        assert_eq!(Codec::from_static_payload_type(2), None);
        assert_eq!(Codec::from_static_payload_type(96), None);
    }

    #[test]
    fn matching_ignores_payload_type_and_case() {
        assert!(Codec::opus(111).same_format(&Codec::new("OPUS", 48000, 2, 96)));
        assert!(!Codec::opus(111).same_format(&Codec::new("opus", 48000, 1, 111)));
        assert!(!Codec::telephone_event(101, 8000).same_format(&Codec::telephone_event(101, 48000)));
        assert!(!Codec::pcmu().same_format(&Codec::pcma()));
        let h264_1 = Codec::h264(96, "profile-level-id=42e01f;packetization-mode=1");
        let h264_0 = Codec::h264(97, "profile-level-id=42e01f");
        assert!(!h264_1.same_format(&h264_0));
        assert!(h264_0.same_format(&Codec::new("h264", 90000, 1, 99)));
    }
}
