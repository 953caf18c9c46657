//! Fuzz target `sdp`: arbitrary bytes as an SDP body (`SessionDescription::from_bytes`), then,
//! when it parses, as a remote offer to the gateway's offer/answer code.
//!
//! Checks: nothing panics; a description that parses serializes (CRLF line ends) to one that
//! parses to the same model, whenever the serialization stays within the size limit; the
//! answer and the hold re-offer this side builds to any parsed offer serialize to SDP that this
//! parser accepts. It does not check the negotiation's choices (sip/tests/sdp_offer_answer.rs
//! does).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr};
use thalamus_sip::sdp::{
    Codec, HoldMode, LocalMedia, MediaKind, SdpSession, SessionDescription, MAX_SDP_LEN,
};

fn reparses(sd: &SessionDescription, what: &str) {
    let bytes = sd.to_bytes();
    if bytes.len() <= MAX_SDP_LEN {
        if let Err(e) = SessionDescription::from_bytes(&bytes) {
            panic!(
                "{what} does not parse: {e}\n{}",
                String::from_utf8_lossy(&bytes)
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(sd) = SessionDescription::from_bytes(data) else {
        return;
    };

    let bytes = sd.to_bytes();
    if bytes.len() <= MAX_SDP_LEN {
        match SessionDescription::from_bytes(&bytes) {
            Ok(again) => assert_eq!(again, sd, "SDP round trip changed the model"),
            Err(e) => panic!("serialized SDP does not reparse: {e}"),
        }
    }

    for index in 0..sd.media.len() {
        let _ = (sd.media_direction(index), sd.media_connection(index));
        if let Some(m) = sd.media.get(index) {
            let _ = (
                m.codecs(),
                m.ptime(),
                m.rtcp(),
                m.direction(),
                m.is_rejected(),
            );
        }
    }
    for kind in [MediaKind::Audio, MediaKind::Video] {
        if let Some(remote) = sd.remote_media(&kind) {
            let _ = (remote.primary_codec(), remote.is_hold());
        }
        let _ = sd.rtp_address(&kind);
    }
    let _ = sd.is_hold();

    let local = LocalMedia::audio(
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        40_000,
        vec![
            Codec::pcmu(),
            Codec::pcma(),
            Codec::opus(111),
            Codec::telephone_event(101, 8000),
        ],
    )
    .with_video(
        40_002,
        vec![
            Codec::vp8(96),
            Codec::h264(97, "profile-level-id=42e01f;packetization-mode=1"),
        ],
    );
    let mut session = SdpSession::new(1);
    if let Ok(answer) = session.create_answer(&sd, &local) {
        reparses(&answer, "our answer");
        if let Ok(hold) = session.create_hold_offer(HoldMode::SendOnly) {
            reparses(&hold, "our hold offer");
        }
    }
});
