//! RTCP (RFC 3550 section 6): building the compound reports a relay sends and reading the
//! reports a peer sends back.
//!
//! Sans-IO. Building: [`write_sender_report`], [`write_receiver_report`] (each with at most one
//! report block), [`write_sdes_cname`] and [`write_bye`] append one RTCP packet each to a
//! buffer the caller owns; a compound packet is several of them back to back (a report first,
//! then SDES). Reading: [`parse_compound`] iterates over the packets of a compound packet,
//! giving sender info, report blocks (loss, jitter, LSR/DLSR), SDES CNAMEs and BYE, with bounds
//! checked and no allocation. [`round_trip`] turns a report block's LSR/DLSR into a round-trip
//! time (section 6.4.1); [`ntp_timestamp`] and [`ntp_middle`] give the 64-bit and middle 32-bit
//! NTP forms of a wall-clock time.
//!
//! What it does not do: no report scheduling (the relay core decides when to report), no
//! RTCP-XR, feedback (RFC 4585) or APP interpretation (they parse as [`RtcpPacket::Other`]), no
//! SRTCP, no reduced-size RTCP. Bad input is an [`RtcpError`], never a panic.

use std::time::Duration;

use bytes::{BufMut, BytesMut};

/// Sender report packet type.
pub const PT_SENDER_REPORT: u8 = 200;
/// Receiver report packet type.
pub const PT_RECEIVER_REPORT: u8 = 201;
/// Source description packet type.
pub const PT_SOURCE_DESCRIPTION: u8 = 202;
/// Goodbye packet type.
pub const PT_GOODBYE: u8 = 203;
/// Payload-specific feedback packet type (RFC 4585 section 6.3).
pub const PT_PAYLOAD_FEEDBACK: u8 = 206;
/// Picture loss indication: the format of a payload-specific feedback packet (RFC 4585
/// section 6.3.1).
pub const FMT_PICTURE_LOSS: u8 = 1;
/// Full intra request: the format of a payload-specific feedback packet (RFC 5104 section
/// 4.3.1).
pub const FMT_FULL_INTRA_REQUEST: u8 = 4;

/// Size of one report block.
pub const REPORT_BLOCK_BYTES: usize = 24;
/// Size of the sender info of a sender report.
pub const SENDER_INFO_BYTES: usize = 20;
/// Longest CNAME written (an SDES item length is one byte).
pub const MAX_CNAME_BYTES: usize = 255;
/// Seconds from the NTP epoch (1900) to the Unix epoch (1970).
pub const NTP_UNIX_OFFSET_SECS: u64 = 2_208_988_800;

const RTCP_VERSION: u8 = 2;
const PADDING_BIT: u8 = 0x20;
const COUNT_MASK: u8 = 0x1f;
const SDES_CNAME: u8 = 1;
const MAX_CUMULATIVE_LOST: i32 = 0x7f_ffff;
const MIN_CUMULATIVE_LOST: i32 = -0x80_0000;

/// Why bytes are not a usable RTCP packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RtcpError {
    /// Fewer than the 4 bytes of a common header remain.
    #[error("RTCP packet of {len} bytes is shorter than its 4-byte header")]
    TooShort {
        /// Bytes left.
        len: usize,
    },
    /// The version bits are not 2.
    #[error("RTCP version {0} is not supported (expected 2)")]
    BadVersion(u8),
    /// The length field points past the end of the compound packet.
    #[error("RTCP length field says {declared} bytes but only {available} remain")]
    BadLength {
        /// Bytes the length field announces.
        declared: usize,
        /// Bytes left in the compound packet.
        available: usize,
    },
    /// The padding count is zero or larger than the packet body.
    #[error("RTCP padding count {0} is invalid")]
    BadPadding(u8),
    /// A report's fixed part or report blocks do not fit in its length.
    #[error("RTCP packet type {packet_type} is too short for its {count} report blocks")]
    ReportTruncated {
        /// The packet type.
        packet_type: u8,
        /// The report count.
        count: u8,
    },
    /// An SDES chunk or item runs past the end of the packet.
    #[error("RTCP SDES chunk is truncated")]
    SdesTruncated,
}

/// The sender info of a sender report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SenderInfo {
    /// Wall-clock time of the report, 64-bit NTP format.
    pub ntp_timestamp: u64,
    /// The same instant in the sender's RTP timestamp clock.
    pub rtp_timestamp: u32,
    /// RTP packets sent so far (wraps).
    pub packet_count: u32,
    /// RTP payload octets sent so far (wraps).
    pub octet_count: u32,
}

/// One reception report block: how a receiver sees one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ReportBlock {
    /// The source this block reports on.
    pub ssrc: u32,
    /// Fraction of packets lost since the previous report, in 1/256.
    pub fraction_lost: u8,
    /// Packets lost since the beginning (24-bit signed; duplicates can make it negative).
    pub cumulative_lost: i32,
    /// Extended highest sequence number received (cycles in the high 16 bits).
    pub highest_sequence: u32,
    /// Interarrival jitter, in timestamp units.
    pub jitter: u32,
    /// Middle 32 bits of the NTP timestamp of the last sender report received (0: none).
    pub last_sender_report: u32,
    /// Delay since that sender report was received, in 1/65536 s.
    pub delay_since_last_sender_report: u32,
}

impl ReportBlock {
    fn parse(bytes: &[u8; REPORT_BLOCK_BYTES]) -> ReportBlock {
        let word = |i: usize| {
            bytes
                .get(i..i + 4)
                .and_then(|s| s.first_chunk::<4>())
                .map_or(0, |w| u32::from_be_bytes(*w))
        };
        let lost_word = word(4);
        // Sign-extend the low 24 bits.
        let cumulative_lost = ((lost_word << 8) as i32) >> 8;
        ReportBlock {
            ssrc: word(0),
            fraction_lost: (lost_word >> 24) as u8,
            cumulative_lost,
            highest_sequence: word(8),
            jitter: word(12),
            last_sender_report: word(16),
            delay_since_last_sender_report: word(20),
        }
    }

    fn write(&self, dst: &mut BytesMut) {
        let lost = self
            .cumulative_lost
            .clamp(MIN_CUMULATIVE_LOST, MAX_CUMULATIVE_LOST) as u32
            & 0x00ff_ffff;
        dst.put_u32(self.ssrc);
        dst.put_u32((u32::from(self.fraction_lost) << 24) | lost);
        dst.put_u32(self.highest_sequence);
        dst.put_u32(self.jitter);
        dst.put_u32(self.last_sender_report);
        dst.put_u32(self.delay_since_last_sender_report);
    }
}

/// The report blocks of one SR or RR, read lazily from the packet bytes.
#[derive(Debug, Clone)]
pub struct ReportBlocks<'a> {
    rest: &'a [u8],
}

impl Iterator for ReportBlocks<'_> {
    type Item = ReportBlock;

    fn next(&mut self) -> Option<ReportBlock> {
        let (block, rest) = self.rest.split_first_chunk::<REPORT_BLOCK_BYTES>()?;
        self.rest = rest;
        Some(ReportBlock::parse(block))
    }
}

/// One SDES chunk: a source and its CNAME, if the chunk has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SdesChunk<'a> {
    /// The source described.
    pub ssrc: u32,
    /// The CNAME item's text (bytes, normally UTF-8), if present.
    pub cname: Option<&'a [u8]>,
}

/// The chunks of an SDES packet.
#[derive(Debug, Clone)]
pub struct SdesChunks<'a> {
    rest: &'a [u8],
    remaining: u8,
}

impl<'a> Iterator for SdesChunks<'a> {
    type Item = Result<SdesChunk<'a>, RtcpError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let result = self.next_chunk();
        if result.is_err() {
            self.remaining = 0;
        }
        Some(result)
    }
}

impl<'a> SdesChunks<'a> {
    fn next_chunk(&mut self) -> Result<SdesChunk<'a>, RtcpError> {
        let chunk_start = self.rest;
        let (ssrc, mut items) = chunk_start
            .split_first_chunk::<4>()
            .ok_or(RtcpError::SdesTruncated)?;
        let ssrc = u32::from_be_bytes(*ssrc);
        let mut cname = None;
        loop {
            let (&kind, after_kind) = items.split_first().ok_or(RtcpError::SdesTruncated)?;
            if kind == 0 {
                // End of items: skip the null byte and the padding to the next 32-bit boundary.
                let used = chunk_start.len() - after_kind.len();
                let padded = used.div_ceil(4) * 4;
                self.rest = chunk_start.get(padded..).ok_or(RtcpError::SdesTruncated)?;
                return Ok(SdesChunk { ssrc, cname });
            }
            let (&len, after_len) = after_kind.split_first().ok_or(RtcpError::SdesTruncated)?;
            let text = after_len
                .get(..usize::from(len))
                .ok_or(RtcpError::SdesTruncated)?;
            if kind == SDES_CNAME && cname.is_none() {
                cname = Some(text);
            }
            items = after_len.get(usize::from(len)..).unwrap_or_default();
        }
    }
}

/// One packet of a compound RTCP packet.
#[derive(Debug, Clone)]
pub enum RtcpPacket<'a> {
    /// A sender report (PT 200).
    SenderReport {
        /// The sender's SSRC.
        ssrc: u32,
        /// Its sender info.
        info: SenderInfo,
        /// Its report blocks.
        blocks: ReportBlocks<'a>,
    },
    /// A receiver report (PT 201).
    ReceiverReport {
        /// The reporter's SSRC.
        ssrc: u32,
        /// Its report blocks.
        blocks: ReportBlocks<'a>,
    },
    /// A source description (PT 202).
    SourceDescription(SdesChunks<'a>),
    /// A goodbye (PT 203): the sources leaving, 4 bytes each.
    Goodbye {
        /// The SSRC list, 4 bytes per source.
        ssrc_bytes: &'a [u8],
    },
    /// Any other packet type (APP, feedback, XR...), uninterpreted.
    Other {
        /// The packet type.
        packet_type: u8,
        /// The count/format field (5 bits).
        count: u8,
        /// The packet body after the 4-byte header, padding removed.
        body: &'a [u8],
    },
}

/// Iterates over the packets of a compound RTCP packet (see [`parse_compound`]). After the
/// first error it yields nothing more.
#[derive(Debug, Clone)]
pub struct RtcpPackets<'a> {
    rest: &'a [u8],
}

/// The packets of a compound RTCP packet, in order. Each item is one packet or the error that
/// stopped the walk.
pub fn parse_compound(bytes: &[u8]) -> RtcpPackets<'_> {
    RtcpPackets { rest: bytes }
}

impl<'a> Iterator for RtcpPackets<'a> {
    type Item = Result<RtcpPacket<'a>, RtcpError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let result = self.next_packet();
        if result.is_err() {
            self.rest = &[];
        }
        Some(result)
    }
}

impl<'a> RtcpPackets<'a> {
    fn next_packet(&mut self) -> Result<RtcpPacket<'a>, RtcpError> {
        let available = self.rest.len();
        let Some((&[b0, packet_type, l0, l1], _)) = self.rest.split_first_chunk::<4>() else {
            return Err(RtcpError::TooShort { len: available });
        };
        let version = b0 >> 6;
        if version != RTCP_VERSION {
            return Err(RtcpError::BadVersion(version));
        }
        let declared = (usize::from(u16::from_be_bytes([l0, l1])) + 1) * 4;
        let packet = self.rest.get(..declared).ok_or(RtcpError::BadLength {
            declared,
            available,
        })?;
        self.rest = self.rest.get(declared..).unwrap_or_default();
        let mut body = packet.get(4..).unwrap_or_default();
        if b0 & PADDING_BIT != 0 {
            let padding = body.last().copied().unwrap_or(0);
            if padding == 0 || usize::from(padding) > body.len() {
                return Err(RtcpError::BadPadding(padding));
            }
            body = body
                .get(..body.len() - usize::from(padding))
                .unwrap_or_default();
        }
        let count = b0 & COUNT_MASK;
        let truncated = RtcpError::ReportTruncated { packet_type, count };
        let blocks_len = usize::from(count) * REPORT_BLOCK_BYTES;
        match packet_type {
            PT_SENDER_REPORT => {
                let (ssrc, rest) = body.split_first_chunk::<4>().ok_or(truncated.clone())?;
                let (info, rest) = rest
                    .split_first_chunk::<SENDER_INFO_BYTES>()
                    .ok_or(truncated.clone())?;
                let blocks = rest.get(..blocks_len).ok_or(truncated)?;
                Ok(RtcpPacket::SenderReport {
                    ssrc: u32::from_be_bytes(*ssrc),
                    info: parse_sender_info(info),
                    blocks: ReportBlocks { rest: blocks },
                })
            }
            PT_RECEIVER_REPORT => {
                let (ssrc, rest) = body.split_first_chunk::<4>().ok_or(truncated.clone())?;
                let blocks = rest.get(..blocks_len).ok_or(truncated)?;
                Ok(RtcpPacket::ReceiverReport {
                    ssrc: u32::from_be_bytes(*ssrc),
                    blocks: ReportBlocks { rest: blocks },
                })
            }
            PT_SOURCE_DESCRIPTION => Ok(RtcpPacket::SourceDescription(SdesChunks {
                rest: body,
                remaining: count,
            })),
            PT_GOODBYE => {
                let ssrc_bytes = body.get(..usize::from(count) * 4).ok_or(truncated)?;
                Ok(RtcpPacket::Goodbye { ssrc_bytes })
            }
            _ => Ok(RtcpPacket::Other {
                packet_type,
                count,
                body,
            }),
        }
    }
}

fn parse_sender_info(bytes: &[u8; SENDER_INFO_BYTES]) -> SenderInfo {
    let word = |i: usize| {
        bytes
            .get(i..i + 4)
            .and_then(|s| s.first_chunk::<4>())
            .map_or(0, |w| u32::from_be_bytes(*w))
    };
    SenderInfo {
        ntp_timestamp: (u64::from(word(0)) << 32) | u64::from(word(4)),
        rtp_timestamp: word(8),
        packet_count: word(12),
        octet_count: word(16),
    }
}

fn put_header(dst: &mut BytesMut, count: u8, packet_type: u8, total_bytes: usize) {
    let words = u16::try_from(total_bytes / 4 - 1).unwrap_or(u16::MAX);
    dst.put_u8((RTCP_VERSION << 6) | (count & COUNT_MASK));
    dst.put_u8(packet_type);
    dst.put_u16(words);
}

/// Appends a sender report from `ssrc` with at most one report block.
pub fn write_sender_report(
    dst: &mut BytesMut,
    ssrc: u32,
    info: &SenderInfo,
    block: Option<&ReportBlock>,
) {
    let count = u8::from(block.is_some());
    let total = 8 + SENDER_INFO_BYTES + usize::from(count) * REPORT_BLOCK_BYTES;
    dst.reserve(total);
    put_header(dst, count, PT_SENDER_REPORT, total);
    dst.put_u32(ssrc);
    dst.put_u64(info.ntp_timestamp);
    dst.put_u32(info.rtp_timestamp);
    dst.put_u32(info.packet_count);
    dst.put_u32(info.octet_count);
    if let Some(block) = block {
        block.write(dst);
    }
}

/// Appends a receiver report from `ssrc` with at most one report block.
pub fn write_receiver_report(dst: &mut BytesMut, ssrc: u32, block: Option<&ReportBlock>) {
    let count = u8::from(block.is_some());
    let total = 8 + usize::from(count) * REPORT_BLOCK_BYTES;
    dst.reserve(total);
    put_header(dst, count, PT_RECEIVER_REPORT, total);
    dst.put_u32(ssrc);
    if let Some(block) = block {
        block.write(dst);
    }
}

/// Appends an SDES packet with one chunk: `ssrc` and its CNAME (cut to 255 bytes).
pub fn write_sdes_cname(dst: &mut BytesMut, ssrc: u32, cname: &str) {
    let text = cname.as_bytes();
    let text = text.get(..MAX_CNAME_BYTES).unwrap_or(text);
    // SSRC, item type, item length, text, at least one null byte, padded to 32 bits.
    let chunk = (4 + 2 + text.len() + 1).div_ceil(4) * 4;
    let total = 4 + chunk;
    dst.reserve(total);
    put_header(dst, 1, PT_SOURCE_DESCRIPTION, total);
    dst.put_u32(ssrc);
    dst.put_u8(SDES_CNAME);
    dst.put_u8(u8::try_from(text.len()).unwrap_or(u8::MAX));
    dst.put_slice(text);
    dst.put_bytes(0, chunk - 4 - 2 - text.len());
}

/// Appends a BYE packet for `ssrc` (no reason text).
pub fn write_bye(dst: &mut BytesMut, ssrc: u32) {
    dst.reserve(8);
    put_header(dst, 1, PT_GOODBYE, 8);
    dst.put_u32(ssrc);
}

/// Appends a picture loss indication (PLI) from `sender_ssrc` about the stream `media_ssrc`:
/// the receiver asks for a key frame.
pub fn write_picture_loss(dst: &mut BytesMut, sender_ssrc: u32, media_ssrc: u32) {
    dst.reserve(12);
    put_header(dst, FMT_PICTURE_LOSS, PT_PAYLOAD_FEEDBACK, 12);
    dst.put_u32(sender_ssrc);
    dst.put_u32(media_ssrc);
}

/// Appends a full intra request (FIR, RFC 5104 section 4.3.1) from `sender_ssrc` asking the
/// sender of `media_ssrc` for a key frame; `sequence` goes up by one per new request.
pub fn write_full_intra_request(
    dst: &mut BytesMut,
    sender_ssrc: u32,
    media_ssrc: u32,
    sequence: u8,
) {
    dst.reserve(20);
    put_header(dst, FMT_FULL_INTRA_REQUEST, PT_PAYLOAD_FEEDBACK, 20);
    dst.put_u32(sender_ssrc);
    // The media source field is unused (section 4.3.1.2); the FCI names the stream.
    dst.put_u32(0);
    dst.put_u32(media_ssrc);
    dst.put_u8(sequence);
    dst.put_bytes(0, 3);
}

/// Whether a packet of a compound is a key frame request: a PLI or a FIR.
pub fn is_keyframe_request(packet: &RtcpPacket<'_>) -> bool {
    matches!(
        packet,
        RtcpPacket::Other {
            packet_type: PT_PAYLOAD_FEEDBACK,
            count: FMT_PICTURE_LOSS | FMT_FULL_INTRA_REQUEST,
            ..
        }
    )
}

/// The 64-bit NTP timestamp (seconds since 1900 in the high 32 bits, fraction in the low 32)
/// of a wall-clock time given as time since the Unix epoch. Wraps in 2036 as NTP does.
pub fn ntp_timestamp(since_unix_epoch: Duration) -> u64 {
    let secs = since_unix_epoch
        .as_secs()
        .wrapping_add(NTP_UNIX_OFFSET_SECS)
        & 0xffff_ffff;
    let fraction = (u64::from(since_unix_epoch.subsec_nanos()) << 32) / 1_000_000_000;
    (secs << 32) | fraction
}

/// The middle 32 bits of a 64-bit NTP timestamp (the LSR form, units of 1/65536 s).
pub fn ntp_middle(ntp: u64) -> u32 {
    (ntp >> 16) as u32
}

/// A duration in units of 1/65536 s (the DLSR form), saturating.
pub fn to_ntp_short(duration: Duration) -> u32 {
    let units = duration.as_nanos().saturating_mul(65_536) / 1_000_000_000;
    u32::try_from(units).unwrap_or(u32::MAX)
}

/// A duration from units of 1/65536 s.
pub fn from_ntp_short(units: u32) -> Duration {
    Duration::from_nanos(u64::from(units) * 1_000_000_000 / 65_536)
}

/// The round-trip time from a report block about us (RFC 3550 section 6.4.1): arrival time
/// minus LSR minus DLSR, all in the middle-32-bit NTP form. `None` when the peer has not yet
/// received a sender report from us (LSR 0) or the result is negative (clock steps).
pub fn round_trip(
    arrival_middle: u32,
    last_sender_report: u32,
    delay_since: u32,
) -> Option<Duration> {
    if last_sender_report == 0 {
        return None;
    }
    let rtt = arrival_middle
        .wrapping_sub(last_sender_report)
        .wrapping_sub(delay_since);
    if rtt > 0x8000_0000 {
        return None;
    }
    Some(from_ntp_short(rtt))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block() -> ReportBlock {
        ReportBlock {
            ssrc: 0x0102_0304,
            fraction_lost: 0x40,
            cumulative_lost: 5,
            highest_sequence: 0x0001_0010,
            jitter: 0x20,
            last_sender_report: 0xaabb_ccdd,
            delay_since_last_sender_report: 0x0001_8000,
        }
    }

    #[test]
    fn sender_report_byte_layout() {
        let mut dst = BytesMut::new();
        let info = SenderInfo {
            ntp_timestamp: 0x1122_3344_5566_7788,
            rtp_timestamp: 0x99aa_bbcc,
            packet_count: 7,
            octet_count: 1120,
        };
        write_sender_report(&mut dst, 0xdead_beef, &info, Some(&block()));
        assert_eq!(
            &dst[..],
            &[
                0x81, 200, 0, 12, // V=2 RC=1 PT=SR length 12 words (52 bytes)
                0xde, 0xad, 0xbe, 0xef, // sender SSRC
                0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, // NTP
                0x99, 0xaa, 0xbb, 0xcc, // RTP timestamp
                0, 0, 0, 7, // packets
                0, 0, 0x04, 0x60, // octets
                1, 2, 3, 4, // block SSRC
                0x40, 0, 0, 5, // fraction, cumulative lost
                0, 1, 0, 0x10, // highest sequence
                0, 0, 0, 0x20, // jitter
                0xaa, 0xbb, 0xcc, 0xdd, // LSR
                0, 1, 0x80, 0, // DLSR
            ][..]
        );
        let mut packets = parse_compound(&dst);
        match packets.next().unwrap().unwrap() {
            RtcpPacket::SenderReport {
                ssrc,
                info: parsed,
                blocks,
            } => {
                assert_eq!(ssrc, 0xdead_beef);
                assert_eq!(parsed, info);
                assert_eq!(blocks.collect::<Vec<_>>(), vec![block()]);
            }
            other => panic!("not an SR: {other:?}"),
        }
        assert!(packets.next().is_none());
    }

    #[test]
    fn receiver_report_without_and_with_block() {
        let mut dst = BytesMut::new();
        write_receiver_report(&mut dst, 9, None);
        assert_eq!(&dst[..], &[0x80, 201, 0, 1, 0, 0, 0, 9][..]);
        dst.clear();
        let negative = ReportBlock {
            cumulative_lost: -2,
            ..block()
        };
        write_receiver_report(&mut dst, 9, Some(&negative));
        assert_eq!(dst.len(), 32);
        assert_eq!(&dst[..4], &[0x81, 201, 0, 7]);
        assert_eq!(&dst[12..16], &[0x40, 0xff, 0xff, 0xfe]);
        match parse_compound(&dst).next().unwrap().unwrap() {
            RtcpPacket::ReceiverReport { ssrc, blocks } => {
                assert_eq!(ssrc, 9);
                assert_eq!(blocks.collect::<Vec<_>>(), vec![negative]);
            }
            other => panic!("not an RR: {other:?}"),
        }
    }

    #[test]
    fn cumulative_lost_is_clamped_to_24_bits() {
        let mut dst = BytesMut::new();
        let huge = ReportBlock {
            cumulative_lost: i32::MAX,
            ..block()
        };
        write_receiver_report(&mut dst, 1, Some(&huge));
        assert_eq!(&dst[12..16], &[0x40, 0x7f, 0xff, 0xff]);
        dst.clear();
        let tiny = ReportBlock {
            cumulative_lost: i32::MIN,
            ..block()
        };
        write_receiver_report(&mut dst, 1, Some(&tiny));
        assert_eq!(&dst[12..16], &[0x40, 0x80, 0x00, 0x00]);
        match parse_compound(&dst).next().unwrap().unwrap() {
            RtcpPacket::ReceiverReport { mut blocks, .. } => {
                assert_eq!(blocks.next().unwrap().cumulative_lost, -0x80_0000);
            }
            other => panic!("not an RR: {other:?}"),
        }
    }

    #[test]
    fn sdes_cname_layout_and_padding() {
        let mut dst = BytesMut::new();
        write_sdes_cname(&mut dst, 0x0a0b_0c0d, "ab");
        // header 4 + ssrc 4 + type 1 + len 1 + "ab" 2 + null, padded to 4 => 16 bytes.
        assert_eq!(
            &dst[..],
            &[0x81, 202, 0, 3, 0x0a, 0x0b, 0x0c, 0x0d, 1, 2, b'a', b'b', 0, 0, 0, 0][..]
        );
        for name in ["", "a", "abc", "abcd", "thalamus@192.0.2.1"] {
            let mut dst = BytesMut::new();
            write_sdes_cname(&mut dst, 7, name);
            assert_eq!(dst.len() % 4, 0);
            match parse_compound(&dst).next().unwrap().unwrap() {
                RtcpPacket::SourceDescription(mut chunks) => {
                    let chunk = chunks.next().unwrap().unwrap();
                    assert_eq!(chunk.ssrc, 7);
                    assert_eq!(chunk.cname, Some(name.as_bytes()));
                    assert!(chunks.next().is_none());
                }
                other => panic!("not SDES: {other:?}"),
            }
        }
        let long = "x".repeat(400);
        let mut dst = BytesMut::new();
        write_sdes_cname(&mut dst, 7, &long);
        match parse_compound(&dst).next().unwrap().unwrap() {
            RtcpPacket::SourceDescription(mut chunks) => {
                assert_eq!(chunks.next().unwrap().unwrap().cname.unwrap().len(), 255);
            }
            other => panic!("not SDES: {other:?}"),
        }
    }

    #[test]
    fn compound_packet_is_walked_in_order() {
        let mut dst = BytesMut::new();
        write_receiver_report(&mut dst, 1, Some(&block()));
        write_sdes_cname(&mut dst, 1, "peer");
        write_bye(&mut dst, 1);
        // An APP packet with padding (P bit, 4 bytes of body, 4 bytes of padding).
        dst.extend_from_slice(&[0xa0, 204, 0, 2, b'n', b'a', b'm', b'e', 0, 0, 0, 4]);
        let kinds: Vec<String> = parse_compound(&dst)
            .map(|p| match p.unwrap() {
                RtcpPacket::SenderReport { .. } => "SR".to_string(),
                RtcpPacket::ReceiverReport { .. } => "RR".to_string(),
                RtcpPacket::SourceDescription(_) => "SDES".to_string(),
                RtcpPacket::Goodbye { ssrc_bytes } => format!("BYE{}", ssrc_bytes.len()),
                RtcpPacket::Other {
                    packet_type, body, ..
                } => format!("{packet_type}:{}", body.len()),
            })
            .collect();
        assert_eq!(kinds, ["RR", "SDES", "BYE4", "204:4"]);
    }

    #[test]
    fn malformed_packets_are_errors_and_stop_the_walk() {
        assert_eq!(
            parse_compound(&[0x80, 201]).next().unwrap().unwrap_err(),
            RtcpError::TooShort { len: 2 }
        );
        assert_eq!(
            parse_compound(&[0x40, 201, 0, 1, 0, 0, 0, 1])
                .next()
                .unwrap()
                .unwrap_err(),
            RtcpError::BadVersion(1)
        );
        let mut packets = parse_compound(&[0x80, 201, 0, 5, 0, 0, 0, 1]);
        assert_eq!(
            packets.next().unwrap().unwrap_err(),
            RtcpError::BadLength {
                declared: 24,
                available: 8
            }
        );
        assert!(packets.next().is_none());
        // RC=1 but no room for the block.
        assert_eq!(
            parse_compound(&[0x81, 201, 0, 1, 0, 0, 0, 1])
                .next()
                .unwrap()
                .unwrap_err(),
            RtcpError::ReportTruncated {
                packet_type: 201,
                count: 1
            }
        );
        // SR too short for its sender info.
        assert!(parse_compound(&[0x80, 200, 0, 1, 0, 0, 0, 1])
            .next()
            .unwrap()
            .is_err());
        // Bad padding.
        assert_eq!(
            parse_compound(&[0xa0, 201, 0, 1, 0, 0, 0, 9])
                .next()
                .unwrap()
                .unwrap_err(),
            RtcpError::BadPadding(9)
        );
        // SDES item running past the end.
        let sdes = [0x81, 202, 0, 2, 0, 0, 0, 1, 1, 20, b'a', b'b'];
        match parse_compound(&sdes).next().unwrap().unwrap() {
            RtcpPacket::SourceDescription(mut chunks) => {
                assert_eq!(chunks.next().unwrap(), Err(RtcpError::SdesTruncated));
                assert!(chunks.next().is_none());
            }
            other => panic!("not SDES: {other:?}"),
        }
        // Truncations of a valid compound never panic.
        let mut dst = BytesMut::new();
        write_sender_report(&mut dst, 1, &SenderInfo::default(), Some(&block()));
        write_sdes_cname(&mut dst, 1, "peer");
        for len in 0..dst.len() {
            for packet in parse_compound(&dst[..len]) {
                if let Ok(RtcpPacket::SourceDescription(chunks)) = packet {
                    chunks.for_each(drop);
                }
            }
        }
    }

    #[test]
    fn ntp_conversions() {
        assert_eq!(ntp_timestamp(Duration::ZERO), NTP_UNIX_OFFSET_SECS << 32);
        let half = ntp_timestamp(Duration::from_millis(1500));
        assert_eq!(half >> 32, NTP_UNIX_OFFSET_SECS + 1);
        assert_eq!(half & 0xffff_ffff, 0x8000_0000);
        assert_eq!(ntp_middle(0x1122_3344_5566_7788), 0x3344_5566);
        assert_eq!(to_ntp_short(Duration::from_millis(500)), 0x8000);
        assert_eq!(to_ntp_short(Duration::from_secs(1 << 20)), u32::MAX);
        assert_eq!(from_ntp_short(0x0001_8000), Duration::from_millis(1500));
    }

    #[test]
    fn round_trip_from_lsr_and_dlsr() {
        // RFC 3550 figure 2: A = 0xb710:8000 (46864.5 s), LSR = 0xb705:2000 (46853.125 s),
        // DLSR = 0x0005:4000 (5.25 s) => RTT 6.125 s.
        let rtt = round_trip(0xb710_8000, 0xb705_2000, 0x0005_4000).unwrap();
        assert_eq!(rtt, Duration::from_millis(6125));
        assert_eq!(round_trip(0xb710_8000, 0, 0x0005_4000), None);
        // Negative (the peer's delay exceeds the elapsed time).
        assert_eq!(round_trip(0x0000_1000, 0x0000_0800, 0x0000_1000), None);
    }
}
