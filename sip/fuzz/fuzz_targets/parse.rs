//! Fuzz target: parse arbitrary bytes as a SIP datagram; whatever parses must serialize, parse
//! again to an equal message (with Content-Length made exact) and serialize to the same bytes.
//! Typed accessors, validation and stream framing must never panic.
//!
//! Run with `cargo fuzz run parse` from `sip/` (seed corpus: `testdata/rfc4475/*.dat`).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use thalamus_sip::message::{
    check, validate_request, validate_response, Message, ParseLimits, StreamFramer,
};

fn exercise(m: &Message) {
    let h = m.headers();
    let _ = (h.via(), h.top_via(), h.top_via_branch(), h.from(), h.to(), h.from_tag(), h.to_tag());
    let _ = (h.call_id(), h.cseq(), h.max_forwards(), h.contact(), h.route(), h.record_route());
    let _ = (h.content_length(), h.content_type(), h.expires(), h.allow(), h.supported());
    let _ = (h.require(), h.proxy_require(), h.unsupported());
    let _ = (h.authorization(), h.proxy_authorization(), h.www_authenticate(), h.proxy_authenticate());
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
    for _ in 0..16 {
        match framer.next_item() {
            Ok(Some(thalamus_sip::message::StreamItem::Message(m))) => exercise(&m),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
});
