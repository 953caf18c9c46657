//! Unit tests of the transaction layer: one or more per state machine transition and per timer,
//! on a fake clock (instants built from one `Instant::now()` plus durations, never sleeps).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::message::{CSeq, HeaderName, Message, Method, Request, Response, Uri};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn udp() -> Peer {
    Peer::udp(addr("192.0.2.20:5060"))
}

fn tcp() -> Peer {
    Peer::tcp(addr("192.0.2.20:5060"))
}

/// The far end as seen by a server transaction.
fn client_udp() -> Peer {
    Peer::udp(addr("192.0.2.1:5060"))
}

fn client_tcp() -> Peer {
    Peer::tcp(addr("192.0.2.1:40001"))
}

fn request(method: Method, branch: &str, transport: &str) -> Request {
    let mut r = Request::new(
        method.clone(),
        Uri::parse("sip:bob@biloxi.example.com").unwrap(),
    );
    r.headers.push(
        HeaderName::Via,
        format!("SIP/2.0/{transport} 192.0.2.1:5060;branch={branch}"),
    );
    r.headers.set_max_forwards(70);
    r.headers
        .push(HeaderName::Route, "<sip:proxy.example.com;lr>");
    r.headers
        .push(HeaderName::To, "Bob <sip:bob@biloxi.example.com>");
    r.headers.push(
        HeaderName::From,
        "Alice <sip:alice@atlanta.example.com>;tag=1928301774",
    );
    r.headers.set_call_id("a84b4c76e66710@atlanta.example.com");
    r.headers.set_cseq(&CSeq::new(314159, method));
    r.headers
        .push(HeaderName::Contact, "<sip:alice@192.0.2.1:5060>");
    r
}

fn invite(branch: &str) -> Request {
    request(Method::Invite, branch, "UDP")
}

fn response(req: &Request, status: u16, to_tag: Option<&str>) -> Response {
    let mut r = Response::from_request(req, status, None);
    if let Some(tag) = to_tag {
        r.set_to_tag(tag);
    }
    r
}

fn transmits(layer: &mut TransactionLayer) -> Vec<Transmit> {
    std::iter::from_fn(|| layer.poll_transmit()).collect()
}

fn events(layer: &mut TransactionLayer) -> Vec<TransactionEvent> {
    std::iter::from_fn(|| layer.poll_event()).collect()
}

fn parsed(t: &Transmit) -> Message {
    Message::parse(t.payload.clone()).unwrap()
}

fn sent_request(t: &Transmit) -> Request {
    match parsed(t) {
        Message::Request(r) => r,
        Message::Response(r) => panic!("expected a request, got {}", r.status),
    }
}

fn sent_status(t: &Transmit) -> u16 {
    match parsed(t) {
        Message::Response(r) => r.status,
        Message::Request(r) => panic!("expected a response, got {}", r.method),
    }
}

/// Things that happened, with their offset from the start.
type Timed<T> = Vec<(Duration, T)>;

/// Runs every timer until none is left or `until` is reached; returns (offset from t0, transmit)
/// for every transmission and every event seen.
fn run_timers(
    layer: &mut TransactionLayer,
    t0: Instant,
    until: Duration,
) -> (Timed<Transmit>, Timed<TransactionEvent>) {
    let mut sent = Vec::new();
    let mut evs = Vec::new();
    while let Some(at) = layer.poll_timeout() {
        if at > t0 + until {
            break;
        }
        layer.handle_timeout(at);
        sent.extend(transmits(layer).into_iter().map(|t| (at - t0, t)));
        evs.extend(events(layer).into_iter().map(|e| (at - t0, e)));
    }
    (sent, evs)
}

fn secs(times: &[(Duration, Transmit)]) -> Vec<u64> {
    times.iter().map(|(d, _)| d.as_millis() as u64).collect()
}

mod invite_client {
    use super::*;

    fn start(layer: &mut TransactionLayer, t0: Instant, peer: Peer) -> (TransactionKey, Request) {
        let inv = invite("z9hG4bKinv1");
        let key = layer.send_request(t0, inv.clone(), peer).unwrap();
        let first = transmits(layer);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].key, Some(key));
        assert!(!first[0].retransmission);
        assert_eq!(first[0].payload, inv.to_bytes());
        assert_eq!(layer.state(key), Some(TransactionState::Calling));
        assert_eq!(layer.kind(key), Some(TransactionKind::InviteClient));
        (key, inv)
    }

    #[test]
    fn timer_a_doubles_from_t1_until_timer_b_times_out() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, inv) = start(&mut layer, t0, udp());
        assert_eq!(layer.poll_timeout(), Some(t0 + ms(500)));
        let (sent, evs) = run_timers(&mut layer, t0, Duration::from_secs(100));
        // A: 0.5, then +1, +2, +4, +8, +16 s; B at 32 s ends it before the next A at 63.5 s.
        assert_eq!(secs(&sent), vec![500, 1500, 3500, 7500, 15500, 31500]);
        for (_, t) in &sent {
            assert!(t.retransmission);
            assert_eq!(t.destination, udp());
            assert_eq!(t.payload, inv.to_bytes());
        }
        assert_eq!(
            evs,
            vec![
                (
                    Duration::from_secs(32),
                    TransactionEvent::Timeout {
                        key,
                        timer: Timer::B
                    }
                ),
                (
                    Duration::from_secs(32),
                    TransactionEvent::Terminated { key }
                ),
            ]
        );
        assert_eq!(layer.state(key), None);
        assert!(layer.is_empty());
    }

    #[test]
    fn reliable_transport_has_timer_b_only() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, _) = start(&mut layer, t0, tcp());
        assert_eq!(layer.poll_timeout(), Some(t0 + Duration::from_secs(32)));
        let (sent, evs) = run_timers(&mut layer, t0, Duration::from_secs(100));
        assert!(sent.is_empty());
        assert_eq!(
            evs.first().map(|(_, e)| e.clone()),
            Some(TransactionEvent::Timeout {
                key,
                timer: Timer::B
            })
        );
    }

    #[test]
    fn configured_t1_scales_a_and_b() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::new(TransactionConfig {
            timers: TimerConfig {
                t1: ms(100),
                ..TimerConfig::default()
            },
            ..TransactionConfig::default()
        });
        start(&mut layer, t0, udp());
        let (sent, evs) = run_timers(&mut layer, t0, Duration::from_secs(100));
        assert_eq!(secs(&sent), vec![100, 300, 700, 1500, 3100, 6300]);
        assert_eq!(evs[0].0, ms(6400));
    }

    #[test]
    fn provisional_moves_calling_to_proceeding_and_stops_a_and_b() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, inv) = start(&mut layer, t0, udp());
        let ringing = response(&inv, 180, Some("b1"));
        assert!(layer.handle_response(t0 + ms(100), ringing.clone()));
        assert_eq!(layer.state(key), Some(TransactionState::Proceeding));
        assert_eq!(
            events(&mut layer),
            vec![TransactionEvent::Response {
                key,
                response: ringing.clone()
            }]
        );
        assert_eq!(layer.poll_timeout(), None, "no timer in Proceeding");
        // More provisionals are passed up too.
        let progress = response(&inv, 183, Some("b1"));
        assert!(layer.handle_response(t0 + ms(200), progress.clone()));
        assert_eq!(
            events(&mut layer),
            vec![TransactionEvent::Response {
                key,
                response: progress
            }]
        );
        assert!(transmits(&mut layer).is_empty());
    }

    #[test]
    fn non_2xx_final_sends_the_ack_and_resends_it_on_each_retransmission() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, inv) = start(&mut layer, t0, udp());
        let busy = response(&inv, 486, Some("b7"));
        assert!(layer.handle_response(t0 + ms(300), busy.clone()));
        assert_eq!(layer.state(key), Some(TransactionState::Completed));
        assert_eq!(
            events(&mut layer),
            vec![TransactionEvent::Response {
                key,
                response: busy.clone()
            }]
        );
        let sent = transmits(&mut layer);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].destination, udp());
        let ack = sent_request(&sent[0]);
        assert_eq!(ack.method, Method::Ack);
        assert_eq!(ack.uri, inv.uri);
        assert_eq!(ack.branch(), inv.branch());
        assert_eq!(ack.headers.via().unwrap().len(), 1);
        assert_eq!(ack.headers.to_tag(), Some("b7"));
        assert_eq!(ack.headers.from_tag(), Some("1928301774"));
        assert_eq!(
            ack.headers.call_id().unwrap(),
            inv.headers.call_id().unwrap()
        );
        assert_eq!(ack.headers.cseq().unwrap(), CSeq::new(314159, Method::Ack));
        assert_eq!(ack.headers.count(&HeaderName::Route), 1);
        // Timer D (32 s on UDP) replaces A and B.
        assert_eq!(
            layer.poll_timeout(),
            Some(t0 + ms(300) + Duration::from_secs(32))
        );
        for i in 1..=3u64 {
            assert!(layer.handle_response(t0 + Duration::from_secs(i), busy.clone()));
            let again = transmits(&mut layer);
            assert_eq!(again.len(), 1);
            assert!(again[0].retransmission);
            assert_eq!(again[0].payload, sent[0].payload);
            assert!(events(&mut layer).is_empty(), "retransmission absorbed");
        }
        layer.handle_timeout(t0 + ms(300) + Duration::from_secs(32) - ms(1));
        assert_eq!(layer.state(key), Some(TransactionState::Completed));
        layer.handle_timeout(t0 + ms(300) + Duration::from_secs(32));
        assert_eq!(layer.state(key), None);
        assert_eq!(
            events(&mut layer),
            vec![TransactionEvent::Terminated { key }]
        );
    }

    #[test]
    fn timer_d_is_zero_on_reliable_transports() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, inv) = start(&mut layer, t0, tcp());
        assert!(layer.handle_response(t0 + ms(10), response(&inv, 180, Some("x"))));
        assert!(layer.handle_response(t0 + ms(20), response(&inv, 603, Some("x"))));
        let sent = transmits(&mut layer);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent_request(&sent[0]).method, Method::Ack);
        assert_eq!(layer.state(key), None);
        let evs = events(&mut layer);
        assert_eq!(evs.len(), 3);
        assert_eq!(evs[2], TransactionEvent::Terminated { key });
    }

    #[test]
    fn success_moves_to_accepted_passes_every_2xx_and_ends_with_timer_m() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, inv) = start(&mut layer, t0, udp());
        assert!(
            layer.retransmit_bytes(key) > 0,
            "Calling keeps the request to resend"
        );
        assert!(layer.handle_response(t0 + ms(100), response(&inv, 180, Some("a"))));
        assert_eq!(
            layer.retransmit_bytes(key),
            0,
            "Proceeding sends nothing again"
        );
        let ok = response(&inv, 200, Some("a"));
        assert!(layer.handle_response(t0 + ms(200), ok.clone()));
        assert_eq!(layer.state(key), Some(TransactionState::Accepted));
        assert_eq!(layer.retransmit_bytes(key), 0);
        assert!(transmits(&mut layer).is_empty(), "no ACK for a 2xx here");
        let _ = events(&mut layer);
        assert_eq!(
            layer.poll_timeout(),
            Some(t0 + ms(200) + Duration::from_secs(32))
        );
        // A retransmission and a forked 2xx are both passed up.
        let fork = response(&inv, 200, Some("other"));
        assert!(layer.handle_response(t0 + ms(700), ok.clone()));
        assert!(layer.handle_response(t0 + ms(800), fork.clone()));
        // A late provisional or non-2xx is absorbed.
        assert!(layer.handle_response(t0 + ms(900), response(&inv, 180, Some("a"))));
        assert!(layer.handle_response(t0 + ms(900), response(&inv, 500, Some("z"))));
        assert_eq!(
            events(&mut layer),
            vec![
                TransactionEvent::Response {
                    key,
                    response: ok.clone()
                },
                TransactionEvent::Response {
                    key,
                    response: fork
                },
            ]
        );
        assert!(transmits(&mut layer).is_empty());
        layer.handle_timeout(t0 + ms(200) + Duration::from_secs(32));
        assert_eq!(
            events(&mut layer),
            vec![TransactionEvent::Terminated { key }]
        );
        // After M a 2xx is stray: the core re-ACKs it from the dialog.
        assert!(!layer.handle_response(t0 + Duration::from_secs(40), ok.clone()));
        assert_eq!(
            events(&mut layer),
            vec![TransactionEvent::StrayResponse { response: ok }]
        );
    }

    #[test]
    fn success_straight_from_calling() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, inv) = start(&mut layer, t0, udp());
        assert!(layer.handle_response(t0 + ms(100), response(&inv, 202, Some("a"))));
        assert_eq!(layer.state(key), Some(TransactionState::Accepted));
        // Timer A no longer retransmits.
        let (sent, _) = run_timers(&mut layer, t0, Duration::from_secs(10));
        assert!(sent.is_empty());
    }

    #[test]
    fn completed_absorbs_2xx_and_provisionals() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, inv) = start(&mut layer, t0, udp());
        assert!(layer.handle_response(t0, response(&inv, 404, Some("a"))));
        let _ = (transmits(&mut layer), events(&mut layer));
        assert!(layer.handle_response(t0, response(&inv, 200, Some("a"))));
        assert!(layer.handle_response(t0, response(&inv, 180, Some("a"))));
        assert!(events(&mut layer).is_empty());
        assert!(transmits(&mut layer).is_empty());
        assert_eq!(layer.state(key), Some(TransactionState::Completed));
    }

    #[test]
    fn transport_error_in_calling_informs_the_tu_and_terminates() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, _) = start(&mut layer, t0, udp());
        assert!(layer.handle_transport_error(t0 + ms(1), key));
        assert_eq!(
            events(&mut layer),
            vec![
                TransactionEvent::TransportError { key },
                TransactionEvent::Terminated { key }
            ]
        );
        assert!(!layer.handle_transport_error(t0 + ms(2), key), "dead key");
        assert_eq!(layer.poll_timeout(), None, "its timers are gone");
    }
}

mod non_invite_client {
    use super::*;

    fn start(layer: &mut TransactionLayer, t0: Instant, peer: Peer) -> (TransactionKey, Request) {
        let req = request(Method::Options, "z9hG4bKopt1", "UDP");
        let key = layer.send_request(t0, req.clone(), peer).unwrap();
        assert_eq!(transmits(layer).len(), 1);
        assert_eq!(layer.state(key), Some(TransactionState::Trying));
        assert_eq!(layer.kind(key), Some(TransactionKind::NonInviteClient));
        assert_eq!(layer.client_request(key), Some(&req));
        (key, req)
    }

    #[test]
    fn timer_e_doubles_up_to_t2_and_timer_f_times_out_at_64_t1() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, _) = start(&mut layer, t0, udp());
        let (sent, evs) = run_timers(&mut layer, t0, Duration::from_secs(100));
        // Intervals 0.5, 1, 2, 4, 4, 4... s.
        assert_eq!(
            secs(&sent),
            vec![500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500]
        );
        assert!(sent.iter().all(|(_, t)| t.retransmission));
        assert_eq!(
            evs,
            vec![
                (
                    Duration::from_secs(32),
                    TransactionEvent::Timeout {
                        key,
                        timer: Timer::F
                    }
                ),
                (
                    Duration::from_secs(32),
                    TransactionEvent::Terminated { key }
                ),
            ]
        );
    }

    #[test]
    fn proceeding_retransmits_every_t2() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, req) = start(&mut layer, t0, udp());
        layer.handle_timeout(t0 + ms(500));
        assert_eq!(transmits(&mut layer).len(), 1);
        assert!(layer.handle_response(t0 + ms(600), response(&req, 100, None)));
        assert_eq!(layer.state(key), Some(TransactionState::Proceeding));
        assert_eq!(events(&mut layer).len(), 1);
        let (sent, evs) = run_timers(&mut layer, t0, Duration::from_secs(100));
        // The E armed in Trying fires at 1.5 s; from then on every T2.
        assert_eq!(
            secs(&sent),
            vec![1500, 5500, 9500, 13500, 17500, 21500, 25500, 29500]
        );
        assert_eq!(
            evs[0].1,
            TransactionEvent::Timeout {
                key,
                timer: Timer::F
            }
        );
        assert_eq!(
            evs[0].0,
            Duration::from_secs(32),
            "F keeps running in Proceeding"
        );
    }

    #[test]
    fn final_response_completes_and_timer_k_terminates() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, req) = start(&mut layer, t0, udp());
        let ok = response(&req, 200, Some("t"));
        assert!(layer.retransmit_bytes(key) > 0);
        assert!(layer.handle_response(t0 + ms(50), ok.clone()));
        assert_eq!(layer.state(key), Some(TransactionState::Completed));
        assert_eq!(
            layer.retransmit_bytes(key),
            0,
            "Completed sends nothing again"
        );
        assert_eq!(
            events(&mut layer),
            vec![TransactionEvent::Response {
                key,
                response: ok.clone()
            }]
        );
        assert_eq!(
            layer.poll_timeout(),
            Some(t0 + ms(50) + Duration::from_secs(5))
        );
        // Retransmissions of the final response are absorbed; no more E.
        assert!(layer.handle_response(t0 + ms(600), ok));
        assert!(events(&mut layer).is_empty());
        let (sent, evs) = run_timers(&mut layer, t0, Duration::from_secs(100));
        assert!(sent.is_empty());
        assert_eq!(evs, vec![(ms(5050), TransactionEvent::Terminated { key })]);
    }

    #[test]
    fn final_response_from_proceeding() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, req) = start(&mut layer, t0, udp());
        assert!(layer.handle_response(t0, response(&req, 100, None)));
        assert!(layer.handle_response(t0, response(&req, 100, None)));
        assert!(layer.handle_response(t0, response(&req, 404, Some("t"))));
        assert_eq!(layer.state(key), Some(TransactionState::Completed));
        assert_eq!(
            events(&mut layer).len(),
            3,
            "two 100s and the 404 passed up"
        );
    }

    #[test]
    fn reliable_transport_no_e_and_zero_k() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, req) = start(&mut layer, t0, tcp());
        assert_eq!(layer.poll_timeout(), Some(t0 + Duration::from_secs(32)));
        assert!(layer.handle_response(t0 + ms(5), response(&req, 200, Some("t"))));
        assert_eq!(layer.state(key), None);
        assert_eq!(
            events(&mut layer).last(),
            Some(&TransactionEvent::Terminated { key })
        );
    }

    #[test]
    fn timer_f_fires_in_proceeding() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, req) = start(&mut layer, t0, tcp());
        assert!(layer.handle_response(t0, response(&req, 100, None)));
        let _ = events(&mut layer);
        layer.handle_timeout(t0 + Duration::from_secs(32));
        assert_eq!(
            events(&mut layer),
            vec![
                TransactionEvent::Timeout {
                    key,
                    timer: Timer::F
                },
                TransactionEvent::Terminated { key }
            ]
        );
    }

    #[test]
    fn transport_error_terminates() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, req) = start(&mut layer, t0, udp());
        assert!(layer.handle_response(t0, response(&req, 100, None)));
        let _ = events(&mut layer);
        assert!(layer.handle_transport_error(t0, key));
        assert_eq!(
            events(&mut layer),
            vec![
                TransactionEvent::TransportError { key },
                TransactionEvent::Terminated { key }
            ]
        );
    }
}

mod invite_server {
    use super::*;

    fn start(
        layer: &mut TransactionLayer,
        t0: Instant,
        transport: &str,
        source: Peer,
    ) -> (TransactionKey, Request) {
        let inv = request(Method::Invite, "z9hG4bKsrv1", transport);
        let out = layer.handle_request(t0, inv.clone(), source).unwrap();
        let RequestOutcome::Created(key) = out else {
            panic!("expected a new transaction, got {out:?}");
        };
        assert_eq!(
            events(layer),
            vec![TransactionEvent::Request {
                key,
                request: inv.clone(),
                source
            }]
        );
        assert_eq!(layer.state(key), Some(TransactionState::Proceeding));
        assert_eq!(layer.kind(key), Some(TransactionKind::InviteServer));
        (key, inv)
    }

    #[test]
    fn sends_100_trying_after_200_ms_when_the_tu_is_silent() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, _) = start(&mut layer, t0, "UDP", client_udp());
        assert!(transmits(&mut layer).is_empty());
        assert_eq!(layer.poll_timeout(), Some(t0 + ms(200)));
        layer.handle_timeout(t0 + ms(199));
        assert!(transmits(&mut layer).is_empty());
        layer.handle_timeout(t0 + ms(200));
        let sent = transmits(&mut layer);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].key, Some(key));
        assert_eq!(sent[0].destination, client_udp());
        let Message::Response(trying) = parsed(&sent[0]) else {
            panic!("expected a response");
        };
        assert_eq!(trying.status, 100);
        assert_eq!(trying.headers.to_tag(), None, "no To tag on 100 Trying");
        assert_eq!(trying.headers.top_via_branch(), Some("z9hG4bKsrv1"));
        assert_eq!(layer.poll_timeout(), None);
    }

    #[test]
    fn no_100_trying_when_the_tu_answers_first() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, inv) = start(&mut layer, t0, "UDP", client_udp());
        layer
            .respond(t0 + ms(50), key, response(&inv, 180, Some("s1")))
            .unwrap();
        assert_eq!(sent_status(&transmits(&mut layer)[0]), 180);
        assert_eq!(
            layer.poll_timeout(),
            None,
            "the 100 Trying wait is cancelled"
        );
        // A retransmitted INVITE gets the latest provisional.
        assert_eq!(
            layer
                .handle_request(t0 + ms(500), inv.clone(), client_udp())
                .unwrap(),
            RequestOutcome::Retransmission(key)
        );
        let again = transmits(&mut layer);
        assert_eq!(again.len(), 1);
        assert!(again[0].retransmission);
        assert_eq!(sent_status(&again[0]), 180);
        assert!(events(&mut layer).is_empty(), "not passed to the TU again");
    }

    #[test]
    fn zero_trying_delay_sends_100_at_once() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::new(TransactionConfig {
            trying_delay: Duration::ZERO,
            ..TransactionConfig::default()
        });
        start(&mut layer, t0, "UDP", client_udp());
        let sent = transmits(&mut layer);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent_status(&sent[0]), 100);
        assert_eq!(layer.poll_timeout(), None);
    }

    #[test]
    fn early_retransmission_gets_the_owed_100_at_once() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, inv) = start(&mut layer, t0, "UDP", client_udp());
        layer
            .handle_request(t0 + ms(100), inv.clone(), client_udp())
            .unwrap();
        let sent = transmits(&mut layer);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent_status(&sent[0]), 100);
        assert!(!sent[0].retransmission);
        layer.handle_timeout(t0 + ms(200));
        assert!(transmits(&mut layer).is_empty(), "100 not sent twice");
        layer
            .handle_request(t0 + ms(300), inv, client_udp())
            .unwrap();
        let again = transmits(&mut layer);
        assert!(again[0].retransmission);
        assert_eq!(sent_status(&again[0]), 100);
        assert_eq!(layer.state(key), Some(TransactionState::Proceeding));
    }

    #[test]
    fn non_2xx_is_retransmitted_by_timer_g_until_timer_h() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, inv) = start(&mut layer, t0, "UDP", client_udp());
        layer
            .respond(t0, key, response(&inv, 486, Some("s1")))
            .unwrap();
        assert_eq!(layer.state(key), Some(TransactionState::Completed));
        let first = transmits(&mut layer);
        assert_eq!(sent_status(&first[0]), 486);
        let (sent, evs) = run_timers(&mut layer, t0, Duration::from_secs(100));
        // G: 0.5, 1, 2, 4, 4, 4 ... s; H at 32 s.
        assert_eq!(
            secs(&sent),
            vec![500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500]
        );
        assert!(sent
            .iter()
            .all(|(_, t)| t.retransmission && t.payload == first[0].payload));
        assert_eq!(
            evs,
            vec![
                (
                    Duration::from_secs(32),
                    TransactionEvent::Timeout {
                        key,
                        timer: Timer::H
                    }
                ),
                (
                    Duration::from_secs(32),
                    TransactionEvent::Terminated { key }
                )
            ]
        );
    }

    #[test]
    fn completed_resends_the_final_response_for_a_retransmitted_invite() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, inv) = start(&mut layer, t0, "UDP", client_udp());
        layer
            .respond(t0, key, response(&inv, 404, Some("s1")))
            .unwrap();
        let _ = transmits(&mut layer);
        assert_eq!(
            layer
                .handle_request(t0 + ms(100), inv, client_udp())
                .unwrap(),
            RequestOutcome::Retransmission(key)
        );
        let again = transmits(&mut layer);
        assert_eq!(sent_status(&again[0]), 404);
        assert!(again[0].retransmission);
    }

    fn ack_for(inv: &Request, to_tag: &str) -> Request {
        let mut ack = request(Method::Ack, "z9hG4bKsrv1", "UDP");
        ack.uri = inv.uri.clone();
        ack.headers.remove(&HeaderName::Contact);
        let mut to = ack.headers.to().unwrap();
        to.set_tag(to_tag);
        ack.headers.set_to(&to);
        ack
    }

    #[test]
    fn ack_confirms_then_timer_i_absorbs_ack_retransmissions() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, inv) = start(&mut layer, t0, "UDP", client_udp());
        layer
            .respond(t0, key, response(&inv, 486, Some("s1")))
            .unwrap();
        let _ = transmits(&mut layer);
        let ack = ack_for(&inv, "s1");
        assert_eq!(
            layer
                .handle_request(t0 + ms(700), ack.clone(), client_udp())
                .unwrap(),
            RequestOutcome::AckAbsorbed(key)
        );
        assert_eq!(layer.state(key), Some(TransactionState::Confirmed));
        assert!(events(&mut layer).is_empty(), "ACK of a non-2xx stays here");
        assert_eq!(
            layer.poll_timeout(),
            Some(t0 + ms(700) + Duration::from_secs(5))
        );
        assert_eq!(
            layer
                .handle_request(t0 + ms(900), ack.clone(), client_udp())
                .unwrap(),
            RequestOutcome::AckAbsorbed(key)
        );
        // Neither G nor the INVITE retransmission sends anything in Confirmed.
        layer
            .handle_request(t0 + ms(1000), inv, client_udp())
            .unwrap();
        let (sent, evs) = run_timers(&mut layer, t0, Duration::from_secs(100));
        assert!(sent.is_empty());
        assert!(transmits(&mut layer).is_empty());
        assert_eq!(evs, vec![(ms(5700), TransactionEvent::Terminated { key })]);
    }

    #[test]
    fn reliable_transport_no_g_and_zero_i() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, inv) = start(&mut layer, t0, "TCP", client_tcp());
        layer
            .respond(t0, key, response(&inv, 486, Some("s1")))
            .unwrap();
        assert_eq!(transmits(&mut layer)[0].destination, client_tcp());
        assert_eq!(
            layer.poll_timeout(),
            Some(t0 + Duration::from_secs(32)),
            "H only"
        );
        let mut ack = ack_for(&inv, "s1");
        ack.headers.set(
            HeaderName::Via,
            "SIP/2.0/TCP 192.0.2.1:5060;branch=z9hG4bKsrv1",
        );
        assert_eq!(
            layer
                .handle_request(t0 + ms(10), ack, client_tcp())
                .unwrap(),
            RequestOutcome::AckAbsorbed(key)
        );
        assert_eq!(layer.state(key), None);
        assert_eq!(
            events(&mut layer),
            vec![TransactionEvent::Terminated { key }]
        );
    }

    #[test]
    fn success_moves_to_accepted_absorbs_invites_passes_acks_and_ends_with_timer_l() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, inv) = start(&mut layer, t0, "UDP", client_udp());
        let ok = response(&inv, 200, Some("s1"));
        layer.respond(t0 + ms(100), key, ok.clone()).unwrap();
        assert_eq!(layer.state(key), Some(TransactionState::Accepted));
        assert_eq!(sent_status(&transmits(&mut layer)[0]), 200);
        assert_eq!(
            layer.poll_timeout(),
            Some(t0 + ms(100) + Duration::from_secs(32))
        );
        // INVITE retransmissions are absorbed silently.
        assert_eq!(
            layer
                .handle_request(t0 + ms(500), inv.clone(), client_udp())
                .unwrap(),
            RequestOutcome::Retransmission(key)
        );
        assert!(transmits(&mut layer).is_empty());
        // The TU retransmits its 2xx through the transaction.
        layer.respond(t0 + ms(600), key, ok.clone()).unwrap();
        assert_eq!(sent_status(&transmits(&mut layer)[0]), 200);
        // A matching ACK goes to the TU; so does the usual 2xx ACK with its own branch.
        let ack = ack_for(&inv, "s1");
        assert_eq!(
            layer
                .handle_request(t0 + ms(700), ack.clone(), client_udp())
                .unwrap(),
            RequestOutcome::AckPassed(Some(key))
        );
        let mut own_branch = ack.clone();
        own_branch.headers.set(
            HeaderName::Via,
            "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKack2",
        );
        assert_eq!(
            layer
                .handle_request(t0 + ms(700), own_branch.clone(), client_udp())
                .unwrap(),
            RequestOutcome::AckPassed(None)
        );
        assert_eq!(
            events(&mut layer),
            vec![
                TransactionEvent::Ack {
                    key: Some(key),
                    request: ack,
                    source: client_udp()
                },
                TransactionEvent::Ack {
                    key: None,
                    request: own_branch,
                    source: client_udp()
                },
            ]
        );
        // A non-2xx after the 2xx is refused.
        assert_eq!(
            layer.respond(t0 + ms(800), key, response(&inv, 500, Some("s1"))),
            Err(TransactionError::ResponseNotAllowed {
                status: 500,
                state: TransactionState::Accepted
            })
        );
        layer.handle_timeout(t0 + ms(100) + Duration::from_secs(32));
        assert_eq!(
            events(&mut layer),
            vec![TransactionEvent::Terminated { key }]
        );
        // After L, a retransmitted INVITE would be new: the TU's dialog catches it.
        assert!(matches!(
            layer.handle_request(t0 + Duration::from_secs(40), inv, client_udp()),
            Ok(RequestOutcome::Created(_))
        ));
    }

    #[test]
    fn transport_errors_end_proceeding_but_not_accepted() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, inv) = start(&mut layer, t0, "UDP", client_udp());
        layer
            .respond(t0, key, response(&inv, 200, Some("s1")))
            .unwrap();
        assert!(layer.handle_transport_error(t0, key));
        assert_eq!(
            events(&mut layer),
            vec![TransactionEvent::TransportError { key }]
        );
        assert_eq!(layer.state(key), Some(TransactionState::Accepted));

        let mut other = TransactionLayer::default();
        let (k2, _) = start(&mut other, t0, "UDP", client_udp());
        assert!(other.handle_transport_error(t0, k2));
        assert_eq!(
            events(&mut other),
            vec![
                TransactionEvent::TransportError { key: k2 },
                TransactionEvent::Terminated { key: k2 }
            ]
        );
    }

    #[test]
    fn transport_error_in_completed_terminates() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, inv) = start(&mut layer, t0, "UDP", client_udp());
        layer
            .respond(t0, key, response(&inv, 486, Some("s1")))
            .unwrap();
        assert!(layer.handle_transport_error(t0, key));
        assert_eq!(layer.state(key), None);
    }

    #[test]
    fn respond_checks_its_inputs() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, inv) = start(&mut layer, t0, "UDP", client_udp());
        let mut bad = response(&inv, 200, None);
        bad.status = 99;
        assert_eq!(
            layer.respond(t0, key, bad.clone()),
            Err(TransactionError::InvalidStatus(99))
        );
        bad.status = 700;
        assert_eq!(
            layer.respond(t0, key, bad),
            Err(TransactionError::InvalidStatus(700))
        );
        let client = layer.send_request(t0, invite("z9hG4bKc1"), udp()).unwrap();
        assert_eq!(
            layer.respond(t0, client, response(&inv, 200, None)),
            Err(TransactionError::NotServer)
        );
        layer
            .respond(t0, key, response(&inv, 486, Some("x")))
            .unwrap();
        assert_eq!(
            layer.respond(t0, key, response(&inv, 200, Some("x"))),
            Err(TransactionError::ResponseNotAllowed {
                status: 200,
                state: TransactionState::Completed
            })
        );
        layer.handle_transport_error(t0, key);
        assert_eq!(
            layer.respond(t0, key, response(&inv, 200, None)),
            Err(TransactionError::UnknownTransaction)
        );
    }

    #[test]
    fn responses_go_to_received_and_rport() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let mut inv = request(Method::Invite, "z9hG4bKnat", "UDP");
        inv.headers.set(
            HeaderName::Via,
            "SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKnat;rport",
        );
        let source = Peer::udp(addr("198.51.100.7:40001"));
        stamp_received(&mut inv, source.addr).unwrap();
        let RequestOutcome::Created(key) = layer.handle_request(t0, inv.clone(), source).unwrap()
        else {
            panic!("expected a new transaction");
        };
        assert_eq!(
            layer.destination(key),
            Some(&Peer::udp(addr("198.51.100.7:40001")))
        );
        layer
            .respond(t0, key, response(&inv, 180, Some("t")))
            .unwrap();
        assert_eq!(
            transmits(&mut layer)[0].destination.addr,
            addr("198.51.100.7:40001")
        );
    }
}

mod non_invite_server {
    use super::*;

    fn start(layer: &mut TransactionLayer, t0: Instant, source: Peer) -> (TransactionKey, Request) {
        let transport = if source.is_reliable() { "TCP" } else { "UDP" };
        let req = request(Method::Register, "z9hG4bKreg1", transport);
        let RequestOutcome::Created(key) = layer.handle_request(t0, req.clone(), source).unwrap()
        else {
            panic!("expected a new transaction");
        };
        assert_eq!(events(layer).len(), 1);
        assert_eq!(layer.state(key), Some(TransactionState::Trying));
        assert_eq!(layer.kind(key), Some(TransactionKind::NonInviteServer));
        assert!(transmits(layer).is_empty(), "no 100 Trying for non-INVITE");
        assert_eq!(layer.poll_timeout(), None);
        (key, req)
    }

    #[test]
    fn trying_discards_retransmissions() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, req) = start(&mut layer, t0, client_udp());
        assert_eq!(
            layer
                .handle_request(t0 + ms(500), req, client_udp())
                .unwrap(),
            RequestOutcome::Retransmission(key)
        );
        assert!(transmits(&mut layer).is_empty());
        assert!(events(&mut layer).is_empty());
    }

    #[test]
    fn proceeding_resends_the_latest_provisional() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, req) = start(&mut layer, t0, client_udp());
        layer.respond(t0, key, response(&req, 100, None)).unwrap();
        assert_eq!(layer.state(key), Some(TransactionState::Proceeding));
        layer.respond(t0, key, response(&req, 183, None)).unwrap();
        assert_eq!(transmits(&mut layer).len(), 2);
        layer
            .handle_request(t0 + ms(500), req, client_udp())
            .unwrap();
        let again = transmits(&mut layer);
        assert_eq!(sent_status(&again[0]), 183);
        assert!(again[0].retransmission);
    }

    #[test]
    fn completed_resends_the_final_response_until_timer_j() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, req) = start(&mut layer, t0, client_udp());
        layer
            .respond(t0, key, response(&req, 200, Some("r")))
            .unwrap();
        assert_eq!(layer.state(key), Some(TransactionState::Completed));
        assert_eq!(transmits(&mut layer).len(), 1);
        assert_eq!(layer.poll_timeout(), Some(t0 + Duration::from_secs(32)));
        for i in 1..4 {
            layer
                .handle_request(t0 + Duration::from_secs(i), req.clone(), client_udp())
                .unwrap();
            let again = transmits(&mut layer);
            assert_eq!(sent_status(&again[0]), 200);
        }
        assert_eq!(
            layer.respond(t0, key, response(&req, 500, Some("r"))),
            Err(TransactionError::ResponseNotAllowed {
                status: 500,
                state: TransactionState::Completed
            })
        );
        layer.handle_timeout(t0 + Duration::from_secs(32));
        assert_eq!(layer.state(key), None);
        assert_eq!(
            events(&mut layer),
            vec![TransactionEvent::Terminated { key }]
        );
    }

    #[test]
    fn reliable_transport_zero_j() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, req) = start(&mut layer, t0, client_tcp());
        layer.respond(t0, key, response(&req, 100, None)).unwrap();
        layer
            .respond(t0, key, response(&req, 403, Some("r")))
            .unwrap();
        assert_eq!(layer.state(key), None);
        let sent = transmits(&mut layer);
        assert_eq!(sent.len(), 2);
        assert!(sent.iter().all(|t| t.destination == client_tcp()));
    }

    #[test]
    fn transport_error_terminates() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, _) = start(&mut layer, t0, client_udp());
        assert!(layer.handle_transport_error(t0, key));
        assert_eq!(layer.state(key), None);
    }
}

mod cancel {
    use super::*;

    #[test]
    fn server_matches_a_cancel_to_its_invite() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let inv = request(Method::Invite, "z9hG4bKc1", "UDP");
        let RequestOutcome::Created(invite_key) =
            layer.handle_request(t0, inv.clone(), client_udp()).unwrap()
        else {
            panic!("expected a new transaction");
        };
        let _ = events(&mut layer);
        let mut cancel = request(Method::Cancel, "z9hG4bKc1", "UDP");
        cancel.headers.remove(&HeaderName::Contact);
        assert_eq!(layer.cancel_target(&cancel), Some(invite_key));
        let RequestOutcome::Created(cancel_key) = layer
            .handle_request(t0 + ms(10), cancel.clone(), client_udp())
            .unwrap()
        else {
            panic!("the CANCEL has its own transaction");
        };
        assert_ne!(cancel_key, invite_key);
        assert_eq!(
            events(&mut layer),
            vec![TransactionEvent::Cancel {
                key: cancel_key,
                request: cancel.clone(),
                source: client_udp(),
                invite: Some(invite_key)
            }]
        );
        // The TU answers 200 to the CANCEL and 487 to the INVITE.
        layer
            .respond(t0 + ms(10), cancel_key, response(&cancel, 200, Some("s")))
            .unwrap();
        layer
            .respond(t0 + ms(10), invite_key, response(&inv, 487, Some("s")))
            .unwrap();
        let sent: Vec<u16> = transmits(&mut layer).iter().map(sent_status).collect();
        assert_eq!(sent, vec![200, 487]);
        // A CANCEL from another sent-by or with another branch matches nothing.
        let mut stranger = cancel.clone();
        stranger.headers.set(
            HeaderName::Via,
            "SIP/2.0/UDP 192.0.2.99:5060;branch=z9hG4bKc1",
        );
        assert_eq!(layer.cancel_target(&stranger), None);
        let RequestOutcome::Created(k) = layer
            .handle_request(t0, stranger.clone(), client_udp())
            .unwrap()
        else {
            panic!("expected a new transaction");
        };
        assert_eq!(
            events(&mut layer),
            vec![TransactionEvent::Cancel {
                key: k,
                request: stranger,
                source: client_udp(),
                invite: None
            }]
        );
    }

    fn started(layer: &mut TransactionLayer, t0: Instant) -> (TransactionKey, Request) {
        let inv = invite("z9hG4bKcc1");
        let key = layer.send_request(t0, inv.clone(), udp()).unwrap();
        let _ = transmits(layer);
        (key, inv)
    }

    fn check_cancel(cancel: &Request, inv: &Request) {
        assert_eq!(cancel.method, Method::Cancel);
        assert_eq!(cancel.uri, inv.uri);
        assert_eq!(cancel.branch(), inv.branch());
        assert_eq!(cancel.headers.via().unwrap().len(), 1);
        assert_eq!(
            cancel.headers.cseq().unwrap(),
            CSeq::new(314159, Method::Cancel)
        );
        assert_eq!(
            cancel.headers.get(&HeaderName::To),
            inv.headers.get(&HeaderName::To)
        );
        assert_eq!(
            cancel.headers.get(&HeaderName::From),
            inv.headers.get(&HeaderName::From)
        );
        assert_eq!(
            cancel.headers.call_id().unwrap(),
            inv.headers.call_id().unwrap()
        );
        assert_eq!(cancel.headers.count(&HeaderName::Route), 1);
    }

    #[test]
    fn client_cancel_waits_for_a_provisional_response() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, inv) = started(&mut layer, t0);
        assert_eq!(layer.cancel(t0 + ms(10), key), Ok(CancelOutcome::Deferred));
        assert_eq!(layer.cancel(t0 + ms(20), key), Ok(CancelOutcome::Deferred));
        assert!(transmits(&mut layer).is_empty(), "no CANCEL before a 1xx");
        let ringing = response(&inv, 180, Some("b"));
        assert!(layer.handle_response(t0 + ms(100), ringing.clone()));
        let sent = transmits(&mut layer);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].destination, udp());
        check_cancel(&sent_request(&sent[0]), &inv);
        let evs = events(&mut layer);
        assert_eq!(
            evs[0],
            TransactionEvent::Response {
                key,
                response: ringing
            }
        );
        let TransactionEvent::CancelSent { invite, cancel } = evs[1] else {
            panic!("expected CancelSent, got {:?}", evs[1]);
        };
        assert_eq!(invite, key);
        assert_eq!(sent[0].key, Some(cancel));
        assert_eq!(layer.kind(cancel), Some(TransactionKind::NonInviteClient));
        assert_eq!(
            layer.cancel(t0 + ms(200), key),
            Ok(CancelOutcome::Sent(cancel))
        );
    }

    #[test]
    fn client_cancel_in_proceeding_is_sent_at_once_and_times_out_after_64_t1() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, inv) = started(&mut layer, t0);
        assert!(layer.handle_response(t0 + ms(100), response(&inv, 183, Some("b"))));
        let _ = events(&mut layer);
        let Ok(CancelOutcome::Sent(cancel)) = layer.cancel(t0 + ms(200), key) else {
            panic!("expected the CANCEL to be sent");
        };
        let sent = transmits(&mut layer);
        check_cancel(&sent_request(&sent[0]), &inv);
        assert_eq!(
            events(&mut layer),
            vec![TransactionEvent::CancelSent {
                invite: key,
                cancel
            }]
        );
        // The CANCEL's own 200 completes it; the INVITE never gets its 487.
        let cancel_req = sent_request(&sent[0]);
        assert!(layer.handle_response(t0 + ms(300), response(&cancel_req, 200, Some("b"))));
        assert_eq!(layer.state(cancel), Some(TransactionState::Completed));
        let _ = events(&mut layer);
        layer.handle_timeout(t0 + ms(200) + Duration::from_secs(32));
        let evs = events(&mut layer);
        assert!(evs.contains(&TransactionEvent::Timeout {
            key,
            timer: Timer::CancelWait
        }));
        assert!(evs.contains(&TransactionEvent::Terminated { key }));
    }

    #[test]
    fn final_response_before_the_provisional_drops_a_deferred_cancel() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let (key, inv) = started(&mut layer, t0);
        assert_eq!(layer.cancel(t0, key), Ok(CancelOutcome::Deferred));
        assert!(layer.handle_response(t0 + ms(100), response(&inv, 486, Some("b"))));
        let sent = transmits(&mut layer);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent_request(&sent[0]).method, Method::Ack);
        assert_eq!(layer.cancel(t0, key), Err(TransactionError::CancelTooLate));
    }

    #[test]
    fn cancel_needs_a_live_invite_client_transaction() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let opt = layer
            .send_request(t0, request(Method::Options, "z9hG4bKo", "UDP"), udp())
            .unwrap();
        assert_eq!(
            layer.cancel(t0, opt),
            Err(TransactionError::NotInviteClient)
        );
        let (key, inv) = started(&mut layer, t0);
        assert!(layer.handle_response(t0, response(&inv, 200, Some("b"))));
        assert_eq!(layer.cancel(t0, key), Err(TransactionError::CancelTooLate));
        layer.handle_transport_error(t0, key);
        assert_eq!(
            layer.cancel(t0, key),
            Err(TransactionError::UnknownTransaction)
        );
    }
}

mod rfc2543 {
    use super::*;

    fn legacy(method: Method) -> Request {
        request(method, "", "UDP").tap_via("SIP/2.0/UDP 192.0.2.1:5060")
    }

    trait TapVia {
        fn tap_via(self, via: &str) -> Self;
    }

    impl TapVia for Request {
        fn tap_via(mut self, via: &str) -> Self {
            self.headers.set(HeaderName::Via, via.to_owned());
            self
        }
    }

    #[test]
    fn invite_retransmission_ack_and_cancel_match_by_the_old_rules() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let inv = legacy(Method::Invite);
        let RequestOutcome::Created(key) =
            layer.handle_request(t0, inv.clone(), client_udp()).unwrap()
        else {
            panic!("expected a new transaction");
        };
        let _ = events(&mut layer);
        assert_eq!(
            layer
                .handle_request(t0 + ms(500), inv.clone(), client_udp())
                .unwrap(),
            RequestOutcome::Retransmission(key)
        );
        let mut cancel = legacy(Method::Cancel);
        cancel.headers.remove(&HeaderName::Contact);
        assert_eq!(layer.cancel_target(&cancel), Some(key));
        layer
            .respond(t0, key, response(&inv, 404, Some("srv")))
            .unwrap();
        // The ACK carries the To tag of the response.
        let ack = legacy(Method::Ack);
        let mut to = ack.headers.to().unwrap();
        to.set_tag("srv");
        let mut ack_tagged = ack.clone();
        ack_tagged.headers.set_to(&to);
        assert_eq!(
            layer
                .handle_request(t0 + ms(600), ack.clone(), client_udp())
                .unwrap(),
            RequestOutcome::AckPassed(None),
            "an ACK without the response's tag does not match"
        );
        assert_eq!(
            layer
                .handle_request(t0 + ms(600), ack_tagged, client_udp())
                .unwrap(),
            RequestOutcome::AckAbsorbed(key)
        );
        assert_eq!(layer.state(key), Some(TransactionState::Confirmed));
    }

    #[test]
    fn a_new_cseq_is_a_new_transaction_and_a_clash_is_refused() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let first = legacy(Method::Options);
        assert!(matches!(
            layer.handle_request(t0, first.clone(), client_udp()),
            Ok(RequestOutcome::Created(_))
        ));
        let mut next = first.clone();
        next.headers.set_cseq(&CSeq::new(314160, Method::Options));
        assert!(matches!(
            layer.handle_request(t0, next, client_udp()),
            Ok(RequestOutcome::Created(_))
        ));
        let mut tagged = first;
        let mut to = tagged.headers.to().unwrap();
        to.set_tag("different");
        tagged.headers.set_to(&to);
        assert_eq!(
            layer.handle_request(t0, tagged, client_udp()),
            Err(TransactionError::Duplicate)
        );
        let no_call_id = legacy(Method::Info);
        let mut no_call_id = no_call_id;
        no_call_id.headers.remove(&HeaderName::CallId);
        assert!(matches!(
            layer.handle_request(t0, no_call_id, client_udp()),
            Err(TransactionError::Header(_))
        ));
    }

    #[test]
    fn client_requests_need_an_rfc_3261_branch() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        assert_eq!(
            layer.send_request(t0, legacy(Method::Options), udp()),
            Err(TransactionError::MissingBranch)
        );
        let bare_cookie = request(Method::Options, "z9hG4bK", "UDP");
        assert_eq!(
            layer.send_request(t0, bare_cookie, udp()),
            Err(TransactionError::MissingBranch)
        );
    }
}

mod matching_and_limits {
    use super::*;

    #[test]
    fn unmatched_responses_are_reported_as_stray() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let inv = invite("z9hG4bKmine");
        layer.send_request(t0, inv.clone(), udp()).unwrap();
        let other = response(&invite("z9hG4bKother"), 200, Some("x"));
        assert!(!layer.handle_response(t0, other.clone()));
        // Same branch, other method: not ours either.
        let mut wrong_method = response(&inv, 200, Some("x"));
        wrong_method
            .headers
            .set_cseq(&CSeq::new(314159, Method::Bye));
        assert!(!layer.handle_response(t0, wrong_method.clone()));
        let mut no_via = response(&inv, 200, Some("x"));
        no_via.headers.remove(&HeaderName::Via);
        assert!(!layer.handle_response(t0, no_via.clone()));
        assert_eq!(
            events(&mut layer),
            vec![
                TransactionEvent::StrayResponse { response: other },
                TransactionEvent::StrayResponse {
                    response: wrong_method
                },
                TransactionEvent::StrayResponse { response: no_via },
            ]
        );
        let mut weird = response(&inv, 200, Some("x"));
        weird.status = 42;
        assert!(!layer.handle_response(t0, weird));
        assert!(events(&mut layer).is_empty());
    }

    #[test]
    fn send_request_refuses_bad_requests() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        layer.send_request(t0, invite("z9hG4bKdup"), udp()).unwrap();
        assert_eq!(
            layer.send_request(t0, invite("z9hG4bKdup"), udp()),
            Err(TransactionError::Duplicate)
        );
        assert_eq!(
            layer.send_request(t0, request(Method::Ack, "z9hG4bKack", "UDP"), udp()),
            Err(TransactionError::AckNotAllowed)
        );
        let mut mismatch = invite("z9hG4bKmm");
        mismatch.headers.set_cseq(&CSeq::new(1, Method::Bye));
        assert_eq!(
            layer.send_request(t0, mismatch, udp()),
            Err(TransactionError::CSeqMethodMismatch {
                method: Method::Invite,
                cseq: Method::Bye
            })
        );
        let mut no_to = invite("z9hG4bKnt");
        no_to.headers.remove(&HeaderName::To);
        assert!(matches!(
            layer.send_request(t0, no_to, udp()),
            Err(TransactionError::Header(_))
        ));
        assert_eq!(layer.len(), 1);
    }

    #[test]
    fn handle_request_refuses_unusable_requests() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let mut mismatch = invite("z9hG4bKmm");
        mismatch.headers.set_cseq(&CSeq::new(1, Method::Bye));
        assert!(matches!(
            layer.handle_request(t0, mismatch, client_udp()),
            Err(TransactionError::CSeqMethodMismatch { .. })
        ));
        let mut no_via = invite("z9hG4bKnv");
        no_via.headers.remove(&HeaderName::Via);
        assert!(matches!(
            layer.handle_request(t0, no_via, client_udp()),
            Err(TransactionError::Header(_))
        ));
        assert!(layer.is_empty());
    }

    #[test]
    fn server_requests_over_the_limit_get_a_stateless_503() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::new(TransactionConfig {
            max_transactions: 2,
            ..TransactionConfig::default()
        });
        for b in ["z9hG4bK1", "z9hG4bK2"] {
            assert!(matches!(
                layer.handle_request(t0, request(Method::Options, b, "UDP"), client_udp()),
                Ok(RequestOutcome::Created(_))
            ));
        }
        let _ = events(&mut layer);
        let third = request(Method::Options, "z9hG4bK3", "UDP");
        assert_eq!(
            layer.handle_request(t0, third, client_udp()).unwrap(),
            RequestOutcome::Rejected
        );
        let sent = transmits(&mut layer);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].key, None);
        assert_eq!(sent[0].destination, client_udp());
        let Message::Response(busy) = parsed(&sent[0]) else {
            panic!("expected a response");
        };
        assert_eq!(busy.status, 503);
        assert!(busy.headers.to_tag().is_some());
        assert!(events(&mut layer).is_empty(), "nothing for the TU");
        assert_eq!(layer.len(), 2);
        // Client requests are refused with an error.
        assert_eq!(
            layer.send_request(t0, invite("z9hG4bKc"), udp()),
            Err(TransactionError::TooManyTransactions(2))
        );
        // ACKs and retransmissions still go through.
        assert_eq!(
            layer
                .handle_request(t0, request(Method::Ack, "z9hG4bKa", "UDP"), client_udp())
                .unwrap(),
            RequestOutcome::AckPassed(None)
        );
        assert!(matches!(
            layer.handle_request(
                t0,
                request(Method::Options, "z9hG4bK1", "UDP"),
                client_udp()
            ),
            Ok(RequestOutcome::Retransmission(_))
        ));
    }

    #[test]
    fn requests_inside_a_dialog_use_a_reserve_over_the_limit() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::new(TransactionConfig {
            max_transactions: 8,
            ..TransactionConfig::default()
        });
        for n in 0..8 {
            let branch = format!("z9hG4bKnew{n}");
            assert!(matches!(
                layer.handle_request(t0, invite(&branch), client_udp()),
                Ok(RequestOutcome::Created(_))
            ));
        }
        let _ = events(&mut layer);
        // The table is full for new work: a new INVITE gets 503, our own new request an error.
        assert_eq!(
            layer
                .handle_request(t0, invite("z9hG4bKnew9"), client_udp())
                .unwrap(),
            RequestOutcome::Rejected
        );
        assert!(matches!(
            layer.send_request(t0, invite("z9hG4bKout"), udp()),
            Err(TransactionError::TooManyTransactions(8))
        ));
        let _ = transmits(&mut layer);
        // A BYE of a call in progress (its To has a tag) still gets a transaction, and so does
        // one the node sends, up to an eighth of the limit above it (one here).
        let in_dialog = |method: Method, branch: &str| {
            let mut r = request(method, branch, "UDP");
            r.headers
                .set(HeaderName::To, "Bob <sip:bob@biloxi.example.com>;tag=314");
            r
        };
        assert!(matches!(
            layer.handle_request(t0, in_dialog(Method::Bye, "z9hG4bKbye1"), client_udp()),
            Ok(RequestOutcome::Created(_))
        ));
        assert_eq!(layer.len(), 9);
        assert_eq!(
            layer
                .handle_request(t0, in_dialog(Method::Bye, "z9hG4bKbye2"), client_udp())
                .unwrap(),
            RequestOutcome::Rejected
        );
        assert!(matches!(
            layer.send_request(t0, in_dialog(Method::Bye, "z9hG4bKbye3"), udp()),
            Err(TransactionError::TooManyTransactions(8))
        ));
    }

    #[test]
    fn one_source_cannot_take_the_table_and_gets_503_then_silence() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::new(TransactionConfig {
            max_transactions: 100,
            per_source: SourceLimits {
                rate: 10,
                burst: 5,
                max_live: 8,
                max_sources: 1_000,
            },
            ..TransactionConfig::default()
        });
        layer.set_exempt_sources(vec!["198.51.100.0/24".parse().unwrap()]);
        let attacker = Peer::udp(addr("203.0.113.66:5060"));
        let mut created = 0;
        let mut answered_503 = 0;
        for i in 0..50 {
            let r = request(Method::Options, &format!("z9hG4bKf{i}"), "UDP");
            match layer.handle_request(t0, r, attacker).unwrap() {
                RequestOutcome::Created(_) => created += 1,
                RequestOutcome::Rejected => {}
                other => panic!("{other:?}"),
            }
            for t in transmits(&mut layer) {
                if let Message::Response(busy) = parsed(&t) {
                    assert_eq!(busy.status, 503);
                    assert!(busy.headers.get(&HeaderName::RetryAfter).is_some());
                    answered_503 += 1;
                }
            }
        }
        // The burst, then 503s up to the debt, then nothing at all.
        assert_eq!((created, answered_503), (5, 5));
        let stats = layer.admission_stats().sources;
        assert_eq!((stats.refused_rate, stats.dropped), (5, 40));
        // A retransmission of an admitted request is absorbed, not counted as new.
        assert!(matches!(
            layer.handle_request(t0, request(Method::Options, "z9hG4bKf0", "UDP"), attacker),
            Ok(RequestOutcome::Retransmission(_))
        ));
        // Another source and an exempt one are not affected.
        let other = Peer::udp(addr("192.0.2.77:5060"));
        assert!(matches!(
            layer.handle_request(t0, request(Method::Options, "z9hG4bKo", "UDP"), other),
            Ok(RequestOutcome::Created(_))
        ));
        let carrier = Peer::udp(addr("198.51.100.5:5060"));
        for i in 0..20 {
            let r = request(Method::Options, &format!("z9hG4bKc{i}"), "UDP");
            assert!(matches!(
                layer.handle_request(t0, r, carrier),
                Ok(RequestOutcome::Created(_))
            ));
        }
        // The share: at a slow rate the attacker still holds at most max_live at once.
        let mut t = t0;
        let mut live = 5;
        for i in 0..20 {
            t += ms(2_000);
            let r = request(Method::Options, &format!("z9hG4bKs{i}"), "UDP");
            if let RequestOutcome::Created(_) = layer.handle_request(t, r, attacker).unwrap() {
                live += 1;
            }
            let _ = transmits(&mut layer);
        }
        assert_eq!(live, 8);
        assert!(layer.admission_stats().sources.refused_share > 0);
    }

    #[test]
    fn keys_are_not_reused_after_termination() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        let first = layer
            .send_request(t0, request(Method::Options, "z9hG4bKa", "TCP"), tcp())
            .unwrap();
        layer.handle_transport_error(t0, first);
        let second = layer
            .send_request(t0, request(Method::Options, "z9hG4bKb", "TCP"), tcp())
            .unwrap();
        assert_ne!(first, second);
        assert_eq!(layer.state(first), None);
        assert_eq!(layer.state(second), Some(TransactionState::Trying));
        assert_eq!(
            layer.slot_count(),
            1,
            "the slot is reused under a new generation"
        );
    }

    #[test]
    fn stale_timer_entries_are_compacted() {
        let t0 = Instant::now();
        let mut layer = TransactionLayer::default();
        for i in 0..5000 {
            let key = layer
                .send_request(
                    t0,
                    request(Method::Options, &format!("z9hG4bK{i}"), "UDP"),
                    udp(),
                )
                .unwrap();
            layer.handle_transport_error(t0, key);
        }
        assert!(layer.is_empty());
        assert!(
            layer.timer_entries() <= STALE_LIMIT,
            "{} entries",
            layer.timer_entries()
        );
        assert_eq!(layer.poll_timeout(), None);
        assert_eq!(layer.timer_entries(), 0);
    }

    const STALE_LIMIT: usize = 2 * 1024 + 2;

    #[test]
    fn stateless_sends_are_queued_as_given() {
        let mut layer = TransactionLayer::default();
        let inv = invite("z9hG4bKs");
        let ack = Request::new(Method::Ack, inv.uri.clone());
        layer.send_stateless(udp(), ack.clone());
        let sent = transmits(&mut layer);
        assert_eq!(sent[0].key, None);
        assert_eq!(sent[0].payload, ack.to_bytes());
        assert_eq!(sent[0].destination, udp());
    }

    #[test]
    fn extreme_timer_values_do_not_panic_or_spin() {
        let t0 = Instant::now();
        for timers in [
            TimerConfig {
                t1: Duration::ZERO,
                t2: Duration::ZERO,
                t4: Duration::ZERO,
            },
            TimerConfig {
                t1: Duration::MAX,
                t2: Duration::MAX,
                t4: Duration::MAX,
            },
        ] {
            let mut layer = TransactionLayer::new(TransactionConfig {
                timers,
                ..TransactionConfig::default()
            });
            let inv = invite("z9hG4bKx");
            let key = layer.send_request(t0, inv.clone(), udp()).unwrap();
            layer.handle_timeout(t0 + Duration::from_secs(3600));
            assert!(
                layer.handle_response(t0, response(&inv, 486, Some("t")))
                    || layer.state(key).is_none()
            );
            layer.handle_timeout(t0 + Duration::from_secs(7200));
            let _ = (transmits(&mut layer), events(&mut layer));
        }
    }
}
