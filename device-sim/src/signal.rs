//! The earpiece's signal data stream, simulated: a synthetic multi-channel signal sent on MBFP
//! stream 2 ([`SignalSource`]) and the receiver that checks every sample of it
//! ([`SignalSink`]).
//!
//! The signal: [`CHANNELS`] channels at [`SAMPLE_RATE`] Hz, [`SAMPLES_PER_PACKET`] samples
//! per channel in each 20 ms packet, payload type 98 (`x-mbfp-signal`), timestamps in
//! milliseconds. Payload ([`PAYLOAD_BYTES`] bytes, big-endian): the sender's seed (u32), the
//! index of the packet's first sample (u32), the sender's wall clock when it sent the packet
//! (u64, microseconds since the Unix epoch), then the samples, sample by sample and channel by
//! channel within a sample (i16 each). Every sample's value follows from the seed, its index
//! and its channel ([`sample`]), so the receiver checks each one without being told anything
//! out of band: the first packet's seed is pinned and every later packet must carry it.
//!
//! What it does not do: no real signal (the values are a hash, not physiology), no jitter
//! buffer; the latency is the receiver's wall clock minus the sender's, so it means something
//! only when both run on one machine (as in the tests).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{json, Value};
use thalamus_proto::media::{MediaHeader, StreamId, SIGNAL_PAYLOAD_TYPE};

/// Channels of the synthetic signal.
pub const CHANNELS: usize = 8;
/// Samples per second per channel.
pub const SAMPLE_RATE: u32 = 250;
/// Time between packets.
pub const PACKET_INTERVAL: Duration = Duration::from_millis(20);
/// Samples per channel in one packet (20 ms at 250 Hz).
pub const SAMPLES_PER_PACKET: u32 = 5;
/// Milliseconds between two samples (the stream's timestamp clock is 1 kHz).
const MS_PER_SAMPLE: u32 = 1_000 / SAMPLE_RATE;
/// Bytes before the samples: seed, first sample index, send time.
const PREFIX_BYTES: usize = 4 + 4 + 8;
/// Bytes of one packet's payload.
pub const PAYLOAD_BYTES: usize = PREFIX_BYTES + SAMPLES_PER_PACKET as usize * CHANNELS * 2;
/// Most packets sent at once to catch up after the sender was late (one second's worth).
const MAX_CATCH_UP: usize = 50;
/// Latency samples kept (about 22 minutes of packets); later ones are counted, not kept.
const MAX_LATENCY_SAMPLES: usize = 65_536;

/// The value of sample `index` of `channel` in the signal seeded `seed`.
pub fn sample(seed: u32, index: u32, channel: usize) -> i16 {
    let mut hash: u32 = 0x811c_9dc5 ^ seed;
    for byte in index.to_be_bytes().into_iter().chain([channel as u8]) {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    (hash >> 16) as u16 as i16
}

/// The wall clock in microseconds since the Unix epoch.
fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Sends one call's signal: a packet every [`PACKET_INTERVAL`] from its start.
#[derive(Debug)]
pub struct SignalSource {
    seed: u32,
    call_ref: u32,
    next_index: u32,
    sequence: u16,
    next_due: Instant,
    /// Packets handed to the device link.
    pub packets: u64,
    /// Packets the link refused.
    pub send_failed: u64,
}

impl SignalSource {
    /// The signal seeded `seed` on call `call_ref`, its first packet due at `start`.
    pub fn new(seed: u32, call_ref: u32, start: Instant) -> Self {
        SignalSource {
            seed,
            call_ref,
            next_index: 0,
            sequence: 0,
            next_due: start,
            packets: 0,
            send_failed: 0,
        }
    }

    /// The packets due at `now` (at most a second's worth when the sender was late).
    pub fn due(&mut self, now: Instant) -> Vec<Bytes> {
        let mut out = Vec::new();
        while self.next_due <= now && out.len() < MAX_CATCH_UP {
            out.push(self.next_datagram());
            self.next_due += PACKET_INTERVAL;
        }
        out
    }

    fn next_datagram(&mut self) -> Bytes {
        let first = self.next_index;
        let mut payload = Vec::with_capacity(PAYLOAD_BYTES);
        payload.extend_from_slice(&self.seed.to_be_bytes());
        payload.extend_from_slice(&first.to_be_bytes());
        payload.extend_from_slice(&wall_us().to_be_bytes());
        for index in first..first + SAMPLES_PER_PACKET {
            for channel in 0..CHANNELS {
                payload.extend_from_slice(&sample(self.seed, index, channel).to_be_bytes());
            }
        }
        let header = MediaHeader {
            marker: first == 0,
            payload_type: SIGNAL_PAYLOAD_TYPE,
            sequence: self.sequence,
            timestamp: first.wrapping_mul(MS_PER_SAMPLE),
            call_ref: self.call_ref,
            stream_id: StreamId::SIGNAL,
        };
        self.sequence = self.sequence.wrapping_add(1);
        self.next_index = first + SAMPLES_PER_PACKET;
        self.packets += 1;
        header.to_bytes(&payload).unwrap_or_default()
    }

    /// Samples sent per channel.
    pub fn samples_sent(&self) -> u64 {
        u64::from(self.next_index)
    }
}

/// Checks one call's incoming signal, sample by sample.
#[derive(Debug, Default)]
pub struct SignalSink {
    seed: Option<u32>,
    /// The index the next packet should start at.
    next_index: Option<u32>,
    first_index: Option<u32>,
    packets: u64,
    samples: u64,
    /// Samples (per channel) skipped over: a packet started later than expected.
    missing: u64,
    /// Packets that started before the expected index (late or duplicated).
    reordered: u64,
    /// Packets of the wrong size or seed, and samples whose value is wrong.
    bad_packets: u64,
    bad_samples: u64,
    latency_us: Vec<u64>,
}

impl SignalSink {
    /// Counts and checks one packet's payload.
    pub fn on_payload(&mut self, payload: &[u8]) {
        self.packets += 1;
        let field = |at: usize, len: usize| payload.get(at..at + len);
        let (Some(seed), Some(first), Some(sent), true) = (
            field(0, 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_be_bytes),
            field(4, 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_be_bytes),
            field(8, 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes),
            payload.len() == PAYLOAD_BYTES,
        ) else {
            self.bad_packets += 1;
            return;
        };
        if *self.seed.get_or_insert(seed) != seed {
            self.bad_packets += 1;
            return;
        }
        self.first_index.get_or_insert(first);
        match self.next_index {
            Some(expected) if first < expected => {
                self.reordered += 1;
                return;
            }
            Some(expected) => self.missing += u64::from(first - expected),
            None => {}
        }
        self.next_index = Some(first.saturating_add(SAMPLES_PER_PACKET));
        let samples = payload[PREFIX_BYTES..].chunks_exact(2);
        for (n, bytes) in samples.enumerate() {
            let index = first + (n / CHANNELS) as u32;
            let value = i16::from_be_bytes([bytes[0], bytes[1]]);
            if value != sample(seed, index, n % CHANNELS) {
                self.bad_samples += 1;
            }
        }
        self.samples += u64::from(SAMPLES_PER_PACKET);
        if self.latency_us.len() < MAX_LATENCY_SAMPLES {
            self.latency_us.push(wall_us().saturating_sub(sent));
        }
    }

    /// The `signal_report` fields: what arrived and what was wrong with it.
    pub fn report(&self) -> Value {
        let mut latency = self.latency_us.clone();
        latency.sort_unstable();
        let pick = |q: f64| {
            let at = ((latency.len() as f64 - 1.0) * q).round() as usize;
            latency.get(at).map_or(0.0, |us| *us as f64 / 1_000.0)
        };
        json!({
            "channels": CHANNELS,
            "sample_rate": SAMPLE_RATE,
            "packets": self.packets,
            "samples": self.samples,
            "first_sample": self.first_index,
            "missing_samples": self.missing,
            "reordered_packets": self.reordered,
            "bad_packets": self.bad_packets,
            "bad_samples": self.bad_samples,
            "latency_ms_p50": pick(0.5),
            "latency_ms_p99": pick(0.99),
            "latency_ms_max": latency.last().map_or(0.0, |us| *us as f64 / 1_000.0),
        })
    }
}

/// The signal of one call: what the device sends and what it checks.
#[derive(Debug)]
pub struct SignalCall {
    /// Sending, once the call is answered.
    pub source: Option<SignalSource>,
    /// Receiving.
    pub sink: SignalSink,
}

impl SignalCall {
    /// A call whose signal is not flowing yet.
    pub fn new() -> Self {
        SignalCall {
            source: None,
            sink: SignalSink::default(),
        }
    }

    /// Starts sending (once) the signal seeded `seed` on `call_ref` at `now`.
    pub fn start(&mut self, seed: u32, call_ref: u32, now: Instant) {
        self.source
            .get_or_insert_with(|| SignalSource::new(seed, call_ref, now));
    }

    /// The `signal_report` of the call: the receiver's checks and what was sent.
    pub fn report(&self, call_ref: u32) -> Value {
        let mut report = self.sink.report();
        report["call_ref"] = json!(call_ref);
        report["sent_packets"] = json!(self.source.as_ref().map_or(0, |s| s.packets));
        report["sent_samples"] = json!(self.source.as_ref().map_or(0, |s| s.samples_sent()));
        report["send_failed"] = json!(self.source.as_ref().map_or(0, |s| s.send_failed));
        // The seed of what this device sent (a test that captured the wire rebuilds the clear
        // samples from it).
        report["seed"] = json!(self.source.as_ref().map(|s| s.seed));
        report
    }
}

impl Default for SignalCall {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thalamus_proto::media::MediaDatagram;

    fn payloads(source: &mut SignalSource, at: Instant) -> Vec<Bytes> {
        source
            .due(at)
            .into_iter()
            .map(|d| MediaDatagram::decode(d).unwrap().payload)
            .collect()
    }

    #[test]
    fn every_sample_is_checked_and_gaps_reorders_and_corruption_are_counted() {
        let t0 = Instant::now();
        let mut source = SignalSource::new(7, 3, t0);
        // Half a second late: 26 packets due at once, numbered and timed in order.
        let sent = source.due(t0 + Duration::from_millis(500));
        assert_eq!(sent.len(), 26);
        let first = MediaDatagram::decode(sent[1].clone()).unwrap();
        assert_eq!(first.header.stream_id, StreamId::SIGNAL);
        assert_eq!(first.header.payload_type, 98);
        assert_eq!(first.header.timestamp, 20, "5 samples at 4 ms");
        assert_eq!(first.payload.len(), PAYLOAD_BYTES);

        let mut sink = SignalSink::default();
        for d in &sent {
            sink.on_payload(&MediaDatagram::decode(d.clone()).unwrap().payload);
        }
        let r = sink.report();
        assert_eq!(r["samples"], 130);
        assert_eq!(r["first_sample"], 0);
        assert_eq!(
            (r["missing_samples"].as_u64(), r["bad_samples"].as_u64()),
            (Some(0), Some(0))
        );

        // A lost packet, a late one, a flipped sample and a foreign seed are all seen.
        let mut next = payloads(&mut source, t0 + Duration::from_millis(580));
        assert_eq!(next.len(), 4);
        let lost = next.remove(0);
        for p in &next {
            sink.on_payload(p);
        }
        sink.on_payload(&lost);
        let mut corrupt = next[0].to_vec();
        corrupt[PREFIX_BYTES + 3] ^= 1;
        let mut corrupt_next = payloads(&mut source, t0 + Duration::from_millis(600))[0].to_vec();
        corrupt_next[PREFIX_BYTES + 3] ^= 1;
        sink.on_payload(&corrupt_next);
        sink.on_payload(&SignalSource::new(8, 3, t0).due(t0)[0].slice(13..));
        sink.on_payload(&corrupt[..20]);
        let r = sink.report();
        assert_eq!(r["missing_samples"], 5);
        assert_eq!(r["reordered_packets"], 1);
        assert_eq!(r["bad_samples"], 1);
        assert_eq!(r["bad_packets"], 2);
    }
}
