//! SIP message model, parser and serializer (RFC 3261 sections 7, 19, 20 and 25).
//!
//! * Model: [`Message`] = [`Request`] | [`Response`], each with an ordered [`Headers`] list of raw
//!   values (zero-copy [`bytes::Bytes`] slices of the received buffer) and a `Bytes` body.
//! * Typed views are parsed lazily by accessors on [`Headers`]: [`Headers::via`],
//!   [`Headers::top_via`], [`Headers::from`], [`Headers::to`], [`Headers::call_id`],
//!   [`Headers::cseq`], [`Headers::contact`], [`Headers::route`], [`Headers::authorization`]...
//! * Parsing: [`Message::parse`] for a datagram, [`check`] / [`StreamFramer`] for TCP/TLS
//!   streams framed by Content-Length; bounded by [`ParseLimits`].
//! * Serializing: [`Message::to_bytes`] / [`Message::write_to`], always with a correct
//!   Content-Length.
//! * Validation, separate from parsing: [`validate_request`] / [`validate_response`], whose
//!   [`ValidationError`] carries the status to answer (400, 505, 501...).
//! * Helpers for transactions and dialogs: [`Request::branch`], [`is_rfc3261_branch`],
//!   [`Response::from_request`], [`Response::set_to_tag`], [`generate_tag`], [`generate_branch`],
//!   [`generate_call_id`].
//!
//! This module does no I/O, keeps no transaction or dialog state, does not resolve addresses and
//! does not interpret bodies (see the `sdp` module).
#![warn(missing_docs)]

mod auth;
mod framing;
mod header;
mod ids;
mod method;
mod name_addr;
mod params;
mod parser;
mod syntax;
mod typed;
mod uri;
mod validate;
mod via;
mod writer;

use std::fmt::{self, Write as _};

use bytes::{Bytes, BytesMut};

pub use auth::{AuthError, AuthParam, Challenge, Credentials};
pub use framing::{check, FramingError, StreamError, StreamFrame, StreamFramer, StreamItem};
pub use header::{Header, HeaderName, HeaderValue, Headers, InvalidHeaderName, OtherHeaderName};
pub use ids::{generate_branch, generate_call_id, generate_tag};
pub use method::{InvalidMethod, Method};
pub use name_addr::{Contact, NameAddr, NameAddrError};
pub use params::{Param, Params};
pub use parser::{ParseError, ParseErrorKind, ParseLimits};
pub use typed::{CSeq, HeaderError, MediaType};
pub use uri::{AbsoluteUri, Host, SipUri, TelUri, Uri, UriError, UriHeader};
pub use validate::{validate_request, validate_response, ValidationError};
pub use via::{is_rfc3261_branch, Rport, Transport, Via, ViaError, BRANCH_MAGIC_COOKIE};

/// A SIP protocol version (`SIP/2.0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version {
    /// Major number.
    pub major: u16,
    /// Minor number.
    pub minor: u16,
}

impl Version {
    /// `SIP/2.0`, the only version this crate speaks.
    pub const SIP_2_0: Version = Version { major: 2, minor: 0 };
}

impl Default for Version {
    fn default() -> Self {
        Self::SIP_2_0
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SIP/{}.{}", self.major, self.minor)
    }
}

/// A SIP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method.
    pub method: Method,
    /// Request-URI.
    pub uri: Uri,
    /// Protocol version (checked by [`validate_request`], not by the parser).
    pub version: Version,
    /// Header fields in order.
    pub headers: Headers,
    /// Body (may be binary).
    pub body: Bytes,
}

/// A SIP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Protocol version.
    pub version: Version,
    /// Status code, 100 to 699.
    pub status: u16,
    /// Reason phrase (may be empty; non-UTF-8 bytes are replaced when parsing).
    pub reason: String,
    /// Header fields in order.
    pub headers: Headers,
    /// Body (may be binary).
    pub body: Bytes,
}

/// A SIP request or response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A request.
    Request(Request),
    /// A response.
    Response(Response),
}

impl Request {
    /// A SIP/2.0 request without headers or body.
    pub fn new(method: Method, uri: Uri) -> Self {
        Self {
            method,
            uri,
            version: Version::SIP_2_0,
            headers: Headers::new(),
            body: Bytes::new(),
        }
    }

    /// The branch of the top Via (the transaction identifier), without allocating.
    pub fn branch(&self) -> Option<&str> {
        self.headers.top_via_branch()
    }

    /// Sets the body and its Content-Type (removed when `content_type` is `None` and the body is
    /// empty). Content-Length is written by the serializer.
    pub fn set_body(&mut self, body: Bytes, content_type: Option<&MediaType>) {
        set_body(&mut self.headers, &mut self.body, body, content_type);
    }

    /// Starts a request of `method` that reuses this request's Request-URI, top Via value,
    /// From, Call-ID, Route headers and CSeq number, with Max-Forwards 70.
    fn derived(&self, method: Method, to: Option<&HeaderValue>) -> Result<Request, HeaderError> {
        let cseq = self.headers.cseq()?;
        let top_via = self
            .headers
            .top_via_value()
            .ok_or(HeaderError::Missing(HeaderName::Via))?;
        let mut out = Request::new(method.clone(), self.uri.clone());
        out.version = self.version;
        out.headers.push(HeaderName::Via, top_via);
        out.headers.set_max_forwards(70);
        let to = match to {
            Some(v) => v.clone(),
            None => self
                .headers
                .get(&HeaderName::To)
                .cloned()
                .ok_or(HeaderError::Missing(HeaderName::To))?,
        };
        out.headers.push(HeaderName::To, to);
        let from = self
            .headers
            .get(&HeaderName::From)
            .ok_or(HeaderError::Missing(HeaderName::From))?;
        out.headers.push(HeaderName::From, from.clone());
        out.headers.set_call_id(self.headers.call_id()?);
        out.headers.set_cseq(&CSeq::new(cseq.seq, method));
        for route in self.headers.get_all(&HeaderName::Route) {
            out.headers.push(HeaderName::Route, route.clone());
        }
        Ok(out)
    }

    /// The CANCEL for this request (RFC 3261 section 9.1): same Request-URI, Call-ID, To, From
    /// and CSeq number, the top Via value only, and the Route headers.
    pub fn cancel(&self) -> Result<Request, HeaderError> {
        self.derived(Method::Cancel, None)
    }

    /// The ACK a client transaction sends for a non-2xx final response to this INVITE (RFC 3261
    /// section 17.1.1.3): like [`Request::cancel`] but with the To header of the response (which
    /// carries the remote tag). The ACK for a 2xx is built by the dialog layer instead.
    pub fn ack_for(&self, response: &Response) -> Result<Request, HeaderError> {
        let to = response
            .headers
            .get(&HeaderName::To)
            .ok_or(HeaderError::Missing(HeaderName::To))?;
        self.derived(Method::Ack, Some(to))
    }

    /// Appends the serialized request to `out`.
    pub fn write_to(&self, out: &mut BytesMut) {
        writer::write_message(
            |o| {
                // Writing into a BytesMut cannot fail: it grows as needed.
                let _ = write!(o, "{} {} {}", self.method, self.uri, self.version);
            },
            &self.headers,
            &self.body,
            out,
        );
    }

    /// The serialized request.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.write_to(&mut out);
        out.freeze()
    }
}

fn set_body(
    headers: &mut Headers,
    slot: &mut Bytes,
    body: Bytes,
    content_type: Option<&MediaType>,
) {
    match content_type {
        Some(ct) => headers.set_content_type(ct),
        None if body.is_empty() => {
            headers.remove(&HeaderName::ContentType);
        }
        None => {}
    }
    *slot = body;
    headers.set_content_length(slot.len());
}

impl Response {
    /// A SIP/2.0 response with the standard reason phrase and no headers.
    pub fn new(status: u16) -> Self {
        Self {
            version: Version::SIP_2_0,
            status,
            reason: reason_phrase(status).to_owned(),
            headers: Headers::new(),
            body: Bytes::new(),
        }
    }

    /// A response to `req` (RFC 3261 section 8.2.6.2): copies every Via (in order), From, To,
    /// Call-ID and CSeq, plus Timestamp for a 100. `reason` defaults to the standard phrase. Add
    /// a To tag with [`Response::set_to_tag`] when the response needs one.
    pub fn from_request(req: &Request, status: u16, reason: Option<&str>) -> Self {
        Self::from_headers(
            &req.headers,
            status,
            reason.unwrap_or(reason_phrase(status)),
        )
    }

    pub(crate) fn from_headers(headers: &Headers, status: u16, reason: &str) -> Self {
        let mut out = Headers::with_capacity(8);
        for h in headers {
            let copy = match h.name {
                HeaderName::Via
                | HeaderName::From
                | HeaderName::To
                | HeaderName::CallId
                | HeaderName::CSeq => true,
                HeaderName::Timestamp => status == 100,
                _ => false,
            };
            if copy {
                out.push(h.name.clone(), h.value.clone());
            }
        }
        Self {
            version: Version::SIP_2_0,
            status,
            reason: reason.replace(['\r', '\n'], " "),
            headers: out,
            body: Bytes::new(),
        }
    }

    /// Adds `;tag=<tag>` to the To header unless it already has a tag. Returns true when the
    /// tag was added (false when To is absent or already tagged).
    pub fn set_to_tag(&mut self, tag: &str) -> bool {
        if self.headers.to_tag().is_some() {
            return false;
        }
        let Some(to) = self.headers.get(&HeaderName::To) else {
            return false;
        };
        let mut value = to.as_bytes().to_vec();
        value.extend_from_slice(b";tag=");
        value.extend_from_slice(tag.as_bytes());
        self.headers
            .set(HeaderName::To, HeaderValue::from_bytes(Bytes::from(value)));
        true
    }

    /// Sets the body and its Content-Type (see [`Request::set_body`]).
    pub fn set_body(&mut self, body: Bytes, content_type: Option<&MediaType>) {
        set_body(&mut self.headers, &mut self.body, body, content_type);
    }

    /// 1xx.
    pub fn is_provisional(&self) -> bool {
        (100..200).contains(&self.status)
    }

    /// 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// 200 to 699.
    pub fn is_final(&self) -> bool {
        self.status >= 200
    }

    /// Appends the serialized response to `out`.
    pub fn write_to(&self, out: &mut BytesMut) {
        writer::write_message(
            |o| {
                // Writing into a BytesMut cannot fail: it grows as needed.
                let _ = write!(o, "{} {} {}", self.version, self.status, self.reason);
            },
            &self.headers,
            &self.body,
            out,
        );
    }

    /// The serialized response.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.write_to(&mut out);
        out.freeze()
    }
}

impl Message {
    /// The header fields.
    pub fn headers(&self) -> &Headers {
        match self {
            Message::Request(r) => &r.headers,
            Message::Response(r) => &r.headers,
        }
    }

    /// Mutable header fields.
    pub fn headers_mut(&mut self) -> &mut Headers {
        match self {
            Message::Request(r) => &mut r.headers,
            Message::Response(r) => &mut r.headers,
        }
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        match self {
            Message::Request(r) => &r.body,
            Message::Response(r) => &r.body,
        }
    }

    /// The protocol version.
    pub fn version(&self) -> Version {
        match self {
            Message::Request(r) => r.version,
            Message::Response(r) => r.version,
        }
    }

    /// The request, if this is one.
    pub fn as_request(&self) -> Option<&Request> {
        match self {
            Message::Request(r) => Some(r),
            Message::Response(_) => None,
        }
    }

    /// The response, if this is one.
    pub fn as_response(&self) -> Option<&Response> {
        match self {
            Message::Request(_) => None,
            Message::Response(r) => Some(r),
        }
    }

    /// Makes the Content-Length header what the serializer writes: the body length, in place of
    /// the first Content-Length header (others removed), or appended. After this,
    /// `Message::parse(m.to_bytes()) == Ok(m)` for any parsed message `m`.
    pub fn fix_content_length(&mut self) {
        let len = self.body().len();
        self.headers_mut().set_content_length(len);
    }

    /// Appends the serialized message to `out`.
    pub fn write_to(&self, out: &mut BytesMut) {
        match self {
            Message::Request(r) => r.write_to(out),
            Message::Response(r) => r.write_to(out),
        }
    }

    /// The serialized message.
    pub fn to_bytes(&self) -> Bytes {
        match self {
            Message::Request(r) => r.to_bytes(),
            Message::Response(r) => r.to_bytes(),
        }
    }
}

impl From<Request> for Message {
    fn from(r: Request) -> Self {
        Message::Request(r)
    }
}

impl From<Response> for Message {
    fn from(r: Response) -> Self {
        Message::Response(r)
    }
}

/// The standard reason phrase of a status code (RFC 3261 section 21 and later RFCs), or a
/// generic one for the class.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Trying",
        180 => "Ringing",
        181 => "Call Is Being Forwarded",
        182 => "Queued",
        183 => "Session Progress",
        199 => "Early Dialog Terminated",
        200 => "OK",
        202 => "Accepted",
        204 => "No Notification",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Moved Temporarily",
        305 => "Use Proxy",
        380 => "Alternative Service",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        410 => "Gone",
        412 => "Conditional Request Failed",
        413 => "Request Entity Too Large",
        414 => "Request-URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Unsupported URI Scheme",
        420 => "Bad Extension",
        421 => "Extension Required",
        422 => "Session Interval Too Small",
        423 => "Interval Too Brief",
        428 => "Use Identity Header",
        429 => "Provide Referrer Identity",
        430 => "Flow Failed",
        433 => "Anonymity Disallowed",
        436 => "Bad Identity-Info",
        437 => "Unsupported Certificate",
        438 => "Invalid Identity Header",
        439 => "First Hop Lacks Outbound Support",
        440 => "Max-Breadth Exceeded",
        469 => "Bad Info Package",
        470 => "Consent Needed",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        482 => "Loop Detected",
        483 => "Too Many Hops",
        484 => "Address Incomplete",
        485 => "Ambiguous",
        486 => "Busy Here",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        489 => "Bad Event",
        491 => "Request Pending",
        493 => "Undecipherable",
        494 => "Security Agreement Required",
        500 => "Server Internal Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Server Time-out",
        505 => "Version Not Supported",
        513 => "Message Too Large",
        555 => "Push Notification Service Not Supported",
        580 => "Precondition Failure",
        600 => "Busy Everywhere",
        603 => "Decline",
        604 => "Does Not Exist Anywhere",
        606 => "Not Acceptable",
        607 => "Unwanted",
        608 => "Rejected",
        _ => match status / 100 {
            1 => "Provisional",
            2 => "Success",
            3 => "Redirection",
            4 => "Client Error",
            5 => "Server Error",
            _ => "Global Failure",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request {
        let mut r = Request::new(Method::Invite, Uri::parse("sip:bob@biloxi.com").unwrap());
        r.headers.push(
            HeaderName::Via,
            "SIP/2.0/UDP pc33.atlanta.com;branch=z9hG4bKnashds8",
        );
        r.headers.push(
            HeaderName::Via,
            "SIP/2.0/UDP bigbox3.site3.atlanta.com;branch=z9hG4bK77ef4c2312983.1",
        );
        r.headers.set_max_forwards(70);
        r.headers.push(HeaderName::To, "Bob <sip:bob@biloxi.com>");
        r.headers.push(
            HeaderName::From,
            "Alice <sip:alice@atlanta.com>;tag=1928301774",
        );
        r.headers.set_call_id("a84b4c76e66710");
        r.headers.set_cseq(&CSeq::new(314159, Method::Invite));
        r.headers.push(HeaderName::Timestamp, "54");
        r.headers.push(HeaderName::Subject, "lunch");
        r
    }

    #[test]
    fn serializes_with_content_length() {
        let mut r = request();
        r.set_body(Bytes::from_static(b"v=0\r\n"), Some(&MediaType::sdp()));
        let bytes = r.to_bytes();
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.starts_with("INVITE sip:bob@biloxi.com SIP/2.0\r\nVia: SIP/2.0/UDP pc33"));
        assert!(
            text.contains("\r\nContent-Type: application/sdp\r\nContent-Length: 5\r\n\r\nv=0\r\n")
        );
        let parsed = Message::parse(bytes).unwrap();
        assert_eq!(parsed, Message::Request(r));
    }

    #[test]
    fn serializer_corrects_a_wrong_content_length() {
        let mut r = request();
        r.headers.set_content_length(99);
        r.headers.push(HeaderName::ContentLength, "98");
        r.body = Bytes::from_static(b"abc");
        let text = String::from_utf8(r.to_bytes().to_vec()).unwrap();
        assert_eq!(text.matches("Content-Length").count(), 1);
        assert!(text.contains("Content-Length: 3\r\n"));
        let mut m = Message::Request(r);
        let reparsed = Message::parse(m.to_bytes()).unwrap();
        m.fix_content_length();
        assert_eq!(reparsed, m);
    }

    #[test]
    fn response_from_request() {
        let req = request();
        let mut trying = Response::from_request(&req, 100, None);
        assert_eq!(trying.reason, "Trying");
        assert!(trying.headers.contains(&HeaderName::Timestamp));
        assert!(!trying.headers.contains(&HeaderName::Subject));
        assert!(!trying.headers.contains(&HeaderName::MaxForwards));
        assert_eq!(trying.headers.via().unwrap().len(), 2);
        assert!(trying.is_provisional() && !trying.is_final());
        let mut ok = Response::from_request(&req, 200, Some("Fine\r\nX: y"));
        assert_eq!(ok.reason, "Fine  X: y");
        assert!(!ok.headers.contains(&HeaderName::Timestamp));
        assert!(ok.set_to_tag("a6c85cf"));
        assert!(!ok.set_to_tag("other"));
        assert_eq!(ok.headers.to_tag(), Some("a6c85cf"));
        assert_eq!(ok.headers.from_tag(), Some("1928301774"));
        assert_eq!(
            ok.headers.cseq().unwrap(),
            CSeq::new(314159, Method::Invite)
        );
        assert!(ok.is_success());
        let bytes = ok.to_bytes();
        assert!(bytes.starts_with(b"SIP/2.0 200 Fine  X: y\r\nVia: "));
        let mut m = Message::Response(ok);
        m.fix_content_length();
        assert_eq!(Message::parse(bytes).unwrap(), m);
        trying.headers.remove(&HeaderName::To);
        assert!(!trying.set_to_tag("t"));
    }

    #[test]
    fn cancel_and_ack() {
        let mut invite = request();
        invite
            .headers
            .push(HeaderName::Route, "<sip:p1.example.com;lr>");
        invite
            .headers
            .push(HeaderName::Contact, "<sip:alice@pc33.atlanta.com>");
        let cancel = invite.cancel().unwrap();
        assert_eq!(cancel.method, Method::Cancel);
        assert_eq!(cancel.uri, invite.uri);
        assert_eq!(cancel.headers.count(&HeaderName::Via), 1);
        assert_eq!(cancel.branch(), invite.branch());
        assert_eq!(
            cancel.headers.cseq().unwrap(),
            CSeq::new(314159, Method::Cancel)
        );
        assert_eq!(
            cancel.headers.get(&HeaderName::To),
            invite.headers.get(&HeaderName::To)
        );
        assert_eq!(cancel.headers.from_tag(), Some("1928301774"));
        assert_eq!(cancel.headers.call_id().unwrap(), "a84b4c76e66710");
        assert_eq!(cancel.headers.route().unwrap().len(), 1);
        assert!(!cancel.headers.contains(&HeaderName::Contact));
        assert_eq!(validate_request(&cancel), Ok(()));
        let mut busy = Response::from_request(&invite, 486, None);
        busy.set_to_tag("x9");
        let ack = invite.ack_for(&busy).unwrap();
        assert_eq!(ack.method, Method::Ack);
        assert_eq!(ack.headers.to_tag(), Some("x9"));
        assert_eq!(ack.headers.cseq().unwrap(), CSeq::new(314159, Method::Ack));
        assert_eq!(ack.branch(), invite.branch());
        assert_eq!(validate_request(&ack), Ok(()));
        let mut no_via = invite.clone();
        no_via.headers.remove(&HeaderName::Via);
        assert_eq!(no_via.cancel(), Err(HeaderError::Missing(HeaderName::Via)));
    }

    #[test]
    fn reason_phrases() {
        assert_eq!(reason_phrase(486), "Busy Here");
        assert_eq!(reason_phrase(499), "Client Error");
        assert_eq!(Response::new(505).reason, "Version Not Supported");
        assert_eq!(Version::SIP_2_0.to_string(), "SIP/2.0");
    }
}
