//! Messages shaped like those of a real call (Alice calls Bob through two record-routing
//! proxies), shared by the unit tests of the dialog module.

use crate::message::{Message, NameAddr, Request, Response};

/// Parses a request written with LF line ends.
pub(crate) fn request(text: &str) -> Request {
    match Message::parse(text.replace('\n', "\r\n")).unwrap() {
        Message::Request(r) => r,
        Message::Response(_) => panic!("not a request"),
    }
}

/// Parses a response written with LF line ends.
pub(crate) fn response(text: &str) -> Response {
    match Message::parse(text.replace('\n', "\r\n")).unwrap() {
        Message::Response(r) => r,
        Message::Request(_) => panic!("not a response"),
    }
}

/// The INVITE Alice (our UAC) sends.
pub(crate) const INVITE: &str = "INVITE sip:bob@biloxi.example.com SIP/2.0
Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bKnashds8
Max-Forwards: 70
To: Bob <sip:bob@biloxi.example.com>
From: \"Alice A.\" <sip:alice@atlanta.example.com>;tag=1928301774
Call-ID: a84b4c76e66710@pc33.atlanta.example.com
CSeq: 314159 INVITE
Contact: <sip:alice@pc33.atlanta.example.com>
Content-Length: 0

";

/// The INVITE as Bob (our UAS) receives it, after proxies p1 then p2 record-routed.
pub(crate) const INVITE_AT_BOB: &str = "INVITE sip:bob@192.0.2.4 SIP/2.0
Via: SIP/2.0/UDP p2.example.com;branch=z9hG4bKp2
Via: SIP/2.0/UDP p1.example.com;branch=z9hG4bKp1
Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bKnashds8
Max-Forwards: 68
Record-Route: <sip:p2.example.com;lr>
Record-Route: <sip:p1.example.com;lr>
To: Bob <sip:bob@biloxi.example.com>
From: \"Alice A.\" <sip:alice@atlanta.example.com>;tag=1928301774
Call-ID: a84b4c76e66710@pc33.atlanta.example.com
CSeq: 314159 INVITE
Contact: <sip:alice@pc33.atlanta.example.com>
Content-Length: 0

";

/// A response to [`INVITE`] from Bob, with `status`, Bob's tag `tag`, and `extra` header lines
/// (Record-Route, Contact...).
pub(crate) fn invite_response(status: u16, tag: &str, extra: &str) -> Response {
    response(&format!(
        "SIP/2.0 {status} Whatever
Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bKnashds8
To: Bob <sip:bob@biloxi.example.com>;tag={tag}
From: \"Alice A.\" <sip:alice@atlanta.example.com>;tag=1928301774
Call-ID: a84b4c76e66710@pc33.atlanta.example.com
CSeq: 314159 INVITE
{extra}Content-Length: 0

"
    ))
}

/// The 200 OK Bob answers through both proxies: Record-Route as in the request (p2 on top).
pub(crate) fn ok_with_record_route() -> Response {
    invite_response(
        200,
        "a6c85cf",
        "Record-Route: <sip:p2.example.com;lr>\nRecord-Route: <sip:p1.example.com;lr>\nContact: <sip:bob@192.0.2.4>\n",
    )
}

/// Bob's Contact.
pub(crate) fn bob_contact() -> NameAddr {
    NameAddr::parse("<sip:bob@192.0.2.4>").unwrap()
}

/// A request Bob sends to Alice within the dialog created by [`ok_with_record_route`].
pub(crate) fn from_bob(method: &str, cseq: u32, extra: &str) -> Request {
    request(&format!(
        "{method} sip:alice@pc33.atlanta.example.com SIP/2.0
Via: SIP/2.0/UDP 192.0.2.4;branch=z9hG4bKbob{cseq}{method}
Max-Forwards: 70
Route: <sip:p2.example.com;lr>, <sip:p1.example.com;lr>
From: Bob <sip:bob@biloxi.example.com>;tag=a6c85cf
To: \"Alice A.\" <sip:alice@atlanta.example.com>;tag=1928301774
Call-ID: a84b4c76e66710@pc33.atlanta.example.com
CSeq: {cseq} {method}
{extra}Content-Length: 0

"
    ))
}

/// A request Alice sends to Bob (our UAS) within the dialog created from [`INVITE_AT_BOB`]
/// with our tag `bob_tag`.
pub(crate) fn from_alice(method: &str, cseq: u32, bob_tag: &str, extra: &str) -> Request {
    request(&format!(
        "{method} sip:bob@192.0.2.4 SIP/2.0
Via: SIP/2.0/UDP p2.example.com;branch=z9hG4bKp2{cseq}{method}
Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bKal{cseq}{method}
Max-Forwards: 69
To: Bob <sip:bob@biloxi.example.com>;tag={bob_tag}
From: \"Alice A.\" <sip:alice@atlanta.example.com>;tag=1928301774
Call-ID: a84b4c76e66710@pc33.atlanta.example.com
CSeq: {cseq} {method}
{extra}Content-Length: 0

"
    ))
}

/// `r` serialized, with `from` replaced by `to`, parsed again.
pub(crate) fn edit_request(r: &Request, from: &str, to: &str) -> Request {
    let text = String::from_utf8(r.to_bytes().to_vec()).unwrap();
    request(&text.replace(from, to).replace("\r\n", "\n"))
}

/// `r` serialized, with `from` replaced by `to`, parsed again.
pub(crate) fn edit_response(r: &Response, from: &str, to: &str) -> Response {
    let text = String::from_utf8(r.to_bytes().to_vec()).unwrap();
    response(&text.replace(from, to).replace("\r\n", "\n"))
}
