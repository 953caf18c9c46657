//! Fuzz target `rtcp`: arbitrary bytes as a received compound RTCP packet (`parse_compound`),
//! walking every packet, report block and SDES chunk, and feeding the report fields to the
//! round-trip-time arithmetic (`round_trip`, `from_ntp_short`).
//!
//! Checks: nothing panics and the walk ends (the iterators stop after an error); each sender
//! report, receiver report, SDES CNAME and BYE re-encoded with the writers this gateway uses
//! (first report block, first chunk, first SSRC) parses back to the same fields. It does not
//! check report scheduling or statistics (the relay tests do).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use thalamus_media::rtcp::{
    from_ntp_short, ntp_middle, ntp_timestamp, parse_compound, round_trip, write_bye,
    write_receiver_report, write_sdes_cname, write_sender_report, ReportBlock, RtcpPacket,
    SenderInfo,
};

/// The one packet `bytes` holds, or a panic.
fn only_packet(bytes: &[u8]) -> RtcpPacket<'_> {
    let mut packets = parse_compound(bytes);
    let first = match packets.next() {
        Some(Ok(p)) => p,
        Some(Err(e)) => panic!("a written packet does not parse: {e}"),
        None => panic!("a written packet parses to nothing"),
    };
    assert!(
        packets.next().is_none(),
        "one written packet parsed as several"
    );
    first
}

fn check_block(block: &ReportBlock) {
    let _ = round_trip(
        block.last_sender_report.wrapping_add(block.jitter),
        block.last_sender_report,
        block.delay_since_last_sender_report,
    );
    let _ = from_ntp_short(block.delay_since_last_sender_report);
}

fn sender_report(ssrc: u32, info: &SenderInfo, block: Option<ReportBlock>) {
    let _ = ntp_middle(info.ntp_timestamp);
    let mut out = BytesMut::new();
    write_sender_report(&mut out, ssrc, info, block.as_ref());
    match only_packet(&out) {
        RtcpPacket::SenderReport {
            ssrc: s,
            info: i,
            mut blocks,
        } => {
            assert_eq!((s, &i), (ssrc, info), "sender report changed");
            assert_eq!(blocks.next(), block, "report block changed");
            assert!(blocks.next().is_none(), "extra report block");
        }
        other => panic!("a sender report parsed as {other:?}"),
    }
}

fn receiver_report(ssrc: u32, block: Option<ReportBlock>) {
    let mut out = BytesMut::new();
    write_receiver_report(&mut out, ssrc, block.as_ref());
    match only_packet(&out) {
        RtcpPacket::ReceiverReport {
            ssrc: s,
            mut blocks,
        } => {
            assert_eq!(s, ssrc, "receiver report changed");
            assert_eq!(blocks.next(), block, "report block changed");
            assert!(blocks.next().is_none(), "extra report block");
        }
        other => panic!("a receiver report parsed as {other:?}"),
    }
}

fn sdes(ssrc: u32, cname: &str) {
    let mut out = BytesMut::new();
    write_sdes_cname(&mut out, ssrc, cname);
    match only_packet(&out) {
        RtcpPacket::SourceDescription(mut chunks) => match chunks.next() {
            Some(Ok(chunk)) => {
                assert_eq!(chunk.ssrc, ssrc, "SDES SSRC changed");
                assert_eq!(chunk.cname, Some(cname.as_bytes()), "CNAME changed");
                assert!(chunks.next().is_none(), "extra SDES chunk");
            }
            other => panic!("a written SDES chunk parsed as {other:?}"),
        },
        other => panic!("an SDES packet parsed as {other:?}"),
    }
}

fn bye(ssrc: u32) {
    let mut out = BytesMut::new();
    write_bye(&mut out, ssrc);
    match only_packet(&out) {
        RtcpPacket::Goodbye { ssrc_bytes } => {
            assert_eq!(ssrc_bytes, ssrc.to_be_bytes(), "BYE SSRC changed")
        }
        other => panic!("a BYE parsed as {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    // Each item consumes at least the 4-byte header and the walk stops after an error, so the
    // number of items is bounded by the input.
    let mut items = 0usize;
    for packet in parse_compound(data) {
        items += 1;
        assert!(items <= data.len() / 4 + 1, "the walk does not end");
        let Ok(packet) = packet else {
            continue;
        };
        match packet {
            RtcpPacket::SenderReport { ssrc, info, blocks } => {
                let first = blocks.clone().next();
                blocks.for_each(|b| check_block(&b));
                sender_report(ssrc, &info, first);
            }
            RtcpPacket::ReceiverReport { ssrc, blocks } => {
                let first = blocks.clone().next();
                blocks.for_each(|b| check_block(&b));
                receiver_report(ssrc, first);
            }
            RtcpPacket::SourceDescription(chunks) => {
                for chunk in chunks.take(32).flatten() {
                    match chunk.cname.map(std::str::from_utf8) {
                        Some(Ok(cname)) => sdes(chunk.ssrc, cname),
                        _ => bye(chunk.ssrc),
                    }
                }
            }
            RtcpPacket::Goodbye { ssrc_bytes } => {
                if let Some(first) = ssrc_bytes.first_chunk::<4>() {
                    bye(u32::from_be_bytes(*first));
                }
            }
            RtcpPacket::Other { .. } => {}
        }
    }
    if let Some(word) = data.first_chunk::<8>() {
        let secs = u64::from_be_bytes(*word);
        let _ = ntp_timestamp(Duration::new(secs, 0));
    }
});
