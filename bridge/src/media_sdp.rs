//! SDP glue between MBFP media descriptions and the SIP side: device codec lists to SDP codecs
//! (with the fixed device-link payload types of docs/protocol.md) and back, the local media
//! description of a call's relays (audio, and video and the signal data stream when the device
//! has them), and which stream of a remote description feeds which relay.
//!
//! The signal data stream (MBFP stream 2) travels as `m=application <port> RTP/AVP 98` with
//! `a=rtpmap:98 x-mbfp-signal/1000`; a peer that does not know the format rejects the line and
//! the call goes on with audio (and video).
//!
//! SRTP toward the peer (SDES, RFC 4568): each stream gets keys of its own for each suite it
//! offers ([`StreamKeys`], fresh per relay start, so a takeover re-keys), the configured policy
//! decides whether offers are `RTP/SAVP` and whether plain offers are taken, and
//! [`srtp_keys`] pairs our key and the peer's by tag for the relay.

use std::net::IpAddr;

use thalamus_media::SrtpKeys;
use thalamus_proto::media::{StreamId, SIGNAL_CLOCK_RATE, SIGNAL_ENCODING, SIGNAL_PAYLOAD_TYPE};
use thalamus_proto::v1::{AudioCodec, MediaOffer, VideoCodec};
use thalamus_sip::sdp::{
    Codec, Crypto, CryptoSuite, LocalMedia, MediaKind, RemoteMedia, RtcpFeedback,
    SessionDescription, SrtpPolicy,
};

/// The SDP format of the signal data stream.
pub fn signal_codec() -> Codec {
    Codec::new(SIGNAL_ENCODING, SIGNAL_CLOCK_RATE, 1, SIGNAL_PAYLOAD_TYPE)
}

/// The suites offered, in order (tags 1, 2, ...): AEAD first, the RFC 4568 default second.
pub const OFFERED_SUITES: [CryptoSuite; 2] =
    [CryptoSuite::AeadAes128Gcm, CryptoSuite::AesCm128HmacSha1_80];

/// This side's SDES keys for a call, per stream: one per offered suite (empty: none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamKeys {
    /// The audio stream's.
    pub audio: Vec<Crypto>,
    /// The video stream's.
    pub video: Vec<Crypto>,
    /// The signal data stream's.
    pub signal: Vec<Crypto>,
}

impl StreamKeys {
    /// No keys (plain RTP).
    pub const NONE: StreamKeys = StreamKeys {
        audio: Vec::new(),
        video: Vec::new(),
        signal: Vec::new(),
    };

    /// Fresh keys for every stream and offered suite, their bytes from `fill` (a secure random
    /// source).
    pub fn generate(mut fill: impl FnMut(&mut [u8])) -> StreamKeys {
        let mut keys = || {
            OFFERED_SUITES
                .iter()
                .zip(1u32..)
                .map(|(suite, tag)| {
                    let (key, salt) = suite.key_and_salt_len();
                    let mut material = vec![0u8; key + salt];
                    fill(&mut material);
                    Crypto::new(tag, *suite, material)
                })
                .collect::<Vec<_>>()
        };
        StreamKeys {
            audio: keys(),
            video: keys(),
            signal: keys(),
        }
    }
}

/// The keys the relay of a remote stream uses: our key and the peer's under the same tag and
/// suite (ours from the m-line at the same position of our description). `None` for plain RTP:
/// neither our m-line nor the peer's is SRTP. An SRTP stream whose keys do not pair gets keys
/// no context can be made of, and its relay then sends and takes nothing rather than plain RTP:
/// a peer that answered our `RTP/SAVP` with `RTP/AVP` or without a usable `a=crypto`, or one
/// that broke the rules otherwise.
pub fn srtp_keys(remote: &RemoteMedia, local: Option<&SessionDescription>) -> Option<SrtpKeys> {
    let ours = local.and_then(|l| l.media.get(remote.index));
    if remote.crypto.is_empty() && !ours.is_some_and(|m| m.is_secure()) {
        return None;
    }
    let ours = ours.map(|m| m.cryptos()).unwrap_or_default();
    let paired = ours.iter().filter(|c| c.is_usable()).find_map(|mine| {
        let theirs = remote
            .crypto
            .iter()
            .find(|t| t.tag == mine.tag && t.suite == mine.suite && t.is_usable())?;
        Some(SrtpKeys {
            suite: mine.known_suite()?,
            local: mine.key_salt.clone(),
            remote: theirs.key_salt.clone(),
        })
    });
    Some(paired.unwrap_or(SrtpKeys {
        suite: CryptoSuite::AesCm128HmacSha1_80,
        local: Vec::new(),
        remote: Vec::new(),
    }))
}

/// Which streams of a call have a relay (audio always has one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamPorts {
    /// The audio relay's RTP port.
    pub audio: u16,
    /// The video relay's RTP port, if the call has one.
    pub video: Option<u16>,
    /// The signal data relay's RTP port, if the call has one.
    pub signal: Option<u16>,
    /// The relays that take RTCP on their RTP port and have no RTCP port (RFC 5761).
    pub rtcp_mux: RtcpMux,
}

/// Per stream of a call, whether RTCP shares the RTP port (RFC 5761): which offered m-lines
/// have `a=rtcp-mux`, or which relays were started with one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RtcpMux {
    /// The audio stream.
    pub audio: bool,
    /// The video stream.
    pub video: bool,
    /// The signal data stream.
    pub signal: bool,
}

impl RtcpMux {
    /// The flag of `stream` (false for a stream the call does not know).
    pub fn of(&self, stream: StreamId) -> bool {
        match stream {
            StreamId::AUDIO => self.audio,
            StreamId::VIDEO => self.video,
            StreamId::SIGNAL => self.signal,
            _ => false,
        }
    }

    /// The streams of a remote offer ([`streams`]) whose m-line has `a=rtcp-mux`.
    pub fn offered(streams: &[(StreamId, RemoteMedia)]) -> Self {
        let has = |stream: StreamId| streams.iter().any(|(s, m)| *s == stream && m.rtcp_mux);
        RtcpMux {
            audio: has(StreamId::AUDIO),
            video: has(StreamId::VIDEO),
            signal: has(StreamId::SIGNAL),
        }
    }
}

/// SDP codecs for the audio codecs a device lists (in its order). Telephone-event is always
/// offered so DTMF can travel in the media.
pub fn audio_codecs(offer: Option<&MediaOffer>) -> Vec<Codec> {
    let listed: Vec<AudioCodec> = offer
        .map(|m| {
            m.audio_codecs
                .iter()
                .filter_map(|c| AudioCodec::try_from(*c).ok())
                .collect()
        })
        .unwrap_or_default();
    let listed = if listed.is_empty() {
        vec![AudioCodec::Pcmu, AudioCodec::Pcma]
    } else {
        listed
    };
    let mut codecs: Vec<Codec> = listed
        .iter()
        .filter_map(|c| match c {
            AudioCodec::Pcmu => Some(Codec::pcmu()),
            AudioCodec::Pcma => Some(Codec::pcma()),
            AudioCodec::G722 => Some(Codec::g722()),
            AudioCodec::Opus => Some(Codec::opus(111)),
            AudioCodec::TelephoneEvent | AudioCodec::Unspecified => None,
        })
        .collect();
    codecs.push(Codec::telephone_event(101, 8000));
    codecs
}

/// SDP codecs for the video codecs a device lists.
pub fn video_codecs(offer: Option<&MediaOffer>) -> Vec<Codec> {
    offer
        .map(|m| {
            m.video_codecs
                .iter()
                .filter_map(|c| match VideoCodec::try_from(*c).ok()? {
                    VideoCodec::H264 => Some(Codec::h264(96, "packetization-mode=1")),
                    VideoCodec::Vp8 => Some(Codec::vp8(97)),
                    VideoCodec::Unspecified => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The local media of a call: the relays' address and ports, and the device's codecs. Video
/// and the signal data stream are described when they have a relay and the device has them.
/// Each stream carries its SRTP keys for the policy to use.
pub fn local_media(
    address: IpAddr,
    ports: StreamPorts,
    offer: Option<&MediaOffer>,
    srtp: SrtpPolicy,
    keys: &StreamKeys,
) -> LocalMedia {
    let mut local = LocalMedia::audio(address, ports.audio, audio_codecs(offer));
    local.ptime = Some(20);
    local.srtp = srtp;
    let video = video_codecs(offer);
    if let (Some(port), false) = (ports.video, video.is_empty()) {
        local = local.with_video(port, video);
        // Key frame requests both ways (RFC 4585 PLI, RFC 5104 FIR): the device's
        // `KeyframeRequest` and the peer's.
        if let Some(video) = local.video.as_mut() {
            video.feedback = RtcpFeedback::KEY_FRAMES;
        }
    }
    if let (Some(port), true) = (ports.signal, offer.is_some_and(|o| o.signal)) {
        local = local.with_application(port, vec![signal_codec()]);
    }
    for (config, keys, mux) in [
        (&mut local.audio, &keys.audio, ports.rtcp_mux.audio),
        (&mut local.video, &keys.video, ports.rtcp_mux.video),
        (&mut local.application, &keys.signal, ports.rtcp_mux.signal),
    ] {
        if let Some(config) = config {
            config.crypto = keys.clone();
            config.rtcp_mux = mux;
        }
    }
    local
}

/// Whether an SDP stream is the signal data stream (an application stream over RTP with the
/// `x-mbfp-signal` format).
fn is_signal(media: &RemoteMedia) -> bool {
    media.kind == MediaKind::Application
        && media.codecs.iter().any(|c| c.same_format(&signal_codec()))
}

/// The streams of a description the call's relays take: the first active audio and video
/// streams and the first active signal data stream, each with its MBFP stream id.
pub fn streams(sdp: &SessionDescription) -> Vec<(StreamId, RemoteMedia)> {
    streams_where(sdp, |_| true)
}

/// [`streams`] among the m-lines whose index `keep` takes (a remote offer's lines our answer
/// did not refuse, say: the first of two audio lines may be one we refused).
pub fn streams_where(
    sdp: &SessionDescription,
    keep: impl Fn(usize) -> bool,
) -> Vec<(StreamId, RemoteMedia)> {
    let mut found: Vec<(StreamId, RemoteMedia)> = Vec::with_capacity(3);
    for index in (0..sdp.media.len()).filter(|i| keep(*i)) {
        let Some(media) = sdp.remote_media_at(index) else {
            continue;
        };
        let stream = match media.kind {
            MediaKind::Audio => StreamId::AUDIO,
            MediaKind::Video => StreamId::VIDEO,
            MediaKind::Application if is_signal(&media) => StreamId::SIGNAL,
            _ => continue,
        };
        if !found.iter().any(|(s, _)| *s == stream) {
            found.push((stream, media));
        }
    }
    found
}

/// The MBFP description of negotiated (or offered) SDP media, plus the raw SDP.
pub fn media_offer(sdp: &SessionDescription) -> MediaOffer {
    let mut audio = Vec::new();
    let mut video = Vec::new();
    for media in &sdp.media {
        if media.port == 0 {
            continue;
        }
        for codec in media.codecs() {
            match codec.name.to_ascii_uppercase().as_str() {
                "PCMU" => audio.push(AudioCodec::Pcmu as i32),
                "PCMA" => audio.push(AudioCodec::Pcma as i32),
                "G722" => audio.push(AudioCodec::G722 as i32),
                "OPUS" => audio.push(AudioCodec::Opus as i32),
                "TELEPHONE-EVENT" => audio.push(AudioCodec::TelephoneEvent as i32),
                "H264" => video.push(VideoCodec::H264 as i32),
                "VP8" => video.push(VideoCodec::Vp8 as i32),
                _ => {}
            }
        }
    }
    audio.dedup();
    video.dedup();
    MediaOffer {
        audio_codecs: audio,
        video_codecs: video,
        remote_sdp: sdp.to_string(),
        signal: streams(sdp).iter().any(|(s, _)| *s == StreamId::SIGNAL),
    }
}

/// Whether the negotiated media carries telephone-event (DTMF goes in the media then).
pub fn has_telephone_event(sdp: &SessionDescription) -> bool {
    sdp.media.iter().any(|m| {
        m.port != 0
            && m.codecs()
                .iter()
                .any(|c| c.name.eq_ignore_ascii_case("telephone-event"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_codecs_become_sdp_codecs_with_telephone_event() {
        let offer = MediaOffer {
            audio_codecs: vec![AudioCodec::Opus as i32, AudioCodec::Pcmu as i32],
            ..Default::default()
        };
        let names: Vec<String> = audio_codecs(Some(&offer))
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["opus", "PCMU", "telephone-event"]);
        let names: Vec<String> = audio_codecs(None).into_iter().map(|c| c.name).collect();
        assert_eq!(names, ["PCMU", "PCMA", "telephone-event"]);
    }

    #[test]
    fn sdp_media_becomes_mbfp_media() {
        let sdp = SessionDescription::parse(
            "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\n",
        )
        .unwrap();
        let m = media_offer(&sdp);
        assert_eq!(
            m.audio_codecs,
            vec![AudioCodec::Pcma as i32, AudioCodec::TelephoneEvent as i32]
        );
        assert!(has_telephone_event(&sdp));
        assert!(m.remote_sdp.contains("PCMA"));
        assert!(!m.signal);
    }

    #[test]
    fn the_first_line_of_a_kind_we_did_not_refuse_feeds_the_relay() {
        let offer = SessionDescription::parse(
            "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/SAVP 0\r\nm=audio 4002 RTP/AVP 0\r\n",
        )
        .unwrap();
        let ports = |found: Vec<(StreamId, RemoteMedia)>| -> Vec<u16> {
            found.into_iter().map(|(_, m)| m.rtp.port()).collect()
        };
        assert_eq!(ports(streams(&offer)), [4000]);
        assert_eq!(ports(streams_where(&offer, |i| i != 0)), [4002]);
    }

    #[test]
    fn keys_pair_by_tag_and_a_secure_stream_never_falls_back_to_plain_rtp() {
        let ours = |protocol: &str, crypto: &str| {
            SessionDescription::parse(&format!(
                "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\nm=audio 4000 {protocol} 0\r\n{crypto}"
            ))
            .unwrap()
        };
        let key =
            |tag: u32, byte: u8| Crypto::new(tag, CryptoSuite::AesCm128HmacSha1_80, vec![byte; 30]);
        let theirs = |protocol: &str, crypto: &str| {
            ours(protocol, crypto)
                .remote_media(&MediaKind::Audio)
                .unwrap()
        };
        let local = ours(
            "RTP/SAVP",
            &format!("a=crypto:{}\r\na=crypto:{}\r\n", key(1, 1), key(2, 2)),
        );
        // The answer's tag picks our key.
        let keys = srtp_keys(
            &theirs("RTP/SAVP", &format!("a=crypto:{}\r\n", key(2, 9))),
            Some(&local),
        )
        .unwrap();
        assert_eq!((keys.local, keys.remote), (vec![2; 30], vec![9; 30]));
        // Our SRTP answered with plain RTP, or with no usable key: keys that start no context
        // (the relay sends nothing), never plain RTP.
        for answer in [
            theirs("RTP/AVP", ""),
            theirs("RTP/SAVP", "a=crypto:3 X inline:AAAA\r\n"),
        ] {
            let keys = srtp_keys(&answer, Some(&local)).unwrap();
            assert!(keys.local.is_empty() && keys.remote.is_empty());
        }
        // Plain both ways: plain.
        assert_eq!(
            srtp_keys(&theirs("RTP/AVP", ""), Some(&ours("RTP/AVP", ""))),
            None
        );
    }

    #[test]
    fn the_signal_stream_is_described_only_when_the_device_has_it_and_a_relay_does() {
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let offer = MediaOffer {
            video_codecs: vec![VideoCodec::Vp8 as i32],
            signal: true,
            ..Default::default()
        };
        let all = StreamPorts {
            audio: 4000,
            video: Some(4002),
            signal: Some(4004),
            rtcp_mux: RtcpMux::default(),
        };
        let local = local_media(ip, all, Some(&offer), SrtpPolicy::Off, &StreamKeys::NONE);
        assert_eq!(local.video.as_ref().map(|v| v.port), Some(4002));
        let signal = local.application.as_ref().unwrap();
        assert_eq!((signal.port, signal.codecs[0].payload_type), (4004, 98));
        // No relay for them, or a device without them: audio only.
        let audio_only = StreamPorts {
            audio: 4000,
            ..Default::default()
        };
        let local = local_media(
            ip,
            audio_only,
            Some(&offer),
            SrtpPolicy::Off,
            &StreamKeys::NONE,
        );
        assert!(local.video.is_none() && local.application.is_none());
        let local = local_media(ip, all, None, SrtpPolicy::Off, &StreamKeys::NONE);
        assert!(local.video.is_none() && local.application.is_none());

        // A description with a data channel first and the signal stream second: the relay of
        // stream 2 takes the second.
        let sdp = SessionDescription::parse(
            "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\nm=application 5000 UDP/DTLS/SCTP webrtc-datachannel\r\nm=application 6000 RTP/AVP 120\r\na=rtpmap:120 X-MBFP-SIGNAL/1000\r\nm=video 0 RTP/AVP 97\r\n",
        )
        .unwrap();
        let found: Vec<(StreamId, u16)> = streams(&sdp)
            .into_iter()
            .map(|(s, m)| (s, m.rtp.port()))
            .collect();
        assert_eq!(found, [(StreamId::AUDIO, 4000), (StreamId::SIGNAL, 6000)]);
        assert!(media_offer(&sdp).signal);
    }
}
