//! The byte examples printed in docs/protocol.md, checked against the codecs so the reference
//! cannot drift from the implementation.

// Test helpers outside #[test] functions may unwrap too: a failure here is a test failure.
#![allow(clippy::unwrap_used)]

use bytes::BytesMut;
use thalamus_proto::media::{MediaDatagram, MediaHeader, StreamId};
use thalamus_proto::v1::{envelope::Body, Envelope, Hello, Ping, Pong};
use thalamus_proto::{frame_bytes, FrameDecoder, DEFAULT_MAX_FRAME_BYTES};

fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

fn check_frame(env: Envelope, doc_hex: &str) {
    let wire = frame_bytes(&env, DEFAULT_MAX_FRAME_BYTES).unwrap();
    assert_eq!(&wire[..], &hex(doc_hex)[..]);
    let mut buf = BytesMut::from(&hex(doc_hex)[..]);
    assert_eq!(FrameDecoder::default().decode(&mut buf).unwrap(), Some(env));
}

#[test]
fn hello_frame_example() {
    let env = Envelope {
        request_id: 1,
        body: Some(Body::Hello(Hello {
            device_id: "dev-1".into(),
            credential: "s3cret".into(),
            ..Default::default()
        })),
    };
    check_frame(
        env,
        "00 00 00 13 08 01 52 0f 0a 05 64 65 76 2d 31 12 06 73 33 63 72 65 74",
    );
}

#[test]
fn ping_and_pong_frame_examples() {
    let ping = Envelope {
        request_id: 2,
        body: Some(Body::Ping(Ping { nonce: 42 })),
    };
    check_frame(ping, "00 00 00 06 08 02 72 02 08 2a");
    let pong = Envelope {
        request_id: 2,
        body: Some(Body::Pong(Pong { nonce: 42 })),
    };
    check_frame(pong, "00 00 00 06 08 02 7a 02 08 2a");
}

#[test]
fn media_header_example() {
    let header = MediaHeader {
        marker: true,
        payload_type: 111,
        sequence: 1,
        timestamp: 960,
        call_ref: 1,
        stream_id: StreamId::AUDIO,
    };
    let doc = hex("60 6f 00 01 00 00 03 c0 00 00 00 01 00 aa bb");
    assert_eq!(&header.to_bytes(&[0xaa, 0xbb]).unwrap()[..], &doc[..]);
    let decoded = MediaDatagram::decode(doc.into()).unwrap();
    assert_eq!(decoded.header, header);
    assert_eq!(&decoded.payload[..], &[0xaa, 0xbb]);
}
