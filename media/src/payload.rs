//! Payload type translation between the device link and the SIP side.
//!
//! On the device link MBFP uses fixed payload types (docs/protocol.md section 7.3): PCMU 0,
//! PCMA 8, G722 9, Opus 111, telephone-event 101, H264 96, VP8 97, and on the signal data stream
//! `x-mbfp-signal` 98 (millisecond clock). The SIP side uses whatever
//! SDP negotiated. A [`PayloadMap`] holds both directions of that translation for one stream,
//! with each format's RTP clock rate and whether it is an RFC 4733 event format; it is built
//! from the peer's [`RemoteMedia`] ([`PayloadMap::from_remote_media`]) or by hand.
//!
//! What it does not do: no transcoding and no timestamp rescaling (device and SIP clocks of a
//! format are the same by the table above), no SDP negotiation (`thalamus_sip::sdp` does it).

use thalamus_sip::sdp::{Codec, RemoteMedia};

/// Number of RTP payload type values (7 bits).
pub const PAYLOAD_TYPES: usize = 128;

/// The device-link payload type and clock rate of a codec, by encoding name (ignoring case);
/// `None` for codecs MBFP has no fixed number for.
pub fn device_payload_type(encoding: &str) -> Option<(u8, u32)> {
    let lower = encoding.to_ascii_lowercase();
    let entry = match lower.as_str() {
        "pcmu" => (0, 8_000),
        "pcma" => (8, 8_000),
        "g722" => (9, 8_000),
        "opus" => (111, 48_000),
        "telephone-event" => (101, 8_000),
        "h264" => (96, 90_000),
        "vp8" => (97, 90_000),
        "x-mbfp-signal" => (
            thalamus_proto::media::SIGNAL_PAYLOAD_TYPE,
            thalamus_proto::media::SIGNAL_CLOCK_RATE,
        ),
        _ => return None,
    };
    Some(entry)
}

/// One side of a translation: the payload type to write and facts about the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PayloadTarget {
    /// The payload type on the other side.
    pub payload_type: u8,
    /// The format's RTP clock rate in Hz.
    pub clock_rate: u32,
    /// Whether this is an RFC 4733 event format (no jitter accounting).
    pub is_event: bool,
}

/// Why an entry cannot be added to a [`PayloadMap`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("payload type {0} does not fit in 7 bits (0-127)")]
pub struct PayloadTypeOutOfRange(pub u8);

/// Both directions of the payload type translation of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadMap {
    to_remote: [Option<PayloadTarget>; PAYLOAD_TYPES],
    to_device: [Option<PayloadTarget>; PAYLOAD_TYPES],
}

impl Default for PayloadMap {
    fn default() -> Self {
        Self::new()
    }
}

impl PayloadMap {
    /// An empty map (everything is dropped).
    pub fn new() -> Self {
        PayloadMap {
            to_remote: [None; PAYLOAD_TYPES],
            to_device: [None; PAYLOAD_TYPES],
        }
    }

    /// The same payload type both ways for every value, with one clock rate: for streams whose
    /// payload types are not negotiated per codec.
    pub fn passthrough(clock_rate: u32) -> Self {
        let mut map = Self::new();
        for pt in 0..PAYLOAD_TYPES as u8 {
            let target = Some(PayloadTarget {
                payload_type: pt,
                clock_rate,
                is_event: false,
            });
            if let (Some(out), Some(back)) = (
                map.to_remote.get_mut(usize::from(pt)),
                map.to_device.get_mut(usize::from(pt)),
            ) {
                *out = target;
                *back = target;
            }
        }
        map
    }

    /// The map for the peer's negotiated codecs and telephone-event format: each codec MBFP
    /// knows maps to its device payload type (the first SIP payload type wins for the device ->
    /// SIP direction when the peer lists a codec twice); codecs MBFP does not know are left out
    /// and their packets dropped.
    pub fn from_remote_media(remote: &RemoteMedia) -> Self {
        let mut map = Self::new();
        for codec in remote.codecs.iter().chain(remote.telephone_event.iter()) {
            map.insert_codec(codec);
        }
        map
    }

    fn insert_codec(&mut self, codec: &Codec) {
        if let Some((device_pt, _)) = device_payload_type(&codec.name) {
            let _ = self.insert(
                device_pt,
                codec.payload_type,
                codec.clock_rate,
                codec.is_telephone_event(),
            );
        }
    }

    /// Adds `device_pt <-> remote_pt`. The device -> SIP direction keeps an existing entry for
    /// `device_pt`; the SIP -> device direction is overwritten for `remote_pt`.
    pub fn insert(
        &mut self,
        device_pt: u8,
        remote_pt: u8,
        clock_rate: u32,
        is_event: bool,
    ) -> Result<(), PayloadTypeOutOfRange> {
        let out = self
            .to_remote
            .get_mut(usize::from(device_pt))
            .ok_or(PayloadTypeOutOfRange(device_pt))?;
        let back = self
            .to_device
            .get_mut(usize::from(remote_pt))
            .ok_or(PayloadTypeOutOfRange(remote_pt))?;
        if out.is_none() {
            *out = Some(PayloadTarget {
                payload_type: remote_pt,
                clock_rate,
                is_event,
            });
        }
        *back = Some(PayloadTarget {
            payload_type: device_pt,
            clock_rate,
            is_event,
        });
        Ok(())
    }

    /// The SIP-side payload type for a device payload type.
    pub fn to_remote(&self, device_pt: u8) -> Option<PayloadTarget> {
        self.to_remote
            .get(usize::from(device_pt))
            .copied()
            .flatten()
    }

    /// The device payload type for a SIP-side payload type.
    pub fn to_device(&self, remote_pt: u8) -> Option<PayloadTarget> {
        self.to_device
            .get(usize::from(remote_pt))
            .copied()
            .flatten()
    }

    /// Whether nothing maps (no common codec).
    pub fn is_empty(&self) -> bool {
        self.to_remote.iter().all(Option::is_none)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thalamus_sip::sdp::{Direction, MediaKind};

    fn remote(codecs: Vec<Codec>, telephone_event: Option<Codec>) -> RemoteMedia {
        RemoteMedia {
            kind: MediaKind::Audio,
            index: 0,
            rtp: "192.0.2.5:5004".parse().unwrap(),
            rtcp: "192.0.2.5:5005".parse().unwrap(),
            rtcp_mux: false,
            direction: Direction::SendRecv,
            codecs,
            telephone_event,
            ptime: Some(20),
            crypto: Vec::new(),
            feedback: Default::default(),
        }
    }

    #[test]
    fn maps_negotiated_dynamic_types_both_ways() {
        let map = PayloadMap::from_remote_media(&remote(
            vec![
                Codec::opus(98),
                Codec::pcmu(),
                Codec::new("GSM", 8000, 1, 3),
            ],
            Some(Codec::telephone_event(100, 48_000)),
        ));
        assert_eq!(
            map.to_remote(111),
            Some(PayloadTarget {
                payload_type: 98,
                clock_rate: 48_000,
                is_event: false
            })
        );
        assert_eq!(map.to_device(98).unwrap().payload_type, 111);
        assert_eq!(map.to_remote(0).unwrap().payload_type, 0);
        let event = map.to_remote(101).unwrap();
        assert_eq!(event.payload_type, 100);
        assert!(event.is_event);
        assert_eq!(map.to_device(100).unwrap().payload_type, 101);
        // GSM has no device payload type; PCMA was not negotiated.
        assert_eq!(map.to_device(3), None);
        assert_eq!(map.to_remote(8), None);
        assert!(!map.is_empty());
        assert!(PayloadMap::from_remote_media(&remote(vec![], None)).is_empty());
    }

    #[test]
    fn first_remote_type_wins_toward_the_peer() {
        let map =
            PayloadMap::from_remote_media(&remote(vec![Codec::opus(98), Codec::opus(99)], None));
        assert_eq!(map.to_remote(111).unwrap().payload_type, 98);
        assert_eq!(map.to_device(99).unwrap().payload_type, 111);
    }

    #[test]
    fn passthrough_and_range_checks() {
        let map = PayloadMap::passthrough(1_000);
        assert_eq!(map.to_remote(127).unwrap().payload_type, 127);
        assert_eq!(map.to_device(5).unwrap().clock_rate, 1_000);
        assert_eq!(map.to_remote(200), None);
        let mut map = PayloadMap::new();
        assert_eq!(
            map.insert(128, 0, 8000, false),
            Err(PayloadTypeOutOfRange(128))
        );
        assert_eq!(
            map.insert(0, 130, 8000, false),
            Err(PayloadTypeOutOfRange(130))
        );
        assert!(map.is_empty());
    }

    #[test]
    fn device_table_matches_the_protocol_reference() {
        assert_eq!(device_payload_type("PCMU"), Some((0, 8_000)));
        assert_eq!(device_payload_type("pcma"), Some((8, 8_000)));
        assert_eq!(device_payload_type("G722"), Some((9, 8_000)));
        assert_eq!(device_payload_type("OPUS"), Some((111, 48_000)));
        assert_eq!(device_payload_type("telephone-event"), Some((101, 8_000)));
        assert_eq!(device_payload_type("X-MBFP-SIGNAL"), Some((98, 1_000)));
        assert_eq!(device_payload_type("H264"), Some((96, 90_000)));
        assert_eq!(device_payload_type("VP8"), Some((97, 90_000)));
        assert_eq!(device_payload_type("G729"), None);
    }
}
