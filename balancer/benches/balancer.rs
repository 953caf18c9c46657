//! Benchmarks of the balancer's sans-IO routing core: one INVITE from outside routed to a node,
//! and one 200 response from a node routed back, each the full way (parse, rewrite, serialize)
//! and by the fast path (the datagram's bytes edited), with 4 live nodes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use thalamus_balancer::{BalancerCore, Decision, Membership, RouterConfig};
use thalamus_ownership::heartbeat::{Heartbeat, Load, HEARTBEAT_VERSION};
use thalamus_ownership::NodeId;
use thalamus_sip::message::{Host, Message};
use thalamus_sip::transport::{Peer, PeerTransport};

fn core() -> BalancerCore {
    let mut m = Membership::new(Default::default());
    let now = Instant::now();
    for i in 0..4u16 {
        let hb = Heartbeat {
            v: HEARTBEAT_VERSION,
            node: NodeId::new(&format!("node-{i}")).unwrap(),
            session: format!("s{i}"),
            seq: 1,
            sip: SocketAddr::from(([10, 0, 0, 10 + i as u8], 5060)),
            quic: None,
            draining: false,
            load: Load::default(),
            ts_ms: 0,
            pinned: Vec::new(),
            store_down_ms: 0,
        };
        m.heartbeat(&hb, hb.sip, now).unwrap();
    }
    let mut cfg = RouterConfig::new(Host::parse("192.0.2.1").unwrap(), 5060);
    cfg.domains.push("gw.example.net".into());
    BalancerCore::new(cfg, m)
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
Content-Length: 138\r\n\
\r\n\
v=0\r\n\
o=alice 2890844526 2890844526 IN IP4 198.51.100.7\r\n\
s=-\r\n\
c=IN IP4 198.51.100.7\r\n\
t=0 0\r\n\
m=audio 49170 RTP/AVP 0\r\n\
a=rtpmap:0 PCMU/8000\r\n";

fn bench(c: &mut Criterion) {
    let core = core();
    let client = Peer {
        addr: "198.51.100.7:5060".parse().unwrap(),
        transport: PeerTransport::Udp,
    };
    let invite = Bytes::from_static(INVITE.as_bytes());
    // Build the node's 200 from what the balancer forwarded.
    let Decision::ToNode { node, out } =
        core.route(Message::parse(invite.clone()).unwrap(), client)
    else {
        panic!("INVITE not routed to a node");
    };
    let node_addr = core.membership().node(&node).unwrap().sip;
    let Message::Request(fwd) = Message::parse(out.bytes).unwrap() else {
        panic!("not a request");
    };
    let mut ok = thalamus_sip::message::Response::from_request(&fwd, 200, None);
    ok.set_to_tag("node-tag-1");
    for rr in fwd
        .headers
        .get_all(&thalamus_sip::message::HeaderName::RecordRoute)
    {
        ok.headers
            .push(thalamus_sip::message::HeaderName::RecordRoute, rr.clone());
    }
    ok.headers.push(
        thalamus_sip::message::HeaderName::Contact,
        "<sip:earpiece-17@10.0.0.10:5060>",
    );
    let ok_bytes = ok.to_bytes();
    let node_peer = Peer {
        addr: node_addr,
        transport: PeerTransport::Udp,
    };

    c.bench_function("balancer/parse INVITE only (reference)", |b| {
        b.iter(|| Message::parse(black_box(invite.clone())).unwrap())
    });
    c.bench_function("balancer/route INVITE (parse, rewrite, serialize)", |b| {
        b.iter(|| {
            let m = Message::parse(black_box(invite.clone())).unwrap();
            black_box(core.route(m, client))
        })
    });
    c.bench_function(
        "balancer/route 200 response (parse, rewrite, serialize)",
        |b| {
            b.iter(|| {
                let m = Message::parse(black_box(ok_bytes.clone())).unwrap();
                black_box(core.route(m, node_peer))
            })
        },
    );
    assert!(core.route_request_datagram(&invite, client).is_some());
    assert!(core.route_response_datagram(&ok_bytes, node_peer).is_some());
    c.bench_function("balancer/route INVITE, fast path (its bytes edited)", |b| {
        b.iter(|| black_box(core.route_request_datagram(black_box(&invite), client)))
    });
    c.bench_function(
        "balancer/route 200 response, fast path (our Via cut out)",
        |b| b.iter(|| black_box(core.route_response_datagram(black_box(&ok_bytes), node_peer))),
    );
    c.bench_function("balancer/owner of a key among 16 nodes", |b| {
        let nodes: Vec<NodeId> = (0..16)
            .map(|i| NodeId::new(&format!("node-{i}")).unwrap())
            .collect();
        b.iter(|| thalamus_ownership::owner(black_box("earpiece-17"), &nodes))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
