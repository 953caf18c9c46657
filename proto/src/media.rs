//! The media datagram header: the fixed binary header in front of every media payload that
//! travels in a QUIC datagram between a device and the gateway.
//!
//! Sans-IO: [`MediaHeader::encode`] appends a header and a payload to a buffer the caller owns,
//! and [`MediaDatagram::decode`] splits a received datagram into its header and a zero-copy
//! payload slice. This module does not send or receive datagrams, does not reorder, buffer or
//! de-jitter packets, does not interpret payloads (codec frames, DTMF events, signal data), and
//! does not check that a `call_ref` names a live call: sessions and the media relay do that.
//!
//! # Wire layout (13 bytes, big-endian)
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! | V |M|  rsvd   |R|     PT      |           sequence            |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                           timestamp                           |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                           call_ref                            |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |   stream_id   |  payload ...
//! +-+-+-+-+-+-+-+-+
//! ```
//!
//! | byte | bits | field | meaning |
//! | --- | --- | --- | --- |
//! | 0 | 7-6 | `V` | version, always 1 (`0b01`) |
//! | 0 | 5 | `M` | marker (as in RTP: first packet of a talkspurt, last packet of a video frame) |
//! | 0 | 4-0 | `rsvd` | reserved flags: sent as 0, ignored on receipt |
//! | 1 | 7 | `R` | reserved: sent as 0, ignored on receipt |
//! | 1 | 6-0 | `PT` | payload type (0-127, RTP payload type numbering) |
//! | 2-3 | | `sequence` | packet sequence number per (call, stream); wraps at 65535 |
//! | 4-7 | | `timestamp` | media timestamp in RTP clock units of the payload type |
//! | 8-11 | | `call_ref` | the call, as in `Dial.call_ref` / `IncomingCall.call_ref` |
//! | 12 | | `stream_id` | 0 audio, 1 video, 2 signal data; others reserved |
//! | 13.. | | payload | the media payload, up to the end of the datagram |
//!
//! The first eight bytes mirror the RTP fixed header (RFC 3550, section 5.1), with the version
//! set to 1 so an MBFP datagram is never mistaken for RTP (version 2).

use bytes::{BufMut, Bytes, BytesMut};

/// The media header version this crate writes and accepts.
pub const MEDIA_VERSION: u8 = 1;

/// Size of the media header in bytes. The header is fixed-size in version 1.
pub const HEADER_BYTES: usize = 13;

/// Largest media header in bytes: size buffers and payload budgets with this.
/// Equal to [`HEADER_BYTES`] in version 1.
pub const MAX_HEADER_BYTES: usize = HEADER_BYTES;

/// Largest payload type value (payload types are 7 bits).
pub const MAX_PAYLOAD_TYPE: u8 = 0x7f;

/// The payload type of the signal data stream ([`StreamId::SIGNAL`]) on the device link.
pub const SIGNAL_PAYLOAD_TYPE: u8 = 98;
/// The RTP clock of the signal data stream: timestamps count milliseconds.
pub const SIGNAL_CLOCK_RATE: u32 = 1_000;
/// The SDP encoding name the signal data stream travels under on the SIP side
/// (`m=application <port> RTP/AVP <pt>`, `a=rtpmap:<pt> x-mbfp-signal/1000`).
pub const SIGNAL_ENCODING: &str = "x-mbfp-signal";

const VERSION_SHIFT: u8 = 6;
const MARKER_BIT: u8 = 0x20;
const PAYLOAD_TYPE_MASK: u8 = 0x7f;

/// Which media stream of a call a datagram belongs to. The default is [`StreamId::AUDIO`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct StreamId(pub u8);

impl StreamId {
    /// The call's audio stream.
    pub const AUDIO: StreamId = StreamId(0);
    /// The call's video stream.
    pub const VIDEO: StreamId = StreamId(1);
    /// The call's "signal" data stream (device-specific data, e.g. raw sensor signal).
    pub const SIGNAL: StreamId = StreamId(2);

    /// True for the stream ids defined in version 1 (audio, video, signal).
    pub fn is_known(self) -> bool {
        self.0 <= Self::SIGNAL.0
    }

    /// A short name: `audio`, `video`, `signal`, or `other` for a stream id version 1 does
    /// not define.
    pub fn name(self) -> &'static str {
        match self {
            Self::AUDIO => "audio",
            Self::VIDEO => "video",
            Self::SIGNAL => "signal",
            _ => "other",
        }
    }
}

impl From<u8> for StreamId {
    fn from(value: u8) -> Self {
        StreamId(value)
    }
}

impl From<StreamId> for u8 {
    fn from(value: StreamId) -> Self {
        value.0
    }
}

/// Why a media datagram could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MediaError {
    /// The datagram is shorter than the media header.
    #[error("media datagram of {len} bytes is shorter than the {HEADER_BYTES}-byte header")]
    TooShort {
        /// Length of the datagram received.
        len: usize,
    },
    /// The version bits are not [`MEDIA_VERSION`].
    #[error("media header version {0} is not supported (expected {MEDIA_VERSION})")]
    BadVersion(u8),
    /// A payload type above 127 cannot be encoded in 7 bits.
    #[error("payload type {0} does not fit in 7 bits (0-127)")]
    PayloadTypeOutOfRange(u8),
}

/// The header of one media datagram (version 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MediaHeader {
    /// Marker bit, with the RTP meaning for the payload type.
    pub marker: bool,
    /// RTP payload type (0-127).
    pub payload_type: u8,
    /// Sequence number per (call, stream); wraps at 65535.
    pub sequence: u16,
    /// Media timestamp in RTP clock units.
    pub timestamp: u32,
    /// The call this media belongs to (`Dial.call_ref` / `IncomingCall.call_ref`).
    pub call_ref: u32,
    /// The stream within the call.
    pub stream_id: StreamId,
}

impl MediaHeader {
    /// The 13 header bytes. Fails when `payload_type` is above 127.
    pub fn to_header_bytes(&self) -> Result<[u8; HEADER_BYTES], MediaError> {
        if self.payload_type > MAX_PAYLOAD_TYPE {
            return Err(MediaError::PayloadTypeOutOfRange(self.payload_type));
        }
        let b0 = (MEDIA_VERSION << VERSION_SHIFT) | if self.marker { MARKER_BIT } else { 0 };
        let b1 = self.payload_type;
        let [s0, s1] = self.sequence.to_be_bytes();
        let [t0, t1, t2, t3] = self.timestamp.to_be_bytes();
        let [c0, c1, c2, c3] = self.call_ref.to_be_bytes();
        Ok([
            b0,
            b1,
            s0,
            s1,
            t0,
            t1,
            t2,
            t3,
            c0,
            c1,
            c2,
            c3,
            self.stream_id.0,
        ])
    }

    /// Appends this header followed by `payload` to `dst`. Fails, writing nothing, when
    /// `payload_type` is above 127.
    pub fn encode(&self, payload: &[u8], dst: &mut BytesMut) -> Result<(), MediaError> {
        let header = self.to_header_bytes()?;
        dst.reserve(HEADER_BYTES + payload.len());
        dst.put_slice(&header);
        dst.put_slice(payload);
        Ok(())
    }

    /// This header followed by `payload`, as one datagram.
    pub fn to_bytes(&self, payload: &[u8]) -> Result<Bytes, MediaError> {
        let mut dst = BytesMut::with_capacity(HEADER_BYTES + payload.len());
        self.encode(payload, &mut dst)?;
        Ok(dst.freeze())
    }

    /// Parses the header at the front of `datagram` (the payload is not looked at). Reserved
    /// bits are ignored.
    pub fn decode(datagram: &[u8]) -> Result<MediaHeader, MediaError> {
        let Some(&[b0, b1, s0, s1, t0, t1, t2, t3, c0, c1, c2, c3, stream]) =
            datagram.first_chunk::<HEADER_BYTES>()
        else {
            return Err(MediaError::TooShort {
                len: datagram.len(),
            });
        };
        let version = b0 >> VERSION_SHIFT;
        if version != MEDIA_VERSION {
            return Err(MediaError::BadVersion(version));
        }
        Ok(MediaHeader {
            marker: b0 & MARKER_BIT != 0,
            payload_type: b1 & PAYLOAD_TYPE_MASK,
            sequence: u16::from_be_bytes([s0, s1]),
            timestamp: u32::from_be_bytes([t0, t1, t2, t3]),
            call_ref: u32::from_be_bytes([c0, c1, c2, c3]),
            stream_id: StreamId(stream),
        })
    }
}

/// A decoded media datagram: its header and its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaDatagram {
    /// The parsed header.
    pub header: MediaHeader,
    /// The payload: a slice of the received datagram (no copy).
    pub payload: Bytes,
}

impl MediaDatagram {
    /// Splits a received datagram into header and payload. The payload shares the datagram's
    /// memory. An empty payload is valid.
    pub fn decode(datagram: Bytes) -> Result<MediaDatagram, MediaError> {
        let header = MediaHeader::decode(&datagram)?;
        let payload = datagram.slice(HEADER_BYTES..);
        Ok(MediaDatagram { header, payload })
    }

    /// Encodes this datagram (header then payload) into a fresh buffer.
    pub fn to_bytes(&self) -> Result<Bytes, MediaError> {
        self.header.to_bytes(&self.payload)
    }
}

/// The largest payload that fits in a datagram of at most `max_datagram_bytes` bytes (for
/// example `Welcome.limits.max_datagram_bytes`, or what the QUIC connection reports as its
/// maximum datagram size). Zero when not even the header fits.
pub fn max_payload_bytes(max_datagram_bytes: usize) -> usize {
    max_datagram_bytes.saturating_sub(MAX_HEADER_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_header() -> MediaHeader {
        MediaHeader {
            marker: true,
            payload_type: 111,
            sequence: 0x1234,
            timestamp: 0xdead_beef,
            call_ref: 0x0102_0304,
            stream_id: StreamId::VIDEO,
        }
    }

    #[test]
    fn known_byte_layout() {
        let bytes = sample_header().to_bytes(b"abc").unwrap();
        assert_eq!(
            &bytes[..],
            &[
                0x60, // V=1 (0b01), M=1, reserved 0
                0x6f, // R=0, PT=111
                0x12, 0x34, // sequence
                0xde, 0xad, 0xbe, 0xef, // timestamp
                0x01, 0x02, 0x03, 0x04, // call_ref
                0x01, // stream_id = video
                b'a', b'b', b'c',
            ][..]
        );
    }

    #[test]
    fn marker_clear_and_audio_stream() {
        let header = MediaHeader {
            marker: false,
            payload_type: 0,
            stream_id: StreamId::AUDIO,
            ..sample_header()
        };
        let bytes = header.to_bytes(&[]).unwrap();
        assert_eq!(bytes.len(), HEADER_BYTES);
        assert_eq!(bytes[0], 0x40);
        assert_eq!(bytes[1], 0x00);
        assert_eq!(bytes[12], 0x00);
    }

    #[test]
    fn decode_splits_header_and_payload_without_copying() {
        let datagram = sample_header().to_bytes(b"payload").unwrap();
        let start = datagram.as_ptr();
        let decoded = MediaDatagram::decode(datagram).unwrap();
        assert_eq!(decoded.header, sample_header());
        assert_eq!(&decoded.payload[..], b"payload");
        assert_eq!(decoded.payload.as_ptr(), start.wrapping_add(HEADER_BYTES));
    }

    #[test]
    fn header_only_datagram_has_empty_payload() {
        let datagram = sample_header().to_bytes(&[]).unwrap();
        let decoded = MediaDatagram::decode(datagram).unwrap();
        assert!(decoded.payload.is_empty());
    }

    #[test]
    fn too_short_is_an_error_at_every_length() {
        let full = sample_header().to_bytes(&[]).unwrap();
        for len in 0..HEADER_BYTES {
            let err = MediaDatagram::decode(full.slice(..len)).unwrap_err();
            assert_eq!(err, MediaError::TooShort { len });
        }
    }

    #[test]
    fn other_versions_are_refused() {
        let mut bytes = BytesMut::from(&sample_header().to_bytes(&[]).unwrap()[..]);
        for version in [0u8, 2, 3] {
            bytes[0] = (bytes[0] & 0x3f) | (version << 6);
            let err = MediaDatagram::decode(bytes.clone().freeze()).unwrap_err();
            assert_eq!(err, MediaError::BadVersion(version));
        }
    }

    #[test]
    fn reserved_bits_are_ignored_on_receipt() {
        let mut bytes = BytesMut::from(&sample_header().to_bytes(b"x").unwrap()[..]);
        bytes[0] |= 0x1f;
        bytes[1] |= 0x80;
        let decoded = MediaDatagram::decode(bytes.freeze()).unwrap();
        assert_eq!(decoded.header, sample_header());
    }

    #[test]
    fn payload_type_above_127_is_refused_and_nothing_is_written() {
        let header = MediaHeader {
            payload_type: 128,
            ..sample_header()
        };
        let mut dst = BytesMut::from(&b"keep"[..]);
        assert_eq!(
            header.encode(b"abc", &mut dst),
            Err(MediaError::PayloadTypeOutOfRange(128))
        );
        assert_eq!(&dst[..], b"keep");
    }

    #[test]
    fn encode_appends_after_existing_bytes() {
        let mut dst = BytesMut::from(&b"xy"[..]);
        sample_header().encode(b"z", &mut dst).unwrap();
        assert_eq!(dst.len(), 2 + HEADER_BYTES + 1);
        let decoded = MediaDatagram::decode(dst.freeze().slice(2..)).unwrap();
        assert_eq!(&decoded.payload[..], b"z");
    }

    #[test]
    fn max_payload_for_a_datagram_limit() {
        assert_eq!(max_payload_bytes(1200), 1200 - HEADER_BYTES);
        assert_eq!(max_payload_bytes(HEADER_BYTES), 0);
        assert_eq!(max_payload_bytes(3), 0);
        assert_eq!(max_payload_bytes(0), 0);
    }

    #[test]
    fn stream_ids() {
        assert!(StreamId::AUDIO.is_known());
        assert!(StreamId::SIGNAL.is_known());
        assert!(!StreamId(3).is_known());
        assert_eq!(u8::from(StreamId::SIGNAL), 2);
        assert_eq!(StreamId::from(1), StreamId::VIDEO);
        assert_eq!(StreamId::default(), StreamId::AUDIO);
    }

    #[test]
    fn datagram_to_bytes_round_trips() {
        let datagram = MediaDatagram {
            header: sample_header(),
            payload: Bytes::from_static(b"hello"),
        };
        let bytes = datagram.to_bytes().unwrap();
        assert_eq!(MediaDatagram::decode(bytes).unwrap(), datagram);
    }
}
