//! Criterion benchmarks of the sans-IO codecs: control-stream frames (encode, decode) and media
//! datagram headers (encode, decode). No sockets: this measures only the codecs.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use thalamus_proto::media::{MediaDatagram, MediaHeader, StreamId};
use thalamus_proto::v1::{envelope::Body, CallEvent, Dial, Envelope, MediaOffer, Ping};
use thalamus_proto::{encode_frame, FrameDecoder, DEFAULT_MAX_FRAME_BYTES};

fn sample_envelopes() -> Vec<(&'static str, Envelope)> {
    vec![
        (
            "ping",
            Envelope {
                request_id: 42,
                body: Some(Body::Ping(Ping { nonce: 7 })),
            },
        ),
        (
            "dial",
            Envelope {
                request_id: 43,
                body: Some(Body::Dial(Dial {
                    call_ref: 1,
                    target: "sip:alice@example.com".into(),
                    media: Some(MediaOffer {
                        audio_codecs: vec![4, 1, 2, 5],
                        video_codecs: vec![],
                        remote_sdp: String::new(),
                        signal: false,
                    }),
                    headers: [("X-Device-Mood".to_string(), "calm".to_string())]
                        .into_iter()
                        .collect(),
                })),
            },
        ),
        (
            "call_event",
            Envelope {
                request_id: 0,
                body: Some(Body::CallEvent(CallEvent {
                    call_ref: 1,
                    state: 4,
                    sip_status: 200,
                    reason: "OK".into(),
                    ..Default::default()
                })),
            },
        ),
    ]
}

fn frame_codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    for (name, env) in sample_envelopes() {
        let mut wire = BytesMut::new();
        if encode_frame(&env, DEFAULT_MAX_FRAME_BYTES, &mut wire).is_err() {
            continue;
        }
        let wire = wire.freeze();
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_function(format!("encode/{name}"), |b| {
            let mut dst = BytesMut::with_capacity(1024);
            b.iter(|| {
                dst.clear();
                let _ = encode_frame(black_box(&env), DEFAULT_MAX_FRAME_BYTES, &mut dst);
                black_box(dst.len())
            })
        });
        let decoder = FrameDecoder::default();
        group.bench_function(format!("decode/{name}"), |b| {
            b.iter(|| {
                let mut buf = BytesMut::from(black_box(&wire[..]));
                black_box(decoder.decode(&mut buf).ok().flatten())
            })
        });
    }
    group.finish();
}

fn media_codec(c: &mut Criterion) {
    let header = MediaHeader {
        marker: false,
        payload_type: 111,
        sequence: 1000,
        timestamp: 160_000,
        call_ref: 1,
        stream_id: StreamId::AUDIO,
    };
    let payload = vec![0x55u8; 160];
    let mut group = c.benchmark_group("media");
    group.throughput(Throughput::Bytes(payload.len() as u64));
    group.bench_function("encode/160B", |b| {
        let mut dst = BytesMut::with_capacity(2048);
        b.iter(|| {
            dst.clear();
            let _ = black_box(&header).encode(black_box(&payload), &mut dst);
            black_box(dst.len())
        })
    });
    let datagram: Bytes = header.to_bytes(&payload).unwrap_or_default();
    group.bench_function("decode/160B", |b| {
        b.iter(|| black_box(MediaDatagram::decode(black_box(datagram.clone())).ok()))
    });
    group.finish();
}

criterion_group!(benches, frame_codec, media_codec);
criterion_main!(benches);
