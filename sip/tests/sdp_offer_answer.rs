//! SDP through the public API: descriptions shaped like those real SIP user agents send
//! (SIPp, baresip, Linphone, Asterisk, desk phones behind Kamailio, WebRTC gateways) parsed and
//! re-serialized, offer/answer between our side and theirs, hold and resume, and parsers fed
//! arbitrary input.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use std::net::IpAddr;
use thalamus_sip::sdp::{
    Attribute, Codec, Direction, HoldMode, LocalMedia, MediaKind, NegotiationError, Protocol,
    SdpError, SdpSession, SessionDescription,
};

/// SIPp's built-in `uac` scenario body (LF-only line ends, as in its XML).
const SIPP_UAC: &str = "v=0\n\
o=user1 53655765 2353687637 IN IP4 127.0.0.1\n\
s=-\n\
c=IN IP4 127.0.0.1\n\
t=0 0\n\
m=audio 6000 RTP/AVP 0\n\
a=rtpmap:0 PCMU/8000\n";

/// baresip offering opus, G722, G711 and DTMF.
const BARESIP: &str = "v=0\r\n\
o=- 1386218455 2386218455 IN IP4 192.168.1.10\r\n\
s=-\r\n\
c=IN IP4 192.168.1.10\r\n\
t=0 0\r\n\
a=tool:baresip 3.10.1\r\n\
m=audio 10770 RTP/AVP 96 9 0 8 101\r\n\
b=AS:93\r\n\
a=rtpmap:96 opus/48000/2\r\n\
a=fmtp:96 stereo=1;sprop-stereo=1\r\n\
a=rtpmap:9 G722/8000\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-15\r\n\
a=sendrecv\r\n\
a=label:1\r\n\
a=rtcp-rsize\r\n\
a=ptime:20\r\n";

/// A desk phone registered through Kamailio (rtpengine rewrote the addresses).
const DESK_PHONE: &str = "v=0\r\n\
o=- 20005 20005 IN IP4 203.0.113.50\r\n\
s=SDP data\r\n\
c=IN IP4 203.0.113.50\r\n\
t=0 0\r\n\
m=audio 30112 RTP/AVP 9 0 8 18 101\r\n\
a=rtpmap:9 G722/8000\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:18 G729/8000\r\n\
a=fmtp:18 annexb=no\r\n\
a=ptime:20\r\n\
a=sendrecv\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-15\r\n\
a=rtcp:30113\r\n";

/// Linphone offering audio with several telephone-event rates, and video over AVPF.
const LINPHONE: &str = "v=0\r\n\
o=bob 1810 3106 IN IP4 192.168.0.12\r\n\
s=Talk\r\n\
c=IN IP4 192.168.0.12\r\n\
t=0 0\r\n\
a=rtcp-xr:rcvr-rtt=all:10000 stat-summary=loss,dup,jitt,TTL voip-metrics\r\n\
m=audio 7078 RTP/AVP 96 97 98 0 8 101 99 100\r\n\
a=rtpmap:96 opus/48000/2\r\n\
a=fmtp:96 useinbandfec=1\r\n\
a=rtpmap:97 speex/16000\r\n\
a=fmtp:97 vbr=on\r\n\
a=rtpmap:98 speex/8000\r\n\
a=fmtp:98 vbr=on\r\n\
a=rtpmap:101 telephone-event/48000\r\n\
a=rtpmap:99 telephone-event/16000\r\n\
a=rtpmap:100 telephone-event/8000\r\n\
a=rtcp:7079\r\n\
a=candidate:1 1 UDP 2130706303 192.168.0.12 7078 typ host\r\n\
a=rtcp-fb:* trr-int 1000\r\n\
m=video 9078 RTP/AVPF 96 97\r\n\
a=rtpmap:96 VP8/90000\r\n\
a=rtpmap:97 H264/90000\r\n\
a=fmtp:97 profile-level-id=42801F\r\n\
a=rtcp:9079\r\n\
a=rtcp-fb:96 nack pli\r\n";

/// Asterisk (chan_pjsip) answering.
const ASTERISK: &str = "v=0\r\n\
o=- 1234 1236 IN IP4 10.0.0.5\r\n\
s=Asterisk\r\n\
c=IN IP4 10.0.0.5\r\n\
t=0 0\r\n\
m=audio 18432 RTP/AVP 0 8 101\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-16\r\n\
a=ptime:20\r\n\
a=maxptime:150\r\n\
a=sendrecv\r\n";

/// A WebRTC client through a signalling gateway: DTLS-SRTP only.
const WEBRTC: &str = "v=0\r\n\
o=- 4611731400430051336 2 IN IP4 127.0.0.1\r\n\
s=-\r\n\
t=0 0\r\n\
a=group:BUNDLE 0\r\n\
a=msid-semantic: WMS\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111 0 8 126\r\n\
c=IN IP4 0.0.0.0\r\n\
a=rtcp:9 IN IP4 0.0.0.0\r\n\
a=ice-ufrag:khLS\r\n\
a=ice-pwd:cxLzteJaJBou3DspNaPsJhlQ\r\n\
a=fingerprint:sha-256 FA:14:42:3B:C7:97:1B:E8:AE:0C:2A:7D:00:27:7C:12:53:9F:8B:DE:BA:33:34:D6:24:F2:0A:3C:2E:3A:56:09\r\n\
a=setup:actpass\r\n\
a=mid:0\r\n\
a=sendrecv\r\n\
a=rtcp-mux\r\n\
a=rtpmap:111 opus/48000/2\r\n\
a=fmtp:111 minptime=10;useinbandfec=1\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:126 telephone-event/8000\r\n";

/// An old phone holding the call RFC 2543 style.
const OLD_HOLD: &str = "v=0\r\n\
o=- 20005 20006 IN IP4 203.0.113.50\r\n\
s=SDP data\r\n\
c=IN IP4 0.0.0.0\r\n\
t=0 0\r\n\
m=audio 30112 RTP/AVP 0 101\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\n";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The gateway's usual capabilities: opus, G.711 and DTMF at 8 and 48 kHz.
fn gateway_audio() -> LocalMedia {
    LocalMedia::audio(
        ip("192.0.2.10"),
        40000,
        vec![
            Codec::opus(111),
            Codec::pcma(),
            Codec::pcmu(),
            Codec::telephone_event(101, 8000),
            Codec::telephone_event(102, 48000),
        ],
    )
}

fn payload_types(sd: &SessionDescription, index: usize) -> Vec<String> {
    sd.media[index].formats.clone()
}

#[test]
fn real_world_descriptions_round_trip() {
    for text in [BARESIP, DESK_PHONE, LINPHONE, ASTERISK, WEBRTC, OLD_HOLD] {
        let sd = SessionDescription::parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(sd.to_string(), text);
        assert_eq!(SessionDescription::from_bytes(&sd.to_bytes()).unwrap(), sd);
    }
    // LF-only input comes back with CRLF.
    let sd = SessionDescription::parse(SIPP_UAC).unwrap();
    assert_eq!(sd.to_string(), SIPP_UAC.replace('\n', "\r\n"));
}

#[test]
fn real_world_descriptions_have_the_expected_content() {
    let baresip = SessionDescription::parse(BARESIP).unwrap();
    let audio = baresip.remote_media(&MediaKind::Audio).unwrap();
    assert_eq!(audio.rtp, "192.168.1.10:10770".parse().unwrap());
    assert_eq!(audio.rtcp, "192.168.1.10:10771".parse().unwrap());
    assert_eq!(
        audio.primary_codec(),
        Some(&Codec::opus(96).with_fmtp("stereo=1;sprop-stereo=1"))
    );
    assert_eq!(audio.codecs.len(), 4);
    assert_eq!(
        audio.telephone_event,
        Some(Codec::telephone_event(101, 8000).with_fmtp("0-15"))
    );
    assert_eq!(audio.ptime, Some(20));
    assert_eq!(baresip.media[0].bandwidths[0].value, 93);

    let phone = SessionDescription::parse(DESK_PHONE).unwrap();
    let audio = phone.remote_media(&MediaKind::Audio).unwrap();
    assert_eq!(audio.rtcp.port(), 30113);
    assert_eq!(
        audio
            .codecs
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["G722", "PCMU", "PCMA", "G729"]
    );

    let linphone = SessionDescription::parse(LINPHONE).unwrap();
    assert_eq!(linphone.media[1].protocol, Protocol::RtpAvpf);
    assert_eq!(
        linphone.remote_media(&MediaKind::Video).unwrap().codecs[1]
            .fmtp
            .as_deref(),
        Some("profile-level-id=42801F")
    );

    let webrtc = SessionDescription::parse(WEBRTC).unwrap();
    assert!(webrtc.media[0]
        .attributes
        .contains(&Attribute::flag("rtcp-mux")));
    assert_eq!(
        webrtc.media[0].protocol,
        Protocol::Other("UDP/TLS/RTP/SAVPF".into())
    );
}

#[test]
fn answer_keeps_offerer_order_and_payload_types() {
    let offer = SessionDescription::parse(BARESIP).unwrap();
    let mut session = SdpSession::new(10);
    let answer = session.create_answer(&offer, &gateway_audio()).unwrap();
    // Offer order 96(opus) 9(G722) 0 8 101; G722 is not ours; opus keeps 96, not our 111.
    assert_eq!(payload_types(&answer, 0), ["96", "0", "8", "101"]);
    let text = answer.to_string();
    assert!(text.contains("a=rtpmap:96 opus/48000/2\r\n"), "{text}");
    assert!(text.contains("a=rtpmap:101 telephone-event/8000\r\n"));
    assert!(text.contains("m=audio 40000 RTP/AVP 96 0 8 101\r\n"));
    assert!(text.contains("c=IN IP4 192.0.2.10\r\n"));
    assert_eq!(answer.media_direction(0), Some(Direction::SendRecv));
    // What baresip learns from the answer.
    let ours = answer.remote_media(&MediaKind::Audio).unwrap();
    assert_eq!(ours.rtp, "192.0.2.10:40000".parse().unwrap());
    assert_eq!(ours.primary_codec().unwrap().payload_type, 96);
}

#[test]
fn single_codec_answer() {
    let offer = SessionDescription::parse(DESK_PHONE).unwrap();
    let mut local = gateway_audio();
    local.single_codec_answer = true;
    local.ptime = Some(20);
    let answer = SdpSession::new(1).create_answer(&offer, &local).unwrap();
    assert_eq!(payload_types(&answer, 0), ["0", "101"]);
    assert_eq!(answer.media[0].ptime(), Some(20));
}

#[test]
fn no_codec_in_common_is_an_error() {
    let offer = SessionDescription::parse(
        "v=0\r\no=- 1 1 IN IP4 198.51.100.1\r\ns=-\r\nc=IN IP4 198.51.100.1\r\nt=0 0\r\n\
m=audio 5000 RTP/AVP 18 101\r\na=rtpmap:18 G729/8000\r\na=rtpmap:101 telephone-event/8000\r\n",
    )
    .unwrap();
    let mut session = SdpSession::new(1);
    assert_eq!(
        session.create_answer(&offer, &gateway_audio()),
        Err(NegotiationError::NoCommonCodec)
    );
    // Nothing was committed: the first real answer still has version 1.
    assert!(session.last_local().is_none());
    // SRTP-only offers cannot be taken either.
    let webrtc = SessionDescription::parse(WEBRTC).unwrap();
    assert_eq!(
        SdpSession::new(1).create_answer(&webrtc, &gateway_audio()),
        Err(NegotiationError::NoCommonCodec)
    );
    let no_media =
        SessionDescription::parse("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nt=0 0\r\n").unwrap();
    assert_eq!(
        SdpSession::new(1).create_answer(&no_media, &gateway_audio()),
        Err(NegotiationError::NoMedia)
    );
}

#[test]
fn telephone_event_is_matched_by_clock_rate() {
    let offer = SessionDescription::parse(LINPHONE).unwrap();
    let local = LocalMedia::audio(
        ip("192.0.2.10"),
        40000,
        vec![Codec::pcmu(), Codec::telephone_event(110, 8000)],
    );
    let answer = SdpSession::new(1).create_answer(&offer, &local).unwrap();
    // PCMU and the 8000 Hz telephone-event (offered as 100), not the 48000/16000 ones.
    assert_eq!(payload_types(&answer, 0), ["0", "100"]);
    let media = answer.remote_media(&MediaKind::Audio).unwrap();
    assert_eq!(media.telephone_event.unwrap().clock_rate, 8000);

    // telephone-event alone is not enough to accept a stream.
    let only_events = LocalMedia::audio(
        ip("192.0.2.10"),
        40000,
        vec![Codec::telephone_event(101, 8000)],
    );
    assert_eq!(
        SdpSession::new(1).create_answer(&offer, &only_events),
        Err(NegotiationError::NoCommonCodec)
    );
}

#[test]
fn unsupported_video_is_rejected_with_port_zero() {
    let offer = SessionDescription::parse(LINPHONE).unwrap();
    let answer = SdpSession::new(1)
        .create_answer(&offer, &gateway_audio())
        .unwrap();
    assert_eq!(answer.media.len(), 2);
    assert_eq!(answer.media[0].port, 40000);
    assert_eq!(payload_types(&answer, 0), ["96", "0", "8", "101", "100"]);
    assert_eq!(answer.media[1].kind, MediaKind::Video);
    assert_eq!(answer.media[1].port, 0);
    assert_eq!(answer.media[1].protocol, Protocol::RtpAvpf);
    assert!(answer.media[1].attributes.is_empty());
    assert_eq!(answer.remote_media(&MediaKind::Video), None);
    assert!(answer.to_string().contains("m=video 0 RTP/AVPF 96 97\r\n"));
}

#[test]
fn supported_video_is_accepted() {
    let offer = SessionDescription::parse(LINPHONE).unwrap();
    let local = gateway_audio().with_video(
        40002,
        vec![Codec::h264(104, "profile-level-id=42e01f"), Codec::vp8(100)],
    );
    let answer = SdpSession::new(1).create_answer(&offer, &local).unwrap();
    assert_eq!(answer.media[1].port, 40002);
    // Offerer's order (VP8 first) and numbers; our H264 fmtp is ours to give.
    assert_eq!(payload_types(&answer, 1), ["96", "97"]);
    assert_eq!(answer.media[1].fmtp("97"), Some("profile-level-id=42e01f"));
    assert_eq!(answer.media[1].protocol, Protocol::RtpAvpf);
}

#[test]
fn extra_and_rejected_streams_get_port_zero() {
    let offer = SessionDescription::parse(
        "v=0\r\no=- 1 1 IN IP4 198.51.100.1\r\ns=-\r\nc=IN IP4 198.51.100.1\r\nt=0 0\r\n\
m=audio 0 RTP/AVP 0\r\nm=audio 5000 RTP/AVP 8\r\nm=audio 5002 RTP/AVP 0\r\nm=image 5004 udptl t38\r\n",
    )
    .unwrap();
    let answer = SdpSession::new(1)
        .create_answer(&offer, &gateway_audio())
        .unwrap();
    let ports: Vec<u16> = answer.media.iter().map(|m| m.port).collect();
    assert_eq!(ports, [0, 40000, 0, 0]);
    assert_eq!(answer.media[3].protocol, Protocol::Other("udptl".into()));
    assert_eq!(payload_types(&answer, 3), ["t38"]);
    // The answer itself parses.
    assert_eq!(
        SessionDescription::parse(&answer.to_string()).unwrap(),
        answer
    );
}

#[test]
fn answer_directions_follow_rfc3264_section_6_1() {
    for (offered, local, expected) in [
        ("sendrecv", Direction::SendRecv, Direction::SendRecv),
        ("sendonly", Direction::SendRecv, Direction::RecvOnly),
        ("recvonly", Direction::SendRecv, Direction::SendOnly),
        ("inactive", Direction::SendRecv, Direction::Inactive),
        ("sendrecv", Direction::SendOnly, Direction::SendOnly),
        ("sendrecv", Direction::RecvOnly, Direction::RecvOnly),
        ("recvonly", Direction::RecvOnly, Direction::Inactive),
    ] {
        let text = ASTERISK.replace("a=sendrecv", &format!("a={offered}"));
        let offer = SessionDescription::parse(&text).unwrap();
        let answer = SdpSession::new(1)
            .create_answer(&offer, &gateway_audio().with_direction(local))
            .unwrap();
        assert_eq!(
            answer.media_direction(0),
            Some(expected),
            "{offered} {local}"
        );
    }
    // Session-level direction applies to media without their own.
    let text = ASTERISK
        .replace("a=sendrecv\r\n", "")
        .replace("t=0 0\r\n", "t=0 0\r\na=sendonly\r\n");
    let offer = SessionDescription::parse(&text).unwrap();
    let answer = SdpSession::new(1)
        .create_answer(&offer, &gateway_audio())
        .unwrap();
    assert_eq!(answer.media_direction(0), Some(Direction::RecvOnly));
}

#[test]
fn remote_hold_is_detected() {
    let active = SessionDescription::parse(ASTERISK).unwrap();
    assert!(!active.is_hold());
    for direction in ["sendonly", "inactive"] {
        let held =
            SessionDescription::parse(&ASTERISK.replace("a=sendrecv", &format!("a={direction}")))
                .unwrap();
        assert!(held.is_hold(), "{direction}");
        assert!(held.remote_media(&MediaKind::Audio).unwrap().is_hold());
    }
    // recvonly is the answer to our hold, not a hold of theirs.
    let recvonly =
        SessionDescription::parse(&ASTERISK.replace("a=sendrecv", "a=recvonly")).unwrap();
    assert!(!recvonly.is_hold());
    // RFC 2543 style.
    let old = SessionDescription::parse(OLD_HOLD).unwrap();
    assert!(old.is_hold());
    let media = old.remote_media(&MediaKind::Audio).unwrap();
    assert!(media.is_hold());
    assert!(media.rtp.ip().is_unspecified());
    // All streams rejected: not a hold.
    let rejected = SessionDescription::parse(&ASTERISK.replace("18432", "0")).unwrap();
    assert!(!rejected.is_hold());
}

#[test]
fn hold_and_resume_round_trip_between_two_sessions() {
    // We call a desk phone, then hold and resume; the phone answers each re-offer.
    let mut ours = SdpSession::new(1000);
    let mut theirs = SdpSession::new(2000);
    let phone = LocalMedia::audio(
        ip("203.0.113.50"),
        30112,
        vec![
            Codec::pcmu(),
            Codec::pcma(),
            Codec::telephone_event(101, 8000),
        ],
    );

    let offer = ours.create_offer(&gateway_audio()).unwrap();
    let answer = theirs
        .create_answer(
            &SessionDescription::parse(&offer.to_string()).unwrap(),
            &phone,
        )
        .unwrap();
    let media = answer.remote_media(&MediaKind::Audio).unwrap();
    assert_eq!(media.rtp, "203.0.113.50:30112".parse().unwrap());
    assert_eq!(media.primary_codec(), Some(&Codec::pcma()));

    let hold = ours.create_hold_offer(HoldMode::SendOnly).unwrap();
    assert_eq!(
        hold.origin.session_version,
        offer.origin.session_version + 1
    );
    let hold = SessionDescription::parse(&hold.to_string()).unwrap();
    assert!(hold.is_hold());
    let hold_answer = theirs.create_answer(&hold, &phone).unwrap();
    assert_eq!(hold_answer.media_direction(0), Some(Direction::RecvOnly));
    assert_eq!(
        hold_answer.origin.session_version,
        answer.origin.session_version + 1
    );
    assert!(!hold_answer.is_hold());

    let resume = ours.create_resume_offer().unwrap();
    assert!(!resume.is_hold());
    assert_eq!(
        resume.origin.session_version,
        offer.origin.session_version + 2
    );
    let resume_answer = theirs.create_answer(&resume, &phone).unwrap();
    assert_eq!(resume_answer.media_direction(0), Some(Direction::SendRecv));
    // Back to the first answer's content, with a new version.
    assert_eq!(resume_answer.media, answer.media);
    assert_eq!(
        resume_answer.origin.session_version,
        answer.origin.session_version + 2
    );

    let inactive = ours.create_hold_offer(HoldMode::Inactive).unwrap();
    let inactive_answer = theirs.create_answer(&inactive, &phone).unwrap();
    assert_eq!(
        inactive_answer.media_direction(0),
        Some(Direction::Inactive)
    );
}

#[test]
fn sipp_uac_offer_gets_a_pcmu_answer() {
    let offer = SessionDescription::parse(SIPP_UAC).unwrap();
    let mut session = SdpSession::with_random_id();
    let answer = session.create_answer(&offer, &gateway_audio()).unwrap();
    assert_eq!(payload_types(&answer, 0), ["0"]);
    assert_eq!(answer.origin.session_id, session.session_id());
    let reply = answer.to_string();
    assert!(reply.ends_with("a=sendrecv\r\n"));
    assert_eq!(
        offer.rtp_address(&MediaKind::Audio),
        Some("127.0.0.1:6000".parse().unwrap())
    );
}

#[test]
fn ipv6_offers_and_answers() {
    let local = LocalMedia::audio(ip("2001:db8::10"), 40000, vec![Codec::pcmu()]);
    let offer = SdpSession::new(1).create_offer(&local).unwrap();
    let text = offer.to_string();
    assert!(text.contains("c=IN IP6 2001:db8::10\r\n"));
    assert!(text.contains("o=- 1 1 IN IP6 2001:db8::10\r\n"));
    assert_eq!(
        SessionDescription::parse(&text)
            .unwrap()
            .rtp_address(&MediaKind::Audio),
        Some("[2001:db8::10]:40000".parse().unwrap())
    );
}

#[test]
fn malformed_descriptions_are_errors() {
    for (text, what) in [
        ("", "empty"),
        ("v=0", "no origin"),
        (
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nm=audio x RTP/AVP 0\r\n",
            "port",
        ),
        (
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nm=audio\r\n",
            "short m=",
        ),
        ("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\n=x\r\n", "no type"),
        (
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nm=audio 1 RTP/AVP 300\r\n",
            "pt",
        ),
        ("<html><body>404</body></html>", "html"),
        ("{\"sdp\": \"v=0\"}", "json"),
    ] {
        let result = SessionDescription::parse(text);
        assert!(result.is_err(), "{what}: {result:?}");
    }
    assert_eq!(
        SessionDescription::from_bytes(&[0xff, 0xfe, 0x00]),
        Err(SdpError::NotUtf8)
    );
}

fn sdp_like_text() -> impl Strategy<Value = String> {
    // Mostly valid lines, so that many inputs parse, with some noise.
    let line = prop_oneof![
        4 => Just("c=IN IP4 192.0.2.1".to_string()),
        4 => "a=(sendrecv|sendonly|recvonly|inactive|rtcp-mux)",
        4 => "a=rtpmap:(0|8|96|101) (PCMU|opus|telephone-event)/(8000|48000)(/2)?",
        3 => "a=fmtp:(96|101) [ -~]{0,12}",
        3 => "a=(ptime|rtcp):[0-9]{1,4}",
        6 => "m=(audio|video) [0-9]{1,5} RTP/(AVP|SAVP)( (0|8|9|96|101)){1,4}",
        2 => "[bceikptuz]=[ -~]{0,30}",
        1 => "[a-z]=[ -~]{0,30}",
        1 => "a=(rtpmap|fmtp|ptime|rtcp):[ -~]{0,20}",
        1 => "[ -~]{0,20}",
    ];
    (
        proptest::collection::vec(line, 0..20),
        prop_oneof![Just("\r\n"), Just("\n")],
    )
        .prop_map(|(lines, end)| {
            let mut text = String::from("v=0\no=- 1 1 IN IP4 192.0.2.1\ns=-\n");
            for l in lines {
                text.push_str(&l);
                text.push_str(end);
            }
            text
        })
}

fn codec_strategy() -> impl Strategy<Value = Codec> {
    prop_oneof![
        Just(Codec::pcmu()),
        Just(Codec::pcma()),
        Just(Codec::g722()),
        (96u8..128).prop_map(Codec::opus),
        (96u8..128, prop_oneof![Just(8000u32), Just(48000)])
            .prop_map(|(pt, rate)| Codec::telephone_event(pt, rate)),
    ]
}

fn codecs_strategy() -> impl Strategy<Value = Vec<Codec>> {
    proptest::collection::vec(codec_strategy(), 0..5).prop_map(|codecs| {
        // Unique payload types and formats, as a real configuration would have.
        let mut out: Vec<Codec> = Vec::new();
        for c in codecs {
            if !out
                .iter()
                .any(|o| o.payload_type == c.payload_type || o.same_format(&c))
            {
                out.push(c);
            }
        }
        out
    })
}

proptest! {
    #[test]
    fn parse_never_panics_on_arbitrary_text(text in any::<String>()) {
        let _ = SessionDescription::parse(&text);
    }

    #[test]
    fn parse_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = SessionDescription::from_bytes(&bytes);
    }

    #[test]
    fn parsed_descriptions_reserialize_to_the_same_model(text in sdp_like_text()) {
        if let Ok(sd) = SessionDescription::parse(&text) {
            let again = SessionDescription::parse(&sd.to_string());
            prop_assert_eq!(again, Ok(sd.clone()));
            // Helpers never panic on what parses.
            let _ = sd.is_hold();
            let _ = sd.remote_media(&MediaKind::Audio);
            for m in &sd.media {
                let _ = m.codecs();
            }
        }
    }

    #[test]
    fn offer_answer_between_random_capabilities(
        offerer in codecs_strategy(),
        answerer in codecs_strategy(),
        port in 1u16..,
    ) {
        let mut a = SdpSession::new(1);
        let mut b = SdpSession::new(2);
        let offer_local = LocalMedia::audio(ip("192.0.2.1"), port, offerer.clone());
        let offer = match a.create_offer(&offer_local) {
            Ok(offer) => offer,
            Err(e) => {
                prop_assert!(offerer.is_empty());
                prop_assert_eq!(e, NegotiationError::NoLocalMedia);
                return Ok(());
            }
        };
        let offer = SessionDescription::parse(&offer.to_string()).unwrap();
        let answer_local = LocalMedia::audio(ip("198.51.100.1"), 5000, answerer.clone());
        let common_media = offerer.iter().any(|o| {
            !o.is_telephone_event() && answerer.iter().any(|l| l.same_format(o))
        });
        match b.create_answer(&offer, &answer_local) {
            Ok(answer) => {
                prop_assert!(common_media);
                let answer = SessionDescription::parse(&answer.to_string()).unwrap();
                let remote = answer.remote_media(&MediaKind::Audio).unwrap();
                // Every answered codec was offered with that payload type and is ours.
                for codec in remote.codecs.iter().chain(remote.telephone_event.iter()) {
                    prop_assert!(offerer.iter().any(|o| o.payload_type == codec.payload_type && o.same_format(codec)));
                    prop_assert!(answerer.iter().any(|l| l.same_format(codec)));
                }
                prop_assert_eq!(remote.rtp.port(), 5000);
            }
            Err(e) => {
                prop_assert!(!common_media);
                prop_assert_eq!(e, NegotiationError::NoCommonCodec);
            }
        }
    }
}
