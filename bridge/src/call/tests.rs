//! `CallCore` flows on a virtual clock: no sockets, no runtime, no user agent. Each test feeds
//! the core what a driver would (device frames, SIP responses, requests, timestamps) and checks
//! the actions it returns. `Instant::now()` only gives the virtual clock its origin.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use thalamus_dialog_store::{DialogKey, SipDialogPayload, StoredDialog};
use thalamus_proto::v1::envelope::Body;
use thalamus_proto::v1::{
    Answer, CallEvent, CallState, Dtmf, EndReason, Hangup, Hold, MediaOffer, Reject, Resume,
};
use thalamus_sip::dialog::DialogId;
use thalamus_sip::message::{HeaderName, Message, Method, Request, Uri};
use thalamus_sip::sdp::{Direction, SessionDescription};
use thalamus_sip::transaction::TransactionKey;

use super::core::*;
use crate::dialogs::{CallAppData, CallFacts};

const RELAY: RelayAddr = RelayAddr {
    ip: IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)),
    ports: crate::media_sdp::StreamPorts {
        audio: 40_000,
        video: None,
        signal: None,
        rtcp_mux: crate::media_sdp::RtcpMux {
            audio: false,
            video: false,
            signal: false,
        },
    },
    keys: crate::media_sdp::StreamKeys::NONE,
};

fn settings(replicate: bool) -> CallSettings {
    CallSettings {
        node_id: "gw-1".into(),
        no_answer_timeout: Duration::from_secs(60),
        replicate,
        replicate_early: false,
        reinvite_after_takeover: true,
        media_address: "10.0.0.1".parse().unwrap(),
        session_timer: None,
        reliable_provisionals: false,
        srtp: thalamus_sip::sdp::SrtpPolicy::Off,
    }
}

fn key() -> (String, u32) {
    ("dev-1".to_string(), 7)
}

fn dialog() -> DialogId {
    DialogId {
        call_id: "call-1".into(),
        local_tag: "local".into(),
        remote_tag: "remote".into(),
    }
}

fn stx(n: u32) -> TransactionKey {
    TransactionKey::from_parts(n, 1)
}

/// The peer's SDP: PCMU, with telephone-event when `dtmf`, in `direction`.
fn peer_sdp(version: u32, dtmf: bool, direction: &str) -> String {
    let pts = if dtmf { "0 101" } else { "0" };
    let mut s = format!(
        "v=0\r\no=- 1000 {version} IN IP4 10.0.0.9\r\ns=-\r\nc=IN IP4 10.0.0.9\r\nt=0 0\r\n\
         m=audio 30000 RTP/AVP {pts}\r\na=rtpmap:0 PCMU/8000\r\n"
    );
    if dtmf {
        s.push_str("a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\n");
    }
    s.push_str(&format!("a={direction}\r\n"));
    s
}

fn request(method: &str, body: &str) -> Request {
    request_with(method, body, "")
}

/// [`request`] with extra header lines (each ending in CRLF).
fn request_with(method: &str, body: &str, extra: &str) -> Request {
    let text = format!(
        "{method} sip:dev-1@gw.example SIP/2.0\r\n\
         Via: SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bK-{method}\r\n\
         Max-Forwards: 70\r\n\
         From: \"Bob\" <sip:bob@example.org>;tag=remote\r\n\
         To: <sip:dev-1@gw.example>;tag=local\r\n\
         Call-ID: call-1\r\n\
         CSeq: 2 {method}\r\n\
         Contact: <sip:bob@10.0.0.9:5060>\r\n\
         {extra}{}Content-Length: {}\r\n\r\n{body}",
        if body.is_empty() {
            String::new()
        } else {
            "Content-Type: application/sdp\r\n".into()
        },
        body.len()
    );
    match Message::parse(Bytes::from(text)) {
        Ok(Message::Request(r)) => r,
        other => panic!("test request does not parse: {other:?}"),
    }
}

fn response(status: u16, body: &str, dialog: Option<DialogId>) -> ClientOutcome {
    ClientOutcome::Response {
        status,
        reason: match status {
            180 => "Ringing",
            200 => "OK",
            486 => "Busy Here",
            487 => "Request Terminated",
            _ => "Other",
        }
        .into(),
        body: Bytes::from(body.to_string()),
        dialog,
        session_expires: None,
        allows_update: false,
    }
}

/// The actions queued now; `Close` is always the last one (the driver stops there).
fn drain(core: &mut CallCore) -> Vec<CallAction> {
    let actions: Vec<CallAction> = std::iter::from_fn(|| core.poll_action()).collect();
    if let Some(i) = actions
        .iter()
        .position(|a| matches!(a, CallAction::Close { .. }))
    {
        assert_eq!(i + 1, actions.len(), "actions after Close: {actions:?}");
    }
    actions
}

fn events(actions: &[CallAction]) -> Vec<CallEvent> {
    actions
        .iter()
        .filter_map(|a| match a {
            CallAction::ToDevice {
                body: Body::CallEvent(e),
                ..
            } => Some(e.clone()),
            _ => None,
        })
        .collect()
}

fn ended(actions: &[CallAction]) -> Vec<CallEvent> {
    events(actions)
        .into_iter()
        .filter(|e| e.state == CallState::Ended as i32)
        .collect()
}

fn errors(actions: &[CallAction]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            CallAction::ToDevice {
                body: Body::Error(e),
                ..
            } => Some(e.message.clone()),
            _ => None,
        })
        .collect()
}

fn sent_in_dialog(actions: &[CallAction]) -> Vec<(TxId, Method, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            CallAction::SendInDialog {
                tx, method, body, ..
            } => Some((
                *tx,
                method.clone(),
                body.as_ref()
                    .map(|(b, _)| String::from_utf8_lossy(b).to_string())
                    .unwrap_or_default(),
            )),
            _ => None,
        })
        .collect()
}

fn responses(actions: &[CallAction]) -> Vec<(TransactionKey, u16)> {
    actions
        .iter()
        .filter_map(|a| match a {
            CallAction::Respond { tx, status, .. } => Some((*tx, *status)),
            _ => None,
        })
        .collect()
}

/// An incoming call's 180 goes out, then the device answers it (`MediaOffer::default()`).
fn ring_then_answer(core: &mut CallCore, t0: Instant) {
    core.handle(t0, CallInput::Responded(stx(1), 180, Some(dialog())));
    drain(core);
    device_answers(core, t0);
}

/// The device answers its incoming call (`MediaOffer::default()`).
fn device_answers(core: &mut CallCore, t0: Instant) {
    core.handle(
        t0,
        CallInput::Device(
            2,
            Body::Answer(Answer {
                call_ref: 7,
                media: Some(MediaOffer::default()),
            }),
        ),
    );
}

/// The SDP of the first 200 among `actions`.
fn sdp_of_200(actions: &[CallAction]) -> Option<String> {
    actions.iter().find_map(|x| match x {
        CallAction::Respond {
            status: 200,
            body: Some((b, _)),
            ..
        } => Some(String::from_utf8_lossy(b).to_string()),
        _ => None,
    })
}

fn closed(actions: &[CallAction]) -> Option<bool> {
    actions.iter().find_map(|a| match a {
        CallAction::Close { tombstone } => Some(*tombstone),
        _ => None,
    })
}

fn hangup() -> Body {
    Body::Hangup(Hangup { call_ref: 7 })
}

fn target() -> Uri {
    Uri::parse("sip:bob@example.org").unwrap()
}

/// An outgoing call up to the INVITE: returns the core and the INVITE's transaction.
fn dialling(t0: Instant, replicate: bool) -> (CallCore, TxId, Vec<CallAction>) {
    let mut headers = BTreeMap::new();
    headers.insert("X-Trace".to_string(), "abc".to_string());
    headers.insert("Subject".to_string(), "dropped".to_string());
    let mut core = CallCore::outgoing(
        key(),
        settings(replicate),
        42,
        target(),
        Some(MediaOffer::default()),
        headers,
    );
    assert_eq!(
        drain(&mut core),
        vec![CallAction::StartRelay(RelayStreams::default())]
    );
    core.relay_started(t0, Some(RELAY));
    let actions = drain(&mut core);
    let tx = actions
        .iter()
        .find_map(|a| match a {
            CallAction::SendInvite { tx, .. } => Some(*tx),
            _ => None,
        })
        .expect("an INVITE");
    (core, tx, actions)
}

/// An outgoing call answered with `answer_sdp`.
fn answered_outgoing(t0: Instant, replicate: bool, answer_sdp: &str) -> CallCore {
    let (mut core, tx, _) = dialling(t0, replicate);
    core.handle(
        t0,
        CallInput::Client(tx, response(200, answer_sdp, Some(dialog()))),
    );
    drain(&mut core);
    core
}

#[test]
fn outgoing_call_answered_then_hung_up_by_the_device() {
    let t0 = Instant::now();
    let (mut core, tx, actions) = dialling(t0, true);
    let invite = actions
        .iter()
        .find_map(|a| match a {
            CallAction::SendInvite {
                target,
                headers,
                sdp,
                ..
            } => Some((target.clone(), headers.clone(), sdp.clone())),
            _ => None,
        })
        .unwrap();
    assert_eq!(invite.0, target());
    assert!(invite.1.iter().any(|(n, _)| *n == HeaderName::Allow));
    assert!(
        invite
            .1
            .iter()
            .any(|(n, v)| n.as_str().eq_ignore_ascii_case("x-trace") && v == "abc"),
        "X- headers of the device go out: {:?}",
        invite.1
    );
    assert!(!invite
        .1
        .iter()
        .any(|(n, _)| n.as_str().eq_ignore_ascii_case("subject")));
    let offer = SessionDescription::parse(&invite.2).unwrap();
    assert_eq!(
        offer.rtp_address(&thalamus_sip::sdp::MediaKind::Audio),
        Some("10.0.0.1:40000".parse().unwrap()),
        "the offer names the relay"
    );
    assert_eq!(events(&actions)[0].state, CallState::Trying as i32);

    core.handle(t0, CallInput::Client(tx, response(180, "", None)));
    let a = drain(&mut core);
    assert_eq!(events(&a)[0].state, CallState::Ringing as i32);
    assert_eq!(core.state(), CallState::Ringing);

    core.handle(
        t0,
        CallInput::Client(
            tx,
            response(200, &peer_sdp(1, true, "sendrecv"), Some(dialog())),
        ),
    );
    let a = drain(&mut core);
    assert_eq!(a[0], CallAction::SetDialog(dialog()));
    assert_eq!(a[1], CallAction::Ack { dialog: dialog() });
    assert!(a
        .iter()
        .any(|x| matches!(x, CallAction::Relay(RelayOp::SetRemote(..)))));
    let answered = &events(&a)[0];
    assert_eq!(answered.state, CallState::Answered as i32);
    assert!(answered.media.is_some());
    // Confirmed once the ACK is out: the record is written after it.
    let replicate = a
        .iter()
        .position(|x| matches!(x, CallAction::Replicate(_)))
        .expect("replicated");
    assert!(replicate > 1);
    if let CallAction::Replicate(facts) = &a[replicate] {
        assert_eq!(facts.owner, "gw-1");
        assert_eq!(facts.call_ref, 7);
        assert!(facts.media.remote_sdp.contains("30000"));
        assert!(facts
            .app_data
            .as_ref()
            .is_some_and(|d| d.outgoing && !d.held));
    }

    // The device hangs up: the CSeq is written ahead, then BYE, then the end.
    core.handle(t0, CallInput::Device(3, hangup()));
    let a = drain(&mut core);
    assert!(matches!(a.as_slice(), [CallAction::WriteAhead(_)]));
    core.handle(t0, CallInput::WriteAheadDone(WriteAhead::Written));
    let a = drain(&mut core);
    let bye = sent_in_dialog(&a);
    assert_eq!(bye.len(), 1);
    assert_eq!(bye[0].1, Method::Bye);
    assert!(ended(&a).is_empty(), "the end waits for the BYE's answer");
    core.handle(t0, CallInput::Client(bye[0].0, response(200, "", None)));
    let a = drain(&mut core);
    let end = ended(&a);
    assert_eq!(end.len(), 1);
    assert_eq!(end[0].end_reason, EndReason::LocalHangup as i32);
    assert!(a.contains(&CallAction::Count(CallCount::Ended("local_hangup"))));
    assert_eq!(closed(&a), Some(true), "the stored record is ended");
    assert!(core.is_closed());
}

#[test]
fn outgoing_call_rejected_timed_out_or_unsendable() {
    let t0 = Instant::now();
    for (outcome, reason, status) in [
        (response(486, "", None), EndReason::Busy, 486),
        (ClientOutcome::Timeout, EndReason::Timeout, 408),
        (
            ClientOutcome::Failed("no route".into()),
            EndReason::Failed,
            0,
        ),
    ] {
        let (mut core, tx, _) = dialling(t0, true);
        core.handle(t0, CallInput::Client(tx, outcome));
        let a = drain(&mut core);
        let end = ended(&a);
        assert_eq!(end.len(), 1);
        assert_eq!(end[0].end_reason, reason as i32);
        assert_eq!(end[0].sip_status, status);
        assert_eq!(closed(&a), Some(false), "nothing was stored");
    }
}

#[test]
fn outgoing_call_cancelled_by_the_device() {
    let t0 = Instant::now();
    let (mut core, tx, _) = dialling(t0, true);
    core.handle(t0, CallInput::Client(tx, response(180, "", None)));
    drain(&mut core);
    core.handle(t0, CallInput::Device(3, hangup()));
    assert_eq!(drain(&mut core), vec![CallAction::Cancel { tx }]);
    // A second hangup does not CANCEL again.
    core.handle(t0, CallInput::DeviceGone);
    assert!(drain(&mut core).is_empty());
    core.handle(t0, CallInput::Client(tx, response(487, "", None)));
    let a = drain(&mut core);
    let end = ended(&a);
    assert_eq!(end.len(), 1);
    assert_eq!(end[0].end_reason, EndReason::LocalHangup as i32);
    assert_eq!(end[0].reason, "cancelled by the device");
    assert_eq!(closed(&a), Some(false));

    // Hung up before the INVITE went out (the relay was starting): nothing is sent.
    let mut core = CallCore::outgoing(key(), settings(true), 42, target(), None, BTreeMap::new());
    drain(&mut core);
    core.handle(t0, CallInput::Device(3, hangup()));
    let a = drain(&mut core);
    assert_eq!(ended(&a).len(), 1);
    core.relay_started(t0, Some(RELAY));
    assert!(
        !drain(&mut core)
            .iter()
            .any(|x| matches!(x, CallAction::SendInvite { .. })),
        "no INVITE after the call ended"
    );
}

#[test]
fn cancel_crossing_200_acks_then_byes() {
    let t0 = Instant::now();
    let (mut core, tx, _) = dialling(t0, true);
    core.handle(t0, CallInput::Device(3, hangup()));
    assert_eq!(drain(&mut core), vec![CallAction::Cancel { tx }]);
    // The 200 crossed the CANCEL: the dialog exists and must be ended properly.
    core.handle(
        t0,
        CallInput::Client(
            tx,
            response(200, &peer_sdp(1, true, "sendrecv"), Some(dialog())),
        ),
    );
    let a = drain(&mut core);
    assert!(a.contains(&CallAction::Ack { dialog: dialog() }));
    assert!(ended(&a).is_empty());
    let write = a
        .iter()
        .position(|x| matches!(x, CallAction::WriteAhead(_)))
        .expect("BYE written ahead");
    let replicate = a
        .iter()
        .position(|x| matches!(x, CallAction::Replicate(_)))
        .unwrap();
    assert!(replicate < write);
    core.handle(t0, CallInput::WriteAheadDone(WriteAhead::Written));
    let a = drain(&mut core);
    let bye = sent_in_dialog(&a);
    assert_eq!(bye[0].1, Method::Bye);
    core.handle(t0, CallInput::Client(bye[0].0, response(200, "", None)));
    let a = drain(&mut core);
    assert_eq!(ended(&a)[0].end_reason, EndReason::LocalHangup as i32);
    assert_eq!(closed(&a), Some(true));
}

/// An incoming call that got its 180: the core, and what it did.
fn ringing(t0: Instant, body: &str) -> (CallCore, Vec<CallAction>) {
    let invite = request("INVITE", body);
    let mut core = CallCore::incoming(
        key(),
        settings(true),
        42,
        t0,
        stx(1),
        &invite,
        OtherCalls::default(),
    );
    let a = drain(&mut core);
    (core, a)
}

/// RFC 5761: an offer that multiplexes RTCP gets a relay with one socket and an answer with
/// `a=rtcp-mux`; one that does not gets neither, and our own offers do not ask for it.
#[test]
fn an_offer_with_rtcp_mux_gets_a_multiplexed_relay_and_answer() {
    let t0 = Instant::now();
    let answer_to = |offer: &str, started_muxed: bool| {
        let (mut core, _) = ringing(t0, offer);
        ring_then_answer(&mut core, t0);
        let asked = match drain(&mut core).as_slice() {
            [CallAction::StartRelay(streams)] => *streams,
            other => panic!("expected StartRelay, got {other:?}"),
        };
        let mut relay = RELAY;
        relay.ports.rtcp_mux.audio = started_muxed;
        core.relay_started(t0, Some(relay));
        let answer = sdp_of_200(&drain(&mut core)).expect("200 with an answer");
        (asked, answer)
    };
    let muxed_offer =
        peer_sdp(1, true, "sendrecv").replace("a=sendrecv", "a=rtcp-mux\r\na=sendrecv");
    let (asked, answer) = answer_to(&muxed_offer, true);
    assert!(asked.rtcp_mux.audio && !asked.rtcp_mux.video, "{asked:?}");
    assert!(answer.contains("a=rtcp-mux"), "{answer}");
    // The relay that started has both ports after all: no mux in the answer.
    let (_, answer) = answer_to(&muxed_offer, false);
    assert!(!answer.contains("a=rtcp-mux"), "{answer}");
    let (asked, answer) = answer_to(&peer_sdp(1, true, "sendrecv"), false);
    assert_eq!(asked.rtcp_mux, crate::media_sdp::RtcpMux::default());
    assert!(!answer.contains("a=rtcp-mux"), "{answer}");
    // An outgoing call's relays have both ports, and its offer does not multiplex.
    let (_, _, actions) = dialling(t0, false);
    assert!(actions.iter().all(|a| match a {
        CallAction::SendInvite { sdp, .. } => !sdp.contains("rtcp-mux"),
        _ => true,
    }));
}

#[test]
fn incoming_call_answered_acked_and_ended_by_the_peer() {
    let t0 = Instant::now();
    let (mut core, a) = ringing(t0, &peer_sdp(1, true, "sendrecv"));
    match &a[0] {
        CallAction::ToDevice {
            body: Body::IncomingCall(c),
            ..
        } => {
            assert_eq!(c.call_ref, 7);
            assert_eq!(c.from_uri, "sip:bob@example.org");
            assert_eq!(c.display_name, "Bob");
            assert!(c.media.is_some());
        }
        other => panic!("expected IncomingCall, got {other:?}"),
    }
    assert!(matches!(
        a[1],
        CallAction::Respond {
            status: 180,
            report: true,
            ..
        }
    ));
    core.handle(t0, CallInput::Responded(stx(1), 180, Some(dialog())));
    assert_eq!(drain(&mut core), vec![CallAction::SetDialog(dialog())]);
    assert_eq!(core.state(), CallState::Ringing);

    device_answers(&mut core, t0);
    assert_eq!(
        drain(&mut core),
        vec![CallAction::StartRelay(RelayStreams::default())]
    );
    core.relay_started(t0, Some(RELAY));
    let a = drain(&mut core);
    let answer = a
        .iter()
        .find_map(|x| match x {
            CallAction::Respond {
                status: 200,
                body: Some((b, _)),
                report: true,
                ..
            } => Some(String::from_utf8_lossy(b).to_string()),
            _ => None,
        })
        .expect("200 with an answer");
    assert!(answer.contains("m=audio 40000"), "{answer}");
    assert!(a
        .iter()
        .any(|x| matches!(x, CallAction::Relay(RelayOp::SetRemote(..)))));
    // A hangup while the 200 is on its way waits for it.
    core.handle(t0, CallInput::Device(3, hangup()));
    assert!(drain(&mut core).is_empty());
    core.handle(t0, CallInput::Responded(stx(1), 200, Some(dialog())));
    let a = drain(&mut core);
    assert_eq!(events(&a)[0].state, CallState::Answered as i32);
    assert!(a.contains(&CallAction::InviteSettled));
    // ... then goes out: BYE (not written ahead: nothing was stored before the ACK).
    let bye = sent_in_dialog(&a);
    assert_eq!(bye.len(), 1);
    assert_eq!(bye[0].1, Method::Bye);

    // Another call: answered (stored as the 200 leaves, not a round trip later at the ACK: a
    // node that dies right after answering leaves the record), ACKed, then the peer hangs up.
    let (mut core, _) = ringing(t0, &peer_sdp(1, true, "sendrecv"));
    core.handle(t0, CallInput::Responded(stx(1), 180, Some(dialog())));
    core.handle(t0, CallInput::Device(2, Body::Answer(Answer::default())));
    core.relay_started(t0, Some(RELAY));
    core.handle(t0, CallInput::Responded(stx(1), 200, Some(dialog())));
    let a = drain(&mut core);
    assert!(
        a.iter().any(
            |x| matches!(x, CallAction::Replicate(f) if !f.app_data.as_ref().unwrap().outgoing)
        ),
        "{a:?}"
    );
    core.handle(t0, CallInput::Ack);
    assert!(drain(&mut core).is_empty(), "written once");
    core.handle(
        t0,
        CallInput::PeerRequest(stx(5), Box::new(request("BYE", ""))),
    );
    let a = drain(&mut core);
    assert_eq!(responses(&a), vec![(stx(5), 200)]);
    assert_eq!(ended(&a)[0].end_reason, EndReason::RemoteHangup as i32);
    assert_eq!(closed(&a), Some(true));
    // A retransmitted BYE after the end is still answered.
    core.handle(
        t0,
        CallInput::PeerRequest(stx(6), Box::new(request("BYE", ""))),
    );
    assert_eq!(responses(&drain(&mut core)), vec![(stx(6), 481)]);
}

/// The media of a device with VP8 video and the signal data stream.
fn device_with_every_stream() -> MediaOffer {
    MediaOffer {
        video_codecs: vec![thalamus_proto::v1::VideoCodec::Vp8 as i32],
        signal: true,
        ..Default::default()
    }
}

const EVERY_STREAM: RelayAddr = RelayAddr {
    ip: IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)),
    ports: crate::media_sdp::StreamPorts {
        audio: 40_000,
        video: Some(40_002),
        signal: Some(40_004),
        rtcp_mux: crate::media_sdp::RtcpMux {
            audio: false,
            video: false,
            signal: false,
        },
    },
    keys: crate::media_sdp::StreamKeys::NONE,
};

fn set_remote_streams(actions: &[CallAction]) -> Vec<(thalamus_proto::media::StreamId, u16)> {
    actions
        .iter()
        .filter_map(|a| match a {
            CallAction::Relay(RelayOp::SetRemote(stream, remote, _)) => {
                Some((*stream, remote.rtp.port()))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn video_and_the_signal_stream_get_relays_lines_and_peers_of_their_own() {
    use thalamus_proto::media::StreamId;
    let t0 = Instant::now();
    // The device dials with every stream: three relays, three m-lines.
    let mut core = CallCore::outgoing(
        key(),
        settings(false),
        42,
        target(),
        Some(device_with_every_stream()),
        BTreeMap::new(),
    );
    assert_eq!(
        drain(&mut core),
        vec![CallAction::StartRelay(RelayStreams {
            video: true,
            signal: true,
            ..RelayStreams::default()
        })]
    );
    core.relay_started(t0, Some(EVERY_STREAM));
    let a = drain(&mut core);
    let (tx, offer) = a
        .iter()
        .find_map(|a| match a {
            CallAction::SendInvite { tx, sdp, .. } => Some((*tx, sdp.clone())),
            _ => None,
        })
        .expect("an INVITE");
    assert!(offer.contains("m=audio 40000 RTP/AVP"), "{offer}");
    assert!(offer.contains("m=video 40002 RTP/AVP 97"), "{offer}");
    assert!(
        offer.contains("a=rtcp-fb:* nack pli\r\na=rtcp-fb:* ccm fir"),
        "{offer}"
    );
    assert!(
        offer.contains("m=application 40004 RTP/AVP 98\r\na=rtpmap:98 x-mbfp-signal/1000"),
        "{offer}"
    );
    // The peer takes audio and the signal stream and rejects video: two relays get a peer.
    let answer = format!(
        "{}m=video 0 RTP/AVP 97\r\nm=application 30004 RTP/AVP 98\r\na=rtpmap:98 x-mbfp-signal/1000\r\n",
        peer_sdp(1, false, "sendrecv")
    );
    core.handle(
        t0,
        CallInput::Client(tx, response(200, &answer, Some(dialog()))),
    );
    let a = drain(&mut core);
    assert_eq!(
        set_remote_streams(&a),
        [(StreamId::AUDIO, 30000), (StreamId::SIGNAL, 30004)]
    );
    // The refused video relay stops (its ports go back to the pool) before the others get
    // their peers.
    assert_eq!(
        a.iter()
            .filter(|x| matches!(x, CallAction::Relay(RelayOp::Stop(_))))
            .collect::<Vec<_>>(),
        [&CallAction::Relay(RelayOp::Stop(StreamId::VIDEO))]
    );
    let answered = &events(&a)[0];
    assert!(
        answered.media.as_ref().is_some_and(|m| m.signal),
        "{answered:?}"
    );
    // With no video relay left, a key frame request means nothing.
    let keyframe = || Body::KeyframeRequest(thalamus_proto::v1::KeyframeRequest { call_ref: 7 });
    core.handle(t0, CallInput::Device(9, keyframe()));
    assert!(drain(&mut core).is_empty());
    // A later offer (the device holds) keeps the refused video line, at port 0 (RFC 3264
    // 8.2), and the signal stream on its port.
    core.handle(t0, CallInput::Device(4, Body::Hold(Hold { call_ref: 7 })));
    let reinvite = sent_in_dialog(&drain(&mut core));
    let sdp = &reinvite[0].2;
    assert!(sdp.contains("m=video 0 "), "{sdp}");
    // The offer was version 1; the retired line made version 2; the hold, 3.
    assert!(sdp.contains("o=- 42 3 IN IP4"), "{sdp}");
    assert!(sdp.contains("m=application 40004 "), "{sdp}");
    assert!(
        sdp.find("m=audio") < sdp.find("m=video")
            && sdp.find("m=video") < sdp.find("m=application"),
        "{sdp}"
    );

    // A peer's offer without them: the device's answer with every stream gets audio only.
    let (mut core, a) = ringing(t0, &peer_sdp(1, false, "sendrecv"));
    match &a[0] {
        CallAction::ToDevice {
            body: Body::IncomingCall(c),
            ..
        } => assert!(c.media.as_ref().is_some_and(|m| !m.signal)),
        other => panic!("expected IncomingCall, got {other:?}"),
    }
    core.handle(t0, CallInput::Responded(stx(1), 180, Some(dialog())));
    drain(&mut core);
    let answer = Body::Answer(Answer {
        call_ref: 7,
        media: Some(device_with_every_stream()),
    });
    core.handle(t0, CallInput::Device(2, answer.clone()));
    assert_eq!(
        drain(&mut core),
        vec![CallAction::StartRelay(RelayStreams::default())]
    );
    core.relay_started(t0, Some(RELAY));
    drain(&mut core);
    // Without video a key frame request means nothing (and gets no answer).
    core.handle(t0, CallInput::Device(9, keyframe()));
    assert!(drain(&mut core).is_empty());

    // A peer's offer with the signal stream (and no video): the device is told, and its
    // answer gets a signal relay whose port the 200 names.
    let offer = format!(
        "{}m=application 30004 RTP/AVP 120\r\na=rtpmap:120 x-mbfp-signal/1000\r\n",
        peer_sdp(1, false, "sendrecv")
    );
    let (mut core, a) = ringing(t0, &offer);
    match &a[0] {
        CallAction::ToDevice {
            body: Body::IncomingCall(c),
            ..
        } => assert!(c.media.as_ref().is_some_and(|m| m.signal)),
        other => panic!("expected IncomingCall, got {other:?}"),
    }
    core.handle(t0, CallInput::Responded(stx(1), 180, Some(dialog())));
    drain(&mut core);
    core.handle(t0, CallInput::Device(2, answer));
    assert_eq!(
        drain(&mut core),
        vec![CallAction::StartRelay(RelayStreams {
            video: false,
            signal: true,
            ..RelayStreams::default()
        })]
    );
    let signal_only = RelayAddr {
        ports: crate::media_sdp::StreamPorts {
            video: None,
            ..EVERY_STREAM.ports
        },
        ..EVERY_STREAM
    };
    core.relay_started(t0, Some(signal_only));
    let a = drain(&mut core);
    let answer = sdp_of_200(&a).expect("200 with an answer");
    assert!(
        answer.contains("m=application 40004 RTP/AVP 120\r\na=rtpmap:120 x-mbfp-signal/1000"),
        "{answer}"
    );
    assert_eq!(
        set_remote_streams(&a),
        [(StreamId::AUDIO, 30000), (StreamId::SIGNAL, 30004)]
    );
}

#[test]
fn incoming_call_rejected_declined_or_cancelled() {
    let t0 = Instant::now();
    let sdp = peer_sdp(1, true, "sendrecv");
    // Reject with the device's status.
    let (mut core, _) = ringing(t0, &sdp);
    core.handle(
        t0,
        CallInput::Device(
            2,
            Body::Reject(Reject {
                call_ref: 7,
                sip_status: 600,
                reason: "Busy Everywhere".into(),
            }),
        ),
    );
    let a = drain(&mut core);
    assert_eq!(responses(&a), vec![(stx(1), 600)]);
    assert_eq!(ended(&a)[0].end_reason, EndReason::Busy as i32);
    assert!(a.contains(&CallAction::InviteSettled));
    assert_eq!(closed(&a), Some(false));
    // Hangup while ringing: 603.
    let (mut core, _) = ringing(t0, &sdp);
    core.handle(t0, CallInput::Device(2, hangup()));
    let a = drain(&mut core);
    assert_eq!(responses(&a), vec![(stx(1), 603)]);
    assert_eq!(ended(&a)[0].end_reason, EndReason::Rejected as i32);
    // The caller cancels.
    let (mut core, _) = ringing(t0, &sdp);
    core.handle(t0, CallInput::Cancelled);
    let a = drain(&mut core);
    let end = ended(&a);
    assert_eq!(end[0].end_reason, EndReason::Cancelled as i32);
    assert_eq!(end[0].sip_status, 487);
    assert!(
        responses(&a).is_empty(),
        "the user agent answered 487 itself"
    );
    // The caller cancels just as the device answers: the 200 made no dialog.
    let (mut core, _) = ringing(t0, &sdp);
    core.handle(t0, CallInput::Device(2, Body::Answer(Answer::default())));
    core.relay_started(t0, Some(RELAY));
    drain(&mut core);
    core.handle(t0, CallInput::Responded(stx(1), 200, None));
    assert!(ended(&drain(&mut core)).is_empty());
    core.handle(t0, CallInput::Cancelled);
    assert_eq!(ended(&drain(&mut core)).len(), 1);
    // Not SDP: 400, and the device hears nothing.
    let mut core = CallCore::incoming(
        key(),
        settings(true),
        42,
        t0,
        stx(1),
        &request("INVITE", "not sdp at all"),
        OtherCalls::default(),
    );
    let a = drain(&mut core);
    assert_eq!(responses(&a), vec![(stx(1), 400)]);
    assert!(events(&a).is_empty());
    assert!(core.is_closed());
}

#[test]
fn an_unanswered_incoming_call_times_out_on_the_virtual_clock() {
    let t0 = Instant::now();
    let (mut core, _) = ringing(t0, &peer_sdp(1, true, "sendrecv"));
    assert_eq!(core.poll_timeout(), Some(t0 + Duration::from_secs(60)));
    core.handle_timeout(t0 + Duration::from_secs(59));
    assert!(drain(&mut core).is_empty());
    core.handle_timeout(t0 + Duration::from_secs(60));
    let a = drain(&mut core);
    assert_eq!(responses(&a), vec![(stx(1), 480)]);
    assert_eq!(ended(&a)[0].end_reason, EndReason::NoAnswer as i32);
    assert_eq!(core.poll_timeout(), None);
}

#[test]
fn hold_and_resume_by_the_device_and_a_refused_reinvite() {
    let t0 = Instant::now();
    let mut core = answered_outgoing(t0, false, &peer_sdp(1, true, "sendrecv"));
    core.handle(t0, CallInput::Device(4, Body::Hold(Hold { call_ref: 7 })));
    let a = drain(&mut core);
    let reinvite = sent_in_dialog(&a);
    assert_eq!(reinvite[0].1, Method::Invite);
    assert!(reinvite[0].2.contains("a=sendonly"), "{}", reinvite[0].2);
    // A second command waits for the first.
    core.handle(t0, CallInput::Device(5, Body::Hold(Hold { call_ref: 7 })));
    assert!(drain(&mut core).is_empty());
    core.handle(
        t0,
        CallInput::Client(
            reinvite[0].0,
            response(200, &peer_sdp(2, true, "recvonly"), Some(dialog())),
        ),
    );
    let a = drain(&mut core);
    assert!(a.contains(&CallAction::Ack { dialog: dialog() }));
    assert!(a.contains(&CallAction::Relay(RelayOp::Direction(Direction::SendOnly))));
    assert_eq!(events(&a)[0].state, CallState::Held as i32);
    assert_eq!(core.state(), CallState::Held);
    // ... and then runs: already on hold.
    assert_eq!(errors(&a), vec!["already on hold".to_string()]);

    core.handle(
        t0,
        CallInput::Device(6, Body::Resume(Resume { call_ref: 7 })),
    );
    let a = drain(&mut core);
    let reinvite = sent_in_dialog(&a);
    assert!(reinvite[0].2.contains("a=sendrecv"));
    core.handle(
        t0,
        CallInput::Client(
            reinvite[0].0,
            response(200, &peer_sdp(3, true, "sendrecv"), Some(dialog())),
        ),
    );
    let a = drain(&mut core);
    assert!(a.contains(&CallAction::Relay(RelayOp::Direction(Direction::SendRecv))));
    assert_eq!(events(&a)[0].state, CallState::Resumed as i32);

    // Refused: the call stays as it was, and the device learns the status.
    core.handle(t0, CallInput::Device(7, Body::Hold(Hold { call_ref: 7 })));
    let tx = sent_in_dialog(&drain(&mut core))[0].0;
    core.handle(t0, CallInput::Client(tx, response(488, "", None)));
    let a = drain(&mut core);
    let ev = &events(&a)[0];
    assert_eq!(ev.state, CallState::Answered as i32);
    assert_eq!(ev.sip_status, 488);
    assert!(ev.reason.starts_with("re-INVITE refused"));
    assert!(ended(&a).is_empty());
    // Timed out: an error for that request.
    core.handle(t0, CallInput::Device(8, Body::Hold(Hold { call_ref: 7 })));
    let tx = sent_in_dialog(&drain(&mut core))[0].0;
    core.handle(t0, CallInput::Client(tx, ClientOutcome::Timeout));
    assert_eq!(
        errors(&drain(&mut core)),
        vec!["re-INVITE timed out".to_string()]
    );
}

#[test]
fn hold_and_resume_by_the_peer_and_offerless_reinvite() {
    let t0 = Instant::now();
    let mut core = answered_outgoing(t0, true, &peer_sdp(1, true, "sendrecv"));
    core.handle(
        t0,
        CallInput::PeerRequest(
            stx(2),
            Box::new(request("INVITE", &peer_sdp(2, true, "sendonly"))),
        ),
    );
    let a = drain(&mut core);
    let answer = sdp_of_200(&a).unwrap();
    assert!(answer.contains("a=recvonly"), "{answer}");
    let ev = &events(&a)[0];
    assert_eq!(ev.state, CallState::Held as i32);
    assert_eq!(ev.reason, "held by the remote party");
    assert!(
        a.iter().any(|x| matches!(x, CallAction::Replicate(_))),
        "a target refresh rewrites the record"
    );
    core.handle(
        t0,
        CallInput::PeerRequest(
            stx(3),
            Box::new(request("UPDATE", &peer_sdp(3, true, "sendrecv"))),
        ),
    );
    let a = drain(&mut core);
    assert_eq!(events(&a)[0].state, CallState::Resumed as i32);
    // Offerless: answered with our current description.
    core.handle(
        t0,
        CallInput::PeerRequest(stx(4), Box::new(request("INVITE", ""))),
    );
    let a = drain(&mut core);
    assert!(matches!(
        &a[0],
        CallAction::Respond {
            status: 200,
            body: Some(_),
            ..
        }
    ));
    assert!(events(&a).is_empty());
    // An offer we cannot answer: 488, the call goes on.
    let video_only = "v=0\r\no=- 1 4 IN IP4 10.0.0.9\r\ns=-\r\nc=IN IP4 10.0.0.9\r\nt=0 0\r\nm=audio 30000 RTP/AVP 98\r\na=rtpmap:98 speex/16000\r\n";
    core.handle(
        t0,
        CallInput::PeerRequest(stx(5), Box::new(request("INVITE", video_only))),
    );
    let a = drain(&mut core);
    assert_eq!(responses(&a), vec![(stx(5), 488)]);
    assert!(!core.is_closed());
}

#[test]
fn a_reinvite_from_the_peer_while_ours_is_pending_gets_491() {
    let t0 = Instant::now();
    let mut core = answered_outgoing(t0, false, &peer_sdp(1, true, "sendrecv"));
    core.handle(t0, CallInput::Device(4, Body::Hold(Hold { call_ref: 7 })));
    drain(&mut core);
    core.handle(
        t0,
        CallInput::PeerRequest(
            stx(2),
            Box::new(request("INVITE", &peer_sdp(2, true, "sendonly"))),
        ),
    );
    let a = drain(&mut core);
    assert!(matches!(
        &a[0],
        CallAction::Respond { status: 491, headers, .. } if headers.iter().any(|(n, _)| *n == HeaderName::RetryAfter)
    ));
    assert!(events(&a).is_empty());
}

#[test]
fn dtmf_in_the_media_when_negotiated_else_by_info() {
    let t0 = Instant::now();
    // telephone-event negotiated: RFC 4733 packets into the relay, no SIP.
    let mut core = answered_outgoing(t0, true, &peer_sdp(1, true, "sendrecv"));
    core.handle(
        t0,
        CallInput::Device(
            4,
            Body::Dtmf(Dtmf {
                call_ref: 7,
                digit: "5".into(),
                duration_ms: 100,
            }),
        ),
    );
    let a = drain(&mut core);
    match a.as_slice() {
        [CallAction::Relay(RelayOp::Inject(packets))] => assert_eq!(packets.len(), 4),
        other => panic!("expected injected telephone-events, got {other:?}"),
    }
    // A bad digit is refused.
    core.handle(
        t0,
        CallInput::Device(
            5,
            Body::Dtmf(Dtmf {
                call_ref: 7,
                digit: "Z".into(),
                duration_ms: 100,
            }),
        ),
    );
    assert_eq!(errors(&drain(&mut core)).len(), 1);

    // Not negotiated: INFO with application/dtmf-relay (written ahead: the record is stored).
    let mut core = answered_outgoing(t0, true, &peer_sdp(1, false, "sendrecv"));
    core.handle(
        t0,
        CallInput::Device(
            4,
            Body::Dtmf(Dtmf {
                call_ref: 7,
                digit: "#".into(),
                duration_ms: 0,
            }),
        ),
    );
    assert!(matches!(
        drain(&mut core).as_slice(),
        [CallAction::WriteAhead(_)]
    ));
    core.handle(t0, CallInput::WriteAheadDone(WriteAhead::Failed));
    let a = drain(&mut core);
    let info = sent_in_dialog(&a);
    assert_eq!(info[0].1, Method::Info);
    assert_eq!(info[0].2, "Signal=#\r\nDuration=160\r\n");
    core.handle(t0, CallInput::Client(info[0].0, response(415, "", None)));
    assert_eq!(
        errors(&drain(&mut core)),
        vec!["INFO refused: 415".to_string()]
    );

    // From the peer: INFO becomes a Dtmf frame.
    core.handle(
        t0,
        CallInput::PeerRequest(
            stx(9),
            Box::new(request("INFO", "Signal=7\r\nDuration=250\r\n")),
        ),
    );
    let a = drain(&mut core);
    assert_eq!(responses(&a), vec![(stx(9), 200)]);
    assert!(a.iter().any(|x| matches!(
        x,
        CallAction::ToDevice { body: Body::Dtmf(d), .. } if d.digit == "7" && d.duration_ms == 250
    )));
}

#[test]
fn bye_crossing_bye_ends_the_call_once() {
    let t0 = Instant::now();
    let mut core = answered_outgoing(t0, false, &peer_sdp(1, true, "sendrecv"));
    core.handle(t0, CallInput::Device(4, hangup()));
    let bye = sent_in_dialog(&drain(&mut core))[0].0;
    core.handle(
        t0,
        CallInput::PeerRequest(stx(2), Box::new(request("BYE", ""))),
    );
    let a = drain(&mut core);
    assert_eq!(responses(&a), vec![(stx(2), 200)]);
    assert!(ended(&a).is_empty());
    // Ours is answered 481 (the peer ended the dialog first): the call ends, once.
    core.handle(t0, CallInput::Client(bye, response(481, "", None)));
    let a = drain(&mut core);
    assert_eq!(ended(&a).len(), 1);
    assert_eq!(ended(&a)[0].end_reason, EndReason::LocalHangup as i32);
    assert!(core.is_closed());
    core.handle(t0, CallInput::Client(bye, response(200, "", None)));
    core.handle(t0, CallInput::DeviceGone);
    assert!(ended(&drain(&mut core)).is_empty());
}

#[test]
fn ack_and_media_timeouts_end_the_call_with_a_bye() {
    let t0 = Instant::now();
    for (input, reason) in [
        (CallInput::AckTimeout, EndReason::Failed),
        (CallInput::MediaTimeout, EndReason::MediaTimeout),
    ] {
        let mut core = answered_outgoing(t0, false, &peer_sdp(1, true, "sendrecv"));
        core.handle(t0, input.clone());
        let a = drain(&mut core);
        let bye = sent_in_dialog(&a);
        assert_eq!(bye[0].1, Method::Bye);
        core.handle(t0, CallInput::Client(bye[0].0, ClientOutcome::Timeout));
        let a = drain(&mut core);
        assert_eq!(ended(&a)[0].end_reason, reason as i32);
    }
}

#[test]
fn a_write_ahead_conflict_or_a_conflict_notice_drops_the_call_without_bye() {
    let t0 = Instant::now();
    let mut core = answered_outgoing(t0, true, &peer_sdp(1, true, "sendrecv"));
    core.handle(t0, CallInput::Device(4, Body::Hold(Hold { call_ref: 7 })));
    drain(&mut core);
    core.handle(t0, CallInput::WriteAheadDone(WriteAhead::Lost));
    let a = drain(&mut core);
    assert!(
        sent_in_dialog(&a).is_empty(),
        "no request after losing the dialog"
    );
    assert_eq!(
        errors(&a),
        vec!["the call moved to another node".to_string()]
    );
    assert!(a.contains(&CallAction::Count(CallCount::DialogLost)));
    assert_eq!(ended(&a)[0].end_reason, EndReason::NodeFailover as i32);
    assert_eq!(closed(&a), Some(false), "the new owner's record stays");

    let mut core = answered_outgoing(t0, true, &peer_sdp(1, true, "sendrecv"));
    core.handle(t0, CallInput::OwnershipLost);
    let a = drain(&mut core);
    assert!(sent_in_dialog(&a).is_empty());
    assert_eq!(ended(&a)[0].end_reason, EndReason::NodeFailover as i32);
    assert_eq!(closed(&a), Some(false));
}

/// A record another node wrote: an answered call whose local SDP named the old node's relay.
#[test]
fn a_fenced_node_holds_its_bye_until_it_may_act_and_refuses_dtmf_meanwhile() {
    let t0 = Instant::now();
    let mut core = answered_outgoing(t0, true, &peer_sdp(1, false, "sendrecv"));
    core.handle(t0, CallInput::Device(3, hangup()));
    assert!(matches!(
        drain(&mut core).as_slice(),
        [CallAction::WriteAhead(_)]
    ));
    // The write failed and the fence says another node may hold the dialog: nothing is sent,
    // the call is not over, and the write is tried again a second later.
    core.handle(t0, CallInput::WriteAheadDone(WriteAhead::Fenced));
    let a = drain(&mut core);
    assert!(sent_in_dialog(&a).is_empty(), "{a:?}");
    assert!(ended(&a).is_empty() && closed(&a).is_none(), "{a:?}");
    assert_eq!(core.poll_timeout(), Some(t0 + FENCED_RETRY));
    // Meanwhile a DTMF waits behind the BYE (one request at a time) and nothing goes out early.
    core.handle_timeout(t0 + FENCED_RETRY - Duration::from_millis(1));
    assert!(drain(&mut core).is_empty());
    let t1 = t0 + FENCED_RETRY;
    core.handle_timeout(t1);
    assert!(matches!(
        drain(&mut core).as_slice(),
        [CallAction::WriteAhead(_)]
    ));
    // The store answers again: the BYE goes out, and the call ends as usual (with a tombstone).
    core.handle(t1, CallInput::WriteAheadDone(WriteAhead::Written));
    let a = drain(&mut core);
    let bye = sent_in_dialog(&a);
    assert_eq!(bye.len(), 1);
    assert_eq!(bye[0].1, Method::Bye);
    core.handle(t1, CallInput::Client(bye[0].0, response(200, "", None)));
    let a = drain(&mut core);
    assert_eq!(ended(&a).len(), 1);
    assert_eq!(closed(&a), Some(true));

    // A DTMF by INFO while fenced is refused (the device may try again); the call goes on.
    let mut core = answered_outgoing(t0, true, &peer_sdp(1, false, "sendrecv"));
    core.handle(
        t0,
        CallInput::Device(
            4,
            Body::Dtmf(Dtmf {
                call_ref: 7,
                digit: "1".into(),
                duration_ms: 100,
            }),
        ),
    );
    drain(&mut core);
    core.handle(t0, CallInput::WriteAheadDone(WriteAhead::Fenced));
    let a = drain(&mut core);
    assert_eq!(errors(&a).len(), 1, "{a:?}");
    assert!(sent_in_dialog(&a).is_empty() && closed(&a).is_none());
    assert_eq!(core.poll_timeout(), None);
}

#[test]
fn a_node_fenced_for_too_long_gives_the_call_up_without_a_bye_or_a_tombstone() {
    let t0 = Instant::now();
    let mut core = answered_outgoing(t0, true, &peer_sdp(1, false, "sendrecv"));
    core.handle(t0, CallInput::Device(3, hangup()));
    drain(&mut core);
    let mut now = t0;
    for attempt in 1..=MAX_FENCED_TRIES {
        core.handle(now, CallInput::WriteAheadDone(WriteAhead::Fenced));
        let a = drain(&mut core);
        assert!(sent_in_dialog(&a).is_empty());
        if attempt < MAX_FENCED_TRIES {
            assert!(closed(&a).is_none(), "closed after {attempt} tries");
            now += FENCED_RETRY;
            core.handle_timeout(now);
            assert!(matches!(
                drain(&mut core).as_slice(),
                [CallAction::WriteAhead(_)]
            ));
        } else {
            // The record stays for whichever node holds the dialog: no tombstone.
            assert_eq!(closed(&a), Some(false), "{a:?}");
            assert_eq!(ended(&a)[0].end_reason, EndReason::NodeFailover as i32);
        }
    }
    assert!(core.is_closed());
}

fn stored(held: bool) -> StoredDialog {
    let mut record = StoredDialog::new(
        DialogKey::new("call-1", "local", "remote"),
        SipDialogPayload {
            format_version: 1,
            data: "{}".into(),
        },
        "dev-1",
        7,
        "gw-1",
    );
    record.epoch = 3;
    record.version = 9;
    record.media.local_sdp = "v=0\r\no=- 77 2 IN IP4 10.0.0.2\r\ns=-\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\nm=audio 50000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=sendrecv\r\n".into();
    record.media.remote_sdp = peer_sdp(1, true, "sendrecv");
    record.app_data = Some(
        CallAppData {
            v: 1,
            remote_uri: "sip:bob@example.org".into(),
            outgoing: true,
            held,
            started_ms: Some(1_700_000_000_000),
            answered_ms: Some(1_700_000_002_000),
            owners: vec!["node-0".into()],
            session_timer: None,
            transfer: None,
        }
        .encode(),
    );
    record
}

/// SRTP required: the device's call offers RTP/SAVP with the relay's keys, the peer's answer
/// picks a suite by tag and the relay gets both keys of that tag; a plain offer from a peer is
/// refused with 488.
#[test]
fn srtp_required_offers_keys_pairs_the_answer_s_tag_and_refuses_plain_offers() {
    use thalamus_sip::sdp::{Crypto, CryptoSuite, SrtpPolicy};
    let t0 = Instant::now();
    let required = CallSettings {
        srtp: SrtpPolicy::Require,
        ..settings(false)
    };
    let mut n = 0u8;
    let keys = crate::media_sdp::StreamKeys::generate(|b| {
        n += 1;
        b.fill(n);
    });
    let relay = RelayAddr {
        keys: keys.clone(),
        ..RELAY
    };
    let mut core = CallCore::outgoing(
        key(),
        required.clone(),
        42,
        target(),
        Some(MediaOffer::default()),
        BTreeMap::new(),
    );
    drain(&mut core);
    core.relay_started(t0, Some(relay.clone()));
    let a = drain(&mut core);
    let (tx, offer) = a
        .iter()
        .find_map(|a| match a {
            CallAction::SendInvite { tx, sdp, .. } => Some((*tx, sdp.clone())),
            _ => None,
        })
        .unwrap();
    assert!(offer.contains("m=audio 40000 RTP/SAVP"), "{offer}");
    assert!(
        offer.contains("a=crypto:1 AEAD_AES_128_GCM inline:"),
        "{offer}"
    );
    assert!(
        offer.contains("a=crypto:2 AES_CM_128_HMAC_SHA1_80 inline:"),
        "{offer}"
    );
    // The peer takes tag 2 with its own key.
    let theirs = Crypto::new(2, CryptoSuite::AesCm128HmacSha1_80, vec![0xee; 30]);
    let answer = peer_sdp(1, false, "sendrecv").replace("RTP/AVP", "RTP/SAVP")
        + &format!("a=crypto:{theirs}\r\n");
    core.handle(
        t0,
        CallInput::Client(tx, response(200, &answer, Some(dialog()))),
    );
    let got = drain(&mut core)
        .into_iter()
        .find_map(|a| match a {
            CallAction::Relay(RelayOp::SetRemote(_, _, keys)) => Some(keys),
            _ => None,
        })
        .expect("the relay gets the peer");
    let got = got.expect("SRTP keys");
    assert_eq!(got.suite, CryptoSuite::AesCm128HmacSha1_80);
    assert_eq!(got.local, keys.audio[1].key_salt);
    assert_eq!(got.remote, vec![0xee; 30]);

    // A plain offer from a peer, answered by a device: 488.
    let invite = request("INVITE", &peer_sdp(1, false, "sendrecv"));
    let mut core = CallCore::incoming(
        key(),
        required,
        42,
        t0,
        stx(1),
        &invite,
        OtherCalls::default(),
    );
    drain(&mut core);
    ring_then_answer(&mut core, t0);
    drain(&mut core);
    core.relay_started(t0, Some(relay));
    assert!(responses(&drain(&mut core)).contains(&(stx(1), 488)));
}

/// A node takes over a call with video and the signal stream: it starts a relay for each, and
/// the re-INVITE that moves the media names all three of its new ports, in the m-line order of
/// the description the dead node sent, with the signal stream's payload type as negotiated.
#[test]
fn a_takeover_keeps_video_and_the_signal_stream() {
    use thalamus_proto::media::StreamId;
    let mut record = stored(false);
    record.media.local_sdp = "v=0\r\no=- 77 2 IN IP4 10.0.0.2\r\ns=-\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\nm=audio 50000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\nm=video 50002 RTP/AVP 97\r\na=rtpmap:97 VP8/90000\r\nm=application 50004 RTP/AVP 98\r\na=rtpmap:98 x-mbfp-signal/1000\r\na=sendrecv\r\n".into();
    record.media.remote_sdp = format!(
        "{}m=video 30002 RTP/AVP 97\r\na=rtpmap:97 VP8/90000\r\nm=application 30004 RTP/AVP 98\r\na=rtpmap:98 x-mbfp-signal/1000\r\n",
        peer_sdp(1, false, "sendrecv")
    );
    let mut core = CallCore::taken_over(
        key(),
        settings(true),
        42,
        ClaimedDialog {
            record: &record,
            remote_uri: "sip:bob@example.org".into(),
            uac: true,
            dialog: dialog(),
            trigger: TakeoverTrigger::DeviceResume,
            previous_owner: "gw-0".into(),
        },
    );
    assert_eq!(
        drain(&mut core),
        vec![CallAction::StartRelay(RelayStreams {
            video: true,
            signal: true,
            ..RelayStreams::default()
        })]
    );
    core.relay_started(Instant::now(), Some(EVERY_STREAM));
    let a = drain(&mut core);
    assert_eq!(
        set_remote_streams(&a),
        [
            (StreamId::AUDIO, 30000),
            (StreamId::VIDEO, 30002),
            (StreamId::SIGNAL, 30004)
        ]
    );
    // The CSeq is written ahead, then the re-INVITE goes.
    assert!(matches!(a.last(), Some(CallAction::WriteAhead(_))));
    core.handle(
        Instant::now(),
        CallInput::WriteAheadDone(WriteAhead::Written),
    );
    let reinvite = sent_in_dialog(&drain(&mut core))
        .into_iter()
        .find(|(_, m, _)| *m == Method::Invite)
        .expect("a re-INVITE moving the media");
    let lines: Vec<&str> = reinvite.2.lines().filter(|l| l.starts_with("m=")).collect();
    assert_eq!(
        lines,
        [
            "m=audio 40000 RTP/AVP 0 101",
            "m=video 40002 RTP/AVP 97",
            "m=application 40004 RTP/AVP 98"
        ],
        "{}",
        reinvite.2
    );
}

fn taken_over(trigger: TakeoverTrigger, held: bool) -> (CallCore, Vec<CallAction>) {
    let record = stored(held);
    let mut core = CallCore::taken_over(
        key(),
        settings(true),
        42,
        ClaimedDialog {
            record: &record,
            remote_uri: "sip:bob@example.org".into(),
            uac: true,
            dialog: dialog(),
            trigger,
            previous_owner: "gw-0".into(),
        },
    );
    assert_eq!(core.dialog(), Some(&dialog()));
    assert_eq!(
        drain(&mut core),
        vec![CallAction::StartRelay(RelayStreams::default())]
    );
    core.relay_started(Instant::now(), Some(RELAY));
    let a = drain(&mut core);
    (core, a)
}

#[test]
fn takeover_in_uas_mode_answers_the_request_then_moves_the_media() {
    let t0 = Instant::now();
    let (mut core, a) = taken_over(
        TakeoverTrigger::Request {
            method: Method::Info,
            arrived: t0,
        },
        false,
    );
    assert!(a
        .iter()
        .any(|x| matches!(x, CallAction::Relay(RelayOp::SetRemote(..)))));
    assert!(
        sent_in_dialog(&a).is_empty(),
        "the request is answered first"
    );
    assert_eq!(core.state(), CallState::Answered);
    let later = t0 + Duration::from_millis(3);
    core.handle(
        later,
        CallInput::PeerRequest(stx(2), Box::new(request("INFO", "Signal=1\r\n"))),
    );
    let a = drain(&mut core);
    assert_eq!(responses(&a)[0], (stx(2), 200));
    assert!(a.contains(&CallAction::TakeoverAnswered(Duration::from_millis(3))));
    // Then the media re-INVITE, written ahead from the claimed record's epoch and version.
    let facts = a
        .iter()
        .find_map(|x| match x {
            CallAction::WriteAhead(f) => Some(f.clone()),
            _ => None,
        })
        .expect("the re-INVITE is written ahead");
    assert_eq!((facts.epoch, facts.base_version), (3, 9));
    core.handle(later, CallInput::WriteAheadDone(WriteAhead::Written));
    let a = drain(&mut core);
    let reinvite = sent_in_dialog(&a);
    assert_eq!(reinvite[0].1, Method::Invite);
    assert!(
        reinvite[0].2.contains("m=audio 40000"),
        "this node's relay: {}",
        reinvite[0].2
    );
    assert!(
        reinvite[0].2.contains("o=- 77 3 IN IP4"),
        "the SDP session goes on: {}",
        reinvite[0].2
    );
    core.handle(
        later,
        CallInput::Client(
            reinvite[0].0,
            response(200, &peer_sdp(2, true, "sendrecv"), None),
        ),
    );
    let a = drain(&mut core);
    assert!(a.contains(&CallAction::Ack { dialog: dialog() }));
    assert!(a.iter().any(|x| matches!(x, CallAction::Replicate(_))));
    assert!(a.contains(&CallAction::Note(
        "media moved to this node (re-INVITE answered)"
    )));
    assert!(ended(&a).is_empty());

    // A BYE as the trigger: answered, and no re-INVITE.
    let (mut core, _) = taken_over(
        TakeoverTrigger::Request {
            method: Method::Bye,
            arrived: t0,
        },
        false,
    );
    core.handle(
        later,
        CallInput::PeerRequest(stx(3), Box::new(request("BYE", ""))),
    );
    let a = drain(&mut core);
    assert_eq!(responses(&a)[0], (stx(3), 200));
    assert!(sent_in_dialog(&a).is_empty());
    // Timed, and the timing comes before the end (the driver stops at Close).
    let timed = a
        .iter()
        .position(|x| *x == CallAction::TakeoverAnswered(Duration::from_millis(3)))
        .expect("the takeover is timed");
    assert!(
        timed
            < a.iter()
                .position(|x| matches!(x, CallAction::Close { .. }))
                .unwrap()
    );
    assert_eq!(ended(&a)[0].end_reason, EndReason::RemoteHangup as i32);
    assert_eq!(closed(&a), Some(true));
}

#[test]
fn takeover_in_uac_mode_reinvites_for_media_and_carries_out_the_command() {
    let t0 = Instant::now();
    // The device resumed here: re-INVITE at once, sendonly when the call was held.
    let (mut core, a) = taken_over(TakeoverTrigger::DeviceResume, true);
    assert!(a.contains(&CallAction::Relay(RelayOp::Direction(Direction::SendOnly))));
    assert_eq!(core.state(), CallState::Held);
    assert!(matches!(a.last(), Some(CallAction::WriteAhead(_))));
    core.handle(t0, CallInput::WriteAheadDone(WriteAhead::Written));
    let reinvite = sent_in_dialog(&drain(&mut core));
    assert!(reinvite[0].2.contains("a=sendonly"));
    // The peer forgot the dialog: the call is over.
    core.handle(
        t0,
        CallInput::Client(reinvite[0].0, response(481, "", None)),
    );
    let a = drain(&mut core);
    assert_eq!(ended(&a)[0].end_reason, EndReason::Failed as i32);
    assert!(core.is_closed());

    // A device command for a call held elsewhere: re-INVITE first, then the command.
    let (mut core, _) = taken_over(
        TakeoverTrigger::DeviceCommand {
            request_id: 11,
            body: Body::Hold(Hold { call_ref: 7 }),
        },
        false,
    );
    core.handle(t0, CallInput::WriteAheadDone(WriteAhead::Written));
    let media = sent_in_dialog(&drain(&mut core));
    assert!(media[0].2.contains("a=sendrecv"));
    core.handle(
        t0,
        CallInput::Client(
            media[0].0,
            response(200, &peer_sdp(2, true, "sendrecv"), None),
        ),
    );
    let a = drain(&mut core);
    assert!(
        matches!(a.last(), Some(CallAction::WriteAhead(_))),
        "then the hold: {a:?}"
    );
    core.handle(t0, CallInput::WriteAheadDone(WriteAhead::Written));
    let hold = sent_in_dialog(&drain(&mut core));
    assert!(hold[0].2.contains("a=sendonly"));

    // Hang up from the API: BYE with the next CSeq, no re-INVITE.
    let (mut core, a) = taken_over(TakeoverTrigger::Hangup, false);
    assert!(matches!(a.last(), Some(CallAction::WriteAhead(_))));
    core.handle(t0, CallInput::WriteAheadDone(WriteAhead::Written));
    let bye = sent_in_dialog(&drain(&mut core));
    assert_eq!(bye.len(), 1);
    assert_eq!(bye[0].1, Method::Bye);
    core.handle(t0, CallInput::Client(bye[0].0, response(200, "", None)));
    assert_eq!(closed(&drain(&mut core)), Some(true));
}

#[test]
fn the_same_inputs_give_the_same_actions() {
    fn run() -> Vec<CallAction> {
        let t0 = Instant::now();
        let mut all = Vec::new();
        let (mut core, tx, a) = dialling(t0, true);
        all.extend(a);
        core.handle(
            t0,
            CallInput::Client(
                tx,
                response(200, &peer_sdp(1, false, "sendrecv"), Some(dialog())),
            ),
        );
        core.handle(t0, CallInput::Device(2, Body::Hold(Hold { call_ref: 7 })));
        core.handle(t0, CallInput::WriteAheadDone(WriteAhead::Written));
        core.handle(
            t0,
            CallInput::Client(2, response(200, &peer_sdp(2, false, "recvonly"), None)),
        );
        core.handle(t0, CallInput::Device(3, hangup()));
        core.handle(t0, CallInput::WriteAheadDone(WriteAhead::Written));
        core.handle(t0, CallInput::Client(3, response(200, "", None)));
        all.extend(drain(&mut core));
        all
    }
    let first = run();
    assert!(first.len() > 10);
    assert_eq!(first, run());
}

#[test]
fn a_timeout_while_a_request_is_in_flight_waits_for_it() {
    let t0 = Instant::now();
    // An ACK timeout while the device's BYE is out: no second BYE.
    let mut core = answered_outgoing(t0, false, &peer_sdp(1, true, "sendrecv"));
    core.handle(t0, CallInput::Device(4, hangup()));
    let bye = sent_in_dialog(&drain(&mut core))[0].0;
    core.handle(t0, CallInput::AckTimeout);
    core.handle(t0, CallInput::MediaTimeout);
    assert!(drain(&mut core).is_empty(), "one BYE only");
    core.handle(t0, CallInput::Client(bye, response(200, "", None)));
    let a = drain(&mut core);
    assert_eq!(ended(&a)[0].end_reason, EndReason::LocalHangup as i32);

    // A media timeout while a hold re-INVITE is out: the re-INVITE's 2xx is still ACKed and
    // reported, then the BYE goes.
    let mut core = answered_outgoing(t0, false, &peer_sdp(1, true, "sendrecv"));
    core.handle(t0, CallInput::Device(4, Body::Hold(Hold { call_ref: 7 })));
    let reinvite = sent_in_dialog(&drain(&mut core))[0].0;
    core.handle(t0, CallInput::MediaTimeout);
    assert!(drain(&mut core).is_empty());
    core.handle(
        t0,
        CallInput::Client(
            reinvite,
            response(200, &peer_sdp(2, true, "recvonly"), Some(dialog())),
        ),
    );
    let a = drain(&mut core);
    assert!(a.contains(&CallAction::Ack { dialog: dialog() }));
    assert_eq!(events(&a)[0].state, CallState::Held as i32);
    let bye = sent_in_dialog(&a);
    assert_eq!(bye.len(), 1);
    assert_eq!(bye[0].1, Method::Bye);
    core.handle(t0, CallInput::Client(bye[0].0, response(200, "", None)));
    assert_eq!(
        ended(&drain(&mut core))[0].end_reason,
        EndReason::MediaTimeout as i32
    );
}

#[test]
fn a_peer_reinvite_while_an_info_is_pending_is_answered_and_a_late_ack_writes_nothing() {
    let t0 = Instant::now();
    let mut core = answered_outgoing(t0, false, &peer_sdp(1, false, "sendrecv"));
    core.handle(
        t0,
        CallInput::Device(
            4,
            Body::Dtmf(Dtmf {
                call_ref: 7,
                digit: "1".into(),
                duration_ms: 100,
            }),
        ),
    );
    assert_eq!(sent_in_dialog(&drain(&mut core))[0].1, Method::Info);
    core.handle(
        t0,
        CallInput::PeerRequest(
            stx(2),
            Box::new(request("INVITE", &peer_sdp(2, false, "sendrecv"))),
        ),
    );
    assert_eq!(responses(&drain(&mut core)), vec![(stx(2), 200)]);

    // An incoming call hung up by the device before the peer's ACK: the ACK writes no record.
    let (mut core, _) = ringing(t0, &peer_sdp(1, true, "sendrecv"));
    core.handle(t0, CallInput::Device(2, Body::Answer(Answer::default())));
    core.relay_started(t0, Some(RELAY));
    core.handle(t0, CallInput::Responded(stx(1), 200, Some(dialog())));
    core.handle(t0, CallInput::Device(3, hangup()));
    drain(&mut core);
    core.handle(t0, CallInput::Ack);
    assert!(!drain(&mut core)
        .iter()
        .any(|x| matches!(x, CallAction::Replicate(_))));
}

#[test]
fn a_takeover_by_request_does_not_reinvite_over_a_bye() {
    let t0 = Instant::now();
    let (mut core, _) = taken_over(
        TakeoverTrigger::Request {
            method: Method::Info,
            arrived: t0,
        },
        false,
    );
    // The device hangs up before the request is delivered again.
    core.handle(t0, CallInput::Device(4, hangup()));
    assert!(matches!(
        drain(&mut core).as_slice(),
        [CallAction::WriteAhead(_)]
    ));
    core.handle(t0, CallInput::WriteAheadDone(WriteAhead::Written));
    let bye = sent_in_dialog(&drain(&mut core));
    assert_eq!(bye[0].1, Method::Bye);
    core.handle(
        t0,
        CallInput::PeerRequest(stx(2), Box::new(request("INFO", "Signal=1\r\n"))),
    );
    let a = drain(&mut core);
    assert_eq!(responses(&a), vec![(stx(2), 200)]);
    assert!(
        sent_in_dialog(&a).is_empty(),
        "no re-INVITE over the BYE: {a:?}"
    );
    core.handle(t0, CallInput::Client(bye[0].0, response(200, "", None)));
    assert_eq!(
        ended(&drain(&mut core))[0].end_reason,
        EndReason::LocalHangup as i32
    );
}

/// The call record (CDR) of each ending, on a virtual wall clock.
#[test]
fn the_summary_tells_how_each_call_went() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    const WALL: u64 = 1_800_000_000_000;

    // Outgoing, answered 2 s in, hung up by the device 5 s in.
    let (mut core, tx, _) = dialling(t0, true);
    core.set_wall_clock(t0, WALL);
    core.handle(
        at(2_000),
        CallInput::Client(
            tx,
            response(200, &peer_sdp(1, true, "sendrecv"), Some(dialog())),
        ),
    );
    let a = drain(&mut core);
    assert!(
        a.contains(&CallAction::Count(CallCount::SetUp(
            "outgoing",
            Duration::from_secs(2)
        ))),
        "{a:?}"
    );
    core.handle(at(5_000), CallInput::Device(3, hangup()));
    drain(&mut core);
    core.handle(at(5_000), CallInput::WriteAheadDone(WriteAhead::Written));
    let bye = sent_in_dialog(&drain(&mut core));
    core.handle(
        at(5_050),
        CallInput::Client(bye[0].0, response(200, "", None)),
    );
    drain(&mut core);
    assert!(core.is_closed());
    let s = core.summary();
    assert_eq!(s.ended_ms, Some(WALL + 5_050));
    assert!(s.outgoing);
    assert_eq!(s.started_ms, Some(WALL));
    assert_eq!(s.answered_ms, Some(WALL + 2_000));
    assert_eq!(s.end_reason, EndReason::LocalHangup);
    assert_eq!(s.owners, vec!["gw-1".to_string()]);
    assert!(!s.taken_over);
    assert!(s.owned_at_end);

    // Incoming, rejected by the device with 486 after 1 s: never answered, the status sent.
    let (mut core, _) = ringing(t0, &peer_sdp(1, true, "sendrecv"));
    core.set_wall_clock(t0, WALL);
    core.handle(
        at(1_000),
        CallInput::Device(
            2,
            Body::Reject(Reject {
                call_ref: 7,
                sip_status: 486,
                reason: "Busy Here".into(),
            }),
        ),
    );
    drain(&mut core);
    assert!(core.is_closed());
    let s = core.summary();
    assert!(!s.outgoing);
    assert_eq!(s.answered_ms, None);
    assert_eq!(s.ended_ms, Some(WALL + 1_000));
    assert_eq!(s.end_reason, EndReason::Busy);
    assert_eq!(s.sip_status, 486);

    // Outgoing, refused by the peer with 404.
    let (mut core, tx, _) = dialling(t0, true);
    core.set_wall_clock(t0, WALL);
    core.handle(at(300), CallInput::Client(tx, response(404, "", None)));
    drain(&mut core);
    let s = core.summary();
    assert_eq!(s.sip_status, 404);
    assert_eq!(s.end_reason, EndReason::NotFound);
    assert_eq!(s.answered_ms, None);

    // Taken over: the first start and answer and the owners before come from the record.
    let (mut core, _) = taken_over(TakeoverTrigger::Hangup, false);
    core.set_wall_clock(t0, WALL + 60_000);
    drain(&mut core);
    let s = core.summary();
    assert!(s.taken_over);
    assert_eq!(s.started_ms, Some(1_700_000_000_000));
    assert_eq!(s.answered_ms, Some(1_700_000_002_000));
    assert_eq!(
        s.owners,
        vec!["node-0".to_string(), "gw-0".to_string(), "gw-1".to_string()],
        "the owners the record names, the owner before the claim, then this node"
    );

    // Ownership lost: this node writes no record.
    let mut core = answered_outgoing(t0, true, &peer_sdp(1, true, "sendrecv"));
    core.handle(t0, CallInput::OwnershipLost);
    drain(&mut core);
    assert!(!core.summary().owned_at_end);
}

/// After a store outage the confirmed call's record is written again; a call still ringing
/// (nothing confirmed to write) or without replication writes nothing.
#[test]
fn the_record_is_written_again_when_the_store_is_back() {
    let t0 = Instant::now();
    let mut core = answered_outgoing(t0, true, &peer_sdp(1, true, "sendrecv"));
    core.handle(t0, CallInput::Rereplicate(None));
    let a = drain(&mut core);
    assert!(
        matches!(a.as_slice(), [CallAction::Replicate(f)] if f.call_ref == 7),
        "{a:?}"
    );
    let mut unreplicated = answered_outgoing(t0, false, &peer_sdp(1, true, "sendrecv"));
    unreplicated.handle(t0, CallInput::Rereplicate(None));
    assert!(drain(&mut unreplicated).is_empty());
    let (mut ringing, _) = ringing(t0, &peer_sdp(1, true, "sendrecv"));
    ringing.handle(t0, CallInput::Rereplicate(None));
    assert!(drain(&mut ringing).is_empty());
}

#[test]
fn the_owners_a_record_carries_are_capped() {
    let many: Vec<String> = (0..40).map(|n| format!("node-{n}")).collect();
    let kept = capped_owners(&many);
    assert_eq!(kept.len(), 16);
    assert_eq!(kept[0], "node-0");
    assert_eq!(kept[15], "node-39");
    assert_eq!(kept[1], "node-25");
    let few: Vec<String> = (0..3).map(|n| format!("node-{n}")).collect();
    assert_eq!(capped_owners(&few), few);
}

fn early_settings() -> CallSettings {
    CallSettings {
        replicate_early: true,
        ..settings(true)
    }
}

/// The early record another node (`node-0`) wrote for the ringing call, claimed by this one.
fn early_record() -> StoredDialog {
    let mut record = StoredDialog::new(
        DialogKey::new("call-1", "local", "remote"),
        SipDialogPayload {
            format_version: crate::dialogs::EARLY_INVITE_FORMAT,
            data: "{}".into(),
        },
        "dev-1",
        7,
        "gw-1",
    );
    record.epoch = 2;
    record.version = 4;
    record.app_data = Some(
        CallAppData {
            v: 1,
            remote_uri: "sip:bob@example.org".into(),
            outgoing: false,
            held: false,
            started_ms: Some(1_700_000_000_000),
            answered_ms: None,
            owners: Vec::new(),
            session_timer: None,
            transfer: None,
        }
        .encode(),
    );
    record
}

fn adopted(t0: Instant, trigger: TakeoverTrigger) -> (CallCore, Vec<CallAction>) {
    adopted_after(t0, trigger, Duration::ZERO)
}

fn adopted_after(
    t0: Instant,
    trigger: TakeoverTrigger,
    rang_for: Duration,
) -> (CallCore, Vec<CallAction>) {
    let invite = request("INVITE", &peer_sdp(1, true, "sendrecv"));
    let mut core = CallCore::adopted(
        key(),
        early_settings(),
        42,
        t0,
        stx(9),
        &invite,
        &early_record(),
        "node-0".into(),
        trigger,
        rang_for,
    );
    let a = drain(&mut core);
    (core, a)
}

#[test]
fn an_early_record_is_written_as_the_call_rings_and_ended_with_it() {
    let t0 = Instant::now();
    let invite = request("INVITE", &peer_sdp(1, true, "sendrecv"));
    // Rejected while ringing: the early record is written at the 180 and ended (tombstone).
    let mut core = CallCore::incoming(
        key(),
        early_settings(),
        42,
        t0,
        stx(1),
        &invite,
        OtherCalls::default(),
    );
    drain(&mut core);
    core.handle(t0, CallInput::Responded(stx(1), 180, Some(dialog())));
    let a = drain(&mut core);
    let early: Vec<&CallFacts> = a
        .iter()
        .filter_map(|x| match x {
            CallAction::ReplicateEarly(f) => Some(&**f),
            _ => None,
        })
        .collect();
    assert_eq!(early.len(), 1, "{a:?}");
    assert_eq!((early[0].call_ref, early[0].base_version), (7, 0));
    assert!(!early[0].app_data.as_ref().unwrap().outgoing);
    core.handle(t0, CallInput::Device(2, hangup()));
    let a = drain(&mut core);
    assert_eq!(responses(&a), vec![(stx(1), 603)]);
    assert_eq!(
        closed(&a),
        Some(true),
        "the early record ends with the call"
    );
    // Answered: the confirmed record follows (same key), the early one is not written again.
    let mut core = CallCore::incoming(
        key(),
        early_settings(),
        42,
        t0,
        stx(1),
        &invite,
        OtherCalls::default(),
    );
    drain(&mut core);
    core.handle(t0, CallInput::Responded(stx(1), 180, Some(dialog())));
    core.handle(t0, CallInput::Responded(stx(1), 180, Some(dialog())));
    let a = drain(&mut core);
    assert_eq!(
        a.iter()
            .filter(|x| matches!(x, CallAction::ReplicateEarly(_)))
            .count(),
        1
    );
    core.handle(t0, CallInput::Device(2, Body::Answer(Answer::default())));
    core.relay_started(t0, Some(RELAY));
    core.handle(t0, CallInput::Responded(stx(1), 200, Some(dialog())));
    let a = drain(&mut core);
    assert!(a.iter().any(|x| matches!(x, CallAction::Replicate(_))));
    assert!(!a.iter().any(|x| matches!(x, CallAction::ReplicateEarly(_))));
    // Without the strategy nothing is written before the answer, and a rejected call leaves
    // nothing to end.
    let (mut core, _) = ringing(t0, &peer_sdp(1, true, "sendrecv"));
    core.handle(t0, CallInput::Responded(stx(1), 180, Some(dialog())));
    assert_eq!(drain(&mut core), vec![CallAction::SetDialog(dialog())]);
    core.handle(t0, CallInput::Device(2, hangup()));
    assert_eq!(closed(&drain(&mut core)), Some(false));
}

#[test]
fn an_adopted_ringing_call_rings_on_and_is_answered_here() {
    let t0 = Instant::now();
    let (mut core, a) = adopted(t0, TakeoverTrigger::DeviceResume);
    // 180 again on the adopted transaction; the device is not offered the call a second time
    // (its resumed session lists it as ringing).
    assert_eq!(responses(&a), vec![(stx(9), 180)]);
    assert!(!a.iter().any(|x| matches!(
        x,
        CallAction::ToDevice {
            body: Body::IncomingCall(_),
            ..
        }
    )));
    assert_eq!(core.state(), CallState::Ringing);
    core.handle(t0, CallInput::Responded(stx(9), 180, Some(dialog())));
    assert_eq!(drain(&mut core), vec![CallAction::SetDialog(dialog())]);
    core.handle(t0, CallInput::Device(2, Body::Answer(Answer::default())));
    assert_eq!(
        drain(&mut core),
        vec![CallAction::StartRelay(RelayStreams::default())]
    );
    core.relay_started(t0, Some(RELAY));
    let a = drain(&mut core);
    assert!(responses(&a).contains(&(stx(9), 200)), "{a:?}");
    core.handle(t0, CallInput::Responded(stx(9), 200, Some(dialog())));
    let a = drain(&mut core);
    assert_eq!(events(&a)[0].state, CallState::Answered as i32);
    // The confirmed record continues from the claimed early one (epoch and version).
    let facts = a
        .iter()
        .find_map(|x| match x {
            CallAction::Replicate(f) => Some(f.clone()),
            _ => None,
        })
        .expect("the confirmed record");
    assert_eq!((facts.epoch, facts.base_version), (2, 4));
    assert_eq!(
        facts.app_data.as_ref().unwrap().started_ms,
        Some(1_700_000_000_000)
    );
    core.handle(t0, CallInput::Device(3, hangup()));
    drain(&mut core);
    let summary = core.summary();
    assert!(summary.taken_over);
    assert_eq!(
        summary.owners,
        vec!["node-0".to_string(), "gw-1".to_string()]
    );
}

#[test]
fn an_adopted_ringing_call_answered_by_the_command_that_found_it() {
    let t0 = Instant::now();
    let answer = Body::Answer(Answer {
        call_ref: 7,
        media: Some(MediaOffer::default()),
    });
    let (mut core, a) = adopted(
        t0,
        TakeoverTrigger::DeviceCommand {
            request_id: 5,
            body: answer,
        },
    );
    assert_eq!(responses(&a), vec![(stx(9), 180)]);
    assert_eq!(
        a.last(),
        Some(&CallAction::StartRelay(RelayStreams::default()))
    );
    core.relay_started(t0, Some(RELAY));
    assert!(responses(&drain(&mut core)).contains(&(stx(9), 200)));
}

#[test]
fn an_adopted_ringing_call_times_out_is_cancelled_or_lost_without_a_second_answer() {
    let t0 = Instant::now();
    // No answer: 480 on the virtual clock, and the early record ends.
    let (mut core, _) = adopted(t0, TakeoverTrigger::DeviceResume);
    core.handle(t0, CallInput::Responded(stx(9), 180, Some(dialog())));
    drain(&mut core);
    assert_eq!(core.poll_timeout(), Some(t0 + Duration::from_secs(60)));
    core.handle_timeout(t0 + Duration::from_secs(60));
    let a = drain(&mut core);
    assert_eq!(responses(&a), vec![(stx(9), 480)]);
    assert_eq!(closed(&a), Some(true));
    // The no-answer time counts from the first ring, on the node that died.
    let (core, _) = adopted_after(t0, TakeoverTrigger::DeviceResume, Duration::from_secs(45));
    assert_eq!(core.poll_timeout(), Some(t0 + Duration::from_secs(15)));
    // The caller cancels (the user agent answered 487).
    let (mut core, _) = adopted(t0, TakeoverTrigger::DeviceResume);
    core.handle(t0, CallInput::Responded(stx(9), 180, Some(dialog())));
    core.handle(t0, CallInput::Cancelled);
    let a = drain(&mut core);
    assert_eq!(ended(&a)[0].end_reason, EndReason::Cancelled as i32);
    assert_eq!(closed(&a), Some(true));
    // The caller's CANCEL found it before the device did: adopted, then cancelled at once
    // (the user agent answers 487), before the 180 was even reported: the record ends.
    let (mut core, a) = adopted(t0, TakeoverTrigger::Cancel);
    assert_eq!(responses(&a), vec![(stx(9), 180)]);
    core.handle(t0, CallInput::Cancelled);
    let a = drain(&mut core);
    assert_eq!(ended(&a)[0].end_reason, EndReason::Cancelled as i32);
    assert_eq!(closed(&a), Some(true));
    assert!(core.is_closed());
    // Another node took it over again (this one was frozen): no answer of ours, no tombstone;
    // the driver abandons the transaction.
    let (mut core, _) = adopted(t0, TakeoverTrigger::DeviceResume);
    core.handle(t0, CallInput::Responded(stx(9), 180, Some(dialog())));
    drain(&mut core);
    core.handle(t0, CallInput::OwnershipLost);
    let a = drain(&mut core);
    assert!(responses(&a).is_empty(), "{a:?}");
    assert_eq!(closed(&a), Some(false));
    assert!(!core.summary().owned_at_end);
}

// ---- session timers (RFC 4028) ----

fn timer_settings() -> CallSettings {
    CallSettings {
        session_timer: Some(thalamus_sip::session_timer::TimerConfig {
            session_expires: 1800,
            min_se: 90,
        }),
        ..settings(true)
    }
}

fn header<'a>(headers: &'a [(HeaderName, String)], name: &HeaderName) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The headers of the response to `tx` among `actions`.
fn response_headers(actions: &[CallAction], tx: TransactionKey) -> Vec<(HeaderName, String)> {
    actions
        .iter()
        .find_map(|a| match a {
            CallAction::Respond { tx: t, headers, .. } if *t == tx => Some(headers.clone()),
            _ => None,
        })
        .expect("a response")
}

fn in_dialog_headers(actions: &[CallAction]) -> Vec<(HeaderName, String)> {
    actions
        .iter()
        .find_map(|a| match a {
            CallAction::SendInDialog { headers, .. } => Some(headers.clone()),
            _ => None,
        })
        .expect("a request in the dialog")
}

fn timed_response(status: u16, session_expires: &str, allows_update: bool) -> ClientOutcome {
    match response(status, "", Some(dialog())) {
        ClientOutcome::Response {
            status,
            reason,
            body,
            dialog,
            ..
        } => ClientOutcome::Response {
            status,
            reason,
            body,
            dialog,
            session_expires: session_expires.parse().ok(),
            allows_update,
        },
        other => other,
    }
}

/// The write ahead of the request just started, answered: returns what followed.
fn written(core: &mut CallCore, t: Instant) -> Vec<CallAction> {
    let actions = drain(core);
    if actions
        .iter()
        .any(|a| matches!(a, CallAction::WriteAhead(_)))
    {
        core.handle(t, CallInput::WriteAheadDone(WriteAhead::Written));
        return drain(core);
    }
    actions
}

#[test]
fn an_incoming_call_too_brief_gets_422_then_the_peer_refreshes_until_it_stops() {
    let t0 = Instant::now();
    let sdp = peer_sdp(1, true, "sendrecv");
    // Below our Min-SE: 422 with it, and the device never hears of the call.
    let invite = request_with(
        "INVITE",
        &sdp,
        "Session-Expires: 60\r\nSupported: timer\r\n",
    );
    let mut core = CallCore::incoming(
        key(),
        timer_settings(),
        42,
        t0,
        stx(1),
        &invite,
        OtherCalls::default(),
    );
    let a = drain(&mut core);
    assert_eq!(responses(&a), vec![(stx(1), 422)]);
    assert_eq!(
        header(&response_headers(&a, stx(1)), &HeaderName::MinSe),
        Some("90")
    );
    assert!(events(&a).is_empty() && closed(&a).is_some());
    // A malformed Session-Expires: 400.
    let invite = request_with("INVITE", &sdp, "Session-Expires: soon\r\n");
    let mut core = CallCore::incoming(
        key(),
        timer_settings(),
        42,
        t0,
        stx(1),
        &invite,
        OtherCalls::default(),
    );
    assert_eq!(responses(&drain(&mut core)), vec![(stx(1), 400)]);

    // Asked again with 120 s: granted, the caller (which supports timers) refreshes.
    let invite = request_with(
        "INVITE",
        &sdp,
        "Session-Expires: 120\r\nMin-SE: 90\r\nSupported: timer\r\n",
    );
    let mut core = CallCore::incoming(
        key(),
        timer_settings(),
        42,
        t0,
        stx(1),
        &invite,
        OtherCalls::default(),
    );
    drain(&mut core);
    core.handle(t0, CallInput::Responded(stx(1), 180, Some(dialog())));
    core.handle(t0, CallInput::Device(2, Body::Answer(Answer::default())));
    core.relay_started(t0, Some(RELAY));
    let a = drain(&mut core);
    let ok = response_headers(&a, stx(1));
    assert_eq!(
        header(&ok, &HeaderName::SessionExpires),
        Some("120;refresher=uac")
    );
    assert_eq!(header(&ok, &HeaderName::Require), Some("timer"));
    assert_eq!(
        core.poll_timeout(),
        None,
        "nothing runs before the 200 confirms"
    );
    core.handle(t0, CallInput::Responded(stx(1), 200, Some(dialog())));
    drain(&mut core);
    // The peer refreshes: the session runs 120 - 32 s from each refresh.
    assert_eq!(core.poll_timeout(), Some(t0 + Duration::from_secs(88)));
    let t1 = t0 + Duration::from_secs(60);
    let update = request_with("UPDATE", "", "Session-Expires: 120;refresher=uac\r\n");
    core.handle(t1, CallInput::PeerRequest(stx(5), Box::new(update)));
    let a = drain(&mut core);
    assert_eq!(responses(&a), vec![(stx(5), 200)]);
    assert!(
        a.iter()
            .any(|x| matches!(x, CallAction::Respond { body: None, .. })),
        "an UPDATE without an offer is answered without a body: {a:?}"
    );
    assert_eq!(
        header(&response_headers(&a, stx(5)), &HeaderName::SessionExpires),
        Some("120;refresher=uac")
    );
    assert_eq!(core.poll_timeout(), Some(t1 + Duration::from_secs(88)));
    // A refresh asking for less than our minimum: 422, and the timer is not refreshed.
    let brief = request_with("UPDATE", "", "Session-Expires: 30;refresher=uac\r\n");
    core.handle(t1, CallInput::PeerRequest(stx(6), Box::new(brief)));
    assert_eq!(responses(&drain(&mut core)), vec![(stx(6), 422)]);
    // Then nothing: the session expires, the gateway says BYE.
    let t2 = t1 + Duration::from_secs(88);
    core.handle_timeout(t2 - Duration::from_millis(1));
    assert!(drain(&mut core).is_empty());
    core.handle_timeout(t2);
    let a = written(&mut core, t2);
    let bye = sent_in_dialog(&a);
    assert_eq!(bye.len(), 1, "{a:?}");
    assert_eq!(bye[0].1, Method::Bye);
    core.handle(t2, CallInput::Client(bye[0].0, response(200, "", None)));
    let a = drain(&mut core);
    assert_eq!(ended(&a)[0].end_reason, EndReason::Timeout as i32);
    assert_eq!(closed(&a), Some(true));
}

#[test]
fn an_outgoing_call_refreshes_by_update_and_ends_when_a_refresh_goes_unanswered() {
    let t0 = Instant::now();
    let mut core = CallCore::outgoing(
        key(),
        timer_settings(),
        42,
        target(),
        Some(MediaOffer::default()),
        BTreeMap::new(),
    );
    drain(&mut core);
    core.relay_started(t0, Some(RELAY));
    let a = drain(&mut core);
    let (tx, headers) = a
        .iter()
        .find_map(|x| match x {
            CallAction::SendInvite { tx, headers, .. } => Some((*tx, headers.clone())),
            _ => None,
        })
        .unwrap();
    assert_eq!(header(&headers, &HeaderName::Supported), Some("timer"));
    assert_eq!(header(&headers, &HeaderName::SessionExpires), Some("1800"));
    assert_eq!(header(&headers, &HeaderName::MinSe), Some("90"));
    // The peer grants 100 s, with us refreshing (no refresher named: the UAC's).
    core.handle(t0, CallInput::Client(tx, timed_response(200, "100", true)));
    let a = drain(&mut core);
    let stored = a.iter().find_map(|x| match x {
        CallAction::Replicate(f) => f.app_data.as_ref().and_then(|d| d.session_timer),
        _ => None,
    });
    assert_eq!(
        stored.map(|t| (t.interval, t.gateway_refreshes)),
        Some((100, true)),
        "the record keeps the timer"
    );
    assert_eq!(core.poll_timeout(), Some(t0 + Duration::from_secs(50)));
    // Half way: UPDATE (the peer allows it), without a body.
    let t1 = t0 + Duration::from_secs(50);
    core.handle_timeout(t1);
    let a = written(&mut core, t1);
    let sent = sent_in_dialog(&a);
    assert_eq!(sent.len(), 1, "{a:?}");
    assert_eq!(sent[0].1, Method::Update);
    assert_eq!(sent[0].2, "");
    assert_eq!(
        header(&in_dialog_headers(&a), &HeaderName::SessionExpires),
        Some("100;refresher=uac")
    );
    assert_eq!(core.poll_timeout(), None, "one refresh at a time");
    core.handle(
        t1,
        CallInput::Client(sent[0].0, timed_response(200, "100;refresher=uac", true)),
    );
    assert!(sent_in_dialog(&drain(&mut core)).is_empty());
    assert_eq!(core.poll_timeout(), Some(t1 + Duration::from_secs(50)));
    // The next refresh is never answered: BYE.
    let t2 = t1 + Duration::from_secs(50);
    core.handle_timeout(t2);
    let a = written(&mut core, t2);
    let sent = sent_in_dialog(&a);
    core.handle(t2, CallInput::Client(sent[0].0, ClientOutcome::Timeout));
    let a = written(&mut core, t2);
    let bye = sent_in_dialog(&a);
    assert_eq!(bye[0].1, Method::Bye, "{a:?}");
}

#[test]
fn a_refresh_crossing_a_reinvite_is_tried_again_and_one_crossing_a_bye_is_dropped() {
    let t0 = Instant::now();
    let mut core = CallCore::outgoing(
        key(),
        CallSettings {
            replicate: false,
            ..timer_settings()
        },
        42,
        target(),
        Some(MediaOffer::default()),
        BTreeMap::new(),
    );
    drain(&mut core);
    core.relay_started(t0, Some(RELAY));
    let tx = drain(&mut core)
        .iter()
        .find_map(|x| match x {
            CallAction::SendInvite { tx, .. } => Some(*tx),
            _ => None,
        })
        .unwrap();
    // No UPDATE in the peer's Allow: refreshes are re-INVITEs with the SDP unchanged.
    let mut ok = timed_response(200, "90;refresher=uac", false);
    if let ClientOutcome::Response { body, .. } = &mut ok {
        *body = Bytes::from(peer_sdp(1, true, "sendrecv"));
    }
    core.handle(t0, CallInput::Client(tx, ok));
    drain(&mut core);
    let t1 = t0 + Duration::from_secs(45);
    core.handle_timeout(t1);
    let sent = sent_in_dialog(&drain(&mut core));
    assert_eq!(sent[0].1, Method::Invite);
    assert!(sent[0].2.starts_with("v=0"), "the SDP again: {}", sent[0].2);
    // The peer's re-INVITE crosses it: 491 to the peer; the peer's 491 to us: again in 3 s.
    let reinvite = request_with("INVITE", &peer_sdp(2, true, "sendrecv"), "");
    core.handle(t1, CallInput::PeerRequest(stx(5), Box::new(reinvite)));
    assert_eq!(responses(&drain(&mut core)), vec![(stx(5), 491)]);
    core.handle(t1, CallInput::Client(sent[0].0, response(491, "", None)));
    assert!(sent_in_dialog(&drain(&mut core)).is_empty());
    assert_eq!(core.poll_timeout(), Some(t1 + REFRESH_GLARE_RETRY));
    core.handle_timeout(t1 + REFRESH_GLARE_RETRY);
    let sent = sent_in_dialog(&drain(&mut core));
    assert_eq!(sent.len(), 1);
    // A BYE from the peer crosses this one: answered, the call ends, the late answer to the
    // refresh changes nothing.
    core.handle(
        t1,
        CallInput::PeerRequest(stx(6), Box::new(request("BYE", ""))),
    );
    let a = drain(&mut core);
    assert_eq!(responses(&a), vec![(stx(6), 200)]);
    assert_eq!(ended(&a)[0].end_reason, EndReason::RemoteHangup as i32);
    core.handle(
        t1,
        CallInput::Client(sent[0].0, timed_response(200, "90", false)),
    );
    assert!(drain(&mut core).is_empty());
    assert_eq!(core.poll_timeout(), None);
}

#[test]
fn a_taken_over_call_keeps_its_timer_and_refreshes_on_time_when_it_is_the_refresher() {
    const NOW_MS: u64 = 1_700_000_100_000;
    let with_refresh = |refreshed_ms: Option<u64>| {
        let mut record = stored(false);
        let mut app = CallAppData::decode(record.app_data.as_ref().unwrap()).unwrap();
        app.session_timer = Some(crate::dialogs::StoredTimer {
            interval: 90,
            gateway_refreshes: true,
            refreshed_ms,
        });
        record.app_data = Some(app.encode());
        record
    };
    let record = with_refresh(Some(NOW_MS - 10_000));
    let t0 = Instant::now();
    // With the media re-INVITE: it is the refresh.
    let mut core = CallCore::taken_over(
        key(),
        timer_settings(),
        42,
        ClaimedDialog {
            record: &record,
            remote_uri: "sip:bob@example.org".into(),
            uac: true,
            dialog: dialog(),
            trigger: TakeoverTrigger::DeviceResume,
            previous_owner: "gw-0".into(),
        },
    );
    core.set_wall_clock(t0, NOW_MS);
    drain(&mut core);
    core.relay_started(t0, Some(RELAY));
    let a = written(&mut core, t0);
    let sent = sent_in_dialog(&a);
    assert_eq!(sent.len(), 1, "{a:?}");
    assert_eq!(sent[0].1, Method::Invite);
    assert_eq!(
        header(&in_dialog_headers(&a), &HeaderName::SessionExpires),
        Some("90;refresher=uac")
    );
    core.handle(
        t0,
        CallInput::Client(sent[0].0, timed_response(200, "90;refresher=uac", true)),
    );
    let a = drain(&mut core);
    assert!(sent_in_dialog(&a).is_empty(), "no second refresh: {a:?}");
    assert_eq!(core.poll_timeout(), Some(t0 + Duration::from_secs(45)));

    // Without it, the refresh comes when the record says it is due: 45 s after the last one,
    // 10 s ago; at once when that is past; an eighth of the interval from now when the record
    // does not say.
    let no_reinvite = || CallSettings {
        reinvite_after_takeover: false,
        ..timer_settings()
    };
    for (refreshed_ms, due_in) in [
        (Some(NOW_MS - 10_000), Duration::from_secs(35)),
        (Some(NOW_MS - 50_000), Duration::ZERO),
        (None, Duration::from_millis(11_250)),
    ] {
        let record = with_refresh(refreshed_ms);
        let mut core = CallCore::taken_over(
            key(),
            no_reinvite(),
            42,
            ClaimedDialog {
                record: &record,
                remote_uri: "sip:bob@example.org".into(),
                uac: true,
                dialog: dialog(),
                trigger: TakeoverTrigger::DeviceResume,
                previous_owner: "gw-0".into(),
            },
        );
        core.set_wall_clock(t0, NOW_MS);
        drain(&mut core);
        core.relay_started(t0, Some(RELAY));
        let mut a = written(&mut core, t0);
        if !due_in.is_zero() {
            assert!(sent_in_dialog(&a).is_empty(), "{refreshed_ms:?}: {a:?}");
            assert_eq!(core.poll_timeout(), Some(t0 + due_in), "{refreshed_ms:?}");
            core.handle_timeout(t0 + due_in);
            a = written(&mut core, t0 + due_in);
        }
        let sent = sent_in_dialog(&a);
        assert_eq!(sent.len(), 1, "{refreshed_ms:?}: {a:?}");
        assert_eq!(sent[0].1, Method::Invite, "no UPDATE known from the peer");
    }
}

// ---- reliable provisional responses (RFC 3262) ----

#[test]
fn the_ringing_is_reliable_when_the_caller_wants_it_and_an_unpracked_one_ends_the_call() {
    let t0 = Instant::now();
    let sdp = peer_sdp(1, true, "sendrecv");
    let reliable = CallSettings {
        reliable_provisionals: true,
        ..settings(true)
    };
    let ring_headers = |settings: CallSettings, extra: &str| {
        let invite = request_with("INVITE", &sdp, extra);
        let mut core = CallCore::incoming(
            key(),
            settings,
            42,
            t0,
            stx(1),
            &invite,
            OtherCalls::default(),
        );
        let a = drain(&mut core);
        (core, response_headers(&a, stx(1)))
    };
    let (_, h) = ring_headers(reliable.clone(), "Require: 100rel\r\n");
    assert_eq!(header(&h, &HeaderName::Require), Some("100rel"));
    let (_, h) = ring_headers(reliable.clone(), "Supported: timer, 100rel\r\n");
    assert_eq!(header(&h, &HeaderName::Require), Some("100rel"));
    let (_, h) = ring_headers(reliable.clone(), "");
    assert_eq!(
        header(&h, &HeaderName::Require),
        None,
        "the caller knows nothing of it"
    );
    let (_, h) = ring_headers(settings(true), "Supported: 100rel\r\n");
    assert_eq!(header(&h, &HeaderName::Require), None, "turned off");
    // The caller never PRACKs: the user agent answered 504; the device hears the call ended.
    let (mut core, _) = ring_headers(reliable.clone(), "Require: 100rel\r\n");
    core.handle(t0, CallInput::Responded(stx(1), 180, Some(dialog())));
    drain(&mut core);
    core.handle(t0 + Duration::from_secs(32), CallInput::PrackTimeout);
    let a = drain(&mut core);
    let end = &ended(&a)[0];
    assert_eq!(end.sip_status, 504);
    assert_eq!(end.end_reason, EndReason::Failed as i32);
    assert!(a.contains(&CallAction::InviteSettled));
    assert!(closed(&a).is_some());
    assert_eq!(core.summary().sip_status, 504);
    // Calls the device places offer it.
    let mut core = CallCore::outgoing(
        key(),
        reliable,
        42,
        target(),
        Some(MediaOffer::default()),
        BTreeMap::new(),
    );
    drain(&mut core);
    core.relay_started(t0, Some(RELAY));
    let headers = drain(&mut core)
        .iter()
        .find_map(|x| match x {
            CallAction::SendInvite { headers, .. } => Some(headers.clone()),
            _ => None,
        })
        .unwrap();
    assert!(headers.contains(&(HeaderName::Supported, "100rel".to_string())));
    // With session timers too: one Supported header.
    let mut core = CallCore::outgoing(
        key(),
        CallSettings {
            reliable_provisionals: true,
            ..timer_settings()
        },
        42,
        target(),
        Some(MediaOffer::default()),
        BTreeMap::new(),
    );
    drain(&mut core);
    core.relay_started(t0, Some(RELAY));
    let headers = drain(&mut core)
        .iter()
        .find_map(|x| match x {
            CallAction::SendInvite { headers, .. } => Some(headers.clone()),
            _ => None,
        })
        .unwrap();
    let supported: Vec<_> = headers
        .iter()
        .filter(|(n, _)| *n == HeaderName::Supported)
        .collect();
    assert_eq!(
        supported,
        vec![&(HeaderName::Supported, "timer, 100rel".to_string())]
    );
}

// ---- transfer (RFC 3515) ----

fn transfer_statuses(actions: &[CallAction]) -> Vec<(u64, u32, bool)> {
    actions
        .iter()
        .filter_map(|a| match a {
            CallAction::ToDevice {
                request_id,
                body: Body::TransferStatus(t),
            } => Some((*request_id, t.sip_status, t.done)),
            _ => None,
        })
        .collect()
}

fn notify(sipfrag: &str, state: &str) -> Request {
    let mut r = request_with(
        "NOTIFY",
        "",
        &format!("Event: refer\r\nSubscription-State: {state}\r\n"),
    );
    r.set_body(
        Bytes::from(sipfrag.to_string()),
        Some(&thalamus_sip::message::MediaType::new("message", "sipfrag")),
    );
    r
}

#[test]
fn a_blind_transfer_reports_each_notify_and_ends_the_call_once_it_succeeds() {
    let t0 = Instant::now();
    let mut core = answered_outgoing(t0, false, &peer_sdp(1, true, "sendrecv"));
    // Not a URI: refused at once.
    core.handle(
        t0,
        CallInput::Device(
            4,
            Body::Transfer(thalamus_proto::v1::Transfer {
                call_ref: 7,
                target: "not a uri".into(),
                replaces_call_ref: 0,
            }),
        ),
    );
    assert_eq!(errors(&drain(&mut core)).len(), 1);
    // A NOTIFY with no transfer in progress: 481.
    core.handle(
        t0,
        CallInput::PeerRequest(stx(5), Box::new(notify("SIP/2.0 200 OK\r\n", "active"))),
    );
    assert_eq!(responses(&drain(&mut core)), vec![(stx(5), 481)]);

    let transfer = Body::Transfer(thalamus_proto::v1::Transfer {
        call_ref: 7,
        target: "sip:carol@example.org".into(),
        replaces_call_ref: 0,
    });
    core.handle(t0, CallInput::Device(9, transfer.clone()));
    let a = drain(&mut core);
    let sent = sent_in_dialog(&a);
    assert_eq!(sent.len(), 1, "{a:?}");
    assert_eq!(sent[0].1, Method::Refer);
    assert_eq!(
        header(&in_dialog_headers(&a), &HeaderName::ReferTo),
        Some("<sip:carol@example.org>")
    );
    // A second transfer while the REFER is out waits; answered 202, it is refused.
    core.handle(t0, CallInput::Device(10, transfer));
    assert!(drain(&mut core).is_empty());
    core.handle(t0, CallInput::Client(sent[0].0, response(202, "", None)));
    let a = drain(&mut core);
    assert_eq!(errors(&a).len(), 1, "{a:?}");
    // Progress, then success: reported with the Transfer's request id; the call ends by BYE.
    core.handle(
        t0,
        CallInput::PeerRequest(
            stx(6),
            Box::new(notify("SIP/2.0 100 Trying\r\n", "active;expires=60")),
        ),
    );
    let a = drain(&mut core);
    assert_eq!(responses(&a), vec![(stx(6), 200)]);
    assert_eq!(transfer_statuses(&a), vec![(9, 100, false)]);
    assert!(sent_in_dialog(&a).is_empty());
    core.handle(
        t0,
        CallInput::PeerRequest(
            stx(7),
            Box::new(notify("SIP/2.0 200 OK\r\n", "terminated;reason=noresource")),
        ),
    );
    let a = drain(&mut core);
    assert_eq!(transfer_statuses(&a), vec![(9, 200, true)]);
    let bye = sent_in_dialog(&a);
    assert_eq!(bye[0].1, Method::Bye);
    core.handle(t0, CallInput::Client(bye[0].0, response(200, "", None)));
    let end = &ended(&drain(&mut core))[0];
    assert_eq!(end.end_reason, EndReason::Normal as i32);
    assert_eq!(end.reason, "transferred");
}

#[test]
fn a_refused_or_failed_transfer_leaves_the_call_as_it_was() {
    let t0 = Instant::now();
    let mut core = answered_outgoing(t0, false, &peer_sdp(1, true, "sendrecv"));
    let transfer = Body::Transfer(thalamus_proto::v1::Transfer {
        call_ref: 7,
        target: "sip:carol@example.org".into(),
        replaces_call_ref: 0,
    });
    core.handle(t0, CallInput::Device(9, transfer.clone()));
    let sent = sent_in_dialog(&drain(&mut core));
    core.handle(t0, CallInput::Client(sent[0].0, response(603, "", None)));
    let a = drain(&mut core);
    assert_eq!(transfer_statuses(&a), vec![(9, 603, true)]);
    assert!(ended(&a).is_empty());
    // Accepted, but the target is busy: reported, and the call goes on.
    core.handle(t0, CallInput::Device(11, transfer));
    let sent = sent_in_dialog(&drain(&mut core));
    core.handle(t0, CallInput::Client(sent[0].0, response(202, "", None)));
    drain(&mut core);
    core.handle(
        t0,
        CallInput::PeerRequest(
            stx(8),
            Box::new(notify("SIP/2.0 486 Busy Here\r\n", "terminated")),
        ),
    );
    let a = drain(&mut core);
    assert_eq!(transfer_statuses(&a), vec![(11, 486, true)]);
    assert!(sent_in_dialog(&a).is_empty() && ended(&a).is_empty());
    assert_eq!(core.state(), CallState::Answered);
}

fn refer(target: &str) -> Request {
    request_with("REFER", "", &format!("Refer-To: <{target}>\r\n"))
}

fn place_transfers(actions: &[CallAction]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            CallAction::PlaceTransfer { target, .. } => Some(target.to_string()),
            _ => None,
        })
        .collect()
}

/// The NOTIFYs sent among `actions` (their sipfrag bodies), each answered 200.
fn notifies(core: &mut CallCore, t: Instant, actions: Vec<CallAction>) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = actions;
    for _ in 0..10 {
        let sent = sent_in_dialog(&pending);
        let Some((tx, method, body)) = sent.first().cloned() else {
            break;
        };
        if method != Method::Notify {
            break;
        }
        out.push(body.trim().to_string());
        core.handle(t, CallInput::Client(tx, response(200, "", None)));
        pending = drain(core);
    }
    out
}

#[test]
fn a_peer_transfers_the_device_and_hears_how_the_new_call_goes() {
    let t0 = Instant::now();
    let mut core = answered_outgoing(t0, false, &peer_sdp(1, true, "sendrecv"));
    // A device of revision 1: declined.
    core.handle(
        t0,
        CallInput::PeerRequest(stx(5), Box::new(refer("sip:carol@example.org"))),
    );
    assert_eq!(responses(&drain(&mut core)), vec![(stx(5), 603)]);
    core.set_takes_transfers(true);
    // A Refer-To with an embedded header other than Replaces: not taken.
    core.handle(
        t0,
        CallInput::PeerRequest(
            stx(6),
            Box::new(refer("sip:carol@example.org?Subject=hello")),
        ),
    );
    assert_eq!(responses(&drain(&mut core)), vec![(stx(6), 501)]);
    // Accepted: 202, the new call placed, NOTIFY 100.
    core.handle(
        t0,
        CallInput::PeerRequest(stx(7), Box::new(refer("sip:carol@example.org"))),
    );
    let a = drain(&mut core);
    assert_eq!(responses(&a), vec![(stx(7), 202)]);
    assert_eq!(
        place_transfers(&a),
        vec!["sip:carol@example.org".to_string()]
    );
    // A second REFER meanwhile: 491.
    core.handle(
        t0,
        CallInput::PeerRequest(stx(8), Box::new(refer("sip:dave@example.org"))),
    );
    let b = drain(&mut core);
    assert_eq!(responses(&b), vec![(stx(8), 491)]);
    assert_eq!(notifies(&mut core, t0, a), vec!["SIP/2.0 100 Trying"]);
    core.handle(t0, CallInput::TransferProgress(180, "Ringing".into()));
    let a = drain(&mut core);
    assert_eq!(notifies(&mut core, t0, a), vec!["SIP/2.0 180 Ringing"]);
    core.handle(t0, CallInput::TransferProgress(200, "OK".into()));
    let a = drain(&mut core);
    let sent = sent_in_dialog(&a);
    assert_eq!(sent[0].1, Method::Notify);
    assert_eq!(
        header(&in_dialog_headers(&a), &HeaderName::SubscriptionState),
        Some("terminated;reason=noresource")
    );
    // Later progress is not reported.
    core.handle(t0, CallInput::TransferProgress(503, "late".into()));
    assert!(drain(&mut core).is_empty());
    // The last NOTIFY answered: BYE, and the call ends as transferred.
    core.handle(t0, CallInput::Client(sent[0].0, response(200, "", None)));
    let bye = sent_in_dialog(&drain(&mut core));
    assert_eq!(bye[0].1, Method::Bye);
    core.handle(t0, CallInput::Client(bye[0].0, response(200, "", None)));
    let end = &ended(&drain(&mut core))[0];
    assert_eq!(end.reason, "transferred");
}

#[test]
fn a_failed_transfer_leaves_the_call_and_a_bye_after_the_202_ends_it_quietly() {
    let t0 = Instant::now();
    let mut core = answered_outgoing(t0, false, &peer_sdp(1, true, "sendrecv"));
    core.set_takes_transfers(true);
    core.handle(
        t0,
        CallInput::PeerRequest(stx(7), Box::new(refer("sip:carol@example.org"))),
    );
    let a = drain(&mut core);
    notifies(&mut core, t0, a);
    core.handle(t0, CallInput::TransferProgress(486, "Busy Here".into()));
    let a = drain(&mut core);
    assert_eq!(notifies(&mut core, t0, a), vec!["SIP/2.0 486 Busy Here"]);
    assert_eq!(core.state(), CallState::Answered, "the call goes on");
    // Again, and this time the transferor hangs up at once (as many do after the 202).
    core.handle(
        t0,
        CallInput::PeerRequest(stx(9), Box::new(refer("sip:carol@example.org"))),
    );
    let a = drain(&mut core);
    assert_eq!(responses(&a), vec![(stx(9), 202)]);
    let trying = sent_in_dialog(&a);
    core.handle(
        t0,
        CallInput::PeerRequest(stx(10), Box::new(request("BYE", ""))),
    );
    let a = drain(&mut core);
    assert_eq!(responses(&a), vec![(stx(10), 200)]);
    assert_eq!(ended(&a)[0].end_reason, EndReason::RemoteHangup as i32);
    core.handle(t0, CallInput::Client(trying[0].0, response(481, "", None)));
    core.handle(t0, CallInput::TransferProgress(200, "OK".into()));
    assert!(drain(&mut core).is_empty());
}

/// A REFER with `Refer-Sub: false` (RFC 4488): accepted with `Refer-Sub: false`, no NOTIFY
/// ever, a failure leaves the call up, a success ends it (after the request in flight).
#[test]
fn a_refer_without_its_subscription_gets_no_notify_and_a_success_ends_the_call() {
    let no_sub = |target: &str| {
        request_with(
            "REFER",
            "",
            &format!("Refer-To: <{target}>\r\nRefer-Sub: false\r\nSupported: norefersub\r\n"),
        )
    };
    let t0 = Instant::now();
    let mut core = answered_outgoing(t0, false, &peer_sdp(1, true, "sendrecv"));
    core.set_takes_transfers(true);
    core.handle(
        t0,
        CallInput::PeerRequest(stx(7), Box::new(no_sub("sip:carol@example.org"))),
    );
    let a = drain(&mut core);
    assert_eq!(responses(&a), vec![(stx(7), 202)]);
    assert_eq!(
        header(&response_headers(&a, stx(7)), &HeaderName::ReferSub),
        Some("false"),
        "the 2xx says no subscription was made"
    );
    assert_eq!(place_transfers(&a).len(), 1);
    assert!(sent_in_dialog(&a).is_empty(), "no NOTIFY: {a:?}");
    core.handle(t0, CallInput::TransferProgress(180, "Ringing".into()));
    assert!(drain(&mut core).is_empty());
    // A failure: nothing sent, the call goes on, and another transfer may follow.
    core.handle(t0, CallInput::TransferProgress(486, "Busy Here".into()));
    assert!(drain(&mut core).is_empty());
    assert_eq!(core.state(), CallState::Answered);

    // Again while the device's hold is in flight: the success waits for its answer, then
    // the call ends with BYE as transferred.
    core.handle(t0, CallInput::Device(4, Body::Hold(Hold { call_ref: 7 })));
    let reinvite = sent_in_dialog(&drain(&mut core));
    assert_eq!(reinvite[0].1, Method::Invite);
    core.handle(
        t0,
        CallInput::PeerRequest(stx(8), Box::new(no_sub("sip:dave@example.org"))),
    );
    let a = drain(&mut core);
    assert_eq!(responses(&a), vec![(stx(8), 202)]);
    core.handle(t0, CallInput::TransferProgress(200, "OK".into()));
    assert!(
        sent_in_dialog(&drain(&mut core)).is_empty(),
        "the hold is in flight"
    );
    core.handle(
        t0,
        CallInput::Client(
            reinvite[0].0,
            response(200, &peer_sdp(2, true, "recvonly"), Some(dialog())),
        ),
    );
    let bye = sent_in_dialog(&drain(&mut core));
    assert_eq!(bye.len(), 1);
    assert_eq!(bye[0].1, Method::Bye, "no NOTIFY, the BYE at once");
    core.handle(t0, CallInput::Client(bye[0].0, response(200, "", None)));
    assert_eq!(ended(&drain(&mut core))[0].reason, "transferred");

    // With a parameter after the value (RFC 4488's `*(SEMI exten)`): still no subscription.
    let mut core = answered_outgoing(t0, false, &peer_sdp(1, true, "sendrecv"));
    core.set_takes_transfers(true);
    let with_param = request_with(
        "REFER",
        "",
        "Refer-To: <sip:carol@example.org>\r\nRefer-Sub: false;x=y\r\n",
    );
    core.handle(t0, CallInput::PeerRequest(stx(10), Box::new(with_param)));
    let a = drain(&mut core);
    assert_eq!(
        header(&response_headers(&a, stx(10)), &HeaderName::ReferSub),
        Some("false")
    );
    assert!(sent_in_dialog(&a).is_empty(), "no NOTIFY: {a:?}");

    // `Refer-Sub: true` (or none) keeps the subscription: NOTIFY 100 and no Refer-Sub.
    let mut core = answered_outgoing(t0, false, &peer_sdp(1, true, "sendrecv"));
    core.set_takes_transfers(true);
    let with_sub = request_with(
        "REFER",
        "",
        "Refer-To: <sip:carol@example.org>\r\nRefer-Sub: true\r\n",
    );
    core.handle(t0, CallInput::PeerRequest(stx(9), Box::new(with_sub)));
    let a = drain(&mut core);
    assert_eq!(
        header(&response_headers(&a, stx(9)), &HeaderName::ReferSub),
        None
    );
    assert_eq!(notifies(&mut core, t0, a), vec!["SIP/2.0 100 Trying"]);
}

#[test]
fn a_hangup_that_caused_a_takeover_goes_before_a_due_refresh() {
    let mut record = stored(false);
    let mut app = CallAppData::decode(record.app_data.as_ref().unwrap()).unwrap();
    app.session_timer = Some(crate::dialogs::StoredTimer {
        interval: 90,
        gateway_refreshes: true,
        refreshed_ms: Some(1_700_000_000_000),
    });
    record.app_data = Some(app.encode());
    let t0 = Instant::now();
    let mut core = CallCore::taken_over(
        key(),
        timer_settings(),
        42,
        ClaimedDialog {
            record: &record,
            remote_uri: "sip:bob@example.org".into(),
            uac: true,
            dialog: dialog(),
            trigger: TakeoverTrigger::DeviceCommand {
                request_id: 3,
                body: hangup(),
            },
            previous_owner: "gw-0".into(),
        },
    );
    // The record's last refresh is long past: a refresh is due at once.
    core.set_wall_clock(t0, 1_700_000_500_000);
    drain(&mut core);
    core.relay_started(t0, Some(RELAY));
    let a = written(&mut core, t0);
    let sent = sent_in_dialog(&a);
    assert_eq!(sent.len(), 1, "{a:?}");
    assert_eq!(sent[0].1, Method::Bye, "the hangup first: {a:?}");
    core.handle(t0, CallInput::Client(sent[0].0, response(200, "", None)));
    let a = drain(&mut core);
    assert!(
        sent_in_dialog(&a).is_empty(),
        "no refresh after the BYE: {a:?}"
    );
    assert!(closed(&a).is_some());
}

#[test]
fn a_notify_before_the_202_to_the_refer_is_taken() {
    let t0 = Instant::now();
    let mut core = answered_outgoing(t0, false, &peer_sdp(1, true, "sendrecv"));
    let transfer = Body::Transfer(thalamus_proto::v1::Transfer {
        call_ref: 7,
        target: "sip:carol@example.org".into(),
        replaces_call_ref: 0,
    });
    core.handle(t0, CallInput::Device(9, transfer.clone()));
    let refer = sent_in_dialog(&drain(&mut core));
    // NOTIFY 100 overtakes the 202.
    core.handle(
        t0,
        CallInput::PeerRequest(stx(6), Box::new(notify("SIP/2.0 100 Trying\r\n", "active"))),
    );
    let a = drain(&mut core);
    assert_eq!(responses(&a), vec![(stx(6), 200)]);
    assert_eq!(transfer_statuses(&a), vec![(9, 100, false)]);
    core.handle(t0, CallInput::Client(refer[0].0, response(202, "", None)));
    assert!(drain(&mut core).is_empty());
    // A failure ends it; the device may transfer again.
    core.handle(
        t0,
        CallInput::PeerRequest(
            stx(7),
            Box::new(notify("SIP/2.0 486 Busy Here\r\n", "terminated")),
        ),
    );
    assert_eq!(transfer_statuses(&drain(&mut core)), vec![(9, 486, true)]);
    // Again, and this time every NOTIFY comes before the 202: the late 202 starts nothing.
    core.handle(t0, CallInput::Device(10, transfer.clone()));
    let refer = sent_in_dialog(&drain(&mut core));
    assert_eq!(refer[0].1, Method::Refer);
    core.handle(
        t0,
        CallInput::PeerRequest(
            stx(8),
            Box::new(notify("SIP/2.0 603 Declined\r\n", "terminated")),
        ),
    );
    assert_eq!(transfer_statuses(&drain(&mut core)), vec![(10, 603, true)]);
    core.handle(t0, CallInput::Client(refer[0].0, response(202, "", None)));
    drain(&mut core);
    core.handle(t0, CallInput::Device(11, transfer));
    let a = drain(&mut core);
    assert!(
        errors(&a).is_empty(),
        "no transfer is left in progress: {a:?}"
    );
    assert_eq!(sent_in_dialog(&a)[0].1, Method::Refer);
}

#[test]
fn a_refer_during_hold_is_taken_whoever_holds_and_a_transfer_waits_for_the_hold() {
    // The usual phone flow: the peer puts the call on hold, then refers it.
    let t0 = Instant::now();
    let mut core = answered_outgoing(t0, false, &peer_sdp(1, true, "sendrecv"));
    core.set_takes_transfers(true);
    core.handle(
        t0,
        CallInput::PeerRequest(
            stx(2),
            Box::new(request("INVITE", &peer_sdp(2, true, "sendonly"))),
        ),
    );
    drain(&mut core);
    assert_eq!(core.state(), CallState::Held);
    core.handle(
        t0,
        CallInput::PeerRequest(stx(3), Box::new(refer("sip:carol@example.org"))),
    );
    let a = drain(&mut core);
    assert_eq!(responses(&a), vec![(stx(3), 202)]);
    assert_eq!(
        place_transfers(&a),
        vec!["sip:carol@example.org".to_string()]
    );
    assert_eq!(notifies(&mut core, t0, a), vec!["SIP/2.0 100 Trying"]);
    core.handle(t0, CallInput::TransferProgress(200, "OK".into()));
    let last = sent_in_dialog(&drain(&mut core));
    assert_eq!(last[0].1, Method::Notify);
    core.handle(t0, CallInput::Client(last[0].0, response(200, "", None)));
    let bye = sent_in_dialog(&drain(&mut core));
    assert_eq!(
        bye[0].1,
        Method::Bye,
        "a held call is transferred like any other"
    );

    // The device's hold is in flight when the peer's REFER comes: the REFER is no offer
    // (no glare with the re-INVITE) and is taken; the hold completes as usual.
    let mut core = answered_outgoing(t0, false, &peer_sdp(1, true, "sendrecv"));
    core.set_takes_transfers(true);
    core.handle(t0, CallInput::Device(4, Body::Hold(Hold { call_ref: 7 })));
    let reinvite = sent_in_dialog(&drain(&mut core));
    assert_eq!(reinvite[0].1, Method::Invite);
    core.handle(
        t0,
        CallInput::PeerRequest(stx(5), Box::new(refer("sip:carol@example.org"))),
    );
    let a = drain(&mut core);
    assert_eq!(responses(&a), vec![(stx(5), 202)]);
    assert_eq!(place_transfers(&a).len(), 1);
    core.handle(
        t0,
        CallInput::Client(
            reinvite[0].0,
            response(200, &peer_sdp(2, true, "recvonly"), Some(dialog())),
        ),
    );
    let b = drain(&mut core);
    assert_eq!(events(&b)[0].state, CallState::Held as i32);
    // The NOTIFY that waited for the re-INVITE goes now.
    let mut pending = a;
    pending.extend(b);
    assert_eq!(notifies(&mut core, t0, pending), vec!["SIP/2.0 100 Trying"]);

    // The device transfers while its own hold is in flight: the REFER waits for the
    // re-INVITE's answer, then leaves.
    let mut core = answered_outgoing(t0, false, &peer_sdp(1, true, "sendrecv"));
    core.handle(t0, CallInput::Device(4, Body::Hold(Hold { call_ref: 7 })));
    let reinvite = sent_in_dialog(&drain(&mut core));
    core.handle(
        t0,
        CallInput::Device(
            5,
            Body::Transfer(thalamus_proto::v1::Transfer {
                call_ref: 7,
                target: "sip:carol@example.org".into(),
                replaces_call_ref: 0,
            }),
        ),
    );
    assert!(
        sent_in_dialog(&drain(&mut core)).is_empty(),
        "one at a time"
    );
    core.handle(
        t0,
        CallInput::Client(
            reinvite[0].0,
            response(200, &peer_sdp(2, true, "recvonly"), Some(dialog())),
        ),
    );
    let a = drain(&mut core);
    assert_eq!(core.state(), CallState::Held);
    let sent = sent_in_dialog(&a);
    assert_eq!(sent.len(), 1, "{a:?}");
    assert_eq!(sent[0].1, Method::Refer);
}

#[test]
fn a_peer_s_attended_transfer_places_an_invite_that_carries_the_replaces() {
    let t0 = Instant::now();
    let mut core = answered_outgoing(t0, false, &peer_sdp(1, true, "sendrecv"));
    core.set_takes_transfers(true);
    core.handle(
        t0,
        CallInput::PeerRequest(
            stx(6),
            Box::new(refer(
                "sip:carol@example.org;transport=udp?Replaces=abc%40h%3Bto-tag%3D1%3Bfrom-tag%3D2",
            )),
        ),
    );
    let a = drain(&mut core);
    assert_eq!(responses(&a), vec![(stx(6), 202)]);
    let placed = a
        .iter()
        .find_map(|x| match x {
            CallAction::PlaceTransfer { target, .. } => Some(target.clone()),
            _ => None,
        })
        .expect("the new call placed");

    // The new call (as the driver places it): the Replaces leaves the Request-URI for a header
    // of its own, unescaped.
    let mut new_call = CallCore::outgoing(
        key(),
        settings(false),
        42,
        placed,
        Some(MediaOffer::default()),
        BTreeMap::new(),
    );
    drain(&mut new_call);
    new_call.relay_started(t0, Some(RELAY));
    let (uri, headers) = drain(&mut new_call)
        .into_iter()
        .find_map(|x| match x {
            CallAction::SendInvite {
                target, headers, ..
            } => Some((target, headers)),
            _ => None,
        })
        .expect("an INVITE");
    assert_eq!(uri.to_string(), "sip:carol@example.org;transport=udp");
    assert_eq!(
        header(&headers, &HeaderName::Replaces),
        Some("abc@h;to-tag=1;from-tag=2")
    );
}

#[test]
fn a_call_that_replaces_another_ends_it_once_answered_and_the_replaced_one_says_so() {
    let t0 = Instant::now();
    let invite = request("INVITE", &peer_sdp(1, true, "sendrecv"));
    let mut core = CallCore::incoming(
        key(),
        settings(false),
        42,
        t0,
        stx(1),
        &invite,
        OtherCalls {
            call_waiting: true,
            replaces: Some((5, DialogId::new("old-call", "ours", "theirs"))),
        },
    );
    let a = drain(&mut core);
    match &a[0] {
        CallAction::ToDevice {
            body: Body::IncomingCall(c),
            ..
        } => assert_eq!((c.replaces_call_ref, c.call_waiting), (5, true)),
        other => panic!("expected IncomingCall, got {other:?}"),
    }
    core.handle(t0, CallInput::Responded(stx(1), 180, Some(dialog())));
    let mut all = drain(&mut core);
    device_answers(&mut core, t0);
    all.extend(drain(&mut core));
    assert!(
        !all.iter().any(|a| matches!(a, CallAction::EndReplaced(..))),
        "not before the answer"
    );
    core.relay_started(t0, Some(RELAY));
    all.extend(drain(&mut core));
    core.handle(t0, CallInput::Responded(stx(1), 200, Some(dialog())));
    all.extend(drain(&mut core));
    core.handle(t0, CallInput::Ack);
    all.extend(drain(&mut core));
    assert_eq!(
        all.iter()
            .filter(|a| {
                **a == CallAction::EndReplaced(5, DialogId::new("old-call", "ours", "theirs"))
            })
            .count(),
        1,
        "{all:?}"
    );

    // The replaced call: a BYE, and its end says why.
    let mut old = answered_outgoing(t0, false, &peer_sdp(1, true, "sendrecv"));
    // A call that reused the ref of a replaced call that had ended: not this dialog, untouched.
    old.handle(
        t0,
        CallInput::Replaced(DialogId::new("other", "ours", "theirs")),
    );
    assert!(drain(&mut old).is_empty());
    old.handle(t0, CallInput::Replaced(dialog()));
    let bye = sent_in_dialog(&drain(&mut old));
    assert_eq!(bye[0].1, Method::Bye);
    old.handle(t0, CallInput::Client(bye[0].0, response(200, "", None)));
    let end = &ended(&drain(&mut old))[0];
    assert_eq!(
        (end.end_reason, end.reason.as_str()),
        (EndReason::Normal as i32, "replaced")
    );
    // Late: nothing more.
    old.handle(t0, CallInput::Replaced(dialog()));
    assert!(drain(&mut old).is_empty());
}

#[test]
fn a_transfer_works_after_a_takeover_both_ways() {
    let t0 = Instant::now();
    // The device transfers a call another node held: taken over (UAC mode), the media
    // re-INVITE first, then the REFER, then the NOTIFYs as on the node that set the call up.
    let (mut core, _) = taken_over(
        TakeoverTrigger::DeviceCommand {
            request_id: 12,
            body: Body::Transfer(thalamus_proto::v1::Transfer {
                call_ref: 7,
                target: "sip:carol@example.org".into(),
                replaces_call_ref: 0,
            }),
        },
        false,
    );
    core.handle(t0, CallInput::WriteAheadDone(WriteAhead::Written));
    let media = sent_in_dialog(&drain(&mut core));
    assert_eq!(media[0].1, Method::Invite);
    core.handle(
        t0,
        CallInput::Client(
            media[0].0,
            response(200, &peer_sdp(2, true, "sendrecv"), None),
        ),
    );
    drain(&mut core);
    core.handle(t0, CallInput::WriteAheadDone(WriteAhead::Written));
    let sent = sent_in_dialog(&drain(&mut core));
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].1, Method::Refer);
    core.handle(t0, CallInput::Client(sent[0].0, response(202, "", None)));
    drain(&mut core);
    core.handle(
        t0,
        CallInput::PeerRequest(
            stx(8),
            Box::new(notify("SIP/2.0 200 OK\r\n", "terminated;reason=noresource")),
        ),
    );
    let a = drain(&mut core);
    assert_eq!(transfer_statuses(&a), vec![(12, 200, true)]);
    let bye = if a.iter().any(|x| matches!(x, CallAction::WriteAhead(_))) {
        core.handle(t0, CallInput::WriteAheadDone(WriteAhead::Written));
        sent_in_dialog(&drain(&mut core))
    } else {
        sent_in_dialog(&a)
    };
    assert_eq!(bye[0].1, Method::Bye, "the transferred call ends");

    // The peer transfers a call this node took over (UAS mode, the REFER itself caused the
    // takeover): accepted for a device that takes transfers, the new call placed.
    let (mut core, _) = taken_over(TakeoverTrigger::DeviceResume, false);
    core.set_takes_transfers(true);
    core.handle(t0, CallInput::WriteAheadDone(WriteAhead::Written));
    let media = sent_in_dialog(&drain(&mut core));
    core.handle(
        t0,
        CallInput::Client(
            media[0].0,
            response(200, &peer_sdp(2, true, "sendrecv"), None),
        ),
    );
    drain(&mut core);
    core.handle(
        t0,
        CallInput::PeerRequest(stx(9), Box::new(refer("sip:carol@example.org"))),
    );
    let a = drain(&mut core);
    assert_eq!(responses(&a), vec![(stx(9), 202)]);
    assert_eq!(place_transfers(&a).len(), 1);
}

/// The device's transfer in flight when its node dies: the REFER's write ahead says a transfer
/// is in progress (with the Transfer's request id); the node that takes the call over passes
/// the transferee's NOTIFYs on to the device under that id, and its success ends the call. A
/// transfer that failed is written as over, so the next node takes a new one.
#[test]
fn a_device_s_transfer_in_flight_survives_a_takeover() {
    let t0 = Instant::now();
    let mut core = answered_outgoing(t0, true, &peer_sdp(1, true, "sendrecv"));
    drain(&mut core);
    let transfer = Body::Transfer(thalamus_proto::v1::Transfer {
        call_ref: 7,
        target: "sip:carol@example.org".into(),
        replaces_call_ref: 0,
    });
    core.handle(t0, CallInput::Device(9, transfer.clone()));
    let a = drain(&mut core);
    let facts = a
        .iter()
        .find_map(|x| match x {
            CallAction::WriteAhead(f) => Some(f.clone()),
            _ => None,
        })
        .expect("the REFER is written ahead");
    assert_eq!(facts.app_data.as_ref().and_then(|d| d.transfer), Some(9));
    // The node dies once its REFER was accepted. Another takes the call over from that record.
    let mut record = stored(false);
    record.app_data = facts.app_data.as_ref().map(CallAppData::encode);
    let mut taken = CallCore::taken_over(
        key(),
        settings(true),
        42,
        ClaimedDialog {
            record: &record,
            remote_uri: "sip:bob@example.org".into(),
            uac: true,
            dialog: dialog(),
            trigger: TakeoverTrigger::Request {
                method: Method::Notify,
                arrived: t0,
            },
            previous_owner: "gw-1".into(),
        },
    );
    drain(&mut taken);
    taken.relay_started(t0, Some(RELAY));
    drain(&mut taken);
    // A new transfer is refused while this one runs.
    taken.handle(t0, CallInput::Device(10, transfer.clone()));
    assert_eq!(errors(&drain(&mut taken)).len(), 1);
    taken.handle(
        t0,
        CallInput::PeerRequest(
            stx(5),
            Box::new(notify("SIP/2.0 180 Ringing\r\n", "active;expires=60")),
        ),
    );
    let a = drain(&mut taken);
    assert_eq!(responses(&a), vec![(stx(5), 200)]);
    assert_eq!(transfer_statuses(&a), vec![(9, 180, false)]);
    // Then the media moves here (the re-INVITE after a takeover).
    assert!(a.iter().any(|x| matches!(x, CallAction::WriteAhead(_))));
    taken.handle(t0, CallInput::WriteAheadDone(WriteAhead::Written));
    let media = sent_in_dialog(&drain(&mut taken));
    assert_eq!(media[0].1, Method::Invite);
    taken.handle(
        t0,
        CallInput::Client(
            media[0].0,
            response(200, &peer_sdp(2, true, "sendrecv"), None),
        ),
    );
    drain(&mut taken);
    taken.handle(
        t0,
        CallInput::PeerRequest(
            stx(6),
            Box::new(notify("SIP/2.0 200 OK\r\n", "terminated;reason=noresource")),
        ),
    );
    let a = drain(&mut taken);
    assert_eq!(transfer_statuses(&a), vec![(9, 200, true)]);
    let bye = if a.iter().any(|x| matches!(x, CallAction::WriteAhead(_))) {
        taken.handle(t0, CallInput::WriteAheadDone(WriteAhead::Written));
        sent_in_dialog(&drain(&mut taken))
    } else {
        sent_in_dialog(&a)
    };
    assert!(
        bye.iter().any(|b| b.1 == Method::Bye),
        "the transferred call ends: {bye:?}"
    );

    // On the first node, a transfer that fails is written as over.
    core.handle(t0, CallInput::WriteAheadDone(WriteAhead::Written));
    let refer = sent_in_dialog(&drain(&mut core));
    core.handle(t0, CallInput::Client(refer[0].0, response(202, "", None)));
    drain(&mut core);
    core.handle(
        t0,
        CallInput::PeerRequest(
            stx(7),
            Box::new(notify(
                "SIP/2.0 486 Busy Here\r\n",
                "terminated;reason=noresource",
            )),
        ),
    );
    let a = drain(&mut core);
    assert_eq!(transfer_statuses(&a), vec![(9, 486, true)]);
    let rewritten = a
        .iter()
        .find_map(|x| match x {
            CallAction::Replicate(f) => Some(f.clone()),
            _ => None,
        })
        .expect("the record is written again");
    assert_eq!(rewritten.app_data.as_ref().and_then(|d| d.transfer), None);
}
