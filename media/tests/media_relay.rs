#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The media relay over real UDP sockets on loopback: a fake device (feeding datagrams into the
//! relay and collecting what it sends through its sink) and a fake RTP peer that echoes packets.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use thalamus_media::rtp::{RtpHeader, RtpPacket};
use thalamus_media::{
    DatagramError, DatagramSink, LatchMode, MediaConfig, MediaEngine, MediaRelay, RelayEvent,
    RelaySpec,
};
use thalamus_proto::media::{MediaDatagram, MediaHeader, StreamId};
use thalamus_proto::v1::MediaStats;
use thalamus_sip::sdp::{MediaKind, RemoteMedia, SessionDescription};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(20);

/// The device side: collects what the relay sends toward the device.
struct ChannelSink {
    tx: mpsc::UnboundedSender<Bytes>,
    blocked: AtomicBool,
}

impl DatagramSink for ChannelSink {
    fn send_datagram(&self, datagram: Bytes) -> Result<(), DatagramError> {
        if self.blocked.load(Ordering::SeqCst) {
            return Err(DatagramError::Blocked);
        }
        self.tx.send(datagram).map_err(|_| DatagramError::Closed)
    }
}

fn sink() -> (Arc<ChannelSink>, mpsc::UnboundedReceiver<Bytes>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Arc::new(ChannelSink {
            tx,
            blocked: AtomicBool::new(false),
        }),
        rx,
    )
}

fn engine(port_min: u16, configure: impl FnOnce(&mut MediaConfig)) -> MediaEngine {
    let mut config = MediaConfig {
        address: "127.0.0.1".parse().unwrap(),
        rtp_port_min: port_min,
        rtp_port_max: port_min + 199,
        ..MediaConfig::default()
    };
    configure(&mut config);
    MediaEngine::new(config).unwrap()
}

/// What the echo peer saw: (payload type, sequence, SSRC) of each packet.
type Seen = Arc<Mutex<Vec<(u8, u16, u32)>>>;

/// A fake SIP peer: echoes every RTP packet to its source with its own SSRC; RTCP is read and
/// ignored. Returns the remote stream as its SDP answer describes it.
async fn echo_peer(peer_ssrc: u32) -> (RemoteMedia, Seen) {
    let rtp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let rtcp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sdp = format!(
        "v=0\r\no=peer 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
         m=audio {} RTP/AVP 96 101\r\na=rtpmap:96 opus/48000/2\r\n\
         a=rtpmap:101 telephone-event/48000\r\na=rtcp:{}\r\na=sendrecv\r\n",
        rtp.local_addr().unwrap().port(),
        rtcp.local_addr().unwrap().port()
    );
    let remote = SessionDescription::parse(&sdp)
        .unwrap()
        .remote_media(&MediaKind::Audio)
        .unwrap();
    let seen: Seen = Arc::default();
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        loop {
            let Ok((len, source)) = rtp.recv_from(&mut buf).await else {
                return;
            };
            let packet = &mut buf[..len];
            if let Ok(parsed) = RtpPacket::parse(packet) {
                let h = parsed.header;
                record
                    .lock()
                    .unwrap()
                    .push((h.payload_type, h.sequence, h.ssrc));
                packet[8..12].copy_from_slice(&peer_ssrc.to_be_bytes());
                let _ = rtp.send_to(packet, source).await;
            }
        }
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while rtcp.recv_from(&mut buf).await.is_ok() {}
    });
    (remote, seen)
}

fn frame(call_ref: u32, index: u16, tag: &str) -> Bytes {
    let mut payload = format!("{tag}-{index:05}-").into_bytes();
    payload.resize(80, b'.');
    MediaHeader {
        marker: index == 0,
        payload_type: 111,
        sequence: index,
        timestamp: u32::from(index) * 960,
        call_ref,
        stream_id: StreamId::AUDIO,
    }
    .to_bytes(&payload)
    .unwrap()
}

fn index_of(datagram: &MediaDatagram, tag: &str) -> Option<u16> {
    let text = std::str::from_utf8(&datagram.payload).ok()?;
    let rest = text.strip_prefix(tag)?.strip_prefix('-')?;
    rest.get(..5)?.parse().ok()
}

/// Feeds `count` frames, keeping at most `window` unanswered so no socket buffer overflows, and
/// returns what came back to the device.
async fn run_frames(
    relay: &MediaRelay,
    rx: &mut mpsc::UnboundedReceiver<Bytes>,
    call_ref: u32,
    count: u16,
    tag: &str,
) -> Vec<MediaDatagram> {
    let input = relay.device_input();
    let window = 32usize;
    let mut received = Vec::new();
    for index in 0..count {
        input.feed(frame(call_ref, index, tag)).unwrap();
        while (usize::from(index) + 1).saturating_sub(received.len()) > window {
            match timeout(Duration::from_secs(2), rx.recv()).await {
                Ok(Some(d)) => received.push(MediaDatagram::decode(d).unwrap()),
                _ => break, // lost: stop waiting for it
            }
        }
    }
    while received.len() < usize::from(count) {
        match timeout(Duration::from_secs(2), rx.recv()).await {
            Ok(Some(d)) => received.push(MediaDatagram::decode(d).unwrap()),
            _ => break,
        }
    }
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_seconds_of_frames_echo_back_in_order() {
    let engine = engine(42_000, |_| {});
    let (sink, mut rx) = sink();
    let relay = engine.start(RelaySpec::audio(7), sink).unwrap();
    assert_eq!(relay.local_rtp_addr().ip().to_string(), "127.0.0.1");
    assert_eq!(relay.local_rtp_addr().port() % 2, 0);
    assert_eq!(
        relay.local_rtcp_addr().port(),
        relay.local_rtp_addr().port() + 1
    );
    assert_eq!(relay.sdp_address(), Some("127.0.0.1".parse().unwrap()));
    let (remote, seen) = echo_peer(0xabcd_0001).await;
    relay.set_remote_media(&remote).await.unwrap();

    let received = timeout(WAIT, run_frames(&relay, &mut rx, 7, 500, "A"))
        .await
        .unwrap();

    // In order, matching payloads, with the device-side header rebuilt.
    let mut last: Option<u16> = None;
    let mut good = 0;
    for datagram in &received {
        assert_eq!(datagram.header.call_ref, 7);
        assert_eq!(datagram.header.stream_id, StreamId::AUDIO);
        assert_eq!(datagram.header.payload_type, 111);
        let index = index_of(datagram, "A").expect("payload of a frame we sent");
        if last.is_none_or(|l| index > l) {
            good += 1;
        }
        last = Some(index);
    }
    assert!(good * 1000 >= 500 * 999, "{good} of 500 frames in order");
    // The device sees the peer's (echoed) numbering: ours, consecutive.
    for pair in received.windows(2) {
        let step = pair[1]
            .header
            .sequence
            .wrapping_sub(pair[0].header.sequence);
        let index_step = index_of(&pair[1], "A").unwrap() - index_of(&pair[0], "A").unwrap();
        assert_eq!(step, index_step);
    }

    // What the peer saw: negotiated payload type, one SSRC, consecutive sequence numbers.
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() * 1000 >= 500 * 999);
    assert!(seen.iter().all(|(pt, _, _)| *pt == 96));
    assert!(seen.iter().all(|(_, _, ssrc)| *ssrc == seen[0].2));
    assert_ne!(seen[0].2, 0xabcd_0001);
    for pair in seen.windows(2) {
        assert_eq!(pair[1].1, pair[0].1.wrapping_add(1));
    }

    let stats = relay.stats().await.unwrap();
    assert_eq!(stats.from_device.flow.packets, 500);
    assert_eq!(stats.to_peer.packets, 500);
    assert_eq!(stats.from_peer.flow.packets as usize, seen.len());
    assert_eq!(stats.to_device.packets as usize, received.len());
    assert_eq!(stats.latched_source, Some(remote.rtp));
    assert_eq!(stats.latency_to_peer.count, 500);
    assert!(stats.latency.p50 <= stats.latency.p99);
    assert!(stats.latency.p99 < Duration::from_secs(1));
    let message = MediaStats::from(&stats);
    assert_eq!(message.packets_sent, 500);
    assert_eq!(message.bytes_sent, 500 * 80);
    assert_eq!(message.packets_received as usize, seen.len());
    // Loopback UDP from the echo back to the relay: at most 0.1% lost, as above.
    assert!(message.packets_lost * 1000 <= 500, "{message:?}");

    // A probe taken from the relay reads the same figures from another task, and says the
    // relay stopped once it has.
    let probe = relay.stats_probe();
    let probed = tokio::spawn(async move { probe.read().await })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(probed.to_peer.packets, 500);
    assert!(probed.from_peer.flow.packets >= stats.from_peer.flow.packets);
    let probe = relay.stats_probe();

    let final_stats = relay.stop().await.unwrap();
    assert_eq!(final_stats.to_peer.packets, 500);
    assert!(final_stats.rtcp_sent >= 1, "the final report and BYE");
    assert!(matches!(
        probe.read().await,
        Err(thalamus_media::RelayError::Stopped)
    ));
    assert_eq!(engine.ports_in_use(), 0);
    assert_eq!(engine.live_relays(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_at_once_never_mix_media() {
    let engine = engine(42_400, |_| {});
    let (sink_a, mut rx_a) = sink();
    let (sink_b, mut rx_b) = sink();
    let relay_a = engine.start(RelaySpec::audio(1), sink_a).unwrap();
    let relay_b = engine.start(RelaySpec::audio(2), sink_b).unwrap();
    assert_ne!(relay_a.local_rtp_addr(), relay_b.local_rtp_addr());
    let (remote_a, _) = echo_peer(0xa).await;
    let (remote_b, _) = echo_peer(0xb).await;
    relay_a.set_remote_media(&remote_a).await.unwrap();
    relay_b.set_remote_media(&remote_b).await.unwrap();

    let (got_a, got_b) = timeout(WAIT, async {
        tokio::join!(
            run_frames(&relay_a, &mut rx_a, 1, 200, "A"),
            run_frames(&relay_b, &mut rx_b, 2, 200, "B")
        )
    })
    .await
    .unwrap();
    assert!(got_a.len() >= 199 && got_b.len() >= 199);
    assert!(got_a
        .iter()
        .all(|d| d.header.call_ref == 1 && index_of(d, "A").is_some()));
    assert!(got_b
        .iter()
        .all(|d| d.header.call_ref == 2 && index_of(d, "B").is_some()));

    // A datagram for call 2 fed to call 1's relay is dropped there.
    relay_a.device_input().feed(frame(2, 999, "B")).unwrap();
    // RTP from a stranger to relay A's port is refused (A is latched to its peer).
    let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut packet = BytesMut::new();
    RtpHeader {
        marker: false,
        payload_type: 96,
        sequence: 1,
        timestamp: 1,
        ssrc: 0x5747,
    }
    .encode(b"B-00000-intruder", &mut packet)
    .unwrap();
    stranger
        .send_to(&packet, relay_a.local_rtp_addr())
        .await
        .unwrap();
    let stats_a = timeout(WAIT, async {
        loop {
            let stats = relay_a.stats().await.unwrap();
            if stats.drops.device_wrong_call == 1 && stats.drops.rtp_wrong_source == 1 {
                return stats;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    assert_eq!(stats_a.from_device.flow.packets, 200);
    assert!(rx_a.try_recv().is_err(), "nothing more reached device A");
    assert!(rx_b.try_recv().is_err(), "nothing more reached device B");
    relay_a.stop().await.unwrap();
    relay_b.stop().await.unwrap();
    assert_eq!(engine.ports_in_use(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_raises_media_timeout() {
    let engine = engine(42_800, |c| c.media_timeout_ms = 150);
    let (sink, _rx) = sink();
    let mut relay = engine.start(RelaySpec::audio(3), sink).unwrap();
    // A peer that never sends.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sdp = format!(
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
         m=audio {} RTP/AVP 0\r\n",
        silent.local_addr().unwrap().port()
    );
    let remote = SessionDescription::parse(&sdp)
        .unwrap()
        .remote_media(&MediaKind::Audio)
        .unwrap();
    relay.set_remote_media(&remote).await.unwrap();
    let event = timeout(WAIT, relay.next_event()).await.unwrap().unwrap();
    match event {
        RelayEvent::MediaTimeout { silent_for } => {
            assert!(silent_for >= Duration::from_millis(150), "{silent_for:?}");
        }
        other => panic!("expected a media timeout, got {other:?}"),
    }
    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_device_link_keeps_the_freshest_frames() {
    let engine = engine(43_200, |c| {
        c.send_buffer_frames = 4;
        c.latch = LatchMode::Any;
    });
    let (sink, mut rx) = sink();
    sink.blocked.store(true, Ordering::SeqCst);
    let relay = engine
        .start(
            RelaySpec::audio(4),
            Arc::clone(&sink) as Arc<dyn DatagramSink>,
        )
        .unwrap();
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sdp = format!(
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
         m=audio {} RTP/AVP 0\r\n",
        peer.local_addr().unwrap().port()
    );
    let remote = SessionDescription::parse(&sdp)
        .unwrap()
        .remote_media(&MediaKind::Audio)
        .unwrap();
    relay.set_remote_media(&remote).await.unwrap();
    let destination: SocketAddr = relay.local_rtp_addr();
    for sequence in 0..20u16 {
        let mut packet = BytesMut::new();
        RtpHeader {
            marker: false,
            payload_type: 0,
            sequence,
            timestamp: u32::from(sequence) * 160,
            ssrc: 9,
        }
        .encode(&[sequence as u8; 160], &mut packet)
        .unwrap();
        peer.send_to(&packet, destination).await.unwrap();
    }
    timeout(WAIT, async {
        while relay.stats().await.unwrap().from_peer.flow.packets < 20 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    assert!(rx.try_recv().is_err(), "nothing delivered while blocked");
    sink.blocked.store(false, Ordering::SeqCst);
    let mut delivered = Vec::new();
    while delivered.len() < 4 {
        let datagram = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
        delivered.push(MediaDatagram::decode(datagram).unwrap().header.sequence);
    }
    assert_eq!(delivered, vec![16, 17, 18, 19]);
    let stats = relay.stop().await.unwrap();
    assert_eq!(stats.drops.device_buffer_overflow, 16);
    assert_eq!(stats.to_device.packets, 4);
}
