//! Video for the simulator: a synthetic VP8 stream ([`VideoSource`]) sent on MBFP stream 1 and
//! the receiver that puts frames together again and checks them ([`VideoSink`]).
//!
//! Frames go at [`FRAMES_PER_SECOND`], payload type 97 (VP8), 90 kHz timestamps, split into
//! packets by RFC 7741's rule as docs/protocol.md section 7.3 says: each packet starts with a
//! one-byte VP8 payload descriptor whose S bit and partition index 0 mark the first packet of a
//! frame, every packet of a frame has the frame's timestamp, and the marker is set on its last
//! packet. A frame is
//! `[P][seed u32][frame number u32][length u32][pattern...]` where P is 0 for a key frame and
//! 1 otherwise (the VP8 inter-frame bit), and the pattern follows from the seed, the frame
//! number and the offset, so the receiver checks every byte. One frame in
//! [`KEYFRAME_INTERVAL`] is a key frame, several times larger, and so is the next frame after
//! a key frame request (MBFP `KeyframeRequest`, which the gateway makes of the peer's RTCP PLI
//! or FIR); the others vary in size so that frames of one, two and several packets all occur.
//!
//! The sink also takes real VP8 from a SIP peer (baresip's `fakevideo` through its `vp8`
//! module): frames are put together by S bit, sequence and marker and counted; only frames
//! that carry the synthetic header are checked byte by byte.
//!
//! What it does not do: no real VP8 bitstream (a decoder would refuse these frames), no
//! jitter buffer (packets of a frame must arrive in order, as they do on loopback), no
//! retransmission.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};
use thalamus_proto::media::{MediaHeader, StreamId};

/// Frames per second.
pub const FRAMES_PER_SECOND: u32 = 15;
/// One frame in this many is a key frame.
pub const KEYFRAME_INTERVAL: u32 = 30;
/// VP8's payload type on the device link.
pub const VP8_PAYLOAD_TYPE: u8 = 97;
/// Largest frame bytes in one packet (a 1200-byte datagram less the 13-byte media header and
/// the descriptor, with room for the 12-byte RTP header on the SIP side).
const MAX_FRAGMENT: usize = 1_100;
/// The descriptor's S bit: the packet starts a VP8 partition.
const START_OF_PARTITION: u8 = 0x10;
/// The descriptor's partition index bits.
const PARTITION_INDEX: u8 = 0x07;
/// A descriptor that starts a frame: S set, partition index 0.
const START_OF_FRAME: u8 = START_OF_PARTITION;
/// The 90 kHz clock's ticks per frame.
const TICKS_PER_FRAME: u32 = 90_000 / FRAMES_PER_SECOND;
/// Bytes of the synthetic header: P, seed, frame number, length.
const FRAME_HEADER: usize = 1 + 4 + 4 + 4;
/// Most frames sent at once to catch up after the sender was late (one second's worth).
const MAX_CATCH_UP: usize = FRAMES_PER_SECOND as usize;
/// Largest frame put together (bigger ones are counted as broken).
const MAX_FRAME: usize = 256 * 1024;

/// The bytes of frame `number` of the stream seeded `seed`, a key frame or not.
pub fn frame(seed: u32, number: u32, key: bool) -> Vec<u8> {
    let len = if key {
        6_000
    } else {
        400 + (number % 7) as usize * 500
    };
    let mut bytes = Vec::with_capacity(len);
    bytes.push(u8::from(!key));
    bytes.extend_from_slice(&seed.to_be_bytes());
    bytes.extend_from_slice(&number.to_be_bytes());
    bytes.extend_from_slice(&(len as u32).to_be_bytes());
    let mix = seed.wrapping_mul(31).wrapping_add(number) as u8;
    bytes.extend((FRAME_HEADER..len).map(|i| (i as u8).wrapping_mul(13) ^ mix));
    bytes
}

/// Sends one call's video: a frame every 1/[`FRAMES_PER_SECOND`] s from its start.
#[derive(Debug)]
pub struct VideoSource {
    seed: u32,
    call_ref: u32,
    next_frame: u32,
    sequence: u16,
    started: Instant,
    /// The next frame is a key frame (one was asked for).
    key_asked: bool,
    /// Frames sent.
    pub frames: u64,
    /// Packets handed to the device link.
    pub packets: u64,
    /// Packets the link refused.
    pub send_failed: u64,
}

impl VideoSource {
    /// The stream seeded `seed` on call `call_ref`, its first frame due at `start`.
    pub fn new(seed: u32, call_ref: u32, start: Instant) -> Self {
        VideoSource {
            seed,
            call_ref,
            next_frame: 0,
            sequence: 0,
            started: start,
            key_asked: false,
            frames: 0,
            packets: 0,
            send_failed: 0,
        }
    }

    /// The next frame goes as a key frame (the receiver asked for one).
    pub fn key_frame_asked(&mut self) {
        self.key_asked = true;
    }

    fn due_at(&self, number: u32) -> Instant {
        self.started + Duration::from_secs(1) * number / FRAMES_PER_SECOND
    }

    /// The packets of the frames due at `now` (at most a second's worth when late).
    pub fn due(&mut self, now: Instant) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut frames = 0;
        while self.due_at(self.next_frame) <= now && frames < MAX_CATCH_UP {
            let number = self.next_frame;
            let key =
                number.is_multiple_of(KEYFRAME_INTERVAL) || std::mem::take(&mut self.key_asked);
            let bytes = frame(self.seed, number, key);
            let chunks: Vec<&[u8]> = bytes.chunks(MAX_FRAGMENT).collect();
            for (i, chunk) in chunks.iter().enumerate() {
                let header = MediaHeader {
                    marker: i + 1 == chunks.len(),
                    payload_type: VP8_PAYLOAD_TYPE,
                    sequence: self.sequence,
                    timestamp: number.wrapping_mul(TICKS_PER_FRAME),
                    call_ref: self.call_ref,
                    stream_id: StreamId::VIDEO,
                };
                let mut payload = Vec::with_capacity(chunk.len() + 1);
                payload.push(if i == 0 { START_OF_FRAME } else { 0 });
                payload.extend_from_slice(chunk);
                self.sequence = self.sequence.wrapping_add(1);
                self.packets += 1;
                out.push(header.to_bytes(&payload).unwrap_or_default());
            }
            self.next_frame += 1;
            self.frames += 1;
            frames += 1;
        }
        out
    }
}

/// The frame being put together.
#[derive(Debug)]
struct Assembly {
    timestamp: u32,
    next_sequence: u16,
    bytes: Vec<u8>,
}

/// Puts one call's incoming video frames together and checks them.
#[derive(Debug, Default)]
pub struct VideoSink {
    current: Option<Assembly>,
    packets: u64,
    /// Frames whose every packet arrived, in order.
    frames: u64,
    key_frames: u64,
    /// Frames with a packet missing or out of place.
    broken: u64,
    /// Complete synthetic frames whose bytes are wrong.
    bad: u64,
    /// Complete synthetic frames checked byte for byte.
    checked: u64,
    /// Frame numbers skipped over between synthetic frames.
    skipped: u64,
    last_number: Option<u32>,
    /// The rest of a frame already counted as broken is being passed over.
    passing_over: bool,
    /// Frames in more than one packet.
    fragmented: u64,
    packets_in_frame: u64,
}

impl VideoSink {
    /// Takes one packet: the media header's marker, sequence and timestamp, and its payload
    /// (the VP8 descriptor first).
    pub fn on_packet(&mut self, marker: bool, sequence: u16, timestamp: u32, payload: &[u8]) {
        self.packets += 1;
        let Some((&descriptor, data)) = payload.split_first() else {
            self.broken += 1;
            return;
        };
        let data = skip_descriptor_extensions(descriptor, data);
        // A frame starts with partition 0; a libvpx packetizer also marks the start of each
        // later partition (S set, another index), which belongs to the same frame.
        if descriptor & (START_OF_PARTITION | PARTITION_INDEX) == START_OF_FRAME {
            if self.current.take().is_some() {
                // The previous frame never saw its last packet.
                self.broken += 1;
            }
            self.packets_in_frame = 0;
            self.passing_over = false;
            self.current = Some(Assembly {
                timestamp,
                next_sequence: sequence,
                bytes: Vec::new(),
            });
        }
        let Some(assembly) = self.current.as_mut() else {
            // A frame whose first packet was lost: counted once, at its marker (unless it
            // was counted already).
            if marker {
                if !self.passing_over {
                    self.broken += 1;
                }
                self.passing_over = false;
            }
            return;
        };
        if assembly.timestamp != timestamp
            || assembly.next_sequence != sequence
            || assembly.bytes.len() + data.len() > MAX_FRAME
        {
            self.current = None;
            self.broken += 1;
            self.passing_over = !marker;
            return;
        }
        assembly.next_sequence = sequence.wrapping_add(1);
        assembly.bytes.extend_from_slice(data);
        self.packets_in_frame += 1;
        if marker {
            if let Some(done) = self.current.take() {
                if self.packets_in_frame > 1 {
                    self.fragmented += 1;
                }
                self.complete(&done.bytes);
            }
        }
    }

    fn complete(&mut self, bytes: &[u8]) {
        self.frames += 1;
        if bytes.first().is_some_and(|p| p & 1 == 0) {
            self.key_frames += 1;
        }
        let word = |at: usize| {
            bytes
                .get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_be_bytes)
        };
        let (Some(seed), Some(number), Some(len)) = (word(1), word(5), word(9)) else {
            return;
        };
        if len as usize != bytes.len() {
            // Not one of ours (a real VP8 frame): counted, not checked.
            return;
        }
        self.checked += 1;
        let key = bytes.first().is_some_and(|p| p & 1 == 0);
        if bytes != frame(seed, number, key).as_slice() {
            self.bad += 1;
        }
        if let Some(last) = self.last_number {
            self.skipped += u64::from(number.saturating_sub(last).saturating_sub(1));
        }
        self.last_number = Some(number);
    }

    /// The receiving half of a `video_report`.
    pub fn report(&self) -> Value {
        json!({
            "packets": self.packets,
            "frames": self.frames,
            "key_frames": self.key_frames,
            "fragmented_frames": self.fragmented,
            "broken_frames": self.broken,
            "checked_frames": self.checked,
            "bad_frames": self.bad,
            "skipped_frames": self.skipped,
        })
    }
}

/// The VP8 payload bytes after the descriptor's optional extension bytes (RFC 7741 section
/// 4.2: X, then I/L/T/K, a one- or two-byte PictureID).
fn skip_descriptor_extensions(descriptor: u8, data: &[u8]) -> &[u8] {
    if descriptor & 0x80 == 0 {
        return data;
    }
    let Some((&ext, rest)) = data.split_first() else {
        return data;
    };
    let mut skip = 0;
    if ext & 0x80 != 0 {
        // PictureID: two bytes when its M bit is set.
        skip += if rest.first().is_some_and(|b| b & 0x80 != 0) {
            2
        } else {
            1
        };
    }
    if ext & 0x40 != 0 {
        skip += 1; // TL0PICIDX
    }
    if ext & 0x30 != 0 {
        skip += 1; // TID/Y/KEYIDX
    }
    rest.get(skip..).unwrap_or_default()
}

/// The video of one call: what the device sends and what it receives.
#[derive(Debug, Default)]
pub struct VideoCall {
    /// Sending, once the call is answered.
    pub source: Option<VideoSource>,
    /// Receiving.
    pub sink: VideoSink,
    /// Key frame requests this device sent, and those it received.
    pub requests_sent: u64,
    /// Key frame requests received (each makes the next frame a key frame).
    pub requests_received: u64,
}

impl VideoCall {
    /// The other side asked for a key frame.
    pub fn key_frame_asked(&mut self) {
        self.requests_received += 1;
        if let Some(source) = self.source.as_mut() {
            source.key_frame_asked();
        }
    }

    /// Starts sending (once) the stream seeded `seed` on `call_ref` at `now`.
    pub fn start(&mut self, seed: u32, call_ref: u32, now: Instant) {
        self.source
            .get_or_insert_with(|| VideoSource::new(seed, call_ref, now));
    }

    /// The `video_report` of the call.
    pub fn report(&self, call_ref: u32) -> Value {
        let mut report = self.sink.report();
        report["call_ref"] = json!(call_ref);
        let source = self.source.as_ref();
        report["sent_frames"] = json!(source.map_or(0, |s| s.frames));
        report["sent_packets"] = json!(source.map_or(0, |s| s.packets));
        report["send_failed"] = json!(source.map_or(0, |s| s.send_failed));
        report["keyframe_requests_sent"] = json!(self.requests_sent);
        report["keyframe_requests_received"] = json!(self.requests_received);
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thalamus_proto::media::MediaDatagram;

    fn feed(sink: &mut VideoSink, datagram: &Bytes) {
        let d = MediaDatagram::decode(datagram.clone()).unwrap();
        sink.on_packet(
            d.header.marker,
            d.header.sequence,
            d.header.timestamp,
            &d.payload,
        );
    }

    #[test]
    fn frames_split_into_packets_come_together_and_losses_are_seen() {
        let t0 = Instant::now();
        let mut source = VideoSource::new(5, 1, t0);
        // Two seconds late: one second's worth of frames (15) at once.
        let packets = source.due(t0 + Duration::from_secs(2));
        assert_eq!(source.frames, 15);
        assert!(
            packets.len() > 15,
            "the key frame and the big ones take several"
        );
        let first = MediaDatagram::decode(packets[0].clone()).unwrap();
        assert_eq!(first.header.stream_id, StreamId::VIDEO);
        assert_eq!(first.header.payload_type, 97);
        assert!(packets.iter().all(|p| p.len() <= 1_200));

        let mut sink = VideoSink::default();
        for p in &packets {
            feed(&mut sink, p);
        }
        let r = sink.report();
        assert_eq!(
            (r["frames"].as_u64(), r["checked_frames"].as_u64()),
            (Some(15), Some(15))
        );
        assert_eq!(r["key_frames"], 1);
        assert_eq!(
            (r["bad_frames"].as_u64(), r["broken_frames"].as_u64()),
            (Some(0), Some(0))
        );
        assert!(r["fragmented_frames"].as_u64().unwrap() >= 2);

        // The next second: one packet of a fragmented frame lost, one byte flipped in another.
        let mut packets = source.due(t0 + Duration::from_secs(3));
        let multi = (0..packets.len() - 1)
            .find(|&i| {
                let d = MediaDatagram::decode(packets[i].clone()).unwrap();
                !d.header.marker && d.payload[0] & START_OF_FRAME != 0
            })
            .unwrap();
        packets.remove(multi + 1);
        let mut corrupt = packets[0].to_vec();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        packets[0] = Bytes::from(corrupt);
        for p in &packets {
            feed(&mut sink, p);
        }
        let r = sink.report();
        assert_eq!(r["broken_frames"], 1, "{r}");
        assert_eq!(r["bad_frames"], 1, "{r}");
        assert_eq!(r["frames"], 29, "{r}");
        assert_eq!(r["skipped_frames"], 1, "{r}");

        // Frame 30 is a key frame by the interval; a key frame asked for makes frame 31 one
        // too, and it checks out.
        for p in source.due(t0 + Duration::from_millis(3_010)) {
            feed(&mut sink, &p);
        }
        source.key_frame_asked();
        for p in source.due(t0 + Duration::from_millis(3_070)) {
            feed(&mut sink, &p);
        }
        let r = sink.report();
        assert_eq!(
            (r["key_frames"].as_u64(), r["bad_frames"].as_u64()),
            (Some(3), Some(1))
        );
    }

    #[test]
    fn descriptor_extensions_are_skipped() {
        // X with a two-byte PictureID, as libvpx packetizers send.
        let payload = [0x90u8, 0x80, 0x81, 0x02, 0xaa, 0xbb];
        assert_eq!(
            skip_descriptor_extensions(payload[0], &payload[1..]),
            &[0xaa, 0xbb]
        );
        assert_eq!(skip_descriptor_extensions(0x10, &[0xaa]), &[0xaa]);
    }
}
