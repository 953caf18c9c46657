//! A call's media relays, one per stream it carries: audio always, video and the signal data
//! stream when the call negotiated them (each its own RTP port pair, SSRC and statistics), and
//! [`StreamInputs`], which routes each device datagram to the relay of its stream.
//!
//! What it does not do: no RTP and no sockets (`thalamus_media`), no SDP (`crate::media_sdp`),
//! no decision of which streams a call has (the call core's [`super::core::RelayStreams`]).

use bytes::Bytes;
use thalamus_media::{DeviceInput, MediaRelay, RelayStats};
use thalamus_proto::media::{StreamId, HEADER_BYTES};

/// Number of streams a call can have (audio, video, signal data: the MBFP v1 stream ids).
const STREAMS: usize = 3;

/// The device inputs of a call's relays, by stream (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct StreamInputs {
    inputs: [Option<DeviceInput>; STREAMS],
}

impl StreamInputs {
    /// Queues a device datagram at its stream's relay without waiting. A datagram for a
    /// stream the call has no relay for, too short to name one, or naming an unknown one goes
    /// to the audio relay, which drops and counts it.
    pub fn feed(&self, datagram: Bytes) {
        let stream = datagram
            .get(HEADER_BYTES - 1)
            .map_or(0, |&id| usize::from(id));
        let input = self
            .inputs
            .get(stream)
            .and_then(Option::as_ref)
            .or(self.inputs[0].as_ref());
        if let Some(input) = input {
            let _ = input.feed(datagram);
        }
    }
}

/// The relays of one call; the audio one is first.
pub(crate) struct CallRelays {
    relays: Vec<(StreamId, MediaRelay)>,
    /// The final statistics of relays stopped before the call ended.
    stopped: Vec<(StreamId, RelayStats)>,
}

impl CallRelays {
    /// The relays of a call whose audio relay is `audio`.
    pub(crate) fn new(audio: MediaRelay) -> Self {
        let mut relays = Vec::with_capacity(STREAMS);
        relays.push((StreamId::AUDIO, audio));
        CallRelays {
            relays,
            stopped: Vec::new(),
        }
    }

    /// Takes the relay of `stream` out of the call (never the audio one): its device
    /// datagrams go to the audio relay from then on, which drops and counts them (refresh the
    /// [`StreamInputs`] first, then stop it and hand its statistics to
    /// [`CallRelays::stopped`]).
    pub(crate) fn take_stream(&mut self, stream: StreamId) -> Option<MediaRelay> {
        if stream == StreamId::AUDIO {
            return None;
        }
        let index = self.relays.iter().position(|(s, _)| *s == stream)?;
        Some(self.relays.remove(index).1)
    }

    /// Keeps the final statistics of a relay taken out, for [`CallRelays::stop`].
    pub(crate) fn stopped(&mut self, stream: StreamId, stats: Option<RelayStats>) {
        if let Some(stats) = stats {
            self.stopped.push((stream, stats));
        }
    }

    /// Adds the relay of another stream.
    pub(crate) fn add(&mut self, stream: StreamId, relay: MediaRelay) {
        self.relays.push((stream, relay));
    }

    /// The relay of `stream`, if the call has one.
    pub(crate) fn get(&self, stream: StreamId) -> Option<&MediaRelay> {
        self.relays
            .iter()
            .find(|(s, _)| *s == stream)
            .map(|(_, relay)| relay)
    }

    /// Every relay, with its stream.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &(StreamId, MediaRelay)> {
        self.relays.iter()
    }

    /// A statistics probe of every relay, with its stream (for the operator console).
    pub(crate) fn probes(&self) -> Vec<(StreamId, thalamus_media::StatsProbe)> {
        self.relays
            .iter()
            .map(|(stream, relay)| (*stream, relay.stats_probe()))
            .collect()
    }

    /// The RTP port of `stream`'s relay.
    pub(crate) fn port(&self, stream: StreamId) -> Option<u16> {
        self.get(stream).map(|r| r.local_rtp_addr().port())
    }

    /// The inputs the device's datagrams go through.
    pub(crate) fn inputs(&self) -> StreamInputs {
        let mut inputs = StreamInputs::default();
        for (stream, relay) in &self.relays {
            if let Some(slot) = inputs.inputs.get_mut(usize::from(stream.0)) {
                *slot = Some(relay.device_input());
            }
        }
        inputs
    }

    /// Stops every relay; the final statistics of each the call had, by stream id (audio
    /// first).
    pub(crate) async fn stop(self) -> Vec<(StreamId, RelayStats)> {
        let mut stats = self.stopped;
        for (stream, relay) in self.relays {
            if let Ok(s) = relay.stop().await {
                stats.push((stream, s));
            }
        }
        stats.sort_by_key(|(stream, _)| stream.0);
        stats
    }
}
