//! Failover of dialogs between endpoints, through the sans-IO `Endpoint` and the JSON form of a
//! `DialogRecord` (what the cluster's dialog store keeps):
//!
//! * UAC side: endpoint A calls endpoint B (INVITE through a record-routing proxy, 200, ACK);
//!   A's dialog is exported after the ACK, written to JSON and read back, and imported into a
//!   fresh endpoint C, which hangs up. The BYE on the wire must carry the INVITE's CSeq + 1,
//!   B's Contact as Request-URI, the recorded route, A's tag in From, B's tag in To and the
//!   Call-ID; B accepts it with 200, which C matches to its BYE.
//! * UAS side: B's dialog is exported after the ACK through JSON and imported into a fresh
//!   endpoint D, either before the BYE arrives or when the BYE arrives for a dialog D does not
//!   hold (the `UnknownDialog` hook, then `redeliver`). D answers A's BYE 200 with B's To tag
//!   and the BYE's CSeq, and A matches the 200 to its BYE.
//!
//! Messages move between endpoints as bytes: serialized by the sender, parsed by the receiver.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use thalamus_sip::dialog::{DialogId, DialogRecord, DialogState, Role};
use thalamus_sip::endpoint::{Endpoint, EndpointConfig, EndpointEvent, Peer};
use thalamus_sip::message::{
    CSeq, Contact, HeaderName, Host, MediaType, Message, Method, NameAddr, Request, Response,
    Transport, Uri,
};
use thalamus_sip::transaction::TransactionKey;

/// The CSeq number of A's INVITE (not 1, so that "+ 1" is not a coincidence).
const INVITE_CSEQ: u32 = 4711;
const PROXY: &str = "<sip:127.0.0.1:5060;lr>";

fn peer(port: u16) -> Peer {
    Peer::udp(SocketAddr::from(([127, 0, 0, 1], port)))
}

fn endpoint(port: u16) -> Endpoint {
    let mut e = Endpoint::new(EndpointConfig::default());
    e.set_sent_by(Transport::Udp, Host::Ipv4([127, 0, 0, 1].into()), port);
    e
}

/// Ports: A (the caller) 5061, B (the callee) 5062, C (takes A over) 5063; D takes B over on
/// B's address (the balancer sends B's traffic there).
const A: u16 = 5061;
const B: u16 = 5062;
const C: u16 = 5063;

fn events(e: &mut Endpoint) -> Vec<EndpointEvent> {
    std::iter::from_fn(|| e.poll_event()).collect()
}

/// Every message `from` sends, serialized and parsed again as the receiver's transport would.
fn wire(from: &mut Endpoint) -> Vec<(Peer, Message)> {
    std::iter::from_fn(|| from.poll_transmit())
        .map(|t| (t.destination, Message::parse(t.payload).unwrap()))
        .collect()
}

/// Delivers everything `from` (at `from_port`) sends to `to`; returns how many messages.
fn deliver(now: Instant, from: &mut Endpoint, from_port: u16, to: &mut Endpoint) -> usize {
    let messages = wire(from);
    let n = messages.len();
    for (_, message) in messages {
        to.handle_message(now, message, peer(from_port));
    }
    n
}

/// The cluster store's round trip: the record as JSON text and back.
fn through_store(record: &DialogRecord) -> DialogRecord {
    let json = serde_json::to_string(record).unwrap();
    assert!(json.contains("\"version\":1"), "{json}");
    serde_json::from_str(&json).unwrap()
}

fn invite() -> Request {
    let target = Uri::parse("sip:bob@127.0.0.1:5062").unwrap();
    let mut r = Request::new(Method::Invite, target.clone());
    let from: NameAddr = "\"Alice\" <sip:alice@example.com>;tag=alice-tag-1"
        .parse()
        .unwrap();
    r.headers.set_from(&from);
    r.headers.set_to(&NameAddr::new(target));
    r.headers.set_call_id("failover-call-1@127.0.0.1");
    r.headers.set_cseq(&CSeq::new(INVITE_CSEQ, Method::Invite));
    r.headers
        .push_contact(&"<sip:alice@127.0.0.1:5061>".parse().unwrap());
    r.headers.push(HeaderName::RecordRoute, PROXY);
    r.set_body(
        Bytes::from_static(b"v=0\r\no=a 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\n"),
        Some(&MediaType::sdp()),
    );
    r
}

/// A confirmed call: A sent INVITE, B answered 200, A sent the ACK and B saw it.
struct Call {
    t0: Instant,
    a: Endpoint,
    b: Endpoint,
    dialog_a: DialogId,
    dialog_b: DialogId,
    /// B's Contact URI as A received it in the 200.
    b_contact: Uri,
}

fn confirmed_call() -> Call {
    let t0 = Instant::now();
    let (mut a, mut b) = (endpoint(A), endpoint(B));
    let invite_key = a.send_request(t0, invite(), peer(B)).unwrap();
    assert_eq!(deliver(t0, &mut a, A, &mut b), 1);
    let server_key = match events(&mut b).as_slice() {
        [EndpointEvent::Request { key, request, .. }] => {
            assert_eq!(request.method, Method::Invite);
            *key
        }
        other => panic!("{other:?}"),
    };
    let answer = (
        Bytes::from_static(b"v=0\r\no=b 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 7000 RTP/AVP 0\r\n"),
        MediaType::sdp(),
    );
    let dialog_b = b
        .respond(t0, server_key, 200, None, Some(answer))
        .unwrap()
        .unwrap();
    let sent = wire(&mut b);
    assert_eq!(sent.len(), 1);
    let (destination, Message::Response(ok)) = sent.into_iter().next().unwrap() else {
        panic!("B sent a request")
    };
    assert_eq!(destination, peer(A));
    let b_contact = match ok.headers.contact().unwrap().into_iter().next() {
        Some(Contact::Address(addr)) => addr.uri,
        other => panic!("B's 200 has no Contact address: {other:?}"),
    };
    a.handle_message(t0, Message::Response(ok), peer(B));
    let dialog_a = events(&mut a)
        .into_iter()
        .find_map(|e| match e {
            EndpointEvent::Response {
                key,
                response,
                dialog: Some(d),
            } if key == invite_key && response.status == 200 => Some(d),
            _ => None,
        })
        .expect("A saw the 200 with its dialog");
    a.send_ack(&dialog_a, peer(B), None).unwrap();
    assert_eq!(deliver(t0, &mut a, A, &mut b), 1);
    assert!(events(&mut b)
        .iter()
        .any(|e| matches!(e, EndpointEvent::Ack { dialog, .. } if *dialog == dialog_b)));
    Call {
        t0,
        a,
        b,
        dialog_a,
        dialog_b,
        b_contact,
    }
}

fn single_request(sent: Vec<(Peer, Message)>) -> (Peer, Request) {
    assert_eq!(sent.len(), 1, "{sent:?}");
    match sent.into_iter().next().unwrap() {
        (to, Message::Request(r)) => (to, r),
        (_, Message::Response(r)) => panic!("expected a request, got {}", r.status),
    }
}

fn single_response(sent: Vec<(Peer, Message)>) -> (Peer, Response) {
    assert_eq!(sent.len(), 1, "{sent:?}");
    match sent.into_iter().next().unwrap() {
        (to, Message::Response(r)) => (to, r),
        (_, Message::Request(r)) => panic!("expected a response, got {}", r.method),
    }
}

#[test]
fn uac_dialog_exported_after_ack_hangs_up_from_a_fresh_endpoint() {
    let Call {
        t0,
        a,
        mut b,
        dialog_a,
        dialog_b,
        b_contact,
    } = confirmed_call();
    let record = through_store(&a.export_dialog(&dialog_a).unwrap());
    assert_eq!(record.role, Role::Uac.as_str());
    assert_eq!(record.state, DialogState::Confirmed.as_str());
    assert_eq!(record.local_cseq, Some(INVITE_CSEQ));
    // A is gone; C continues its dialog.
    drop(a);
    let mut c = endpoint(C);
    let id = c.import_dialog(&record).unwrap();
    assert_eq!(id, dialog_a);
    assert_eq!(c.dialog(&id).unwrap().state(), DialogState::Confirmed);

    let t1 = t0 + Duration::from_secs(5);
    let bye = c.dialog_request(&id, Method::Bye).unwrap();
    let bye_key = c.send_request(t1, bye, peer(B)).unwrap();
    let (destination, bye) = single_request(wire(&mut c));
    assert_eq!(destination, peer(B));
    assert_eq!(bye.method, Method::Bye);
    assert_eq!(bye.uri, b_contact, "Request-URI is the remote Contact");
    assert_eq!(
        bye.headers.cseq().unwrap(),
        CSeq::new(INVITE_CSEQ + 1, Method::Bye)
    );
    assert_eq!(bye.headers.call_id().unwrap(), dialog_a.call_id);
    assert_eq!(bye.headers.from_tag(), Some(dialog_a.local_tag.as_str()));
    assert_eq!(bye.headers.to_tag(), Some(dialog_a.remote_tag.as_str()));
    assert_eq!(bye.headers.to_tag(), Some(dialog_b.local_tag.as_str()));
    let route: Vec<String> = bye
        .headers
        .route()
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(route, vec![PROXY.to_string()], "the recorded route");
    let via = bye.headers.top_via().unwrap();
    assert_eq!(via.port, Some(C), "C's own Via: B answers C");

    // The proxy forwards the BYE to B, which still holds the dialog.
    b.handle_message(t1, Message::Request(bye), peer(C));
    let server_key = match events(&mut b).as_slice() {
        [EndpointEvent::DialogRequest {
            key,
            dialog,
            request,
            ..
        }] => {
            assert_eq!(*dialog, dialog_b);
            assert_eq!(request.method, Method::Bye);
            *key
        }
        other => panic!("B did not accept the BYE: {other:?}"),
    };
    b.respond(t1, server_key, 200, None, None).unwrap();
    let (destination, ok) = single_response(wire(&mut b));
    assert_eq!(destination, peer(C));
    assert_eq!(ok.status, 200);
    c.handle_message(t1, Message::Response(ok), peer(B));
    let evs = events(&mut c);
    assert!(
        evs.iter().any(|e| matches!(
            e,
            EndpointEvent::Response { key, response, dialog: Some(d) }
                if *key == bye_key && response.status == 200 && *d == id
        )),
        "{evs:?}"
    );
    assert_eq!(c.dialog(&id).unwrap().state(), DialogState::Terminated);
    assert_eq!(
        b.dialog(&dialog_b).unwrap().state(),
        DialogState::Terminated
    );
    assert_eq!(b.stats().unknown_dialog, 0);
}

/// A's BYE, as it leaves A (serialized and parsed again).
fn bye_from_a(a: &mut Endpoint, now: Instant, dialog_a: &DialogId) -> (TransactionKey, Request) {
    let bye = a.dialog_request(dialog_a, Method::Bye).unwrap();
    let key = a.send_request(now, bye, peer(B)).unwrap();
    let (destination, bye) = single_request(wire(a));
    assert_eq!(destination, peer(B));
    (key, bye)
}

/// Checks D's 200 to A's BYE on the wire and hands it to A.
fn check_ok_reaches_a(
    d: &mut Endpoint,
    a: &mut Endpoint,
    now: Instant,
    bye: &Request,
    bye_key: TransactionKey,
    dialog_b: &DialogId,
) {
    let (destination, ok) = single_response(wire(d));
    assert_eq!(destination, peer(A), "answered to the BYE's Via");
    assert_eq!(ok.status, 200);
    assert_eq!(ok.headers.to_tag(), Some(dialog_b.local_tag.as_str()));
    assert_eq!(ok.headers.from_tag(), bye.headers.from_tag());
    assert_eq!(ok.headers.cseq().unwrap(), bye.headers.cseq().unwrap());
    assert_eq!(ok.headers.call_id().unwrap(), dialog_b.call_id);
    assert_eq!(ok.headers.top_via_branch(), bye.headers.top_via_branch());
    a.handle_message(now, Message::Response(ok), peer(B));
    let evs = events(a);
    assert!(
        evs.iter().any(|e| matches!(
            e,
            EndpointEvent::Response { key, response, .. }
                if *key == bye_key && response.status == 200
        )),
        "A did not match the 200 to its BYE: {evs:?}"
    );
}

#[test]
fn uas_dialog_imported_before_the_bye_answers_it_on_a_fresh_endpoint() {
    let Call {
        t0,
        mut a,
        b,
        dialog_a,
        dialog_b,
        ..
    } = confirmed_call();
    let record = through_store(&b.export_dialog(&dialog_b).unwrap());
    assert_eq!(record.role, Role::Uas.as_str());
    assert_eq!(record.remote_cseq, Some(INVITE_CSEQ));
    drop(b);
    let mut d = endpoint(B);
    assert_eq!(d.import_dialog(&record).unwrap(), dialog_b);

    let t1 = t0 + Duration::from_secs(5);
    let (bye_key, bye) = bye_from_a(&mut a, t1, &dialog_a);
    assert_eq!(
        bye.headers.cseq().unwrap(),
        CSeq::new(INVITE_CSEQ + 1, Method::Bye)
    );
    d.handle_message(t1, Message::Request(bye.clone()), peer(A));
    let key = match events(&mut d).as_slice() {
        [EndpointEvent::DialogRequest {
            key,
            dialog,
            request,
            ..
        }] => {
            assert_eq!(*dialog, dialog_b);
            assert_eq!(request.method, Method::Bye);
            *key
        }
        other => panic!("D did not accept the BYE: {other:?}"),
    };
    d.respond(t1, key, 200, None, None).unwrap();
    check_ok_reaches_a(&mut d, &mut a, t1, &bye, bye_key, &dialog_b);
    assert_eq!(
        d.dialog(&dialog_b).unwrap().state(),
        DialogState::Terminated
    );
}

#[test]
fn uas_dialog_loaded_when_its_bye_arrives_answers_it_on_a_fresh_endpoint() {
    let Call {
        t0,
        mut a,
        b,
        dialog_a,
        dialog_b,
        ..
    } = confirmed_call();
    // The store holds the JSON text of B's record; B dies.
    let stored = serde_json::to_string(&b.export_dialog(&dialog_b).unwrap()).unwrap();
    drop(b);
    let mut d = endpoint(B);

    let t1 = t0 + Duration::from_secs(5);
    let (bye_key, bye) = bye_from_a(&mut a, t1, &dialog_a);
    d.handle_message(t1, Message::Request(bye.clone()), peer(A));
    let key = match events(&mut d).as_slice() {
        [EndpointEvent::UnknownDialog { key, request, .. }] => {
            assert_eq!(request.headers.to_tag(), Some(dialog_b.local_tag.as_str()));
            *key
        }
        other => panic!("expected the unknown-dialog hook: {other:?}"),
    };
    assert!(
        d.poll_transmit().is_none(),
        "nothing answered before the TU decides"
    );
    let record: DialogRecord = serde_json::from_str(&stored).unwrap();
    assert_eq!(d.import_dialog(&record).unwrap(), dialog_b);
    d.redeliver(t1, key);
    let key = match events(&mut d).as_slice() {
        [EndpointEvent::DialogRequest {
            key,
            dialog,
            request,
            ..
        }] => {
            assert_eq!(*dialog, dialog_b);
            assert_eq!(request.method, Method::Bye);
            *key
        }
        other => panic!("D did not accept the redelivered BYE: {other:?}"),
    };
    d.respond(t1, key, 200, None, None).unwrap();
    check_ok_reaches_a(&mut d, &mut a, t1, &bye, bye_key, &dialog_b);
    assert_eq!(d.stats().unknown_dialog, 0, "no 481 was sent");
}
