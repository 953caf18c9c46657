//! Fuzz target `sip_message`: arbitrary bytes as a SIP datagram (`Message::parse`) and as a TCP
//! byte stream (`StreamFramer`, fed whole and in two chunks).
//!
//! Checks: nothing panics; a datagram that parses serializes, parses again to an equal message
//! (with Content-Length made exact) and serializes to the same bytes; typed header accessors,
//! validation and error responses never panic; the framer stops (each item consumes bytes or
//! the framer fails for good). It does not check that parse results are RFC-correct (the RFC 4475
//! torture tests in sip/tests do that).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use thalamus_sip::message::{
    check, validate_request, validate_response, Message, ParseLimits, StreamFramer, StreamItem,
};

fn exercise(m: &Message) {
    let h = m.headers();
    let _ = (
        h.via(),
        h.top_via(),
        h.top_via_branch(),
        h.from(),
        h.to(),
        h.from_tag(),
        h.to_tag(),
    );
    let _ = (
        h.call_id(),
        h.cseq(),
        h.max_forwards(),
        h.contact(),
        h.route(),
        h.record_route(),
    );
    let _ = (
        h.content_length(),
        h.content_type(),
        h.expires(),
        h.allow(),
        h.supported(),
    );
    let _ = (h.require(), h.proxy_require(), h.unsupported());
    let _ = (
        h.authorization(),
        h.proxy_authorization(),
        h.www_authenticate(),
        h.proxy_authenticate(),
    );
    match m {
        Message::Request(r) => {
            if let Err(e) = validate_request(r) {
                let _ = e.response(r);
            }
        }
        Message::Response(r) => {
            let _ = validate_response(r);
        }
    }
}

/// Drains a framer; at most `limit` items so that a stream of keep-alives stays cheap.
fn drain(framer: &mut StreamFramer, limit: usize) {
    for _ in 0..limit {
        let before = framer.buffered();
        match framer.next_item() {
            Ok(Some(item)) => {
                assert!(framer.buffered() < before, "an item consumed nothing");
                if let StreamItem::Message(m) = item {
                    exercise(&m);
                }
            }
            Ok(None) => break,
            // A malformed message was consumed: the framer reads on.
            Err(thalamus_sip::message::StreamError::Message(e)) => {
                assert!(
                    framer.buffered() < before,
                    "a malformed message consumed nothing"
                );
                let _ = e.response();
            }
            Err(thalamus_sip::message::StreamError::Framing(_)) => {
                assert!(framer.next_item().is_err(), "a framing error did not stick");
                break;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    match Message::parse(Bytes::copy_from_slice(data)) {
        Ok(m) => {
            exercise(&m);
            let out = m.to_bytes();
            let again = match Message::parse(out.clone()) {
                Ok(a) => a,
                Err(e) => panic!("serialized message does not reparse: {e}"),
            };
            let mut expected = m.clone();
            expected.fix_content_length();
            assert_eq!(again, expected, "round trip changed the message");
            assert_eq!(again.to_bytes(), out, "serialization is not stable");
        }
        Err(e) => {
            let _ = e.response();
        }
    }

    let limits = ParseLimits::default();
    let _ = check(data, &limits);

    let mut framer = StreamFramer::new(limits);
    framer.push(data);
    drain(&mut framer, 64);

    // The same bytes arriving in two reads, split where the first byte says.
    let split = data
        .first()
        .map_or(0, |&b| usize::from(b) % (data.len() + 1));
    let (first, second) = data.split_at(split);
    let mut framer = StreamFramer::new(limits);
    framer.push(first);
    drain(&mut framer, 64);
    framer.push(second);
    drain(&mut framer, 64);
});
