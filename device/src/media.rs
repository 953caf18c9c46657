//! Media for a device, sans-IO: numbering what it sends, and putting what it receives back in
//! order.
//!
//! [`MediaSender`] builds the datagrams of one stream of one call (docs/protocol.md, section
//! 7: the 13-byte header with payload type, sequence number, timestamp, call ref and stream
//! id), numbering them from a random start and advancing the timestamp by the samples sent.
//! [`JitterBuffer`] takes received datagrams of one stream in any order and gives them back in
//! sequence: a missing one is waited for at most `max_delay` (then skipped and counted lost),
//! duplicates and late ones are dropped and counted, and at most `depth` are held.
//!
//! It does no I/O and reads no clock: the caller passes `now`. It does not decode or encode
//! audio or video.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use thalamus_proto::media::{MediaDatagram, MediaError, MediaHeader, StreamId};

/// Builds one stream's datagrams.
#[derive(Debug, Clone)]
pub struct MediaSender {
    header: MediaHeader,
}

impl MediaSender {
    /// A sender for `stream` of call `call_ref`, with RTP payload type `payload_type`, its
    /// first sequence number and timestamp `first_sequence` and `first_timestamp` (random
    /// values, as RTP wants).
    pub fn new(
        call_ref: u32,
        stream: StreamId,
        payload_type: u8,
        first_sequence: u16,
        first_timestamp: u32,
    ) -> Self {
        Self {
            header: MediaHeader {
                marker: false,
                payload_type,
                sequence: first_sequence,
                timestamp: first_timestamp,
                call_ref,
                stream_id: stream,
            },
        }
    }

    /// The datagram carrying `payload`, which holds `samples` samples of the stream's clock
    /// (160 for 20 ms of 8 kHz audio); `marker` as in RTP (the first packet of a talk spurt,
    /// the last of a video frame). Numbers the next one.
    pub fn next(
        &mut self,
        payload: &[u8],
        samples: u32,
        marker: bool,
    ) -> Result<Bytes, MediaError> {
        self.header.marker = marker;
        let bytes = self.header.to_bytes(payload)?;
        self.header.sequence = self.header.sequence.wrapping_add(1);
        self.header.timestamp = self.header.timestamp.wrapping_add(samples);
        Ok(bytes)
    }

    /// The sequence number the next datagram gets.
    pub fn next_sequence(&self) -> u16 {
        self.header.sequence
    }
}

/// What a [`JitterBuffer`] counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JitterStats {
    /// Datagrams given back in order.
    pub delivered: u64,
    /// Sequence numbers skipped after waiting `max_delay` (or to make room).
    pub lost: u64,
    /// Datagrams that came after their turn, or twice.
    pub late_or_duplicate: u64,
}

/// Puts one stream's datagrams back in sequence order (see the module notes).
#[derive(Debug)]
pub struct JitterBuffer {
    depth: usize,
    max_delay: Duration,
    /// The sequence number given back next (`None` before the first datagram).
    next: Option<u16>,
    /// Held datagrams by their distance from `next`, with when each arrived.
    held: BTreeMap<u16, (Instant, MediaDatagram)>,
    stats: JitterStats,
}

impl JitterBuffer {
    /// A buffer holding at most `depth` datagrams, waiting at most `max_delay` for a missing
    /// one (e.g. 8 and 60 ms for 20 ms audio).
    pub fn new(depth: usize, max_delay: Duration) -> Self {
        Self {
            depth: depth.max(1),
            max_delay,
            next: None,
            held: BTreeMap::new(),
            stats: JitterStats::default(),
        }
    }

    /// What it counted so far.
    pub fn stats(&self) -> JitterStats {
        self.stats
    }

    /// Datagrams held now.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// A datagram arrived at `now`.
    pub fn push(&mut self, now: Instant, datagram: MediaDatagram) {
        let seq = datagram.header.sequence;
        let next = *self.next.get_or_insert(seq);
        // Distance ahead of the next expected, on the 16-bit circle: more than half way round
        // is behind (late).
        let ahead = seq.wrapping_sub(next);
        if ahead >= 0x8000 || self.held.contains_key(&ahead) {
            self.stats.late_or_duplicate += 1;
            return;
        }
        self.held.insert(ahead, (now, datagram));
        // Too many held: give up on whatever is missing before the oldest held, then on the
        // oldest itself (the application is not taking them).
        while self.held.len() > self.depth {
            if self.held.keys().next() == Some(&0) {
                self.held.pop_first();
                self.stats.lost += 1;
                self.advance(1);
            } else {
                self.skip_to_first();
            }
        }
    }

    /// The next datagram in order, if it is here, or once the missing ones before the oldest
    /// held have been waited for `max_delay`.
    pub fn pop(&mut self, now: Instant) -> Option<MediaDatagram> {
        let (&first, (arrived, _)) = self.held.iter().next()?;
        if first != 0 {
            if now.saturating_duration_since(*arrived) < self.max_delay {
                return None;
            }
            self.skip_to_first();
        }
        let (_, (_, datagram)) = self.held.pop_first()?;
        self.advance(1);
        self.stats.delivered += 1;
        Some(datagram)
    }

    /// When [`JitterBuffer::pop`] may give something that it cannot now (the wait for a
    /// missing datagram ends).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let (&first, (arrived, _)) = self.held.iter().next()?;
        (first != 0).then(|| *arrived + self.max_delay)
    }

    /// Counts the sequence numbers before the oldest held as lost and moves on to it.
    fn skip_to_first(&mut self) {
        let Some(&first) = self.held.keys().next() else {
            return;
        };
        self.stats.lost += u64::from(first);
        self.advance(first);
    }

    /// Moves `next` on by `by`, renumbering what is held.
    fn advance(&mut self, by: u16) {
        if by == 0 {
            return;
        }
        if let Some(n) = self.next.as_mut() {
            *n = n.wrapping_add(by);
        }
        let held = std::mem::take(&mut self.held);
        self.held = held
            .into_iter()
            .map(|(k, v)| (k.wrapping_sub(by), v))
            .collect();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn datagrams(first: u16, n: u16) -> Vec<MediaDatagram> {
        let mut sender = MediaSender::new(7, StreamId::AUDIO, 0, first, 1000);
        (0..n)
            .map(|i| {
                let bytes = sender.next(&[i as u8; 160], 160, i == 0).unwrap();
                MediaDatagram::decode(bytes).unwrap()
            })
            .collect()
    }

    #[test]
    fn the_sender_numbers_and_times_its_datagrams() {
        let d = datagrams(65_534, 3);
        let seqs: Vec<u16> = d.iter().map(|d| d.header.sequence).collect();
        assert_eq!(seqs, [65_534, 65_535, 0]);
        let ts: Vec<u32> = d.iter().map(|d| d.header.timestamp).collect();
        assert_eq!(ts, [1000, 1160, 1320]);
        assert!(d[0].header.marker && !d[1].header.marker);
        assert_eq!(
            (d[2].header.call_ref, d[2].header.stream_id),
            (7, StreamId::AUDIO)
        );
        assert_eq!(d[1].payload.len(), 160);
    }

    #[test]
    fn reordered_datagrams_come_back_in_order_across_the_wrap() {
        let t0 = Instant::now();
        let d = datagrams(65_533, 6);
        let mut jb = JitterBuffer::new(8, Duration::from_millis(60));
        for i in [0, 2, 1, 4, 3, 5] {
            jb.push(t0, d[i].clone());
        }
        let out: Vec<u16> = std::iter::from_fn(|| jb.pop(t0))
            .map(|d| d.header.sequence)
            .collect();
        assert_eq!(out, [65_533, 65_534, 65_535, 0, 1, 2]);
        assert_eq!(jb.stats().delivered, 6);
        // One that comes again, or after its turn: dropped and counted.
        jb.push(t0, d[5].clone());
        jb.push(t0, d[0].clone());
        assert_eq!(jb.stats().late_or_duplicate, 2);
        assert!(jb.pop(t0).is_none());
    }

    #[test]
    fn a_missing_datagram_is_waited_for_then_skipped() {
        let t0 = Instant::now();
        let d = datagrams(100, 4);
        let mut jb = JitterBuffer::new(8, Duration::from_millis(60));
        jb.push(t0, d[0].clone());
        assert_eq!(jb.pop(t0).unwrap().header.sequence, 100);
        // 101 is missing: 102 waits for it.
        let t1 = t0 + Duration::from_millis(20);
        jb.push(t1, d[2].clone());
        assert!(jb.pop(t1).is_none());
        assert_eq!(jb.poll_timeout(), Some(t1 + Duration::from_millis(60)));
        // It comes in time: both, in order.
        jb.push(t1 + Duration::from_millis(10), d[1].clone());
        let t2 = t1 + Duration::from_millis(10);
        assert_eq!(jb.pop(t2).unwrap().header.sequence, 101);
        assert_eq!(jb.pop(t2).unwrap().header.sequence, 102);
        // 103 never comes; 104 would wait, then 103 is counted lost.
        let mut sender = MediaSender::new(7, StreamId::AUDIO, 0, 104, 0);
        let d104 = MediaDatagram::decode(sender.next(b"x", 160, false).unwrap()).unwrap();
        jb.push(t2, d104);
        assert!(jb.pop(t2 + Duration::from_millis(59)).is_none());
        assert_eq!(
            jb.pop(t2 + Duration::from_millis(60))
                .unwrap()
                .header
                .sequence,
            104
        );
        assert_eq!(jb.stats().lost, 1);
    }

    #[test]
    fn the_buffer_holds_at_most_its_depth() {
        let t0 = Instant::now();
        let d = datagrams(0, 12);
        let mut jb = JitterBuffer::new(4, Duration::from_secs(10));
        jb.push(t0, d[0].clone());
        jb.pop(t0);
        // 1 is lost; 2..=11 arrive: the buffer gives up on 1 rather than hold 10.
        for item in d.iter().skip(2) {
            jb.push(t0, item.clone());
            assert!(jb.len() <= 4);
        }
        let out: Vec<u16> = std::iter::from_fn(|| jb.pop(t0))
            .map(|d| d.header.sequence)
            .collect();
        assert_eq!(out.first(), Some(&8));
        assert_eq!(out.last(), Some(&11));
        assert_eq!(jb.stats().lost, 7);
    }
}
