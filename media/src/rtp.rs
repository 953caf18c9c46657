//! RTP packets (RFC 3550 section 5.1) and RFC 4733 telephone-event payloads.
//!
//! Sans-IO: [`RtpPacket::parse`] reads a received packet into its fixed header fields, its CSRC
//! list and header extension (both skipped correctly, kept as slices) and a zero-copy payload
//! slice with any padding removed; [`RtpHeader::encode`] appends a fixed header (no CSRC, no
//! extension, no padding) and a payload to a buffer the caller owns. [`TelephoneEvent`] parses
//! and builds the 4-byte DTMF event payload.
//!
//! What it does not do: no SRTP, no header-extension interpretation (RFC 8285 elements are left
//! in [`RtpExtension::data`]), no jitter buffering or reordering, no payload decoding. Bad input
//! is an [`RtpError`], never a panic.

use bytes::{BufMut, BytesMut};

/// The RTP version this module reads and writes.
pub const RTP_VERSION: u8 = 2;

/// Size of the fixed RTP header (no CSRC, no extension).
pub const RTP_FIXED_HEADER_BYTES: usize = 12;

/// Size of one RFC 4733 event block.
pub const TELEPHONE_EVENT_BYTES: usize = 4;

/// Largest volume value of a telephone event (6 bits: 0 to -63 dBm0).
pub const MAX_EVENT_VOLUME: u8 = 0x3f;

const PADDING_BIT: u8 = 0x20;
const EXTENSION_BIT: u8 = 0x10;
const CSRC_COUNT_MASK: u8 = 0x0f;
const MARKER_BIT: u8 = 0x80;
const PAYLOAD_TYPE_MASK: u8 = 0x7f;
const EVENT_END_BIT: u8 = 0x80;

/// Why bytes are not a usable RTP packet or telephone-event payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RtpError {
    /// Shorter than the 12-byte fixed header.
    #[error("RTP packet of {len} bytes is shorter than the 12-byte fixed header")]
    TooShort {
        /// Length received.
        len: usize,
    },
    /// The version bits are not 2.
    #[error("RTP version {0} is not supported (expected 2)")]
    BadVersion(u8),
    /// The CSRC list announced by the CSRC count does not fit.
    #[error("RTP packet of {len} bytes cannot hold its CSRC list ({needed} bytes needed)")]
    CsrcTruncated {
        /// Length received.
        len: usize,
        /// Bytes the fixed header and CSRC list need.
        needed: usize,
    },
    /// The header extension announced by the X bit does not fit.
    #[error("RTP packet of {len} bytes cannot hold its header extension ({needed} bytes needed)")]
    ExtensionTruncated {
        /// Length received.
        len: usize,
        /// Bytes the headers and the extension need.
        needed: usize,
    },
    /// The padding count is zero or larger than what follows the headers.
    #[error("RTP padding count {padding} is invalid ({available} bytes follow the headers)")]
    BadPadding {
        /// The padding count (last byte of the packet).
        padding: u8,
        /// Bytes after the headers, padding included.
        available: usize,
    },
    /// A payload type above 127 cannot be written in 7 bits.
    #[error("payload type {0} does not fit in 7 bits (0-127)")]
    PayloadTypeOutOfRange(u8),
    /// A telephone-event payload is shorter than 4 bytes.
    #[error("telephone-event payload of {len} bytes is shorter than 4 bytes")]
    EventTooShort {
        /// Length received.
        len: usize,
    },
}

/// The fixed-header fields this gateway reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RtpHeader {
    /// Marker bit (profile-defined: start of a talkspurt for audio, end of a frame for video).
    pub marker: bool,
    /// Payload type (0-127).
    pub payload_type: u8,
    /// Sequence number; wraps at 65535.
    pub sequence: u16,
    /// Media timestamp in the payload type's clock.
    pub timestamp: u32,
    /// Synchronization source.
    pub ssrc: u32,
}

impl RtpHeader {
    /// The 12 fixed-header bytes (version 2, no padding, no extension, no CSRC). Fails when
    /// `payload_type` is above 127.
    pub fn to_bytes(&self) -> Result<[u8; RTP_FIXED_HEADER_BYTES], RtpError> {
        if self.payload_type > PAYLOAD_TYPE_MASK {
            return Err(RtpError::PayloadTypeOutOfRange(self.payload_type));
        }
        let b0 = RTP_VERSION << 6;
        let b1 = self.payload_type | if self.marker { MARKER_BIT } else { 0 };
        let [s0, s1] = self.sequence.to_be_bytes();
        let [t0, t1, t2, t3] = self.timestamp.to_be_bytes();
        let [c0, c1, c2, c3] = self.ssrc.to_be_bytes();
        Ok([b0, b1, s0, s1, t0, t1, t2, t3, c0, c1, c2, c3])
    }

    /// Appends this header followed by `payload` to `dst`. Fails, writing nothing, when
    /// `payload_type` is above 127.
    pub fn encode(&self, payload: &[u8], dst: &mut BytesMut) -> Result<(), RtpError> {
        let header = self.to_bytes()?;
        dst.reserve(RTP_FIXED_HEADER_BYTES + payload.len());
        dst.put_slice(&header);
        dst.put_slice(payload);
        Ok(())
    }
}

/// A header extension (RFC 3550 section 5.3.1): the profile-defined 16 bits and the extension
/// data (a multiple of 4 bytes), uninterpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpExtension<'a> {
    /// The first 16 bits of the extension header ("defined by profile").
    pub profile: u16,
    /// The extension data after its 4-byte header.
    pub data: &'a [u8],
}

/// A parsed RTP packet borrowing the received bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpPacket<'a> {
    /// The fixed-header fields.
    pub header: RtpHeader,
    /// The CSRC list, 4 bytes per entry (see [`RtpPacket::csrcs`]).
    pub csrc_bytes: &'a [u8],
    /// The header extension, when the X bit is set.
    pub extension: Option<RtpExtension<'a>>,
    /// Padding bytes removed from the end (0 when the P bit is clear).
    pub padding: u8,
    /// The payload: a slice of the packet, padding excluded.
    pub payload: &'a [u8],
    /// Offset of the payload within the packet.
    pub payload_offset: usize,
}

impl<'a> RtpPacket<'a> {
    /// Parses a received RTP packet. The payload is a slice of `packet` (no copy).
    pub fn parse(packet: &'a [u8]) -> Result<RtpPacket<'a>, RtpError> {
        let len = packet.len();
        let Some(&[b0, b1, s0, s1, t0, t1, t2, t3, c0, c1, c2, c3]) =
            packet.first_chunk::<RTP_FIXED_HEADER_BYTES>()
        else {
            return Err(RtpError::TooShort { len });
        };
        let version = b0 >> 6;
        if version != RTP_VERSION {
            return Err(RtpError::BadVersion(version));
        }
        let header = RtpHeader {
            marker: b1 & MARKER_BIT != 0,
            payload_type: b1 & PAYLOAD_TYPE_MASK,
            sequence: u16::from_be_bytes([s0, s1]),
            timestamp: u32::from_be_bytes([t0, t1, t2, t3]),
            ssrc: u32::from_be_bytes([c0, c1, c2, c3]),
        };
        let csrc_len = usize::from(b0 & CSRC_COUNT_MASK) * 4;
        let csrc_end = RTP_FIXED_HEADER_BYTES + csrc_len;
        let csrc_bytes =
            packet
                .get(RTP_FIXED_HEADER_BYTES..csrc_end)
                .ok_or(RtpError::CsrcTruncated {
                    len,
                    needed: csrc_end,
                })?;
        let mut offset = csrc_end;
        let extension = if b0 & EXTENSION_BIT != 0 {
            let ext_header_end = offset + 4;
            let Some(&[p0, p1, l0, l1]) = packet
                .get(offset..ext_header_end)
                .and_then(|s| s.first_chunk::<4>())
            else {
                return Err(RtpError::ExtensionTruncated {
                    len,
                    needed: ext_header_end,
                });
            };
            let data_end = ext_header_end + usize::from(u16::from_be_bytes([l0, l1])) * 4;
            let data =
                packet
                    .get(ext_header_end..data_end)
                    .ok_or(RtpError::ExtensionTruncated {
                        len,
                        needed: data_end,
                    })?;
            offset = data_end;
            Some(RtpExtension {
                profile: u16::from_be_bytes([p0, p1]),
                data,
            })
        } else {
            None
        };
        let rest = packet.get(offset..).unwrap_or_default();
        let (payload, padding) = if b0 & PADDING_BIT != 0 {
            let padding = rest.last().copied().unwrap_or(0);
            let available = rest.len();
            if padding == 0 || usize::from(padding) > available {
                return Err(RtpError::BadPadding { padding, available });
            }
            let end = available - usize::from(padding);
            (rest.get(..end).unwrap_or_default(), padding)
        } else {
            (rest, 0)
        };
        Ok(RtpPacket {
            header,
            csrc_bytes,
            extension,
            padding,
            payload,
            payload_offset: offset,
        })
    }

    /// Number of CSRC entries.
    pub fn csrc_count(&self) -> usize {
        self.csrc_bytes.len() / 4
    }

    /// The contributing sources, in order.
    pub fn csrcs(&self) -> impl Iterator<Item = u32> + 'a {
        self.csrc_bytes
            .chunks_exact(4)
            .filter_map(|c| c.first_chunk::<4>().map(|b| u32::from_be_bytes(*b)))
    }
}

/// Whether `packet` looks like RTCP multiplexed on the RTP port (RFC 5761 section 4): version 2
/// and a second byte of 192-223 (RTCP packet types 192-223, which as RTP would be marker set
/// with payload types 64-95).
pub fn is_rtcp_packet(packet: &[u8]) -> bool {
    match packet {
        [b0, b1, ..] => b0 >> 6 == RTP_VERSION && (192..=223).contains(b1),
        _ => false,
    }
}

/// One RFC 4733 event block (section 2.3): a named event such as a DTMF digit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TelephoneEvent {
    /// The event code (0-9, 10 `*`, 11 `#`, 12-15 `A`-`D`, 16 flash, others per RFC 4734).
    pub event: u8,
    /// The E bit: this packet ends the event.
    pub end: bool,
    /// Power level in -dBm0, 0-63 (larger is quieter).
    pub volume: u8,
    /// Duration so far, in timestamp units.
    pub duration: u16,
}

impl TelephoneEvent {
    /// Reads the first event block of a telephone-event payload (further blocks, used for
    /// redundancy, are ignored). The reserved bit is ignored.
    pub fn parse(payload: &[u8]) -> Result<TelephoneEvent, RtpError> {
        let Some(&[event, flags, d0, d1]) = payload.first_chunk::<TELEPHONE_EVENT_BYTES>() else {
            return Err(RtpError::EventTooShort { len: payload.len() });
        };
        Ok(TelephoneEvent {
            event,
            end: flags & EVENT_END_BIT != 0,
            volume: flags & MAX_EVENT_VOLUME,
            duration: u16::from_be_bytes([d0, d1]),
        })
    }

    /// The 4 payload bytes. A volume above 63 is written as 63.
    pub fn to_bytes(&self) -> [u8; TELEPHONE_EVENT_BYTES] {
        let flags = if self.end { EVENT_END_BIT } else { 0 } | self.volume.min(MAX_EVENT_VOLUME);
        let [d0, d1] = self.duration.to_be_bytes();
        [self.event, flags, d0, d1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RtpHeader {
        RtpHeader {
            marker: true,
            payload_type: 96,
            sequence: 0xabcd,
            timestamp: 0x0102_0304,
            ssrc: 0xdead_beef,
        }
    }

    #[test]
    fn fixed_header_byte_layout() {
        let mut dst = BytesMut::new();
        sample().encode(b"xyz", &mut dst).unwrap();
        assert_eq!(
            &dst[..],
            &[
                0x80, // V=2, P=0, X=0, CC=0
                0xe0, // M=1, PT=96
                0xab, 0xcd, // sequence
                0x01, 0x02, 0x03, 0x04, // timestamp
                0xde, 0xad, 0xbe, 0xef, // SSRC
                b'x', b'y', b'z',
            ][..]
        );
        let parsed = RtpPacket::parse(&dst).unwrap();
        assert_eq!(parsed.header, sample());
        assert_eq!(parsed.payload, b"xyz");
        assert_eq!(parsed.payload_offset, 12);
        assert_eq!(parsed.padding, 0);
        assert!(parsed.extension.is_none());
        assert_eq!(parsed.csrc_count(), 0);
    }

    #[test]
    fn payload_type_above_127_is_refused_and_nothing_written() {
        let mut dst = BytesMut::from(&b"ab"[..]);
        let header = RtpHeader {
            payload_type: 128,
            ..sample()
        };
        assert_eq!(
            header.encode(b"x", &mut dst),
            Err(RtpError::PayloadTypeOutOfRange(128))
        );
        assert_eq!(&dst[..], b"ab");
    }

    #[test]
    fn csrc_extension_and_padding_are_skipped() {
        let mut packet = vec![
            0xb2, // V=2, P=1, X=1, CC=2
            0x00, // M=0, PT=0
            0x00, 0x07, 0x00, 0x00, 0x00, 0xa0, 0x11, 0x22, 0x33, 0x44,
        ];
        packet.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 2]); // CSRCs 1 and 2
        packet.extend_from_slice(&[0xbe, 0xde, 0x00, 0x01, 0x10, 0xff, 0x00, 0x00]); // ext, 1 word
        packet.extend_from_slice(b"hello");
        packet.extend_from_slice(&[0, 0, 3]); // 3 bytes of padding
        let parsed = RtpPacket::parse(&packet).unwrap();
        assert_eq!(parsed.header.sequence, 7);
        assert_eq!(parsed.header.timestamp, 160);
        assert_eq!(parsed.header.ssrc, 0x1122_3344);
        assert!(!parsed.header.marker);
        assert_eq!(parsed.csrcs().collect::<Vec<_>>(), vec![1, 2]);
        let ext = parsed.extension.unwrap();
        assert_eq!(ext.profile, 0xbede);
        assert_eq!(ext.data, &[0x10, 0xff, 0, 0]);
        assert_eq!(parsed.payload, b"hello");
        assert_eq!(parsed.padding, 3);
        assert_eq!(parsed.payload_offset, 12 + 8 + 8);
    }

    #[test]
    fn short_and_invalid_packets_are_errors() {
        let mut good = BytesMut::new();
        sample().encode(&[], &mut good).unwrap();
        for len in 0..RTP_FIXED_HEADER_BYTES {
            assert_eq!(
                RtpPacket::parse(&good[..len]),
                Err(RtpError::TooShort { len })
            );
        }
        for version in [0u8, 1, 3] {
            let mut bad = good.to_vec();
            bad[0] = (bad[0] & 0x3f) | (version << 6);
            assert_eq!(RtpPacket::parse(&bad), Err(RtpError::BadVersion(version)));
        }
        // CC=15 but no CSRCs.
        let mut bad = good.to_vec();
        bad[0] |= 0x0f;
        assert_eq!(
            RtpPacket::parse(&bad),
            Err(RtpError::CsrcTruncated {
                len: 12,
                needed: 72
            })
        );
        // X set, no extension header.
        let mut bad = good.to_vec();
        bad[0] |= EXTENSION_BIT;
        assert_eq!(
            RtpPacket::parse(&bad),
            Err(RtpError::ExtensionTruncated {
                len: 12,
                needed: 16
            })
        );
        // X set, extension claims 2 words but has 1.
        bad.extend_from_slice(&[0, 0, 0, 2, 1, 2, 3, 4]);
        assert_eq!(
            RtpPacket::parse(&bad),
            Err(RtpError::ExtensionTruncated {
                len: 20,
                needed: 24
            })
        );
        // P set with padding count 0, with a count larger than the rest, and with nothing.
        let mut bad = good.to_vec();
        bad[0] |= PADDING_BIT;
        assert_eq!(
            RtpPacket::parse(&bad),
            Err(RtpError::BadPadding {
                padding: 0,
                available: 0
            })
        );
        bad.extend_from_slice(&[1, 0]);
        assert_eq!(
            RtpPacket::parse(&bad),
            Err(RtpError::BadPadding {
                padding: 0,
                available: 2
            })
        );
        bad.push(9);
        assert_eq!(
            RtpPacket::parse(&bad),
            Err(RtpError::BadPadding {
                padding: 9,
                available: 3
            })
        );
    }

    #[test]
    fn padding_may_take_the_whole_rest() {
        let mut packet = BytesMut::new();
        sample().encode(&[0, 0, 0, 4], &mut packet).unwrap();
        packet[0] |= PADDING_BIT;
        let parsed = RtpPacket::parse(&packet).unwrap();
        assert!(parsed.payload.is_empty());
        assert_eq!(parsed.padding, 4);
    }

    #[test]
    fn every_truncation_of_a_full_packet_is_an_error_or_shorter_payload_never_a_panic() {
        let mut packet = vec![0xb1, 0x60, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 9];
        packet.extend_from_slice(&[0x10, 0x00, 0x00, 0x01, 1, 2, 3, 4]);
        packet.extend_from_slice(b"abcd\x00\x02");
        assert!(RtpPacket::parse(&packet).is_ok());
        for len in 0..packet.len() {
            let _ = RtpPacket::parse(&packet[..len]);
        }
    }

    #[test]
    fn rtcp_on_the_rtp_port_is_recognised() {
        assert!(is_rtcp_packet(&[0x80, 200, 0, 6]));
        assert!(is_rtcp_packet(&[0x81, 201, 0, 7]));
        assert!(!is_rtcp_packet(&[0x80, 0x60, 0, 1])); // RTP PT 96, no marker
        assert!(!is_rtcp_packet(&[0x80, 0xe0, 0, 1])); // RTP PT 96 with marker
        assert!(!is_rtcp_packet(&[0x40, 200]));
        assert!(!is_rtcp_packet(&[0x80]));
    }

    #[test]
    fn telephone_event_layout_and_round_trip() {
        let event = TelephoneEvent {
            event: 11,
            end: true,
            volume: 10,
            duration: 0x0320,
        };
        assert_eq!(event.to_bytes(), [11, 0x8a, 0x03, 0x20]);
        assert_eq!(TelephoneEvent::parse(&event.to_bytes()).unwrap(), event);
        let start = TelephoneEvent {
            end: false,
            ..event
        };
        assert_eq!(start.to_bytes()[1], 0x0a);
        // The reserved bit is ignored; redundant blocks after the first are ignored.
        assert_eq!(
            TelephoneEvent::parse(&[5, 0x40 | 0x3f, 0, 160, 9, 9, 9, 9]).unwrap(),
            TelephoneEvent {
                event: 5,
                end: false,
                volume: 63,
                duration: 160
            }
        );
        let loud = TelephoneEvent {
            volume: 200,
            ..event
        };
        assert_eq!(loud.to_bytes()[1], 0x80 | 0x3f);
        for len in 0..4 {
            assert_eq!(
                TelephoneEvent::parse(&[1, 2, 3][..len.min(3)]),
                Err(RtpError::EventTooShort { len: len.min(3) })
            );
        }
    }
}
