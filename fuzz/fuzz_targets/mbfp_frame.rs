//! Fuzz target `mbfp_frame`: arbitrary bytes as a device's control stream, read with the MBFP
//! frame decoder (`thalamus_proto::FrameDecoder`, 4-byte length + protobuf `Envelope`), and the
//! same bytes as a media datagram (`MediaDatagram::decode`).
//!
//! Checks: the decoder never panics and only ever consumes whole frames (never more than the
//! buffer); every envelope it yields re-encodes into a frame that decodes to an equal envelope
//! and re-encodes to the same bytes (prost's encoding is canonical); a decoded media datagram
//! re-encodes to one that decodes to the same header and payload. It does not check that
//! envelopes make sense to a session (sessions do that).
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use thalamus_proto::{frame_bytes, FrameDecoder, FrameError, MediaDatagram};

/// A small maximum as well as the default, so that both the size check and big bodies run.
const SMALL_MAX: usize = 256;

fn round_trip(envelope: &thalamus_proto::v1::Envelope, max: usize) {
    let _ = thalamus_proto::body_kind(envelope.body.as_ref());
    let frame = match frame_bytes(envelope, max) {
        Ok(f) => f,
        // Re-encoding can differ in size from the received body (e.g. non-minimal varints or
        // default values written explicitly on the wire); too large is an allowed answer.
        Err(FrameError::TooLarge { .. }) => return,
        Err(e) => panic!("encoding a decoded envelope failed: {e}"),
    };
    let mut buf = frame.clone();
    match FrameDecoder::new(max).decode(&mut buf) {
        Ok(Some(again)) => {
            assert_eq!(&again, envelope, "envelope changed in a round trip");
            assert!(buf.is_empty(), "re-encoded frame not consumed whole");
            match frame_bytes(&again, max) {
                Ok(f2) => assert_eq!(f2, frame, "envelope encoding is not stable"),
                Err(e) => panic!("re-encoding failed: {e}"),
            }
        }
        Ok(None) => panic!("re-encoded frame is incomplete"),
        Err(e) => panic!("re-encoded frame does not decode: {e}"),
    }
}

fn read_stream(data: &[u8], max: usize) {
    let decoder = FrameDecoder::new(max);
    let mut buf = BytesMut::from(data);
    // Each successful step consumes at least the 4-byte prefix, so this ends.
    loop {
        let before = buf.len();
        let checked = decoder.check(&buf);
        match decoder.decode(&mut buf) {
            Ok(Some(envelope)) => {
                let Ok(Some(len)) = checked else {
                    panic!("check and decode disagree");
                };
                assert_eq!(
                    before - buf.len(),
                    4 + len,
                    "decode consumed the wrong length"
                );
                round_trip(&envelope, max);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "an incomplete frame was consumed");
                break;
            }
            Err(FrameError::Decode(_)) => {
                // The bad frame was consumed: the stream stays aligned.
                assert!(buf.len() < before, "a bad frame was not consumed");
            }
            Err(FrameError::TooLarge { .. }) => break,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    read_stream(data, thalamus_proto::DEFAULT_MAX_FRAME_BYTES);
    read_stream(data, SMALL_MAX);

    if let Ok(datagram) = MediaDatagram::decode(Bytes::copy_from_slice(data)) {
        let _ = datagram.header.stream_id.is_known();
        let bytes = match datagram.to_bytes() {
            Ok(b) => b,
            Err(e) => panic!("a decoded media header does not encode: {e}"),
        };
        match MediaDatagram::decode(bytes) {
            Ok(again) => assert_eq!(again, datagram, "media datagram changed in a round trip"),
            Err(e) => panic!("re-encoded media datagram does not decode: {e}"),
        }
    }
});
