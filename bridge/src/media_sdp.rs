//! SDP glue between MBFP media descriptions and the SIP side: device codec lists to SDP codecs
//! (with the fixed device-link payload types of docs/protocol.md) and back, and the local media
//! description of a call's relay.

use std::net::IpAddr;

use thalamus_proto::v1::{AudioCodec, MediaOffer, VideoCodec};
use thalamus_sip::sdp::{Codec, LocalMedia, SessionDescription};

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

/// The local media of a call: the relay's address and port, and the device's codecs.
pub fn local_media(address: IpAddr, port: u16, offer: Option<&MediaOffer>) -> LocalMedia {
    let mut local = LocalMedia::audio(address, port, audio_codecs(offer));
    local.ptime = Some(20);
    local
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
    }
}
