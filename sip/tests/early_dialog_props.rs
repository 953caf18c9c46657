//! Property test: early dialogs never outlive their INVITE. A caller's INVITE reaches a
//! forking proxy whose branches answer in any order: provisional responses with their own To
//! tags, 2xx, failures, or nothing at all; the caller may cancel; the clock moves on in steps;
//! in the end the caller gives up on whatever still rings (CANCEL). Once the INVITE transaction
//! is over, the only dialogs left are the ones a 2xx confirmed (the ones the endpoint reported
//! as accepted), and when the caller's user agent removes those (its BYEs), the table is empty. Before the fix, every losing fork and every 1xx that ended in a
//! timeout left an early dialog behind until the table filled.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use thalamus_sip::dialog::{DialogId, DialogState};
use thalamus_sip::endpoint::{Endpoint, EndpointConfig, EndpointEvent};
use thalamus_sip::message::{
    CSeq, Host, Message, Method, NameAddr, Request, Response, Transport, Uri,
};
use thalamus_sip::transaction::Peer;

fn proxy() -> Peer {
    Peer::udp(SocketAddr::from(([192, 0, 2, 2], 5060)))
}

fn invite() -> Request {
    let target = Uri::parse("sip:bob@192.0.2.2").unwrap();
    let mut r = Request::new(Method::Invite, target.clone());
    let from: NameAddr = "<sip:alice@192.0.2.1>;tag=alice".parse().unwrap();
    r.headers.set_from(&from);
    r.headers.set_to(&NameAddr::new(target));
    r.headers.set_call_id("early-props@192.0.2.1");
    r.headers.set_cseq(&CSeq::new(1, Method::Invite));
    r.headers
        .push_contact(&"<sip:alice@192.0.2.1:5060>".parse().unwrap());
    r
}

#[derive(Debug, Clone)]
enum Op {
    /// Branch `fork` answers `status` (with its own To tag, except a 100).
    Answer { fork: u8, status: u16 },
    /// The caller cancels the INVITE.
    Cancel,
    /// The clock moves on (milliseconds).
    Advance(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..4, prop::sample::select(vec![100u16, 180, 183, 180, 200, 486, 487, 603]))
            .prop_map(|(fork, status)| Op::Answer { fork, status }),
        1 => Just(Op::Cancel),
        3 => (0u32..8_000).prop_map(Op::Advance),
    ]
}

/// Runs the endpoint's timers up to `to`, in the order they fall due.
fn run_timers(e: &mut Endpoint, now: &mut Instant, to: Instant) {
    while let Some(at) = e.poll_timeout() {
        if at > to {
            break;
        }
        *now = at.max(*now);
        e.handle_timeout(*now);
    }
    *now = to;
    e.handle_timeout(*now);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn early_dialogs_end_with_their_invite(ops in prop::collection::vec(op(), 1..40)) {
        let mut e = Endpoint::new(EndpointConfig::default());
        e.set_sent_by(Transport::Udp, Host::Ipv4([192, 0, 2, 1].into()), 5060);
        let t0 = Instant::now();
        let mut now = t0;
        let key = e.send_request(now, invite(), proxy()).unwrap();
        // The INVITE as it went out (with its Via), to answer it.
        let sent = std::iter::from_fn(|| e.poll_transmit())
            .find_map(|t| match Message::parse(t.payload).ok()? {
                Message::Request(r) if r.method == Method::Invite => Some(r),
                _ => None,
            })
            .unwrap();
        let mut accepted: BTreeSet<DialogId> = BTreeSet::new();
        let drain = |e: &mut Endpoint, accepted: &mut BTreeSet<DialogId>| {
            while e.poll_transmit().is_some() {}
            while let Some(event) = e.poll_event() {
                if let EndpointEvent::Response { response, dialog: Some(d), .. } = event {
                    if response.is_success() {
                        accepted.insert(d);
                    }
                }
            }
        };
        for op in ops {
            match op {
                Op::Answer { fork, status } => {
                    let mut r = Response::from_request(&sent, status, None);
                    if status != 100 {
                        r.set_to_tag(&format!("fork{fork}"));
                        r.headers
                            .push_contact(&format!("<sip:bob@192.0.2.{}:5060>", 10 + fork).parse().unwrap());
                    }
                    e.handle_message(now, Message::Response(r), proxy());
                }
                Op::Cancel => {
                    let _ = e.cancel(now, key);
                }
                Op::Advance(ms) => {
                    let to = now + Duration::from_millis(u64::from(ms));
                    run_timers(&mut e, &mut now, to);
                }
            }
            drain(&mut e, &mut accepted);
            // Whatever happens, the table holds nothing but this call's dialogs.
            prop_assert!(e.dialogs().len() <= 4);
        }
        // The caller gives up on what still rings (a user agent's no-answer time, a device's
        // hangup): CANCEL. An INVITE in Proceeding has no timer of its own (RFC 3261 section
        // 17.1.1.2); after a CANCEL it ends with the 487 or, without one, 64*T1 later
        // (section 9.1). Long after, the INVITE transaction is over however it went.
        let _ = e.cancel(now, key);
        drain(&mut e, &mut accepted);
        let to = now + Duration::from_secs(300);
        run_timers(&mut e, &mut now, to);
        drain(&mut e, &mut accepted);
        let left: BTreeSet<DialogId> = e.dialogs().iter().map(|d| d.id().clone()).collect();
        for d in e.dialogs().iter() {
            prop_assert_eq!(d.state(), DialogState::Confirmed, "{:?} outlived its INVITE", d.id());
        }
        prop_assert_eq!(&left, &accepted);
        // The caller hangs up the calls that were answered: nothing is left.
        for id in &accepted {
            e.remove_dialog(id);
        }
        prop_assert!(e.dialogs().is_empty());
    }
}
