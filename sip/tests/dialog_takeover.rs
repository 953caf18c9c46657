//! Takeover of dialogs between nodes, at the message level: a dialog confirmed on node A is
//! exported after the ACK as a JSON `DialogRecord`, imported into a fresh `Dialogs` table on
//! node B, and continued there. The peer is SIPp: its INVITE, ACK, BYE and 200 OK are written
//! byte for byte the way its built-in `uac` and `uas` scenarios send them (through a
//! record-routing balancer), and parsed by the message parser.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use thalamus_sip::dialog::{
    uas_response, Dialog, DialogRecord, DialogState, Dialogs, InDialogRequest, RequestMatch,
    ResponseOutcome, Role,
};
use thalamus_sip::message::{
    generate_branch, generate_tag, validate_request, validate_response, CSeq, HeaderName, Message,
    Method, NameAddr, Request, Response, Transport, Uri, Via,
};

const SDP: &str = "v=0\r\n\
o=user1 53655765 2353687637 IN IP4 127.0.0.1\r\n\
s=-\r\n\
c=IN IP4 127.0.0.1\r\n\
t=0 0\r\n\
m=audio 6000 RTP/AVP 0\r\n\
a=rtpmap:0 PCMU/8000\r\n";

fn parse_request(bytes: &[u8]) -> Request {
    match Message::parse(bytes.to_vec()).expect("parses") {
        Message::Request(r) => {
            validate_request(&r).expect("valid request");
            r
        }
        Message::Response(_) => panic!("expected a request"),
    }
}

fn parse_response(bytes: &[u8]) -> Response {
    match Message::parse(bytes.to_vec()).expect("parses") {
        Message::Response(r) => {
            validate_response(&r).expect("valid response");
            r
        }
        Message::Request(_) => panic!("expected a response"),
    }
}

/// Sends a message "over the wire": serialize, then parse as the receiver would.
fn wire_request(r: &Request) -> Request {
    parse_request(&r.to_bytes())
}

fn wire_response(r: &Response) -> Response {
    parse_response(&r.to_bytes())
}

/// Moves a record from one node to another the way the gateway does: JSON text.
fn replicate(dialog: &Dialog) -> DialogRecord {
    let json = serde_json::to_string(&dialog.export()).unwrap();
    assert!(json.len() < 2048, "record of {} bytes", json.len());
    serde_json::from_str(&json).unwrap()
}

fn gateway_via() -> Via {
    Via::new(Transport::Udp, "127.0.0.1".parse().unwrap(), Some(5080))
        .with_branch(&generate_branch())
}

/// SIPp `uac` INVITE to the gateway, through the balancer that record-routes.
fn sipp_invite() -> String {
    format!(
        "INVITE sip:service@127.0.0.1:5080 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKlb.1\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-3719-1-0\r\n\
Record-Route: <sip:127.0.0.1:5060;lr;node=node-a>\r\n\
From: sipp <sip:sipp@127.0.0.1:5061>;tag=3719SIPpTag001\r\n\
To: service <sip:service@127.0.0.1:5060>\r\n\
Call-ID: 1-3719@127.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: sip:sipp@127.0.0.1:5061\r\n\
Max-Forwards: 69\r\n\
Subject: Performance Test\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {}\r\n\
\r\n\
{SDP}",
        SDP.len()
    )
}

/// A SIPp `uac` in-dialog request (ACK with CSeq 1, BYE with CSeq 2): Request-URI is our
/// Contact, Route is the recorded route, To carries our tag.
fn sipp_in_dialog(method: &str, cseq: u32, our_tag: &str) -> String {
    format!(
        "{method} sip:gw@127.0.0.1:5080 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-3719-1-{cseq}{method}\r\n\
Route: <sip:127.0.0.1:5060;lr;node=node-a>\r\n\
From: sipp <sip:sipp@127.0.0.1:5061>;tag=3719SIPpTag001\r\n\
To: service <sip:service@127.0.0.1:5060>;tag={our_tag}\r\n\
Call-ID: 1-3719@127.0.0.1\r\n\
CSeq: {cseq} {method}\r\n\
Contact: sip:sipp@127.0.0.1:5061\r\n\
Max-Forwards: 70\r\n\
Subject: Performance Test\r\n\
Content-Length: 0\r\n\
\r\n"
    )
}

/// The balancer's view of the BYE: it pushes its Via and pops its Route before the node.
fn through_balancer(mut r: Request) -> Request {
    r.headers.remove(&HeaderName::Route);
    let via = Via::new(Transport::Udp, "127.0.0.1".parse().unwrap(), Some(5060))
        .with_branch("z9hG4bKlb.bye");
    r.headers.prepend_via(&via);
    r
}

#[test]
fn uas_dialog_exported_after_ack_answers_bye_on_another_node() {
    let t0 = Instant::now();
    // Node A answers SIPp's INVITE.
    let mut node_a = Dialogs::default();
    let invite = parse_request(sipp_invite().as_bytes());
    let our_tag = generate_tag();
    let contact = NameAddr::parse("<sip:gw@127.0.0.1:5080>").unwrap();
    let ringing = uas_response(&invite, 180, None, &our_tag, &contact);
    node_a.response_sent(&invite, &ringing, t0).unwrap();
    let mut ok = uas_response(&invite, 200, None, &our_tag, &contact);
    ok.set_body(SDP.into(), Some(&thalamus_sip::message::MediaType::sdp()));
    let ok = wire_response(&ok);
    let dialog = node_a.response_sent(&invite, &ok, t0).unwrap().unwrap();
    assert_eq!(dialog.state(), DialogState::Confirmed);
    let id = dialog.id().clone();
    assert_eq!(
        ok.headers.record_route().unwrap()[0].to_string(),
        "<sip:127.0.0.1:5060;lr;node=node-a>"
    );
    // The ACK is late: the 2xx went out again at T1.
    assert_eq!(
        node_a.handle_timeout(t0 + Duration::from_millis(500)).len(),
        1
    );
    let ack = parse_request(sipp_in_dialog("ACK", 1, &our_tag).as_bytes());
    match node_a.receive_request(&through_balancer(ack)) {
        RequestMatch::Accepted(_, InDialogRequest::Ack) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(node_a.poll_timeout(), None, "retransmission stopped");

    // Exported after the ACK; node A dies.
    let record = replicate(node_a.get(&id).unwrap());
    assert_eq!(record.role, "uas");
    assert_eq!(record.state, "confirmed");
    assert_eq!(record.remote_cseq, Some(1));
    drop(node_a);

    // Node B, fresh, imports the record and gets SIPp's BYE.
    let mut node_b = Dialogs::default();
    node_b.import(&record).unwrap();
    let bye = through_balancer(parse_request(sipp_in_dialog("BYE", 2, &our_tag).as_bytes()));
    let response = match node_b.receive_request(&bye) {
        RequestMatch::Accepted(dialog, InDialogRequest::Bye) => {
            assert_eq!(dialog.state(), DialogState::Terminated);
            assert_eq!(dialog.remote_cseq(), Some(2));
            dialog.create_response(&bye, 200, None)
        }
        other => panic!("{other:?}"),
    };
    let response = wire_response(&response);
    assert_eq!(response.status, 200);
    assert_eq!(response.headers.to_tag(), Some(our_tag.as_str()));
    assert_eq!(response.headers.from_tag(), Some("3719SIPpTag001"));
    assert_eq!(response.headers.call_id().unwrap(), "1-3719@127.0.0.1");
    assert_eq!(response.headers.cseq().unwrap(), CSeq::new(2, Method::Bye));
    let vias = response.headers.via().unwrap();
    assert_eq!(vias.len(), 2);
    assert_eq!(vias[0].branch(), Some("z9hG4bKlb.bye"));
    assert_eq!(vias[1].branch(), Some("z9hG4bK-3719-1-2BYE"));
    assert!(!response.headers.contains(&HeaderName::Contact));
    node_b.remove(&id).unwrap();

    // A BYE for a dialog node B does not hold gets 481.
    match node_b.receive_request(&bye) {
        RequestMatch::Rejected(r) => assert_eq!(r.status(), 481),
        other => panic!("{other:?}"),
    }
}

#[test]
fn imported_uas_dialog_rejects_an_out_of_order_request() {
    let t0 = Instant::now();
    let mut node_a = Dialogs::default();
    let invite = parse_request(sipp_invite().as_bytes());
    let our_tag = generate_tag();
    let contact = NameAddr::parse("<sip:gw@127.0.0.1:5080>").unwrap();
    let ok = uas_response(&invite, 200, None, &our_tag, &contact);
    node_a.response_sent(&invite, &ok, t0).unwrap();
    let info = parse_request(sipp_in_dialog("INFO", 5, &our_tag).as_bytes());
    assert!(matches!(
        node_a.receive_request(&info),
        RequestMatch::Accepted(_, InDialogRequest::Other)
    ));
    let record = replicate(node_a.iter().next().unwrap());
    let mut node_b = Dialogs::default();
    node_b.import(&record).unwrap();
    let stale = parse_request(sipp_in_dialog("INFO", 4, &our_tag).as_bytes());
    match node_b.receive_request(&stale) {
        RequestMatch::Rejected(r) => assert_eq!(r.status(), 500),
        other => panic!("{other:?}"),
    }
    // The node that took over can also hang up: a BYE from the callee side, valid on the wire.
    let dialog = node_b.iter_mut().next().unwrap();
    let mut bye = dialog.create_request(Method::Bye).unwrap();
    bye.headers.prepend_via(&gateway_via());
    let bye = wire_request(&bye);
    assert_eq!(bye.uri.to_string(), "sip:sipp@127.0.0.1:5061");
    assert_eq!(bye.headers.from_tag(), Some(our_tag.as_str()));
    assert_eq!(bye.headers.to_tag(), Some("3719SIPpTag001"));
    assert_eq!(
        bye.headers.route().unwrap()[0].to_string(),
        "<sip:127.0.0.1:5060;lr;node=node-a>"
    );
}

/// The INVITE the gateway sends to SIPp's `uas` scenario through the balancer.
fn gateway_invite(our_tag: &str) -> Request {
    let mut invite = Request::new(
        Method::Invite,
        Uri::parse("sip:buddy@127.0.0.1:5070").unwrap(),
    );
    invite.headers.prepend_via(&gateway_via());
    invite.headers.set_max_forwards(70);
    invite
        .headers
        .push(HeaderName::Route, "<sip:127.0.0.1:5060;lr;node=node-a>");
    invite.headers.set_from(
        &NameAddr::parse("\"Device 42\" <sip:dev42@gw.example.com>")
            .unwrap()
            .with_param("tag", Some(our_tag)),
    );
    invite
        .headers
        .set_to(&NameAddr::parse("<sip:buddy@127.0.0.1:5070>").unwrap());
    invite.headers.set_call_id("gwcall-1@127.0.0.1");
    invite.headers.set_cseq(&CSeq::new(1, Method::Invite));
    invite
        .headers
        .push_contact(&NameAddr::parse("<sip:gw@127.0.0.1:5080>").unwrap());
    invite.set_body(SDP.into(), Some(&thalamus_sip::message::MediaType::sdp()));
    wire_request(&invite)
}

/// SIPp `uas` 200 OK: Via, From, To (plus its tag), Call-ID, CSeq and Record-Route copied, its
/// Contact with `transport=UDP`.
fn sipp_ok(invite: &Request, status_line: &str) -> Response {
    let mut text = format!("SIP/2.0 {status_line}\r\n");
    for via in invite.headers.get_all(&HeaderName::Via) {
        text.push_str(&format!("Via: {}\r\n", via.to_str().unwrap()));
    }
    let body = if status_line.starts_with("200") {
        SDP
    } else {
        ""
    };
    let full = format!(
        "{text}Record-Route: <sip:127.0.0.1:5060;lr;node=node-a>\r\n\
From: {}\r\n\
To: <sip:buddy@127.0.0.1:5070>;tag=4211SIPpTag011\r\n\
Call-ID: gwcall-1@127.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:127.0.0.1:5070;transport=UDP>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {}\r\n\
\r\n\
{body}",
        invite
            .headers
            .get(&HeaderName::From)
            .unwrap()
            .to_str()
            .unwrap(),
        body.len()
    );
    parse_response(full.as_bytes())
}

#[test]
fn uac_dialog_exported_after_ack_sends_bye_from_another_node() {
    let our_tag = generate_tag();
    let invite = gateway_invite(&our_tag);
    let mut node_a = Dialogs::default();

    let ringing = sipp_ok(&invite, "180 Ringing");
    let (outcome, _) = node_a.receive_invite_response(&invite, &ringing).unwrap();
    assert_eq!(outcome, ResponseOutcome::Provisional);
    let ok = sipp_ok(&invite, "200 OK");
    let (outcome, dialog) = node_a.receive_invite_response(&invite, &ok).unwrap();
    assert_eq!(outcome, ResponseOutcome::InviteAccepted);
    let dialog = dialog.unwrap();
    assert_eq!(dialog.role(), Role::Uac);
    assert_eq!(dialog.state(), DialogState::Confirmed);
    let mut ack = dialog.create_ack().unwrap();
    ack.headers.prepend_via(&gateway_via());
    let ack = wire_request(&ack);
    assert_eq!(ack.uri.to_string(), "sip:127.0.0.1:5070;transport=UDP");
    assert_eq!(ack.headers.cseq().unwrap(), CSeq::new(1, Method::Ack));
    assert_eq!(
        ack.headers.route().unwrap()[0].to_string(),
        "<sip:127.0.0.1:5060;lr;node=node-a>"
    );
    dialog.remember_ack(ack.clone());
    // SIPp retransmits the 200 once: the very same ACK goes again.
    let (outcome, dialog) = node_a.receive_invite_response(&invite, &ok).unwrap();
    assert_eq!(outcome, ResponseOutcome::InviteRetransmission);
    assert_eq!(dialog.unwrap().ack_to_resend(), Some(&ack));

    // Exported after the ACK; node A dies.
    let id = node_a.iter().next().unwrap().id().clone();
    let record = replicate(node_a.get(&id).unwrap());
    assert_eq!(record.local_cseq, Some(1));
    assert_eq!(record.local_invite_cseq, Some(1));
    drop(node_a);

    let mut node_b = Dialogs::default();
    let dialog = node_b.import(&record).unwrap();
    let mut bye = dialog.create_request(Method::Bye).unwrap();
    assert_eq!(dialog.local_cseq(), Some(2));
    assert_eq!(
        dialog.next_hop().unwrap().to_string(),
        "sip:127.0.0.1:5060;lr;node=node-a"
    );
    bye.headers.prepend_via(&gateway_via());
    let bye = wire_request(&bye);
    assert_eq!(bye.method, Method::Bye);
    assert_eq!(bye.uri.to_string(), "sip:127.0.0.1:5070;transport=UDP");
    assert_eq!(
        bye.headers
            .route()
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["<sip:127.0.0.1:5060;lr;node=node-a>"]
    );
    assert_eq!(bye.headers.cseq().unwrap(), CSeq::new(2, Method::Bye));
    assert_eq!(bye.headers.from_tag(), Some(our_tag.as_str()));
    assert_eq!(bye.headers.to_tag(), Some("4211SIPpTag011"));
    assert_eq!(bye.headers.call_id().unwrap(), "gwcall-1@127.0.0.1");
    assert_eq!(
        bye.headers.from().unwrap().display_name.as_deref(),
        Some("Device 42")
    );
    assert_eq!(bye.headers.max_forwards().unwrap(), Some(70));

    // SIPp answers the BYE through the balancer: the dialog ends.
    let bye_ok = Response::from_request(&bye, 200, None);
    let (outcome, dialog) = node_b.receive_response(&wire_response(&bye_ok));
    assert_eq!(outcome, ResponseOutcome::Terminated);
    assert_eq!(dialog.unwrap().state(), DialogState::Terminated);
}

#[test]
fn a_2xx_retransmitted_after_takeover_is_acknowledged_by_the_new_node() {
    let our_tag = generate_tag();
    let invite = gateway_invite(&our_tag);
    let mut node_a = Dialogs::default();
    let ok = sipp_ok(&invite, "200 OK");
    node_a.receive_invite_response(&invite, &ok).unwrap();
    let record = replicate(node_a.iter().next().unwrap());

    let mut node_b = Dialogs::default();
    node_b.import(&record).unwrap();
    // No INVITE transaction on node B: the response is matched by its tags alone.
    let (outcome, dialog) = node_b.receive_response(&ok);
    assert_eq!(outcome, ResponseOutcome::InviteRetransmission);
    let dialog = dialog.unwrap();
    assert_eq!(
        dialog.ack_to_resend(),
        None,
        "the kept ACK is not replicated"
    );
    let ack = dialog.create_ack().unwrap();
    assert_eq!(ack.headers.cseq().unwrap(), CSeq::new(1, Method::Ack));
    assert_eq!(ack.headers.to_tag(), Some("4211SIPpTag011"));
}
