//! The streams of a simulated call besides its audio: the earpiece's signal data
//! ([`crate::signal`], `--signal`) and synthetic video ([`crate::video`], `--video`). One
//! [`CallStreams`] per call sends what is due, takes the datagrams of its streams, asks once
//! for a key frame ([`KEYFRAME_REQUEST_AFTER`] into the call) and answers the other side's
//! requests with one, and prints a `signal_report` and a `video_report` when the call ends.
//!
//! What it does not do: no audio (the echo probe in `crate::media` does), no call control.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use thalamus_device::Client;
use thalamus_proto::media::{MediaHeader, StreamId, HEADER_BYTES};
use thalamus_proto::v1::{MediaOffer, MediaStats, VideoCodec};

use crate::events::stats_json;
use crate::events::EventPrinter;
use crate::load::device_calls::device_media;
use crate::signal::SignalCall;
use crate::video::VideoCall;

/// How long into its video a device asks the other side for a key frame (once per call).
pub const KEYFRAME_REQUEST_AFTER: Duration = Duration::from_secs(1);

/// Which streams besides audio the devices of a run have.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamChoice {
    /// The signal data stream.
    pub signal: bool,
    /// VP8 video.
    pub video: bool,
}

impl StreamChoice {
    /// Whether there is any.
    pub fn any(self) -> bool {
        self.signal || self.video
    }

    /// What the device offers and answers with: [`device_media`] plus these streams.
    pub fn media_offer(self) -> MediaOffer {
        let mut media = device_media();
        media.signal = self.signal;
        if self.video {
            media.video_codecs = vec![VideoCodec::Vp8 as i32];
        }
        media
    }
}

/// The streams of one call.
#[derive(Debug)]
pub struct CallStreams {
    call_ref: u32,
    signal: Option<SignalCall>,
    video: Option<VideoCall>,
    started: Option<Instant>,
}

impl CallStreams {
    /// The streams `choice` names, for call `call_ref`, not flowing yet.
    pub fn new(choice: StreamChoice, call_ref: u32) -> Self {
        CallStreams {
            call_ref,
            signal: choice.signal.then(SignalCall::new),
            video: choice.video.then(VideoCall::default),
            started: None,
        }
    }

    /// Starts sending (once) at `now`, with `seed` for the synthetic content.
    pub fn start(&mut self, seed: u32, now: Instant) {
        self.started.get_or_insert(now);
        if let Some(signal) = self.signal.as_mut() {
            signal.start(seed, self.call_ref, now);
        }
        if let Some(video) = self.video.as_mut() {
            video.start(seed, self.call_ref, now);
        }
    }

    /// Sends what is due at `now`.
    pub fn send_due(&mut self, client: &Client, now: Instant) {
        if let Some(source) = self.signal.as_mut().and_then(|s| s.source.as_mut()) {
            for datagram in source.due(now) {
                if client.send_datagram(datagram).is_err() {
                    source.send_failed += 1;
                }
            }
        }
        if let Some(source) = self.video.as_mut().and_then(|v| v.source.as_mut()) {
            for datagram in source.due(now) {
                if client.send_datagram(datagram).is_err() {
                    source.send_failed += 1;
                }
            }
        }
    }

    /// Whether the device should ask for a key frame now (once per call, with video,
    /// [`KEYFRAME_REQUEST_AFTER`] after the start); counted as sent.
    pub fn keyframe_request_due(&mut self, now: Instant) -> bool {
        let (Some(video), Some(started)) = (self.video.as_mut(), self.started) else {
            return false;
        };
        if video.requests_sent > 0
            || now.saturating_duration_since(started) < KEYFRAME_REQUEST_AFTER
        {
            return false;
        }
        video.requests_sent += 1;
        true
    }

    /// The other side asked for a key frame.
    pub fn key_frame_asked(&mut self) {
        if let Some(video) = self.video.as_mut() {
            video.key_frame_asked();
        }
    }

    /// The call.
    pub fn call_ref(&self) -> u32 {
        self.call_ref
    }

    /// Takes a datagram of one of these streams; gives back any other.
    pub fn take(&mut self, datagram: Bytes) -> Option<Bytes> {
        let Ok(header) = MediaHeader::decode(&datagram) else {
            return Some(datagram);
        };
        let payload = datagram.get(HEADER_BYTES..).unwrap_or_default();
        match (header.stream_id, &mut self.signal, &mut self.video) {
            (StreamId::SIGNAL, Some(signal), _) => signal.sink.on_payload(payload),
            (StreamId::VIDEO, _, Some(video)) => {
                video
                    .sink
                    .on_packet(header.marker, header.sequence, header.timestamp, payload)
            }
            _ => return Some(datagram),
        }
        None
    }

    /// Prints the reports of the call's streams (with the device's id, and the gateway's
    /// statistics of each stream from `gateway`, the media statistics event's `streams`).
    pub fn report(&self, printer: EventPrinter, device: &str, gateway: &[MediaStats]) {
        let of = |stream: StreamId| {
            gateway
                .iter()
                .find(|s| s.stream_id == u32::from(stream.0))
                .map(stats_json)
        };
        if let Some(signal) = &self.signal {
            let mut report = signal.report(self.call_ref);
            report["device"] = json!(device);
            report["gateway"] = json!(of(StreamId::SIGNAL));
            printer.emit("signal_report", report);
        }
        if let Some(video) = &self.video {
            let mut report = video.report(self.call_ref);
            report["device"] = json!(device);
            report["gateway"] = json!(of(StreamId::VIDEO));
            printer.emit("video_report", report);
        }
    }
}

/// The call a datagram belongs to, if it has a media header.
pub fn call_of(datagram: &[u8]) -> Option<u32> {
    MediaHeader::decode(datagram).ok().map(|h| h.call_ref)
}
