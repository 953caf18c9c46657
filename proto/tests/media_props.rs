//! Property tests of the media datagram header: round trips, byte-exact re-encoding, the
//! payload budget helper, and arbitrary bytes never panicking the decoder.

// Test helpers outside #[test] functions may unwrap too: a failure here is a test failure.
#![allow(clippy::unwrap_used)]

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use thalamus_proto::media::{
    max_payload_bytes, MediaDatagram, MediaError, MediaHeader, StreamId, HEADER_BYTES,
    MAX_PAYLOAD_TYPE, MEDIA_VERSION,
};

fn header() -> impl Strategy<Value = MediaHeader> {
    (
        any::<bool>(),
        0u8..=MAX_PAYLOAD_TYPE,
        any::<u16>(),
        any::<u32>(),
        any::<u32>(),
        any::<u8>(),
    )
        .prop_map(
            |(marker, payload_type, sequence, timestamp, call_ref, stream)| MediaHeader {
                marker,
                payload_type,
                sequence,
                timestamp,
                call_ref,
                stream_id: StreamId(stream),
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn header_and_payload_round_trip(h in header(), payload in vec(any::<u8>(), 0..1400)) {
        let bytes = h.to_bytes(&payload).unwrap();
        prop_assert_eq!(bytes.len(), HEADER_BYTES + payload.len());
        let decoded = MediaDatagram::decode(bytes).unwrap();
        prop_assert_eq!(decoded.header, h);
        prop_assert_eq!(&decoded.payload[..], &payload[..]);
    }

    #[test]
    fn encode_appends_and_decode_of_the_tail_round_trips(
        h in header(),
        prefix in vec(any::<u8>(), 0..16),
        payload in vec(any::<u8>(), 0..64),
    ) {
        let mut dst = BytesMut::from(&prefix[..]);
        h.encode(&payload, &mut dst).unwrap();
        let all = dst.freeze();
        prop_assert_eq!(&all[..prefix.len()], &prefix[..]);
        let decoded = MediaDatagram::decode(all.slice(prefix.len()..)).unwrap();
        prop_assert_eq!(decoded.header, h);
        prop_assert_eq!(&decoded.payload[..], &payload[..]);
    }

    #[test]
    fn payload_type_above_7_bits_is_refused(h in header(), pt in 128u8..) {
        let bad = MediaHeader { payload_type: pt, ..h };
        prop_assert_eq!(bad.to_bytes(b""), Err(MediaError::PayloadTypeOutOfRange(pt)));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..64)) {
        let len = bytes.len();
        let first = bytes.first().copied();
        match MediaDatagram::decode(Bytes::from(bytes.clone())) {
            Ok(d) => {
                prop_assert!(len >= HEADER_BYTES);
                prop_assert_eq!(d.payload.len(), len - HEADER_BYTES);
                prop_assert_eq!(first.map(|b| b >> 6), Some(MEDIA_VERSION));
                // Re-encoding reproduces the input except for the reserved bits.
                let again = d.to_bytes().unwrap();
                let mut expected = bytes;
                expected[0] &= 0xe0;
                expected[1] &= 0x7f;
                prop_assert_eq!(&again[..], &expected[..]);
            }
            Err(MediaError::TooShort { len: l }) => {
                prop_assert_eq!(l, len);
                prop_assert!(len < HEADER_BYTES);
            }
            Err(MediaError::BadVersion(v)) => {
                prop_assert!(len >= HEADER_BYTES);
                prop_assert_ne!(v, MEDIA_VERSION);
                prop_assert_eq!(first.map(|b| b >> 6), Some(v));
            }
            Err(other) => prop_assert!(false, "decode returned {:?}", other),
        }
    }

    #[test]
    fn max_payload_fills_the_datagram_exactly(h in header(), limit in 0usize..2048) {
        let budget = max_payload_bytes(limit);
        let payload = vec![0u8; budget];
        let bytes = h.to_bytes(&payload).unwrap();
        if limit >= HEADER_BYTES {
            prop_assert_eq!(bytes.len(), limit);
        } else {
            prop_assert_eq!(budget, 0);
        }
    }
}
