//! Per-packet cost of the media relay core (no sockets): device datagram -> RTP, and
//! RTP -> device datagram, each including the parse, the translation, the build and the poll
//! that hands the result to the shell. Also the bare RTP parse and media header decode, and
//! the same paths with SRTP (each suite the gateway offers): device datagram -> SRTP, and a
//! round trip through two relays facing each other (device -> (S)RTP -> device), plain and
//! keyed, so the cost of SRTP per packet reads off one run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use thalamus_media::relay::{RelayCore, RelaySettings, RemotePeer, SrtpKeys};
use thalamus_media::rtp::{RtpHeader, RtpPacket};
use thalamus_proto::media::{MediaDatagram, MediaHeader, StreamId};
use thalamus_sip::sdp::{Codec, CryptoSuite, Direction, MediaKind, RemoteMedia};

const CALL_REF: u32 = 7;
const PAYLOAD: [u8; 160] = [0x55; 160];

fn peer_addr() -> SocketAddr {
    "127.0.0.1:30000".parse().unwrap()
}

fn core(now: Instant) -> RelayCore {
    keyed_core(now, None)
}

/// A relay whose peer is at 127.0.0.1:30000, with SRTP keys or plain.
fn keyed_core(now: Instant, srtp: Option<SrtpKeys>) -> RelayCore {
    let mut settings = RelaySettings::new(CALL_REF, StreamId::AUDIO);
    settings.media_timeout = None;
    settings.rtcp_interval = None;
    let mut core = RelayCore::new(settings, now);
    core.set_peer(
        RemotePeer::from_remote_media(&RemoteMedia {
            kind: MediaKind::Audio,
            index: 0,
            rtp: peer_addr(),
            rtcp: "127.0.0.1:30001".parse().unwrap(),
            rtcp_mux: false,
            direction: Direction::SendRecv,
            codecs: vec![Codec::pcmu(), Codec::opus(96)],
            telephone_event: Some(Codec::telephone_event(101, 8000)),
            ptime: Some(20),
            crypto: Vec::new(),
            feedback: Default::default(),
        })
        .with_srtp(srtp),
        now,
    );
    core
}

/// Keys for a relay and the one facing it (`flip`: the other side's view).
fn keys(suite: CryptoSuite, flip: bool) -> SrtpKeys {
    let (key, salt) = suite.key_and_salt_len();
    let (a, b) = (vec![1u8; key + salt], vec![2u8; key + salt]);
    let (local, remote) = if flip { (b, a) } else { (a, b) };
    SrtpKeys {
        suite,
        local,
        remote,
    }
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

    let suites = [
        ("aes_cm_128_hmac_sha1_80", CryptoSuite::AesCm128HmacSha1_80),
        ("aead_aes_128_gcm", CryptoSuite::AeadAes128Gcm),
    ];
    // Device datagram -> RTP, plain and with each suite.
    for (id, suite) in [("device_to_rtp".to_string(), None)]
        .into_iter()
        .chain(suites.map(|(name, suite)| (format!("device_to_srtp_{name}"), Some(suite))))
    {
        group.bench_function(id, |b| {
            let start = Instant::now();
            let mut core = keyed_core(start, suite.map(|s| keys(s, false)));
            let mut i = 0usize;
            b.iter(|| {
                let datagram = datagrams[i % datagrams.len()].clone();
                i += 1;
                let now = start + Duration::from_millis(20 * i as u64);
                core.handle_device_datagram(datagram, now);
                black_box(core.poll_transmit())
            });
            let drops = core.stats().drops;
            assert_eq!((drops.transmit_overflow, drops.srtp_protect_failed), (0, 0));
        });
    }
    for (name, suite) in [("plain", None)]
        .into_iter()
        .chain(suites.map(|(name, suite)| (name, Some(suite))))
    {
        // Device -> relay A -> (S)RTP -> relay B -> device: both halves of a relayed packet.
        group.bench_function(format!("round_trip_{name}"), |b| {
            let start = Instant::now();
            let mut a = keyed_core(start, suite.map(|s| keys(s, false)));
            let mut z = keyed_core(start, suite.map(|s| keys(s, true)));
            let source = peer_addr();
            let mut i = 0usize;
            b.iter(|| {
                let datagram = datagrams[i % datagrams.len()].clone();
                i += 1;
                let now = start + Duration::from_millis(20 * i as u64);
                a.handle_device_datagram(datagram, now);
                if let Some(sent) = a.poll_transmit() {
                    z.handle_rtp(&sent.packet, source, now);
                }
                black_box(z.poll_device_datagram())
            });
            let drops = z.stats().drops;
            assert_eq!(drops.srtp_auth_failed + drops.srtp_replayed, 0);
            assert!(z.stats().to_device.packets > 0);
        });
    }

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
