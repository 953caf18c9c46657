//! Routing core tests on a fake clock: every decision and header rewrite checked on the bytes.
#![allow(clippy::disallowed_methods)] // `Instant::now()` gives the virtual clock its origin

use std::time::{Duration, Instant};

use super::*;
use crate::membership::MembershipConfig;
use thalamus_ownership::hash::{key_hash, owner, owner_by_hash};
use thalamus_ownership::heartbeat::{Heartbeat, Load, HEARTBEAT_VERSION};

const LB: &str = "192.0.2.1:5060";

fn node_addr(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i], 5060))
}

fn id(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

fn heartbeat(i: u8, session: &str, seq: u64, draining: bool) -> Heartbeat {
    Heartbeat {
        v: HEARTBEAT_VERSION,
        node: id(&format!("n{i}")),
        session: session.into(),
        seq,
        sip: node_addr(i),
        quic: None,
        draining,
        load: Load::default(),
        ts_ms: 0,
        pinned: Vec::new(),
        store_down_ms: 0,
    }
}

struct Fixture {
    core: BalancerCore,
    t0: Instant,
}

impl Fixture {
    /// A balancer at 192.0.2.1:5060 for domain gw.example.net with nodes n1..=n`count` up.
    fn new(count: u8) -> Self {
        Self::with_tls(count, None)
    }

    /// [`Fixture::new`] with a TLS listener on `tls_port` (same host).
    fn with_tls(count: u8, tls_port: Option<u16>) -> Self {
        let t0 = Instant::now();
        let mut config = RouterConfig::new(Host::parse("192.0.2.1").unwrap(), 5060);
        config.domains.push("gw.example.net".into());
        config.tls_port = tls_port;
        let mut core = BalancerCore::new(config, Membership::new(MembershipConfig::default()));
        for i in 1..=count {
            core.membership_mut()
                .heartbeat(&heartbeat(i, "s1", 1, false), node_addr(i), t0)
                .unwrap();
        }
        Self { core, t0 }
    }

    /// Routes `text` the full way; a response that can take the fast path must take the same
    /// decision there (checked on every response the tests route).
    fn route(&self, text: &str, from: Peer) -> Decision {
        let message = Message::parse(Bytes::from(text.to_owned())).unwrap();
        if let Message::Request(req) = &message {
            // The fast path routes the request as the transport delivers it: stamped.
            let mut stamped = req.clone();
            let _ = thalamus_sip::transaction::stamp_received(&mut stamped, from.addr);
            let full = self.core.route(Message::Request(stamped), from);
            if let Some(fast) = self.core.route_request_datagram(text.as_bytes(), from) {
                assert_same_decision(&fast.decision, &full, text);
            }
        }
        let full = self.core.route(message, from);
        if let Some(fast) = self.core.route_response_datagram(text.as_bytes(), from) {
            assert_same_decision(&fast.decision, &full, text);
        }
        full
    }

    fn owner_of(&self, key: &str) -> NodeId {
        owner(key, self.core.membership().eligible())
            .unwrap()
            .clone()
    }

    /// Takes node `i` out: every other node keeps beating, `i` stays silent for 4 s.
    fn take_out(&mut self, i: u8, count: u8) {
        for s in 1..=4u64 {
            let now = self.t0 + Duration::from_secs(s);
            for j in 1..=count {
                if j != i {
                    self.core
                        .membership_mut()
                        .heartbeat(&heartbeat(j, "s1", 1 + s, false), node_addr(j), now)
                        .unwrap();
                }
            }
            self.core.membership_mut().tick(now);
        }
        assert!(!self.core.membership().is_alive(&id(&format!("n{i}"))));
    }
}

/// The same decision, its bytes the same message: each field name's values in the same order
/// (the full path writes header names in their long form, fields it adds where it adds them,
/// and what is left of a list joined with ", "; the fast path leaves the rest as it came).
fn assert_same_decision(fast: &Decision, full: &Decision, input: &str) {
    if let (Decision::Drop(a), Decision::Drop(b)) = (fast, full) {
        assert_eq!(a, b, "{input}");
        return;
    }
    let parts = |d: &Decision| match d {
        Decision::Response {
            from_node,
            status,
            out,
        } => (0, from_node.clone(), *status, out.clone()),
        Decision::ToNode { node, out } => (1, Some(node.clone()), 0, out.clone()),
        Decision::Outward { from_node, out } => (2, from_node.clone(), 0, out.clone()),
        Decision::Answer { status, out } => (3, None, *status, out.clone()),
        other => panic!("{other:?} against {full:?}, for\n{input}"),
    };
    let (a_kind, a_node, a_status, a) = parts(fast);
    let (b_kind, b_node, b_status, b) = parts(full);
    assert_eq!(
        (a_kind, &a_node, a_status, &a.to, a.transport),
        (b_kind, &b_node, b_status, &b.to, b.transport),
        "{input}"
    );
    assert_eq!(fields_of(&a.bytes), fields_of(&b.bytes), "{input}");
}

/// A message's start line, its fields by name (values in order, lists split) and its body.
fn fields_of(
    bytes: &Bytes,
) -> (
    String,
    std::collections::BTreeMap<String, Vec<String>>,
    Bytes,
) {
    let message = Message::parse(bytes.clone()).unwrap();
    let (start, headers, body) = match &message {
        Message::Request(r) => (
            format!("{} {}", r.method, r.uri),
            &r.headers,
            r.body.clone(),
        ),
        Message::Response(r) => (
            format!("{} {}", r.status, r.reason),
            &r.headers,
            r.body.clone(),
        ),
    };
    let mut fields = std::collections::BTreeMap::<String, Vec<String>>::new();
    for h in headers.iter() {
        let v = h.value.to_str().unwrap();
        let list = matches!(
            h.name,
            HeaderName::Via | HeaderName::Route | HeaderName::RecordRoute
        );
        let values = fields.entry(h.name.as_str().to_owned()).or_default();
        if h.name == HeaderName::ContentLength {
            // The full path writes it from the body; the fast path leaves it as it came.
            values.push(v.parse::<usize>().unwrap().to_string());
        } else if list {
            values.extend(v.split(',').map(|x| x.trim().to_owned()));
        } else {
            values.push(v.to_owned());
        }
    }
    (start, fields, body)
}

fn client() -> Peer {
    Peer {
        addr: "198.51.100.7:5060".parse().unwrap(),
        transport: PeerTransport::Udp,
    }
}

fn from_node(i: u8) -> Peer {
    Peer {
        addr: node_addr(i),
        transport: PeerTransport::Udp,
    }
}

fn text(out: &Outgoing) -> String {
    String::from_utf8(out.bytes.to_vec()).unwrap()
}

fn header_lines<'a>(msg: &'a str, name: &str) -> Vec<&'a str> {
    msg.split("\r\n")
        .filter(|l| {
            l.len() > name.len()
                && l[..name.len()].eq_ignore_ascii_case(name)
                && l.as_bytes()[name.len()] == b':'
        })
        .collect()
}

fn our_branch(msg: &str) -> String {
    let via = header_lines(msg, "Via")[0];
    let start = via.find("branch=").unwrap() + "branch=".len();
    let rest = &via[start..];
    rest[..rest.find(';').unwrap_or(rest.len())].to_owned()
}

const INVITE: &str = "INVITE sip:earpiece-17@gw.example.net SIP/2.0\r\n\
Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bK776asdhds;received=198.51.100.7;rport=5060\r\n\
Max-Forwards: 70\r\n\
To: <sip:earpiece-17@gw.example.net>\r\n\
From: Alice <sip:alice@example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.example.com\r\n\
CSeq: 314159 INVITE\r\n\
Contact: <sip:alice@198.51.100.7:5060>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 4\r\n\
\r\n\
v=0\n";

fn invite_with(rurl_user: &str, branch: &str) -> String {
    INVITE
        .replace("earpiece-17", rurl_user)
        .replace("z9hG4bK776asdhds", branch)
}

#[test]
fn initial_invite_goes_to_the_owner_with_via_record_route_and_max_forwards() {
    let f = Fixture::new(3);
    let owner = f.owner_of("earpiece-17");
    let Decision::ToNode { node, out } = f.route(INVITE, client()) else {
        panic!("not routed to a node");
    };
    assert_eq!(node, owner);
    let entry = f.core.membership().node(&owner).unwrap();
    assert_eq!(out.to, NextHop::Addr(entry.sip));
    assert_eq!(out.transport, PeerTransport::Udp);
    let got = text(&out);
    let branch = our_branch(&got);
    assert!(branch.starts_with("z9hG4bK-lb-"), "{branch}");
    assert_eq!(branch.len(), "z9hG4bK-lb-".len() + 16 + 1 + 8);
    let expected = format!(
        "INVITE sip:earpiece-17@gw.example.net SIP/2.0\r\n\
Record-Route: <sip:{LB};lr;node={owner};ns={:08x};kh={:016x}>\r\n\
Via: SIP/2.0/UDP {LB};branch={branch};rport\r\n\
Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bK776asdhds;received=198.51.100.7;rport=5060\r\n\
Max-Forwards: 69\r\n\
To: <sip:earpiece-17@gw.example.net>\r\n\
From: Alice <sip:alice@example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.example.com\r\n\
CSeq: 314159 INVITE\r\n\
Contact: <sip:alice@198.51.100.7:5060>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 4\r\n\
\r\n\
v=0\n",
        entry.session_tag,
        key_hash("earpiece-17"),
    );
    assert_eq!(got, expected);
}

#[test]
fn retransmissions_get_the_same_branch_and_other_requests_another() {
    let f = Fixture::new(3);
    let Decision::ToNode { out: a, .. } = f.route(INVITE, client()) else {
        panic!()
    };
    let Decision::ToNode { out: b, .. } = f.route(INVITE, client()) else {
        panic!()
    };
    assert_eq!(a, b);
    let other = invite_with("earpiece-17", "z9hG4bKother");
    let Decision::ToNode { out: c, .. } = f.route(&other, client()) else {
        panic!()
    };
    assert_ne!(our_branch(&text(&a)), our_branch(&text(&c)));
}

#[test]
fn keys_spread_over_nodes_and_each_goes_to_its_owner() {
    let f = Fixture::new(3);
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..60 {
        let user = format!("dev-{i}");
        let Decision::ToNode { node, .. } = f.route(&invite_with(&user, "z9hG4bKx"), client())
        else {
            panic!()
        };
        assert_eq!(node, f.owner_of(&user));
        seen.insert(node);
    }
    assert_eq!(seen.len(), 3);
}

/// The 200 a node would send for the request the balancer forwarded to it.
fn node_ok(forwarded: &str, to_tag: &str) -> String {
    let Message::Request(req) = Message::parse(Bytes::from(forwarded.to_owned())).unwrap() else {
        panic!()
    };
    let mut ok = Response::from_request(&req, 200, None);
    ok.set_to_tag(to_tag);
    for rr in req.headers.get_all(&HeaderName::RecordRoute) {
        ok.headers.push(HeaderName::RecordRoute, rr.clone());
    }
    ok.headers
        .push(HeaderName::Contact, "<sip:earpiece-17@10.0.0.1:5060>");
    String::from_utf8(ok.to_bytes().to_vec()).unwrap()
}

#[test]
fn response_loses_our_via_and_goes_to_the_next_one() {
    let f = Fixture::new(3);
    let Decision::ToNode { node, out } = f.route(INVITE, client()) else {
        panic!()
    };
    let ok = node_ok(&text(&out), "n-tag");
    let node_peer = Peer {
        addr: f.core.membership().node(&node).unwrap().sip,
        transport: PeerTransport::Udp,
    };
    let Decision::Response {
        from_node,
        status,
        out,
    } = f.route(&ok, node_peer)
    else {
        panic!("response not forwarded")
    };
    assert_eq!(from_node, Some(node));
    assert_eq!(status, 200);
    assert_eq!(out.to, NextHop::Addr("198.51.100.7:5060".parse().unwrap()));
    assert_eq!(out.transport, PeerTransport::Udp);
    let got = text(&out);
    // Exactly the original Via is left; the rest is the node's response untouched.
    let expected = ok.replacen(
        &format!("Via: SIP/2.0/UDP {LB};branch={};rport\r\n", our_branch(&ok)),
        "",
        1,
    );
    assert_ne!(expected, ok);
    assert_eq!(got, expected);
    assert_eq!(header_lines(&got, "Via").len(), 1);
    assert_eq!(header_lines(&got, "Record-Route").len(), 1);
}

fn response_with_vias(vias: &[&str]) -> String {
    let mut s = String::from("SIP/2.0 180 Ringing\r\n");
    for v in vias {
        s.push_str(&format!("Via: {v}\r\n"));
    }
    s.push_str(
        "To: <sip:d@gw.example.net>;tag=x\r\nFrom: <sip:a@example.com>;tag=y\r\n\
Call-ID: c1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n",
    );
    s
}

#[test]
fn responses_follow_received_rport_and_sent_by() {
    let f = Fixture::new(1);
    let ours = format!("SIP/2.0/UDP {LB};branch=z9hG4bK-lb-1");
    let cases: [(&str, NextHop, PeerTransport); 5] = [
        (
            "SIP/2.0/UDP client.example.com:5070;branch=z9hG4bKa;received=203.0.113.9;rport=6000",
            NextHop::Addr("203.0.113.9:6000".parse().unwrap()),
            PeerTransport::Udp,
        ),
        (
            "SIP/2.0/UDP client.example.com:5070;branch=z9hG4bKa;received=203.0.113.9",
            NextHop::Addr("203.0.113.9:5070".parse().unwrap()),
            PeerTransport::Udp,
        ),
        (
            "SIP/2.0/UDP client.example.com;branch=z9hG4bKa",
            NextHop::Name {
                host: "client.example.com".into(),
                port: 5060,
            },
            PeerTransport::Udp,
        ),
        (
            "SIP/2.0/TCP 203.0.113.5:5080;branch=z9hG4bKa;rport=40000;received=203.0.113.5",
            NextHop::Addr("203.0.113.5:40000".parse().unwrap()),
            PeerTransport::Tcp,
        ),
        (
            "SIP/2.0/UDP [2001:db8::1]:5062;branch=z9hG4bKa",
            NextHop::Addr("[2001:db8::1]:5062".parse().unwrap()),
            PeerTransport::Udp,
        ),
    ];
    for (next, hop, transport) in cases {
        let resp = response_with_vias(&[&ours, next]);
        let Decision::Response { out, .. } = f.route(&resp, from_node(1)) else {
            panic!("{next}")
        };
        assert_eq!(out.to, hop, "{next}");
        assert_eq!(out.transport, transport, "{next}");
        assert_eq!(
            header_lines(&text(&out), "Via"),
            vec![format!("Via: {next}")]
        );
    }
}

#[test]
fn responses_not_for_us_are_dropped() {
    let f = Fixture::new(1);
    let resp = response_with_vias(&["SIP/2.0/UDP 192.0.2.99:5060;branch=z9hG4bKa"]);
    assert_eq!(
        f.route(&resp, from_node(1)),
        Decision::Drop(DropReason::NotOurVia)
    );
    let only_ours = response_with_vias(&[&format!("SIP/2.0/UDP {LB};branch=z9hG4bK-lb-1")]);
    assert_eq!(
        f.route(&only_ours, from_node(1)),
        Decision::Drop(DropReason::NoNextVia)
    );
    let sctp = response_with_vias(&[
        &format!("SIP/2.0/UDP {LB};branch=z9hG4bK-lb-1"),
        "SIP/2.0/SCTP 203.0.113.9;branch=z9hG4bKa",
    ]);
    assert_eq!(
        f.route(&sctp, from_node(1)),
        Decision::Drop(DropReason::UnusableVia)
    );
}

#[test]
fn max_forwards_one_is_forwarded_as_zero() {
    let f = Fixture::new(2);
    let req = INVITE.replace("Max-Forwards: 70", "Max-Forwards: 1");
    let Decision::ToNode { out, .. } = f.route(&req, client()) else {
        panic!()
    };
    assert_eq!(
        header_lines(&text(&out), "Max-Forwards"),
        vec!["Max-Forwards: 0"]
    );
    let without = INVITE.replace("Max-Forwards: 70\r\n", "");
    let Decision::ToNode { out, .. } = f.route(&without, client()) else {
        panic!()
    };
    assert_eq!(
        header_lines(&text(&out), "Max-Forwards"),
        vec!["Max-Forwards: 70"]
    );
}

#[test]
fn max_forwards_zero_is_answered_483_statelessly() {
    let f = Fixture::new(2);
    let req = INVITE.replace("Max-Forwards: 70", "Max-Forwards: 0");
    let Decision::Answer { status, out } = f.route(&req, client()) else {
        panic!()
    };
    assert_eq!(status, 483);
    assert_eq!(out.to, NextHop::Addr("198.51.100.7:5060".parse().unwrap()));
    let got = text(&out);
    assert!(got.starts_with("SIP/2.0 483 Too Many Hops\r\n"), "{got}");
    assert_eq!(
        header_lines(&got, "Via"),
        vec!["Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bK776asdhds;received=198.51.100.7;rport=5060"]
    );
    let to = header_lines(&got, "To")[0];
    assert!(
        to.starts_with("To: <sip:earpiece-17@gw.example.net>;tag=lb"),
        "{to}"
    );
    // A retransmission gets the same answer, tag included.
    let Decision::Answer { out: again, .. } = f.route(&req, client()) else {
        panic!()
    };
    assert_eq!(again, out);
    // An ACK is never answered.
    let ack = req
        .replace("INVITE sip", "ACK sip")
        .replace("INVITE\r\n", "ACK\r\n");
    assert_eq!(
        f.route(&ack, client()),
        Decision::Drop(DropReason::AckNotRoutable)
    );
    // A balancer that is starting may not know its nodes yet: no 503 (the sender retransmits).
    let mut f = Fixture::new(0);
    f.core.set_starting(true);
    assert_eq!(
        f.route(INVITE, client()),
        Decision::Drop(DropReason::StartingUp)
    );
    f.core.set_starting(false);
    assert!(matches!(
        f.route(INVITE, client()),
        Decision::Answer { status: 503, .. }
    ));
    // While it learns its nodes, a new call is not hashed over the few it knows yet, but a
    // request for a node its Route names goes there.
    let mut f = Fixture::new(3);
    let bye = in_dialog_bye(&params(&f, "n2", "earpiece-17"));
    f.core.set_starting(true);
    f.core.set_learning(true);
    assert_eq!(
        f.route(INVITE, client()),
        Decision::Drop(DropReason::StartingUp)
    );
    let Decision::ToNode { node, .. } = f.route(&bye, client()) else {
        panic!()
    };
    assert_eq!(node, id("n2"));
    f.core.set_learning(false);
    f.core.set_starting(false);
    assert!(matches!(f.route(INVITE, client()), Decision::ToNode { .. }));
}

const OPTIONS: &str = "OPTIONS sip:192.0.2.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 203.0.113.1:5060;branch=z9hG4bKprobe1;rport=5060;received=203.0.113.1\r\n\
Max-Forwards: 70\r\n\
To: <sip:192.0.2.1>\r\n\
From: <sip:probe@upstream.example.net>;tag=p1\r\n\
Call-ID: probe-1\r\n\
CSeq: 1 OPTIONS\r\n\
Content-Length: 0\r\n\r\n";

#[test]
fn options_to_the_balancer_is_answered_200_with_allow() {
    let f = Fixture::new(0);
    let Decision::Answer { status, out } = f.route(OPTIONS, client()) else {
        panic!()
    };
    assert_eq!(status, 200);
    assert_eq!(out.to, NextHop::Addr("203.0.113.1:5060".parse().unwrap()));
    let got = text(&out);
    assert!(got.starts_with("SIP/2.0 200 OK\r\n"));
    assert_eq!(header_lines(&got, "Allow"), vec![format!("Allow: {ALLOW}")]);
    // Max-Forwards 0 with any Request-URI: answered by us too.
    let mf0 = OPTIONS
        .replace(
            "OPTIONS sip:192.0.2.1:5060",
            "OPTIONS sip:dev@gw.example.net",
        )
        .replace("Max-Forwards: 70", "Max-Forwards: 0");
    assert!(matches!(
        f.route(&mf0, client()),
        Decision::Answer { status: 200, .. }
    ));
}

#[test]
fn options_for_a_device_goes_to_its_node() {
    let f = Fixture::new(2);
    let req = OPTIONS.replace(
        "OPTIONS sip:192.0.2.1:5060",
        "OPTIONS sip:dev-9@gw.example.net",
    );
    let Decision::ToNode { node, .. } = f.route(&req, client()) else {
        panic!()
    };
    assert_eq!(node, f.owner_of("dev-9"));
}

#[test]
fn no_node_means_503_and_ack_is_dropped() {
    let f = Fixture::new(0);
    let Decision::Answer { status, out } = f.route(INVITE, client()) else {
        panic!()
    };
    assert_eq!(status, 503);
    assert!(text(&out).starts_with("SIP/2.0 503 Service Unavailable\r\n"));
    let ack = INVITE
        .replace("INVITE sip", "ACK sip")
        .replace("314159 INVITE", "314159 ACK");
    assert_eq!(
        f.route(&ack, client()),
        Decision::Drop(DropReason::AckNotRoutable)
    );
}

/// A BYE from the far end inside a dialog whose Record-Route named `node`.
fn in_dialog_bye(route_params: &str) -> String {
    format!(
        "BYE sip:earpiece-17@10.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKbye1;received=198.51.100.7;rport=5060\r\n\
Route: <sip:{LB};lr;{route_params}>\r\n\
Max-Forwards: 70\r\n\
To: <sip:earpiece-17@gw.example.net>;tag=n-tag\r\n\
From: Alice <sip:alice@example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.example.com\r\n\
CSeq: 314160 BYE\r\n\
Content-Length: 0\r\n\r\n"
    )
}

fn params(f: &Fixture, node: &str, key: &str) -> String {
    let entry = f.core.membership().node(&id(node)).unwrap();
    format!(
        "node={node};ns={:08x};kh={:016x}",
        entry.session_tag,
        key_hash(key)
    )
}

/// A key owned by something other than `not` among the eligible nodes.
fn key_not_owned_by(f: &Fixture, not: &str) -> String {
    (0..)
        .map(|i| format!("key-{i}"))
        .find(|k| f.owner_of(k).as_str() != not)
        .unwrap()
}

#[test]
fn in_dialog_request_goes_to_the_node_in_our_route_and_loses_the_route() {
    let f = Fixture::new(3);
    // Use a key that n3 does not own: the node parameter must win over the hash.
    let key = key_not_owned_by(&f, "n3");
    let bye = in_dialog_bye(&params(&f, "n3", &key));
    let Decision::ToNode { node, out } = f.route(&bye, client()) else {
        panic!()
    };
    assert_eq!(node, id("n3"));
    assert_eq!(out.to, NextHop::Addr(node_addr(3)));
    let got = text(&out);
    assert_eq!(got, forwarded_bye(&bye, &params(&f, "n3", &key), &got));
    assert!(header_lines(&got, "Record-Route").is_empty());
}

/// What `in_dialog_bye(route_params)` becomes on its way to the node that sent `got`: our
/// Route gone, our Via on top, Max-Forwards down by one, every other byte as it came.
fn forwarded_bye(bye: &str, route_params: &str, got: &str) -> String {
    bye.replace(&format!("Route: <sip:{LB};lr;{route_params}>\r\n"), "")
        .replace(
            "Via: SIP/2.0/UDP 198.51.100.7",
            &format!(
                "Via: SIP/2.0/UDP {LB};branch={};rport\r\nVia: SIP/2.0/UDP 198.51.100.7",
                our_branch(got)
            ),
        )
        .replace("Max-Forwards: 70", "Max-Forwards: 69")
}

#[test]
fn in_dialog_request_for_a_dead_node_goes_by_the_hash_of_its_key() {
    let mut f = Fixture::new(3);
    let key = key_not_owned_by(&f, "n3");
    let bye = in_dialog_bye(&params(&f, "n3", &key));
    f.take_out(3, 3);
    let expected = owner_by_hash(key_hash(&key), f.core.membership().eligible())
        .unwrap()
        .clone();
    let Decision::ToNode { node, .. } = f.route(&bye, client()) else {
        panic!()
    };
    assert_eq!(node, expected);
    assert_ne!(node, id("n3"));
}

#[test]
fn in_dialog_request_of_a_restarted_node_goes_by_the_hash() {
    let mut f = Fixture::new(3);
    let key = key_not_owned_by(&f, "n3");
    let bye = in_dialog_bye(&params(&f, "n3", &key));
    let now = f.t0 + Duration::from_secs(1);
    f.core
        .membership_mut()
        .heartbeat(&heartbeat(3, "s2", 1, false), node_addr(3), now)
        .unwrap();
    assert!(f.core.membership().is_alive(&id("n3")));
    let Decision::ToNode { node, .. } = f.route(&bye, client()) else {
        panic!()
    };
    assert_eq!(node, f.owner_of(&key));
    assert_ne!(node, id("n3"));
    // A dialog stamped with the new session still goes to n3.
    let fresh = in_dialog_bye(&params(&f, "n3", &key));
    let Decision::ToNode { node, .. } = f.route(&fresh, client()) else {
        panic!()
    };
    assert_eq!(node, id("n3"));
}

#[test]
fn draining_node_gets_no_new_calls_but_keeps_its_dialogs() {
    let mut f = Fixture::new(3);
    let owner = f.owner_of("earpiece-17");
    let i: u8 = owner.as_str()[1..].parse().unwrap();
    let bye = in_dialog_bye(&params(&f, owner.as_str(), "earpiece-17"));
    f.core
        .membership_mut()
        .heartbeat(&heartbeat(i, "s1", 2, true), node_addr(i), f.t0)
        .unwrap();
    let Decision::ToNode { node, .. } = f.route(INVITE, client()) else {
        panic!()
    };
    assert_ne!(node, owner);
    assert_eq!(node, f.owner_of("earpiece-17"));
    let Decision::ToNode { node, .. } = f.route(&bye, client()) else {
        panic!()
    };
    assert_eq!(node, owner);
}

#[test]
fn a_pinned_device_is_reached_where_its_session_is_for_new_calls_and_its_dialogs() {
    let mut f = Fixture::new(3);
    let owner = f.owner_of("earpiece-17");
    let keeper = ["n1", "n2", "n3"]
        .into_iter()
        .map(id)
        .find(|n| *n != owner)
        .unwrap();
    let k: u8 = keeper.as_str()[1..].parse().unwrap();
    // A dialog stamped by the owner (it handled the INVITE before it went away and came back).
    let bye = in_dialog_bye(&params(&f, owner.as_str(), "earpiece-17"));
    let pin = |f: &mut Fixture, seq: u64, pins: Vec<u64>| {
        let hb = Heartbeat {
            pinned: pins,
            store_down_ms: 0,
            ..heartbeat(k, "s1", seq, false)
        };
        f.core
            .membership_mut()
            .heartbeat(&hb, node_addr(k), f.t0)
            .unwrap();
    };
    pin(&mut f, 2, vec![key_hash("earpiece-17")]);
    // The device's session is on the keeper: new calls and the dialog's requests go there,
    // though the owner is up and the Route names it.
    let Decision::ToNode { node, .. } = f.route(INVITE, client()) else {
        panic!()
    };
    assert_eq!(node, keeper);
    let Decision::ToNode { node, .. } = f.route(&bye, client()) else {
        panic!()
    };
    assert_eq!(node, keeper);
    // Other devices still go to their owners.
    let other = key_not_owned_by(&f, keeper.as_str());
    let Decision::ToNode { node, .. } = f.route(&invite_with(&other, "z9hG4bKo1"), client()) else {
        panic!()
    };
    assert_eq!(node, f.owner_of(&other));
    // A draining keeper gets no new call for it, but still its dialogs.
    let hb = Heartbeat {
        pinned: vec![key_hash("earpiece-17")],
        ..heartbeat(k, "s1", 3, true)
    };
    f.core
        .membership_mut()
        .heartbeat(&hb, node_addr(k), f.t0)
        .unwrap();
    let Decision::ToNode { node, .. } = f.route(INVITE, client()) else {
        panic!()
    };
    assert_eq!(node, owner);
    let Decision::ToNode { node, .. } = f.route(&bye, client()) else {
        panic!()
    };
    assert_eq!(node, keeper);
    // Unpinned (the device moved to its owner once its call ended): back to the owner.
    pin(&mut f, 4, Vec::new());
    let Decision::ToNode { node, .. } = f.route(&bye, client()) else {
        panic!()
    };
    assert_eq!(node, owner);
}

#[test]
fn cancel_and_non_2xx_ack_reach_the_invite_node_with_the_invite_branch() {
    let f = Fixture::new(4);
    for i in 0..20 {
        let user = format!("dev-{i}");
        let invite = invite_with(&user, &format!("z9hG4bKinv{i}"));
        let Decision::ToNode {
            node: invite_node,
            out: invite_out,
        } = f.route(&invite, client())
        else {
            panic!()
        };
        let Message::Request(req) = Message::parse(Bytes::from(invite.clone())).unwrap() else {
            panic!()
        };
        let cancel = String::from_utf8(req.cancel().unwrap().to_bytes().to_vec()).unwrap();
        let Decision::ToNode {
            node: cancel_node,
            out: cancel_out,
        } = f.route(&cancel, client())
        else {
            panic!()
        };
        assert_eq!(cancel_node, invite_node);
        assert_eq!(
            our_branch(&text(&cancel_out)),
            our_branch(&text(&invite_out))
        );
        assert!(header_lines(&text(&cancel_out), "Record-Route").is_empty());

        let mut busy = Response::from_request(&req, 486, None);
        busy.set_to_tag("busy-tag");
        let ack = String::from_utf8(req.ack_for(&busy).unwrap().to_bytes().to_vec()).unwrap();
        let Decision::ToNode {
            node: ack_node,
            out: ack_out,
        } = f.route(&ack, client())
        else {
            panic!()
        };
        assert_eq!(ack_node, invite_node);
        assert_eq!(our_branch(&text(&ack_out)), our_branch(&text(&invite_out)));
    }
}

#[test]
fn ack_for_2xx_follows_the_record_route() {
    let f = Fixture::new(3);
    let Decision::ToNode { node, out } = f.route(INVITE, client()) else {
        panic!()
    };
    let rr = header_lines(&text(&out), "Record-Route")[0]
        .trim_start_matches("Record-Route: ")
        .to_owned();
    // A Request-URI whose own key another node owns: only the Route's node parameter can
    // bring the ACK to the INVITE's node.
    let other = key_not_owned_by(&f, node.as_str());
    let ack = format!(
        "ACK sip:{other}@gw.example.net SIP/2.0\r\n\
Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKack2xx;received=198.51.100.7;rport=5060\r\n\
Route: {rr}\r\n\
Max-Forwards: 70\r\n\
To: <sip:earpiece-17@gw.example.net>;tag=n-tag\r\n\
From: Alice <sip:alice@example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.example.com\r\n\
CSeq: 314159 ACK\r\n\
Content-Length: 0\r\n\r\n"
    );
    let Decision::ToNode { node: ack_node, .. } = f.route(&ack, client()) else {
        panic!()
    };
    assert_eq!(ack_node, node);
}

const NODE_INVITE: &str = "INVITE sip:bob@voip.example.org SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKnode1\r\n\
Max-Forwards: 70\r\n\
To: <sip:bob@voip.example.org>\r\n\
From: <sip:earpiece-3@gw.example.net>;tag=dev3\r\n\
Call-ID: out-1@10.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:earpiece-3@10.0.0.1:5060>\r\n\
Content-Length: 0\r\n\r\n";

#[test]
fn node_request_goes_out_by_request_uri_with_our_record_route() {
    let f = Fixture::new(2);
    let Decision::Outward { from_node, out } = f.route(NODE_INVITE, from_node(1)) else {
        panic!()
    };
    assert_eq!(from_node, Some(id("n1")));
    assert_eq!(
        out.to,
        NextHop::Name {
            host: "voip.example.org".into(),
            port: 5060
        }
    );
    let got = text(&out);
    let entry = f.core.membership().node(&id("n1")).unwrap();
    assert_eq!(
        header_lines(&got, "Record-Route"),
        vec![format!(
            "Record-Route: <sip:{LB};lr;node=n1;ns={:08x};kh={:016x}>",
            entry.session_tag,
            key_hash("earpiece-3")
        )]
    );
    let vias = header_lines(&got, "Via");
    assert_eq!(vias.len(), 2);
    assert!(vias[0].starts_with(&format!("Via: SIP/2.0/UDP {LB};branch=z9hG4bK-lb-")));
    assert_eq!(
        vias[1],
        "Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKnode1"
    );
}

#[test]
fn node_request_with_routes_goes_to_the_next_route() {
    let f = Fixture::new(2);
    let req = NODE_INVITE.replace(
        "Max-Forwards: 70\r\n",
        &format!(
            "Route: <sip:{LB};lr>, <sip:203.0.113.50:5070;lr;transport=tcp>\r\nMax-Forwards: 70\r\n"
        ),
    );
    let Decision::Outward { out, .. } = f.route(&req, from_node(2)) else {
        panic!()
    };
    assert_eq!(out.to, NextHop::Addr("203.0.113.50:5070".parse().unwrap()));
    assert_eq!(out.transport, PeerTransport::Tcp);
    let got = text(&out);
    assert_eq!(
        header_lines(&got, "Route"),
        vec!["Route: <sip:203.0.113.50:5070;lr;transport=tcp>"]
    );
    assert!(header_lines(&got, "Via")[0].starts_with(&format!("Via: SIP/2.0/TCP {LB};")));
    assert!(header_lines(&got, "Record-Route")[0].ends_with(";transport=tcp>"));
}

/// A client over TLS: its request reaches the node over UDP, Record-Routed twice (RFC 5658):
/// our UDP address on top for the node, our TLS address below it for the client. The node's
/// response goes back on the client's TLS connection; the client's request in the dialog
/// (both our entries in its Route) goes to the node; the node's goes out over TLS. A node's
/// request to a `sips:` target or one with `transport=tls` goes out over TLS (5061 by default),
/// Record-Routed the other way round; without a TLS listener such a target gets 502.
#[test]
fn tls_clients_and_tls_targets_are_record_routed_twice() {
    let f = Fixture::with_tls(2, Some(5061));
    let tls_client = Peer {
        addr: "198.51.100.7:40123".parse().unwrap(),
        transport: PeerTransport::Tls,
    };
    let client_via =
        "SIP/2.0/TLS 198.51.100.7:5061;branch=z9hG4bK776asdhds;received=198.51.100.7;rport=40123";
    let req = INVITE
        .replace(
            "Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bK776asdhds;received=198.51.100.7;rport=5060",
            &format!("Via: {client_via}"),
        )
        .replace(
            "Contact: <sip:alice@198.51.100.7:5060>",
            "Contact: <sip:alice@198.51.100.7:5061;transport=tls>",
        );
    let Decision::ToNode { node, out } = f.route(&req, tls_client) else {
        panic!("not routed to a node");
    };
    assert_eq!(out.transport, PeerTransport::Udp);
    let got = text(&out);
    let rr = header_lines(&got, "Record-Route");
    assert_eq!(rr.len(), 2, "{got}");
    assert!(
        rr[0].starts_with(&format!("Record-Route: <sip:{LB};lr;node={node};")),
        "{got}"
    );
    assert!(!rr[0].contains("transport"), "{got}");
    assert!(
        rr[1].starts_with("Record-Route: <sip:192.0.2.1:5061;lr;"),
        "{got}"
    );
    assert!(rr[1].ends_with(";transport=tls>"), "{got}");
    let route_params = |line: &str| line.trim_start_matches("Record-Route: ").to_string();
    let (udp_entry, tls_entry) = (route_params(rr[0]), route_params(rr[1]));

    // The node's answer: back on the client's connection.
    let resp = response_with_vias(&[
        &format!("SIP/2.0/UDP {LB};branch={}", our_branch(&got)),
        client_via,
    ]);
    let Decision::Response { out, .. } = f.route(&resp, from_node(1)) else {
        panic!("response not routed")
    };
    assert_eq!(
        (out.to, out.transport),
        (
            NextHop::Addr("198.51.100.7:40123".parse().unwrap()),
            PeerTransport::Tls
        )
    );

    // The client's BYE, its route set reversed: both our entries go, the node gets it.
    let bye = format!(
        "BYE sip:earpiece-17@10.0.0.1:5060 SIP/2.0\r\nVia: {client_via}\r\n\
Route: {tls_entry}, {udp_entry}\r\nMax-Forwards: 70\r\n\
To: <sip:earpiece-17@gw.example.net>;tag=gw1\r\nFrom: <sip:alice@example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.example.com\r\nCSeq: 314160 BYE\r\nContent-Length: 0\r\n\r\n"
    );
    let Decision::ToNode { node: to, out } = f.route(&bye, tls_client) else {
        panic!("the client's BYE did not reach the node")
    };
    assert_eq!(to, node);
    assert!(header_lines(&text(&out), "Route").is_empty());

    // The node's BYE toward the client: both our entries go, out over TLS to its Contact.
    let node_bye = format!(
        "BYE sip:alice@198.51.100.7:5061;transport=tls SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKnodebye\r\n\
Route: {udp_entry}, {tls_entry}\r\nMax-Forwards: 70\r\n\
From: <sip:earpiece-17@gw.example.net>;tag=gw1\r\nTo: <sip:alice@example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.example.com\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n"
    );
    let Decision::Outward { out, .. } = f.route(&node_bye, from_node(1)) else {
        panic!("the node's BYE did not go out")
    };
    assert!(header_lines(&text(&out), "Route").is_empty());
    assert_eq!(
        (out.to, out.transport),
        (
            NextHop::Addr("198.51.100.7:5061".parse().unwrap()),
            PeerTransport::Tls
        )
    );

    for (target, hop) in [
        ("sips:bob@203.0.113.50", "203.0.113.50:5061"),
        (
            "sip:bob@203.0.113.50:5071;transport=tls",
            "203.0.113.50:5071",
        ),
    ] {
        let req = NODE_INVITE.replace("sip:bob@voip.example.org", target);
        let Decision::Outward { out, .. } = f.route(&req, from_node(2)) else {
            panic!("{target} not routed outward")
        };
        assert_eq!(out.to, NextHop::Addr(hop.parse().unwrap()), "{target}");
        assert_eq!(out.transport, PeerTransport::Tls, "{target}");
        let got = text(&out);
        assert!(header_lines(&got, "Via")[0].starts_with(&format!("Via: SIP/2.0/TLS {LB};")));
        let rr = header_lines(&got, "Record-Route");
        // Toward a sips: target our entry is a sips: URI (RFC 3261 16.6), else transport=tls.
        let outer_ok = if target.starts_with("sips:") {
            rr[0].starts_with("Record-Route: <sips:192.0.2.1:5061;lr;")
                && !rr[0].contains("transport")
        } else {
            rr[0].starts_with("Record-Route: <sip:192.0.2.1:5061;lr;")
                && rr[0].ends_with(";transport=tls>")
        };
        assert!(outer_ok, "{got}");
        assert!(
            rr[1].starts_with(&format!("Record-Route: <sip:{LB};lr;")),
            "{got}"
        );
        // Without a TLS listener the dialog could not come back: 502.
        assert!(matches!(
            Fixture::new(2).route(&req, from_node(2)),
            Decision::Answer { status: 502, .. }
        ));
    }
}

#[test]
fn node_request_for_a_device_goes_to_the_device_owner() {
    let f = Fixture::new(3);
    let req = NODE_INVITE.replace("sip:bob@voip.example.org", "sip:dev-42@gw.example.net");
    let Decision::ToNode { node, .. } = f.route(&req, from_node(1)) else {
        panic!()
    };
    assert_eq!(node, f.owner_of("dev-42"));
}

#[test]
fn node_in_dialog_request_goes_out_by_request_uri() {
    let f = Fixture::new(2);
    let bye = format!(
        "BYE sip:bob@203.0.113.77:5062 SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKnbye\r\n\
Route: <sip:{LB};lr;{}>\r\n\
Max-Forwards: 70\r\n\
To: <sip:bob@voip.example.org>;tag=bob1\r\n\
From: <sip:earpiece-3@gw.example.net>;tag=dev3\r\n\
Call-ID: out-1@10.0.0.1\r\n\
CSeq: 2 BYE\r\n\
Content-Length: 0\r\n\r\n",
        params(&f, "n1", "earpiece-3")
    );
    let Decision::Outward { from_node, out } = f.route(&bye, from_node(1)) else {
        panic!()
    };
    assert_eq!(from_node, Some(id("n1")));
    assert_eq!(out.to, NextHop::Addr("203.0.113.77:5062".parse().unwrap()));
    let got = text(&out);
    assert!(header_lines(&got, "Route").is_empty());
    assert!(header_lines(&got, "Record-Route").is_empty());
}

#[test]
fn unsupported_outward_transport_is_answered_502() {
    let f = Fixture::new(1);
    let req = NODE_INVITE.replace(
        "sip:bob@voip.example.org",
        "sip:bob@voip.example.org;transport=sctp",
    );
    assert!(matches!(
        f.route(&req, from_node(1)),
        Decision::Answer { status: 502, .. }
    ));
}

#[test]
fn a_request_coming_back_to_us_is_a_loop() {
    let f = Fixture::new(2);
    let Decision::ToNode { node, out } = f.route(INVITE, client()) else {
        panic!()
    };
    let addr = f.core.membership().node(&node).unwrap().sip;
    // The node sends the very request back to us, with its own Via on top.
    let back = text(&out).replacen(
        "Via: ",
        &format!("Via: SIP/2.0/UDP {addr};branch=z9hG4bKnodefwd\r\nVia: "),
        1,
    );
    let peer = Peer {
        addr,
        transport: PeerTransport::Udp,
    };
    let Decision::Answer { status, .. } = f.route(&back, peer) else {
        panic!()
    };
    assert_eq!(status, 482);
    // A different request through the same element is fine (spiral).
    let spiral = back.replace(
        "INVITE sip:earpiece-17@gw.example.net",
        "INVITE sip:earpiece-18@gw.example.net",
    );
    assert!(matches!(f.route(&spiral, peer), Decision::ToNode { .. }));
}

#[test]
fn malformed_requests_get_400_and_malformed_acks_nothing() {
    let f = Fixture::new(1);
    let req = INVITE.replace("Call-ID: a84b4c76e66710@pc33.example.com\r\n", "");
    let Decision::Answer { status, out } = f.route(&req, client()) else {
        panic!()
    };
    assert_eq!(status, 400);
    assert!(text(&out).starts_with("SIP/2.0 400 Bad Request"));
    let ack = req
        .replace("INVITE sip", "ACK sip")
        .replace("314159 INVITE", "314159 ACK");
    assert_eq!(
        f.route(&ack, client()),
        Decision::Drop(DropReason::InvalidAck)
    );
}

#[test]
fn requests_the_balancer_cannot_read_are_answered() {
    let f = Fixture::new(1);
    let cases = [
        (
            INVITE.replace("CSeq: 314159 INVITE", "CSeq: 314159 BYE"),
            400,
        ),
        (INVITE.replace("CSeq: 314159 INVITE", "CSeq: x INVITE"), 400),
        (
            INVITE.replace("From: Alice <sip:alice@example.com>;tag=1928301774\r\n", ""),
            400,
        ),
        (INVITE.replace("Max-Forwards: 70", "Max-Forwards: ten"), 400),
        (INVITE.replace(" SIP/2.0\r\nVia", " SIP/3.0\r\nVia"), 505),
    ];
    for (req, expected) in cases {
        let Decision::Answer { status, .. } = f.route(&req, client()) else {
            panic!("{req}")
        };
        assert_eq!(status, expected, "{req}");
    }
}

#[test]
fn routing_key_rules() {
    let f = Fixture::new(2);
    let parse = |t: &str| match Message::parse(Bytes::from(t.to_owned())).unwrap() {
        Message::Request(r) => r,
        _ => panic!(),
    };
    let key_of = |t: &str| {
        let r = parse(t);
        f.core.routing_key(&r).into_owned()
    };
    // Domain: Request-URI user.
    assert_eq!(key_of(INVITE), "earpiece-17");
    // The balancer's own address, or a node's, count as local.
    assert_eq!(
        key_of(&INVITE.replace(
            "sip:earpiece-17@gw.example.net SIP",
            "sip:d1@192.0.2.1:5060 SIP"
        )),
        "d1"
    );
    assert_eq!(
        key_of(&INVITE.replace("sip:earpiece-17@gw.example.net SIP", "sip:d2@10.0.0.2 SIP")),
        "d2"
    );
    // Elsewhere: From user.
    assert_eq!(key_of(NODE_INVITE), "earpiece-3");
    // No user anywhere: Call-ID.
    let anon = NODE_INVITE
        .replace("sip:earpiece-3@gw.example.net", "sip:gw.example.net")
        .replace("sip:bob@voip.example.org SIP", "sip:voip.example.org SIP");
    assert_eq!(key_of(&anon), "out-1@10.0.0.1");
}

#[test]
fn strict_router_request_uri_is_repaired() {
    let f = Fixture::new(3);
    let key = key_not_owned_by(&f, "n2");
    let req = format!(
        "BYE sip:{LB};lr;{} SIP/2.0\r\n\
Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKstrict;received=198.51.100.7;rport=5060\r\n\
Route: <sip:earpiece-17@10.0.0.2:5060>\r\n\
Max-Forwards: 70\r\n\
To: <sip:earpiece-17@gw.example.net>;tag=n-tag\r\n\
From: Alice <sip:alice@example.com>;tag=1928301774\r\n\
Call-ID: strict-1\r\n\
CSeq: 2 BYE\r\n\
Content-Length: 0\r\n\r\n",
        params(&f, "n2", &key)
    );
    let Decision::ToNode { node, out } = f.route(&req, client()) else {
        panic!()
    };
    assert_eq!(node, id("n2"));
    let got = text(&out);
    assert!(
        got.starts_with("BYE sip:earpiece-17@10.0.0.2:5060 SIP/2.0\r\n"),
        "{got}"
    );
    assert!(header_lines(&got, "Route").is_empty());
}

#[test]
fn large_requests_go_over_tcp() {
    let f = Fixture::new(1);
    let body = "a=x\n".repeat(400);
    let req = INVITE
        .replace(
            "Content-Length: 4",
            &format!("Content-Length: {}", body.len()),
        )
        .replace("\r\n\r\nv=0\n", &format!("\r\n\r\n{body}"));
    let Decision::ToNode { out, .. } = f.route(&req, client()) else {
        panic!()
    };
    assert_eq!(out.transport, PeerTransport::Tcp);
    assert!(header_lines(&text(&out), "Via")[0].starts_with(&format!("Via: SIP/2.0/TCP {LB};")));
}

#[test]
fn tcp_requests_from_a_node_are_recognised_by_via_and_ip() {
    let f = Fixture::new(2);
    let peer = Peer {
        addr: "10.0.0.1:43210".parse().unwrap(),
        transport: PeerTransport::Tcp,
    };
    let req = NODE_INVITE.replace("SIP/2.0/UDP 10.0.0.1:5060", "SIP/2.0/TCP 10.0.0.1:5060");
    let Decision::Outward { from_node, .. } = f.route(&req, peer) else {
        panic!()
    };
    assert_eq!(from_node, Some(id("n1")));
}

#[test]
fn node_to_node_dialog_survives_the_far_node() {
    let mut f = Fixture::new(3);
    // n2 is the callee side of a device-to-device call through the balancer; its route set
    // holds our Record-Route naming itself. It hangs up toward the caller's node n1, which died.
    let key = key_not_owned_by(&f, "n1");
    let bye = format!(
        "BYE sip:{key}@10.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKn2bye\r\n\
Route: <sip:{LB};lr;{}>\r\n\
Max-Forwards: 70\r\n\
To: <sip:{key}@gw.example.net>;tag=a1\r\n\
From: <sip:callee-dev@gw.example.net>;tag=b1\r\n\
Call-ID: d2d-1\r\n\
CSeq: 5 BYE\r\n\
Content-Length: 0\r\n\r\n",
        params(&f, "n2", "callee-dev")
    );
    let Decision::ToNode { node, .. } = f.route(&bye, from_node(2)) else {
        panic!()
    };
    assert_eq!(node, id("n1"));
    f.take_out(1, 3);
    let Decision::ToNode { node, .. } = f.route(&bye, from_node(2)) else {
        panic!()
    };
    assert_eq!(node, f.owner_of(&key));
}

#[test]
fn a_node_that_took_a_dialog_over_sends_in_it_outward() {
    let mut f = Fixture::new(3);
    // n2 continues a dialog whose Record-Route named n1 (a clustered takeover): its requests
    // toward the external peer go out by the Request-URI, whether n1 is dead or back.
    let bye = format!(
        "BYE sip:sipp@203.0.113.9:5070 SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKtakeover\r\n\
Route: <sip:{LB};lr;{}>\r\n\
Max-Forwards: 70\r\n\
To: <sip:sipp@203.0.113.9>;tag=peer\r\n\
From: <sip:callee@gw.example.net>;tag=gw\r\n\
Call-ID: takeover-1\r\n\
CSeq: 1073741825 BYE\r\n\
Content-Length: 0\r\n\r\n",
        params(&f, "n1", "callee")
    );
    for n1_alive in [true, false] {
        if !n1_alive {
            f.take_out(1, 3);
        }
        let Decision::Outward { from_node, out } = f.route(&bye, from_node(2)) else {
            panic!("not routed outward (n1 alive: {n1_alive})")
        };
        assert_eq!(from_node, Some(id("n2")));
        assert_eq!(out.to, NextHop::Addr("203.0.113.9:5070".parse().unwrap()));
        assert!(header_lines(&text(&out), "Route").is_empty());
    }
}

/// Two balancers side by side (each lists the other as an alias, as behind one DNS name), fed
/// the same heartbeats at slightly different moments, share nothing else.
fn twin(advertised: &str, alias: &str, t0: Instant, lag: Duration, count: u8) -> BalancerCore {
    let mut config = RouterConfig::new(Host::parse(advertised).unwrap(), 5060);
    config.domains.push("gw.example.net".into());
    config.aliases.push((Host::parse(alias).unwrap(), 5060));
    let mut core = BalancerCore::new(config, Membership::new(MembershipConfig::default()));
    for i in 1..=count {
        core.membership_mut()
            .heartbeat(&heartbeat(i, "s1", 1, false), node_addr(i), t0 + lag)
            .unwrap();
    }
    core
}

#[test]
fn balancers_side_by_side_make_the_same_choices() {
    let t0 = Instant::now();
    let mut one = twin("192.0.2.1", "192.0.2.2", t0, Duration::ZERO, 5);
    let mut two = twin("192.0.2.2", "192.0.2.1", t0, Duration::from_millis(40), 5);
    let route = |core: &BalancerCore, text: &str| {
        core.route(
            Message::parse(Bytes::from(text.to_owned())).unwrap(),
            client(),
        )
    };
    // New calls: the same node for every key.
    let mut per_node = std::collections::BTreeMap::<NodeId, u32>::new();
    for i in 0..500 {
        let invite = invite_with(&format!("dev-{i}"), "z9hG4bKtwin");
        let (Decision::ToNode { node: a, .. }, Decision::ToNode { node: b, .. }) =
            (route(&one, &invite), route(&two, &invite))
        else {
            panic!("not routed to a node");
        };
        assert_eq!(a, b, "dev-{i}");
        *per_node.entry(a).or_default() += 1;
    }
    assert_eq!(per_node.len(), 5, "{per_node:?}");

    // A dialog set up through balancer one; its BYE arrives at balancer two, which reads the
    // node from one's Record-Route (its alias) and sends the BYE to the same node.
    let Decision::ToNode { node, out } = route(&one, INVITE) else {
        panic!()
    };
    let invite_out = text(&out);
    let rr = header_lines(&invite_out, "Record-Route")[0]
        .trim_start_matches("Record-Route: ")
        .to_string();
    let bye = in_dialog_bye("x=1").replace(&format!("<sip:{LB};lr;x=1>"), &rr);
    assert!(bye.contains("Route: <sip:192.0.2.1:5060;lr;node="), "{bye}");
    let Decision::ToNode { node: via_two, out } = route(&two, &bye) else {
        panic!("balancer two did not route the BYE to a node")
    };
    assert_eq!(via_two, node);
    assert!(
        !text(&out).contains("Route: <sip:192.0.2.1"),
        "our route not removed"
    );

    // That node dies; each balancer sees it in its own time, and both send the BYE to the
    // same survivor: the owner of the key among the rest.
    let dead: u8 = node.as_str()[1..].parse().unwrap();
    for (core, lag) in [(&mut one, 0u64), (&mut two, 70)] {
        for s in 1..=4u64 {
            let now = t0 + Duration::from_millis(s * 1000 + lag);
            for j in (1..=5).filter(|j| *j != dead) {
                core.membership_mut()
                    .heartbeat(&heartbeat(j, "s1", 1 + s, false), node_addr(j), now)
                    .unwrap();
            }
            core.membership_mut().tick(now);
        }
        assert!(!core.membership().is_alive(&node));
    }
    let (Decision::ToNode { node: a, .. }, Decision::ToNode { node: b, .. }) =
        (route(&one, &bye), route(&two, &bye))
    else {
        panic!()
    };
    assert_eq!(a, b);
    assert_ne!(a, node);
    assert_eq!(Some(&a), owner("earpiece-17", one.membership().eligible()));
}

#[test]
fn common_responses_take_the_fast_path_with_the_full_paths_decision() {
    let f = Fixture::new(1);
    let ours = format!("SIP/2.0/UDP {LB};branch=z9hG4bK-lb-1;rport");
    let next = "SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKa;received=198.51.100.7;rport=5061";
    let sdp = "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";
    let shapes = [
        response_with_vias(&[&ours, next]),
        // Compact and lower-case names, white space around values, the next Via line holding two.
        format!(
            "SIP/2.0 200 OK\r\nv: {ours}\r\nv:  {next} , SIP/2.0/UDP 203.0.113.1;branch=z9hG4bKb\r\n\
             t: <sip:d@gw.example.net>;tag=x\r\nf: <sip:a@example.com>;tag=y\r\ni: c2@h\r\n\
             cseq: 1 INVITE\r\nx-extra:\tkept as it is \r\nl: {}\r\n\r\n{sdp}",
            sdp.len()
        ),
        // Every Via on one line, as SIPp writes them.
        format!(
            "SIP/2.0 180 Ringing\r\nVia: {ours},{next}, SIP/2.0/UDP 203.0.113.1;branch=z9hG4bKb\r\n\
             To: <sip:d@gw.example.net>;tag=x\r\nFrom: <sip:a@example.com>;tag=y\r\n\
             Call-ID: c4\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
        ),
        // No reason phrase; an odd header kept.
        format!(
            "SIP/2.0 486\r\nVia: {ours}\r\nVia: {next}\r\nCall-ID: c3\r\nCSeq: 2 BYE\r\n\
             From: <sip:a@example.com>;tag=y\r\nTo: <sip:d@gw.example.net>;tag=x\r\n\
             Content-Length: 0\r\n\r\n"
        ),
    ];
    for resp in &shapes {
        let fast = f
            .core
            .route_response_datagram(resp.as_bytes(), from_node(1))
            .unwrap_or_else(|| panic!("not taken:\n{resp}"));
        assert!(fast.dialog.is_some(), "{resp}");
        let full = f.route(resp, from_node(1));
        assert!(matches!(full, Decision::Response { .. }), "{full:?}");
        assert_same_decision(&fast.decision, &full, resp);
        let Decision::Response { out, .. } = fast.decision else {
            unreachable!()
        };
        assert_eq!(out.to, NextHop::Addr("198.51.100.7:5061".parse().unwrap()));
        // Ours is cut out (its line, or its value and comma); every other byte is the node's.
        let ours_at = resp.find(&ours).unwrap();
        let after = &resp[ours_at + ours.len()..];
        let expected = match after.strip_prefix(',') {
            Some(rest) => format!("{}{}", &resp[..ours_at], rest.trim_start()),
            None => {
                let line_start = resp[..ours_at].rfind("\r\n").unwrap() + 2;
                format!("{}{}", &resp[..line_start], &after[2..])
            }
        };
        assert_eq!(text(&out), expected);
    }
}

#[test]
fn unusual_responses_go_the_full_way() {
    let f = Fixture::new(1);
    let ours = format!("SIP/2.0/UDP {LB};branch=z9hG4bK-lb-1");
    let next = "SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKa";
    let plain = response_with_vias(&[&ours, next]);
    assert!(f
        .core
        .route_response_datagram(plain.as_bytes(), from_node(1))
        .is_some());
    let many_lines = plain.replacen(
        "Call-ID",
        &format!("{}Call-ID", "X-Pad: 1\r\n".repeat(MAX_FAST_LINES)),
        1,
    );
    let cases = [
        ("a request", INVITE.to_owned()),
        (
            "our Via not first on its line",
            response_with_vias(&[&format!("{next}, {ours}")]),
        ),
        (
            "our Via alone on a line ending in a comma",
            response_with_vias(&[&format!("{ours},")]),
        ),
        (
            "a folded line",
            plain.replacen("CSeq: 1 INVITE", "CSeq: 1\r\n INVITE", 1),
        ),
        (
            "a bare LF",
            plain.replacen("CSeq: 1 INVITE\r\n", "CSeq: 1 INVITE\n", 1),
        ),
        (
            "a bare CR",
            plain.replacen("CSeq: 1 INVITE", "CSeq: 1\rINVITE", 1),
        ),
        (
            "white space before the colon",
            plain.replacen("CSeq:", "CSeq :", 1),
        ),
        (
            "no Content-Length",
            plain.replacen("Content-Length: 0\r\n", "", 1),
        ),
        (
            "Content-Length not the body's",
            plain.replacen("Content-Length: 0", "Content-Length: 4", 1) + "abcdefgh",
        ),
        (
            "two Content-Lengths",
            plain.replacen("Content-Length: 0", "Content-Length: 0\r\nl: 0", 1),
        ),
        (
            "two Call-IDs",
            plain.replacen("Call-ID: c1", "Call-ID: c1\r\ni: c2", 1),
        ),
        (
            "not our Via on top",
            response_with_vias(&["SIP/2.0/UDP 192.0.2.99:5060;branch=z9hG4bKa", next]),
        ),
        ("no next Via", response_with_vias(&[&ours])),
        (
            "a quoted next Via",
            response_with_vias(&[&ours, "SIP/2.0/UDP 198.51.100.7;branch=z9hG4bKa;x=\"a,b\""]),
        ),
        (
            "an unusable next Via",
            response_with_vias(&[&ours, "SIP/2.0/SCTP 203.0.113.9;branch=z9hG4bKa"]),
        ),
        ("too many lines", many_lines),
        ("SIP/3.0", plain.replacen("SIP/2.0 180", "SIP/3.0 180", 1)),
        (
            "a status out of range",
            plain.replacen("SIP/2.0 180", "SIP/2.0 700", 1),
        ),
    ];
    for (what, resp) in cases {
        assert!(
            f.core
                .route_response_datagram(resp.as_bytes(), from_node(1))
                .is_none(),
            "{what}"
        );
    }
    let mut not_utf8 = plain.clone().into_bytes();
    let at = plain.find("c1").unwrap();
    not_utf8[at] = 0xff;
    assert!(f
        .core
        .route_response_datagram(&not_utf8, from_node(1))
        .is_none());
    // Over TCP the fast path is not taken either.
    let tcp = Peer {
        addr: node_addr(1),
        transport: PeerTransport::Tcp,
    };
    assert!(f
        .core
        .route_response_datagram(plain.as_bytes(), tcp)
        .is_none());
}

#[test]
fn common_requests_take_the_fast_path_with_the_full_paths_decision() {
    let f = Fixture::new(3);
    let key = key_not_owned_by(&f, "n3");
    let bye = in_dialog_bye(&params(&f, "n3", &key));
    // A Via that asks for rport and names another host: stamped as the transport would.
    let stamped = INVITE.replacen(
        "Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bK776asdhds;received=198.51.100.7;rport=5060",
        "v: SIP/2.0/UDP alice-pc.example.com:5062;rport;branch=z9hG4bK776asdhds",
        1,
    );
    let no_max_forwards = bye.replacen("Max-Forwards: 70\r\n", "", 1);
    for (what, request, node) in [
        ("initial INVITE", INVITE.to_owned(), None),
        ("in-dialog BYE", bye.clone(), Some(id("n3"))),
        ("Via to stamp, compact name", stamped, None),
        ("no Max-Forwards", no_max_forwards, Some(id("n3"))),
    ] {
        let fast = f
            .core
            .route_request_datagram(request.as_bytes(), client())
            .unwrap_or_else(|| panic!("{what}: not taken"));
        assert!(fast.dialog.is_some(), "{what}");
        let Decision::ToNode { node: got, ref out } = fast.decision else {
            panic!("{what}: {:?}", fast.decision)
        };
        if let Some(node) = node {
            assert_eq!(got, node, "{what}");
        }
        // f.route checks it against the full path; these check the bytes themselves.
        f.route(&request, client());
        let sent = text(out);
        assert_eq!(header_lines(&sent, "Via").len(), 2, "{what}\n{sent}");
        assert!(
            header_lines(&sent, "Via")[0].contains("z9hG4bK-lb-"),
            "{what}"
        );
        assert!(header_lines(&sent, "Route").is_empty(), "{what}");
        assert!(
            sent.ends_with("\r\n\r\n") || sent.ends_with("v=0\n"),
            "{what}"
        );
    }
    // The BYE, byte for byte.
    let fast = f
        .core
        .route_request_datagram(bye.as_bytes(), client())
        .unwrap();
    let Decision::ToNode { out, .. } = fast.decision else {
        panic!()
    };
    let got = text(&out);
    assert_eq!(got, forwarded_bye(&bye, &params(&f, "n3", &key), &got));
}

#[test]
fn requests_the_balancer_answers_or_drops_are_answered_as_the_full_path_does() {
    // No node: answered 503; Max-Forwards 0: answered 483; a Max-Forwards 0 ACK: dropped.
    let zero = INVITE.replacen("Max-Forwards: 70", "Max-Forwards: 0", 1);
    let zero_ack =
        zero.replacen("INVITE sip:", "ACK sip:", 1)
            .replacen("314159 INVITE", "314159 ACK", 1);
    for (nodes, request, expected) in [
        (0, INVITE.to_owned(), Some(503)),
        (1, zero, Some(483)),
        (1, zero_ack, None),
    ] {
        let f = Fixture::new(nodes);
        let fast = f
            .core
            .route_request_datagram(request.as_bytes(), client())
            .unwrap_or_else(|| panic!("not taken:\n{request}"));
        match (&fast.decision, expected) {
            (Decision::Answer { status, .. }, Some(want)) => assert_eq!(*status, want),
            (Decision::Drop(DropReason::AckNotRoutable), None) => {}
            (other, _) => panic!("{other:?} for\n{request}"),
        }
        // f.route checks it against the full path.
        f.route(&request, client());
    }
    let f = Fixture::new(1);
    let folded = INVITE.replacen("CSeq: 314159 INVITE", "CSeq: 314159\r\n INVITE", 1);
    assert!(f
        .core
        .route_request_datagram(folded.as_bytes(), client())
        .is_none());
    let sip3 = INVITE.replacen("SIP/2.0\r\n", "SIP/3.0\r\n", 1);
    assert!(f
        .core
        .route_request_datagram(sip3.as_bytes(), client())
        .is_none());
}

mod fast_against_full {
    //! Random edits of real messages: the fast paths never panic, and whatever they take, the
    //! parser takes too and the full path routes the same way.
    use super::*;
    use proptest::prelude::*;

    fn seeds(f: &Fixture) -> Vec<String> {
        let ours = format!("SIP/2.0/UDP {LB};branch=z9hG4bK-lb-1;rport");
        let next = "SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKa;received=198.51.100.7";
        let key = key_not_owned_by(f, "n2");
        vec![
            INVITE.to_owned(),
            in_dialog_bye(&params(f, "n2", &key)),
            response_with_vias(&[&ours, next]),
            response_with_vias(&[&format!("{ours}, {next}")]),
        ]
    }

    /// One edit: insert, replace or delete a byte somewhere, the byte often one that matters
    /// to SIP's syntax.
    fn edit() -> impl Strategy<Value = (u8, usize, u8)> {
        let byte = prop_oneof![
            Just(b'\r'),
            Just(b'\n'),
            Just(b','),
            Just(b'"'),
            Just(b':'),
            Just(b' '),
            Just(b';'),
            Just(b'<'),
            Just(b'0'),
            Just(0xff),
            any::<u8>(),
        ];
        (0u8..3, any::<usize>(), byte)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn edited_messages(seed in 0usize..4, edits in proptest::collection::vec(edit(), 1..4)) {
            let f = Fixture::new(3);
            let mut data = seeds(&f)[seed].clone().into_bytes();
            for (kind, at, byte) in edits {
                let at = at % (data.len() + 1);
                match kind {
                    0 => data.insert(at, byte),
                    1 if at < data.len() => data[at] = byte,
                    _ if at < data.len() => {
                        data.remove(at);
                    }
                    _ => {}
                }
            }
            let from = if data.starts_with(b"SIP/") { from_node(2) } else { client() };
            let fast = if data.starts_with(b"SIP/2.0 ") {
                f.core.route_response_datagram(&data, from).map(|r| r.decision)
            } else {
                f.core.route_request_datagram(&data, from).map(|r| r.decision)
            };
            if let Some(fast) = fast {
                let text = String::from_utf8_lossy(&data).into_owned();
                let message = Message::parse(Bytes::from(data.clone()));
                prop_assert!(message.is_ok(), "the fast path took what the parser refuses:\n{text:?}");
                let mut message = message.unwrap_or_else(|_| unreachable!());
                if let Message::Request(req) = &mut message {
                    let _ = thalamus_sip::transaction::stamp_received(req, from.addr);
                }
                let full = f.core.route(message, from);
                assert_same_decision(&fast, &full, &text);
            }
        }
    }
}
