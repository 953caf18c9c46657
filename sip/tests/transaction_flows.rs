//! Two transaction layers talking over a simulated network (serialized bytes, parsed on
//! arrival, with chosen losses), driven by a fake clock: the flows of RFC 3261 sections 17 and
//! 9 end to end, as a UAC and a UAS endpoint would see them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use thalamus_sip::message::{
    generate_branch, CSeq, HeaderName, Message, Method, Request, Response, Uri,
};
use thalamus_sip::transaction::{
    stamp_received, CancelOutcome, Peer, RequestOutcome, Timer, TransactionEvent, TransactionKey,
    TransactionLayer, TransactionState,
};

const UAC: &str = "192.0.2.1:5060";
const UAS: &str = "192.0.2.2:5060";

fn peer(s: &str) -> Peer {
    Peer::udp(s.parse::<SocketAddr>().unwrap())
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The two layers, the clock, the wire, and what each TU saw.
struct Net {
    uac: TransactionLayer,
    uas: TransactionLayer,
    t0: Instant,
    now: Instant,
    uac_events: Vec<TransactionEvent>,
    uas_events: Vec<TransactionEvent>,
    /// Every message put on the wire: (from the UAC?, first line).
    wire: Vec<(bool, String)>,
}

fn first_line(m: &Message) -> String {
    match m {
        Message::Request(r) => format!("{} {}", r.method, r.headers.cseq().unwrap()),
        Message::Response(r) => format!("{} {}", r.status, r.headers.cseq().unwrap()),
    }
}

impl Net {
    fn new() -> Self {
        let t0 = Instant::now();
        Self {
            uac: TransactionLayer::default(),
            uas: TransactionLayer::default(),
            t0,
            now: t0,
            uac_events: Vec::new(),
            uas_events: Vec::new(),
            wire: Vec::new(),
        }
    }

    /// Delivers everything queued, dropping the messages `lose` picks, until both sides are
    /// quiet; collects events.
    fn pump(&mut self, lose: &mut impl FnMut(bool, &Message) -> bool) {
        loop {
            let mut moved = false;
            while let Some(t) = self.uac.poll_transmit() {
                moved = true;
                assert_eq!(t.destination, peer(UAS));
                let m = Message::parse(t.payload).unwrap();
                self.wire.push((true, first_line(&m)));
                if !lose(true, &m) {
                    self.deliver_to_uas(m);
                }
            }
            while let Some(t) = self.uas.poll_transmit() {
                moved = true;
                assert_eq!(t.destination, peer(UAC));
                let m = Message::parse(t.payload).unwrap();
                self.wire.push((false, first_line(&m)));
                if !lose(false, &m) {
                    if let Message::Response(r) = m {
                        self.uac.handle_response(self.now, r);
                    }
                }
            }
            self.uac_events
                .extend(std::iter::from_fn(|| self.uac.poll_event()));
            self.uas_events
                .extend(std::iter::from_fn(|| self.uas.poll_event()));
            if !moved {
                break;
            }
        }
    }

    fn deliver_to_uas(&mut self, m: Message) {
        let Message::Request(mut r) = m else {
            panic!("the UAC only sends requests");
        };
        let source = peer(UAC);
        stamp_received(&mut r, source.addr).unwrap();
        self.uas.handle_request(self.now, r, source).unwrap();
    }

    /// Advances the clock to `until`, firing timers on both sides on the way.
    fn run_until(&mut self, until: Instant, lose: &mut impl FnMut(bool, &Message) -> bool) {
        self.pump(lose);
        loop {
            let next = [self.uac.poll_timeout(), self.uas.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(at) if at <= until => {
                    self.now = self.now.max(at);
                    self.uac.handle_timeout(self.now);
                    self.uas.handle_timeout(self.now);
                    self.pump(lose);
                }
                _ => break,
            }
        }
        self.now = self.now.max(until);
    }

    fn at(&self, offset: Duration) -> Instant {
        self.t0 + offset
    }

    fn take_uas_request(&mut self) -> (TransactionKey, Request) {
        let pos = self
            .uas_events
            .iter()
            .position(|e| matches!(e, TransactionEvent::Request { .. }))
            .expect("a request for the UAS");
        match self.uas_events.remove(pos) {
            TransactionEvent::Request { key, request, .. } => (key, request),
            _ => unreachable!(),
        }
    }
}

fn no_loss() -> impl FnMut(bool, &Message) -> bool {
    |_, _| false
}

fn request(method: Method, cseq: u32) -> Request {
    let mut r = Request::new(method.clone(), Uri::parse("sip:bob@192.0.2.2").unwrap());
    r.headers.push(
        HeaderName::Via,
        format!("SIP/2.0/UDP {UAC};branch={};rport", generate_branch()),
    );
    r.headers.set_max_forwards(70);
    r.headers.push(HeaderName::To, "<sip:bob@192.0.2.2>");
    r.headers
        .push(HeaderName::From, "<sip:alice@192.0.2.1>;tag=a1");
    r.headers.set_call_id("flow-call@192.0.2.1");
    r.headers.set_cseq(&CSeq::new(cseq, method));
    r
}

fn answer(req: &Request, status: u16) -> Response {
    let mut r = Response::from_request(req, status, None);
    if status > 100 {
        r.set_to_tag("b1");
    }
    r
}

fn statuses(events: &[TransactionEvent]) -> Vec<u16> {
    events
        .iter()
        .filter_map(|e| match e {
            TransactionEvent::Response { response, .. } => Some(response.status),
            _ => None,
        })
        .collect()
}

#[test]
fn lost_invite_is_retransmitted_and_a_rejection_is_acknowledged() {
    let mut net = Net::new();
    let inv = request(Method::Invite, 1);
    let uac_key = net.uac.send_request(net.now, inv, peer(UAS)).unwrap();
    // The first INVITE is lost; timer A's retransmission gets through at 500 ms.
    let mut lost_once = false;
    let mut lose = |from_uac: bool, m: &Message| {
        let first_invite =
            from_uac && m.as_request().is_some_and(|r| r.method == Method::Invite) && !lost_once;
        if first_invite {
            lost_once = true;
        }
        first_invite
    };
    net.run_until(net.at(ms(600)), &mut lose);
    let (uas_key, req) = net.take_uas_request();
    // The 100 Trying went out at 700 ms; the TU rings, then rejects, at 1 s.
    net.run_until(net.at(ms(1000)), &mut lose);
    net.uas
        .respond(net.now, uas_key, answer(&req, 180))
        .unwrap();
    net.uas
        .respond(net.now, uas_key, answer(&req, 486))
        .unwrap();
    net.pump(&mut lose);
    assert_eq!(statuses(&net.uac_events), vec![100, 180, 486]);
    assert_eq!(net.uac.state(uac_key), Some(TransactionState::Completed));
    assert_eq!(net.uas.state(uas_key), Some(TransactionState::Confirmed));
    let acks = net
        .wire
        .iter()
        .filter(|(from_uac, l)| *from_uac && l.starts_with("ACK"))
        .count();
    assert_eq!(acks, 1);
    // Everything ends: I (5 s) on the server, D (32 s) on the client.
    net.run_until(net.at(Duration::from_secs(60)), &mut lose);
    assert!(net.uac.is_empty() && net.uas.is_empty());
    assert!(net
        .uas_events
        .iter()
        .all(|e| matches!(e, TransactionEvent::Terminated { .. })));
    assert_eq!(
        net.wire
            .iter()
            .filter(|(from_uac, l)| *from_uac && l.starts_with("INVITE"))
            .count(),
        2,
        "one loss, one retransmission, then quiet"
    );
}

#[test]
fn lost_final_response_to_options_is_recovered_from_the_server_transaction() {
    let mut net = Net::new();
    let opt = request(Method::Options, 7);
    let uac_key = net.uac.send_request(net.now, opt, peer(UAS)).unwrap();
    net.pump(&mut no_loss());
    let (uas_key, req) = net.take_uas_request();
    net.uas
        .respond(net.now, uas_key, answer(&req, 200))
        .unwrap();
    // The first 200 is lost; timer E retransmits the OPTIONS, the server (Completed) re-sends.
    let mut dropped = false;
    let mut lose = |from_uac: bool, _: &Message| {
        if !from_uac && !dropped {
            dropped = true;
            return true;
        }
        false
    };
    net.run_until(net.at(ms(600)), &mut lose);
    assert_eq!(statuses(&net.uac_events), vec![200]);
    assert_eq!(net.uac.state(uac_key), Some(TransactionState::Completed));
    assert_eq!(net.uas.state(uas_key), Some(TransactionState::Completed));
    // No second Request event at the server.
    assert!(!net
        .uas_events
        .iter()
        .any(|e| matches!(e, TransactionEvent::Request { .. })));
    net.run_until(net.at(Duration::from_secs(40)), &mut lose);
    assert!(
        net.uac.is_empty() && net.uas.is_empty(),
        "K then J end both"
    );
}

#[test]
fn accepted_invite_and_the_tu_ack_with_its_own_branch() {
    let mut net = Net::new();
    let inv = request(Method::Invite, 1);
    let uac_key = net
        .uac
        .send_request(net.now, inv.clone(), peer(UAS))
        .unwrap();
    net.pump(&mut no_loss());
    let (uas_key, req) = net.take_uas_request();
    let ok = answer(&req, 200);
    net.uas.respond(net.now, uas_key, ok.clone()).unwrap();
    net.pump(&mut no_loss());
    assert_eq!(net.uac.state(uac_key), Some(TransactionState::Accepted));
    assert_eq!(net.uas.state(uas_key), Some(TransactionState::Accepted));
    // The UAS core retransmits the 2xx once (its ACK is late); the UAC passes it up again.
    net.run_until(net.at(ms(500)), &mut no_loss());
    net.uas.respond(net.now, uas_key, ok).unwrap();
    net.pump(&mut no_loss());
    assert_eq!(statuses(&net.uac_events), vec![200, 200]);
    // The UAC core sends the ACK of the 2xx outside the transaction, with a new branch.
    let mut ack = request(Method::Ack, 1);
    ack.headers.set_to(
        &net.uac_events
            .iter()
            .find_map(|e| match e {
                TransactionEvent::Response { response, .. } => Some(response.headers.to().unwrap()),
                _ => None,
            })
            .unwrap(),
    );
    net.uac.send_stateless(peer(UAS), ack.clone());
    net.pump(&mut no_loss());
    let acks: Vec<_> = net
        .uas_events
        .iter()
        .filter_map(|e| match e {
            TransactionEvent::Ack { key, request, .. } => Some((*key, request.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0].0, None, "the 2xx ACK is its own transaction");
    assert_eq!(acks[0].1.headers.to_tag(), Some("b1"));
    net.run_until(net.at(Duration::from_secs(40)), &mut no_loss());
    assert!(net.uac.is_empty() && net.uas.is_empty(), "M and L end both");
}

#[test]
fn cancel_of_a_ringing_invite() {
    let mut net = Net::new();
    let inv = request(Method::Invite, 1);
    let uac_key = net.uac.send_request(net.now, inv, peer(UAS)).unwrap();
    // The user hangs up before anything came back: the CANCEL waits for a provisional.
    assert_eq!(
        net.uac.cancel(net.now, uac_key),
        Ok(CancelOutcome::Deferred)
    );
    net.pump(&mut no_loss());
    let (uas_key, req) = net.take_uas_request();
    net.uas
        .respond(net.now, uas_key, answer(&req, 180))
        .unwrap();
    net.pump(&mut no_loss());
    let cancel_event = net
        .uas_events
        .iter()
        .find_map(|e| match e {
            TransactionEvent::Cancel {
                key,
                request,
                invite,
                ..
            } => Some((*key, request.clone(), *invite)),
            _ => None,
        })
        .expect("the CANCEL reached the UAS");
    assert_eq!(cancel_event.2, Some(uas_key));
    // The UAS TU: 200 to the CANCEL, 487 to the INVITE.
    net.uas
        .respond(net.now, cancel_event.0, answer(&cancel_event.1, 200))
        .unwrap();
    net.uas
        .respond(net.now, uas_key, answer(&req, 487))
        .unwrap();
    net.pump(&mut no_loss());
    let uac_cancel = net
        .uac_events
        .iter()
        .find_map(|e| match e {
            TransactionEvent::CancelSent { invite, cancel } if *invite == uac_key => Some(*cancel),
            _ => None,
        })
        .unwrap();
    assert_eq!(net.uac.state(uac_cancel), Some(TransactionState::Completed));
    assert_eq!(net.uac.state(uac_key), Some(TransactionState::Completed));
    assert_eq!(net.uas.state(uas_key), Some(TransactionState::Confirmed));
    assert_eq!(statuses(&net.uac_events), vec![180, 200, 487]);
    net.run_until(net.at(Duration::from_secs(60)), &mut no_loss());
    assert!(net.uac.is_empty() && net.uas.is_empty());
    assert!(!net.uac_events.iter().any(|e| matches!(
        e,
        TransactionEvent::Timeout {
            timer: Timer::CancelWait,
            ..
        }
    )));
}

#[test]
fn unanswered_invite_on_a_dead_network_times_out_with_timer_b() {
    let mut net = Net::new();
    let key = net
        .uac
        .send_request(net.now, request(Method::Invite, 1), peer(UAS))
        .unwrap();
    let mut lose_all = |_: bool, _: &Message| true;
    net.run_until(net.at(Duration::from_secs(40)), &mut lose_all);
    assert_eq!(
        net.uac_events,
        vec![
            TransactionEvent::Timeout {
                key,
                timer: Timer::B
            },
            TransactionEvent::Terminated { key }
        ]
    );
    assert_eq!(net.wire.len(), 7, "the INVITE and six retransmissions");
    assert_eq!(
        net.uas
            .handle_request(net.now, request(Method::Options, 2), peer(UAC))
            .map(|o| matches!(o, RequestOutcome::Created(_))),
        Ok(true)
    );
}
