//! Media measurement for the simulator: the echo probe a calling device streams (20 ms PCMU
//! frames whose payload names the call and the frame, so an echo can be checked byte for byte
//! and media of another call is recognised), the counters a listening device keeps of the media
//! it receives, totals over many calls, and `echo-probe`, the same probe over plain RTP/UDP
//! toward an echo with no gateway in between (the baseline of the media benchmark).
//!
//! Probe payload (160 bytes, the size of 20 ms of PCMU): bytes 0-1 the frame number (u16,
//! big-endian), bytes 2-5 the call's tag (u32, big-endian, [`probe_tag`]), then filler bytes
//! derived from both. The gateway renumbers the device link's sequence and RTP's, so echoes
//! are matched by payload, never by header.
//!
//! What it does not do: no audio (the payload is a pattern, not a signal), no jitter buffer,
//! no RTCP; timing figures are what the simulator's own clock sees, on a loaded machine.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use thalamus_proto::media::{MediaDatagram, MediaHeader, StreamId};
use thalamus_proto::v1::MediaStats;

use crate::events::EventPrinter;

/// Bytes of a probe payload (20 ms of PCMU at 8 kHz).
pub const PROBE_PAYLOAD_BYTES: usize = 160;
/// Interval between probe frames.
pub const FRAME_INTERVAL: Duration = Duration::from_millis(20);
/// Round-trip samples kept per probe (about 22 minutes of 20 ms frames); later ones are not
/// kept but still counted.
const MAX_RTT_SAMPLES: usize = 65_536;
/// Sent frames older than this are forgotten (their echo, if it ever comes, has no RTT).
const SENT_MEMORY: Duration = Duration::from_secs(5);
/// Calls a listening device keeps media counters for at once.
pub const MAX_TRACKED_CALLS: usize = 256;

/// The tag of a call's probe frames: FNV-1a of the device id and the call reference, so two
/// devices (or two calls of one device) stream different payloads.
pub fn probe_tag(device: &str, call_ref: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in device.bytes().chain(call_ref.to_be_bytes()) {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// The payload of frame `seq` of the call tagged `tag`.
pub fn probe_payload(tag: u32, seq: u16) -> [u8; PROBE_PAYLOAD_BYTES] {
    let mut payload = [0u8; PROBE_PAYLOAD_BYTES];
    let (head, filler) = payload.split_at_mut(6);
    head[..2].copy_from_slice(&seq.to_be_bytes());
    head[2..].copy_from_slice(&tag.to_be_bytes());
    let seed = tag.to_be_bytes()[3] ^ seq.to_be_bytes()[1];
    for (i, byte) in filler.iter_mut().enumerate() {
        *byte = seed.wrapping_add(i as u8).wrapping_mul(7);
    }
    payload
}

/// The frame number and tag a payload claims, when it is long enough to claim any.
fn payload_identity(payload: &[u8]) -> Option<(u16, u32)> {
    let seq = u16::from_be_bytes([*payload.first()?, *payload.get(1)?]);
    let tag = u32::from_be_bytes([
        *payload.get(2)?,
        *payload.get(3)?,
        *payload.get(4)?,
        *payload.get(5)?,
    ]);
    Some((seq, tag))
}

/// Percentile of sorted samples (nearest rank); 0 when empty.
fn percentile(sorted: &[u64], quantile: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() - 1) as f64 * quantile.clamp(0.0, 1.0)).round() as usize;
    sorted.get(index).copied().unwrap_or(0)
}

/// One call's echo probe: what was sent, what came back and how.
#[derive(Debug)]
pub struct EchoProbe {
    tag: u32,
    /// Frames sent.
    pub sent: u32,
    sent_at: HashMap<u16, Instant>,
    /// Datagrams (or packets) received back.
    pub received: u32,
    /// Received frames that are exact copies of a frame this probe sent (first copy only).
    pub payload_matches: u32,
    /// Matching frames that came after every earlier matching frame.
    pub in_order: u32,
    /// Received frames carrying another call's tag.
    pub foreign: u32,
    /// Second and later copies of a frame.
    pub duplicates: u32,
    /// Frames the local QUIC connection refused to send (counted in `sent`; the reason is
    /// in the simulator's log).
    pub send_failed: u32,
    last_match: Option<u16>,
    seen: Vec<u64>,
    rtt_us: Vec<u64>,
    /// When the latest matching frame arrived, and the longest time between two matching
    /// frames (the longest silence the device heard while both sides streamed).
    last_arrival: Option<Instant>,
    max_gap_us: u64,
    /// The gateway's statistics of the call (the final `CallEvent`), when they arrived.
    pub gateway: Option<MediaStats>,
}

impl EchoProbe {
    /// A probe streaming frames tagged `tag`.
    pub fn new(tag: u32) -> Self {
        EchoProbe {
            tag,
            sent: 0,
            sent_at: HashMap::new(),
            received: 0,
            payload_matches: 0,
            in_order: 0,
            foreign: 0,
            duplicates: 0,
            send_failed: 0,
            last_match: None,
            seen: vec![0; 65_536 / 64],
            rtt_us: Vec::new(),
            last_arrival: None,
            max_gap_us: 0,
            gateway: None,
        }
    }

    /// The next frame's number and payload, recorded as sent at `now`.
    pub fn next_payload(&mut self, now: Instant) -> (u16, [u8; PROBE_PAYLOAD_BYTES]) {
        let seq = self.sent as u16;
        self.sent_at
            .retain(|_, at| now.saturating_duration_since(*at) < SENT_MEMORY);
        self.sent_at.insert(seq, now);
        self.sent = self.sent.saturating_add(1);
        (seq, probe_payload(self.tag, seq))
    }

    /// The next frame as a device media datagram (PCMU, audio stream of `call_ref`).
    pub fn next_datagram(&mut self, call_ref: u32, now: Instant) -> Bytes {
        let (seq, payload) = self.next_payload(now);
        MediaHeader {
            marker: seq == 0,
            payload_type: 0,
            sequence: seq,
            timestamp: u32::from(seq).wrapping_mul(160),
            call_ref,
            stream_id: StreamId::AUDIO,
        }
        .to_bytes(&payload)
        .unwrap_or_default()
    }

    /// Counts one received payload (a media datagram's or an RTP packet's) arriving at `now`.
    pub fn on_payload(&mut self, payload: &[u8], now: Instant) {
        self.received = self.received.saturating_add(1);
        let Some((seq, tag)) = payload_identity(payload) else {
            return;
        };
        if tag != self.tag {
            self.foreign += 1;
            return;
        }
        if payload != probe_payload(tag, seq).as_slice() || u32::from(seq) >= self.sent {
            return;
        }
        let (word, bit) = (usize::from(seq) / 64, 1u64 << (seq % 64));
        let Some(bits) = self.seen.get_mut(word) else {
            return;
        };
        if *bits & bit != 0 {
            self.duplicates += 1;
            return;
        }
        *bits |= bit;
        self.payload_matches += 1;
        if let Some(last) = self.last_arrival {
            let gap = now.saturating_duration_since(last).as_micros() as u64;
            self.max_gap_us = self.max_gap_us.max(gap);
        }
        self.last_arrival = Some(now);
        match self.last_match {
            Some(last) if (seq.wrapping_sub(last) as i16) <= 0 => {}
            _ => {
                self.in_order += 1;
                self.last_match = Some(seq);
            }
        }
        if let Some(at) = self.sent_at.remove(&seq) {
            if self.rtt_us.len() < MAX_RTT_SAMPLES {
                self.rtt_us
                    .push(now.saturating_duration_since(at).as_micros() as u64);
            }
        }
    }

    /// Counts one media datagram from the gateway.
    pub fn on_datagram(&mut self, datagram: Bytes, now: Instant) {
        match MediaDatagram::decode(datagram) {
            Ok(d) => self.on_payload(&d.payload, now),
            Err(_) => self.received = self.received.saturating_add(1),
        }
    }

    /// Frames sent whose echo has not come back (yet).
    pub fn outstanding(&self) -> u32 {
        self.sent.saturating_sub(self.payload_matches)
    }

    /// The first (up to `limit`) frame numbers sent whose echo never matched.
    pub fn missing(&self, limit: usize) -> Vec<u16> {
        (0..self.sent.min(65_536))
            .filter_map(|n| u16::try_from(n).ok())
            .filter(|seq| {
                self.seen
                    .get(usize::from(*seq) / 64)
                    .is_some_and(|bits| bits & (1u64 << (seq % 64)) == 0)
            })
            .take(limit)
            .collect()
    }

    /// The longest time between two matching frames' arrivals, in microseconds.
    pub fn max_gap_us(&self) -> u64 {
        self.max_gap_us
    }

    /// Round-trip samples in microseconds, in arrival order.
    pub fn rtt_samples(&self) -> &[u64] {
        &self.rtt_us
    }

    /// The `media_report` fields.
    pub fn report(&self) -> Value {
        let mut rtt = self.rtt_us.clone();
        rtt.sort_unstable();
        json!({
            "frames_sent": self.sent,
            "frames_received": self.received,
            "payload_matches": self.payload_matches,
            "frames_in_order": self.in_order,
            "frames_foreign": self.foreign,
            "duplicates": self.duplicates,
            "send_failed": self.send_failed,
            "loss_percent": loss_percent(self.sent, self.payload_matches),
            "rtt_us_p50": percentile(&rtt, 0.5),
            "rtt_us_p99": percentile(&rtt, 0.99),
            "missing_first": self.missing(8),
            "max_gap_ms": self.max_gap_us / 1000,
            "gateway": self.gateway.as_ref().map(crate::events::stats_json),
        })
    }
}

fn loss_percent(sent: u32, matched: u32) -> f64 {
    if sent == 0 {
        0.0
    } else {
        100.0 * (1.0 - f64::from(matched.min(sent)) / f64::from(sent))
    }
}

/// Totals over many probes (every call of a run).
#[derive(Debug, Default)]
pub struct ProbeTotals {
    calls: u32,
    sent: u64,
    received: u64,
    payload_matches: u64,
    in_order: u64,
    foreign: u64,
    duplicates: u64,
    rtt_us: Vec<u64>,
    gateway_latency_us: Vec<u64>,
    gateway_packets: u64,
}

impl ProbeTotals {
    /// Adds one finished probe.
    pub fn add(&mut self, probe: &EchoProbe) {
        self.calls += 1;
        self.sent += u64::from(probe.sent);
        self.received += u64::from(probe.received);
        self.payload_matches += u64::from(probe.payload_matches);
        self.in_order += u64::from(probe.in_order);
        self.foreign += u64::from(probe.foreign);
        self.duplicates += u64::from(probe.duplicates);
        let room = (MAX_RTT_SAMPLES * 64).saturating_sub(self.rtt_us.len());
        self.rtt_us
            .extend(probe.rtt_samples().iter().take(room).copied());
        if let Some(stats) = &probe.gateway {
            self.gateway_latency_us
                .push(u64::from(stats.relay_latency_us));
            self.gateway_packets += stats.packets_sent + stats.packets_received;
        }
    }

    /// The `media_summary` fields: sums, loss, RTT percentiles over every echoed frame, and
    /// the gateway's per-call relay latency (device -> peer median of each call) as median and
    /// maximum over the calls.
    pub fn summary(&self) -> Value {
        let mut rtt = self.rtt_us.clone();
        rtt.sort_unstable();
        let mut gateway = self.gateway_latency_us.clone();
        gateway.sort_unstable();
        let matched = u32::try_from(self.payload_matches).unwrap_or(u32::MAX);
        let sent = u32::try_from(self.sent).unwrap_or(u32::MAX);
        json!({
            "calls": self.calls,
            "frames_sent": self.sent,
            "frames_received": self.received,
            "payload_matches": self.payload_matches,
            "frames_in_order": self.in_order,
            "frames_foreign": self.foreign,
            "duplicates": self.duplicates,
            "loss_percent": loss_percent(sent, matched),
            "rtt_samples": rtt.len(),
            "rtt_us_p50": percentile(&rtt, 0.5),
            "rtt_us_p99": percentile(&rtt, 0.99),
            "rtt_us_max": rtt.last().copied().unwrap_or(0),
            "gateway_calls_with_stats": gateway.len(),
            "gateway_packets_relayed": self.gateway_packets,
            "gateway_relay_latency_us_p50_of_calls": percentile(&gateway, 0.5),
            "gateway_relay_latency_us_max_of_calls": gateway.last().copied().unwrap_or(0),
        })
    }
}

/// What a listening device received on one call.
#[derive(Debug, Default)]
pub struct ReceivedMedia {
    frames: u32,
    bytes: u64,
    payload_types: BTreeMap<u8, u32>,
    in_order: u32,
    last_sequence: Option<u16>,
    digest: Sha256,
    /// Datagrams sent back (with `--echo`).
    pub echoed: u32,
    echo_sequence: u16,
    /// When the call ended (the report is due once the gateway's statistics arrive).
    pub ended_at: Option<Instant>,
    /// Whether the call was answered.
    pub answered: bool,
}

impl ReceivedMedia {
    /// Counts one datagram of the call.
    pub fn on_datagram(&mut self, datagram: &MediaDatagram) {
        self.frames = self.frames.saturating_add(1);
        self.bytes += datagram.payload.len() as u64;
        *self
            .payload_types
            .entry(datagram.header.payload_type)
            .or_default() += 1;
        match self.last_sequence {
            Some(last) if (datagram.header.sequence.wrapping_sub(last) as i16) <= 0 => {}
            _ => {
                self.in_order += 1;
                self.last_sequence = Some(datagram.header.sequence);
            }
        }
        self.digest.update(&datagram.payload);
    }

    /// The datagram to send back for `datagram` (same payload, type, timestamp and stream,
    /// this device's own sequence), counted as echoed.
    pub fn echo(&mut self, datagram: &MediaDatagram) -> Option<Bytes> {
        let header = MediaHeader {
            sequence: self.echo_sequence,
            ..datagram.header
        };
        let bytes = header.to_bytes(&datagram.payload).ok()?;
        self.echo_sequence = self.echo_sequence.wrapping_add(1);
        self.echoed = self.echoed.saturating_add(1);
        Some(bytes)
    }

    /// The `media_report` fields of a listening device (SHA-256 over the payloads in arrival
    /// order, so a test can compare them with what the peer sent).
    pub fn report(&self, call_ref: u32, gateway: Option<&MediaStats>) -> Value {
        json!({
            "call_ref": call_ref,
            "frames_received": self.frames,
            "bytes_received": self.bytes,
            "frames_in_order": self.in_order,
            "payload_types": self.payload_types.iter().map(|(pt, n)| (pt.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "payload_sha256": hex::encode(self.digest.clone().finalize()),
            "frames_echoed": self.echoed,
            "gateway": gateway.map(crate::events::stats_json),
        })
    }
}

/// Settings of `echo-probe`.
#[derive(Debug, Clone)]
pub struct EchoProbeOptions {
    /// The UDP echoes to send to (flow `n` goes to `targets[n % len]`).
    pub targets: Vec<SocketAddr>,
    /// Concurrent flows (one socket and one tag each).
    pub flows: u32,
    /// How long each flow streams.
    pub duration: Duration,
}

/// Streams probe frames as RTP (PCMU) from `flows` sockets to the echoes for `duration`,
/// waits up to a second for the last echoes, prints and returns the `media_summary`.
pub async fn echo_probe(opts: &EchoProbeOptions, printer: EventPrinter) -> anyhow::Result<Value> {
    let totals = Arc::new(Mutex::new(ProbeTotals::default()));
    let mut tasks = Vec::new();
    for flow in 0..opts.flows {
        let Some(target) = opts
            .targets
            .get(flow as usize % opts.targets.len().max(1))
            .copied()
        else {
            anyhow::bail!("echo-probe needs at least one target");
        };
        let bind: SocketAddr = if target.is_ipv4() {
            (std::net::Ipv4Addr::LOCALHOST, 0).into()
        } else {
            (std::net::Ipv6Addr::LOCALHOST, 0).into()
        };
        let socket = tokio::net::UdpSocket::bind(bind).await?;
        socket.connect(target).await?;
        let totals = Arc::clone(&totals);
        let duration = opts.duration;
        tasks.push(tokio::spawn(async move {
            let ssrc = probe_tag("echo-probe", flow);
            let mut probe = EchoProbe::new(ssrc);
            let mut tick = tokio::time::interval(FRAME_INTERVAL);
            let mut buf = [0u8; 2048];
            let stop_at = Instant::now() + duration;
            let drain_until = stop_at + Duration::from_secs(1);
            loop {
                let now = Instant::now();
                if now >= drain_until || (now >= stop_at && probe.outstanding() == 0) {
                    break;
                }
                tokio::select! {
                    _ = tick.tick(), if now < stop_at => {
                        let (seq, payload) = probe.next_payload(Instant::now());
                        let mut packet = Vec::with_capacity(12 + PROBE_PAYLOAD_BYTES);
                        packet.extend_from_slice(&[0x80, 0]);
                        packet.extend_from_slice(&seq.to_be_bytes());
                        packet.extend_from_slice(&u32::from(seq).wrapping_mul(160).to_be_bytes());
                        packet.extend_from_slice(&ssrc.to_be_bytes());
                        packet.extend_from_slice(&payload);
                        let _ = socket.send(&packet).await;
                    }
                    received = socket.recv(&mut buf) => {
                        if let Ok(n) = received {
                            if let Some(payload) = buf.get(12..n) {
                                probe.on_payload(payload, Instant::now());
                            }
                        }
                    }
                    () = tokio::time::sleep_until(drain_until.into()) => {}
                }
            }
            if let Ok(mut totals) = totals.lock() {
                totals.add(&probe);
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let summary = totals
        .lock()
        .map_err(|_| anyhow::anyhow!("a probe task panicked"))?
        .summary();
    printer.emit("media_summary", summary.clone());
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_name_their_frame_and_call() {
        let a = probe_payload(probe_tag("alice", 1), 7);
        assert_eq!(payload_identity(&a), Some((7, probe_tag("alice", 1))));
        assert_ne!(probe_tag("alice", 1), probe_tag("alice", 2));
        assert_ne!(probe_tag("alice", 1), probe_tag("bob", 1));
        assert_ne!(probe_payload(1, 7), probe_payload(1, 8));
    }

    #[test]
    fn echoes_are_matched_ordered_and_foreign_ones_counted() {
        let t0 = Instant::now();
        let mut probe = EchoProbe::new(probe_tag("alice", 1));
        let sent: Vec<_> = (0..5).map(|_| probe.next_payload(t0).1).collect();
        let later = t0 + Duration::from_millis(3);
        probe.on_payload(&sent[0], later);
        probe.on_payload(&sent[2], later);
        probe.on_payload(&sent[1], later); // late: matched, not in order
        probe.on_payload(&sent[2], later); // duplicate
        probe.on_payload(&probe_payload(probe_tag("bob", 1), 3), later); // another call's
        let mut damaged = sent[3];
        damaged[100] ^= 1;
        probe.on_payload(&damaged, later);
        probe.on_payload(&[1, 2], later); // too short to name a frame
        probe.on_payload(&probe_payload(probe_tag("alice", 1), 9), later); // never sent
        assert_eq!(probe.received, 8);
        assert_eq!(probe.payload_matches, 3);
        assert_eq!(probe.in_order, 2);
        assert_eq!(probe.duplicates, 1);
        assert_eq!(probe.foreign, 1);
        assert_eq!(probe.outstanding(), 2);
        assert_eq!(probe.missing(8), vec![3, 4]);
        assert_eq!(probe.missing(1), vec![3]);
        assert_eq!(probe.rtt_samples(), &[3000, 3000, 3000]);
        let report = probe.report();
        assert_eq!(report["loss_percent"], 40.0);
        assert_eq!(report["rtt_us_p99"], 3000);
    }

    #[test]
    fn datagrams_carry_the_call_and_the_payload() {
        let mut probe = EchoProbe::new(9);
        let datagram = probe.next_datagram(4, Instant::now());
        let decoded = MediaDatagram::decode(datagram.clone()).unwrap();
        assert_eq!(decoded.header.call_ref, 4);
        assert_eq!(decoded.header.payload_type, 0);
        assert_eq!(decoded.payload.len(), PROBE_PAYLOAD_BYTES);
        probe.on_datagram(datagram, Instant::now());
        assert_eq!(probe.payload_matches, 1);
    }

    #[test]
    fn totals_add_up_calls() {
        let t0 = Instant::now();
        let mut totals = ProbeTotals::default();
        for n in 0..2u32 {
            let mut probe = EchoProbe::new(n);
            for _ in 0..10 {
                let (_, p) = probe.next_payload(t0);
                probe.on_payload(&p, t0 + Duration::from_micros(u64::from(100 * (n + 1))));
            }
            probe.gateway = Some(MediaStats {
                relay_latency_us: 40 + n,
                packets_sent: 10,
                packets_received: 10,
                ..Default::default()
            });
            totals.add(&probe);
        }
        let s = totals.summary();
        assert_eq!(s["calls"], 2);
        assert_eq!(s["payload_matches"], 20);
        assert_eq!(s["loss_percent"], 0.0);
        assert_eq!(s["rtt_us_p50"], 200);
        assert_eq!(s["gateway_packets_relayed"], 40);
        assert_eq!(s["gateway_relay_latency_us_max_of_calls"], 41);
    }

    #[test]
    fn listener_counts_digests_and_echoes() {
        let mut media = ReceivedMedia::default();
        let mut expected = Sha256::new();
        for seq in [10u16, 11, 13, 12] {
            let payload = vec![seq as u8; 240];
            expected.update(&payload);
            let bytes = MediaHeader {
                marker: false,
                payload_type: 8,
                sequence: seq,
                timestamp: 0,
                call_ref: 3,
                stream_id: StreamId::AUDIO,
            }
            .to_bytes(&payload)
            .unwrap();
            let d = MediaDatagram::decode(bytes).unwrap();
            media.on_datagram(&d);
            let echo = MediaDatagram::decode(media.echo(&d).unwrap()).unwrap();
            assert_eq!(echo.payload, d.payload);
            assert_eq!(echo.header.call_ref, 3);
        }
        let report = media.report(3, None);
        assert_eq!(report["frames_received"], 4);
        assert_eq!(report["frames_in_order"], 3);
        assert_eq!(report["bytes_received"], 960);
        assert_eq!(report["payload_types"]["8"], 4);
        assert_eq!(report["frames_echoed"], 4);
        assert_eq!(
            report["payload_sha256"],
            hex::encode(expected.finalize()).as_str()
        );
    }

    #[tokio::test]
    async fn echo_probe_measures_a_udp_echo() {
        let mut targets = Vec::new();
        for _ in 0..2 {
            let echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            targets.push(echo.local_addr().unwrap());
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                while let Ok((n, from)) = echo.recv_from(&mut buf).await {
                    let _ = echo.send_to(&buf[..n], from).await;
                }
            });
        }
        let summary = echo_probe(
            &EchoProbeOptions {
                targets,
                flows: 3,
                duration: Duration::from_millis(200),
            },
            EventPrinter { json: true },
        )
        .await
        .unwrap();
        let sent = summary["frames_sent"].as_u64().unwrap();
        assert!(sent >= 3, "{summary}");
        assert_eq!(summary["payload_matches"], sent, "{summary}");
        assert_eq!(summary["frames_foreign"], 0);
    }
}
