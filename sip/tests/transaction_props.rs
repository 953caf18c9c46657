//! Property tests of the transaction layer: arbitrary sequences of inputs (requests, responses,
//! TU responses, CANCELs, transport errors, malformed messages, clock jumps) never panic and keep
//! the layer's invariants: the limit holds, timers are never due in the past after
//! `handle_timeout`, every key terminates at most once and is dead afterwards, and once the clock
//! runs far ahead only the transactions waiting on someone else (an unanswered INVITE, a request
//! the TU has not answered) are left.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use thalamus_sip::message::{CSeq, HeaderName, Method, Request, Response, Uri};
use thalamus_sip::transaction::{
    Peer, TimerConfig, TransactionConfig, TransactionEvent, TransactionKey, TransactionKind,
    TransactionLayer, TransactionState,
};

const MAX: usize = 6;

#[derive(Debug, Clone)]
enum Op {
    /// The TU sends a request (method index, branch index, reliable).
    Send(u8, u8, bool),
    /// A response arrives (branch index, method index, status, To tag index).
    Response(u8, u8, u16, u8),
    /// A request arrives (method index, branch index, reliable, RFC 2543 style, To tag index).
    Request(u8, u8, bool, bool, u8),
    /// The TU responds in a known transaction (key index, status, To tag index).
    Respond(u8, u16, u8),
    /// The TU cancels a known transaction.
    Cancel(u8),
    /// The transport fails for a known transaction.
    TransportError(u8),
    /// A request lacking a header arrives (which header).
    Broken(u8, u8),
    /// The clock moves on (milliseconds).
    Advance(u32),
}

const METHODS: [Method; 5] = [
    Method::Invite,
    Method::Options,
    Method::Ack,
    Method::Cancel,
    Method::Bye,
];

fn method(i: u8) -> Method {
    METHODS[usize::from(i) % METHODS.len()].clone()
}

fn branch(i: u8) -> String {
    format!("z9hG4bKprop{}", i % 4)
}

fn tag(i: u8) -> Option<String> {
    match i % 3 {
        0 => None,
        n => Some(format!("t{n}")),
    }
}

fn request(m: Method, b: u8, reliable: bool, legacy: bool, to_tag: u8) -> Request {
    let transport = if reliable { "TCP" } else { "UDP" };
    let mut r = Request::new(m.clone(), Uri::parse("sip:bob@192.0.2.2").unwrap());
    let via = if legacy {
        format!("SIP/2.0/{transport} 192.0.2.1:5060;branch=old{}", b % 4)
    } else {
        format!("SIP/2.0/{transport} 192.0.2.1:5060;branch={}", branch(b))
    };
    r.headers.push(HeaderName::Via, via);
    r.headers.set_max_forwards(70);
    match tag(to_tag) {
        Some(t) => r
            .headers
            .push(HeaderName::To, format!("<sip:bob@192.0.2.2>;tag={t}")),
        None => r.headers.push(HeaderName::To, "<sip:bob@192.0.2.2>"),
    }
    r.headers
        .push(HeaderName::From, "<sip:alice@192.0.2.1>;tag=a");
    r.headers.set_call_id("prop@192.0.2.1");
    r.headers.set_cseq(&CSeq::new(1, m));
    r
}

fn peer(reliable: bool) -> Peer {
    let addr: SocketAddr = "192.0.2.1:5060".parse().unwrap();
    if reliable {
        Peer::tcp(addr)
    } else {
        Peer::udp(addr)
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (any::<u8>(), any::<u8>(), any::<bool>()).prop_map(|(m, b, r)| Op::Send(m, b, r)),
        (any::<u8>(), any::<u8>(), 90u16..720, any::<u8>())
            .prop_map(|(b, m, s, t)| Op::Response(b, m, s, t)),
        (
            any::<u8>(),
            any::<u8>(),
            any::<bool>(),
            any::<bool>(),
            any::<u8>()
        )
            .prop_map(|(m, b, r, l, t)| Op::Request(m, b, r, l, t)),
        (any::<u8>(), 90u16..720, any::<u8>()).prop_map(|(k, s, t)| Op::Respond(k, s, t)),
        any::<u8>().prop_map(Op::Cancel),
        any::<u8>().prop_map(Op::TransportError),
        (any::<u8>(), any::<u8>()).prop_map(|(m, h)| Op::Broken(m, h)),
        (0u32..40_000).prop_map(Op::Advance),
    ]
}

struct World {
    layer: TransactionLayer,
    now: Instant,
    keys: Vec<TransactionKey>,
    /// Requests that created server transactions, by key.
    server_requests: Vec<(TransactionKey, Request)>,
    terminated: HashSet<TransactionKey>,
}

impl World {
    fn key(&self, i: u8) -> Option<TransactionKey> {
        if self.keys.is_empty() {
            None
        } else {
            self.keys.get(usize::from(i) % self.keys.len()).copied()
        }
    }

    fn drain(&mut self) {
        while self.layer.poll_transmit().is_some() {}
        while let Some(e) = self.layer.poll_event() {
            match e {
                TransactionEvent::Terminated { key } => {
                    assert!(self.terminated.insert(key), "{key:?} terminated twice");
                    assert_eq!(self.layer.state(key), None);
                }
                TransactionEvent::Request { key, request, .. }
                | TransactionEvent::Cancel { key, request, .. } => {
                    self.keys.push(key);
                    self.server_requests.push((key, request));
                }
                TransactionEvent::CancelSent { cancel, .. } => self.keys.push(cancel),
                _ => {}
            }
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Send(m, b, reliable) => {
                let req = request(method(m), b, reliable, false, 0);
                if let Ok(k) = self.layer.send_request(self.now, req, peer(reliable)) {
                    self.keys.push(k);
                }
            }
            Op::Response(b, m, status, t) => {
                let req = request(method(m), b, false, false, 0);
                let mut resp = Response::from_request(&req, 200, None);
                resp.status = status;
                if let Some(t) = tag(t) {
                    resp.set_to_tag(&t);
                }
                self.layer.handle_response(self.now, resp);
            }
            Op::Request(m, b, reliable, legacy, t) => {
                let req = request(method(m), b, reliable, legacy, t);
                let _ = self.layer.handle_request(self.now, req, peer(reliable));
            }
            Op::Respond(k, status, t) => {
                if let Some(key) = self.key(k) {
                    let req = self
                        .server_requests
                        .iter()
                        .find(|(sk, _)| *sk == key)
                        .map(|(_, r)| r.clone())
                        .unwrap_or_else(|| request(Method::Options, 0, false, false, 0));
                    let mut resp = Response::from_request(&req, 200, None);
                    resp.status = status;
                    if let Some(t) = tag(t) {
                        resp.set_to_tag(&t);
                    }
                    let _ = self.layer.respond(self.now, key, resp);
                }
            }
            Op::Cancel(k) => {
                if let Some(key) = self.key(k) {
                    let _ = self.layer.cancel(self.now, key);
                }
            }
            Op::TransportError(k) => {
                if let Some(key) = self.key(k) {
                    self.layer.handle_transport_error(self.now, key);
                }
            }
            Op::Broken(m, h) => {
                let mut req = request(method(m), 0, false, false, 0);
                let name = [
                    HeaderName::Via,
                    HeaderName::CSeq,
                    HeaderName::CallId,
                    HeaderName::From,
                    HeaderName::To,
                ][usize::from(h) % 5]
                    .clone();
                req.headers.remove(&name);
                let _ = self
                    .layer
                    .handle_request(self.now, req.clone(), peer(false));
                let _ = self.layer.send_request(self.now, req, peer(false));
            }
            Op::Advance(ms) => {
                self.now += Duration::from_millis(u64::from(ms));
                self.layer.handle_timeout(self.now);
            }
        }
        self.drain();
        // Invariants after every input.
        assert!(self.layer.len() <= 2 * MAX, "len {}", self.layer.len());
        self.layer.handle_timeout(self.now);
        self.drain();
        if let Some(next) = self.layer.poll_timeout() {
            assert!(next > self.now, "a timer is overdue after handle_timeout");
        }
        for k in &self.terminated {
            assert_eq!(self.layer.state(*k), None);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_inputs_never_panic_and_keep_the_invariants(ops in proptest::collection::vec(op(), 1..60)) {
        let t0 = Instant::now();
        let mut world = World {
            layer: TransactionLayer::new(TransactionConfig {
                max_transactions: MAX,
                timers: TimerConfig::default(),
                ..TransactionConfig::default()
            }),
            now: t0,
            keys: Vec::new(),
            server_requests: Vec::new(),
            terminated: HashSet::new(),
        };
        for op in ops {
            world.apply(op);
        }
        // Far in the future only transactions waiting on a peer or the TU remain.
        world.apply(Op::Advance(3_600_000));
        for key in world.keys.clone() {
            let (Some(kind), Some(state)) = (world.layer.kind(key), world.layer.state(key)) else {
                continue;
            };
            let waiting = matches!(
                (kind, state),
                (TransactionKind::InviteClient, TransactionState::Proceeding)
                    | (TransactionKind::InviteServer, TransactionState::Proceeding)
                    | (TransactionKind::NonInviteServer, TransactionState::Trying | TransactionState::Proceeding)
            );
            prop_assert!(waiting, "{kind:?} stuck in {state:?}");
        }
    }
}
