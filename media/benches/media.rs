//! Per-packet cost of the media relay core (no sockets): device datagram -> RTP, and
//! RTP -> device datagram, each including the parse, the translation, the build and the poll
//! that hands the result to the shell. Also the bare RTP parse and media header decode.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use thalamus_media::relay::{RelayCore, RelaySettings};
use thalamus_media::rtp::{RtpHeader, RtpPacket};
use thalamus_proto::media::{MediaDatagram, MediaHeader, StreamId};
use thalamus_sip::sdp::{Codec, Direction, MediaKind, RemoteMedia};

const CALL_REF: u32 = 7;
const PAYLOAD: [u8; 160] = [0x55; 160];

fn peer_addr() -> SocketAddr {
    "127.0.0.1:30000".parse().unwrap()
}

fn core(now: Instant) -> RelayCore {
    let mut settings = RelaySettings::new(CALL_REF, StreamId::AUDIO);
    settings.media_timeout = None;
    settings.rtcp_interval = None;
    let mut core = RelayCore::new(settings, now);
    core.set_remote_media(
        &RemoteMedia {
            kind: MediaKind::Audio,
            index: 0,
            rtp: peer_addr(),
            rtcp: "127.0.0.1:30001".parse().unwrap(),
            direction: Direction::SendRecv,
            codecs: vec![Codec::pcmu(), Codec::opus(96)],
            telephone_event: Some(Codec::telephone_event(101, 8000)),
            ptime: Some(20),
            crypto: Vec::new(),
        },
        now,
    );
    core
}

fn device_datagram(sequence: u16) -> Bytes {
    MediaHeader {
        marker: false,
        payload_type: 0,
        sequence,
        timestamp: u32::from(sequence) * 160,
        call_ref: CALL_REF,
        stream_id: StreamId::AUDIO,
    }
    .to_bytes(&PAYLOAD)
    .unwrap()
}

fn rtp_packet(sequence: u16) -> Vec<u8> {
    let mut dst = BytesMut::new();
    RtpHeader {
        marker: false,
        payload_type: 0,
        sequence,
        timestamp: u32::from(sequence) * 160,
        ssrc: 0x1234_5678,
    }
    .encode(&PAYLOAD, &mut dst)
    .unwrap();
    dst.to_vec()
}

fn bench_relay(c: &mut Criterion) {
    let mut group = c.benchmark_group("media_relay");
    group.throughput(Throughput::Elements(1));

    // Pre-built inputs, cycled so the sequence tracking sees a realistic in-order stream.
    let datagrams: Vec<Bytes> = (0..1024u16).map(device_datagram).collect();
    let packets: Vec<Vec<u8>> = (0..1024u16).map(rtp_packet).collect();

    group.bench_function("device_to_rtp", |b| {
        let start = Instant::now();
        let mut core = core(start);
        let mut i = 0usize;
        b.iter(|| {
            let datagram = datagrams[i % datagrams.len()].clone();
            i += 1;
            let now = start + Duration::from_millis(20 * i as u64);
            core.handle_device_datagram(datagram, now);
            black_box(core.poll_transmit())
        });
        assert_eq!(core.stats().drops.transmit_overflow, 0);
    });

    group.bench_function("rtp_to_device", |b| {
        let start = Instant::now();
        let mut core = core(start);
        let source = peer_addr();
        let mut i = 0usize;
        b.iter(|| {
            let packet = &packets[i % packets.len()];
            i += 1;
            let now = start + Duration::from_millis(20 * i as u64);
            core.handle_rtp(packet, source, now);
            black_box(core.poll_device_datagram())
        });
        assert_eq!(core.stats().drops.device_buffer_overflow, 0);
    });

    group.bench_function("rtp_parse", |b| {
        let packet = &packets[0];
        b.iter(|| black_box(RtpPacket::parse(black_box(packet)).unwrap().payload.len()));
    });

    group.bench_function("media_datagram_decode", |b| {
        let datagram = datagrams[0].clone();
        b.iter(|| black_box(MediaDatagram::decode(black_box(datagram.clone())).unwrap()));
    });
    group.finish();
}

criterion_group!(benches, bench_relay);
criterion_main!(benches);
