//! Semantic validation of parsed messages, separate from syntactic parsing (RFC 3261 sections
//! 8.2 and 16.3): version, mandatory headers, single-valued headers, well-formed typed values,
//! CSeq method agreement and Content-Length consistency.
//!
//! A failure says which status to answer (400, 501, 505) and why, so that a transport or
//! transaction user can answer statelessly with [`ValidationError::response`]. Responses that
//! fail are to be discarded. Application-level decisions (unsupported URI scheme 416, unsupported
//! extension 420, unsupported media type 415, authentication) are not made here. RFC 2543 requests
//! are tolerated: Max-Forwards and the From tag may be absent.

use super::header::HeaderName;
use super::typed::HeaderError;
use super::uri::Uri;
use super::{Method, Request, Response, Version};

/// Why a message is not acceptable, with the status to answer a request with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// The version is not SIP/2.0 (status 505).
    #[error("unsupported SIP version {0}")]
    UnsupportedVersion(Version),
    /// A mandatory header is missing (status 400).
    #[error("missing {0} header")]
    MissingHeader(HeaderName),
    /// A header that must appear once appears several times (status 400).
    #[error("more than one {0} header")]
    DuplicateHeader(HeaderName),
    /// A header value is malformed (status 400).
    #[error(transparent)]
    InvalidHeader(#[from] HeaderError),
    /// The CSeq method differs from the request method (status 400, or 501 when the request
    /// method is one this crate does not know, as RFC 4475 mismatch02 suggests).
    #[error("CSeq method {cseq} does not match request method {request}")]
    CSeqMethodMismatch {
        /// Method of the request line.
        request: Method,
        /// Method in CSeq.
        cseq: Method,
    },
    /// Content-Length differs from the body length (status 400).
    #[error("Content-Length {header} does not match the body length {body}")]
    ContentLengthMismatch {
        /// Value of the header.
        header: usize,
        /// Actual body length.
        body: usize,
    },
    /// The Request-URI carries URI headers, which RFC 3261 section 19.1.1 forbids (status 400).
    #[error("Request-URI must not contain headers")]
    RequestUriHeaders,
    /// The status code of a response is outside 100..=699.
    #[error("invalid status code {0}")]
    InvalidStatus(u16),
}

impl ValidationError {
    /// The status to answer a request with.
    pub fn status(&self) -> u16 {
        match self {
            ValidationError::UnsupportedVersion(_) => 505,
            ValidationError::CSeqMethodMismatch { request, .. } if request.is_extension() => 501,
            _ => 400,
        }
    }

    /// A reason phrase describing the problem, e.g. `Bad Request (missing Call-ID header)`.
    pub fn reason(&self) -> String {
        format!("{} ({self})", super::reason_phrase(self.status()))
    }

    /// The stateless response to `req`: [`Response::from_request`] with [`Self::status`] and
    /// [`Self::reason`]; `None` for an ACK, which is never answered.
    pub fn response(&self, req: &Request) -> Option<Response> {
        if req.method == Method::Ack {
            return None;
        }
        Some(Response::from_request(
            req,
            self.status(),
            Some(&self.reason()),
        ))
    }
}

/// Headers that must appear at most once.
const SINGLE: [HeaderName; 7] = [
    HeaderName::From,
    HeaderName::To,
    HeaderName::CallId,
    HeaderName::CSeq,
    HeaderName::MaxForwards,
    HeaderName::ContentLength,
    HeaderName::ContentType,
];

fn check_common(
    headers: &super::Headers,
    version: Version,
    body_len: usize,
) -> Result<super::CSeq, ValidationError> {
    if version != Version::SIP_2_0 {
        return Err(ValidationError::UnsupportedVersion(version));
    }
    for name in [
        HeaderName::Via,
        HeaderName::From,
        HeaderName::To,
        HeaderName::CallId,
        HeaderName::CSeq,
    ] {
        if !headers.contains(&name) {
            return Err(ValidationError::MissingHeader(name));
        }
    }
    for name in SINGLE {
        if headers.count(&name) > 1 {
            return Err(ValidationError::DuplicateHeader(name));
        }
    }
    let vias = headers.via()?;
    if vias.is_empty() {
        return Err(ValidationError::MissingHeader(HeaderName::Via));
    }
    headers.from()?;
    headers.to()?;
    headers.call_id()?;
    let cseq = headers.cseq()?;
    if let Some(len) = headers.content_length()? {
        if len != body_len {
            return Err(ValidationError::ContentLengthMismatch {
                header: len,
                body: body_len,
            });
        }
    }
    headers.content_type()?;
    headers.contact()?;
    headers.record_route()?;
    Ok(cseq)
}

/// Checks a parsed request before it reaches the transaction layer.
pub fn validate_request(req: &Request) -> Result<(), ValidationError> {
    let cseq = check_common(&req.headers, req.version, req.body.len())?;
    if cseq.method != req.method {
        return Err(ValidationError::CSeqMethodMismatch {
            request: req.method.clone(),
            cseq: cseq.method,
        });
    }
    req.headers.max_forwards()?;
    req.headers.route()?;
    if let Uri::Sip(u) = &req.uri {
        if !u.headers.is_empty() {
            return Err(ValidationError::RequestUriHeaders);
        }
    }
    Ok(())
}

/// Checks a parsed response; a response that fails is discarded.
pub fn validate_response(resp: &Response) -> Result<(), ValidationError> {
    if !(100..=699).contains(&resp.status) {
        return Err(ValidationError::InvalidStatus(resp.status));
    }
    check_common(&resp.headers, resp.version, resp.body.len()).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;

    fn req(text: &str) -> Request {
        match Message::parse(text.replace('\n', "\r\n")).unwrap() {
            Message::Request(r) => r,
            Message::Response(_) => panic!("not a request"),
        }
    }

    const GOOD: &str = "OPTIONS sip:a@b SIP/2.0
Via: SIP/2.0/UDP h;branch=z9hG4bK1
To: <sip:a@b>
From: <sip:c@d>;tag=1
Call-ID: x
CSeq: 1 OPTIONS
Max-Forwards: 70
Content-Length: 0

";

    #[test]
    fn accepts_a_good_request() {
        assert_eq!(validate_request(&req(GOOD)), Ok(()));
        let no_mf = GOOD.replace("Max-Forwards: 70\n", "");
        assert_eq!(validate_request(&req(&no_mf)), Ok(()));
    }

    #[test]
    fn rejections_and_statuses() {
        let cases = [
            (GOOD.replace("SIP/2.0\n", "SIP/3.0\n"), 505),
            (GOOD.replace("Call-ID: x\n", ""), 400),
            (
                GOOD.replace("Via: SIP/2.0/UDP h;branch=z9hG4bK1\n", ""),
                400,
            ),
            (
                GOOD.replace("Call-ID: x\n", "Call-ID: x\nCall-ID: y\n"),
                400,
            ),
            (GOOD.replace("CSeq: 1 OPTIONS", "CSeq: 1 INVITE"), 400),
            (
                GOOD.replace("OPTIONS sip", "FOO sip")
                    .replace("CSeq: 1 OPTIONS", "CSeq: 1 INVITE"),
                501,
            ),
            (GOOD.replace("Max-Forwards: 70", "Max-Forwards: many"), 400),
            (GOOD.replace("Content-Length: 0", "Content-Type: bad"), 400),
            (GOOD.replace("sip:a@b SIP", "sip:a@b?Route=x SIP"), 400),
            (GOOD.replace("To: <sip:a@b>", "To: \"open <sip:a@b>"), 400),
            (
                GOOD.replace(
                    "Via: SIP/2.0/UDP h;branch=z9hG4bK1",
                    "Via: SIP/2.0/UDP h;;,",
                ),
                400,
            ),
        ];
        for (text, status) in cases {
            let err = validate_request(&req(&text)).unwrap_err();
            assert_eq!(err.status(), status, "{err} for\n{text}");
            let resp = err.response(&req(&text)).unwrap();
            assert_eq!(resp.status, status);
            assert!(resp.reason.contains(&err.to_string()));
        }
        let mut mismatch = req(GOOD);
        mismatch.body = bytes::Bytes::from_static(b"abc");
        assert_eq!(
            validate_request(&mismatch),
            Err(ValidationError::ContentLengthMismatch { header: 0, body: 3 })
        );
        let ack = req(&GOOD.replace("OPTIONS", "ACK").replace("Call-ID: x\n", ""));
        assert!(validate_request(&ack).unwrap_err().response(&ack).is_none());
    }

    #[test]
    fn responses() {
        let text = "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nTo: <sip:a@b>;tag=2\r\nFrom: <sip:c@d>;tag=1\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\n\r\n";
        let Message::Response(mut r) = Message::parse(text).unwrap() else {
            panic!()
        };
        assert_eq!(validate_response(&r), Ok(()));
        r.status = 700;
        assert_eq!(
            validate_response(&r),
            Err(ValidationError::InvalidStatus(700))
        );
        r.status = 200;
        r.headers.remove(&HeaderName::CSeq);
        assert_eq!(
            validate_response(&r),
            Err(ValidationError::MissingHeader(HeaderName::CSeq))
        );
    }
}
