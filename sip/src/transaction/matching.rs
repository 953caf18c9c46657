//! Transaction identifiers: what matches a message to its transaction.
//!
//! * [`ClientId`]: top Via branch + CSeq method (RFC 3261 section 17.1.3).
//! * [`ServerId`]: top Via branch + sent-by + method, ACK counting as INVITE (section 17.2.3).
//! * [`LegacyId`]: the RFC 2543 fallback of section 17.2.3 for requests whose branch lacks the
//!   `z9hG4bK` cookie: Request-URI, From tag, Call-ID, CSeq number, method and top Via; the To
//!   tag is compared separately (it differs between an INVITE and the ACK of its response).
//!
//! The CANCEL and the ACK of a non-2xx are built by the message model ([`Request::cancel`],
//! [`Request::ack_for`]).
//!
//! Branches and hosts are compared case-insensitively (section 7.3.1: tokens are
//! case-insensitive), so both are stored lower-cased. Nothing here keeps state.

use crate::message::{is_rfc3261_branch, HeaderError, Method, Request, Response, Via};

/// What identifies a client transaction: the branch of the request's top Via and the method
/// (the CSeq method of its responses).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ClientId {
    branch: Box<str>,
    method: Method,
}

impl ClientId {
    /// The id of a request the layer sends; `None` without an RFC 3261 branch.
    pub fn of_request(request: &Request) -> Option<Self> {
        let branch = request.branch().filter(|b| is_rfc3261_branch(b))?;
        Some(Self {
            branch: branch.to_ascii_lowercase().into_boxed_str(),
            method: request.method.clone(),
        })
    }

    /// The id of the client transaction a response belongs to; `None` when the top Via has no
    /// branch or the CSeq is unreadable.
    pub fn of_response(response: &Response) -> Option<Self> {
        let branch = response.headers.top_via_branch()?;
        let cseq = response.headers.cseq().ok()?;
        Some(Self {
            branch: branch.to_ascii_lowercase().into_boxed_str(),
            method: cseq.method,
        })
    }
}

/// The method a request is matched under: an ACK belongs to the INVITE transaction.
fn matched_method(method: &Method) -> Method {
    match method {
        Method::Ack => Method::Invite,
        m => m.clone(),
    }
}

/// What identifies a server transaction for a request with an RFC 3261 branch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ServerId {
    branch: Box<str>,
    host: Box<str>,
    port: u16,
    method: Method,
}

/// What identifies a server transaction for an RFC 2543 request (no magic cookie), To tag
/// excepted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct LegacyId {
    uri: Box<str>,
    from_tag: Option<Box<str>>,
    call_id: Box<str>,
    cseq: u32,
    method: Method,
    via: Box<str>,
}

/// The identity of a received request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RequestId {
    /// RFC 3261 matching.
    Rfc3261(ServerId),
    /// RFC 2543 matching, with the request's To tag to compare separately.
    Legacy {
        id: LegacyId,
        to_tag: Option<Box<str>>,
    },
}

/// The id of `request` when matched as a `method` transaction: its own method for a new request
/// or a retransmission, INVITE for an ACK or for the INVITE a CANCEL refers to.
pub(crate) fn request_id(request: &Request, method: &Method) -> Result<RequestId, HeaderError> {
    request_id_with_via(request, &request.headers.top_via()?, method)
}

/// [`request_id`] with the request's top Via already parsed.
pub(crate) fn request_id_with_via(
    request: &Request,
    via: &Via,
    method: &Method,
) -> Result<RequestId, HeaderError> {
    let method = matched_method(method);
    let host = via.host.to_string().to_ascii_lowercase().into_boxed_str();
    match via.branch().filter(|b| is_rfc3261_branch(b)) {
        Some(branch) => Ok(RequestId::Rfc3261(ServerId {
            branch: branch.to_ascii_lowercase().into_boxed_str(),
            host,
            port: via.port_or_default(),
            method,
        })),
        None => {
            let cseq = request.headers.cseq()?;
            let via_key = format!(
                "{}/{}:{};{}",
                via.transport,
                host,
                via.port_or_default(),
                via.branch().unwrap_or_default()
            );
            Ok(RequestId::Legacy {
                id: LegacyId {
                    uri: request.uri.to_string().into_boxed_str(),
                    from_tag: request.headers.from_tag().map(Box::from),
                    call_id: Box::from(request.headers.call_id()?),
                    cseq: cseq.seq,
                    method,
                    via: via_key.into_boxed_str(),
                },
                to_tag: request.headers.to_tag().map(Box::from),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{CSeq, HeaderName, Uri};

    fn invite() -> Request {
        let mut r = Request::new(Method::Invite, Uri::parse("sip:bob@biloxi.com").unwrap());
        r.headers.push(
            HeaderName::Via,
            "SIP/2.0/UDP pc33.atlanta.com;branch=z9hG4bKnashds8, SIP/2.0/UDP p.example.com;branch=z9hG4bKp",
        );
        r.headers.set_max_forwards(70);
        r.headers.push(HeaderName::Route, "<sip:p1.example.com;lr>");
        r.headers.push(HeaderName::Route, "<sip:p2.example.com;lr>");
        r.headers.push(HeaderName::To, "Bob <sip:bob@biloxi.com>");
        r.headers.push(
            HeaderName::From,
            "Alice <sip:alice@atlanta.com>;tag=1928301774",
        );
        r.headers.set_call_id("a84b4c76e66710");
        r.headers.set_cseq(&CSeq::new(314159, Method::Invite));
        r.headers
            .push(HeaderName::Contact, "<sip:alice@pc33.atlanta.com>");
        r
    }

    #[test]
    fn server_ids_follow_17_2_3() {
        let inv = invite();
        let id = request_id(&inv, &inv.method).unwrap();
        let mut ack = inv
            .ack_for(&Response::from_request(&inv, 486, None))
            .unwrap();
        assert_eq!(
            request_id(&ack, &ack.method).unwrap(),
            id,
            "ACK matches INVITE"
        );
        let cancel = inv.cancel().unwrap();
        assert_ne!(request_id(&cancel, &cancel.method).unwrap(), id);
        assert_eq!(request_id(&cancel, &Method::Invite).unwrap(), id);
        // Branch and host compare case-insensitively; the port defaults to 5060.
        ack.headers.set(
            HeaderName::Via,
            "SIP/2.0/UDP PC33.Atlanta.com:5060;branch=z9hG4bKNASHDS8",
        );
        assert_eq!(request_id(&ack, &ack.method).unwrap(), id);
        // Another sent-by is another transaction.
        ack.headers.set(
            HeaderName::Via,
            "SIP/2.0/UDP pc34.atlanta.com;branch=z9hG4bKnashds8",
        );
        assert_ne!(request_id(&ack, &ack.method).unwrap(), id);
    }

    #[test]
    fn legacy_ids_use_the_2543_fields() {
        let mut inv = invite();
        inv.headers
            .set(HeaderName::Via, "SIP/2.0/UDP pc33.atlanta.com;branch=1234");
        let RequestId::Legacy { id, to_tag } = request_id(&inv, &inv.method).unwrap() else {
            panic!("expected a legacy id");
        };
        assert_eq!(to_tag, None);
        let mut ack = inv
            .ack_for(&{
                let mut r = Response::from_request(&inv, 404, None);
                r.set_to_tag("t1");
                r
            })
            .unwrap();
        let RequestId::Legacy {
            id: ack_id,
            to_tag: ack_tag,
        } = request_id(&ack, &ack.method).unwrap()
        else {
            panic!("expected a legacy id");
        };
        assert_eq!(ack_id, id);
        assert_eq!(ack_tag.as_deref(), Some("t1"));
        ack.headers.set_cseq(&CSeq::new(314160, Method::Ack));
        assert_ne!(
            request_id(&ack, &ack.method).unwrap(),
            RequestId::Legacy {
                id,
                to_tag: ack_tag
            }
        );
        inv.headers.remove(&HeaderName::CSeq);
        assert!(request_id(&inv, &inv.method).is_err());
    }

    #[test]
    fn client_ids_pair_requests_and_responses() {
        let inv = invite();
        let id = ClientId::of_request(&inv).unwrap();
        let resp = Response::from_request(&inv, 180, None);
        assert_eq!(ClientId::of_response(&resp), Some(id.clone()));
        let cancel = inv.cancel().unwrap();
        let cancel_id = ClientId::of_request(&cancel).unwrap();
        assert_ne!(cancel_id, id);
        assert_eq!(cancel_id.branch, id.branch);
        assert_eq!(cancel_id.method, Method::Cancel);
        let mut legacy = inv.clone();
        legacy
            .headers
            .set(HeaderName::Via, "SIP/2.0/UDP h;branch=1234");
        assert_eq!(ClientId::of_request(&legacy), None);
    }
}
