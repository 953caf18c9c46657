//! Criterion benchmarks of the transaction layer, without sockets and on a fake clock:
//!
//! * `non_invite_client/udp`: OPTIONS sent (serialized), 200 received and matched, timer K fired,
//!   transaction destroyed: one full lifecycle.
//! * `non_invite_client/tcp`: the same on a reliable transport (K is zero).
//! * `invite_server/udp`: INVITE received (new server transaction), 200 from the TU (Accepted,
//!   serialized), the 2xx ACK passed to the TU, timer L fired: one full lifecycle.
//! * `invite_server/udp_10k_live`: the same while 10,000 other INVITE server transactions are
//!   live, to show that matching and the timer heap do not degrade with load.
//!
//! Messages are parsed once up front and cloned per iteration (a clone shares the header bytes),
//! so the numbers are the layer's own cost plus serializing what it sends.

// Benchmark setup panics on a broken fixture, which is the right outcome.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use thalamus_sip::message::{HeaderName, Message, Request, Response};
use thalamus_sip::transaction::{Peer, RequestOutcome, TransactionLayer};

const OPTIONS: &str = "OPTIONS sip:bob@biloxi.example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP gw.example.com:5060;branch=z9hG4bKbenchopt1;rport\r\n\
Max-Forwards: 70\r\n\
To: <sip:bob@biloxi.example.com>\r\n\
From: <sip:gw@example.com>;tag=88sja8x\r\n\
Call-ID: 843817637684230@gw.example.com\r\n\
CSeq: 63104 OPTIONS\r\n\
Contact: <sip:gw@192.0.2.10:5060>\r\n\
Accept: application/sdp\r\n\
Content-Length: 0\r\n\
\r\n";

const INVITE: &str = "INVITE sip:dev-42@gw.example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP pc33.atlanta.example.com:5060;branch=z9hG4bK776asdhds;rport=5060;received=192.0.2.101\r\n\
Max-Forwards: 70\r\n\
To: <sip:dev-42@gw.example.com>\r\n\
From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n\
CSeq: 314159 INVITE\r\n\
Contact: <sip:alice@192.0.2.101:5060>\r\n\
Allow: INVITE, ACK, CANCEL, BYE, OPTIONS\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 0\r\n\
\r\n";

const ACK: &str = "ACK sip:dev-42@192.0.2.10:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP pc33.atlanta.example.com:5060;branch=z9hG4bKack776asd;rport=5060;received=192.0.2.101\r\n\
Max-Forwards: 70\r\n\
To: <sip:dev-42@gw.example.com>;tag=gw77\r\n\
From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n\
CSeq: 314159 ACK\r\n\
Content-Length: 0\r\n\
\r\n";

fn request(text: &'static str) -> Request {
    match Message::parse(text.as_bytes()).expect("fixture parses") {
        Message::Request(r) => r,
        Message::Response(_) => panic!("fixture is a request"),
    }
}

fn drain(layer: &mut TransactionLayer) -> usize {
    let mut n = 0;
    while let Some(t) = layer.poll_transmit() {
        n += t.payload.len();
    }
    while let Some(e) = layer.poll_event() {
        black_box(&e);
        n += 1;
    }
    n
}

fn non_invite_client(c: &mut Criterion) {
    let options = request(OPTIONS);
    let mut ok = Response::from_request(&options, 200, None);
    ok.set_to_tag("93810874");
    let server: SocketAddr = "192.0.2.20:5060".parse().unwrap();
    let t0 = Instant::now();
    let mut group = c.benchmark_group("non_invite_client");
    group.throughput(Throughput::Elements(1));
    for (name, peer) in [("udp", Peer::udp(server)), ("tcp", Peer::tcp(server))] {
        let mut layer = TransactionLayer::default();
        group.bench_function(name, |b| {
            b.iter(|| {
                let key = layer.send_request(t0, options.clone(), peer).expect("sent");
                assert!(layer.handle_response(t0 + Duration::from_millis(20), ok.clone()));
                // Timer K (5 s on UDP) destroys it; on TCP it is already gone.
                layer.handle_timeout(t0 + Duration::from_secs(6));
                debug_assert!(layer.state(key).is_none());
                black_box(drain(&mut layer))
            })
        });
    }
    group.finish();
}

fn invite_server(c: &mut Criterion) {
    let invite = request(INVITE);
    let ack = request(ACK);
    let mut ok = Response::from_request(&invite, 200, None);
    ok.set_to_tag("gw77");
    ok.headers
        .push(HeaderName::Contact, "<sip:dev-42@192.0.2.10:5060>");
    let client = Peer::udp("192.0.2.101:5060".parse().unwrap());
    let t0 = Instant::now();
    let mut group = c.benchmark_group("invite_server");
    group.throughput(Throughput::Elements(1));
    for (name, background) in [("udp", 0usize), ("udp_10k_live", 10_000)] {
        let mut layer = TransactionLayer::default();
        for i in 0..background {
            let mut other = invite.clone();
            other.headers.set(
                HeaderName::Via,
                format!("SIP/2.0/UDP 192.0.2.101:5060;branch=z9hG4bKbg{i}"),
            );
            layer
                .handle_request(t0, other, client)
                .expect("background INVITE");
        }
        // Let the background transactions send their 100 Trying and fall quiet.
        layer.handle_timeout(t0 + Duration::from_secs(1));
        drain(&mut layer);
        let start = t0 + Duration::from_secs(2);
        group.bench_function(name, |b| {
            b.iter(|| {
                let RequestOutcome::Created(key) = layer
                    .handle_request(start, invite.clone(), client)
                    .expect("INVITE taken")
                else {
                    panic!("expected a new transaction");
                };
                layer
                    .respond(start + Duration::from_millis(5), key, ok.clone())
                    .expect("200 sent");
                let passed = layer
                    .handle_request(start + Duration::from_millis(40), ack.clone(), client)
                    .expect("ACK taken");
                debug_assert_eq!(passed, RequestOutcome::AckPassed(None));
                // Timer L (32 s) destroys it.
                layer.handle_timeout(start + Duration::from_secs(33));
                debug_assert!(layer.state(key).is_none());
                black_box(drain(&mut layer))
            })
        });
        assert_eq!(layer.len(), background);
    }
    group.finish();
}

criterion_group!(transaction_benches, non_invite_client, invite_server);
criterion_main!(transaction_benches);
