#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Relay lifecycle: many relays started and stopped (or dropped) leave no port pair in use and
//! no relay task alive.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use thalamus_media::{
    DatagramError, DatagramSink, FeedError, MediaConfig, MediaEngine, RelayError, RelaySpec,
};
use thalamus_sip::sdp::{Codec, Direction, MediaKind, RemoteMedia};
use tokio::time::timeout;

struct NullSink;

impl DatagramSink for NullSink {
    fn send_datagram(&self, _datagram: Bytes) -> Result<(), DatagramError> {
        Ok(())
    }
}

/// The first even port `p` in 46000..60000 such that `p..p + len` can all be bound on loopback.
fn free_even_range(len: u16) -> u16 {
    (46_000u16..60_000)
        .step_by(2)
        .find(|p| {
            let sockets: Vec<_> = (*p..*p + len)
                .map(|port| std::net::UdpSocket::bind(("127.0.0.1", port)))
                .collect();
            sockets.iter().all(Result::is_ok)
        })
        .expect("a free port range")
}

fn engine(port_min: u16, port_max: u16) -> MediaEngine {
    MediaEngine::new(MediaConfig {
        address: "127.0.0.1".parse().unwrap(),
        rtp_port_min: port_min,
        rtp_port_max: port_max,
        ..MediaConfig::default()
    })
    .unwrap()
}

fn remote(port: u16) -> RemoteMedia {
    RemoteMedia {
        kind: MediaKind::Audio,
        index: 0,
        rtp: ([127, 0, 0, 1], port).into(),
        rtcp: ([127, 0, 0, 1], port + 1).into(),
        rtcp_mux: false,
        direction: Direction::SendRecv,
        codecs: vec![Codec::pcmu()],
        telephone_event: None,
        ptime: None,
        crypto: Vec::new(),
        feedback: Default::default(),
    }
}

async fn wait_until_idle(engine: &MediaEngine) {
    timeout(Duration::from_secs(20), async {
        while engine.live_relays() > 0 || engine.ports_in_use() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_relays_started_and_stopped_leave_nothing_behind() {
    let engine = engine(44_000, 44_999); // 500 pairs: more relays than pairs over the run
    let sink: Arc<dyn DatagramSink> = Arc::new(NullSink);
    let mut started = 0u32;
    while started < 1_000 {
        // 100 alive at once, half of them with a peer (so a final RTCP report and BYE go out).
        let mut relays = Vec::new();
        for _ in 0..100 {
            let relay = engine
                .start(RelaySpec::audio(started), Arc::clone(&sink))
                .unwrap();
            if started.is_multiple_of(2) {
                relay.set_remote_media(&remote(9)).await.unwrap();
            }
            relays.push(relay);
            started += 1;
        }
        assert_eq!(engine.ports_in_use(), 100);
        assert_eq!(engine.live_relays(), 100);
        for relay in relays {
            relay.stop().await.unwrap();
        }
        assert_eq!(engine.ports_in_use(), 0);
        assert_eq!(engine.live_relays(), 0);
    }
    assert_eq!(started, 1_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_relays_release_their_ports_and_tasks() {
    let engine = engine(45_000, 45_399);
    let sink: Arc<dyn DatagramSink> = Arc::new(NullSink);
    let relays: Vec<_> = (0..100)
        .map(|call| {
            engine
                .start(RelaySpec::audio(call), Arc::clone(&sink))
                .unwrap()
        })
        .collect();
    assert_eq!(engine.live_relays(), 100);
    let inputs: Vec<_> = relays.iter().map(|r| r.device_input()).collect();
    drop(relays);
    wait_until_idle(&engine).await;
    // The session may still hold inputs: they report the relay as gone, and refuse datagrams.
    assert!(inputs.iter().all(|input| input.is_closed()));
    assert!(inputs
        .iter()
        .all(|input| input.feed(Bytes::from_static(&[0u8; 20])) == Err(FeedError::Closed)));
    // Nor do they keep the sockets: every pair of the range binds again while they live.
    let again: Vec<_> = (0..200)
        .map(|call| {
            engine
                .start(RelaySpec::audio(call), Arc::clone(&sink))
                .unwrap()
        })
        .collect();
    assert_eq!(engine.ports_in_use(), 200);
    drop(again);
    drop(inputs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_range_is_an_error_and_recovers() {
    // Two pairs, on ports free right now: with so small a range, a port taken by any other
    // socket on the machine (ephemeral ports share this range) would fail the test.
    let base = free_even_range(4);
    let engine = engine(base, base + 3); // two pairs
    let sink: Arc<dyn DatagramSink> = Arc::new(NullSink);
    let first = engine
        .start(RelaySpec::audio(1), Arc::clone(&sink))
        .unwrap();
    let second = engine
        .start(RelaySpec::audio(2), Arc::clone(&sink))
        .unwrap();
    let third = engine.start(RelaySpec::audio(3), Arc::clone(&sink));
    assert!(matches!(third, Err(RelayError::Ports(_))), "{third:?}");
    first.stop().await.unwrap();
    let again = engine
        .start(RelaySpec::audio(3), Arc::clone(&sink))
        .unwrap();
    again.stop().await.unwrap();
    second.stop().await.unwrap();
    assert_eq!(engine.ports_in_use(), 0);
}

#[test]
fn starting_outside_a_runtime_is_an_error_not_a_panic() {
    let base = free_even_range(2);
    let engine = engine(base, base + 1);
    let result = engine.start(RelaySpec::audio(1), Arc::new(NullSink));
    assert!(matches!(result, Err(RelayError::NoRuntime)));
    assert_eq!(engine.ports_in_use(), 0);
}

/// RFC 5761: a relay started with RTCP multiplexed binds the RTP port only, sends its reports
/// from it to the peer's RTP address, and takes the peer's RTCP arriving there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multiplexed_relay_has_one_socket_and_carries_rtcp_on_it() {
    let base = free_even_range(2);
    let engine = MediaEngine::new(MediaConfig {
        address: "127.0.0.1".parse().unwrap(),
        rtp_port_min: base,
        rtp_port_max: base + 1,
        rtcp_interval_ms: 100,
        ..MediaConfig::default()
    })
    .unwrap();
    let sink: Arc<dyn DatagramSink> = Arc::new(NullSink);
    let relay = engine
        .start(RelaySpec::audio(7).with_rtcp_mux(true), Arc::clone(&sink))
        .unwrap();
    assert!(relay.is_rtcp_muxed());
    let local = relay.local_rtp_addr();
    assert_eq!(local.port(), base);
    assert_eq!(relay.local_rtcp_addr(), local);
    // The odd port is not bound: anyone may bind it.
    drop(std::net::UdpSocket::bind(("127.0.0.1", base + 1)).expect("the RTCP port is free"));

    let peer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    relay
        .set_remote_media(&RemoteMedia {
            rtp: peer_addr,
            rtcp_mux: true,
            ..remote(peer_addr.port())
        })
        .await
        .unwrap();
    // The peer's receiver report, to the relay's one port.
    let report = [
        0x80, 201, 0, 1, // RR, no report blocks, length 1 word
        0x12, 0x34, 0x56, 0x78, // sender SSRC
    ];
    peer.send_to(&report, local).await.unwrap();
    // The relay's own report reaches the peer's RTP address, from the relay's RTP port.
    let mut buf = [0u8; 1500];
    let from = timeout(Duration::from_secs(10), async {
        loop {
            let (len, from) = peer.recv_from(&mut buf).await.unwrap();
            if len >= 2 && (200..=204).contains(&buf[1]) {
                return from;
            }
        }
    })
    .await
    .expect("an RTCP report on the RTP address");
    assert_eq!(from, local);
    let stats = relay.stop().await.unwrap();
    assert_eq!(stats.rtcp_received, 1);
    assert_eq!(stats.drops.rtp_malformed, 0);
    assert!(stats.rtcp_sent >= 1);

    // Without multiplexing, the same engine binds both ports.
    let relay = engine.start(RelaySpec::audio(8), sink).unwrap();
    assert!(!relay.is_rtcp_muxed());
    assert_eq!(relay.local_rtcp_addr().port(), base + 1);
    assert!(std::net::UdpSocket::bind(("127.0.0.1", base + 1)).is_err());
    relay.stop().await.unwrap();
}
