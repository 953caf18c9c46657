//! Fuzz target `rtp`: arbitrary bytes as a received RTP packet (`RtpPacket::parse`) and its
//! payload as an RFC 4733 telephone event (`TelephoneEvent::parse`); also the RTCP-mux
//! demultiplexing test (`is_rtcp_packet`).
//!
//! Checks: nothing panics; the parsed parts lie inside the packet in order (CSRC list,
//! extension, payload, padding) and add up to its length; re-encoding the header with the
//! payload gives a packet that parses to the same header and payload, byte-identical when the
//! input had no CSRC, extension or padding; a telephone event's 4 bytes re-encode to the same
//! event. It does not check jitter or sequence handling (the relay tests do).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use thalamus_media::rtp::{
    is_rtcp_packet, RtpPacket, TelephoneEvent, RTP_FIXED_HEADER_BYTES, TELEPHONE_EVENT_BYTES,
};

fuzz_target!(|data: &[u8]| {
    let _ = is_rtcp_packet(data);
    if let Some(event) = data.first_chunk::<TELEPHONE_EVENT_BYTES>() {
        check_event(event);
    }
    let Ok(packet) = RtpPacket::parse(data) else {
        return;
    };
    let ext_len = packet.extension.map_or(0, |e| 4 + e.data.len());
    assert_eq!(packet.csrc_count() * 4, packet.csrc_bytes.len());
    assert_eq!(packet.csrcs().count(), packet.csrc_count());
    assert_eq!(
        packet.payload_offset,
        RTP_FIXED_HEADER_BYTES + packet.csrc_bytes.len() + ext_len,
        "payload offset"
    );
    assert_eq!(
        packet.payload_offset + packet.payload.len() + usize::from(packet.padding),
        data.len(),
        "parts do not add up to the packet"
    );
    assert_eq!(
        data.get(packet.payload_offset..packet.payload_offset + packet.payload.len()),
        Some(packet.payload),
        "payload is not where the offset says"
    );

    let mut out = BytesMut::new();
    if let Err(e) = packet.header.encode(packet.payload, &mut out) {
        panic!("a parsed header does not encode: {e}");
    }
    match RtpPacket::parse(&out) {
        Ok(again) => {
            assert_eq!(
                again.header, packet.header,
                "header changed in a round trip"
            );
            assert_eq!(
                again.payload, packet.payload,
                "payload changed in a round trip"
            );
        }
        Err(e) => panic!("re-encoded packet does not parse: {e}"),
    }
    if packet.csrc_bytes.is_empty() && packet.extension.is_none() && packet.padding == 0 {
        // P, X and CC are clear, so byte 0 is 0x80 as the encoder writes it.
        assert_eq!(&out[..], data, "plain packet not re-encoded byte for byte");
    }
    if let Some(event) = packet.payload.first_chunk::<TELEPHONE_EVENT_BYTES>() {
        check_event(event);
    }
});

fn check_event(bytes: &[u8; TELEPHONE_EVENT_BYTES]) {
    let event = match TelephoneEvent::parse(bytes) {
        Ok(e) => e,
        Err(e) => panic!("4 bytes are not a telephone event: {e}"),
    };
    assert_eq!(
        TelephoneEvent::parse(&event.to_bytes()),
        Ok(event),
        "telephone event changed in a round trip"
    );
    // The reserved bit (0x40 of byte 1) is the only thing the encoder drops.
    let mut expected = *bytes;
    expected[1] &= !0x40;
    assert_eq!(event.to_bytes(), expected, "telephone event bytes");
}
