//! Criterion benchmarks of whole calls through the sans-IO [`Endpoint`], without sockets and on a
//! fake clock.
//!
//! * `endpoint/uas_call/udp`: the peer (written the way SIPp's built-in `uac` scenario writes
//!   its messages) sends INVITE with an SDP offer; the endpoint reports it, the TU answers 200
//!   with an SDP answer through [`Endpoint::respond`]; the peer copies the To header (with our
//!   tag) from the 200 into its ACK and BYE; the endpoint matches both to the dialog, the TU
//!   answers the BYE 200 and removes the dialog. Every received message goes through
//!   [`Message::parse`] and [`Endpoint::handle_message`], every transmit and event is drained.
//! * `endpoint/uas_call/tcp`: the same over a reliable transport (no wait timers).
//! * `endpoint/uas_call/udp_10k_confirmed`: the UDP call while the endpoint holds 10,000 other
//!   confirmed dialogs, to show that matching does not degrade with load.
//! * `endpoint/uac_call/udp`: the TU builds an INVITE with an SDP offer and sends it; the peer
//!   (SIPp's `uas` scenario) answers 180 and 200 built from the INVITE's Via, From, To, Call-ID
//!   and CSeq; the TU sends the ACK ([`Endpoint::send_ack`]) and a BYE
//!   ([`Endpoint::dialog_request`]); the peer answers the BYE 200; the TU removes the dialog.
//! * `endpoint/peer_only/*`: what the simulated peer alone costs per call (building its
//!   messages and finding the header lines it copies), to subtract from the figures above.
//! * `endpoint/floor/uas_call_parse3_serialize2`: parsing the three messages the endpoint
//!   receives in a UAS call and serializing the two it sends, and nothing else: a floor.
//!
//! Call-IDs, branches and the peer's tags come from a counter, so every call is new to the
//! endpoint. The clock moves 10 ms per call (100 calls per fake second) and
//! [`Endpoint::handle_timeout`] runs whenever a timer is due, so the figures include timer
//! processing and the transaction and timer tables stay at their steady-state size (timers J, L
//! and M keep about 32 s of transactions: 3,200 calls' worth on UDP).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{header_line, SippPeer, OUR_SDP};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use thalamus_sip::dialog::DialogId;
use thalamus_sip::endpoint::{Endpoint, EndpointConfig, EndpointEvent, Peer};
use thalamus_sip::message::{
    CSeq, HeaderName, Host, MediaType, Message, Method, NameAddr, Request, Transport, Uri,
};
use thalamus_sip::transaction::TransactionKey;

/// The clock step between two calls.
const CALL_SPACING: Duration = Duration::from_millis(10);

/// An endpoint on 127.0.0.1:5080 with its fake clock.
struct Bench {
    endpoint: Endpoint,
    now: Instant,
    peer: Peer,
    transport: Transport,
}

impl Bench {
    fn new(transport: Transport) -> Self {
        let mut endpoint = Endpoint::new(EndpointConfig::default());
        let host = Host::Ipv4([127, 0, 0, 1].into());
        endpoint.set_sent_by(Transport::Udp, host.clone(), 5080);
        endpoint.set_sent_by(Transport::Tcp, host, 5080);
        let addr = SocketAddr::from(([127, 0, 0, 1], 5061));
        let peer = match transport {
            Transport::Tcp => Peer::tcp(addr),
            _ => Peer::udp(addr),
        };
        Self {
            endpoint,
            now: Instant::now(),
            peer,
            transport,
        }
    }

    /// Moves the clock to the next call and runs the timers that are due.
    fn tick(&mut self) {
        self.now += CALL_SPACING;
        if self.endpoint.poll_timeout().is_some_and(|t| t <= self.now) {
            self.endpoint.handle_timeout(self.now);
        }
    }

    fn receive(&mut self, bytes: Bytes) {
        let message = Message::parse(bytes).expect("peer message parses");
        self.endpoint.handle_message(self.now, message, self.peer);
    }

    /// The last transmit (the endpoint sends one message per step here).
    fn transmit(&mut self) -> Bytes {
        let mut last = None;
        while let Some(t) = self.endpoint.poll_transmit() {
            last = Some(t.payload);
        }
        last.expect("endpoint sent a message")
    }

    fn drain_transmits(&mut self) {
        while self.endpoint.poll_transmit().is_some() {}
    }

    /// The first event that `pick` accepts (the others, Terminated for example, are dropped).
    fn event<T>(&mut self, mut pick: impl FnMut(EndpointEvent) -> Option<T>) -> T {
        let mut found = None;
        while let Some(event) = self.endpoint.poll_event() {
            if found.is_none() {
                found = pick(event);
            }
        }
        found.expect("expected event")
    }

    fn new_request(&mut self) -> TransactionKey {
        self.event(|e| match e {
            EndpointEvent::Request { key, .. } => Some(key),
            _ => None,
        })
    }

    /// One UAS call; with `bye` false the dialog stays confirmed.
    fn uas_call(&mut self, sipp: &mut SippPeer, call: u64, bye: bool) -> DialogId {
        self.tick();
        let invite = sipp.invite(call);
        self.receive(invite);
        let key = self.new_request();
        let answer = (Bytes::from_static(OUR_SDP.as_bytes()), MediaType::sdp());
        let dialog = self
            .endpoint
            .respond(self.now, key, 200, None, Some(answer))
            .expect("respond")
            .expect("dialog");
        let ok = self.transmit();
        let to = header_line(&ok, "To");
        let ack = sipp.in_dialog(call, "ACK", 1, to);
        self.receive(ack);
        self.event(|e| matches!(e, EndpointEvent::Ack { .. }).then_some(()));
        if bye {
            let bye = sipp.in_dialog(call, "BYE", 2, to);
            self.receive(bye);
            let key = self.event(|e| match e {
                EndpointEvent::DialogRequest { key, .. } => Some(key),
                _ => None,
            });
            self.endpoint
                .respond(self.now, key, 200, None, None)
                .expect("respond to BYE");
            self.drain_transmits();
            self.endpoint.remove_dialog(&dialog);
        }
        dialog
    }

    /// One UAC call: INVITE out, 180 and 200 in, ACK out, BYE out, 200 in.
    fn uac_call(&mut self, sipp: &mut SippPeer, templates: &UacTemplates, call: u64) {
        self.tick();
        let mut invite = Request::new(Method::Invite, templates.target.clone());
        invite
            .headers
            .push(HeaderName::From, format!("{};tag=gw{call}", templates.from));
        invite.headers.push(HeaderName::To, templates.to.as_str());
        invite.headers.set_call_id(&format!("gw{call}@127.0.0.1"));
        invite.headers.set_cseq(&CSeq::new(1, Method::Invite));
        invite
            .headers
            .push(HeaderName::Contact, templates.contact.as_str());
        invite.set_body(Bytes::from_static(OUR_SDP.as_bytes()), Some(&templates.sdp));
        let key = self
            .endpoint
            .send_request(self.now, invite, self.peer)
            .expect("send INVITE");
        let sent = self.transmit();
        let ringing = sipp.response(&sent, "180 Ringing", call, false);
        let ok = sipp.response(&sent, "200 OK", call, true);
        self.receive(ringing);
        self.receive(ok);
        let dialog = self.event(|e| match e {
            EndpointEvent::Response {
                key: k,
                response,
                dialog: Some(d),
            } if k == key && response.status == 200 => Some(d),
            _ => None,
        });
        self.endpoint
            .send_ack(&dialog, self.peer, None)
            .expect("ACK");
        self.drain_transmits();
        let bye = self
            .endpoint
            .dialog_request(&dialog, Method::Bye)
            .expect("BYE");
        let bye_key = self
            .endpoint
            .send_request(self.now, bye, self.peer)
            .expect("send BYE");
        let sent = self.transmit();
        let ok = sipp.response(&sent, "200 OK", call, false);
        self.receive(ok);
        self.event(|e| match e {
            EndpointEvent::Response { key, response, .. }
                if key == bye_key && response.status == 200 =>
            {
                Some(())
            }
            _ => None,
        });
        self.endpoint.remove_dialog(&dialog);
    }
}

/// The parts of the TU's INVITE that do not change between calls.
struct UacTemplates {
    target: Uri,
    from: String,
    to: String,
    contact: String,
    sdp: MediaType,
}

impl UacTemplates {
    fn new() -> Self {
        Self {
            target: Uri::parse("sip:service@127.0.0.1:5070").unwrap(),
            from: NameAddr::parse("\"Device 42\" <sip:dev42@gw.example.com>")
                .unwrap()
                .to_string(),
            to: "<sip:service@127.0.0.1:5070>".to_string(),
            contact: "<sip:dev42@127.0.0.1:5080>".to_string(),
            sdp: MediaType::sdp(),
        }
    }
}

/// Checks one call of each kind before timing (a broken flow panics here, not in the loop).
fn check_flows() {
    let mut bench = Bench::new(Transport::Udp);
    let mut sipp = SippPeer::new("UDP");
    bench.uas_call(&mut sipp, 1, true);
    assert_eq!(bench.endpoint.dialogs().len(), 0, "UAS dialog removed");
    let id = bench.uas_call(&mut sipp, 2, false);
    let dialog = bench.endpoint.dialog(&id).expect("confirmed dialog");
    assert_eq!(dialog.state(), thalamus_sip::dialog::DialogState::Confirmed);
    let templates = UacTemplates::new();
    bench.uac_call(&mut sipp, &templates, 3);
    assert_eq!(bench.endpoint.dialogs().len(), 1, "UAC dialog removed");
    let stats = bench.endpoint.stats();
    assert_eq!(stats.invalid_requests + stats.invalid_responses, 0);
    assert_eq!(stats.refused_requests + stats.unknown_dialog, 0);
}

fn uas_benches(c: &mut Criterion) {
    check_flows();
    let mut group = c.benchmark_group("endpoint/uas_call");
    group.throughput(Throughput::Elements(1));
    for (name, transport, sip_transport) in [
        ("udp", Transport::Udp, "UDP"),
        ("tcp", Transport::Tcp, "TCP"),
    ] {
        let mut bench = Bench::new(transport);
        let mut sipp = SippPeer::new(sip_transport);
        let mut call = 0u64;
        group.bench_function(name, |b| {
            b.iter(|| {
                call += 1;
                black_box(bench.uas_call(&mut sipp, call, true))
            })
        });
        assert_eq!(bench.transport, bench.peer.transport.as_transport());
    }
    let mut bench = Bench::new(Transport::Udp);
    let mut sipp = SippPeer::new("UDP");
    let mut call = 0u64;
    for _ in 0..10_000 {
        call += 1;
        bench.uas_call(&mut sipp, call, false);
    }
    // Let the transactions of the setup calls end, so only their dialogs remain.
    bench.now += Duration::from_secs(40);
    bench.endpoint.handle_timeout(bench.now);
    while bench.endpoint.poll_event().is_some() {}
    assert_eq!(bench.endpoint.dialogs().len(), 10_000);
    group.bench_function("udp_10k_confirmed", |b| {
        b.iter(|| {
            call += 1;
            black_box(bench.uas_call(&mut sipp, call, true))
        })
    });
    group.finish();
}

fn uac_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("endpoint/uac_call");
    group.throughput(Throughput::Elements(1));
    let mut bench = Bench::new(Transport::Udp);
    let mut sipp = SippPeer::new("UDP");
    let templates = UacTemplates::new();
    let mut call = 0u64;
    group.bench_function("udp", |b| {
        b.iter(|| {
            call += 1;
            bench.uac_call(&mut sipp, &templates, call);
        })
    });
    group.finish();
}

/// The peer's own work per call, and the message floor of a UAS call: parsing the three
/// messages the endpoint receives and serializing the two it sends, nothing else.
fn baseline_benches(c: &mut Criterion) {
    // The messages of one real UAS call, captured once.
    let mut bench = Bench::new(Transport::Udp);
    let mut sipp = SippPeer::new("UDP");
    let invite = sipp.invite(1);
    bench.receive(invite.clone());
    let key = bench.new_request();
    let answer = (Bytes::from_static(OUR_SDP.as_bytes()), MediaType::sdp());
    let dialog = bench
        .endpoint
        .respond(bench.now, key, 200, None, Some(answer))
        .unwrap()
        .unwrap();
    let ok = bench.transmit();
    let to = header_line(&ok, "To").to_vec();
    let ack = sipp.in_dialog(1, "ACK", 1, &to);
    bench.receive(ack.clone());
    let bye = sipp.in_dialog(1, "BYE", 2, &to);
    bench.receive(bye.clone());
    let key = bench.event(|e| match e {
        EndpointEvent::DialogRequest { key, .. } => Some(key),
        _ => None,
    });
    bench
        .endpoint
        .respond(bench.now, key, 200, None, None)
        .unwrap();
    let bye_ok = bench.transmit();
    bench.endpoint.remove_dialog(&dialog);
    let sent: Vec<Message> = [&ok, &bye_ok]
        .into_iter()
        .map(|m| Message::parse(m.clone()).unwrap())
        .collect();

    // The peer's side of a UAC call: answers to a real INVITE and BYE of the endpoint.
    let templates = UacTemplates::new();
    let mut invite_out = Request::new(Method::Invite, templates.target.clone());
    invite_out
        .headers
        .push(HeaderName::From, format!("{};tag=gw1", templates.from));
    invite_out
        .headers
        .push(HeaderName::To, templates.to.as_str());
    invite_out.headers.set_call_id("gw1@127.0.0.1");
    invite_out.headers.set_cseq(&CSeq::new(1, Method::Invite));
    invite_out
        .headers
        .push(HeaderName::Contact, templates.contact.as_str());
    bench.tick();
    bench
        .endpoint
        .send_request(bench.now, invite_out, bench.peer)
        .unwrap();
    let sent_invite = bench.transmit();

    let mut group = c.benchmark_group("endpoint/peer_only");
    group.throughput(Throughput::Elements(1));
    let mut call = 0u64;
    group.bench_function("uas_call", |b| {
        b.iter(|| {
            call += 1;
            let i = sipp.invite(call);
            let to = header_line(black_box(&ok), "To");
            let a = sipp.in_dialog(call, "ACK", 1, to);
            let b2 = sipp.in_dialog(call, "BYE", 2, to);
            black_box((i, a, b2))
        })
    });
    group.bench_function("uac_call", |b| {
        b.iter(|| {
            call += 1;
            let r = sipp.response(black_box(&sent_invite), "180 Ringing", call, false);
            let o = sipp.response(black_box(&sent_invite), "200 OK", call, true);
            let bo = sipp.response(black_box(&bye), "200 OK", call, false);
            black_box((r, o, bo))
        })
    });
    group.finish();

    let mut group = c.benchmark_group("endpoint/floor");
    group.throughput(Throughput::Elements(1));
    let mut out = bytes::BytesMut::with_capacity(4096);
    group.bench_function("uas_call_parse3_serialize2", |b| {
        b.iter(|| {
            for m in [&invite, &ack, &bye] {
                black_box(Message::parse(black_box(m.clone())).unwrap());
            }
            for m in &sent {
                out.clear();
                black_box(m).write_to(&mut out);
                black_box(out.len());
            }
        })
    });
    group.finish();
}

criterion_group!(endpoint_benches, uas_benches, uac_benches, baseline_benches);
criterion_main!(endpoint_benches);
